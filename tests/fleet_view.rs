//! The fleet view (issue 10, part 3) against a real etcd: `haconfd run` publishes its node's
//! state under `/haconfd/nodes/<node>`, and `haconfd fleet` judges every live node's
//! convergence from etcd's history.
//!
//! Nodes run with `haproxy.mode = "none"` and a one-line-per-server template: the fleet view
//! does not care what is rendered. Some tests put a node key by hand (a "ghost" at a chosen
//! revision) to set up exactly the history they need. Addresses are 127.0.0.1 only; every wait
//! is bounded; processes are ended by their PID.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::run::{EtcdDaemon, Run, Setup};
use common::{free_port, haconfd_bin, stderr, stdout, wait_for};
use serde_json::Value;

/// How long a node may take to publish or converge before a test gives up.
const SETTLE: Duration = Duration::from_secs(30);

/// A config for a node named `node` against `endpoint`; `fleet_extra` is appended to its
/// `[fleet]` table.
fn write_config(endpoint: &str, node: &str, fleet_extra: &str) -> Setup {
    EtcdDaemon::new(endpoint)
        .wait("20ms", "200ms")
        .max_drop_percent(100)
        .extra(&format!("[fleet]\nnode = \"{node}\"\n{fleet_extra}"))
        .log("info,haconfd::fleet=debug")
        .write()
}

/// A running `haconfd run` publishing as `node`.
fn start_node(etcd: &Etcd, node: &str) -> Run {
    write_config(&etcd.endpoint(), node, "").spawn()
}

/// `haconfd fleet --config CONFIG ARGS`, with a bound on how long it may run.
fn fleet(config: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(haconfd_bin())
        .arg("fleet")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("HACONFD_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start haconfd fleet");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("haconfd fleet {args:?} ran past 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("fleet output")
}

/// `fleet --json`, parsed: the objects by node name.
fn fleet_json(config: &Path) -> Vec<Value> {
    let out = fleet(config, &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).expect("fleet --json is JSON");
    v.as_array().expect("a JSON array").clone()
}

/// The row of `node` in `fleet --json`, if it is live.
fn row(config: &Path, node: &str) -> Option<Value> {
    fleet_json(config).into_iter().find(|r| r["node"] == node)
}

/// The published JSON under the node key, if any.
fn published(etcd: &Etcd, node: &str) -> Option<Value> {
    etcd.get_prefix(&format!("/haconfd/nodes/{node}"))
        .get(&format!("/haconfd/nodes/{node}"))
        .map(|v| serde_json::from_str(v).expect("the node key holds JSON"))
}

/// A config that only `fleet` reads (the node's name does not matter to it).
fn reader_config(etcd: &Etcd) -> Setup {
    write_config(&etcd.endpoint(), "reader", "publish = false")
}

/// Puts a node key by hand, as a node at `revision` would have.
fn put_ghost(etcd: &Etcd, node: &str, revision: i64) {
    put_ghost_as(etcd, node, revision, "running");
}

/// As [`put_ghost`], with the node's HAProxy in `haproxy` ("running", "stopping", …).
fn put_ghost_as(etcd: &Etcd, node: &str, revision: i64, haproxy: &str) {
    let state = serde_json::json!({
        "node": node,
        "revision": revision,
        "hash": "0123456789ab",
        "kind": "runtime",
        "applied_at": "2024-01-01T00:00:00Z",
        "held": [],
        "held_back": [],
        "rejected": 0,
        "haproxy": haproxy,
        "ready": true,
        "version": "0.0.0",
    });
    etcd.put(&format!("/haconfd/nodes/{node}"), &state.to_string());
}

#[test]
fn a_node_publishes_after_its_first_apply_and_shows_converged() {
    let etcd = Etcd::start();
    etcd.put("/services/web/a", "127.0.0.1:8081");
    let node = start_node(&etcd, "lb-1");

    let state = wait_for(SETTLE, "lb-1 publishing an applied revision", || {
        published(&etcd, "lb-1").filter(|s| s["revision"].as_i64() > Some(0))
    });
    for field in [
        "node",
        "revision",
        "hash",
        "kind",
        "applied_at",
        "held",
        "held_back",
        "rejected",
        "haproxy",
        "ready",
        "version",
    ] {
        assert!(state.get(field).is_some(), "{field} missing: {state}");
    }
    assert_eq!(state["node"], "lb-1");
    assert_eq!(state["haproxy"], "not driven", "mode none");
    assert_eq!(state["kind"], "written");
    assert_eq!(state["held"], serde_json::json!([]));
    assert_eq!(state["rejected"], 0);
    assert_eq!(state["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(state["hash"].as_str().map(str::len), Some(12), "{state}");
    let at = state["applied_at"].as_str().expect("applied_at");
    humantime::parse_rfc3339(at).expect("RFC 3339 UTC");
    // Ready follows /readyz: it may take a moment after the apply.
    let state = wait_for(SETTLE, "lb-1 ready", || {
        published(&etcd, "lb-1").filter(|s| s["ready"] == true)
    });
    assert!(
        state.get("reason").is_none(),
        "no reason while ready: {state}"
    );

    // The key lives under a lease of about 30 s.
    let ttl = etcd.with_client(async |c| {
        let r = c.get("/haconfd/nodes/lb-1", None).await?;
        let lease = r.kvs().first().map(|kv| kv.lease()).unwrap_or(0);
        Ok(c.lease_time_to_live(lease, None).await?.ttl())
    });
    assert!((20..=30).contains(&ttl), "lease TTL {ttl}");

    let r = row(node.config(), "lb-1").expect("lb-1 in fleet --json");
    assert_eq!(r["converged"], true, "{r}");
    assert!(r["revision"].is_i64(), "{r}");

    // The table: a header, then one row per node.
    let out = fleet(node.config(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("NODE") && lines[0].contains("CONVERGED"),
        "{text}"
    );
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(cells[0], "lb-1", "{text}");
    assert_eq!(cells[2], "yes", "{text}");

    // A change: the node applies it, publishes the new revision, and the gate opens.
    let rev = etcd.put("/services/web/b", "127.0.0.1:8082");
    let started = Instant::now();
    let out = fleet(node.config(), &["--wait", "--timeout", "20s"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    eprintln!("change -> fleet --wait returned: {:?}", started.elapsed());
    let state = published(&etcd, "lb-1").expect("still published");
    assert!(state["revision"].as_i64() >= Some(rev), "{state}");
}

#[test]
fn a_node_that_does_not_apply_is_not_converged_until_it_does() {
    let etcd = Etcd::start();
    etcd.put("/services/web/a", "127.0.0.1:8081");
    let node = start_node(&etcd, "lb-1");
    wait_for(SETTLE, "lb-1 converged", || {
        row(node.config(), "lb-1").filter(|r| r["converged"] == true)
    });

    // Frozen, the node keeps its key (the lease outlives the test's wait) but applies nothing.
    node.freeze();
    etcd.put("/services/web/b", "127.0.0.1:8082");
    let r = row(node.config(), "lb-1").expect("lb-1 still live");
    assert_eq!(r["converged"], false, "{r}");
    assert!(
        r["note"]
            .as_str()
            .is_some_and(|n| n.contains("/services/web/b")),
        "{r}"
    );
    let started = Instant::now();
    let out = fleet(node.config(), &["--wait", "--timeout", "2s"]);
    let took = started.elapsed();
    node.thaw();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("lb-1") && stderr(&out).contains("not every node converged"),
        "{}",
        stderr(&out)
    );
    assert!(took < Duration::from_secs(10), "--timeout 2s took {took:?}");

    // Running again, it catches up.
    let out = fleet(node.config(), &["--wait", "--timeout", "20s"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn convergence_counts_puts_and_deletes_but_not_puts_of_the_same_value() {
    let etcd = Etcd::start();
    let reader = reader_config(&etcd);
    let config = reader.config.as_path();
    etcd.put("/services/web/a", "127.0.0.1:8081");
    etcd.put("/routes/web/hosts", "web.example.com");
    let r0 = etcd.revision();
    put_ghost(&etcd, "ghost", r0);
    let ghost = |what: &str| {
        let r = row(config, "ghost").expect("ghost is live");
        eprintln!("{what}: {r}");
        r
    };
    assert_eq!(ghost("at the current revision")["converged"], true);

    // Keys outside the watched prefixes are no change (the node keys themselves included).
    etcd.put("/elsewhere/x", "1");
    assert_eq!(ghost("outside the prefixes")["converged"], true);

    // A put of the value a key already had (announce after an outage) changes nothing.
    etcd.put("/services/web/a", "127.0.0.1:8081");
    assert_eq!(ghost("same value again")["converged"], true);

    // A new value, a new key: not converged, and the note says which key.
    etcd.put("/services/web/a", "127.0.0.1:9091");
    let r = ghost("a changed value");
    assert_eq!(r["converged"], false);
    assert!(
        r["note"]
            .as_str()
            .is_some_and(|n| n.contains("/services/web/a")),
        "{r}"
    );
    let out = fleet(config, &["--wait", "--timeout", "2s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("ghost"), "{}", stderr(&out));

    // Caught up; then a delete is a change too, under any watched prefix.
    put_ghost(&etcd, "ghost", etcd.revision());
    assert_eq!(ghost("caught up")["converged"], true);
    etcd.delete("/routes/web/hosts");
    let r = ghost("a delete");
    assert_eq!(r["converged"], false);
    assert!(
        r["note"].as_str().is_some_and(|n| n.contains("deleted")),
        "{r}"
    );

    // Deleted and put back with the same value: what a node renders is the same.
    put_ghost(&etcd, "ghost", etcd.revision());
    etcd.delete("/services/web/a");
    etcd.put("/services/web/a", "127.0.0.1:9091");
    assert_eq!(ghost("deleted and put back")["converged"], true);

    // Many changed keys take the other path (one read at the node's revision).
    let before = etcd.revision();
    put_ghost(&etcd, "ghost", before);
    let pairs: Vec<(String, String)> = (0..40)
        .map(|i| {
            (
                format!("/services/bulk/i{i}"),
                format!("127.0.0.1:{}", 10000 + i),
            )
        })
        .collect();
    etcd.put_many(&pairs);
    assert_eq!(ghost("40 new keys")["converged"], false);
    put_ghost(&etcd, "ghost", etcd.revision());
    etcd.put_many(&pairs);
    assert_eq!(ghost("40 keys put again")["converged"], true);
    etcd.put("/services/bulk/i39", "127.0.0.1:1");
    assert_eq!(ghost("one of 40 changed")["converged"], false);

    // A node that never applied, and one whose state cannot be read.
    put_ghost(&etcd, "fresh", 0);
    etcd.put("/haconfd/nodes/garbled", "not json");
    let rows = fleet_json(config);
    let by = |n: &str| rows.iter().find(|r| r["node"] == n).expect(n).clone();
    assert_eq!(by("fresh")["converged"], false);
    assert!(
        by("fresh")["note"]
            .as_str()
            .is_some_and(|n| n.contains("no successful apply"))
    );
    assert_eq!(by("garbled")["converged"], false);
    assert!(
        by("garbled")["note"]
            .as_str()
            .is_some_and(|n| n.contains("unreadable"))
    );
    let names: Vec<&str> = rows.iter().filter_map(|r| r["node"].as_str()).collect();
    assert_eq!(names, ["fresh", "garbled", "ghost"], "sorted by node");
}

#[test]
fn a_compacted_revision_is_reported_as_such() {
    let etcd = Etcd::start();
    let reader = reader_config(&etcd);
    let config = reader.config.as_path();
    etcd.put("/services/web/a", "127.0.0.1:8081");
    let old = etcd.revision();
    put_ghost(&etcd, "ghost", old);
    etcd.put("/services/web/a", "127.0.0.1:8082");
    etcd.compact(etcd.revision());
    let r = row(config, "ghost").expect("ghost is live");
    assert_eq!(r["converged"], false, "{r}");
    assert!(
        r["note"].as_str().is_some_and(|n| n.contains("compacted")),
        "{r}"
    );
    let out = fleet(config, &[]);
    assert!(stdout(&out).contains("compacted"), "{}", stdout(&out));
}

#[test]
fn the_node_key_goes_when_run_stops() {
    let etcd = Etcd::start();
    etcd.put("/services/web/a", "127.0.0.1:8081");
    let mut node = start_node(&etcd, "lb-9");
    wait_for(SETTLE, "lb-9 published", || published(&etcd, "lb-9"));
    assert_eq!(node.terminate(), Some(0), "{}", node.log());
    assert!(
        published(&etcd, "lb-9").is_none(),
        "the key outlived the node:\n{}",
        node.log()
    );
    assert!(node.log().contains("fleet view: left"), "{}", node.log());
    let rows = fleet_json(&reader_config(&etcd).config);
    assert!(rows.is_empty(), "{rows:?}");
}

#[test]
fn an_empty_fleet_and_an_unreachable_etcd() {
    let etcd = Etcd::start();
    let reader = reader_config(&etcd);
    let config = reader.config.as_path();

    // No live node: the header only, exit 0; --wait waits for one until the timeout.
    let out = fleet(config, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 1, "{}", stdout(&out));
    assert_eq!(fleet_json(config), Vec::<Value>::new());
    let out = fleet(config, &["--wait", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no live node"), "{}", stderr(&out));

    // etcd unreachable: exit 1 with a clear message, with and without --wait, bounded.
    let closed = format!("http://127.0.0.1:{}", free_port());
    for args in [vec![], vec!["--wait", "--timeout", "2s"]] {
        let mut args = args;
        args.extend(["--etcd", closed.as_str()]);
        let started = Instant::now();
        let out = fleet(config, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("etcd unreachable") && stderr(&out).contains(&closed),
            "{}",
            stderr(&out)
        );
        assert!(started.elapsed() < Duration::from_secs(15), "{args:?}");
    }

    // Bad usage: 64.
    for args in [
        &["--timeout", "soon"][..],
        &["--etcd", "127.0.0.1:2379"][..],
    ] {
        let out = fleet(config, args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn a_fleet_prefix_over_the_watched_prefixes_is_a_config_error() {
    for (node, extra, key) in [
        ("lb-1", "prefix = \"/services/nodes/\"", "fleet.prefix"),
        ("lb-1", "prefix = \"/\"", "fleet.prefix"),
        ("not a name", "", "fleet.node"),
    ] {
        let setup = write_config("http://127.0.0.1:9", node, extra);
        for command in ["run", "fleet"] {
            let out = setup.haconfd(&[command]);
            assert_eq!(
                out.status.code(),
                Some(64),
                "{command} {extra}: {}",
                stderr(&out)
            );
            assert!(
                stderr(&out).contains(&format!("`{key}`")),
                "{}",
                stderr(&out)
            );
        }
    }
}

#[test]
fn a_stopping_node_that_lags_does_not_hold_the_gate() {
    let etcd = Etcd::start();
    let reader = reader_config(&etcd);
    let config = reader.config.as_path();
    etcd.put("/services/web/a", "127.0.0.1:8081");
    let r0 = etcd.revision();
    put_ghost(&etcd, "live", r0);
    put_ghost_as(&etcd, "leaving", r0, "stopping");
    etcd.put("/services/web/a", "127.0.0.1:9091");
    // Both lag; only the running one holds --wait.
    let out = fleet(config, &["--wait", "--timeout", "2s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("lagging: live"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("leaving ("), "{}", stderr(&out));
    put_ghost(&etcd, "live", etcd.revision());
    let out = fleet(config, &["--wait", "--timeout", "10s"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let leaving = row(config, "leaving").expect("the stopping node is still listed");
    assert_eq!(leaving["converged"], false);
    assert!(
        leaving["note"]
            .as_str()
            .is_some_and(|n| n.contains("stopping: out of the load balancer")),
        "{leaving}"
    );
}
