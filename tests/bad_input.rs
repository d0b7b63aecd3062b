//! Hostile and malformed registry values, through the file source.
//!
//! Each case writes a registry file holding one good instance and one bad key, runs
//! `haconfd render --print`, and checks that the bad key is skipped (its server is not rendered),
//! named by key on stderr, counted, and that a canary string from its value never reaches stdout
//! or stderr. A property test then feeds arbitrary bytes as one instance's value and checks every
//! `server` line of the render against a strict hand-written grammar.

mod common;

use std::cell::RefCell;
use std::sync::Arc;

use common::haproxy::{Opts, Workspace};
use haconfd::config::Config;
use haconfd::metrics::Metrics;
use haconfd::model::{Registry, Snapshot};
use haconfd::render::Templates;
use haconfd::source::{Update, file};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};

/// The good instance every registry holds, and its rendered line.
const GOOD_LINE: &str = "    server srv1 127.0.0.1:8080 weight 100  # good\n";

/// One bad key: where it sits, its value as a raw JSON literal (bytes, so that a case can hold
/// bytes that are not UTF-8), and a canary that occurs in the value only.
struct Case {
    name: &'static str,
    key: String,
    literal: Vec<u8>,
    canary: &'static str,
}

fn case(name: &'static str, key: &str, literal: impl AsRef<[u8]>, canary: &'static str) -> Case {
    Case {
        name,
        key: key.to_owned(),
        literal: literal.as_ref().to_vec(),
        canary,
    }
}

fn cases() -> Vec<Case> {
    let big = format!("\"127.0.0.1:80bigcanary{}\"", "x".repeat(70 * 1024));
    vec![
        case(
            "port 99999",
            "/services/web/port",
            r#""k9canary-p:99999""#,
            "k9canary",
        ),
        case(
            "newline",
            "/services/web/nl",
            r#""127.0.0.1:80\nnlcanary""#,
            "nlcanary",
        ),
        case(
            "CR",
            "/services/web/cr",
            r#""127.0.0.1:80\rcrcanary""#,
            "crcanary",
        ),
        case(
            "NUL",
            "/services/web/nul",
            r#""127.0.0.1:80\u0000nulcanary""#,
            "nulcanary",
        ),
        case(
            "#",
            "/services/web/hash",
            r##""127.0.0.1:80#hashcanary""##,
            "hashcanary",
        ),
        case(
            "space",
            "/services/web/space",
            r#""127.0.0.1:80 spcanary""#,
            "spcanary",
        ),
        case(
            ";",
            "/services/web/semi",
            r#""127.0.0.1:80;semicanary""#,
            "semicanary",
        ),
        case(
            "quotes",
            "/services/web/quote",
            r#""127.0.0.1:80\"qcanary'""#,
            "qcanary",
        ),
        case(
            "$",
            "/services/web/dollar",
            r#""127.0.0.1:80$dolcanary""#,
            "dolcanary",
        ),
        case(
            "backslash",
            "/services/web/bs",
            r#""127.0.0.1:80\\bscanary""#,
            "bscanary",
        ),
        case(
            "tab",
            "/services/web/tab",
            r#""127.0.0.1:80\ttabcanary""#,
            "tabcanary",
        ),
        case(
            "U+2028",
            "/services/web/ls",
            r#""127.0.0.1:80\u2028lscanary""#,
            "lscanary",
        ),
        case("70 KB", "/services/web/big", big, "bigcanary"),
        // The value would be a good address: only the key is wrong.
        case(
            "bad instance id",
            "/services/web/bad@id",
            r#""idcanary-h:8080""#,
            "idcanary",
        ),
        case(
            "bad service name",
            "/services/web@x/i1",
            r#""svccanary-h:8080""#,
            "svccanary",
        ),
        case(
            "space in key",
            "/services/web/a b",
            r#""keycanary-h:8080""#,
            "keycanary",
        ),
        // The address would be good: only the extra field is wrong.
        case(
            "unknown JSON field",
            "/services/web/field",
            r#""{\"addr\":\"fieldcanary-h:8080\",\"colour\":\"red\"}""#,
            "fieldcanary",
        ),
        case(
            "weight 300",
            "/services/web/w300",
            r#""{\"addr\":\"wcanary-h:8080\",\"weight\":300}""#,
            "wcanary",
        ),
        case(
            "state up",
            "/services/web/up",
            r#""{\"addr\":\"stcanary-h:8080\",\"state\":\"up\"}""#,
            "stcanary",
        ),
        case(
            "weight as text",
            "/services/web/wtext",
            r#""{\"addr\":\"127.0.0.1:80\",\"weight\":\"x, expected wtcanary\"}""#,
            "wtcanary",
        ),
        case(
            "non-UTF-8 bytes",
            "/services/web/utf8",
            b"\"127.0.0.1:80\xff\xfeutfcanary\"",
            "utfcanary",
        ),
        case(
            "route host with ;",
            "/routes/web",
            r#""{\"hosts\":[\"routecanary.localhost;x\"]}""#,
            "routecanary",
        ),
    ]
}

/// A JSON registry with the good instance and `bad` keys, their values spliced in as raw bytes.
fn registry_json(bad: &[&Case]) -> Vec<u8> {
    let mut tree = serde_json::json!({"services": {"web": {"good": "127.0.0.1:8080"}}});
    for (i, c) in bad.iter().enumerate() {
        let segs: Vec<&str> = c.key.trim_start_matches('/').split('/').collect();
        let mut node = &mut tree;
        for s in &segs[..segs.len() - 1] {
            node = node
                .as_object_mut()
                .expect("a map")
                .entry(s.to_string())
                .or_insert_with(|| serde_json::json!({}));
        }
        node.as_object_mut()
            .expect("a map")
            .insert(segs[segs.len() - 1].to_owned(), format!("@@V{i}@@").into());
    }
    let mut text = serde_json::to_vec(&tree).expect("serialize");
    for (i, c) in bad.iter().enumerate() {
        let placeholder = format!("\"@@V{i}@@\"");
        let at = text
            .windows(placeholder.len())
            .position(|w| w == placeholder.as_bytes())
            .expect("placeholder");
        text.splice(at..at + placeholder.len(), c.literal.iter().copied());
    }
    text
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn server_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.trim_start().starts_with("server "))
        .collect()
}

fn non_spare(text: &str) -> usize {
    server_lines(text)
        .iter()
        .filter(|l| l.contains("  # "))
        .count()
}

/// Renders `ws`'s registry through the library: the rendered bytes and the rejected-key count.
fn library_render(ws: &Workspace) -> (Vec<u8>, u64) {
    let config = Config::load(&ws.config).expect("config");
    let mut templates = Templates::load(&config).expect("templates");
    let update = Update::screen(
        1,
        &config.source.prefixes,
        file::read(&ws.registry).expect("read registry"),
    );
    let metrics = Metrics::default();
    let rendered =
        haconfd::apply::render(&mut templates, &update, &metrics).expect("render succeeds");
    (rendered[0].bytes.clone(), metrics.rejected())
}

/// Runs one set of bad keys; returns the problems found, empty when all is well.
fn run(label: &str, bad: &[&Case]) -> Vec<String> {
    let ws = Workspace::new("json");
    ws.write_config(&Opts::default());
    ws.write_registry(registry_json(bad));
    let out = ws.haconfd(&["render", "--print"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems = Vec::new();
    let mut fail = |what: String| problems.push(format!("{label}: {what}"));
    if out.status.code() != Some(0) {
        fail(format!("exit {:?}; stderr:\n{stderr}", out.status.code()));
        return problems;
    }
    if !stdout.contains(GOOD_LINE) {
        fail(format!("the good instance is not rendered:\n{stdout}"));
    }
    if non_spare(&stdout) != 1 {
        fail(format!(
            "expected one server line:\n{:?}",
            server_lines(&stdout)
        ));
    }
    if bad.iter().any(|c| c.key.starts_with("/routes/")) && stdout.contains("routecanary") {
        fail("the bad route was rendered".into());
    }
    for c in bad {
        if contains(&out.stdout, c.canary) {
            fail(format!("[{}] canary {} in stdout", c.name, c.canary));
        }
        if contains(&out.stderr, c.canary) {
            fail(format!(
                "[{}] canary {} in stderr:\n{stderr}",
                c.name, c.canary
            ));
        }
        let shown = format!("key={:?}", c.key);
        if !stderr
            .lines()
            .any(|l| l.contains("key left out") && l.contains(&shown))
        {
            fail(format!(
                "[{}] stderr does not name {shown}:\n{stderr}",
                c.name
            ));
        }
    }
    let (bytes, rejected) = library_render(&ws);
    if bytes != out.stdout {
        fail("the library render differs from render --print".into());
    }
    if rejected != bad.len() as u64 {
        fail(format!(
            "{rejected} key(s) counted as rejected, want {}",
            bad.len()
        ));
    }
    problems
}

#[test]
fn each_bad_value_is_skipped_named_by_key_and_never_shown() {
    let all = cases();
    let problems: Vec<String> = all.iter().flat_map(|c| run(c.name, &[c])).collect();
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

#[test]
fn all_bad_values_together_leave_the_good_key() {
    let all = cases();
    let refs: Vec<&Case> = all.iter().collect();
    let problems = run("all together", &refs);
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// `check` proves the render that remains and says how many keys it left out.
#[test]
fn check_counts_the_keys_left_out() {
    let all = cases();
    let refs: Vec<&Case> = all.iter().collect();
    let ws = Workspace::new("json");
    ws.write_config(&Opts::default());
    ws.write_registry(registry_json(&refs));
    let out = ws.haconfd(&["check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("{} key(s) left out", all.len())),
        "{stderr}"
    );
    for c in &all {
        assert!(!contains(&out.stderr, c.canary), "{}: {stderr}", c.name);
    }
}

/// YAML files take the same path: a newline and a NUL through YAML escapes, and raw non-UTF-8.
#[test]
fn yaml_registry_skips_bad_values_too() {
    let ws = Workspace::new("yaml");
    ws.write_config(&Opts::default());
    ws.write_registry(
        b"services:\n  web:\n    good: \"127.0.0.1:8080\"\n    nl: \"127.0.0.1:80\\nyamlcanary\"\n    nul: \"127.0.0.1:80\\0yamlcanary\"\n    raw: \"127.0.0.1:80\xc3\x28yamlcanary\"\n"
            .as_slice(),
    );
    let out = ws.haconfd(&["render", "--print"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains(GOOD_LINE), "{stdout}");
    assert_eq!(non_spare(&stdout), 1, "{stdout}");
    assert!(!contains(&out.stdout, "yamlcanary") && !contains(&out.stderr, "yamlcanary"));
    for k in ["nl", "nul", "raw"] {
        assert!(
            stderr.contains(&format!("key=\"/services/web/{k}\"")),
            "{stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Property: arbitrary bytes as one instance's value never produce an unsafe server line.
// ---------------------------------------------------------------------------------------------

/// A strict grammar for the default template's server lines, written by hand:
/// `    server srvK ADDR weight N[ disabled]  # ID` where K is a slot number, ADDR is a dotted
/// IPv4, a bracketed IPv6 or a lower-case host name with a port from 1 to 65535, N is 0 to 256
/// and ID an instance id. Free slots are `    server srvK 127.0.0.1:1 disabled`.
fn server_line_ok(line: &str) -> bool {
    if line == common::LAME_DUCK_SERVER_LINE {
        return true;
    }
    let Some(rest) = line.strip_prefix("    server ") else {
        return false;
    };
    let (rest, id) = match rest.split_once("  # ") {
        Some((r, id)) => (r, Some(id)),
        None => (rest, None),
    };
    let f: Vec<&str> = rest.split(' ').collect();
    let slot_ok = f[0]
        .strip_prefix("srv")
        .is_some_and(|k| number_in(k, 1, 100_000));
    let Some(id) = id else {
        return f.len() == 3 && slot_ok && f[1] == "127.0.0.1:1" && f[2] == "disabled";
    };
    let tail_ok = match f.len() {
        4 => true,
        5 => f[4] == "disabled",
        _ => false,
    };
    tail_ok && slot_ok && name_ok(id) && addr_ok(f[1]) && f[2] == "weight" && weight_ok(f[3])
}

fn name_ok(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn number_in(s: &str, lo: u32, hi: u32) -> bool {
    !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'))
        && s.parse::<u32>().is_ok_and(|n| (lo..=hi).contains(&n))
}

fn weight_ok(s: &str) -> bool {
    number_in(s, 0, 256)
}

fn addr_ok(s: &str) -> bool {
    if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, port)) = rest.split_once("]:") else {
            return false;
        };
        return !ip.is_empty()
            && ip
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && ip.parse::<std::net::Ipv6Addr>().is_ok()
            && number_in(port, 1, 65535);
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    if !number_in(port, 1, 65535) {
        return false;
    }
    let octets: Vec<&str> = host.split('.').collect();
    if octets.len() == 4 && octets.iter().all(|o| number_in(o, 0, 255)) {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let labels: Vec<&str> = name.split('.').collect();
    (1..=253).contains(&name.len())
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
        && !labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// Replaces slot numbers in server lines (`server srv12 `) with `srv#`.
fn unslotted(text: &str) -> String {
    text.split_inclusive('\n')
        .map(|l| match l.strip_prefix("    server srv") {
            Some(rest) => {
                let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
                format!("    server srv#{}", &rest[digits..])
            }
            None => l.to_owned(),
        })
        .collect()
}

#[test]
fn the_matcher_is_strict() {
    for good in [
        "    server srv1 127.0.0.1:8080 weight 100  # i0",
        "    server srv2 [::1]:1 weight 0 disabled  # i1",
        "    server srv3 localhost:65535 weight 256  # i1",
        "    server srv4 127.0.0.1:1 disabled",
    ] {
        assert!(server_line_ok(good), "{good:?}");
    }
    for bad in [
        "    server srv2 127.0.0.1:8080 weight 100  # i1 ",
        "    server srv2 127.0.0.1:8080 weight 257  # i1",
        "    server srv2 127.0.0.1:0 weight 1  # i1",
        "    server srv2 127.0.0.1:65536 weight 1  # i1",
        "    server srv2 127.0.0.1:80;x weight 1  # i1",
        "    server srv2 127.0.0.1:80 weight 1 backup  # i1",
        "    server srv2 Localhost:80 weight 1  # i1",
        "    server srv2 [::1%lo]:80 weight 1  # i1",
        "    server srv2 1.2.3:80 weight 1  # i1",
        "    server srv2 127.0.0.1:80#x weight 1  # i1",
        "    server srv2 127.0.0.1:80 weight 1  # -i1",
        "    server srv2 127.0.0.1:80 weight 1  # i1 x",
        "    server srv2  127.0.0.1:80 weight 1  # i1",
        "    server srv2 127.0.0.1:80\tweight 1  # i1",
        "    server srv2 127.0.0.1:80 weight 1",
        "    server i1 127.0.0.1:80 weight 1  # i1",
        "    server srv2 127.0.0.2:1 disabled",
    ] {
        assert!(!server_line_ok(bad), "{bad:?}");
    }
}

/// Values that are mostly near-misses of good ones: an address or a JSON object with bytes
/// spliced in, and plain arbitrary bytes.
fn value_strategy() -> impl Strategy<Value = Vec<u8>> {
    let host = prop_oneof![
        Just("127.0.0.1".to_owned()),
        Just("[::1]".to_owned()),
        Just("localhost".to_owned()),
        "[a-zA-Z0-9.:\\[\\]_-]{0,20}",
    ];
    let port = prop_oneof![(0u32..70000).prop_map(|p| p.to_string()), "[0-9+ -]{0,7}",];
    let nasty = prop::collection::vec(
        prop_oneof![
            Just(b"\n".to_vec()),
            Just(b"\r".to_vec()),
            Just(b"\0".to_vec()),
            Just(b"\t".to_vec()),
            Just(b" ".to_vec()),
            Just(b"#".to_vec()),
            Just(b";".to_vec()),
            Just(b"$".to_vec()),
            Just(b"\\".to_vec()),
            Just(b"\"".to_vec()),
            Just(b"'".to_vec()),
            Just("\u{2028}".as_bytes().to_vec()),
            Just(b"\xff".to_vec()),
            Just(b" backup".to_vec()),
            Just(b"\n    server evil 127.0.0.9:80".to_vec()),
            prop::collection::vec(any::<u8>(), 0..4),
        ],
        0..3,
    )
    .prop_map(|v| v.concat());
    let addr = (host, port).prop_map(|(h, p)| format!("{h}:{p}"));
    let plain = (addr.clone(), nasty.clone()).prop_map(|(a, n)| [a.into_bytes(), n].concat());
    let json = (addr, 0i64..400, "[a-z]{0,6}", nasty).prop_map(|(a, w, st, n)| {
        let mut v = format!(r#"{{"addr":"{a}","weight":{w},"state":"{st}""#).into_bytes();
        v.extend(n);
        v.extend_from_slice(b"}");
        v
    });
    prop_oneof![
        2 => plain,
        2 => json,
        1 => prop::collection::vec(any::<u8>(), 0..48),
    ]
}

#[test]
fn arbitrary_values_never_break_a_server_line() {
    let config = Config::parse(
        &format!(
            r#"
[source]
kind = "file"
[file]
path = "unused.yaml"
[[template]]
name = "haproxy"
src = "{}"
dest = "/run/haconfd-test/haproxy.cfg"
[haproxy]
mode = "none"
spare_slots = 1
[frontend]
bind = ["127.0.0.1:18080"]
"#,
            common::repo().join("templates/haproxy.cfg.tera").display()
        ),
        "tests/bad_input.rs",
    )
    .expect("config");
    let templates = RefCell::new(Templates::load(&config).expect("templates"));
    let prefixes = config.source.prefixes.clone();
    let render = |value: &[u8]| {
        let raw: [(&[u8], &[u8]); 2] = [
            (b"/services/svc/i0", b"127.0.0.1:8080"),
            (b"/services/svc/i1", value),
        ];
        let (snapshot, _) = Snapshot::screen(1, &prefixes, raw);
        let (mut registry, _) = Registry::parse(&snapshot);
        let spare = templates.borrow().spare_slots();
        haconfd::slots::Slots::default().assign(&mut registry, spare, true);
        let out = templates
            .borrow_mut()
            .render_all(&Arc::new(snapshot), &registry)
            .expect("render");
        (
            String::from_utf8(out[0].bytes.clone()).expect("UTF-8"),
            registry.instance_count(),
        )
    };
    // The render with the good instance alone (i1 rejected): every other render must equal it
    // once the line of i1, if any, is taken out.
    let (baseline, _) = render(b"not an address");
    let mut runner = TestRunner::new(PropConfig {
        cases: 512,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let result = runner.run(&value_strategy(), |value| {
        let (out, valid) = render(&value);
        for line in server_lines(&out) {
            prop_assert!(server_line_ok(line), "bad server line {:?}", line);
        }
        prop_assert_eq!(non_spare(&out), valid);
        prop_assert!(out.contains("    server srv1 127.0.0.1:8080 weight 100  # i0\n"));
        // Slot numbers shift when i1 takes one: compare without them.
        let without_i1 = unslotted(
            &out.split_inclusive('\n')
                .filter(|l| !l.ends_with("  # i1\n"))
                .collect::<String>(),
        );
        prop_assert_eq!(&without_i1, &unslotted(&baseline));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
