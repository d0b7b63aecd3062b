//! Atomic install: `dest` is always the whole old or the whole new file.
//!
//! Through the library (`haproxy::install::install`) and through the one-shot `haconfd render`
//! with `[haproxy] mode = "none"`, which installs and reloads nothing.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::haproxy::{Opts, Workspace, serves};
use haconfd::config::TemplateConfig;
use haconfd::haproxy::install::{self, Check, InstallError, Outcome};

const REGISTRY_V1: &str = "services:\n  web:\n    w1: \"127.0.0.1:8080\"\n";
const REGISTRY_V2: &str = "services:\n  web:\n    w1: \"127.0.0.1:8081\"\n";

/// What identifies one version of a file on disk: inode, mtime and ctime in nanoseconds.
fn stamp(p: &Path) -> (u64, i64, i64, i64, i64) {
    let m = std::fs::metadata(p).expect("stat");
    (
        m.ino(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    )
}

/// `haconfd render` (one shot) in `ws`, which must succeed.
fn render_ok(ws: &Workspace) {
    let out = ws.haconfd(&["render"]);
    common::assert_exit(&out, 0);
}

fn template_config(dest: &Path, mode: u32) -> TemplateConfig {
    TemplateConfig {
        name: "haproxy".into(),
        src: "unused.tera".into(),
        dest: dest.to_owned(),
        mode,
        owner: None,
        group: None,
        check: true,
        map: false,
    }
}

fn haproxy_check() -> Check {
    Check {
        binary: "haproxy".into(),
        timeout: Duration::from_secs(60),
        user: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

const VALID: &str = "defaults\n    mode http\n    timeout connect 1s\n    timeout client 1s\n    timeout server 1s\nbackend b\n    server s1 127.0.0.1:8080\n";
const INVALID: &str = "defaults\n    mode http\nbackend b\n    frobnicate-the-widgets on\n";

#[test]
fn failed_check_leaves_dest_byte_identical_and_no_staged_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("haproxy.cfg");
    std::fs::write(&dest, VALID).expect("write dest");
    let before = stamp(&dest);
    let t = template_config(&dest, 0o640);
    let result = runtime().block_on(install::install(
        &t,
        INVALID.as_bytes(),
        Some(&haproxy_check()),
    ));
    match result {
        Err(InstallError::Invalid(e)) => {
            assert!(e.to_string().contains("frobnicate-the-widgets"), "{e}")
        }
        other => panic!("expected a failed haproxy -c, got {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&dest).expect("read"), VALID);
    assert_eq!(stamp(&dest), before, "dest was touched");
    assert_eq!(
        common::dir_names(dir.path()),
        ["haproxy.cfg"],
        "staged files left behind"
    );
}

#[test]
fn failed_check_in_a_one_shot_render_leaves_dest_alone() {
    let mut ws = Workspace::new("yaml");
    ws.write_registry(REGISTRY_V1);
    ws.write_config(&Opts::default());
    render_ok(&ws);
    let good = std::fs::read(&ws.dest).expect("installed");
    let before = stamp(&ws.dest);

    let bad = Workspace::default_template().replace(
        "    option redispatch\n",
        "    option redispatch\n    frobnicate-the-widgets on\n",
    );
    ws.set_template(&bad);
    ws.write_config(&Opts::default());
    ws.write_registry(REGISTRY_V2);
    let out = ws.haconfd(&["render"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("frobnicate-the-widgets"), "{err}");
    assert_eq!(std::fs::read(&ws.dest).expect("dest"), good);
    assert_eq!(stamp(&ws.dest), before);
    assert_eq!(
        ws.dest_dir_names(),
        ["haproxy.cfg"],
        "staged files left behind"
    );
}

#[test]
fn an_unchanged_render_writes_nothing() {
    let ws = Workspace::new("yaml");
    ws.write_registry(REGISTRY_V1);
    ws.write_config(&Opts::default());
    render_ok(&ws);
    let first = stamp(&ws.dest);
    let bytes = std::fs::read(&ws.dest).expect("dest");
    render_ok(&ws);
    assert_eq!(
        stamp(&ws.dest),
        first,
        "an unchanged render rewrote the dest"
    );
    assert_eq!(std::fs::read(&ws.dest).expect("dest"), bytes);
    assert_eq!(
        ws.dest_dir_names(),
        ["haproxy.cfg"],
        "no .prev without a change"
    );
}

#[test]
fn install_of_equal_bytes_is_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("haproxy.cfg");
    let t = template_config(&dest, 0o644);
    let rt = runtime();
    let install_valid = || {
        rt.block_on(install::install(
            &t,
            VALID.as_bytes(),
            Some(&haproxy_check()),
        ))
        .expect("install")
    };
    let first = install_valid();
    assert_eq!(first, Outcome::Installed { previous: None });
    let before = stamp(&dest);
    let again = install_valid();
    assert_eq!(again, Outcome::Unchanged);
    assert_eq!(stamp(&dest), before);
    assert_eq!(common::dir_names(dir.path()), ["haproxy.cfg"]);
}

#[test]
fn the_configured_mode_is_applied() {
    for (mode, want) in [("0640", 0o640), ("0604", 0o604), ("0600", 0o600)] {
        let ws = Workspace::new("yaml");
        ws.write_registry(REGISTRY_V1);
        let opts = Opts {
            file_mode: mode,
            ..Opts::default()
        };
        ws.write_config(&opts);
        render_ok(&ws);
        let perm = mode_of(&ws.dest);
        assert_eq!(perm, want, "mode {mode}");
        // A later change keeps the mode.
        ws.write_registry(REGISTRY_V2);
        render_ok(&ws);
        let perm = mode_of(&ws.dest);
        assert_eq!(perm, want, "mode {mode} after a change");
    }
}

/// The permission bits of `path`.
fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

#[test]
fn prev_holds_the_previous_file_after_a_change() {
    let ws = Workspace::new("yaml");
    ws.write_registry(REGISTRY_V1);
    ws.write_config(&Opts::default());
    render_ok(&ws);
    let v1 = std::fs::read_to_string(&ws.dest).expect("v1");
    assert!(serves(&v1, "w1", "127.0.0.1:8080"), "{v1}");

    ws.write_registry(REGISTRY_V2);
    render_ok(&ws);
    let v2 = std::fs::read_to_string(&ws.dest).expect("v2");
    assert!(serves(&v2, "w1", "127.0.0.1:8081"), "{v2}");
    let prev = install::prev_path(&ws.dest);
    assert_eq!(std::fs::read_to_string(&prev).expect(".prev"), v1);
    assert_eq!(ws.dest_dir_names(), ["haproxy.cfg", "haproxy.cfg.prev"]);
}

#[test]
fn restore_puts_the_previous_file_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("haproxy.cfg");
    let t = template_config(&dest, 0o640);
    let rt = runtime();
    rt.block_on(install::install(&t, VALID.as_bytes(), None))
        .expect("install v1");
    let v2 = VALID.replace("8080", "8081");
    let outcome = rt
        .block_on(install::install(&t, v2.as_bytes(), None))
        .expect("install v2");
    let Outcome::Installed { previous } = outcome else {
        panic!("v2 was not installed");
    };
    assert_eq!(previous.as_deref(), Some(VALID.as_bytes()));
    install::restore(&t, previous.as_deref()).expect("restore");
    assert_eq!(std::fs::read_to_string(&dest).expect("dest"), VALID);
    let perm = std::fs::metadata(&dest).expect("stat").permissions().mode() & 0o7777;
    assert_eq!(perm, 0o640);
    assert_eq!(
        common::dir_names(dir.path()),
        ["haproxy.cfg", "haproxy.cfg.prev"]
    );
    // Restoring "no previous file" removes the dest.
    install::restore(&t, None).expect("restore none");
    assert!(!dest.exists());
}

/// A mode changed in the config reaches the installed file even when the bytes do not change.
#[test]
fn a_new_mode_is_applied_to_unchanged_bytes() {
    let ws = Workspace::new("yaml");
    ws.write_registry(REGISTRY_V1);
    ws.write_config(&Opts {
        file_mode: "0644",
        ..Opts::default()
    });
    render_ok(&ws);
    let ino = stamp(&ws.dest).0;
    ws.write_config(&Opts {
        file_mode: "0640",
        ..Opts::default()
    });
    render_ok(&ws);
    let perm = mode_of(&ws.dest);
    assert_eq!(perm, 0o640);
    assert_eq!(
        stamp(&ws.dest).0,
        ino,
        "the bytes did not change: no new file"
    );
}

/// `[haproxy] check_user`: `haproxy -c` runs `lua-load` code, so as root haconfd can run it as
/// an unprivileged user. A probe script tries to write into a directory only root may write:
/// as root it can (the positive control), as `nobody` it cannot, and both checks pass.
#[test]
#[ignore = "needs root"]
fn check_user_runs_haproxy_c_without_privilege() {
    common::needs_root("switching users for `haproxy -c`");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let private = root.join("private");
    std::fs::create_dir(&private).expect("private dir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let marker = private.join("marker");
    let probe = root.join("probe.lua");
    std::fs::write(
        &probe,
        format!(
            "local f = io.open(\"{}\", \"w\")\nif f then f:write(\"x\") f:close() end\n",
            marker.display()
        ),
    )
    .expect("probe");
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let template = root.join("t.tera");
    std::fs::write(
        &template,
        format!(
            "global\n    lua-load {}\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 1s\n    timeout server 1s\n",
            probe.display()
        ),
    )
    .expect("template");
    std::fs::write(root.join("registry.yaml"), "services: {}\n").expect("registry");
    let config = |user: &str| {
        let path = root.join("haconfd.toml");
        std::fs::write(
            &path,
            format!(
                "[source]\nkind = \"file\"\n[file]\npath = \"{}\"\n[[template]]\nname = \"haproxy\"\nsrc = \"{}\"\ndest = \"{}\"\n[haproxy]\nmode = \"none\"\ncheck_user = \"{user}\"\n",
                root.join("registry.yaml").display(),
                template.display(),
                root.join("out/haproxy.cfg").display(),
            ),
        )
        .expect("config");
        path
    };

    let path = config("");
    let out = common::haconfd(&["check", "--config", path.to_str().expect("utf-8")]);
    common::assert_exit(&out, 0);
    assert!(
        marker.exists(),
        "positive control: as root the probe writes its marker"
    );
    std::fs::remove_file(&marker).expect("remove marker");

    let path = config("nobody");
    let out = common::haconfd(&["check", "--config", path.to_str().expect("utf-8")]);
    common::assert_exit(&out, 0);
    assert!(
        !marker.exists(),
        "as nobody the probe cannot write into a root-only directory"
    );
    // The one-shot install path drops privileges the same way, and hands the file back.
    let out = common::haconfd(&["render", "--config", path.to_str().expect("utf-8")]);
    common::assert_exit(&out, 0);
    assert!(!marker.exists(), "the install's check ran as nobody too");
    let installed = std::fs::metadata(root.join("out/haproxy.cfg")).expect("installed");
    assert_eq!(
        installed.uid(),
        0,
        "the installed file belongs to root again"
    );
}
