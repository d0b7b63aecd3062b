//! One apply: an [`Update`] in, files installed and HAProxy told, or the last good state kept.
//!
//! parse the registry → render every template → install each (skip unchanged bytes; stage,
//! prove, rename) → reload once when anything changed. When a later step fails, every file this
//! apply installed is put back, so the set of files on disk stays one consistent generation.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Config;
use crate::etcd::Backoff;
use crate::guard::Guard;
use crate::haproxy::install::{self, Check, InstallError, Outcome};
use crate::haproxy::validate::ValidateError;
use crate::haproxy::{
    ApplyKind, Controller, MasterSeen, Realigned, ReloadError, StateSave, runtime,
};
use crate::isolate;
use crate::metrics::Metrics;
use crate::model::{ParseCache, Registry, Rejection};
use crate::render::{RenderError, Rendered, Templates};
use crate::slots::Slots;
use crate::source::Update;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("template {template:?}: {source}")]
    Install {
        template: String,
        #[source]
        source: InstallError,
    },
    #[error("reload failed, previous files restored: {0}")]
    Reload(#[from] ReloadError),
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
}

/// How long one Runtime API exchange may take.
const RUNTIME_TIMEOUT: Duration = Duration::from_secs(5);

/// The first retry of an install that failed on the disk; the backoff doubles from here to its
/// cap (10 s), with jitter so that a fleet whose disks heal together does not retry in step.
const INSTALL_RETRY_MIN: Duration = Duration::from_secs(1);

/// Logs rejected keys, by key only, and counts them.
pub fn report_rejections(rejected: &[Rejection], metrics: &Metrics) {
    for r in rejected {
        tracing::warn!(key = %r.key, reason = %r.reason, "key left out");
    }
    metrics.set_rejected(rejected.len() as u64);
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
    report_rejections(&rejected, metrics);
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

/// A rendered or installed file as text, for a Runtime API plan.
fn as_text<'a>(bytes: &'a [u8], r: &Rendered) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", r.template.dest.display()))
}

/// The installed bytes of each rendered file, in render order (None: nothing installed).
type Current = Vec<Option<Vec<u8>>>;

/// What `prepare` hands to the install: the render, and for a server-only change the Runtime
/// API commands and the installed files they were planned against (read once, not again by
/// the install).
struct Prepared {
    rendered: Vec<Rendered>,
    runtime_cmds: Option<Vec<runtime::Cmd>>,
    current: Option<Current>,
}

impl Prepared {
    fn reload(rendered: Vec<Rendered>) -> Prepared {
        Prepared {
            rendered,
            runtime_cmds: None,
            current: None,
        }
    }
}

/// Owns the templates and the HAProxy controller across applies.
pub struct Applier {
    pub config: Config,
    pub templates: Templates,
    pub controller: Controller,
    pub metrics: Arc<Metrics>,
    guard: Guard,
    slots: Slots,
    parse_cache: ParseCache,
    /// The keys left out by the last apply, logged once each.
    reported: HashSet<Rejection>,
    /// The per-service counts last written to the guard file.
    written_counts: Option<BTreeMap<String, usize>>,
    /// The HAProxy file this process installed after proving it (see `haproxy_file_id`).
    proven: Option<(u64, u64, u64, i64, i64)>,
    /// The registry rendered by the last successful apply.
    last: Option<Registry>,
    /// When a guard hold expires, if one is active.
    pub release_at: Option<Instant>,
    /// When to apply the latest state again after an install that failed on the disk.
    retry_at: Option<Instant>,
    retry: Backoff,
}

impl Applier {
    pub fn new(config: Config, templates: Templates, metrics: Arc<Metrics>) -> Applier {
        let mut controller = Controller::new(&config);
        controller.count_restarts(&metrics.haproxy_restarts);
        let mut guard = Guard::new(config.guard);
        let remembered = guard_file(&config).and_then(|p| read_counts(&p));
        if let Some(counts) = remembered.clone() {
            guard.remember(counts);
        }
        Applier {
            guard,
            written_counts: remembered,
            reported: HashSet::new(),
            slots: Slots::default(),
            parse_cache: ParseCache::default(),
            proven: None,
            config,
            templates,
            controller,
            metrics,
            last: None,
            release_at: None,
            retry_at: None,
            retry: Backoff::new(),
        }
    }

    fn check(&self) -> Check {
        Check {
            binary: self.config.haproxy.binary.clone(),
            timeout: self.config.haproxy.check_timeout,
            user: self.config.haproxy.check_user.clone(),
        }
    }

    /// When the applier wants to apply again although nothing changed: a guard hold that
    /// expires, or the retry of an install that failed on the disk.
    pub fn wakeup(&self) -> Option<Instant> {
        match (self.release_at, self.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Renders, installs and reloads. On error the files on disk are those of before. An
    /// install that failed on the disk (full, read-only) is retried with backoff through
    /// [`Applier::wakeup`], so the state lands once the disk is usable again without a new
    /// change; the retries stop at the first apply that does not fail on the disk.
    pub async fn apply(&mut self, update: &Update) -> Result<Report, ApplyError> {
        let result = self.apply_once(update).await;
        let failed_on_disk = match &result {
            Err(ApplyError::Install { template, source }) => source
                .disk_reason()
                .zip(source.disk_problem())
                .map(|(reason, problem)| (template, reason, problem)),
            _ => None,
        };
        match failed_on_disk {
            Some((template, reason, problem)) => {
                let dest = self
                    .config
                    .templates
                    .iter()
                    .find(|t| &t.name == template)
                    .map_or_else(|| template.clone(), |t| t.dest.display().to_string());
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
        self.report_new_rejections(rejected);
        let t_parse = started.elapsed();
        let installed = self
            .config
            .haproxy_template()
            .or(self.config.templates.first())
            .is_some_and(|t| t.dest.exists());
        let decision = self
            .guard
            .decide(self.last.as_ref(), wanted, installed, started);
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
                });
            }
        }
        let mut registry = decision.registry;
        // Render and install; when `haproxy -c` blames lines that belong to some services only,
        // put those services back to their last applied state and try again.
        let mut held_back: Vec<String> = Vec::new();
        let mut isolated: BTreeSet<String> = BTreeSet::new();
        let (rendered, installed, runtime_cmds) = loop {
            let t0 = Instant::now();
            let Prepared {
                rendered,
                runtime_cmds,
                current,
            } = self.prepare(update, &mut registry)?;
            let t_prepare = t0.elapsed();
            let t0 = Instant::now();
            // A server-only change to the file this process proved last needs no second proof:
            // only addresses (IP literals), ports (1-65535), weights (0-256) and `disabled`
            // differ, each re-parsed by the plan, and everything else is byte-identical to a
            // file that passed `haproxy -c`. Skipping it keeps change -> served in milliseconds.
            let proven = runtime_cmds.as_ref().is_some_and(|c| !c.is_empty())
                && self.proven.is_some()
                && self.proven == self.haproxy_file_id();
            let result = self.install_all(&rendered, proven, current).await;
            tracing::debug!(
                parse_ms = t_parse.as_secs_f64() * 1e3,
                prepare_ms = t_prepare.as_secs_f64() * 1e3,
                install_ms = t0.elapsed().as_secs_f64() * 1e3,
                "apply stages"
            );
            match result {
                Ok(installed) => break (rendered, installed, runtime_cmds),
                Err(e) => {
                    let names = culprits_of(&e, &rendered, &registry)
                        .filter(|n| !n.is_empty() && n.is_disjoint(&isolated))
                        .filter(|_| isolated.len() < MAX_ISOLATED);
                    let Some(names) = names else { return Err(e) };
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
        let hash = hash(&rendered);
        let changed: Vec<String> = installed
            .iter()
            .map(|(i, _)| rendered[*i].template.name.clone())
            .collect();
        let reload_started = Instant::now();
        let kind = if installed.is_empty() && !self.controller.needs_start() {
            ApplyKind::None
        } else if let Some(cmds) = runtime_cmds.as_ref().filter(|_| !installed.is_empty()) {
            match runtime::apply(&self.config.haproxy.runtime_socket, cmds, RUNTIME_TIMEOUT).await {
                Ok(()) => {
                    // The server state saved before the last reload now holds values these
                    // commands replaced: an HAProxy that loaded it later (restarted by its own
                    // supervisor, reloaded by someone else) would restore them over the file's.
                    let _ = std::fs::remove_file(&self.config.haproxy.state_file);
                    ApplyKind::Runtime
                }
                Err(e) => {
                    // The new file is installed and proven: a reload makes HAProxy match it.
                    self.metrics.runtime_failures.inc();
                    tracing::warn!(error = %e, "Runtime API refused a change; reloading instead");
                    self.reload(&rendered, &installed).await?
                }
            }
        } else {
            self.reload(&rendered, &installed).await?
        };
        if !matches!(kind, ApplyKind::None | ApplyKind::Written) {
            self.metrics
                .reload_seconds
                .observe(reload_started.elapsed().as_secs_f64());
        }
        self.metrics.applied(kind, update.snapshot.revision);
        self.metrics.set_held(&held, &held_back);
        self.metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        self.remember_counts(&registry);
        self.last = Some(registry);
        Ok(Report {
            kind,
            revision: update.snapshot.revision,
            held,
            held_back,
            hash,
            changed,
            duration: started.elapsed(),
        })
    }

    /// Assigns slots and renders. With the Runtime API available it first keeps the slot
    /// layout; when the change needs a reload anyway, spare slots are regrown and the render
    /// repeated. Returns the render and, for a server-only change, the commands and the
    /// installed files the plan was made against.
    fn prepare(
        &mut self,
        update: &Update,
        registry: &mut Registry,
    ) -> Result<Prepared, ApplyError> {
        let spare = self.config.haproxy.spare_slots as usize;
        let runtime = self.config.haproxy.runtime_updates && self.controller.is_running();
        self.slots.assign(registry, spare, !runtime);
        // The cache keeps the slotted services from now on, and the parsed copies are freed
        // before the render's values are built.
        let slots = &self.slots;
        self.parse_cache.adopt(|s| slots.slotted(s));
        let rendered = self.render_registry(update, registry)?;
        if !runtime {
            return Ok(Prepared::reload(rendered));
        }
        match self.runtime_plan(&rendered) {
            Ok((cmds, current)) => Ok(Prepared {
                rendered,
                runtime_cmds: Some(cmds),
                current: Some(current),
            }),
            Err(why) => {
                tracing::debug!(reason = %why, "not a server-only change: reload");
                self.slots.assign(registry, spare, true);
                Ok(Prepared::reload(self.render_registry(update, registry)?))
            }
        }
    }

    /// Installs every rendered file; on failure puts back the ones already installed. `current`
    /// holds the installed files when the caller has read them already (the Runtime API plan).
    async fn install_all(
        &mut self,
        rendered: &[Rendered],
        proven: bool,
        mut current: Option<Current>,
    ) -> Result<Vec<(usize, Option<Vec<u8>>)>, ApplyError> {
        let check = self.check();
        let mut installed: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
        for (i, r) in rendered.iter().enumerate() {
            let started = Instant::now();
            let check = (r.template.check && !proven).then_some(&check);
            let outcome = match current.as_mut().and_then(|c| c.get_mut(i)) {
                Some(cur) => install::install_over(&r.template, cur.take(), &r.bytes, check).await,
                None => install::install(&r.template, &r.bytes, check).await,
            };
            if r.template.check && !matches!(outcome, Ok(Outcome::Unchanged)) {
                self.metrics
                    .validate_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            match outcome {
                Ok(Outcome::Unchanged) => {}
                Ok(Outcome::Installed { previous }) => {
                    installed.push((i, previous));
                    if r.template.check {
                        // Proven now, or derived from a proven file by a server-only change.
                        self.proven = self.haproxy_file_id();
                    }
                }
                Err(source) => {
                    if matches!(source, InstallError::Invalid(_)) {
                        self.metrics.check_failures.inc();
                    }
                    restore(rendered, &installed);
                    return Err(ApplyError::Install {
                        template: r.template.name.clone(),
                        source,
                    });
                }
            }
        }
        Ok(installed)
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

    /// The Runtime API commands that turn the running config into `rendered`, with the
    /// installed files they were planned against, or why a reload is needed. Only the file
    /// HAProxy loads and map files may change.
    fn runtime_plan(&self, rendered: &[Rendered]) -> Result<(Vec<runtime::Cmd>, Current), String> {
        let main = self
            .config
            .haproxy_template()
            .ok_or("no haproxy template")?;
        let mut plan = None;
        let mut maps = Vec::new();
        let mut current = Vec::with_capacity(rendered.len());
        for r in rendered {
            let installed = install::read_installed(&r.template.dest)
                .map_err(|e| e.to_string())?
                .ok_or("nothing installed yet")?;
            // Strict UTF-8 (a render always is): the lossy conversion walked a megabyte byte by
            // byte on every apply.
            if r.template.dest == main.dest {
                let (old, new) = (as_text(&installed, r)?, as_text(&r.bytes, r)?);
                plan = Some(runtime::plan(old, new).map_err(|e| e.0)?);
            } else if installed != r.bytes {
                if !r.template.map {
                    return Err(format!("template {:?} changed too", r.template.name));
                }
                let path = r.template.dest.display().to_string();
                let new = as_text(&r.bytes, r)?;
                maps.push(runtime::plan_map(&path, new).map_err(|e| e.0)?);
            }
            current.push(Some(installed));
        }
        if let Some(cmds) = plan.as_mut() {
            cmds.extend(maps);
        }
        plan.map(|p| (p, current))
            .ok_or_else(|| "the haproxy template was not rendered".into())
    }

    /// In supervise mode, starts HAProxy on the installed file when there is one and it passes
    /// `haproxy -c`, so that a restart during a source outage keeps the node serving. dest is
    /// not touched; the first apply then reloads (or does nothing) as usual.
    pub async fn start_installed(&mut self) {
        if !self.controller.needs_start() {
            return;
        }
        let Some(t) = self.config.haproxy_template() else {
            return;
        };
        if !t.dest.exists() {
            return;
        }
        let check = self.check();
        // The installed file keeps its owner: a copy is checked, so it can be handed over.
        let copy = match install::stage(&t.dest, &std::fs::read(&t.dest).unwrap_or_default()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot stage a copy of the installed config to check it");
                return;
            }
        };
        let verdict = crate::haproxy::validate::check_as(
            &check.binary,
            &copy,
            check.timeout,
            check.user.as_deref(),
        )
        .await;
        install::discard(&copy);
        let state = self.state_save();
        match verdict {
            Ok(_) => match self.controller.start_installed(Some(&state)).await {
                Ok(Some(how)) => {
                    self.proven = self.haproxy_file_id();
                    tracing::info!(file = %t.dest.display(), "HAProxy {how} on the installed config while the source is read");
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start HAProxy on the installed config; waiting for the source")
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "the installed config does not pass haproxy -c; waiting for the source")
            }
        }
    }

    /// Where a reload saves the server state first, filtered by the installed HAProxy file.
    fn state_save(&self) -> StateSave {
        StateSave {
            runtime_socket: self.config.haproxy.runtime_socket.clone(),
            state_file: self.config.haproxy.state_file.clone(),
            config: self.config.haproxy_template().map(|t| t.dest.clone()),
        }
    }

    /// When the applier wants to look at HAProxy next (`master` mode: a restart under its own
    /// supervisor is noticed without a registry change).
    pub fn haproxy_look_at(&self) -> Option<Instant> {
        self.controller.next_look()
    }

    /// In `master` mode, when a look is due: an HAProxy that its own supervisor restarted (a new
    /// master PID) is counted and logged, and the servers it holds are brought back in line with
    /// the installed file, through the Runtime API or else one reload. It loaded that file and
    /// then the server state file of haconfd's last reload, which may restore older addresses
    /// and states. The first master this process sees is checked the same way, quietly: its
    /// history is unknown. True when HAProxy was found restarted.
    pub async fn watch_haproxy(&mut self) -> bool {
        let Some(seen) = self.controller.look_at_master().await else {
            return false;
        };
        let restarted = matches!(seen, MasterSeen::Restarted { .. });
        if let MasterSeen::Restarted { from, to } = seen {
            self.metrics.haproxy_restarts.inc();
            tracing::warn!(
                from,
                to,
                "HAProxy was restarted by its own supervisor (new master PID); checking its servers against the installed config"
            );
        }
        let Some(dest) = self
            .config
            .haproxy_template()
            .map(|t| t.dest.clone())
            .filter(|d| d.exists())
        else {
            return restarted;
        };
        let socket = &self.config.haproxy.runtime_socket;
        let why = if self.config.haproxy.runtime_updates {
            match crate::haproxy::realign(socket, &dest, RUNTIME_TIMEOUT).await {
                Ok(Realigned::InLine) => {
                    tracing::info!("HAProxy's servers match the installed config");
                    return restarted;
                }
                Ok(Realigned::Runtime(n)) => {
                    tracing::warn!(
                        commands = n,
                        "HAProxy's servers differed from the installed config; set through the Runtime API"
                    );
                    return restarted;
                }
                Err(why) => why,
            }
        } else if restarted {
            "the Runtime API is off ([haproxy] runtime_updates)".to_owned()
        } else {
            return false;
        };
        tracing::warn!(reason = %why, "cannot compare or set HAProxy's servers through the Runtime API; reloading it on the installed config");
        match self.controller.reload(Some(&self.state_save())).await {
            Ok(_) => tracing::info!("HAProxy reloaded on the installed config"),
            Err(e) => {
                self.metrics.reload_failures.inc();
                tracing::error!(error = %e, "cannot reload HAProxy on the installed config");
            }
        }
        restarted
    }

    /// Identifies the installed HAProxy file (device, inode, size, mtime), so that a later
    /// apply knows whether it is still the file this process proved.
    fn haproxy_file_id(&self) -> Option<(u64, u64, u64, i64, i64)> {
        use std::os::unix::fs::MetadataExt;
        let t = self.config.haproxy_template()?;
        let m = std::fs::metadata(&t.dest).ok()?;
        Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
    }

    /// Reloads HAProxy; on failure restores the files of this apply.
    async fn reload(
        &mut self,
        rendered: &[Rendered],
        installed: &[(usize, Option<Vec<u8>>)],
    ) -> Result<ApplyKind, ApplyError> {
        match self.controller.reload(Some(&self.state_save())).await {
            Ok(kind) => Ok(kind),
            Err(e) => {
                self.metrics.reload_failures.inc();
                restore(rendered, installed);
                Err(e.into())
            }
        }
    }

    /// Logs the keys left out that were not left out by the previous apply (a bad key that
    /// stays is logged once, not at every change), and the ones that came back at info; the
    /// gauge always holds the current count.
    fn report_new_rejections(&mut self, rejected: Vec<Rejection>) {
        self.metrics.set_rejected(rejected.len() as u64);
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

    /// Writes the per-service instance counts beside the HAProxy file when they changed, so
    /// that the guard of the next run has a reference before it applies anything. Advisory:
    /// no fsync, and a failure is only logged.
    fn remember_counts(&mut self, registry: &Registry) {
        let counts = Guard::counts(registry);
        if self.written_counts.as_ref() == Some(&counts) {
            return;
        }
        let Some(path) = guard_file(&self.config) else {
            return;
        };
        let text = match serde_json::to_vec(&counts) {
            Ok(t) => t,
            Err(_) => return,
        };
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path));
        match written {
            Ok(()) => self.written_counts = Some(counts),
            Err(e) => {
                install::discard(&tmp);
                tracing::warn!(file = %path.display(), error = %e, "cannot remember instance counts for the guard");
            }
        }
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
        (
            std::mem::replace(&mut self.config, config),
            std::mem::replace(&mut self.templates, templates),
        )
    }
}

/// The services whose lines `haproxy -c` blamed, when every blamed line belongs to one.
fn culprits_of(
    e: &ApplyError,
    rendered: &[Rendered],
    registry: &Registry,
) -> Option<BTreeSet<String>> {
    let ApplyError::Install {
        template,
        source: InstallError::Invalid(ValidateError::Rejected { file, output, .. }),
    } = e
    else {
        return None;
    };
    let r = rendered.iter().find(|r| &r.template.name == template)?;
    let lines = isolate::error_lines(output, file);
    isolate::culprits(
        &String::from_utf8_lossy(&r.bytes),
        &lines,
        &registry.services,
    )
}

/// Where the guard's per-service counts live: a hidden file beside the HAProxy file, so that
/// it survives restarts and reboots with the file it describes.
fn guard_file(config: &Config) -> Option<std::path::PathBuf> {
    let t = config.haproxy_template().or(config.templates.first())?;
    let name = t.dest.file_name()?.to_string_lossy().into_owned();
    Some(t.dest.with_file_name(format!(".{name}.haconfd-guard.json")))
}

fn read_counts(path: &std::path::Path) -> Option<BTreeMap<String, usize>> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable guard file");
            None
        }
    }
}

/// How many services one apply may isolate before it gives up.
const MAX_ISOLATED: usize = 16;

/// Puts back the files an apply installed, newest first.
fn restore(rendered: &[Rendered], installed: &[(usize, Option<Vec<u8>>)]) {
    for (i, previous) in installed.iter().rev() {
        let t = &rendered[*i].template;
        if let Err(e) = install::restore(t, previous.as_deref()) {
            tracing::error!(template = %t.name, error = %e, "cannot restore the previous file");
        }
    }
}
