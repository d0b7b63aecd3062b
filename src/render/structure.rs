//! The structural check: directives that may only come from a template's own text.
//!
//! Data can never add a line to the output through the default template (the raw screen
//! forbids line breaks), but a custom template can turn data into lines, for instance through
//! the `json` or `split` filters. Directives that run code, change privileges or open sockets
//! must therefore not appear more often in the rendered output than in the template source;
//! otherwise the render is refused, naming the template and the line.

use std::collections::BTreeMap;

/// Directives (first words of a line) that only a template's own text may write.
pub const GUARDED: &[&str] = &[
    "lua-load",
    "lua-load-per-thread",
    "lua-prepend-path",
    "external-check",
    "insecure-fork-wanted",
    "insecure-setuid-wanted",
    "stats socket",
    "program",
    "setenv",
    "presetenv",
    "resetenv",
    "unsetenv",
    "user",
    "group",
    "chroot",
    "global",
];

/// The guarded directive a line starts with, if any.
fn directive(line: &str) -> Option<&'static str> {
    let mut words = line.split_whitespace();
    let first = words.next()?;
    GUARDED.iter().copied().find(|d| match d.split_once(' ') {
        Some((a, b)) => first == a && words.clone().next() == Some(b),
        None => first == *d,
    })
}

/// How often each guarded directive starts a line of `text`.
pub fn count(text: &str) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some(d) = directive(line) {
            *out.entry(d).or_insert(0) += 1;
        }
    }
    out
}

/// A guarded directive that appears in the output more often than in the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub directive: &'static str,
    /// 1-based line number in the rendered output of the first excess occurrence.
    pub line: usize,
    pub in_template: usize,
}

/// Checks `output` against the counts of its template source.
pub fn check(allowed: &BTreeMap<&'static str, usize>, output: &str) -> Result<(), Violation> {
    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    for (i, line) in output.lines().enumerate() {
        if let Some(d) = directive(line) {
            let n = seen.entry(d).or_insert(0);
            *n += 1;
            let limit = allowed.get(d).copied().unwrap_or(0);
            if *n > limit {
                return Err(Violation {
                    directive: d,
                    line: i + 1,
                    in_template: limit,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_template_passes_its_own_check() {
        let src = include_str!("../../templates/haproxy.cfg.tera");
        let allowed = count(src);
        assert_eq!(allowed.get("global"), Some(&1));
        assert_eq!(allowed.get("stats socket"), Some(&1));
        assert!(check(&allowed, "global\n    stats socket /x mode 600\n").is_ok());
    }

    #[test]
    fn extra_directive_from_data_is_refused_with_its_line() {
        let allowed = count("global\n    master-worker\nbackend b\n    server {{ x }}\n");
        let out = "global\n    master-worker\nbackend b\n    server a 127.0.0.1:1\n    lua-load /tmp/evil.lua\nglobal\n";
        assert_eq!(
            check(&allowed, out),
            Err(Violation {
                directive: "lua-load",
                line: 5,
                in_template: 0
            })
        );
        let out = "global\nglobal\n";
        assert_eq!(
            check(&allowed, out).map_err(|v| (v.directive, v.line)),
            Err(("global", 2))
        );
    }

    #[test]
    fn words_inside_lines_do_not_count() {
        let allowed = count("backend b\n");
        assert!(
            check(
                &allowed,
                "backend b\n    server user 127.0.0.1:1\n    # global\n"
            )
            .is_ok()
        );
        assert!(check(&allowed, "backend b\n    stats enable\n").is_ok());
    }
}
