//! An etcd lease held by a long-running client: announce's registration and the fleet view's
//! node key. In: a connected client, the lease held before (if any) and a TTL. Out: the lease,
//! resumed when etcd still knows it (a lease survives an etcd restart) or granted anew, kept
//! alive every TTL/3 until etcd stops answering, forgets it, or the member in use no longer
//! knows a leader (asked every TTL/10, 0.5 to 10 s: a member cut off from the others cannot
//! renew the lease, and would otherwise be left only when etcd cancels the stream).
//!
//! Both holders connect the same way ([`connect`]) and tell the same two endings apart
//! ([`Lost`]): a lease etcd no longer knows is replaced at once, anything else is retried
//! after a backoff.

use std::time::{Duration, Instant};

use super::{
    self as etcd, Client, Failure as EtcdFailure, Kind, LeaseKeepAliveStream, LeaseKeeper,
    MaintenanceClient, Members,
};
use crate::config::EtcdConfig;

/// HTTP/2 keep-alive on a lease holder's connection. Its lease keep-alives may be far apart
/// (every 100 s with announce's default 5 m TTL), and etcd closes a connection that pings more
/// often than every 5 s while it sends nothing (GOAWAY "too_many_pings"), so pings go out
/// every 10 s; a hung connection is still noticed within about 15 s, far inside a lease.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Each call's deadline. Well under an election: right after a leader dies the other members
/// still forward to it for up to an election timeout (1 s by default), and a call that hangs
/// there is better given up and tried on the next member (a grant then hung 7 s). Calls on a
/// healthy cluster answer in milliseconds.
pub(crate) const CALL_DEADLINE: Duration = Duration::from_secs(2);
/// A keep-alive not answered this long (or one interval, when longer) ends the session.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How often the holder asks its member whether it still knows a leader
/// ([`etcd::leader_known`]): a tenth of the TTL, within these bounds. A member cut off from
/// the others cannot renew the lease, and the lease counts down on the leader from the last
/// renewal, up to a third of the TTL before the cut: with a 5 s TTL, 3.3 s may be left, and
/// etcd's own cancel of the keep-alive stream comes 4 to 6 s after the cut.
const LEADER_CHECK_MIN: Duration = Duration::from_millis(500);
const LEADER_CHECK_MAX: Duration = Duration::from_secs(10);

/// Connects to one member that answers and knows a leader (see [`Members`]), with the
/// config's TLS and auth and the lease holder's pings.
pub(crate) async fn connect(
    members: &mut Members,
    config: &EtcdConfig,
) -> Result<Client, EtcdFailure> {
    let options = |one: &EtcdConfig| {
        Ok(etcd::connect_options(one)?.with_keep_alive(PING_INTERVAL, PING_TIMEOUT))
    };
    members.connect(config, options).await.map(|(c, _)| c)
}

/// Why a lease is no longer kept.
pub(crate) enum Lost {
    /// etcd no longer knows the lease (it expired or was revoked): grant a new one at once.
    Lease(String),
    /// etcd failed or did not answer: back off, then reconnect and resume the lease.
    Failed(EtcdFailure),
}

/// Whether etcd says the lease does not exist.
pub(crate) fn not_found(e: &crate::etcd::Error) -> bool {
    match e {
        crate::etcd::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        crate::etcd::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        _ => false,
    }
}

/// A call with a deadline; "lease not found" is told apart.
pub(crate) async fn call<T>(
    what: &str,
    deadline: Duration,
    user: Option<&str>,
    fut: impl Future<Output = Result<T, crate::etcd::Error>>,
) -> Result<T, Lost> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if not_found(&e) => Err(Lost::Lease(format!("{what}: {e}"))),
        Ok(Err(e)) => Err(Lost::Failed(EtcdFailure::from_etcd(what, &e, user))),
        Err(_) => Err(Lost::Failed(EtcdFailure::timeout(what, deadline))),
    }
}

/// How [`Held::open`] came by its lease.
pub(crate) enum Opened {
    /// The lease held before, still known to etcd: the keys under it are still there.
    Resumed,
    /// A new lease; `replaced` is the one etcd had forgotten, and why.
    Granted {
        ttl: i64,
        replaced: Option<(i64, String)>,
    },
}

/// A lease being kept alive.
pub(crate) struct Held {
    id: i64,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    ticker: tokio::time::Interval,
    answer_within: Duration,
    /// When the oldest unanswered keep-alive went out.
    unanswered: Option<Instant>,
    /// Asks the member whether it knows a leader, every `leader_check`.
    maintenance: MaintenanceClient,
    leader_check: tokio::time::Interval,
}

impl Held {
    /// Resumes `*lease` or grants a new one of `ttl`, and starts its keep-alive. `*lease` is
    /// updated as soon as it changes (a granted lease is remembered even when the keep-alive
    /// then fails), so the caller can resume or revoke it later.
    pub(crate) async fn open(
        client: &Client,
        lease: &mut Option<i64>,
        ttl: Duration,
        deadline: Duration,
        user: Option<&str>,
    ) -> Result<(Held, Opened), Lost> {
        let mut lc = client.lease_client();
        let mut replaced = None;
        if let Some(id) = *lease {
            match call("lease keep-alive", deadline, user, lc.keep_alive(id)).await {
                Ok((keeper, stream)) => {
                    return Ok((Held::new(client, id, keeper, stream, ttl), Opened::Resumed));
                }
                Err(Lost::Lease(why)) => {
                    *lease = None;
                    replaced = Some((id, why));
                }
                Err(lost) => return Err(lost),
            }
        }
        let granted = call(
            "lease grant",
            deadline,
            user,
            lc.grant(ttl.as_secs() as i64, None),
        )
        .await?;
        let id = granted.id();
        *lease = Some(id);
        let (keeper, stream) = call("lease keep-alive", deadline, user, lc.keep_alive(id)).await?;
        let opened = Opened::Granted {
            ttl: granted.ttl(),
            replaced,
        };
        Ok((Held::new(client, id, keeper, stream, ttl), opened))
    }

    fn new(
        client: &Client,
        id: i64,
        keeper: LeaseKeeper,
        stream: LeaseKeepAliveStream,
        ttl: Duration,
    ) -> Held {
        let interval = (ttl / 3).max(Duration::from_secs(1));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let every = (ttl / 10).clamp(LEADER_CHECK_MIN, LEADER_CHECK_MAX);
        let mut leader_check = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        leader_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Held {
            id,
            keeper,
            stream,
            ticker,
            answer_within: interval.max(ANSWER_WITHIN),
            unanswered: None,
            maintenance: client.maintenance_client(),
            leader_check,
        }
    }

    pub(crate) fn id(&self) -> i64 {
        self.id
    }

    /// Keeps the lease alive until it is lost. Cancel-safe: it can lose a `select!` to the
    /// holder's own work and be called again.
    pub(crate) async fn until_lost(&mut self, user: Option<&str>) -> Lost {
        loop {
            tokio::select! {
                msg = self.stream.message() => match msg {
                    Ok(Some(resp)) if resp.ttl() > 0 => self.unanswered = None,
                    Ok(Some(_)) => return Lost::Lease("keep-alive answered TTL 0 (lease not found)".into()),
                    Ok(None) => return Lost::Failed(EtcdFailure::new(Kind::Unavailable, "etcd ended the lease keep-alive stream")),
                    Err(e) if not_found(&e) => return Lost::Lease(format!("keep-alive: {e}")),
                    Err(e) => return Lost::Failed(EtcdFailure::from_etcd("lease keep-alive stream", &e, user)),
                },
                _ = self.ticker.tick() => {
                    if let Some(sent) = self.unanswered
                        && sent.elapsed() > self.answer_within
                    {
                        return Lost::Failed(EtcdFailure::timeout("lease keep-alive", self.answer_within));
                    }
                    if let Err(e) = self.keeper.keep_alive().await {
                        return Lost::Failed(EtcdFailure::new(Kind::Unavailable, format!("lease keep-alive: {e}")));
                    }
                    self.unanswered.get_or_insert_with(Instant::now);
                }
                _ = self.leader_check.tick() => {
                    // A member cut off from its cluster cannot renew the lease: move on
                    // while the lease still runs on the leader.
                    if let Err(f) = etcd::leader_known(&mut self.maintenance, CALL_DEADLINE, user).await {
                        return Lost::Failed(f);
                    }
                }
            }
        }
    }
}
