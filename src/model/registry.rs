//! The typed registry (services, instances, routes) and the parsers of its keys and values.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::rules::{
    INSTANCE_ID_RULE, InstanceValue, SERVICE_NAME_RULE, State, is_hostname, is_http_path,
    is_instance_id, is_service_name, json_problem,
};
use super::{Kv, ROUTES_PREFIX, Rejection, SERVICES_PREFIX, Snapshot, display_key};

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

/// An instance as templates see it, from its id and its value.
fn parse_instance(id: &str, value: &str) -> Result<Instance, String> {
    let v = InstanceValue::parse(value)?;
    Ok(Instance {
        id: id.to_owned(),
        name: id.to_owned(),
        host: v.addr.host.to_string(),
        port: v.addr.port,
        addr: v.addr.to_string(),
        weight: v.weight,
        state: v.state,
        meta: v.meta,
    })
}

impl Route {
    /// Parses a `/routes/<service>` value as the registry does; the error never holds the value.
    pub fn parse(value: &str) -> Result<Route, String> {
        parse_route(value)
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
fn shape_problem(rest: &str) -> Option<String> {
    let Some((svc, id)) = rest.split_once('/') else {
        return Some("not of the form /services/<service>/<instance-id>".into());
    };
    if !is_service_name(svc) {
        return Some(format!("service name must be {SERVICE_NAME_RULE}"));
    }
    if !is_instance_id(id) {
        return Some(format!("instance id must be {INSTANCE_ID_RULE}"));
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
                    Some(rest) => shape_problem(rest).unwrap_or_else(|| "malformed key".into()),
                    None => "not of the form /routes/<service>".into(),
                },
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
