//! Architecture tests, in the spirit of rust-analyzer's tidy tests: they read `src/` and fail
//! when an invariant of ARCHITECTURE.md breaks. Each rule is a function over (path, code)
//! pairs, so that the last test can plant a violation of every rule and see it caught.
//!
//! Only code that runs counts: a file's `#[cfg(test)]` tail, `tests.rs` files and comments
//! are left out.

mod common;

use std::path::Path;

/// A source file: its path under the repository (`src/...`) and its runtime code.
struct Source {
    path: String,
    code: String,
}

/// Every `.rs` file under `src/`, with its tests and comments left out.
fn sources() -> Vec<Source> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src/") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = common::repo();
    let mut files = Vec::new();
    walk(&root.join("src"), &mut files);
    files.sort();
    files
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "tests.rs"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read source");
            let rel = p
                .strip_prefix(&root)
                .expect("under the repository")
                .display()
                .to_string();
            Source {
                path: rel,
                code: runtime_code(&text),
            }
        })
        .collect()
}

/// The code before the first `#[cfg(test)]`, without `//` comments (a `//` that follows `:`,
/// as in `http://`, is kept).
fn runtime_code(text: &str) -> String {
    let runtime = text.split("#[cfg(test)]").next().unwrap_or_default();
    runtime
        .lines()
        .map(|line| {
            let mut cut = line.len();
            let bytes = line.as_bytes();
            for i in 0..bytes.len().saturating_sub(1) {
                if bytes[i] == b'/' && bytes[i + 1] == b'/' && (i == 0 || bytes[i - 1] != b':') {
                    cut = i;
                    break;
                }
            }
            &line[..cut]
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `path:line: token in text` for every line of a source not `allowed` that holds one of
/// `tokens`.
fn find(sources: &[Source], tokens: &[&str], allowed: impl Fn(&str) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for s in sources.iter().filter(|s| !allowed(&s.path)) {
        for (n, line) in s.code.lines().enumerate() {
            if let Some(t) = tokens.iter().find(|t| line.contains(**t)) {
                found.push(format!("{}:{}: `{t}` in {}", s.path, n + 1, line.trim()));
            }
        }
    }
    found
}

/// Only `src/etcd/` names etcd-client; everything else uses its re-exports, so "only one
/// module knows etcd" holds.
fn etcd_client_outside_the_etcd_module(sources: &[Source]) -> Vec<String> {
    find(sources, &["etcd_client"], |p| p.starts_with("src/etcd/"))
}

/// Only `src/haproxy/` starts processes (`haproxy -c`, the supervised HAProxy, reload
/// commands), through `children::spawn`, which the orphan reaper relies on.
fn processes_outside_haproxy(sources: &[Source]) -> Vec<String> {
    find(
        sources,
        &[
            "Command::new(",
            "process::Command",
            "tokio::process",
            "fork(",
            "execv",
        ],
        |p| p.starts_with("src/haproxy/"),
    )
}

/// Only `src/haproxy/` writes files: the live files, their staged copies and `.prev`, the
/// server-state file, the guard's file (through `install::write_atomic`) and `check`'s
/// private directory.
fn file_writes_outside_haproxy(sources: &[Source]) -> Vec<String> {
    find(
        sources,
        &[
            "fs::write(",
            "fs::rename(",
            "File::create(",
            "OpenOptions",
            "remove_file(",
            "set_permissions(",
            "fs::copy(",
            "create_dir",
            "hard_link(",
        ],
        |p| p.starts_with("src/haproxy/"),
    )
}

/// `src/render/` does no I/O and reads no clock: the same snapshot renders the same bytes.
/// The one read of the template files and the one capture of the environment for `getenv`
/// happen in `Templates::load` and `Templates::from_sources`.
fn io_in_render(sources: &[Source]) -> Vec<String> {
    const ALLOWED: [(&str, &str); 2] = [
        ("src/render/mod.rs", "std::fs::read_to_string(&t.src)"),
        ("src/render/mod.rs", "std::env::vars()"),
    ];
    let render: Vec<Source> = sources
        .iter()
        .filter(|s| s.path.starts_with("src/render/"))
        .map(|s| {
            let mut code = s.code.clone();
            for (_, allowed) in ALLOWED.iter().filter(|(p, _)| *p == s.path) {
                // Each allowed use once: a second one is a violation.
                code = code.replacen(allowed, "", 1);
            }
            Source {
                path: s.path.clone(),
                code,
            }
        })
        .collect();
    find(
        &render,
        &[
            "std::fs",
            "File::",
            "std::env",
            "SystemTime",
            "Instant",
            "tokio::",
            "std::net",
            "std::process",
            "std::io::stdin",
        ],
        |_| false,
    )
}

/// Nothing in `src/` prints: the daemons log through the bounded queue (a print to a closed
/// or full stderr would panic or block), the one-shot commands through `logging::line` and
/// `failure::write_stdout`.
fn prints(sources: &[Source]) -> Vec<String> {
    find(
        sources,
        &["print!(", "println!(", "eprint!(", "eprintln!(", "dbg!("],
        |_| false,
    )
}

/// A rule: the violations it finds.
type Rule = fn(&[Source]) -> Vec<String>;

/// No library module imports the CLI layer: `commands` is `main`'s.
fn commands_imported_by_the_library(sources: &[Source]) -> Vec<String> {
    find(sources, &["crate::commands", "commands::"], |p| {
        p == "src/main.rs" || p == "src/commands.rs" || p == "src/lib.rs"
    })
}

const RULES: [(&str, Rule); 6] = [
    (
        "only src/etcd/ names etcd_client",
        etcd_client_outside_the_etcd_module,
    ),
    (
        "only src/haproxy/ starts processes",
        processes_outside_haproxy,
    ),
    (
        "only src/haproxy/ writes files",
        file_writes_outside_haproxy,
    ),
    ("src/render/ does no I/O and reads no clock", io_in_render),
    ("nothing in src/ prints", prints),
    (
        "no library module imports the CLI layer",
        commands_imported_by_the_library,
    ),
];

fn assert_rule(name: &str, found: Vec<String>) {
    assert!(found.is_empty(), "{name}:\n{}", found.join("\n"));
}

#[test]
fn only_the_etcd_module_names_etcd_client() {
    assert_rule(RULES[0].0, RULES[0].1(&sources()));
}

#[test]
fn only_haproxy_starts_processes() {
    assert_rule(RULES[1].0, RULES[1].1(&sources()));
}

#[test]
fn only_haproxy_writes_files() {
    assert_rule(RULES[2].0, RULES[2].1(&sources()));
}

#[test]
fn render_does_no_io_and_reads_no_clock() {
    assert_rule(RULES[3].0, RULES[3].1(&sources()));
}

#[test]
fn no_library_module_imports_the_cli_layer() {
    assert_rule(RULES[5].0, RULES[5].1(&sources()));
}

#[test]
fn nothing_in_src_prints() {
    assert_rule(RULES[4].0, RULES[4].1(&sources()));
    let logging = std::fs::read_to_string(common::repo().join("src/logging.rs")).expect("read");
    assert!(logging.contains(".log_internal_errors(false)"));
}

/// Every rule catches a planted violation, and leaves the same line alone in a test module or
/// a comment.
#[test]
fn each_rule_catches_a_planted_violation() {
    let planted = [
        ("src/announce/mod.rs", "use etcd_client::Client;"),
        (
            "src/daemon.rs",
            "let c = std::process::Command::new(\"sh\");",
        ),
        ("src/guard.rs", "std::fs::write(&path, bytes)?;"),
        (
            "src/render/functions.rs",
            "let now = std::time::Instant::now();",
        ),
        ("src/apply.rs", "eprintln!(\"applied\");"),
        ("src/announce/mod.rs", "use crate::commands::Failure;"),
    ];
    for ((name, rule), (path, line)) in RULES.iter().zip(planted) {
        let code = format!("fn f() {{\n    {line}\n}}\n");
        let found = rule(&[Source {
            path: path.into(),
            code: runtime_code(&code),
        }]);
        assert_eq!(found.len(), 1, "{name} missed `{line}` in {path}");
        for hidden in [
            format!("fn f() {{}}\n#[cfg(test)]\nmod tests {{\n    {line}\n}}\n"),
            format!("fn f() {{\n    // {line}\n}}\n"),
        ] {
            let found = rule(&[Source {
                path: path.into(),
                code: runtime_code(&hidden),
            }]);
            assert!(
                found.is_empty(),
                "{name} flagged test or comment code: {found:?}"
            );
        }
    }
    // The render rule allows its one read of the template files, once.
    let twice =
        "let a = std::fs::read_to_string(&t.src);\nlet b = std::fs::read_to_string(&t.src);";
    let found = io_in_render(&[Source {
        path: "src/render/mod.rs".into(),
        code: twice.into(),
    }]);
    assert_eq!(found.len(), 1, "{found:?}");
}

/// No file in `src/` is over 700 lines (tests included): a file that long holds two ideas.
#[test]
fn no_source_file_is_over_700_lines() {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read src/") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let lines = std::fs::read_to_string(&path)
                    .expect("read")
                    .lines()
                    .count();
                if lines > 700 {
                    out.push(format!("{}: {lines} lines", path.display()));
                }
            }
        }
    }
    let mut long = Vec::new();
    walk(&common::repo().join("src"), &mut long);
    assert!(
        long.is_empty(),
        "split these along their seams:\n{}",
        long.join("\n")
    );
}
