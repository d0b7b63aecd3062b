//! Owns an `haproxy -W -S <master_socket>,mode,600 -f <cfg>` child: starts it, restarts it with
//! backoff when it dies, and stops it gracefully (SIGUSR1, soft stop) within a bound, or at once
//! (SIGTERM, hard stop) when the operator insists: a [`Stopper`] carries the request.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::master;

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
}

/// How long a hard-stopped HAProxy gets to exit before its process group is killed.
const HARD_STOP_GRACE: Duration = Duration::from_secs(5);

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
}

fn spawn(spec: &Spec) -> std::io::Result<Child> {
    if let Some(dir) = spec.master_socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A stale socket file from a previous run would make `-S` fail to bind.
    let _ = std::fs::remove_file(&spec.master_socket);
    if let Some(state) = &spec.state_file {
        let _ = std::fs::remove_file(state);
    }
    let mut sock = spec.master_socket.clone().into_os_string();
    sock.push(",mode,600");
    Command::new(&spec.binary)
        .arg("-W")
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
        .kill_on_drop(false)
        .spawn()
}

impl Supervisor {
    /// Starts HAProxy and waits until its master answers with a worker. `stop` is how it will
    /// be stopped; once a stop was asked for, nothing starts.
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
        let task = tokio::spawn(watch_child(spec, child, stop_rx));
        Ok(Supervisor { stop, task })
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

async fn watch_child(spec: Spec, mut child: Child, mut stop: watch::Receiver<Stop>) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        tokio::select! {
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(500);
                }
                tracing::error!(%status, retry_in = ?backoff, "haproxy exited; restarting it");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopping(&mut stop) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                match spawn(&spec) {
                    Ok(c) => {
                        tracing::info!(pid = c.id(), "haproxy restarted");
                        child = c;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot restart haproxy");
                        // Try again after the next backoff, through a child that exits at once.
                        match Command::new("true").spawn() {
                            Ok(c) => child = c,
                            Err(_) => return,
                        }
                    }
                }
            }
            _ = stopping(&mut stop) => {
                stop_child(&mut child, spec.stop_grace, &mut stop).await;
                return;
            }
        }
    }
}

async fn stop_child(child: &mut Child, grace: Duration, stop: &mut watch::Receiver<Stop>) {
    let Some(pid) = child.id() else { return };
    let hard = *stop.borrow() == Stop::Hard;
    if !hard {
        // SIGUSR1 asks the master for a soft stop: workers finish their connections, then exit.
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGUSR1);
        tracing::info!(
            pid,
            ?grace,
            "haproxy soft stop: connections drain (a second SIGTERM or SIGINT stops it at once)"
        );
        tokio::select! {
            done = tokio::time::timeout(grace, child.wait()) => {
                match done {
                    Ok(_) => tracing::info!(pid, "haproxy stopped"),
                    Err(_) => {
                        tracing::warn!(pid, ?grace, "haproxy did not stop in time; killing it");
                        super::kill_group(pid);
                        let _ = child.wait().await;
                    }
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
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    match tokio::time::timeout(HARD_STOP_GRACE, child.wait()).await {
        Ok(_) => tracing::info!(pid, "haproxy stopped (forced)"),
        Err(_) => {
            tracing::warn!(pid, grace = ?HARD_STOP_GRACE, "haproxy did not stop after SIGTERM; killing it");
            super::kill_group(pid);
            let _ = child.wait().await;
        }
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
        };
        let e = Supervisor::start(spec, Duration::from_secs(1), s)
            .await
            .err()
            .expect("refused");
        assert!(e.contains("stopping"), "{e}");
    }
}
