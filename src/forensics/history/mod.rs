//! `haconfd history`: a timeline, from etcd's history, of the registry's instances (and routes,
//! and any other key under the watched prefixes) that appeared, changed or left.
//!
//! - `mod.rs`: the command: the range (`--from`, `--since`, or all etcd still holds), the
//!   replays, the leases asked about, the fleet's clock for the times.
//! - `rows.rs`: pure: changes → rows, and what removed a key (see there).
//! - `output.rs`: pure: rows → the text timeline or the JSON document.
//!
//! etcd keeps history until it is compacted: the timeline starts at the oldest revision it
//! still holds, and says so. etcd stamps no times on revisions; a row's time is when a node
//! first reported (through the fleet view) having applied that revision or a later one, and
//! "-" when none has.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::cli::HistoryArgs;
use crate::config::{ConfigSource, etcd_for_client};
use crate::etcd::history::{self, Changes, current_revision, oldest_revision};
use crate::failure::{Failure, write_stdout};
use crate::model::is_service_name;

use super::{Clock, Etcd, Record};

mod output;
mod rows;
#[cfg(test)]
mod tests;

use output::{Header, Since};

/// The most changes one timeline shows; past it, the header says "truncated".
const LIMIT: usize = 100_000;
/// The most leases asked about (whether etcd still knows them) for one timeline.
const MAX_LEASE_LOOKUPS: usize = 1_000;
/// How many of those questions are asked at once.
const LEASE_LOOKUPS_AT_ONCE: usize = 32;

/// `haconfd history`.
pub async fn command(cs: &ConfigSource, args: HistoryArgs) -> Result<(), Failure> {
    let since = args.since.as_deref().map(parse_since).transpose()?;
    if let Some(from) = args.from
        && from < 1
    {
        return Err(Failure::Usage(format!(
            "--from {from}: etcd's revisions start at 1 (fix: --from 1 or later, or leave it out to start at the oldest revision etcd holds)"
        )));
    }
    if let Some(s) = &args.service
        && !is_service_name(s)
    {
        return Err(Failure::Usage(format!(
            "--service {:?}: is not a service name (fix: write it as {})",
            s,
            crate::model::SERVICE_NAME_RULE
        )));
    }
    let config = cs.load()?;
    let etcd = if args.etcd.is_empty() {
        Etcd::connect(&config, "history").await?
    } else {
        Etcd::connect_to(&etcd_for_client(&config, &args.etcd)?).await?
    };
    let started = std::time::Instant::now();
    let user = etcd.user();
    let fleet_prefix = config.fleet.prefix.as_str();
    let prefixes = &config.source.prefixes;
    let replayed = rows::replayed_prefixes(prefixes, args.service.as_deref());
    let to = current_revision(&etcd.client, user)
        .await
        .map_err(runtime)?;
    let oldest = oldest_revision(&etcd.client, user).await.map_err(runtime)?;

    let (from, since) = match (args.from, since) {
        (Some(from), _) if from < oldest => {
            return Err(Failure::Runtime(anyhow::anyhow!(
                "--from {from}: revision {from} has been compacted: the oldest revision etcd still holds is {oldest} (fix: --from {oldest} or later, or leave --from out to start there)"
            )));
        }
        (Some(from), _) if from > to => {
            return Err(Failure::Runtime(anyhow::anyhow!(
                "--from {from}: revision {from} is in the future: etcd's current revision is {to}"
            )));
        }
        (Some(from), _) => (from, None),
        (None, Some((text, ago))) => {
            let at = SystemTime::now()
                .checked_sub(ago)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            // A binary search of the fleet's records, not a replay of them all since the
            // oldest revision (see `render --at`).
            let record = Clock::revision_at_time(&etcd.client, fleet_prefix, at, user)
                .await
                .map_err(runtime)?;
            let (from, since) = start_since(record, at, &text, oldest);
            (from, Some(since))
        }
        (None, None) => (oldest, None),
    };
    // The rows are dated by records published after `from`: a node publishes a revision
    // after it was made.
    let (parts, clock) = tokio::join!(
        replay(&etcd, &replayed, from, to),
        etcd.clock(fleet_prefix, from, to)
    );
    let (changes, through) = rows::merge(parts?, LIMIT, to);
    tracing::debug!(changes = changes.len(), from, to, elapsed = ?started.elapsed(), "history replayed");

    let mut rows = rows::build(&changes, prefixes);
    if let Some(service) = &args.service {
        let keep: Vec<bool> = changes
            .iter()
            .map(|c| rows::in_service(&c.key, service))
            .collect();
        let mut keep = keep.into_iter();
        rows.retain(|_| keep.next().unwrap_or(false));
    }
    let alive = leases_alive(&etcd, &rows::leases_in_doubt(&rows)).await;
    rows::settle(&mut rows, &alive);
    date(&mut rows, &clock);
    tracing::debug!(leases = alive.len(), elapsed = ?started.elapsed(), "history rows built");

    let header = Header {
        prefixes: replayed,
        service: args.service.clone(),
        from,
        to,
        oldest,
        through,
        limit: LIMIT,
        since,
        times_known: !clock.is_empty(),
    };
    let out = if args.json {
        output::json(&header, &rows).map_err(|e| Failure::Runtime(e.into()))?
    } else {
        output::text(&header, &rows)
    };
    write_stdout(out.as_bytes())
}

fn runtime(f: crate::etcd::Failure) -> Failure {
    Failure::Runtime(anyhow::anyhow!("history: {f}"))
}

/// `--since D`: the text as given and the duration.
fn parse_since(text: &str) -> Result<(String, Duration), Failure> {
    humantime::parse_duration(text)
        .map(|d| (text.to_owned(), d))
        .map_err(|e| {
            Failure::Usage(format!(
                "--since {text:?}: is not a duration ({e}) (fix: write a number with a unit, like \"1h\" or \"30m\")"
            ))
        })
}

/// The first revision after `record`, what the fleet had applied at `at`, or the oldest etcd
/// holds when no node had published an apply that old (said on stderr and in the header).
fn start_since(record: Option<Record>, at: SystemTime, text: &str, oldest: i64) -> (i64, Since) {
    let record = record.map(|r| (r.node, r.revision));
    let at = humantime::format_rfc3339_seconds(at).to_string();
    let from = match &record {
        Some((_, applied)) => (applied + 1).max(oldest),
        None => {
            tracing::warn!(
                since = text,
                oldest,
                "no node had published an apply that old: starting at the oldest revision etcd holds"
            );
            oldest
        }
    };
    let since = Since {
        duration: text.to_owned(),
        at,
        record,
    };
    (from, since)
}

/// Every change under each prefix from `from` to `to`, each prefix replayed at the same time.
async fn replay(
    etcd: &Etcd,
    prefixes: &[String],
    from: i64,
    to: i64,
) -> Result<Vec<Changes>, Failure> {
    let mut set = tokio::task::JoinSet::new();
    for (i, prefix) in prefixes.iter().enumerate() {
        let client = etcd.client.clone();
        let prefix = prefix.clone();
        let user = etcd.user().map(str::to_owned);
        set.spawn(async move {
            let read = history::changes(
                &client,
                prefix.as_bytes(),
                from,
                to,
                LIMIT + 1,
                user.as_deref(),
            )
            .await;
            (i, read)
        });
    }
    let mut parts: Vec<Changes> = (0..prefixes.len()).map(|_| Changes::default()).collect();
    while let Some(joined) = set.join_next().await {
        let (i, read) = joined.map_err(|e| Failure::Runtime(e.into()))?;
        parts[i] = read.map_err(runtime)?;
    }
    Ok(parts)
}

/// Whether etcd still knows each lease, for at most [`MAX_LEASE_LOOKUPS`] of them; a lease it
/// could not be asked about is left out (its removals stay "ended or deleted"), with a warning.
async fn leases_alive(etcd: &Etcd, leases: &[i64]) -> HashMap<i64, bool> {
    let mut alive = HashMap::new();
    if leases.len() > MAX_LEASE_LOOKUPS {
        tracing::warn!(
            leases = leases.len(),
            asked = MAX_LEASE_LOOKUPS,
            "too many leases to ask etcd about: the others' removals say \"ended or deleted\""
        );
    }
    let mut failed = None;
    for batch in leases[..leases.len().min(MAX_LEASE_LOOKUPS)].chunks(LEASE_LOOKUPS_AT_ONCE) {
        let mut set = tokio::task::JoinSet::new();
        for &lease in batch {
            let client = etcd.client.clone();
            let user = etcd.user().map(str::to_owned);
            set.spawn(async move {
                let answer = history::lease_alive(&client, lease, user.as_deref()).await;
                (lease, answer)
            });
        }
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((lease, Ok(is))) => {
                    alive.insert(lease, is);
                }
                Ok((_, Err(e))) => failed = Some(e.to_string()),
                Err(e) => failed = Some(e.to_string()),
            }
        }
    }
    if let Some(error) = failed {
        tracing::warn!(%error, "cannot ask etcd whether a lease is alive: its removals say \"ended or deleted\"");
    }
    alive
}

/// Dates every row through the fleet's clock (once per revision).
fn date(rows: &mut [rows::Row], clock: &Clock) {
    let mut known: HashMap<i64, Option<(String, SystemTime)>> = HashMap::new();
    for row in rows {
        row.time = known
            .entry(row.revision)
            .or_insert_with(|| {
                clock
                    .time_of(row.revision)
                    .map(|(r, at)| (r.node.clone(), at))
            })
            .clone();
    }
}
