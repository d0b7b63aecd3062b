//! The registration itself: a lease with the asked TTL, the key written under it while the
//! instance is healthy, keep-alives every TTL/3, and the revoke on SIGTERM / SIGINT.
//!
//! Outages: a failed call or keep-alive stream ends the session; after a jittered backoff a
//! new connection resumes the lease it held (a lease survives an etcd restart) and writes the
//! key again. A lease that expired meanwhile ("lease not found") is replaced by a new one and
//! the key is written under it. Nothing here ever exits because etcd is away.

use std::time::{Duration, Instant};

use crate::etcd::{Client, PutOptions};

use super::check::Health;
use super::{Registration, Shutdown};
use crate::config::EtcdConfig;
use crate::etcd::lease::{self, Held, Lost, Opened, not_found as lease_not_found};
use crate::etcd::{Failure as EtcdFailure, Kind, Members, Outage, Recovered, Retry, backoff_sleep};
use crate::failure::Failure;

/// The revoke on stop: the contract is "gone within a second".
const REVOKE_TIMEOUT: Duration = Duration::from_secs(1);
/// When the member in use cannot revoke: how long another one may take.
const REVOKE_RETRY_WITHIN: Duration = Duration::from_secs(3);

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
    /// Since when etcd has been failing, how many attempts failed, the backoff.
    outage: Outage,
    /// Which etcd member to talk to.
    members: Members,
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
        outage: Outage::new(),
        members: Members::default(),
    };
    let user = config.username.clone();
    let mut client: Option<Client> = None;
    loop {
        let connected = tokio::select! {
            r = lease::connect(&mut st.members, &config) => r,
            s = shutdown.wait() => return stop(s, client.as_ref(), &mut st, &reg, &config).await,
        };
        let c = match connected {
            Ok(c) => c,
            Err(f) => {
                client = None;
                if let Some(s) = failed(&mut st, f, &config, shutdown).await {
                    return stop(s, None, &mut st, &reg, &config).await;
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
            End::Shutdown(s) => return stop(s, client.as_ref(), &mut st, &reg, &config).await,
            End::LeaseLost(why) => {
                tracing::warn!(key = %reg.key, reason = %why, "the lease is gone (it expired or was revoked); registering again under a new lease");
                st.lease = None;
                st.written = false;
            }
            End::Failed(f) => {
                // The member in use failed: the next connect starts at another one.
                st.members.failed(config.endpoints.len());
                if let Some(s) = failed(&mut st, f, &config, shutdown).await {
                    return stop(s, client.as_ref(), &mut st, &reg, &config).await;
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
    let Retry {
        delay,
        attempts,
        down_for,
        retry_in,
        ..
    } = st.outage.failed(&f);
    let endpoints = config.endpoints.join(",");
    if f.kind == Kind::Auth {
        tracing::error!(error = %f, endpoints, down_for, attempts, retry_in, "etcd refused announce (it needs write access to /services/ and lease rights)");
    } else {
        tracing::warn!(error = %f, endpoints, down_for, attempts, retry_in, "etcd unreachable; the registration is renewed when it is back");
    }
    tokio::select! {
        changed = backoff_sleep(config, delay) => {
            if changed {
                st.outage.reset_backoff();
            }
            None
        }
        s = shutdown.wait() => Some(s),
    }
}

/// How a revoke ended.
enum Revoke {
    Done,
    /// The lease had expired already: the key is gone.
    NotFound,
    Failed(String),
}

async fn revoke(client: &Client, lease: i64) -> Revoke {
    let mut lc = client.lease_client();
    match tokio::time::timeout(REVOKE_TIMEOUT, lc.revoke(lease)).await {
        Ok(Ok(_)) => Revoke::Done,
        Ok(Err(e)) if lease_not_found(&e) => Revoke::NotFound,
        Ok(Err(e)) => Revoke::Failed(EtcdFailure::from_etcd("lease revoke", &e, None).to_string()),
        Err(_) => Revoke::Failed(format!(
            "etcd did not answer the revoke within {REVOKE_TIMEOUT:?}"
        )),
    }
}

/// Revokes the lease (the key goes with it) and returns Ok: stopping is never a failure. The
/// member in use is asked first; when it fails (it died, or there was none), one other member
/// that knows a leader, within [`REVOKE_RETRY_WITHIN`]: a key left to its TTL would keep every
/// node routing to an instance that is going away.
async fn stop(
    signal: &'static str,
    client: Option<&Client>,
    st: &mut State,
    reg: &Registration,
    config: &EtcdConfig,
) -> Result<(), Failure> {
    let Some(lease) = st.lease else {
        tracing::info!(signal, "stopping; nothing was registered");
        return Ok(());
    };
    let started = Instant::now();
    let mut result = match client {
        Some(c) => revoke(c, lease).await,
        None => Revoke::Failed("not connected to etcd".into()),
    };
    if let Revoke::Failed(why) = &result {
        tracing::info!(key = %reg.key, error = %why, "stopping; revoking through another etcd member");
        if client.is_some() {
            st.members.failed(config.endpoints.len());
        }
        result = match tokio::time::timeout(
            REVOKE_RETRY_WITHIN,
            lease::connect(&mut st.members, config),
        )
        .await
        {
            Ok(Ok(other)) => revoke(&other, lease).await,
            Ok(Err(f)) => Revoke::Failed(f.to_string()),
            Err(_) => Revoke::Failed(format!(
                "no etcd member answered within {REVOKE_RETRY_WITHIN:?}"
            )),
        };
    }
    match result {
        Revoke::Done => tracing::info!(
            signal,
            key = %reg.key,
            lease = format!("{lease:x}"),
            took_ms = started.elapsed().as_millis() as u64,
            "stopping; lease revoked and key removed"
        ),
        Revoke::NotFound => {
            tracing::info!(signal, key = %reg.key, "stopping; the lease had already expired")
        }
        Revoke::Failed(why) => tracing::warn!(
            signal,
            key = %reg.key,
            error = %why,
            ttl = %humantime::format_duration(reg.ttl),
            "stopping; could not revoke the lease: the key expires with it"
        ),
    }
    Ok(())
}

impl From<Lost> for End {
    fn from(lost: Lost) -> End {
        match lost {
            Lost::Lease(why) => End::LeaseLost(why),
            Lost::Failed(f) => End::Failed(f),
        }
    }
}

/// A call with a deadline; "lease not found" is told apart.
async fn call<T>(
    what: &str,
    deadline: Duration,
    user: Option<&str>,
    fut: impl Future<Output = Result<T, crate::etcd::Error>>,
) -> Result<T, End> {
    lease::call(what, deadline, user, fut)
        .await
        .map_err(End::from)
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
    let deadline = lease::CALL_DEADLINE;
    let mut kv = client.kv_client();
    let (mut held, opened) = Held::open(client, &mut st.lease, reg.ttl, deadline, user).await?;
    let lease = held.id();
    match opened {
        Opened::Resumed => tracing::debug!(lease = format!("{lease:x}"), "lease resumed"),
        Opened::Granted { ttl, replaced } => {
            if let Some((old, why)) = replaced {
                tracing::warn!(key = %reg.key, lease = format!("{old:x}"), reason = %why, "the lease expired while etcd was unreachable; granting a new one");
                st.written = false;
            }
            tracing::debug!(lease = format!("{lease:x}"), ttl, "lease granted");
        }
    }

    // The key as the health says, now: after an outage it may have been lost (etcd restored
    // from a backup) or the health may have changed meanwhile.
    write(&mut kv, st, reg, lease, health.is_up(), deadline, user).await?;
    if let Some(Recovered { down_for, attempts }) = st.outage.recovered() {
        tracing::info!(
            key = %reg.key,
            lease = format!("{lease:x}"),
            down_for,
            attempts,
            "etcd reachable again; registration renewed"
        );
    }
    st.outage.reset_backoff();

    loop {
        tokio::select! {
            lost = held.until_lost(user) => return Err(lost.into()),
            _ = health.changed() => {
                write(&mut kv, st, reg, lease, health.is_up(), deadline, user).await?;
            }
        }
    }
}

/// Puts the key under the lease when up, deletes it when down.
async fn write(
    kv: &mut crate::etcd::KvClient,
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
