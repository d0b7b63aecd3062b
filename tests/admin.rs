//! The admin endpoint against a real etcd: `/readyz` moves from not ready to ready after the
//! first apply, says at once when etcd goes away, and turns not ready once the state is stale
//! past `[admin] stale_after` (a shorter outage leaves it ready); the file source likewise;
//! `/metrics` parses as Prometheus text.

mod common;

use std::time::Duration;

use common::etcd::{Etcd, EtcdOptions};
use common::run::{EtcdDaemon, Run};
use common::wait_for;

const SETTLE: Duration = Duration::from_secs(30);

/// `haconfd run` over `source` with `[admin] stale_after`.
fn start(source: EtcdDaemon, stale_after: &str) -> Run {
    source
        .admin_extra(&format!("stale_after = \"{stale_after}\""))
        .start()
}

#[test]
fn readiness_follows_the_first_apply_and_the_source_connection() {
    let mut etcd = Etcd::with(EtcdOptions::default());
    // The same etcd behind two daemons that differ only in stale_after.
    let run = start(EtcdDaemon::new(&etcd.endpoint()), "2s");
    let patient = start(EtcdDaemon::new(&etcd.endpoint()), "10m");
    let (admin, patient_admin) = (run.admin(), patient.admin());

    // etcd is not there yet: alive, not ready, nothing written.
    wait_for(SETTLE, "/healthz", || {
        admin.get("/healthz").filter(|(s, _)| *s == 200)
    });
    let body = admin.wait_readyz(503, "not ready", SETTLE);
    assert!(body.contains("no successful apply yet"), "{body}");
    assert!(!run.dest().exists());

    etcd.launch();
    etcd.put("/services/web/w1", "127.0.0.1:8080");
    admin.wait_readyz(200, "ready", SETTLE);
    patient_admin.wait_readyz(200, "ready", SETTLE);
    wait_for(SETTLE, "the put in dest", || {
        std::fs::read_to_string(run.dest())
            .ok()
            .filter(|t| t.contains("w1 127.0.0.1:8080"))
    });

    // /metrics is valid Prometheus text and says what happened.
    let (status, text) = admin.get("/metrics").expect("/metrics");
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("/metrics parses as Prometheus text");
    let value = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(value("haconfd_source_connected"), Some(1.0), "{text}");
    assert_eq!(value("haconfd_watched_keys"), Some(1.0), "{text}");
    assert!(
        value("haconfd_applied_revision").is_some_and(|r| r > 0.0),
        "{text}"
    );
    // The watch answers every second, and each answer makes the state current again: the
    // state's age goes back down instead of growing. How soon is not asserted (the machine
    // may be loaded); the ages seen are printed.
    let first = value("haconfd_source_stale_seconds").expect("the stale gauge");
    let mut seen = vec![first];
    wait_for(SETTLE, "the state's age to go back down", || {
        let now = admin.metric("haconfd_source_stale_seconds")?;
        let back_down = now < *seen.last()?;
        seen.push(now);
        back_down.then_some(())
    });
    let top = seen.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "haconfd_source_stale_seconds while connected: rose to {top} s, then back to {} s ({} reads)",
        seen.last().copied().unwrap_or_default(),
        seen.len()
    );
    assert!(
        scrape.samples.iter().any(|s| s.metric == "haconfd_applies_total"
            && s.labels.get("kind") == Some("written")),
        "{text}"
    );
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric.starts_with("haconfd_apply_seconds")),
        "{text}"
    );

    // etcd goes away: past stale_after (2 s) not ready, with the reason and the age.
    etcd.stop();
    let body = admin.wait_readyz(503, "source not connected", SETTLE);
    assert!(body.contains("etcd"), "{body}");
    assert!(
        body.starts_with("not ready: state stale for ") && body.contains("past stale_after 2s"),
        "{body}"
    );
    assert!(
        admin
            .metric("haconfd_source_stale_seconds")
            .is_some_and(|s| s > 2.0),
        "the stale gauge follows /readyz"
    );
    // The same outage, shorter than the other daemon's stale_after (10 min): still ready, and
    // the body says the source is gone and for how long.
    let body = patient_admin.wait_readyz(200, "source not connected", SETTLE);
    assert!(body.starts_with("ready\n"), "{body}");
    assert!(body.contains("not ready past 600s"), "{body}");

    // etcd back: ready again.
    etcd.launch();
    admin.wait_readyz(200, "ready", SETTLE);
    // The patient daemon reconnects after its own backoff: wait for it (bounded), rather than
    // race it.
    wait_for(SETTLE, "the patient daemon to reconnect", || {
        patient_admin
            .get("/readyz")
            .filter(|(s, b)| *s == 200 && b.starts_with("ready") && !b.contains("not connected"))
    });
}

#[test]
fn the_file_source_is_current_while_the_file_is_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = dir.path().join("registry.yaml");
    let text = "services:\n  web:\n    w1: \"127.0.0.1:8080\"\n";
    std::fs::write(&registry, text).expect("registry");
    let run = start(EtcdDaemon::file(&registry), "2s");
    let admin = run.admin();
    admin.wait_readyz(200, "ready", SETTLE);
    // No change for longer than stale_after: a readable file does not age.
    std::thread::sleep(Duration::from_secs(3));
    let (status, body) = admin.get("/readyz").expect("/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(admin.metric("haconfd_source_stale_seconds"), Some(0.0));

    // Unreadable past stale_after: not ready; readable again with the same data: ready.
    std::fs::remove_file(&registry).expect("remove registry");
    let body = admin.wait_readyz(503, "registry file unreadable", SETTLE);
    assert!(body.contains("state stale for"), "{body}");
    common::write_atomic(&registry, text.as_bytes());
    admin.wait_readyz(200, "ready", SETTLE);
    assert!(run.dest().exists());
}
