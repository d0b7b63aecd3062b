//! The data model: raw key-value pairs in, a screened [`Snapshot`] and a typed [`Registry`] out.
//!
//! Every key and value from a source is untrusted. [`Snapshot::screen`] drops pairs whose key or
//! value could change the meaning of a config file (control characters, line separators, bytes
//! that are not UTF-8, oversize values) before any template can see them. [`Registry::parse`]
//! then turns the `/services/` and `/routes/` keys into typed values — IP addresses or checked
//! host names, ports, weights, states — and rejects, by key, anything that does not parse.
//! A rejection never carries the value: values may hold secrets or hostile bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The longest value accepted from a source. Registry values are a few hundred bytes.
pub const MAX_VALUE_LEN: usize = 8 * 1024;
/// The longest key accepted from a source.
pub const MAX_KEY_LEN: usize = 512;
/// Registry prefix of service instances.
pub const SERVICES_PREFIX: &str = "/services/";
/// Registry prefix of routes.
pub const ROUTES_PREFIX: &str = "/routes/";

/// One key-value pair that was left out, with why. The key is shown escaped; the value never.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rejection {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {}: {}", self.key, self.reason)
    }
}

/// Shows a key that may hold hostile bytes as a quoted, escaped, bounded string.
pub fn display_key(key: &[u8]) -> String {
    let text = String::from_utf8_lossy(key);
    let mut out: String = text
        .chars()
        .take(200)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    format!("\"{out}\"")
}

/// Screened pairs, sorted by key. A persistent map: a clone is O(1) and shares every node, a
/// change copies only the path to it, and [`imbl::OrdMap::diff`] skips shared nodes. The etcd
/// source keeps one up to date event by event and hands out clones, so a change to one key
/// of 20,000 costs microseconds, not a re-screen of the whole key space.
pub type Kv = imbl::OrdMap<String, String>;

/// The source's state at one revision: every key that passed the screen, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The etcd revision, or a counter that rises with every change for the file source.
    pub revision: i64,
    pub kv: Kv,
}

/// Why a raw value or key cannot be shown to a template, if it cannot.
fn screen_raw(bytes: &[u8], max_len: usize) -> Result<&str, String> {
    if bytes.len() > max_len {
        return Err(format!("longer than {max_len} bytes"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "not valid UTF-8".to_owned())?;
    for c in text.chars() {
        let bad = match c {
            '\t' | '\n' | '\r' => Some("a tab or line break"),
            '\u{0}'..='\u{1f}' | '\u{7f}' | '\u{80}'..='\u{9f}' => Some("a control character"),
            '\u{2028}' | '\u{2029}' => Some("a Unicode line separator"),
            '\u{fffd}' => Some("bytes that are not valid UTF-8"),
            '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                Some("an invisible or bidirectional formatting character")
            }
            '\u{feff}' => Some("a byte-order mark"),
            _ => None,
        };
        if let Some(what) = bad {
            return Err(format!("contains {what}"));
        }
    }
    Ok(text)
}

/// The characters that may never reach a config line from data, beyond control characters.
pub fn is_config_unsafe(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '#' | '$' | ';') || c.is_control()
}

/// What the screen makes of one raw pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screened {
    /// Outside every prefix: ignored silently.
    Outside,
    /// Safe to show a template.
    Pass(String, String),
    /// Left out, with why.
    Reject(Rejection),
}

/// Screens one raw pair (see [`Snapshot::screen`]).
pub fn screen_pair(prefixes: &[String], k: &[u8], v: &[u8]) -> Screened {
    if !prefixes.iter().any(|p| k.starts_with(p.as_bytes())) {
        return Screened::Outside;
    }
    let key = match screen_raw(k, MAX_KEY_LEN) {
        Ok(key) if key.chars().any(is_config_unsafe) => {
            Err("key contains whitespace, a quote, '\\', '#', '$' or ';'".to_owned())
        }
        other => other,
    };
    let key = match key {
        Ok(key) => key,
        Err(reason) => {
            return Screened::Reject(Rejection {
                key: display_key(k),
                reason: format!("key {reason}"),
            });
        }
    };
    match screen_raw(v, MAX_VALUE_LEN) {
        Ok(value) => Screened::Pass(key.to_owned(), value.to_owned()),
        Err(reason) => Screened::Reject(Rejection {
            key: display_key(k),
            reason: format!("value {reason}"),
        }),
    }
}

impl Snapshot {
    /// Screens raw pairs into a snapshot. Keys outside `prefixes` are ignored silently; pairs
    /// whose key or value fails the screen are returned as rejections.
    pub fn screen<I, K, V>(revision: i64, prefixes: &[String], raw: I) -> (Snapshot, Vec<Rejection>)
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let mut kv = Kv::new();
        let mut rejected = Vec::new();
        for (k, v) in raw {
            match screen_pair(prefixes, k.as_ref(), v.as_ref()) {
                Screened::Outside => {}
                Screened::Pass(k, v) => {
                    kv.insert(k, v);
                }
                Screened::Reject(r) => rejected.push(r),
            }
        }
        (Snapshot { revision, kv }, rejected)
    }
}

// ---------------------------------------------------------------------------------------------
// Typed values
// ---------------------------------------------------------------------------------------------

/// RFC 1123 host name: dot-separated labels of letters, digits and '-', at most 253 bytes, and
/// not all digits in the last label (so that a mistyped IPv4 address is not taken for a name).
pub fn is_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = s.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    labels.iter().all(label_ok)
        && labels
            .last()
            .is_some_and(|l| !l.bytes().all(|b| b.is_ascii_digit()))
}

/// A URL path for routing or health checks: starts with '/', only unreserved and '/' or '%'
/// characters, at most 256 bytes.
pub fn is_http_path(s: &str) -> bool {
    s.starts_with('/')
        && s.len() <= 256
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'.' | b'_' | b'~' | b'%' | b'+')
        })
}

/// A service name: a DNS label (it is also the implicit `Host:` of the service), with '.' and
/// '_' allowed inside. It starts with a letter or digit, so generated names cannot collide
/// with haconfd's own `_`-prefixed names, and it is lower-case: host names compare without
/// case, so `Web` and `web` would claim the same `Host:`.
pub fn is_service_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
        })
}

/// An instance id: `[A-Za-z0-9._:-]{1,128}`, starting with a letter or digit.
pub fn is_instance_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// Where an instance listens: an IP address or a checked host name, and a port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Host {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    Name(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::V4(a) => write!(f, "{a}"),
            Host::V6(a) => write!(f, "{a}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// Parses `HOST:PORT`, `[V6]:PORT` or `name:PORT`.
pub fn parse_addr(s: &str) -> Result<(Host, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest
            .split_once("]:")
            .ok_or("an IPv6 address must be written [ADDR]:PORT")?;
        let ip: Ipv6Addr = h
            .parse()
            .map_err(|_| "the part in brackets is not an IPv6 address")?;
        (Host::V6(ip), p)
    } else {
        let (h, p) = s.rsplit_once(':').ok_or("the address has no :PORT")?;
        if h.contains(':') {
            return Err("an IPv6 address must be written [ADDR]:PORT".into());
        }
        let host = if let Ok(ip) = h.parse::<Ipv4Addr>() {
            Host::V4(ip)
        } else if is_hostname(h) {
            Host::Name(h.to_ascii_lowercase())
        } else {
            return Err("the host is neither an IP address nor a valid host name".into());
        };
        (host, p)
    };
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the port is not a number from 1 to 65535".into());
    }
    match port.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok((host, p as u16)),
        _ => Err("the port is not a number from 1 to 65535".into()),
    }
}

/// What an instance asks of the load balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Takes traffic.
    Ready,
    /// Finishes its sessions, takes no new ones.
    Drain,
    /// Out of service; not health-checked.
    Maint,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ready => "ready",
            State::Drain => "drain",
            State::Maint => "maint",
        }
    }
}

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

/// Parsed services kept between parses of successive snapshots: a service whose keys (and
/// route) did not change is reused as it is, `Arc` and all, so a change to one service costs
/// the parse of one service. Downstream caches (slots, tera values) recognise reused services
/// by pointer.
#[derive(Debug, Default)]
pub struct ParseCache {
    prev: Option<Arc<Snapshot>>,
    /// Per service name: the service as parsed from `prev` (None when none of its keys
    /// parsed), and its keys that were left out.
    services: BTreeMap<String, (Option<Arc<Service>>, Vec<Rejection>)>,
    /// Registry keys of `prev` that belong to no service: the wrong shape.
    stray: Vec<Rejection>,
}

impl ParseCache {
    /// Replaces each cached service by what `slotted` says it became (the same parse with its
    /// server slots), so that one copy of each service lives instead of two. Only a service that
    /// is the cached `Arc` itself is replaced: a service the guard held back is another `Arc`
    /// and the cache keeps what the keys say.
    pub fn adopt<'a>(&mut self, slotted: impl Fn(&Arc<Service>) -> Option<&'a Arc<Service>>) {
        for (service, _) in self.services.values_mut() {
            if let Some(s) = service.as_mut()
                && let Some(out) = slotted(s)
            {
                *s = Arc::clone(out);
            }
        }
    }

    /// The registry the cache holds, with every key left out.
    fn registry(&self) -> (Registry, Vec<Rejection>) {
        let services = self
            .services
            .values()
            .filter_map(|(s, _)| s.clone())
            .collect();
        let mut rejected = self.stray.clone();
        for (_, r) in self.services.values() {
            rejected.extend(r.iter().cloned());
        }
        (Registry { services }, rejected)
    }
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
    /// Parses the registry keys of a snapshot. Other keys are ignored (custom templates may read
    /// them through the raw functions); bad registry keys are returned as rejections.
    pub fn parse(snapshot: &Snapshot) -> (Registry, Vec<Rejection>) {
        let mut cache = ParseCache::default();
        Self::parse_into(snapshot, None, &mut cache);
        cache.registry()
    }

    /// [`Registry::parse`], reusing the services of the previous call whose keys did not change.
    pub fn parse_cached(
        snapshot: &Arc<Snapshot>,
        cache: &mut ParseCache,
    ) -> (Registry, Vec<Rejection>) {
        let prev = cache.prev.take();
        Self::parse_into(snapshot, prev.as_deref(), cache);
        cache.prev = Some(Arc::clone(snapshot));
        cache.registry()
    }

    /// Brings `cache` from `prev` (what it holds, if anything) to `snapshot`: with `prev`, only
    /// the services with a differing key are parsed again; [`imbl::OrdMap::diff`], which skips
    /// the nodes both snapshots share, finds them.
    fn parse_into(snapshot: &Snapshot, prev: Option<&Snapshot>, cache: &mut ParseCache) {
        let names: BTreeSet<String> = match prev {
            Some(p) => {
                let mut names = BTreeSet::new();
                let mut stray = false;
                for item in p.kv.diff(&snapshot.kv) {
                    let key = match item {
                        imbl::ordmap::DiffItem::Add(k, _)
                        | imbl::ordmap::DiffItem::Remove(k, _)
                        | imbl::ordmap::DiffItem::Update { new: (k, _), .. } => k,
                    };
                    if !(key.starts_with(SERVICES_PREFIX) || key.starts_with(ROUTES_PREFIX)) {
                        continue;
                    }
                    match owner(key) {
                        Some(name) => {
                            if !names.contains(name) {
                                names.insert(name.to_owned());
                            }
                        }
                        None => stray = true,
                    }
                }
                if stray {
                    cache.stray = scan(snapshot).0;
                }
                names
            }
            None => {
                let (stray, names) = scan(snapshot);
                cache.stray = stray;
                cache.services.clear();
                names.into_iter().map(str::to_owned).collect()
            }
        };
        for name in names {
            match parse_named(snapshot, &name) {
                Some(entry) => {
                    cache.services.insert(name, entry);
                }
                None => {
                    cache.services.remove(&name);
                }
            }
        }
    }

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
fn owner(key: &str) -> Option<&str> {
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
fn scan(snapshot: &Snapshot) -> (Vec<Rejection>, BTreeSet<&str>) {
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
fn parse_named(snapshot: &Snapshot, name: &str) -> Option<(Option<Arc<Service>>, Vec<Rejection>)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixes() -> Vec<String> {
        vec![SERVICES_PREFIX.to_owned(), ROUTES_PREFIX.to_owned()]
    }

    /// Screens and parses `pairs`; every rejection is checked never to carry `canary`.
    fn parse(pairs: &[(&str, &str)], canary: &str) -> (Registry, Vec<Rejection>) {
        let (snapshot, mut rejected) = Snapshot::screen(1, &prefixes(), pairs.iter().copied());
        let (registry, more) = Registry::parse(&snapshot);
        rejected.extend(more);
        for r in &rejected {
            assert!(
                !canary.is_empty() && !r.to_string().contains(canary),
                "a rejection carries the value: {r}"
            );
        }
        (registry, rejected)
    }

    #[test]
    fn service_names_are_lower_case() {
        assert!(is_service_name("web-1.v2_x"));
        assert!(
            !is_service_name("Web"),
            "Web and web would claim the same Host:"
        );
        assert!(!is_service_name("_web"));
    }

    #[test]
    fn parse_addr_accepts_v4_bracketed_v6_and_host_names() {
        assert_eq!(
            parse_addr("127.0.0.1:8080"),
            Ok((Host::V4(Ipv4Addr::LOCALHOST), 8080))
        );
        assert_eq!(
            parse_addr("[::1]:443"),
            Ok((Host::V6(Ipv6Addr::LOCALHOST), 443))
        );
        assert_eq!(
            parse_addr("[0:0:0:0:0:0:0:1]:1"),
            Ok((Host::V6(Ipv6Addr::LOCALHOST), 1))
        );
        assert_eq!(
            parse_addr("LocalHost:65535"),
            Ok((Host::Name("localhost".into()), 65535))
        );
        assert_eq!(
            parse_addr("api-1.svc.local:80"),
            Ok((Host::Name("api-1.svc.local".into()), 80))
        );
        // Leading zeros are digits all the same.
        assert_eq!(parse_addr("127.0.0.1:0080").map(|a| a.1), Ok(80));
    }

    #[test]
    fn parse_addr_rejects_bad_ports_and_hosts() {
        for bad in [
            "127.0.0.1",         // missing port
            "127.0.0.1:",        // empty port
            "127.0.0.1:0",       // port 0
            "127.0.0.1:65536",   // above 65535
            "127.0.0.1:99999",   //
            "127.0.0.1:123456",  // six digits
            "127.0.0.1:+1",      // sign
            "127.0.0.1:-1",      //
            "127.0.0.1: 80",     // space
            "127.0.0.1:80 ",     //
            "127.0.0.1:8o",      // letter
            "::1:8080",          // bare v6
            "::1",               //
            "[::1]",             // v6 without port
            "[::1]8080",         // v6 without colon
            "[::1]:",            //
            "[fe80::1%eth0]:80", // zone id
            "[fe80::1%25eth0]:80",
            "[127.0.0.1]:80", // v4 in brackets
            "[localhost]:80",
            ":80",      // empty host
            "127.1:80", // short v4, not a name either (numeric last label)
            "127.0.0.256:80",
            "under_score:80",
            "-lead:80",
            "a b:80",
            "host;x:80",
            "",
        ] {
            assert!(parse_addr(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn addr_errors_never_quote_the_input() {
        for bad in ["canary-x:0", "[canary]:80", "canary_y:80", "canary"] {
            let e = parse_addr(bad).expect_err(bad);
            assert!(!e.contains("canary"), "{e}");
        }
    }

    #[test]
    fn is_hostname_follows_rfc_1123() {
        let label63 = "a".repeat(63);
        let long = [label63.as_str(); 4].join("."); // 255 bytes
        let max = format!("{}.{}", [label63.as_str(); 3].join("."), "a".repeat(61)); // 253
        assert_eq!(max.len(), 253);
        for good in [
            "localhost",
            "localhost.",
            "a",
            "a-b.c-d",
            "x1.example",
            "123.example",
            "UPPER.case",
            label63.as_str(),
            max.as_str(),
        ] {
            assert!(is_hostname(good), "{good:?} was rejected");
        }
        let label64 = "a".repeat(64);
        for bad in [
            "",
            ".",
            "a..b",
            ".a",
            "-a",
            "a-",
            "a.-b",
            "a_b",
            "a b",
            "127.0.0.9",
            "123",
            "a.123",
            label64.as_str(),
            long.as_str(),
            "caf\u{e9}",
            "a/b",
        ] {
            assert!(!is_hostname(bad), "{bad:?} was accepted");
        }
    }

    #[test]
    fn screen_keeps_prefixed_safe_pairs_sorted_and_rejects_by_key() {
        let raw: Vec<(&[u8], &[u8])> = vec![
            (b"/services/b/1", b"127.0.0.1:2"),
            (b"/services/a/1", b"127.0.0.1:1"),
            (b"/other/x", b"ignored\nsilently"),
            (b"/services/nl/1", b"127.0.0.1:1\nCANARY"),
            (b"/services/cr/1", b"127.0.0.1:1\rCANARY"),
            (b"/services/nul/1", b"127.0.0.1:1\0CANARY"),
            (b"/services/tab/1", b"127.0.0.1:1\tCANARY"),
            (b"/services/del/1", b"127.0.0.1:1\x7fCANARY"),
            (b"/services/esc/1", b"\x1b[31mCANARY"),
            (b"/services/c1/1", "CANARY\u{85}".as_bytes()),
            (b"/services/ls/1", "CANARY\u{2028}".as_bytes()),
            (b"/services/ps/1", "CANARY\u{2029}".as_bytes()),
            (b"/services/bidi/1", "CANARY\u{202e}".as_bytes()),
            (b"/services/zw/1", "CANARY\u{200b}".as_bytes()),
            (b"/services/bom/1", "\u{feff}CANARY".as_bytes()),
            (b"/services/fffd/1", "CANARY\u{fffd}".as_bytes()),
            (b"/services/utf8/1", b"CANARY\xff\xfe"),
            (b"/services/key space/1", b"127.0.0.1:1"),
            (b"/services/key#hash/1", b"127.0.0.1:1"),
            (b"/services/key\nnl/1", b"127.0.0.1:1"),
            (b"/services/key\xff/1", b"127.0.0.1:1"),
        ];
        let mut big = b"CANARY".to_vec();
        big.resize(MAX_VALUE_LEN + 1, b'x');
        let mut raw = raw;
        raw.push((b"/services/big/1", &big));
        let long_key = format!("/services/{}", "k".repeat(MAX_KEY_LEN));
        raw.push((long_key.as_bytes(), b"127.0.0.1:1"));
        let (snap, rejected) = Snapshot::screen(7, &prefixes(), raw);
        assert_eq!(snap.revision, 7);
        assert_eq!(
            snap.kv.keys().collect::<Vec<_>>(),
            vec!["/services/a/1", "/services/b/1"]
        );
        assert_eq!(rejected.len(), 20, "{rejected:#?}");
        for r in &rejected {
            let text = r.to_string();
            assert!(!text.contains("CANARY"), "{text}");
            assert!(r.key.starts_with("\"/services/"), "{text}");
            // The key is shown escaped: no raw control character reaches a log line.
            assert!(!text.chars().any(char::is_control), "{text:?}");
        }
        assert!(rejected.iter().any(|r| r.key == "\"/services/key\\nnl/1\""));
        // A value at the limit passes.
        let at_limit = "a".repeat(MAX_VALUE_LEN);
        let (snap, rejected) =
            Snapshot::screen(1, &prefixes(), [("/services/x/1", at_limit.as_str())]);
        assert!(rejected.is_empty() && snap.kv.len() == 1);
    }

    #[test]
    fn registry_sorts_services_and_instances_and_attaches_routes() {
        let (reg, rejected) = parse(
            &[
                ("/services/zeta/b", "127.0.0.1:2"),
                ("/services/zeta/a", "127.0.0.1:1"),
                ("/services/alpha/x", "[::1]:3"),
                (
                    "/services/alpha/w",
                    r#"{"addr":"LOCALHOST:4","weight":7,"state":"drain","meta":{"zone":"a","n":3,"b":true}}"#,
                ),
                (
                    "/routes/alpha",
                    r#"{"hosts":["B.localhost","a.localhost","a.localhost."],"paths":["/z","/a","/z"],"balance":"leastconn","check":"/hc"}"#,
                ),
                ("/routes/lonely", r#"{}"#),
            ],
            "CANARY",
        );
        assert!(rejected.is_empty(), "{rejected:?}");
        let names: Vec<&str> = reg.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["alpha", "lonely", "zeta"]);
        let alpha = &reg.services[0];
        assert_eq!(alpha.backend, "be_alpha");
        let ids: Vec<&str> = alpha.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["w", "x"]);
        let w = &alpha.instances[0];
        assert_eq!(
            (w.addr.as_str(), w.host.as_str(), w.port, w.weight, w.state),
            ("localhost:4", "localhost", 4, 7, State::Drain)
        );
        assert_eq!(w.meta.get("n").map(String::as_str), Some("3"));
        assert_eq!(w.meta.get("b").map(String::as_str), Some("true"));
        assert_eq!(alpha.instances[1].addr, "[::1]:3");
        assert_eq!(alpha.instances[1].weight, 100);
        assert_eq!(alpha.instances[1].state, State::Ready);
        let route = alpha.route.as_ref().expect("route");
        assert_eq!(route.hosts, ["a.localhost", "b.localhost"]);
        assert_eq!(route.paths, ["/a", "/z"]);
        assert_eq!(route.balance, "leastconn");
        assert_eq!(route.check.as_deref(), Some("/hc"));
        let lonely = &reg.services[1];
        assert!(lonely.instances.is_empty());
        assert_eq!(
            lonely.route.as_ref().map(|r| r.balance.as_str()),
            Some("roundrobin")
        );
        assert_eq!(reg.instance_count(), 4);
    }

    #[test]
    fn registry_rejects_by_key_without_the_value() {
        let cases: &[(&str, &str)] = &[
            ("/services/web", "127.0.0.1:1"),
            ("/services/-web/i1", "127.0.0.1:1"),
            ("/services/web@x/i1", "127.0.0.1:1"),
            ("/services/web/-i1", "127.0.0.1:1"),
            ("/services/web/i@1", "127.0.0.1:1"),
            ("/services/web/i1/deeper", "127.0.0.1:1"),
            ("/services/web/port", "canary-host:99999"),
            ("/services/web/addr", "CANARY_x:80"),
            ("/services/web/empty", ""),
            (
                "/services/web/w300",
                r#"{"addr":"canary-w:80","weight":300}"#,
            ),
            (
                "/services/web/wneg",
                r#"{"addr":"canary-w:80","weight":-1}"#,
            ),
            (
                "/services/web/wstr",
                r#"{"addr":"127.0.0.1:80","weight":"CANARY, expected u32"}"#,
            ),
            (
                "/services/web/state",
                r#"{"addr":"127.0.0.1:80","state":"upCANARY"}"#,
            ),
            (
                "/services/web/field",
                r#"{"addr":"127.0.0.1:80","colour":"CANARY"}"#,
            ),
            ("/services/web/noaddr", r#"{"weight":"CANARY"}"#),
            ("/services/web/missing", r#"{"weight":1}"#),
            ("/services/web/json", r#"{"addr":"CANARY"#),
            (
                "/services/web/metav",
                r#"{"addr":"127.0.0.1:80","meta":{"k":"CANARY x"}}"#,
            ),
            (
                "/services/web/metak",
                r#"{"addr":"127.0.0.1:80","meta":{"CANARY<":"x y"}}"#,
            ),
            (
                "/services/web/metao",
                r#"{"addr":"127.0.0.1:80","meta":{"k":{"CANARY":1}}}"#,
            ),
            ("/routes/-web", r#"{}"#),
            ("/routes/web/x", r#"{}"#),
            ("/routes/a", r#"{"hosts":["CANARY host"]}"#),
            ("/routes/b", r#"{"paths":["CANARY"]}"#),
            ("/routes/c", r#"{"paths":["/CANARY;x"]}"#),
            ("/routes/d", r#"{"balance":"CANARY"}"#),
            ("/routes/e", r#"{"check":"/CANARY x"}"#),
            ("/routes/f", r#"{"colour":"CANARY"}"#),
            ("/routes/g", "CANARY"),
        ];
        let mut pairs = cases.to_vec();
        pairs.push(("/services/web/good", "127.0.0.1:8080"));
        let (reg, rejected) = parse(&pairs, "CANARY");
        let keys: Vec<&str> = rejected.iter().map(|r| r.key.as_str()).collect();
        for (k, _) in cases {
            assert!(
                keys.contains(&format!("{k:?}").as_str()),
                "{k} not rejected: {keys:?}"
            );
        }
        assert_eq!(rejected.len(), cases.len(), "{rejected:#?}");
        assert_eq!(reg.instance_count(), 1);
        assert_eq!(reg.services[0].instances[0].addr, "127.0.0.1:8080");
        // The lower-case canary sits in host names above; rejections never show those either.
        for r in &rejected {
            assert!(!r.reason.contains("canary"), "{r}");
        }
    }

    /// Regression: a type error used to quote the input after the first "expected" inside it.
    #[test]
    fn type_errors_name_the_expected_type_only() {
        let (_, rejected) = parse(
            &[(
                "/services/web/w",
                r#"{"addr":"127.0.0.1:80","weight":"x expectedCANARY"}"#,
            )],
            "CANARY",
        );
        assert_eq!(rejected.len(), 1);
        assert!(
            rejected[0].reason.contains("expected u32"),
            "{}",
            rejected[0]
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// The cached parse of a sequence of snapshots equals a fresh parse of each, whatever
        /// the changes: instances, routes, keys of the wrong shape, bad values, services that
        /// come and go.
        #[test]
        fn cached_parse_equals_a_fresh_parse(
            steps in proptest::collection::vec(
                proptest::collection::vec((0usize..14, 0usize..5), 0..8),
                1..8,
            )
        ) {
            const KEYS: [&str; 14] = [
                "/services/a/1", "/services/a/2", "/services/b/1", "/services/b-c/1",
                "/services/b/x/y", "/services/B/1", "/services/c", "/routes/a", "/routes/b",
                "/routes/Bad", "/routes/d", "/services/d/1", "/services/a/3", "/services/e/1",
            ];
            const VALUES: [Option<&str>; 5] = [
                None,
                Some("127.0.0.1:8080"),
                Some("127.0.0.2:9090"),
                Some(r#"{"hosts":["a.test"]}"#),
                Some("not an address"),
            ];
            let mut kv = Kv::new();
            let mut cache = ParseCache::default();
            for (n, step) in steps.iter().enumerate() {
                for &(k, v) in step {
                    match VALUES[v] {
                        Some(v) => kv.insert(KEYS[k].to_owned(), v.to_owned()),
                        None => kv.remove(KEYS[k]),
                    };
                }
                let snapshot = Arc::new(Snapshot { revision: n as i64, kv: kv.clone() });
                let (cached, mut cached_rej) = Registry::parse_cached(&snapshot, &mut cache);
                let (fresh, mut fresh_rej) = Registry::parse(&snapshot);
                cached_rej.sort_by(|a, b| a.key.cmp(&b.key));
                fresh_rej.sort_by(|a, b| a.key.cmp(&b.key));
                proptest::prop_assert_eq!(cached, fresh);
                proptest::prop_assert_eq!(cached_rej, fresh_rej);
            }
        }
    }
}
