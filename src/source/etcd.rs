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
//!   rejection, never the bytes ([`Held::Oversized`]).

use std::collections::BTreeMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, KvClient,
    MaintenanceClient, TlsOptions, WatchOptions, WatchResponse,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{SourceError, Update};
use crate::config::{Config, EtcdConfig, SourceKind};
use crate::metrics::Metrics;
use crate::model::{
    Kv, MAX_KEY_LEN, MAX_VALUE_LEN, Rejection, Screened, Snapshot, display_key, screen_pair,
};

/// HTTP/2 keep-alive: a ping every 2 s, a connection without an answer for 2 s is dead.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub(crate) const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the watch asks etcd for a progress answer. etcd (gRPC's server keep-alive policy,
/// `--grpc-keepalive-min-time` 5 s by default) closes a connection with GOAWAY
/// "too_many_pings" when pings come more often than that while it sends nothing: an idle watch
/// with 2 s pings was cut every 8 s. hyper only pings after `KEEP_ALIVE_INTERVAL` without any
/// frame read, so a small answer every second keeps the pings away while etcd is healthy, and a
/// frozen etcd still goes silent and is caught by the keep-alive within about 4 s.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often the watch asks its member whether it still knows a leader (see [`leader_known`]).
const LEADER_CHECK_EVERY: Duration = Duration::from_millis(500);
/// The largest read or watch message decoded (gRPC's default). Decoding holds a message about
/// twice (its bytes and what they decode to), so this bounds the memory a read or a watch
/// answer takes at about 8 MiB, whatever etcd holds. A page of [`PAGE_KEYS`] registry keys
/// (about 150 bytes each) is far below it; a page of larger values is read in smaller pages.
/// A watch answer for one revision is at most etcd's `--max-request-bytes` (1.5 MiB by
/// default), since the watch asks for no previous values; a watch that resumes far behind
/// gets up to 1,000 revisions in one answer, and a paged read replaces one above this.
pub(crate) const MAX_MESSAGE: usize = 4 << 20;
/// Keys per page of a full read: 100,000 keys are 100 round trips.
pub(crate) const PAGE_KEYS: i64 = 1000;
/// A deadline for one page of a read: large pages take a while, hung servers forever.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Retry delays.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Refused credentials are not retried faster than this.
pub(crate) const BACKOFF_AUTH_MIN: Duration = Duration::from_secs(1);
/// A watch that ran this long counts as healthy: the next failure starts the backoff again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Floors for durations the config accepts down to zero: a zero dial timeout would fail every
/// connect, a zero resync would re-read in a tight loop.
const MIN_DIAL_TIMEOUT: Duration = Duration::from_millis(100);
const MIN_RESYNC: Duration = Duration::from_secs(1);
/// A read that meets a compaction between its gets is retried this many times.
const READ_ATTEMPTS: u32 = 3;

// gRPC status codes (tonic is not a direct dependency).
const CODE_INVALID_ARGUMENT: i32 = 3;
const CODE_PERMISSION_DENIED: i32 = 7;
const CODE_OUT_OF_RANGE: i32 = 11;
const CODE_UNAUTHENTICATED: i32 = 16;

/// What went wrong talking to etcd, sorted by what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Down, unreachable, hung, or a stream broke: retry with backoff.
    Unavailable,
    /// Credentials refused or permission denied: retry slowly, log at error.
    Auth,
    /// A revision that etcd has compacted away: re-read at a new revision.
    Compacted,
    /// An answer larger than [`MAX_MESSAGE`]: read fewer keys at once, or read in pages.
    TooLarge,
    /// Anything else (bad TLS files, an unexpected answer): retry with backoff.
    Other,
}

#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) kind: Kind,
    message: String,
}

impl Failure {
    pub(crate) fn new(kind: Kind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }

    /// Classifies an etcd-client error; `what` says what was being done, `user` names the
    /// configured user (never the password) in auth errors.
    pub(crate) fn from_etcd(what: &str, e: &etcd_client::Error, user: Option<&str>) -> Failure {
        use etcd_client::Error as E;
        let who = match user {
            Some(u) => format!("user {u:?}"),
            None => "no user (etcd.username is not set)".to_owned(),
        };
        match e {
            E::GRpcStatus(s) => {
                let code = i32::from(s.code());
                let msg = s.message();
                if code == CODE_OUT_OF_RANGE && msg.contains("compacted") {
                    return Failure::new(Kind::Compacted, format!("{what}: {msg}"));
                }
                // tonic's own answer to a message above the decoding limit.
                if code == CODE_OUT_OF_RANGE && msg.contains("message length too large") {
                    return Failure::new(Kind::TooLarge, format!("{what}: {msg}"));
                }
                let auth = code == CODE_UNAUTHENTICATED
                    || code == CODE_PERMISSION_DENIED
                    || (code == CODE_INVALID_ARGUMENT
                        && (msg.contains("authentication failed")
                            || msg.contains("user name is empty")
                            || msg.contains("invalid auth token")));
                if auth {
                    let hint = if msg.contains("authentication failed") {
                        "check etcd.username and the password in etcd.password_file"
                    } else if msg.contains("user name is empty") {
                        "etcd has authentication enabled: set etcd.username and etcd.password_file"
                    } else if msg.contains("permission denied") && writes(what) {
                        "grant the user a role with readwrite permission on the prefix it writes, e.g. `etcdctl role grant-permission ROLE --prefix=true readwrite /services/`"
                    } else if msg.contains("permission denied") {
                        "grant the user a role that may read every configured source.prefixes"
                    } else {
                        "check the user's credentials and roles"
                    };
                    return Failure::new(
                        Kind::Auth,
                        format!("{what}: etcd refused {who}: {msg} ({hint})"),
                    );
                }
                let kind = if code == CODE_INVALID_ARGUMENT {
                    Kind::Other
                } else {
                    Kind::Unavailable
                };
                let mut text = format!("{what}: {msg}");
                let mut source = std::error::Error::source(s);
                while let Some(cause) = source {
                    let c = cause.to_string();
                    if !text.contains(&c) {
                        text.push_str(": ");
                        text.push_str(&c);
                    }
                    source = cause.source();
                }
                text.push_str(&format!(" ({})", s.code().description()));
                Failure::new(kind, text)
            }
            E::TransportError(_) | E::IoError(_) | E::WatchError(_) => {
                Failure::new(Kind::Unavailable, format!("{what}: {}", chain(e)))
            }
            _ => Failure::new(Kind::Other, format!("{what}: {}", chain(e))),
        }
    }

    /// A connection that failed before etcd said anything can mean the wrong TLS setup, and
    /// tonic only says that the connection was reset or closed: the hint names the setting.
    fn with_connect_hint(mut self, config: &EtcdConfig) -> Failure {
        if self.kind == Kind::Auth || self.kind == Kind::Compacted {
            return self;
        }
        let m = self.message.to_ascii_lowercase();
        let tls = config.ca_file.is_some() || config.cert_file.is_some();
        let plain = config.endpoints.iter().any(|e| e.starts_with("http://"));
        let dropped = [
            "connection reset",
            "connection closed",
            "broken pipe",
            "protocol error",
        ]
        .iter()
        .any(|p| m.contains(p));
        let hint = if !tls && plain && dropped {
            Some("if this etcd serves TLS, write https:// endpoints and set etcd.ca_file")
        } else if tls
            && config.cert_file.is_none()
            && (dropped
                || m.contains("certificate required")
                || m.contains("badcertificate")
                || m.contains("handshake"))
        {
            Some(
                "if etcd asks for client certificates (--client-cert-auth), set etcd.cert_file and etcd.key_file",
            )
        } else if tls && (m.contains("unknownissuer") || m.contains("invalid peer certificate")) {
            Some(
                "etcd's certificate is not signed by etcd.ca_file: point it at the CA that signed etcd's certificate",
            )
        } else {
            None
        };
        if let Some(hint) = hint {
            self.message.push_str(&format!(" ({hint})"));
        }
        self
    }

    pub(crate) fn timeout(what: &str, after: Duration) -> Failure {
        Failure::new(
            Kind::Unavailable,
            format!("{what}: no answer within {after:?} (etcd down, hung or unreachable)"),
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Whether the call named `what` writes (a put, a delete, a lease), as opposed to a read.
fn writes(what: &str) -> bool {
    ["put", "delete", "lease", "txn", "revoke"]
        .iter()
        .any(|w| what.starts_with(w))
}

/// An error with its causes: tonic's transport errors say little at the top.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// A password that never shows in Debug output or logs.
struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

fn read_password(config: &EtcdConfig) -> Result<Option<Password>, Failure> {
    let Some(path) = &config.password_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::new(
            Kind::Other,
            format!("cannot read etcd.password_file {}: {e}", path.display()),
        )
    })?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    Ok(Some(Password(text.to_owned())))
}

/// How often a client that failed looks at `etcd.password_file` for a fix.
const PASSWORD_POLL: Duration = Duration::from_millis(250);

/// Waits out `delay`, or less when `etcd.password_file` changes meanwhile: an operator who fixed
/// a refused password should not wait out a backoff of up to 10 s. The file is compared, not
/// watched, so a secret swapped through a symlink (Kubernetes) counts too, and it is only read
/// while etcd fails. Returns true when the file changed.
pub(crate) async fn backoff_sleep(config: &EtcdConfig, delay: Duration) -> bool {
    let Some(path) = &config.password_file else {
        tokio::time::sleep(delay).await;
        return false;
    };
    let before = std::fs::read(path).ok();
    let until = tokio::time::Instant::now() + delay;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        tokio::time::sleep(left.min(PASSWORD_POLL)).await;
        if std::fs::read(path).ok() != before {
            tracing::info!(file = %path.display(), "etcd.password_file changed; connecting again now");
            return true;
        }
    }
}

fn read_pem(key: &str, path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| {
        Failure::new(
            Kind::Other,
            format!("cannot read {key} {}: {e}", path.display()),
        )
    })
}

pub(crate) fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, Failure> {
    let mut options = ConnectOptions::new()
        .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(dial_timeout(config))
        // Adds the "hasleader: true" header: a member cut off from its cluster refuses to
        // serve stale data and cancels our watch instead of silently going quiet.
        .with_require_leader(true)
        // Renews an expired token and retries the call once, with the stored credentials.
        .with_auto_token_refresh(true);
    if config.ca_file.is_some() || config.cert_file.is_some() {
        if let Some(e) = config.endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(Failure::new(
                Kind::Other,
                format!(
                    "etcd.endpoints: {e:?} is not https:// while etcd.ca_file or etcd.cert_file is set; write https:// endpoints"
                ),
            ));
        }
        let mut tls = TlsOptions::new();
        if let Some(ca) = &config.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read_pem("etcd.ca_file", ca)?));
        }
        if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
            tls = tls.identity(Identity::from_pem(
                read_pem("etcd.cert_file", cert)?,
                read_pem("etcd.key_file", key)?,
            ));
        }
        options = options.with_tls(tls);
    }
    if let Some(user) = &config.username {
        let password = read_password(config)?.unwrap_or(Password(String::new()));
        options = options.with_user(user.clone(), password.0);
    }
    Ok(options)
}

pub(crate) fn dial_timeout(config: &EtcdConfig) -> Duration {
    config.dial_timeout.max(MIN_DIAL_TIMEOUT)
}

/// Connects with `options` and proves the connection with `status()`: `Client::connect`
/// succeeds when nothing listens, the first real call fails. With credentials, connect
/// authenticates, a call that can hang: both are bounded.
async fn connect_status(
    config: &EtcdConfig,
    options: ConnectOptions,
) -> Result<(Client, etcd_client::StatusResponse), Failure> {
    let user = config.username.as_deref();
    let deadline = dial_timeout(config) + KEEP_ALIVE_TIMEOUT;
    let mut client =
        tokio::time::timeout(deadline, Client::connect(&config.endpoints, Some(options)))
            .await
            .map_err(|_| Failure::timeout("connect", deadline))?
            .map_err(|e| Failure::from_etcd("connect", &e, user).with_connect_hint(config))?;
    let status = tokio::time::timeout(deadline, client.status())
        .await
        .map_err(|_| Failure::timeout("status", deadline))?
        .map_err(|e| Failure::from_etcd("status", &e, user).with_connect_hint(config))?;
    Ok((client, status))
}

/// Connects to every endpoint at once with options built by the caller from
/// [`connect_options`], for one-off calls (`version`, `fleet`). Returns the client and etcd's
/// current revision.
pub(crate) async fn connect_with(
    config: &EtcdConfig,
    options: ConnectOptions,
) -> Result<(Client, i64), Failure> {
    let (client, status) = connect_status(config, options).await?;
    Ok((client, status.header().map(|h| h.revision()).unwrap_or(0)))
}

/// Connects to the one member `config.endpoints` names and proves it can serve now: it
/// answers `status()` and knows a leader. A member in an election, or cut off from the others,
/// is refused here, so the caller moves on to the next member at once instead of waiting out
/// calls that cannot succeed (or, with `require_leader`, a watch that is canceled). Returns the
/// client and etcd's current revision.
async fn connect_member(
    config: &EtcdConfig,
    options: ConnectOptions,
) -> Result<(Client, i64), Failure> {
    let (client, status) = connect_status(config, options).await?;
    if status.leader() == 0 {
        return Err(Failure::new(Kind::Unavailable, NO_LEADER));
    }
    Ok((client, status.header().map(|h| h.revision()).unwrap_or(0)))
}

const NO_LEADER: &str =
    "status: the member knows no leader (an election, or cut off from the cluster)";

/// Whether the member `maintenance` talks to still knows a leader, by its `status()` within
/// `deadline`. A member cut off from the others keeps answering what needs no quorum (status,
/// watch progress, HTTP/2 pings) and keeps a watch open that simply gets no events, so neither
/// the keep-alive nor a quiet watch notices. etcd cancels the streams of a `require_leader`
/// client only after three election timeouts without a leader: 4 to 6 s after the cut with
/// the default 1 s, when a follower also needs 1 to 2 s to notice it lost its leader. Asking
/// the member itself finds it as soon as it knows. With `require_leader` a leaderless member
/// refuses the call ("etcdserver: no leader"): a failure too.
pub(crate) async fn leader_known(
    maintenance: &mut MaintenanceClient,
    deadline: Duration,
    user: Option<&str>,
) -> Result<(), Failure> {
    let status = tokio::time::timeout(deadline, maintenance.status())
        .await
        .map_err(|_| Failure::timeout("status", deadline))?
        .map_err(|e| Failure::from_etcd("status", &e, user))?;
    if status.leader() == 0 {
        return Err(Failure::new(Kind::Unavailable, NO_LEADER));
    }
    Ok(())
}

/// The members of `[etcd] endpoints`, talked to one at a time. A client over every endpoint
/// spreads its calls and streams over them, dead and frozen members included: with one of
/// three members down, a lease holder's session of four calls succeeded about one time in
/// five, and a watch could be re-created on the frozen member again and again. Talking to one
/// member, and moving to the next as soon as it fails, makes failover take about one election.
#[derive(Debug, Default)]
pub(crate) struct Members {
    /// The index of the member to try first.
    next: usize,
}

impl Members {
    /// Connects to the first member that answers and knows a leader, trying each once, from
    /// the one after the last failure; `options` makes each member's connect options (TLS,
    /// auth, keep-alive). Returns the client and etcd's current revision.
    pub(crate) async fn connect(
        &mut self,
        config: &EtcdConfig,
        options: impl Fn(&EtcdConfig) -> Result<ConnectOptions, Failure>,
    ) -> Result<(Client, i64), Failure> {
        let n = config.endpoints.len();
        let mut last = Failure::new(Kind::Other, "etcd.endpoints is empty");
        for i in 0..n {
            let at = (self.next + i) % n;
            let mut one = config.clone();
            one.endpoints = vec![config.endpoints[at].clone()];
            match connect_member(&one, options(&one)?).await {
                Ok(connected) => {
                    self.next = at;
                    return Ok(connected);
                }
                Err(f) => {
                    // With one endpoint the caller's own log line says it all.
                    if n > 1 {
                        tracing::debug!(endpoint = %config.endpoints[at], error = %f, "etcd member unusable; trying the next");
                    }
                    last = f;
                }
            }
        }
        self.failed(n);
        Err(last)
    }

    /// The member in use failed: the next connect starts at the one after it.
    pub(crate) fn failed(&mut self, members: usize) {
        self.next = (self.next + 1) % members.max(1);
    }
}

/// One key as kept, by its [`held_key`]: what it holds and the revision that last modified it.
type RawState = BTreeMap<Vec<u8>, (Held, i64)>;

/// What the raw state keeps of a value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    /// The value's bytes: the key and the value are within the screen's limits.
    Value(Vec<u8>),
    /// A key longer than [`MAX_KEY_LEN`] or a value longer than [`MAX_VALUE_LEN`]: the screen
    /// rejects the pair whatever its bytes, so only a digest of the value (to tell a change)
    /// and the rejection are kept (none for a key outside every prefix).
    Oversized {
        digest: u64,
        rejection: Option<Rejection>,
    },
}

/// The key the raw state keeps a key under: the key itself, or for a key longer than
/// [`MAX_KEY_LEN`] its first `MAX_KEY_LEN` bytes, a 0xff byte and a 128-bit digest of the
/// whole key. Such a stand-in is longer than `MAX_KEY_LEN`, so it is never a kept key itself.
fn held_key(k: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if k.len() <= MAX_KEY_LEN {
        return std::borrow::Cow::Borrowed(k);
    }
    let mut held = Vec::with_capacity(MAX_KEY_LEN + 17);
    held.extend_from_slice(&k[..MAX_KEY_LEN]);
    held.push(0xff);
    held.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(k).to_be_bytes());
    std::borrow::Cow::Owned(held)
}

/// The held form of a pair whose key or value is longer than the screen accepts, or None for
/// a pair within the limits (kept as it is, with no copy). Two length comparisons for every
/// pair; the rest only for oversized ones.
fn hold_oversized(prefixes: &[String], k: &[u8], v: &[u8]) -> Option<(Vec<u8>, Held)> {
    if k.len() <= MAX_KEY_LEN && v.len() <= MAX_VALUE_LEN {
        return None;
    }
    // The screen looks at the lengths before any byte of the long part.
    let rejection = match screen_pair(prefixes, k, v) {
        Screened::Reject(r) => Some(r),
        Screened::Outside | Screened::Pass(..) => None,
    };
    let held = Held::Oversized {
        digest: xxhash_rust::xxh3::xxh3_64(v),
        rejection,
    };
    Some((held_key(k).into_owned(), held))
}

/// The held form of a pair read whole: within the limits it is kept as it is, with no copy.
fn hold(prefixes: &[String], k: Vec<u8>, v: Vec<u8>) -> (Vec<u8>, Held) {
    match hold_oversized(prefixes, &k, &v) {
        Some(oversized) => oversized,
        None => (k, Held::Value(v)),
    }
}

/// Applies a put (from a watch event) to both states. Whether the screened state changed.
fn apply_put(
    state: &mut RawState,
    screened: &mut ScreenedState,
    prefixes: &[String],
    k: &[u8],
    v: &[u8],
    mod_revision: i64,
) -> bool {
    let (key, held) =
        hold_oversized(prefixes, k, v).unwrap_or_else(|| (k.to_vec(), Held::Value(v.to_vec())));
    // One lookup: the entry API, not a get and an insert.
    match state.entry(key) {
        std::collections::btree_map::Entry::Occupied(mut e) => {
            let changed = e.get().0 != held;
            if changed {
                screened.put(prefixes, e.key(), &held);
            }
            e.insert((held, mod_revision));
            changed
        }
        std::collections::btree_map::Entry::Vacant(e) => {
            screened.put(prefixes, e.key(), &held);
            e.insert((held, mod_revision));
            true
        }
    }
}

/// Applies a delete (from a watch event) to both states. Whether the screened state changed.
fn apply_delete(state: &mut RawState, screened: &mut ScreenedState, k: &[u8]) -> bool {
    let key = held_key(k);
    let removed = state.remove(key.as_ref()).is_some();
    if removed {
        screened.delete(&key);
    }
    removed
}

/// A value etcd could not send within [`MAX_MESSAGE`]: its key is known (from a keys-only
/// read), its bytes never were.
fn unreadable(prefixes: &[String], k: &[u8], mod_revision: i64) -> (Vec<u8>, Held) {
    let rejection = prefixes
        .iter()
        .any(|p| k.starts_with(p.as_bytes()))
        .then(|| Rejection {
            key: display_key(k),
            reason: format!(
                "value too large to read (key and value above {} MiB)",
                MAX_MESSAGE >> 20
            ),
        });
    let held = Held::Oversized {
        // The revision stands for the bytes: a new value is a new revision.
        digest: mod_revision as u64,
        rejection,
    };
    (held_key(k).into_owned(), held)
}

/// The screened view of a [`RawState`], kept in step with it key by key, so that an update
/// after one event costs one screen and a clone of a persistent map, not a screen of every key.
#[derive(Default)]
struct ScreenedState {
    kv: Kv,
    /// Pairs the screen left out, by held key.
    rejected: BTreeMap<Vec<u8>, Rejection>,
}

impl ScreenedState {
    fn build(prefixes: &[String], state: &RawState) -> ScreenedState {
        let mut s = ScreenedState::default();
        for (k, (held, _)) in state {
            s.put(prefixes, k, held);
        }
        s
    }

    /// `k` is the held key.
    fn put(&mut self, prefixes: &[String], k: &[u8], held: &Held) {
        let screened = match held {
            Held::Value(v) => screen_pair(prefixes, k, v),
            Held::Oversized {
                rejection: Some(r), ..
            } => Screened::Reject(r.clone()),
            Held::Oversized {
                rejection: None, ..
            } => Screened::Outside,
        };
        match screened {
            Screened::Outside => {}
            Screened::Pass(key, value) => {
                self.rejected.remove(k);
                self.kv.insert(key, value);
            }
            Screened::Reject(r) => {
                self.rejected.insert(k.to_vec(), r);
                if let Ok(key) = std::str::from_utf8(k) {
                    self.kv.remove(key);
                }
            }
        }
    }

    /// `k` is the held key.
    fn delete(&mut self, k: &[u8]) {
        self.rejected.remove(k);
        if let Ok(key) = std::str::from_utf8(k) {
            self.kv.remove(key);
        }
    }

    fn update(&self, revision: i64) -> Update {
        Update {
            snapshot: Arc::new(Snapshot {
                revision,
                kv: self.kv.clone(),
            }),
            rejected: self.rejected.values().cloned().collect(),
        }
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty, or only 0xff bytes: to the end of the key space.
    vec![0]
}

/// A range read in pages of at most [`PAGE_KEYS`] keys, every page at the revision of the
/// first one (or a given one), so that the whole read is one consistent state. A page whose
/// answer is larger than [`MAX_MESSAGE`] is asked for again with half as many keys, down to
/// one; a single key too large even alone is listed in [`Page::unreadable`], with its key and
/// revision only.
pub(crate) struct Pages {
    next: Vec<u8>,
    end: Vec<u8>,
    revision: i64,
    limit: i64,
    done: bool,
}

/// One page of a [`Pages`] read.
#[derive(Default)]
pub(crate) struct Page {
    pub(crate) kvs: Vec<etcd_client::KeyValue>,
    /// Keys (with their mod revisions) whose value is too large to be read at all.
    pub(crate) unreadable: Vec<(Vec<u8>, i64)>,
}

impl Pages {
    /// Every key under `prefix`, at `revision` (0: etcd's current one, taken by the first page).
    pub(crate) fn prefix(prefix: &[u8], revision: i64) -> Pages {
        Pages {
            next: prefix.to_vec(),
            end: prefix_end(prefix),
            revision,
            limit: PAGE_KEYS,
            done: false,
        }
    }

    /// The revision every page is read at (0 before the first page of a read at "now").
    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    /// The next page, or None after the last one. `what` names the read in errors.
    pub(crate) async fn next(
        &mut self,
        kv: &mut KvClient,
        what: &str,
        user: Option<&str>,
    ) -> Result<Option<Page>, Failure> {
        if self.done {
            return Ok(None);
        }
        loop {
            let mut options = GetOptions::new()
                .with_range(self.end.clone())
                .with_limit(self.limit);
            if self.revision > 0 {
                options = options.with_revision(self.revision);
            }
            let answer =
                tokio::time::timeout(READ_TIMEOUT, kv.get(self.next.clone(), Some(options)))
                    .await
                    .map_err(|_| Failure::timeout(what, READ_TIMEOUT))?;
            let mut resp = match answer {
                Ok(resp) => resp,
                Err(e) => {
                    let f = Failure::from_etcd(what, &e, user);
                    if f.kind != Kind::TooLarge {
                        return Err(f);
                    }
                    if self.limit > 1 {
                        self.limit = (self.limit / 2).max(1);
                        tracing::debug!(error = %f, keys = self.limit, "etcd page too large; asking for fewer keys");
                        continue;
                    }
                    return self.skip_unreadable(kv, what, user, f).await.map(Some);
                }
            };
            if self.revision <= 0 {
                self.revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                if self.revision <= 0 {
                    return Err(Failure::new(
                        Kind::Other,
                        format!("{what}: etcd answered without a revision"),
                    ));
                }
            }
            let kvs = resp.take_kvs();
            match kvs.last() {
                Some(last) if resp.more() => self.next = after(last.key()),
                _ => self.done = true,
            }
            // After a page too large, grow back while pages stay small.
            let bytes: usize = kvs.iter().map(|kv| kv.key().len() + kv.value().len()).sum();
            if bytes < MAX_MESSAGE / 4 {
                self.limit = (self.limit * 2).min(PAGE_KEYS);
            }
            return Ok(Some(Page {
                kvs,
                unreadable: Vec::new(),
            }));
        }
    }

    /// The next key alone was too large to read: learn its key (a keys-only read) and go on
    /// after it.
    async fn skip_unreadable(
        &mut self,
        kv: &mut KvClient,
        what: &str,
        user: Option<&str>,
        cause: Failure,
    ) -> Result<Page, Failure> {
        let mut options = GetOptions::new()
            .with_range(self.end.clone())
            .with_limit(1)
            .with_keys_only();
        if self.revision > 0 {
            options = options.with_revision(self.revision);
        }
        let resp = tokio::time::timeout(READ_TIMEOUT, kv.get(self.next.clone(), Some(options)))
            .await
            .map_err(|_| Failure::timeout(what, READ_TIMEOUT))?
            .map_err(|e| Failure::from_etcd(what, &e, user))?;
        if self.revision <= 0 {
            self.revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        let Some(item) = resp.kvs().first() else {
            // The key went away between the two reads (only at "now"): nothing to skip.
            return Err(cause);
        };
        tracing::warn!(key = %display_key(item.key()), error = %cause, "an etcd value too large to read is left out");
        if resp.more() {
            self.next = after(item.key());
        } else {
            self.done = true;
        }
        Ok(Page {
            kvs: Vec::new(),
            unreadable: vec![(item.key().to_vec(), item.mod_revision())],
        })
    }
}

/// The first key after `key`.
fn after(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// Reads every prefix at one revision: the first page's, then every other page at it.
async fn read_all(
    client: &Client,
    prefixes: &[String],
    user: Option<&str>,
) -> Result<(i64, RawState), Failure> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match read_all_once(client, prefixes, user).await {
            // A compaction that overtook the read between two pages: read again, now.
            Err(f) if f.kind == Kind::Compacted && attempt < READ_ATTEMPTS => {
                tracing::info!(error = %f, "etcd compacted during a full read; reading again");
            }
            other => return other,
        }
    }
}

async fn read_all_once(
    client: &Client,
    prefixes: &[String],
    user: Option<&str>,
) -> Result<(i64, RawState), Failure> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let mut revision = 0;
    let mut state = RawState::new();
    for prefix in prefixes {
        let what = format!("read of prefix {prefix:?}");
        let mut pages = Pages::prefix(prefix.as_bytes(), revision);
        while let Some(page) = pages.next(&mut kv, &what, user).await? {
            for item in page.kvs {
                let mod_revision = item.mod_revision();
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
    if prefixes.is_empty() {
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
        state: RawState::new(),
        screened: ScreenedState::default(),
        have_state: false,
        dirty: false,
        revision: 0,
        next_revision: Vec::new(),
        backoff: Backoff::new(),
        down_since: None,
        failures: 0,
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
    /// The raw state built by reads and watch events.
    state: RawState,
    /// `state` screened, in step with it.
    screened: ScreenedState,
    /// False until the first successful read: nothing is sent before it.
    have_state: bool,
    /// The state changed since the last update was sent.
    dirty: bool,
    /// The revision stamped on updates: the read's, then the watch responses' headers.
    revision: i64,
    /// Per prefix, where its watch resumes: every event before it has been applied.
    next_revision: Vec<i64>,
    backoff: Backoff,
    /// Since when etcd has been failing, and how many attempts failed since.
    down_since: Option<Instant>,
    failures: u32,
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
                        self.backoff.reset();
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
        let since = *self.down_since.get_or_insert_with(Instant::now);
        self.failures += 1;
        let floor = if f.kind == Kind::Auth {
            BACKOFF_AUTH_MIN
        } else {
            Duration::ZERO
        };
        let delay = self.backoff.next(floor);
        let down_for =
            humantime::format_duration(Duration::from_millis(since.elapsed().as_millis() as u64))
                .to_string();
        let retry_in = format!("{}ms", delay.as_millis());
        if f.kind == Kind::Auth {
            tracing::error!(error = %f, down_for, attempts = self.failures, retry_in, "{what}");
        } else {
            let keeping = if self.have_state {
                "keeping the last good state"
            } else {
                "nothing is rendered before a first full read"
            };
            tracing::warn!(error = %f, down_for, attempts = self.failures, retry_in, "{what}; {keeping}");
        }
        if backoff_sleep(&self.config, delay).await {
            self.backoff.reset();
        }
    }

    /// Called when etcd answered a full read or a watch was created.
    fn recovered(&mut self) {
        self.metrics.source_ok();
        if let Some(since) = self.down_since.take() {
            tracing::info!(
                down_for = %humantime::format_duration(Duration::from_millis(since.elapsed().as_millis() as u64)),
                attempts = self.failures,
                "etcd reachable again"
            );
        }
        self.failures = 0;
    }

    /// Replaces the state with a full read, in one step.
    fn install_read(&mut self, reason: ReadReason, revision: i64, state: RawState) {
        if self.have_state {
            let differing = differing_keys(&self.state, &state, self.revision);
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
        let changed = !self.have_state || !same_values(&self.state, &state);
        if changed {
            self.screened = ScreenedState::build(&self.prefixes, &state);
        }
        self.state = state;
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
                    changed |= apply_put(
                        &mut self.state,
                        &mut self.screened,
                        &self.prefixes,
                        kv.key(),
                        kv.value(),
                        kv.mod_revision(),
                    );
                }
                EventType::Delete => {
                    changed |= apply_delete(&mut self.state, &mut self.screened, kv.key());
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

/// Whether two states hold the same keys and values (revisions aside).
fn same_values(a: &RawState, b: &RawState) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, (va, _)), (kb, (vb, _)))| ka == kb && va == vb)
}

/// How many keys differ between the watch-built state and a full read. A key the read shows
/// at a revision newer than the watch had heard of (`watch_revision`) is a change the watch
/// is still delivering, not drift, and is not counted.
fn differing_keys(watched: &RawState, read: &RawState, watch_revision: i64) -> usize {
    let mut n = 0;
    for (k, (v, rev)) in read {
        match watched.get(k) {
            Some((wv, _)) if wv == v => {}
            _ if *rev > watch_revision => {}
            _ => n += 1,
        }
    }
    n + watched.keys().filter(|k| !read.contains_key(*k)).count()
}

/// Exponential backoff with ±20 % jitter from a tiny xorshift generator.
pub(crate) struct Backoff {
    next: Duration,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        Backoff {
            next: BACKOFF_MIN,
            rng: seed | 1,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// The delay before the next attempt, at least `floor`; doubles the next one.
    pub(crate) fn next(&mut self, floor: Duration) -> Duration {
        let base = self.next.max(floor).min(BACKOFF_MAX);
        self.next = (base * 2).min(BACKOFF_MAX);
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        // A factor in [0.8, 1.2).
        let factor = 0.8 + 0.4 * ((r >> 11) as f64 / (1u64 << 53) as f64);
        base.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new();
        let mut last = Duration::ZERO;
        for i in 0..20 {
            let d = b.next(Duration::ZERO);
            let base = (BACKOFF_MIN * 2u32.pow(i.min(10))).min(BACKOFF_MAX);
            assert!(
                d >= base.mul_f64(0.79) && d <= base.mul_f64(1.21),
                "{i}: {d:?}"
            );
            last = d;
        }
        assert!(last <= BACKOFF_MAX.mul_f64(1.21));
        b.reset();
        assert!(b.next(Duration::ZERO) <= BACKOFF_MIN.mul_f64(1.21));
        assert!(b.next(BACKOFF_AUTH_MIN) >= BACKOFF_AUTH_MIN.mul_f64(0.79));
    }

    fn state(pairs: &[(&str, &str, i64)]) -> RawState {
        pairs
            .iter()
            .map(|(k, v, r)| {
                (
                    k.as_bytes().to_vec(),
                    (Held::Value(v.as_bytes().to_vec()), *r),
                )
            })
            .collect()
    }

    #[test]
    fn drift_counts_changed_and_missing_keys_not_newer_ones() {
        let watched = state(&[("/a", "1", 2), ("/b", "1", 3), ("/c", "1", 4)]);
        let read = state(&[("/a", "1", 2), ("/b", "2", 5), ("/d", "1", 9)]);
        // /b changed at 5 and /d appeared at 9, both after the watch's revision 4: in flight.
        // /c is gone from the read: drift.
        assert_eq!(differing_keys(&watched, &read, 4), 1);
        // Had the watch heard of revision 9, /b and /d would be drift too.
        assert_eq!(differing_keys(&watched, &read, 9), 3);
        assert!(same_values(&watched, &watched));
        assert!(!same_values(&watched, &read));
    }

    #[test]
    fn password_is_trimmed_and_redacted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\r\n").expect("write");
        let config = EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: Some("reader".into()),
            password_file: Some(path),
            dial_timeout: Duration::from_secs(1),
        };
        let pw = read_password(&config).expect("read").expect("some");
        assert_eq!(pw.0, "s3cret");
        assert_eq!(format!("{pw:?}"), "<redacted>");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// The screened state kept event by event equals a screen of the whole raw state, and
        /// the state a full read would hold: oversized keys and values included, of which
        /// neither state keeps the bytes.
        #[test]
        fn screened_state_follows_the_raw_state(
            events in proptest::collection::vec((0usize..8, proptest::option::of(0usize..6)), 0..40)
        ) {
            let long_a = format!("/services/a/{}", "x".repeat(MAX_KEY_LEN));
            let long_b = format!("/services/a/{}y", "x".repeat(MAX_KEY_LEN));
            let keys: [&[u8]; 8] = [
                b"/services/a/1", b"/services/a/2", b"/routes/a", b"/other/x",
                b"/services/a/\xff", b"/services/b 1/x", long_a.as_bytes(), long_b.as_bytes(),
            ];
            let big_a = "1".repeat(MAX_VALUE_LEN + 1);
            let big_b = "2".repeat(MAX_VALUE_LEN + 1);
            let values: [&[u8]; 6] = [
                b"127.0.0.1:80", b"bad\nvalue", b"127.0.0.2:81", b"", big_a.as_bytes(),
                big_b.as_bytes(),
            ];
            let prefixes = vec!["/services/".to_owned(), "/routes/".to_owned()];
            let mut whole: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut raw = RawState::new();
            let mut screened = ScreenedState::default();
            for (k, v) in events {
                match v {
                    Some(v) => {
                        whole.insert(keys[k].to_vec(), values[v].to_vec());
                        apply_put(&mut raw, &mut screened, &prefixes, keys[k], values[v], 1);
                    }
                    None => {
                        whole.remove(keys[k]);
                        apply_delete(&mut raw, &mut screened, keys[k]);
                    }
                }
            }
            let (snapshot, mut rejected) = Snapshot::screen(0, &prefixes, &whole);
            let mut kept: Vec<Rejection> = screened.rejected.values().cloned().collect();
            rejected.sort_by(|a, b| a.key.cmp(&b.key));
            kept.sort_by(|a, b| a.key.cmp(&b.key));
            proptest::prop_assert_eq!(&screened.kv, &snapshot.kv);
            proptest::prop_assert_eq!(kept, rejected);
            let rebuilt = ScreenedState::build(&prefixes, &raw);
            proptest::prop_assert_eq!(&rebuilt.kv, &snapshot.kv);
            // What a full read of `whole` keeps is what the events built.
            let read: RawState = whole
                .iter()
                .map(|(k, v)| {
                    let (k, held) = hold(&prefixes, k.clone(), v.clone());
                    (k, (held, 1))
                })
                .collect();
            proptest::prop_assert!(same_values(&read, &raw));
            proptest::prop_assert_eq!(differing_keys(&raw, &read, 1), 0);
            // No oversized bytes are kept.
            for (k, (held, _)) in &raw {
                proptest::prop_assert!(k.len() <= MAX_KEY_LEN + 17);
                if let Held::Value(v) = held {
                    proptest::prop_assert!(v.len() <= MAX_VALUE_LEN && k.len() <= MAX_KEY_LEN);
                }
            }
        }
    }

    #[test]
    fn oversized_pairs_keep_a_digest_and_their_rejection_not_their_bytes() {
        let prefixes = vec!["/services/".to_owned()];
        let big = vec![b'v'; 1 << 20];
        let (k, held) = hold(&prefixes, b"/services/web/a".to_vec(), big.clone());
        assert_eq!(k, b"/services/web/a");
        let Held::Oversized {
            rejection: Some(r), ..
        } = &held
        else {
            panic!("{held:?}")
        };
        assert_eq!(r.key, "\"/services/web/a\"");
        assert_eq!(r.reason, "value longer than 8192 bytes");
        // Another oversized value is a change; the same one is not.
        let (_, other) = hold(&prefixes, k.clone(), vec![b'w'; 1 << 20]);
        assert_ne!(held, other);
        assert_eq!(held, hold(&prefixes, k, big).1);

        let long = format!("/services/web/{}", "k".repeat(4096)).into_bytes();
        let (k, held) = hold(&prefixes, long.clone(), b"127.0.0.1:80".to_vec());
        assert_eq!(k.len(), MAX_KEY_LEN + 17);
        assert_eq!(k, held_key(&long).as_ref());
        assert!(k.starts_with(&long[..MAX_KEY_LEN]));
        let Held::Oversized {
            rejection: Some(r), ..
        } = &held
        else {
            panic!("{held:?}")
        };
        assert_eq!(r.reason, "key longer than 512 bytes");
        assert!(r.key.len() < 300, "{}", r.key);
        // Two long keys that share their first 512 bytes stay apart.
        let mut other = long.clone();
        other.push(b'x');
        assert_ne!(held_key(&other), held_key(&long));
        // Outside every prefix: no rejection.
        let (_, held) = hold(&prefixes, b"/other/x".to_vec(), big_value());
        assert!(matches!(
            held,
            Held::Oversized {
                rejection: None,
                ..
            }
        ));
        // Within the limits: kept as it is.
        let (_, held) = hold(
            &prefixes,
            b"/services/web/b".to_vec(),
            b"127.0.0.1:81".to_vec(),
        );
        assert_eq!(held, Held::Value(b"127.0.0.1:81".to_vec()));
    }

    fn big_value() -> Vec<u8> {
        vec![b'v'; MAX_VALUE_LEN + 1]
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/services/"), b"/services0");
        assert_eq!(prefix_end(b"/a\xff"), b"/b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(after(b"/a"), b"/a\0");
    }
}
