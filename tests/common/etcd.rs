//! A real etcd for tests: private data dir, free loopback ports, killed by PID on drop.
