//! What the daemon measures and reports: Prometheus metrics (through `prometheus-client`) and
//! the state behind `/readyz`. Everything here is cheap to update from any task.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::haproxy::ApplyKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Latency buckets from 1 ms to about 16 s.
fn buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)
}

/// Every metric, plus the readiness state.
#[derive(Debug)]
pub struct Metrics {
    applies: Family<KindLabel, Counter>,
    pub render_failures: Counter,
    pub check_failures: Counter,
    pub reload_failures: Counter,
    pub runtime_failures: Counter,
    pub guard_holds: Counter,
    pub render_seconds: Histogram,
    pub validate_seconds: Histogram,
    pub reload_seconds: Histogram,
    pub apply_seconds: Histogram,
    rejected_keys: Gauge,
    held_back_keys: Gauge,
    held_services: Gauge,
    applied_revision: Gauge,
    watched_keys: Gauge,
    source_connected: Gauge,
    last_apply_timestamp: Gauge,
    /// Readiness: a first apply succeeded.
    applied_once: AtomicBool,
    /// Why the source is not connected, if it is not.
    source_problem: Mutex<Option<String>>,
    /// What the last apply held: guard-held services and held-back keys, for `/readyz`.
    held_detail: Mutex<(Vec<String>, Vec<String>)>,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            applies: Family::default(),
            render_failures: Counter::default(),
            check_failures: Counter::default(),
            reload_failures: Counter::default(),
            runtime_failures: Counter::default(),
            guard_holds: Counter::default(),
            render_seconds: Histogram::new(buckets()),
            validate_seconds: Histogram::new(buckets()),
            reload_seconds: Histogram::new(buckets()),
            apply_seconds: Histogram::new(buckets()),
            rejected_keys: Gauge::default(),
            held_back_keys: Gauge::default(),
            held_services: Gauge::default(),
            applied_revision: Gauge::default(),
            watched_keys: Gauge::default(),
            source_connected: Gauge::default(),
            last_apply_timestamp: Gauge::default(),
            applied_once: AtomicBool::new(false),
            source_problem: Mutex::new(None),
            held_detail: Mutex::new((Vec::new(), Vec::new())),
            registry: Registry::with_prefix("haconfd"),
        };
        m.register()
    }
}

impl Metrics {
    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "applies",
            "Applies by kind: none, written, start, runtime (Runtime API, no reload), reload",
            self.applies.clone(),
        );
        r.register(
            "render_failures",
            "Renders that failed (template errors, structural check)",
            self.render_failures.clone(),
        );
        r.register(
            "check_failures",
            "Candidate files that haproxy -c rejected",
            self.check_failures.clone(),
        );
        r.register(
            "reload_failures",
            "Reloads that were not confirmed or failed to load; previous files restored",
            self.reload_failures.clone(),
        );
        r.register(
            "runtime_failures",
            "Runtime API changes refused, followed by a reload",
            self.runtime_failures.clone(),
        );
        r.register(
            "guard_holds",
            "Applies in which the shrink guard held at least one service",
            self.guard_holds.clone(),
        );
        r.register(
            "render_seconds",
            "Time to parse and render all templates",
            self.render_seconds.clone(),
        );
        r.register(
            "validate_seconds",
            "Time haproxy -c took",
            self.validate_seconds.clone(),
        );
        r.register(
            "reload_seconds",
            "Time from reload request to confirmation (or Runtime API commands)",
            self.reload_seconds.clone(),
        );
        r.register(
            "apply_seconds",
            "Time of a whole apply",
            self.apply_seconds.clone(),
        );
        r.register(
            "rejected_keys",
            "Keys left out of the last read because they failed the screen or the typed parse",
            self.rejected_keys.clone(),
        );
        r.register(
            "held_back_keys",
            "Keys whose changes the last apply held back because they failed haproxy -c",
            self.held_back_keys.clone(),
        );
        r.register(
            "guard_held_services",
            "Services the shrink guard holds at their last applied state",
            self.held_services.clone(),
        );
        r.register(
            "applied_revision",
            "Source revision of the last successful apply",
            self.applied_revision.clone(),
        );
        r.register(
            "watched_keys",
            "Keys in the last complete state from the source",
            self.watched_keys.clone(),
        );
        r.register(
            "source_connected",
            "1 while the source is connected (always 1 for the file source once read)",
            self.source_connected.clone(),
        );
        r.register(
            "last_apply_timestamp_seconds",
            "Unix time of the last successful apply",
            self.last_apply_timestamp.clone(),
        );
        self
    }

    /// The Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn applied(&self, kind: ApplyKind, revision: i64) {
        self.applies
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
        self.applied_revision.set(revision);
        self.last_apply_timestamp.set(unix_seconds() as i64);
        self.applied_once.store(true, Ordering::Relaxed);
    }

    pub fn set_rejected(&self, n: u64) {
        self.rejected_keys.set(n as i64);
    }

    pub fn rejected(&self) -> u64 {
        self.rejected_keys.get().max(0) as u64
    }

    /// Records what the last apply held back: guard-held services and isolated keys.
    pub fn set_held(&self, services: &[String], keys: &[String]) {
        self.held_services.set(services.len() as i64);
        self.held_back_keys.set(keys.len() as i64);
        if let Ok(mut d) = self.held_detail.lock() {
            *d = (services.to_vec(), keys.to_vec());
        }
    }

    /// Lines for `/readyz` about what is held back, empty when nothing is.
    pub fn held_detail(&self) -> Vec<String> {
        let Ok(d) = self.held_detail.lock() else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        if !d.0.is_empty() {
            lines.push(format!(
                "guard holds (SIGUSR1 confirms): {}",
                d.0.join(", ")
            ));
        }
        if !d.1.is_empty() {
            lines.push(format!("held back, fail haproxy -c: {}", d.1.join(", ")));
        }
        lines
    }

    /// The source delivered a complete state of `keys` keys.
    pub fn source_update(&self, keys: usize) {
        self.watched_keys.set(keys as i64);
        self.source_ok();
    }

    /// The source is connected (etcd answered).
    pub fn source_ok(&self) {
        self.source_connected.set(1);
        if let Ok(mut p) = self.source_problem.lock() {
            *p = None;
        }
    }

    /// The source is not connected, and why.
    pub fn source_down(&self, why: &str) {
        self.source_connected.set(0);
        if let Ok(mut p) = self.source_problem.lock() {
            *p = Some(why.to_owned());
        }
    }

    /// `Ok` when ready; otherwise a short reason. Ready means: a first apply succeeded and the
    /// source is connected.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.applied_once.load(Ordering::Relaxed) {
            return Err("no successful apply yet".into());
        }
        if self.source_connected.get() == 0 {
            let why = self
                .source_problem
                .lock()
                .ok()
                .and_then(|p| p.clone())
                .unwrap_or_else(|| "source not connected".into());
            return Err(format!("source not connected: {why}"));
        }
        Ok(())
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_prometheus_text_and_tracks_readiness() {
        let m = Metrics::default();
        assert!(m.readiness().is_err());
        m.source_update(3);
        m.applied(ApplyKind::Reload, 42);
        m.check_failures.inc();
        assert_eq!(m.readiness(), Ok(()));
        let text = m.encode();
        assert!(
            text.contains("haconfd_applies_total{kind=\"reload\"} 1"),
            "{text}"
        );
        assert!(text.contains("haconfd_applied_revision 42"), "{text}");
        assert!(text.contains("haconfd_check_failures_total 1"), "{text}");
        assert!(text.contains("haconfd_watched_keys 3"), "{text}");
        m.source_down("etcd unreachable");
        assert_eq!(
            m.readiness(),
            Err("source not connected: etcd unreachable".into())
        );
    }
}
