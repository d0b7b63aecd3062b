//! Owns an `haproxy -W -S <master_socket>,mode,600 -f <cfg>` child: starts it, restarts it with
//! backoff when it dies, and stops it gracefully (SIGUSR1, soft stop) within a bound.

use std::path::PathBuf;
use std::process::Stdio;
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

/// A running, supervised HAProxy master.
pub struct Supervisor {
    stop: watch::Sender<bool>,
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
    /// Starts HAProxy and waits until its master answers with a worker.
    pub async fn start(spec: Spec, ready_timeout: Duration) -> Result<Supervisor, String> {
        let mut child = spawn(&spec).map_err(|e| format!("cannot start {}: {e}", spec.binary))?;
        if let Err(e) = master::wait_ready(&spec.master_socket, ready_timeout).await {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(format!("HAProxy did not come up: {e}"));
        }
        tracing::info!(pid = child.id(), config = %spec.config.display(), "haproxy started");
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(watch_child(spec, child, stop_rx));
        Ok(Supervisor { stop, task })
    }

    /// Stops HAProxy gracefully and waits for the supervising task.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn watch_child(spec: Spec, mut child: Child, mut stop: watch::Receiver<bool>) {
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
                    _ = stop.changed() => return,
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
            _ = stop.changed() => {
                stop_child(&mut child, spec.stop_grace).await;
                return;
            }
        }
    }
}

async fn stop_child(child: &mut Child, grace: Duration) {
    let Some(pid) = child.id() else { return };
    // SIGUSR1 asks the master for a soft stop: workers finish their connections, then exit.
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGUSR1);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(_) => tracing::info!(pid, "haproxy stopped"),
        Err(_) => {
            tracing::warn!(pid, ?grace, "haproxy did not stop in time; killing it");
            super::kill_group(pid);
            let _ = child.wait().await;
        }
    }
}
