//! The admin endpoint against a real etcd: `/readyz` moves from not ready to ready after the
//! first apply and back when etcd goes away; `/metrics` parses as Prometheus text.

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

impl Run {
    fn start(endpoint: &str) -> Run {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("t.tera");
        std::fs::write(&src, TEMPLATE).expect("template");
        let dest = dir.path().join("out.cfg");
        let admin = free_port();
        let config = dir.path().join("haconfd.toml");
        std::fs::write(
            &config,
            format!(
                r#"[source]
kind = "etcd"
[etcd]
endpoints = ["{endpoint}"]
dial_timeout = "1s"
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
    let run = Run::start(&etcd.endpoint());

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

    // etcd goes away: not ready, with the reason; back: ready again.
    etcd.stop();
    let body = run.readyz(503, "source not connected");
    assert!(body.contains("etcd"), "{body}");
    etcd.launch();
    run.readyz(200, "ready");
}
