//! A fleet in a box (issue 10, part 4): a 3-member etcd cluster, two nodes (`haconfd run` in
//! supervise mode over the etcd source, with `[frontend] lame_duck` and `[fleet]` publishing),
//! service instances registered by `haconfd announce --drain`, and an ELB model (a plain
//! HAProxy that health-checks each node's monitor URI, no retries, no redispatch) with bounded
//! load through it, with keep-alive and without.
//!
//! `a_fleet_in_a_box_drops_no_request` runs three phases and asserts, for each, 0 failed
//! requests through the ELB and that `haconfd fleet --wait` reports every node converged:
//! 1. a rolling deploy: new instances up, then the old ones stopped through their announce;
//! 2. a rolling restart of haconfd on every node;
//! 3. the etcd leader killed while an instance registers.
//!
//! `fleet_wait_follows_registry_changes` measures how long after a registry change
//! `haconfd fleet --wait` returns (printed, not asserted: benchmarks measure speed).
//!
//! Figures are printed with `eprintln!`: run with `--nocapture` to see them. Addresses are
//! 127.0.0.1 only; every wait is bounded; every process is ended by its PID on drop.
//!
//! `HACONFD_FLEET_WITHOUT=lame_duck,drain,fleet` (any subset) leaves those features out of the
//! nodes' config and the announce command line, and then reports the failed requests instead of
//! asserting that there are none: it shows what the features prevent.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::elb::{Elb, ElbWatch, Load, LoadSpec, Report, Target};
use common::haproxy::{
    Backend, Daemon, Opts, PidGuard, Workspace, cli_command, etcd_table, http_get, master_pid,
    pid_alive, signal,
};
use common::run::{Announce, show_logs};
use common::service::Service;
use common::{haconfd_bin, wait_exit, wait_for};
use nix::sys::signal::Signal;

/// The monitor URI of the default template and config (the nodes leave `[frontend]
/// monitor_uri` at its default), which the ELB model checks.
const MONITOR_URI: &str = "/_haconfd/health";
/// The nodes' lame duck: longer than the ELB's health-check interval (500 ms) × its unhealthy
/// threshold (2), with a margin for a check in flight.
const LAME_DUCK: &str = "3s";
/// `announce --drain`: longer than a change takes to reach every node.
const DRAIN: &str = "2s";
/// `announce --ttl`.
const TTL: &str = "10s";
/// The bound on waits for a change to show up somewhere.
const SETTLE: Duration = Duration::from_secs(30);
/// The load's request interval, per client thread.
const INTERVAL: Duration = Duration::from_millis(20);
/// How long an instance takes to answer: requests are in flight on it for this long, and a
/// stop cuts them.
const SERVICE_DELAY: Duration = Duration::from_millis(20);

/// The two tests start their own cluster and nodes; they run one after the other so that
/// neither's timing (health checks every 500 ms) suffers from the other's processes.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which product features the run leaves out (`HACONFD_FLEET_WITHOUT`).
#[derive(Debug, Clone, Copy)]
struct Features {
    lame_duck: bool,
    drain: bool,
    fleet: bool,
}

impl Features {
    fn from_env() -> Features {
        let without = std::env::var("HACONFD_FLEET_WITHOUT").unwrap_or_default();
        let off = |name: &str| without.split(',').any(|w| w.trim() == name);
        Features {
            lame_duck: !off("lame_duck"),
            drain: !off("drain"),
            fleet: !off("fleet"),
        }
    }

    fn all(&self) -> bool {
        self.lame_duck && self.drain && self.fleet
    }
}

/// One node: a `haconfd run` in supervise mode over the cluster, with its own frontend port,
/// admin port, run dir and dest (a workspace whose config reads etcd).
struct Node {
    name: &'static str,
    ws: Workspace,
    daemon: Option<Daemon>,
    runs: usize,
    // The HAProxy masters this node's runs started, ended by PID if a test fails before
    // haconfd stopped them. Declared after `daemon`: haconfd stops first.
    masters: Vec<PidGuard>,
}

impl Node {
    fn new(name: &'static str, endpoints: &[String], features: Features) -> Node {
        let ws = Workspace::new("yaml");
        let fleet = match features.fleet {
            true => format!("\n[fleet]\nnode = \"{name}\"\npublish = true\n"),
            false => String::new(),
        };
        ws.write_config(&Opts {
            mode: "supervise",
            hosts_map: true,
            etcd: Some(etcd_table(endpoints)),
            lame_duck: if features.lame_duck { LAME_DUCK } else { "0s" },
            extra: fleet,
            ..Opts::default()
        });
        Node {
            name,
            ws,
            daemon: None,
            runs: 0,
            masters: Vec::new(),
        }
    }

    fn port(&self) -> u16 {
        self.ws.bind_port
    }

    fn runtime_socket(&self) -> PathBuf {
        self.ws.path("run/admin.sock")
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.ws.path(&format!("haconfd-run{run}.log"))
    }

    /// The log of the current (or last) run.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path(self.runs)).unwrap_or_default()
    }

    /// Starts `haconfd run` and waits until its HAProxy runs.
    fn start(&mut self) {
        assert!(self.daemon.is_none(), "{} is already running", self.name);
        self.runs += 1;
        let cmd = self.ws.run_command("info");
        self.daemon = Some(Daemon::spawn(cmd, self.log_path(self.runs)));
        let master = wait_for(SETTLE, &format!("{}'s HAProxy master", self.name), || {
            self.assert_running();
            master_pid(&self.ws.master_socket())
        });
        self.masters.push(PidGuard(Some(master)));
    }

    fn assert_running(&mut self) {
        if let Some(d) = self.daemon.as_mut()
            && let Ok(Some(status)) = d.child.try_wait()
        {
            panic!(
                "{}'s haconfd exited with {status}:\n{}",
                self.name,
                self.log()
            );
        }
    }

    /// SIGTERM, then waits (bounded) for the exit; the exit code.
    fn stop(&mut self, timeout: Duration) -> Option<i32> {
        let mut daemon = self.daemon.take().expect("node is running");
        let code = daemon.terminate(timeout);
        if code.is_none() {
            daemon.kill();
        }
        code
    }

    /// Whether this node's running HAProxy holds instance `port` of `web` in service: its
    /// slot has that address, is not in maintenance and is up (`show servers state`).
    fn serves(&self, port: u16) -> bool {
        let Some(text) = cli_command(&self.runtime_socket(), "show servers state be_web") else {
            return false;
        };
        text.lines().filter(|l| !l.starts_with('#')).any(|l| {
            // be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state … srv_port
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 19
                && f[1] == "be_web"
                && f[4] == "127.0.0.1"
                && f[18] == port.to_string()
                && f[5] == "2"
                && f[6].parse::<u32>().is_ok_and(|admin| admin & 0x23 == 0)
        })
    }

    fn target(&self) -> Target {
        Target {
            name: self.name.to_owned(),
            port: self.port(),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            // Teardown: the second SIGTERM is haconfd's forced stop (no lame duck, no drain).
            signal(d.pid(), Signal::SIGTERM);
            std::thread::sleep(Duration::from_millis(100));
            if d.terminate(Duration::from_secs(10)).is_none() {
                d.kill();
            }
        }
        if show_logs() {
            for run in 1..=self.runs {
                let log = std::fs::read_to_string(self.log_path(run)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                eprintln!(
                    "--- node {} run {run} log (last 40 lines):\n{}",
                    self.name,
                    tail.join("\n")
                );
            }
        }
    }
}

/// `haconfd announce` for one instance of `web`.
fn announce(id: &str, port: u16, endpoints: &[String], f: Features) -> Announce {
    let mut args: Vec<String> = ["--service", "web", "--id", id, "--ttl", TTL]
        .map(str::to_owned)
        .to_vec();
    args.extend(["--addr".to_owned(), format!("127.0.0.1:{port}")]);
    if f.drain {
        args.extend(["--drain".to_owned(), DRAIN.to_owned()]);
    }
    for e in endpoints {
        args.extend(["--etcd".to_owned(), e.clone()]);
    }
    Announce::start(&args)
}

/// A service instance: the service, and the announce that registers it.
struct Instance {
    id: String,
    // The announce stops before its service (field order is drop order).
    announce: Announce,
    service: Service,
}

impl Instance {
    fn start(id: &str, endpoints: &[String], f: Features) -> Instance {
        let service = Service::start(id, SERVICE_DELAY);
        let announce = announce(id, service.port, endpoints, f);
        Instance {
            id: id.to_owned(),
            announce,
            service,
        }
    }

    fn port(&self) -> u16 {
        self.service.port
    }
}

/// Waits (bounded) until every node's HAProxy holds every instance in service; how long that
/// took.
fn wait_served(nodes: &[Node], instances: &[&Instance], timeout: Duration) -> Duration {
    let start = Instant::now();
    let ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    wait_for(timeout, &format!("every node to serve {ids:?}"), || {
        nodes
            .iter()
            .all(|n| instances.iter().all(|i| n.serves(i.port())))
            .then_some(())
    });
    start.elapsed()
}

/// Runs `haconfd fleet --wait --timeout 20s` against `node`'s config (bounded); asserts exit 0
/// and returns its output.
fn fleet_wait(node: &Node, scratch: &std::path::Path) -> String {
    let (code, out, err) = fleet_wait_raw(node, scratch);
    assert_eq!(
        code,
        Some(0),
        "haconfd fleet --wait did not report the fleet converged:\nstdout:\n{out}\nstderr:\n{err}"
    );
    out
}

/// `haconfd fleet --wait --timeout 20s --config <node's>`: (exit code, stdout, stderr).
fn fleet_wait_raw(node: &Node, scratch: &std::path::Path) -> (Option<i32>, String, String) {
    let out_path = scratch.join("fleet.out");
    let err_path = scratch.join("fleet.err");
    let mut child = Command::new(haconfd_bin())
        .args(["fleet", "--wait", "--timeout", "20s", "--config"])
        .arg(&node.ws.config)
        .env_remove("HACONFD_CONFIG")
        .env_remove("HACONFD_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("fleet stdout"))
        .stderr(std::fs::File::create(&err_path).expect("fleet stderr"))
        .spawn()
        .expect("run haconfd fleet");
    let code = wait_exit(&mut child, Duration::from_secs(40));
    if code.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    (code, read(&out_path), read(&err_path))
}

/// The end of a phase: prints its figures, asserts 0 failed requests (unless features are
/// left out), and that the fleet converged.
fn end_phase(phase: &str, report: &Report, nodes: &[Node], f: Features, scratch: &std::path::Path) {
    eprintln!(
        "[fleet] {phase}: {} requests sent, {} ok, {} failed; served by {:?}",
        report.sent,
        report.ok,
        report.failed(),
        report.bodies
    );
    if report.failed() > 0 {
        eprintln!("{}", report.describe_failures(30));
    }
    if f.all() {
        assert!(report.sent > 0, "{phase}: no request was sent");
        assert_eq!(
            report.failed(),
            0,
            "{phase}: {} of {} requests through the ELB failed:\n{}",
            report.failed(),
            report.sent,
            report.describe_failures(30)
        );
    }
    if f.fleet {
        let out = fleet_wait(&nodes[0], scratch);
        eprintln!("[fleet] {phase}: haconfd fleet --wait exited 0:\n{out}");
    }
}

fn load(elb: &Elb, max: Duration) -> Load {
    Load::start(LoadSpec {
        port: elb.port,
        host: "web".into(),
        interval: INTERVAL,
        max_duration: max,
        max_requests: (max.as_millis() / INTERVAL.as_millis()) as usize + 1,
        clients: 2,
    })
}

#[test]
fn a_fleet_in_a_box_drops_no_request() {
    let _serial = serial();
    let started = Instant::now();
    let f = Features::from_env();
    eprintln!("[fleet] features: {f:?}");
    let scratch = tempfile::Builder::new()
        .prefix("haconfd-fleet-")
        .tempdir()
        .expect("scratch dir");
    let mut cluster = Cluster::start();
    let endpoints = cluster.endpoints();
    eprintln!("[fleet] etcd cluster up in {:?}", started.elapsed());

    // The first version of `web`, registered before the nodes start.
    let mut v1a = Instance::start("v1a", &endpoints, f);
    let mut v1b = Instance::start("v1b", &endpoints, f);
    wait_for(SETTLE, "v1a and v1b in etcd", || {
        (cluster.get_prefix("/services/web/").len() == 2).then_some(())
    });

    let mut nodes = vec![
        Node::new("n1", &endpoints, f),
        Node::new("n2", &endpoints, f),
    ];
    for n in &mut nodes {
        n.start();
    }
    wait_served(&nodes, &[&v1a, &v1b], SETTLE);
    let targets: Vec<Target> = nodes.iter().map(Node::target).collect();
    let elb = Elb::start(&targets, MONITOR_URI);
    elb.wait_up(&["n1", "n2"], SETTLE);
    eprintln!("[fleet] fleet up in {:?}", started.elapsed());
    let direct = http_get(elb.port, "web", "/").expect("a request through the ELB");
    assert_eq!(direct.status, 200, "{direct:?}");

    // Phase 1: a rolling deploy.
    let phase = Instant::now();
    let traffic = load(&elb, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let v2a = Instance::start("v2a", &endpoints, f);
    let v2b = Instance::start("v2b", &endpoints, f);
    let took = wait_served(&nodes, &[&v2a, &v2b], SETTLE);
    eprintln!("[fleet] phase 1: v2a and v2b served by both nodes {took:?} after their start");
    for old in [&mut v1a, &mut v1b] {
        let t = Instant::now();
        let code = old.announce.stop(Duration::from_secs(15));
        assert_eq!(
            code,
            Some(0),
            "announce {} did not exit 0 after SIGTERM:\n{}",
            old.id,
            old.announce.log()
        );
        let still: Vec<&str> = nodes
            .iter()
            .filter(|n| n.serves(old.port()))
            .map(|n| n.name)
            .collect();
        eprintln!(
            "[fleet] phase 1: announce {} exited {:?} after SIGTERM; nodes still serving it then: {still:?}",
            old.id,
            t.elapsed()
        );
        // Only now does the old instance's service stop.
        old.service.stop();
        eprintln!(
            "[fleet] phase 1: {} stopped: {} requests answered, {} cut in flight",
            old.id,
            old.service.answered(),
            old.service.cut()
        );
    }
    std::thread::sleep(Duration::from_millis(1000));
    let report = traffic.finish();
    eprintln!("[fleet] phase 1 took {:?}", phase.elapsed());
    end_phase(
        "phase 1 (rolling deploy)",
        &report,
        &nodes,
        f,
        scratch.path(),
    );

    // Phase 2: a rolling restart of haconfd on every node.
    let phase = Instant::now();
    let watch = ElbWatch::start(&elb, Duration::from_secs(90));
    let traffic = load(&elb, Duration::from_secs(80));
    std::thread::sleep(Duration::from_millis(500));
    let mut out_times = Vec::new();
    for node in nodes.iter_mut() {
        let master = master_pid(&node.ws.master_socket()).expect("the node's HAProxy master");
        let t0 = Instant::now();
        let code = node.stop(Duration::from_secs(60));
        let stopped = t0.elapsed();
        assert_eq!(
            code,
            Some(0),
            "{}'s haconfd did not exit 0 after SIGTERM:\n{}",
            node.name,
            node.log()
        );
        wait_for(
            Duration::from_secs(30),
            &format!("{}'s old HAProxy master {master} to exit", node.name),
            || (!pid_alive(master)).then_some(()),
        );
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", node.port())).is_err(),
            "something still listens on {}'s port {} after its haconfd and HAProxy stopped",
            node.name,
            node.port()
        );
        node.start();
        let name = node.name;
        let port = node.port();
        wait_for(SETTLE, &format!("{name} to serve web again"), || {
            http_get(port, "web", "/").ok().filter(|r| r.status == 200)
        });
        elb.wait_up(&[name], SETTLE);
        let back = t0.elapsed();
        // The watch polls every 50 ms: let it see the last change.
        std::thread::sleep(Duration::from_millis(100));
        let out = watch.out_of_elb(name, t0);
        eprintln!(
            "[fleet] phase 2: {name}: haconfd exited {stopped:?} after SIGTERM, UP in the ELB again {back:?} after it; ELB view: {out:?}"
        );
        out_times.push((name, stopped, back, out));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let report = traffic.finish();
    let transitions: Vec<String> = watch
        .transitions()
        .iter()
        .map(|t| {
            format!(
                "{:.3}s {} {}",
                t.at.duration_since(phase).as_secs_f64(),
                t.node,
                t.status
            )
        })
        .collect();
    drop(watch);
    eprintln!(
        "[fleet] phase 2 took {:?}; ELB transitions: {transitions:?}",
        phase.elapsed()
    );
    for (name, stopped, back, out) in &out_times {
        match out {
            Some(o) => eprintln!(
                "[fleet] phase 2: {name} out of the ELB (DOWN to UP) for {:?}; first failed check {:?}, DOWN {:?}, UP {:?} after SIGTERM; haconfd exited after {stopped:?}",
                o.down_for, o.first_failed_check, o.marked_down, o.back_up
            ),
            None => eprintln!(
                "[fleet] phase 2: {name}: the ELB never marked it DOWN; back after {back:?}"
            ),
        }
    }
    end_phase(
        "phase 2 (rolling restart of haconfd)",
        &report,
        &nodes,
        f,
        scratch.path(),
    );

    // Phase 3: the etcd leader killed while an instance registers.
    let phase = Instant::now();
    let traffic = load(&elb, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    let leader = cluster.wait_leader(Duration::from_secs(10));
    let killed_at = Instant::now();
    cluster.kill(leader);
    let v3 = Instance::start("v3", &endpoints, f);
    let registered = Instant::now() + SETTLE;
    let took = loop {
        if nodes.iter().all(|n| n.serves(v3.port())) {
            break killed_at.elapsed();
        }
        if Instant::now() >= registered {
            let live: Vec<&str> = (cluster.members.iter())
                .filter(|m| m.running())
                .map(|m| m.name)
                .collect();
            let keys: Vec<String> = cluster.get_prefix("/services/web/").into_keys().collect();
            panic!(
                "v3 not served by every node {SETTLE:?} after the leader ({}) was killed; etcd holds {keys:?} (members {live:?} up); served by: {:?}",
                cluster.members[leader].name,
                nodes
                    .iter()
                    .filter(|n| n.serves(v3.port()))
                    .map(|n| n.name)
                    .collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "[fleet] phase 3: killed the etcd leader {}; v3 served by both nodes {took:?} after the kill (its announce started at once)",
        cluster.members[leader].name,
    );
    let log = v3.announce.log();
    let lines: Vec<&str> = log.lines().take(20).collect();
    eprintln!("[fleet] phase 3: v3's announce log:\n{}", lines.join("\n"));
    cluster.restart(leader);
    let new_leader = cluster.wait_leader(Duration::from_secs(10));
    eprintln!(
        "[fleet] phase 3: member {} restarted; leader now {}",
        cluster.members[leader].name, cluster.members[new_leader].name
    );
    std::thread::sleep(Duration::from_millis(1000));
    let report = traffic.finish();
    eprintln!("[fleet] phase 3 took {:?}", phase.elapsed());
    // The other instances kept their registrations through the election.
    let keys: Vec<String> = cluster.get_prefix("/services/web/").into_keys().collect();
    assert_eq!(
        keys,
        ["/services/web/v2a", "/services/web/v2b", "/services/web/v3"],
        "the registry after the leader loss"
    );
    wait_served(&nodes, &[&v2a, &v2b, &v3], SETTLE);
    end_phase(
        "phase 3 (etcd leader killed)",
        &report,
        &nodes,
        f,
        scratch.path(),
    );

    eprintln!("[fleet] whole test: {:?}", started.elapsed());
    if std::env::var_os("HACONFD_TEST_SHOW_LOG").is_some() {
        eprintln!("ELB log:\n{}", elb.log());
    }
}

#[test]
fn fleet_wait_follows_registry_changes() {
    let _serial = serial();
    let f = Features::from_env();
    if !f.fleet {
        eprintln!("[fleet] fleet left out: nothing to measure");
        return;
    }
    let started = Instant::now();
    let scratch = tempfile::Builder::new()
        .prefix("haconfd-fleet-bench-")
        .tempdir()
        .expect("scratch dir");
    let cluster = Cluster::start();
    let endpoints = cluster.endpoints();
    let backend = Backend::start("bench");
    let value = |weight: u32| {
        format!(
            "{{\"addr\":\"127.0.0.1:{}\",\"weight\":{weight}}}",
            backend.port
        )
    };
    cluster.put("/services/web/b1", &value(100));
    cluster.put("/services/web/b2", &value(100));
    let mut nodes = vec![
        Node::new("n1", &endpoints, f),
        Node::new("n2", &endpoints, f),
    ];
    for n in &mut nodes {
        n.start();
    }
    fleet_wait(&nodes[0], scratch.path());

    let mut times = Vec::new();
    for k in 0..20u32 {
        // Nodes publish at most once a second: changes further apart than that each show.
        std::thread::sleep(Duration::from_millis(1100));
        let t = Instant::now();
        let revision = match k % 4 {
            // A weight change (Runtime API), an instance added and removed (a slot).
            0 | 1 => cluster.put("/services/web/b1", &value(50 + k)),
            2 => cluster.put("/services/web/b3", &value(100)),
            _ => {
                cluster.delete("/services/web/b3");
                cluster.revision()
            }
        };
        let (code, out, err) = fleet_wait_raw(&nodes[0], scratch.path());
        let took = t.elapsed();
        assert_eq!(
            code,
            Some(0),
            "change {k} (revision {revision}): fleet --wait did not converge:\n{out}\n{err}"
        );
        times.push(took);
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    eprintln!(
        "[fleet] registry change until `fleet --wait` exits 0, 2 nodes, {} changes: p50 {:?}, p99 {:?}, min {:?}, max {:?} (test took {:?})",
        times.len(),
        pct(0.5),
        pct(0.99),
        times[0],
        times[times.len() - 1],
        started.elapsed()
    );
}
