//! haconfd: watch a key-value source, render haproxy.cfg, prove it, install it, reload HAProxy.
//!
//! - `cli`      — the command line (clap), parsing only
//! - `config`   — the TOML config file → validated `Config`; errors name key, value and fix
//! - `model`    — raw pairs → screened `Snapshot` → typed `Registry`
//! - `source`   — where pairs come from: `file` (notify, or polling) and `etcd` (read, watch)
//! - `backoff`  — retry delays with jitter
//! - `etcd`     — the etcd client, the only module that knows etcd-client: connect, TLS, auth,
//!   members, backoff, paged reads, failure kinds, leases
//! - `slots`    — which server line each instance occupies, stable across applies
//! - `render`   — pure: `(Snapshot, Registry) → bytes`, with the confd-equivalent functions
//! - `haproxy`  — `haproxy -c`, atomic install, master socket, supervised HAProxy, reload command
//! - `guard`    — the shrink guard: a collapsing registry cannot empty the load balancer
//! - `isolate`  — one bad registration never freezes the fleet: map haproxy -c errors to services
//! - `apply`    — one apply: guard → render → install → reload, restoring on failure
//! - `reactor`  — the event loop: coalescing per `[wait]`, one apply at a time
//! - `reconfig` — the config file and templates read again (SIGHUP, an edit); unchanged bytes do nothing
//! - `announce` — the presence sidecar: an instance's key under a lease
//! - `fleet`    — each node's state published to etcd, and `haconfd fleet`: who has converged
//! - `forensics` — the past: render at a revision, explain every line, a service's history
//! - `daemon`   — `run`: setup, the tasks (source, file watch, signals, watchdog, admin), the reactor's applier
//! - `commands` — the one-shot subcommands: render, check, version, completions, manpage
//! - `failure`  — how a command ends when it does not succeed (its exit code); stdout writes
//! - `metrics`  — Prometheus metrics and readiness state
//! - `logging`  — log output that never blocks or kills the daemon; the panic rule (exit 70)
//! - `admin`    — the admin endpoint: /metrics, /healthz, /readyz
//! - `notify`   — systemd's notify protocol: READY=1, WATCHDOG=1, STOPPING=1

pub mod admin;
pub mod announce;
pub mod apply;
pub mod backoff;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod etcd;
pub mod failure;
pub mod fleet;
pub mod forensics;
pub mod guard;
pub mod haproxy;
pub mod isolate;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod reactor;
pub mod reconfig;
pub mod render;
pub mod slots;
pub mod source;
