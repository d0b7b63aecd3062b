//! The admin endpoint against a real etcd: `/readyz` moves from not ready to ready after the
//! first apply, says at once when etcd goes away, and turns not ready once the state is stale
//! past `[admin] stale_after` (a shorter outage leaves it ready); the file source likewise;
//! `/metrics` parses as Prometheus text.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::etcd::{Etcd, EtcdOptions};
use common::haproxy::http_get;
use common::{free_port, haconfd_bin, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const SETTLE: Duration = Duration::from_secs(30);

const TEMPLATE: &str = "{% for s in services %}{% for i in s.instances %}server {{ i.id }} {{ i.addr }}\n{% endfor %}{% endfor %}";

/// `haconfd run` over an etcd endpoint, ended by PID when dropped.
struct Run {
    child: Child,
    admin: u16,
    dest: PathBuf,
    _dir: tempfile::TempDir,
}

/// The `[source]` tables for an etcd endpoint.
fn etcd_source(endpoint: &str) -> String {
    format!(
        "[source]\nkind = \"etcd\"\n[etcd]\nendpoints = [\"{endpoint}\"]\ndial_timeout = \"1s\"\n"
    )
}

impl Run {
    /// `source`: the `[source]` table and its `[etcd]` or `[file]`.
    fn start(source: &str, stale_after: &str) -> Run {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("t.tera");
        std::fs::write(&src, TEMPLATE).expect("template");
        let dest = dir.path().join("out.cfg");
        let admin = free_port();
        let config = dir.path().join("haconfd.toml");
        std::fs::write(
            &config,
            format!(
                r#"{source}
[[template]]
name = "servers"
src = "{}"
dest = "{}"
check = false
[haproxy]
mode = "none"
[wait]
min = "50ms"
max = "500ms"
[admin]
listen = "127.0.0.1:{admin}"
stale_after = "{stale_after}"
"#,
                src.display(),
                dest.display()
            ),
        )
        .expect("config");
        let child = Command::new(haconfd_bin())
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("HACONFD_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start haconfd");
        Run {
            child,
            admin,
            dest,
            _dir: dir,
        }
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin, "localhost", path)
            .ok()
            .map(|r| (r.status, r.body))
    }

    /// The value of one sample on `/metrics`.
    fn metric(&self, name: &str) -> Option<f64> {
        let (_, text) = self.get("/metrics")?;
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).ok()?;
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    }

    /// Waits until `/readyz` answers with `status` and a body containing `text`.
    fn readyz(&self, status: u16, text: &str) -> String {
        wait_for(SETTLE, &format!("/readyz {status} {text:?}"), || {
            self.get("/readyz")
                .filter(|(s, b)| *s == status && b.contains(text))
                .map(|(_, b)| b)
        })
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn readiness_follows_the_first_apply_and_the_source_connection() {
    let mut etcd = Etcd::with(EtcdOptions::default());
    // The same etcd behind two daemons that differ only in stale_after.
    let run = Run::start(&etcd_source(&etcd.endpoint()), "2s");
    let patient = Run::start(&etcd_source(&etcd.endpoint()), "10m");

    // etcd is not there yet: alive, not ready, nothing written.
    wait_for(SETTLE, "/healthz", || {
        run.get("/healthz").filter(|(s, _)| *s == 200)
    });
    let body = run.readyz(503, "not ready");
    assert!(body.contains("no successful apply yet"), "{body}");
    assert!(!run.dest.exists());

    etcd.launch();
    etcd.put("/services/web/w1", "127.0.0.1:8080");
    run.readyz(200, "ready");
    patient.readyz(200, "ready");
    wait_for(SETTLE, "the put in dest", || {
        std::fs::read_to_string(&run.dest)
            .ok()
            .filter(|t| t.contains("w1 127.0.0.1:8080"))
    });

    // /metrics is valid Prometheus text and says what happened.
    let (status, text) = run.get("/metrics").expect("/metrics");
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
    // The watch answers every second: the state is never more than about that old.
    assert!(
        value("haconfd_source_stale_seconds").is_some_and(|s| s < 2.0),
        "{text}"
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
    let body = run.readyz(503, "source not connected");
    assert!(body.contains("etcd"), "{body}");
    assert!(
        body.starts_with("not ready: state stale for ") && body.contains("past stale_after 2s"),
        "{body}"
    );
    assert!(
        run.metric("haconfd_source_stale_seconds")
            .is_some_and(|s| s > 2.0),
        "the stale gauge follows /readyz"
    );
    // The same outage, shorter than the other daemon's stale_after (10 min): still ready, and
    // the body says the source is gone and for how long.
    let body = patient.readyz(200, "source not connected");
    assert!(body.starts_with("ready\n"), "{body}");
    assert!(body.contains("not ready past 600s"), "{body}");

    // etcd back: ready again.
    etcd.launch();
    run.readyz(200, "ready");
    // The patient daemon reconnects after its own backoff: wait for it (bounded), rather than
    // race it.
    wait_for(SETTLE, "the patient daemon to reconnect", || {
        patient
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
    let run = Run::start(
        &format!(
            "[source]\nkind = \"file\"\n[file]\npath = \"{}\"\n",
            registry.display()
        ),
        "2s",
    );
    run.readyz(200, "ready");
    // No change for longer than stale_after: a readable file does not age.
    std::thread::sleep(Duration::from_secs(3));
    let (status, body) = run.get("/readyz").expect("/readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    assert_eq!(run.metric("haconfd_source_stale_seconds"), Some(0.0));

    // Unreadable past stale_after: not ready; readable again with the same data: ready.
    std::fs::remove_file(&registry).expect("remove registry");
    let body = run.readyz(503, "registry file unreadable");
    assert!(body.contains("state stale for"), "{body}");
    common::write_atomic(&registry, text.as_bytes());
    run.readyz(200, "ready");
    assert!(run.dest.exists());
}
