//! Owns the node's `haproxy -W -S <master_socket>,mode,600 -f <cfg>`: starts it, or adopts the
//! one an earlier haconfd left running; restarts it when it dies (a SIGKILLed master, or a
//! worker whose death takes the master down); stops it gracefully (SIGUSR1, soft stop) within a
//! bound, or at once (SIGTERM, hard stop) when the operator insists: a [`Stopper`] carries the
//! request.
//!
//! There is never a second HAProxy. HAProxy binds with SO_REUSEPORT, so a second master on the
//! same ports starts without an error and the kernel splits connections between the two; an
//! orphan (its haconfd SIGKILLed) would serve a config that never changes again. Before it starts
//! anything, the supervisor asks the master socket: a master that answers, runs with this
//! socket and this config file, and has a worker is adopted (no gap in serving); one that runs
//! another file or has no worker is stopped first; one this process cannot identify is left
//! alone, and nothing starts. A PID is signalled only after the socket named it as its master,
//! and only while `/proc` shows the same process (PID and start time): see `adopt.rs`.

mod adopt;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use prometheus_client::metrics::counter::Counter;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::master;
use adopt::{Found, ProcId, look, retire};

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    pub binary: String,
    pub master_socket: PathBuf,
    pub config: PathBuf,
    /// How long a soft stop may take before the master is killed.
    pub stop_grace: Duration,
    /// The server state file: removed before each start, because what it holds was saved from
    /// an HAProxy that is gone, and HAProxy would restore its ports and states over the config.
    pub state_file: Option<PathBuf>,
    /// Counts the restarts of an HAProxy that died (`haconfd_haproxy_restarts_total`).
    pub restarts: Counter,
}

/// How long a hard-stopped HAProxy gets to exit before its process group is killed.
const HARD_STOP_GRACE: Duration = Duration::from_secs(5);

/// How long the master socket may take to answer the question whether an HAProxy runs.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a master that is not haconfd's child (adopted) is looked at: it cannot be waited
/// for, so its death is seen by polling.
const ADOPTED_POLL: Duration = Duration::from_millis(250);

/// How often the master socket is asked whether the master still has a worker. HAProxy 2.6's
/// master exits when its current worker dies (`exit-on-failure`, even under `no-exit-on-failure`,
/// which its re-executed master no longer reads); a master that stays up without one (another
/// version) must not leave the node dark either.
const WORKER_POLL: Duration = Duration::from_secs(2);

/// How many polls in a row must find no worker before the master is taken for broken.
const WORKERLESS_POLLS: u32 = 2;

/// Restarts of a master that lived this long start again from the shortest backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// How the supervised HAProxy is to run. Only ever escalates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    Run,
    /// SIGUSR1: workers finish their connections, bounded by `Spec::stop_grace`.
    Soft,
    /// SIGTERM: workers close their connections now.
    Hard,
}

/// The stop request, shared by the controller and whoever else may have to stop HAProxy (the
/// signal handler: a second SIGTERM while a soft stop drains). Clones share one state.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<watch::Sender<Stop>>);

impl Default for Stopper {
    fn default() -> Self {
        Stopper(Arc::new(watch::channel(Stop::Run).0))
    }
}

impl Stopper {
    fn escalate(&self, to: Stop) {
        self.0.send_if_modified(|s| {
            let raise = *s < to;
            if raise {
                *s = to;
            }
            raise
        });
    }

    /// Asks for a soft stop.
    pub fn soft(&self) {
        self.escalate(Stop::Soft);
    }

    /// Asks for a hard stop, also of a soft stop under way; no HAProxy starts after it.
    pub fn hard(&self) {
        self.escalate(Stop::Hard);
    }

    pub fn state(&self) -> Stop {
        *self.0.borrow()
    }
}

/// A running, supervised HAProxy master.
pub struct Supervisor {
    stop: Stopper,
    task: JoinHandle<()>,
    /// The master's PID when it was adopted rather than started.
    adopted: Option<u32>,
}

/// The master the supervisor watches.
enum Master {
    /// Started by this process: its child, waited for and reaped here.
    Child(Child),
    /// Found running and taken over through the master socket: not a child (its parent is
    /// whoever inherited it), so its death is seen by polling `/proc`.
    Adopted(ProcId),
    /// None runs: starting one failed for this reason. Counts as exited at once, so that the
    /// next start follows the backoff.
    Failed(String),
}

impl Master {
    fn pid(&self) -> Option<u32> {
        match self {
            Master::Child(c) => c.id(),
            Master::Adopted(id) => Some(id.pid),
            Master::Failed(_) => None,
        }
    }

    fn signal(&self, sig: Signal) {
        match self {
            Master::Child(c) => {
                if let Some(pid) = c.id() {
                    let _ = kill(Pid::from_raw(pid as i32), sig);
                }
            }
            Master::Adopted(id) => id.signal(sig),
            Master::Failed(_) => {}
        }
    }

    /// Kills the master and its workers at once.
    fn kill_all(&self) {
        match self {
            Master::Child(c) => {
                if let Some(pid) = c.id() {
                    super::kill_group(pid);
                }
            }
            Master::Adopted(id) => id.kill_all(),
            Master::Failed(_) => {}
        }
    }

    /// Waits up to `within` for the master to exit; true when it did (and, for a child, was
    /// reaped).
    async fn exited_within(&mut self, within: Duration) -> bool {
        match self {
            Master::Child(c) => tokio::time::timeout(within, c.wait()).await.is_ok(),
            Master::Adopted(id) => id.gone_within(within).await,
            Master::Failed(_) => true,
        }
    }

    /// Kills the master's group and waits (bounded) for it to be gone.
    async fn kill_and_reap(&mut self) {
        self.kill_all();
        let _ = self.exited_within(HARD_STOP_GRACE).await;
    }
}

fn spawn(spec: &Spec) -> std::io::Result<Child> {
    if let Some(dir) = spec.master_socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A stale socket file from a previous run would make `-S` fail to bind. Only called once
    // [`look`] found no one answering on it.
    let _ = std::fs::remove_file(&spec.master_socket);
    if let Some(state) = &spec.state_file {
        let _ = std::fs::remove_file(state);
    }
    let mut sock = spec.master_socket.clone().into_os_string();
    sock.push(",mode,600");
    let mut cmd = Command::new(&spec.binary);
    cmd.arg("-W")
        .arg("-S")
        .arg(sock)
        .arg("-f")
        .arg(&spec.config)
        .stdin(Stdio::null())
        // haconfd speaks to systemd for both (READY=1 after the first apply, the watchdog); an
        // HAProxy that also notified would confuse systemd's view of the main process.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        // Its own process group: a terminal's Ctrl-C reaches haconfd, which stops HAProxy
        // gracefully, instead of hard-stopping HAProxy behind its back.
        .process_group(0)
        // Its output goes into haconfd's log, which never blocks: an HAProxy that inherited a
        // stderr nobody reads wedged on a full pipe, and stopped answering its own soft stop.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    super::children::spawn(&mut cmd).map(forward_output)
}

/// Reads the child's stdout and stderr line by line into the log until it closes them.
fn forward_output(mut child: Child) -> Child {
    fn forward(stream: impl tokio::io::AsyncRead + Unpin + Send + 'static) {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
        /// A longer line is cut: HAProxy's are far shorter.
        const MAX_LINE: u64 = 8 * 1024;
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            loop {
                line.clear();
                match (&mut reader)
                    .take(MAX_LINE)
                    .read_until(b'\n', &mut line)
                    .await
                {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim_end();
                        if !text.is_empty() {
                            tracing::info!(target: "haproxy", "{text}");
                        }
                    }
                }
            }
        });
    }
    if let Some(out) = child.stdout.take() {
        forward(out);
    }
    if let Some(err) = child.stderr.take() {
        forward(err);
    }
    child
}

/// Starts a master again after one died: adopts one that answers meanwhile (someone started
/// it on this socket and this file), stops one that cannot be adopted, else spawns.
async fn relaunch(spec: &Spec) -> Master {
    match look(spec).await {
        Found::Adoptable(id) => {
            tracing::warn!(
                pid = id.pid,
                "an HAProxy master of this node answers on the master socket; adopting it"
            );
            return Master::Adopted(id);
        }
        Found::Refuse(why) => return Master::Failed(why),
        Found::Replace(id, why) => retire(id, &why).await,
        Found::Nothing => {}
    }
    match spawn(spec) {
        Ok(c) => {
            tracing::info!(
                pid = c.id(),
                config = %spec.config.display(),
                restarts = spec.restarts.get(),
                "haproxy restarted on the installed config"
            );
            Master::Child(c)
        }
        Err(e) => Master::Failed(format!("cannot start {}: {e}", spec.binary)),
    }
}

impl Supervisor {
    /// Starts HAProxy and waits until its master answers with a worker, or adopts the master
    /// of this node that already answers on the master socket (an earlier haconfd was killed
    /// and its HAProxy lived on): [`Supervisor::adopted`] says which, and an adopted master
    /// still runs the file it last loaded. `stop` is how it will be stopped; once a stop was
    /// asked for, nothing starts.
    pub async fn start(
        spec: Spec,
        ready_timeout: Duration,
        stop: Stopper,
    ) -> Result<Supervisor, String> {
        if stop.state() != Stop::Run {
            return Err("haconfd is stopping: HAProxy is not started".into());
        }
        // Subscribed before the start, so that a stop asked for meanwhile is seen.
        let stop_rx = stop.0.subscribe();
        match look(&spec).await {
            Found::Adoptable(id) => {
                tracing::warn!(
                    pid = id.pid,
                    socket = %spec.master_socket.display(),
                    "adopting the HAProxy an earlier haconfd left running (its master answers on the master socket) instead of starting a second one"
                );
                let task = tokio::spawn(watch_master(spec, Master::Adopted(id), stop_rx));
                return Ok(Supervisor {
                    stop,
                    task,
                    adopted: Some(id.pid),
                });
            }
            Found::Refuse(why) => return Err(why),
            Found::Replace(id, why) => retire(id, &why).await,
            Found::Nothing => {}
        }
        let mut child = spawn(&spec).map_err(|e| format!("cannot start {}: {e}", spec.binary))?;
        // An HAProxy that exits at once (an FD limit below its server count, a port in use)
        // fails the start now, not after `ready_timeout`.
        let ready = tokio::select! {
            r = master::wait_ready(&spec.master_socket, ready_timeout) => r.map_err(|e| e.to_string()),
            status = child.wait() => Err(match status {
                Ok(s) => format!(
                    "haproxy exited ({s}) before its master answered; its own messages (ALERT lines) are above in this log"
                ),
                Err(e) => format!("cannot wait for haproxy: {e}"),
            }),
        };
        if let Err(e) = ready {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(format!("HAProxy did not come up: {e}"));
        }
        tracing::info!(pid = child.id(), config = %spec.config.display(), "haproxy started");
        let task = tokio::spawn(watch_master(spec, Master::Child(child), stop_rx));
        Ok(Supervisor {
            stop,
            task,
            adopted: None,
        })
    }

    /// The master's PID when it was adopted rather than started.
    pub fn adopted(&self) -> Option<u32> {
        self.adopted
    }

    /// Stops HAProxy gracefully (unless a hard stop was asked for) and waits for the
    /// supervising task.
    pub async fn stop(self) {
        self.stop.soft();
        let _ = self.task.await;
    }
}

/// Resolves once any stop is asked for, or when no one can ask any more.
async fn stopping(stop: &mut watch::Receiver<Stop>) {
    let _ = stop.wait_for(|s| *s != Stop::Run).await;
}

/// Resolves once a hard stop is asked for; never when no one can ask any more.
async fn forced(stop: &mut watch::Receiver<Stop>) {
    if stop.wait_for(|s| *s == Stop::Hard).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves once the master socket has answered for [`WORKERLESS_POLLS`] polls in a row that
/// master `pid` has no worker. A socket that does not answer (the master re-executing for a
/// reload) proves nothing either way.
async fn workerless(spec: &Spec, pid: u32, every: Duration) {
    let mut seen = 0;
    loop {
        tokio::time::sleep(every).await;
        match master::show_proc(&spec.master_socket, PROBE_TIMEOUT).await {
            Ok(info) if info.master_pid == pid && info.workers == 0 => seen += 1,
            _ => seen = 0,
        }
        if seen >= WORKERLESS_POLLS {
            return;
        }
    }
}

/// Waits until the master is gone, or useless (no worker, which it is then stopped for); says
/// what happened.
async fn gone(master: &mut Master, spec: &Spec) -> String {
    let pid = master.pid().unwrap_or_default();
    match master {
        Master::Child(child) => {
            tokio::select! {
                status = child.wait() => {
                    return status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                }
                () = workerless(spec, pid, WORKER_POLL) => {}
            }
        }
        Master::Adopted(id) => {
            let id = *id;
            let dead = async {
                while id.alive() {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
            };
            tokio::select! {
                () = dead => {
                    // Its parent (whoever inherited it) collects the exit status.
                    return "the adopted master exited".into();
                }
                () = workerless(spec, pid, WORKER_POLL) => {}
            }
        }
        Master::Failed(why) => return why.clone(),
    }
    tracing::error!(
        pid,
        "the haproxy master answers without a worker: nothing serves; stopping it"
    );
    master.signal(Signal::SIGTERM);
    if !master.exited_within(HARD_STOP_GRACE).await {
        master.kill_and_reap().await;
    }
    "its master had no worker left".into()
}

async fn watch_master(spec: Spec, mut master: Master, mut stop: watch::Receiver<Stop>) {
    // The first restart is immediate: the node serves nothing until it is done. A master that
    // keeps dying is started again after 0.5 s, 1 s, … up to 30 s.
    let mut backoff = Duration::ZERO;
    loop {
        let started = Instant::now();
        // Read now: a reaped child no longer has one.
        let pid = master.pid();
        tokio::select! {
            why = gone(&mut master, &spec) => {
                if !matches!(master, Master::Failed(_)) {
                    spec.restarts.inc();
                }
                if started.elapsed() > STABLE_AFTER {
                    backoff = Duration::ZERO;
                }
                tracing::error!(
                    pid,
                    status = %why,
                    retry_in = ?backoff,
                    "haproxy exited; restarting it on the installed config"
                );
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopping(&mut stop) => return,
                }
                backoff = (backoff * 2)
                    .max(Duration::from_millis(500))
                    .min(Duration::from_secs(30));
                master = relaunch(&spec).await;
                if let Master::Failed(why) = &master {
                    tracing::error!(error = %why, "cannot restart haproxy");
                }
            }
            _ = stopping(&mut stop) => {
                stop_master(&mut master, spec.stop_grace, &mut stop).await;
                return;
            }
        }
    }
}

async fn stop_master(master: &mut Master, grace: Duration, stop: &mut watch::Receiver<Stop>) {
    let Some(pid) = master.pid() else { return };
    let hard = *stop.borrow() == Stop::Hard;
    if !hard {
        // SIGUSR1 asks the master for a soft stop: workers finish their connections, then exit.
        master.signal(Signal::SIGUSR1);
        tracing::info!(
            pid,
            ?grace,
            "haproxy soft stop: connections drain (a second SIGTERM or SIGINT stops it at once)"
        );
        tokio::select! {
            done = master.exited_within(grace) => {
                if done {
                    tracing::info!(pid, "haproxy stopped");
                } else {
                    tracing::warn!(pid, ?grace, "haproxy did not stop in time; killing it");
                    master.kill_and_reap().await;
                }
                return;
            }
            () = forced(stop) => {}
        }
    }
    // SIGTERM asks the master for a hard stop: it stops every worker, old ones too, at once.
    tracing::warn!(
        pid,
        "forced stop: haproxy hard stop (SIGTERM); open connections are cut"
    );
    master.signal(Signal::SIGTERM);
    if master.exited_within(HARD_STOP_GRACE).await {
        tracing::info!(pid, "haproxy stopped (forced)");
    } else {
        tracing::warn!(pid, grace = ?HARD_STOP_GRACE, "haproxy did not stop after SIGTERM; killing it");
        master.kill_and_reap().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_request_only_escalates() {
        let s = Stopper::default();
        let other = s.clone();
        assert_eq!(s.state(), Stop::Run);
        s.soft();
        assert_eq!(other.state(), Stop::Soft);
        other.hard();
        s.soft();
        assert_eq!(s.state(), Stop::Hard, "a soft stop never undoes a hard one");
    }

    #[tokio::test]
    async fn nothing_starts_once_a_stop_was_asked_for() {
        let s = Stopper::default();
        s.hard();
        let spec = Spec {
            // Never run: the stop is checked first.
            binary: "/nonexistent/haproxy".into(),
            master_socket: "/nonexistent/master.sock".into(),
            config: "/nonexistent/haproxy.cfg".into(),
            stop_grace: Duration::from_secs(1),
            state_file: None,
            restarts: Counter::default(),
        };
        let e = Supervisor::start(spec, Duration::from_secs(1), s)
            .await
            .err()
            .expect("refused");
        assert!(e.contains("stopping"), "{e}");
    }
}
