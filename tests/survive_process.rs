//! The process's own environment fails (issue 11): the user is out of inotify instances, and
//! haconfd runs as PID 1 with a reload command that leaves orphans behind.
//!
//! Each case drives a file-source `haconfd run` and edits its registry. Two cases need root
//! (switching to a dedicated user, a PID namespace): they are `#[ignore = "needs root"]` (the
//! root-only policy of tests/common/mod.rs), so `cargo test` lists them as ignored, and
//! `cargo test -- --ignored` runs them where root exists (CI does); run without root, they fail.

mod common;

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::haproxy::{Daemon, Opts, Workspace, serves, signal};
use common::{haconfd_bin, wait_exit, wait_for};

/// Generous bounds: they only cap a failing test, the tests never wait them out when passing.
const SETTLE: Duration = Duration::from_secs(30);
/// What haconfd warns once when it polls instead of watching with inotify.
const POLLING: &str = "cannot watch files with inotify";

fn registry(instances: &[(&str, u16)]) -> String {
    let mut text = String::from("services:\n  web:\n");
    for (id, port) in instances {
        text.push_str(&format!("    {id}: \"127.0.0.1:{port}\"\n"));
    }
    text
}

/// A metric's value from the daemon's `/metrics`, if it answers and has it.
fn metric(ws: &Workspace, name: &str) -> Option<f64> {
    ws.admin()?.metric(name)
}

/// A process's state letter and parent PID from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.next()?.parse().ok()?))
}

/// The children of `parent` (host PIDs), with their state and command name.
fn children(parent: u32) -> Vec<(u32, char, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (state, ppid) = stat(pid)?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (ppid == parent).then(|| (pid, state, comm.trim().to_owned()))
        })
        .collect()
}

fn zombies(parent: u32) -> Vec<(u32, char, String)> {
    children(parent)
        .into_iter()
        .filter(|(_, state, _)| *state == 'Z')
        .collect()
}

/// Waits (bounded) until `parent` has no zombie child; fails naming the ones that stay.
fn no_zombies_under(parent: u32) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let z = zombies(parent);
        if z.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "zombie children of haconfd ({parent}) stay for {SETTLE:?}: {z:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A workspace whose `[haproxy]` reloads with `sh -c SCRIPT`.
fn command_workspace(script: &str) -> Workspace {
    let ws = Workspace::new("yaml");
    ws.write_registry(registry(&[("w1", 8081)]));
    let text = ws
        .config_text(&Opts {
            mode: "command",
            ..Opts::default()
        })
        .replace(
            "[haproxy]\n",
            &format!("[haproxy]\nreload_cmd = [\"sh\", \"-c\", {script:?}]\n"),
        );
    std::fs::write(&ws.config, text).expect("write config");
    ws
}

/// Edits the registry `n` times, each edit applied (rendered into dest) before the next.
fn edit_and_wait(ws: &Workspace, n: u16) {
    for i in 2..2 + n {
        let id = format!("w{i}");
        ws.write_registry(registry(&[(&id, 8080 + i)]));
        wait_for(SETTLE, &format!("edit {i} to be applied"), || {
            ws.dest_text()
                .filter(|t| serves(t, &id, &format!("127.0.0.1:{}", 8080 + i)))
        });
    }
}

/// A reload command that double-forks (`(sleep &)`: the subshell exits at once, its child
/// lives on) leaves an orphan per reload. Where haconfd is PID 1 (a container started without
/// tini), every orphan in the container becomes its child, and an orphan that exits stays a
/// zombie until its parent reaps it. haconfd reaps them, and its own children still report
/// their exit status to it: every reload succeeds.
#[test]
#[ignore = "needs root"]
fn a_reload_commands_orphans_are_reaped_when_haconfd_is_pid_1() {
    common::needs_root("running haconfd as PID 1 of a PID namespace");
    const RELOADS: u16 = 5;
    let ws = command_workspace("(sleep 0.3 </dev/null >/dev/null 2>&1 &); exit 0");
    let log = ws.path("haconfd.log");
    // `--kill-child`: if this test fails before it stops haconfd, unshare's end takes it along.
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM"])
        .arg(haconfd_bin())
        .arg("run")
        .arg("--config")
        .arg(&ws.config)
        .env_remove("HACONFD_CONFIG")
        .env("HACONFD_LOG", "info,haconfd::haproxy::children=debug")
        .current_dir(ws.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("create log"))
        .spawn()
        .expect("run unshare (util-linux)");
    let mut daemon = Daemon { child, log };
    let unshare = daemon.pid();
    // haconfd's PID on this side of the namespace: the one child of unshare.
    let haconfd = wait_for(SETTLE, "haconfd to start under unshare", || {
        children(unshare).first().map(|(pid, _, _)| *pid)
    });
    let status = std::fs::read_to_string(format!("/proc/{haconfd}/status")).expect("status");
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        nspid.split_whitespace().last() == Some("1"),
        "haconfd is not PID 1 of its namespace: {nspid}"
    );

    wait_for(SETTLE, "the first apply", || {
        ws.dest_text().filter(|t| serves(t, "w1", "127.0.0.1:8081"))
    });
    edit_and_wait(&ws, RELOADS);

    // Each reload's grandchild sleeps 0.3 s, exits, and must not stay a zombie.
    let started = Instant::now();
    no_zombies_under(haconfd);
    eprintln!(
        "no zombie left {:?} after the last apply",
        started.elapsed()
    );
    wait_for(SETTLE, "every orphan counted as reaped", || {
        (metric(&ws, "haconfd_orphans_reaped_total")? >= f64::from(RELOADS)).then_some(())
    });
    // Its own children kept their exit statuses: no reload failed.
    assert_eq!(
        metric(&ws, "haconfd_reload_failures_total"),
        Some(0.0),
        "{}",
        daemon.log_text()
    );
    let text = daemon.log_text();
    assert!(!text.contains("apply failed"), "{text}");
    assert!(text.contains("reaped an orphaned process"), "{text}");

    // SIGTERM to haconfd itself; unshare exits with its status.
    signal(haconfd, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        wait_exit(&mut daemon.child, SETTLE),
        Some(0),
        "{}",
        daemon.log_text()
    );
}

/// haconfd that is not PID 1 still takes its reload command's orphans back (it is a child
/// subreaper): they neither pile up on the host's init nor stay zombies. Needs no root.
#[test]
fn a_reload_commands_orphans_come_back_to_haconfd_and_are_reaped() {
    let ws = command_workspace("(sleep 2 </dev/null >/dev/null 2>&1 &); exit 0");
    let mut daemon = ws.spawn_run();
    let haconfd = daemon.pid();
    wait_for(SETTLE, "the first apply", || {
        ws.dest_text().filter(|t| serves(t, "w1", "127.0.0.1:8081"))
    });
    // The orphaned `sleep` is re-parented to haconfd, not to init.
    wait_for(SETTLE, "an orphaned sleep under haconfd", || {
        children(haconfd)
            .into_iter()
            .find(|(_, state, comm)| comm == "sleep" && *state != 'Z')
    });
    edit_and_wait(&ws, 2);
    wait_for(SETTLE, "the orphaned sleeps to exit", || {
        children(haconfd)
            .iter()
            .all(|(_, state, comm)| comm != "sleep" || *state == 'Z')
            .then_some(())
    });
    no_zombies_under(haconfd);
    wait_for(SETTLE, "every orphan counted as reaped", || {
        (metric(&ws, "haconfd_orphans_reaped_total")? >= 3.0).then_some(())
    });
    assert_eq!(
        metric(&ws, "haconfd_reload_failures_total"),
        Some(0.0),
        "{}",
        daemon.log_text()
    );
    assert_eq!(daemon.terminate(SETTLE), Some(0), "{}", daemon.log_text());
}

/// A uid no process runs as (real or effective), to be used up by this test alone.
fn unused_uid() -> u32 {
    let mut used = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(text) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        if let Some(line) = text.lines().find(|l| l.starts_with("Uid:")) {
            used.extend(
                line.split_whitespace()
                    .skip(1)
                    .filter_map(|u| u.parse::<u32>().ok()),
            );
        }
    }
    // Far above the ranges distributions hand out; spread by PID against parallel runs.
    let base = 3_000_000 + (std::process::id() % 100_000) * 10;
    (base..base + 10)
        .find(|u| !used.contains(u))
        .expect("a free uid")
}

fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).expect("chown");
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("read dir").flatten() {
            chown_tree(&e.path(), uid);
        }
    }
}

/// Holds every inotify instance its user may have, until dropped (killed by PID).
struct Hog(Child);

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Opens inotify instances until the kernel refuses, reports how many and why into its
/// output file, and sleeps (bounded: the test kills it long before).
const HOG: &str = r#"
import ctypes, os, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
libc = ctypes.CDLL(None, use_errno=True)
n = 0
while True:
    if libc.inotify_init1(0) < 0:
        err = ctypes.get_errno()
        break
    n += 1
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write("%d %s\n" % (n, os.strerror(err)))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"#;

/// Out of inotify instances (128 per user by default, used up by other watchers on a busy
/// host), `haconfd run` still starts: it polls its files, warns once with the fix, says so in
/// a metric, and applies every edit. Only one dedicated uid is used up; the system-wide limit
/// is never touched.
#[test]
#[ignore = "needs root"]
fn out_of_inotify_instances_it_polls_and_still_applies() {
    common::needs_root("using up the inotify instances of a dedicated user");
    let uid = unused_uid();
    let mut ws = Workspace::new("yaml");
    ws.set_template(&Workspace::default_template());
    ws.write_registry(registry(&[("w1", 8081)]));
    ws.write_config(&Opts::default());
    std::fs::write(ws.path("hog.py"), HOG).expect("write hog");
    chown_tree(ws.dir.path(), uid);

    // python3 from the system (install-deps): a shim under /root is not the user's to run.
    let report = ws.path("hog.out");
    let hog = Hog(Command::new("/usr/bin/python3")
        .arg(ws.path("hog.py"))
        .arg(&report)
        .uid(uid)
        .gid(uid)
        .stdin(Stdio::null())
        .spawn()
        .expect("run /usr/bin/python3 (scripts/install-deps installs it)"));
    let line = wait_for(SETTLE, "the hog to use up the inotify instances", || {
        std::fs::read_to_string(&report).ok()
    });
    let limit: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .expect("read max_user_instances")
        .trim()
        .parse()
        .expect("a number");
    let held: usize = line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("the hog's count");
    assert_eq!(held, limit, "the hog did not use up the instances: {line}");
    eprintln!("the hog holds {held} inotify instances ({})", line.trim());

    let mut cmd = ws.run_command("info");
    cmd.uid(uid).gid(uid);
    let mut daemon = Daemon::spawn(cmd, ws.path("haconfd.log"));

    wait_for(SETTLE, "the first apply", || {
        if let Ok(Some(status)) = daemon.child.try_wait() {
            panic!("haconfd exited ({status}):\n{}", daemon.log_text());
        }
        ws.dest_text().filter(|t| serves(t, "w1", "127.0.0.1:8081"))
    });
    // Both watches poll: the registry file's, and the template's and config's.
    assert_eq!(
        metric(&ws, "haconfd_file_watch_polling"),
        Some(2.0),
        "{}",
        daemon.log_text()
    );

    // An edit of the registry (a rename over it, as deploy tools write) applies.
    let edited = Instant::now();
    ws.write_registry(registry(&[("w2", 8082)]));
    wait_for(SETTLE, "the registry edit to be applied", || {
        ws.dest_text().filter(|t| serves(t, "w2", "127.0.0.1:8082"))
    });
    eprintln!(
        "registry edit applied {:?} after the write",
        edited.elapsed()
    );
    // A template edit too, through the other polling watch.
    let template = Workspace::default_template();
    ws.write_template(&format!("{template}# polled\n"));
    wait_for(SETTLE, "the template edit to be applied", || {
        ws.dest_text().filter(|t| t.contains("# polled"))
    });

    let text = daemon.log_text();
    assert_eq!(text.matches(POLLING).count(), 1, "warned once:\n{text}");
    assert!(text.contains("fs.inotify.max_user_instances"), "{text}");
    assert_eq!(daemon.terminate(SETTLE), Some(0), "{}", daemon.log_text());
    drop(hog);
}
