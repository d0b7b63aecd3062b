//! The registry's rules, each defined once: service names, instance ids, host names, paths,
//! addresses, weights, states, meta, and the typed value of an instance key with its parser
//! ([`InstanceValue::parse`], what the daemon reads) and its writer ([`InstanceValue::encode`],
//! what `announce` writes). `announce` checks its arguments with these same functions.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use super::{forbidden_char, is_config_unsafe};

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
/// [`is_service_name`] in words, for error messages.
pub const SERVICE_NAME_RULE: &str =
    "1-63 lower-case letters, digits, '-', '_' or '.', starting with a letter or digit";

/// A service name: see [`SERVICE_NAME_RULE`].
pub fn is_service_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
        })
}

/// The longest instance id.
pub const MAX_INSTANCE_ID_LEN: usize = 128;
/// [`is_instance_id`] in words, for error messages.
pub const INSTANCE_ID_RULE: &str = "1-128 of [A-Za-z0-9._:-], starting with a letter or digit";

/// A character an instance id may hold (the first must also be a letter or digit).
pub fn is_instance_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// An instance id: `[A-Za-z0-9._:-]{1,128}`, starting with a letter or digit.
pub fn is_instance_id(s: &str) -> bool {
    s.len() <= MAX_INSTANCE_ID_LEN
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars().all(is_instance_id_char)
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

impl Host {
    /// Parses a host without a port: an IP address (`::1` or `[::1]`) or a host name.
    pub fn parse(s: &str) -> Result<Host, String> {
        let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        if let Ok(ip) = bare.unwrap_or(s).parse::<Ipv6Addr>() {
            return Ok(Host::V6(ip));
        }
        if bare.is_some() {
            return Err("the part in brackets is not an IPv6 address".into());
        }
        parse_addr(&format!("{s}:1")).map(|(h, _)| h)
    }

    /// Whether this is `0.0.0.0` or `::`. The registry takes it (HAProxy reads it as "the
    /// client's destination address"); `announce` refuses it, since no proxy can connect to it.
    pub fn is_unspecified(&self) -> bool {
        match self {
            Host::V4(ip) => ip.is_unspecified(),
            Host::V6(ip) => ip.is_unspecified(),
            Host::Name(_) => false,
        }
    }
}

/// A checked `HOST:PORT`, shown as `host:port` or `[v6]:port`: the `addr` of an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub host: Host,
    pub port: u16,
}

impl Addr {
    /// Parses `HOST:PORT`, `[V6]:PORT` or `name:PORT` (see [`parse_addr`]).
    pub fn parse(s: &str) -> Result<Addr, String> {
        parse_addr(s).map(|(host, port)| Addr { host, port })
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::V6(ip) => write!(f, "[{ip}]:{}", self.port),
            h => write!(f, "{h}:{}", self.port),
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

impl State {
    fn is_ready(&self) -> bool {
        *self == State::Ready
    }
}

/// The highest weight (HAProxy's own bound).
pub const MAX_WEIGHT: u16 = 256;
/// The weight of an instance whose value gives none.
pub const DEFAULT_WEIGHT: u16 = 100;

/// Checks a weight: 0 to [`MAX_WEIGHT`].
pub fn parse_weight(weight: u32) -> Result<u16, String> {
    match u16::try_from(weight) {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ => Err(format!("must be from 0 to {MAX_WEIGHT}")),
    }
}

/// The most meta entries one instance may carry.
pub const MAX_META: usize = 32;
/// The longest meta name, in bytes.
pub const MAX_META_NAME: usize = 64;
/// The longest meta value, in bytes.
pub const MAX_META_VALUE: usize = 256;

/// Why `name` cannot name a meta entry, if it cannot: empty, longer than [`MAX_META_NAME`], or
/// holding a character that could change a config line. The reason never quotes the input.
pub fn meta_name_problem(name: &str) -> Result<(), String> {
    meta_token(name, MAX_META_NAME)
}

/// Why `value` cannot be a meta value, if it cannot (as [`meta_name_problem`], up to
/// [`MAX_META_VALUE`] bytes).
pub fn meta_value_problem(value: &str) -> Result<(), String> {
    meta_token(value, MAX_META_VALUE)
}

fn meta_token(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > max {
        return Err(format!("is longer than {max} bytes"));
    }
    for c in s.chars() {
        if let Some(what) = forbidden_char(c) {
            return Err(format!("contains {what}"));
        }
        if is_config_unsafe(c) {
            return Err("holds whitespace, a quote, '\\', '#', '$' or ';'".into());
        }
    }
    Ok(())
}

/// The value of one `/services/<service>/<id>` key, typed: what the daemon reads and what
/// `announce` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceValue {
    pub addr: Addr,
    pub weight: u16,
    pub state: State,
    pub meta: BTreeMap<String, String>,
}

/// The JSON form as written, in the documented field order; a field at its default is left out.
#[derive(Serialize)]
struct Written<'a> {
    addr: String,
    #[serde(skip_serializing_if = "is_default_weight")]
    weight: u16,
    #[serde(skip_serializing_if = "State::is_ready")]
    state: State,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    meta: &'a BTreeMap<String, String>,
}

fn is_default_weight(w: &u16) -> bool {
    *w == DEFAULT_WEIGHT
}

/// The JSON form as read: numbers and bools in meta are taken as their text.
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
    u32::from(DEFAULT_WEIGHT)
}
fn default_state() -> State {
    State::Ready
}

impl InstanceValue {
    /// An instance at `addr` with every other field at its default.
    pub fn new(addr: Addr) -> InstanceValue {
        InstanceValue {
            addr,
            weight: DEFAULT_WEIGHT,
            state: State::Ready,
            meta: BTreeMap::new(),
        }
    }

    /// Parses a value: `HOST:PORT`, or the JSON form
    /// `{"addr":…,"weight":…,"state":…,"meta":{…}}`. The error names the field, never the value.
    pub fn parse(value: &str) -> Result<InstanceValue, String> {
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
        let addr = Addr::parse(&raw.addr).map_err(|e| format!("field addr: {e}"))?;
        let weight = parse_weight(raw.weight).map_err(|e| format!("field weight: {e}"))?;
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
            meta_name_problem(&k).map_err(|e| format!("field meta: a name {e}"))?;
            meta_value_problem(&v)
                .map_err(|e| format!("field meta.{}: the value {e}", safe_name(&k)))?;
            meta.insert(k, v);
        }
        Ok(InstanceValue {
            addr,
            weight,
            state: raw.state,
            meta,
        })
    }

    /// The value to write: `HOST:PORT` when every other field is at its default, else the JSON
    /// form with the fields that are not. [`InstanceValue::parse`] reads it back as `self`.
    pub fn encode(&self) -> Result<String, serde_json::Error> {
        if self.weight == DEFAULT_WEIGHT && self.state.is_ready() && self.meta.is_empty() {
            return Ok(self.addr.to_string());
        }
        serde_json::to_string(&Written {
            addr: self.addr.to_string(),
            weight: self.weight,
            state: self.state,
            meta: &self.meta,
        })
    }
}

/// A name from input, shown only when it is already a safe token.
pub(super) fn safe_name(s: &str) -> &str {
    if is_instance_id(s) { s } else { "<name>" }
}

/// Describes a JSON error without quoting the input: serde_json's messages name the field and
/// the expected type, never the offending value, except for unknown variants, which we rephrase.
pub(super) fn json_problem(e: &serde_json::Error) -> String {
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
