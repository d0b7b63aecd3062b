//! One apply: an [`Update`] in, a generation of files committed, or the last good state kept.
//!
//! The pipeline: parse the registry (reusing unchanged services) → the guard holds back
//! collapsing services → server slots → render every template → deploy ([`haproxy::deploy`]:
//! install, prove, make HAProxy take it, or put every file back). When `haproxy -c` blames lines
//! of some services only, those services go back to their last applied state and the render is
//! tried again (isolation). An install that failed on the disk is retried with backoff. The
//! report of an apply says what was held, what was held back and what changed.
//!
//! [`haproxy::deploy`]: crate::haproxy::deploy

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::guard::Guard;
use crate::haproxy::deploy::{Deploy, DeployError, Deployer};
use crate::haproxy::{ApplyKind, supervise};
use crate::isolate;
use crate::metrics::Metrics;
use crate::model::{ParseCache, Registry, Rejection};
use crate::render::{RenderError, Rendered, Templates};
use crate::slots::Slots;
use crate::source::Update;

#[cfg(test)]
mod tests;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Deploy(#[from] DeployError),
}

/// What an apply did.
#[derive(Debug, Clone)]
pub struct Report {
    pub kind: ApplyKind,
    pub revision: i64,
    /// Services the guard held at their last applied state.
    pub held: Vec<String>,
    /// Keys whose changes were left out because they made `haproxy -c` fail.
    pub held_back: Vec<String>,
    /// Short hash of the rendered bytes of all templates.
    pub hash: String,
    pub changed: Vec<String>,
    pub duration: Duration,
    /// HAProxy took this change through the Runtime API before its files were written; they
    /// follow in a later apply (see `haproxy::deploy::fast`).
    pub files_follow: bool,
}

/// The first retry of an install that failed on the disk; the backoff doubles from here to its
/// cap (10 s), with jitter so that a fleet whose disks heal together does not retry in step.
const INSTALL_RETRY_MIN: Duration = Duration::from_secs(1);

/// How many services one apply may isolate before it gives up.
const MAX_ISOLATED: usize = 16;

/// The keys left out, by key only, never by value: remembered across applies so that a bad key
/// that stays is logged once, not at every change.
#[derive(Debug, Default)]
struct Rejections {
    reported: HashSet<Rejection>,
}

impl Rejections {
    /// Logs the keys left out that were not left out last time, and at info the ones that came
    /// back; the gauge always holds the current count.
    fn report(&mut self, rejected: Vec<Rejection>, metrics: &Metrics) {
        metrics.set_rejected(rejected.len() as u64);
        let now: HashSet<Rejection> = rejected.into_iter().collect();
        let mut fresh: Vec<&Rejection> = now.difference(&self.reported).collect();
        fresh.sort_by(|a, b| a.key.cmp(&b.key));
        for r in fresh {
            tracing::warn!(key = %r.key, reason = %r.reason, "key left out");
        }
        let mut healed: Vec<&Rejection> = self.reported.difference(&now).collect();
        healed.sort_by(|a, b| a.key.cmp(&b.key));
        for r in healed {
            tracing::info!(key = %r.key, "key no longer left out");
        }
        self.reported = now;
    }
}

/// Parses the registry of an update, with every key left out (by the screen or the parse),
/// sorted by key. With a cache, services whose keys did not change since the last call are
/// reused.
pub fn parse(update: &Update, cache: Option<&mut ParseCache>) -> (Registry, Vec<Rejection>) {
    let (registry, mut rejected) = match cache {
        Some(c) => Registry::parse_cached(&update.snapshot, c),
        None => Registry::parse(&update.snapshot),
    };
    rejected.extend(update.rejected.iter().cloned());
    rejected.sort_by(|a, b| a.key.cmp(&b.key));
    (registry, rejected)
}

/// Parses and renders an update, unguarded, with fresh server slots (`render --print`,
/// `check`).
pub fn render(
    templates: &mut Templates,
    update: &Update,
    metrics: &Metrics,
) -> Result<Vec<Rendered>, RenderError> {
    let (mut registry, rejected) = parse(update, None);
    Rejections::default().report(rejected, metrics);
    Slots::default().assign(&mut registry, templates.spare_slots(), true);
    templates.render_all(&update.snapshot, &registry)
}

/// A short, stable hash of rendered output, for logs and metrics. It names a generation of
/// files, it protects nothing: xxh3 reads a megabyte in well under a millisecond, where SHA-256
/// took two on every apply.
pub fn hash(rendered: &[Rendered]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for r in rendered {
        h.update(r.template.name.as_bytes());
        h.update(&[0]);
        h.update(&r.bytes);
    }
    format!("{:012x}", h.digest() >> 16)
}

/// Owns the config, the templates and the deployer across applies.
pub struct Applier<D: Deploy = Deployer> {
    config: Config,
    templates: Templates,
    metrics: Arc<Metrics>,
    deploy: D,
    guard: Guard,
    slots: Slots,
    parse_cache: ParseCache,
    rejections: Rejections,
    /// The registry rendered by the last successful apply: that of the installed files.
    last: Option<Registry>,
    /// The hash of the installed files (see [`hash`]).
    installed_hash: String,
    /// When a guard hold expires, if one is active.
    release_at: Option<Instant>,
    /// When to apply the latest state again after an install that failed on the disk.
    retry_at: Option<Instant>,
    retry: Backoff,
}

impl Applier<Deployer> {
    /// The applier of `run`: HAProxy driven per `[haproxy] mode`.
    pub fn new(config: Config, templates: Templates, metrics: Arc<Metrics>) -> Applier {
        let deploy = Deployer::new(&config, Arc::clone(&metrics));
        Applier::with_deploy(config, templates, metrics, deploy)
    }

    /// The applier of a one-shot `render`, which never starts an HAProxy of its own.
    pub async fn one_shot(config: Config, templates: Templates, metrics: Arc<Metrics>) -> Applier {
        let deploy = Deployer::one_shot(&config, Arc::clone(&metrics)).await;
        Applier::with_deploy(config, templates, metrics, deploy)
    }

    /// Whether the HAProxy this applier drives runs.
    pub fn is_running(&self) -> bool {
        self.deploy.is_running()
    }

    /// What stops the supervised HAProxy, for whoever must force it; None in other modes.
    pub fn stopper(&self) -> Option<supervise::Stopper> {
        self.deploy.stopper()
    }

    /// Stops a supervised HAProxy; other modes leave HAProxy alone.
    pub async fn shutdown(&mut self) {
        self.deploy.shutdown().await;
    }

    /// Boots a supervised HAProxy on the installed file before the source answers (see
    /// [`Deployer::start_installed`]).
    pub async fn start_installed(&mut self) {
        self.deploy.start_installed().await;
    }

    /// When the applier wants to look at HAProxy next (`master` mode).
    pub fn haproxy_look_at(&self) -> Option<Instant> {
        self.deploy.look_at()
    }

    /// In `master` mode, brings an HAProxy restarted behind haconfd's back in line with the
    /// installed file (see [`Deployer::watch_haproxy`]); true when it was found restarted.
    pub async fn watch_haproxy(&mut self) -> bool {
        self.deploy.watch_haproxy().await
    }
}

impl<D: Deploy> Applier<D> {
    /// An applier that commits through `deploy`.
    pub fn with_deploy(
        config: Config,
        templates: Templates,
        metrics: Arc<Metrics>,
        deploy: D,
    ) -> Applier<D> {
        Applier {
            guard: Guard::load(&config),
            rejections: Rejections::default(),
            slots: Slots::default(),
            parse_cache: ParseCache::default(),
            config,
            templates,
            metrics,
            deploy,
            last: None,
            installed_hash: String::new(),
            release_at: None,
            retry_at: None,
            retry: Backoff::new(),
        }
    }

    /// The config this applier runs on.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The daemon's metrics, which every apply updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// When the applier wants to apply again although nothing changed: a guard hold that
    /// expires, the retry of an install that failed on the disk, or the files of changes
    /// HAProxy took ahead of them.
    pub fn wakeup(&self) -> Option<Instant> {
        [self.release_at, self.retry_at, self.deploy.files_due()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Renders, installs and reloads. On error the files on disk are those of before. An
    /// install that failed on the disk (full, read-only) is retried with backoff through
    /// [`Applier::wakeup`], so the state lands once the disk is usable again without a new
    /// change; the retries stop at the first apply that does not fail on the disk.
    pub async fn apply(&mut self, update: &Update) -> Result<Report, ApplyError> {
        let result = self.apply_once(update).await;
        let failed_on_disk = match &result {
            Err(ApplyError::Deploy(e)) => e.disk(),
            _ => None,
        };
        match failed_on_disk {
            Some((dest, reason, problem)) => {
                let dest = dest.display().to_string();
                self.metrics
                    .install_failed(reason, format!("cannot install {dest}: {problem}"));
                let delay = self.retry.next(INSTALL_RETRY_MIN);
                self.retry_at = Some(Instant::now() + delay);
                tracing::warn!(file = %dest, problem = %problem, retry_in = ?delay, "install failed on the disk; trying the same state again");
            }
            None => {
                // Success, or a failure a retry of the same state would only repeat (a template
                // error, `haproxy -c`): the next change, SIGHUP or SIGUSR1 applies again.
                if self.retry_at.take().is_some() && result.is_ok() {
                    tracing::info!("installed again after failures on the disk");
                }
                self.retry.reset();
                self.metrics.install_ok();
            }
        }
        result
    }

    async fn apply_once(&mut self, update: &Update) -> Result<Report, ApplyError> {
        let started = Instant::now();
        let (wanted, rejected) = parse(update, Some(&mut self.parse_cache));
        self.rejections.report(rejected, &self.metrics);
        let t_parse = started.elapsed();
        let installed = self.deploy.installed();
        // What HAProxy serves is what was applied last, ahead of the files or not.
        let applied = self.deploy.served().or(self.last.as_ref());
        let decision = self.guard.decide(applied, wanted, installed, started);
        self.release_at = decision.release_at;
        let held: Vec<String> = decision.held.iter().map(|h| h.service.clone()).collect();
        for h in &decision.held {
            tracing::warn!(
                service = %h.service,
                applied = h.applied,
                wanted = h.wanted,
                held_for = ?started.duration_since(h.since),
                "guard: service would lose too many instances; keeping its last applied instances (SIGUSR1 confirms)"
            );
        }
        if !decision.held.is_empty() || decision.hold_all {
            self.metrics.guard_holds.inc();
        }
        if decision.hold_all {
            if decision.held.is_empty() {
                tracing::warn!(
                    "guard: the registry is empty; keeping the last good config (SIGUSR1 confirms)"
                );
            } else {
                tracing::warn!(
                    "guard: the registry collapsed since the last run; keeping the installed config (SIGUSR1 confirms)"
                );
            }
            if self.last.is_none() {
                // Nothing applied by this process yet: the installed file is the last good one.
                return Ok(Report {
                    kind: ApplyKind::None,
                    revision: update.snapshot.revision,
                    held,
                    held_back: Vec::new(),
                    hash: String::new(),
                    changed: Vec::new(),
                    duration: started.elapsed(),
                    files_follow: false,
                });
            }
        }
        let mut registry = decision.registry;
        // Served; the files follow at the wakeup, or now when they are due already.
        if self.serve_first(&mut registry).await
            && self
                .deploy
                .files_due()
                .is_some_and(|due| due > Instant::now())
        {
            let kind = ApplyKind::Runtime;
            self.metrics.served(update.snapshot.revision);
            self.metrics.set_held(&held, &[]);
            self.guard.applied(&self.config, &registry);
            tracing::debug!(
                parse_ms = t_parse.as_secs_f64() * 1e3,
                served_ms = started.elapsed().as_secs_f64() * 1e3,
                "apply stages"
            );
            return Ok(Report {
                kind,
                revision: update.snapshot.revision,
                held,
                held_back: Vec::new(),
                hash: self.installed_hash.clone(),
                changed: Vec::new(),
                duration: started.elapsed(),
                files_follow: true,
            });
        }
        // Render and deploy; when `haproxy -c` blames lines that belong to some services only,
        // put those services back to their last applied state and try again.
        let mut held_back: Vec<String> = Vec::new();
        let mut isolated: BTreeSet<String> = BTreeSet::new();
        let (rendered, committed) = loop {
            let t0 = Instant::now();
            let (rendered, plan) = self.prepare(update, &mut registry)?;
            let t_prepare = t0.elapsed();
            let t0 = Instant::now();
            let result = self.deploy.commit(&rendered, plan).await;
            tracing::debug!(
                parse_ms = t_parse.as_secs_f64() * 1e3,
                prepare_ms = t_prepare.as_secs_f64() * 1e3,
                install_ms = result
                    .as_ref()
                    .map_or(t0.elapsed(), |c| c.install_time)
                    .as_secs_f64()
                    * 1e3,
                "apply stages"
            );
            match result {
                Ok(committed) => break (rendered, committed),
                Err(e) => {
                    let names = culprits_of(&e, &rendered, &registry)
                        .filter(|n| !n.is_empty() && n.is_disjoint(&isolated))
                        .filter(|_| isolated.len() < MAX_ISOLATED);
                    let Some(names) = names else {
                        return Err(e.into());
                    };
                    let empty = Registry::default();
                    let last = self.last.as_ref().unwrap_or(&empty);
                    let (reverted, keys) = isolate::revert(registry, last, &names);
                    tracing::warn!(
                        services = ?names,
                        held_back = ?keys,
                        error = %e,
                        "haproxy -c failed on lines of these services only: applying without their changes"
                    );
                    registry = reverted;
                    held_back.extend(keys);
                    isolated.extend(names);
                }
            }
        };
        let kind = committed.kind;
        self.metrics.applied(kind, update.snapshot.revision);
        self.metrics.set_held(&held, &held_back);
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        self.guard.applied(&self.config, &registry);
        self.last = Some(registry);
        self.installed_hash = hash(&rendered);
        Ok(Report {
            kind,
            revision: update.snapshot.revision,
            held,
            held_back,
            hash: self.installed_hash.clone(),
            changed: committed.changed,
            duration: started.elapsed(),
            files_follow: false,
        })
    }

    /// The fast path: with the slot layout kept, a change that only moves, adds, removes or
    /// re-weighs instances in their slots goes to HAProxy from the typed registries before
    /// anything is rendered (see `haproxy::deploy::fast`). True when HAProxy took it; the
    /// render and the install then follow at [`Applier::wakeup`].
    async fn serve_first(&mut self, registry: &mut Registry) -> bool {
        if self.last.is_none() || !self.deploy.runtime_ready() {
            return false;
        }
        self.slot(registry, false);
        let Some(last) = self.last.as_ref() else {
            return false;
        };
        self.deploy.send_first(last, registry).await
    }

    /// Assigns slots and renders. With the Runtime API available it first keeps the slot
    /// layout; when the change needs a reload anyway, spare slots are regrown and the render
    /// repeated. Returns the render and, for a server-only change, the deployer's plan.
    fn prepare(
        &mut self,
        update: &Update,
        registry: &mut Registry,
    ) -> Result<(Vec<Rendered>, Option<D::Plan>), ApplyError> {
        let runtime = self.deploy.runtime_ready();
        self.slot(registry, !runtime);
        let rendered = self.render_registry(update, registry)?;
        if !runtime {
            return Ok((rendered, None));
        }
        match self.deploy.plan(&rendered, registry) {
            Ok(plan) => Ok((rendered, Some(plan))),
            Err(why) => {
                tracing::debug!(reason = %why, "not a server-only change: reload");
                self.slot(registry, true);
                Ok((self.render_registry(update, registry)?, None))
            }
        }
    }

    /// Assigns server slots (`regrow`: spare slots regrown, the layout may change). The cache
    /// keeps each slotted service from now on, and its parsed copy is freed as soon as it is
    /// slotted: one copy of each service lives.
    fn slot(&mut self, registry: &mut Registry, regrow: bool) {
        let spare = self.config.haproxy.spare_slots as usize;
        let cache = &mut self.parse_cache;
        self.slots
            .assign_adopting(registry, spare, regrow, |parsed, slotted| {
                cache.adopt(parsed, slotted)
            });
    }

    fn render_registry(
        &mut self,
        update: &Update,
        registry: &Registry,
    ) -> Result<Vec<Rendered>, ApplyError> {
        let started = Instant::now();
        let result = self
            .templates
            .render_all(&update.snapshot, registry)
            .inspect_err(|_| {
                self.metrics.render_failures.inc();
            })
            .map_err(ApplyError::from);
        self.metrics
            .render_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Releases every guard hold; the next apply takes the source's state as it is.
    pub fn confirm(&mut self) {
        self.guard.confirm();
        self.release_at = None;
    }

    /// Runs on `config` and `templates` from now on (SIGHUP, or a watched file changed) and
    /// gives back the ones it ran on, so that a caller whose next apply fails on the new
    /// templates can go back to them.
    pub fn swap(&mut self, config: Config, templates: Templates) -> (Config, Templates) {
        if config.haproxy.mode != self.config.haproxy.mode
            || config.haproxy.master_socket != self.config.haproxy.master_socket
        {
            tracing::warn!("[haproxy] mode and sockets change only on restart");
        }
        self.deploy.configure(&config);
        (
            std::mem::replace(&mut self.config, config),
            std::mem::replace(&mut self.templates, templates),
        )
    }
}

/// The services whose lines `haproxy -c` blamed, when every blamed line belongs to one.
fn culprits_of(
    e: &DeployError,
    rendered: &[Rendered],
    registry: &Registry,
) -> Option<BTreeSet<String>> {
    let (template, file, output) = e.rejected()?;
    let r = rendered.iter().find(|r| r.template.name == template)?;
    let lines = isolate::error_lines(output, file);
    isolate::culprits(
        &String::from_utf8_lossy(&r.bytes),
        &lines,
        &registry.services,
    )
}
