//! `haconfd announce` against a real etcd (issue "Presence sidecar"): haconfd runs as a real
//! process, and every test reads what etcd holds: the key, its value and its lease.
//!
//! Addresses are 127.0.0.1 only. Waits are bounded; the one timing assertion is the
//! contract's "gone within a second" after SIGTERM, asserted with a generous bound and printed.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::docker::{CONTAINER, FakeEngine, HOST_PORT};
use common::etcd::Etcd;
use common::haproxy::{Backend, Opts, PidGuard, Workspace, etcd_table, http_get, master_pid};
use common::run::{Announce, EtcdDaemon};
use common::{free_port, haconfd, wait_for};
use nix::sys::signal::Signal;

/// How long a registration may take to show before a test gives up.
const SETTLE: Duration = Duration::from_secs(30);

/// Waits until `key` exists and returns its value and lease.
fn wait_key(etcd: &Etcd, key: &str, a: &Announce, what: &str) -> (String, i64) {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Some(e) = etcd.entry(key) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; announce log:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `key` is gone; returns how long that took.
fn wait_gone(
    etcd: &Etcd,
    key: &str,
    timeout: Duration,
    what: &str,
    log: &dyn Fn() -> String,
) -> Duration {
    let started = Instant::now();
    loop {
        if etcd.entry(key).is_none() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "timed out waiting for {what}; announce log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("hostname")
        .trim()
        .to_owned()
}

#[test]
fn registers_under_a_lease_with_the_asked_ttl_in_plain_and_json_form() {
    let etcd = Etcd::start();
    let url = etcd.endpoint();
    // The plain form, etcd from the config's [etcd] (a node's haconfd.toml).
    let setup = EtcdDaemon::new(&url).write();
    let plain = Announce::start(&[
        "--config",
        setup.config.to_str().expect("utf-8 path"),
        "--service",
        "web",
        "--addr",
        "127.0.0.1:8080",
        "--id",
        "w1",
        "--ttl",
        "7s",
    ]);
    // The JSON form, etcd from --etcd; a TTL long enough to leave the connection idle.
    let json = Announce::start(&[
        "--etcd",
        &url,
        "--service",
        "api",
        "--addr",
        "127.0.0.1:9000",
        "--id",
        "a1",
        "--ttl",
        "60s",
        "--weight",
        "50",
        "--meta",
        "zone=a",
        "--meta",
        "build=1.2.3",
    ]);
    // The default id: host name and port.
    let default_id = Announce::start(&[
        "--etcd",
        &url,
        "--service",
        "web",
        "--addr",
        "localhost:9090",
    ]);

    let (value, lease) = wait_key(&etcd, "/services/web/w1", &plain, "the plain key");
    assert_eq!(value, "127.0.0.1:8080");
    assert_ne!(lease, 0, "the key has no lease");
    let (granted, remaining) = etcd.lease_ttl(lease);
    assert_eq!(granted, 7);
    assert!(remaining > 0 && remaining <= 7, "{remaining}");

    let (value, json_lease) = wait_key(&etcd, "/services/api/a1", &json, "the JSON key");
    assert_eq!(
        value,
        r#"{"addr":"127.0.0.1:9000","weight":50,"meta":{"build":"1.2.3","zone":"a"}}"#
    );
    assert_eq!(etcd.lease_ttl(json_lease).0, 60);

    let key = format!("/services/web/{}-9090", hostname());
    let (value, _) = wait_key(&etcd, &key, &default_id, "the key with the default id");
    assert_eq!(value, "localhost:9090");

    // Kept alive past its TTL, and the idle connection is not cut by etcd's ping policy
    // (a 2 s HTTP/2 ping was answered with GOAWAY too_many_pings every 8 s).
    std::thread::sleep(Duration::from_secs(12));
    let (_, lease_now) = etcd
        .entry("/services/web/w1")
        .expect("kept alive past its TTL");
    assert_eq!(lease_now, lease, "the plain key was registered again");
    for a in [&plain, &json, &default_id] {
        let log = a.log();
        assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
    }
}

/// `--etcd URL --service web --addr 127.0.0.1:8080 --id ID --ttl TTL` and more.
fn args(url: &str, id: &str, ttl: &str, more: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--etcd",
        url,
        "--service",
        "web",
        "--addr",
        "127.0.0.1:8080",
        "--id",
        id,
        "--ttl",
        ttl,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(more.iter().map(|s| s.to_string()));
    v
}

#[test]
fn sigterm_removes_the_key_at_once_and_sigkill_within_the_ttl() {
    let etcd = Etcd::start();
    let url = etcd.endpoint();
    let mut termed = Announce::start(&args(&url, "term", "5s", &[]));
    let mut killed = Announce::start(&args(&url, "kill", "5s", &[]));
    wait_key(&etcd, "/services/web/term", &termed, "the key");
    wait_key(&etcd, "/services/web/kill", &killed, "the key");

    termed.signal(Signal::SIGTERM);
    let gone = wait_gone(
        &etcd,
        "/services/web/term",
        Duration::from_secs(10),
        "the key after SIGTERM",
        &|| termed.log(),
    );
    let code = termed.wait_exit(Duration::from_secs(10));
    println!("SIGTERM -> key gone: {} ms", gone.as_millis());
    assert_eq!(code, Some(0), "{}", termed.log());
    // The contract says within a second; the bound is generous for a loaded machine.
    assert!(gone < Duration::from_secs(3), "{gone:?}");
    assert!(termed.log().contains("lease revoked"), "{}", termed.log());

    killed.signal(Signal::SIGKILL);
    let _ = killed.wait_exit(Duration::from_secs(10));
    let gone = wait_gone(
        &etcd,
        "/services/web/kill",
        Duration::from_secs(30),
        "the key after SIGKILL",
        &|| killed.log(),
    );
    println!("SIGKILL -> key gone: {} ms (TTL 5 s)", gone.as_millis());
    // Within the TTL, plus etcd's expiry tick and a loaded machine.
    assert!(gone < Duration::from_secs(10), "{gone:?}");
}

#[test]
fn drain_removes_the_key_first_then_waits_before_exiting() {
    let etcd = Etcd::start();
    let url = etcd.endpoint();
    // Issue 10: the key goes at once, the process stays for --drain (cut short by a second
    // signal), or exits 0 by itself once it is over.
    let mut long = Announce::start(&args(&url, "long", "5s", &["--drain", "5m"]));
    let mut short = Announce::start(&args(&url, "short", "5s", &["--drain", "1s"]));
    wait_key(&etcd, "/services/web/long", &long, "the key");
    wait_key(&etcd, "/services/web/short", &short, "the key");

    long.signal(Signal::SIGTERM);
    wait_gone(
        &etcd,
        "/services/web/long",
        Duration::from_secs(10),
        "the key after SIGTERM",
        &|| long.log(),
    );
    assert!(
        matches!(long.child.try_wait(), Ok(None)),
        "announce keeps running while it drains:\n{}",
        long.log()
    );
    // The log line follows the revoke: wait for it rather than race it.
    wait_for(SETTLE, "the drain in announce's log", || {
        long.log().contains("draining").then_some(())
    });
    long.signal(Signal::SIGTERM);
    assert_eq!(long.wait_exit(SETTLE), Some(0), "{}", long.log());
    assert!(long.log().contains("drain cut short"), "{}", long.log());

    short.signal(Signal::SIGTERM);
    wait_gone(
        &etcd,
        "/services/web/short",
        Duration::from_secs(10),
        "the key after SIGTERM",
        &|| short.log(),
    );
    assert_eq!(short.wait_exit(SETTLE), Some(0), "{}", short.log());
    let log = short.log();
    let revoked = log
        .find("lease revoked")
        .expect("the lease is revoked first");
    let drained = log
        .find("drained; exiting")
        .expect("then the drain runs out");
    assert!(revoked < drained, "{log}");
}

/// The lease id the last "registration renewed" line of `log` names, if any.
fn renewed_lease(log: &str) -> Option<i64> {
    let line = log.lines().rfind(|l| l.contains("registration renewed"))?;
    let hex = line.split("lease=").nth(1)?.split_whitespace().next()?;
    i64::from_str_radix(hex.trim_matches('"'), 16).ok()
}

#[test]
fn registered_again_after_etcd_restarts_and_after_a_long_outage() {
    let mut etcd = Etcd::start();
    let url = etcd.endpoint();
    let a = Announce::start(&args(&url, "r1", "5s", &[]));
    let key = "/services/web/r1";
    let (_, first) = wait_key(&etcd, key, &a, "the key");

    // A restart: the keep-alive resumes on the same lease, so the key outlives its TTL after
    // the restart.
    etcd.restart();
    std::thread::sleep(Duration::from_secs(7));
    let (value, lease) = wait_key(&etcd, key, &a, "the key after the restart");
    assert_eq!(value, "127.0.0.1:8080");
    assert_eq!(
        lease,
        first,
        "not the lease announce registered under:\n{}",
        a.log()
    );
    assert!(etcd.lease_ttl(lease).1 > 0);
    assert_eq!(renewed_lease(&a.log()), Some(first), "{}", a.log());

    // Down for longer than the TTL, then back.
    etcd.stop();
    std::thread::sleep(Duration::from_secs(7));
    etcd.launch();
    wait_for(SETTLE, "the registration renewed after the outage", || {
        a.log()
            .matches("registration renewed")
            .count()
            .ge(&2)
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(7));
    let (value, lease) = wait_key(&etcd, key, &a, "the key after the outage");
    assert_eq!(value, "127.0.0.1:8080");
    assert!(etcd.lease_ttl(lease).1 > 0);
    // The key is under the lease announce renewed its registration with, and keeps alive:
    // the first one if etcd still had it, a new one (said at warn) if it had expired.
    let log = a.log();
    assert_eq!(renewed_lease(&log), Some(lease), "{log}");
    if lease != first {
        assert!(log.contains("granting a new one"), "{log}");
    }
    println!(
        "after an outage longer than the TTL: {}",
        if lease == first {
            "the same lease"
        } else {
            "a new lease"
        }
    );
    assert!(
        a.log().contains("WARN"),
        "the outage was not logged at warn:\n{}",
        a.log()
    );
}

#[test]
fn a_lost_lease_is_replaced_and_the_key_written_again() {
    let etcd = Etcd::start();
    let url = etcd.endpoint();
    let a = Announce::start(&args(&url, "l1", "5s", &[]));
    let key = "/services/web/l1";
    let (_, first) = wait_key(&etcd, key, &a, "the key");

    // Revoked behind announce's back: the keep-alive answers "not found".
    etcd.revoke(first);
    let second = wait_for(SETTLE, "the key under a new lease", || {
        etcd.entry(key).map(|(_, l)| l).filter(|l| *l != first)
    });
    assert_eq!(etcd.lease_ttl(second).0, 5);

    // Frozen for longer than the TTL: the lease expires when etcd runs again.
    etcd.pause();
    std::thread::sleep(Duration::from_secs(8));
    etcd.resume();
    let third = wait_for(SETTLE, "the key under a third lease", || {
        etcd.entry(key).map(|(_, l)| l).filter(|l| *l != second)
    });
    assert!(etcd.lease_ttl(third).1 > 0);
    let log = a.log();
    assert!(
        log.matches("registering again under a new lease").count()
            + log.matches("granting a new one").count()
            >= 2,
        "{log}"
    );
}

/// A TCP listener the test opens and closes; it accepts and drops every connection.
struct Listener {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    fn open(port: u16) -> Listener {
        let l = TcpListener::bind(("127.0.0.1", port)).expect("bind the check listener");
        let port = l.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in l.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                drop(conn);
            }
        });
        Listener {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        common::stop_accept_loop(&self.stop, self.port, &mut self.thread);
    }
}

/// An HTTP server answering 200 or 503 as the test says.
struct Health {
    port: u16,
    healthy: Arc<AtomicBool>,
    _listener: Listener,
}

impl Health {
    fn start() -> Health {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let healthy = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, flag) = (Arc::clone(&healthy), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            for conn in l.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let status = if h.load(Ordering::SeqCst) {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = conn.write_all(
                    format!("HTTP/1.0 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                );
                let _ = conn.shutdown(Shutdown::Both);
            }
        });
        Health {
            port,
            healthy,
            _listener: Listener {
                port,
                stop,
                thread: Some(thread),
            },
        }
    }
}

#[test]
fn health_checks_remove_and_restore_the_key() {
    let etcd = Etcd::start();
    let url = etcd.endpoint();

    // tcp://: a listener the test closes and opens again on the same port.
    let listener = Listener::open(0);
    let port = listener.port;
    // Checked every 200 ms, 2 in a row to rise or fall.
    let checked = |id: &str, check: &str| {
        Announce::start(&args(
            &url,
            id,
            "30s",
            &[
                "--check",
                check,
                "--check-interval",
                "200ms",
                "--rise",
                "2",
                "--fall",
                "2",
            ],
        ))
    };
    let tcp = checked("tcp", &format!("tcp://127.0.0.1:{port}"));
    // http://: a server that answers 200 or 503.
    let server = Health::start();
    let http = checked("http", &format!("http://127.0.0.1:{}/health", server.port));
    // A check that never passes: never registered.
    let dead = format!("tcp://127.0.0.1:{}", free_port());
    let never = Announce::start(&args(
        &url,
        "never",
        "30s",
        &["--check", &dead, "--check-interval", "200ms"],
    ));

    let (_, tcp_lease) = wait_key(&etcd, "/services/web/tcp", &tcp, "the tcp-checked key");
    wait_key(&etcd, "/services/web/http", &http, "the http-checked key");

    drop(listener);
    wait_gone(
        &etcd,
        "/services/web/tcp",
        SETTLE,
        "the key to go with the listener",
        &|| tcp.log(),
    );
    server.healthy.store(false, Ordering::SeqCst);
    wait_gone(
        &etcd,
        "/services/web/http",
        SETTLE,
        "the key to go with the 503",
        &|| http.log(),
    );

    let _listener = Listener::open(port);
    let (_, lease) = wait_key(
        &etcd,
        "/services/web/tcp",
        &tcp,
        "the key to come back with the listener",
    );
    assert_eq!(lease, tcp_lease, "the lease is kept while the check fails");
    server.healthy.store(true, Ordering::SeqCst);
    wait_key(
        &etcd,
        "/services/web/http",
        &http,
        "the key to come back with the 200",
    );

    assert!(
        etcd.entry("/services/web/never").is_none(),
        "{}",
        never.log()
    );
    assert!(never.log().contains("not registering"), "{}", never.log());
}

/// The Engine API's answers are Docker Engine API v1.43 answers (tests/fixtures/docker/), served
/// by a fake on a unix socket: no Docker daemon runs here.
#[test]
fn docker_port_discovery_from_the_engine_api() {
    let etcd = Etcd::start();
    let url = etcd.endpoint();

    // Content-Length answer; the host from --docker-host-ip's default.
    let docker = FakeEngine::start("inspect-published.http", false);
    let socket = docker.socket_str();
    let a = Announce::start(&[
        "--etcd",
        &url,
        "--service",
        "web",
        "--id",
        "d1",
        "--docker-container",
        CONTAINER,
        "--container-port",
        "8080/tcp",
        "--docker-socket",
        &socket,
    ]);
    let (value, _) = wait_key(&etcd, "/services/web/d1", &a, "the discovered key");
    assert_eq!(value, format!("127.0.0.1:{HOST_PORT}"));
    assert_eq!(
        docker
            .requests
            .lock()
            .expect("lock")
            .first()
            .map(String::as_str),
        Some("GET /containers/web-1/json HTTP/1.1")
    );

    // Chunked answer, the port not published at first (the container runs without `-p`
    // until it is recreated with it), the host from --addr, the id from the host name and
    // the discovered port.
    let docker = FakeEngine::start("inspect-unpublished.http", true);
    let socket = docker.socket_str();
    let b = Announce::start(&[
        "--etcd",
        &url,
        "--service",
        "web",
        "--addr",
        "localhost",
        "--docker-container",
        CONTAINER,
        "--container-port",
        "8080",
        "--docker-socket",
        &socket,
    ]);
    wait_for(SETTLE, "a retry after the unpublished port", || {
        (docker.served() >= 2).then_some(())
    });
    assert!(b.log().contains("not published"), "{}", b.log());
    docker.set_container("inspect-published.http");
    let key = format!("/services/web/{}-{HOST_PORT}", hostname());
    let (value, _) = wait_key(&etcd, &key, &b, "the key after the port was published");
    assert_eq!(value, format!("localhost:{HOST_PORT}"));

    // An unknown container is reported, and retried, until stopped.
    let mut c = Announce::start(&[
        "--etcd",
        &url,
        "--service",
        "web",
        "--id",
        "d3",
        "--docker-container",
        "other",
        "--container-port",
        "8080/tcp",
        "--docker-socket",
        &socket,
    ]);
    wait_for(SETTLE, "the 404 in the log", || {
        c.log().contains("No such container").then_some(())
    });
    c.signal(Signal::SIGTERM);
    assert_eq!(c.wait_exit(SETTLE), Some(0), "{}", c.log());
    assert!(etcd.entry("/services/web/d3").is_none());
}

#[test]
fn bad_arguments_exit_64_naming_the_flag() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--service", "Web!", "--addr", "127.0.0.1:80"],
            "--service",
        ),
        (&["--service", "web", "--addr", "127.0.0.1"], "--addr"),
        (&["--service", "web", "--addr", "127.0.0.1:99999"], "--addr"),
        (&["--service", "web"], "--addr"),
        (
            &["--service", "web", "--addr", "127.0.0.1:80", "--id", "a/b"],
            "--id",
        ),
        (
            &["--service", "web", "--addr", "127.0.0.1:80", "--ttl", "1s"],
            "--ttl",
        ),
        (
            &[
                "--service",
                "web",
                "--addr",
                "127.0.0.1:80",
                "--ttl",
                "forever",
            ],
            "--ttl",
        ),
        (
            &[
                "--service",
                "web",
                "--addr",
                "127.0.0.1:80",
                "--weight",
                "300",
            ],
            "--weight",
        ),
        (
            &[
                "--service",
                "web",
                "--addr",
                "127.0.0.1:80",
                "--weight",
                "heavy",
            ],
            "--weight",
        ),
        (
            &[
                "--service",
                "web",
                "--addr",
                "127.0.0.1:80",
                "--meta",
                "zone",
            ],
            "--meta",
        ),
        (
            &[
                "--service",
                "web",
                "--addr",
                "127.0.0.1:80",
                "--meta",
                "k=a\"b",
            ],
            "--meta",
        ),
        (
            &[
                "--service",
                "web",
                "--addr",
                "127.0.0.1:80",
                "--check",
                "ftp://127.0.0.1:21",
            ],
            "--check",
        ),
        (
            &[
                "--service",
                "web",
                "--addr",
                "127.0.0.1:80",
                "--check",
                "tcp://127.0.0.1:80",
                "--fall",
                "0",
            ],
            "--fall",
        ),
        (
            &[
                "--service",
                "web",
                "--addr",
                "127.0.0.1:80",
                "--etcd",
                "127.0.0.1:2379",
            ],
            "--etcd",
        ),
        (
            &["--service", "web", "--docker-container", "web-1"],
            "--container-port",
        ),
        (
            &[
                "--service",
                "web",
                "--docker-container",
                "web-1",
                "--container-port",
                "http",
            ],
            "--container-port",
        ),
    ];
    for (args, flag) in cases {
        let out = haconfd(&[&["announce"][..], args].concat());
        let stderr = common::stderr(&out);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?} does not name {flag}: {stderr}"
        );
    }
}

#[test]
fn haproxy_routes_to_an_announced_server_until_it_stops() {
    let etcd = Etcd::start();
    let url = etcd.endpoint();
    let server = Backend::start("announced");
    // Another service keeps the registry from ever going to zero (the guard holds that).
    let other = Backend::start("other");
    etcd.put("/services/other/o1", &format!("127.0.0.1:{}", other.port));

    let ws = Workspace::new("yaml");
    ws.write_config(&Opts {
        mode: "supervise",
        extra: "\n[guard]\nmax_drop_percent = 100\n".into(),
        etcd: Some(etcd_table(std::slice::from_ref(&url))),
        ..Opts::default()
    });
    let mut daemon = ws.spawn_run();
    let port = ws.bind_port;

    let addr = format!("127.0.0.1:{}", server.port);
    let mut a = Announce::start(&[
        "--etcd",
        &url,
        "--service",
        "web",
        "--addr",
        &addr,
        "--ttl",
        "30s",
    ]);
    let first = wait_for(
        SETTLE,
        "HAProxy to route Host: web to the announced server",
        || http_get(port, "web", "/").ok().filter(|r| r.status == 200),
    );
    assert_eq!(first.body, "announced", "{}", daemon.log_text());
    let master = wait_for(SETTLE, "the master PID", || master_pid(&ws.master_socket()));
    let _guard = PidGuard(Some(master));

    a.signal(Signal::SIGTERM);
    assert_eq!(a.wait_exit(SETTLE), Some(0), "{}", a.log());
    let after = wait_for(SETTLE, "HAProxy to stop routing to it", || {
        http_get(port, "web", "/")
            .ok()
            .filter(|r| r.status == 404 || r.status == 503)
    });
    println!("after SIGTERM: HTTP {}", after.status);
    // The other service is still served.
    assert_eq!(
        http_get(port, "other", "/").map(|r| r.body).ok().as_deref(),
        Some("other")
    );

    daemon.stop_with_master(master);
}
