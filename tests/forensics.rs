//! Forensics against a real etcd (issue 13): `render --print --revision` and `--at`,
//! `render --diff --from [--to]` and `render --explain [--json]`, compaction included.
//!
//! The configs use the default template (`templates/haproxy.cfg.tera`), `check = false` and
//! HAProxy not driven: what is under test is what haconfd reads from etcd's history and how it
//! renders and explains it. Only loopback addresses are written.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use common::etcd::Etcd;
use common::run::{Daemon, run_command};
use common::{assert_exit, free_port, haconfd_bin, repo, stderr, stdout, wait_for};

/// A config over `endpoint` in `dir`, with the default template; `extra` goes at the end.
fn config(dir: &Path, endpoint: &str, extra: &str) -> PathBuf {
    let path = dir.join("haconfd.toml");
    std::fs::create_dir_all(dir.join("out")).expect("out dir");
    let text = format!(
        r#"[source]
kind = "etcd"

[etcd]
endpoints = ["{endpoint}"]
dial_timeout = "2s"

[[template]]
name = "haproxy"
src = "{src}"
dest = "{dest}"
check = false

[haproxy]
mode = "none"

[frontend]
bind = ["127.0.0.1:{port}"]

[wait]
min = "20ms"
max = "200ms"

[admin]
listen = "127.0.0.1:{admin}"

[fleet]
node = "lb-test"
{extra}
"#,
        src = repo().join("templates/haproxy.cfg.tera").display(),
        dest = dir.join("out/haproxy.cfg").display(),
        port = free_port(),
        admin = free_port(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn haconfd(config: &Path, args: &[&str]) -> Output {
    Command::new(haconfd_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("HACONFD_CONFIG")
        .env_remove("HACONFD_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("run haconfd")
}

/// `render --print` now, which must succeed.
fn print_now(config: &Path) -> String {
    let out = haconfd(config, &["render", "--print"]);
    assert_exit(&out, 0);
    stdout(&out)
}

fn server_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.trim_start().starts_with("server srv") && !l.contains("disabled"))
        .collect()
}

#[test]
fn a_past_revision_renders_exactly_as_it_rendered_then() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), &etcd.endpoint(), "");
    let mut then = Vec::new();
    etcd.put(
        "/routes/web",
        r#"{"hosts":["web.test"],"balance":"leastconn"}"#,
    );
    for i in 1..=4 {
        let rev = etcd.put(
            &format!("/services/web/w{i}"),
            &format!("127.0.0.1:{}", 9000 + i),
        );
        then.push((rev, print_now(&config)));
    }
    etcd.put(
        "/services/web/w1",
        r#"{"addr":"127.0.0.1:9100","weight":5}"#,
    );
    etcd.delete("/services/web/w2");
    let now = print_now(&config);
    for (rev, text) in &then {
        let out = haconfd(
            &config,
            &["render", "--print", "--revision", &rev.to_string()],
        );
        assert_exit(&out, 0);
        assert_eq!(&stdout(&out), text, "revision {rev}");
        assert_ne!(&stdout(&out), &now);
    }
    // Nothing was written: the dest of this config does not exist.
    assert!(!dir.path().join("out/haproxy.cfg").exists());

    // A revision etcd has not reached is an error that names the current one.
    let future = etcd.revision() + 100;
    let out = haconfd(
        &config,
        &["render", "--print", "--revision", &future.to_string()],
    );
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("in the future"), "{}", stderr(&out));
}

#[test]
fn a_compacted_revision_is_an_error_that_names_the_oldest_held() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), &etcd.endpoint(), "");
    let early = etcd.put("/services/api/a1", "127.0.0.1:9001");
    etcd.put("/services/api/a2", "127.0.0.1:9002");
    let kept = etcd.put("/services/api/a3", "127.0.0.1:9003");
    // Before the compaction the early revision renders.
    let out = haconfd(
        &config,
        &["render", "--print", "--revision", &early.to_string()],
    );
    assert_exit(&out, 0);
    etcd.compact(kept);
    for args in [
        vec!["render", "--print", "--revision", &*early.to_string()],
        vec!["render", "--explain", "--revision", &*early.to_string()],
        vec!["render", "--diff", "--from", &*early.to_string()],
    ] {
        let out = haconfd(&config, &args);
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "revision {early} has been compacted: the oldest revision etcd still holds is {kept}"
            )),
            "{args:?}: {err}"
        );
    }
    // The oldest revision held still renders.
    let out = haconfd(
        &config,
        &["render", "--print", "--revision", &kept.to_string()],
    );
    assert_exit(&out, 0);
    assert_eq!(server_lines(&stdout(&out)).len(), 3);
}

#[test]
fn the_file_source_has_no_past() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = dir.path().join("registry.yaml");
    std::fs::write(&registry, "services:\n  web:\n    w1: \"127.0.0.1:9001\"\n").expect("write");
    let config = dir.path().join("haconfd.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nkind = \"file\"\n[file]\npath = \"{}\"\n[[template]]\nname = \"haproxy\"\nsrc = \"{}\"\ndest = \"{}\"\ncheck = false\n[haproxy]\nmode = \"none\"\n",
            registry.display(),
            repo().join("templates/haproxy.cfg.tera").display(),
            dir.path().join("haproxy.cfg").display()
        ),
    )
    .expect("write config");
    for args in [
        vec!["render", "--print", "--revision", "3"],
        vec!["render", "--print", "--at", "2026-12-04T03:00:00Z"],
        vec!["render", "--diff", "--from", "3"],
    ] {
        let out = haconfd(&config, &args);
        assert_exit(&out, 64);
        assert!(
            stderr(&out).contains("the file source keeps none"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // Explaining the present works on the file source, with no revisions.
    let out = haconfd(&config, &["render", "--explain"]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("#> /services/web/w1\n"),
        "{}",
        stdout(&out)
    );
    // Bad usage is 64 too.
    let out = haconfd(&config, &["render", "--revision", "3"]);
    assert_exit(&out, 64);
    let out = haconfd(&config, &["render", "--diff", "--from", "yesterday"]);
    assert_exit(&out, 64);
}

#[test]
fn a_diff_between_two_revisions_names_both_and_shows_the_change() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), &etcd.endpoint(), "");
    etcd.put("/services/web/w1", "127.0.0.1:9001");
    let a = etcd.put("/services/web/w2", "127.0.0.1:9002");
    etcd.put("/services/web/w2", "127.0.0.1:9012");
    let b = etcd.put("/services/web/w3", "127.0.0.1:9003");
    etcd.delete("/services/web/w1");
    let out = haconfd(
        &config,
        &[
            "render",
            "--diff",
            "--from",
            &a.to_string(),
            "--to",
            &b.to_string(),
        ],
    );
    assert_exit(&out, 0);
    let text = stdout(&out);
    let mut lines = text.lines();
    let dest = dir.path().join("out/haproxy.cfg").display().to_string();
    assert_eq!(
        lines.next(),
        Some(&*format!(
            "--- {dest} @ revision {a} (time unknown: no node published its applies)"
        ))
    );
    assert_eq!(
        lines.next(),
        Some(&*format!(
            "+++ {dest} @ revision {b} (time unknown: no node published its applies)"
        ))
    );
    assert!(
        text.contains("\n-    server srv2 127.0.0.1:9002 weight 100  # w2\n"),
        "{text}"
    );
    assert!(
        text.contains("\n+    server srv2 127.0.0.1:9012 weight 100  # w2\n"),
        "{text}"
    );
    assert!(
        text.contains("\n+    server srv3 127.0.0.1:9003 weight 100  # w3\n"),
        "{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with(['-', '+']) && l.ends_with("# w1")),
        "w1 left after --to: {text}"
    );
    // Without --to, the newer side is now.
    let out = haconfd(&config, &["render", "--diff", "--from", &a.to_string()]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    let now = etcd.revision();
    assert!(
        text.contains(&format!("+++ {dest} @ revision {now} (now)")),
        "{text}"
    );
    assert!(
        text.contains("\n-    server srv1 127.0.0.1:9001 weight 100  # w1\n"),
        "{text}"
    );
}

#[test]
fn explain_names_the_keys_and_revisions_of_every_line_and_why_others_are_left_out() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), &etcd.endpoint(), "");
    let route = etcd.put("/routes/api", r#"{"hosts":["api.test"],"check":"/health"}"#);
    let created = etcd.put("/services/api/a1", "127.0.0.1:9001");
    let modified = etcd.put("/services/api/a1", "127.0.0.1:9011");
    etcd.put("/services/api/bad", "127.0.0.1:70000");
    etcd.put("/services/api/ctl", "127.0.0.1:90\u{1b}");
    let out = haconfd(&config, &["render", "--explain"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "    server srv1 127.0.0.1:9011 weight 100  # a1    #> /services/api/a1 @{modified} (created {created})\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "backend be_api    #> service api: /routes/api @{route} (created {route})\n"
        )),
        "{text}"
    );
    assert!(
        text.contains("#   /services/api/bad (registry): "),
        "{text}"
    );
    assert!(
        text.contains("#   /services/api/ctl (screen): value contains a control character\n"),
        "{text}"
    );
    assert!(
        !text.contains("70000"),
        "a value left out is never shown: {text}"
    );
    // The explained render is the render.
    let printed = print_now(&config);
    let stripped: String = text
        .lines()
        .filter(|l| {
            !l.starts_with("# render --explain")
                && !l.starts_with("# A line from")
                && !l.starts_with("#   ")
                && !l.starts_with("# Keys not")
                && !l.starts_with("# Note")
                && *l != "#"
        })
        .map(|l| l.split("    #> ").next().unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(stripped, printed);

    let out = haconfd(&config, &["render", "--explain", "--json"]);
    assert_exit(&out, 0);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("json");
    let lines = json["lines"].as_array().expect("lines");
    assert_eq!(lines.len(), printed.lines().count());
    let server = lines
        .iter()
        .find(|l| {
            l["text"]
                .as_str()
                .is_some_and(|t| t.contains("127.0.0.1:9011"))
        })
        .expect("the server line");
    assert_eq!(server["service"], "api");
    assert_eq!(server["keys"][0]["key"], "/services/api/a1");
    assert_eq!(server["keys"][0]["mod_revision"], modified);
    assert_eq!(server["keys"][0]["create_revision"], created);
    let left: Vec<(&str, &str)> = json["left_out"]
        .as_array()
        .expect("left_out")
        .iter()
        .map(|l| {
            (
                l["key"].as_str().unwrap_or(""),
                l["by"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(
        left.contains(&("/services/api/bad", "registry")),
        "{left:?}"
    );
    assert!(left.contains(&("/services/api/ctl", "screen")), "{left:?}");
    assert_eq!(json["revision"], etcd.revision());

    // The past, explained.
    let out = haconfd(
        &config,
        &["render", "--explain", "--revision", &created.to_string()],
    );
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "127.0.0.1:9001 weight 100  # a1    #> /services/api/a1 @{created} (created {created})"
        )),
        "{text}"
    );
}

/// A running daemon publishes its applies, which date revisions: `--at` finds what the fleet
/// had applied at a time, diff headers carry times, and `--explain` names what its guard holds.
#[test]
fn the_fleet_dates_revisions_and_explain_names_the_guards_holds() {
    let etcd = Etcd::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(
        dir.path(),
        &etcd.endpoint(),
        "\n[guard]\nmax_drop_percent = 50\n",
    );
    for i in 1..=4 {
        etcd.put(
            &format!("/services/web/w{i}"),
            &format!("127.0.0.1:{}", 9000 + i),
        );
    }
    let first = etcd.revision();
    let daemon = Daemon::spawn(
        run_command(&config, dir.path(), "info"),
        dir.path().join("haconfd.log"),
    );
    let published = |rev: i64| {
        wait_for(Duration::from_secs(20), "the node to publish", || {
            let v = etcd.get_prefix("/haconfd/nodes/");
            let state: serde_json::Value =
                serde_json::from_str(v.get("/haconfd/nodes/lb-test")?).ok()?;
            (state["revision"].as_i64()? >= rev).then_some(())
        })
    };
    published(first);
    // Publishing is at most once a second, at a resolution of a second: leave a gap.
    std::thread::sleep(Duration::from_millis(2100));
    let between = SystemTime::now();
    std::thread::sleep(Duration::from_millis(1100));
    let second = etcd.put("/services/web/w5", "127.0.0.1:9005");
    published(second);

    let at = humantime::format_rfc3339_seconds(between).to_string();
    let out = haconfd(&config, &["render", "--print", "--at", &at]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert_eq!(server_lines(&text).len(), 4, "{text}");
    assert!(
        stderr(&out).contains(&format!("revision={first}")),
        "{}",
        stderr(&out)
    );

    let out = haconfd(&config, &["render", "--diff", "--from", &at]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    let head = text.lines().next().unwrap_or("");
    assert!(
        head.contains(&format!("@ revision {first} (applied by lb-test at ")),
        "{text}"
    );
    assert!(
        text.contains("+    server srv5 127.0.0.1:9005 weight 100  # w5"),
        "{text}"
    );

    // A time before any apply has no honest answer.
    let out = haconfd(
        &config,
        &["render", "--print", "--at", "2020-01-01T00:00:00Z"],
    );
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("no node had published an apply by then"),
        "{}",
        stderr(&out)
    );

    // The guard holds web when four of its five instances go at once.
    for i in 1..=4 {
        etcd.delete(&format!("/services/web/w{i}"));
    }
    daemon.wait_log("held", Duration::from_secs(20));
    wait_for(Duration::from_secs(20), "the hold to be published", || {
        let v = etcd.get_prefix("/haconfd/nodes/");
        v.get("/haconfd/nodes/lb-test")?
            .contains("\"held\":[\"web\"]")
            .then_some(())
    });
    let out = haconfd(&config, &["render", "--explain"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.contains(
            "#   /services/web/w5 (guard): service web is held by the shrink guard on node lb-test"
        ),
        "{text}"
    );
}
