//! `haconfd history` (issue 13, item 4) against a real etcd: the timeline of instances that
//! appeared, changed or left, read from etcd's history; what removed a key; `--service`,
//! `--json`, `--from`, `--since`; compaction; the fleet's clock for the times.
//!
//! Each test starts its own etcd, so revisions are the test's own: etcd starts at revision 1 and
//! every put or delete adds one. Addresses are 127.0.0.1 only; every wait is bounded; processes
//! are ended by their PID.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::run::{EtcdDaemon, Setup};
use common::{assert_exit, haconfd_bin, stderr, stdout, wait_for};
use serde_json::Value;

/// How long one `haconfd history` may run before a test gives up on it.
const RUN_BOUND: Duration = Duration::from_secs(60);

/// `haconfd history --config CONFIG ARGS`, killed by its PID past [`RUN_BOUND`].
fn history(config: &Path, args: &[&str]) -> Output {
    let child = Command::new(haconfd_bin())
        .arg("history")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("HACONFD_CONFIG")
        .env_remove("HACONFD_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start haconfd history");
    // Read the pipes while it runs: a long timeline would fill them.
    let out = std::thread::spawn(move || child.wait_with_output());
    let deadline = Instant::now() + RUN_BOUND;
    while !out.is_finished() {
        assert!(
            Instant::now() < deadline,
            "haconfd history {args:?} ran past {RUN_BOUND:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    out.join().expect("history thread").expect("history output")
}

/// `history ARGS --json`, parsed.
fn history_json(config: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = history(config, &all);
    assert_exit(&out, 0);
    serde_json::from_slice(&out.stdout).expect("history --json is JSON")
}

fn setup(etcd: &Etcd) -> Setup {
    EtcdDaemon::new(&etcd.endpoint()).write()
}

/// The text row of revision `rev` and `key`, if any.
fn row<'a>(text: &'a str, rev: i64, key: &str) -> Option<&'a str> {
    text.lines().find(|l| {
        let cells: Vec<&str> = l.split_whitespace().collect();
        cells.get(1) == Some(&rev.to_string().as_str()) && cells.get(2) == Some(&key)
    })
}

#[track_caller]
fn assert_row(text: &str, rev: i64, key: &str, what: &str) {
    let line = row(text, rev, key).unwrap_or_else(|| panic!("no row {rev} {key} in:\n{text}"));
    assert!(
        line.ends_with(what),
        "row {rev} {key}: {line:?}, expected it to end with {what:?}\n{text}"
    );
}

#[test]
fn an_instance_appears_changes_and_leaves_at_its_revisions() {
    let etcd = Etcd::start();
    let setup = setup(&etcd);
    let w1 = "/services/web/w1";
    let appeared = etcd.put(w1, "127.0.0.1:8081");
    let changed = etcd.put(
        w1,
        r#"{"addr":"127.0.0.1:8082","weight":50,"state":"drain"}"#,
    );
    let again = etcd.put(
        w1,
        r#"{"addr":"127.0.0.1:8082","weight":50,"state":"drain"}"#,
    );
    let route = etcd.put("/routes/web", r#"{"hosts":["web.example.com"]}"#);
    assert_eq!(etcd.delete(w1), 1);
    let left = etcd.revision();

    let out = history(&setup.config, &[]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.starts_with("# history of /services/, /routes/: from revision 1, etcd's first (nothing compacted), to "),
        "{text}"
    );
    assert_row(&text, appeared, w1, "appeared 127.0.0.1:8081 w=100 ready");
    assert_row(
        &text,
        changed,
        w1,
        "changed 127.0.0.1:8081 → 127.0.0.1:8082, weight 100 → 50, state ready → drain",
    );
    assert_row(&text, again, w1, "re-put, unchanged");
    assert_row(
        &text,
        route,
        "/routes/web",
        "route appeared hosts=web.example.com balance=roundrobin",
    );
    assert_row(&text, left, w1, "left (deleted)");
    // No node publishes here: every time is unknown, and the header says why.
    assert!(
        text.contains("# TIME: unknown (-): no node published its applies"),
        "{text}"
    );
    assert!(
        row(&text, appeared, w1).is_some_and(|l| l.starts_with("- ")),
        "{text}"
    );
}

#[test]
fn a_revoked_lease_and_a_delete_are_told_apart_as_far_as_etcd_can() {
    let etcd = Etcd::start();
    let setup = setup(&etcd);
    // Two keys on one lease, revoked: both go at one revision, with no delete request.
    let lease = etcd.grant_lease(60);
    etcd.put_with_lease("/services/web/a", "127.0.0.1:8081", lease);
    etcd.put_with_lease("/services/web/b", "127.0.0.1:8082", lease);
    etcd.revoke(lease);
    let revoked = etcd.revision();
    // A key deleted while its lease lives on (announce's failed health check does this).
    let kept = etcd.grant_lease(600);
    etcd.put_with_lease("/services/web/c", "127.0.0.1:8083", kept);
    etcd.delete("/services/web/c");
    let deleted_with_lease = etcd.revision();
    // A key without a lease, deleted.
    etcd.put("/services/web/d", "127.0.0.1:8084");
    etcd.delete("/services/web/d");
    let deleted = etcd.revision();

    let text = stdout(&history(&setup.config, &[]));
    let hex = |l: i64| format!("{l:x}");
    for key in ["/services/web/a", "/services/web/b"] {
        assert_row(
            &text,
            revoked,
            key,
            &format!(
                "left (lease {} ended (expired or revoked) or deleted; 2 of its keys left at this revision)",
                hex(lease)
            ),
        );
    }
    assert_row(
        &text,
        deleted_with_lease,
        "/services/web/c",
        &format!("left (deleted; its lease {} is still alive)", hex(kept)),
    );
    assert_row(&text, deleted, "/services/web/d", "left (deleted)");

    let v = history_json(&setup.config, &[]);
    let changes = v["changes"].as_array().expect("changes");
    let by = |rev: i64, key: &str| {
        changes
            .iter()
            .find(|c| c["revision"] == rev && c["key"] == key)
            .map(|c| c["removed_by"].clone())
    };
    assert_eq!(
        by(revoked, "/services/web/a"),
        Some("lease_end_or_delete".into())
    );
    assert_eq!(
        by(deleted_with_lease, "/services/web/c"),
        Some("delete_lease_alive".into())
    );
    assert_eq!(by(deleted, "/services/web/d"), Some("delete".into()));
}

#[test]
fn service_shows_only_that_services_instances_and_route() {
    let etcd = Etcd::start();
    let setup = setup(&etcd);
    etcd.put("/services/web/w1", "127.0.0.1:8081");
    etcd.put("/services/webx/w1", "127.0.0.1:8082");
    etcd.put("/routes/web", r#"{"hosts":["web.example.com"]}"#);
    etcd.put("/routes/webx", r#"{"hosts":["webx.example.com"]}"#);
    etcd.put("/services/api/a1", "127.0.0.1:8083");

    let v = history_json(&setup.config, &["--service", "web"]);
    let keys: Vec<&str> = v["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .filter_map(|c| c["key"].as_str())
        .collect();
    assert_eq!(keys, ["/services/web/w1", "/routes/web"]);
    assert_eq!(v["service"], "web");

    let out = history(&setup.config, &["--service", "web/../api"]);
    assert_exit(&out, 64);
}

#[test]
fn json_has_the_range_and_every_field() {
    let etcd = Etcd::start();
    let setup = setup(&etcd);
    let lease = etcd.grant_lease(600);
    let rev = etcd.put_with_lease(
        "/services/web/w1",
        r#"{"addr":"127.0.0.1:8081","weight":7,"meta":{"zone":"a"}}"#,
        lease,
    );
    let bad = etcd.put("/services/web/w2", "secret_token:1");
    let v = history_json(&setup.config, &[]);
    assert_eq!(v["from"], 1);
    assert_eq!(v["oldest"], 1);
    assert_eq!(v["compacted_before"], Value::Null);
    assert_eq!(v["truncated"], false);
    assert_eq!(v["to"], bad);
    assert_eq!(v["complete_through"], bad);
    assert_eq!(v["times_known"], false);
    let c = &v["changes"][0];
    assert_eq!(c["revision"], rev);
    assert_eq!(c["time"], Value::Null);
    assert_eq!(c["key"], "/services/web/w1");
    assert_eq!(c["service"], "web");
    assert_eq!(c["instance"], "w1");
    assert_eq!(c["kind"], "appeared");
    assert_eq!(c["old"], Value::Null);
    assert_eq!(c["new"]["addr"], "127.0.0.1:8081");
    assert_eq!(c["new"]["weight"], 7);
    assert_eq!(c["new"]["state"], "ready");
    assert_eq!(c["new"]["meta"]["zone"], "a");
    assert_eq!(c["removed_by"], Value::Null);
    assert_eq!(c["lease"], format!("{lease:x}"));
    // A value that does not parse: its reason, never its bytes.
    let c = &v["changes"][1];
    assert_eq!(c["revision"], bad);
    assert!(
        c["new"]["unparsable"]
            .as_str()
            .is_some_and(|r| r.contains("field addr")),
        "{c}"
    );
    assert!(!v.to_string().contains("secret_token"));
}

#[test]
fn from_a_compacted_revision_is_refused_naming_the_oldest_and_the_default_starts_there() {
    let etcd = Etcd::start();
    let setup = setup(&etcd);
    let first = etcd.put("/services/web/w1", "127.0.0.1:8081");
    etcd.put("/services/web/w1", "127.0.0.1:8082");
    let keep = etcd.put("/services/web/w2", "127.0.0.1:8083");
    let after = etcd.put("/services/web/w1", "127.0.0.1:8084");
    etcd.compact(keep);

    let out = history(&setup.config, &["--from", &first.to_string()]);
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "revision {first} has been compacted: the oldest revision etcd still holds is {keep}"
        )),
        "{err}"
    );

    let out = history(&setup.config, &[]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!(
            "# history of /services/, /routes/: from revision {keep}, the oldest etcd still holds (compacted before), to {after}\n"
        )),
        "{text}"
    );
    assert_row(
        &text,
        keep,
        "/services/web/w2",
        "appeared 127.0.0.1:8083 w=100 ready",
    );
    assert_row(
        &text,
        after,
        "/services/web/w1",
        "changed 127.0.0.1:8082 → 127.0.0.1:8084",
    );
    assert!(row(&text, first, "/services/web/w1").is_none(), "{text}");

    let v = history_json(&setup.config, &[]);
    assert_eq!(
        (v["from"].clone(), v["oldest"].clone()),
        (keep.into(), keep.into())
    );
    assert_eq!(v["compacted_before"], keep);

    // A revision etcd holds is fine; one it has not reached is refused.
    let v = history_json(&setup.config, &["--from", &after.to_string()]);
    assert_eq!(v["changes"].as_array().map(Vec::len), Some(1));
    let out = history(&setup.config, &["--from", &(after + 100).to_string()]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("is in the future"),
        "{}",
        stderr(&out)
    );
}

/// etcd 3.4 before 3.4.25 answers a progress request with its current revision at once, while
/// a watch that replays the past is still catching up: a replay that believed it missed nearly
/// everything (0 of 5,000 changes, measured on 3.4.23). Every change must be there.
#[test]
fn a_long_history_is_replayed_to_the_last_change() {
    let etcd = Etcd::start();
    let setup = setup(&etcd);
    let pairs: Vec<(String, String)> = (0..2500)
        .map(|i| {
            (
                format!("/services/s{}/i{i}", i % 50),
                "127.0.0.1:8080".to_owned(),
            )
        })
        .collect();
    etcd.put_many(&pairs);
    let last = etcd.put("/routes/s0", r#"{"hosts":["s0.example.com"]}"#);
    let started = Instant::now();
    let v = history_json(&setup.config, &[]);
    eprintln!(
        "history of 2,501 changes (debug build): {:?}",
        started.elapsed()
    );
    let changes = v["changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 2501);
    let revisions: Vec<i64> = changes
        .iter()
        .filter_map(|c| c["revision"].as_i64())
        .collect();
    assert_eq!(revisions, (2..=last).collect::<Vec<_>>());
}

#[test]
fn a_file_source_has_no_history_unless_an_etcd_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = dir.path().join("registry.yaml");
    std::fs::write(&registry, "services:\n  web:\n    w1: 127.0.0.1:8081\n").expect("registry");
    let setup = EtcdDaemon::file(&registry).write();
    let out = history(&setup.config, &[]);
    assert_exit(&out, 64);
    assert!(
        stderr(&out).contains("the file source keeps none"),
        "{}",
        stderr(&out)
    );

    let etcd = Etcd::start();
    let rev = etcd.put("/services/web/w1", "127.0.0.1:8081");
    let v = history_json(&setup.config, &["--etcd", &etcd.endpoint()]);
    assert_eq!(v["changes"][0]["revision"], rev);
}

#[test]
fn times_come_from_the_nodes_published_applies_and_since_falls_back_to_the_oldest() {
    let etcd = Etcd::start();
    let node = EtcdDaemon::new(&etcd.endpoint())
        .wait("20ms", "200ms")
        .max_drop_percent(100)
        .extra("[fleet]\nnode = \"lb-1\"\n")
        .start();
    let rev = etcd.put("/services/web/w1", "127.0.0.1:8081");
    wait_for(Duration::from_secs(30), "lb-1 to publish its apply", || {
        let nodes = etcd.get_prefix("/haconfd/nodes/lb-1");
        let state: Value = serde_json::from_str(nodes.get("/haconfd/nodes/lb-1")?).ok()?;
        (state["revision"].as_i64()? >= rev).then_some(())
    });

    let v = history_json(node.config(), &[]);
    assert_eq!(v["times_known"], true);
    let c = v["changes"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["revision"] == rev))
        .cloned()
        .expect("the change");
    assert_eq!(c["time_node"], "lb-1");
    let time = c["time"].as_str().expect("a time");
    humantime::parse_rfc3339(time).expect("RFC 3339 to the second");
    let text = stdout(&history(node.config(), &[]));
    assert!(
        row(&text, rev, "/services/web/w1").is_some_and(|l| l.starts_with(time)),
        "{text}"
    );

    // Nothing was published a day ago: from the oldest revision, said on stderr and in the
    // header.
    let out = history(node.config(), &["--since", "1d"]);
    assert_exit(&out, 0);
    assert!(
        stderr(&out).contains("no node had published an apply that old"),
        "{}",
        stderr(&out)
    );
    let text = stdout(&out);
    assert!(text.contains("# since 1d ("), "{text}");
    assert!(row(&text, rev, "/services/web/w1").is_some(), "{text}");
    assert_exit(&history(node.config(), &["--since", "soon"]), 64);

    // Two seconds ago lb-1 had applied the change (it published it more than two seconds
    // ago): the range starts after it, and the header says which record it came from.
    std::thread::sleep(Duration::from_secs(3));
    let out = history(node.config(), &["--since", "2s"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("lb-1 had applied revision"), "{text}");
    assert!(row(&text, rev, "/services/web/w1").is_none(), "{text}");
}
