//! Shared helpers for the integration tests: temp workspaces, free loopback ports, the haconfd
//! binary, and real etcd and HAProxy processes (`etcd`, `haproxy` submodules). Every process a
//! test starts is ended by its PID when its guard drops.
#![allow(dead_code)]

pub mod cluster;
pub mod elb;
pub mod etcd;
pub mod haproxy;
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

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
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
