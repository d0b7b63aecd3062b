//! One bad registration never freezes the fleet (PRODUCT.md §7): a value that passes the screen
//! but makes `haproxy -c` fail holds back only its own service's changes; the others land, and
//! the held-back keys are reported. The custom template puts an instance's `meta.opt` on its
//! server line, so a meta value HAProxy does not know as a keyword fails the check.

mod common;

use std::time::Duration;

use common::haproxy::{META_TEMPLATE as TEMPLATE, Opts, Workspace, serves};
use common::wait_for;

fn registry(api_opt: &str, web_port: u16) -> String {
    format!(
        "services:\n  api:\n    a1: '{{\"addr\":\"127.0.0.1:9001\",\"meta\":{{\"opt\":\"{api_opt}\"}}}}'\n  web:\n    w1: \"127.0.0.1:{web_port}\"\n"
    )
}

const SETTLE: Duration = Duration::from_secs(15);

#[test]
fn a_value_that_fails_haproxy_c_holds_back_only_its_service() {
    let mut ws = Workspace::new("yaml");
    ws.set_template(TEMPLATE);
    ws.write_config(&Opts::default());
    ws.write_registry(registry("check", 8001));
    let mut daemon = ws.spawn_run();
    wait_for(SETTLE, "the first render", || {
        ws.dest_text().filter(|t| serves(t, "w1", "127.0.0.1:8001"))
    });

    // api's meta turns into an unknown server keyword; web moves at the same time.
    ws.write_registry(registry("no-such-keyword", 8002));
    let text = wait_for(SETTLE, "web's change to land", || {
        ws.dest_text().filter(|t| serves(t, "w1", "127.0.0.1:8002"))
    });
    assert!(!text.contains("no-such-keyword"), "{text}");
    assert!(
        text.contains("127.0.0.1:9001 check"),
        "api keeps its last applied line:\n{text}"
    );
    let log = wait_for(SETTLE, "the held-back key in the log", || {
        Some(daemon.log_text()).filter(|l| l.contains("/services/api/a1"))
    });
    assert!(log.contains("applying without their changes"), "{log}");

    // Fixing the value releases it.
    ws.write_registry(registry("backup", 8002));
    wait_for(SETTLE, "api's fixed value", || {
        ws.dest_text()
            .filter(|t| t.contains("127.0.0.1:9001 backup"))
    });
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}

#[test]
fn a_failure_outside_any_service_keeps_the_last_good_config() {
    let mut ws = Workspace::new("yaml");
    ws.set_template(TEMPLATE);
    ws.write_config(&Opts::default());
    ws.write_registry(registry("check", 8001));
    let mut daemon = ws.spawn_run();
    let before = wait_for(SETTLE, "the first render", || {
        ws.dest_text().filter(|t| serves(t, "w1", "127.0.0.1:8001"))
    });
    // A template error in the defaults section belongs to no service: nothing is isolated.
    ws.write_template(&TEMPLATE.replace(
        "timeout server 1s",
        "timeout server 1s\n    bogus-directive",
    ));
    wait_for(SETTLE, "the check failure in the log", || {
        Some(daemon.log_text()).filter(|l| l.contains("bogus-directive"))
    });
    assert_eq!(ws.dest_text().as_deref(), Some(before.as_str()));
    assert_eq!(daemon.terminate(Duration::from_secs(10)), Some(0));
}
