"""The gRPC connection to etcd: deadlines, error translation, endpoint failover."""
