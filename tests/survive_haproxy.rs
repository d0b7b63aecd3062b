//! HAProxy behind haconfd's back (issue 11, item 4), against the real HAProxy (file source,
//! local HTTP backends, everything on 127.0.0.1 in a temp dir of its own):
//!
//! - supervise: the master is SIGKILLed, or its worker is (HAProxy 2.6's master then exits
//!   too): HAProxy is started again at once on the installed file, which is logged and counted
//!   (`haconfd_haproxy_restarts_total`), and later changes apply through the Runtime API and
//!   by reload against the new master;
//! - master: the HAProxy under its own supervisor restarts (a new master PID, its reload
//!   counter at 0) and loads a server state file older than the Runtime API changes: haconfd
//!   notices within seconds, without a registry change, and sets the servers back to the file;
//! - haconfd is SIGKILLed while its HAProxy lives on, and started again: it adopts that HAProxy
//!   through its master socket, so exactly one master's workers listen on the frontend port (read
//!   from `/proc/net/tcp` and `/proc/<pid>/fd`) and the frontend never stops answering; later
//!   changes apply, an adopted master that dies is replaced, and SIGTERM stops it softly.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::haproxy::{
    Backend, Inst, Opts, PidGuard, Workspace, at, cli_command, http_get, master_pid, pid_alive,
    signal,
};
use common::lb::Lb;
use common::wait_for;
use haconfd::haproxy::master::parse_show_proc;
use nix::sys::signal::Signal;

/// Generous bounds: they only cap a failing test, a passing test never waits them out.
const SETTLE: Duration = Duration::from_secs(30);

/// How soon `master` mode must notice a restart: its look every 2 s, plus the realignment.
const NOTICE: Duration = Duration::from_secs(10);

/// A registry file with these services.
fn registry(services: &[(&str, &[Inst])]) -> String {
    common::haproxy::registry(services, "")
}

/// The PIDs holding a socket that listens on 127.0.0.1:`port`: the inodes of `/proc/net/tcp`'s
/// LISTEN lines for the port, matched against every process's `/proc/<pid>/fd` links.
fn listeners(port: u16) -> BTreeSet<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let local = format!("0100007F:{port:04X}");
    let inodes: BTreeSet<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let f: Vec<&str> = l.split_whitespace().collect();
            let inode = f.get(9)?;
            (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| format!("socket:[{inode}]"))
        })
        .collect();
    let mut pids = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path())
                .is_ok_and(|l| inodes.contains(l.to_string_lossy().as_ref()))
            {
                pids.insert(pid);
                break;
            }
        }
    }
    pids
}

/// A field of `/proc/<pid>/status`.
fn status_field(pid: u32, name: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_owned())
}

/// The HAProxy master a listening process belongs to: its parent when that is an HAProxy (a
/// worker), else itself.
fn master_of(pid: u32) -> u32 {
    let Some(ppid) = status_field(pid, "PPid:").and_then(|p| p.parse::<u32>().ok()) else {
        return pid;
    };
    if status_field(ppid, "Name:").as_deref() == Some("haproxy") {
        ppid
    } else {
        pid
    }
}

/// The HAProxy masters whose processes listen on the frontend port.
fn listening_masters(port: u16) -> BTreeSet<u32> {
    listeners(port).into_iter().map(master_of).collect()
}

/// Sends a request every 10 ms from its own thread until stopped, and counts what went wrong.
struct Probe {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ProbeReport>>,
}

/// What a [`Probe`] saw.
#[derive(Debug, Default)]
struct ProbeReport {
    sent: usize,
    failed: usize,
    /// The longest time between two answered requests with failures between them.
    longest_outage: Duration,
    first_error: Option<String>,
}

impl Probe {
    fn start(port: u16, host: &'static str) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut report = ProbeReport::default();
            let mut last_ok = Instant::now();
            let mut failing = false;
            while !flag.load(Ordering::SeqCst) {
                report.sent += 1;
                match http_get(port, host, "/") {
                    Ok(r) if r.status == 200 => {
                        if failing {
                            report.longest_outage = report.longest_outage.max(last_ok.elapsed());
                            failing = false;
                        }
                        last_ok = Instant::now();
                    }
                    other => {
                        report.failed += 1;
                        failing = true;
                        report
                            .first_error
                            .get_or_insert_with(|| format!("{other:?}"));
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if failing {
                report.longest_outage = report.longest_outage.max(last_ok.elapsed());
            }
            report
        });
        Probe {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> ProbeReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("joined once")
            .join()
            .expect("the probe thread")
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// After a restart of HAProxy (the node's first reload and first Runtime API change are
/// behind it, with web on `c` and api on `b`): web moves back to `a` through the Runtime API,
/// then a new service on `c` comes by reload, and both are served.
fn later_changes_apply(node: &Lb, a: &Backend, b: &Backend, c: &Backend) {
    node.ws
        .write_registry(registry(&[("web", &[at("a", a)]), ("api", &[at("b", b)])]));
    node.wait_applied("runtime", 2);
    node.reach("web", "backend-A");
    node.assert_agree("be_web");
    node.ws.write_registry(registry(&[
        ("web", &[at("a", a)]),
        ("api", &[at("b", b)]),
        ("new", &[at("n", c)]),
    ]));
    node.wait_applied("reload", 2);
    node.reach("new", "backend-C");
}

/// Kills the supervised HAProxy (`victim` picks the process from the first master and its
/// workers), and checks that haconfd serves the last good config again from a new master,
/// logs and counts it, and that later changes apply against that master.
fn survives_a_sigkill(victim: impl Fn(u32, &[u32]) -> u32, what: &str) {
    let (a, b, c) = Backend::abc();
    let mut node = Lb::serving_web(&a, Opts::default());
    // A reload (which saves the server state), then a Runtime API move of web's instance: the
    // last good config is the installed file, and no older state may come back over it.
    node.ws.write_registry(registry(&[
        ("web", &[at("a", &a)]),
        ("api", &[at("b", &b)]),
    ]));
    node.wait_applied("reload", 1);
    node.ws.write_registry(registry(&[
        ("web", &[at("a", &c)]),
        ("api", &[at("b", &b)]),
    ]));
    node.wait_applied("runtime", 1);
    node.reach("web", "backend-C");
    let first = node.proc().expect("show proc").master_pid;
    let workers = node.workers();
    assert!(!workers.is_empty());
    let restarts = node.metric("haconfd_haproxy_restarts_total").unwrap_or(0.0);

    let probe = Probe::start(node.port(), "web");
    std::thread::sleep(Duration::from_millis(200));
    let killed = victim(first, &workers);
    let t0 = Instant::now();
    signal(killed, Signal::SIGKILL);
    let second = wait_for(SETTLE, "a new master", || {
        master_pid(&node.ws.master_socket()).filter(|p| *p != first)
    });
    node.masters.push(PidGuard(Some(second)));
    wait_for(SETTLE, "the new master's worker", || {
        node.proc().filter(|p| p.workers > 0)
    });
    node.reach("web", "backend-C");
    let served_again = t0.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    let report = probe.finish();
    eprintln!(
        "{what}: served again {served_again:?} after the SIGKILL; probe: {report:?} ({} ms longest outage)",
        report.longest_outage.as_millis()
    );
    assert!(
        served_again < Duration::from_secs(5),
        "{what}: {served_again:?}"
    );
    // The last good config, not an older state: the file and HAProxy agree.
    node.assert_agree("be_web");
    node.assert_agree("be_api");
    assert_eq!(
        node.metric("haconfd_haproxy_restarts_total"),
        Some(restarts + 1.0),
        "the restart is not counted"
    );
    assert!(
        node.log().contains("haproxy exited; restarting it"),
        "{}",
        node.log()
    );
    node.wait_log(SETTLE, "haproxy restarted on the installed config");
    wait_for(SETTLE, "the killed processes to exit", || {
        (!pid_alive(first) && workers.iter().all(|w| !pid_alive(*w))).then_some(())
    });

    // Later changes apply against the new master: through the Runtime API, then by reload.
    later_changes_apply(&node, &a, &b, &c);
    let info = node.proc().expect("show proc after the reload");
    assert_eq!((info.master_pid, info.reloads, info.failed), (second, 1, 0));
    assert_eq!(node.daemon.terminate(SETTLE * 2), Some(0), "{}", node.log());
    wait_for(SETTLE, "the second master to exit", || {
        (!pid_alive(second)).then_some(())
    });
}

#[test]
fn a_sigkilled_master_is_restarted_on_the_last_good_config_logged_and_counted() {
    survives_a_sigkill(|master, _| master, "master SIGKILL");
}

#[test]
fn a_sigkilled_worker_is_replaced_on_the_last_good_config_logged_and_counted() {
    // HAProxy 2.6's master exits when its current worker dies (exit-on-failure), so this is a
    // restart of the whole HAProxy too.
    survives_a_sigkill(|_, workers| workers[0], "worker SIGKILL");
}

/// An `haproxy -W -S` that the test runs as its supervisor would, in its own process group,
/// ended by its PID on drop.
struct Supervised {
    child: Child,
}

impl Supervised {
    fn start(ws: &Workspace) -> Supervised {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(ws.path("haproxy.log"))
            .expect("open the HAProxy log");
        let mut sock = ws.master_socket().into_os_string();
        sock.push(",mode,600");
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new("haproxy")
                .arg("-W")
                .arg("-S")
                .arg(sock)
                .arg("-f")
                .arg(&ws.dest)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .process_group(0)
                .spawn()
                .expect("start haproxy")
        };
        let pid = child.id();
        let me = Supervised { child };
        wait_for(SETTLE, "the HAProxy the test started", || {
            parse_show_proc(&cli_command(&ws.master_socket(), "show proc")?)
                .filter(|p| p.master_pid == pid && p.workers > 0)
        });
        me
    }

    /// Stops it as a supervisor does (SIGTERM: a hard stop) and reaps it.
    fn stop(&mut self) {
        signal(self.child.id(), Signal::SIGTERM);
        if common::wait_exit(&mut self.child, SETTLE).is_none() && pid_alive(self.child.id()) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

#[test]
fn master_mode_notices_a_restart_by_haproxys_own_supervisor_and_realigns_its_servers() {
    let (a, b, c) = Backend::abc();
    let ws = Workspace::new("yaml");
    ws.write_registry(registry(&[("web", &[at("a", &a)])]));
    // The first file, rendered once without HAProxy, for HAProxy's own supervisor to start.
    ws.write_config(&Opts::default());
    let out = ws.haconfd(&["render"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::create_dir_all(ws.path("run")).expect("create the run dir");
    let mut haproxy = Supervised::start(&ws);
    let first = haproxy.child.id();

    ws.write_config(&Opts {
        mode: "master",
        ..Opts::default()
    });
    let daemon = ws.spawn_run();
    let node = Lb::attach(ws, daemon);
    node.wait_applied("none", 1);
    node.reach("web", "backend-A");
    // A reload saves the server state; a Runtime API move of web's instance follows.
    node.ws.write_registry(registry(&[
        ("web", &[at("a", &a)]),
        ("api", &[at("b", &b)]),
    ]));
    node.wait_applied("reload", 1);
    let saved = std::fs::read(node.state_file()).expect("the state saved before the reload");
    node.ws.write_registry(registry(&[
        ("web", &[at("a", &c)]),
        ("api", &[at("b", &b)]),
    ]));
    node.wait_applied("runtime", 1);
    node.reach("web", "backend-C");
    let state_outlived_the_change = node.state_file().exists();
    // The state file as the last reload left it (as haconfd left it before this fix): a
    // restarted HAProxy restores web's old port from it over the file's.
    std::fs::write(node.state_file(), &saved).expect("write the old server state");

    haproxy.stop();
    let t0 = Instant::now();
    let mut haproxy = Supervised::start(&node.ws);
    let second = haproxy.child.id();
    assert_ne!(first, second);
    assert_eq!(node.proc().map(|p| p.reloads), Some(0));
    wait_for(
        NOTICE,
        "the running servers to match the file again",
        || (node.agree("be_web") && node.agree("be_api")).then_some(()),
    );
    let realigned = t0.elapsed();
    node.wait_log(NOTICE, "HAProxy was restarted by its own supervisor");
    // The realignment is an apply of the same state that reloads nothing.
    node.wait_applied("none", 2);
    eprintln!("master mode: restart noticed and servers realigned {realigned:?} after the start");
    node.reach("web", "backend-C");
    assert!(
        (0..8).all(|_| http_get(node.port(), "web", "/").is_ok_and(|r| r.body == "backend-C")),
        "web still reaches an old address"
    );
    assert_eq!(node.metric("haconfd_haproxy_restarts_total"), Some(1.0));

    // haconfd's later changes apply to the restarted HAProxy.
    later_changes_apply(&node, &a, &b, &c);
    assert_eq!(
        node.proc().map(|p| (p.master_pid, p.reloads)),
        Some((second, 1))
    );
    assert!(
        !state_outlived_the_change,
        "the server state file outlived the Runtime API change that made it stale"
    );
    let Lb { mut daemon, .. } = node;
    assert_eq!(daemon.terminate(SETTLE), Some(0), "{}", daemon.log_text());
    haproxy.stop();
}

#[test]
fn a_restarted_haconfd_adopts_the_haproxy_it_left_running_so_there_is_never_a_second() {
    let (a, b, c) = Backend::abc();
    let mut node = Lb::serving_web(&a, Opts::default());
    let orphan = node.proc().expect("show proc").master_pid;
    assert_eq!(listening_masters(node.port()), BTreeSet::from([orphan]));

    // haconfd dies at once (the OOM killer): its HAProxy, in a process group of its own, lives
    // on and keeps serving.
    let probe = Probe::start(node.port(), "web");
    node.daemon.child.kill().expect("SIGKILL haconfd");
    node.daemon.child.wait().expect("reap haconfd");
    std::thread::sleep(Duration::from_millis(300));
    assert!(pid_alive(orphan), "the HAProxy died with haconfd");
    node.reach("web", "backend-A");

    // The registry moves on while no haconfd runs; then haconfd starts again.
    node.ws.write_registry(registry(&[("web", &[at("a", &c)])]));
    node.respawn();
    node.wait_first_apply();
    node.reach("web", "backend-C");
    assert_eq!(
        listening_masters(node.port()),
        BTreeSet::from([orphan]),
        "another HAProxy listens beside the adopted one\n{}",
        node.log()
    );
    assert_eq!(node.proc().map(|p| p.master_pid), Some(orphan));
    node.assert_agree("be_web");
    assert!(
        node.log()
            .contains("adopting the HAProxy an earlier haconfd left running"),
        "{}",
        node.log()
    );

    // A later change is applied and served by the adopted HAProxy.
    node.ws.write_registry(registry(&[
        ("web", &[at("a", &c)]),
        ("api", &[at("b", &b)]),
    ]));
    node.wait_applied("reload", 1);
    node.reach("api", "backend-B");
    assert_eq!(listening_masters(node.port()), BTreeSet::from([orphan]));
    let report = probe.finish();
    eprintln!("haconfd SIGKILLed and started again: probe {report:?}");
    assert_eq!(
        report.failed, 0,
        "the frontend stopped answering: {report:?}"
    );
    assert!(report.sent > 50, "{report:?}");

    // An adopted master is not haconfd's child, yet its death is seen and it is replaced.
    signal(orphan, Signal::SIGKILL);
    let second = wait_for(SETTLE, "a new master", || {
        master_pid(&node.ws.master_socket()).filter(|p| *p != orphan)
    });
    node.masters.push(PidGuard(Some(second)));
    node.reach("api", "backend-B");
    node.reach("web", "backend-C");
    wait_for(SETTLE, "only the new master listening", || {
        (listening_masters(node.port()) == BTreeSet::from([second])).then_some(())
    });
    assert_eq!(node.metric("haconfd_haproxy_restarts_total"), Some(1.0));

    // SIGTERM stops the HAProxy haconfd runs now, and leaves nothing listening.
    assert_eq!(node.daemon.terminate(SETTLE * 2), Some(0), "{}", node.log());
    wait_for(SETTLE, "the master to exit", || {
        (!pid_alive(second)).then_some(())
    });
    assert!(listeners(node.port()).is_empty());
}

/// A server-only change goes to HAProxy ahead of its file (the file follows once changes pause
/// for `[wait] min`). haconfd SIGKILLed inside that window leaves an HAProxy that serves what
/// no file says; the haconfd started next adopts it and reloads it on the installed file, which
/// the registry agrees with again, so no apply follows to set the servers. The reload must not
/// restore the sent-ahead port from the server state file saved just before it (HAProxy takes
/// a server's port from that file over the config's): the save leaves out every server the
/// file it is about to load says otherwise.
#[test]
fn an_adopted_haproxy_that_was_ahead_of_its_file_is_set_back_to_the_file() {
    let (a, b) = (Backend::start("backend-A"), Backend::start("backend-B"));
    let mut node = Lb::serving_web(
        &a,
        Opts {
            mode: "supervise",
            wait: ("20s", "40s"),
            ..Opts::default()
        },
    );
    let orphan = node.proc().expect("show proc").master_pid;
    // The first server-only change proves the template (installed, then sent).
    let weighted = |backend: &Backend| {
        (
            "a",
            format!(
                "'{{\"addr\":\"127.0.0.1:{}\",\"weight\":50}}'",
                backend.port
            ),
        )
    };
    node.ws
        .write_registry(registry(&[("web", &[weighted(&a)])]));
    node.wait_applied("runtime", 1);
    let installed = node.dest();

    // a moves to backend-B: HAProxy serves it at once, its file waits for a pause of 20 s.
    node.ws
        .write_registry(registry(&[("web", &[weighted(&b)])]));
    node.wait_log(SETTLE, "served through the Runtime API; the files follow");
    node.reach("web", "backend-B");
    assert_eq!(node.dest(), installed, "the file did not wait");

    // haconfd dies inside the window; the registry goes back to what the file says.
    node.daemon.child.kill().expect("SIGKILL haconfd");
    node.daemon.child.wait().expect("reap haconfd");
    node.ws
        .write_registry(registry(&[("web", &[weighted(&a)])]));
    node.respawn();
    node.wait_first_apply();
    assert_eq!(node.proc().map(|p| p.master_pid), Some(orphan));
    assert_eq!(node.dest(), installed);
    node.reach("web", "backend-A");
    assert!(
        node.bodies("web", 6).iter().all(|x| x == "backend-A"),
        "the adopted HAProxy still serves what was sent ahead of the file\n{}",
        node.log()
    );
    node.assert_agree("be_web");
    assert_eq!(node.daemon.terminate(SETTLE * 2), Some(0), "{}", node.log());
}

#[test]
fn sigterm_softly_stops_an_adopted_haproxy() {
    let a = Backend::start("backend-A");
    let mut node = Lb::serving_web(&a, Opts::default());
    let orphan = node.proc().expect("show proc").master_pid;
    node.daemon.child.kill().expect("SIGKILL haconfd");
    node.daemon.child.wait().expect("reap haconfd");
    node.respawn();
    node.wait_first_apply();
    assert_eq!(node.proc().map(|p| p.master_pid), Some(orphan));
    assert_eq!(
        listening_masters(node.port()),
        BTreeSet::from([orphan]),
        "{}",
        node.log()
    );
    node.wait_applied("none", 1);
    // The adopted master was reloaded once on the installed file.
    assert_eq!(node.proc().map(|p| p.reloads), Some(1));
    assert_eq!(node.daemon.terminate(SETTLE * 2), Some(0), "{}", node.log());
    wait_for(SETTLE, "the adopted master to exit", || {
        (!pid_alive(orphan)).then_some(())
    });
    assert!(node.log().contains("haproxy soft stop"), "{}", node.log());
    assert!(node.log().contains("haproxy stopped"), "{}", node.log());
    assert!(listeners(node.port()).is_empty());
}

/// The default template's monitor URI.
const MONITOR: &str = "/_haconfd/health";

#[test]
fn the_lame_duck_and_a_forced_stop_reach_an_adopted_haproxy() {
    let a = Backend::start("backend-A");
    let opts = Opts {
        // Far longer than the test waits: only the second signal can end it in time.
        lame_duck: "5m",
        ..Opts::default()
    };
    let mut node = Lb::start(
        Workspace::new("yaml"),
        &registry(&[("web", &[at("a", &a)])]),
        opts,
    );
    node.reach("web", "backend-A");
    let orphan = node.proc().expect("show proc").master_pid;
    node.daemon.child.kill().expect("SIGKILL haconfd");
    node.daemon.child.wait().expect("reap haconfd");
    node.respawn();
    node.wait_applied("none", 1);
    assert_eq!(node.proc().map(|p| p.master_pid), Some(orphan));
    let monitor = || http_get(node.port(), "any", MONITOR).ok().map(|r| r.status);
    assert_eq!(monitor(), Some(200));

    // The lame duck works on the runtime socket, whoever HAProxy's parent is.
    signal(node.daemon.pid(), Signal::SIGTERM);
    wait_for(SETTLE, "the monitor URI to fail", || {
        (monitor() == Some(503)).then_some(())
    });
    node.reach("web", "backend-A");
    // A second SIGTERM: the adopted master is stopped hard, at once.
    signal(node.daemon.pid(), Signal::SIGTERM);
    let status = wait_for(SETTLE, "haconfd to exit", || {
        node.daemon.child.try_wait().ok().flatten()
    });
    let log = node.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("forced stop: haproxy hard stop"), "{log}");
    assert!(log.contains("haproxy stopped (forced)"), "{log}");
    wait_for(SETTLE, "the adopted master to exit", || {
        (!pid_alive(orphan)).then_some(())
    });
    assert!(listeners(node.port()).is_empty());
}
