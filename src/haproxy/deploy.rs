//! Committing one generation of files: rendered bytes in, files installed and HAProxy told, or
//! every file put back.
//!
//! A commit installs every rendered file (staged, proven with `haproxy -c`, renamed over
//! `dest`), then makes HAProxy take them: through the Runtime API when only server lines and
//! maps changed, else with one confirmed reload that saves the server state first. When the
//! install or the reload fails, every file of this commit is put back. The deployer owns the
//! [`Controller`] and is the only reader of the live files besides `install` itself: the
//! Runtime API plan against the installed files, the proof that the installed HAProxy file is
//! the one this process checked, the boot on the installed file before the source answers, and
//! `master` mode's look at an HAProxy restarted behind haconfd's back.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::install::{self, Check, InstallError, Outcome};
use super::validate::ValidateError;
use super::{
    ApplyKind, Controller, MasterSeen, ReloadError, StateSave, master, runtime, supervise,
};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::Registry;
use crate::render::Rendered;

pub mod fast;
mod files;

use fast::{After, FastPath, Proof, Seen};
use files::{plan_files, realign};

/// Why a generation was not committed. The files on disk are those of before.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("template {template:?}: {source}")]
    Install {
        template: String,
        dest: PathBuf,
        #[source]
        source: InstallError,
    },
    #[error("reload failed, previous files restored: {0}")]
    Reload(#[from] ReloadError),
}

impl DeployError {
    /// When `haproxy -c` rejected a file: the template's name, the file it checked and what it
    /// printed (the lines it blames name that file).
    pub fn rejected(&self) -> Option<(&str, &str, &str)> {
        match self {
            DeployError::Install {
                template,
                source: InstallError::Invalid(ValidateError::Rejected { file, output, .. }),
                ..
            } => Some((template, file, output)),
            _ => None,
        }
    }

    /// When the disk refused an install (full, read-only, a quota): the file, a reason for a
    /// metric label, and the problem in the operator's words.
    pub fn disk(&self) -> Option<(&Path, &'static str, String)> {
        match self {
            DeployError::Install { dest, source, .. } => Some((
                dest.as_path(),
                source.disk_reason()?,
                source.disk_problem()?,
            )),
            DeployError::Reload(_) => None,
        }
    }
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub kind: ApplyKind,
    /// The templates whose files changed, in render order.
    pub changed: Vec<String>,
    /// How long the install took (the files, before HAProxy was told).
    pub install_time: Duration,
}

/// What the apply pipeline needs from the deploy room. [`Deployer`] is the real one; the
/// pipeline's unit tests drive fakes.
pub trait Deploy: Send + 'static {
    /// A Runtime API plan, made before the install.
    type Plan: Send;
    /// Runs on `config` from now on (SIGHUP); the mode and the sockets change only on restart.
    fn configure(&mut self, config: &Config);
    /// Whether a generation is installed already (the guard keeps it over an empty registry).
    fn installed(&self) -> bool;
    /// Whether a server-only change could go through the Runtime API now.
    fn runtime_ready(&self) -> bool;
    /// The fast path (see [`fast`]): sends the server-only change from `installed`, the
    /// registry of the installed files, to `wanted` (slotted) before anything is rendered, when
    /// it is one and may be sent ahead of the files. True when HAProxy took it: the files then
    /// follow at [`Deploy::files_due`]. False: nothing was sent, or a send failed and this
    /// apply must install now.
    fn send_first(
        &mut self,
        installed: &Registry,
        wanted: &Registry,
    ) -> impl Future<Output = bool> + Send;
    /// The registry HAProxy serves while it is ahead of the installed files.
    fn served(&self) -> Option<&Registry>;
    /// When the files must follow what was sent ahead of them: an apply is due then.
    fn files_due(&self) -> Option<Instant>;
    /// The Runtime API plan that turns the installed files into `rendered`, the render of
    /// `registry`, or why a reload is needed.
    fn plan(&mut self, rendered: &[Rendered], registry: &Registry) -> Result<Self::Plan, String>;
    /// Installs `rendered` and makes HAProxy take it (through `plan` when there is one); on
    /// failure every file of this commit is put back, and so is HAProxy.
    fn commit(
        &mut self,
        rendered: &[Rendered],
        plan: Option<Self::Plan>,
    ) -> impl Future<Output = Result<Committed, DeployError>> + Send;
}

/// The installed bytes of each rendered file, in render order (None: nothing installed).
type Current = Vec<Option<Vec<u8>>>;

/// A server-only change: the commands, and the installed files they were planned against
/// (read once, not again by the install).
pub struct Plan {
    cmds: Vec<runtime::Cmd>,
    current: Current,
    /// With HAProxy ahead of the installed files: what it needs once they are installed.
    after: Option<After>,
}

/// How long one Runtime API exchange may take.
const RUNTIME_TIMEOUT: Duration = Duration::from_secs(5);

/// Names one state of a file: device, inode, size, mtime (s, ns).
type FileId = (u64, u64, u64, i64, i64);

/// The settings a commit reads from the config.
struct Settings {
    check: Check,
    runtime_updates: bool,
    runtime_socket: PathBuf,
    state_file: PathBuf,
    /// The file HAProxy loads: the first template with `check`.
    main: Option<PathBuf>,
    /// The file whose presence means a generation is installed: `main`, else the first
    /// template's.
    first: Option<PathBuf>,
}

impl Settings {
    fn of(config: &Config) -> Settings {
        let h = &config.haproxy;
        let main = config.haproxy_template().map(|t| t.dest.clone());
        Settings {
            check: Check::of(h),
            runtime_updates: h.runtime_updates,
            runtime_socket: h.runtime_socket.clone(),
            state_file: h.state_file.clone(),
            first: main
                .clone()
                .or_else(|| config.templates.first().map(|t| t.dest.clone())),
            main,
        }
    }
}

/// Owns the live files and the HAProxy controller across applies.
pub struct Deployer {
    settings: Settings,
    controller: Controller,
    metrics: Arc<Metrics>,
    /// The HAProxy file this process installed after proving it (see `haproxy_file_id`).
    proven: Option<FileId>,
    fast: FastPath,
    /// HAProxy could not be put back to the installed files after a failed commit: the next
    /// commit reloads it.
    reload_next: bool,
}

impl Deployer {
    /// The deployer of `run`: HAProxy driven per `[haproxy] mode`, its restarts counted.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Deployer {
        let mut controller = Controller::new(config);
        controller.count_restarts(&metrics.haproxy_restarts);
        Deployer::with(config, controller, metrics)
    }

    /// The deployer of a one-shot `render` (see [`Controller::one_shot`]).
    pub async fn one_shot(config: &Config, metrics: Arc<Metrics>) -> Deployer {
        let controller = Controller::one_shot(config).await;
        Deployer::with(config, controller, metrics)
    }

    fn with(config: &Config, controller: Controller, metrics: Arc<Metrics>) -> Deployer {
        Deployer {
            settings: Settings::of(config),
            controller,
            metrics,
            proven: None,
            fast: FastPath::new(config.wait),
            reload_next: false,
        }
    }

    /// Whether an HAProxy driven by this deployer runs.
    pub fn is_running(&self) -> bool {
        self.controller.is_running()
    }

    /// What stops the supervised HAProxy, for whoever must force it; None in other modes.
    pub fn stopper(&self) -> Option<supervise::Stopper> {
        self.controller.stopper()
    }

    /// Stops a supervised HAProxy; other modes leave HAProxy alone.
    pub async fn shutdown(&mut self) {
        self.controller.shutdown().await;
    }

    /// When the deployer wants to look at HAProxy next (`master` mode: a restart under its own
    /// supervisor is noticed without a registry change).
    pub fn look_at(&self) -> Option<Instant> {
        self.controller.next_look()
    }

    /// In supervise mode, starts HAProxy on the installed file when there is one and it passes
    /// `haproxy -c`, so that a restart during a source outage keeps the node serving. dest is
    /// not touched (a copy beside it is proven: the installed file keeps its owner); the first
    /// apply then reloads (or does nothing) as usual.
    pub async fn start_installed(&mut self) {
        if !self.controller.needs_start() {
            return;
        }
        let Some(dest) = self.settings.main.clone() else {
            return;
        };
        let installed = match install::read_installed(&dest) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the installed config to check it; waiting for the source");
                return;
            }
        };
        if let Err(e) = install::prove(&dest, &installed, &self.settings.check).await {
            match e {
                InstallError::Invalid(e) => {
                    tracing::warn!(error = %e, "the installed config does not pass haproxy -c; waiting for the source")
                }
                e => {
                    tracing::warn!(error = %e, "cannot stage a copy of the installed config to check it")
                }
            }
            return;
        }
        let state = self.state_save();
        match self.controller.start_installed(Some(&state)).await {
            Ok(Some(how)) => {
                self.proven = self.haproxy_file_id();
                tracing::info!(file = %dest.display(), "HAProxy {how} on the installed config while the source is read");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot start HAProxy on the installed config; waiting for the source")
            }
        }
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
        let Some(dest) = self.settings.main.clone().filter(|d| d.exists()) else {
            return restarted;
        };
        let why = if self.settings.runtime_updates {
            match realign(&self.settings.runtime_socket, &dest, RUNTIME_TIMEOUT).await {
                Ok(0) => {
                    tracing::info!("HAProxy's servers match the installed config");
                    return restarted;
                }
                Ok(n) => {
                    tracing::warn!(
                        commands = n,
                        "HAProxy's servers differed from the installed config; set through the Runtime API"
                    );
                    // What was sent ahead of the files is undone: they follow at once.
                    self.fast.disturbed();
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
        self.fast.disturbed();
        match self.controller.reload(Some(&self.state_save())).await {
            Ok(_) => tracing::info!("HAProxy reloaded on the installed config"),
            Err(e) => {
                self.metrics.reload_failures.inc();
                tracing::error!(error = %e, "cannot reload HAProxy on the installed config");
            }
        }
        restarted
    }

    /// Where a reload saves the server state first, filtered by the installed HAProxy file.
    fn state_save(&self) -> StateSave {
        StateSave {
            runtime_socket: self.settings.runtime_socket.clone(),
            state_file: self.settings.state_file.clone(),
            config: self.settings.main.clone(),
        }
    }

    /// Identifies the installed HAProxy file, so that a later apply knows whether it is still
    /// the file this process proved.
    fn haproxy_file_id(&self) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(self.settings.main.as_ref()?).ok()?;
        Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
    }

    /// Installs every rendered file; on failure puts back the ones already installed. `current`
    /// holds the installed files when the plan has read them already.
    async fn install_all(
        &mut self,
        rendered: &[Rendered],
        proven: bool,
        mut current: Option<Current>,
    ) -> Result<Vec<(usize, Option<Vec<u8>>)>, DeployError> {
        let check = self.settings.check.clone();
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
                    return Err(DeployError::Install {
                        template: r.template.name.clone(),
                        dest: r.template.dest.clone(),
                        source,
                    });
                }
            }
        }
        Ok(installed)
    }

    /// Reloads HAProxy; on failure restores the files of this commit and puts HAProxy back to
    /// them (`sent`: commands of this commit reached it).
    async fn reload(
        &mut self,
        rendered: &[Rendered],
        installed: &[(usize, Option<Vec<u8>>)],
        sent: bool,
    ) -> Result<ApplyKind, DeployError> {
        match self.controller.reload(Some(&self.state_save())).await {
            Ok(kind) => Ok(kind),
            Err(e) => {
                self.metrics.reload_failures.inc();
                restore(rendered, installed);
                self.put_back(false, sent).await;
                Err(e.into())
            }
        }
    }

    /// What HAProxy runs now, for the fast path (None when it has no use for it).
    async fn look(&self) -> Option<Seen> {
        if !self.runtime_ready() || self.fast.proof() == Proof::Off {
            return None;
        }
        let info = master::show_proc(self.controller.master_socket()?, RUNTIME_TIMEOUT)
            .await
            .ok()?;
        Some(Seen {
            master_pid: info.master_pid,
            reloads: info.reloads,
            restarts: self.metrics.haproxy_restarts.get(),
        })
    }

    /// After a failed commit the previous files are in place: when HAProxy may hold what they
    /// do not (it was ahead of them, or `sent`: commands of this commit reached it), it is
    /// realigned with them, or else reloaded on them. `disk`: the install failed on the disk,
    /// and nothing is sent ahead until an install lands.
    async fn put_back(&mut self, disk: bool, sent: bool) {
        let ahead = self.fast.failed(disk);
        let Some(dest) = self.settings.main.clone().filter(|_| ahead || sent) else {
            return;
        };
        let why = match realign(&self.settings.runtime_socket, &dest, RUNTIME_TIMEOUT).await {
            Ok(n) => {
                tracing::warn!(
                    commands = n,
                    "HAProxy put back to the installed config after a failed apply"
                );
                return;
            }
            Err(why) => why,
        };
        tracing::warn!(reason = %why, "cannot put HAProxy back to the installed config through the Runtime API; reloading it");
        if let Err(e) = self.controller.reload(Some(&self.state_save())).await {
            self.metrics.reload_failures.inc();
            self.reload_next = true;
            tracing::error!(error = %e, "cannot reload HAProxy on the installed config: it may serve server values the file does not hold until the next apply reloads it");
        }
    }

    /// With HAProxy ahead of the files just installed: `after`, unless it loaded a file since
    /// the last commit (then a realign), and the map replacements of `cmds`. Returns what HAProxy
    /// was seen running.
    async fn catch_up(&self, after: After, cmds: &[runtime::Cmd]) -> Result<Option<Seen>, String> {
        let socket = &self.settings.runtime_socket;
        let now = self.look().await;
        let maps: Vec<runtime::Cmd> = cmds
            .iter()
            .filter(|c| matches!(c, runtime::Cmd::Map { .. }))
            .cloned()
            .collect();
        match self.fast.after_install(after, now) {
            After::Send(mut c) => {
                c.extend(maps);
                if !c.is_empty() {
                    runtime::apply(socket, &c, RUNTIME_TIMEOUT)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            After::Realign => {
                if !maps.is_empty() {
                    runtime::apply(socket, &maps, RUNTIME_TIMEOUT)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                let dest = self.settings.main.as_ref().ok_or("no haproxy template")?;
                let n = realign(socket, dest, RUNTIME_TIMEOUT).await?;
                if n > 0 {
                    tracing::warn!(
                        commands = n,
                        "HAProxy differed from the files installed after changes sent ahead of them; set through the Runtime API"
                    );
                }
            }
        }
        Ok(now)
    }
}

impl Deploy for Deployer {
    type Plan = Plan;

    fn configure(&mut self, config: &Config) {
        self.settings = Settings::of(config);
        self.fast.configure(config.wait);
    }

    fn installed(&self) -> bool {
        self.settings.first.as_ref().is_some_and(|d| d.exists())
    }

    fn runtime_ready(&self) -> bool {
        self.settings.runtime_updates && self.controller.is_running()
    }

    async fn send_first(&mut self, installed: &Registry, wanted: &Registry) -> bool {
        if !self.runtime_ready() || self.reload_next {
            return false;
        }
        // The installed file must be the one this process proved: the files follow without
        // `haproxy -c`, as any server-only change of a proven file does.
        let file_proven = self.proven.is_some() && self.proven == self.haproxy_file_id();
        let restarts = self.metrics.haproxy_restarts.get();
        let Some(cmds) = self.fast.commands(installed, wanted, file_proven, restarts) else {
            return false;
        };
        let opening = self.fast.served().is_none();
        let started = Instant::now();
        let result = runtime::apply(&self.settings.runtime_socket, &cmds, RUNTIME_TIMEOUT).await;
        tracing::debug!(
            commands = cmds.len(),
            send_ms = started.elapsed().as_secs_f64() * 1e3,
            "sent ahead of the files"
        );
        if opening {
            // The server state saved before the last reload holds values these commands
            // replace (see `commit`).
            let _ = std::fs::remove_file(&self.settings.state_file);
        }
        let ok = match result {
            Ok(()) => true,
            Err(e) => {
                self.metrics.runtime_failures.inc();
                tracing::warn!(error = %e, "Runtime API refused a change sent ahead of the files; installing them now");
                false
            }
        };
        self.fast
            .sent(installed, wanted.clone(), ok, Instant::now());
        ok
    }

    fn served(&self) -> Option<&Registry> {
        self.fast.served()
    }

    fn files_due(&self) -> Option<Instant> {
        self.fast.due()
    }

    /// Only the file HAProxy loads and map files may change.
    fn plan(&mut self, rendered: &[Rendered], registry: &Registry) -> Result<Plan, String> {
        let started = Instant::now();
        let planned = plan_files(&self.settings, &mut self.fast, rendered, registry);
        tracing::debug!(
            plan_ms = started.elapsed().as_secs_f64() * 1e3,
            "planned from the files"
        );
        let files = planned.as_ref().map(|(c, _)| c.as_slice());
        let after = self.fast.closing(registry, files.map_err(String::as_str));
        planned.map(|(cmds, current)| Plan {
            cmds,
            current,
            after,
        })
    }

    async fn commit(
        &mut self,
        rendered: &[Rendered],
        plan: Option<Plan>,
    ) -> Result<Committed, DeployError> {
        let (cmds, current, after) = match plan {
            Some(p) => (Some(p.cmds), Some(p.current), p.after),
            None => (None, None, None),
        };
        let ahead = self.fast.served().is_some();
        let started = Instant::now();
        // A server-only change to the file this process proved last needs no second proof:
        // only addresses (IP literals), ports (1-65535), weights (0-256) and `disabled` differ,
        // each re-parsed by the plan, and everything else is byte-identical to a file that
        // passed `haproxy -c`. Skipping it keeps change -> served in milliseconds.
        let proven = cmds.as_ref().is_some_and(|c| !c.is_empty())
            && self.proven.is_some()
            && self.proven == self.haproxy_file_id();
        let installed = match self.install_all(rendered, proven, current).await {
            Ok(installed) => installed,
            Err(e) => {
                self.put_back(e.disk().is_some(), false).await;
                return Err(e);
            }
        };
        let install_time = started.elapsed();
        let changed = installed
            .iter()
            .map(|(i, _)| rendered[*i].template.name.clone())
            .collect();
        let reload_started = Instant::now();
        let runtime = cmds
            .as_ref()
            .filter(|_| (ahead || !installed.is_empty()) && !self.reload_next);
        let idle = installed.is_empty() && !ahead && !self.reload_next;
        let (kind, seen) = if idle && !self.controller.needs_start() {
            (ApplyKind::None, None)
        } else if let Some(cmds) = runtime {
            let result = match after {
                Some(after) => self.catch_up(after, cmds).await,
                None => runtime::apply(&self.settings.runtime_socket, cmds, RUNTIME_TIMEOUT)
                    .await
                    .map(|()| None)
                    .map_err(|e| e.to_string()),
            };
            match result {
                Ok(seen) => {
                    // The server state saved before the last reload now holds values these
                    // commands replaced: an HAProxy that loaded it later (restarted by its own
                    // supervisor, reloaded by someone else) would restore them over the file's.
                    let _ = std::fs::remove_file(&self.settings.state_file);
                    (ApplyKind::Runtime, seen)
                }
                Err(e) => {
                    // The new file is installed and proven: a reload makes HAProxy match it.
                    self.metrics.runtime_failures.inc();
                    tracing::warn!(error = %e, "Runtime API refused a change; reloading instead");
                    (self.reload(rendered, &installed, true).await?, None)
                }
            }
        } else {
            (self.reload(rendered, &installed, ahead).await?, None)
        };
        if !matches!(kind, ApplyKind::None | ApplyKind::Written) {
            self.metrics
                .reload_seconds
                .observe(reload_started.elapsed().as_secs_f64());
        }
        self.reload_next = false;
        let seen = match seen {
            Some(seen) => Some(seen),
            None => self.look().await,
        };
        self.fast.committed(seen);
        Ok(Committed {
            kind,
            changed,
            install_time,
        })
    }
}

/// Puts back the files a commit installed, newest first.
fn restore(rendered: &[Rendered], installed: &[(usize, Option<Vec<u8>>)]) {
    for (i, previous) in installed.iter().rev() {
        let t = &rendered[*i].template;
        if let Err(e) = install::restore(t, previous.as_deref()) {
            tracing::error!(template = %t.name, error = %e, "cannot restore the previous file");
        }
    }
}
