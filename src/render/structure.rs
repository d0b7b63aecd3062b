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

/// The first words of [`GUARDED`] (a test holds the two lists in step).
const GUARDED_FIRST: &[&[u8]] = &[
    b"lua-load",
    b"lua-load-per-thread",
    b"lua-prepend-path",
    b"external-check",
    b"insecure-fork-wanted",
    b"insecure-setuid-wanted",
    b"stats",
    b"program",
    b"setenv",
    b"presetenv",
    b"resetenv",
    b"unsetenv",
    b"user",
    b"group",
    b"chroot",
    b"global",
];

/// What a line's first word is counted as when HAProxy would build it from an environment
/// variable: its value is not known here, so it may spell any guarded directive.
pub const VARIABLE_KEYWORD: &str = "a keyword spelled with an environment variable";

/// The first `n` words of a config line as HAProxy 2.6's `parse_line` reads them: quotes
/// removed, backslash escapes decoded, a `#` outside quotes ends the line, and so does a CR.
/// A word that expands an environment variable (`"${X}"`, `"$X"`) is None.
fn haproxy_words(line: &str, n: usize) -> Vec<Option<Vec<u8>>> {
    let b = line.as_bytes();
    let mut words = Vec::new();
    let (mut word, mut started, mut variable) = (Vec::new(), false, false);
    let (mut squote, mut dquote) = (false, false);
    let mut i = 0;
    while i < b.len() && words.len() < n {
        let c = b[i];
        i += 1;
        match c {
            b'\r' | b'\n' | b'\0' => break,
            b'#' if !squote && !dquote => break,
            b'"' if !squote => dquote = !dquote,
            b'\'' if !dquote => squote = !squote,
            b'\\' if !squote => {
                let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
                let (byte, used) = match b.get(i) {
                    Some(&e @ (b' ' | b'\\' | b'#' | b'\'' | b'"')) => (e, 1),
                    Some(b'$') if dquote => (b'$', 1),
                    Some(b't') => (b'\t', 1),
                    Some(b'n') => (b'\n', 1),
                    Some(b'r') => (b'\r', 1),
                    Some(b'x') if hex(i + 1) && hex(i + 2) => {
                        let digits = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("00");
                        (u8::from_str_radix(digits, 16).unwrap_or(0), 3)
                    }
                    _ => (b'\\', 0),
                };
                word.push(byte);
                i += used;
            }
            b' ' | b'\t' | b'\x0b' | b'\x0c' if !squote && !dquote => {
                if started {
                    words.push((!variable).then(|| std::mem::take(&mut word)));
                    (started, variable) = (false, false);
                    word.clear();
                }
                continue;
            }
            b'$' if dquote => variable = true,
            _ => word.push(c),
        }
        started = true;
    }
    if started && words.len() < n {
        words.push((!variable).then_some(word));
    }
    words
}

/// The first word of `line` when HAProxy reads it exactly as written: letters, digits, `-`,
/// `_` and `.` only, ended by a blank or the end of the line. None when it takes the full
/// reading (quotes, escapes, variables, comments), or when the line is blank.
fn plain_first_word(line: &str) -> Option<&[u8]> {
    let b = line.as_bytes();
    let blank = |c: &u8| matches!(c, b' ' | b'\t' | b'\x0b' | b'\x0c');
    let start = b.iter().position(|c| !blank(c))?;
    let rest = &b[start..];
    let end = rest
        .iter()
        .position(|c| !(c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')))
        .unwrap_or(rest.len());
    (end > 0 && rest.get(end).is_none_or(blank)).then_some(&rest[..end])
}

/// The guarded directive a line starts with, if any, read the way HAProxy reads it: quoting or
/// escaping a keyword (`"lua-load"`, `lua\x2dload`) does not hide it.
fn directive(line: &str) -> Option<&'static str> {
    // Most lines start with a plain keyword that begins no guarded directive: skip the full
    // reading, which allocates (a megabyte of output is 20,000 lines).
    if let Some(first) = plain_first_word(line)
        && !GUARDED_FIRST.contains(&first)
    {
        return None;
    }
    let words = haproxy_words(line, 2);
    let first = words.first()?.as_deref();
    let second = words.get(1).and_then(|w| w.as_deref());
    let Some(first) = first else {
        return Some(VARIABLE_KEYWORD);
    };
    if first == b"stats" && words.get(1).is_some_and(Option::is_none) {
        return Some(VARIABLE_KEYWORD);
    }
    GUARDED.iter().copied().find(|d| match d.split_once(' ') {
        Some((a, b)) => first == a.as_bytes() && second == Some(b.as_bytes()),
        None => first == d.as_bytes(),
    })
}

/// The text without its tera comments (`{# … #}`), which never reach the output.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{#") {
        out.push_str(&rest[..start]);
        rest = rest[start + 2..]
            .find("#}")
            .map_or("", |end| &rest[start + 2 + end + 2..]);
    }
    out.push_str(rest);
    out
}

/// How often each guarded directive starts a line of template source `text` (tera comments
/// left out: a directive named in a comment is not one the template writes).
pub fn count(text: &str) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for line in strip_comments(text).lines() {
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
    fn guarded_first_words_follow_the_guarded_list() {
        let firsts: Vec<&[u8]> = GUARDED
            .iter()
            .map(|d| d.split(' ').next().unwrap_or(d).as_bytes())
            .collect();
        assert_eq!(firsts, GUARDED_FIRST);
    }

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

    /// Regression: HAProxy reads `"lua-load"`, `'lua-'load`, `lua\x2dload` and
    /// `"${UNSET}lua-load"` as `lua-load` (and runs the script during `haproxy -c`), so a
    /// custom template that splits a value with quotes into lines got past the check.
    #[test]
    fn quoted_escaped_or_variable_keywords_count() {
        let allowed = count("global\n    stats socket /x\n{{ x }}\n");
        for line in [
            "\"lua-load\" /tmp/x.lua",
            "  'lua-'load /tmp/x.lua",
            "lua\"-\"load /tmp/x.lua",
            "lua\\x2dload /tmp/x.lua",
            "lua\\x2Dload /tmp/x.lua",
            "lua-load#comment",
            "\"glo\"bal",
            "stats \"socket\" /tmp/s",
            "stats\tso'cket' /tmp/s",
        ] {
            let out = format!("global\n    stats socket /x\n{line}\n");
            let v = check(&allowed, &out).expect_err(line);
            assert_eq!(v.line, 3, "{line}");
            assert_ne!(v.directive, VARIABLE_KEYWORD, "{line}");
        }
        for line in [
            "\"${UNSET}lua-load\" /tmp/x.lua",
            "\"${UNSET-lua-load}\" /tmp/x.lua",
            "\"$X\"",
            "stats \"${S}\" /tmp/s",
        ] {
            let out = format!("global\n{line}\n");
            let v = check(&allowed, &out).expect_err(line);
            assert_eq!((v.directive, v.line), (VARIABLE_KEYWORD, 2), "{line}");
        }
        // What HAProxy does not read as a guarded keyword passes.
        for line in [
            "\\x22lua-load\\x22 /x",
            "\\lua-load /x",
            "lua-load\\  /x",
            "\"\" lua-load /x",
            "$HOME lua-load",
            "\"\\${X}\" y",
            "server a 127.0.0.1:1 \"lua-load\"",
            "stats enable",
        ] {
            let out = format!("global\n{line}\n");
            assert!(check(&allowed, &out).is_ok(), "{line}");
        }
    }

    /// Regression: a directive named at the start of a line of a multi-line tera comment
    /// counted as one the template writes, so data could add it once.
    #[test]
    fn directives_in_tera_comments_are_not_allowed() {
        let allowed = count("{#\nlua-load is never written here\n#}\nbackend b\n{#- global -#}\n");
        assert!(allowed.is_empty(), "{allowed:?}");
        assert_eq!(
            check(&allowed, "\nbackend b\n    lua-load /tmp/x.lua\n").map_err(|v| v.line),
            Err(3)
        );
        let allowed = count("{# a #}lua-load /x {# b\n#}\n{# unterminated\nglobal\n");
        assert_eq!(allowed.get("lua-load"), Some(&1));
        assert_eq!(allowed.get("global"), None);
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
