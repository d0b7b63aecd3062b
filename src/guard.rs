//! The shrink guard: a collapsing registry cannot empty the load balancer.
//!
//! A mass lease expiry, an etcd wipe or a bad deploy of the presence sidecars looks, from here,
//! like instances going away. The guard compares the registry about to be rendered with the one
//! applied last. A service that would lose more than `max_drop_percent` of its instances, or a
//! registry that would go from non-empty to empty, is *held*: its last applied instances are
//! rendered instead, while every other service keeps changing. A hold is released when the
//! instances come back, when the new state has persisted unchanged for `confirm_after`, or when
//! an operator confirms it (SIGUSR1 to `haconfd run`).
//!
//! The guard owns one file: the per-service instance counts of the last apply, hidden beside
//! the HAProxy file (`.<name>.haconfd-guard.json`), so that the guard of the next run has a
//! reference before it applies anything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::time::Instant;

use crate::config::{Config, GuardConfig};
use crate::haproxy::install;
use crate::model::{Instance, Registry, Service};

/// One held service.
#[derive(Debug, Clone)]
pub struct Hold {
    pub service: String,
    /// Instances applied last, and instances the source now has.
    pub applied: usize,
    pub wanted: usize,
    /// Since when the source has wanted exactly this state.
    pub since: Instant,
    wanted_ids: Vec<String>,
}

/// The guard's memory across applies.
#[derive(Debug)]
pub struct Guard {
    config: GuardConfig,
    holds: BTreeMap<String, Hold>,
    /// The whole registry is held (it went empty).
    empty_since: Option<Instant>,
    /// The operator confirmed: the next decision holds nothing.
    confirmed: bool,
    /// Per service applied last, sorted by name: the most instances applied within
    /// `confirm_after`, and since when.
    baselines: Vec<Baseline>,
    /// Counts applied by the previous run, until this process applies something.
    remembered: Option<BTreeMap<String, usize>>,
    /// Since when the registry has been collapsed against `remembered`.
    collapse_since: Option<Instant>,
    /// The counts in the guard file as last read or written: an unchanged registry writes
    /// nothing.
    written: Option<BTreeMap<String, usize>>,
}

/// The reference a service's drop is measured from.
#[derive(Debug)]
struct Baseline {
    name: String,
    most: usize,
    since: Instant,
}

/// What a service's drop comes to.
enum Verdict {
    /// Within `max_drop_percent` (or nothing to drop from).
    Within,
    Held(Hold),
    /// The same drop has been wanted for `confirm_after`: it applies.
    Persisted,
}

/// What the guard decided for one apply.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The registry to render: the wanted one with held services replaced by their last state.
    pub registry: Registry,
    /// Services held in this decision.
    pub held: Vec<Hold>,
    /// The whole registry is held: it went empty, or (before this process applied anything)
    /// it collapsed since the counts the last run remembered. Before a first apply the applier
    /// then writes nothing: the installed file is the last good config.
    pub hold_all: bool,
    /// When the earliest hold would be released if nothing changes.
    pub release_at: Option<Instant>,
}

fn ids(instances: &[Instance]) -> Vec<String> {
    instances.iter().map(|i| i.id.clone()).collect()
}

impl Guard {
    pub fn new(config: GuardConfig) -> Guard {
        Guard {
            config,
            holds: BTreeMap::new(),
            empty_since: None,
            confirmed: false,
            baselines: Vec::new(),
            remembered: None,
            collapse_since: None,
            written: None,
        }
    }

    /// The guard of `config`, remembering the counts the last run left in the guard file.
    pub fn load(config: &Config) -> Guard {
        let mut guard = Guard::new(config.guard);
        if let Some(counts) = file(config).and_then(|p| read_counts(&p)) {
            guard.written = Some(counts.clone());
            guard.remember(counts);
        }
        guard
    }

    /// Notes the registry an apply has just made live: its per-service counts are written to
    /// the guard file when they changed. A failure is logged, and tried again at the next
    /// apply; the guard of this process does not need the file.
    pub fn applied(&mut self, config: &Config, registry: &Registry) {
        // Compared in place first: a map of every service's name per apply is what this
        // avoids (the registry is sorted by name, like the map).
        if let Some(w) = &self.written
            && w.len() == registry.services.len()
            && w.iter()
                .zip(&registry.services)
                .all(|((name, n), s)| *name == s.name && *n == s.instances.len())
        {
            return;
        }
        let counts = Guard::counts(registry);
        if self.written.as_ref() == Some(&counts) {
            return;
        }
        let Some(path) = file(config) else {
            return;
        };
        let Ok(text) = serde_json::to_vec(&counts) else {
            return;
        };
        match install::write_atomic(&path, &text) {
            Ok(()) => self.written = Some(counts),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remember instance counts for the guard")
            }
        }
    }

    /// The per-service instance counts applied by the previous run (see [`Guard::counts`]), the
    /// reference until this process applies something.
    pub fn remember(&mut self, counts: BTreeMap<String, usize>) {
        self.remembered = Some(counts);
    }

    /// Per-service instance counts of a registry, to be remembered across restarts.
    pub fn counts(registry: &Registry) -> BTreeMap<String, usize> {
        registry
            .services
            .iter()
            .map(|s| (s.name.clone(), s.instances.len()))
            .collect()
    }

    /// Services that lost more than `max_drop_percent` since the counts remembered from the
    /// last run, with since when this state has been seen.
    fn collapsed_since_last_run(
        &mut self,
        wanted: &Registry,
        installed: bool,
        now: Instant,
    ) -> Option<(Vec<Hold>, Instant)> {
        let remembered = self.remembered.as_ref().filter(|_| installed)?;
        let sorted = wanted.services.is_sorted_by(|a, b| a.name <= b.name);
        let held: Vec<Hold> = remembered
            .iter()
            .filter_map(|(name, &applied)| {
                let found = match sorted {
                    true => wanted
                        .services
                        .binary_search_by(|s| s.name.cmp(name))
                        .ok()
                        .map(|i| &wanted.services[i]),
                    false => wanted.services.iter().find(|s| &s.name == name),
                };
                let wanted_n = found.map_or(0, |s| s.instances.len());
                let dropped = applied.saturating_sub(wanted_n);
                (applied > 0 && dropped * 100 > self.config.max_drop_percent as usize * applied)
                    .then(|| Hold {
                        service: name.clone(),
                        applied,
                        wanted: wanted_n,
                        since: now,
                        wanted_ids: Vec::new(),
                    })
            })
            .collect();
        if held.is_empty() {
            self.collapse_since = None;
            return None;
        }
        let since = *self.collapse_since.get_or_insert(now);
        Some((held, since))
    }

    /// Whether a service with this baseline may go to `wanted` instances now.
    fn judge(&mut self, base: &Baseline, wanted: &[Instance], now: Instant) -> Verdict {
        let (applied, wanted_n) = (base.most, wanted.len());
        let dropped = applied.saturating_sub(wanted_n);
        if applied == 0 || dropped * 100 <= self.config.max_drop_percent as usize * applied {
            return Verdict::Within;
        }
        let wanted_ids = ids(wanted);
        let since = match self.holds.remove(&base.name) {
            Some(h) if h.wanted_ids == wanted_ids => h.since,
            _ => now,
        };
        if now.duration_since(since) >= self.config.confirm_after {
            tracing::warn!(service = %base.name, applied, wanted = wanted_n, "held shrink persisted for confirm_after: applying it");
            return Verdict::Persisted;
        }
        Verdict::Held(Hold {
            service: base.name.clone(),
            applied,
            wanted: wanted_n,
            since,
            wanted_ids,
        })
    }

    /// Drops every hold: the operator confirmed the new state.
    pub fn confirm(&mut self) {
        if !self.holds.is_empty() || self.empty_since.is_some() {
            tracing::warn!(
                services = self.holds.len(),
                "guard holds confirmed by the operator"
            );
        }
        self.holds.clear();
        self.empty_since = None;
        self.confirmed = true;
        self.baselines.clear();
        self.remembered = None;
    }

    /// Decides what to render. `last` is the registry applied last (None before the first
    /// apply); `installed` says whether a config file already exists (a restart over an empty
    /// registry must not wipe it either).
    pub fn decide(
        &mut self,
        last: Option<&Registry>,
        wanted: Registry,
        installed: bool,
        now: Instant,
    ) -> Decision {
        let confirm_after = self.config.confirm_after;
        if std::mem::take(&mut self.confirmed) {
            return Decision {
                registry: wanted,
                held: Vec::new(),
                hold_all: false,
                release_at: None,
            };
        }
        // A registry that goes empty: hold all of it.
        let was_nonempty = last.map_or(installed, |l| l.instance_count() > 0);
        if wanted.instance_count() == 0 && was_nonempty {
            let since = *self.empty_since.get_or_insert(now);
            if now.duration_since(since) < confirm_after {
                self.holds.clear();
                let registry = last.cloned().unwrap_or_default();
                return Decision {
                    // Before the first apply there is nothing to keep but the installed file:
                    // an empty `services` with hold_all tells the applier to write nothing.
                    registry,
                    held: Vec::new(),
                    hold_all: true,
                    release_at: Some(since + confirm_after),
                };
            }
            tracing::warn!("registry empty for the whole confirm_after period: applying it");
        } else {
            self.empty_since = None;
        }

        let Some(last) = last else {
            self.holds.clear();
            // Before this process applied anything, the counts it remembered from the last
            // run are the reference: a restart over a registry that lost most of a service
            // writes nothing until it persists for confirm_after (or SIGUSR1).
            let collapsed = self.collapsed_since_last_run(&wanted, installed, now);
            if let Some((held, since)) = collapsed {
                if now.duration_since(since) < confirm_after {
                    return Decision {
                        registry: wanted,
                        held,
                        hold_all: true,
                        release_at: Some(since + confirm_after),
                    };
                }
                tracing::warn!(
                    "collapse since the last run persisted for confirm_after: applying it"
                );
            }
            self.remembered = None;
            return Decision {
                registry: wanted,
                held: Vec::new(),
                hold_all: false,
                release_at: None,
            };
        };
        self.remembered = None;
        // Services are sorted by name (the parse's order, and this function's output): one walk
        // over both registries and the baselines, with no map or string built per service,
        // where two maps of every service's name cost more than a tenth of an apply at
        // 10,000 services.
        let mut services = wanted.services;
        if !services.is_sorted_by(|a, b| a.name <= b.name) {
            services.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let mut last_sorted: Vec<&Arc<Service>> = last.services.iter().collect();
        if !last_sorted.is_sorted_by(|a, b| a.name <= b.name) {
            last_sorted.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let mut holds = BTreeMap::new();
        // Drops are measured from the most instances a service had applied within the last
        // `confirm_after`, not just from the last apply: leases expire over several seconds,
        // and 4 -> 3 -> 2 -> 1 in four applies is the same collapse as 4 -> 1 in one. Services
        // no longer applied lose their baseline.
        let mut old_baselines = std::mem::take(&mut self.baselines).into_iter().peekable();
        let mut baselines = Vec::with_capacity(last_sorted.len());
        let mut w = 0;
        for old in &last_sorted {
            let name = old.name.as_str();
            let now_applied = old.instances.len();
            while old_baselines.next_if(|b| b.name.as_str() < name).is_some() {}
            let mut base = old_baselines
                .next_if(|b| b.name == name)
                .unwrap_or_else(|| Baseline {
                    name: name.to_owned(),
                    most: now_applied,
                    since: now,
                });
            if now_applied >= base.most || now.duration_since(base.since) >= confirm_after {
                (base.most, base.since) = (now_applied, now);
            }
            while services.get(w).is_some_and(|s| s.name.as_str() < name) {
                w += 1;
            }
            let new_instances = services
                .get(w)
                .filter(|s| s.name == name)
                .map_or(&[][..], |s| &s.instances[..]);
            match self.judge(&base, new_instances, now) {
                Verdict::Within => {}
                Verdict::Held(hold) => {
                    holds.insert(name.to_owned(), hold);
                }
                // The shrunk state is the new reference.
                Verdict::Persisted => (base.most, base.since) = (new_instances.len(), now),
            }
            baselines.push(base);
        }
        self.baselines = baselines;
        self.holds = holds;

        // Render the wanted registry with held services replaced by their applied state; a
        // held service that is gone altogether comes back in its place.
        for name in self.holds.keys() {
            let Ok(o) = last_sorted.binary_search_by(|s| s.name.as_str().cmp(name)) else {
                continue;
            };
            let old = last_sorted[o];
            match services.binary_search_by(|s| s.name.as_str().cmp(name)) {
                Ok(i) => {
                    let kept = &mut services[i];
                    if !Arc::ptr_eq(kept, old) {
                        let kept = Arc::make_mut(kept);
                        kept.instances = old.instances.clone();
                        kept.slots = old.slots.clone();
                    }
                }
                Err(i) => services.insert(i, Arc::clone(old)),
            }
        }
        let held: Vec<Hold> = self.holds.values().cloned().collect();
        let release_at = held.iter().map(|h| h.since + confirm_after).min();
        Decision {
            registry: Registry { services },
            held,
            hold_all: false,
            release_at,
        }
    }
}

/// Where the guard's per-service counts live: a hidden file beside the HAProxy file (or the
/// first template's), so that it survives restarts and reboots with the file it describes.
fn file(config: &Config) -> Option<PathBuf> {
    let t = config.haproxy_template().or(config.templates.first())?;
    let name = t.dest.file_name()?.to_string_lossy().into_owned();
    Some(t.dest.with_file_name(format!(".{name}.haconfd-guard.json")))
}

fn read_counts(path: &Path) -> Option<BTreeMap<String, usize>> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable guard file");
            None
        }
    }
}

#[cfg(test)]
mod tests;
