"""Development tools the driver never uses: embedded etcd, host processes and their wire."""
