//! `render --print --revision|--at`, `render --diff --from [--to]` and `render --explain`:
//! the registry read at a point in etcd's history (or now) and rendered exactly as a live
//! render would be (the same templates, screen, parse and fresh server slots), with nothing
//! written and nothing reloaded.

use std::time::SystemTime;

use super::explain::{self, Explanation, Inputs};
use super::{Clock, Etcd};
use crate::cli::RenderArgs;
use crate::config::{Config, ConfigSource, SourceKind};
use crate::etcd::GetOptions;
use crate::failure::{Failure, write_stdout};
use crate::fleet::NodeState;
use crate::model::Registry;
use crate::render::{self, Rendered, Templates};
use crate::slots::Slots;
use crate::source::etcd::{KeyRevisions, PastRead, read_at};
use crate::source::{self, Update};

/// A point in etcd's history as the operator wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    Revision(i64),
    /// What the fleet had applied at this time.
    Time(SystemTime),
    Now,
}

impl Point {
    /// A revision (a positive integer) or an RFC 3339 time, given to `flag`.
    pub fn parse(text: &str, flag: &str) -> Result<Point, Failure> {
        if let Ok(n) = text.parse::<i64>() {
            if n <= 0 {
                return Err(Failure::Usage(format!(
                    "{flag} {n}: etcd revisions start at 1 (fix: give a revision from `haconfd history`, or a time)"
                )));
            }
            return Ok(Point::Revision(n));
        }
        humantime::parse_rfc3339_weak(text)
            .map(Point::Time)
            .map_err(|e| {
                Failure::Usage(format!(
                    "{flag} {text:?}: neither a revision nor a time ({e}) (fix: write a revision like 1234, or a UTC time like 2026-12-04T03:00:00Z)"
                ))
            })
    }
}

fn runtime(e: impl Into<anyhow::Error>) -> Failure {
    Failure::Runtime(e.into())
}

/// Where `point` is in etcd's history: its revision. A time is looked up in the fleet's
/// published applies ([`Clock::revision_at_time`]).
async fn resolve(point: Point, etcd: &Etcd, fleet_prefix: &str, now: i64) -> Result<i64, Failure> {
    let t = match point {
        Point::Revision(r) => return Ok(r),
        Point::Now => return Ok(now),
        Point::Time(t) => t,
    };
    let found = Clock::revision_at_time(&etcd.client, fleet_prefix, t, etcd.user())
        .await
        .map_err(|f| runtime(anyhow::anyhow!("etcd: {f}")))?;
    let Some(record) = found else {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "{}: no node had published an apply by then, in the history etcd still holds ([fleet] publish, and compaction, bound what a time can find) (fix: give a revision instead; `haconfd history` lists them)",
            humantime::format_rfc3339_seconds(t)
        )));
    };
    tracing::info!(
        at = %humantime::format_rfc3339_seconds(t),
        revision = record.revision,
        node = %record.node,
        applied_at = %humantime::format_rfc3339_seconds(record.at),
        "the fleet had applied this revision by then"
    );
    Ok(record.revision)
}

/// How a revision is labelled in a diff header.
fn label(revision: i64, clock: &Clock, now: i64) -> String {
    if revision == now {
        format!("revision {revision} (now)")
    } else {
        format!("revision {revision} ({})", clock.describe(revision))
    }
}

/// Reads the registry at `revision` (0: now).
async fn read(config: &Config, revision: i64) -> Result<PastRead, Failure> {
    match &config.source.kind {
        SourceKind::Etcd(etcd) => read_at(etcd, &config.source.prefixes, revision)
            .await
            .map_err(runtime),
        SourceKind::File(_) => Ok(PastRead {
            update: source::read_once(config, 1).await.map_err(runtime)?,
            revisions: KeyRevisions::new(),
        }),
    }
}

/// Parses and renders an update the way `render --print` does: unguarded, fresh slots. The
/// registry and the keys the parse left out come back too, for `--explain`.
fn render_update(
    templates: &mut Templates,
    update: &Update,
) -> Result<(Vec<Rendered>, Registry, Vec<crate::model::Rejection>), Failure> {
    let (mut registry, parsed_out) = Registry::parse(&update.snapshot);
    Slots::default().assign(&mut registry, templates.spare_slots(), true);
    let rendered = templates
        .render_all(&update.snapshot, &registry)
        .map_err(runtime)?;
    Ok((rendered, registry, parsed_out))
}

/// `render` with `--revision`, `--at`, `--from` or `--explain`.
pub async fn command(cs: &ConfigSource, args: &RenderArgs) -> Result<(), Failure> {
    let past = args.revision.is_some() || args.at.is_some();
    if past && !(args.print || args.explain) {
        return Err(Failure::Usage(if args.diff {
            "--revision and --at go with --print or --explain; a diff of two points takes --from REV [--to REV]".into()
        } else {
            "--revision and --at only read the past (add --print or --explain): a one-shot render installs the present".into()
        }));
    }
    let config = cs.load()?;
    let mut templates = Templates::load(&config).map_err(runtime)?;
    if let Some(from) = &args.from {
        let from = Point::parse(from, "--from")?;
        let to = match &args.to {
            Some(t) => Point::parse(t, "--to")?,
            None => Point::Now,
        };
        let etcd = Etcd::connect(&config, "--from").await?;
        return diff(&config, &mut templates, &etcd, (from, to), args).await;
    }
    let revision = match (args.revision, &args.at) {
        (Some(r), _) => {
            super::etcd_config(&config, "--revision")?;
            if r <= 0 {
                return Err(Failure::Usage(format!(
                    "--revision {r}: etcd revisions start at 1 (fix: give a revision from `haconfd history`)"
                )));
            }
            r
        }
        (None, Some(at)) => {
            let Point::Time(t) = Point::parse(at, "--at")? else {
                return Err(Failure::Usage(format!(
                    "--at {at:?}: not a time (fix: a UTC time like 2026-12-04T03:00:00Z; a revision goes to --revision)"
                )));
            };
            let etcd = Etcd::connect(&config, "--at").await?;
            let now = etcd.now().await?;
            resolve(Point::Time(t), &etcd, &config.fleet.prefix, now).await?
        }
        // Now.
        (None, None) => 0,
    };
    let read = read(&config, revision).await?;
    if args.explain {
        let node = match revision {
            0 => node_state(&config).await,
            _ => None,
        };
        return explain_command(&config, &mut templates, read, node.as_ref(), args);
    }
    let (rendered, _, parsed_out) = render_update(&mut templates, &read.update)?;
    log_left_out(&read.update, &parsed_out);
    let chosen = render::choose(&rendered, &config, args.template.as_deref(), true)
        .map_err(Failure::Usage)?;
    for r in chosen {
        write_stdout(&r.bytes)?;
    }
    Ok(())
}

/// The keys left out, by key only, on stderr (as a live render logs them).
fn log_left_out(update: &Update, parsed_out: &[crate::model::Rejection]) {
    for r in update.rejected.iter().chain(parsed_out) {
        tracing::warn!(key = %r.key, reason = %r.reason, "key left out");
    }
}

/// `render --diff --from A [--to B]`: a unified diff of the renders at two points.
async fn diff(
    config: &Config,
    templates: &mut Templates,
    etcd: &Etcd,
    (from, to): (Point, Point),
    args: &RenderArgs,
) -> Result<(), Failure> {
    let now = etcd.now().await?;
    let a = resolve(from, etcd, &config.fleet.prefix, now).await?;
    let b = resolve(to, etcd, &config.fleet.prefix, now).await?;
    // The headers' times: the fleet's applies from the older point on.
    let clock = etcd.clock(&config.fleet.prefix, a.min(b), now).await;
    let (a_label, b_label) = (label(a, &clock, now), label(b, &clock, now));
    let old = read(config, a).await?;
    let new = read(config, if b == now { 0 } else { b }).await?;
    let (old_rendered, _, _) = render_update(templates, &old.update)?;
    let (new_rendered, _, parsed_out) = render_update(templates, &new.update)?;
    log_left_out(&new.update, &parsed_out);
    let chosen = render::choose(&new_rendered, config, args.template.as_deref(), false)
        .map_err(Failure::Usage)?;
    for r in chosen {
        let before = old_rendered
            .iter()
            .find(|o| o.template.name == r.template.name)
            .map(|o| String::from_utf8_lossy(&o.bytes).into_owned())
            .unwrap_or_default();
        let after = String::from_utf8_lossy(&r.bytes);
        let dest = r.template.dest.display().to_string();
        let text = similar::TextDiff::from_lines(before.as_str(), after.as_ref())
            .unified_diff()
            .context_radius(3)
            .header(
                &format!("{dest} @ {a_label}"),
                &format!("{dest} @ {b_label}"),
            )
            .to_string();
        write_stdout(text.as_bytes())?;
    }
    Ok(())
}

/// This node's published state ([fleet] in the config), for what its guard and isolation hold;
/// None when it publishes none or etcd does not answer (the explanation says so).
async fn node_state(config: &Config) -> Option<NodeState> {
    let SourceKind::Etcd(etcd) = &config.source.kind else {
        return None;
    };
    if !config.fleet.publish {
        return None;
    }
    let key = format!("{}{}", config.fleet.prefix, config.fleet.node);
    let got = async {
        let mut kv = Etcd::connect_to(etcd).await.ok()?.client.kv_client();
        let resp = kv.get(key.clone(), None::<GetOptions>).await.ok()?;
        let item = resp.kvs().first()?;
        serde_json::from_slice::<NodeState>(item.value()).ok()
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), got)
        .await
        .ok()
        .flatten()
}

/// `render --explain [--json]` of one read.
fn explain_command(
    config: &Config,
    templates: &mut Templates,
    read: PastRead,
    node: Option<&NodeState>,
    args: &RenderArgs,
) -> Result<(), Failure> {
    let (rendered, registry, parsed_out) = render_update(templates, &read.update)?;
    let chosen = render::choose(&rendered, config, args.template.as_deref(), true)
        .map_err(Failure::Usage)?;
    // What this explanation cannot know about the node's guard and isolation, if anything.
    let past = args.revision.is_some() || args.at.is_some();
    let note = match (&config.source.kind, node) {
        (SourceKind::File(_), _) => Some(
            "the file source: what the guard or haproxy -c hold back on a running node is in its log and /metrics".to_owned(),
        ),
        _ if past => Some(
            "a past revision: what the guard or haproxy -c held back then is not recorded".to_owned(),
        ),
        (_, None) => Some(format!(
            "node {:?} publishes no state ([fleet] publish, or etcd did not answer): what its guard or haproxy -c hold back is unknown here",
            config.fleet.node
        )),
        _ => None,
    };
    for r in chosen {
        let text = String::from_utf8_lossy(&r.bytes);
        let dest = r.template.dest.display().to_string();
        let mut explanation: Explanation = explain::explain(&Inputs {
            template: &r.template.name,
            dest: &dest,
            text: &text,
            snapshot: &read.update.snapshot,
            registry: &registry,
            revisions: &read.revisions,
            screened_out: &read.update.rejected,
            parsed_out: &parsed_out,
            node,
        });
        explanation.notes.extend(note.clone());
        let out = if args.json {
            explanation.json()
        } else {
            explanation.text()
        };
        write_stdout(out.as_bytes())?;
    }
    Ok(())
}
