//! A client for a daemon's admin endpoint on 127.0.0.1: `GET` any path, one metric from
//! `/metrics`, and bounded waits on `/readyz` and on a metric.

use std::path::Path;
use std::time::Duration;

use super::haproxy::http_get;
use super::wait_for;

/// The admin endpoint of one daemon.
#[derive(Debug, Clone, Copy)]
pub struct Admin {
    pub port: u16,
}

impl Admin {
    pub fn at(port: u16) -> Admin {
        Admin { port }
    }

    /// The endpoint a config file names (`listen = "127.0.0.1:PORT"` in its `[admin]` table),
    /// if it names one.
    pub fn of_config(config: &Path) -> Option<Admin> {
        let text = std::fs::read_to_string(config).ok()?;
        let rest = text.split("[admin]").nth(1)?;
        let listen = rest.split("listen = \"127.0.0.1:").nth(1)?;
        let port = listen.split('"').next()?.parse().ok()?;
        Some(Admin { port })
    }

    /// Status and body of `GET path`, if the endpoint answers.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, "localhost", path)
            .ok()
            .map(|r| (r.status, r.body))
    }

    /// The value of the sample `name` without labels on `/metrics`, if the endpoint answers
    /// and has it.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        metric_in(&body, name)
    }

    /// Waits until the metric `name` reads `want`.
    pub fn wait_metric(&self, name: &str, want: f64, timeout: Duration) {
        wait_for(timeout, &format!("{name} = {want}"), || {
            (self.metric(name) == Some(want)).then_some(())
        });
    }

    /// Waits until `/readyz` answers with `status` and a body that contains `text`; the body.
    pub fn wait_readyz(&self, status: u16, text: &str, timeout: Duration) -> String {
        wait_for(timeout, &format!("/readyz {status} {text:?}"), || {
            self.get("/readyz")
                .filter(|(s, b)| *s == status && b.contains(text))
                .map(|(_, b)| b)
        })
    }
}

/// The value of the sample `name` without labels in Prometheus text.
pub fn metric_in(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
