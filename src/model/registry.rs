//! The typed registry (services, instances, routes) and the parsers of its keys and values.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::rules::{
    Host, State, is_hostname, is_http_path, is_instance_id, is_service_name, parse_addr,
};
use super::{
    Kv, ROUTES_PREFIX, Rejection, SERVICES_PREFIX, Snapshot, display_key, is_config_unsafe,
};
/// One instance of a service, as templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// The last segment of the instance's key.
    pub id: String,
    /// The HAProxy server name: generated, safe, stable across renders.
    pub name: String,
    pub host: String,
    pub port: u16,
    /// `host:port`, or `[v6]:port`.
    pub addr: String,
    pub weight: u16,
    pub state: State,
    pub meta: BTreeMap<String, String>,
}

/// How a service is reached from the frontend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub hosts: Vec<String>,
    pub paths: Vec<String>,
    pub balance: String,
    /// The HTTP health-check path, if any; otherwise checks are TCP connects.
    pub check: Option<String>,
}

/// One service: a backend in HAProxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    /// The HAProxy backend name: generated, safe, stable.
    pub backend: String,
    pub route: Option<Route>,
    pub instances: Vec<Instance>,
    /// The backend's server slots in file order: each holds an instance (an index into
    /// `instances`) or is free. `Registry::parse` gives one slot per instance; the daemon's
    /// `slots::Slots` keeps them stable across applies and adds spare ones.
    pub slots: Vec<Slot>,
}

/// One server line of a backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Slot {
    /// The HAProxy server name: `srv<N>`, stable for as long as its instance lives.
    pub name: String,
    /// Index into the service's `instances`, or none for a free (disabled) slot.
    pub instance: Option<usize>,
}

/// The typed registry: services sorted by name, instances sorted by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Registry {
    pub services: Vec<Arc<Service>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    addr: String,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default = "default_state")]
    state: State,
    #[serde(default)]
    meta: BTreeMap<String, serde_json::Value>,
}

fn default_weight() -> u32 {
    100
}
fn default_state() -> State {
    State::Ready
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default = "default_balance")]
    balance: String,
    #[serde(default)]
    check: Option<String>,
}

fn default_balance() -> String {
    "roundrobin".into()
}

/// Balance algorithms a route may ask for: those that take no argument.
pub const BALANCE_ALGORITHMS: &[&str] = &[
    "roundrobin",
    "static-rr",
    "leastconn",
    "first",
    "source",
    "random",
];

const MAX_META: usize = 32;

fn parse_instance(id: &str, value: &str) -> Result<Instance, String> {
    let raw = if value.trim_start().starts_with('{') {
        serde_json::from_str::<RawInstance>(value).map_err(|e| json_problem(&e))?
    } else {
        RawInstance {
            addr: value.to_owned(),
            weight: default_weight(),
            state: State::Ready,
            meta: BTreeMap::new(),
        }
    };
    let (host, port) = parse_addr(&raw.addr).map_err(|e| format!("field addr: {e}"))?;
    if raw.weight > 256 {
        return Err("field weight: must be from 0 to 256".into());
    }
    if raw.meta.len() > MAX_META {
        return Err(format!("field meta: more than {MAX_META} entries"));
    }
    let mut meta = BTreeMap::new();
    for (k, v) in raw.meta {
        let v = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => {
                return Err(format!(
                    "field meta.{}: must be a string, number or bool",
                    safe_name(&k)
                ));
            }
        };
        let token_ok =
            |s: &str| !s.is_empty() && s.len() <= 256 && !s.chars().any(is_config_unsafe);
        if !token_ok(&k) || k.len() > 64 {
            return Err(
                "field meta: a name is empty, too long or holds a forbidden character".into(),
            );
        }
        if !token_ok(&v) {
            return Err(format!(
                "field meta.{}: empty, too long, or holds whitespace, a quote, '\\', '#', '$' or ';'",
                safe_name(&k)
            ));
        }
        meta.insert(k, v);
    }
    let addr = match host {
        Host::V6(ip) => format!("[{ip}]:{port}"),
        ref h => format!("{h}:{port}"),
    };
    Ok(Instance {
        id: id.to_owned(),
        name: id.to_owned(),
        host: host.to_string(),
        port,
        addr,
        weight: raw.weight as u16,
        state: raw.state,
        meta,
    })
}

/// A name from input, shown only when it is already a safe token.
fn safe_name(s: &str) -> &str {
    if is_instance_id(s) { s } else { "<name>" }
}

/// Describes a JSON error without quoting the input: serde_json's messages name the field and
/// the expected type, never the offending value, except for unknown variants, which we rephrase.
fn json_problem(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    if msg.starts_with("unknown variant") {
        return "field state: must be \"ready\", \"drain\" or \"maint\"".into();
    }
    if msg.starts_with("unknown field") {
        // "unknown field `x`, expected one of …": the name is part of the value, so it is not
        // repeated (the key is enough to find it).
        return "an unknown field (known: addr, weight, state, meta / hosts, paths, balance, check)"
            .into();
    }
    match e.classify() {
        serde_json::error::Category::Data => {
            // "missing field `addr` at line 1 column 9": the name comes from our own struct.
            if let Some(rest) = msg.strip_prefix("missing field") {
                let field = rest.split(" at line").next().unwrap_or("");
                return format!("missing field{field}");
            }
            // Type errors quote the input before the expected type, e.g. "invalid type: string
            // \"x\", expected u32": keep only what follows the last ", expected ", and only
            // when it reads like a type description, never like input.
            let expected = msg
                .rsplit_once(", expected ")
                .map(|(_, rest)| rest.split(" at line").next().unwrap_or(""))
                .filter(|t| {
                    !t.is_empty()
                        && t.len() <= 40
                        && t.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b' ' || b == b'_')
                })
                .unwrap_or("the documented shape");
            format!("a field has the wrong type (expected {expected})")
        }
        _ => format!("not valid JSON (line {}, column {})", e.line(), e.column()),
    }
}

fn parse_route(value: &str) -> Result<Route, String> {
    let raw: RawRoute = serde_json::from_str(value).map_err(|e| json_problem(&e))?;
    if raw.hosts.len() > 64 || raw.paths.len() > 64 {
        return Err("more than 64 hosts or paths".into());
    }
    let mut hosts = Vec::new();
    for h in raw.hosts {
        if !is_hostname(&h) {
            return Err("field hosts: an entry is not a valid host name".into());
        }
        hosts.push(h.trim_end_matches('.').to_ascii_lowercase());
    }
    hosts.sort();
    hosts.dedup();
    for p in &raw.paths {
        if !is_http_path(p) {
            return Err("field paths: an entry is not a plain path starting with '/'".into());
        }
    }
    if !BALANCE_ALGORITHMS.contains(&raw.balance.as_str()) {
        return Err(format!(
            "field balance: must be one of {}",
            BALANCE_ALGORITHMS.join(", ")
        ));
    }
    if let Some(c) = &raw.check
        && !is_http_path(c)
    {
        return Err("field check: not a plain path starting with '/'".into());
    }
    let mut paths = raw.paths;
    paths.sort();
    paths.dedup();
    Ok(Route {
        hosts,
        paths,
        balance: raw.balance,
        check: raw.check,
    })
}

/// A reason for a key whose place in `/services/` is wrong.
fn shape_problem(rest: &str) -> Option<&'static str> {
    let Some((svc, id)) = rest.split_once('/') else {
        return Some("not of the form /services/<service>/<instance-id>");
    };
    if !is_service_name(svc) {
        return Some(
            "service name must be 1-63 lower-case letters, digits, '-', '_' or '.', starting with a letter or digit",
        );
    }
    if !is_instance_id(id) {
        return Some(
            "instance id must be 1-128 of [A-Za-z0-9._:-], starting with a letter or digit",
        );
    }
    None
}

/// Parses one service from its instance pairs (in key order) and its route value.
fn parse_service(
    name: &str,
    items: &[(&String, &String)],
    route: Option<(&String, &String)>,
) -> (Option<Arc<Service>>, Vec<Rejection>) {
    let mut rejected = Vec::new();
    let mut instances = Vec::with_capacity(items.len());
    for (key, value) in items {
        let id = &key[SERVICES_PREFIX.len() + name.len() + 1..];
        match parse_instance(id, value) {
            Ok(inst) => instances.push(inst),
            Err(reason) => rejected.push(Rejection {
                key: display_key(key.as_bytes()),
                reason,
            }),
        }
    }
    let route = route.and_then(|(key, value)| match parse_route(value) {
        Ok(r) => Some(r),
        Err(reason) => {
            rejected.push(Rejection {
                key: display_key(key.as_bytes()),
                reason,
            });
            None
        }
    });
    if instances.is_empty() && route.is_none() {
        return (None, rejected);
    }
    // Keys sort by id within a service. One slot per instance in id order, no spares: what
    // renders when nothing keeps slots across applies (`slots::Slots` replaces it).
    let slots = (0..instances.len())
        .map(|i| Slot {
            name: format!("srv{}", i + 1),
            instance: Some(i),
        })
        .collect();
    for (i, inst) in instances.iter_mut().enumerate() {
        inst.name = format!("srv{}", i + 1);
    }
    let service = Service {
        name: name.to_owned(),
        backend: format!("be_{name}"),
        route,
        instances,
        slots,
    };
    (Some(Arc::new(service)), rejected)
}

impl Registry {
    /// The number of instances across all services.
    pub fn instance_count(&self) -> usize {
        self.services.iter().map(|s| s.instances.len()).sum()
    }
}

/// The keys from `p` on, for `BTreeMap<String, _>::range` without allocating.
fn from(p: &str) -> (std::ops::Bound<&str>, std::ops::Bound<&str>) {
    (std::ops::Bound::Included(p), std::ops::Bound::Unbounded)
}

/// The pairs of `kv` under `prefix`, in key order.
fn under<'a>(kv: &'a Kv, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a String)> + 'a {
    kv.range::<_, str>(from(prefix))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

/// The service a registry key belongs to, or None for a key of the wrong shape.
pub(super) fn owner(key: &str) -> Option<&str> {
    if let Some(rest) = key.strip_prefix(SERVICES_PREFIX) {
        return match shape_problem(rest) {
            None => rest.split_once('/').map(|(svc, _)| svc),
            Some(_) => None,
        };
    }
    key.strip_prefix(ROUTES_PREFIX)
        .filter(|svc| is_service_name(svc))
}

/// One pass over the registry keys: the keys of the wrong shape, and the names of services.
pub(super) fn scan(snapshot: &Snapshot) -> (Vec<Rejection>, BTreeSet<&str>) {
    let mut stray = Vec::new();
    let mut names = BTreeSet::new();
    for (key, _) in under(&snapshot.kv, SERVICES_PREFIX).chain(under(&snapshot.kv, ROUTES_PREFIX)) {
        match owner(key) {
            Some(name) => {
                names.insert(name);
            }
            None => stray.push(Rejection {
                key: display_key(key.as_bytes()),
                reason: match key.strip_prefix(SERVICES_PREFIX) {
                    Some(rest) => shape_problem(rest).unwrap_or("malformed key"),
                    None => "not of the form /routes/<service>",
                }
                .into(),
            }),
        }
    }
    (stray, names)
}

/// Parses the service `name` of `snapshot`, or None when it has no key left.
pub(super) fn parse_named(
    snapshot: &Snapshot,
    name: &str,
) -> Option<(Option<Arc<Service>>, Vec<Rejection>)> {
    let prefix = format!("{SERVICES_PREFIX}{name}/");
    let items: Vec<(&String, &String)> = under(&snapshot.kv, &prefix)
        .filter(|(k, _)| owner(k) == Some(name))
        .collect();
    let route_key = format!("{ROUTES_PREFIX}{name}");
    let route = snapshot.kv.get_key_value(&route_key);
    if items.is_empty() && route.is_none() {
        return None;
    }
    Some(parse_service(name, &items, route))
}
