//! Real HAProxy processes and local HTTP backends for tests, on 127.0.0.1 only.
