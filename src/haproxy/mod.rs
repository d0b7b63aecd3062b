//! Everything that starts processes or touches the live config: `haproxy -c`, atomic install,
//! committing a generation of files (`deploy`), the Runtime API, the master socket, the
//! supervised HAProxy, and reload commands.

pub mod children;
pub mod deploy;
pub mod install;
pub mod master;
pub mod runtime;
pub mod supervise;
pub mod validate;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use prometheus_client::metrics::counter::Counter;
use tokio::process::Command;
use tokio::time::Instant;

use crate::config::{Config, HaproxyMode};

/// Kills a whole process group (a child started with `process_group(0)`).
pub fn kill_group(pid: u32) {
    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
}

/// How a bounded child process ended.
pub(crate) enum Finished {
    /// It exited; stdout and stderr together, trailing whitespace trimmed.
    Exited {
        status: std::process::ExitStatus,
        output: String,
    },
    /// It ran past the deadline and its whole process group was killed.
    TimedOut,
}

/// Runs `cmd` with stdin closed and its output captured, in a process group of its own that is
/// killed whole when it runs longer than `timeout`. An error means it could not be run.
pub(crate) async fn run_bounded(cmd: &mut Command, timeout: Duration) -> std::io::Result<Finished> {
    let child = children::spawn(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true),
    )?;
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(out) => {
            let out = out?;
            let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stderr));
            Ok(Finished::Exited {
                status: out.status,
                output: output.trim_end().to_owned(),
            })
        }
        Err(_) => {
            if let Some(pid) = pid {
                kill_group(pid);
            }
            Ok(Finished::TimedOut)
        }
    }
}

/// A failure to make HAProxy take a new config.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Master(#[from] master::MasterError),
    #[error("{0}")]
    Supervise(String),
    #[error("reload command {argv:?} failed: {message}")]
    Command { argv: Vec<String>, message: String },
}

/// What an apply did to HAProxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyKind {
    /// Nothing changed on disk.
    None,
    /// Files changed; HAProxy is not driven (mode "none", or no checked file changed).
    Written,
    /// HAProxy was started (supervise, first apply).
    Start,
    /// Server-only change applied through the Runtime API: no reload.
    Runtime,
    /// A confirmed reload.
    Reload,
}

impl ApplyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyKind::None => "none",
            ApplyKind::Written => "written",
            ApplyKind::Start => "start",
            ApplyKind::Runtime => "runtime",
            ApplyKind::Reload => "reload",
        }
    }
}

/// How a supervised HAProxy came to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// Started by this process.
    Spawned,
    /// Found running (an earlier haconfd was killed and its HAProxy lived on), taken over
    /// through its master socket and reloaded on the installed file.
    Adopted,
}

impl std::fmt::Display for Started {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Started::Spawned => "started",
            Started::Adopted => "adopted and reloaded",
        })
    }
}

/// How often `master` mode looks at the master socket for an HAProxy that its own supervisor
/// restarted: a restart is noticed within this, without a registry change.
const MASTER_LOOK_EVERY: Duration = Duration::from_secs(2);

/// How long one look at the master socket may take; a look never holds an apply up for long.
const MASTER_LOOK_TIMEOUT: Duration = Duration::from_millis(500);

/// What `master` mode knows of the master it reloads: the PID it saw last, and when to look
/// again.
#[derive(Debug, Clone)]
pub struct MasterWatch {
    seen: Option<u32>,
    next: Instant,
    /// The socket did not answer at the last look (logged once per outage).
    silent: bool,
}

impl Default for MasterWatch {
    fn default() -> Self {
        MasterWatch {
            seen: None,
            next: Instant::now(),
            silent: false,
        }
    }
}

/// What a look at the master socket found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterSeen {
    /// The first master this process sees: its history is unknown.
    First(u32),
    /// Another master than at the last look: its supervisor restarted HAProxy, which loaded
    /// the installed file and the server state file of haconfd's last reload.
    Restarted { from: u32, to: u32 },
}

/// Drives HAProxy per `[haproxy] mode`.
pub enum Controller {
    None,
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
    Master {
        socket: PathBuf,
        timeout: Duration,
        watch: MasterWatch,
    },
    Supervise {
        spec: supervise::Spec,
        timeout: Duration,
        running: Option<supervise::Supervisor>,
        stopper: supervise::Stopper,
    },
}

impl Controller {
    /// The controller for `config`; `haproxy_cfg` is the file HAProxy loads.
    pub fn new(config: &Config) -> Controller {
        let h = &config.haproxy;
        match h.mode {
            HaproxyMode::None => Controller::None,
            HaproxyMode::Command => Controller::Command {
                argv: h.reload_cmd.clone(),
                timeout: h.reload_timeout,
            },
            HaproxyMode::Master => Controller::Master {
                socket: h.master_socket.clone(),
                timeout: h.reload_timeout,
                watch: MasterWatch::default(),
            },
            HaproxyMode::Supervise => Controller::Supervise {
                spec: supervise::Spec {
                    binary: h.binary.clone(),
                    master_socket: h.master_socket.clone(),
                    config: config
                        .haproxy_template()
                        .map(|t| t.dest.clone())
                        .unwrap_or_default(),
                    stop_grace: Duration::from_secs(35),
                    state_file: Some(h.state_file.clone()),
                    restarts: Counter::default(),
                },
                timeout: h.reload_timeout,
                running: None,
                stopper: supervise::Stopper::default(),
            },
        }
    }

    /// The controller for a one-shot `render`: like [`Controller::new`], except that `supervise`
    /// never starts an HAProxy of its own. It reloads through the master socket of the
    /// supervising daemon when that answers, and only installs otherwise.
    pub async fn one_shot(config: &Config) -> Controller {
        match Controller::new(config) {
            Controller::Supervise { spec, timeout, .. } => {
                if master::show_proc(&spec.master_socket, Duration::from_secs(1))
                    .await
                    .is_ok()
                {
                    Controller::Master {
                        socket: spec.master_socket,
                        timeout,
                        watch: MasterWatch::default(),
                    }
                } else {
                    tracing::info!(
                        socket = %spec.master_socket.display(),
                        "no supervised HAProxy answers: installing only"
                    );
                    Controller::None
                }
            }
            c => c,
        }
    }

    /// Makes HAProxy take the installed config. With `supervise`, the first call starts it.
    pub async fn reload(&mut self, state: Option<&StateSave>) -> Result<ApplyKind, ReloadError> {
        match self {
            Controller::None => Ok(ApplyKind::Written),
            Controller::Command { argv, timeout } => {
                run_command(argv, *timeout).await?;
                Ok(ApplyKind::Reload)
            }
            Controller::Master {
                socket, timeout, ..
            } => {
                save_state(state).await;
                master::reload(socket, *timeout).await?;
                Ok(ApplyKind::Reload)
            }
            Controller::Supervise {
                spec,
                timeout,
                running,
                ..
            } => {
                if running.is_none() {
                    return Ok(match self.start_installed(state).await? {
                        Some(Started::Adopted) => ApplyKind::Reload,
                        _ => ApplyKind::Start,
                    });
                }
                save_state(state).await;
                master::reload(&spec.master_socket, *timeout).await?;
                Ok(ApplyKind::Reload)
            }
        }
    }

    /// Whether an HAProxy driven by this controller runs, so that its runtime socket can take
    /// changes.
    pub fn is_running(&self) -> bool {
        match self {
            Controller::Master { .. } => true,
            Controller::Supervise { running, .. } => running.is_some(),
            Controller::None | Controller::Command { .. } => false,
        }
    }

    /// Starts a supervised HAProxy on the installed file: at the first apply, or before the
    /// source answers, so that a node that restarts during a source outage serves its last
    /// good config instead of nothing. The caller has proven the file. No-op in other modes
    /// or once running; says how HAProxy came to run when it did.
    ///
    /// An HAProxy that an earlier haconfd left running is adopted instead (a second one would
    /// share its ports through SO_REUSEPORT), and reloaded at once with `state` saved: it runs
    /// the file it last loaded, which need not be the installed one (that haconfd may have
    /// died between an install and its reload), and the server state file on disk may be
    /// older than the Runtime API changes it took since.
    pub async fn start_installed(
        &mut self,
        state: Option<&StateSave>,
    ) -> Result<Option<Started>, ReloadError> {
        let Controller::Supervise {
            spec,
            timeout,
            running: running @ None,
            stopper,
        } = self
        else {
            return Ok(None);
        };
        let sup = supervise::Supervisor::start(spec.clone(), *timeout, stopper.clone())
            .await
            .map_err(ReloadError::Supervise)?;
        let adopted = sup.adopted();
        // Watched from now on whatever the reload does: a failed reload leaves it serving the
        // file it had, and no second HAProxy may start beside it.
        *running = Some(sup);
        let Some(pid) = adopted else {
            return Ok(Some(Started::Spawned));
        };
        save_state(state).await;
        master::reload(&spec.master_socket, *timeout).await?;
        tracing::info!(pid, config = %spec.config.display(), "the adopted HAProxy reloaded the installed config");
        Ok(Some(Started::Adopted))
    }

    /// Counts the restarts of a supervised HAProxy on `counter` (the daemon's metric).
    pub fn count_restarts(&mut self, counter: &Counter) {
        if let Controller::Supervise { spec, .. } = self {
            spec.restarts = counter.clone();
        }
    }

    /// When `master` mode wants to look at the master socket next; None in other modes.
    pub fn next_look(&self) -> Option<Instant> {
        match self {
            Controller::Master { watch, .. } => Some(watch.next),
            _ => None,
        }
    }

    /// In `master` mode, when a look is due, asks the master socket for its master's PID: a
    /// first sight, or a master other than the last one seen, is reported. Nothing else is
    /// (other modes, a look not due, a socket that does not answer, a master without a
    /// worker yet).
    pub async fn look_at_master(&mut self) -> Option<MasterSeen> {
        let Controller::Master { socket, watch, .. } = self else {
            return None;
        };
        let now = Instant::now();
        if now < watch.next {
            return None;
        }
        watch.next = now + MASTER_LOOK_EVERY;
        let info = match master::show_proc(socket, MASTER_LOOK_TIMEOUT).await {
            Ok(info) => info,
            Err(e) => {
                if !std::mem::replace(&mut watch.silent, true) {
                    tracing::warn!(error = %e, "the HAProxy master does not answer: down, or restarting under its supervisor");
                }
                return None;
            }
        };
        if std::mem::replace(&mut watch.silent, false) {
            tracing::info!(pid = info.master_pid, "the HAProxy master answers again");
        }
        // A master that has not forked its worker yet has no runtime socket to compare with.
        if info.workers == 0 {
            return None;
        }
        match watch.seen.replace(info.master_pid) {
            None => Some(MasterSeen::First(info.master_pid)),
            Some(from) if from != info.master_pid => Some(MasterSeen::Restarted {
                from,
                to: info.master_pid,
            }),
            Some(_) => None,
        }
    }

    /// The master socket of the HAProxy this controller drives, if it has one.
    pub fn master_socket(&self) -> Option<&std::path::Path> {
        match self {
            Controller::Master { socket, .. } => Some(socket),
            Controller::Supervise { spec, .. } => Some(&spec.master_socket),
            Controller::None | Controller::Command { .. } => None,
        }
    }

    /// Whether HAProxy still has to be started (supervise mode, before the first apply).
    pub fn needs_start(&self) -> bool {
        matches!(self, Controller::Supervise { running: None, .. })
    }

    /// What stops the supervised HAProxy, for whoever must force it (a second SIGTERM); None in
    /// modes that do not own HAProxy.
    pub fn stopper(&self) -> Option<supervise::Stopper> {
        match self {
            Controller::Supervise { stopper, .. } => Some(stopper.clone()),
            _ => None,
        }
    }

    /// Stops a supervised HAProxy; other modes leave HAProxy alone.
    pub async fn shutdown(&mut self) {
        if let Controller::Supervise { running, .. } = self
            && let Some(sup) = running.take()
        {
            sup.stop().await;
        }
    }
}

/// Where to save `show servers state` before a reload, so that health and slot state survive.
#[derive(Debug, Clone)]
pub struct StateSave {
    pub runtime_socket: PathBuf,
    pub state_file: PathBuf,
    /// The file HAProxy is about to load: servers it changes are left out of the saved state.
    pub config: Option<PathBuf>,
}

/// Saves server state; a failure is logged, not fatal: the reload still happens, with state
/// read from the config file instead.
async fn save_state(state: Option<&StateSave>) {
    let Some(s) = state else { return };
    if !s.runtime_socket.exists() {
        return;
    }
    let result = async {
        let text = master::command(
            &s.runtime_socket,
            "show servers state",
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| e.to_string())?;
        let text = match &s.config {
            Some(cfg) => {
                let cfg = std::fs::read(cfg).map_err(|e| e.to_string())?;
                runtime::filter_state(&text, &String::from_utf8_lossy(&cfg))
            }
            None => text,
        };
        install::write_atomic(&s.state_file, text.as_bytes()).map_err(|e| e.to_string())
    }
    .await;
    if let Err(e) = result {
        // A stale state would restore old ports and states over the new config's.
        let _ = std::fs::remove_file(&s.state_file);
        tracing::warn!(error = %e, file = %s.state_file.display(), "cannot save server state before reload");
    }
}

/// Runs a reload command: argv (no shell), stdin closed, own process group killed whole on
/// timeout, exit status 0 required.
async fn run_command(argv: &[String], timeout: Duration) -> Result<(), ReloadError> {
    let err = |message: String| ReloadError::Command {
        argv: argv.to_vec(),
        message,
    };
    let (prog, args) = argv.split_first().ok_or_else(|| err("empty argv".into()))?;
    let mut cmd = Command::new(prog);
    cmd.args(args);
    match run_bounded(&mut cmd, timeout).await {
        Ok(Finished::Exited { status, .. }) if status.success() => Ok(()),
        Ok(Finished::Exited { status, output }) => Err(err(format!("{status}: {output}"))),
        Ok(Finished::TimedOut) => Err(err(format!("did not finish within {timeout:?}; killed"))),
        Err(e) => Err(err(format!("cannot start: {e}"))),
    }
}

/// The first line of `haproxy -v`, for `haconfd version`.
pub async fn version(binary: &str) -> String {
    let child = children::spawn(
        Command::new(binary)
            .arg("-v")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let out = match child {
        Ok(c) => c.wait_with_output().await,
        Err(e) => Err(e),
    };
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("unknown")
            .to_owned(),
        Err(e) => format!("not found ({e})"),
    }
}
