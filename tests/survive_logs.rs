//! `haconfd run` survives its log sink (issue 11, items 1 and 2). Its stderr is a pipe the test
//! holds: once the reader has gone (EPIPE), and once the reader stops reading (a full pipe), the
//! daemon keeps applying registry changes, answers SIGTERM with exit 0, and counts the lines it
//! could not write in `haconfd_log_dropped_total`. A panic inside a task (a fault injected in
//! debug builds) ends the process with exit code 70 instead of leaving it running without it.

mod common;

use std::io::Read;
use std::process::{ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::haproxy::{Daemon, Opts, Workspace, serves};
use common::{haconfd_bin, wait_exit, wait_for};

/// Generous bounds: they only cap a failing test, a passing one never waits them out.
const SETTLE: Duration = Duration::from_secs(30);
/// How long a SIGTERM may take to end the daemon (mode "none": nothing to drain). The log
/// output's own flush at exit is bounded at 1 s.
const STOP: Duration = Duration::from_secs(20);

/// The exit code after a panic anywhere in the process (`logging::PANIC_EXIT_CODE`).
const PANIC_EXIT_CODE: i32 = 70;

/// A registry with instance `w1` at `port`, and `bad` keys (named after `round`) whose value
/// the typed parse rejects: each is logged once, by key, as it first appears.
fn registry(port: u16, round: usize, bad: usize) -> String {
    let mut text = format!("services:\n  web:\n    w1: \"127.0.0.1:{port}\"\n");
    for i in 0..bad {
        text.push_str(&format!("    bad{round}x{i}: \"127.0.0.1:99999\"\n"));
    }
    text
}

/// Starts `haconfd run ARGS` with stderr on a pipe whose read end the test gets.
fn spawn_piped(ws: &Workspace, args: &[&str], env: &[(&str, &str)]) -> (Daemon, ChildStderr) {
    let mut child = Command::new(haconfd_bin())
        .arg("run")
        .args(args)
        .arg("--config")
        .arg(&ws.config)
        .env_remove("HACONFD_CONFIG")
        .env_remove("HACONFD_FAULT")
        .env("HACONFD_LOG", "info")
        .envs(env.iter().copied())
        .current_dir(ws.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start haconfd run");
    let stderr = child.stderr.take().expect("stderr is piped");
    // The log file stays empty: stderr is the pipe. Dropping the Daemon ends the process.
    let daemon = Daemon {
        child,
        log: ws.path("haconfd.log"),
    };
    (daemon, stderr)
}

/// Reads the pipe to its end on a thread of its own, into a buffer the test can look at.
fn collect(mut stderr: ChildStderr) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut chunk) {
            if n == 0 {
                return;
            }
            sink.lock()
                .expect("log buffer")
                .extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

/// `haconfd_log_dropped_total` from the admin endpoint's /metrics, when it answers.
fn dropped_lines(ws: &Workspace) -> Option<u64> {
    Some(ws.admin()?.metric("haconfd_log_dropped_total")? as u64)
}

/// Writes a registry that moves `w1` to `port` and waits (bounded) for dest to follow.
fn change_and_follow(ws: &Workspace, port: u16, round: usize, bad: usize) {
    ws.write_registry(registry(port, round, bad));
    let addr = format!("127.0.0.1:{port}");
    wait_for(
        SETTLE,
        &format!("dest to follow change {round} (w1 at {addr})"),
        || ws.dest_text().filter(|t| serves(t, "w1", &addr)),
    );
}

/// The reader of stderr has gone: every write fails with EPIPE. Without the lossy writer the
/// first log line after the close panicked inside tracing-subscriber and the daemon died.
#[test]
fn a_stderr_whose_reader_has_gone_neither_stops_applies_nor_signals() {
    let ws = Workspace::new("yaml");
    ws.write_registry(registry(8100, 0, 0));
    ws.write_config(&Opts::default());
    let (mut daemon, stderr) = spawn_piped(&ws, &[], &[]);
    change_and_follow(&ws, 8100, 0, 0);
    wait_for(SETTLE, "the admin endpoint", || dropped_lines(&ws));

    drop(stderr);
    for round in 1..=5 {
        change_and_follow(&ws, 8100 + round as u16, round, 0);
    }
    let dropped = wait_for(SETTLE, "lines counted as dropped", || {
        dropped_lines(&ws).filter(|&n| n > 0)
    });
    assert!(dropped > 0);

    let t0 = Instant::now();
    assert_eq!(daemon.terminate(STOP), Some(0), "SIGTERM did not end it");
    assert!(t0.elapsed() < STOP);
}

/// The reader of stderr stopped reading: the pipe fills at 64 KiB. Without the lossy writer
/// the write blocked the one thread that runs the daemon: no apply, no SIGTERM.
#[test]
fn a_stderr_nobody_reads_neither_stops_applies_nor_signals() {
    // Each change brings this many new bad keys, a warning each (about 150 bytes): a few
    // changes fill the pipe and then the queue behind it.
    const BAD: usize = 1500;
    let ws = Workspace::new("yaml");
    ws.write_registry(registry(8200, 0, 0));
    ws.write_config(&Opts::default());
    // The read end stays open and is never read until the daemon has exited.
    let (mut daemon, stderr) = spawn_piped(&ws, &[], &[]);
    change_and_follow(&ws, 8200, 0, 0);

    let mut round = 0;
    let first = loop {
        round += 1;
        change_and_follow(&ws, 8200 + round as u16, round, BAD);
        if let Some(n) = dropped_lines(&ws).filter(|&n| n > 0) {
            break n;
        }
        assert!(round < 40, "no line was dropped after {round} changes");
    };
    // Still applying with the pipe full, and still counting.
    for _ in 0..3 {
        round += 1;
        change_and_follow(&ws, 8200 + round as u16, round, BAD);
    }
    let later = wait_for(SETTLE, "the dropped count to rise", || {
        dropped_lines(&ws).filter(|&n| n > first)
    });
    assert!(later > first);

    let t0 = Instant::now();
    assert_eq!(daemon.terminate(STOP), Some(0), "SIGTERM did not end it");
    assert!(t0.elapsed() < STOP);
    drop(stderr);
}

/// A panic inside a task (the apply task, through the debug-only `HACONFD_FAULT`) ends the
/// process with exit code 70, and the panic is in the log, as JSON like every other line.
/// Before the panic hook the apply task vanished, the reactor gave up and the process exited 0:
/// a service manager that restarts on failure would not have restarted it.
#[test]
fn a_panic_inside_a_task_ends_the_process_with_exit_code_70() {
    let ws = Workspace::new("yaml");
    ws.write_registry(registry(8300, 0, 0));
    ws.write_config(&Opts::default());
    let (mut daemon, stderr) = spawn_piped(
        &ws,
        &["--log-format", "json"],
        &[("HACONFD_FAULT", "panic-in-apply")],
    );
    let log = collect(stderr);
    let code = wait_exit(&mut daemon.child, SETTLE);
    let text = String::from_utf8_lossy(&log.lock().expect("log buffer")).into_owned();
    assert_eq!(code, Some(PANIC_EXIT_CODE), "{text}");
    // The reader thread may still be reading the last bytes: wait for the report.
    wait_for(SETTLE, "the panic in the log", || {
        let text = String::from_utf8_lossy(&log.lock().expect("log buffer")).into_owned();
        text.contains("HACONFD_FAULT=panic-in-apply").then_some(())
    });
    let text = String::from_utf8_lossy(&log.lock().expect("log buffer")).into_owned();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let last = lines.last().expect("a log line");
    assert_eq!(last["exit_code"], PANIC_EXIT_CODE, "{text}");
    let message = last["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("panic in thread") && message.contains("exiting with code 70"),
        "{text}"
    );
    assert_eq!(ws.dest_text(), None, "the apply ran on after the panic");
}
