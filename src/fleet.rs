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
use std::time::{Duration, Instant, SystemTime};

use crate::etcd::{Client, GetOptions, KeyValue, KvClient, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cli::FleetArgs;
use crate::config::ConfigSource;
use crate::config::{Config, EtcdConfig, HaproxyMode, SourceKind};
use crate::etcd::lease::{self, Held, Lost, Opened};
use crate::etcd::{
    BACKOFF_AUTH_MIN, Backoff, Failure as EtcdFailure, Kind, MAX_MESSAGE, Members, Pages,
};
use crate::failure::Failure;
use crate::metrics::Metrics;

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

// ---------------------------------------------------------------------------------------------
// Publishing
// ---------------------------------------------------------------------------------------------

/// The task that keeps this node's key in etcd; [`Publisher::leave`] takes it out.
pub struct Publisher {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Starts publishing when `[fleet] publish` is set (it only can be with the etcd source);
    /// None otherwise. The task wakes at every [`Metrics::poke_fleet`].
    pub fn spawn(config: &Config, metrics: Arc<Metrics>) -> Option<Publisher> {
        let SourceKind::Etcd(etcd) = &config.source.kind else {
            return None;
        };
        if !config.fleet.publish {
            return None;
        }
        let key = format!("{}{}", config.fleet.prefix, config.fleet.node);
        tracing::info!(key = %key, ttl = ?LEASE_TTL, "fleet view: publishing this node's state");
        let task = Task {
            etcd: etcd.clone(),
            key,
            node: config.fleet.node.clone(),
            mode: config.haproxy.mode,
            metrics,
            lease: None,
            backoff: Backoff::new(),
            down_since: None,
            last_json: None,
            last_write: None,
            members: Members::default(),
        };
        let (stop, stopped) = oneshot::channel();
        Some(Publisher {
            stop,
            task: tokio::spawn(task.run(stopped)),
        })
    }

    /// Revokes the lease, so that the node leaves the view at once; when etcd does not answer
    /// within a second the key goes with its lease. Bounded: it never holds up a stop.
    pub async fn leave(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(REVOKE_TIMEOUT + CALL_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// The publisher's state; it outlives each connection.
struct Task {
    etcd: EtcdConfig,
    key: String,
    node: String,
    mode: HaproxyMode,
    metrics: Arc<Metrics>,
    /// The lease held, if any: resumed after an outage, revoked on stop.
    lease: Option<i64>,
    backoff: Backoff,
    /// When the current outage began (None while etcd answers); one warning per outage.
    down_since: Option<Instant>,
    /// What was last written, and when.
    last_json: Option<String>,
    last_write: Option<tokio::time::Instant>,
    /// Which etcd member to talk to.
    members: Members,
}

enum Never {}

impl Task {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut client: Option<Client> = None;
        loop {
            let connected = tokio::select! {
                r = lease::connect(&mut self.members, &self.etcd) => r,
                _ = &mut stop => break,
            };
            let c = match connected {
                Ok(c) => c,
                Err(f) => {
                    client = None;
                    if self.wait_after(f, &mut stop).await {
                        break;
                    }
                    continue;
                }
            };
            client = Some(c.clone());
            let lost = tokio::select! {
                lost = self.session(&c) => lost,
                _ = &mut stop => break,
            };
            match lost {
                Lost::Lease(why) => {
                    tracing::warn!(key = %self.key, reason = %why, "fleet view: the node key's lease is gone; publishing again under a new one");
                    self.lease = None;
                }
                Lost::Failed(f) => {
                    // The member in use failed: the next connect starts at another one.
                    self.members.failed(self.etcd.endpoints.len());
                    if self.wait_after(f, &mut stop).await {
                        break;
                    }
                }
            }
        }
        self.revoke(client.as_ref()).await;
    }

    /// Logs a failure (a warning once per outage) and waits the backoff. True when the stop
    /// came meanwhile.
    async fn wait_after(&mut self, f: EtcdFailure, stop: &mut oneshot::Receiver<()>) -> bool {
        let floor = if f.kind == Kind::Auth {
            BACKOFF_AUTH_MIN
        } else {
            Duration::ZERO
        };
        let delay = self.backoff.next(floor);
        let retry_in = format!("{}ms", delay.as_millis());
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            let fix = if f.kind == Kind::Auth {
                " (the etcd user needs write access to the fleet prefix and lease rights, or set [fleet] publish = false)"
            } else {
                ""
            };
            tracing::warn!(
                error = %f,
                key = %self.key,
                endpoints = %self.etcd.endpoints.join(","),
                retry_in,
                "fleet view: cannot publish this node's state; retrying until etcd answers (the daemon is not affected){fix}"
            );
        } else {
            tracing::debug!(error = %f, retry_in, "fleet view: etcd still unreachable");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = stop => true,
        }
    }

    async fn session(&mut self, client: &Client) -> Lost {
        match self.session_inner(client).await {
            Ok(never) => match never {},
            Err(lost) => lost,
        }
    }

    /// Resumes or grants the lease, writes the state at once, then writes it again whenever
    /// it changes (at most once a second) while keeping the lease alive.
    async fn session_inner(&mut self, client: &Client) -> Result<Never, Lost> {
        let user = self.etcd.username.clone();
        let user = user.as_deref();
        let (mut held, opened) =
            Held::open(client, &mut self.lease, LEASE_TTL, CALL_TIMEOUT, user).await?;
        if let Opened::Granted {
            replaced: Some((old, why)),
            ..
        } = &opened
        {
            tracing::info!(key = %self.key, lease = format!("{old:x}"), reason = %why, "fleet view: the node key's lease expired while etcd was unreachable; a new one is granted");
        }
        let mut kv = client.kv_client();
        // Always written after a (re)connect: the key may be gone (a new lease, a restored etcd).
        self.publish(&mut kv, held.id(), true, user).await?;
        if let Some(since) = self.down_since.take() {
            tracing::info!(
                key = %self.key,
                down_for = %humantime::format_duration(Duration::from_secs(since.elapsed().as_secs())),
                "fleet view: etcd reachable again; this node's state is published"
            );
        }
        self.backoff.reset();
        let metrics = Arc::clone(&self.metrics);
        let mut refresh =
            tokio::time::interval_at(tokio::time::Instant::now() + REFRESH_EVERY, REFRESH_EVERY);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending = false;
        loop {
            let due = self
                .last_write
                .map_or_else(tokio::time::Instant::now, |t| t + MIN_WRITE_INTERVAL);
            tokio::select! {
                lost = held.until_lost(user) => return Err(lost),
                () = metrics.fleet_poked() => pending = true,
                _ = refresh.tick() => pending = true,
                () = tokio::time::sleep_until(due), if pending => {
                    pending = false;
                    self.publish(&mut kv, held.id(), false, user).await?;
                }
            }
        }
    }

    /// Writes the node's state under the lease, unless it equals what was written last
    /// (`force`: write anyway).
    async fn publish(
        &mut self,
        kv: &mut KvClient,
        lease: i64,
        force: bool,
        user: Option<&str>,
    ) -> Result<(), Lost> {
        let state = NodeState::current(&self.node, self.mode, &self.metrics);
        let json = match serde_json::to_string(&state) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "fleet view: cannot encode this node's state");
                return Ok(());
            }
        };
        if !force && self.last_json.as_deref() == Some(json.as_str()) {
            return Ok(());
        }
        let options = PutOptions::new().with_lease(lease);
        lease::call(
            "put of the node key",
            CALL_TIMEOUT,
            user,
            kv.put(self.key.as_str(), json.as_str(), Some(options)),
        )
        .await?;
        tracing::debug!(key = %self.key, revision = state.revision, ready = state.ready, "fleet view: published");
        self.last_json = Some(json);
        self.last_write = Some(tokio::time::Instant::now());
        Ok(())
    }

    /// Revokes the lease (the key goes with it), within [`REVOKE_TIMEOUT`].
    async fn revoke(&self, client: Option<&Client>) {
        let (Some(client), Some(id)) = (client, self.lease) else {
            tracing::debug!("fleet view: nothing to revoke");
            return;
        };
        let mut lc = client.lease_client();
        match tokio::time::timeout(REVOKE_TIMEOUT, lc.revoke(id)).await {
            Ok(Ok(_)) => {
                tracing::info!(key = %self.key, "fleet view: left (lease revoked, node key removed)")
            }
            Ok(Err(e)) if lease::not_found(&e) => {
                tracing::info!(key = %self.key, "fleet view: the node key's lease had already expired")
            }
            Ok(Err(e)) => tracing::warn!(
                key = %self.key,
                error = %EtcdFailure::from_etcd("lease revoke", &e, self.etcd.username.as_deref()),
                "fleet view: cannot revoke the node key's lease; the key goes with it within {}s",
                LEASE_TTL.as_secs()
            ),
            Err(_) => tracing::warn!(
                key = %self.key,
                "fleet view: etcd did not answer the revoke within 1s; the node key goes with its lease within {}s",
                LEASE_TTL.as_secs()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `haconfd fleet`
// ---------------------------------------------------------------------------------------------

/// One live node as `fleet` shows it.
#[derive(Debug, Clone)]
struct Row {
    /// The published state; the node name is the key's (the identity in etcd).
    state: NodeState,
    converged: bool,
    /// Why it has not converged, or what else an operator should know.
    note: Option<String>,
}

impl Row {
    /// Whether `--wait` waits for this node. A node whose haconfd is stopping has failed the
    /// load balancer's health check (the lame duck) and applies nothing more once HAProxy
    /// soft-stops, yet keeps its key until then: waiting for it would hold every deploy during
    /// a node restart for up to the drain.
    fn holds_the_gate(&self) -> bool {
        !self.converged && self.state.haproxy != HAPROXY_STOPPING
    }
}

/// Whether the registry at one revision is the registry now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Converged,
    Behind(String),
}

/// `haconfd fleet`: the table (or `--json`) of every live node; with `--wait`, the deploy gate.
pub async fn command(cs: &ConfigSource, args: FleetArgs) -> Result<(), Failure> {
    let timeout = humantime::parse_duration(&args.timeout).map_err(|e| {
        Failure::Usage(format!(
            "--timeout {:?}: is not a duration ({e}) (fix: write a number with a unit, like \"30s\" or \"2m\")",
            args.timeout
        ))
    })?;
    let config = cs.load()?;
    let etcd = crate::config::etcd_for_client(&config, &args.etcd)?;
    let prefixes = config.source.prefixes.clone();
    let fleet_prefix = config.fleet.prefix.clone();
    let endpoints = etcd.endpoints.join(",");
    let deadline = tokio::time::Instant::now() + timeout;

    let mut client: Option<Client> = None;
    let mut last_rows: Option<Vec<Row>> = None;
    let mut last_error: Option<String> = None;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt = async {
            let c = match &client {
                Some(c) => c.clone(),
                None => {
                    let options = crate::etcd::connect_options(&etcd)?;
                    let (c, _) = crate::etcd::connect_with(&etcd, options).await?;
                    client = Some(c.clone());
                    c
                }
            };
            view(&c, &prefixes, &fleet_prefix, etcd.username.as_deref()).await
        };
        let result = tokio::time::timeout(remaining.max(WAIT_POLL), attempt)
            .await
            .unwrap_or_else(|_| Err(EtcdFailure::timeout("fleet view", remaining)));
        match result {
            Ok(rows) => {
                let done = !rows.is_empty() && !rows.iter().any(Row::holds_the_gate);
                if !args.wait || done {
                    if rows.is_empty() {
                        tracing::warn!(prefix = %fleet_prefix, "no live node has published its state (is [fleet] publish on, and do the nodes reach etcd?)");
                    }
                    return print(&rows, args.json);
                }
                last_rows = Some(rows);
                last_error = None;
            }
            Err(f) => {
                client = None;
                let message = format!("etcd unreachable at {endpoints}: {f}");
                if !args.wait {
                    return Err(Failure::Runtime(anyhow::anyhow!(
                        "cannot read the fleet view: {message}"
                    )));
                }
                if last_error.is_none() {
                    tracing::warn!("{message}; trying again until the timeout");
                }
                last_error = Some(message);
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(WAIT_POLL.min(deadline - now)).await;
    }
    // Timed out waiting.
    let waited = humantime::format_duration(timeout);
    if let Some(e) = last_error {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "the fleet did not converge within {waited}: {e}"
        )));
    }
    let rows = last_rows.unwrap_or_default();
    print(&rows, args.json)?;
    if rows.is_empty() {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "no live node published its state under {fleet_prefix:?} within {waited} (is [fleet] publish on, and do the nodes reach etcd?)"
        )));
    }
    let lagging: Vec<String> = rows
        .iter()
        .filter(|r| r.holds_the_gate())
        .map(|r| match &r.note {
            Some(n) => format!("{} ({n})", r.state.node),
            None => r.state.node.clone(),
        })
        .collect();
    Err(Failure::Runtime(anyhow::anyhow!(
        "not every node converged within {waited}; lagging: {}",
        lagging.join(", ")
    )))
}

/// Reads every live node and judges each one's convergence, all at one etcd revision.
async fn view(
    client: &Client,
    prefixes: &[String],
    fleet_prefix: &str,
    user: Option<&str>,
) -> Result<Vec<Row>, EtcdFailure> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let resp = get(
        &mut kv,
        "read of the fleet prefix",
        fleet_prefix,
        GetOptions::new().with_prefix(),
        user,
    )
    .await?;
    let now = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut rows = Vec::with_capacity(resp.kvs().len());
    for item in resp.kvs() {
        let key = String::from_utf8_lossy(item.key());
        let node = key.strip_prefix(fleet_prefix).unwrap_or(&key).to_owned();
        match serde_json::from_slice::<NodeState>(item.value()) {
            Ok(mut state) => {
                state.node = node;
                rows.push(Row {
                    state,
                    converged: false,
                    note: None,
                });
            }
            Err(e) => rows.push(Row {
                state: NodeState {
                    node,
                    ..NodeState::default()
                },
                converged: false,
                note: Some(format!("unreadable state: {e}")),
            }),
        }
    }
    let revisions: BTreeSet<i64> = rows
        .iter()
        .filter(|r| r.note.is_none())
        .map(|r| r.state.revision)
        .collect();
    let mut verdicts: BTreeMap<i64, Verdict> = BTreeMap::new();
    for r in revisions {
        let verdict = if r <= 0 {
            Verdict::Behind("no successful apply yet".into())
        } else if r > now {
            Verdict::Behind(format!(
                "its revision {r} is ahead of etcd's {now} (etcd restored from a backup?)"
            ))
        } else {
            converged(&mut kv, prefixes, r, now, user).await?
        };
        verdicts.insert(r, verdict);
    }
    for row in rows.iter_mut().filter(|r| r.note.is_none()) {
        match verdicts.get(&row.state.revision) {
            Some(Verdict::Converged) => row.converged = true,
            Some(Verdict::Behind(why)) => row.note = Some(why.clone()),
            None => {}
        }
    }
    for row in rows
        .iter_mut()
        .filter(|r| !r.converged && !r.holds_the_gate())
    {
        let why = row
            .note
            .take()
            .map_or_else(String::new, |n| format!("{n}; "));
        row.note = Some(format!(
            "{why}stopping: out of the load balancer, not waited for"
        ));
    }
    rows.sort_by(|a, b| a.state.node.cmp(&b.state.node));
    Ok(rows)
}

/// Whether etcd holds under `prefixes` at revision `now` what it held at `r`.
async fn converged(
    kv: &mut KvClient,
    prefixes: &[String],
    r: i64,
    now: i64,
    user: Option<&str>,
) -> Result<Verdict, EtcdFailure> {
    for prefix in prefixes {
        match prefix_converged(kv, prefix, r, now, user).await {
            Ok(Verdict::Converged) => {}
            Ok(behind) => return Ok(behind),
            Err(f) if f.kind == Kind::Compacted => {
                return Ok(Verdict::Behind(format!(
                    "its revision {r} was compacted in etcd: whether a change came after it cannot be told"
                )));
            }
            Err(f) => return Err(f),
        }
    }
    Ok(Verdict::Converged)
}

/// One prefix: the keys whose revision moved past `r` must hold the value they held at `r`
/// (a put of the same value changes nothing), and as many keys must exist as at `r` (every
/// key that exists now existed then, so an equal count means none went away). Every answer is
/// bounded: a probe of at most [`PER_KEY_COMPARE_MAX`] changed keys (keys only), then either
/// one `get` per changed key, or, when more changed, the prefix read in pages at both
/// revisions side by side.
async fn prefix_converged(
    kv: &mut KvClient,
    prefix: &str,
    r: i64,
    now: i64,
    user: Option<&str>,
) -> Result<Verdict, EtcdFailure> {
    // The count of a range is taken before the revision filter: the keys that exist now.
    let moved = get(
        kv,
        "read of changed keys",
        prefix,
        GetOptions::new()
            .with_prefix()
            .with_revision(now)
            .with_min_mod_revision(r + 1)
            .with_keys_only()
            .with_limit(PER_KEY_COMPARE_MAX as i64),
        user,
    )
    .await?;
    let count_now = moved.count();
    if moved.more() {
        if let Some(behind) = first_changed_in_pages(kv, prefix, r, now, user).await? {
            return Ok(behind);
        }
    } else {
        for k in moved.kvs() {
            let key = String::from_utf8_lossy(k.key());
            let value_at = async |kv: &mut KvClient, rev: i64| {
                get(
                    kv,
                    "read at the node's revision",
                    &key,
                    GetOptions::new().with_revision(rev),
                    user,
                )
                .await
            };
            let then = value_at(kv, r).await?;
            let current = value_at(kv, now).await?;
            if then.kvs().first().map(|t| t.value()) != current.kvs().first().map(|t| t.value()) {
                return Ok(changed(k.key(), r, k.mod_revision()));
            }
        }
    }
    let count_then = get(
        kv,
        "count at the node's revision",
        prefix,
        GetOptions::new()
            .with_prefix()
            .with_revision(r)
            .with_count_only(),
        user,
    )
    .await?
    .count();
    if count_then != count_now {
        return Ok(Verdict::Behind(format!(
            "{} key(s) under {prefix} deleted after its revision {r}",
            (count_then - count_now).abs()
        )));
    }
    Ok(Verdict::Converged)
}

fn changed(key: &[u8], r: i64, rev: i64) -> Verdict {
    Verdict::Behind(format!(
        "{} changed at revision {rev}, after its revision {r}",
        String::from_utf8_lossy(key)
    ))
}

/// Reads `prefix` in pages at `now` and at `r` side by side (both sorted by key) and returns
/// the first key that moved past `r` to a value it did not hold at `r`, if any. Memory: two
/// pages, whatever the prefix holds.
async fn first_changed_in_pages(
    kv: &mut KvClient,
    prefix: &str,
    r: i64,
    now: i64,
    user: Option<&str>,
) -> Result<Option<Verdict>, EtcdFailure> {
    let what_now = format!("read of {prefix:?} now");
    let what_then = format!("read of {prefix:?} at the node's revision");
    let mut at_now = Pages::prefix(prefix.as_bytes(), now);
    let mut at_then = Pages::prefix(prefix.as_bytes(), r);
    let mut then_page: Vec<KeyValue> = Vec::new();
    let mut i = 0;
    while let Some(page) = at_now.next(kv, &what_now, user).await? {
        // A value too large to read cannot be compared: changed, if it moved.
        if let Some((k, rev)) = page.unreadable.iter().find(|(_, rev)| *rev > r) {
            return Ok(Some(changed(k, r, *rev)));
        }
        for k in page.kvs.iter().filter(|k| k.mod_revision() > r) {
            let same = loop {
                match then_page.get(i) {
                    Some(t) if t.key() < k.key() => i += 1,
                    Some(t) => break t.key() == k.key() && t.value() == k.value(),
                    None => match at_then.next(kv, &what_then, user).await? {
                        Some(p) => {
                            then_page = p.kvs;
                            i = 0;
                        }
                        None => break false,
                    },
                }
            };
            if !same {
                return Ok(Some(changed(k.key(), r, k.mod_revision())));
            }
        }
    }
    Ok(None)
}

/// One `get` with a deadline.
async fn get(
    kv: &mut KvClient,
    what: &str,
    key: &str,
    options: GetOptions,
    user: Option<&str>,
) -> Result<crate::etcd::GetResponse, EtcdFailure> {
    let what = format!("{what} {key:?}");
    tokio::time::timeout(CALL_TIMEOUT, kv.get(key, Some(options)))
        .await
        .map_err(|_| EtcdFailure::timeout(&what, CALL_TIMEOUT))?
        .map_err(|e| EtcdFailure::from_etcd(&what, &e, user))
}

/// Writes the rows to stdout, as the table or as JSON.
fn print(rows: &[Row], json: bool) -> Result<(), Failure> {
    let text = if json {
        let mut out = serde_json::to_string_pretty(&json_rows(rows))
            .map_err(|e| Failure::Runtime(e.into()))?;
        out.push('\n');
        out
    } else {
        table(rows, SystemTime::now())
    };
    crate::failure::write_stdout(text.as_bytes())
}

/// `--json`: every published field, plus `converged` and, when there is one, `note`.
fn json_rows(rows: &[Row]) -> serde_json::Value {
    let items = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(&r.state).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("converged".into(), r.converged.into());
                if let Some(n) = &r.note {
                    o.insert("note".into(), n.clone().into());
                }
            }
            v
        })
        .collect();
    serde_json::Value::Array(items)
}

/// The table: a header row, then one row per node, columns padded to their widest cell.
fn table(rows: &[Row], now: SystemTime) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let mut cells: Vec<Vec<String>> = vec![
        [
            "NODE",
            "REVISION",
            "CONVERGED",
            "HASH",
            "AGE",
            "HELD",
            "READY",
            "NOTE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        let s = &r.state;
        let mut notes: Vec<String> = r.note.iter().cloned().collect();
        if let Some(why) = s.reason.as_ref().filter(|_| !s.ready) {
            notes.push(format!("not ready: {why}"));
        }
        if !s.held.is_empty() {
            notes.push(format!("guard holds: {}", s.held.join(", ")));
        }
        if !s.held_back.is_empty() {
            notes.push(format!("held back: {}", s.held_back.join(", ")));
        }
        cells.push(vec![
            s.node.clone(),
            s.revision.to_string(),
            yes_no(r.converged),
            if s.hash.is_empty() {
                "-".into()
            } else {
                s.hash.clone()
            },
            s.applied_at
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .map_or_else(|| "-".to_owned(), |t| age(now, t)),
            s.held.len().to_string(),
            yes_no(s.ready),
            notes.join("; "),
        ]);
    }
    let columns = cells[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &cells {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < columns {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// How long ago `then` was, in its largest unit: "3s", "5m", "2h", "4d".
fn age(now: SystemTime, then: SystemTime) -> String {
    let s = now.duration_since(then).unwrap_or_default().as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::haproxy::ApplyKind;

    #[test]
    fn haproxy_state_by_mode() {
        use HaproxyMode::*;
        assert_eq!(haproxy_state(None, false, false), "not driven");
        assert_eq!(haproxy_state(Command, true, true), "not driven");
        assert_eq!(haproxy_state(Master, true, true), "running");
        assert_eq!(haproxy_state(Supervise, false, false), "not started");
        assert_eq!(haproxy_state(Supervise, false, true), "running");
        assert_eq!(haproxy_state(Supervise, true, true), "stopping");
    }

    #[test]
    fn the_state_follows_the_metrics() {
        let m = Metrics::default();
        let s = NodeState::current("lb-1", HaproxyMode::Supervise, &m);
        assert_eq!((s.revision, s.hash.as_str(), s.applied_at), (0, "", None));
        assert!(!s.ready);
        assert_eq!(s.reason.as_deref(), Some("no successful apply yet"));
        assert_eq!(s.haproxy, "not started");

        m.source_update(2);
        m.applied(ApplyKind::Start, 42);
        m.set_held(&["web".into()], &["/services/api/a".into()]);
        m.set_rejected(3);
        m.set_last_apply("0123456789ab", ApplyKind::Start, true);
        let s = NodeState::current("lb-1", HaproxyMode::Supervise, &m);
        assert_eq!(
            (s.revision, s.hash.as_str(), s.kind.as_str(), s.rejected),
            (42, "0123456789ab", "start", 3)
        );
        assert_eq!(
            (s.held.clone(), s.held_back.clone()),
            (vec!["web".to_owned()], vec!["/services/api/a".to_owned()])
        );
        assert!(s.ready && s.reason.is_none(), "{s:?}");
        assert_eq!(s.haproxy, "running");
        let at = s.applied_at.expect("applied_at");
        assert!(at.ends_with('Z') && at.len() == 20, "{at}");
        let json: serde_json::Value = serde_json::from_str(
            &serde_json::to_string(&NodeState::current("lb-1", HaproxyMode::Supervise, &m))
                .expect("json"),
        )
        .expect("parse");
        assert!(
            json.get("reason").is_none(),
            "no reason while ready: {json}"
        );
        assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));

        m.set_stopping();
        let s = NodeState::current("lb-1", HaproxyMode::Supervise, &m);
        assert_eq!(s.haproxy, "stopping");
        assert!(!s.ready && s.reason.is_some_and(|r| r.starts_with("stopping")));
    }

    #[test]
    fn a_reader_takes_defaults_for_missing_fields() {
        let s: NodeState =
            serde_json::from_str(r#"{"node":"x","revision":7,"future":1}"#).expect("lenient");
        assert_eq!((s.revision, s.ready, s.held.len()), (7, false, 0));
    }

    #[test]
    fn ages_in_their_largest_unit() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ago = |s: u64| age(now, now - Duration::from_secs(s));
        assert_eq!(
            [
                ago(0),
                ago(59),
                ago(60),
                ago(3599),
                ago(3600),
                ago(86400 * 3)
            ],
            ["0s", "59s", "1m", "59m", "1h", "3d"]
        );
        assert_eq!(
            age(now, now + Duration::from_secs(5)),
            "0s",
            "a clock ahead is no age"
        );
    }

    #[test]
    fn the_table_has_a_header_and_one_aligned_row_per_node() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = humantime::format_rfc3339_seconds(now - Duration::from_secs(3)).to_string();
        let rows = vec![
            Row {
                state: NodeState {
                    node: "lb-1".into(),
                    revision: 120,
                    hash: "0123456789ab".into(),
                    applied_at: Some(at),
                    ready: true,
                    ..NodeState::default()
                },
                converged: true,
                note: None,
            },
            Row {
                state: NodeState {
                    node: "lb-22".into(),
                    revision: 7,
                    held: vec!["web".into()],
                    reason: Some("stopping".into()),
                    ..NodeState::default()
                },
                converged: false,
                note: Some("its revision 7 was compacted".into()),
            },
        ];
        let text = table(&rows, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("NODE   REVISION  CONVERGED  HASH"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("lb-1   120       yes        0123456789ab  3s   0     yes"),
            "{text}"
        );
        assert!(
            lines[2]
                .ends_with("its revision 7 was compacted; not ready: stopping; guard holds: web"),
            "{text}"
        );
        let json = json_rows(&rows);
        assert_eq!(json[0]["converged"], true);
        assert_eq!(json[1]["note"], "its revision 7 was compacted");
        assert!(json[0].get("note").is_none());
    }
}
