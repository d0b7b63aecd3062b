//! etcd's history: every change under a prefix between two revisions, and the oldest revision
//! etcd still holds. The forensic commands (`render --revision`, `history`) read the past
//! through here.
//!
//! etcd keeps every revision until it is compacted. A watch that starts at an old revision
//! replays the changes since, in revision order, with the previous pair of each (asked for with
//! `prev_kv`); a watch that starts at a compacted revision is canceled with the oldest revision
//! still held (`compact_revision`).
//!
//! **When a replay is complete.** etcd sends a watcher that lags behind in batches of at most
//! [`CATCH_UP_BATCH_REVS`] revisions, one pass every 100 ms, until it has caught up; nothing
//! marks the last batch. A replay ends at the first of:
//! - an event at or past `to` (events come in revision order);
//! - a response with fewer than [`CATCH_UP_BATCH_REVS`] revisions whose header is at or past
//!   `to`: only the last batch of a catch-up is short, and after it the watcher is synced;
//! - a progress answer at or past `to`, which etcd 3.4.25+ and 3.5.8+ send only once the
//!   watcher has caught up. Earlier versions answer at once with the current revision, events
//!   still to come (etcd issue 15220), so there the answer counts only after [`QUIET`] without
//!   an event: the range has no change at all.
//!
//! The oldest revision etcd holds is learnt by reading at revisions (a read below it is refused
//! as compacted): etcd 3.4's `status` does not report it, and a watch's compaction answer comes
//! only after a progress answer on etcd before 3.4.25.

use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, StatusResponse, WatchOptions};

use super::{Failure, Kind, MAX_MESSAGE, pages::prefix_end};

/// How long a replay may take in all: a few hundred changes take milliseconds.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a replay asks whether it has caught up.
const PROGRESS_EVERY: Duration = Duration::from_millis(50);
/// The most revisions etcd sends a lagging watcher in one response (`watchBatchMaxRevs` in
/// etcd's mvcc package, the same in 3.4, 3.5 and 3.6): a shorter response ends the catch-up.
const CATCH_UP_BATCH_REVS: usize = 1000;
/// How many pieces of a range are replayed at once (etcd serves up to 512 lagging watchers in
/// one pass).
const PARALLEL: usize = 64;
/// On an etcd whose progress answers do not wait for the replay (before 3.4.25 and 3.5.8): how
/// long a replay must have had no event before an answer at or past `to` is believed. etcd sends
/// a lagging watcher a batch every 100 ms.
const QUIET: Duration = Duration::from_millis(300);

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
///
/// The range is replayed in pieces of [`CATCH_UP_BATCH_REVS`] revisions, [`PARALLEL`] at a
/// time, each by a watch of its own: etcd sends each lagging watcher one batch per pass, so one
/// watch over 20,000 revisions takes 20 passes (2 s), and 20 watches take one.
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
    let synced = synced_progress(status(client, user).await?.version());
    let pieces = pieces(from, to);
    let work = async {
        for wave in pieces.chunks(PARALLEL) {
            let mut set = tokio::task::JoinSet::new();
            for (i, &(start, end)) in wave.iter().enumerate() {
                let replay = Replay {
                    from: start,
                    to: end,
                    limit: limit - out.changes.len(),
                    synced_progress: synced,
                };
                let (client, prefix) = (client.clone(), prefix.to_vec());
                let user = user.map(str::to_owned);
                set.spawn(async move {
                    let mut part = Changes::default();
                    let end = prefix_end(&prefix);
                    let ended = replay
                        .run(&client, &prefix, end, user.as_deref(), &mut part)
                        .await;
                    (i, ended.map(|e| (e, part)))
                });
            }
            let mut parts: Vec<Option<Changes>> = (0..wave.len()).map(|_| None).collect();
            while let Some(joined) = set.join_next().await {
                let (i, ended) = joined.map_err(|e| {
                    Failure::new(Kind::Other, format!("history replay task failed: {e}"))
                })?;
                match ended? {
                    (Replayed::Done, part) => parts[i] = Some(part),
                    (Replayed::Compacted(oldest), _) => return Ok(Replayed::Compacted(oldest)),
                }
            }
            for part in parts.into_iter().flatten() {
                let room = limit - out.changes.len();
                out.truncated |= part.truncated || part.changes.len() > room;
                out.changes.extend(part.changes.into_iter().take(room));
                if out.truncated {
                    return Ok(Replayed::Done);
                }
            }
        }
        Ok(Replayed::Done)
    };
    match tokio::time::timeout(REPLAY_TIMEOUT, work).await {
        Ok(Ok(Replayed::Done)) => Ok(out),
        Ok(Ok(Replayed::Compacted(oldest))) => Err(compacted(from, oldest)),
        Ok(Err(f)) => Err(f),
        Err(_) => Err(Failure::timeout("history replay", REPLAY_TIMEOUT)),
    }
}

/// `from..=to` in pieces of at most [`CATCH_UP_BATCH_REVS`] revisions, so that the first batch
/// etcd sends each piece's watch covers all of it.
fn pieces(from: i64, to: i64) -> Vec<(i64, i64)> {
    let step = CATCH_UP_BATCH_REVS as i64;
    (0..)
        .map(|i| from + i * step)
        .take_while(|&start| start <= to)
        .map(|start| (start, (start + step - 1).min(to)))
        .collect()
}

/// How a replay ended.
enum Replayed {
    Done,
    /// The start revision is compacted; this is the oldest one etcd holds.
    Compacted(i64),
}

/// One replay's bounds, and whether the server's progress answers can be believed at once.
struct Replay {
    from: i64,
    to: i64,
    limit: usize,
    /// etcd 3.4.25+ or 3.5.8+: a progress answer comes only once the watcher has caught up.
    synced_progress: bool,
}

impl Replay {
    async fn run(
        &self,
        client: &Client,
        key: &[u8],
        range_end: Vec<u8>,
        user: Option<&str>,
        out: &mut Changes,
    ) -> Result<Replayed, Failure> {
        let to = self.to;
        let mut wc = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let options = WatchOptions::new()
            .with_range(range_end)
            .with_prev_key()
            .with_start_revision(self.from);
        let mut stream = wc
            .watch(key.to_vec(), Some(options))
            .await
            .map_err(|e| Failure::from_etcd("history watch", &e, user))?;
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut created = false;
        let mut seen = Seen::default();
        // When the last event (or the watch's creation) was heard of.
        let mut last_heard = tokio::time::Instant::now();
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
                    let at = resp.header().map_or(0, |h| h.revision());
                    if resp.created() {
                        created = true;
                        last_heard = tokio::time::Instant::now();
                        continue;
                    }
                    if resp.events().is_empty() {
                        // A progress answer: every change up to `at` has been sent, on an etcd
                        // that answers only once the watcher has caught up.
                        if at >= to && (self.synced_progress || last_heard.elapsed() >= QUIET) {
                            return Ok(Replayed::Done);
                        }
                        continue;
                    }
                    last_heard = tokio::time::Instant::now();
                    let mut revisions = 0;
                    let mut last = None;
                    for event in resp.events() {
                        let Some(kv) = event.kv() else { continue };
                        if kv.mod_revision() > to {
                            return Ok(Replayed::Done);
                        }
                        if last != Some(kv.mod_revision()) {
                            revisions += 1;
                            last = Some(kv.mod_revision());
                        }
                        if !seen.is_new(kv.mod_revision(), kv.key()) {
                            continue;
                        }
                        if out.changes.len() >= self.limit {
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
                    if out.changes.last().is_some_and(|c| c.revision >= to) {
                        return Ok(Replayed::Done);
                    }
                    // The last batch of the catch-up: the watcher is synced at `at`.
                    if revisions < CATCH_UP_BATCH_REVS && at >= to {
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
}

/// The events a replay has taken, to leave out one etcd sends twice (etcd before 3.4.24 could;
/// a watcher's events come in revision order).
#[derive(Default)]
struct Seen {
    revision: i64,
    keys: std::collections::HashSet<Vec<u8>>,
}

impl Seen {
    /// Whether the change of `key` at `revision` is new, noting it.
    fn is_new(&mut self, revision: i64, key: &[u8]) -> bool {
        if revision < self.revision {
            return false;
        }
        if revision > self.revision {
            self.revision = revision;
            self.keys.clear();
        }
        self.keys.insert(key.to_vec())
    }
}

/// Whether etcd `version` answers a progress request only once the watcher has caught up:
/// 3.4.25 and later 3.4s, 3.5.8 and later 3.5s, 3.6 on (etcd issue 15220).
fn synced_progress(version: &str) -> bool {
    let mut parts = version
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor, patch) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    match (major, minor) {
        (3, 4) => patch >= 25,
        (3, 5) => patch >= 8,
        (3, m) => m > 5,
        (m, _) => m > 3,
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

/// The oldest revision etcd still holds (1 when it has never been compacted): the lowest one a
/// read is not refused at, found by bisection (a read below the compaction is refused).
pub(crate) async fn oldest_revision(client: &Client, user: Option<&str>) -> Result<i64, Failure> {
    let mut kv = client.kv_client();
    // A key nobody writes: each read answers a count of 0.
    let key = b"\0haconfd-oldest-revision".to_vec();
    let mut readable = async |revision: i64| -> Result<bool, Failure> {
        let options = GetOptions::new().with_revision(revision).with_count_only();
        let answer = tokio::time::timeout(super::READ_TIMEOUT, kv.get(key.clone(), Some(options)))
            .await
            .map_err(|_| Failure::timeout("read at a revision", super::READ_TIMEOUT))?;
        match answer {
            Ok(_) => Ok(true),
            Err(e) => match Failure::from_etcd("read at a revision", &e, user) {
                f if f.kind == Kind::Compacted => Ok(false),
                f => Err(f),
            },
        }
    };
    if readable(1).await? {
        return Ok(1);
    }
    // Revision 1 is compacted and the current one never is: bisect between them.
    let (mut below, mut held) = (1, current_revision(client, user).await?);
    while held - below > 1 {
        let mid = below + (held - below) / 2;
        if readable(mid).await? {
            held = mid;
        } else {
            below = mid;
        }
    }
    Ok(held)
}

/// The values of every key under `prefix` at `revision`: a small read (the fleet's node
/// records), in pages like any other.
pub(crate) async fn values_at(
    client: &Client,
    prefix: &[u8],
    revision: i64,
    user: Option<&str>,
) -> Result<Vec<Vec<u8>>, Failure> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
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
    let status = status(client, user).await?;
    Ok(status.header().map_or(0, |h| h.revision()))
}

async fn status(client: &Client, user: Option<&str>) -> Result<StatusResponse, Failure> {
    let mut client = client.clone();
    tokio::time::timeout(super::READ_TIMEOUT, client.status())
        .await
        .map_err(|_| Failure::timeout("status", super::READ_TIMEOUT))?
        .map_err(|e| Failure::from_etcd("status", &e, user))
}

/// Whether lease `id` still exists (granted, and not yet revoked or removed at its expiry). etcd
/// answers a TTL of -1 for a lease it does not know, and 0 for one with less than a second left.
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
        Ok(resp) => Ok(resp.ttl() >= 0),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_answers_wait_for_the_replay_from_3_4_25_and_3_5_8_on() {
        for old in [
            "3.4.23", "3.4.24", "3.5.0", "3.5.7", "3.3.27", "2.3.8", "", "x",
        ] {
            assert!(!synced_progress(old), "{old}");
        }
        for new in [
            "3.4.25",
            "3.4.37",
            "3.5.8",
            "3.5.21",
            "3.6.0",
            "3.6.4-rc.1",
            "4.0.0",
        ] {
            assert!(synced_progress(new), "{new}");
        }
    }

    #[test]
    fn a_range_is_replayed_in_pieces_of_one_batch() {
        assert_eq!(pieces(5, 4), vec![]);
        assert_eq!(pieces(5, 5), vec![(5, 5)]);
        assert_eq!(pieces(1, 1000), vec![(1, 1000)]);
        assert_eq!(pieces(1, 2500), vec![(1, 1000), (1001, 2000), (2001, 2500)]);
    }

    #[test]
    fn an_event_sent_twice_is_taken_once() {
        let mut seen = Seen::default();
        assert!(seen.is_new(5, b"a"));
        assert!(seen.is_new(5, b"b"));
        assert!(!seen.is_new(5, b"a"));
        assert!(seen.is_new(6, b"a"));
        assert!(!seen.is_new(5, b"b"));
    }
}
