use std::collections::BTreeMap;

use super::*;
use crate::config::Config;
use crate::model::{Route, Snapshot};
use crate::render::Templates;
use crate::slots::Slots;

/// The default template, as the daemon embeds it.
const DEFAULT_TEMPLATE: &str = include_str!("../../../../templates/haproxy.cfg.tera");

fn inst(id: &str, host: &str, port: u16, weight: u16, state: State) -> Instance {
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Instance {
        id: id.into(),
        name: id.into(),
        host: host.into(),
        port,
        addr,
        weight,
        state,
        meta: BTreeMap::new(),
    }
}

/// A service whose slots are `layout`: an instance's position in `instances`, or None (free);
/// slot names srv1, srv2, ….
fn service(name: &str, instances: Vec<Instance>, layout: &[Option<usize>]) -> Arc<Service> {
    let mut instances = instances;
    let slots: Vec<Slot> = layout
        .iter()
        .enumerate()
        .map(|(n, i)| Slot {
            name: format!("srv{}", n + 1),
            instance: *i,
        })
        .collect();
    for slot in &slots {
        if let Some(i) = slot.instance {
            instances[i].name = slot.name.clone();
        }
    }
    Arc::new(Service {
        name: name.into(),
        backend: format!("be_{name}"),
        route: None,
        instances,
        slots,
    })
}

fn registry(services: Vec<Arc<Service>>) -> Registry {
    Registry { services }
}

fn web(instances: Vec<Instance>, layout: &[Option<usize>]) -> Registry {
    registry(vec![service("web", instances, layout)])
}

fn cmds(from: &Registry, to: &Registry) -> Vec<String> {
    match plan(from, to) {
        Ok(c) => c.iter().map(ToString::to_string).collect(),
        Err(e) => panic!("refused: {}", e.0),
    }
}

fn refusal(from: &Registry, to: &Registry) -> String {
    match plan(from, to) {
        Ok(c) => panic!("planned {c:?}"),
        Err(e) => e.0,
    }
}

const L: &str = "127.0.0.1";

#[test]
fn every_field_of_a_slot_becomes_its_command() {
    let a = || inst("a", L, 8001, 100, State::Ready);
    let base = web(vec![a()], &[Some(0), None]);
    let one = |i: Instance| web(vec![i], &[Some(0), None]);

    assert!(cmds(&base, &base).is_empty());
    assert_eq!(
        cmds(&base, &one(inst("a", "127.0.0.2", 8001, 100, State::Ready))),
        ["set server be_web/srv1 addr 127.0.0.2 port 8001"]
    );
    assert_eq!(
        cmds(&base, &one(inst("a", L, 8009, 100, State::Ready))),
        ["set server be_web/srv1 addr 127.0.0.1 port 8009"]
    );
    assert_eq!(
        cmds(&base, &one(inst("a", "::1", 8001, 100, State::Ready))),
        ["set server be_web/srv1 addr ::1 port 8001"]
    );
    assert_eq!(
        cmds(&base, &one(inst("a", L, 8001, 7, State::Ready))),
        ["set server be_web/srv1 weight 7"]
    );
    // Draining is weight 0; back to ready is the weight again.
    let drain = one(inst("a", L, 8001, 100, State::Drain));
    assert_eq!(cmds(&base, &drain), ["set server be_web/srv1 weight 0"]);
    assert_eq!(cmds(&drain, &base), ["set server be_web/srv1 weight 100"]);
    // Maintenance keeps the weight; out of it comes last, into it first.
    let maint = one(inst("a", L, 8001, 100, State::Maint));
    assert_eq!(cmds(&base, &maint), ["set server be_web/srv1 state maint"]);
    assert_eq!(cmds(&maint, &base), ["set server be_web/srv1 state ready"]);
    assert_eq!(
        cmds(&maint, &one(inst("a", L, 8002, 5, State::Ready))),
        [
            "set server be_web/srv1 addr 127.0.0.1 port 8002",
            "set server be_web/srv1 weight 5",
            "set server be_web/srv1 state ready",
        ]
    );
    assert_eq!(
        cmds(&drain, &maint),
        [
            "set server be_web/srv1 state maint",
            "set server be_web/srv1 weight 100",
        ]
    );

    // An instance takes the free slot: address, weight, out of maintenance.
    let b = inst("b", L, 8002, 50, State::Ready);
    let two = web(vec![a(), b.clone()], &[Some(0), Some(1)]);
    assert_eq!(
        cmds(&base, &two),
        [
            "set server be_web/srv2 addr 127.0.0.1 port 8002",
            "set server be_web/srv2 weight 50",
            "set server be_web/srv2 state ready",
        ]
    );
    // It leaves: the slot goes back to 127.0.0.1:1, weight 1, maintenance first.
    assert_eq!(
        cmds(&two, &base),
        [
            "set server be_web/srv2 state maint",
            "set server be_web/srv2 addr 127.0.0.1 port 1",
            "set server be_web/srv2 weight 1",
        ]
    );
    // Another instance in the same slot: only what differs.
    let c = inst("c", L, 8003, 50, State::Ready);
    let swapped = web(vec![a(), c], &[Some(0), Some(1)]);
    assert_eq!(
        cmds(&two, &swapped),
        ["set server be_web/srv2 addr 127.0.0.1 port 8003"]
    );
    // An instance that only changed its id renders the same server line but for its comment.
    let renamed = web(
        vec![a(), inst("b2", L, 8002, 50, State::Ready)],
        &[Some(0), Some(1)],
    );
    assert!(cmds(&two, &renamed).is_empty());
}

#[test]
fn unchanged_services_are_skipped_and_others_planned_in_order() {
    let api = service(
        "api",
        vec![inst("x", L, 9001, 100, State::Ready)],
        &[Some(0)],
    );
    let from = registry(vec![
        Arc::clone(&api),
        service(
            "web",
            vec![inst("a", L, 8001, 100, State::Ready)],
            &[Some(0)],
        ),
    ]);
    let to = registry(vec![
        Arc::clone(&api),
        service(
            "web",
            vec![inst("a", L, 8002, 100, State::Ready)],
            &[Some(0)],
        ),
    ]);
    assert_eq!(
        cmds(&from, &to),
        ["set server be_web/srv1 addr 127.0.0.1 port 8002"]
    );
    assert!(same(&from, &from.clone()));
    assert!(!same(&from, &to));
}

#[test]
fn every_change_the_files_must_carry_is_refused_with_its_reason() {
    let a = || inst("a", L, 8001, 100, State::Ready);
    let base = web(vec![a()], &[Some(0), None]);

    let added = registry(vec![
        service(
            "api",
            vec![inst("x", L, 9001, 100, State::Ready)],
            &[Some(0)],
        ),
        service("web", vec![a()], &[Some(0), None]),
    ]);
    assert!(refusal(&base, &added).contains("added or removed"));
    assert!(refusal(&added, &base).contains("added or removed"));
    let renamed = registry(vec![service("www", vec![a()], &[Some(0), None])]);
    assert!(refusal(&base, &renamed).contains("added or removed"));

    let mut routed = (*service("web", vec![a()], &[Some(0), None])).clone();
    routed.route = Some(Route {
        hosts: vec!["www.test".into()],
        paths: Vec::new(),
        balance: "roundrobin".into(),
        check: None,
    });
    let routed = registry(vec![Arc::new(routed)]);
    assert!(refusal(&base, &routed).contains("route"));

    let grown = web(vec![a()], &[Some(0), None, None]);
    assert!(refusal(&base, &grown).contains("slots"));
    // An instance that moves to another slot is two slots changing, not a new layout.
    let moved = web(vec![a()], &[None, Some(0)]);
    assert_eq!(cmds(&base, &moved).len(), 6);
    let mut renamed_slot = (*base.services[0]).clone();
    renamed_slot.slots[1].name = "srv9".into();
    assert!(refusal(&base, &registry(vec![Arc::new(renamed_slot)])).contains("slots"));

    let named = |host: &str| {
        let mut i = inst("a", L, 8001, 100, State::Ready);
        i.host = host.into();
        i.addr = format!("{host}:8001");
        web(vec![i], &[Some(0), None])
    };
    assert!(refusal(&base, &named("db.test")).contains("host name"));
    assert!(refusal(&named("db.test"), &base).contains("host name"));

    let mut with_meta = a();
    with_meta.meta.insert("zone".into(), "a".into());
    let meta = web(vec![with_meta.clone()], &[Some(0), None]);
    assert!(refusal(&base, &meta).contains("meta"));
    // An instance with meta taking a free slot: a template may render its meta.
    let b = inst("b", L, 8002, 100, State::Ready);
    let mut b_meta = b.clone();
    b_meta.meta.insert("zone".into(), "b".into());
    assert!(refusal(&base, &web(vec![a(), b_meta], &[Some(0), Some(1)])).contains("meta"));
    // Equal meta is no change.
    let meta_moved = web(
        vec![inst("a", L, 8009, 100, State::Ready)]
            .into_iter()
            .map(|mut i| {
                i.meta = with_meta.meta.clone();
                i
            })
            .collect(),
        &[Some(0), None],
    );
    assert_eq!(
        cmds(&meta, &meta_moved),
        ["set server be_web/srv1 addr 127.0.0.1 port 8009"]
    );

    let heavy = web(
        vec![inst("a", L, 8001, 300, State::Ready)],
        &[Some(0), None],
    );
    assert!(refusal(&base, &heavy).contains("weight above 256"));

    let mut broken = (*base.services[0]).clone();
    broken.slots[1].instance = Some(7);
    assert!(refusal(&base, &registry(vec![Arc::new(broken)])).contains("no instance"));
}

/// A registry parsed from `(key, value)` pairs and slotted by `slots` (regrown when `regrow`).
fn parsed(
    pairs: &[(String, String)],
    slots: &mut Slots,
    regrow: bool,
) -> (Arc<Snapshot>, Registry) {
    let prefixes = ["/services/".to_owned(), "/routes/".to_owned()];
    let (snapshot, rejected) = Snapshot::screen(1, &prefixes, pairs.to_vec());
    assert!(rejected.is_empty(), "{rejected:?}");
    let snapshot = Arc::new(snapshot);
    let (mut registry, rejected) = Registry::parse(&snapshot);
    assert!(rejected.is_empty(), "{rejected:?}");
    slots.assign(&mut registry, 2, regrow);
    (snapshot, registry)
}

/// The default template, loaded as the daemon loads it, with the host map (so that routes are
/// map lines) or without it.
fn templates(dir: &std::path::Path, template: &str) -> Templates {
    let d = dir.display();
    let text = format!(
        "[source]\nkind = \"file\"\n[file]\npath = \"{d}/registry.yaml\"\n\
         [[template]]\nname = \"haproxy\"\nsrc = \"{d}/haproxy.cfg.tera\"\ndest = \"{d}/haproxy.cfg\"\ncheck = true\n\
         [haproxy]\nmode = \"none\"\nspare_slots = 2\n"
    );
    let config = Config::parse(&text, "test").expect("config");
    Templates::from_sources(&config, [(&config.templates[0], template)]).expect("templates")
}

fn render(t: &mut Templates, snapshot: &Arc<Snapshot>, registry: &Registry) -> String {
    let out = t.render_all(snapshot, registry).expect("render");
    String::from_utf8(out[0].bytes.clone()).expect("utf-8")
}

#[test]
fn the_default_template_conforms_and_a_template_that_renders_otherwise_does_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pairs: Vec<(String, String)> = vec![
        ("/services/web/a".into(), "127.0.0.1:8001".into()),
        (
            "/services/web/b".into(),
            r#"{"addr":"127.0.0.1:8002","state":"drain"}"#.into(),
        ),
        (
            "/services/web/c".into(),
            r#"{"addr":"[::1]:8003","weight":7,"state":"maint"}"#.into(),
        ),
        ("/services/db/x".into(), "db.test:5432".into()),
    ];
    let mut slots = Slots::default();
    let (snapshot, reg) = parsed(&pairs, &mut slots, true);
    let mut t = templates(dir.path(), DEFAULT_TEMPLATE);
    let text = render(&mut t, &snapshot, &reg);
    assert_eq!(conforms(&reg, &text), Ok(()), "{text}");

    // A template that ignores draining (weight as given) renders another server line.
    let ignores_drain = DEFAULT_TEMPLATE.replace(
        "server {{ i.name }} {{ i.addr }} weight 0  # {{ i.id }}",
        "server {{ i.name }} {{ i.addr }} weight {{ i.weight }}  # {{ i.id }}",
    );
    assert_ne!(ignores_drain, DEFAULT_TEMPLATE);
    let mut t = templates(dir.path(), &ignores_drain);
    let why = conforms(&reg, &render(&mut t, &snapshot, &reg)).expect_err("drain differs");
    assert!(why.contains("be_web/srv2"), "{why}");

    // Servers named by instance id, not by slot.
    let by_id = DEFAULT_TEMPLATE.replace("server {{ i.name }}", "server {{ i.id }}");
    let mut t = templates(dir.path(), &by_id);
    let why = conforms(&reg, &render(&mut t, &snapshot, &reg)).expect_err("names differ");
    assert!(why.contains("slot srv1 was expected"), "{why}");

    // Free slots left out.
    let no_free = DEFAULT_TEMPLATE.replace("    server {{ i }} 127.0.0.1:1 disabled\n", "");
    assert_ne!(no_free, DEFAULT_TEMPLATE);
    let mut t = templates(dir.path(), &no_free);
    let why = conforms(&reg, &render(&mut t, &snapshot, &reg)).expect_err("slots missing");
    assert!(why.contains("server lines for"), "{why}");

    // A backend left out, or written twice.
    let text = render(
        &mut templates(dir.path(), DEFAULT_TEMPLATE),
        &snapshot,
        &reg,
    );
    let without_db = text.replace("backend be_db\n", "backend be_other\n");
    assert!(
        conforms(&reg, &without_db)
            .expect_err("db missing")
            .contains("be_db is not")
    );
    let twice = format!("{text}\nbackend be_db\n    server srv1 db.test:5432\n");
    assert!(conforms(&reg, &twice).expect_err("twice").contains("twice"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Through the default template, the typed plan and the plan from the rendered files are
    /// the same commands whenever the typed plan is made, and every render conforms.
    #[test]
    fn the_typed_plan_is_the_plan_from_the_default_templates_files(
        steps in proptest::collection::vec(
            proptest::collection::vec((0usize..2, 0usize..7, 0usize..8, 0usize..3, 0usize..3, 0usize..8), 0..4),
            2..8,
        ),
        routed in proptest::prelude::any::<bool>(),
        map in proptest::prelude::any::<bool>(),
    ) {
        let dir = tempfile::tempdir().expect("temp dir");
        let template = if map {
            DEFAULT_TEMPLATE.to_owned()
        } else {
            // Without `files.hosts`: routes are acl lines (a reload), as in the default's other branch.
            DEFAULT_TEMPLATE.replace("files.hosts is defined", "false")
        };
        let mut t = templates(dir.path(), &template);
        let mut slots = Slots::default();
        let hosts = ["127.0.0.1", "127.0.0.2", "[::1]", "127.0.0.3", "db.test"];
        let weights = [0u16, 1, 100];
        let states = ["ready", "drain", "maint"];
        let mut previous: Option<(Registry, String)> = None;
        // Both services start with three instances; each step changes a few: a new address,
        // weight, state or meta, an instance removed (6) or one added.
        let mut kv: BTreeMap<String, String> = BTreeMap::new();
        for svc in ["web", "api"] {
            for id in 0..3 {
                kv.insert(format!("/services/{svc}/i{id}"), format!("127.0.0.1:{}", 8100 + id));
            }
        }
        for (n, step) in steps.iter().enumerate() {
            for &(svc, id, addr, weight, state, extra) in step {
                let svc = ["web", "api"][svc];
                let key = format!("/services/{svc}/i{id}");
                if extra == 6 {
                    kv.remove(&key);
                    continue;
                }
                let host = hosts[addr % hosts.len()];
                let port = 8000 + (addr as u16);
                let meta = if extra == 7 { r#","meta":{"zone":"a"}"# } else { "" };
                kv.insert(
                    key,
                    format!(
                        r#"{{"addr":"{host}:{port}","weight":{},"state":"{}"{meta}}}"#,
                        weights[weight], states[state]
                    ),
                );
            }
            if routed && n % 3 == 2 {
                kv.insert("/routes/web".into(), r#"{"hosts":["www.test"]}"#.into());
            }
            let pairs: Vec<(String, String)> = kv.clone().into_iter().collect();
            let (snapshot, reg) = parsed(&pairs, &mut slots, previous.is_none());
            let text = render(&mut t, &snapshot, &reg);
            proptest::prop_assert_eq!(conforms(&reg, &text), Ok(()), "{}", text);
            if let Some((before, old)) = &previous
                && let Ok(typed) = plan(before, &reg)
            {
                let files = super::super::plan(old, &text);
                proptest::prop_assert_eq!(Ok(typed), files, "{}\n---\n{}", old, text);
            }
            previous = Some((reg, text));
        }
    }
}
