//! The registry's rules for single values: names, ids, host names, paths, addresses, states.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

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
