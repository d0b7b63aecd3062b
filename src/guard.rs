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
    /// Per service, the most instances applied within `confirm_after`, and since when.
    baselines: BTreeMap<String, (usize, Instant)>,
    /// Counts applied by the previous run, until this process applies something.
    remembered: Option<BTreeMap<String, usize>>,
    /// Since when the registry has been collapsed against `remembered`.
    collapse_since: Option<Instant>,
    /// The counts in the guard file as last read or written: an unchanged registry writes
    /// nothing.
    written: Option<BTreeMap<String, usize>>,
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
            baselines: BTreeMap::new(),
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
        let held: Vec<Hold> = remembered
            .iter()
            .filter_map(|(name, &applied)| {
                let wanted_n = wanted
                    .services
                    .iter()
                    .find(|s| &s.name == name)
                    .map_or(0, |s| s.instances.len());
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
        let last_by_name: BTreeMap<&str, &Arc<Service>> =
            last.services.iter().map(|s| (s.name.as_str(), s)).collect();
        let wanted_by_name: BTreeMap<&str, &Arc<Service>> = wanted
            .services
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();

        let mut holds = BTreeMap::new();
        // Drops are measured from the most instances a service had applied within the last
        // `confirm_after`, not just from the last apply: leases expire over several seconds,
        // and 4 -> 3 -> 2 -> 1 in four applies is the same collapse as 4 -> 1 in one.
        self.baselines
            .retain(|name, _| last_by_name.contains_key(name.as_str()));
        for (name, old) in &last_by_name {
            let now_applied = old.instances.len();
            // No new key (and no allocation) for a service that has a baseline: this runs for
            // every service at every apply.
            if !self.baselines.contains_key(*name) {
                self.baselines.insert(name.to_string(), (now_applied, now));
            }
            let Some(base) = self.baselines.get_mut(*name) else {
                continue;
            };
            if now_applied >= base.0 || now.duration_since(base.1) >= confirm_after {
                *base = (now_applied, now);
            }
            let applied = base.0;
            if applied == 0 {
                continue;
            }
            let new_instances = wanted_by_name
                .get(name)
                .map_or(&[][..], |s| &s.instances[..]);
            let wanted_n = new_instances.len();
            let dropped = applied.saturating_sub(wanted_n);
            if dropped * 100 <= self.config.max_drop_percent as usize * applied {
                continue;
            }
            let wanted_ids = ids(new_instances);
            let since = match self.holds.remove(*name) {
                Some(h) if h.wanted_ids == wanted_ids => h.since,
                _ => now,
            };
            if now.duration_since(since) >= confirm_after {
                tracing::warn!(service = %name, applied, wanted = wanted_n, "held shrink persisted for confirm_after: applying it");
                // The shrunk state is the new reference.
                self.baselines.insert(name.to_string(), (wanted_n, now));
                continue;
            }
            holds.insert(
                name.to_string(),
                Hold {
                    service: name.to_string(),
                    applied,
                    wanted: wanted_n,
                    since,
                    wanted_ids,
                },
            );
        }
        self.holds = holds;

        // Render the wanted registry with held services replaced by their applied state. The
        // services are sorted by name already; a held service that is gone altogether comes
        // back in its place.
        let mut services = wanted.services;
        if !services.is_sorted_by(|a, b| a.name <= b.name) {
            services.sort_by(|a, b| a.name.cmp(&b.name));
        }
        for name in self.holds.keys() {
            let Some(old) = last_by_name.get(name.as_str()) else {
                continue;
            };
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
mod tests {
    use super::*;
    use crate::model::State;
    use std::time::Duration;

    fn service(name: &str, n: usize) -> Service {
        Service {
            name: name.into(),
            backend: format!("be_{name}"),
            route: None,
            instances: (0..n)
                .map(|i| Instance {
                    id: format!("i{i}"),
                    name: format!("i{i}"),
                    host: "127.0.0.1".into(),
                    port: 8000 + i as u16,
                    addr: format!("127.0.0.1:{}", 8000 + i),
                    weight: 100,
                    state: State::Ready,
                    meta: Default::default(),
                })
                .collect(),
            slots: Vec::new(),
        }
    }

    fn reg(services: &[(&str, usize)]) -> Registry {
        Registry {
            services: services
                .iter()
                .map(|(n, c)| Arc::new(service(n, *c)))
                .collect(),
        }
    }

    fn guard() -> Guard {
        Guard::new(GuardConfig {
            max_drop_percent: 50,
            confirm_after: Duration::from_secs(600),
        })
    }

    fn count(r: &Registry, name: &str) -> usize {
        r.services
            .iter()
            .find(|s| s.name == name)
            .map_or(0, |s| s.instances.len())
    }

    #[tokio::test(start_paused = true)]
    async fn small_drop_applies_large_drop_is_held() {
        let mut g = guard();
        let last = reg(&[("web", 4), ("api", 4)]);
        let d = g.decide(
            Some(&last),
            reg(&[("web", 3), ("api", 4)]),
            true,
            Instant::now(),
        );
        assert!(d.held.is_empty());
        assert_eq!(count(&d.registry, "web"), 3);

        let d = g.decide(
            Some(&last),
            reg(&[("web", 1), ("api", 5)]),
            true,
            Instant::now(),
        );
        assert_eq!(d.held.len(), 1);
        assert_eq!(
            count(&d.registry, "web"),
            4,
            "web keeps its applied instances"
        );
        assert_eq!(
            count(&d.registry, "api"),
            5,
            "api keeps changing while web is held"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hold_is_released_after_confirm_after_of_the_same_state() {
        let mut g = guard();
        let last = reg(&[("web", 4)]);
        let t0 = Instant::now();
        let d = g.decide(Some(&last), reg(&[("web", 1)]), true, t0);
        assert_eq!(d.release_at, Some(t0 + Duration::from_secs(600)));
        let d = g.decide(
            Some(&last),
            reg(&[("web", 1)]),
            true,
            t0 + Duration::from_secs(599),
        );
        assert_eq!(d.held.len(), 1);
        let d = g.decide(
            Some(&last),
            reg(&[("web", 1)]),
            true,
            t0 + Duration::from_secs(600),
        );
        assert!(d.held.is_empty());
        assert_eq!(count(&d.registry, "web"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_changing_target_restarts_the_clock_and_confirm_releases() {
        let mut g = guard();
        let last = reg(&[("web", 4), ("api", 1)]);
        let t0 = Instant::now();
        g.decide(Some(&last), reg(&[("web", 1), ("api", 1)]), true, t0);
        let later = t0 + Duration::from_secs(300);
        let d = g.decide(Some(&last), reg(&[("web", 0), ("api", 1)]), true, later);
        assert_eq!(d.held[0].since, later);
        g.confirm();
        // The decision right after a confirmation takes the wanted state as it is.
        let d = g.decide(Some(&last), reg(&[("web", 0), ("api", 1)]), true, later);
        assert!(d.held.is_empty());
        assert_eq!(count(&d.registry, "web"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn empty_registry_after_nonempty_is_held_whole() {
        let mut g = guard();
        let last = reg(&[("web", 1), ("api", 2)]);
        let d = g.decide(Some(&last), Registry::default(), true, Instant::now());
        assert!(d.hold_all);
        assert_eq!(d.registry.instance_count(), 3);
        // At start-up over an installed file, an empty first read is held too.
        let mut g = guard();
        let d = g.decide(None, Registry::default(), true, Instant::now());
        assert!(d.hold_all);
        // With nothing installed, an empty registry is simply empty.
        let mut g = guard();
        let d = g.decide(None, Registry::default(), false, Instant::now());
        assert!(!d.hold_all);
    }

    #[tokio::test(start_paused = true)]
    async fn a_collapse_spread_over_several_applies_is_still_held() {
        let mut g = guard();
        let t0 = Instant::now();
        let step = Duration::from_secs(4);
        let other = ("api", 2);
        g.decide(
            Some(&reg(&[("web", 4), other])),
            reg(&[("web", 4), other]),
            true,
            t0,
        );
        let d = g.decide(
            Some(&reg(&[("web", 4), other])),
            reg(&[("web", 3), other]),
            true,
            t0 + step,
        );
        assert!(d.held.is_empty(), "25 % is a small drop");
        let d = g.decide(
            Some(&reg(&[("web", 3), other])),
            reg(&[("web", 2), other]),
            true,
            t0 + step * 2,
        );
        assert!(
            d.held.is_empty(),
            "50 % of the 4 seen within confirm_after is allowed"
        );
        let d = g.decide(
            Some(&reg(&[("web", 2), other])),
            reg(&[("web", 1), other]),
            true,
            t0 + step * 3,
        );
        assert_eq!(
            d.held.len(),
            1,
            "75 % of the 4 seen within confirm_after is a collapse"
        );
        assert_eq!(count(&d.registry, "web"), 2);
        // A slow scale-down, one step per confirm_after, is never held.
        let mut g = guard();
        let slow = Duration::from_secs(601);
        g.decide(
            Some(&reg(&[("web", 4), other])),
            reg(&[("web", 4), other]),
            true,
            t0,
        );
        for (i, n) in [3usize, 2, 1].into_iter().enumerate() {
            let d = g.decide(
                Some(&reg(&[("web", n + 1), other])),
                reg(&[("web", n), other]),
                true,
                t0 + slow * (i as u32 + 1),
            );
            assert!(d.held.is_empty(), "step to {n}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_over_a_collapsed_registry_writes_nothing_until_confirmed() {
        let mut g = guard();
        g.remember(Guard::counts(&reg(&[("web", 4), ("api", 2)])));
        let t0 = Instant::now();
        let d = g.decide(None, reg(&[("web", 1), ("api", 2)]), true, t0);
        assert!(
            d.hold_all,
            "write nothing: the installed file is the last good one"
        );
        assert_eq!(d.held.len(), 1);
        assert_eq!(d.release_at, Some(t0 + Duration::from_secs(600)));
        // A small drop since the last run applies.
        let mut g = guard();
        g.remember(Guard::counts(&reg(&[("web", 4), ("api", 2)])));
        assert!(
            !g.decide(None, reg(&[("web", 3), ("api", 2)]), true, t0)
                .hold_all
        );
        // SIGUSR1 releases it; so does confirm_after.
        let mut g = guard();
        g.remember(Guard::counts(&reg(&[("web", 4), ("api", 2)])));
        g.decide(None, reg(&[("web", 1), ("api", 2)]), true, t0);
        g.confirm();
        assert!(
            !g.decide(None, reg(&[("web", 1), ("api", 2)]), true, t0)
                .hold_all
        );
        let mut g = guard();
        g.remember(Guard::counts(&reg(&[("web", 4), ("api", 2)])));
        g.decide(None, reg(&[("web", 1), ("api", 2)]), true, t0);
        let later = t0 + Duration::from_secs(600);
        assert!(
            !g.decide(None, reg(&[("web", 1), ("api", 2)]), true, later)
                .hold_all
        );
    }

    #[test]
    fn the_guard_file_holds_the_counts_of_the_last_apply_for_the_next_run() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path().display();
        let config = Config::parse(
            &format!(
                "[source]\nkind = \"file\"\n[file]\npath = \"{d}/r.yaml\"\n[[template]]\nname = \"haproxy\"\nsrc = \"{d}/t\"\ndest = \"{d}/haproxy.cfg\"\ncheck = true\n"
            ),
            "test",
        )
        .expect("config");
        let mut g = Guard::load(&config);
        assert_eq!(g.remembered, None, "no file, nothing remembered");
        g.applied(&config, &reg(&[("web", 4), ("api", 2)]));
        let path = dir.path().join(".haproxy.cfg.haconfd-guard.json");
        let mode = std::fs::metadata(&path)
            .expect("written")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "staged by install, owner only");
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [".haproxy.cfg.haconfd-guard.json"],
            "nothing staged is left"
        );
        let next = Guard::load(&config);
        assert_eq!(
            next.remembered,
            Some(BTreeMap::from([
                ("api".to_owned(), 2),
                ("web".to_owned(), 4)
            ]))
        );
    }
}
