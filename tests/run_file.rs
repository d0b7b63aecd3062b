//! `haconfd run` over the file source: it follows the registry and the template, keeps the last
//! good config when the registry breaks, and with `supervise` drives a real HAProxy that serves
//! local backends and is stopped with haconfd.

mod common;

use std::time::Duration;

use common::haproxy::{
    Backend, Opts, PidGuard, Workspace, http_get, instances, master_pid, pid_alive, serves,
};
use common::wait_for;

/// Generous bounds: they only cap a failing test, the tests never wait them out when passing.
const SETTLE: Duration = Duration::from_secs(30);

fn registry(instances: &[(&str, String)]) -> String {
    let mut text = String::from("services:\n  web:\n");
    for (id, addr) in instances {
        text.push_str(&format!("    {id}: \"{addr}\"\n"));
    }
    text
}

#[test]
fn run_follows_registry_and_template_and_keeps_the_last_good_config() {
    let mut ws = Workspace::new("yaml");
    ws.set_template(&Workspace::default_template());
    ws.write_registry(registry(&[("w1", "127.0.0.1:8080".into())]));
    ws.write_config(&Opts::default());
    let mut daemon = ws.spawn_run();

    let has = |needle: &str| {
        let needle = needle.to_owned();
        let ws = &ws;
        move || ws.dest_text().filter(|t| t.contains(&needle))
    };
    let serving = |id: &str, addr: &str| {
        let (id, addr) = (id.to_owned(), addr.to_owned());
        let ws = &ws;
        move || ws.dest_text().filter(|t| serves(t, &id, &addr))
    };
    wait_for(SETTLE, "the first render", serving("w1", "127.0.0.1:8080"));

    // A registry change is rendered.
    ws.write_registry(registry(&[
        ("w1", "127.0.0.1:8081".into()),
        ("w2", "127.0.0.1:8082".into()),
    ]));
    let text = wait_for(
        SETTLE,
        "the second registry",
        serving("w2", "127.0.0.1:8082"),
    );
    assert!(serves(&text, "w1", "127.0.0.1:8081"), "{text}");
    assert_eq!(instances(&text).len(), 2, "{text}");

    // A template change is rendered with the current data.
    let template = Workspace::default_template();
    ws.write_template(&format!("{template}# marker-1\n"));
    let text = wait_for(SETTLE, "the template change", has("# marker-1"));
    assert!(serves(&text, "w2", "127.0.0.1:8082"), "{text}");

    // A registry with a syntax error is reported and the last good state stays.
    ws.write_registry("services:\n  web: [unclosed\n");
    wait_for(SETTLE, "the syntax error in the log", || {
        daemon
            .log_text()
            .contains("registry file unreadable")
            .then_some(())
    });
    ws.write_template(&format!("{template}# marker-2\n"));
    let text = wait_for(
        SETTLE,
        "the re-render after the bad registry",
        has("# marker-2"),
    );
    assert!(
        serves(&text, "w1", "127.0.0.1:8081") && serves(&text, "w2", "127.0.0.1:8082"),
        "the last good registry was not kept:\n{text}"
    );

    // A fixed registry is picked up again (as many instances as before: no shrink to guard).
    ws.write_registry(registry(&[
        ("w3", "127.0.0.1:8083".into()),
        ("w4", "127.0.0.1:8084".into()),
    ]));
    let text = wait_for(
        SETTLE,
        "the fixed registry",
        serving("w3", "127.0.0.1:8083"),
    );
    assert!(serves(&text, "w4", "127.0.0.1:8084"), "{text}");
    assert_eq!(instances(&text).len(), 2, "{text}");

    assert_eq!(daemon.terminate(SETTLE), Some(0), "{}", daemon.log_text());
    // No staged file is left beside the dest.
    assert_eq!(ws.dest_dir_names(), ["haproxy.cfg", "haproxy.cfg.prev"]);
}

#[test]
fn a_template_that_breaks_keeps_the_last_good_config() {
    let mut ws = Workspace::new("yaml");
    ws.set_template(&Workspace::default_template());
    ws.write_registry(registry(&[("w1", "127.0.0.1:8080".into())]));
    ws.write_config(&Opts::default());
    let mut daemon = ws.spawn_run();
    let good = wait_for(SETTLE, "the first render", || {
        ws.dest_text().filter(|t| serves(t, "w1", "127.0.0.1:8080"))
    });

    // A template that does not parse is rejected; one that fails haproxy -c is not installed.
    ws.write_template("global\n{% if %}\n");
    wait_for(SETTLE, "the template rejection", || {
        daemon
            .log_text()
            .contains("templates rejected")
            .then_some(())
    });
    let invalid = Workspace::default_template().replace(
        "    option redispatch\n",
        "    option redispatch\n    frobnicate-the-widgets on\n",
    );
    ws.write_template(&invalid);
    wait_for(SETTLE, "the haproxy -c failure", || {
        daemon
            .log_text()
            .contains("frobnicate-the-widgets")
            .then_some(())
    });
    assert_eq!(ws.dest_text().as_deref(), Some(good.as_str()));
    // A later event for the same template write may be staging and checking right now: wait
    // for it to clean up after itself.
    wait_for(SETTLE, "no staged file left behind", || {
        (ws.dest_dir_names() == ["haproxy.cfg"]).then_some(())
    });
    assert_eq!(ws.dest_text().as_deref(), Some(good.as_str()));
    assert_eq!(daemon.terminate(SETTLE), Some(0), "{}", daemon.log_text());
}

#[test]
fn supervised_haproxy_serves_the_registry_and_stops_with_haconfd() {
    let a = Backend::start("backend-A");
    let b = Backend::start("backend-B");
    let ws = Workspace::new("yaml");
    ws.write_registry(registry(&[("a", format!("127.0.0.1:{}", a.port))]));
    ws.write_config(&Opts {
        mode: "supervise",
        ..Opts::default()
    });
    let mut daemon = ws.spawn_run();
    let port = ws.bind_port;
    let get = || http_get(port, "web", "/").ok();

    let first = wait_for(SETTLE, "HAProxy to serve backend A", || {
        get().filter(|r| r.status == 200)
    });
    assert_eq!(first.body, "backend-A", "{}", daemon.log_text());
    // An unknown host gets the 404 backend; the monitor URI answers for the ELB.
    let other = http_get(port, "nosuch.localhost", "/").expect("404 backend");
    assert_eq!(other.status, 404);
    let health = http_get(port, "anything", "/_haconfd/health").expect("monitor uri");
    assert_eq!(health.status, 200);

    let master = wait_for(SETTLE, "the master PID", || master_pid(&ws.master_socket()));
    let _guard = PidGuard(Some(master));
    assert!(pid_alive(master));

    ws.write_registry(registry(&[("b", format!("127.0.0.1:{}", b.port))]));
    wait_for(SETTLE, "HAProxy to serve backend B", || {
        get().filter(|r| r.status == 200 && r.body == "backend-B")
    });
    // The reload kept the same master (its socket is briefly gone while it re-executes).
    let after = wait_for(SETTLE, "the master socket after the reload", || {
        master_pid(&ws.master_socket())
    });
    assert_eq!(after, master);

    daemon.stop_with_master(master);
    assert!(http_get(port, "web", "/").is_err(), "HAProxy still listens");
}

/// The guard remembers per-service counts beside dest: a restart over a registry that lost
/// most of a service writes nothing until the operator confirms (or `confirm_after`).
#[test]
fn a_restart_over_a_collapsed_registry_keeps_the_installed_config_until_confirmed() {
    let ws = Workspace::new("yaml");
    let four: Vec<(&str, String)> = (1..=4)
        .map(|i| {
            (
                ["w1", "w2", "w3", "w4"][i - 1],
                format!("127.0.0.1:{}", 8080 + i),
            )
        })
        .collect();
    ws.write_registry(registry(&four));
    ws.write_config(&Opts::default());
    let mut daemon = ws.spawn_run();
    let full = wait_for(SETTLE, "four instances", || {
        ws.dest_text().filter(|t| instances(t).len() == 4)
    });
    assert_eq!(daemon.terminate(SETTLE), Some(0), "{}", daemon.log_text());

    // Three of four vanished while haconfd was down.
    ws.write_registry(registry(&four[..1]));
    let mut daemon = ws.spawn_run();
    wait_for(SETTLE, "the guard's hold in the log", || {
        daemon
            .log_text()
            .contains("collapsed since the last run")
            .then_some(())
    });
    assert_eq!(ws.dest_text().as_deref(), Some(full.as_str()));

    common::haproxy::signal(daemon.pid(), nix::sys::signal::Signal::SIGUSR1);
    wait_for(SETTLE, "the confirmed shrink", || {
        ws.dest_text().filter(|t| instances(t).len() == 1)
    });
    assert_eq!(daemon.terminate(SETTLE), Some(0), "{}", daemon.log_text());
}

/// A bad key that stays is logged once, not at every change; fixing it is logged too.
#[test]
fn a_bad_key_is_logged_once_while_it_stays() {
    let ws = Workspace::new("yaml");
    let with_bad = |port: u16, bad: &str| {
        format!("services:\n  web:\n    w1: \"127.0.0.1:{port}\"\n    w2: \"{bad}\"\n")
    };
    ws.write_registry(with_bad(8081, "127.0.0.1:99999"));
    ws.write_config(&Opts::default());
    let mut daemon = ws.spawn_run();
    for port in [8082, 8083] {
        wait_for(SETTLE, "the previous change", || {
            ws.dest_text()
                .filter(|t| serves(t, "w1", &format!("127.0.0.1:{}", port - 1)))
        });
        ws.write_registry(with_bad(port, "127.0.0.1:99999"));
    }
    wait_for(SETTLE, "the last change", || {
        ws.dest_text().filter(|t| serves(t, "w1", "127.0.0.1:8083"))
    });
    let count = |log: &str, what: &str| {
        log.lines()
            .filter(|l| l.contains(what) && l.contains("/services/web/w2"))
            .count()
    };
    assert_eq!(
        count(&daemon.log_text(), "key left out"),
        1,
        "{}",
        daemon.log_text()
    );

    ws.write_registry(with_bad(8083, "127.0.0.1:8084"));
    wait_for(SETTLE, "the fixed key", || {
        ws.dest_text().filter(|t| serves(t, "w2", "127.0.0.1:8084"))
    });
    wait_for(SETTLE, "the fix in the log", || {
        (count(&daemon.log_text(), "key no longer left out") == 1).then_some(())
    });
    assert_eq!(daemon.terminate(SETTLE), Some(0), "{}", daemon.log_text());
}
