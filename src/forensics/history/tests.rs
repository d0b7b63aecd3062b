//! The rows and their text and JSON, without etcd: changes as etcd's replay gives them.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use super::output::{self, Header, Since};
use super::rows::{self, Kind, Removal, Row, Subject, Value};
use crate::etcd::history::{Change, Changes, Pair};

fn prefixes() -> Vec<String> {
    vec!["/services/".into(), "/routes/".into()]
}

fn pair(key: &str, value: &str, create: i64, modified: i64, lease: i64) -> Pair {
    Pair {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        create_revision: create,
        mod_revision: modified,
        lease,
    }
}

/// A put of `value` at `rev`, over `prev` (its value, create revision and lease) if any.
fn put(rev: i64, key: &str, value: &str, lease: i64, prev: Option<(&str, i64, i64)>) -> Change {
    let create = prev.map_or(rev, |p| p.1);
    Change {
        revision: rev,
        key: key.as_bytes().to_vec(),
        put: Some(pair(key, value, create, rev, lease)),
        prev: prev.map(|(v, c, l)| pair(key, v, c, rev - 1, l)),
    }
}

/// A removal at `rev` of `value` (created at `create`, with `lease`).
fn gone(rev: i64, key: &str, value: &str, create: i64, lease: i64) -> Change {
    Change {
        revision: rev,
        key: key.as_bytes().to_vec(),
        put: None,
        prev: Some(pair(key, value, create, rev - 1, lease)),
    }
}

fn build(changes: &[Change]) -> Vec<Row> {
    rows::build(changes, &prefixes())
}

fn whats(rows: &[Row]) -> Vec<String> {
    rows.iter().map(output::what).collect()
}

#[test]
fn an_instance_appears_changes_is_put_again_and_leaves() {
    let w1 = "/services/web/w1";
    let drain = r#"{"addr":"127.0.0.1:8082","weight":50,"state":"drain"}"#;
    let rows = build(&[
        put(5, w1, "127.0.0.1:8081", 0, None),
        put(6, w1, drain, 0, Some(("127.0.0.1:8081", 5, 0))),
        put(7, w1, drain, 0, Some((drain, 5, 0))),
        put(
            8,
            w1,
            r#"{"addr":"127.0.0.1:8082","weight":50,"state":"drain","meta":{"zone":"a"}}"#,
            0,
            Some((drain, 5, 0)),
        ),
        gone(9, w1, drain, 5, 0),
    ]);
    assert_eq!(
        whats(&rows),
        [
            "appeared 127.0.0.1:8081 w=100 ready",
            "changed 127.0.0.1:8081 → 127.0.0.1:8082, weight 100 → 50, state ready → drain",
            "re-put, unchanged",
            "changed meta zone",
            "left (deleted)",
        ]
    );
    assert_eq!(
        rows.iter().map(|r| r.kind).collect::<Vec<_>>(),
        [
            Kind::Appeared,
            Kind::Changed,
            Kind::Unchanged,
            Kind::Changed,
            Kind::Left
        ]
    );
    assert_eq!(
        rows.iter().map(|r| r.revision).collect::<Vec<_>>(),
        [5, 6, 7, 8, 9]
    );
    assert_eq!(
        rows[0].subject,
        Subject::Instance {
            service: "web".into(),
            instance: "w1".into()
        }
    );
    assert_eq!(rows[4].removal, Some(Removal::Deleted));
}

#[test]
fn only_what_changed_is_named() {
    let w = "/services/web/w1";
    let rows = build(&[
        put(
            6,
            w,
            r#"{"addr":"127.0.0.1:8081","weight":7}"#,
            0,
            Some(("127.0.0.1:8081", 5, 0)),
        ),
        put(
            7,
            w,
            r#"{"addr":"127.0.0.1:8081"}"#,
            0,
            Some(("127.0.0.1:8081", 5, 0)),
        ),
    ]);
    assert_eq!(
        whats(&rows),
        [
            "changed weight 100 → 7",
            "changed (written differently, same meaning)"
        ]
    );
}

#[test]
fn a_lease_revoked_with_two_keys_is_an_end_or_a_delete_and_says_how_many_went() {
    let (a, b) = ("/services/web/a", "/services/web/b");
    let mut rows = build(&[
        put(5, a, "127.0.0.1:8081", 0x7f, None),
        put(6, b, "127.0.0.1:8082", 0x7f, None),
        gone(7, a, "127.0.0.1:8081", 5, 0x7f),
        gone(7, b, "127.0.0.1:8082", 6, 0x7f),
    ]);
    assert_eq!(rows::leases_in_doubt(&rows), [0x7f]);
    rows::settle(&mut rows, &HashMap::from([(0x7f, false)]));
    assert_eq!(rows[2].removal, Some(Removal::LeaseEndedOrDeleted));
    assert_eq!(rows[2].lease_keys_removed, 2);
    assert_eq!(
        whats(&rows)[0],
        "appeared 127.0.0.1:8081 w=100 ready, lease 7f"
    );
    assert_eq!(
        whats(&rows)[3],
        "left (lease 7f ended (expired or revoked) or deleted; 2 of its keys left at this revision)"
    );
}

#[test]
fn a_lease_that_outlived_the_removal_makes_it_a_delete() {
    let (a, b, c) = ("/services/web/a", "/services/web/b", "/services/web/c");
    let mut rows = build(&[
        put(5, a, "127.0.0.1:8081", 9, None),
        put(6, b, "127.0.0.1:8082", 9, None),
        // a is deleted; b still holds lease 9 afterwards, so 9 had not ended.
        gone(7, a, "127.0.0.1:8081", 5, 9),
        gone(8, b, "127.0.0.1:8082", 6, 9),
        // c is put with lease 11 after its key of lease 11 went: 11 was alive.
        put(9, c, "127.0.0.1:8083", 11, None),
        gone(10, c, "127.0.0.1:8083", 9, 11),
        put(11, c, "127.0.0.1:8083", 11, None),
        // d's lease 12 is alive now (etcd says so).
        put(12, "/services/web/d", "127.0.0.1:8084", 12, None),
        gone(13, "/services/web/d", "127.0.0.1:8084", 12, 12),
    ]);
    assert_eq!(
        rows[2].removal,
        Some(Removal::DeletedLeaseLived { now: false })
    );
    assert_eq!(rows[3].removal, Some(Removal::LeaseEndedOrDeleted));
    assert_eq!(
        rows[5].removal,
        Some(Removal::DeletedLeaseLived { now: false })
    );
    assert_eq!(rows::leases_in_doubt(&rows), [9, 12]);
    rows::settle(&mut rows, &HashMap::from([(9, false), (12, true)]));
    assert_eq!(rows[3].removal, Some(Removal::LeaseEndedOrDeleted));
    assert_eq!(
        rows[8].removal,
        Some(Removal::DeletedLeaseLived { now: true })
    );
    let w = whats(&rows);
    assert_eq!(w[2], "left (deleted; its lease 9 lived on)");
    assert_eq!(w[8], "left (deleted; its lease c is still alive)");
}

#[test]
fn a_lease_change_on_a_put_is_shown() {
    let w = "/services/web/w1";
    let rows = build(&[
        put(
            6,
            w,
            "127.0.0.1:8081",
            0xab,
            Some(("127.0.0.1:8081", 5, 0xaa)),
        ),
        put(7, w, "127.0.0.1:8081", 0, Some(("127.0.0.1:8081", 5, 0xab))),
        put(8, w, "127.0.0.1:8082", 0xac, Some(("127.0.0.1:8081", 5, 0))),
    ]);
    assert_eq!(
        whats(&rows),
        [
            "re-put, unchanged, lease aa → ab",
            "re-put, unchanged, lease ab → none",
            "changed 127.0.0.1:8081 → 127.0.0.1:8082, lease none → ac",
        ]
    );
}

#[test]
fn a_change_whose_past_is_compacted_says_so() {
    let w = "/services/web/w1";
    let rows = build(&[
        // A put over a version etcd no longer holds: created before, no previous pair.
        Change {
            revision: 10,
            key: w.as_bytes().to_vec(),
            put: Some(pair(w, "127.0.0.1:8081", 3, 10, 0)),
            prev: None,
        },
        Change {
            revision: 11,
            key: b"/services/web/w2".to_vec(),
            put: None,
            prev: None,
        },
    ]);
    assert_eq!(rows[0].kind, Kind::Changed);
    assert!(rows[0].old_compacted);
    assert_eq!(rows[1].removal, Some(Removal::Unknown));
    assert_eq!(
        whats(&rows),
        [
            "changed to 127.0.0.1:8081 w=100 ready (the value before is compacted away)",
            "left (cause unknown: what it held is compacted away)",
        ]
    );
}

#[test]
fn a_value_that_does_not_parse_is_shown_by_its_reason_never_by_its_bytes() {
    let w = "/services/web/w1";
    let rows = build(&[
        put(5, w, "hunter2-secret:99999", 0, None),
        // Valid JSON, but a tab: the screen refuses it before any parse.
        put(
            6,
            w,
            "{\"addr\":\"127.0.0.1:8081\",\t\"weight\":5}",
            0,
            Some(("hunter2-secret:99999", 5, 0)),
        ),
        put(
            7,
            w,
            r#"{"addr":"127.0.0.1:8081","password":"hunter2"}"#,
            0,
            Some(("x", 5, 0)),
        ),
    ]);
    let text = output::text(&header(5, 7), &rows);
    assert!(!text.contains("hunter2"), "{text}");
    assert_eq!(
        whats(&rows)[0],
        "appeared unparsable value (field addr: the port is not a number from 1 to 65535)"
    );
    assert!(whats(&rows)[1].contains("unparsable value (value contains a tab or line break)"));
    assert!(
        matches!(&rows[2].new, Some(Value::Unparsable(why)) if why.contains("an unknown field"))
    );
}

#[test]
fn keys_that_are_not_plain_are_escaped_and_other_keys_show_no_value() {
    let odd = "/services/web/a b\u{202e}";
    let rows = build(&[
        put(5, odd, "127.0.0.1:8081", 0, None),
        put(6, "/services/web", "secret", 0, None),
        put(7, "/services/web", "secret2", 0, Some(("secret", 6, 0))),
    ]);
    assert_eq!(rows[0].key, "\"/services/web/a b\\u{202e}\"");
    assert_eq!(rows[0].subject, Subject::Other);
    assert_eq!(rows[1].key, "/services/web");
    assert_eq!(
        whats(&rows),
        [
            "key appeared (14 bytes)",
            "key appeared (6 bytes)",
            "key changed (6 → 7 bytes)"
        ]
    );
}

#[test]
fn a_route_appears_changes_and_leaves() {
    let r = "/routes/web";
    let v1 = r#"{"hosts":["web.example.com"],"paths":["/api"],"check":"/health"}"#;
    let v2 =
        r#"{"hosts":["web.example.com","www.example.com"],"paths":["/api"],"balance":"leastconn"}"#;
    let rows = build(&[
        put(5, r, v1, 0, None),
        put(6, r, v2, 0, Some((v1, 5, 0))),
        gone(7, r, v2, 5, 0),
    ]);
    assert_eq!(
        whats(&rows),
        [
            "route appeared hosts=web.example.com paths=/api balance=roundrobin check=/health",
            "route changed hosts web.example.com → web.example.com,www.example.com, balance roundrobin → leastconn, check /health → none",
            "route left (deleted)",
        ]
    );
}

#[test]
fn a_service_is_its_instance_keys_and_its_route_key() {
    assert!(rows::in_service(b"/services/web/w1", "web"));
    assert!(rows::in_service(b"/routes/web", "web"));
    assert!(!rows::in_service(b"/routes/web2", "web"));
    assert!(!rows::in_service(b"/services/web2/w1", "web"));
    assert!(!rows::in_service(b"/services/web", "web"));
}

#[test]
fn the_replayed_prefixes_never_overlap_and_narrow_to_a_service() {
    let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let watched = p(&["/services/", "/routes/"]);
    assert_eq!(rows::replayed_prefixes(&watched, None), watched);
    assert_eq!(
        rows::replayed_prefixes(&p(&["/", "/services/", "/routes/"]), None),
        p(&["/"])
    );
    assert_eq!(
        rows::replayed_prefixes(&watched, Some("web")),
        p(&["/services/web/", "/routes/web"])
    );
    // A watched prefix narrower than the service's keys is replayed as it is.
    assert_eq!(
        rows::replayed_prefixes(&p(&["/services/web/a", "/other/"]), Some("web")),
        p(&["/services/web/a"])
    );
    assert!(rows::replayed_prefixes(&p(&["/other/"]), Some("web")).is_empty());
}

fn changes(revisions: &[i64], truncated: bool) -> Changes {
    Changes {
        changes: revisions
            .iter()
            .map(|&r| put(r, &format!("/services/s/i{r}"), "127.0.0.1:1", 0, None))
            .collect(),
        truncated,
    }
}

#[test]
fn merged_replays_are_in_revision_order_and_complete_only_as_far_as_every_one_is() {
    let (all, through) = rows::merge(
        vec![changes(&[2, 5, 9], false), changes(&[3, 4, 12], false)],
        10,
        20,
    );
    let revs: Vec<i64> = all.iter().map(|c| c.revision).collect();
    assert_eq!((revs, through), (vec![2, 3, 4, 5, 9, 12], 20));
    // The second replay stopped at its limit during revision 6: complete through 5 only.
    let (all, through) = rows::merge(
        vec![changes(&[2, 7, 9], false), changes(&[3, 6], true)],
        10,
        20,
    );
    let revs: Vec<i64> = all.iter().map(|c| c.revision).collect();
    assert_eq!((revs, through), (vec![2, 3], 5));
    // Over the limit once merged.
    let (all, through) = rows::merge(
        vec![changes(&[2, 4, 6], false), changes(&[3, 5, 7], false)],
        4,
        20,
    );
    let revs: Vec<i64> = all.iter().map(|c| c.revision).collect();
    assert_eq!((revs, through), (vec![2, 3, 4, 5], 5));
}

fn header(from: i64, to: i64) -> Header {
    Header {
        prefixes: prefixes(),
        service: None,
        from,
        to,
        oldest: 1,
        through: to,
        limit: 100,
        since: None,
        times_known: false,
    }
}

#[test]
fn the_text_header_says_where_the_history_starts_and_why() {
    let rows = build(&[put(5, "/services/web/w1", "127.0.0.1:8081", 0, None)]);
    let text = output::text(&header(1, 9), &rows);
    assert!(text.starts_with("# history of /services/, /routes/: from revision 1, etcd's first (nothing compacted), to 9\n"), "{text}");
    assert!(text.contains("# TIME: unknown (-)"), "{text}");
    assert!(
        text.contains(
            "\nTIME  REV  KEY               CHANGE\n-       5  /services/web/w1  appeared"
        ),
        "{text}"
    );

    let compacted = Header {
        oldest: 4,
        ..header(4, 9)
    };
    let text = output::text(&compacted, &[]);
    assert!(
        text.contains("from revision 4, the oldest etcd still holds (compacted before), to 9"),
        "{text}"
    );
    assert!(text.ends_with("# no changes\n"), "{text}");

    let truncated = Header {
        through: 7,
        ..header(1, 9)
    };
    assert!(
        output::text(&truncated, &[])
            .contains("# truncated at 100 changes: complete through revision 7")
    );

    let since = Header {
        since: Some(Since {
            duration: "1h".into(),
            at: "2026-12-04T08:00:00Z".into(),
            record: None,
        }),
        ..header(1, 9)
    };
    assert!(
        output::text(&since, &[])
            .contains("since 1h (2026-12-04T08:00:00Z): no node had published an apply that old")
    );
}

#[test]
fn a_known_time_is_shown_to_the_second() {
    let mut rows = build(&[put(5, "/services/web/w1", "127.0.0.1:8081", 0, None)]);
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_371_200_700);
    rows[0].time = Some(("lb-1".into(), at));
    let text = output::text(
        &Header {
            times_known: true,
            ..header(1, 9)
        },
        &rows,
    );
    assert!(
        text.contains("\n2026-12-04T08:00:00Z    5  /services/web/w1"),
        "{text}"
    );
    assert!(
        text.contains("# TIME: when a node first reported having applied"),
        "{text}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&output::json(&header(1, 9), &rows).expect("json")).expect("parses");
    assert_eq!(v["changes"][0]["time"], "2026-12-04T08:00:00Z");
    assert_eq!(v["changes"][0]["time_node"], "lb-1");
}

#[test]
fn the_json_document_has_the_range_and_every_field_of_every_change() {
    let mut rows = build(&[
        put(5, "/services/web/w1", "127.0.0.1:8081", 0x7f, None),
        gone(6, "/services/web/w1", "127.0.0.1:8081", 5, 0x7f),
        put(
            7,
            "/routes/web",
            r#"{"hosts":["web.example.com"]}"#,
            0,
            None,
        ),
    ]);
    rows::settle(&mut rows, &HashMap::new());
    let h = Header {
        oldest: 5,
        service: Some("web".into()),
        ..header(5, 9)
    };
    let v: serde_json::Value =
        serde_json::from_str(&output::json(&h, &rows).expect("json")).expect("parses");
    assert_eq!(v["from"], 5);
    assert_eq!(v["to"], 9);
    assert_eq!(v["oldest"], 5);
    assert_eq!(v["compacted_before"], 5);
    assert_eq!(v["truncated"], false);
    assert_eq!(v["service"], "web");
    let c = &v["changes"];
    assert_eq!(c.as_array().map(Vec::len), Some(3));
    assert_eq!(c[0]["kind"], "appeared");
    assert_eq!(c[0]["service"], "web");
    assert_eq!(c[0]["instance"], "w1");
    assert_eq!(c[0]["time"], serde_json::Value::Null);
    assert_eq!(c[0]["old"], serde_json::Value::Null);
    assert_eq!(c[0]["new"]["addr"], "127.0.0.1:8081");
    assert_eq!(c[0]["new"]["weight"], 100);
    assert_eq!(c[0]["new"]["state"], "ready");
    assert_eq!(c[0]["lease"], "7f");
    assert_eq!(c[1]["kind"], "left");
    assert_eq!(c[1]["removed_by"], "lease_end_or_delete");
    assert_eq!(c[1]["lease_keys_removed"], 1);
    assert_eq!(c[1]["old"]["addr"], "127.0.0.1:8081");
    assert_eq!(c[2]["kind"], "route_appeared");
    assert_eq!(c[2]["instance"], serde_json::Value::Null);
    assert_eq!(c[2]["new"]["hosts"][0], "web.example.com");
    for field in [
        "revision",
        "time",
        "time_node",
        "key",
        "service",
        "instance",
        "kind",
        "old",
        "new",
        "old_compacted",
        "removed_by",
        "lease",
        "prev_lease",
        "lease_keys_removed",
    ] {
        assert!(c[0].get(field).is_some(), "{field}");
    }
}
