//! The data model: raw key-value pairs in, a screened [`Snapshot`] and a typed [`Registry`] out.
//!
//! Every key and value from a source is untrusted. [`Snapshot::screen`] drops pairs whose key or
//! value could change the meaning of a config file (control characters, line separators, bytes
//! that are not UTF-8, oversize values) before any template can see them. [`Registry::parse`]
//! then turns the `/services/` and `/routes/` keys into typed values — IP addresses or checked
//! host names, ports, weights, states — and rejects, by key, anything that does not parse.
//! A rejection never carries the value: values may hold secrets or hostile bytes.

use std::fmt;

mod cache;
mod registry;
mod rules;
#[cfg(test)]
mod tests;

pub use cache::ParseCache;
pub use registry::{BALANCE_ALGORITHMS, Instance, Registry, Route, Service, Slot};
pub use rules::{
    Addr, DEFAULT_WEIGHT, Host, INSTANCE_ID_RULE, InstanceValue, MAX_INSTANCE_ID_LEN, MAX_META,
    MAX_META_NAME, MAX_META_VALUE, MAX_WEIGHT, SERVICE_NAME_RULE, State, is_hostname, is_http_path,
    is_instance_id, is_instance_id_char, is_service_name, meta_name_problem, meta_value_problem,
    parse_addr, parse_weight,
};

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
    if let Some(what) = text.chars().find_map(forbidden_char) {
        return Err(format!("contains {what}"));
    }
    Ok(text)
}

/// What a character is, when it may appear in no key or value at all: it could end a config
/// line, or hide what a line says from the operator who reads it. The raw screen applies it to
/// every pair; the registry applies it again to text that JSON escapes could have hidden from
/// the screen (meta).
fn forbidden_char(c: char) -> Option<&'static str> {
    match c {
        '\t' | '\n' | '\r' => Some("a tab or line break"),
        '\u{0}'..='\u{1f}' | '\u{7f}' | '\u{80}'..='\u{9f}' => Some("a control character"),
        '\u{2028}' | '\u{2029}' => Some("a Unicode line separator"),
        '\u{fffd}' => Some("bytes that are not valid UTF-8"),
        '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
            Some("an invisible or bidirectional formatting character")
        }
        '\u{feff}' => Some("a byte-order mark"),
        _ => None,
    }
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
