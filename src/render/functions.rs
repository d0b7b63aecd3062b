//! The confd-equivalent template functions and filters.
//!
//! Functions read the raw key space of one [`Snapshot`]; they are registered anew for every
//! render with the snapshot they must see. Every value they return has passed the screen of
//! [`Snapshot::screen`]. Names and keyword arguments follow confd, documented in docs/templates.md.

use std::collections::BTreeMap;
use std::sync::Arc;

use tera::{Error, Kwargs, State, Tera, TeraResult, Value};

use crate::model::Snapshot;

/// Registers the filters, which do not depend on data: `base`, `dir`, `json`, `split`, `join`.
pub fn register_filters(tera: &mut Tera) {
    tera.register_filter("base", |s: &str, _: Kwargs, _: &State| base(s).to_owned());
    tera.register_filter("dir", |s: &str, _: Kwargs, _: &State| dir(s));
    tera.register_filter(
        "json",
        |s: &str, _: Kwargs, _: &State| -> TeraResult<Value> {
            let parsed: serde_json::Value = serde_json::from_str(s)
                .map_err(|e| Error::message(format!("json: the value is not JSON ({e})")))?;
            // JSON escapes can spell a line break the raw screen never saw.
            if has_control(&parsed) {
                return Err(Error::message(
                    "json: a decoded string holds a control character or line separator",
                ));
            }
            Ok(Value::from_serializable(&parsed))
        },
    );
    tera.register_filter(
        "split",
        |s: &str, kw: Kwargs, _: &State| -> TeraResult<Vec<String>> {
            let sep = match kw.get::<&str>("sep")? {
                Some(sep) => sep,
                None => kw.must_get::<&str>("pat")?,
            };
            Ok(s.split(sep).map(str::to_owned).collect())
        },
    );
}

/// Whether any string (or key) inside a JSON value holds a control character or line separator.
fn has_control(v: &serde_json::Value) -> bool {
    let bad = |s: &str| {
        s.chars()
            .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    };
    match v {
        serde_json::Value::String(s) => bad(s),
        serde_json::Value::Array(a) => a.iter().any(has_control),
        serde_json::Value::Object(m) => m.iter().any(|(k, v)| bad(k) || has_control(v)),
        _ => false,
    }
}

/// Registers the functions over the raw key space of `snapshot`, replacing earlier ones.
pub fn register_functions(
    tera: &mut Tera,
    snapshot: &Arc<Snapshot>,
    env: &Arc<BTreeMap<String, String>>,
) {
    let s = Arc::clone(snapshot);
    tera.register_function("getv", move |kw: Kwargs, _: &State| -> TeraResult<Value> {
        let key = kw.must_get::<&str>("key")?;
        match s.kv.get(key) {
            Some(v) => Ok(Value::from(v.as_str())),
            None => match kw.get::<Value>("default")? {
                Some(d) => Ok(d),
                None => Err(Error::message(format!(
                    "getv: key {key:?} does not exist and no default= was given"
                ))),
            },
        }
    });
    let s = Arc::clone(snapshot);
    tera.register_function("exists", move |kw: Kwargs, _: &State| -> TeraResult<bool> {
        Ok(s.kv.contains_key(kw.must_get::<&str>("key")?))
    });
    let s = Arc::clone(snapshot);
    tera.register_function("gets", move |kw: Kwargs, _: &State| -> TeraResult<Value> {
        let pattern = kw.must_get::<&str>("pattern")?;
        let pairs: Vec<Value> = matching(&s, pattern)
            .map(|(k, v)| {
                let mut m = BTreeMap::new();
                m.insert("key", Value::from(k.as_str()));
                m.insert("value", Value::from(v.as_str()));
                Value::from(m)
            })
            .collect();
        Ok(Value::from(pairs))
    });
    let s = Arc::clone(snapshot);
    tera.register_function(
        "getvs",
        move |kw: Kwargs, _: &State| -> TeraResult<Vec<String>> {
            let pattern = kw.must_get::<&str>("pattern")?;
            let mut values: Vec<String> = matching(&s, pattern).map(|(_, v)| v.clone()).collect();
            values.sort();
            Ok(values)
        },
    );
    let s = Arc::clone(snapshot);
    tera.register_function(
        "ls",
        move |kw: Kwargs, _: &State| -> TeraResult<Vec<String>> {
            Ok(children(&s, kw.must_get::<&str>("dir")?, false))
        },
    );
    let s = Arc::clone(snapshot);
    tera.register_function(
        "lsdir",
        move |kw: Kwargs, _: &State| -> TeraResult<Vec<String>> {
            Ok(children(&s, kw.must_get::<&str>("dir")?, true))
        },
    );
    let env = Arc::clone(env);
    tera.register_function(
        "getenv",
        move |kw: Kwargs, _: &State| -> TeraResult<Value> {
            let name = kw.must_get::<&str>("name")?;
            match env.get(name) {
                Some(v) => Ok(Value::from(v.as_str())),
                None => Ok(kw
                    .get::<Value>("default")?
                    .unwrap_or_else(|| Value::from(""))),
            }
        },
    );
}

/// The keys matching a confd glob, in key order.
fn matching<'a>(
    s: &'a Snapshot,
    pattern: &'a str,
) -> impl Iterator<Item = (&'a String, &'a String)> + 'a {
    // Everything before the first wildcard is a literal prefix: start the scan there.
    let literal = pattern
        .find(['*', '?', '['])
        .map_or(pattern, |i| &pattern[..i]);
    s.kv.range(literal.to_owned()..)
        .take_while(move |(k, _)| k.starts_with(literal))
        .filter(move |(k, _)| glob_match(pattern.as_bytes(), k.as_bytes()))
}

/// The names directly below `dir`; with `dirs_only`, only those that have children themselves.
fn children(s: &Snapshot, dir: &str, dirs_only: bool) -> Vec<String> {
    let prefix = if dir.ends_with('/') {
        dir.to_owned()
    } else {
        format!("{dir}/")
    };
    let mut out: Vec<String> = Vec::new();
    for (k, _) in s.kv.range(prefix.clone()..) {
        let Some(rest) = k.strip_prefix(&prefix) else {
            break;
        };
        let (name, deeper) = match rest.split_once('/') {
            Some((name, _)) => (name, true),
            None => (rest, false),
        };
        if name.is_empty() || (dirs_only && !deeper) {
            continue;
        }
        if out.last().map(String::as_str) != Some(name) {
            out.push(name.to_owned());
        }
    }
    out.dedup();
    out
}

/// confd's `base`: the last element of a slash-separated path.
pub fn base(s: &str) -> &str {
    let t = s.trim_end_matches('/');
    if t.is_empty() {
        return if s.is_empty() { "." } else { "/" };
    }
    t.rsplit('/').next().unwrap_or(t)
}

/// confd's `dir`: everything but the last element, without the trailing slash.
pub fn dir(s: &str) -> String {
    let t = s.trim_end_matches('/');
    match t.rfind('/') {
        Some(0) => "/".into(),
        Some(i) => t[..i].to_owned(),
        None => ".".into(),
    }
}

/// Go's `path.Match`, which confd uses: `*` is any run of non-'/' bytes, `?` one non-'/' byte,
/// `[abc]`, `[a-z]` and `[^a]` a class; `\` escapes.
pub fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => {
            let mut i = 0;
            loop {
                if glob_match(rest, &name[i..]) {
                    return true;
                }
                if i == name.len() || name[i] == b'/' {
                    return false;
                }
                i += 1;
            }
        }
        Some((b'?', rest)) => match name.split_first() {
            Some((c, tail)) if *c != b'/' => glob_match(rest, tail),
            _ => false,
        },
        Some((b'[', rest)) => {
            let Some((c, tail)) = name.split_first() else {
                return false;
            };
            let Some(end) = rest.iter().position(|b| *b == b']') else {
                return false;
            };
            let (class, after) = (&rest[..end], &rest[end + 1..]);
            let (negate, class) = match class.split_first() {
                Some((b'^', cls)) => (true, cls),
                _ => (false, class),
            };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= class[i] <= *c && *c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == *c;
                    i += 1;
                }
            }
            hit != negate && *c != b'/' && glob_match(after, tail)
        }
        Some((b'\\', rest)) if !rest.is_empty() => {
            name.first() == rest.first() && glob_match(&rest[1..], &name[1..])
        }
        Some((p, rest)) => name.first() == Some(p) && glob_match(rest, &name[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_follows_go_path_match() {
        for (p, n, want) in [
            ("/upstream/*", "/upstream/a", true),
            ("/upstream/*", "/upstream/a/b", false),
            ("/upstream/*/*", "/upstream/a/b", true),
            ("/a?c", "/abc", true),
            ("/a?c", "/a/c", false),
            ("/x[0-9]", "/x5", true),
            ("/x[^0-9]", "/x5", false),
            ("/lit", "/lit", true),
            ("/lit", "/lite", false),
        ] {
            assert_eq!(glob_match(p.as_bytes(), n.as_bytes()), want, "{p} vs {n}");
        }
    }

    #[test]
    fn base_and_dir_follow_go_path() {
        assert_eq!(base("/services/web/w1"), "w1");
        assert_eq!(base("/services/web/"), "web");
        assert_eq!(base("/"), "/");
        assert_eq!(dir("/services/web/w1"), "/services/web");
        assert_eq!(dir("/services"), "/");
        assert_eq!(dir("w1"), ".");
    }

    #[test]
    fn children_lists_names_and_dirs() {
        let mut s = Snapshot::default();
        for k in ["/a/x", "/a/y/1", "/a/y/2", "/a/z", "/ab/q"] {
            s.kv.insert(k.into(), "v".into());
        }
        assert_eq!(children(&s, "/a", false), vec!["x", "y", "z"]);
        assert_eq!(children(&s, "/a/", true), vec!["y"]);
        assert!(children(&s, "/missing", false).is_empty());
    }
}
