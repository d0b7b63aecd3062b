//! etcd's history: every change under a prefix between two revisions, and the oldest revision
//! etcd still holds. The forensic commands (`render --revision`, `history`) read the past
//! through here.
//!
//! etcd keeps every revision until it is compacted. A watch that starts at an old revision
//! replays the changes since, in revision order, with the previous pair of each (asked for with
//! `prev_kv`); a watch that starts at a compacted revision is canceled at once with the oldest
//! revision still held (`compact_revision`), which is how that revision is learnt: etcd 3.4's
//! `status` does not report it.

use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};

use super::{Failure, Kind, MAX_MESSAGE, pages::prefix_end};

/// How long a replay may take in all: a few hundred changes take milliseconds.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a replay asks whether it has caught up (etcd answers a progress request only once
/// every event up to its current revision has been sent).
const PROGRESS_EVERY: Duration = Duration::from_millis(50);

/// One pair as etcd stored it at some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pair {
    pub(crate) key: Vec<u8>,
    pub(crate) value: Vec<u8>,
    pub(crate) create_revision: i64,
    pub(crate) mod_revision: i64,
    /// The lease the pair was attached to; 0 for none.
    pub(crate) lease: i64,
}

impl Pair {
    fn of(kv: &etcd_client::KeyValue) -> Pair {
        Pair {
            key: kv.key().to_vec(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }
}

/// One change: a put (with what it replaced, if anything) or a delete (with what it removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    /// The revision of the change.
    pub(crate) revision: i64,
    pub(crate) key: Vec<u8>,
    /// The pair written; None for a delete.
    pub(crate) put: Option<Pair>,
    /// The pair before the change; None when the key did not exist (or etcd no longer had it).
    pub(crate) prev: Option<Pair>,
}

/// The changes of a replay, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub(crate) changes: Vec<Change>,
    /// More changes than the limit happened: the oldest `limit` are here.
    pub(crate) truncated: bool,
}

/// Every change under `prefix` from revision `from` up to and including `to`, at most `limit`
/// of them. A `from` that etcd has compacted is a [`Kind::Compacted`] failure whose message
/// names the oldest revision still held.
pub(crate) async fn changes(
    client: &Client,
    prefix: &[u8],
    from: i64,
    to: i64,
    limit: usize,
    user: Option<&str>,
) -> Result<Changes, Failure> {
    let mut out = Changes::default();
    if from > to {
        return Ok(out);
    }
    let work = replay(
        client,
        prefix,
        prefix_end(prefix),
        from,
        to,
        limit,
        user,
        &mut out,
    );
    match tokio::time::timeout(REPLAY_TIMEOUT, work).await {
        Ok(Ok(Replayed::Done)) => Ok(out),
        Ok(Ok(Replayed::Compacted(oldest))) => Err(compacted(from, oldest)),
        Ok(Err(f)) => Err(f),
        Err(_) => Err(Failure::timeout("history replay", REPLAY_TIMEOUT)),
    }
}

/// How a replay ended.
enum Replayed {
    Done,
    /// The start revision is compacted; this is the oldest one etcd holds.
    Compacted(i64),
}

#[allow(clippy::too_many_arguments)]

async fn replay(
    client: &Client,
    key: &[u8],
    range_end: Vec<u8>,
    from: i64,
    to: i64,
    limit: usize,
    user: Option<&str>,
    out: &mut Changes,
) -> Result<Replayed, Failure> {
    let mut wc = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
    let options = WatchOptions::new()
        .with_range(range_end)
        .with_prev_key()
        .with_start_revision(from);
    let mut stream = wc
        .watch(key.to_vec(), Some(options))
        .await
        .map_err(|e| Failure::from_etcd("history watch", &e, user))?;
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut created = false;
    loop {
        tokio::select! {
            msg = stream.message() => {
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => return Err(Failure::new(Kind::Unavailable, "etcd ended the history watch")),
                    Err(e) => return Err(Failure::from_etcd("history watch", &e, user)),
                };
                if resp.compact_revision() > 0 {
                    return Ok(Replayed::Compacted(resp.compact_revision()));
                }
                if resp.canceled() {
                    return Err(Failure::new(
                        Kind::Other,
                        format!("etcd canceled the history watch: {}", resp.cancel_reason()),
                    ));
                }
                created |= resp.created();
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    if kv.mod_revision() > to {
                        return Ok(Replayed::Done);
                    }
                    if out.changes.len() >= limit {
                        out.truncated = true;
                        return Ok(Replayed::Done);
                    }
                    let put = (event.event_type() == EventType::Put).then(|| Pair::of(kv));
                    out.changes.push(Change {
                        revision: kv.mod_revision(),
                        key: kv.key().to_vec(),
                        put,
                        prev: event.prev_kv().map(Pair::of),
                    });
                }
                // A progress answer (no events) at or past `to`: every change up to it is here.
                let at = resp.header().map_or(0, |h| h.revision());
                if resp.events().is_empty() && !resp.created() && at >= to {
                    return Ok(Replayed::Done);
                }
                if out.changes.last().is_some_and(|c| c.revision >= to) {
                    return Ok(Replayed::Done);
                }
            }
            _ = progress.tick(), if created => {
                stream
                    .request_progress()
                    .await
                    .map_err(|e| Failure::from_etcd("history progress request", &e, user))?;
            }
        }
    }
}

fn compacted(asked: i64, oldest: i64) -> Failure {
    Failure::new(
        Kind::Compacted,
        format!(
            "revision {asked} has been compacted: the oldest revision etcd still holds is {oldest}"
        ),
    )
}

/// The oldest revision etcd still holds (1 when it has never been compacted), learnt from a
/// watch that starts at revision 1 on a key nobody writes.
pub(crate) async fn oldest_revision(client: &Client, user: Option<&str>) -> Result<i64, Failure> {
    let to = current_revision(client, user).await?;
    let key = b"\0haconfd-oldest-revision";
    let mut none = Changes::default();
    let work = replay(client, key, Vec::new(), 1, to, 0, user, &mut none);
    match tokio::time::timeout(REPLAY_TIMEOUT, work).await {
        Ok(Ok(Replayed::Done)) => Ok(1),
        Ok(Ok(Replayed::Compacted(oldest))) => Ok(oldest),
        Ok(Err(f)) => Err(f),
        Err(_) => Err(Failure::timeout("watch", REPLAY_TIMEOUT)),
    }
}

/// The current revision: what a read "now" would see.
pub(crate) async fn current_revision(client: &Client, user: Option<&str>) -> Result<i64, Failure> {
    let mut client = client.clone();
    let status = tokio::time::timeout(super::READ_TIMEOUT, client.status())
        .await
        .map_err(|_| Failure::timeout("status", super::READ_TIMEOUT))?
        .map_err(|e| Failure::from_etcd("status", &e, user))?;
    Ok(status.header().map_or(0, |h| h.revision()))
}

/// Whether lease `id` is still alive (granted and not expired or revoked).
#[allow(dead_code)] // used by `history` (next commit)
pub(crate) async fn lease_alive(
    client: &Client,
    id: i64,
    user: Option<&str>,
) -> Result<bool, Failure> {
    let mut lc = client.lease_client();
    let answer = tokio::time::timeout(super::READ_TIMEOUT, lc.time_to_live(id, None))
        .await
        .map_err(|_| Failure::timeout("lease time-to-live", super::READ_TIMEOUT))?;
    match answer {
        Ok(resp) => Ok(resp.ttl() > 0),
        Err(e) => {
            let f = Failure::from_etcd("lease time-to-live", &e, user);
            if f.to_string().contains("not found") {
                Ok(false)
            } else {
                Err(f)
            }
        }
    }
}
