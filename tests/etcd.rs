//! The etcd source against a real etcd (issue 3): haconfd runs as a real process with a small
//! test template (`server <service>/<id> <addr>` lines, `check = false`, `haproxy.mode =
//! "none"`), and every test compares the rendered file with what etcd holds.
//!
//! No timing assertions: waits are bounded, and figures (like how long a frozen etcd takes to
//! be noticed) are printed, not asserted.
//!
//! With a 3-member cluster (issue 11, etcd as a cluster): the watch moves to a live member
//! when the one it reads from dies as the leader, freezes, or is cut off from the other two
//! (as leader or follower), and misses no event; a member without a leader is never read as
//! an empty registry; `announce` on a member that is cut off keeps its lease.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::etcd::{Etcd, EtcdOptions, TlsFiles};
use common::run::{Announce, EtcdDaemon, Run, Setup};
use common::wait_for;

/// How long a change may take to reach dest before a test gives up.
const CONVERGE: Duration = Duration::from_secs(30);

/// The config of these tests' daemons over `endpoints` (`etcd_extra` is appended to the [etcd]
/// table), with the etcd source's debug log.
fn configure(endpoints: &[String], etcd_extra: &str, resync: &str) -> Setup {
    EtcdDaemon::endpoints(endpoints)
        .etcd_extra(etcd_extra)
        .resync(resync)
        .max_drop_percent(100)
        .log("info,haconfd::source::etcd=debug")
        .write()
}

/// `haconfd run` over the etcd at `endpoint`.
fn start(endpoint: &str, etcd_extra: &str, resync: &str) -> Run {
    configure(&[endpoint.to_owned()], etcd_extra, resync).spawn()
}

/// What these tests read of a daemon: the `server` lines of its dest.
trait Dest {
    /// The `server` lines of dest, or None when dest does not exist.
    fn lines(&self) -> Option<BTreeSet<String>>;
    /// Waits until dest holds exactly `expected`.
    fn converge(&self, expected: &BTreeSet<String>, what: &str);
}

impl Dest for Run {
    fn lines(&self) -> Option<BTreeSet<String>> {
        server_lines(self.dest())
    }

    fn converge(&self, expected: &BTreeSet<String>, what: &str) {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let got = self.lines();
            if got.as_ref() == Some(expected) {
                return;
            }
            if Instant::now() >= deadline {
                let got = got.unwrap_or_default();
                let missing: Vec<_> = expected.difference(&got).take(5).collect();
                let extra: Vec<_> = got.difference(expected).take(5).collect();
                panic!(
                    "{what}: dest did not converge in {CONVERGE:?} ({} lines expected, {} present; missing {missing:?}, extra {extra:?})",
                    expected.len(),
                    got.len(),
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn server_lines(path: &Path) -> Option<BTreeSet<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter(|l| l.starts_with("server "))
            .map(str::to_owned)
            .collect(),
    )
}

/// The lines the test template renders for what etcd holds under /services/.
fn expected(etcd: &Etcd) -> BTreeSet<String> {
    lines_for(&etcd.get_prefix("/services/"))
}

fn lines_for(kv: &BTreeMap<String, String>) -> BTreeSet<String> {
    kv.iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("/services/")?;
            let (svc, id) = rest.split_once('/')?;
            Some(format!("server {svc}/{id} {v}"))
        })
        .collect()
}

fn addr(n: usize) -> String {
    format!("127.0.0.1:{}", 20000 + n)
}

/// A base registry: `n` services of `per` instances each.
fn seed(etcd: &Etcd, n: usize, per: usize) {
    let mut pairs = Vec::new();
    for s in 0..n {
        for i in 0..per {
            pairs.push((format!("/services/base{s}/i{i}"), addr(s * 100 + i)));
        }
    }
    etcd.put_many(&pairs);
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn a_put_and_a_delete_reach_dest() {
    let etcd = Etcd::start();
    seed(&etcd, 2, 2);
    let d = start(&etcd.endpoint(), "", "5m");
    d.converge(&expected(&etcd), "first read");
    d.wait_log("etcd watch running", CONVERGE);

    etcd.put("/services/web/a", &addr(1));
    etcd.put("/services/web/b", &addr(2));
    etcd.put("/services/web/c", &addr(3));
    d.converge(&expected(&etcd), "puts");
    assert!(
        d.lines()
            .expect("dest")
            .contains("server web/c 127.0.0.1:20003")
    );

    assert_eq!(etcd.delete("/services/web/c"), 1);
    etcd.put("/services/web/a", &addr(11));
    d.converge(&expected(&etcd), "delete and update");
    let lines = d.lines().expect("dest");
    assert!(!lines.iter().any(|l| l.starts_with("server web/c ")));
    assert!(lines.contains("server web/a 127.0.0.1:20011"));
}

#[test]
fn an_idle_watch_is_not_cut_by_etcds_ping_policy() {
    // etcd answers pings sent more often than every 5 s on a silent connection with GOAWAY
    // "too_many_pings" (three strikes: about 8 s with 2 s pings). haconfd keeps the watch
    // talking, so an idle watch stays up.
    let etcd = Etcd::start();
    seed(&etcd, 1, 2);
    let d = start(&etcd.endpoint(), "", "5m");
    d.converge(&expected(&etcd), "first read");
    d.wait_log("etcd watch running", CONVERGE);
    std::thread::sleep(Duration::from_secs(12));
    etcd.put("/services/late/a", &addr(3));
    d.converge(&expected(&etcd), "put after 12 s idle");
    let log = d.log();
    assert!(!log.contains("etcd watch failed"), "{log}");
}

#[test]
fn a_burst_of_1000_keys_converges_to_etcds_final_state() {
    let etcd = Etcd::start();
    seed(&etcd, 2, 3);
    let d = start(&etcd.endpoint(), "", "5m");
    d.converge(&expected(&etcd), "first read");

    let pairs: Vec<(String, String)> = (0..1000)
        .map(|n| (format!("/services/burst{}/i{n:04}", n % 10), addr(n)))
        .collect();
    etcd.put_many(&pairs);
    // Then, inside the burst's services: delete one in ten, move one in ten.
    let deleted: Vec<String> = (0..1000).step_by(10).map(|n| pairs[n].0.clone()).collect();
    etcd.delete_many(&deleted);
    let moved: Vec<(String, String)> = (5..1000)
        .step_by(10)
        .map(|n| (pairs[n].0.clone(), addr(5000 + n)))
        .collect();
    etcd.put_many(&moved);

    let want = expected(&etcd);
    assert_eq!(want.len(), 6 + 900);
    d.converge(&want, "1000-key burst");
}

#[test]
fn etcd_killed_and_restarted_keeps_dest_then_converges() {
    let mut etcd = Etcd::start();
    seed(&etcd, 2, 2);
    let d = start(&etcd.endpoint(), "", "5m");
    d.converge(&expected(&etcd), "first read");
    d.wait_log("etcd watch running", CONVERGE);
    let before = std::fs::read(d.dest()).expect("dest");

    etcd.stop();
    d.wait_log("etcd watch failed", CONVERGE);
    // During the outage dest stays as it was (polled for 2 s).
    for _ in 0..40 {
        assert_eq!(
            std::fs::read(d.dest()).expect("dest"),
            before,
            "dest changed while etcd was down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    d.wait_log("etcd unreachable", CONVERGE);

    etcd.launch();
    etcd.put("/services/after/a", &addr(7));
    d.converge(&expected(&etcd), "put after the restart");
    assert!(
        d.lines()
            .expect("dest")
            .contains("server after/a 127.0.0.1:20007")
    );
    d.wait_log("etcd reachable again", CONVERGE);
    // The watch resumed where it stopped: never at revision 0.
    assert!(!d.log().contains("from=[0"), "{}", d.log());
}

#[test]
fn a_frozen_etcd_is_detected_and_the_watch_resumes() {
    let etcd = Etcd::start();
    seed(&etcd, 2, 2);
    let d = start(&etcd.endpoint(), "", "5m");
    d.converge(&expected(&etcd), "first read");
    d.wait_log("etcd watch running", CONVERGE);
    let before = std::fs::read(d.dest()).expect("dest");

    etcd.pause();
    let paused = Instant::now();
    let detected = d.wait_log("etcd watch failed", Duration::from_secs(20));
    eprintln!("a frozen etcd was noticed after {detected:?}");
    // Stay frozen for about 10 s in all.
    if let Some(rest) = Duration::from_secs(10).checked_sub(paused.elapsed()) {
        std::thread::sleep(rest);
    }
    assert_eq!(
        std::fs::read(d.dest()).expect("dest"),
        before,
        "dest changed while etcd was frozen"
    );
    etcd.resume();

    etcd.put("/services/thawed/a", &addr(8));
    etcd.delete("/services/base1/i1");
    d.converge(&expected(&etcd), "changes after SIGCONT");
    let log = d.log();
    assert!(log.contains("etcd reachable again"), "{log}");
}

#[test]
fn compaction_while_the_watcher_is_behind_rereads_and_never_empties_dest() {
    let mut etcd = Etcd::start();
    seed(&etcd, 3, 10);
    let d = start(&etcd.endpoint(), "", "5m");
    d.converge(&expected(&etcd), "first read");
    d.wait_log("etcd watch running", CONVERGE);

    // Watch dest from a thread: it must always hold server lines.
    let stop = Arc::new(AtomicBool::new(false));
    let empty_seen = Arc::new(AtomicUsize::new(0));
    let polls = Arc::new(AtomicUsize::new(0));
    let poller = {
        let (stop, empty_seen, polls) = (stop.clone(), empty_seen.clone(), polls.clone());
        let dest = d.dest().to_owned();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match server_lines(&dest) {
                    Some(l) if !l.is_empty() => {}
                    _ => {
                        empty_seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
                polls.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // Freeze haconfd, change a lot, compact, and break its connection (an etcd restart) so
    // that it must resume from a revision that is gone. Whatever reached its socket before
    // the freeze, the quiet /routes/ watch still resumes at the first read's revision + 1,
    // which the compaction removed: the compacted path runs every time.
    d.freeze();
    let pairs: Vec<(String, String)> = (0..300)
        .map(|n| (format!("/services/late{}/i{n:03}", n % 3), addr(1000 + n)))
        .collect();
    etcd.put_many(&pairs);
    let gone: Vec<String> = (0..3)
        .flat_map(|s| (0..3).map(move |i| format!("/services/base{s}/i{i}")))
        .collect();
    etcd.delete_many(&gone);
    etcd.put("/services/base0/i9", &addr(999));
    let rev = etcd.revision();
    etcd.compact(rev);
    etcd.restart();
    d.thaw();

    d.converge(&expected(&etcd), "after compaction");
    d.wait_log("etcd compacted revisions the watch had not seen", CONVERGE);
    // A change after the re-read still lands: the new watch runs.
    etcd.put("/services/late0/new", &addr(4242));
    d.converge(&expected(&etcd), "put after the re-read");

    stop.store(true, Ordering::Relaxed);
    poller.join().expect("poller");
    assert!(polls.load(Ordering::Relaxed) > 10);
    assert_eq!(
        empty_seen.load(Ordering::Relaxed),
        0,
        "dest was seen without server lines"
    );
}

#[test]
fn etcd_restored_from_a_backup_is_read_again() {
    // A restore takes etcd's revision back: haconfd notices on reconnect and reads everything
    // (resync is 5 m here, so only that can make it converge).
    let mut etcd = Etcd::start();
    seed(&etcd, 2, 3);
    let snapshot = etcd.log_path().with_file_name("snap.db");
    etcd.snapshot_save(&snapshot);
    let d = start(&etcd.endpoint(), "", "5m");
    d.converge(&expected(&etcd), "first read");
    d.wait_log("etcd watch running", CONVERGE);
    etcd.put("/services/base0/x1", &addr(50));
    etcd.put("/services/base1/x1", &addr(51));
    d.converge(&expected(&etcd), "puts before the restore");

    etcd.restore_snapshot(&snapshot);
    etcd.put("/services/base0/after", &addr(60));
    let want = expected(&etcd);
    assert!(
        !want.iter().any(|l| l.contains("/x1 ")),
        "the restore kept later keys"
    );
    d.converge(&want, "after the restore");
    d.wait_log("etcd's revision went back", CONVERGE);
}

#[test]
fn the_periodic_full_read_corrects_drift() {
    // A restore from a backup while haconfd is frozen, then more writes than were lost: when
    // haconfd wakes, etcd's revision is past the one it had seen, so it resumes its watch
    // there and misses the writes made at the revisions it believes it has seen. Only the
    // periodic full read (every 2 s here) finds them.
    let mut etcd = Etcd::start();
    seed(&etcd, 2, 3);
    let snapshot = etcd.log_path().with_file_name("snap.db");
    etcd.snapshot_save(&snapshot);
    let d = start(&etcd.endpoint(), "", "2s");
    d.converge(&expected(&etcd), "first read");
    d.wait_log("etcd watch running", CONVERGE);
    for i in 0..3 {
        etcd.put(&format!("/services/base0/x{i}"), &addr(50 + i));
    }
    d.converge(&expected(&etcd), "puts before the restore");

    d.freeze();
    etcd.restore_snapshot(&snapshot);
    for i in 0..6 {
        etcd.put(&format!("/services/base1/y{i}"), &addr(70 + i));
    }
    d.thaw();
    let want = expected(&etcd);
    assert!(
        !want.iter().any(|l| l.contains("/x1 ")),
        "the restore kept later keys"
    );
    d.converge(&want, "drift corrected");
    let log = d.log();
    assert!(log.contains("had drifted from etcd"), "{log}");
    assert!(!log.contains("revision went back"), "{log}");
}

#[test]
fn etcd_down_at_start_leaves_dest_untouched_until_it_appears() {
    let mut etcd = Etcd::with(EtcdOptions::default());
    let d = start(&etcd.endpoint(), "", "5m");
    d.wait_log("etcd unreachable", CONVERGE);
    // Retried with backoff, not in a tight loop.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!d.dest().exists(), "dest was written before etcd answered");
    let attempts = count(&d.log(), "etcd unreachable");
    assert!(
        attempts <= 10,
        "{attempts} attempts in about 2 s:\n{}",
        d.log()
    );

    etcd.launch();
    seed(&etcd, 2, 2);
    d.converge(&expected(&etcd), "etcd appeared");
    d.wait_log("etcd reachable again", CONVERGE);
}

#[test]
fn auth_read_only_user_works_and_a_wrong_password_backs_off() {
    // Tokens live 2 s, and haconfd re-reads every 3 s: the re-read meets an expired token.
    let mut etcd = Etcd::with(EtcdOptions {
        tls: None,
        extra_args: vec!["--auth-token-ttl=2".into()],
    });
    etcd.launch();
    seed(&etcd, 2, 2);
    etcd.enable_auth("rootpw", "reader", "readerpw", &["/services/", "/routes/"]);

    let secrets = tempfile::tempdir().expect("tempdir");
    let good = secrets.path().join("good");
    let bad = secrets.path().join("bad");
    std::fs::write(&good, "readerpw\n").expect("write");
    std::fs::write(&bad, "not-the-password\n").expect("write");
    let table = |p: &Path| format!("username = \"reader\"\npassword_file = \"{}\"", p.display());

    let ok = start(&etcd.endpoint(), &table(&good), "3s");
    ok.converge(&expected(&etcd), "read-only user");
    etcd.put("/services/authed/a", &addr(5));
    ok.converge(&expected(&etcd), "put with auth on");

    let wrong = start(&etcd.endpoint(), &table(&bad), "3s");
    wrong.wait_log("authentication failed", CONVERGE);
    std::thread::sleep(Duration::from_secs(5));
    let log = wrong.log();
    assert!(
        log.contains("user \"reader\""),
        "the error names the user:\n{log}"
    );
    assert!(
        !log.contains("not-the-password"),
        "the password leaked:\n{log}"
    );
    let attempts = count(&log, "authentication failed");
    assert!(
        (1..=8).contains(&attempts),
        "{attempts} attempts in about 5 s:\n{log}"
    );
    assert!(
        !wrong.dest().exists(),
        "dest written without a successful read"
    );

    // By now the good daemon's token has expired at least twice, and its re-reads renewed it.
    std::thread::sleep(Duration::from_secs(2));
    etcd.put("/services/authed/b", &addr(6));
    ok.converge(&expected(&etcd), "put after token expiry");
    let log = ok.log();
    assert!(!log.contains("full read of etcd failed"), "{log}");
    assert!(!log.contains("password"), "{log}");
}

#[test]
fn tls_with_a_client_certificate() {
    let certs = tempfile::tempdir().expect("tempdir");
    let tls = TlsFiles::generate(certs.path());
    let mut etcd = Etcd::with(EtcdOptions {
        tls: Some(tls.clone()),
        extra_args: Vec::new(),
    });
    etcd.launch();
    assert!(etcd.endpoint().starts_with("https://"));
    seed(&etcd, 2, 2);
    let table = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        tls.ca.display(),
        tls.client_cert.display(),
        tls.client_key.display()
    );
    let d = start(&etcd.endpoint(), &table, "5m");
    d.converge(&expected(&etcd), "over TLS");
    etcd.put("/services/tls/a", &addr(9));
    d.converge(&expected(&etcd), "put over TLS");

    // Without the client certificate etcd refuses the connection, and haconfd says so.
    let table = format!("ca_file = \"{}\"", tls.ca.display());
    let no_cert = start(&etcd.endpoint(), &table, "5m");
    no_cert.wait_log("etcd unreachable", CONVERGE);
    assert!(!no_cert.dest().exists());
}

#[test]
fn render_print_reads_etcd_once() {
    let etcd = Etcd::start();
    seed(&etcd, 2, 2);
    let setup = configure(&[etcd.endpoint()], "", "5m");
    let out = setup.haconfd(&["render", "--print"]);
    common::assert_exit(&out, 0);
    let text = common::stdout(&out);
    let got: BTreeSet<String> = text
        .lines()
        .filter(|l| l.starts_with("server "))
        .map(str::to_owned)
        .collect();
    assert_eq!(got, expected(&etcd));
    assert!(!setup.dest.exists(), "render --print installed a file");

    // With etcd gone it fails clearly instead of rendering nothing.
    drop(etcd);
    let out = setup.haconfd(&["render", "--print"]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert!(err.contains("etcd"), "{err}");
    assert!(out.stdout.is_empty());
}

/// Puts `key` through any member, retrying (bounded) while the cluster has no leader.
fn put_when_writable(cluster: &Cluster, key: &str, value: &str) {
    wait_for(CONVERGE, &format!("etcd to take a put of {key}"), || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cluster.put(key, value))).ok()
    });
}

/// The lines the test template renders for what the cluster holds under /services/.
fn cluster_expected(cluster: &Cluster) -> BTreeSet<String> {
    lines_for(&cluster.get_prefix("/services/"))
}

/// A daemon over every member of `cluster`, converged on its registry.
fn cluster_daemon(cluster: &Cluster) -> Run {
    for i in 0..3 {
        cluster.put(&format!("/services/web/i{i}"), &addr(i));
    }
    let d = configure(&cluster.endpoints(), "", "5m").spawn();
    d.converge(&cluster_expected(cluster), "first read");
    d.wait_log("etcd watch running", CONVERGE);
    d
}

#[test]
fn the_watch_moves_on_when_its_member_dies_as_the_leader() {
    let mut cluster = Cluster::start();
    // haconfd reads from the first member it can use: make it the leader, then kill it.
    cluster.move_leader(0);
    let d = cluster_daemon(&cluster);
    let killed = Instant::now();
    cluster.kill(0);
    // Changes made right after the death, through the new leader: none may be missed.
    for i in 0..5 {
        put_when_writable(&cluster, &format!("/services/web/after{i}"), &addr(10 + i));
    }
    cluster.delete("/services/web/i0");
    d.converge(
        &cluster_expected(&cluster),
        "changes after the leader's death",
    );
    println!(
        "leader (the watched member) killed -> every later change in dest: {} ms",
        killed.elapsed().as_millis()
    );
    let log = d.log();
    assert!(log.contains("etcd watch failed; reconnecting"), "{log}");
    cluster.restart(0);
    put_when_writable(&cluster, "/services/web/back", &addr(30));
    d.converge(&cluster_expected(&cluster), "after the member came back");
}

#[test]
fn the_watch_leaves_a_frozen_member_for_a_live_one() {
    let cluster = Cluster::start();
    // The watched member (the first) freezes while another leads, so writes go on.
    cluster.move_leader(1);
    let d = cluster_daemon(&cluster);
    let frozen = Instant::now();
    cluster.freeze(0);
    put_when_writable(&cluster, "/services/web/during", &addr(20));
    d.converge(
        &cluster_expected(&cluster),
        "a change while the member is frozen",
    );
    println!(
        "watched member frozen -> a change in dest: {} ms",
        frozen.elapsed().as_millis()
    );
    cluster.thaw(0);
}

#[test]
fn a_member_without_a_leader_is_never_read_as_an_empty_registry() {
    let cluster = Cluster::start();
    cluster.move_leader(1);
    for i in 0..3 {
        cluster.put(&format!("/services/web/i{i}"), &addr(i));
    }
    // Member 0 alone: the other two frozen, it loses its leader after an election timeout.
    cluster.freeze(1);
    cluster.freeze(2);
    let only = vec![cluster.endpoints()[0].clone()];
    let d = configure(&only, "", "5m").spawn();
    d.wait_log("no leader", CONVERGE);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !d.dest().exists(),
        "dest written from a member without a leader:\n{}",
        d.log()
    );
    cluster.thaw(1);
    cluster.thaw(2);
    d.converge(
        &cluster_expected(&cluster),
        "once the member has a leader again",
    );
    assert_eq!(d.lines().map(|l| l.len()), Some(3));
}

/// Samples dest every 10 ms on its own thread while a test cuts a member off: instances are
/// only added meanwhile, so every sample must hold every line of `floor`.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl Sampler {
    fn start(dest: PathBuf, floor: BTreeSet<String>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut samples, mut bad) = (0, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(120);
            while !flag.load(Ordering::SeqCst) && Instant::now() < deadline {
                samples += 1;
                match server_lines(&dest) {
                    None => bad.push("dest missing".to_owned()),
                    Some(lines) => {
                        if let Some(lost) = floor.difference(&lines).next() {
                            bad.push(format!("{} lines, {lost:?} lost", lines.len()));
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (samples, bad)
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; how many samples were taken and the ones that lost a line.
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .expect("sampling")
            .join()
            .expect("sampler thread")
    }
}

/// Puts `key` through the first member of `members` that takes it, retrying (bounded) while
/// none can; returns the revision. Each try has 300 ms: a put on a member that still follows
/// a leader cut off from it waits for that leader, and is better tried again.
fn put_through(cluster: &Cluster, members: &[usize], key: &str, value: &str) -> i64 {
    wait_for(
        CONVERGE,
        &format!("the majority to take a put of {key}"),
        || {
            members.iter().find_map(|&m| {
                cluster
                    .put_on(m, Duration::from_millis(300), key, value)
                    .ok()
            })
        },
    )
}

/// haconfd reads from member 0 (first in `[etcd] endpoints`), which is then cut off from the
/// other two; `zero_leads`: whether member 0 is the leader when cut. Changes made through the
/// majority must all reach dest, by the watch (no re-read: the revision continues), and dest
/// must never lose an instance on the way.
fn the_watch_leaves_a_cut_off_member(zero_leads: bool) {
    let cluster = Cluster::start_partitionable();
    cluster.move_leader(if zero_leads { 0 } else { 1 });
    let d = cluster_daemon(&cluster);
    // The watch is on member 0: it serves haconfd's two watchers (one per prefix), and the
    // others none. Under load a first connection may have gone to member 1 before member 0
    // answered; its watchers go once that stream closes, so wait for that too.
    wait_for(
        CONVERGE,
        "haconfd's two watchers on member 0, none elsewhere",
        || {
            let w = (
                cluster.watchers(0),
                cluster.watchers(1),
                cluster.watchers(2),
            );
            (w == (Some(2.0), Some(0.0), Some(0.0))).then_some(())
        },
    );
    let before = d.lines().expect("dest");
    let rev_before = cluster.revision();
    let sampler = Sampler::start(d.dest().to_owned(), before.clone());

    let cut = Instant::now();
    cluster.partition(0);
    let first = put_through(&cluster, &[1, 2], "/services/web/cut0", &addr(40));
    let first_put = cut.elapsed();
    let line = format!("server web/cut0 {}", addr(40));
    wait_for(CONVERGE, "the first change after the cut in dest", || {
        d.lines().is_some_and(|l| l.contains(&line)).then_some(())
    });
    let first_served = cut.elapsed();
    let mut revisions = vec![first];
    for k in 1..5 {
        let key = format!("/services/web/cut{k}");
        revisions.push(put_through(&cluster, &[1, 2], &key, &addr(40 + k)));
    }
    d.converge(&cluster_expected(&cluster), "every change after the cut");
    let all_served = cut.elapsed();
    let (samples, lost) = sampler.finish();

    // The revision continues: the puts' revisions rise from where the cluster was (haconfd's
    // own fleet-view key takes some too), and haconfd applied the last one, by its watch (a
    // single full read, at start).
    assert!(revisions[0] > rev_before, "{rev_before} then {revisions:?}");
    assert!(revisions.windows(2).all(|w| w[1] > w[0]), "{revisions:?}");
    let last = *revisions.last().expect("revisions");
    wait_for(
        CONVERGE,
        "haconfd_applied_revision to reach the last put",
        || (d.admin().metric("haconfd_applied_revision") == Some(last as f64)).then_some(()),
    );
    let log = d.log();
    assert_eq!(count(&log, "full read of etcd"), 1, "{log}");
    // Nothing was held back by the guard either.
    assert!(
        log.lines()
            .filter(|l| l.contains("held="))
            .all(|l| l.contains("held=[] held_back=[]")),
        "{log}"
    );
    assert!(
        lost.is_empty(),
        "dest lost instances in {} of {samples} samples: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    // The watch left member 0 for a member of the majority.
    assert_eq!(cluster.watchers(0), Some(0.0), "{log}");
    assert_eq!(
        cluster.watchers(1).unwrap_or(0.0) + cluster.watchers(2).unwrap_or(0.0),
        2.0
    );
    let left = log
        .lines()
        .find(|l| l.contains("etcd watch failed; reconnecting"))
        .unwrap_or("(no failure logged)");
    println!(
        "member 0 cut off (leader: {zero_leads}): first put accepted by the majority after {} ms, served in dest after {} ms, 5 puts served after {} ms; {samples} samples of dest, none lost an instance; the watch left with: {left}",
        first_put.as_millis(),
        first_served.as_millis(),
        all_served.as_millis()
    );
    if std::env::var_os("HACONFD_TEST_SHOW_LOG").is_some() {
        for l in cluster.peer_log() {
            eprintln!("peer: {l}");
        }
    }

    // Healed: member 0 rejoins, and later changes still arrive.
    cluster.heal(0);
    wait_for(CONVERGE, "member 0 to know a leader again", || {
        (cluster.has_leader(0) == Some(true)).then_some(())
    });
    put_when_writable(&cluster, "/services/web/healed", &addr(50));
    d.converge(&cluster_expected(&cluster), "a change after the heal");
}

#[test]
fn the_watch_leaves_a_follower_cut_off_from_the_cluster() {
    the_watch_leaves_a_cut_off_member(false);
}

#[test]
fn the_watch_leaves_a_leader_cut_off_from_the_cluster() {
    the_watch_leaves_a_cut_off_member(true);
}

#[test]
fn announce_on_a_cut_off_follower_keeps_its_lease() {
    // Member 0 (first in --etcd) is a follower: its keep-alives are forwarded to the leader,
    // and once cut off it can forward nothing.
    announce_on_a_cut_off_member_keeps_its_lease(false);
}

#[test]
fn announce_on_a_cut_off_leader_keeps_its_lease() {
    // Member 0 leads: cut off, it steps down (check-quorum), and the new leader of the other
    // two takes over the leases.
    announce_on_a_cut_off_member_keeps_its_lease(true);
}

/// `haconfd announce --ttl 5s` talks to member 0 (first in --etcd), which is cut off from the
/// other two at the worst moment for its lease; `zero_leads`: whether member 0 is the leader.
/// The key must stay in the majority for twice the TTL, under the same lease.
fn announce_on_a_cut_off_member_keeps_its_lease(zero_leads: bool) {
    const TTL: Duration = Duration::from_secs(5);
    let cluster = Cluster::start_partitionable();
    cluster.move_leader(if zero_leads { 0 } else { 1 });
    let mut args = Vec::new();
    for ep in cluster.endpoints() {
        args.extend(["--etcd".to_owned(), ep]);
    }
    args.extend(
        [
            "--service",
            "web",
            "--addr",
            "127.0.0.1:8080",
            "--id",
            "p1",
            "--ttl",
            "5s",
        ]
        .map(str::to_owned),
    );
    let a = Announce::start_logging(&args, "info,haconfd=debug");
    let key = "/services/web/p1";
    let (_, lease) = wait_for(CONVERGE, "announce's key", || {
        cluster.entry_on(1, key).ok().flatten()
    });
    // The lease was granted (a fresh TTL) just before the key appeared.
    let granted = Instant::now();
    wait_for(CONVERGE, "announce's keep-alive stream on member 0", || {
        (cluster.lease_keep_alive_streams(0) >= 1.0).then_some(())
    });
    // The worst moment to lose the member: just before the first keep-alive (due a third of
    // the TTL after the grant), so the lease has two thirds of its TTL left on the leader.
    std::thread::sleep((TTL / 3).saturating_sub(granted.elapsed() + Duration::from_millis(150)));
    let left = TTL.saturating_sub(granted.elapsed());

    let cut = Instant::now();
    cluster.partition(0);
    // Read from the leader for twice the TTL: the key must stay, under the same lease.
    let mut absent = Vec::new();
    let mut leases = BTreeSet::from([lease]);
    let mut moved = None;
    while cut.elapsed() < 2 * TTL + Duration::from_secs(1) {
        match cluster.entry_on(1, key) {
            Ok(Some((_, l))) => {
                leases.insert(l);
            }
            Ok(None) => absent.push(cut.elapsed().as_millis()),
            Err(_) => {}
        }
        if moved.is_none()
            && cluster.lease_keep_alive_streams(1) + cluster.lease_keep_alive_streams(2) >= 1.0
        {
            moved = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = a.log();
    println!(
        "announce on member 0 (leader: {zero_leads}), cut off with about {} ms left on its lease: keep-alive moved to the majority after {:?} ms; key absent at {:?} ms after the cut; leases seen {:x?}",
        left.as_millis(),
        moved.map(|m| m.as_millis()),
        absent,
        leases
    );
    assert!(
        absent.is_empty(),
        "the key was absent {} times after the cut, first at {} ms:\n{log}",
        absent.len(),
        absent[0]
    );
    assert_eq!(leases, BTreeSet::from([lease]), "{log}");
    assert!(moved.is_some(), "{log}");
}
