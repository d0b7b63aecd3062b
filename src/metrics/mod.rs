//! What the daemon measures and reports: Prometheus metrics (through `prometheus-client`) and
//! the state behind `/readyz`. Everything here is cheap to update from any task.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

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
    /// HAProxy masters that died and were started again (supervise), or that their own
    /// supervisor restarted (master mode, as haconfd noticed).
    pub haproxy_restarts: Counter,
    /// Server-only changes HAProxy took through the Runtime API ahead of their files.
    served_ahead: Counter,
    /// The file watches (the registry file's; the templates' and config's) that poll their
    /// files because inotify is out of instances or watches.
    pub file_watch_polling: Gauge,
    /// Orphaned processes (a reload command's double-forked grandchild, say) that the kernel
    /// handed to haconfd as PID 1 or child subreaper, and that it reaped.
    pub orphans_reaped: Counter,
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
    source_stale_seconds: Gauge<f64, AtomicU64>,
    last_apply_timestamp: Gauge,
    /// The clock behind `last_current` (tokio's, so that tests can pause it).
    epoch: Instant,
    /// When the source last confirmed that its state is current, in ms after `epoch`.
    last_current: AtomicU64,
    /// The source confirms continuously (the etcd watch answers every second), so its silence
    /// counts. A source that does not (the file) is current for as long as it is connected.
    heartbeats: AtomicBool,
    /// `[admin] stale_after` in ms.
    stale_after: AtomicU64,
    /// Readiness: a first apply succeeded.
    applied_once: AtomicBool,
    /// The daemon was told to stop: lame duck, then HAProxy's soft stop. Never cleared.
    stopping: AtomicBool,
    /// Why the source is not connected, if it is not.
    source_problem: Mutex<Option<String>>,
    /// What the last apply held: guard-held services and held-back keys, for `/readyz`.
    held_detail: Mutex<(Vec<String>, Vec<String>)>,
    /// The last successful apply, as the fleet view publishes it.
    last_apply: Mutex<Option<LastApply>>,
    /// Wakes the fleet publisher (`src/fleet.rs`) when what it publishes may have changed.
    fleet_poke: tokio::sync::Notify,
    /// Installs that fail on the disk, for `/readyz` and two metrics.
    install: InstallStatus,
    /// 1 while the config file or a template on disk is rejected and the last good ones run.
    config_rejected: Gauge,
    /// Why, in one line, for `/readyz`.
    config_problem: Mutex<Option<String>>,
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
            haproxy_restarts: Counter::default(),
            served_ahead: Counter::default(),
            file_watch_polling: Gauge::default(),
            orphans_reaped: Counter::default(),
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
            source_stale_seconds: Gauge::default(),
            last_apply_timestamp: Gauge::default(),
            epoch: Instant::now(),
            last_current: AtomicU64::new(0),
            heartbeats: AtomicBool::new(false),
            // The config's default; `run` sets the configured value.
            stale_after: AtomicU64::new(30_000),
            applied_once: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            source_problem: Mutex::new(None),
            held_detail: Mutex::new((Vec::new(), Vec::new())),
            last_apply: Mutex::new(None),
            fleet_poke: tokio::sync::Notify::new(),
            install: InstallStatus::default(),
            config_rejected: Gauge::default(),
            config_problem: Mutex::new(None),
            registry: Registry::with_prefix("haconfd"),
        };
        m.register()
    }
}

impl Metrics {
    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "config_rejected",
            "1 while the config file or a template on disk is rejected (syntax, validation, render) and the last good ones keep running",
            self.config_rejected.clone(),
        );
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
            "haproxy_restarts",
            "HAProxy masters that died (killed, or their worker killed) and were started again on the installed config (supervise), or that their own supervisor restarted (master mode)",
            self.haproxy_restarts.clone(),
        );
        r.register(
            "served_ahead",
            "Server-only changes HAProxy took through the Runtime API ahead of their files (which follow as applies of kind runtime)",
            self.served_ahead.clone(),
        );
        r.register(
            "file_watch_polling",
            "File watches (registry file; templates and config) that poll every second because inotify is out of instances or watches (raise fs.inotify.max_user_instances / max_user_watches); 0 when inotify works",
            self.file_watch_polling.clone(),
        );
        r.register(
            "orphans_reaped",
            "Orphaned processes (a reload command's double-forked grandchild, say) re-parented to haconfd as PID 1 or child subreaper, and reaped",
            self.orphans_reaped.clone(),
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
            "source_stale_seconds",
            "Seconds since the source last confirmed its state is current (0 while the file source is readable)",
            self.source_stale_seconds.clone(),
        );
        r.register(
            "last_apply_timestamp_seconds",
            "Unix time of the last successful apply",
            self.last_apply_timestamp.clone(),
        );
        r.register(
            "log_dropped",
            "Log lines dropped because stderr was full or refused them",
            crate::logging::DroppedLines,
        );
        self.install.register(r);
        self
    }

    /// The Prometheus text format.
    pub fn encode(&self) -> String {
        self.source_stale_seconds
            .set(self.source_stale_for().as_secs_f64());
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

    /// HAProxy took a change of `revision` through the Runtime API ahead of its files: the
    /// revision is applied, the files follow as an apply of their own.
    pub fn served(&self, revision: i64) {
        self.served_ahead.inc();
        self.applied_revision.set(revision);
        self.last_apply_timestamp.set(unix_seconds() as i64);
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

    /// The source is connected (etcd answered, the file was read): its state is current now.
    pub fn source_ok(&self) {
        self.last_current.store(self.millis(), Ordering::Relaxed);
        self.source_connected.set(1);
        if let Ok(mut p) = self.source_problem.lock() {
            *p = None;
        }
    }

    /// The source heard from etcd just now (any watch answer: events or the progress answer it
    /// asks for every second). Cheap: called for every watch message. A source that calls this
    /// is expected to go on calling it; from then on its silence counts as staleness.
    pub fn source_current(&self) {
        self.last_current.store(self.millis(), Ordering::Relaxed);
        self.heartbeats.store(true, Ordering::Relaxed);
    }

    /// The source is not connected, and why.
    pub fn source_down(&self, why: &str) {
        // A source without heartbeats was current until this moment; an etcd watch was last
        // current at its last answer, which `last_current` already holds.
        if self.source_connected.get() == 1 && !self.heartbeats.load(Ordering::Relaxed) {
            self.last_current.store(self.millis(), Ordering::Relaxed);
        }
        self.source_connected.set(0);
        if let Ok(mut p) = self.source_problem.lock() {
            *p = Some(why.to_owned());
        }
    }

    /// The daemon is stopping (the first SIGTERM or SIGINT): not ready from now on.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Sets `[admin] stale_after`.
    pub fn set_stale_after(&self, d: Duration) {
        self.stale_after.store(
            d.as_millis().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    fn stale_after(&self) -> Duration {
        Duration::from_millis(self.stale_after.load(Ordering::Relaxed))
    }

    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis().min(u64::MAX as u128) as u64
    }

    fn connected(&self) -> bool {
        self.source_connected.get() == 1
    }

    /// How long the source has not confirmed that its state is current: zero while a source
    /// without heartbeats is connected; before the source was ever current, since start.
    pub fn source_stale_for(&self) -> Duration {
        if self.connected() && !self.heartbeats.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let last = self.last_current.load(Ordering::Relaxed);
        Duration::from_millis(self.millis().saturating_sub(last))
    }

    fn source_problem(&self) -> String {
        self.source_problem
            .lock()
            .ok()
            .and_then(|p| p.clone())
            .unwrap_or_else(|| "source not connected".into())
    }

    /// `Ok` when ready; otherwise a short reason. Ready means: not stopping, a first apply
    /// succeeded and the source confirmed its state within `stale_after`. A disconnection shorter than that
    /// (an etcd restart, a leader change) leaves a node ready: HAProxy serves the last good
    /// state, which is almost certainly still right, and a fleet that all turned not ready at
    /// once during an etcd rolling restart would help no one. [`Metrics::source_detail`] says
    /// so meanwhile.
    pub fn readiness(&self) -> Result<(), String> {
        if self.stopping() {
            return Err("stopping (lame duck, then HAProxy's soft stop)".into());
        }
        if !self.applied_once.load(Ordering::Relaxed) {
            return Err("no successful apply yet".into());
        }
        let (age, limit) = (self.source_stale_for(), self.stale_after());
        if age > limit {
            let why = if self.connected() {
                "the source is connected but has confirmed nothing since".to_owned()
            } else {
                format!("source not connected: {}", self.source_problem())
            };
            return Err(format!(
                "state stale for {}s, past stale_after {}s ({why})",
                age.as_secs(),
                limit.as_secs()
            ));
        }
        if let Some((what, age)) = self.install_problem().filter(|(_, age)| *age > limit) {
            return Err(format!(
                "{what} (failing for {}s, past stale_after {}s; HAProxy serves the last good config)",
                age.as_secs(),
                limit.as_secs()
            ));
        }
        Ok(())
    }

    /// A line for `/readyz` while the source is not connected but the state is not yet stale.
    pub fn source_detail(&self) -> Option<String> {
        let (age, limit) = (self.source_stale_for(), self.stale_after());
        (!self.connected() && age <= limit).then(|| {
            format!(
                "source not connected: {}; state stale for {}s, not ready past {}s",
                self.source_problem(),
                age.as_secs(),
                limit.as_secs()
            )
        })
    }

    // The fleet view (`src/fleet.rs`) publishes what follows, with the readiness above.

    /// Records a successful apply for the fleet view and wakes its publisher.
    pub fn set_last_apply(&self, hash: &str, kind: ApplyKind, haproxy_running: bool) {
        if let Ok(mut l) = self.last_apply.lock() {
            *l = Some(LastApply {
                hash: hash.to_owned(),
                kind,
                at: SystemTime::now(),
                haproxy_running,
            });
        }
        self.poke_fleet();
    }

    pub fn last_apply(&self) -> Option<LastApply> {
        self.last_apply.lock().ok().and_then(|l| l.clone())
    }

    /// The source revision of the last successful apply (0 before the first).
    pub fn applied_revision(&self) -> i64 {
        self.applied_revision.get()
    }

    /// What the last apply held: guard-held services and held-back keys.
    pub fn held(&self) -> (Vec<String>, Vec<String>) {
        self.held_detail
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    /// Tells the fleet publisher that what it publishes may have changed (an apply, the start
    /// of the lame duck). Pokes that come while it is busy coalesce into one.
    pub fn poke_fleet(&self) {
        self.fleet_poke.notify_one();
    }

    /// Returns at the next [`Metrics::poke_fleet`], or at once when one came since the last
    /// call. Only the fleet publisher waits here.
    pub async fn fleet_poked(&self) {
        self.fleet_poke.notified().await;
    }
}

/// The last successful apply, for the fleet view.
#[derive(Debug, Clone)]
pub struct LastApply {
    /// The apply report's hash of the rendered files.
    pub hash: String,
    pub kind: ApplyKind,
    pub at: SystemTime,
    /// Whether the HAProxy the daemon drives was running after it.
    pub haproxy_running: bool,
}

// Installs that fail on the disk (issue 11, "Disk").
//
// A node whose installs fail has stopped following the registry exactly as a node whose source
// went silent has: HAProxy serves the last good config, which ages. It gets the same budget,
// `stale_after`: a disk filled for a moment (a log burst, a remount) leaves the node in rotation
// with a detail line on `/readyz`, and one that stays full or read-only turns it not ready, so
// that the fleet's load balancer sends traffic to the nodes that follow the registry. The gauge
// is what an alert watches; the counter says how often, and why.

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Installs that fail on the disk: a gauge while they do, a counter by reason, and the problem
/// with the start of the streak.
#[derive(Debug, Default)]
struct InstallStatus {
    failing: Gauge,
    failures: Family<ReasonLabel, Counter>,
    /// "cannot install <dest>: disk full", and when installs began to fail.
    problem: Mutex<Option<(String, Instant)>>,
}

impl InstallStatus {
    fn register(&self, r: &mut Registry) {
        r.register(
            "install_failing",
            "1 while the latest install failed on the disk (full, read-only) and is being retried",
            self.failing.clone(),
        );
        r.register(
            "install_failures",
            "Installs that failed on the disk, by reason: disk_full, read_only, quota_exceeded, io",
            self.failures.clone(),
        );
    }
}

impl Metrics {
    /// An install failed on the disk. `problem` names the file and says why ("cannot install
    /// /etc/haproxy/haproxy.cfg: disk full"); the streak keeps the time of its first failure.
    pub fn install_failed(&self, reason: &'static str, problem: String) {
        self.install.failing.set(1);
        self.install
            .failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
        if let Ok(mut p) = self.install.problem.lock() {
            let since = p.as_ref().map_or_else(Instant::now, |(_, since)| *since);
            *p = Some((problem, since));
        }
        self.poke_fleet();
    }

    /// The latest apply did not fail on the disk: the streak, if any, is over.
    pub fn install_ok(&self) {
        self.install.failing.set(0);
        if let Ok(mut p) = self.install.problem.lock()
            && p.take().is_some()
        {
            self.poke_fleet();
        }
    }

    /// What fails to install, and for how long.
    fn install_problem(&self) -> Option<(String, Duration)> {
        let p = self.install.problem.lock().ok()?;
        p.as_ref()
            .map(|(what, since)| (what.clone(), since.elapsed()))
    }

    /// The config file or a template on disk was rejected (`Some`, one line saying why) and
    /// the last good ones keep running, or the latest ones were taken (`None`).
    pub fn set_config_problem(&self, problem: Option<String>) {
        self.config_rejected.set(i64::from(problem.is_some()));
        if let Ok(mut p) = self.config_problem.lock() {
            *p = problem;
        }
    }

    /// A line for `/readyz` while the config or a template on disk is rejected. The node stays
    /// ready: it serves the last good config, and a bad edit pushed to every node must not take
    /// the whole fleet out of its load balancer.
    pub fn config_detail(&self) -> Option<String> {
        let p = self.config_problem.lock().ok()?;
        p.as_ref().map(|why| {
            format!("{why}; running on the last good config and templates until this is fixed")
        })
    }

    /// A line for `/readyz` while installs fail but not yet for longer than `stale_after`.
    pub fn install_detail(&self) -> Option<String> {
        let (what, age) = self.install_problem()?;
        let limit = self.stale_after();
        (age <= limit).then(|| {
            format!(
                "{what}; retrying with backoff; HAProxy serves the last good config; failing for {}s, not ready past {}s",
                age.as_secs(),
                limit.as_secs()
            )
        })
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests;
