use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::model::{Instance, Service, Slot, State};

const WAIT: WaitConfig = WaitConfig {
    min: Duration::from_millis(50),
    max: Duration::from_millis(500),
};

const SEEN: Seen = Seen {
    master_pid: 7,
    reloads: 3,
    restarts: 0,
};

/// `be_web` with one instance at 127.0.0.1:`port` in srv1 and a free srv2.
fn web(port: u16) -> Registry {
    let instance = Instance {
        id: "a".into(),
        name: "srv1".into(),
        host: "127.0.0.1".into(),
        port,
        addr: format!("127.0.0.1:{port}"),
        weight: 100,
        state: State::Ready,
        meta: BTreeMap::new(),
    };
    let slots = vec![
        Slot {
            name: "srv1".into(),
            instance: Some(0),
        },
        Slot {
            name: "srv2".into(),
            instance: None,
        },
    ];
    Registry {
        services: vec![Arc::new(Service {
            name: "web".into(),
            backend: "be_web".into(),
            route: None,
            instances: vec![instance],
            slots,
        })],
    }
}

/// The file the default template renders for `web(port)`, as far as server lines go.
fn file(port: u16) -> String {
    format!(
        "backend be_web\n    server srv1 127.0.0.1:{port} weight 100  # a\n    server srv2 127.0.0.1:1 disabled\n"
    )
}

fn addr(port: u16) -> Cmd {
    Cmd::Addr {
        backend: "be_web".into(),
        server: "srv1".into(),
        ip: "127.0.0.1".parse().expect("ip"),
        port,
    }
}

/// A fast path with the templates proven and HAProxy seen after a commit.
fn ready() -> FastPath {
    let mut f = FastPath::new(WAIT);
    f.prove(&web(1000), &file(1000));
    assert_eq!(f.proof(), Proof::Proven);
    f.committed(Some(SEEN));
    f
}

#[tokio::test(start_paused = true)]
async fn nothing_goes_ahead_without_a_proof_a_proven_file_a_seen_haproxy_or_a_disk() {
    let (old, new) = (web(1000), web(1001));
    assert_eq!(
        ready().commands(&old, &new, true, 0),
        Some(vec![addr(1001)])
    );
    assert_eq!(ready().commands(&old, &old, true, 0), None, "no change");

    let mut unproven = FastPath::new(WAIT);
    unproven.committed(Some(SEEN));
    assert_eq!(unproven.commands(&old, &new, true, 0), None);
    let mut off = FastPath::new(WAIT);
    off.prove(&web(1000), &file(1000).replace("weight 100", "weight 5"));
    assert_eq!(off.proof(), Proof::Off);
    off.committed(Some(SEEN));
    assert_eq!(off.commands(&old, &new, true, 0), None);

    let mut unseen = ready();
    unseen.committed(None);
    assert_eq!(unseen.commands(&old, &new, true, 0), None);
    assert_eq!(
        ready().commands(&old, &new, false, 0),
        None,
        "file not proven"
    );
    assert_eq!(
        ready().commands(&old, &new, true, 1),
        None,
        "HAProxy restarted"
    );

    let mut full = ready();
    assert!(!full.failed(true), "no window was open");
    full.committed(Some(SEEN));
    assert!(
        full.commands(&old, &new, true, 0).is_some(),
        "an install landed"
    );
    let mut full = ready();
    full.failed(true);
    assert_eq!(
        full.commands(&old, &new, true, 0),
        None,
        "seen again only by a commit"
    );
}

#[tokio::test(start_paused = true)]
async fn a_window_follows_the_served_registry_and_closes_when_due() {
    let mut f = ready();
    let (installed, one, two) = (web(1000), web(1001), web(1002));
    let t0 = Instant::now();
    let cmds = f.commands(&installed, &one, true, 0).expect("server-only");
    f.sent(&installed, one.clone(), true, t0);
    assert_eq!(cmds, [addr(1001)]);
    assert!(f.served().is_some_and(|s| typed::same(s, &one)));
    assert_eq!(f.due(), Some(t0 + WAIT.min));

    // The next change is planned from what HAProxy serves, not from the files.
    tokio::time::advance(Duration::from_millis(30)).await;
    let t1 = Instant::now();
    assert_eq!(
        f.commands(&installed, &two, true, 0),
        Some(vec![addr(1002)])
    );
    f.sent(&installed, two.clone(), true, t1);
    assert_eq!(f.due(), Some(t1 + WAIT.min));

    // Once due, a change still goes ahead; the apply that sent it installs the files.
    tokio::time::advance(WAIT.min).await;
    assert!(f.due().is_some_and(|due| due <= Instant::now()));
    assert_eq!(
        f.commands(&installed, &web(1003), true, 0),
        Some(vec![addr(1003)])
    );

    // At the install: the files say what the registry says, and HAProxy has it all.
    assert_eq!(
        f.closing(&two, Ok(&[addr(1002)])),
        Some(After::Send(Vec::new()))
    );
    // With a newer registry than the one served, what changed since the last send.
    assert_eq!(
        f.closing(&web(1004), Ok(&[addr(1004)])),
        Some(After::Send(vec![addr(1004)]))
    );
    assert_eq!(
        f.after_install(After::Send(Vec::new()), Some(SEEN)),
        After::Send(Vec::new())
    );
    f.committed(Some(SEEN));
    assert!(f.served().is_none());
    assert_eq!(f.closing(&two, Ok(&[])), None, "no window");

    // A bound of [wait] max from the first send, however often changes come.
    let t2 = Instant::now();
    f.sent(&installed, one.clone(), true, t2);
    for n in 1..=12 {
        tokio::time::advance(Duration::from_millis(40)).await;
        f.sent(&installed, web(1000 + n), true, Instant::now());
    }
    assert_eq!(f.due(), Some(t2 + WAIT.max));
}

#[tokio::test(start_paused = true)]
async fn a_window_whose_haproxy_may_differ_closes_at_once_with_a_realign() {
    let (installed, one) = (web(1000), web(1001));
    // A send that failed part-way.
    let mut f = ready();
    let t0 = Instant::now();
    f.sent(&installed, one.clone(), false, t0);
    assert_eq!(f.due(), Some(t0));
    assert_eq!(f.commands(&installed, &web(1002), true, 0), None);
    assert_eq!(f.closing(&one, Ok(&[addr(1001)])), Some(After::Realign));

    // HAProxy set from the installed file by `master` mode's look, or new templates.
    for disturb in [FastPath::disturbed as fn(&mut FastPath), |f| {
        f.configure(WAIT)
    }] {
        let mut f = ready();
        f.sent(&installed, one.clone(), true, t0);
        disturb(&mut f);
        assert_eq!(f.due(), Some(t0));
        assert_eq!(f.closing(&one, Ok(&[addr(1001)])), Some(After::Realign));
    }

    // HAProxy seen otherwise at the end than after the last commit: it loaded the file.
    let f = ready();
    let send = After::Send(Vec::new());
    for other in [
        Seen { reloads: 4, ..SEEN },
        Seen {
            master_pid: 8,
            ..SEEN
        },
        Seen {
            restarts: 1,
            ..SEEN
        },
    ] {
        assert_eq!(f.after_install(send.clone(), Some(other)), After::Realign);
    }
    assert_eq!(f.after_install(send, None), After::Realign, "unseen");
}

#[tokio::test(start_paused = true)]
async fn files_that_plan_otherwise_than_the_registry_turn_it_off() {
    let (installed, one) = (web(1000), web(1001));
    let t0 = Instant::now();
    // The files set another port than the typed plan sent.
    let mut f = ready();
    f.sent(&installed, one.clone(), true, t0);
    assert_eq!(f.closing(&one, Ok(&[addr(1009)])), Some(After::Realign));
    assert_eq!(f.proof(), Proof::Off);
    // The files set nothing.
    let mut f = ready();
    f.sent(&installed, one.clone(), true, t0);
    assert_eq!(f.closing(&one, Ok(&[])), Some(After::Realign));
    assert_eq!(f.proof(), Proof::Off);
    // The files need a reload for what was sent alone.
    let mut f = ready();
    f.sent(&installed, one.clone(), true, t0);
    assert_eq!(f.closing(&one, Err("line 9 changed")), Some(After::Realign));
    assert_eq!(f.proof(), Proof::Off);
    // A reload for a newer change (a route, a new service) says nothing of the template.
    let mut f = ready();
    f.sent(&installed, one.clone(), true, t0);
    let mut routed = (*web(1001).services[0]).clone();
    routed.route = Some(crate::model::Route {
        hosts: vec!["www.test".into()],
        paths: Vec::new(),
        balance: "roundrobin".into(),
        check: None,
    });
    let routed = Registry {
        services: vec![Arc::new(routed)],
    };
    assert_eq!(
        f.closing(&routed, Err("line 9 changed")),
        Some(After::Realign)
    );
    assert_eq!(f.proof(), Proof::Proven);
    // A map replaced along with a newer change (a route host) is the files' own.
    let map = Cmd::Map {
        path: "/run/hosts.map".into(),
        entries: Vec::new(),
    };
    let mut f = ready();
    f.sent(&installed, one.clone(), true, t0);
    assert_eq!(
        f.closing(&web(1002), Ok(&[addr(1002), map.clone()])),
        Some(After::Send(vec![addr(1002)]))
    );
    assert_eq!(f.proof(), Proof::Proven);
    // A map that changed with what was sent ahead alone follows the instances: it lagged.
    let mut f = ready();
    f.sent(&installed, one.clone(), true, t0);
    assert_eq!(
        f.closing(&one, Ok(&[addr(1001), map])),
        Some(After::Realign)
    );
    assert_eq!(f.proof(), Proof::Off);
    // A failed commit with a window open: HAProxy must be put back, and the disk waits.
    assert!(f.failed(true));
    assert!(f.served().is_none());
}
