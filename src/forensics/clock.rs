//! When a revision happened, as far as anyone can honestly say.
//!
//! etcd stamps no time on a revision. What does carry times is the fleet view: every
//! `haconfd run` publishes, at most once a second, the revision it has applied and when
//! (`applied_at`, RFC 3339 to the second), and etcd keeps every one of those writes in its
//! history until compaction. Replaying the fleet prefix gives pairs (revision applied, time),
//! which answer two questions:
//! - *when did revision R reach the fleet?* the earliest time a node reports having applied R
//!   or later: an upper bound on when the change was made (a node applies within milliseconds,
//!   and publishes within a second);
//! - *what had the fleet applied at time T?* the highest revision a node reports having
//!   applied at or before T (`render --at`).
//!
//! With no node publishing (the file source, `[fleet] publish = false`, or history compacted
//! away) there is no mapping, and the commands say "time unknown" rather than guess.

use std::time::SystemTime;

use crate::etcd::{Client, Failure, history};
use crate::fleet::NodeState;

/// At most this many fleet writes are replayed (a node writes at most once a second).
const MAX_RECORDS: usize = 200_000;

/// One fleet write: `node` had applied `revision` at `at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub node: String,
    pub revision: i64,
    pub at: SystemTime,
}

/// The fleet's records between two revisions, by the revision they report.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    records: Vec<Record>,
    /// For each index, the index of the earliest record (by time) from there on: `time_of` in
    /// O(log n), as `history` asks it once per revision of a timeline.
    earliest_from: Vec<usize>,
    /// The first revision the records cover (earlier fleet writes were not read).
    pub from: i64,
}

impl Clock {
    /// A clock from records (tests, and [`Clock::read`]).
    pub fn new(mut records: Vec<Record>, from: i64) -> Clock {
        records.sort_by(|a, b| a.revision.cmp(&b.revision).then(a.at.cmp(&b.at)));
        let mut earliest_from = vec![0; records.len()];
        for i in (0..records.len()).rev() {
            earliest_from[i] = match earliest_from.get(i + 1) {
                Some(&j) if records[j].at < records[i].at => j,
                _ => i,
            };
        }
        Clock {
            records,
            earliest_from,
            from,
        }
    }

    /// Replays the fleet writes under `fleet_prefix` from revision `from` (or the oldest etcd
    /// holds, when `from` is compacted) to `to`.
    pub(crate) async fn read(
        client: &Client,
        fleet_prefix: &str,
        from: i64,
        to: i64,
        user: Option<&str>,
    ) -> Result<Clock, Failure> {
        let oldest = history::oldest_revision(client, user).await?;
        let from = from.max(oldest);
        let replay =
            history::changes(client, fleet_prefix.as_bytes(), from, to, MAX_RECORDS, user).await?;
        let records = replay
            .changes
            .iter()
            .filter_map(|c| record(&c.put.as_ref()?.value))
            .collect();
        Ok(Clock::new(records, from))
    }

    /// The highest revision a node reports having applied at or before `at`, found without
    /// replaying history: the fleet's records as they stood at a revision R only get newer as
    /// R grows, so a binary search over R (one small read of the fleet prefix per step, about
    /// 20 for a million revisions) finds the last R at which no record is later than `at`.
    pub(crate) async fn revision_at_time(
        client: &Client,
        fleet_prefix: &str,
        at: SystemTime,
        user: Option<&str>,
    ) -> Result<Option<Record>, Failure> {
        let oldest = history::oldest_revision(client, user).await?;
        let now = history::current_revision(client, user).await?;
        let probe = async |revision: i64| -> Result<(bool, Option<Record>), Failure> {
            let values =
                history::values_at(client, fleet_prefix.as_bytes(), revision, user).await?;
            let records: Vec<Record> = values.iter().filter_map(|v| record(v)).collect();
            let later = records.iter().any(|r| r.at > at);
            let best = records
                .into_iter()
                .filter(|r| r.at <= at)
                .max_by_key(|r| (r.revision, r.at));
            Ok((later, best))
        };
        let (later, best) = probe(now).await?;
        if !later {
            return Ok(best);
        }
        let (later, mut best) = probe(oldest).await?;
        if later {
            return Ok(None);
        }
        // No record later than `at` at `lo`; one at `hi`.
        let (mut lo, mut hi) = (oldest, now);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let (later, found) = probe(mid).await?;
            if later {
                hi = mid;
            } else {
                lo = mid;
                best = found;
            }
        }
        Ok(best)
    }

    /// The earliest time a node reports having applied `revision` or a later one, and which
    /// node: the change at `revision` was made at or before it.
    pub fn time_of(&self, revision: i64) -> Option<(&Record, SystemTime)> {
        let first = self.records.partition_point(|r| r.revision < revision);
        let r = &self.records[*self.earliest_from.get(first)?];
        Some((r, r.at))
    }

    /// Whether any record was read.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// "2026-12-04T03:00:01Z (applied by node-a)", or "time unknown (…why…)".
    pub fn describe(&self, revision: i64) -> String {
        match self.time_of(revision) {
            Some((r, at)) => format!(
                "applied by {} at {}",
                r.node,
                humantime::format_rfc3339_seconds(at)
            ),
            None if self.is_empty() => "time unknown: no node published its applies".into(),
            None => "time unknown: no node has published applying it".into(),
        }
    }
}

/// The record a fleet write holds, if it reports an apply.
fn record(value: &[u8]) -> Option<Record> {
    let state: NodeState = serde_json::from_slice(value).ok()?;
    let at = humantime::parse_rfc3339_weak(state.applied_at.as_deref()?).ok()?;
    (state.revision > 0).then_some(Record {
        node: state.node,
        revision: state.revision,
        at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + secs)
    }

    fn record(node: &str, revision: i64, secs: u64) -> Record {
        Record {
            node: node.into(),
            revision,
            at: at(secs),
        }
    }

    #[test]
    fn a_revision_is_dated_by_the_first_node_that_applied_it_or_later() {
        let clock = Clock::new(
            vec![
                record("a", 10, 100),
                record("b", 12, 103),
                record("a", 15, 102),
                record("b", 20, 110),
            ],
            1,
        );
        let (r, t) = clock.time_of(11).expect("dated");
        assert_eq!((r.node.as_str(), t), ("a", at(102)));
        assert_eq!(clock.time_of(10).map(|(_, t)| t), Some(at(100)));
        assert_eq!(clock.time_of(21), None);
        assert!(clock.describe(21).starts_with("time unknown"));
    }

    #[test]
    fn time_of_is_the_earliest_record_at_or_after_the_revision() {
        // A pseudo-random fleet: several nodes, records out of order, equal times.
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let records: Vec<Record> = (0..300)
            .map(|i| record(["a", "b", "c"][i % 3], next(100) as i64, next(50)))
            .collect();
        let clock = Clock::new(records.clone(), 1);
        for revision in 0..102 {
            let naive = records
                .iter()
                .filter(|r| r.revision >= revision)
                .map(|r| r.at)
                .min();
            assert_eq!(clock.time_of(revision).map(|(_, t)| t), naive, "{revision}");
        }
    }
}
