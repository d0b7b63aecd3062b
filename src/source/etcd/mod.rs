//! The etcd source: one consistent read of every prefix at one revision, then a watch from
//! revision + 1 that survives outages, hangs and compaction.
//!
//! How it behaves, and why:
//! - Every connection uses HTTP/2 keep-alive (2 s ping, 2 s timeout, also while idle): without
//!   it a frozen etcd (SIGSTOP, a hung host) leaves the watch waiting forever with no error.
//!   Every unary call also has a deadline, since keep-alive only runs once a connection is up.
//! - `Client::connect` succeeds when nothing listens, so a connection is proven with `status()`.
//! - Every 500 ms the watch asks its member whether it still knows a leader: a member cut off
//!   from the others keeps the watch open with no events and answers pings and progress
//!   requests, and etcd cancels it only after three election timeouts without a leader.
//! - A full read gets the first prefix at the current revision and every other prefix at that
//!   same revision, so the snapshot is one consistent state.
//! - The watch starts at the read's revision + 1 and, after any failure, resumes at the last
//!   revision it has fully seen + 1 (per prefix), never at 0 and never at "now".
//! - A compacted revision (a watch canceled with `compact_revision > 0`) triggers a full re-read
//!   at a new revision that replaces the state in one step: no empty state is ever sent.
//! - Every `resync` a full re-read corrects any drift of the watch-built state and says how many
//!   keys differed.
//! - Failures back off exponentially with jitter (100 ms to 10 s; at least 1 s for refused
//!   credentials) and are logged with how long etcd has been unreachable.
//! - Credentials: the password is read from `password_file` at every connect (so rotation
//!   works), is never logged, and an expired token is renewed by etcd-client
//!   (`with_auto_token_refresh`) on unary calls; a watch refused for an expired token fails, and
//!   the reconnect authenticates again.
//! - Memory is bounded by the screen's limits, not by what a writer puts: a full read goes in
//!   pages of at most [`PAGE_KEYS`] keys, and every message (a page, a watch response) is at
//!   most [`MAX_MESSAGE`] bytes. A page too large is asked for again with half the keys; a
//!   watch response too large ends the watch and a paged full read takes its place. A pair
//!   whose key or value is longer than the screen accepts keeps only a digest and its
//!   rejection, never the bytes (`state::Held::Oversized`).
//!
//! Connecting, TLS, auth, backoff and paged reads are `crate::etcd`'s.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use self::state::{RawState, ScreenedState, hold, newer_than, unreadable};
use super::{SourceError, Update};
use crate::config::{Config, EtcdConfig, SourceKind};
use crate::etcd::{
    Client, EventType, Failure, KEEP_ALIVE_TIMEOUT, Kind, MAX_MESSAGE, Members, Outage, Pages,
    READ_TIMEOUT, Recovered, Retry, WatchOptions, WatchResponse, backoff_sleep, connect_options,
    dial_timeout, leader_known,
};
use crate::metrics::Metrics;

mod state;

/// How often the watch asks etcd for a progress answer. etcd (gRPC's server keep-alive policy,
/// `--grpc-keepalive-min-time` 5 s by default) closes a connection with GOAWAY
/// "too_many_pings" when pings come more often than that while it sends nothing: an idle watch
/// with 2 s pings was cut every 8 s. hyper only pings after `KEEP_ALIVE_INTERVAL` without any
/// frame read, so a small answer every second keeps the pings away while etcd is healthy, and a
/// frozen etcd still goes silent and is caught by the keep-alive within about 4 s.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often the watch asks its member whether it still knows a leader (see [`leader_known`]).
const LEADER_CHECK_EVERY: Duration = Duration::from_millis(500);
/// A watch that ran this long counts as healthy: the next failure starts the backoff again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// A zero resync would re-read in a tight loop.
const MIN_RESYNC: Duration = Duration::from_secs(1);
/// A read that meets a compaction between its gets is retried this many times.
const READ_ATTEMPTS: u32 = 3;

/// Reads every prefix at one revision: the first page's, then every other page at it.
async fn read_all(
    client: &Client,
    prefixes: &[String],
    user: Option<&str>,
) -> Result<(i64, RawState), Failure> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match read_all_once(client, prefixes, 0, user, None).await {
            // A compaction that overtook the read between two pages: read again, now.
            Err(f) if f.kind == Kind::Compacted && attempt < READ_ATTEMPTS => {
                tracing::info!(error = %f, "etcd compacted during a full read; reading again");
            }
            other => return other,
        }
    }
}

/// Reads every prefix at `revision` (0: the current one), noting each key's revisions in
/// `meta` when one is given.
async fn read_all_once(
    client: &Client,
    prefixes: &[String],
    mut revision: i64,
    user: Option<&str>,
    mut meta: Option<&mut KeyRevisions>,
) -> Result<(i64, RawState), Failure> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let mut state = RawState::new();
    for prefix in prefixes {
        let what = format!("read of prefix {prefix:?}");
        let mut pages = Pages::prefix(prefix.as_bytes(), revision);
        while let Some(page) = pages.next(&mut kv, &what, user).await? {
            for item in page.kvs {
                let mod_revision = item.mod_revision();
                if let Some(meta) = meta.as_deref_mut() {
                    meta.insert(
                        String::from_utf8_lossy(item.key()).into_owned(),
                        KeyRevision {
                            create_revision: item.create_revision(),
                            mod_revision,
                            lease: item.lease(),
                        },
                    );
                }
                let (k, v) = item.into_key_value();
                let (k, held) = hold(prefixes, k, v);
                state.insert(k, (held, mod_revision));
            }
            for (k, mod_revision) in page.unreadable {
                let (k, held) = unreadable(prefixes, &k, mod_revision);
                state.insert(k, (held, mod_revision));
            }
        }
        revision = pages.revision();
    }
    if prefixes.is_empty() && revision <= 0 {
        // Nothing to read; the revision still says where a watch would start.
        let mut client = client.clone();
        let status = tokio::time::timeout(READ_TIMEOUT, client.status())
            .await
            .map_err(|_| Failure::timeout("status", READ_TIMEOUT))?
            .map_err(|e| Failure::from_etcd("status", &e, user))?;
        revision = status.header().map(|h| h.revision()).unwrap_or(0);
    }
    Ok((revision, state))
}

/// Reads every key under `prefixes` at one revision, screened.
pub async fn read_once(config: &EtcdConfig, prefixes: &[String]) -> Result<Update, SourceError> {
    let (client, _) = Members::default()
        .connect(config, connect_options)
        .await
        .map_err(|f| SourceError::Etcd(format!("{} ({})", f, config.endpoints.join(", "))))?;
    let (revision, state) = read_all(&client, prefixes, config.username.as_deref())
        .await
        .map_err(|f| SourceError::Etcd(f.to_string()))?;
    Ok(ScreenedState::build(prefixes, &state).update(revision))
}

/// When and how a key was last written, as etcd keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct KeyRevision {
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The key's lease; 0 for none.
    pub lease: i64,
}

/// Every key read, by key (shown lossily when it is not UTF-8), with its revisions.
pub type KeyRevisions = std::collections::BTreeMap<String, KeyRevision>;

/// A read of the past (or of now) for the forensic commands: the update a live read would
/// have produced, and each key's revisions.
#[derive(Debug)]
pub struct PastRead {
    pub update: Update,
    pub revisions: KeyRevisions,
}

/// Reads every key under `prefixes` at `revision` (0: now), screened, with each key's
/// revisions. A compacted revision is an error that names the oldest revision still held; a
/// revision etcd has not reached yet names the current one.
pub async fn read_at(
    config: &EtcdConfig,
    prefixes: &[String],
    revision: i64,
) -> Result<PastRead, SourceError> {
    let user = config.username.as_deref();
    let (client, _) = Members::default()
        .connect(config, connect_options)
        .await
        .map_err(|f| SourceError::Etcd(format!("{} ({})", f, config.endpoints.join(", "))))?;
    let mut revisions = KeyRevisions::new();
    let read = read_all_once(&client, prefixes, revision, user, Some(&mut revisions)).await;
    let (revision, state) = match read {
        Ok(read) => read,
        Err(f) if f.kind == Kind::Compacted => {
            let oldest = crate::etcd::history::oldest_revision(&client, user)
                .await
                .map_or_else(|e| format!("unknown ({e})"), |n| n.to_string());
            return Err(SourceError::Etcd(format!(
                "revision {revision} has been compacted: the oldest revision etcd still holds is {oldest}"
            )));
        }
        Err(f) if f.to_string().contains("future revision") => {
            let now = crate::etcd::history::current_revision(&client, user)
                .await
                .map_or_else(|e| format!("unknown ({e})"), |n| n.to_string());
            return Err(SourceError::Etcd(format!(
                "revision {revision} is in the future: etcd's current revision is {now}"
            )));
        }
        Err(f) => return Err(SourceError::Etcd(f.to_string())),
    };
    Ok(PastRead {
        update: ScreenedState::build(prefixes, &state).update(revision),
        revisions,
    })
}

/// Reads, sends the first [`Update`], then watches and sends a complete update after every
/// change; retries with backoff forever. Ends when the receiver is dropped.
pub fn spawn_watch(
    config: &Config,
    tx: mpsc::Sender<Update>,
    metrics: Arc<Metrics>,
) -> JoinHandle<()> {
    let etcd = match &config.source.kind {
        SourceKind::Etcd(e) => e.clone(),
        SourceKind::File(_) => {
            return tokio::spawn(async {
                tracing::error!("the etcd source was started for a file config");
            });
        }
    };
    let closed = tx.clone();
    let watcher = Watcher {
        config: etcd,
        prefixes: config.source.prefixes.clone(),
        resync: config.source.resync.max(MIN_RESYNC),
        tx,
        screened: ScreenedState::default(),
        have_state: false,
        dirty: false,
        revision: 0,
        next_revision: Vec::new(),
        outage: Outage::new(),
        watch_announced: false,
        metrics,
        members: Members::default(),
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = watcher.run() => {}
            _ = closed.closed() => tracing::debug!("etcd source stopped: nobody listens"),
        }
    })
}

/// Why a full read is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadReason {
    Initial,
    Compacted,
    Resync,
    Rewound,
    TooLarge,
}

/// How a watch session ended.
enum WatchEnd {
    Compacted(i64),
    Resync,
    Failed(Failure),
    ReceiverGone,
}

struct Watcher {
    config: EtcdConfig,
    prefixes: Vec<String>,
    resync: Duration,
    tx: mpsc::Sender<Update>,
    /// The screened state built by reads and watch events (the raw pairs are not kept).
    screened: ScreenedState,
    /// False until the first successful read: nothing is sent before it.
    have_state: bool,
    /// The state changed since the last update was sent.
    dirty: bool,
    /// The revision stamped on updates: the read's, then the watch responses' headers.
    revision: i64,
    /// Per prefix, where its watch resumes: every event before it has been applied.
    next_revision: Vec<i64>,
    /// Since when etcd has been failing, how many attempts failed, the backoff.
    outage: Outage,
    /// "etcd watch running" was logged at info since the last failure (a watch restarted by
    /// the periodic re-read is only logged at debug).
    watch_announced: bool,
    /// Connection state for `/readyz` and `haconfd_source_connected`.
    metrics: Arc<Metrics>,
    /// Which member the reads and the watch go to.
    members: Members,
}

impl Watcher {
    fn user(&self) -> Option<&str> {
        self.config.username.as_deref()
    }

    async fn run(mut self) {
        let mut client: Option<Client> = None;
        let mut pending: Option<ReadReason> = Some(ReadReason::Initial);
        let mut next_resync = Instant::now() + self.resync;
        loop {
            let c = match client.take() {
                Some(c) => c,
                None => match self.members.connect(&self.config, connect_options).await {
                    Ok((c, current)) if self.have_state && current < self.revision => {
                        // Revisions never go back, unless etcd was restored from a backup: a
                        // watch resumed at our revision would miss every change until etcd's
                        // revision caught up with it.
                        tracing::warn!(
                            etcd.revision = current,
                            seen = self.revision,
                            "etcd's revision went back (restored from a backup?); reading everything again"
                        );
                        self.revision = current;
                        pending = Some(ReadReason::Rewound);
                        c
                    }
                    Ok((c, _)) => c,
                    Err(f) => {
                        let what = match f.kind {
                            Kind::Auth => "etcd refused the connection",
                            Kind::Other | Kind::TooLarge => "cannot connect to etcd",
                            Kind::Unavailable | Kind::Compacted => "etcd unreachable",
                        };
                        self.failed(f, what).await;
                        continue;
                    }
                },
            };
            if let Some(reason) = pending {
                match read_all(&c, &self.prefixes, self.user()).await {
                    Ok((revision, state)) => {
                        self.recovered();
                        self.install_read(reason, revision, state);
                        if !self.flush().await {
                            return;
                        }
                        pending = None;
                        next_resync = Instant::now() + self.resync;
                    }
                    Err(f) => {
                        // The member in use failed: the next connect starts at another one.
                        self.members.failed(self.config.endpoints.len());
                        self.failed(f, "full read of etcd failed").await;
                        continue;
                    }
                }
            }
            let started = Instant::now();
            match self.watch(&c, next_resync).await {
                WatchEnd::ReceiverGone => return,
                WatchEnd::Resync => {
                    pending = Some(ReadReason::Resync);
                    client = Some(c);
                }
                WatchEnd::Compacted(compacted) => {
                    tracing::warn!(
                        compact_revision = compacted,
                        watch_from = ?self.next_revision,
                        "etcd compacted revisions the watch had not seen; reading everything again"
                    );
                    pending = Some(ReadReason::Compacted);
                    client = Some(c);
                }
                WatchEnd::Failed(f) if f.kind == Kind::TooLarge => {
                    // Many large values changed at once (a watch that resumes far behind gets
                    // up to 1,000 revisions in one answer): read them in pages instead.
                    tracing::warn!(
                        error = %f,
                        watch_from = ?self.next_revision,
                        "an etcd watch answer was too large; reading everything again in pages"
                    );
                    pending = Some(ReadReason::TooLarge);
                    client = Some(c);
                }
                WatchEnd::Failed(f) => {
                    if started.elapsed() >= HEALTHY_AFTER {
                        self.outage.reset_backoff();
                    }
                    self.members.failed(self.config.endpoints.len());
                    self.failed(f, "etcd watch failed; reconnecting").await;
                }
            }
        }
    }

    /// Logs a failure with how long etcd has been failing, then waits the backoff.
    async fn failed(&mut self, f: Failure, what: &str) {
        self.watch_announced = false;
        self.metrics.source_down(what);
        let Retry {
            delay,
            attempts,
            down_for,
            retry_in,
            ..
        } = self.outage.failed(&f);
        if f.kind == Kind::Auth {
            tracing::error!(error = %f, down_for, attempts, retry_in, "{what}");
        } else {
            let keeping = if self.have_state {
                "keeping the last good state"
            } else {
                "nothing is rendered before a first full read"
            };
            tracing::warn!(error = %f, down_for, attempts, retry_in, "{what}; {keeping}");
        }
        if backoff_sleep(&self.config, delay).await {
            self.outage.reset_backoff();
        }
    }

    /// Called when etcd answered a full read or a watch was created.
    fn recovered(&mut self) {
        self.metrics.source_ok();
        if let Some(Recovered { down_for, attempts }) = self.outage.recovered() {
            tracing::info!(down_for, attempts, "etcd reachable again");
        }
    }

    /// Replaces the state with a full read, in one step.
    fn install_read(&mut self, reason: ReadReason, revision: i64, state: RawState) {
        let newer = newer_than(&state, self.revision);
        let state = ScreenedState::from_read(&self.prefixes, state);
        if self.have_state {
            let differing = self.screened.differing_keys(&state, &newer);
            match reason {
                ReadReason::Resync if differing > 0 => tracing::warn!(
                    differing_keys = differing,
                    etcd.revision = revision,
                    "the watch-built state had drifted from etcd; corrected by a full read"
                ),
                ReadReason::Resync => tracing::debug!(
                    etcd.revision = revision,
                    keys = state.len(),
                    "periodic full read matches the watch-built state"
                ),
                _ => tracing::info!(
                    ?reason,
                    changed_keys = differing,
                    etcd.revision = revision,
                    keys = state.len(),
                    "full read of etcd"
                ),
            }
        } else {
            tracing::info!(
                etcd.revision = revision,
                keys = state.len(),
                "first full read of etcd"
            );
        }
        // An unchanged state is kept as it is, shared with the snapshots handed out.
        let changed = !self.have_state || self.screened != state;
        if changed {
            self.screened = state;
        }
        self.have_state = true;
        self.revision = self.revision.max(revision);
        self.next_revision = vec![revision + 1; self.prefixes.len()];
        self.dirty |= changed;
    }

    /// Sends the state when it changed. False when the receiver is gone.
    async fn flush(&mut self) -> bool {
        if !self.dirty {
            return true;
        }
        match self.tx.reserve().await {
            Ok(permit) => {
                permit.send(self.update());
                self.dirty = false;
                true
            }
            Err(_) => false,
        }
    }

    fn update(&self) -> Update {
        self.screened.update(self.revision)
    }

    /// Watches every prefix on one stream until it fails, compaction cancels it, or the resync
    /// is due. While the receiver is busy, responses keep being applied and the latest state
    /// is sent once it has room.
    async fn watch(&mut self, client: &Client, resync_at: Instant) -> WatchEnd {
        let user = self.config.username.clone();
        let mut wc = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        // No previous values (`with_prev_key`): only the key of a deleted pair is needed, and
        // previous values would double every put and make a delete as large as what it removed.
        let options = |rev: i64| {
            WatchOptions::new()
                .with_prefix()
                .with_progress_notify()
                .with_start_revision(rev)
        };
        let Some(first) = self.prefixes.first() else {
            // No prefixes: nothing to watch; wait for the resync (or the receiver to go).
            tokio::select! {
                _ = tokio::time::sleep_until(resync_at.into()) => return WatchEnd::Resync,
                _ = self.tx.closed() => return WatchEnd::ReceiverGone,
            }
        };
        let deadline = dial_timeout(&self.config) + KEEP_ALIVE_TIMEOUT;
        let mut stream = match tokio::time::timeout(
            deadline,
            wc.watch(first.as_bytes(), Some(options(self.next_revision[0]))),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return WatchEnd::Failed(Failure::from_etcd("watch", &e, user.as_deref()));
            }
            Err(_) => return WatchEnd::Failed(Failure::timeout("watch", deadline)),
        };
        for (i, prefix) in self.prefixes.iter().enumerate().skip(1) {
            if let Err(e) = stream
                .watch(prefix.as_bytes(), Some(options(self.next_revision[i])))
                .await
            {
                return WatchEnd::Failed(Failure::from_etcd("watch", &e, user.as_deref()));
            }
        }
        tracing::debug!(from = ?self.next_revision, "etcd watch requested");
        // Watch ids by prefix index, learnt from the `created` answers, which come in order.
        let mut ids: Vec<i64> = Vec::with_capacity(self.prefixes.len());
        let resync = tokio::time::sleep_until(resync_at.into());
        tokio::pin!(resync);
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leader_check = tokio::time::interval_at(
            tokio::time::Instant::now() + LEADER_CHECK_EVERY,
            LEADER_CHECK_EVERY,
        );
        leader_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut maintenance = client.maintenance_client();
        // A clone, so that a held permit does not borrow `self`.
        let tx = self.tx.clone();
        loop {
            tokio::select! {
                biased;
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        self.metrics.source_current();
                        if let Some(end) = self.apply(&mut ids, resp) {
                            return end;
                        }
                    }
                    Ok(None) => {
                        return WatchEnd::Failed(Failure::new(
                            Kind::Unavailable,
                            "etcd ended the watch stream",
                        ));
                    }
                    Err(e) => {
                        return WatchEnd::Failed(Failure::from_etcd("watch stream", &e, user.as_deref()));
                    }
                },
                permit = tx.reserve(), if self.dirty => match permit {
                    Ok(permit) => {
                        permit.send(self.update());
                        self.dirty = false;
                    }
                    Err(_) => return WatchEnd::ReceiverGone,
                },
                _ = heartbeat.tick() => {
                    if let Err(e) = stream.request_progress().await {
                        return WatchEnd::Failed(Failure::from_etcd("watch progress request", &e, user.as_deref()));
                    }
                }
                _ = leader_check.tick() => {
                    // A member cut off from its cluster sends nothing and fails nothing: the
                    // watch would wait for etcd to cancel it, seconds later.
                    if let Err(f) = leader_known(&mut maintenance, KEEP_ALIVE_TIMEOUT, user.as_deref()).await {
                        return WatchEnd::Failed(f);
                    }
                }
                _ = &mut resync => return WatchEnd::Resync,
                _ = tx.closed() => return WatchEnd::ReceiverGone,
            }
        }
    }

    /// Applies one watch response. Returns how the watch ends, if it does.
    fn apply(&mut self, ids: &mut Vec<i64>, resp: WatchResponse) -> Option<WatchEnd> {
        if resp.created() && ids.len() < self.prefixes.len() {
            ids.push(resp.watch_id());
            if ids.len() == self.prefixes.len() {
                self.recovered();
                if self.watch_announced {
                    tracing::debug!(from = ?self.next_revision, "etcd watch running");
                } else {
                    tracing::info!(from = ?self.next_revision, "etcd watch running");
                    self.watch_announced = true;
                }
            }
        }
        let index = ids.iter().position(|id| *id == resp.watch_id());
        let prefix = index
            .and_then(|i| self.prefixes.get(i))
            .map(String::as_str)
            .unwrap_or("?");
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Some(WatchEnd::Compacted(resp.compact_revision()));
            }
            let reason = match resp.cancel_reason() {
                "" => "no reason given",
                r => r,
            };
            let f = if reason.contains("invalid auth token") {
                // etcd answers a watch created with an expired token in-band (etcd-client only
                // renews tokens for calls that fail): a new connection authenticates again.
                Failure::new(
                    Kind::Unavailable,
                    format!(
                        "etcd canceled the watch of prefix {prefix:?}: {reason} (the token expired; reconnecting authenticates again)"
                    ),
                )
            } else if reason.contains("permission denied") || reason.contains("auth") {
                let who = self.user().unwrap_or("(none)");
                Failure::new(
                    Kind::Auth,
                    format!(
                        "etcd canceled the watch of prefix {prefix:?} for user {who:?}: {reason} (an expired token is renewed on reconnect; otherwise grant the user read access)"
                    ),
                )
            } else {
                Failure::new(
                    Kind::Unavailable,
                    format!("etcd canceled the watch of prefix {prefix:?}: {reason}"),
                )
            };
            return Some(WatchEnd::Failed(f));
        }
        let Some(index) = index else {
            // Not one of our watches: the answer to a progress request (watch id -1). etcd 3.4
            // may send it ahead of events still queued, so it says nothing about where the
            // watches are.
            return None;
        };
        let header_revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let kind = match std::panic::catch_unwind(AssertUnwindSafe(|| event.event_type())) {
                Ok(k) => k,
                Err(_) => {
                    return Some(WatchEnd::Failed(Failure::new(
                        Kind::Other,
                        "etcd sent a watch event of an unknown type",
                    )));
                }
            };
            match kind {
                EventType::Put => {
                    changed |= self.screened.put(&self.prefixes, kv.key(), kv.value());
                }
                EventType::Delete => {
                    changed |= self.screened.delete(kv.key());
                }
            }
            let next = &mut self.next_revision[index];
            *next = (*next).max(kv.mod_revision() + 1);
        }
        if resp.events().is_empty() && !resp.created() && header_revision > 0 {
            // A progress notification: etcd sends it only to a watch that has caught up.
            let next = &mut self.next_revision[index];
            *next = (*next).max(header_revision + 1);
        }
        if changed {
            self.revision = self.revision.max(header_revision);
            self.dirty = true;
        }
        None
    }
}
