//! Safety (PRODUCT.md §4, §6 step 3, §7): untrusted registry data cannot inject config, and a
//! collapsing registry cannot empty the load balancer. Everything runs as real processes:
//! `haconfd run` over a real etcd (bytes put with the etcd-client crate, so keys and values may
//! hold NUL or bytes that are not UTF-8) or over the file source, with `[haproxy] mode = "none"`
//! and `check = true`, so that every candidate goes through `haproxy -c`.
//!
//! The injection corpus carries a live canary: `lua-load <dir>/canary.lua`, whose script writes
//! `<dir>/MARKER` when HAProxy loads it — and `haproxy -c` does load it (a positive control
//! proves that first). The marker must never appear.
//!
//! No timing assertions: every wait is bounded, and only outcomes are checked.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::admin::Admin;
use common::etcd::Etcd;
use common::haproxy::{
    Daemon, META_TEMPLATE, Opts, Workspace, etcd_table, instances, serves, signal,
};
use common::wait_for;
use nix::sys::signal::Signal;

/// How long a change may take to reach dest (or a log line to appear) before a test gives up.
const SETTLE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

/// The etcd source at `endpoint` over the workspace's template, `haproxy -c` on, HAProxy not
/// driven, the guard at 50 %.
fn etcd_opts(endpoint: &str, confirm_after: &str) -> Opts {
    Opts {
        etcd: Some(format!(
            "{}dial_timeout = \"2s\"\n",
            etcd_table(&[endpoint.to_owned()])
        )),
        extra: format!("\n[guard]\nmax_drop_percent = 50\nconfirm_after = \"{confirm_after}\"\n"),
        ..Opts::default()
    }
}

/// The admin endpoint the workspace's config names.
fn admin_of(ws: &Workspace) -> Admin {
    ws.admin().expect("an [admin] listen line")
}

/// Waits until the daemon's log contains `needle`; returns the log.
fn wait_log(daemon: &Daemon, needle: &str) -> String {
    daemon.log_with(needle, SETTLE)
}

/// Waits until dest satisfies `f`; returns its text.
fn wait_dest(ws: &Workspace, what: &str, f: impl Fn(&str) -> bool) -> String {
    wait_for(SETTLE, what, || ws.dest_text().filter(|t| f(t)))
}

fn is_digits(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
}

/// A `server` line of the default template, strictly: `    server srvN 127.0.0.1:PORT weight
/// W[ disabled]  # ID` for an instance, `    server srvN 127.0.0.1:1 disabled` for a free slot.
fn server_line_ok(line: &str) -> bool {
    if line == common::LAME_DUCK_SERVER_LINE {
        return true;
    }
    let Some(rest) = line.strip_prefix("    server srv") else {
        return false;
    };
    let Some((n, rest)) = rest.split_once(' ') else {
        return false;
    };
    let Some((addr, rest)) = rest.split_once(' ') else {
        return false;
    };
    let port_ok = addr.strip_prefix("127.0.0.1:").is_some_and(|p| {
        is_digits(p, 5) && p.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p))
    });
    if !is_digits(n, 4) || !port_ok {
        return false;
    }
    if rest == "disabled" {
        return addr == "127.0.0.1:1";
    }
    let Some((head, id)) = rest.split_once("  # ") else {
        return false;
    };
    let id_ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    let head = head.strip_suffix(" disabled").unwrap_or(head);
    let weight_ok = head
        .strip_prefix("weight ")
        .is_some_and(|w| is_digits(w, 3) && w.parse::<u32>().is_ok_and(|w| w <= 256));
    id_ok && weight_ok
}

#[test]
fn the_server_line_matcher_is_strict() {
    for good in [
        "    server srv1 127.0.0.1:8080 weight 100  # g1",
        "    server srv12 127.0.0.1:1 weight 0 disabled  # a.b_c:d-1",
        "    server srv3 127.0.0.1:1 disabled",
    ] {
        assert!(server_line_ok(good), "{good}");
    }
    for bad in [
        "    server srv1 127.0.0.1:8080 weight 100  # g1 lua-load /x",
        "    server srv1 127.0.0.1:8080 weight 100 backup  # g1",
        "    server srv1 127.0.0.2:8080 weight 100  # g1",
        "    server srv1 [::1]:8080 weight 100  # g1",
        "    server srv1 127.0.0.1:99999 weight 100  # g1",
        "    server srv1 127.0.0.1:80 weight 300  # g1",
        "    server srv1 127.0.0.1:80 weight 1  # g\"1",
        "    server srv1 127.0.0.1:80 weight 1  # ",
        "    server srv1 127.0.0.1:8080 disabled",
        "    server evil 127.0.0.1:8080 weight 100  # g1",
        "\tserver srv1 127.0.0.1:8080 weight 100  # g1",
    ] {
        assert!(!server_line_ok(bad), "{bad}");
    }
}

/// `haproxy -c` on a file that loads the canary writes the marker: the canary is live.
fn prove_canary_is_live(dir: &Path) {
    let marker = dir.join("MARKER");
    let cfg = dir.join("control.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    lua-load {}\ndefaults\n    mode http\n",
            dir.join("canary.lua").display()
        ),
    )
    .expect("write control config");
    let out = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .output()
        .expect("run haproxy -c");
    assert!(
        marker.exists(),
        "positive control: haproxy -c did not run the canary script:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&marker).expect("remove the control marker");
    std::fs::remove_file(&cfg).expect("remove the control config");
}

/// Writes the canary scripts: `canary.lua` (named in values) and `kc.lua` (named in keys).
fn write_canaries(dir: &Path) {
    let script = format!(
        "local f = io.open(\"{}\",\"w\") f:write(\"x\") f:close()\n",
        dir.join("MARKER").display()
    );
    std::fs::write(dir.join("canary.lua"), &script).expect("write canary.lua");
    std::fs::write(dir.join("kc.lua"), &script).expect("write kc.lua");
}

// ---------------------------------------------------------------------------------------------
// 1. The injection corpus
// ---------------------------------------------------------------------------------------------

/// One hostile registry entry: raw key and value bytes.
struct Hostile {
    label: &'static str,
    key: Vec<u8>,
    value: Vec<u8>,
}

/// Substrings that only hostile entries hold: no line of dest may contain one.
fn canaries() -> Vec<String> {
    [
        "lua-load",
        "canary",
        "kc.lua",
        "MARKER",
        "VALCANARY",
        "KEYCANARY",
        "evil.sock",
        "${",
        "$(",
        "HOME",
        "backup",
        "\u{202e}",
        "\u{200b}",
        "\u{2028}",
        "\u{2029}",
        "\u{85}",
        "\u{fffd}",
        "xxxxxxxxxxxxxxxx",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Substrings of hostile *values* (never of keys): the log may not contain one either.
const VALUE_ONLY: &[&str] = &[
    "VALCANARY",
    "canary.lua",
    "evil.sock",
    "${HOME}:",
    "$(id)",
    "xxxxxxxx",
];

/// The corpus: values under `/services/evil/vNN` and `/routes/evil`, and hostile keys with
/// good values. `dir` is where the canary scripts live.
fn corpus(dir: &Path) -> Vec<Hostile> {
    let lua = format!("lua-load {}/canary.lua", dir.display());
    let klua = format!("lua-load {}/kc.lua", dir.display());
    let sock = format!("stats socket {}/evil.sock level admin", dir.display());
    let good = b"127.0.0.1:8080".to_vec();
    let mut big = b"127.0.0.1:8080 VALCANARY-big ".to_vec();
    big.resize(70 * 1024, b'x');
    let values: Vec<(&'static str, Vec<u8>)> = vec![
        ("LF", format!("127.0.0.1:8080\n{lua}").into_bytes()),
        ("CR", format!("127.0.0.1:8080\r{lua}").into_bytes()),
        ("CRLF", format!("127.0.0.1:8080\r\n{lua}").into_bytes()),
        ("NUL", format!("127.0.0.1:8080\0{lua}").into_bytes()),
        (
            "U+2028",
            format!("127.0.0.1:8080\u{2028}{lua}").into_bytes(),
        ),
        (
            "U+2029",
            format!("127.0.0.1:8080\u{2029}{lua}").into_bytes(),
        ),
        ("U+0085", format!("127.0.0.1:8080\u{85}{lua}").into_bytes()),
        ("#", b"127.0.0.1:8080#VALCANARY-hash".to_vec()),
        (";", b"127.0.0.1:8080;VALCANARY-semi".to_vec()),
        ("\"", b"127.0.0.1:8080\" VALCANARY-dq \"".to_vec()),
        ("'", b"127.0.0.1:8080' VALCANARY-sq '".to_vec()),
        ("\\", b"127.0.0.1:8080\\ VALCANARY-bs".to_vec()),
        ("${HOME}", b"${HOME}:8080".to_vec()),
        ("$(id)", b"$(id):8080".to_vec()),
        ("spaces", b"127.0.0.1:8080 backup VALCANARY-sp".to_vec()),
        ("tab", b"127.0.0.1:8080\tbackup VALCANARY-tab".to_vec()),
        ("70 KB", big),
        (
            "non-UTF-8",
            b"127.0.0.1:8080\xff\xfe VALCANARY-utf8".to_vec(),
        ),
        ("U+202E", "127.0.0.1:8080\u{202e}VALCANARY-bidi".into()),
        ("U+200B", "127.0.0.1:8080\u{200b}VALCANARY-zw".into()),
        (
            "JSON \\n in addr",
            format!(r#"{{"addr":"127.0.0.1:1\n{lua}"}}"#).into_bytes(),
        ),
        (
            "JSON \\n in meta",
            format!(r#"{{"addr":"127.0.0.1:8080","meta":{{"opt":"x\n{lua}"}}}}"#).into_bytes(),
        ),
        (
            "JSON \\u2028 in addr",
            format!(r#"{{"addr":"127.0.0.1:8080\u2028{lua}"}}"#).into_bytes(),
        ),
        (
            "JSON \\r\\n in weight",
            br#"{"addr":"127.0.0.1:8080","weight":"1\r\nVALCANARY-w"}"#.to_vec(),
        ),
        (
            "JSON \\n in state",
            br#"{"addr":"127.0.0.1:8080","state":"ready\nVALCANARY-st"}"#.to_vec(),
        ),
        (
            "JSON unknown field",
            format!(r#"{{"addr":"127.0.0.1:8080","colour":"VALCANARY-f {lua}"}}"#).into_bytes(),
        ),
        ("canary line", lua.clone().into_bytes()),
        (
            "stats socket",
            format!("127.0.0.1:8080\n{sock}").into_bytes(),
        ),
        (
            "global section",
            format!("127.0.0.1:8080\nglobal\n    {lua}\n").into_bytes(),
        ),
    ];
    let mut out: Vec<Hostile> = values
        .into_iter()
        .enumerate()
        .map(|(i, (label, value))| Hostile {
            label,
            key: format!("/services/evil/v{:02}", i + 1).into_bytes(),
            value,
        })
        .collect();
    out.push(Hostile {
        label: "route host with \\n",
        key: b"/routes/evil".to_vec(),
        value: format!(r#"{{"hosts":["evil.localhost\n{lua}"]}}"#).into_bytes(),
    });
    let keys: Vec<(&'static str, Vec<u8>)> = vec![
        ("key LF", format!("/services/evil/k1\n{klua}").into_bytes()),
        ("key space", b"/services/evil/k2 KEYCANARY".to_vec()),
        ("service LF", b"/services/ev\nglobal/KEYCANARY".to_vec()),
        ("key non-UTF-8", b"/services/evil/k4\xffKEYCANARY".to_vec()),
        ("key #", b"/services/evil/k5#KEYCANARY".to_vec()),
        ("key NUL", b"/services/evil/k6\0KEYCANARY".to_vec()),
        ("key U+2028", "/services/evil/k7\u{2028}KEYCANARY".into()),
        ("key ;", b"/services/evil/k8;KEYCANARY".to_vec()),
        ("key $", b"/services/evil/k9${HOME}KEYCANARY".to_vec()),
        ("route key CR", b"/routes/evil\rKEYCANARY".to_vec()),
    ];
    out.extend(keys.into_iter().map(|(label, key)| Hostile {
        label,
        key,
        value: good.clone(),
    }));
    out
}

/// The good keys beside the corpus, and the instance ids they render as.
fn good_pairs(round: u16) -> Vec<(String, String)> {
    vec![
        (
            "/services/good/g1".into(),
            format!("127.0.0.1:{}", 18100 + round),
        ),
        (
            "/services/good/g2".into(),
            r#"{"addr":"127.0.0.1:18200","weight":50,"meta":{"zone":"a"}}"#.into(),
        ),
        ("/services/evil/ok".into(), "127.0.0.1:18300".into()),
        (
            "/routes/good".into(),
            r#"{"hosts":["good.localhost"],"paths":["/api"]}"#.into(),
        ),
    ]
}

/// Everything dest must satisfy after the corpus went through.
fn assert_dest_clean(text: &str, dir: &Path) {
    assert!(
        text.bytes()
            .all(|b| b == b'\n' || (0x20..0x7f).contains(&b)),
        "dest holds a byte outside printable ASCII:\n{text}"
    );
    let canaries = canaries();
    for line in text.lines() {
        for c in &canaries {
            assert!(
                !line.contains(c.as_str()),
                "dest line holds {c:?}: {line:?}"
            );
        }
        if line.trim_start().starts_with("server ") {
            assert!(
                server_line_ok(line),
                "server line off the pattern: {line:?}"
            );
        }
    }
    let globals = text.lines().filter(|l| l.trim() == "global").count();
    assert_eq!(globals, 1, "{text}");
    let sockets = text
        .lines()
        .filter(|l| l.trim_start().starts_with("stats socket"))
        .count();
    assert_eq!(sockets, 1, "{text}");
    assert!(!dir.join("MARKER").exists(), "the canary script ran");
}

/// Everything the log must satisfy: bad keys named, values never shown, no raw control bytes.
fn assert_log_clean(log: &str) {
    for v in VALUE_ONLY {
        assert!(!log.contains(v), "the log shows a value ({v:?}):\n{log}");
    }
    for bad in [
        '\r', '\0', '\u{2028}', '\u{2029}', '\u{85}', '\u{202e}', '\u{200b}',
    ] {
        assert!(!log.contains(bad), "the log holds {bad:?}");
    }
    for i in 1..=29 {
        let key = format!("/services/evil/v{i:02}");
        assert!(log.contains(&key), "{key} not named in the log:\n{log}");
    }
    for key in [
        "/routes/evil\"",
        "/services/evil/k1\\nlua-load",
        "/services/evil/k2 KEYCANARY",
        "/services/ev\\nglobal/KEYCANARY",
        "/services/evil/k4",
        "/services/evil/k5#KEYCANARY",
        "/services/evil/k6\\0KEYCANARY",
        "/services/evil/k7\\u{2028}KEYCANARY",
        "/services/evil/k8;KEYCANARY",
        "/services/evil/k9${HOME}KEYCANARY",
        "/routes/evil\\rKEYCANARY",
    ] {
        assert!(log.contains(key), "{key} not named in the log:\n{log}");
    }
}

fn good_rendered(text: &str, round: u16) -> bool {
    serves(text, "g1", &format!("127.0.0.1:{}", 18100 + round))
        && serves(text, "g2", "127.0.0.1:18200")
        && serves(text, "ok", "127.0.0.1:18300")
        && text.contains("acl host_be_good var(txn.host) -m str good.localhost")
}

#[test]
fn injection_through_etcd_never_reaches_the_config() {
    let ws = Workspace::new("yaml");
    let dir = ws.dir.path().to_path_buf();
    write_canaries(&dir);
    prove_canary_is_live(&dir);
    let corpus = corpus(&dir);
    assert!(corpus.len() >= 20);

    let etcd = Etcd::start();
    // Half the corpus is there at the first read, the rest arrives through the watch.
    let (early, late) = corpus.split_at(corpus.len() / 2);
    for h in early {
        etcd.put_bytes(&h.key, &h.value);
    }
    etcd.put_many(&good_pairs(0));
    ws.write_config(&etcd_opts(&etcd.endpoint(), "10m"));
    let admin = admin_of(&ws);
    let daemon = ws.spawn_run();
    wait_dest(&ws, "the first render", |t| good_rendered(t, 0));

    for h in late {
        etcd.put_bytes(&h.key, &h.value);
    }
    // A good change after the whole corpus is in: its apply renders with every hostile key.
    etcd.put_many(&good_pairs(1));
    let text = wait_dest(&ws, "the good change", |t| good_rendered(t, 1));
    admin.wait_metric("haconfd_rejected_keys", corpus.len() as f64, SETTLE);
    let checks = admin
        .metric("haconfd_validate_seconds_count")
        .expect("validate metric");
    assert!(checks >= 2.0, "haproxy -c ran {checks} times");
    assert_dest_clean(&text, &dir);
    let log = daemon.log_text();
    assert_log_clean(&log);
    assert!(!log.contains("haproxy -c rejected"), "{log}");
    let labels: Vec<&str> = corpus.iter().map(|h| h.label).collect();
    eprintln!(
        "{} hostile entries refused through etcd: {labels:?}",
        corpus.len()
    );
}

/// Writes `s` as a JSON string literal: `"` and `\` escaped, control characters as `\u00XX`,
/// every other byte as it is (so bytes that are not UTF-8 stay in the file).
fn json_string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0..=0x1f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// A nested JSON registry file holding `pairs` (keys split at '/').
fn registry_json(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    #[derive(Default)]
    struct Node(BTreeMap<Vec<u8>, Node>, Option<Vec<u8>>);
    let mut root = Node::default();
    for (k, v) in pairs {
        let mut node = &mut root;
        for seg in k.split(|b| *b == b'/').filter(|s| !s.is_empty()) {
            node = node.0.entry(seg.to_vec()).or_default();
        }
        node.1 = Some(v.clone());
    }
    fn emit(n: &Node, out: &mut Vec<u8>) {
        if let Some(v) = &n.1 {
            return json_string(out, v);
        }
        out.push(b'{');
        for (i, (k, child)) in n.0.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b",\n");
            }
            json_string(out, k);
            out.push(b':');
            emit(child, out);
        }
        out.push(b'}');
    }
    let mut out = Vec::new();
    emit(&root, &mut out);
    out.push(b'\n');
    out
}

#[test]
fn injection_through_the_file_source_never_reaches_the_config() {
    let ws = Workspace::new("json");
    let dir = ws.dir.path().to_path_buf();
    write_canaries(&dir);
    prove_canary_is_live(&dir);
    let corpus = corpus(&dir);
    let pairs = |round: u16| -> Vec<(Vec<u8>, Vec<u8>)> {
        corpus
            .iter()
            .map(|h| (h.key.clone(), h.value.clone()))
            .chain(
                good_pairs(round)
                    .into_iter()
                    .map(|(k, v)| (k.into_bytes(), v.into_bytes())),
            )
            .collect()
    };
    ws.write_config(&Opts {
        extra: "\n[guard]\nmax_drop_percent = 50\n".into(),
        ..Opts::default()
    });
    let admin = admin_of(&ws);
    ws.write_registry(registry_json(&pairs(0)));
    let daemon = ws.spawn_run();
    wait_dest(&ws, "the first render", |t| good_rendered(t, 0));
    ws.write_registry(registry_json(&pairs(1)));
    let text = wait_dest(&ws, "the good change", |t| good_rendered(t, 1));
    admin.wait_metric("haconfd_rejected_keys", corpus.len() as f64, SETTLE);
    assert_dest_clean(&text, &dir);
    let log = daemon.log_text();
    assert_log_clean(&log);
    assert!(!log.contains("haproxy -c rejected"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// 2. A custom template that turns data into lines
// ---------------------------------------------------------------------------------------------

/// Writes `/conf/` values as lines of a backend, through `split` + `join` and through `json`.
/// The template itself holds `global` and `stats socket` once each and no `lua-load`.
const LINES_TEMPLATE: &str = r#"global
    master-worker
    stats socket {{ haproxy.runtime_socket }} mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 1s
    timeout server 1s

backend be_conf
    {{ getv(key="/conf/opts", default="option forwardfor") | split(sep=",") | join(sep="
    ") }}
{%- for kv in gets(pattern="/conf/json/*") %}
{%- set doc = kv.value | json %}
{%- for l in doc.lines %}
    {{ l }}
{%- endfor %}
{%- endfor %}
{% for s in services %}
backend {{ s.backend }}
{%- for i in s.instances %}
    server {{ i.name }} {{ i.addr }}  # {{ i.id }}
{%- endfor %}
{% endfor %}
"#;

/// The first line of the output `/conf/opts` writes.
const OPTS_LINE: usize = 12;

fn conf_registry(port: u16, opts: &str, json_lines: Option<&str>) -> Vec<u8> {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (
            b"/services/web/w1".to_vec(),
            format!("127.0.0.1:{port}").into_bytes(),
        ),
        (b"/conf/opts".to_vec(), opts.as_bytes().to_vec()),
    ];
    if let Some(lines) = json_lines {
        pairs.push((b"/conf/json/a".to_vec(), lines.as_bytes().to_vec()));
    }
    registry_json(&pairs)
}

#[test]
fn a_template_that_turns_data_into_lines_cannot_add_guarded_directives() {
    let mut ws = Workspace::new("json");
    let dir = ws.dir.path().to_path_buf();
    write_canaries(&dir);
    prove_canary_is_live(&dir);
    let lua = format!("{}/canary.lua", dir.display());
    ws.set_template(LINES_TEMPLATE);
    ws.write_config(&Opts {
        prefixes: &["/services/", "/routes/", "/conf/"],
        ..Opts::default()
    });
    let admin = admin_of(&ws);
    ws.write_registry(conf_registry(
        9000,
        "option forwardfor,option http-server-close",
        Some(r#"{"lines":["http-request set-header X-A 1"]}"#),
    ));
    let mut daemon = ws.spawn_run();
    let good = wait_dest(&ws, "the first render", |t| {
        serves(t, "w1", "127.0.0.1:9000") && t.contains("    option http-server-close\n")
    });

    // (what the value holds, the directive refused, its line in the output)
    let cases: Vec<(String, Option<String>, &str, usize)> = vec![
        (
            format!("option forwardfor,global,lua-load {lua}"),
            None,
            "global",
            OPTS_LINE + 1,
        ),
        (
            format!("option forwardfor,lua-load {lua}"),
            None,
            "lua-load",
            OPTS_LINE + 1,
        ),
        (
            format!("stats socket {}/evil.sock level admin", dir.display()),
            None,
            "stats socket",
            OPTS_LINE,
        ),
        // Quoted and escaped spellings that HAProxy reads as the same keyword.
        (
            format!("option forwardfor,\"global\",\"lua-load\" {lua}"),
            None,
            "global",
            OPTS_LINE + 1,
        ),
        (format!("'lua-'load {lua}"), None, "lua-load", OPTS_LINE),
        (format!("lua\\x2dload {lua}"), None, "lua-load", OPTS_LINE),
        (
            format!("\"${{NOPE}}lua-load\" {lua}"),
            None,
            haconfd::render::structure::VARIABLE_KEYWORD,
            OPTS_LINE,
        ),
        (
            "option forwardfor".into(),
            Some(format!(r#"{{"lines":["global","lua-load {lua}"]}}"#)),
            "global",
            OPTS_LINE + 1,
        ),
        (
            "option forwardfor".into(),
            Some(format!(
                r#"{{"lines":["stats socket {}/evil.sock"]}}"#,
                dir.display()
            )),
            "stats socket",
            OPTS_LINE + 1,
        ),
    ];
    let refusals = |log: &str| log.matches("refusing the render").count();
    for (i, (opts, json, directive, line)) in cases.iter().enumerate() {
        let before = refusals(&daemon.log_text());
        // web moves at the same time: the whole render is refused, so it does not land.
        ws.write_registry(conf_registry(9001 + i as u16, opts, json.as_deref()));
        let log = wait_for(SETTLE, &format!("case {i}: the refusal"), || {
            Some(daemon.log_text()).filter(|l| refusals(l) > before)
        });
        let expected = format!(
            "template \"haproxy\" ({}): line {line} of the output is `{directive}`",
            ws.template.display()
        );
        assert!(
            log.contains(&expected),
            "case {i}: {expected:?} not in:\n{log}"
        );
        assert_eq!(ws.dest_text().as_deref(), Some(good.as_str()), "case {i}");
        assert!(
            !dir.join("MARKER").exists(),
            "case {i}: the canary script ran"
        );
    }
    let failures = admin
        .metric("haconfd_render_failures_total")
        .expect("render failures");
    assert!(failures >= cases.len() as f64, "{failures}");

    // A decoded JSON string with a line break is refused by the json filter itself.
    let before = daemon.log_text().matches("json: a decoded string").count();
    ws.write_registry(conf_registry(
        9100,
        "option forwardfor",
        Some(&format!(r#"{{"lines":["x\nlua-load {lua}"]}}"#)),
    ));
    wait_for(SETTLE, "the json filter's refusal", || {
        Some(daemon.log_text()).filter(|l| l.matches("json: a decoded string").count() > before)
    });
    assert_eq!(ws.dest_text().as_deref(), Some(good.as_str()));

    // The default template reads no /conf/ key: the same hostile registry is accepted.
    ws.write_registry(conf_registry(
        9200,
        &format!("option forwardfor,global,lua-load {lua}"),
        Some(&format!(r#"{{"lines":["global","lua-load {lua}"]}}"#)),
    ));
    ws.write_template(&Workspace::default_template());
    let text = wait_dest(&ws, "the default template's render", |t| {
        serves(t, "w1", "127.0.0.1:9200")
    });
    assert_dest_clean(&text, &dir);
    assert_eq!(daemon.terminate(Duration::from_secs(15)), Some(0));
    assert!(!dir.join("MARKER").exists(), "the canary script ran");
}

// ---------------------------------------------------------------------------------------------
// 3. The shrink guard with real leases
// ---------------------------------------------------------------------------------------------

/// A workspace with the default template and a daemon over `etcd`.
fn start_over_etcd(etcd: &Etcd, confirm_after: &str) -> (Workspace, Daemon, Admin) {
    let ws = Workspace::new("yaml");
    ws.write_config(&etcd_opts(&etcd.endpoint(), confirm_after));
    let admin = admin_of(&ws);
    let daemon = ws.spawn_run();
    (ws, daemon, admin)
}

/// The instance ids dest serves, sorted.
fn ids(text: &str) -> Vec<String> {
    let mut ids: Vec<String> = instances(text).into_iter().map(|(id, _)| id).collect();
    ids.sort();
    ids
}

/// Waits until etcd holds exactly `want` keys under /services/.
fn wait_keys(etcd: &Etcd, want: &[&str]) {
    wait_for(SETTLE, &format!("etcd to hold exactly {want:?}"), || {
        let keys: Vec<String> = etcd.get_prefix("/services/").into_keys().collect();
        (keys == want).then_some(())
    });
}

const TTL: i64 = 3;

#[test]
fn the_guard_holds_a_collapse_of_real_leases_until_confirmed() {
    let etcd = Etcd::start();
    let keeper = etcd.lease_keeper();
    // web: w1 alone, w4 alone, w2 and w3 together (one lease: one revoke, one revision).
    let (l_w1, l_w4, l_w23, l_api) = (
        etcd.grant_lease(TTL),
        etcd.grant_lease(TTL),
        etcd.grant_lease(TTL),
        etcd.grant_lease(TTL),
    );
    for l in [l_w1, l_w4, l_w23, l_api] {
        keeper.keep(l);
    }
    etcd.put_with_lease("/services/web/w1", "127.0.0.1:18401", l_w1);
    etcd.put_with_lease("/services/web/w2", "127.0.0.1:18402", l_w23);
    etcd.put_with_lease("/services/web/w3", "127.0.0.1:18403", l_w23);
    etcd.put_with_lease("/services/web/w4", "127.0.0.1:18404", l_w4);
    etcd.put_with_lease("/services/api/a1", "127.0.0.1:18501", l_api);
    etcd.put_with_lease("/services/api/a2", "127.0.0.1:18502", l_api);
    let (ws, daemon, admin) = start_over_etcd(&etcd, "10m");
    wait_dest(&ws, "all six instances", |t| ids(t).len() == 6);

    // One instance of four expires: a 25 % drop applies.
    keeper.release(l_w4);
    let text = wait_dest(&ws, "w4 gone", |t| !serves(t, "w4", "127.0.0.1:18404"));
    assert_eq!(ids(&text), ["a1", "a2", "w1", "w2", "w3"]);
    assert!(
        !daemon.log_text().contains("guard: service"),
        "{}",
        daemon.log_text()
    );
    admin.wait_metric("haconfd_guard_held_services", 0.0, SETTLE);

    // Two of web's three expire at once: held, while api keeps changing.
    keeper.release(l_w23);
    wait_keys(
        &etcd,
        &["/services/api/a1", "/services/api/a2", "/services/web/w1"],
    );
    let log = wait_log(&daemon, "guard: service would lose too many instances");
    assert!(log.contains("service=web"), "{log}");
    etcd.put_with_lease("/services/api/a3", "127.0.0.1:18503", l_api);
    let text = wait_dest(&ws, "api's new instance", |t| {
        serves(t, "a3", "127.0.0.1:18503")
    });
    assert_eq!(
        ids(&text),
        ["a1", "a2", "a3", "w1", "w2", "w3"],
        "web is held"
    );
    admin.wait_metric("haconfd_guard_held_services", 1.0, SETTLE);
    assert!(
        admin
            .metric("haconfd_guard_holds_total")
            .is_some_and(|n| n >= 1.0)
    );

    // The operator confirms: the shrink applies.
    signal(daemon.pid(), Signal::SIGUSR1);
    let text = wait_dest(&ws, "the confirmed shrink", |t| !t.contains("# w2"));
    assert_eq!(ids(&text), ["a1", "a2", "a3", "w1"]);
    admin.wait_metric("haconfd_guard_held_services", 0.0, SETTLE);

    // Every lease expires: the registry goes empty and is held whole.
    let holds = admin.metric("haconfd_guard_holds_total").expect("holds");
    keeper.release(l_w1);
    keeper.release(l_api);
    wait_keys(&etcd, &[]);
    wait_log(&daemon, "guard: the registry is empty");
    wait_for(SETTLE, "another hold counted", || {
        admin
            .metric("haconfd_guard_holds_total")
            .filter(|n| *n > holds)
    });
    assert_eq!(
        ids(&ws.dest_text().expect("dest")),
        ["a1", "a2", "a3", "w1"],
        "an empty registry must not empty the load balancer"
    );

    // Confirmed, the empty registry applies.
    signal(daemon.pid(), Signal::SIGUSR1);
    let text = wait_dest(&ws, "the confirmed empty registry", |t| ids(t).is_empty());
    assert!(text.contains("backend _no_route"), "{text}");
    assert!(!text.contains("backend be_web"), "{text}");
    drop(keeper);
}

#[test]
fn a_held_shrink_applies_by_itself_after_confirm_after() {
    let etcd = Etcd::start();
    let keeper = etcd.lease_keeper();
    let (l_w1, l_rest) = (etcd.grant_lease(TTL), etcd.grant_lease(TTL));
    keeper.keep(l_w1);
    keeper.keep(l_rest);
    etcd.put_with_lease("/services/web/w1", "127.0.0.1:18601", l_w1);
    for i in 2..=4 {
        etcd.put_with_lease(
            &format!("/services/web/w{i}"),
            &format!("127.0.0.1:1860{i}"),
            l_rest,
        );
    }
    let (ws, daemon, admin) = start_over_etcd(&etcd, "4s");
    wait_dest(&ws, "all four instances", |t| ids(t).len() == 4);

    keeper.release(l_rest);
    wait_keys(&etcd, &["/services/web/w1"]);
    wait_log(&daemon, "guard: service would lose too many instances");
    // Nothing else changes and nobody confirms: confirm_after releases the hold.
    let text = wait_dest(&ws, "the shrink after confirm_after", |t| ids(t) == ["w1"]);
    assert!(serves(&text, "w1", "127.0.0.1:18601"), "{text}");
    let log = wait_log(&daemon, "held shrink persisted for confirm_after");
    let held_at = log.find("guard: service would lose").expect("hold logged");
    let released_at = log.find("held shrink persisted").expect("release logged");
    assert!(held_at < released_at, "{log}");
    admin.wait_metric("haconfd_guard_held_services", 0.0, SETTLE);
    drop(keeper);
}

// ---------------------------------------------------------------------------------------------
// 4. Isolation through etcd
// ---------------------------------------------------------------------------------------------

fn api_value(opt: &str) -> String {
    format!(r#"{{"addr":"127.0.0.1:9001","meta":{{"opt":"{opt}"}}}}"#)
}

#[test]
fn a_value_that_fails_haproxy_c_through_etcd_holds_back_only_its_key() {
    let etcd = Etcd::start();
    etcd.put("/services/api/a1", &api_value("check"));
    etcd.put("/services/web/w1", "127.0.0.1:8001");
    let mut ws = Workspace::new("yaml");
    ws.set_template(META_TEMPLATE);
    ws.write_config(&etcd_opts(&etcd.endpoint(), "10m"));
    let admin = admin_of(&ws);
    let mut daemon = ws.spawn_run();
    wait_dest(&ws, "the first render", |t| {
        serves(t, "w1", "127.0.0.1:8001")
    });

    // api's meta turns into an unknown server keyword; then web moves.
    etcd.put("/services/api/a1", &api_value("no-such-keyword"));
    etcd.put("/services/web/w1", "127.0.0.1:8002");
    let text = wait_dest(&ws, "web's change", |t| serves(t, "w1", "127.0.0.1:8002"));
    assert!(!text.contains("no-such-keyword"), "{text}");
    assert!(text.contains("127.0.0.1:9001 check  # a1"), "{text}");
    let log = wait_log(&daemon, r#"held_back=["/services/api/a1"]"#);
    assert!(log.contains("applying without their changes"), "{log}");
    admin.wait_metric("haconfd_held_back_keys", 1.0, SETTLE);
    assert_eq!(ws.dest_text().as_deref(), Some(text.as_str()));

    // Fixed, it applies and nothing is held back.
    etcd.put("/services/api/a1", &api_value("backup"));
    wait_dest(&ws, "api's fixed value", |t| {
        t.contains("127.0.0.1:9001 backup  # a1")
    });
    admin.wait_metric("haconfd_held_back_keys", 0.0, SETTLE);
    assert_eq!(daemon.terminate(Duration::from_secs(15)), Some(0));
}

#[test]
fn a_restart_over_a_wiped_etcd_keeps_the_installed_config() {
    let etcd = Etcd::start();
    etcd.put("/services/web/w1", "127.0.0.1:18701");
    etcd.put("/services/web/w2", "127.0.0.1:18702");
    let (ws, mut daemon, admin) = start_over_etcd(&etcd, "10m");
    let before = wait_dest(&ws, "both instances", |t| ids(t) == ["w1", "w2"]);
    assert_eq!(daemon.terminate(Duration::from_secs(15)), Some(0));

    // etcd is wiped while haconfd is down; it starts again over the empty registry.
    etcd.delete_prefix("/services/");
    let daemon = ws.spawn_run();
    wait_log(&daemon, "guard: the registry is empty");
    wait_for(SETTLE, "the hold counted", || {
        admin
            .metric("haconfd_guard_holds_total")
            .filter(|n| *n >= 1.0)
    });
    assert_eq!(ws.dest_text().as_deref(), Some(before.as_str()));
    // Confirmed, the empty registry applies.
    signal(daemon.pid(), Signal::SIGUSR1);
    wait_dest(&ws, "the confirmed empty registry", |t| ids(t).is_empty());
}
