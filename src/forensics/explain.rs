//! `render --explain`: every rendered line with the keys it came from, and every key that
//! renders no line with the reason.
//!
//! In: one render's text, the registry it was rendered from (server slots assigned), each key's
//! revisions, the keys the screen and the registry parse left out, and what this node publishes
//! about its guard and isolation. Out: an [`Explanation`], printed as annotated text or JSON.
//!
//! A line belongs to a service when it lies in that service's backend, or when it names the
//! backend (`use_backend be_api`, `acl host_be_api …`, a host map's `api.example.com be_api`).
//! A `server` line in a backend came from its instance's key; free slots came from no key. Any
//! other line of a service came from its route key when it has one (balance, checks, hosts and
//! paths are the route's), else from the service's existence. Lines a custom template builds
//! from `getv` or `gets` carry no key: the template, not the registry's structure, decides
//! where those values go.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use crate::fleet::NodeState;
use crate::model::{ROUTES_PREFIX, Registry, Rejection, SERVICES_PREFIX, Service, Snapshot};
use crate::source::etcd::KeyRevisions;

/// One key a line came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRef {
    pub key: String,
    /// The revision that last wrote the key (unknown for the file source).
    pub mod_revision: Option<i64>,
    /// The revision that created it (unknown for the file source).
    pub create_revision: Option<i64>,
}

/// One rendered line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Line {
    /// 1-based.
    pub line: usize,
    pub text: String,
    /// The service the line belongs to, if any.
    pub service: Option<String>,
    /// The keys it came from (none: the template's own text, or a free server slot).
    pub keys: Vec<KeyRef>,
    /// What else is known: "spare slot", or why a service line has no key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<&'static str>,
}

/// One key that renders no line here, or whose line is not what runs on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeftOut {
    pub key: String,
    /// Who left it out: "screen", "registry", "template", "guard" or "haproxy -c".
    pub by: &'static str,
    pub reason: String,
}

/// The whole explanation of one template's render.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub template: String,
    pub dest: String,
    /// The etcd revision rendered (the file source's read counter).
    pub revision: i64,
    pub lines: Vec<Line>,
    pub left_out: Vec<LeftOut>,
    /// What the explanation cannot know, or what the operator should know besides.
    pub notes: Vec<String>,
}

/// What the render's inputs were, for [`explain`].
pub struct Inputs<'a> {
    pub template: &'a str,
    pub dest: &'a str,
    pub text: &'a str,
    pub snapshot: &'a Snapshot,
    pub registry: &'a Registry,
    pub revisions: &'a KeyRevisions,
    pub screened_out: &'a [Rejection],
    pub parsed_out: &'a [Rejection],
    /// This node's published state, when explaining now; with its name.
    pub node: Option<&'a NodeState>,
}

fn key_ref(key: String, revisions: &KeyRevisions) -> KeyRef {
    let r = revisions.get(&key);
    KeyRef {
        mod_revision: r.map(|r| r.mod_revision),
        create_revision: r.map(|r| r.create_revision),
        key,
    }
}

/// The service a token names: its backend, or an ACL built on it (`host_be_api`).
fn named<'a>(token: &str, by_backend: &HashMap<&str, &'a Service>) -> Option<&'a Service> {
    if let Some(s) = by_backend.get(token) {
        return Some(s);
    }
    token
        .match_indices('_')
        .find_map(|(i, _)| by_backend.get(&token[i + 1..]).copied())
}

/// A key as a rejection shows it (quoted and escaped), unquoted when nothing in it needed an
/// escape: the form the rest of the explanation uses.
fn plain(shown: &str) -> String {
    match shown.strip_prefix('"').and_then(|k| k.strip_suffix('"')) {
        Some(inner) if !inner.contains('\\') && !inner.contains('"') && !inner.ends_with('…') => {
            inner.to_owned()
        }
        _ => shown.to_owned(),
    }
}

/// Explains one render.
pub fn explain(input: &Inputs<'_>) -> Explanation {
    let services = &input.registry.services;
    let by_backend: HashMap<&str, &Service> = services
        .iter()
        .map(|s| (s.backend.as_str(), &**s))
        .collect();
    let mut lines = Vec::new();
    let mut used: BTreeSet<String> = BTreeSet::new();
    // The service whose backend section the current line is in.
    let mut section: Option<&Service> = None;
    for (i, text) in input.text.lines().enumerate() {
        let starts_section = text.starts_with(|c: char| !c.is_whitespace() && c != '#');
        let mut words = text.split_whitespace();
        let (first, second) = (words.next(), words.next());
        if starts_section {
            section = match (first, second) {
                (Some("backend" | "listen"), Some(name)) => by_backend.get(name).copied(),
                _ => None,
            };
        }
        let (owner, in_section) = match section {
            _ if text.trim().is_empty() => (None, false),
            Some(s) => (Some(s), true),
            None => {
                // A line outside a backend may be about one service only.
                let mut about = text
                    .split_whitespace()
                    .filter_map(|t| named(t, &by_backend));
                match (about.next(), about.next()) {
                    (Some(s), None) => (Some(s), false),
                    (Some(s), Some(t)) if s.name == t.name => (Some(s), false),
                    _ => (None, false),
                }
            }
        };
        let mut line = Line {
            line: i + 1,
            text: text.to_owned(),
            service: owner.map(|s| s.name.clone()),
            keys: Vec::new(),
            note: None,
        };
        if let Some(s) = owner {
            let server = (in_section && first == Some("server"))
                .then_some(second)
                .flatten();
            match server.and_then(|name| s.slots.iter().find(|slot| slot.name == name)) {
                Some(slot) => match slot.instance.and_then(|i| s.instances.get(i)) {
                    Some(inst) => {
                        let key = format!("{SERVICES_PREFIX}{}/{}", s.name, inst.id);
                        used.insert(key.clone());
                        line.keys.push(key_ref(key, input.revisions));
                    }
                    None => line.note = Some("a spare slot: no instance"),
                },
                None if s.route.is_some() => {
                    let key = format!("{ROUTES_PREFIX}{}", s.name);
                    used.insert(key.clone());
                    line.keys.push(key_ref(key, input.revisions));
                }
                None => line.note = Some("the service's instances (it has no route)"),
            }
        }
        lines.push(line);
    }
    let mut left_out: BTreeMap<String, LeftOut> = BTreeMap::new();
    for (by, list) in [
        ("screen", input.screened_out),
        ("registry", input.parsed_out),
    ] {
        for r in list {
            let key = plain(&r.key);
            left_out.insert(
                key.clone(),
                LeftOut {
                    key,
                    by,
                    reason: r.reason.clone(),
                },
            );
        }
    }
    let mut other_prefixes = 0usize;
    for key in input.snapshot.kv.keys() {
        if !(key.starts_with(SERVICES_PREFIX) || key.starts_with(ROUTES_PREFIX)) {
            other_prefixes += 1;
            continue;
        }
        if used.contains(key) || left_out.contains_key(key) {
            continue;
        }
        let reason = match key.strip_prefix(ROUTES_PREFIX) {
            Some(name) if !services.iter().any(|s| s.name == name) => {
                "a route for a service with no instances: no backend to route to".to_owned()
            }
            _ => "no line of this template comes from it".to_owned(),
        };
        left_out.insert(
            key.clone(),
            LeftOut {
                key: key.clone(),
                by: "template",
                reason,
            },
        );
    }
    let mut notes = Vec::new();
    if other_prefixes > 0 {
        notes.push(format!(
            "{other_prefixes} key(s) outside /services/ and /routes/ reach templates only through getv, gets and friends: their lines are not attributed"
        ));
    }
    if let Some(node) = input.node {
        node_holds(node, input.registry, &mut left_out, &mut notes);
    }
    Explanation {
        template: input.template.to_owned(),
        dest: input.dest.to_owned(),
        revision: input.snapshot.revision,
        lines,
        left_out: left_out.into_values().collect(),
        notes,
    }
}

/// What this node's guard and isolation hold, as it publishes them: the keys rendered here whose
/// lines are not the ones running on the node.
fn node_holds(
    node: &NodeState,
    registry: &Registry,
    left_out: &mut BTreeMap<String, LeftOut>,
    notes: &mut Vec<String>,
) {
    for name in &node.held {
        let Some(s) = registry.services.iter().find(|s| &s.name == name) else {
            notes.push(format!(
                "service {name} is held by the guard on node {}: it has no instance here, and its last applied instances still run there",
                node.node
            ));
            continue;
        };
        for inst in &s.instances {
            let key = format!("{SERVICES_PREFIX}{name}/{}", inst.id);
            left_out.entry(key.clone()).or_insert(LeftOut {
                key,
                by: "guard",
                reason: format!(
                    "service {name} is held by the shrink guard on node {}: its last applied instances run there, not these (confirm with SIGUSR1, or wait for confirm_after)",
                    node.node
                ),
            });
        }
    }
    for key in &node.held_back {
        left_out.entry(key.clone()).or_insert(LeftOut {
            key: key.clone(),
            by: "haproxy -c",
            reason: format!(
                "held back on node {}: haproxy -c rejected the config with this change, so its previous state runs there",
                node.node
            ),
        });
    }
}

fn annotate(k: &KeyRef) -> String {
    match (k.mod_revision, k.create_revision) {
        (Some(m), Some(c)) => format!("{} @{m} (created {c})", k.key),
        _ => k.key.clone(),
    }
}

impl Explanation {
    /// The annotated render: each line as rendered, and after a line that came from the
    /// registry `#>` and where it came from; then the keys left out and the notes.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(self.lines.iter().map(|l| l.text.len() + 40).sum());
        out.push_str(&format!(
            "# render --explain: template {:?} ({}) at revision {}\n# A line from the registry ends with \"#>\" and its keys: key @mod_revision (created create_revision).\n",
            self.template, self.dest, self.revision
        ));
        for l in &self.lines {
            out.push_str(&l.text);
            if let Some(service) = &l.service {
                let keys: Vec<String> = l.keys.iter().map(annotate).collect();
                let what = match (keys.is_empty(), l.note) {
                    (true, Some(note)) => note.to_owned(),
                    _ => keys.join(", "),
                };
                if !l.keys.is_empty() && l.text.trim_start().starts_with("server ") {
                    out.push_str(&format!("    #> {what}"));
                } else {
                    out.push_str(&format!("    #> service {service}: {what}"));
                }
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "#\n# Keys not rendered ({}):\n",
            self.left_out.len()
        ));
        for k in &self.left_out {
            out.push_str(&format!("#   {} ({}): {}\n", k.key, k.by, k.reason));
        }
        for n in &self.notes {
            out.push_str(&format!("# Note: {n}\n"));
        }
        out
    }

    /// The same as JSON: one object with the lines, the keys left out and the notes.
    pub fn json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot encode the explanation: {e}\"}}"));
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests;
