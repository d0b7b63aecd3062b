//! Counters and gauges the daemon keeps. The admin endpoint (a later issue) exposes them in the
//! Prometheus text format; until then they are logged and read by tests.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::haproxy::ApplyKind;

/// A monotonically rising count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub applies_none: Counter,
    pub applies_written: Counter,
    pub applies_start: Counter,
    pub applies_reload: Counter,
    pub applies_runtime: Counter,
    pub runtime_failures: Counter,
    pub render_failures: Counter,
    pub check_failures: Counter,
    pub reload_failures: Counter,
    pub guard_holds: Counter,
    /// Keys left out of the last read.
    rejected_keys: AtomicU64,
    /// Keys whose changes the last apply held back because they failed `haproxy -c`.
    held_back_keys: AtomicU64,
    applied_revision: AtomicI64,
}

impl Metrics {
    pub fn applied(&self, kind: ApplyKind, revision: i64) {
        match kind {
            ApplyKind::None => self.applies_none.inc(),
            ApplyKind::Written => self.applies_written.inc(),
            ApplyKind::Start => self.applies_start.inc(),
            ApplyKind::Reload => self.applies_reload.inc(),
            ApplyKind::Runtime => self.applies_runtime.inc(),
        }
        self.applied_revision.store(revision, Ordering::Relaxed);
    }

    pub fn set_rejected(&self, n: u64) {
        self.rejected_keys.store(n, Ordering::Relaxed);
    }

    pub fn set_held_back(&self, n: u64) {
        self.held_back_keys.store(n, Ordering::Relaxed);
    }

    pub fn held_back(&self) -> u64 {
        self.held_back_keys.load(Ordering::Relaxed)
    }

    pub fn rejected(&self) -> u64 {
        self.rejected_keys.load(Ordering::Relaxed)
    }

    pub fn applied_revision(&self) -> i64 {
        self.applied_revision.load(Ordering::Relaxed)
    }
}
