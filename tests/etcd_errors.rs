//! Errors that say what to do (issue 11): against an etcd with client-certificate TLS and
//! auth, each mistake an operator makes gets a message that names the setting to fix, and a
//! fixed password is taken at once.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::etcd::{Etcd, EtcdOptions, TlsFiles};
use common::run::{Announce, EtcdDaemon, Setup};
use common::{assert_exit, stderr, wait_for, write_atomic};

const CONVERGE: Duration = Duration::from_secs(30);

/// A config over etcd `endpoint`, reading `/services/` only, with `etcd_extra` in its `[etcd]`
/// table.
fn write_config(endpoint: &str, etcd_extra: &str) -> Setup {
    EtcdDaemon::new(endpoint)
        .prefixes(&["/services/"])
        .etcd_extra(etcd_extra)
        .write()
}

fn tls_etcd(dir: &Path) -> (Etcd, TlsFiles) {
    let tls = TlsFiles::generate(dir);
    let mut etcd = Etcd::with(EtcdOptions {
        tls: Some(tls.clone()),
        extra_args: Vec::new(),
    });
    etcd.launch();
    (etcd, tls)
}

#[test]
fn a_tls_file_that_is_missing_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("no/client.crt");
    for (key, extra) in [
        (
            "etcd.cert_file",
            format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"",
                missing.display(),
                dir.path().join("no/client.key").display()
            ),
        ),
        (
            "etcd.ca_file",
            format!("ca_file = \"{}\"", dir.path().join("no/ca.crt").display()),
        ),
        (
            "etcd.password_file",
            format!(
                "username = \"u\"\npassword_file = \"{}\"",
                dir.path().join("no/password").display()
            ),
        ),
    ] {
        let setup = write_config("https://127.0.0.1:1", &extra);
        for cmd in [&["check"][..], &["render", "--print"]] {
            let out = setup.haconfd(cmd);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(64), "{cmd:?} with {key}: {err}");
            assert!(err.contains(key), "names the key: {err}");
            assert!(err.contains("/no/"), "names the path: {err}");
        }
    }
}

#[test]
fn http_to_a_tls_etcd_says_to_write_https() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (etcd, tls) = tls_etcd(dir.path());
    let plain = etcd.endpoint().replacen("https://", "http://", 1);
    let setup = write_config(
        &plain,
        &format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"",
            tls.client_cert.display(),
            tls.client_key.display()
        ),
    );
    // Rejected before any connection: a client certificate over http:// is a config error.
    let out = setup.haconfd(&["render", "--print"]);
    assert_exit(&out, 64);
    assert!(stderr(&out).contains("https://"), "{}", stderr(&out));

    // Without TLS settings the attempt is made, and its failure says what it may mean.
    let out = write_config(&plain, "").haconfd(&["render", "--print"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("if this etcd serves TLS, write https://"),
        "{err}"
    );
}

#[test]
fn a_client_certificate_etcd_asks_for_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (etcd, tls) = tls_etcd(dir.path());
    let setup = write_config(
        &etcd.endpoint(),
        &format!("ca_file = \"{}\"", tls.ca.display()),
    );
    let out = setup.haconfd(&["render", "--print"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("set etcd.cert_file and etcd.key_file"),
        "{err}"
    );
}

#[test]
fn announce_as_a_read_only_user_is_told_to_grant_write_access() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut etcd = Etcd::start();
    etcd.enable_auth("rootpw", "reader", "readerpw", &["/services/"]);
    let password = dir.path().join("password");
    std::fs::write(&password, "readerpw\n").expect("write password");
    let setup = write_config(
        &etcd.endpoint(),
        &format!(
            "username = \"reader\"\npassword_file = \"{}\"",
            password.display()
        ),
    );
    let config = setup.config.to_str().expect("utf-8 path");
    let announce = Announce::start(&[
        "--service",
        "web",
        "--addr",
        "127.0.0.1:18401",
        "--config",
        config,
    ]);
    let text = wait_for(CONVERGE, "announce to report the refusal", || {
        let t = announce.log();
        t.contains("permission denied").then_some(t)
    });
    drop(announce);
    let line = text
        .lines()
        .find(|l| l.contains("permission denied"))
        .expect("the refusal");
    assert!(line.contains("readwrite"), "{line}");
    assert!(!line.contains("may read"), "not told to grant read: {line}");
}

#[test]
fn a_fixed_password_is_taken_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut etcd = Etcd::start();
    etcd.put("/services/web/a", "127.0.0.1:18402");
    etcd.enable_auth("rootpw", "reader", "readerpw", &["/services/"]);
    let password = dir.path().join("password");
    std::fs::write(&password, "wrong\n").expect("write password");
    let run = write_config(
        &etcd.endpoint(),
        &format!(
            "username = \"reader\"\npassword_file = \"{}\"",
            password.display()
        ),
    )
    .spawn();
    // Let the backoff grow: refusals back off from 1 s towards 10 s.
    wait_for(CONVERGE, "three refusals", || {
        (run.log().matches("etcd refused the connection").count() >= 3).then_some(())
    });
    let fixed = Instant::now();
    write_atomic(&password, b"readerpw\n");
    wait_for(CONVERGE, "the registry over the fixed password", || {
        std::fs::read_to_string(run.dest())
            .ok()
            .filter(|t| t.contains("127.0.0.1:18402"))
    });
    println!(
        "password fixed -> registry applied: {} ms",
        fixed.elapsed().as_millis()
    );
    let log = run.log();
    assert!(
        log.contains("etcd.password_file changed; connecting again now"),
        "{log}"
    );
    assert!(!log.contains("readerpw"), "the password is never logged");
}
