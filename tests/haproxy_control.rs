//! HAProxy control against a real HAProxy that `haconfd run` supervises (file source, local HTTP
//! backends, everything on 127.0.0.1 in a temp dir of its own):
//!
//! - a structural change is exactly one confirmed reload, and the new worker serves it;
//! - a config that passes `haproxy -c` but cannot start (a port already in use) is a failed
//!   reload: the previous file is restored byte for byte, the old worker keeps serving, and the
//!   next good change applies;
//! - server-only changes go through the Runtime API with no reload, and disk and the running
//!   HAProxy agree server by server;
//! - through etcd, a server-only change is sent before its file is rendered (the fast path),
//!   with no reload, and the file that follows is exactly what `haconfd render --print` renders
//!   from etcd;
//! - a killed master is restarted, and SIGTERM stops HAProxy and leaves no zombie behind;
//! - a second SIGTERM while HAProxy drains stops it at once;
//! - exhausting the spare slots falls back to one reload that regrows them;
//! - with the host map, a new route host is served through `prepare/add/commit map`, no reload;
//!   a map line the plan cannot vouch for is one reload instead;
//! - the lame duck (issue 10): on SIGTERM the monitor URI answers 503 at once, traffic is still
//!   served with `Connection: close`, changes still apply (a reload keeps the health check
//!   failing), then the soft stop; a second SIGTERM ends it at once; a template without the
//!   switch skips it and says what is missing.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use common::etcd::Etcd;
use common::haproxy::{
    Backend, Inst, Opts, PidGuard, Workspace, at, cli_command, etcd_table, file_servers, http_get,
    master_pid, pid_alive, registry, serves, signal,
};
use common::lb::Lb;
use common::wait_for;
use nix::sys::signal::Signal;

/// Generous bounds: they only cap a failing test, a passing test never waits them out.
const SETTLE: Duration = Duration::from_secs(30);

/// `spare_slots` in the workspace config (tests/common/haproxy.rs).
const SPARE: usize = 2;

/// An instance at a backend with a weight and a state.
fn with(id: &'static str, b: &Backend, weight: u16, state: &str) -> Inst {
    (
        id,
        format!(
            "'{{\"addr\":\"127.0.0.1:{}\",\"weight\":{weight},\"state\":\"{state}\"}}'",
            b.port
        ),
    )
}

/// Processes in state Z whose parent is `ppid`.
fn zombie_children(ppid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        if field("PPid:").as_deref() == Some(&ppid.to_string())
            && field("State:").is_some_and(|s| s.starts_with('Z'))
        {
            out.push(pid);
        }
    }
    out
}

/// Whether `/proc/<pid>` is a zombie.
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("State:"))
                .map(|v| v.trim().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn supervise() -> Opts {
    Opts {
        mode: "supervise",
        ..Opts::default()
    }
}

#[test]
fn a_structural_change_is_one_confirmed_reload_and_the_new_worker_serves_it() {
    let a = Backend::start("backend-A");
    let b = Backend::start("backend-B");
    let mut lb = Lb::serving_web(&a, supervise());
    let before = lb.proc().expect("show proc");
    assert_eq!(before.failed, 0);
    let old_workers = lb.workers();
    assert!(!old_workers.is_empty());

    // A new service is a new backend and new acl lines: a reload.
    lb.ws.write_registry(registry(
        &[("web", &[at("a", &a)]), ("api", &[at("b", &b)])],
        "",
    ));
    lb.wait_applied("reload", 1);
    let after = lb.proc().expect("show proc after the reload");
    assert_eq!(after.reloads, before.reloads + 1, "{}", lb.log());
    assert_eq!(after.failed, 0);
    assert_eq!(after.master_pid, before.master_pid);
    // The newest worker is new, and it serves the new config (the old one stopped listening).
    let newest = lb.workers()[0];
    assert!(!old_workers.contains(&newest), "no new worker: {newest}");
    lb.reach("api", "backend-B");
    assert!(lb.bodies("web", 4).iter().all(|b| b == "backend-A"));
    assert_eq!(lb.applied("runtime"), 0);
    assert_eq!(lb.failed_applies(), 0, "{}", lb.log());

    // The old worker leaves once it has no connection left.
    wait_for(SETTLE, "the old workers to exit", || {
        old_workers.iter().all(|p| !pid_alive(*p)).then_some(())
    });
    assert_eq!(lb.daemon.terminate(SETTLE * 2), Some(0), "{}", lb.log());
}

/// The default template plus a frontend bound to `/extra/port` when that key exists: valid for
/// `haproxy -c`, which does not bind, and fatal to a reload when the port is taken.
fn template_with_extra_bind() -> String {
    let mut t = Workspace::default_template();
    if !t.ends_with('\n') {
        t.push('\n');
    }
    t.push_str(
        "{% if exists(key=\"/extra/port\") %}\n\
         frontend fe_extra\n    \
         bind 127.0.0.1:{{ getv(key=\"/extra/port\") }}\n    \
         default_backend _no_route\n\
         {% endif %}\n",
    );
    t
}

#[test]
fn a_reload_that_cannot_bind_restores_the_file_and_the_old_worker_keeps_serving() {
    let a = Backend::start("backend-A");
    let b = Backend::start("backend-B");
    // The port HAProxy will be asked to bind, held here (no SO_REUSEPORT: the bind fails).
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();

    let mut ws = Workspace::new("yaml");
    ws.set_template(&template_with_extra_bind());
    let opts = Opts {
        prefixes: &["/services/", "/routes/", "/extra/"],
        ..supervise()
    };
    let web = [at("a", &a)];
    let mut lb = Lb::start(ws, &registry(&[("web", &web)], ""), opts);
    lb.reach("web", "backend-A");
    let good = std::fs::read(&lb.ws.dest).expect("read dest");
    let before = lb.proc().expect("show proc");
    let old_workers = lb.workers();

    // `haproxy -c` passes (it does not bind); the reload fails on the taken port.
    lb.ws.write_registry(registry(
        &[("web", &web), ("api", &[at("b", &b)])],
        &format!("extra:\n  port: \"{taken_port}\"\n"),
    ));
    wait_for(SETTLE, "the failed reload in the log", || {
        (lb.failed_applies() == 1).then_some(())
    });
    let log = lb.log();
    assert!(
        log.contains("reload failed, previous files restored")
            && log.contains("could not load the new config"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(&lb.ws.dest).expect("read dest"),
        good,
        "dest is not byte-identical to the last good file"
    );
    let failed = lb.proc().expect("show proc after the failed reload");
    assert_eq!(failed.reloads, before.reloads + 1);
    assert!(failed.failed > 0, "{failed:?}");
    assert_eq!(failed.master_pid, before.master_pid);
    // The old worker still serves the old config.
    assert_eq!(lb.workers(), old_workers);
    assert!(lb.bodies("web", 5).iter().all(|b| b == "backend-A"));
    assert_eq!(http_get(lb.port(), "api", "/").map(|r| r.status), Ok(404));
    assert_eq!(lb.applied("reload"), 0);

    // A later good change (the same new service, without the extra bind) applies.
    lb.ws
        .write_registry(registry(&[("web", &web), ("api", &[at("b", &b)])], ""));
    lb.wait_applied("reload", 1);
    lb.reach("api", "backend-B");
    let after = lb.proc().expect("show proc after the good reload");
    assert_eq!(after.reloads, before.reloads + 2);
    assert_eq!(after.failed, 0);
    assert!(serves(&lb.dest(), "b", &format!("127.0.0.1:{}", b.port)));
    assert_eq!(lb.failed_applies(), 1, "{}", lb.log());
    drop(taken);

    assert_eq!(lb.daemon.terminate(SETTLE * 2), Some(0), "{}", lb.log());
}

#[test]
fn server_only_changes_use_the_runtime_api_and_never_reload() {
    let (a, b, c) = Backend::abc();
    let mut lb = Lb::serving_web(&a, supervise());
    let before = lb.proc().expect("show proc");
    lb.assert_agree("be_web");
    let mut runtime = 0;
    let mut step = |lb: &Lb, instances: &[Inst]| {
        lb.ws.write_registry(registry(&[("web", instances)], ""));
        runtime += 1;
        lb.wait_applied("runtime", runtime);
        lb.assert_agree("be_web");
    };

    // Add an instance: it takes a free slot.
    step(&lb, &[at("a", &a), at("b", &b)]);
    lb.reach("web", "backend-B");
    assert!(serves(&lb.dest(), "b", &format!("127.0.0.1:{}", b.port)));

    // Change a weight.
    step(&lb, &[with("a", &a, 50, "ready"), at("b", &b)]);
    assert!(lb.dest().contains("weight 50"), "{}", lb.dest());

    // Drain b (weight 0): new requests all go to a.
    step(
        &lb,
        &[with("a", &a, 50, "ready"), with("b", &b, 100, "drain")],
    );
    assert!(lb.bodies("web", 6).iter().all(|x| x == "backend-A"));

    // a to maintenance, b back: everything goes to b.
    step(&lb, &[with("a", &a, 50, "maint"), at("b", &b)]);
    assert!(lb.bodies("web", 6).iter().all(|x| x == "backend-B"));

    // Remove a, add c: c takes a's slot, with a new address.
    step(&lb, &[at("b", &b), at("c", &c)]);
    lb.reach("web", "backend-C");
    let dest = lb.dest();
    assert!(
        serves(&dest, "c", &format!("127.0.0.1:{}", c.port)),
        "{dest}"
    );
    assert!(!dest.contains(&format!("127.0.0.1:{}", a.port)), "{dest}");

    // Remove b: only c serves.
    step(&lb, &[at("c", &c)]);
    assert!(lb.bodies("web", 6).iter().all(|x| x == "backend-C"));

    let after = lb.proc().expect("show proc");
    assert_eq!(after.reloads, before.reloads, "{}", lb.log());
    assert_eq!(after.master_pid, before.master_pid);
    assert_eq!(lb.applied("reload"), 0, "{}", lb.log());
    assert_eq!(lb.failed_applies(), 0, "{}", lb.log());
    assert_eq!(lb.daemon.terminate(SETTLE * 2), Some(0), "{}", lb.log());
}

/// An instance value in etcd: `backend`'s address with a weight and a state.
fn value(b: &Backend, weight: u16, state: &str) -> String {
    format!(
        "{{\"addr\":\"127.0.0.1:{}\",\"weight\":{weight},\"state\":\"{state}\"}}",
        b.port
    )
}

#[test]
fn server_only_changes_through_etcd_go_ahead_of_the_file_which_then_equals_render_print() {
    let (a, b, c) = Backend::abc();
    let etcd = Etcd::start();
    // Other services around web, in maintenance (no health checks), so that the file is more
    // than web's lines.
    let filler: Vec<(String, String)> = (0..40)
        .flat_map(|n| {
            (0..3).map(move |i| {
                (
                    format!("/services/fill{n:02}/i{i}"),
                    format!(
                        "{{\"addr\":\"127.0.0.1:{}\",\"state\":\"maint\"}}",
                        20000 + i
                    ),
                )
            })
        })
        .collect();
    etcd.put_txn_batches(&filler);
    etcd.put("/services/web/a", &value(&a, 100, "ready"));
    etcd.put("/services/web/b", &value(&b, 100, "ready"));
    let mut lb = Lb::start(
        Workspace::new("yaml"),
        "",
        Opts {
            etcd: Some(etcd_table(&[etcd.endpoint()])),
            ..supervise()
        },
    );
    lb.reach("web", "backend-A");
    lb.reach("web", "backend-B");
    let before = lb.proc().expect("show proc");
    // What `render --print` reads from etcd and renders: the installed file, byte for byte.
    let equals_render_print = |lb: &Lb| {
        let out = lb.ws.haconfd(&["render", "--print"]);
        assert!(out.status.success(), "{out:?}");
        let printed = String::from_utf8(out.stdout).expect("utf-8");
        assert_eq!(
            printed,
            lb.dest(),
            "the installed file is not what etcd renders"
        );
    };
    equals_render_print(&lb);
    let mut runtime = 0;
    let mut step = |lb: &Lb, key: &str, v: &str| {
        etcd.put(key, v);
        runtime += 1;
        // `applied` comes when the file is installed and HAProxy holds it.
        lb.wait_applied("runtime", runtime);
        lb.assert_agree("be_web");
        equals_render_print(lb);
    };

    // The first one proves the template on its render (installed, then sent); the next ones
    // go to HAProxy before their file is rendered.
    step(&lb, "/services/web/a", &value(&a, 50, "ready"));
    assert!(lb.dest().contains("weight 50"), "{}", lb.dest());
    // b moves to c's address: all traffic of b's slot goes to backend-C.
    step(&lb, "/services/web/b", &value(&c, 100, "ready"));
    lb.reach("web", "backend-C");
    assert!(lb.bodies("web", 6).iter().all(|x| x != "backend-B"));
    // b drains (weight 0): new requests all go to a.
    step(&lb, "/services/web/b", &value(&c, 100, "drain"));
    assert!(lb.bodies("web", 6).iter().all(|x| x == "backend-A"));
    // a to maintenance, b back: everything goes to c's address.
    step(&lb, "/services/web/a", &value(&a, 50, "maint"));
    step(&lb, "/services/web/b", &value(&c, 100, "ready"));
    assert!(lb.bodies("web", 6).iter().all(|x| x == "backend-C"));
    // a back at b's old address, its weight again.
    step(&lb, "/services/web/a", &value(&b, 100, "ready"));
    lb.reach("web", "backend-B");

    let log = lb.log();
    let served = log
        .matches("served through the Runtime API; the files follow")
        .count();
    assert_eq!(
        served,
        runtime - 1,
        "every change but the first went ahead:\n{log}"
    );
    let after = lb.proc().expect("show proc");
    assert_eq!(after.reloads, before.reloads, "{log}");
    assert_eq!(after.master_pid, before.master_pid);
    assert_eq!(lb.applied("reload"), 0, "{log}");
    assert_eq!(lb.failed_applies(), 0, "{log}");
    assert_eq!(
        lb.metric("haconfd_served_ahead_total"),
        Some(served as f64),
        "{log}"
    );
    assert!(!log.contains("differed from the files"), "{log}");
    assert_eq!(lb.daemon.terminate(SETTLE * 2), Some(0), "{}", lb.log());
}

#[test]
fn a_killed_master_is_restarted_and_sigterm_leaves_no_process_behind() {
    let (a, b, c) = Backend::abc();
    let mut lb = Lb::serving_web(&a, supervise());
    let haconfd = lb.daemon.pid();
    // A reload (which saves the server state), then a runtime move of web's instance: the
    // state file now holds a port that no longer holds.
    lb.ws.write_registry(registry(
        &[("web", &[at("a", &a)]), ("api", &[at("b", &b)])],
        "",
    ));
    lb.wait_applied("reload", 1);
    lb.reach("api", "backend-B");
    lb.ws.write_registry(registry(
        &[("web", &[at("a", &c)]), ("api", &[at("b", &b)])],
        "",
    ));
    lb.wait_applied("runtime", 1);
    lb.reach("web", "backend-C");
    let first = lb.proc().expect("show proc").master_pid;
    let first_workers = lb.workers();

    signal(first, Signal::SIGKILL);
    let second = wait_for(SETTLE, "a new master", || {
        master_pid(&lb.ws.master_socket()).filter(|p| *p != first)
    });
    lb.masters.push(PidGuard(Some(second)));
    wait_for(SETTLE, "the new master's worker", || {
        lb.proc().filter(|p| p.workers > 0)
    });
    // The restarted HAProxy serves what the file says, not what an old state file said.
    lb.reach("web", "backend-C");
    lb.assert_agree("be_web");
    assert!(lb.bodies("web", 4).iter().all(|x| x == "backend-C"));
    assert!(
        lb.log().contains("haproxy exited; restarting it"),
        "{}",
        lb.log()
    );
    // haconfd reaped the killed master; its workers followed it.
    assert!(
        !Path::new(&format!("/proc/{first}")).exists(),
        "master {first} not reaped"
    );
    wait_for(SETTLE, "the killed master's workers to exit", || {
        first_workers.iter().all(|p| !pid_alive(*p)).then_some(())
    });
    assert_eq!(zombie_children(haconfd), Vec::<u32>::new());

    // The new master takes reloads.
    assert_eq!(lb.proc().expect("show proc").reloads, 0);
    lb.ws.write_registry(registry(
        &[
            ("web", &[at("a", &c)]),
            ("api", &[at("b", &b)]),
            ("new", &[at("n", &a)]),
        ],
        "",
    ));
    lb.wait_applied("reload", 2);
    lb.reach("new", "backend-A");
    let info = lb.proc().expect("show proc after the reload");
    assert_eq!((info.master_pid, info.reloads, info.failed), (second, 1, 0));
    let workers = lb.workers();

    // SIGTERM: HAProxy stops, haconfd exits 0, nothing is left running or unreaped.
    assert_eq!(zombie_children(haconfd), Vec::<u32>::new());
    assert_eq!(lb.daemon.terminate(SETTLE * 2), Some(0), "{}", lb.log());
    let seen: Vec<u32> = [first, second]
        .into_iter()
        .chain(first_workers)
        .chain(workers)
        .collect();
    wait_for(SETTLE, "every HAProxy process to exit", || {
        seen.iter().all(|p| !pid_alive(*p)).then_some(())
    });
    // The masters were haconfd's children: reaped, not zombies.
    for pid in [first, second] {
        assert!(!is_zombie(pid), "master {pid} is a zombie");
    }
    assert!(lb.log().contains("haproxy stopped"), "{}", lb.log());
    assert!(
        http_get(lb.port(), "web", "/").is_err(),
        "HAProxy still listens"
    );
}

#[test]
fn exhausting_the_spare_slots_is_one_reload_that_regrows_them() {
    let backends: Vec<Backend> = (0..5).map(|i| Backend::start(&format!("b{i}"))).collect();
    let ids = ["i0", "i1", "i2", "i3", "i4"];
    let inst = |n: usize| -> Vec<Inst> { (0..n).map(|i| at(ids[i], &backends[i])).collect() };
    let mut lb = Lb::start(
        Workspace::new("yaml"),
        &registry(&[("web", &inst(1))], ""),
        supervise(),
    );
    lb.reach("web", "b0");
    let before = lb.proc().expect("show proc");
    let free = |cfg: &str| {
        file_servers(cfg, "be_web")
            .iter()
            .filter(|s| s.maint)
            .count()
    };
    assert_eq!(free(&lb.dest()), SPARE);

    // One more instance than there are free slots: a reload, not a partial runtime update.
    lb.ws
        .write_registry(registry(&[("web", &inst(SPARE + 2))], ""));
    lb.wait_applied("reload", 1);
    let after = lb.proc().expect("show proc after the reload");
    assert_eq!(after.reloads, before.reloads + 1, "{}", lb.log());
    assert_eq!(after.failed, 0);
    assert_eq!(lb.applied("runtime"), 0);
    for i in 0..SPARE + 2 {
        lb.reach("web", &format!("b{i}"));
    }
    // The reload regrew the spare slots: SPARE free `disabled` lines after the instances.
    let dest = lb.dest();
    let servers = file_servers(&dest, "be_web");
    assert_eq!(servers.len(), SPARE + 2 + SPARE, "{dest}");
    assert_eq!(free(&dest), SPARE, "{dest}");
    assert!(servers[SPARE + 2..].iter().all(|s| s.maint), "{dest}");
    lb.assert_agree("be_web");

    // The regrown slots take the next instance without a reload.
    lb.ws
        .write_registry(registry(&[("web", &inst(SPARE + 3))], ""));
    lb.wait_applied("runtime", 1);
    lb.reach("web", &format!("b{}", SPARE + 2));
    lb.assert_agree("be_web");
    assert_eq!(lb.proc().expect("show proc").reloads, after.reloads);
    assert_eq!(lb.failed_applies(), 0, "{}", lb.log());
    assert_eq!(lb.daemon.terminate(SETTLE * 2), Some(0), "{}", lb.log());
}

#[test]
fn a_restart_while_the_source_is_unreadable_serves_the_installed_config() {
    let a = Backend::start("backend-A");
    let mut lb = Lb::serving_web(&a, supervise());
    assert_eq!(lb.daemon.terminate(SETTLE * 2), Some(0), "{}", lb.log());
    let installed = lb.dest();

    // The source is gone (an etcd outage looks the same from here): the node restarts anyway.
    std::fs::remove_file(&lb.ws.registry).expect("remove the registry");
    lb.respawn();
    let info = wait_for(SETTLE, "HAProxy started on the installed config", || {
        lb.proc().filter(|p| p.workers > 0)
    });
    lb.masters.push(PidGuard(Some(info.master_pid)));
    lb.reach("web", "backend-A");
    wait_for(
        SETTLE,
        "the start on the installed config in the log",
        || {
            lb.log()
                .contains("HAProxy started on the installed config")
                .then_some(())
        },
    );
    assert_eq!(
        lb.dest(),
        installed,
        "dest is untouched while the source is unreadable"
    );

    // The source comes back with the same data: nothing to reload.
    lb.ws
        .write_registry(registry(&[("web", &[at("a", &a)])], ""));
    lb.wait_applied("none", 1);
    assert_eq!(lb.proc().map(|p| p.reloads), Some(info.reloads));
    lb.reach("web", "backend-A");
    assert_eq!(lb.daemon.terminate(SETTLE * 2), Some(0), "{}", lb.log());
}

/// A backend on 127.0.0.1 that reads requests and never answers them, so that a request through
/// HAProxy stays in flight. Counts the connections that sent a request; lets go of them on drop.
struct Stuck {
    port: u16,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Stuck {
    fn start() -> Stuck {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stuck backend");
        let port = listener.local_addr().expect("local addr").port();
        let (requests, stop) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (count, flag) = (Arc::clone(&requests), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                // A health check connects and closes; a request sends bytes.
                let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 1024];
                if matches!(conn.read(&mut buf), Ok(n) if n > 0) {
                    count.fetch_add(1, Ordering::SeqCst);
                    held.push(conn);
                }
            }
        });
        Stuck {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Stuck {
    fn drop(&mut self) {
        common::stop_accept_loop(&self.stop, self.port, &mut self.thread);
    }
}

#[test]
fn a_second_sigterm_during_the_drain_stops_haproxy_at_once() {
    let stuck = Stuck::start();
    // HAProxy's own bounds on a drain far beyond haconfd's 35 s: only haconfd ends this one.
    let template = Workspace::default_template()
        .replace("hard-stop-after 30s", "hard-stop-after 10m")
        .replace("timeout client 30s", "timeout client 10m")
        .replace("timeout server 30s", "timeout server 10m");
    assert!(template.contains("hard-stop-after 10m") && template.contains("timeout server 10m"));
    let mut ws = Workspace::new("yaml");
    ws.set_template(&template);
    let registry_text = format!("services:\n  web:\n    s1: \"127.0.0.1:{}\"\n", stuck.port);
    let mut lb = Lb::start(ws, &registry_text, supervise());
    let master = lb.proc().expect("show proc").master_pid;
    let workers = lb.workers();
    assert!(!workers.is_empty());

    // A request in flight: HAProxy waits on the backend, so a soft stop waits on it.
    let port = lb.port();
    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to HAProxy");
        s.set_read_timeout(Some(SETTLE * 4)).expect("read timeout");
        s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            .expect("send request");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        answer
    });
    wait_for(SETTLE, "the request to reach the backend", || {
        (stuck.requests.load(Ordering::SeqCst) > 0).then_some(())
    });

    // The first SIGTERM: a soft stop, which drains.
    signal(lb.daemon.pid(), Signal::SIGTERM);
    wait_for(SETTLE, "the soft stop in the log", || {
        lb.log().contains("haproxy soft stop").then_some(())
    });
    assert!(
        matches!(lb.daemon.child.try_wait(), Ok(None)),
        "haconfd waits for the drain"
    );
    assert!(pid_alive(master), "HAProxy drains the request in flight");
    assert!(!client.is_finished(), "the request in flight is still open");

    // The second: HAProxy stops now, haconfd exits, and says it was forced.
    signal(lb.daemon.pid(), Signal::SIGTERM);
    let status = wait_for(SETTLE * 2, "haconfd to exit", || {
        lb.daemon.child.try_wait().ok().flatten()
    });
    let log = lb.log();
    assert_eq!(status.code(), Some(0), "{log}");
    for line in [
        "SIGTERM again: forced stop",
        "forced stop: haproxy hard stop",
        "haproxy stopped (forced)",
        "stopped by force",
    ] {
        assert!(log.contains(line), "no {line:?} in:\n{log}");
    }
    assert!(
        !log.contains("did not stop in time"),
        "the drain ran out instead:\n{log}"
    );
    assert!(!pid_alive(master), "master {master} still runs");
    assert!(!is_zombie(master), "master {master} was not reaped");
    wait_for(SETTLE, "the workers to exit", || {
        workers.iter().all(|p| !pid_alive(*p)).then_some(())
    });
    let answer = client.join().expect("client thread");
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "the request in flight was cut, not answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn route_host_changes_go_through_the_host_map_without_a_reload() {
    let a = Backend::start("backend-A");
    let b = Backend::start("backend-B");
    let services =
        |a: &Backend, b: &Backend| registry(&[("api", &[at("a", a)]), ("web", &[at("b", b)])], "");
    let mut lb = Lb::start(
        Workspace::new("yaml"),
        &services(&a, &b),
        Opts {
            hosts_map: true,
            ..supervise()
        },
    );
    let map = lb.ws.path("out/hosts.map");
    let dest = lb.dest();
    assert!(
        dest.contains(&format!("map({},_no_route)", map.display())),
        "{dest}"
    );
    lb.reach("api", "backend-A");
    lb.reach("web", "backend-B");
    let before = lb.proc().expect("show proc");

    // A route gives web two hosts of its own; its name no longer routes.
    let route = "routes:\n  web: '{\"hosts\":[\"www.test\",\"shop.test\"]}'\n";
    lb.ws.write_registry(format!("{}{route}", services(&a, &b)));
    lb.wait_applied("runtime", 1);
    lb.reach("www.test", "backend-B");
    lb.reach("shop.test", "backend-B");
    let r = http_get(lb.port(), "web", "/").expect("request");
    assert_eq!(r.status, 404, "web has a route now: {r:?}");
    lb.reach("api", "backend-A");
    let text = std::fs::read_to_string(&map).expect("map installed");
    assert!(
        text.contains("\nwww.test be_web\n") && text.contains("\nshop.test be_web\n"),
        "{text}"
    );
    assert!(!text.contains("\nweb be_web"), "{text}");
    let live = cli_command(&lb.runtime_socket(), &format!("show map {}", map.display()))
        .expect("show map");
    for (host, be) in [
        ("api", "be_api"),
        ("www.test", "be_web"),
        ("shop.test", "be_web"),
    ] {
        assert!(
            live.lines().any(|l| l.ends_with(&format!(" {host} {be}"))),
            "{host} missing from the running map:\n{live}"
        );
    }
    assert!(!live.contains(" web be_web"), "{live}");

    // A server change and a host change in one apply: both without a reload.
    let route = "routes:\n  web: '{\"hosts\":[\"www.test\"]}'\n";
    lb.ws.write_registry(format!(
        "{}{route}",
        registry(&[("api", &[at("a", &b)]), ("web", &[at("b", &b)])], "")
    ));
    lb.wait_applied("runtime", 2);
    lb.reach("api", "backend-B");
    wait_for(SETTLE, "shop.test to stop routing", || {
        http_get(lb.port(), "shop.test", "/")
            .ok()
            .filter(|r| r.status == 404)
    });
    lb.assert_agree("be_api");

    let after = lb.proc().expect("show proc");
    assert_eq!(after.reloads, before.reloads, "{}", lb.log());
    assert_eq!(lb.applied("reload"), 0, "{}", lb.log());
    assert_eq!(lb.failed_applies(), 0, "{}", lb.log());
    assert_eq!(lb.daemon.terminate(SETTLE * 2), Some(0), "{}", lb.log());
}

/// An HAProxy that exits at once (here: its port is taken; in production, an FD limit below its
/// server count) fails the start with what happened, instead of after the readiness timeout.
#[test]
fn an_haproxy_that_exits_at_start_is_reported_as_exited() {
    use haconfd::haproxy::supervise::{Spec, Stopper, Supervisor};
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    master-worker\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 1s\n    timeout server 1s\nfrontend fe\n    bind 127.0.0.1:{port}\n"
        ),
    )
    .expect("write cfg");
    let spec = Spec {
        binary: "haproxy".into(),
        master_socket: dir.path().join("master.sock"),
        config: cfg,
        stop_grace: Duration::from_secs(5),
        state_file: None,
        restarts: Default::default(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // A long readiness bound: only the exit can end the wait with the right message.
    let result = rt.block_on(Supervisor::start(
        spec,
        Duration::from_secs(120),
        Stopper::default(),
    ));
    match result {
        Ok(_) => panic!("HAProxy started although its port is taken"),
        Err(e) => assert!(e.contains("haproxy exited"), "{e}"),
    }
    drop(taken);
}

/// A map line that is not two plain tokens is never written into a command: the change that
/// brings it is one reload, and HAProxy loads the map from the file.
#[test]
fn a_map_line_the_plan_cannot_check_is_a_reload() {
    let a = Backend::start("backend-A");
    let b = Backend::start("backend-B");
    let ws = Workspace::new("yaml");
    let src = ws.path("odd.map.tera");
    std::fs::write(
        &src,
        "{% for s in services %}{{ s.name }} {{ s.backend }}\n{% if s.instances | length > 1 %}{{ s.name }}@{{ s.instances | length }} {{ s.backend }}\n{% endif %}{% endfor %}",
    )
    .expect("write map template");
    let mut lb = Lb::start(
        ws,
        &registry(&[("web", &[at("a", &a)])], ""),
        Opts {
            hosts_map: true,
            hosts_map_src: Some(src),
            ..supervise()
        },
    );
    lb.reach("web", "backend-A");
    lb.ws
        .write_registry(registry(&[("web", &[at("a", &a), at("b", &b)])], ""));
    lb.wait_applied("reload", 1);
    lb.reach("web", "backend-B");
    lb.reach("web@2", "backend-A");
    assert_eq!(lb.applied("runtime"), 0, "{}", lb.log());
    assert_eq!(lb.failed_applies(), 0, "{}", lb.log());
    assert_eq!(lb.daemon.terminate(SETTLE * 2), Some(0), "{}", lb.log());
}

/// The head of a response (status line and headers, lower-cased) to `GET path` with
/// `Host: host` over a fresh connection that asks for keep-alive.
fn response_head(port: u16, host: &str, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(String::from_utf8_lossy(&head).to_ascii_lowercase())
}

const MONITOR: &str = "/_haconfd/health";

fn monitor_status(port: u16) -> Option<u16> {
    http_get(port, "any", MONITOR).ok().map(|r| r.status)
}

#[test]
fn the_lame_duck_fails_the_health_check_and_keeps_serving_and_applying() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let opts = Opts {
        lame_duck: "6s",
        ..supervise()
    };
    let mut lb = Lb::start(
        Workspace::new("yaml"),
        &registry(&[("web", &[at("a1", &a)])], ""),
        opts,
    );
    let port = lb.port();
    lb.reach("web", "a");
    assert_eq!(monitor_status(port), Some(200));
    let head = response_head(port, "web", "/").expect("a response");
    assert!(!head.contains("connection: close"), "{head}");
    let admin = lb.ws.admin_port().expect("the admin port in the config");

    signal(lb.daemon.pid(), Signal::SIGTERM);
    wait_for(SETTLE, "the monitor URI to fail", || {
        (monitor_status(port) == Some(503)).then_some(())
    });
    // The log line follows the switch (through the log's own thread): wait for it.
    wait_for(SETTLE, "the lame duck's start in the log", || {
        lb.log()
            .contains("lame duck: the monitor URI answers 503")
            .then_some(())
    });
    // Everything else is served, and asks its client to close the connection.
    let head = response_head(port, "web", "/").expect("served during the lame duck");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let ready = http_get(admin, "localhost", "/readyz").expect("/readyz answers");
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.body.starts_with("stopping"), "{ready:?}");

    // A change still applies, through a reload, and the new worker keeps failing the check.
    lb.ws.write_registry(registry(
        &[("web", &[at("a1", &a)]), ("api", &[at("b1", &b)])],
        "",
    ));
    lb.wait_applied("reload", 1);
    lb.reach("api", "b");
    assert_eq!(
        monitor_status(port),
        Some(503),
        "the reloaded worker must fail the check too"
    );
    assert!(
        matches!(lb.daemon.child.try_wait(), Ok(None)),
        "haconfd still runs during the lame duck"
    );

    // Then the soft stop, and a clean exit.
    let status = wait_for(SETTLE * 2, "haconfd to exit", || {
        lb.daemon.child.try_wait().ok().flatten()
    });
    let log = lb.log();
    assert_eq!(status.code(), Some(0), "{log}");
    let over = log
        .find("lame duck over: soft stop")
        .expect("the end is logged");
    let soft = log.find("haproxy soft stop").expect("then the soft stop");
    assert!(over < soft, "{log}");
    assert!(!log.contains("stopped by force"), "{log}");
}

#[test]
fn a_second_sigterm_ends_the_lame_duck_at_once() {
    let a = Backend::start("a");
    let opts = Opts {
        // Far longer than the test waits: only the second signal can end it in time.
        lame_duck: "5m",
        ..supervise()
    };
    let mut lb = Lb::start(
        Workspace::new("yaml"),
        &registry(&[("web", &[at("a1", &a)])], ""),
        opts,
    );
    let master = lb.proc().expect("show proc").master_pid;
    signal(lb.daemon.pid(), Signal::SIGTERM);
    wait_for(SETTLE, "the monitor URI to fail", || {
        (monitor_status(lb.port()) == Some(503)).then_some(())
    });
    signal(lb.daemon.pid(), Signal::SIGTERM);
    let status = wait_for(SETTLE, "haconfd to exit", || {
        lb.daemon.child.try_wait().ok().flatten()
    });
    let log = lb.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("SIGTERM again during the lame duck: ending it"),
        "{log}"
    );
    assert!(log.contains("stopped by force"), "{log}");
    assert!(!log.contains("lame duck over"), "{log}");
    wait_for(SETTLE, "the HAProxy master to exit", || {
        (!pid_alive(master)).then_some(())
    });
}

#[test]
fn a_template_without_the_switch_skips_the_lame_duck_and_says_why() {
    let a = Backend::start("a");
    let template: String = Workspace::default_template()
        .replace("    monitor fail if lame_duck\n", "")
        .replace(
            "    http-after-response set-header Connection close if lame_duck\n",
            "",
        )
        .replace("    acl lame_duck nbsrv(_lameduck) lt 1\n", "")
        .replace("backend _lameduck\n", "")
        .replace("    server serving 127.0.0.1:1 no-check\n", "");
    assert!(
        !template.contains("backend _lameduck") && !template.contains("nbsrv(_lameduck)"),
        "{template}"
    );
    let mut ws = Workspace::new("yaml");
    ws.set_template(&template);
    let opts = Opts {
        lame_duck: "5m",
        ..supervise()
    };
    let mut lb = Lb::start(ws, &registry(&[("web", &[at("a1", &a)])], ""), opts);
    signal(lb.daemon.pid(), Signal::SIGTERM);
    let status = wait_for(SETTLE * 2, "haconfd to exit", || {
        lb.daemon.child.try_wait().ok().flatten()
    });
    let log = lb.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("lame duck skipped"), "{log}");
    assert!(log.contains("`_lameduck` backend"), "{log}");
    assert!(log.contains("haproxy soft stop"), "{log}");
}
