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

use etcd_client::{Client, EventType, GetOptions, WatchOptions};

use super::{Failure, Kind, pages::prefix_end};

/// How long a replay may take in all: a few hundred changes take milliseconds.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest watch answer a replay decodes. etcd sends a replay in batches of up to 1,000
/// revisions, each change with its previous pair; the registry's are small, but the replay sees
/// every key of the key space.
const REPLAY_MESSAGE: usize = 64 << 20;
/// At most this many changes under the prefix are looked at in one replay.
const MAX_SEEN: usize = 1_000_000;

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
    match replay(client, prefix, from, to, limit, user, &mut out).await? {
        Replayed::Done => Ok(out),
        Replayed::Compacted(oldest) => Err(compacted(from, oldest)),
    }
}

/// How a replay ended.
enum Replayed {
    Done,
    /// The start revision is compacted; this is the oldest one etcd holds.
    Compacted(i64),
}

/// Replays every change from `from` to `to` and keeps those under `prefix` in `out`.
///
/// How it knows it has seen everything up to `to`: etcd 3.4 answers a progress request at
/// once, whether or not a watch that started in the past has caught up, so a progress answer
/// proves nothing. Every revision, though, is made by a change to some key. The replay
/// therefore watches the whole key space and filters by prefix itself: once a change at `to`
/// (or later) has arrived, every change before it has too.
async fn replay(
    client: &Client,
    prefix: &[u8],
    from: i64,
    to: i64,
    limit: usize,
    user: Option<&str>,
    out: &mut Changes,
) -> Result<Replayed, Failure> {
    // Revision 1 is an empty store: no change made it.
    let from = from.max(1);
    if from > to || to <= 1 {
        return Ok(Replayed::Done);
    }
    let end = prefix_end(prefix);
    let under = |key: &[u8]| key >= prefix && (end == [0] || key < end.as_slice());
    let work = async {
        let mut wc = client
            .watch_client()
            .max_decoding_message_size(REPLAY_MESSAGE);
        let options = WatchOptions::new()
            .with_all_keys()
            .with_prev_key()
            .with_start_revision(from);
        let mut stream = wc
            .watch(Vec::new(), Some(options))
            .await
            .map_err(|e| Failure::from_etcd("history watch", &e, user))?;
        let mut seen = 0usize;
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return Err(Failure::new(
                        Kind::Unavailable,
                        "etcd ended the history watch",
                    ));
                }
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
            let mut reached = false;
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                if kv.mod_revision() >= to {
                    reached = true;
                }
                if kv.mod_revision() > to || !under(kv.key()) {
                    continue;
                }
                seen += 1;
                if out.changes.len() >= limit || seen > MAX_SEEN {
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
            if reached {
                return Ok(Replayed::Done);
            }
        }
    };
    tokio::time::timeout(REPLAY_TIMEOUT, work)
        .await
        .map_err(|_| Failure::timeout("history replay", REPLAY_TIMEOUT))?
}

fn compacted(asked: i64, oldest: i64) -> Failure {
    Failure::new(
        Kind::Compacted,
        format!(
            "revision {asked} has been compacted: the oldest revision etcd still holds is {oldest}"
        ),
    )
}

/// The oldest revision etcd still holds (1 when it has never been compacted). etcd 3.4's
/// `status` does not report it, but a read below it is refused as compacted: a binary search
/// of one-key reads (about 20 for a million revisions) finds it.
pub(crate) async fn oldest_revision(client: &Client, user: Option<&str>) -> Result<i64, Failure> {
    let now = current_revision(client, user).await?;
    let mut kv = client.kv_client();
    let mut held = async |revision: i64| -> Result<bool, Failure> {
        let options = GetOptions::new()
            .with_revision(revision)
            .with_keys_only()
            .with_limit(1);
        let answer =
            tokio::time::timeout(super::READ_TIMEOUT, kv.get(b"\0".to_vec(), Some(options)))
                .await
                .map_err(|_| Failure::timeout("read", super::READ_TIMEOUT))?;
        match answer {
            Ok(_) => Ok(true),
            Err(e) => {
                let f = Failure::from_etcd("read", &e, user);
                if f.kind == Kind::Compacted {
                    Ok(false)
                } else {
                    Err(f)
                }
            }
        }
    };
    if now <= 1 || held(1).await? {
        return Ok(1);
    }
    // Revision `lo` is compacted, `hi` (now) is held.
    let (mut lo, mut hi) = (1, now);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if held(mid).await? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// The values of every key under `prefix` at `revision`: a small read (the fleet's node
/// records), in pages like any other.
pub(crate) async fn values_at(
    client: &Client,
    prefix: &[u8],
    revision: i64,
    user: Option<&str>,
) -> Result<Vec<Vec<u8>>, Failure> {
    let mut kv = client
        .kv_client()
        .max_decoding_message_size(super::MAX_MESSAGE);
    let mut pages = super::Pages::prefix(prefix, revision);
    let mut out = Vec::new();
    while let Some(page) = pages
        .next(&mut kv, "read of the fleet's records", user)
        .await?
    {
        out.extend(page.kvs.into_iter().map(|kv| kv.into_key_value().1));
    }
    Ok(out)
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
