//! The fast path through the pipeline, over the fake's model HAProxy: a server-only change is
//! sent before anything is rendered and its files follow at the wakeup; files that disagree
//! with the typed plan turn it off; an install that fails after a send puts HAProxy back; a
//! reload or restart of HAProxy inside a window is caught at its end.

use super::*;

/// Server lines in the default template's shape (see templates/haproxy.cfg.tera), which the
/// typed plan follows.
const SLOTTED: &str = "\
global
    maxconn 100
{% for s in services %}
backend {{ s.backend }}
{%- for i in s.slots %}
{%- if i is string %}
    server {{ i }} 127.0.0.1:1 disabled
{%- elif i.state == \"ready\" %}
    server {{ i.name }} {{ i.addr }} weight {{ i.weight }}  # {{ i.id }}
{%- elif i.state == \"drain\" %}
    server {{ i.name }} {{ i.addr }} weight 0  # {{ i.id }}
{%- else %}
    server {{ i.name }} {{ i.addr }} weight {{ i.weight }} disabled  # {{ i.id }}
{%- endif %}
{%- endfor %}
{% endfor %}";

/// `[wait]` of the fast applier's config.
const MIN: Duration = Duration::from_millis(50);
const MAX: Duration = Duration::from_millis(500);

/// An applier whose fake drives the Runtime API path, over `template`, two spare slots.
fn fast_applier(template: &str) -> (Applier<Fake>, Arc<Mutex<Vec<String>>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().display();
    let text = format!(
        "[source]\nkind = \"file\"\n[file]\npath = \"{d}/registry.yaml\"\n\
         [[template]]\nname = \"haproxy\"\nsrc = \"{d}/haproxy.cfg.tera\"\ndest = \"{d}/haproxy.cfg\"\ncheck = true\n\
         [haproxy]\nmode = \"none\"\nspare_slots = 2\n\
         [wait]\nmin = \"50ms\"\nmax = \"500ms\"\n"
    );
    let config = Config::parse(&text, "test").expect("config");
    let templates =
        Templates::from_sources(&config, [(&config.templates[0], template)]).expect("templates");
    let commits = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        script: VecDeque::new(),
        commits: Arc::clone(&commits),
        installed: false,
        runtime: Some(Haproxy::new(config.wait)),
    };
    let applier = Applier::with_deploy(config, templates, Arc::default(), fake);
    (applier, commits, dir)
}

/// An update of `(service, instance, value)` keys.
fn values(revision: i64, instances: &[(&str, &str, &str)]) -> Update {
    let pairs: Vec<(String, String)> = instances
        .iter()
        .map(|(s, i, v)| (format!("/services/{s}/{i}"), (*v).to_owned()))
        .collect();
    let (snapshot, rejected) = Snapshot::screen(revision, &["/services/".to_owned()], pairs);
    assert!(rejected.is_empty(), "{rejected:?}");
    Update {
        snapshot: Arc::new(snapshot),
        rejected,
    }
}

fn h(a: &Applier<Fake>) -> &Haproxy {
    a.deploy.runtime.as_ref().expect("runtime fake")
}

fn h_mut(a: &mut Applier<Fake>) -> &mut Haproxy {
    a.deploy.runtime.as_mut().expect("runtime fake")
}

fn server(a: &Applier<Fake>, name: &str) -> Server {
    h(a).servers.get(name).cloned().expect("a server")
}

fn commit_count(commits: &Mutex<Vec<String>>) -> usize {
    commits.lock().expect("lock").len()
}

/// Applies 1 (HAProxy starts) and 2 (a server-only change, installed then sent: its render
/// proves the template), as any daemon begins.
async fn started(a: &mut Applier<Fake>) {
    let r = a
        .apply(&values(1, &[("web", "w1", "127.0.0.1:8001")]))
        .await
        .expect("first apply");
    assert_eq!(r.kind, ApplyKind::Reload);
    let r = a
        .apply(&values(2, &[("web", "w1", "127.0.0.1:8002")]))
        .await
        .expect("second apply");
    assert_eq!((r.kind, r.files_follow), (ApplyKind::Runtime, false));
    assert_eq!(h(a).fast.proof(), Proof::Proven);
    assert_eq!(h(a).events, ["install", "reload", "install"]);
    assert!(h(a).agree());
    assert!(a.wakeup().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_server_only_change_is_sent_before_the_render_and_its_files_follow_at_the_wakeup() {
    let (mut a, commits, _dir) = fast_applier(SLOTTED);
    started(&mut a).await;
    let before = commit_count(&commits);

    // An instance joins: sent from the typed registries, nothing rendered or installed.
    let two = values(
        3,
        &[
            ("web", "w1", "127.0.0.1:8002"),
            ("web", "w2", "127.0.0.1:8003"),
        ],
    );
    let t0 = Instant::now();
    let r = a.apply(&two).await.expect("served");
    assert_eq!((r.kind, r.files_follow), (ApplyKind::Runtime, true));
    assert!(r.changed.is_empty());
    assert_eq!(
        commit_count(&commits),
        before,
        "nothing reached the install"
    );
    assert_eq!(h(&a).events.last(), Some(&"send"));
    assert_eq!(
        server(&a, "be_web/srv2"),
        ("127.0.0.1:8003".to_owned(), 100, false)
    );
    assert!(!h(&a).agree(), "HAProxy is ahead of the file");
    assert_eq!(a.metrics().applied_revision(), 3);
    assert_eq!(
        a.wakeup(),
        Some(t0 + MIN),
        "the files follow once changes pause"
    );

    // Another one within the window: sent too, and the pause starts again.
    tokio::time::advance(Duration::from_millis(10)).await;
    let drained = values(
        4,
        &[
            ("web", "w1", r#"{"addr":"127.0.0.1:8002","state":"drain"}"#),
            ("web", "w2", "127.0.0.1:8003"),
        ],
    );
    let r = a.apply(&drained).await.expect("served");
    assert!(r.files_follow);
    assert_eq!(server(&a, "be_web/srv1").1, 0, "drained: weight 0");
    assert_eq!(a.wakeup(), Some(Instant::now() + MIN));
    assert_eq!(commit_count(&commits), before);

    // The wakeup applies the same state: one install for both, and nothing left to send.
    tokio::time::advance(MIN).await;
    let r = a.apply(&drained).await.expect("installed");
    assert_eq!((r.kind, r.files_follow), (ApplyKind::Runtime, false));
    assert_eq!(r.changed, ["haproxy"]);
    assert_eq!(commit_count(&commits), before + 1);
    assert_eq!(&h(&a).events[3..], ["send", "send", "install"]);
    assert!(h(&a).agree(), "disk and HAProxy agree again");
    assert!(last(&commits).contains("weight 0  # w1"));
    assert!(a.wakeup().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_stream_of_changes_keeps_the_files_behind_for_at_most_wait_max() {
    let (mut a, commits, _dir) = fast_applier(SLOTTED);
    started(&mut a).await;
    let before = commit_count(&commits);
    let t0 = Instant::now();
    let mut served = 0;
    for n in 0..20u16 {
        let port = 8100 + n;
        let u = values(
            10 + i64::from(n),
            &[("web", "w1", &format!("127.0.0.1:{port}"))],
        );
        let r = a.apply(&u).await.expect("applied");
        if r.files_follow {
            served += 1;
            assert!(
                a.wakeup().is_some_and(|w| w <= t0 + MAX),
                "{:?}",
                a.wakeup()
            );
        } else {
            // The window is due: this change goes first all the same, and the files with it.
            assert!(Instant::now() >= t0 + MAX, "closed early at {served}");
            let events = &h(&a).events;
            assert_eq!(events[events.len() - 2..], ["send", "install"]);
            assert!(h(&a).agree());
            break;
        }
        tokio::time::advance(Duration::from_millis(40)).await;
    }
    assert_eq!(served, 13, "sent ahead until [wait] max");
    assert_eq!(commit_count(&commits), before + 1);
}

#[tokio::test(start_paused = true)]
async fn files_that_disagree_with_the_typed_plan_turn_the_fast_path_off() {
    // A template that renders a draining instance like a ready one: the proof (no instance
    // drains yet) cannot see it.
    let ignores_drain = SLOTTED.replace(
        "{{ i.addr }} weight 0  # {{ i.id }}",
        "{{ i.addr }} weight {{ i.weight }}  # {{ i.id }}",
    );
    assert_ne!(ignores_drain, SLOTTED);
    let (mut a, _commits, _dir) = fast_applier(&ignores_drain);
    started(&mut a).await;

    // The typed plan sends weight 0 ahead of the files.
    let drained = values(
        3,
        &[("web", "w1", r#"{"addr":"127.0.0.1:8002","state":"drain"}"#)],
    );
    assert!(a.apply(&drained).await.expect("served").files_follow);
    assert_eq!(server(&a, "be_web/srv1").1, 0);

    // The file does not say weight 0: at the install the plans differ, HAProxy is realigned
    // with the file, and the fast path turns itself off.
    tokio::time::advance(MIN).await;
    let r = a.apply(&drained).await.expect("installed");
    assert!(!r.files_follow);
    assert_eq!(h(&a).fast.proof(), Proof::Off);
    assert_eq!(h(&a).events.last(), Some(&"realign"));
    assert!(h(&a).agree());
    assert_eq!(server(&a, "be_web/srv1").1, 100, "as the file says");

    // From now on a server-only change is installed first, then sent, as before.
    let moved = values(4, &[("web", "w1", "127.0.0.1:8009")]);
    let r = a.apply(&moved).await.expect("applied");
    assert_eq!((r.kind, r.files_follow), (ApplyKind::Runtime, false));
    assert_eq!(h(&a).events.last(), Some(&"install"));
    assert!(h(&a).agree());
    assert!(a.wakeup().is_none());
}

#[tokio::test(start_paused = true)]
async fn an_install_that_fails_on_the_disk_after_a_send_puts_haproxy_back_until_it_lands() {
    let (mut a, commits, _dir) = fast_applier(SLOTTED);
    started(&mut a).await;
    let sent = values(3, &[("web", "w1", "127.0.0.1:8003")]);
    assert!(a.apply(&sent).await.expect("served").files_follow);

    // The files cannot follow: the disk is full. HAProxy goes back to the installed file.
    a.deploy.script.extend([Step::DiskFull, Step::DiskFull]);
    tokio::time::advance(MIN).await;
    let e = a.apply(&sent).await.expect_err("the disk is full");
    assert!(e.to_string().contains("disk full"), "{e}");
    assert_eq!(h(&a).events.last(), Some(&"realign"));
    assert!(h(&a).agree());
    assert_eq!(server(&a, "be_web/srv1").0, "127.0.0.1:8002", "put back");
    let retry = a.wakeup().expect("a retry");

    // Until an install lands, nothing goes ahead of the disk: this change is not served.
    let next = values(4, &[("web", "w1", "127.0.0.1:8004")]);
    a.apply(&next).await.expect_err("still full");
    assert!(h(&a).agree());
    assert_eq!(server(&a, "be_web/srv1").0, "127.0.0.1:8002");
    assert_eq!(h(&a).events.last(), Some(&"realign"));

    // The retry lands the latest state, and HAProxy takes it.
    tokio::time::sleep_until(retry.max(a.wakeup().expect("a retry"))).await;
    let r = a.apply(&next).await.expect("landed");
    assert_eq!((r.kind, r.files_follow), (ApplyKind::Runtime, false));
    assert!(h(&a).agree());
    assert_eq!(server(&a, "be_web/srv1").0, "127.0.0.1:8004");
    assert!(last(&commits).contains("127.0.0.1:8004"));

    // And the fast path is back.
    let again = values(5, &[("web", "w1", "127.0.0.1:8005")]);
    assert!(a.apply(&again).await.expect("served").files_follow);
}

#[tokio::test(start_paused = true)]
async fn haproxy_loading_its_file_inside_a_window_is_seen_at_its_end() {
    let (mut a, _commits, _dir) = fast_applier(SLOTTED);
    started(&mut a).await;
    let sent = values(3, &[("web", "w1", "127.0.0.1:8003")]);
    assert!(a.apply(&sent).await.expect("served").files_follow);

    // Someone reloads HAProxy (`master` mode: its own supervisor): it loads the installed
    // file, without what was sent ahead of it, and its reload count moves.
    let hp = h_mut(&mut a);
    hp.seen.reloads += 1;
    hp.servers = servers_of(&hp.disk);
    tokio::time::advance(MIN).await;
    a.apply(&sent).await.expect("installed");
    assert_eq!(h(&a).events.last(), Some(&"realign"));
    assert!(h(&a).agree());
    assert_eq!(server(&a, "be_web/srv1").0, "127.0.0.1:8003");

    // A supervised HAProxy that restarted (on the installed file) stops the window at once:
    // the change goes with the files, and HAProxy is realigned with them.
    let next = values(4, &[("web", "w1", "127.0.0.1:8004")]);
    assert!(a.apply(&next).await.expect("served").files_follow);
    let hp = h_mut(&mut a);
    hp.seen.restarts += 1;
    hp.servers = servers_of(&hp.disk);
    let after = values(5, &[("web", "w1", "127.0.0.1:8005")]);
    let r = a.apply(&after).await.expect("installed");
    assert!(!r.files_follow, "no more sends once HAProxy restarted");
    assert_eq!(h(&a).events.last(), Some(&"realign"));
    assert!(h(&a).agree());
    assert_eq!(server(&a, "be_web/srv1").0, "127.0.0.1:8005");
}
