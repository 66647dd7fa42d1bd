"""Lock operations over a session: grants (one pipeline around ``plan``, the pure decisions),
releases, migration handoff, records, status."""
