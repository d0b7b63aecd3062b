use super::*;
use crate::model::State;
use std::time::Duration;

fn service(name: &str, n: usize) -> Service {
    Service {
        name: name.into(),
        backend: format!("be_{name}"),
        route: None,
        instances: (0..n)
            .map(|i| Instance {
                id: format!("i{i}"),
                name: format!("i{i}"),
                host: "127.0.0.1".into(),
                port: 8000 + i as u16,
                addr: format!("127.0.0.1:{}", 8000 + i),
                weight: 100,
                state: State::Ready,
                meta: Default::default(),
            })
            .collect(),
        slots: Vec::new(),
    }
}

fn reg(services: &[(&str, usize)]) -> Registry {
    Registry {
        services: services
            .iter()
            .map(|(n, c)| Arc::new(service(n, *c)))
            .collect(),
    }
}

fn guard() -> Guard {
    Guard::new(GuardConfig {
        max_drop_percent: 50,
        confirm_after: Duration::from_secs(600),
    })
}

fn count(r: &Registry, name: &str) -> usize {
    r.services
        .iter()
        .find(|s| s.name == name)
        .map_or(0, |s| s.instances.len())
}

#[tokio::test(start_paused = true)]
async fn small_drop_applies_large_drop_is_held() {
    let mut g = guard();
    let last = reg(&[("web", 4), ("api", 4)]);
    let d = g.decide(
        Some(&last),
        reg(&[("web", 3), ("api", 4)]),
        true,
        Instant::now(),
    );
    assert!(d.held.is_empty());
    assert_eq!(count(&d.registry, "web"), 3);

    let d = g.decide(
        Some(&last),
        reg(&[("web", 1), ("api", 5)]),
        true,
        Instant::now(),
    );
    assert_eq!(d.held.len(), 1);
    assert_eq!(
        count(&d.registry, "web"),
        4,
        "web keeps its applied instances"
    );
    assert_eq!(
        count(&d.registry, "api"),
        5,
        "api keeps changing while web is held"
    );
}

#[tokio::test(start_paused = true)]
async fn hold_is_released_after_confirm_after_of_the_same_state() {
    let mut g = guard();
    let last = reg(&[("web", 4)]);
    let t0 = Instant::now();
    let d = g.decide(Some(&last), reg(&[("web", 1)]), true, t0);
    assert_eq!(d.release_at, Some(t0 + Duration::from_secs(600)));
    let d = g.decide(
        Some(&last),
        reg(&[("web", 1)]),
        true,
        t0 + Duration::from_secs(599),
    );
    assert_eq!(d.held.len(), 1);
    let d = g.decide(
        Some(&last),
        reg(&[("web", 1)]),
        true,
        t0 + Duration::from_secs(600),
    );
    assert!(d.held.is_empty());
    assert_eq!(count(&d.registry, "web"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_changing_target_restarts_the_clock_and_confirm_releases() {
    let mut g = guard();
    let last = reg(&[("web", 4), ("api", 1)]);
    let t0 = Instant::now();
    g.decide(Some(&last), reg(&[("web", 1), ("api", 1)]), true, t0);
    let later = t0 + Duration::from_secs(300);
    let d = g.decide(Some(&last), reg(&[("web", 0), ("api", 1)]), true, later);
    assert_eq!(d.held[0].since, later);
    g.confirm();
    // The decision right after a confirmation takes the wanted state as it is.
    let d = g.decide(Some(&last), reg(&[("web", 0), ("api", 1)]), true, later);
    assert!(d.held.is_empty());
    assert_eq!(count(&d.registry, "web"), 0);
}

#[tokio::test(start_paused = true)]
async fn empty_registry_after_nonempty_is_held_whole() {
    let mut g = guard();
    let last = reg(&[("web", 1), ("api", 2)]);
    let d = g.decide(Some(&last), Registry::default(), true, Instant::now());
    assert!(d.hold_all);
    assert_eq!(d.registry.instance_count(), 3);
    // At start-up over an installed file, an empty first read is held too.
    let mut g = guard();
    let d = g.decide(None, Registry::default(), true, Instant::now());
    assert!(d.hold_all);
    // With nothing installed, an empty registry is simply empty.
    let mut g = guard();
    let d = g.decide(None, Registry::default(), false, Instant::now());
    assert!(!d.hold_all);
}

#[tokio::test(start_paused = true)]
async fn a_collapse_spread_over_several_applies_is_still_held() {
    let mut g = guard();
    let t0 = Instant::now();
    let step = Duration::from_secs(4);
    let other = ("api", 2);
    g.decide(
        Some(&reg(&[("web", 4), other])),
        reg(&[("web", 4), other]),
        true,
        t0,
    );
    let d = g.decide(
        Some(&reg(&[("web", 4), other])),
        reg(&[("web", 3), other]),
        true,
        t0 + step,
    );
    assert!(d.held.is_empty(), "25 % is a small drop");
    let d = g.decide(
        Some(&reg(&[("web", 3), other])),
        reg(&[("web", 2), other]),
        true,
        t0 + step * 2,
    );
    assert!(
        d.held.is_empty(),
        "50 % of the 4 seen within confirm_after is allowed"
    );
    let d = g.decide(
        Some(&reg(&[("web", 2), other])),
        reg(&[("web", 1), other]),
        true,
        t0 + step * 3,
    );
    assert_eq!(
        d.held.len(),
        1,
        "75 % of the 4 seen within confirm_after is a collapse"
    );
    assert_eq!(count(&d.registry, "web"), 2);
    // A slow scale-down, one step per confirm_after, is never held.
    let mut g = guard();
    let slow = Duration::from_secs(601);
    g.decide(
        Some(&reg(&[("web", 4), other])),
        reg(&[("web", 4), other]),
        true,
        t0,
    );
    for (i, n) in [3usize, 2, 1].into_iter().enumerate() {
        let d = g.decide(
            Some(&reg(&[("web", n + 1), other])),
            reg(&[("web", n), other]),
            true,
            t0 + slow * (i as u32 + 1),
        );
        assert!(d.held.is_empty(), "step to {n}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_restart_over_a_collapsed_registry_writes_nothing_until_confirmed() {
    let mut g = guard();
    g.remember(Guard::counts(&reg(&[("web", 4), ("api", 2)])));
    let t0 = Instant::now();
    let d = g.decide(None, reg(&[("web", 1), ("api", 2)]), true, t0);
    assert!(
        d.hold_all,
        "write nothing: the installed file is the last good one"
    );
    assert_eq!(d.held.len(), 1);
    assert_eq!(d.release_at, Some(t0 + Duration::from_secs(600)));
    // A small drop since the last run applies.
    let mut g = guard();
    g.remember(Guard::counts(&reg(&[("web", 4), ("api", 2)])));
    assert!(
        !g.decide(None, reg(&[("web", 3), ("api", 2)]), true, t0)
            .hold_all
    );
    // SIGUSR1 releases it; so does confirm_after.
    let mut g = guard();
    g.remember(Guard::counts(&reg(&[("web", 4), ("api", 2)])));
    g.decide(None, reg(&[("web", 1), ("api", 2)]), true, t0);
    g.confirm();
    assert!(
        !g.decide(None, reg(&[("web", 1), ("api", 2)]), true, t0)
            .hold_all
    );
    let mut g = guard();
    g.remember(Guard::counts(&reg(&[("web", 4), ("api", 2)])));
    g.decide(None, reg(&[("web", 1), ("api", 2)]), true, t0);
    let later = t0 + Duration::from_secs(600);
    assert!(
        !g.decide(None, reg(&[("web", 1), ("api", 2)]), true, later)
            .hold_all
    );
}

#[test]
fn the_guard_file_holds_the_counts_of_the_last_apply_for_the_next_run() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().display();
    let config = Config::parse(
        &format!(
            "[source]\nkind = \"file\"\n[file]\npath = \"{d}/r.yaml\"\n[[template]]\nname = \"haproxy\"\nsrc = \"{d}/t\"\ndest = \"{d}/haproxy.cfg\"\ncheck = true\n"
        ),
        "test",
    )
    .expect("config");
    let mut g = Guard::load(&config);
    assert_eq!(g.remembered, None, "no file, nothing remembered");
    g.applied(&config, &reg(&[("web", 4), ("api", 2)]));
    let path = dir.path().join(".haproxy.cfg.haconfd-guard.json");
    let mode = std::fs::metadata(&path)
        .expect("written")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "staged by install, owner only");
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [".haproxy.cfg.haconfd-guard.json"],
        "nothing staged is left"
    );
    let next = Guard::load(&config);
    assert_eq!(
        next.remembered,
        Some(BTreeMap::from([
            ("api".to_owned(), 2),
            ("web".to_owned(), 4)
        ]))
    );
}

/// The baselines are walked beside the registries by name: services that come around a
/// shrinking one, in any order, do not lose or mix up its baseline.
#[tokio::test(start_paused = true)]
async fn a_gradual_collapse_is_held_while_services_come_and_go_around_it() {
    let mut g = guard();
    let t0 = Instant::now();
    let step = |g: &mut Guard, last: &Registry, wanted: &[(&str, usize)], s: u64| {
        g.decide(Some(last), reg(wanted), true, t0 + Duration::from_secs(s))
    };
    let last = reg(&[("e", 4), ("c", 4), ("a", 4)]);
    let d = step(
        &mut g,
        &last,
        &[("e", 4), ("d", 1), ("c", 3), ("b", 1), ("a", 4)],
        1,
    );
    assert!(d.held.is_empty());
    let names: Vec<&str> = d
        .registry
        .services
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["a", "b", "c", "d", "e"], "sorted by name");
    let last = d.registry;
    // c drops to 2: 50% of the 4 it had, which the guard allows.
    let d = step(
        &mut g,
        &last,
        &[("b", 1), ("e", 4), ("a", 3), ("d", 2), ("c", 2)],
        2,
    );
    assert!(d.held.is_empty(), "{:?}", d.held);
    let last = d.registry;
    // c to 1 is 75% of its baseline of 4, though only half of its last apply: held.
    let wanted = [
        ("f", 2),
        ("e", 4),
        ("d", 2),
        ("c", 1),
        ("b", 1),
        ("aa", 1),
        ("a", 2),
    ];
    let d = step(&mut g, &last, &wanted, 3);
    let held: Vec<(&str, usize, usize)> = d
        .held
        .iter()
        .map(|h| (h.service.as_str(), h.applied, h.wanted))
        .collect();
    assert_eq!(held, [("c", 4, 1)]);
    assert_eq!(
        count(&d.registry, "c"),
        2,
        "c keeps its last applied instances"
    );
    assert_eq!(count(&d.registry, "a"), 2, "a: 4 to 2 is within the limit");
    assert_eq!(count(&d.registry, "aa"), 1);
    assert_eq!(count(&d.registry, "f"), 2);
}
