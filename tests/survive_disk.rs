//! The disk under `dest` fails (issue 11, "Disk"): full while the new file is staged, read-only
//! before the install, and read-only between `haproxy -c` and the rename.
//!
//! Each case drives a file-source `haconfd run` whose `out/` directory (dest's) is a 256 KiB
//! tmpfs mounted by the test, breaks the disk, changes the registry, and checks what an operator
//! relies on: the error names the path and says why, `dest` and `dest.prev` stay byte for byte,
//! no staged file stays behind, `/readyz` and `/metrics` say why, and once the disk is usable
//! again the pending state lands with no new change, the retries stop, and a new change applies
//! at once. Mounting needs root: those cases are `#[ignore = "needs root"]` (the root-only policy
//! of tests/common/mod.rs: CI runs them as root), and a mount that is refused fails them. A
//! rename that fails, and a restore that fails, are driven through the library without a mount:
//! `dest` is a directory, which nothing may be renamed over.
//!
//! With a supervised HAProxy, a server-only change goes to HAProxy before its file is written
//! (the fast path): when the disk then refuses the file, HAProxy is put back to the installed
//! file, and the change is served once the file lands.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::admin::Admin;
use common::haproxy::{Backend, Daemon, Opts, Workspace, at, registry as services, serves};
use common::lb::Lb;
use common::wait_for;
use haconfd::config::TemplateConfig;
use haconfd::haproxy::install;

/// Generous bounds: they only cap a failing test, the tests never wait them out when passing.
const SETTLE: Duration = Duration::from_secs(30);
/// `[admin] stale_after` of these daemons: long enough to see the detail line on `/readyz`
/// first, short enough to see the node turn not ready soon after.
const STALE_AFTER: &str = "5s";
/// What the daemon logs each time an install fails on the disk and a retry is planned.
const RETRYING: &str = "install failed on the disk; trying the same state again";
/// The backoff doubles from 1 s to 10 s (±20 %): a healed disk is found within one period of it.
const RECOVERY: Duration = Duration::from_secs(20);

/// A size-limited tmpfs mounted by this test, unmounted on drop (lazily if it is busy), also
/// when the test panics.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a 256 KiB tmpfs at `dir` (created), which must succeed.
    fn mount(dir: &Path) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} ({}): {}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }

    /// `mount -o remount,<opt>` (`ro` or `rw`), which must succeed.
    fn remount(&self, opt: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,{opt}")])
            .arg(&self.dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "remount,{opt} {}: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Fills the file system with `filler` until the disk is full: less room than any render
    /// needs (tmpfs hands out whole pages, and not one is left).
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let page = [0u8; 4096];
        loop {
            match f.write_all(&page) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let done = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !done {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// The absolute path of a program on PATH.
fn which(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on PATH"))
}

fn registry(instances: &[&str]) -> String {
    let mut text = String::from("services:\n  web:\n");
    for (n, id) in instances.iter().enumerate() {
        text.push_str(&format!("    {id}: \"127.0.0.1:{}\"\n", 8081 + n));
    }
    text
}

/// How the disk fails in a case, and how it heals.
enum Fault {
    /// Full: a filler takes every page before the change.
    Full,
    /// Read-only before the change: the staged file cannot even be created.
    ReadOnly,
    /// Read-only right after `haproxy -c` passed: the staged file exists and cannot be removed.
    ReadOnlyAfterCheck,
}

/// One running case: the workspace, its tmpfs and daemon, dropped in that reverse order (the
/// daemon stops before the file system goes, which goes before the temp dir).
struct Case {
    ws: Workspace,
    disk: Tmpfs,
    daemon: Daemon,
    admin: Admin,
    /// Armed: the check wrapper remounts dest's directory read-only after its next check.
    arm: PathBuf,
}

impl Case {
    /// Starts a daemon over a tmpfs at dest's directory and lets it apply twice (so that
    /// `.prev` exists). Needs root, to mount.
    fn start(wrap_check: bool) -> Case {
        common::needs_root("mounting a tmpfs under dest");
        let ws = Workspace::new("yaml");
        let disk = Tmpfs::mount(&ws.path("out"));
        let mut text = ws.config_text(&Opts {
            extra: format!("stale_after = \"{STALE_AFTER}\"\n"),
            ..Opts::default()
        });
        let arm = ws.path("arm-readonly");
        if wrap_check {
            // `haproxy -c`, then, when armed, the directory turns read-only: the install fails
            // after its check, on its way to the rename. haconfd runs checks with a cleared
            // environment, so every program is named by its path.
            let script = ws.path("haproxy-check");
            let body = format!(
                "#!/bin/sh\n{haproxy} \"$@\"\nrc=$?\nif [ -e {arm} ]; then\n  {rm} -f {arm}\n  {mount} -o remount,ro {dir}\nfi\nexit $rc\n",
                haproxy = which("haproxy").display(),
                arm = arm.display(),
                rm = which("rm").display(),
                mount = which("mount").display(),
                dir = disk.dir.display(),
            );
            std::fs::write(&script, body).expect("write the check wrapper");
            let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
            std::fs::set_permissions(&script, mode).expect("make the wrapper executable");
            text = text.replacen(
                "[haproxy]\n",
                &format!("[haproxy]\nbinary = \"{}\"\n", script.display()),
                1,
            );
        }
        std::fs::write(&ws.config, text).expect("write the config");
        let admin = ws.admin().expect("the admin port in the config");
        ws.write_registry(registry(&["w1"]));
        let daemon = ws.spawn_run();
        let case = Case {
            ws,
            disk,
            daemon,
            admin,
            arm,
        };
        case.wait_serving("w1", SETTLE, "the first apply");
        case.ws.write_registry(registry(&["w1", "w2"]));
        case.wait_serving("w2", SETTLE, "the second apply");
        wait_for(SETTLE, "/readyz to say ready", || {
            case.get("/readyz").filter(|(s, _)| *s == 200)
        });
        case
    }

    fn prev(&self) -> PathBuf {
        let mut p = self.ws.dest.clone().into_os_string();
        p.push(".prev");
        PathBuf::from(p)
    }

    fn read(&self, p: &Path) -> Vec<u8> {
        std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }

    /// Status and body of `GET path` on the admin endpoint.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        self.admin.get(path)
    }

    fn wait_serving(&self, id: &str, within: Duration, what: &str) {
        let port = 8081 + id[1..].parse::<u16>().expect("wN") - 1;
        let addr = format!("127.0.0.1:{port}");
        wait_for(within, what, || {
            self.ws.dest_text().filter(|t| serves(t, id, &addr))
        });
    }

    fn count(&self, needle: &str) -> usize {
        self.daemon.log_text().matches(needle).count()
    }
}

/// The whole story of one fault: break the disk, change the registry, check every promise,
/// heal the disk, and check that the pending state lands by itself.
fn survive(fault: Fault) {
    let case = Case::start(matches!(fault, Fault::ReadOnlyAfterCheck));
    let dest = case.ws.dest.display().to_string();
    let (dest_before, prev_before) = (case.read(&case.ws.dest), case.read(&case.prev()));
    let filler = match fault {
        Fault::Full => Some(case.disk.fill()),
        Fault::ReadOnly => {
            case.disk.remount("ro");
            None
        }
        Fault::ReadOnlyAfterCheck => {
            std::fs::write(&case.arm, b"").expect("arm the wrapper");
            None
        }
    };
    let (words, reason, error) = match fault {
        Fault::Full => (
            "disk full",
            "disk_full",
            format!("cannot write a staged copy of {dest}: disk full"),
        ),
        Fault::ReadOnly => (
            "read-only file system",
            "read_only",
            format!("cannot create a staged copy of {dest}: read-only file system"),
        ),
        Fault::ReadOnlyAfterCheck => (
            "read-only file system",
            "read_only",
            format!("cannot set the mode of the staged copy of {dest}: read-only file system"),
        ),
    };
    case.ws.write_registry(registry(&["w1", "w2", "w3"]));

    // The apply fails with an error that names dest and says why in words.
    wait_for(SETTLE, "the failed install in the log", || {
        case.daemon.log_text().contains(&error).then_some(())
    });
    let failed_at = Instant::now();
    let problem = format!("cannot install {dest}: {words}");
    let (status, body) = case.get("/readyz").expect("/readyz answers");
    assert_eq!(status, 200, "a fresh failure leaves the node ready: {body}");
    assert!(body.contains(&problem), "/readyz: {body}");
    let (_, metrics) = case.get("/metrics").expect("/metrics answers");
    assert!(metrics.contains("haconfd_install_failing 1"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "haconfd_install_failures_total{{reason=\"{reason}\"}}"
        )),
        "{metrics}"
    );

    // dest and its previous copy are untouched, byte for byte, and nothing staged stays: a
    // staged file that a read-only disk keeps is named in the log.
    let untouched = || -> usize {
        let mut kept = 0;
        assert_eq!(case.read(&case.ws.dest), dest_before, "dest changed");
        assert_eq!(case.read(&case.prev()), prev_before, "dest.prev changed");
        let log = case.daemon.log_text();
        for name in case.ws.dest_dir_names() {
            if ["haproxy.cfg", "haproxy.cfg.prev", "filler"].contains(&name.as_str()) {
                continue;
            }
            assert!(
                matches!(fault, Fault::ReadOnlyAfterCheck),
                "{name} left behind"
            );
            assert!(
                log.lines()
                    .any(|l| l.contains("cannot remove a temporary file") && l.contains(&name)),
                "{name} left behind without a word:\n{log}"
            );
            kept += 1;
        }
        kept
    };
    // The disk that turned read-only under the install keeps its staged file until it heals.
    let kept = usize::from(matches!(fault, Fault::ReadOnlyAfterCheck));
    assert_eq!(untouched(), kept, "{:?}", case.ws.dest_dir_names());

    // Past stale_after the node is not ready, and says why; the retries go on failing.
    let (_, body) = wait_for(SETTLE, "/readyz to turn not ready", || {
        case.get("/readyz").filter(|(s, _)| *s == 503)
    });
    assert!(
        body.starts_with(&format!("not ready: {problem}")),
        "/readyz: {body}"
    );
    assert!(
        failed_at.elapsed() >= Duration::from_secs(4),
        "not ready before stale_after"
    );
    wait_for(SETTLE, "a retry that fails again", || {
        (case.count(RETRYING) >= 2).then_some(())
    });
    assert_eq!(untouched(), kept, "{:?}", case.ws.dest_dir_names());

    // The disk heals: the pending state lands with no new change, within the backoff.
    match fault {
        Fault::Full => std::fs::remove_file(filler.expect("filled")).expect("remove the filler"),
        Fault::ReadOnly | Fault::ReadOnlyAfterCheck => case.disk.remount("rw"),
    }
    case.wait_serving("w3", RECOVERY, "the pending state after the disk healed");
    wait_for(SETTLE, "/readyz to say ready again", || {
        case.get("/readyz")
            .filter(|(s, b)| *s == 200 && !b.contains("cannot install"))
    });
    let (_, metrics) = case.get("/metrics").expect("/metrics answers");
    assert!(metrics.contains("haconfd_install_failing 0"), "{metrics}");
    assert_eq!(
        case.read(&case.prev()),
        dest_before,
        "dest.prev is the last good file"
    );
    assert_eq!(
        case.ws.dest_dir_names(),
        ["haproxy.cfg", "haproxy.cfg.prev"]
    );

    // The retries stop with the first success: nothing applies again on its own.
    let (applied, failed) = (case.count("applied"), case.count(RETRYING));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        (case.count("applied"), case.count(RETRYING)),
        (applied, failed),
        "applies went on after the recovery:\n{}",
        case.daemon.log_text()
    );

    // A new change applies at once, as before.
    let changed_at = Instant::now();
    case.ws.write_registry(registry(&["w1", "w2", "w3", "w4"]));
    case.wait_serving("w4", SETTLE, "a new change after the recovery");
    assert!(
        changed_at.elapsed() < Duration::from_secs(5),
        "a new change waited {:?}",
        changed_at.elapsed()
    );
}

#[test]
#[ignore = "needs root"]
fn a_full_disk_at_staging_keeps_the_files_and_retries_until_it_has_room() {
    survive(Fault::Full);
}

#[test]
#[ignore = "needs root"]
fn a_read_only_disk_keeps_the_files_and_retries_until_it_is_writable() {
    survive(Fault::ReadOnly);
}

#[test]
#[ignore = "needs root"]
fn a_disk_that_turns_read_only_after_the_check_leaves_no_staged_file_behind() {
    survive(Fault::ReadOnlyAfterCheck);
}

#[test]
#[ignore = "needs root"]
fn a_change_sent_ahead_of_a_file_the_disk_refuses_is_taken_back_until_the_file_lands() {
    common::needs_root("mounting a tmpfs under dest");
    let (a, b) = (Backend::start("backend-A"), Backend::start("backend-B"));
    let ws = Workspace::new("yaml");
    // Dropped after the daemon (declared before it): HAProxy stops before its disk goes.
    let disk = Tmpfs::mount(&ws.path("out"));
    let mut lb = Lb::start(
        ws,
        &services(&[("web", &[at("a", &a)])], ""),
        Opts {
            mode: "supervise",
            ..Opts::default()
        },
    );
    lb.reach("web", "backend-A");
    let before = lb.proc().expect("show proc");
    // The first server-only change proves the template (installed, then sent).
    let weighted = (
        "a",
        format!("'{{\"addr\":\"127.0.0.1:{}\",\"weight\":50}}'", a.port),
    );
    lb.ws.write_registry(services(&[("web", &[weighted])], ""));
    lb.wait_applied("runtime", 1);
    let installed = lb.dest();

    // The disk is full; a moves to backend-B: HAProxy takes it at once, the file cannot
    // follow, and HAProxy goes back to the installed file.
    let filler = disk.fill();
    lb.ws
        .write_registry(services(&[("web", &[at("a", &b)])], ""));
    lb.wait_log(SETTLE, "served through the Runtime API; the files follow");
    lb.wait_log(SETTLE, RETRYING);
    lb.wait_log(
        SETTLE,
        "HAProxy put back to the installed config after a failed apply",
    );
    assert_eq!(lb.dest(), installed);
    lb.assert_agree("be_web");
    lb.reach("web", "backend-A");
    // Until a file lands nothing goes ahead of the disk: the retries leave HAProxy alone.
    wait_for(SETTLE, "a retry that fails again", || {
        (lb.log().matches(RETRYING).count() >= 2).then_some(())
    });
    assert!(lb.bodies("web", 6).iter().all(|x| x == "backend-A"));
    lb.assert_agree("be_web");
    assert_eq!(
        lb.log()
            .matches("served through the Runtime API; the files follow")
            .count(),
        1
    );

    // The disk heals: the file lands with no new change, and HAProxy takes it.
    std::fs::remove_file(filler).expect("remove the filler");
    lb.wait_applied("runtime", 2);
    lb.reach("web", "backend-B");
    lb.assert_agree("be_web");
    assert!(serves(&lb.dest(), "a", &format!("127.0.0.1:{}", b.port)));
    let after = lb.proc().expect("show proc");
    assert_eq!(after.reloads, before.reloads, "{}", lb.log());
    assert_eq!(lb.daemon.terminate(SETTLE * 2), Some(0), "{}", lb.log());
}

fn template_config(dest: &Path) -> TemplateConfig {
    TemplateConfig {
        name: "haproxy".into(),
        src: "unused.tera".into(),
        dest: dest.to_owned(),
        mode: 0o644,
        owner: None,
        group: None,
        check: false,
        map: false,
    }
}

/// A `dest` whose rename fails (here: it is a directory), with a `.prev` beside it.
fn unrenamable() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let dest = dir.path().join("haproxy.cfg");
    std::fs::create_dir(&dest).expect("dest as a directory");
    std::fs::write(dest.join("inside"), b"x").expect("a file inside");
    let prev = dir.path().join("haproxy.cfg.prev");
    std::fs::write(&prev, b"the previous copy\n").expect("write .prev");
    (dir, dest, prev)
}

#[test]
fn a_rename_that_fails_leaves_the_previous_copy_and_nothing_staged() {
    let (dir, dest, prev) = unrenamable();
    let t = template_config(&dest);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The caller read the installed file as "installed": it is set aside for `.prev` (copied,
    // since a directory cannot be linked), and only named `.prev` once the rename succeeded.
    let e = rt
        .block_on(install::install_over(
            &t,
            Some(b"installed\n".to_vec()),
            b"new\n",
            None,
        ))
        .expect_err("nothing can be renamed over a directory");
    let text = e.to_string();
    assert!(
        text.contains(&format!(
            "cannot rename the staged file over {}",
            dest.display()
        )),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&prev).expect("read .prev"),
        b"the previous copy\n",
        ".prev changed although dest did not"
    );
    assert_eq!(
        common::dir_names(dir.path()),
        ["haproxy.cfg", "haproxy.cfg.prev"]
    );
}

#[test]
fn a_restore_that_fails_leaves_nothing_staged() {
    let (dir, dest, _prev) = unrenamable();
    let t = template_config(&dest);
    let e = install::restore(&t, Some(b"previous\n")).expect_err("cannot restore");
    assert!(
        e.to_string()
            .contains(&format!("cannot restore {}", dest.display())),
        "{e}"
    );
    assert_eq!(
        common::dir_names(dir.path()),
        ["haproxy.cfg", "haproxy.cfg.prev"]
    );
}
