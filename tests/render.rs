//! Snapshot tests of the default template, `templates/haproxy.cfg.tera`.
//!
//! Each case renders `tests/fixtures/<case>.yaml` (a registry file, read by the file source)
//! through the library with one fixed test config, compares the bytes with
//! `tests/snapshots/<case>.cfg`, and proves them with the real `haproxy -c`. A mismatch prints a
//! unified diff.
//!
//! To accept a deliberate change of the template, rewrite the snapshots and review the diff:
//!
//! ```text
//! UPDATE_SNAPSHOTS=1 cargo test --test render
//! git diff tests/snapshots/
//! ```
//!
//! Fixtures use 127.0.0.0/8 and ::1 only: HAProxy health-checks every address it renders.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use haconfd::config::Config;
use haconfd::haproxy::validate;
use haconfd::model::Registry;
use haconfd::render::Templates;
use haconfd::source::{Update, file};

/// The test config: fixed socket paths and port so that snapshots do not depend on the machine.
/// `haproxy -c` neither binds the frontend nor opens the sockets.
const CONFIG: &str = r#"
[source]
kind = "file"
[file]
path = "unused.yaml"
[[template]]
name = "haproxy"
src = "TEMPLATE"
dest = "/run/haconfd-test/haproxy.cfg"
[haproxy]
mode = "none"
master_socket = "/run/haconfd-test/master.sock"
runtime_socket = "/run/haconfd-test/admin.sock"
state_file = "/run/haconfd-test/server-state"
spare_slots = 2
[frontend]
bind = ["127.0.0.1:18080", "[::1]:18080"]
default_domain = "localhost"
"#;

fn config() -> Config {
    let template = common::repo().join("templates/haproxy.cfg.tera");
    let text = CONFIG.replace("TEMPLATE", &template.display().to_string());
    Config::parse(&text, "tests/render.rs").expect("the test config is valid")
}

/// Renders a registry file with the default template; every key of a fixture must be accepted.
fn render_file(path: &Path) -> String {
    let config = config();
    let mut templates = Templates::load(&config).expect("the default template loads");
    let pairs = file::read(path).expect("the fixture reads");
    let update = Update::screen(1, &config.source.prefixes, pairs);
    assert!(
        update.rejected.is_empty(),
        "{}: screen rejected {:?}",
        path.display(),
        update.rejected
    );
    let (mut registry, rejected) = Registry::parse(&update.snapshot);
    // The daemon's slot layout: instances in stable slots, then spare (disabled) ones.
    haconfd::slots::Slots::default().assign(&mut registry, templates.spare_slots(), true);
    assert!(
        rejected.is_empty(),
        "{}: registry rejected {:?}",
        path.display(),
        rejected
    );
    let rendered = templates
        .render_all(&Arc::clone(&update.snapshot), &registry)
        .expect("the default template renders");
    String::from_utf8(rendered[0].bytes.clone()).expect("the render is UTF-8")
}

/// Proves a rendered config with the real `haproxy -c`.
fn haproxy_check(name: &str, text: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(format!("{name}.cfg"));
    std::fs::write(&path, text).expect("write rendered config");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(validate::check("haproxy", &path, Duration::from_secs(60))) {
        panic!("{name}: the rendered config fails haproxy -c:\n{e}");
    }
}

fn updating() -> bool {
    std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1")
}

fn snapshot_path(name: &str) -> PathBuf {
    common::repo().join(format!("tests/snapshots/{name}.cfg"))
}

/// The one helper: render the fixture, compare with (or, with UPDATE_SNAPSHOTS=1, rewrite) the
/// snapshot, and prove the render with `haproxy -c`.
fn check(name: &str) {
    let fixture = common::repo().join(format!("tests/fixtures/{name}.yaml"));
    let actual = render_file(&fixture);
    let snap = snapshot_path(name);
    if updating() {
        std::fs::write(&snap, &actual).expect("write snapshot");
    } else {
        let expected = std::fs::read_to_string(&snap).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run UPDATE_SNAPSHOTS=1 cargo test --test render to create it",
                snap.display()
            )
        });
        if expected != actual {
            let diff = similar::TextDiff::from_lines(&expected, &actual)
                .unified_diff()
                .context_radius(3)
                .header(&snap.display().to_string(), "rendered")
                .to_string();
            panic!(
                "{name}: the render differs from its snapshot \
                 (UPDATE_SNAPSHOTS=1 cargo test --test render accepts it):\n{diff}"
            );
        }
    }
    haproxy_check(name, &actual);
}

#[test]
fn empty_registry() {
    check("empty");
}

#[test]
fn one_service() {
    check("one_service");
}

#[test]
fn many_services() {
    check("many_services");
}

#[test]
fn ipv6_instances() {
    check("ipv6");
}

#[test]
fn hostname_instances() {
    check("hostnames");
}

#[test]
fn routes() {
    check("routes");
}

#[test]
fn weights_and_states() {
    check("weights_states");
}

#[test]
fn names_with_every_allowed_character() {
    check("names");
}

/// Every fixture has a snapshot and every snapshot a fixture, so neither is silently skipped.
#[test]
fn fixtures_and_snapshots_pair_up() {
    if updating() {
        return; // The snapshots are being written concurrently.
    }
    let stems = |dir: &str, ext: &str| {
        let mut v: Vec<String> = std::fs::read_dir(common::repo().join(dir))
            .expect("read dir")
            .filter_map(|e| {
                let p = e.expect("entry").path();
                (p.extension()? == ext)
                    .then(|| p.file_stem())?
                    .map(|s| s.to_string_lossy().into_owned())
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        stems("tests/fixtures", "yaml"),
        stems("tests/snapshots", "cfg")
    );
}

/// The registry fixtures, `tests/fixtures/*.yaml`, sorted.
fn fixtures() -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(common::repo().join("tests/fixtures"))
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    paths
}

/// The fixtures hold loopback addresses only: HAProxy health-checks whatever it renders.
#[test]
fn fixtures_hold_loopback_addresses_only() {
    for path in fixtures() {
        let config = config();
        let update = Update::screen(1, &config.source.prefixes, file::read(&path).expect("read"));
        let (registry, _) = Registry::parse(&update.snapshot);
        for s in &registry.services {
            for i in &s.instances {
                let ok = match i.host.parse::<std::net::IpAddr>() {
                    Ok(ip) => ip.is_loopback(),
                    Err(_) => i.host == "localhost" || i.host == "localhost.",
                };
                assert!(
                    ok,
                    "{}: {} is not a loopback address",
                    path.display(),
                    i.addr
                );
            }
        }
    }
}

/// The default template passes its own structural check when it is rendered: over every
/// fixture, the render has no guarded directive (`global`, `stats socket`, `lua-load`, …) more
/// often than the template's own text, has exactly the template's `global` and `stats socket`,
/// and passes `haproxy -c`.
#[test]
fn default_template_passes_its_own_check() {
    use haconfd::render::structure;
    let source = std::fs::read_to_string(common::repo().join("templates/haproxy.cfg.tera"))
        .expect("read the default template");
    let allowed = structure::count(&source);
    assert_eq!(
        (allowed.get("global"), allowed.get("stats socket")),
        (Some(&1), Some(&1)),
        "the template's own guarded directives: {allowed:?}"
    );
    let fixtures = fixtures();
    assert!(fixtures.len() >= 8, "{fixtures:?}");
    for path in fixtures {
        let name = path
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .into_owned();
        let rendered = render_file(&path);
        if let Err(v) = structure::check(&allowed, &rendered) {
            panic!("{name}: the render fails the template's own check: {v:?}\n{rendered}");
        }
        assert_eq!(
            structure::count(&rendered),
            allowed,
            "{name}: the render's guarded directives are not the template's own"
        );
        haproxy_check(&name, &rendered);
    }
}

/// Regression: 64 hosts or paths on one acl line exceeded HAProxy's 64 words per line, so one
/// route the model accepts failed `haproxy -c` for the whole config.
#[test]
fn route_at_the_limits() {
    check("route_limits");
}
