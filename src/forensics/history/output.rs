//! `history`'s output: the text timeline and the JSON document. Pure: rows and a header in,
//! bytes out.

use serde::Serialize;
use serde_json::json;

use super::rows::{Kind, Removal, Row, Subject, Value, meta_changes};

/// What the timeline covers, for its header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Header {
    /// The prefixes replayed (or the service's keys).
    pub(crate) prefixes: Vec<String>,
    pub(crate) service: Option<String>,
    /// The first revision replayed.
    pub(crate) from: i64,
    /// The last revision replayed (etcd's current revision when the command started).
    pub(crate) to: i64,
    /// The oldest revision etcd still holds.
    pub(crate) oldest: i64,
    /// The last revision up to which the timeline is complete: `to` unless truncated.
    pub(crate) through: i64,
    /// The most changes shown.
    pub(crate) limit: usize,
    /// How `--since` found `from`, when given.
    pub(crate) since: Option<Since>,
    /// Whether any node published its applies in the range (else every time is unknown).
    pub(crate) times_known: bool,
}

/// `--since D`: the time it names, and the fleet record `from` comes from (none: no node had
/// published an apply that old, so `from` is the oldest revision).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Since {
    pub(crate) duration: String,
    pub(crate) at: String,
    /// The node and the revision it had applied by then.
    pub(crate) record: Option<(String, i64)>,
}

impl Header {
    fn compacted_before(&self) -> Option<i64> {
        (self.oldest > 1).then_some(self.oldest)
    }

    fn truncated(&self) -> bool {
        self.through < self.to
    }

    /// The header lines of the text output, each starting with "# ".
    fn lines(&self) -> Vec<String> {
        let what = match &self.service {
            Some(s) => format!("service {s} ({})", self.prefixes.join(", ")),
            None => self.prefixes.join(", "),
        };
        let mut lines = Vec::new();
        let start = if self.from > self.oldest {
            format!("from revision {}", self.from)
        } else if self.compacted_before().is_some() {
            format!(
                "from revision {}, the oldest etcd still holds (compacted before)",
                self.from
            )
        } else {
            format!(
                "from revision {}, etcd's first (nothing compacted)",
                self.from
            )
        };
        lines.push(format!("history of {what}: {start}, to {}", self.to));
        if let Some(s) = &self.since {
            lines.push(match &s.record {
                Some((node, rev)) => format!(
                    "since {} ({}): {node} had applied revision {rev} by then",
                    s.duration, s.at
                ),
                None => format!(
                    "since {} ({}): no node had published an apply that old, so from the oldest revision etcd holds",
                    s.duration, s.at
                ),
            });
        }
        if self.truncated() {
            lines.push(format!(
                "truncated at {} changes: complete through revision {} (narrow with --from, --since or --service)",
                self.limit, self.through
            ));
        }
        lines.push(if self.times_known {
            "TIME: when a node first reported having applied this revision or a later one (etcd stamps no times); - when none has".into()
        } else {
            "TIME: unknown (-): no node published its applies in this range (etcd stamps no times)"
                .into()
        });
        lines
    }
}

/// The text timeline: the header, then one aligned row per change.
pub(crate) fn text(header: &Header, rows: &[Row]) -> String {
    let mut out = String::new();
    for line in header.lines() {
        out.push_str("# ");
        out.push_str(&line);
        out.push('\n');
    }
    if rows.is_empty() {
        out.push_str("# no changes\n");
        return out;
    }
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            let time = r.time.as_ref().map_or("-".into(), |(_, t)| {
                humantime::format_rfc3339_seconds(*t).to_string()
            });
            [time, r.revision.to_string(), r.key.clone(), what(r)]
        })
        .collect();
    let titles = ["TIME", "REV", "KEY", "CHANGE"];
    let width = |i: usize| {
        cells
            .iter()
            .map(|c| c[i].chars().count())
            .chain([titles[i].len()])
            .max()
            .unwrap_or(0)
    };
    let widths = [width(0), width(1), width(2)];
    let mut line = |c: [&str; 4]| {
        out.push_str(&format!(
            "{:<w0$}  {:>w1$}  {:<w2$}  {}\n",
            c[0],
            c[1],
            c[2],
            c[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        ));
    };
    line(titles);
    for c in &cells {
        line([&c[0], &c[1], &c[2], &c[3]]);
    }
    out
}

/// A lease id as etcdctl shows it.
fn lease_id(lease: i64) -> String {
    format!("{lease:x}")
}

/// What happened, in words: the CHANGE column.
pub(crate) fn what(r: &Row) -> String {
    let noun = match r.subject {
        Subject::Instance { .. } => "",
        Subject::Route { .. } => "route ",
        Subject::Other => "key ",
    };
    let mut text = match r.kind {
        Kind::Appeared => match &r.new {
            Some(v) => format!("{noun}appeared {}", describe(v)),
            None => format!("{noun}appeared"),
        },
        Kind::Unchanged => format!("{noun}re-put, unchanged"),
        Kind::Changed => match (&r.old, &r.new) {
            (Some(old), Some(new)) => format!("{noun}changed {}", difference(old, new)),
            (_, Some(new)) => format!(
                "{noun}changed to {} (the value before is compacted away)",
                describe(new)
            ),
            _ => format!("{noun}changed"),
        },
        Kind::Left => format!("{noun}left ({})", removal(r)),
    };
    // The lease: the new pair's, and what it was before when that is known.
    let only_new = r.kind == Kind::Appeared || r.old_compacted;
    match (r.kind, r.prev_lease, r.lease) {
        (Kind::Left, _, _) => {}
        (_, _, 0) if only_new => {}
        (_, _, b) if only_new => text.push_str(&format!(", lease {}", lease_id(b))),
        (_, a, b) if a == b => {}
        (_, 0, b) => text.push_str(&format!(", lease none → {}", lease_id(b))),
        (_, a, 0) => text.push_str(&format!(", lease {} → none", lease_id(a))),
        (_, a, b) => text.push_str(&format!(", lease {} → {}", lease_id(a), lease_id(b))),
    }
    text
}

/// Why a key left, in words.
fn removal(r: &Row) -> String {
    let lease = lease_id(r.lease);
    match r.removal {
        Some(Removal::Deleted) => "deleted".into(),
        Some(Removal::DeletedLeaseLived { now: true }) => {
            format!("deleted; its lease {lease} is still alive")
        }
        Some(Removal::DeletedLeaseLived { now: false }) => {
            format!("deleted; its lease {lease} lived on")
        }
        Some(Removal::LeaseEndedOrDeleted) if r.lease_keys_removed > 1 => format!(
            "lease {lease} ended (expired or revoked) or deleted; {} of its keys left at this revision",
            r.lease_keys_removed
        ),
        Some(Removal::LeaseEndedOrDeleted) => {
            format!("lease {lease} ended (expired or revoked) or deleted")
        }
        Some(Removal::Unknown) | None => "cause unknown: what it held is compacted away".into(),
    }
}

/// A value in a few words.
fn describe(v: &Value) -> String {
    match v {
        Value::Instance(i) => format!("{} w={} {}", i.addr, i.weight, i.state.as_str()),
        Value::Route(r) => {
            let mut parts = Vec::new();
            if !r.hosts.is_empty() {
                parts.push(format!("hosts={}", r.hosts.join(",")));
            }
            if !r.paths.is_empty() {
                parts.push(format!("paths={}", r.paths.join(",")));
            }
            parts.push(format!("balance={}", r.balance));
            if let Some(c) = &r.check {
                parts.push(format!("check={c}"));
            }
            parts.join(" ")
        }
        Value::Opaque(n) => format!("({n} bytes)"),
        Value::Unparsable(why) => format!("unparsable value ({why})"),
    }
}

/// What differs between two values: only what changed.
fn difference(old: &Value, new: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            parts.push(match name {
                "" => format!("{a} → {b}"),
                _ => format!("{name} {a} → {b}"),
            });
        }
    };
    match (old, new) {
        (Value::Instance(a), Value::Instance(b)) => {
            field("", a.addr.to_string(), b.addr.to_string());
            field("weight", a.weight.to_string(), b.weight.to_string());
            field("state", a.state.as_str().into(), b.state.as_str().into());
            let meta = meta_changes(&a.meta, &b.meta);
            if !meta.is_empty() {
                parts.push(format!("meta {}", meta.join(", ")));
            }
        }
        (Value::Route(a), Value::Route(b)) => {
            field("hosts", list(&a.hosts), list(&b.hosts));
            field("paths", list(&a.paths), list(&b.paths));
            field("balance", a.balance.clone(), b.balance.clone());
            let check = |c: &Option<String>| c.clone().unwrap_or_else(|| "none".into());
            field("check", check(&a.check), check(&b.check));
        }
        (Value::Opaque(a), Value::Opaque(b)) => {
            parts.push(format!("({a} → {b} bytes)"));
        }
        (a, b) => parts.push(format!("{} → {}", describe(a), describe(b))),
    }
    if parts.is_empty() {
        "(written differently, same meaning)".into()
    } else {
        parts.join(", ")
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(",")
    }
}

/// The JSON document: the range, then every change.
#[derive(Serialize)]
struct Document<'a> {
    from: i64,
    to: i64,
    oldest: i64,
    compacted_before: Option<i64>,
    truncated: bool,
    complete_through: i64,
    service: Option<&'a str>,
    prefixes: &'a [String],
    since: Option<serde_json::Value>,
    times_known: bool,
    changes: Vec<ChangeJson<'a>>,
}

/// `--json`: one object, the range and `changes`, an array of one object per change.
pub(crate) fn json(header: &Header, rows: &[Row]) -> Result<String, serde_json::Error> {
    let doc = Document {
        from: header.from,
        to: header.to,
        oldest: header.oldest,
        compacted_before: header.compacted_before(),
        truncated: header.truncated(),
        complete_through: header.through,
        service: header.service.as_deref(),
        prefixes: &header.prefixes,
        since: header.since.as_ref().map(|s| {
            json!({
                "duration": s.duration,
                "at": s.at,
                "node": s.record.as_ref().map(|r| &r.0),
                "applied": s.record.as_ref().map(|r| r.1),
            })
        }),
        times_known: header.times_known,
        changes: rows.iter().map(change).collect(),
    };
    let mut text = serde_json::to_string_pretty(&doc)?;
    text.push('\n');
    Ok(text)
}

/// One change in the JSON document, its fields in this order, every one always present.
#[derive(Serialize)]
struct ChangeJson<'a> {
    revision: i64,
    time: Option<String>,
    time_node: Option<&'a str>,
    key: &'a str,
    service: Option<&'a str>,
    instance: Option<&'a str>,
    kind: String,
    old: Option<ValueJson<'a>>,
    new: Option<ValueJson<'a>>,
    old_compacted: bool,
    removed_by: Option<&'static str>,
    lease: Option<String>,
    prev_lease: Option<String>,
    lease_keys_removed: Option<usize>,
}

fn change(r: &Row) -> ChangeJson<'_> {
    let (service, instance) = match &r.subject {
        Subject::Instance { service, instance } => {
            (Some(service.as_str()), Some(instance.as_str()))
        }
        Subject::Route { service } => (Some(service.as_str()), None),
        Subject::Other => (None, None),
    };
    let kind = match r.kind {
        Kind::Appeared => "appeared",
        Kind::Changed => "changed",
        Kind::Unchanged => "unchanged",
        Kind::Left => "left",
    };
    let kind = match r.subject {
        Subject::Instance { .. } => kind.to_owned(),
        Subject::Route { .. } => format!("route_{kind}"),
        Subject::Other => format!("key_{kind}"),
    };
    let removed_by = r.removal.map(|m| match m {
        Removal::Deleted => "delete",
        Removal::DeletedLeaseLived { now: true } => "delete_lease_alive",
        Removal::DeletedLeaseLived { now: false } => "delete_lease_lived_on",
        Removal::LeaseEndedOrDeleted => "lease_end_or_delete",
        Removal::Unknown => "unknown",
    });
    let lease = |l: i64| (l != 0).then(|| lease_id(l));
    ChangeJson {
        revision: r.revision,
        time: r
            .time
            .as_ref()
            .map(|(_, t)| humantime::format_rfc3339_seconds(*t).to_string()),
        time_node: r.time.as_ref().map(|(n, _)| n.as_str()),
        key: &r.key,
        service,
        instance,
        kind,
        old: r.old.as_ref().map(value),
        new: r.new.as_ref().map(value),
        old_compacted: r.old_compacted,
        removed_by,
        lease: lease(r.lease),
        prev_lease: lease(r.prev_lease),
        lease_keys_removed: (r.removal.is_some() && r.lease != 0).then_some(r.lease_keys_removed),
    }
}

/// A value in the JSON document: an instance, a route, another key's size, or why it does not
/// parse.
#[derive(Serialize)]
#[serde(untagged)]
enum ValueJson<'a> {
    Instance {
        addr: String,
        weight: u16,
        state: &'static str,
        meta: &'a std::collections::BTreeMap<String, String>,
    },
    Route {
        hosts: &'a [String],
        paths: &'a [String],
        balance: &'a str,
        check: Option<&'a str>,
    },
    Opaque {
        bytes: usize,
    },
    Unparsable {
        unparsable: &'a str,
    },
}

fn value(v: &Value) -> ValueJson<'_> {
    match v {
        Value::Instance(i) => ValueJson::Instance {
            addr: i.addr.to_string(),
            weight: i.weight,
            state: i.state.as_str(),
            meta: &i.meta,
        },
        Value::Route(r) => ValueJson::Route {
            hosts: &r.hosts,
            paths: &r.paths,
            balance: &r.balance,
            check: r.check.as_deref(),
        },
        Value::Opaque(n) => ValueJson::Opaque { bytes: *n },
        Value::Unparsable(why) => ValueJson::Unparsable { unparsable: why },
    }
}
