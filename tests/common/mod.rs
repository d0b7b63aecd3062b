//! Shared helpers for the integration tests: temp workspaces, free loopback ports, the haconfd
//! binary, and real etcd and HAProxy processes. Every process a test starts is ended by its PID
//! when its guard drops.
//!
//! - `run`      — `haconfd run` and `haconfd announce` as processes; [`run::EtcdDaemon`] writes
//!   a config over etcd (or a file) with a small template and starts it
//! - `admin`    — a client for a daemon's admin endpoint: `/metrics`, `/readyz`
//! - `haproxy`  — a file-source [`haproxy::Workspace`], local HTTP backends, HAProxy's sockets
//! - `lb`       — a `haconfd run` that drives HAProxy, with its applies counted from the log
//! - `etcd`, `cluster` — a real etcd, or a real 3-member cluster
//! - `elb`, `service` — the fleet tests' load balancer model and service instances
//! - `docker`   — the Docker Engine API answers recorded in `tests/fixtures/docker/`
//!
//! Root-only tests follow one policy: they are `#[ignore = "needs root"]`, so a plain
//! `cargo test` lists them as ignored (never as passed), and `cargo test -- --ignored` runs them
//! where root exists (CI does); there, [`needs_root`] fails them when the process is not root.
#![allow(dead_code)]

pub mod admin;
pub mod cluster;
pub mod docker;
pub mod elb;
pub mod etcd;
pub mod haproxy;
pub mod lb;
pub mod run;
pub mod service;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The default template's lame-duck switch: a server line of the template's own, never data.
pub const LAME_DUCK_SERVER_LINE: &str = "    server serving 127.0.0.1:1 no-check";

/// The haconfd binary cargo built for these tests.
pub fn haconfd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_haconfd"))
}

/// The repository root (templates/, examples/).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A free TCP port on 127.0.0.1 (bound, then released), never the same twice in one test
/// binary. It is taken below the kernel's ephemeral range: a port that `bind(0)` found free
/// is handed out again by the kernel to the next `bind(0)` or outgoing connection of a test
/// running beside, which then held an etcd's or an admin endpoint's port first (etcd exiting
/// on "address already in use"; a test reading another daemon's /metrics).
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    // A different sequence per process: test binaries run one after the other, but a port
    // left in TIME_WAIT or held by another program is skipped by the bind below.
    let mut x = u64::from(std::process::id())
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    for _ in 0..2_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = low + (x % u64::from(high - low)) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Runs `haconfd ARGS` to completion.
pub fn haconfd(args: &[&str]) -> Output {
    Command::new(haconfd_bin())
        .args(args)
        .env_remove("HACONFD_CONFIG")
        .output()
        .expect("run haconfd")
}

/// A command's stderr, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A command's stdout, as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts that a command exited with `code`, showing its stderr when it did not.
#[track_caller]
pub fn assert_exit(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "{}", stderr(out));
}

/// Asserts that `got` is `want`, line for line, showing a unified diff when it is not.
#[track_caller]
pub fn assert_same_lines(what: &str, want: &str, got: &str) {
    if want != got {
        let diff = similar::TextDiff::from_lines(want, got)
            .unified_diff()
            .header("expected", "got")
            .to_string();
        panic!("{what} differs from what is expected:\n{diff}");
    }
}

/// The policy for a test that needs root (see the module's comment): such a test is
/// `#[ignore = "needs root"]` and calls this first, so that run where root is missing it fails,
/// naming what needs root, instead of passing as a skip.
#[track_caller]
pub fn needs_root(what: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{what} needs root: run the ignored tests as root (`cargo test -- --ignored`, as CI does)"
    );
}

/// Polls `f` every 20 ms until it returns Some, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The names in `dir`, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Writes a file atomically (temp + rename), the way deploy tools do.
pub fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Stops a test's accept loop on 127.0.0.1:`port`: raises `stop`, connects once so that the
/// loop wakes up and sees it, and joins the thread.
pub fn stop_accept_loop(
    stop: &std::sync::atomic::AtomicBool,
    port: u16,
    thread: &mut Option<std::thread::JoinHandle<()>>,
) {
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    );
    if let Some(t) = thread.take() {
        let _ = t.join();
    }
}

/// Waits (bounded) for a child the test started to exit; its exit code, or None when it is
/// still running at the deadline (or died of a signal).
pub fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A process's peak resident set size (`VmHWM` in /proc/PID/status), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// A process's resident set size now (`VmRSS` in /proc/PID/status), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}
