"""The host session: one lease, keepalive, fence clock, host record, owners, fencing."""
