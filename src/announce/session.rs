//! The registration itself: a lease with the asked TTL, the key written under it while the
//! instance is healthy, keep-alives every TTL/3, and the revoke on SIGTERM / SIGINT.
//!
//! Outages: a failed call or keep-alive stream ends the session; after a jittered backoff a
//! new connection resumes the lease it held (a lease survives an etcd restart) and writes the
//! key again. A lease that expired meanwhile ("lease not found") is replaced by a new one and
//! the key is written under it. Nothing here ever exits because etcd is away.

use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};

use super::check::Health;
use super::{Registration, Shutdown};
use crate::commands::Failure;
use crate::config::EtcdConfig;
use crate::source::etcd::{
    self, BACKOFF_AUTH_MIN, Backoff, Failure as EtcdFailure, KEEP_ALIVE_TIMEOUT, Kind,
};

/// HTTP/2 keep-alive on announce's connection. Its own lease keep-alives are often far
/// apart (every 100 s with the default 5 m TTL), and etcd closes a connection that pings
/// more often than every 5 s while it sends nothing (GOAWAY "too_many_pings"), so pings go
/// out every 10 s; a hung connection is still noticed within about 15 s, far inside a lease.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// A keep-alive not answered this long (or one interval, when longer) ends the session.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// The revoke on stop: the contract is "gone within a second".
const REVOKE_TIMEOUT: Duration = Duration::from_secs(1);

/// How a session ended.
enum End {
    Shutdown(&'static str),
    /// etcd no longer knows the lease: grant a new one at once.
    LeaseLost(String),
    Failed(EtcdFailure),
}

/// What outlives a session.
struct State {
    /// The lease held, if any: resumed after an outage, revoked on stop.
    lease: Option<i64>,
    /// Whether the key is believed to be in etcd (for log lines only).
    written: bool,
    backoff: Backoff,
    down_since: Option<Instant>,
    failures: u32,
}

/// Registers and keeps the registration until a signal; exits 0 then.
pub(super) async fn run(
    config: EtcdConfig,
    reg: Registration,
    mut health: Health,
    shutdown: &mut Shutdown,
) -> Result<(), Failure> {
    let mut st = State {
        lease: None,
        written: false,
        backoff: Backoff::new(),
        down_since: None,
        failures: 0,
    };
    let user = config.username.clone();
    let mut client: Option<Client> = None;
    loop {
        let connecting = async {
            let options =
                etcd::connect_options(&config)?.with_keep_alive(PING_INTERVAL, PING_TIMEOUT);
            etcd::connect_with(&config, options).await
        };
        let connected = tokio::select! {
            r = connecting => r,
            s = shutdown.wait() => return stop(s, client.as_ref(), &st, &reg).await,
        };
        let c = match connected {
            Ok((c, _)) => c,
            Err(f) => {
                client = None;
                if let Some(s) = failed(&mut st, f, &config, shutdown).await {
                    return stop(s, None, &st, &reg).await;
                }
                continue;
            }
        };
        client = Some(c.clone());
        let end = tokio::select! {
            end = session(&c, &mut st, &reg, &mut health, user.as_deref()) => end,
            s = shutdown.wait() => End::Shutdown(s),
        };
        match end {
            End::Shutdown(s) => return stop(s, client.as_ref(), &st, &reg).await,
            End::LeaseLost(why) => {
                tracing::warn!(key = %reg.key, reason = %why, "the lease is gone (it expired or was revoked); registering again under a new lease");
                st.lease = None;
                st.written = false;
            }
            End::Failed(f) => {
                if let Some(s) = failed(&mut st, f, &config, shutdown).await {
                    return stop(s, client.as_ref(), &st, &reg).await;
                }
            }
        }
    }
}

/// Logs a failure and waits the backoff. Some(signal) when a stop came meanwhile.
async fn failed(
    st: &mut State,
    f: EtcdFailure,
    config: &EtcdConfig,
    shutdown: &mut Shutdown,
) -> Option<&'static str> {
    let since = *st.down_since.get_or_insert_with(Instant::now);
    st.failures += 1;
    let floor = if f.kind == Kind::Auth {
        BACKOFF_AUTH_MIN
    } else {
        Duration::ZERO
    };
    let delay = st.backoff.next(floor);
    let down_for =
        humantime::format_duration(Duration::from_millis(since.elapsed().as_millis() as u64))
            .to_string();
    let retry_in = format!("{}ms", delay.as_millis());
    let endpoints = config.endpoints.join(",");
    if f.kind == Kind::Auth {
        tracing::error!(error = %f, endpoints, down_for, attempts = st.failures, retry_in, "etcd refused announce (it needs write access to /services/ and lease rights)");
    } else {
        tracing::warn!(error = %f, endpoints, down_for, attempts = st.failures, retry_in, "etcd unreachable; the registration is renewed when it is back");
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => None,
        s = shutdown.wait() => Some(s),
    }
}

/// Revokes the lease (the key goes with it) and returns Ok: stopping is never a failure.
async fn stop(
    signal: &'static str,
    client: Option<&Client>,
    st: &State,
    reg: &Registration,
) -> Result<(), Failure> {
    let (Some(client), Some(lease)) = (client, st.lease) else {
        tracing::info!(signal, "stopping; nothing was registered");
        return Ok(());
    };
    let mut lc = client.lease_client();
    let started = Instant::now();
    match tokio::time::timeout(REVOKE_TIMEOUT, lc.revoke(lease)).await {
        Ok(Ok(_)) => tracing::info!(
            signal,
            key = %reg.key,
            lease = format!("{lease:x}"),
            took_ms = started.elapsed().as_millis() as u64,
            "stopping; lease revoked and key removed"
        ),
        Ok(Err(e)) if lease_not_found(&e) => {
            tracing::info!(signal, key = %reg.key, "stopping; the lease had already expired")
        }
        Ok(Err(e)) => tracing::warn!(
            signal,
            key = %reg.key,
            error = %EtcdFailure::from_etcd("lease revoke", &e, None),
            ttl = %humantime::format_duration(reg.ttl),
            "stopping; could not revoke the lease: the key expires with it"
        ),
        Err(_) => tracing::warn!(
            signal,
            key = %reg.key,
            ttl = %humantime::format_duration(reg.ttl),
            "stopping; etcd did not answer the revoke within 1s: the key expires with the lease"
        ),
    }
    Ok(())
}

/// Whether etcd says the lease does not exist.
fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        _ => false,
    }
}

/// A call with a deadline; "lease not found" is told apart.
async fn call<T>(
    what: &str,
    deadline: Duration,
    user: Option<&str>,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, End> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if lease_not_found(&e) => Err(End::LeaseLost(format!("{what}: {e}"))),
        Ok(Err(e)) => Err(End::Failed(EtcdFailure::from_etcd(what, &e, user))),
        Err(_) => Err(End::Failed(EtcdFailure::timeout(what, deadline))),
    }
}

/// Resumes or grants the lease, writes the key to match the health, and keeps the lease
/// alive until something fails.
async fn session(
    client: &Client,
    st: &mut State,
    reg: &Registration,
    health: &mut Health,
    user: Option<&str>,
) -> End {
    match session_inner(client, st, reg, health, user).await {
        Ok(never) => match never {},
        Err(end) => end,
    }
}

enum Never {}

async fn session_inner(
    client: &Client,
    st: &mut State,
    reg: &Registration,
    health: &mut Health,
    user: Option<&str>,
) -> Result<Never, End> {
    let deadline = KEEP_ALIVE_TIMEOUT + PING_TIMEOUT;
    let mut lc = client.lease_client();
    let mut kv = client.kv_client();
    let ttl_secs = reg.ttl.as_secs() as i64;

    let resumed = match st.lease {
        Some(id) => match call("lease keep-alive", deadline, user, lc.keep_alive(id)).await {
            Ok(ka) => {
                tracing::debug!(lease = format!("{id:x}"), "lease resumed");
                Some((id, ka))
            }
            Err(End::LeaseLost(why)) => {
                tracing::warn!(key = %reg.key, lease = format!("{id:x}"), reason = %why, "the lease expired while etcd was unreachable; granting a new one");
                st.lease = None;
                st.written = false;
                None
            }
            Err(end) => return Err(end),
        },
        None => None,
    };
    let (lease, (mut keeper, mut stream)) = match resumed {
        Some(r) => r,
        None => {
            let granted = call("lease grant", deadline, user, lc.grant(ttl_secs, None)).await?;
            let id = granted.id();
            st.lease = Some(id);
            tracing::debug!(
                lease = format!("{id:x}"),
                ttl = granted.ttl(),
                "lease granted"
            );
            let ka = call("lease keep-alive", deadline, user, lc.keep_alive(id)).await?;
            (id, ka)
        }
    };

    // The key as the health says, now: after an outage it may have been lost (etcd restored
    // from a backup) or the health may have changed meanwhile.
    write(&mut kv, st, reg, lease, health.is_up(), deadline, user).await?;
    if let Some(since) = st.down_since.take() {
        tracing::info!(
            key = %reg.key,
            lease = format!("{lease:x}"),
            down_for = %humantime::format_duration(Duration::from_millis(since.elapsed().as_millis() as u64)),
            attempts = st.failures,
            "etcd reachable again; registration renewed"
        );
    }
    st.failures = 0;
    st.backoff.reset();

    let interval = (reg.ttl / 3).max(Duration::from_secs(1));
    let answer_within = interval.max(ANSWER_WITHIN);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the oldest unanswered keep-alive went out.
    let mut unanswered: Option<Instant> = None;
    loop {
        tokio::select! {
            msg = stream.message() => match msg {
                Ok(Some(resp)) if resp.ttl() > 0 => unanswered = None,
                Ok(Some(_)) => return Err(End::LeaseLost("keep-alive answered TTL 0 (lease not found)".into())),
                Ok(None) => return Err(End::Failed(EtcdFailure::new(Kind::Unavailable, "etcd ended the lease keep-alive stream"))),
                Err(e) if lease_not_found(&e) => return Err(End::LeaseLost(format!("keep-alive: {e}"))),
                Err(e) => return Err(End::Failed(EtcdFailure::from_etcd("lease keep-alive stream", &e, user))),
            },
            _ = health.changed() => {
                write(&mut kv, st, reg, lease, health.is_up(), deadline, user).await?;
            }
            _ = ticker.tick() => {
                if let Some(sent) = unanswered
                    && sent.elapsed() > answer_within
                {
                    return Err(End::Failed(EtcdFailure::timeout("lease keep-alive", answer_within)));
                }
                keeper.keep_alive().await.map_err(|e| {
                    End::Failed(EtcdFailure::new(Kind::Unavailable, format!("lease keep-alive: {e}")))
                })?;
                unanswered.get_or_insert_with(Instant::now);
            }
        }
    }
}

/// Puts the key under the lease when up, deletes it when down.
async fn write(
    kv: &mut etcd_client::KvClient,
    st: &mut State,
    reg: &Registration,
    lease: i64,
    up: bool,
    deadline: Duration,
    user: Option<&str>,
) -> Result<(), End> {
    if up {
        let options = PutOptions::new().with_lease(lease);
        call(
            "put",
            deadline,
            user,
            kv.put(reg.key.as_str(), reg.value.as_str(), Some(options)),
        )
        .await?;
        if !st.written {
            tracing::info!(key = %reg.key, lease = format!("{lease:x}"), ttl = %humantime::format_duration(reg.ttl), "registered");
        }
        st.written = true;
    } else {
        call("delete", deadline, user, kv.delete(reg.key.as_str(), None)).await?;
        if st.written {
            tracing::warn!(key = %reg.key, "unhealthy: key removed (the lease is kept for when it passes again)");
        }
        st.written = false;
    }
    Ok(())
}
