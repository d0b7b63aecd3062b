//! The fleet view: every `haconfd run` publishes its node's state to etcd, and `haconfd fleet`
//! shows every live node and whether it has converged.
//!
//! Publishing ([`Publisher`]): in, the daemon's [`Metrics`] (applied revision, last apply,
//! held services, readiness) and a poke after every apply; out, one key `<prefix><node>` whose
//! value is a [`NodeState`] in JSON, under a lease of [`LEASE_TTL`] that is kept alive, so a
//! node that dies leaves the view within the TTL and one that stops revokes it at once. It
//! writes at most once a second and only when the JSON changed (always after a reconnect),
//! and it never holds up or fails the daemon: etcd away is a warning and a retry.
//!
//! Reading ([`command`]): in, the config's `[etcd]`, `[source] prefixes` and `[fleet] prefix`;
//! out, one row per live node. A node whose published revision is R has converged when etcd
//! holds under the watched prefixes what it held at R: no key changed value, appeared or went
//! away since. A key put again with the value it had (announce does that after an etcd
//! outage) moves its revision but changes nothing a node renders, so it does not count.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::etcd::{Client, GetOptions, KeyValue, KvClient, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cli::FleetArgs;
use crate::config::ConfigSource;
use crate::config::{Config, EtcdConfig, HaproxyMode, SourceKind};
use crate::etcd::lease::{self, Held, Lost, Opened};
use crate::etcd::{
    Failure as EtcdFailure, Kind, MAX_MESSAGE, Members, Outage, Pages, Recovered, Retry,
};
use crate::failure::Failure;
use crate::metrics::Metrics;

mod publish;
mod view;

pub use self::publish::Publisher;
pub use self::view::command;
#[cfg(test)]
use self::view::*;

/// The node key's lease: a node that dies leaves the view this long after its last keep-alive
/// (sent every TTL/3, 10 s).
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// At most one write per this interval: the latest state is written, the ones between are not.
const MIN_WRITE_INTERVAL: Duration = Duration::from_secs(1);
/// The state is compared with the last one written this often even without a poke, so a change
/// nothing pokes for (the source turning stale) still reaches the view.
const REFRESH_EVERY: Duration = Duration::from_secs(10);
/// A deadline for each etcd call: a dead member never hangs the publisher or the command.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// The revoke on stop: the node leaves the view at once, or with its lease.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often `fleet --wait` looks again.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// Up to this many keys changed since a node's revision are compared one `get` each; more are
/// compared by reading the prefix in pages at both revisions.
const PER_KEY_COMPARE_MAX: usize = 16;

/// What a node publishes, as JSON under `<prefix><node>`. Fields a reader does not find (an
/// older or newer haconfd) take their defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeState {
    pub node: String,
    /// The source revision of the last successful apply; 0 before the first.
    pub revision: i64,
    /// The hash of the rendered files of the last apply ("" before the first).
    pub hash: String,
    /// The last apply's kind: none, written, start, runtime or reload ("" before the first).
    pub kind: String,
    /// When the last apply finished, RFC 3339 UTC; null before the first.
    pub applied_at: Option<String>,
    /// Services the shrink guard holds at their last applied instances.
    pub held: Vec<String>,
    /// Keys whose changes are held back because they failed `haproxy -c`.
    pub held_back: Vec<String>,
    /// Keys left out of the registry (screen or typed parse).
    pub rejected: u64,
    /// "running", "not started", "stopping", or "not driven" (modes none and command).
    pub haproxy: String,
    /// What `/readyz` says.
    pub ready: bool,
    /// Why not ready; absent when ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The haconfd version that published this.
    pub version: String,
}

impl NodeState {
    /// This node's state now.
    pub fn current(node: &str, mode: HaproxyMode, metrics: &Metrics) -> NodeState {
        let last = metrics.last_apply();
        let (held, held_back) = metrics.held();
        let readiness = metrics.readiness();
        let running = last.as_ref().is_some_and(|l| l.haproxy_running);
        NodeState {
            node: node.to_owned(),
            revision: metrics.applied_revision(),
            hash: last.as_ref().map(|l| l.hash.clone()).unwrap_or_default(),
            kind: last
                .as_ref()
                .map(|l| l.kind.as_str().to_owned())
                .unwrap_or_default(),
            applied_at: last
                .as_ref()
                .map(|l| humantime::format_rfc3339_seconds(l.at).to_string()),
            held,
            held_back,
            rejected: metrics.rejected(),
            haproxy: haproxy_state(mode, metrics.stopping(), running).to_owned(),
            ready: readiness.is_ok(),
            reason: readiness.err(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// What a node whose haconfd is stopping publishes as its HAProxy's state.
const HAPROXY_STOPPING: &str = "stopping";

/// HAProxy's state in a few words. Only a supervised HAProxy stops with haconfd; in master
/// mode it is someone else's and keeps running.
fn haproxy_state(mode: HaproxyMode, stopping: bool, running: bool) -> &'static str {
    match mode {
        HaproxyMode::None | HaproxyMode::Command => "not driven",
        HaproxyMode::Master => "running",
        HaproxyMode::Supervise if stopping => HAPROXY_STOPPING,
        HaproxyMode::Supervise if running => "running",
        HaproxyMode::Supervise => "not started",
    }
}

#[cfg(test)]
mod tests;
