"""What virtlease stores in etcd: key layout, value encoding, state strings, holders (pure)."""
