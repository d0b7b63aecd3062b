use std::collections::BTreeMap;

use super::*;
use crate::slots::Slots;
use crate::source::etcd::KeyRevision;

fn prefixes() -> Vec<String> {
    vec![
        SERVICES_PREFIX.to_owned(),
        ROUTES_PREFIX.to_owned(),
        "/other/".to_owned(),
    ]
}

struct Case {
    snapshot: Snapshot,
    registry: Registry,
    screened_out: Vec<Rejection>,
    parsed_out: Vec<Rejection>,
    revisions: KeyRevisions,
}

fn case(pairs: &[(&str, &str)], spare: usize) -> Case {
    let (snapshot, screened_out) = Snapshot::screen(9, &prefixes(), pairs.iter().copied());
    let (mut registry, parsed_out) = Registry::parse(&snapshot);
    Slots::default().assign(&mut registry, spare, true);
    let revisions: KeyRevisions = pairs
        .iter()
        .enumerate()
        .map(|(i, (k, _))| {
            let n = i as i64 + 2;
            (
                (*k).to_owned(),
                KeyRevision {
                    create_revision: n,
                    mod_revision: n + 10,
                    lease: 0,
                },
            )
        })
        .collect();
    Case {
        snapshot,
        registry,
        screened_out,
        parsed_out,
        revisions,
    }
}

fn run(c: &Case, text: &str, node: Option<&NodeState>) -> Explanation {
    explain(&Inputs {
        template: "haproxy",
        dest: "/etc/haproxy/haproxy.cfg",
        text,
        snapshot: &c.snapshot,
        registry: &c.registry,
        revisions: &c.revisions,
        screened_out: &c.screened_out,
        parsed_out: &c.parsed_out,
        node,
    })
}

const RENDER: &str = "global
    master-worker

frontend fe_http
    acl host_be_api var(txn.host) -m str api.example
    acl host_be_web var(txn.host) -m str web
    use_backend be_api if host_be_api
    use_backend be_web if host_be_web
    default_backend _no_route

backend be_api
    balance leastconn
    server srv1 127.0.0.1:9001 weight 100  # a1
    server srv2 127.0.0.1:1 disabled

backend be_web
    balance roundrobin
    server srv1 127.0.0.1:9101 weight 100  # w1
    server srv2 127.0.0.1:9102 weight 100  # w2
    server srv3 127.0.0.1:1 disabled

backend _no_route
    http-request return status 404
";

fn pairs() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "/routes/api",
            r#"{"hosts":["api.example"],"balance":"leastconn"}"#,
        ),
        ("/services/api/a1", "127.0.0.1:9001"),
        ("/services/web/w1", "127.0.0.1:9101"),
        ("/services/web/w2", "127.0.0.1:9102"),
        ("/services/web/bad", "127.0.0.1:99999"),
        ("/services/web/ctl", "127.0.0.1:9\u{7}"),
        ("/routes/ghost", r#"{"hosts":["ghost"]}"#),
        ("/other/x", "1"),
    ]
}

fn keys(e: &Explanation, line: usize) -> Vec<(String, Option<i64>, Option<i64>)> {
    e.lines[line - 1]
        .keys
        .iter()
        .map(|k| (k.key.clone(), k.mod_revision, k.create_revision))
        .collect()
}

#[test]
fn server_lines_come_from_their_instance_keys_with_revisions() {
    let c = case(&pairs(), 1);
    let e = run(&c, RENDER, None);
    assert_eq!(e.lines.len(), RENDER.lines().count());
    // Line 13: server srv1 of be_api, from /services/api/a1 (the second pair: created 3).
    assert_eq!(
        keys(&e, 13),
        vec![("/services/api/a1".to_owned(), Some(13), Some(3))]
    );
    assert_eq!(keys(&e, 18)[0].0, "/services/web/w1");
    assert_eq!(keys(&e, 19)[0].0, "/services/web/w2");
    // A free slot came from no key.
    assert!(keys(&e, 14).is_empty());
    assert_eq!(e.lines[13].note, Some("a spare slot: no instance"));
    assert_eq!(e.lines[13].service.as_deref(), Some("api"));
}

#[test]
fn other_service_lines_come_from_the_route_or_the_service() {
    let c = case(&pairs(), 1);
    let e = run(&c, RENDER, None);
    // The frontend's acl and use_backend lines name the backend.
    for line in [5, 7, 11, 12] {
        assert_eq!(keys(&e, line)[0].0, "/routes/api", "line {line}");
    }
    // web has no route: its lines come from its instances as a whole.
    for line in [6, 8, 16, 17] {
        assert!(keys(&e, line).is_empty(), "line {line}");
        assert_eq!(e.lines[line - 1].service.as_deref(), Some("web"));
    }
    // The template's own lines belong to nobody.
    for line in [1, 2, 3, 4, 9, 10, 21, 22] {
        assert_eq!(e.lines[line - 1].service, None, "line {line}");
    }
}

#[test]
fn every_key_left_out_says_who_left_it_out_and_why_never_the_value() {
    let c = case(&pairs(), 1);
    let e = run(&c, RENDER, None);
    let by: BTreeMap<&str, (&str, &str)> = e
        .left_out
        .iter()
        .map(|l| (l.key.as_str(), (l.by, l.reason.as_str())))
        .collect();
    assert_eq!(by.get("/services/web/bad").map(|b| b.0), Some("registry"));
    assert!(by["/services/web/bad"].1.contains("port"), "{by:?}");
    assert_eq!(by.get("/services/web/ctl").map(|b| b.0), Some("screen"));
    // The route of a service with no instance makes a backend in the registry; this render
    // has none for it, so the template left it out.
    assert_eq!(by.get("/routes/ghost").map(|b| b.0), Some("template"));
    assert_eq!(by.len(), 3, "{by:?}");
    for l in &e.left_out {
        assert!(!l.reason.contains("99999") && !l.reason.contains('\u{7}'));
    }
    assert!(e.notes.iter().any(|n| n.contains("1 key(s) outside")));
}

#[test]
fn the_guard_and_isolation_of_this_node_are_named() {
    let c = case(&pairs(), 1);
    let node = NodeState {
        node: "lb-1".into(),
        held: vec!["web".into(), "gone".into()],
        held_back: vec!["/services/api/a1".into()],
        ..NodeState::default()
    };
    let e = run(&c, RENDER, Some(&node));
    let find = |k: &str| e.left_out.iter().find(|l| l.key == k).expect(k);
    assert_eq!(find("/services/web/w1").by, "guard");
    assert!(find("/services/web/w2").reason.contains("lb-1"));
    assert_eq!(find("/services/api/a1").by, "haproxy -c");
    assert!(e.notes.iter().any(|n| n.contains("service gone")));
}

#[test]
fn text_annotates_lines_and_json_carries_the_same() {
    let c = case(&pairs(), 1);
    let e = run(&c, RENDER, None);
    let text = e.text();
    assert!(
        text.contains("    server srv1 127.0.0.1:9001 weight 100  # a1    #> /services/api/a1 @13 (created 3)\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "backend be_web    #> service web: the service's instances (it has no route)\n"
        )
    );
    assert!(text.contains("global\n    master-worker\n\n"), "{text}");
    assert!(text.contains("#   /services/web/bad (registry): "));
    let json: serde_json::Value = serde_json::from_str(&e.json()).expect("json");
    let line = &json["lines"][12];
    assert_eq!(line["line"], 13);
    assert_eq!(line["service"], "api");
    assert_eq!(line["keys"][0]["key"], "/services/api/a1");
    assert_eq!(line["keys"][0]["mod_revision"], 13);
    assert_eq!(line["keys"][0]["create_revision"], 3);
    assert_eq!(json["revision"], 9);
    assert!(json["left_out"].as_array().is_some_and(|l| l.len() == 3));
}

#[test]
fn a_key_that_needs_escaping_keeps_its_escaped_form() {
    assert_eq!(plain("\"/services/a/b\""), "/services/a/b");
    assert_eq!(plain("\"/services/a/\\u{7}\""), "\"/services/a/\\u{7}\"");
}
