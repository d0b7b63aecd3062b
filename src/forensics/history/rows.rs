//! From etcd's changes to the rows `history` prints: pure, no I/O.
//!
//! Every change is one [`Row`]: what the key is in the registry (an instance, a route, or some
//! other key under the watched prefixes), what happened (appeared, changed, re-put unchanged,
//! left), the values before and after as the registry reads them (never the raw bytes: values
//! are untrusted), and for a removal what removed it, as far as etcd's history can tell.
//!
//! **What removed a key.** etcd records a delete the same way whether a client deleted the key
//! or its lease ended (expired or revoked): one delete event, with the pair it removed. What the
//! history does tell is whether the lease was still alive after the removal. A lease's end
//! removes every key attached to it at one revision, so the lease outlived a removal at `R` when
//! a key was put with it at `R` or later, or a key still attached to it was changed or removed
//! after `R`; and it is alive when etcd still knows it now. Either way a client deleted the key.
//! Otherwise the lease is gone and nothing shows it outlived the removal: its end removed the
//! key, or a client deleted the key and the lease ended later. The row says exactly that, with
//! how many keys of the lease went at the same revision (several at once, with no other change
//! at that revision, is what a lease's end looks like; a client can do the same with one
//! transaction or a range delete). etcd never records whether a lease expired or was revoked.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use crate::etcd::history::{Change, Changes, Pair};
use crate::model::{
    self, InstanceValue, ROUTES_PREFIX, Route, SERVICES_PREFIX, Screened, is_instance_id,
    is_service_name,
};

/// What a key is in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Subject {
    /// `/services/<service>/<instance>`.
    Instance { service: String, instance: String },
    /// `/routes/<service>`.
    Route { service: String },
    /// Any other key under the watched prefixes (templates may read it with `getv`).
    Other,
}

/// A value as the registry reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Instance(InstanceValue),
    Route(Route),
    /// The value of a key that is neither an instance nor a route: only its size is shown.
    Opaque(usize),
    /// A value the screen or the typed parse refuses, with why (never the value).
    Unparsable(String),
}

/// What happened to a key at one revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Appeared,
    Changed,
    /// Put again with the same bytes.
    Unchanged,
    Left,
}

/// What removed a key, as far as etcd's history tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// The key had no lease: a client deleted it.
    Deleted,
    /// The key's lease outlived the removal (`now`: etcd still knows the lease): deleted.
    DeletedLeaseLived { now: bool },
    /// The lease is gone, and nothing shows it outlived the removal.
    LeaseEndedOrDeleted,
    /// etcd no longer holds what the key was (its history before is compacted).
    Unknown,
}

/// One change, ready to print.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    pub(crate) revision: i64,
    /// When a node first reported having applied this revision or a later one, and which.
    pub(crate) time: Option<(String, SystemTime)>,
    /// The key as shown: plain, or quoted and escaped when it is not.
    pub(crate) key: String,
    pub(crate) subject: Subject,
    pub(crate) kind: Kind,
    pub(crate) old: Option<Value>,
    pub(crate) new: Option<Value>,
    /// The key existed before the change, but etcd no longer holds what it was (compacted).
    pub(crate) old_compacted: bool,
    /// The lease of the pair written, or of the pair removed; 0 for none.
    pub(crate) lease: i64,
    /// On a put over an existing pair, that pair's lease; 0 for none.
    pub(crate) prev_lease: i64,
    pub(crate) removal: Option<Removal>,
    /// On a removal with a lease: how many keys of that lease were removed at this revision.
    pub(crate) lease_keys_removed: usize,
}

/// The keys of one service: its instances and its route.
pub(crate) fn in_service(key: &[u8], service: &str) -> bool {
    let instances = format!("{SERVICES_PREFIX}{service}/");
    key.starts_with(instances.as_bytes()) || key == format!("{ROUTES_PREFIX}{service}").as_bytes()
}

/// The prefixes to replay: the watched ones, without any that another one covers (so no change
/// is read twice); for one service, the parts of its keys the watched prefixes cover.
pub(crate) fn replayed_prefixes(watched: &[String], service: Option<&str>) -> Vec<String> {
    let wanted: Vec<String> = match service {
        None => watched.to_vec(),
        Some(s) => {
            let keys = [
                format!("{SERVICES_PREFIX}{s}/"),
                format!("{ROUTES_PREFIX}{s}"),
            ];
            let mut out = Vec::new();
            for k in keys {
                if watched.iter().any(|p| k.starts_with(p.as_str())) {
                    out.push(k);
                } else {
                    out.extend(watched.iter().filter(|p| p.starts_with(&k)).cloned());
                }
            }
            out
        }
    };
    let mut out: Vec<String> = Vec::new();
    for p in &wanted {
        let covered = wanted
            .iter()
            .any(|q| q != p && p.starts_with(q.as_str()) && q.len() < p.len());
        if !covered && !out.contains(p) {
            out.push(p.clone());
        }
    }
    out
}

/// The changes of several replays (of disjoint prefixes, each oldest first) in one timeline,
/// at most `limit` of them, and the last revision up to which it is complete: `to`, unless a
/// replay or the merge was truncated.
pub(crate) fn merge(parts: Vec<Changes>, limit: usize, to: i64) -> (Vec<Change>, i64) {
    let mut through = to;
    for part in &parts {
        if part.truncated {
            // The last revision of a truncated replay may be cut in the middle.
            let last = part.changes.last().map_or(0, |c| c.revision);
            through = through.min(last - 1);
        }
    }
    let mut all: Vec<Change> = parts.into_iter().flat_map(|p| p.changes).collect();
    all.sort_by_key(|c| c.revision);
    if all.len() > limit {
        through = through.min(all[limit].revision - 1);
    }
    all.retain(|c| c.revision <= through);
    all.truncate(limit);
    (all, through)
}

/// The last revision at which each lease is known to have been alive, from the changes: a put
/// with it at `R` (alive at `R`), or a change to a key attached to it at `R` (the key still
/// had it at `R - 1`).
fn lease_alive_through(changes: &[Change]) -> HashMap<i64, i64> {
    let mut through: HashMap<i64, i64> = HashMap::new();
    let mut note = |lease: i64, revision: i64| {
        if lease != 0 {
            let at = through.entry(lease).or_insert(revision);
            *at = (*at).max(revision);
        }
    };
    for c in changes {
        if let Some(put) = &c.put {
            note(put.lease, c.revision);
        }
        if let Some(prev) = &c.prev {
            note(prev.lease, c.revision - 1);
        }
    }
    through
}

/// One row per change, in order; `prefixes` are the watched ones (for the screen). Removals
/// whose lease may have ended are [`Removal::LeaseEndedOrDeleted`] until [`settle`] learns
/// which leases etcd still knows.
pub(crate) fn build(changes: &[Change], prefixes: &[String]) -> Vec<Row> {
    let alive_through = lease_alive_through(changes);
    let mut removed_together: HashMap<(i64, i64), usize> = HashMap::new();
    for c in changes.iter().filter(|c| c.put.is_none()) {
        if let Some(prev) = c.prev.as_ref().filter(|p| p.lease != 0) {
            *removed_together
                .entry((c.revision, prev.lease))
                .or_default() += 1;
        }
    }
    changes
        .iter()
        .map(|c| {
            let subject = subject(&c.key);
            let read = |p: &Pair| value(&subject, prefixes, &p.key, &p.value);
            let mut row = Row {
                revision: c.revision,
                time: None,
                key: shown_key(&c.key, prefixes),
                subject: subject.clone(),
                kind: Kind::Appeared,
                old: c.prev.as_ref().map(read),
                new: c.put.as_ref().map(read),
                old_compacted: false,
                lease: 0,
                prev_lease: 0,
                removal: None,
                lease_keys_removed: 0,
            };
            match (&c.put, &c.prev) {
                (Some(put), prev) => {
                    row.lease = put.lease;
                    row.prev_lease = prev.as_ref().map_or(0, |p| p.lease);
                    // etcd gives no previous pair for a put over a version it has compacted.
                    row.old_compacted = prev.is_none() && put.create_revision < put.mod_revision;
                    row.kind = match prev {
                        Some(p) if p.value == put.value => Kind::Unchanged,
                        Some(_) => Kind::Changed,
                        None if row.old_compacted => Kind::Changed,
                        None => Kind::Appeared,
                    };
                }
                (None, Some(prev)) => {
                    row.kind = Kind::Left;
                    row.lease = prev.lease;
                    row.removal = Some(if prev.lease == 0 {
                        Removal::Deleted
                    } else if alive_through
                        .get(&prev.lease)
                        .is_some_and(|&r| r >= c.revision)
                    {
                        Removal::DeletedLeaseLived { now: false }
                    } else {
                        Removal::LeaseEndedOrDeleted
                    });
                    row.lease_keys_removed = removed_together
                        .get(&(c.revision, prev.lease))
                        .copied()
                        .unwrap_or(0);
                }
                (None, None) => {
                    row.kind = Kind::Left;
                    row.old_compacted = true;
                    row.removal = Some(Removal::Unknown);
                }
            }
            row
        })
        .collect()
}

/// The leases whose end may have removed a key: the ones to ask etcd about.
pub(crate) fn leases_in_doubt(rows: &[Row]) -> Vec<i64> {
    let mut leases: Vec<i64> = rows
        .iter()
        .filter(|r| r.removal == Some(Removal::LeaseEndedOrDeleted))
        .map(|r| r.lease)
        .collect();
    leases.sort_unstable();
    leases.dedup();
    leases
}

/// Settles the removals whose lease etcd still knows (`alive_now[lease]`): deleted.
pub(crate) fn settle(rows: &mut [Row], alive_now: &HashMap<i64, bool>) {
    for row in rows {
        if row.removal == Some(Removal::LeaseEndedOrDeleted)
            && alive_now.get(&row.lease).copied().unwrap_or(false)
        {
            row.removal = Some(Removal::DeletedLeaseLived { now: true });
        }
    }
}

/// What a key is: an instance or route key of a valid shape, or any other key.
fn subject(key: &[u8]) -> Subject {
    let Ok(key) = std::str::from_utf8(key) else {
        return Subject::Other;
    };
    if let Some(rest) = key.strip_prefix(SERVICES_PREFIX)
        && let Some((service, instance)) = rest.split_once('/')
        && is_service_name(service)
        && is_instance_id(instance)
    {
        return Subject::Instance {
            service: service.to_owned(),
            instance: instance.to_owned(),
        };
    }
    match key.strip_prefix(ROUTES_PREFIX) {
        Some(service) if is_service_name(service) => Subject::Route {
            service: service.to_owned(),
        },
        _ => Subject::Other,
    }
}

/// A key as shown: itself when the screen passes it, else quoted and escaped.
fn shown_key(key: &[u8], prefixes: &[String]) -> String {
    match model::screen_pair(prefixes, key, b"") {
        Screened::Pass(key, _) => key,
        _ => model::display_key(key),
    }
}

/// A value as the registry reads it: through the screen, then the typed parse.
fn value(subject: &Subject, prefixes: &[String], key: &[u8], raw: &[u8]) -> Value {
    if matches!(subject, Subject::Other) {
        return Value::Opaque(raw.len());
    }
    let text = match model::screen_pair(prefixes, key, raw) {
        Screened::Pass(_, text) => text,
        Screened::Reject(r) => return Value::Unparsable(r.reason),
        // A key outside the watched prefixes is never replayed.
        Screened::Outside => return Value::Opaque(raw.len()),
    };
    let parsed = match subject {
        Subject::Route { .. } => Route::parse(&text).map(Value::Route),
        _ => InstanceValue::parse(&text).map(Value::Instance),
    };
    parsed.unwrap_or_else(Value::Unparsable)
}

/// The meta names whose values differ between two instances.
pub(crate) fn meta_changes(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut names: Vec<String> = old
        .keys()
        .chain(new.keys())
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    names
}
