//! The processes haconfd starts, and the orphans the kernel hands it.
//!
//! `run` reaps orphans: as PID 1 (a container started with another entrypoint than tini) every
//! orphan of the container becomes its child, and as a child subreaper (set by `run`) so does
//! every orphan of its own descendants, such as a reload command's double-forked grandchild.
//! Unreaped, each would stay a zombie for the life of the container.
//!
//! tokio waits for each child it started by its PID, so a reaper that waited for any child
//! would steal their exit statuses (tokio would then see ECHILD, and a `haproxy -c` that passed
//! would count as failed). Every child is therefore started through [`spawn`], which records
//! its PID before anything else can run (the runtime has one thread), and the reaper waits only
//! for zombies whose PID it does not hold.

use std::collections::BTreeSet;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use prometheus_client::metrics::counter::Counter;
use tokio::process::{Child, Command};

/// The children started through [`spawn`] that may not have been waited for yet.
static SPAWNED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// At most this many orphans are reaped per SIGCHLD without looking at `/proc` again; the
/// next SIGCHLD, or the full look, takes the rest.
const MAX_PEEKS: usize = 1024;

fn spawned() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    // A panic ends the process (exit 70), so a poisoned lock is never seen running; its data
    // is a set of PIDs, valid whatever was interrupted.
    SPAWNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts `cmd` and records the child as haconfd's own, for tokio to wait for. Every process
/// haconfd starts goes through here.
pub(crate) fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let child = cmd.spawn()?;
    // No await since the fork: the reaper cannot have run in between.
    if let Some(pid) = child.id() {
        spawned().insert(pid as i32);
    }
    Ok(child)
}

/// Makes `run` reap orphans: sets this process as child subreaper (Linux), then reaps the
/// orphans it holds now and after every SIGCHLD, counting them on `reaped`. Call once, before
/// the first process is started.
pub fn reap_orphans(reaped: Counter) {
    match nix::sys::prctl::set_child_subreaper(true) {
        Ok(()) => tracing::debug!("child subreaper: orphans of haconfd's children come back to it"),
        Err(e) => tracing::debug!(error = %e, "cannot become child subreaper"),
    }
    let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGCHLD; orphaned processes will not be reaped");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            // tokio's own waits run first when they are ready: fewer of its zombies to skip.
            tokio::task::yield_now().await;
            let n = reap_once();
            if n > 0 {
                reaped.inc_by(n as u64);
            }
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
}

/// Reaps the zombie children haconfd did not start itself; how many.
fn reap_once() -> usize {
    forget_waited();
    let mut n = 0;
    // The kernel names the first zombie child: cheap, and usually all there is.
    for _ in 0..MAX_PEEKS {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        let Some(pid) = waitid(Id::All, flags).ok().and_then(|s| s.pid()) else {
            // No zombie (StillAlive), or no child at all (ECHILD).
            return n;
        };
        if spawned().contains(&pid.as_raw()) {
            // One of tokio's heads the list: look at all of them.
            break;
        }
        if !reap(pid) {
            return n;
        }
        n += 1;
    }
    for pid in zombie_children() {
        if !spawned().contains(&pid) && reap(Pid::from_raw(pid)) {
            n += 1;
        }
    }
    n
}

/// Waits for one zombie that haconfd did not start; whether it was reaped.
fn reap(pid: Pid) -> bool {
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) | Err(_) => false,
        Ok(status) => {
            tracing::debug!(pid = pid.as_raw(), status = ?status, "reaped an orphaned process");
            true
        }
    }
}

/// Drops the recorded children tokio has waited for: they are no longer children at all.
fn forget_waited() {
    spawned().retain(|&pid| {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        waitid(Id::Pid(Pid::from_raw(pid)), flags) != Err(Errno::ECHILD)
    });
}

/// The PIDs of this process's zombie children, from `/proc/self/task/*/children` where the
/// kernel has it, else from every `/proc/<pid>/stat`.
fn zombie_children() -> Vec<i32> {
    let me = std::process::id() as i32;
    let zombie =
        |pid: i32| stat_fields(pid).is_some_and(|(state, ppid)| state == 'Z' && ppid == me);
    if let Some(children) = task_children() {
        return children.into_iter().filter(|&p| zombie(p)).collect();
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| zombie(p))
        .collect()
}

/// The children of every thread of this process, or None when the kernel has no `children`
/// file (CONFIG_PROC_CHILDREN).
fn task_children() -> Option<Vec<i32>> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let text = std::fs::read_to_string(task.ok()?.path().join("children")).ok()?;
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    Some(out)
}

/// A process's state letter and parent PID from `/proc/<pid>/stat`.
fn stat_fields(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name in parentheses may hold spaces and parentheses itself.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the process the test below starts to do the work alone.
    const ALONE: &str = "HACONFD_CHILDREN_TEST_ALONE";

    /// A zombie haconfd started itself stays for tokio, which gets its exit status; a zombie
    /// started behind the registry's back is reaped. Reaping takes any child of the process,
    /// so the work runs in a process of its own (this test binary again, this test only):
    /// here it would take the children of the unit tests that run beside it.
    #[test]
    fn the_reaper_leaves_haconfds_own_children_to_tokio() {
        if std::env::var_os(ALONE).is_some() {
            return alone();
        }
        let name = "haproxy::children::tests::the_reaper_leaves_haconfds_own_children_to_tokio";
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", name, "--test-threads=1", "--nocapture"])
            .env(ALONE, "1")
            .output()
            .expect("run the test alone");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn alone() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut own = spawn(Command::new("sh").args(["-c", "exit 3"])).expect("spawn sh");
            // The reaper waits for it, not this handle.
            #[allow(clippy::zombie_processes)]
            let stray = std::process::Command::new("sh")
                .args(["-c", "exit 0"])
                .spawn()
                .expect("spawn a stray");
            // Both are zombies now, and tokio has not looked at its own yet (no await ran).
            std::thread::sleep(std::time::Duration::from_millis(300));
            let own_pid = own.id().expect("running") as i32;
            assert_eq!(stat_fields(own_pid).map(|s| s.0), Some('Z'));
            assert_eq!(reap_once(), 1, "exactly the stray is reaped");
            assert_eq!(stat_fields(stray.id() as i32), None, "the stray is gone");
            let status = own.wait().await.expect("tokio waits for its own child");
            assert_eq!(status.code(), Some(3));
            assert_eq!(reap_once(), 0);
            assert!(spawned().is_empty(), "a waited child is forgotten");
        });
    }

    #[test]
    fn stat_fields_read_past_a_command_name_with_parentheses() {
        let me = std::process::id() as i32;
        let (state, ppid) = stat_fields(me).expect("own stat");
        assert!(state == 'R' || state == 'S', "{state}");
        assert_eq!(ppid, nix::unistd::getppid().as_raw());
        assert_eq!(stat_fields(-1), None);
    }
}
