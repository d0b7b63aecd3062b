//! `haconfd run` and `haconfd announce` as the tests start them: real processes, ended by
//! their PID when their guard drops.
//!
//! [`EtcdDaemon`] writes the config most source tests need — the etcd source (or the file
//! source), a one-line-per-server template ([`SERVERS_TEMPLATE`]), `check = false`, HAProxy
//! not driven, an admin endpoint — into a temp dir of its own, and starts `haconfd run` on it
//! ([`Run`]), or leaves it for a one-shot command ([`Setup`]).

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::admin::Admin;
use super::haproxy::signal;
use super::{free_port, haconfd_bin, wait_for};

/// One `server <service>/<id> <addr>` line per instance.
pub const SERVERS_TEMPLATE: &str = "{% for s in services -%}
{% for i in s.instances -%}
server {{ s.name }}/{{ i.id }} {{ i.addr }}
{% endfor -%}
{% endfor -%}
";

/// Whether a test's processes print their log as they go away: when the test fails, or when
/// `HACONFD_TEST_SHOW_LOG` is set.
pub fn show_logs() -> bool {
    std::thread::panicking() || std::env::var_os("HACONFD_TEST_SHOW_LOG").is_some()
}

/// `haconfd run --config CONFIG` in `cwd`, with `HACONFD_LOG=filter`, stdin and stdout closed
/// (the log goes to stderr): a command to adjust, then [`Daemon::spawn`].
pub fn run_command(config: &Path, cwd: &Path, filter: &str) -> Command {
    let mut cmd = Command::new(haconfd_bin());
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .env_remove("HACONFD_CONFIG")
        .env("HACONFD_LOG", filter)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// A running `haconfd run`. Dropping it stops it: SIGTERM, then SIGKILL after a bound.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `cmd` with its stderr in the file `log` (created anew).
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Daemon {
        let err = File::create(&log).expect("create the log file");
        let child = cmd.stderr(err).spawn().expect("start haconfd run");
        Daemon { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the log contains `needle`; returns how long that took.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        wait_for(timeout, &format!("{needle:?} in the haconfd log"), || {
            self.log_text().contains(needle).then_some(())
        });
        start.elapsed()
    }

    /// Waits until the log contains `needle`; returns the log.
    pub fn log_with(&self, needle: &str, timeout: Duration) -> String {
        wait_for(timeout, &format!("{needle:?} in the haconfd log"), || {
            Some(self.log_text()).filter(|l| l.contains(needle))
        })
    }

    /// Stops the daemon (SIGTERM, exit 0 within 60 s) and waits for the HAProxy master it
    /// supervised to be gone.
    pub fn stop_with_master(&mut self, master: u32) {
        assert_eq!(
            self.terminate(Duration::from_secs(60)),
            Some(0),
            "{}",
            self.log_text()
        );
        wait_for(
            Duration::from_secs(30),
            "the HAProxy master to exit",
            || (!super::haproxy::pid_alive(master)).then_some(()),
        );
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; returns the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        signal(self.child.id(), Signal::SIGTERM);
        super::wait_exit(&mut self.child, timeout)
    }

    /// SIGKILL (after SIGCONT, in case the test froze it) and reap.
    pub fn kill(&mut self) {
        signal(self.child.id(), Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // A frozen daemon only sees the SIGTERM once it runs again.
            signal(self.child.id(), Signal::SIGCONT);
            if self.terminate(Duration::from_secs(15)).is_none() {
                self.kill();
            }
        }
    }
}

/// How a test's `haconfd run` reads its registry and what it writes: a builder whose defaults
/// are the etcd source tests' (`[wait]` 50 ms to 500 ms, `dial_timeout = "1s"`, the guard's
/// default, the log at `info`).
#[derive(Debug, Clone)]
pub struct EtcdDaemon {
    /// The `[source]` table's `kind` and the table of that source.
    source: String,
    prefixes: Option<Vec<String>>,
    resync: Option<String>,
    wait: (&'static str, &'static str),
    max_drop_percent: Option<u32>,
    admin_extra: String,
    extra: String,
    log_filter: String,
}

impl EtcdDaemon {
    /// Over the etcd at `endpoint`.
    pub fn new(endpoint: &str) -> EtcdDaemon {
        EtcdDaemon::endpoints(&[endpoint.to_owned()])
    }

    /// Over several endpoints (a cluster's members), in this order.
    pub fn endpoints(endpoints: &[String]) -> EtcdDaemon {
        let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
        EtcdDaemon::with_source(format!(
            "kind = \"etcd\"\n\n[etcd]\nendpoints = [{}]\ndial_timeout = \"1s\"\n",
            list.join(", ")
        ))
    }

    /// Over the registry file at `path` instead (the file source).
    pub fn file(path: &Path) -> EtcdDaemon {
        EtcdDaemon::with_source(format!(
            "kind = \"file\"\n\n[file]\npath = \"{}\"\n",
            path.display()
        ))
    }

    fn with_source(source: String) -> EtcdDaemon {
        EtcdDaemon {
            source,
            prefixes: None,
            resync: None,
            wait: ("50ms", "500ms"),
            max_drop_percent: None,
            admin_extra: String::new(),
            extra: String::new(),
            log_filter: "info".into(),
        }
    }

    /// More lines for the `[etcd]` table (TLS files, a user, …).
    pub fn etcd_extra(mut self, lines: &str) -> Self {
        self.source.push_str(lines);
        self.source.push('\n');
        self
    }

    /// `[source] prefixes` (the default: haconfd's own).
    pub fn prefixes(mut self, prefixes: &[&str]) -> Self {
        self.prefixes = Some(prefixes.iter().map(|p| p.to_string()).collect());
        self
    }

    /// `[source] resync`.
    pub fn resync(mut self, every: &str) -> Self {
        self.resync = Some(every.into());
        self
    }

    /// `[wait] min` and `max`.
    pub fn wait(mut self, min: &'static str, max: &'static str) -> Self {
        self.wait = (min, max);
        self
    }

    /// `[guard] max_drop_percent`.
    pub fn max_drop_percent(mut self, percent: u32) -> Self {
        self.max_drop_percent = Some(percent);
        self
    }

    /// More lines for the `[admin]` table (`stale_after = "2s"`, …).
    pub fn admin_extra(mut self, lines: &str) -> Self {
        self.admin_extra.push_str(lines);
        self.admin_extra.push('\n');
        self
    }

    /// More tables at the end of the config (`[fleet]`, …).
    pub fn extra(mut self, tables: &str) -> Self {
        self.extra.push_str(tables);
        self.extra.push('\n');
        self
    }

    /// `HACONFD_LOG` for `haconfd run` (the default: `info`).
    pub fn log(mut self, filter: &str) -> Self {
        self.log_filter = filter.into();
        self
    }

    /// Writes the template and the config into a new temp dir.
    pub fn write(&self) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("haconfd-run-")
            .tempdir()
            .expect("tempdir");
        let src = dir.path().join("servers.tera");
        std::fs::write(&src, SERVERS_TEMPLATE).expect("write template");
        std::fs::create_dir(dir.path().join("out")).expect("out dir");
        let dest = dir.path().join("out/servers.cfg");
        let config = dir.path().join("haconfd.toml");
        let admin = Admin::at(free_port());
        let mut source = String::new();
        if let Some(p) = &self.prefixes {
            let list: Vec<String> = p.iter().map(|p| format!("{p:?}")).collect();
            source.push_str(&format!("prefixes = [{}]\n", list.join(", ")));
        }
        if let Some(r) = &self.resync {
            source.push_str(&format!("resync = \"{r}\"\n"));
        }
        let guard = match self.max_drop_percent {
            Some(p) => format!("\n[guard]\nmax_drop_percent = {p}\n"),
            None => String::new(),
        };
        let text = format!(
            r#"[source]
{source}{kind_and_table}
[[template]]
name = "servers"
src = "{src}"
dest = "{dest}"
check = false

[haproxy]
mode = "none"

[wait]
min = "{min}"
max = "{max}"
{guard}
[admin]
listen = "127.0.0.1:{admin}"
{admin_extra}
{extra}"#,
            kind_and_table = self.source,
            src = src.display(),
            dest = dest.display(),
            min = self.wait.0,
            max = self.wait.1,
            admin = admin.port,
            admin_extra = self.admin_extra,
            extra = self.extra,
        );
        std::fs::write(&config, text).expect("write config");
        Setup {
            dir,
            config,
            dest,
            admin,
            log_filter: self.log_filter.clone(),
        }
    }

    /// Writes the config and starts `haconfd run` on it.
    pub fn start(&self) -> Run {
        self.write().spawn()
    }
}

/// A config written by [`EtcdDaemon::write`], in a temp dir of its own.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Where the template renders.
    pub dest: PathBuf,
    pub admin: Admin,
    log_filter: String,
}

impl Setup {
    /// Runs `haconfd ARGS --config <config>` to completion, with no `HACONFD_LOG`.
    pub fn haconfd(&self, args: &[&str]) -> Output {
        Command::new(haconfd_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("HACONFD_CONFIG")
            .env_remove("HACONFD_LOG")
            .stdin(Stdio::null())
            .output()
            .expect("run haconfd")
    }

    /// Starts `haconfd run` with its log in `<dir>/haconfd.log`.
    pub fn spawn(self) -> Run {
        let cmd = run_command(&self.config, self.dir.path(), &self.log_filter);
        let daemon = Daemon::spawn(cmd, self.dir.path().join("haconfd.log"));
        Run {
            daemon,
            setup: self,
        }
    }
}

/// A running `haconfd run` on a [`Setup`]: killed by PID on drop (SIGCONT first, in case the
/// test froze it), its log printed when the test fails.
pub struct Run {
    pub daemon: Daemon,
    pub setup: Setup,
}

impl Run {
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    pub fn log(&self) -> String {
        self.daemon.log_text()
    }

    /// Waits until the log contains `needle`; returns how long that took.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Duration {
        self.daemon.wait_log(needle, timeout)
    }

    pub fn dest(&self) -> &Path {
        &self.setup.dest
    }

    pub fn config(&self) -> &Path {
        &self.setup.config
    }

    pub fn admin(&self) -> Admin {
        self.setup.admin
    }

    /// SIGSTOP: the daemon keeps its sockets and does nothing.
    pub fn freeze(&self) {
        signal(self.pid(), Signal::SIGSTOP);
    }

    /// SIGCONT after [`Run::freeze`].
    pub fn thaw(&self) {
        signal(self.pid(), Signal::SIGCONT);
    }

    /// SIGTERM, then the exit code (SIGKILL after 15 s without one).
    pub fn terminate(&mut self) -> Option<i32> {
        let code = self.daemon.terminate(Duration::from_secs(15));
        if code.is_none() {
            self.daemon.kill();
        }
        code
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.daemon.kill();
        if show_logs() {
            eprintln!("haconfd log:\n{}", self.log());
        }
    }
}

/// A running `haconfd announce`: killed by PID on drop (no drain: the test is over), its log
/// printed when the test fails.
pub struct Announce {
    pub child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Announce {
    /// `haconfd announce ARGS` with its log at `info`.
    pub fn start<S: AsRef<OsStr>>(args: &[S]) -> Announce {
        Announce::start_logging(args, "info")
    }

    /// `haconfd announce ARGS` with `HACONFD_LOG=filter`, in a temp dir of its own.
    pub fn start_logging<S: AsRef<OsStr>>(args: &[S], filter: &str) -> Announce {
        let dir = tempfile::Builder::new()
            .prefix("haconfd-announce-")
            .tempdir()
            .expect("tempdir");
        let log = dir.path().join("announce.log");
        let err = File::create(&log).expect("log file");
        let child = Command::new(haconfd_bin())
            .arg("announce")
            .args(args)
            .env_remove("HACONFD_CONFIG")
            .env("HACONFD_LOG", filter)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start haconfd announce");
        Announce {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: Signal) {
        signal(self.child.id(), sig);
    }

    /// Waits (bounded) for the exit; returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        super::wait_exit(&mut self.child, timeout)
    }

    /// SIGTERM, then waits (bounded) for the exit; the exit code (SIGKILL without one).
    pub fn stop(&mut self, timeout: Duration) -> Option<i32> {
        self.signal(Signal::SIGTERM);
        let code = self.wait_exit(timeout);
        if code.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        code
    }
}

impl Drop for Announce {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if show_logs() {
            eprintln!("--- announce log:\n{}", self.log());
        }
    }
}
