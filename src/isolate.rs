//! One bad registration never freezes the fleet.
//!
//! A value can pass every screen and still make `haproxy -c` fail (with a custom template that
//! puts meta into a directive, say). confd blocks every update until such a key is deleted.
//! Here the error's line numbers are mapped to the services that own those lines; the render is
//! repeated with those services at their last applied state, and the keys held back are
//! reported. Lines that belong to no service (the global section, a template mistake) cannot be
//! isolated: the apply fails as a whole and the last good config stays.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::model::{Registry, Service};

/// Line numbers `haproxy -c` blamed in `file`, from messages like
/// `[ALERT] … : config : [/etc/haproxy/.haproxy.cfg.tmp:14] : 'server be_api/srv2' : …`.
pub fn error_lines(output: &str, file: &str) -> Vec<usize> {
    let needle = format!("[{file}:");
    let mut lines = Vec::new();
    for (start, _) in output.match_indices(&needle) {
        let rest = &output[start + needle.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if rest[digits.len()..].starts_with(']')
            && let Ok(n) = digits.parse::<usize>()
        {
            lines.push(n);
        }
    }
    lines.sort_unstable();
    lines.dedup();
    lines
}

/// Whether `token` names `backend`: the backend itself, or an ACL built on it (`host_be_x`).
pub(crate) fn names_backend(token: &str, backend: &str) -> bool {
    token == backend
        || token
            .strip_suffix(backend)
            .is_some_and(|head| head.ends_with('_'))
}

/// The services that own every line in `lines` of `rendered`, or None when a line belongs to no
/// service (then nothing can be isolated).
pub fn culprits(
    rendered: &str,
    lines: &[usize],
    services: &[Arc<Service>],
) -> Option<BTreeSet<String>> {
    if lines.is_empty() {
        return None;
    }
    let text: Vec<&str> = rendered.lines().collect();
    let mut out = BTreeSet::new();
    for &n in lines {
        let line = *text.get(n.checked_sub(1)?)?;
        // The section the line is in: the last unindented line at or above it.
        let section = text[..n]
            .iter()
            .rev()
            .find(|l| l.starts_with(|c: char| !c.is_whitespace()) && !l.starts_with('#'))?;
        let mut words = section.split_whitespace();
        let owner = match (words.next(), words.next()) {
            (Some("backend"), Some(name)) => services.iter().find(|s| s.backend == name),
            _ => None,
        };
        // A line outside a service's backend may still be about one service only (an ACL or a
        // use_backend rule in the frontend).
        let owner = owner.or_else(|| {
            let mut about = services.iter().filter(|s| {
                line.split_whitespace()
                    .any(|t| names_backend(t, &s.backend))
            });
            match (about.next(), about.next()) {
                (Some(s), None) => Some(s),
                _ => None,
            }
        })?;
        out.insert(owner.name.clone());
    }
    Some(out)
}

/// `wanted` with the services in `names` put back to their state in `last` (or left out when
/// they are new), and the keys whose changes are held back by it.
pub fn revert(
    mut wanted: Registry,
    last: &Registry,
    names: &BTreeSet<String>,
) -> (Registry, Vec<String>) {
    let mut held_back = Vec::new();
    for name in names {
        let old = last.services.iter().find(|s| &s.name == name);
        let new = wanted.services.iter().find(|s| &s.name == name);
        if let Some(new) = new {
            for inst in &new.instances {
                let same = old
                    .and_then(|o| o.instances.iter().find(|i| i.id == inst.id))
                    .is_some_and(|i| {
                        i.addr == inst.addr
                            && i.weight == inst.weight
                            && i.state == inst.state
                            && i.meta == inst.meta
                    });
                if !same {
                    held_back.push(format!("/services/{name}/{}", inst.id));
                }
            }
            if old.map(|o| &o.route) != Some(&new.route) && new.route.is_some() {
                held_back.push(format!("/routes/{name}"));
            }
        }
        if let Some(old) = old {
            for inst in &old.instances {
                let kept = new.is_some_and(|n| n.instances.iter().any(|i| i.id == inst.id));
                if !kept {
                    held_back.push(format!("/services/{name}/{} (deletion)", inst.id));
                }
            }
        }
        wanted.services.retain(|s| &s.name != name);
        if let Some(old) = old {
            wanted.services.push(old.clone());
        }
    }
    wanted.services.sort_by(|a, b| a.name.cmp(&b.name));
    (wanted, held_back)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Snapshot;

    fn registry(pairs: &[(&str, &str)]) -> Registry {
        let (snap, _) = Snapshot::screen(
            1,
            &["/services/".to_owned(), "/routes/".to_owned()],
            pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
        );
        Registry::parse(&snap).0
    }

    const OUTPUT: &str = "[NOTICE]   (1) : haproxy version is 2.6.12\n\
        [ALERT]    (1) : config : [/d/.h.cfg.tmp:9] : 'server be_api/srv2' : unknown keyword 'x'\n\
        [ALERT]    (1) : config : [/d/.h.cfg.tmp:4] : error detected\n\
        [ALERT]    (1) : config : Fatal errors found in configuration.\n";

    #[test]
    fn error_lines_are_read_for_the_staged_file_only() {
        assert_eq!(error_lines(OUTPUT, "/d/.h.cfg.tmp"), vec![4, 9]);
        assert!(error_lines(OUTPUT, "/other").is_empty());
    }

    #[test]
    fn lines_map_to_their_services() {
        let reg = registry(&[
            ("/services/api/a", "127.0.0.1:1"),
            ("/services/web/w", "127.0.0.1:2"),
        ]);
        let text = "global\n    master-worker\nfrontend fe\n    acl host_be_api var(txn.host) -m str api\n    use_backend be_web if host_be_web\nbackend be_api\n    server srv1 127.0.0.1:1\nbackend be_web\n    server srv1 127.0.0.1:2\n";
        let names = |lines: &[usize]| {
            culprits(text, lines, &reg.services).map(|s| s.into_iter().collect::<Vec<_>>())
        };
        assert_eq!(names(&[7]), Some(vec!["api".to_owned()]));
        assert_eq!(
            names(&[4, 9]),
            Some(vec!["api".to_owned(), "web".to_owned()])
        );
        assert_eq!(names(&[5]), Some(vec!["web".to_owned()]));
        assert_eq!(
            names(&[2]),
            None,
            "the global section belongs to no service"
        );
        assert_eq!(names(&[99]), None);
    }

    #[test]
    fn revert_keeps_the_last_state_and_names_held_back_keys() {
        let last = registry(&[
            ("/services/api/a", "127.0.0.1:1"),
            ("/services/web/w", "127.0.0.1:2"),
        ]);
        let wanted = registry(&[
            ("/services/api/a", "127.0.0.1:9"),
            ("/services/api/b", "127.0.0.1:8"),
            ("/services/new/n", "127.0.0.1:7"),
            ("/services/web/w", "127.0.0.1:3"),
        ]);
        let names: BTreeSet<String> = ["api".to_owned(), "new".to_owned()].into();
        let (reg, held) = revert(wanted, &last, &names);
        let api = reg
            .services
            .iter()
            .find(|s| s.name == "api")
            .expect("api kept");
        assert_eq!(api.instances.len(), 1);
        assert_eq!(api.instances[0].addr, "127.0.0.1:1");
        assert!(reg.services.iter().all(|s| s.name != "new"));
        let web = reg.services.iter().find(|s| s.name == "web").expect("web");
        assert_eq!(
            web.instances[0].addr, "127.0.0.1:3",
            "other services still change"
        );
        assert_eq!(
            held,
            vec!["/services/api/a", "/services/api/b", "/services/new/n"]
        );
    }
}
