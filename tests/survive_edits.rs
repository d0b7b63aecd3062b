//! Signals and edits (issue 11, "Signals and edits"): a burst of SIGHUPs is one reconfigure, and
//! a template or config edited into one that does not work keeps the last good ones running,
//! with the reason (line and column where the parser gives them) in the log and on `/readyz`.
//!
//! Each case drives a file-source `haconfd run` that supervises a real HAProxy.

mod common;

use std::time::Duration;

use common::admin::Admin;
use common::haproxy::{Daemon, Opts, Workspace, master_pid, serves, signal};
use common::wait_for;
use nix::sys::signal::Signal;

/// Generous bounds: they only cap a failing test.
const SETTLE: Duration = Duration::from_secs(30);
/// Longer than the workspace's `[wait] max` (500 ms) with room for a slow machine: a burst of
/// signals has been taken in whole once this has passed after its last signal.
const GATHERED: Duration = Duration::from_secs(3);

const RELOADED: &str = "config and templates reloaded";
const REJECTED: &str = "config or templates rejected; keeping the last good ones";

fn registry(ids: &[&str]) -> String {
    let mut s = String::from("services:\n  web:\n");
    for (i, id) in ids.iter().enumerate() {
        s.push_str(&format!("    {id}: \"127.0.0.1:{}\"\n", 18301 + i));
    }
    s
}

/// A supervised daemon on the workspace's own copy of the default template, applied once.
struct Case {
    ws: Workspace,
    daemon: Daemon,
    admin: Admin,
    opts: Opts,
}

impl Case {
    fn start() -> Case {
        let mut ws = Workspace::new("yaml");
        ws.set_template(&Workspace::default_template());
        ws.write_registry(registry(&["a"]));
        let opts = Opts {
            mode: "supervise",
            ..Opts::default()
        };
        ws.write_config(&opts);
        let admin = ws.admin().expect("admin port");
        let daemon = ws.spawn_run();
        let case = Case {
            ws,
            daemon,
            admin,
            opts,
        };
        case.wait_serving("a", 0);
        wait_for(SETTLE, "/readyz to say ready", || {
            case.get("/readyz").filter(|(s, _)| *s == 200)
        });
        case
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        self.admin.get(path)
    }

    /// The value of a metric without labels.
    fn metric(&self, name: &str) -> Option<f64> {
        self.admin.metric(name)
    }

    fn count(&self, needle: &str) -> usize {
        self.daemon.log_text().matches(needle).count()
    }

    fn wait_serving(&self, id: &str, index: u16) {
        let addr = format!("127.0.0.1:{}", 18301 + index);
        wait_for(SETTLE, &format!("instance {id} in the file"), || {
            self.ws.dest_text().filter(|t| serves(t, id, &addr))
        });
    }

    fn wait_log(&self, needle: &str, n: usize) -> String {
        wait_for(SETTLE, &format!("{n} log line(s) with {needle:?}"), || {
            let log = self.daemon.log_text();
            (log.matches(needle).count() >= n).then_some(log)
        })
    }

    /// HAProxy's reload counter, from the master's `show proc` (which does not answer while
    /// HAProxy re-executes for a reload).
    fn reloads(&self) -> u32 {
        wait_for(SETTLE, "the master's reload counter", || {
            let out = common::haproxy::cli_command(&self.ws.master_socket(), "show proc")?;
            out.lines()
                .find(|l| l.contains("master"))
                .and_then(|l| l.split_whitespace().nth(2))
                .and_then(|n| n.parse().ok())
        })
    }

    fn sighups(&self, n: usize) {
        for _ in 0..n {
            signal(self.daemon.pid(), Signal::SIGHUP);
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(GATHERED);
    }

    /// `/readyz` once it carries a line with `needle`, asserting that it stays 200.
    fn readyz_with(&self, needle: &str) -> String {
        let (status, body) = wait_for(SETTLE, &format!("/readyz to mention {needle:?}"), || {
            self.get("/readyz").filter(|(_, b)| b.contains(needle))
        });
        assert_eq!(status, 200, "the last good config still serves: {body}");
        body
    }

    fn stop(mut self) {
        // The master socket does not answer while HAProxy re-executes for a reload.
        let master = wait_for(SETTLE, "the master's PID", || {
            master_pid(&self.ws.master_socket())
        });
        self.daemon.stop_with_master(master);
    }
}

#[test]
fn a_hundred_sighups_in_a_second_are_one_reconfigure() {
    let case = Case::start();
    let reloads = case.reloads();

    // Unchanged files: the first SIGHUP reads them (nothing was read since the start), the
    // rest of the burst finds them as they were. Before, the burst was two reloads of the
    // config and templates: the first at once, the rest gathered into a second.
    case.sighups(100);
    assert_eq!(case.count(RELOADED), 1, "{}", case.daemon.log_text());
    assert_eq!(
        case.reloads(),
        reloads,
        "same files, same render: HAProxy not reloaded"
    );

    // An edit, then another burst: the template is read once, and HAProxy reloads once.
    let edited = format!("# edited\n{}", Workspace::default_template());
    case.ws.write_template(&edited);
    case.sighups(100);
    case.wait_log(RELOADED, 2);
    assert_eq!(case.count(RELOADED), 2, "{}", case.daemon.log_text());
    wait_for(SETTLE, "the edited template installed", || {
        case.ws.dest_text().filter(|t| t.starts_with("# edited"))
    });
    assert_eq!(case.reloads(), reloads + 1);

    // Still answering: a registry change applies.
    case.ws.write_registry(registry(&["a", "b"]));
    case.wait_serving("b", 1);
    case.stop();
}

#[test]
fn a_template_that_does_not_parse_keeps_the_last_good_one() {
    let case = Case::start();
    assert_eq!(case.metric("haconfd_config_rejected"), Some(0.0));

    // Line 3, column 4 is where tera sees the broken tag.
    let broken = format!(
        "# one\n# two\n{{{{ foo( }}}}\n{}",
        Workspace::default_template()
    );
    case.ws.write_template(&broken);
    let log = case.wait_log(REJECTED, 1);
    let line = log
        .lines()
        .find(|l| l.contains(REJECTED))
        .expect("the rejection line");
    assert!(line.contains("at line 3, column"), "{line}");
    assert!(line.contains("haproxy.cfg.tera"), "names the file: {line}");
    let body = case.readyz_with("at line 3, column");
    assert!(body.starts_with("ready\n"), "{body}");
    assert_eq!(case.metric("haconfd_config_rejected"), Some(1.0));

    // The last good template goes on rendering registry changes.
    case.ws.write_registry(registry(&["a", "b"]));
    case.wait_serving("b", 1);

    // Fixed: the note goes, and the fixed template is installed.
    let fixed = format!("# fixed\n{}", Workspace::default_template());
    case.ws.write_template(&fixed);
    wait_for(SETTLE, "the fixed template installed", || {
        case.ws.dest_text().filter(|t| t.starts_with("# fixed"))
    });
    wait_for(SETTLE, "/readyz without the note", || {
        case.get("/readyz")
            .filter(|(s, b)| *s == 200 && !b.contains("last good config"))
    });
    assert_eq!(case.metric("haconfd_config_rejected"), Some(0.0));
    case.stop();
}

#[test]
fn a_template_that_does_not_render_keeps_the_last_good_one() {
    let case = Case::start();
    // Parses, but a strict render fails on the undefined variable: before, the new template
    // replaced the good one and every later change failed to apply.
    let broken = format!(
        "# {{{{ no_such_variable }}}}\n{}",
        Workspace::default_template()
    );
    case.ws.write_template(&broken);
    case.wait_log("keeping the last good config and templates", 1);
    let body = case.readyz_with("rejected");
    assert!(body.contains("no_such_variable"), "{body}");
    assert_eq!(case.metric("haconfd_config_rejected"), Some(1.0));

    case.ws.write_registry(registry(&["a", "b"]));
    // Before, this change failed to render: the broken template had replaced the good one.
    case.wait_serving("b", 1);

    // The same broken file, sent again with SIGHUP, is tried again and rejected again.
    signal(case.daemon.pid(), Signal::SIGHUP);
    case.wait_log("keeping the last good config and templates", 2);
    case.stop();
}

#[test]
fn a_config_edited_into_an_invalid_one_keeps_the_last_good_one() {
    let case = Case::start();
    let good = case.ws.config_text(&case.opts);

    // Not TOML: the log and /readyz say where.
    let broken = good.replacen("[wait]", "[wait", 1);
    let line = broken
        .lines()
        .position(|l| l == "[wait")
        .expect("the broken line")
        + 1;
    common::write_atomic(&case.ws.config, broken.as_bytes());
    let log = case.wait_log(REJECTED, 1);
    let at = format!("at line {line}, column");
    assert!(
        log.lines().any(|l| l.contains(REJECTED) && l.contains(&at)),
        "{at}: {log}"
    );
    case.readyz_with(&at);
    assert_eq!(case.metric("haconfd_config_rejected"), Some(1.0));

    // TOML, but a value haconfd rejects: the key is named.
    let invalid = good.replacen("min = \"50ms\"", "min = \"soon\"", 1);
    common::write_atomic(&case.ws.config, invalid.as_bytes());
    case.readyz_with("wait.min");

    // Changes still apply on the last good config.
    case.ws.write_registry(registry(&["a", "b"]));
    case.wait_serving("b", 1);

    common::write_atomic(&case.ws.config, good.as_bytes());
    wait_for(SETTLE, "/readyz without the note", || {
        case.get("/readyz")
            .filter(|(s, b)| *s == 200 && !b.contains("last good config"))
    });
    assert_eq!(case.metric("haconfd_config_rejected"), Some(0.0));
    case.stop();
}
