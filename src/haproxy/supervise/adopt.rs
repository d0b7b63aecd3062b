//! Adoption: what answers on the master socket before anything starts, and whether this node
//! may take it over. A master that runs with this socket and this config file and has a worker
//! is adopted; one this node started with another file, or without a worker, is retired (soft
//! stop, then hard); one it cannot vouch for is refused, and nothing starts. A process is named
//! by its PID and start time, so a reused PID is never signalled.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::{HARD_STOP_GRACE, PROBE_TIMEOUT, Spec};
use crate::haproxy::master;

/// How a master that cannot be adopted gets to stop softly before it is stopped hard.
const RETIRE_GRACE: Duration = Duration::from_secs(5);

/// One process as `/proc` shows it: its PID and its start time (clock ticks after boot), which
/// together name it even after the PID is reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProcId {
    pub(super) pid: u32,
    start: u64,
    group: u32,
}

impl ProcId {
    /// The live (neither zombie nor dead) process `pid`.
    pub(super) fn of(pid: u32) -> Option<ProcId> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields follow the command name in parentheses, which may itself hold spaces:
        // state (3), ppid, pgrp (5), …, starttime (22).
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if matches!(fields.first(), Some(&("Z" | "X" | "x")) | None) {
            return None;
        }
        Some(ProcId {
            pid,
            group: fields.get(2)?.parse().ok()?,
            start: fields.get(19)?.parse().ok()?,
        })
    }

    /// Whether this very process still lives.
    pub(super) fn alive(&self) -> bool {
        ProcId::of(self.pid).is_some_and(|now| now.start == self.start)
    }

    /// Sends `sig`, only while this very process lives.
    pub(super) fn signal(&self, sig: Signal) {
        if self.alive() {
            let _ = kill(Pid::from_raw(self.pid as i32), sig);
        }
    }

    /// SIGKILL to its process group when it leads one (haconfd starts HAProxy as the leader of
    /// a group of its own, and its workers are in it), else to the process alone.
    pub(super) fn kill_all(&self) {
        if !self.alive() {
            return;
        }
        let pid = Pid::from_raw(self.pid as i32);
        if self.group == self.pid {
            let _ = killpg(pid, Signal::SIGKILL);
        } else {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }

    /// Waits up to `within` for the process to be gone; true when it is.
    pub(super) async fn gone_within(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.alive() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// What answers on the master socket before anything starts.
pub(super) enum Found {
    /// Nothing: no socket, or a socket file no one answers on (removed by [`spawn`]).
    Nothing,
    /// An HAProxy master of this node with a worker: it can be taken over.
    Adoptable(ProcId),
    /// An HAProxy master of this node that must go first, and why.
    Replace(ProcId, String),
    /// Something answers that this process cannot vouch for: nothing starts, and why.
    Refuse(String),
}

/// The argument after `flag` in a command line.
fn arg_after<'a>(args: &'a [&'a [u8]], flag: &str) -> Option<&'a [u8]> {
    let i = args.iter().position(|a| *a == flag.as_bytes())?;
    args.get(i + 1).copied()
}

/// Asks the master socket whether an HAProxy master runs there, and whether it is one this
/// node's haconfd started: its command line names this socket after `-S` and, to be adopted,
/// this config file after `-f` (a master reloads the file it was started with).
pub(super) async fn look(spec: &Spec) -> Found {
    let Ok(info) = master::show_proc(&spec.master_socket, PROBE_TIMEOUT).await else {
        return Found::Nothing;
    };
    let socket = spec.master_socket.display();
    let Some(id) = ProcId::of(info.master_pid) else {
        return Found::Refuse(format!(
            "an HAProxy answers on the master socket {socket} as master PID {pid}, which is not a live process here (another PID namespace?); stop that HAProxy, or give this haconfd a master socket of its own",
            pid = info.master_pid
        ));
    };
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", id.pid)).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = arg_after(&args, "-S").is_some_and(|s| {
        s.split(|b| *b == b',').next() == Some(spec.master_socket.as_os_str().as_bytes())
    });
    if !ours {
        return Found::Refuse(format!(
            "an HAProxy answers on the master socket {socket} as master PID {pid}, but that process was not started with `-S {socket}`; stop it, or give this haconfd a master socket of its own",
            pid = id.pid
        ));
    }
    let config = arg_after(&args, "-f").map(OsStr::from_bytes);
    if config != Some(spec.config.as_os_str()) {
        return Found::Replace(
            id,
            format!(
                "it loads {:?}, not {}",
                config.unwrap_or_default(),
                spec.config.display()
            ),
        );
    }
    if info.workers == 0 {
        return Found::Replace(id, "it has no worker".into());
    }
    Found::Adoptable(id)
}

/// Stops a master this node started earlier but cannot adopt, before its own starts: a soft
/// stop (its workers stop listening at once and finish their connections), bounded, then hard.
pub(super) async fn retire(id: ProcId, why: &str) {
    tracing::warn!(
        pid = id.pid,
        reason = why,
        "an HAProxy from an earlier run answers on the master socket but cannot be adopted; stopping it before starting a new one"
    );
    id.signal(Signal::SIGUSR1);
    if id.gone_within(RETIRE_GRACE).await {
        return;
    }
    id.signal(Signal::SIGTERM);
    if !id.gone_within(HARD_STOP_GRACE).await {
        id.kill_all();
        let _ = id.gone_within(HARD_STOP_GRACE).await;
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;
    use crate::haproxy::supervise::{Stopper, Supervisor};

    #[test]
    fn a_process_is_named_by_pid_and_start_time() {
        let me = ProcId::of(std::process::id()).expect("this process");
        assert!(me.alive());
        let reused = ProcId {
            start: me.start + 1,
            ..me
        };
        assert!(!reused.alive(), "another start time is another process");
        assert_eq!(ProcId::of(u32::MAX), None);
    }

    /// Answers every connection on `path` with a `show proc` naming `pid` as the master.
    fn fake_master(path: &std::path::Path, pid: u32) -> tokio::task::JoinHandle<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::UnixListener::bind(path).expect("bind the fake master socket");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                let answer = format!(
                    "#<PID> <type> <reloads> <uptime> <version>\n{pid} master 0 [failed: 0] 0d00h00m01s 2.6.12\n# workers\n{w} worker 0 0d00h00m01s 2.6.12\n",
                    w = pid + 1
                );
                let _ = s.write_all(answer.as_bytes()).await;
            }
        })
    }

    #[tokio::test]
    async fn a_master_this_node_did_not_start_is_never_adopted_nor_signalled() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = |socket: &str| Spec {
            binary: "/nonexistent/haproxy".into(),
            master_socket: dir.path().join(socket),
            config: dir.path().join("haproxy.cfg"),
            stop_grace: Duration::from_secs(1),
            state_file: None,
            restarts: Counter::default(),
        };
        assert!(matches!(look(&spec("none.sock")).await, Found::Nothing));
        // This test process answers as the master: alive, but not started with `-S`.
        let me = spec("me.sock");
        let server = fake_master(&me.master_socket, std::process::id());
        match look(&me).await {
            Found::Refuse(why) => assert!(why.contains("was not started with `-S"), "{why}"),
            _ => panic!("a process without -S <socket> was taken for this node's master"),
        }
        server.abort();
        // A PID that is not a live process here (another PID namespace).
        let ghost = spec("ghost.sock");
        let server = fake_master(&ghost.master_socket, u32::MAX - 1);
        match look(&ghost).await {
            Found::Refuse(why) => assert!(why.contains("not a live process here"), "{why}"),
            _ => panic!("a PID that does not exist here was taken for this node's master"),
        }
        let e = Supervisor::start(ghost, Duration::from_secs(1), Stopper::default())
            .await
            .err()
            .expect("nothing starts beside a master that cannot be vouched for");
        assert!(e.contains("not a live process here"), "{e}");
        server.abort();
    }

    #[test]
    fn the_argument_after_a_flag() {
        let args: Vec<&[u8]> = vec![b"haproxy", b"-W", b"-S", b"/run/m.sock,mode,600", b"-f"];
        assert_eq!(arg_after(&args, "-S"), Some(&b"/run/m.sock,mode,600"[..]));
        assert_eq!(arg_after(&args, "-f"), None);
        assert_eq!(arg_after(&args, "-x"), None);
    }
}
