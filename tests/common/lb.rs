//! A `haconfd run` that drives a real HAProxy over a [`Workspace`] (the file source), with the
//! HAProxy masters it started ended by PID if a test fails before haconfd stopped them.
//!
//! Its applies are read from the log in order (`applied` lines and their `apply.kind`), so
//! that [`Lb::wait_applied`] can fail at once when an apply of another kind comes before the
//! one a test waits for (a reload where a Runtime API change was wanted, say).

use std::cell::Cell;
use std::path::PathBuf;
use std::time::Duration;

use haconfd::haproxy::master::{ProcInfo, parse_show_proc};

use super::haproxy::{
    Backend, Daemon, Opts, PidGuard, Workspace, at, cli_command, file_servers, http_get, registry,
    runtime_servers,
};
use super::wait_for;

/// Generous bounds: they only cap a failing test, a passing test never waits them out.
const SETTLE: Duration = Duration::from_secs(30);

pub struct Lb {
    // Field order is drop order: haconfd first (it stops HAProxy), then the guards.
    pub daemon: Daemon,
    pub masters: Vec<PidGuard>,
    pub ws: Workspace,
    /// How many applies of the log [`Lb::wait_applied`] has accounted for.
    checked: Cell<usize>,
}

impl Lb {
    /// Writes the registry and a supervise-mode config with `opts`, starts `haconfd run`, and
    /// returns once HAProxy runs the first apply.
    pub fn start(ws: Workspace, registry_text: &str, opts: Opts) -> Lb {
        ws.write_registry(registry_text);
        ws.write_config(&Opts {
            mode: "supervise",
            ..opts
        });
        let daemon = ws.spawn_run();
        let mut lb = Lb::attach(ws, daemon);
        let info = wait_for(SETTLE, "HAProxy started by haconfd", || {
            lb.proc().filter(|p| p.workers > 0)
        });
        lb.masters.push(PidGuard(Some(info.master_pid)));
        lb.wait_applied("start", 1);
        lb
    }

    /// [`Lb::start`] in a new workspace whose registry holds one instance of web, `a` at
    /// `backend`; returns once HAProxy serves it.
    pub fn serving_web(backend: &Backend, opts: Opts) -> Lb {
        let lb = Lb::start(
            Workspace::new("yaml"),
            &registry(&[("web", &[at("a", backend)])], ""),
            opts,
        );
        lb.reach("web", &backend.name);
        lb
    }

    /// A daemon the test started itself over `ws`.
    pub fn attach(ws: Workspace, daemon: Daemon) -> Lb {
        Lb {
            daemon,
            masters: Vec::new(),
            ws,
            checked: Cell::new(0),
        }
    }

    /// Starts `haconfd run` again (the earlier one has exited or was killed): a new log,
    /// whose applies are counted from zero.
    pub fn respawn(&mut self) {
        self.daemon = self.ws.spawn_run();
        self.checked.set(0);
    }

    pub fn port(&self) -> u16 {
        self.ws.bind_port
    }

    pub fn runtime_socket(&self) -> PathBuf {
        self.ws.path("run/admin.sock")
    }

    pub fn state_file(&self) -> PathBuf {
        self.ws.path("run/server-state")
    }

    /// `show proc` on the master socket, parsed.
    pub fn proc(&self) -> Option<ProcInfo> {
        parse_show_proc(&cli_command(&self.ws.master_socket(), "show proc")?)
    }

    /// The worker PIDs `show proc` lists, newest first.
    pub fn workers(&self) -> Vec<u32> {
        let Some(text) = cli_command(&self.ws.master_socket(), "show proc") else {
            return Vec::new();
        };
        let mut in_workers = false;
        let mut pids = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') {
                in_workers = line.contains("workers");
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            if in_workers && f.get(1) == Some(&"worker") {
                pids.extend(f.first().and_then(|p| p.parse::<u32>().ok()));
            }
        }
        pids
    }

    pub fn log(&self) -> String {
        self.daemon.log_text()
    }

    /// The kind of every apply the log reports (`apply.kind="reload"`, …), in order.
    pub fn applies(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" applied "))
            .filter_map(|l| {
                let rest = l.split("apply.kind=\"").nth(1)?;
                Some(rest.split('"').next()?.to_owned())
            })
            .collect()
    }

    /// How many applies of this kind the log reports.
    pub fn applied(&self, kind: &str) -> usize {
        self.applies().iter().filter(|k| *k == kind).count()
    }

    /// How many applies failed.
    pub fn failed_applies(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("apply failed"))
            .count()
    }

    /// Waits until the log reports `n` applies of `kind`, and panics if an apply of another
    /// kind shows up first: every apply since the last wait, up to the `n`th of `kind`, must
    /// be of `kind`.
    pub fn wait_applied(&self, kind: &str, n: usize) {
        let from = self.checked.get();
        let upto = wait_for(SETTLE, &format!("apply #{n} of kind {kind:?}"), || {
            let kinds = self.applies();
            let mut seen = kinds.iter().take(from).filter(|k| *k == kind).count();
            if seen >= n {
                return Some(from);
            }
            for (i, k) in kinds.iter().enumerate().skip(from) {
                assert_eq!(
                    k,
                    kind,
                    "waiting for apply #{n} of kind {kind:?}, apply #{} was of kind {k:?}:\n{}",
                    i + 1,
                    self.log()
                );
                seen += 1;
                if seen >= n {
                    return Some(i + 1);
                }
            }
            None
        });
        self.checked.set(upto);
    }

    /// Waits (bounded) until the first apply of this daemon's log, of any kind.
    pub fn wait_first_apply(&self) {
        wait_for(SETTLE, "the first apply", || {
            (!self.applies().is_empty()).then_some(())
        });
        self.checked.set(1);
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, within: Duration, needle: &str) {
        wait_for(within, &format!("{needle:?} in the log"), || {
            self.log().contains(needle).then_some(())
        });
    }

    /// Waits until a request with `Host: host` is answered by the backend named `body`.
    pub fn reach(&self, host: &str, body: &str) {
        wait_for(SETTLE, &format!("Host {host} to reach {body}"), || {
            http_get(self.port(), host, "/")
                .ok()
                .filter(|r| r.status == 200 && r.body == body)
        });
    }

    /// Sends `n` requests with `Host: host` and returns the bodies; every one must be a 200.
    pub fn bodies(&self, host: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let r = http_get(self.port(), host, "/")
                    .unwrap_or_else(|e| panic!("request {i} to {host} failed: {e}"));
                assert_eq!(r.status, 200, "request {i} to {host}: {r:?}");
                r.body
            })
            .collect()
    }

    pub fn dest(&self) -> String {
        self.ws.dest_text().expect("dest is installed")
    }

    /// Whether disk and the running HAProxy agree on every server line of `backend`.
    pub fn agree(&self, backend: &str) -> bool {
        let disk = file_servers(&self.dest(), backend);
        !disk.is_empty() && runtime_servers(&self.runtime_socket(), backend) == disk
    }

    /// Disk and the running HAProxy agree on every server line of `backend`: address, port,
    /// weight, and maintenance (`disabled`).
    pub fn assert_agree(&self, backend: &str) {
        let disk = file_servers(&self.dest(), backend);
        assert!(!disk.is_empty(), "no server lines for {backend}");
        let live = runtime_servers(&self.runtime_socket(), backend);
        assert_eq!(
            live,
            disk,
            "the running HAProxy and the file disagree on {backend}\n{}",
            self.dest()
        );
    }

    /// A counter or gauge on the admin endpoint's `/metrics`.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.ws.admin()?.metric(name)
    }
}
