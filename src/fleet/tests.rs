use super::*;
use crate::haproxy::ApplyKind;

#[test]
fn haproxy_state_by_mode() {
    use HaproxyMode::*;
    assert_eq!(haproxy_state(None, false, false), "not driven");
    assert_eq!(haproxy_state(Command, true, true), "not driven");
    assert_eq!(haproxy_state(Master, true, true), "running");
    assert_eq!(haproxy_state(Supervise, false, false), "not started");
    assert_eq!(haproxy_state(Supervise, false, true), "running");
    assert_eq!(haproxy_state(Supervise, true, true), "stopping");
}

#[test]
fn the_state_follows_the_metrics() {
    let m = Metrics::default();
    let s = NodeState::current("lb-1", HaproxyMode::Supervise, &m);
    assert_eq!((s.revision, s.hash.as_str(), s.applied_at), (0, "", None));
    assert!(!s.ready);
    assert_eq!(s.reason.as_deref(), Some("no successful apply yet"));
    assert_eq!(s.haproxy, "not started");

    m.source_update(2);
    m.applied(ApplyKind::Start, 42);
    m.set_held(&["web".into()], &["/services/api/a".into()]);
    m.set_rejected(3);
    m.set_last_apply("0123456789ab", ApplyKind::Start, true);
    let s = NodeState::current("lb-1", HaproxyMode::Supervise, &m);
    assert_eq!(
        (s.revision, s.hash.as_str(), s.kind.as_str(), s.rejected),
        (42, "0123456789ab", "start", 3)
    );
    assert_eq!(
        (s.held.clone(), s.held_back.clone()),
        (vec!["web".to_owned()], vec!["/services/api/a".to_owned()])
    );
    assert!(s.ready && s.reason.is_none(), "{s:?}");
    assert_eq!(s.haproxy, "running");
    let at = s.applied_at.expect("applied_at");
    assert!(at.ends_with('Z') && at.len() == 20, "{at}");
    let json: serde_json::Value = serde_json::from_str(
        &serde_json::to_string(&NodeState::current("lb-1", HaproxyMode::Supervise, &m))
            .expect("json"),
    )
    .expect("parse");
    assert!(
        json.get("reason").is_none(),
        "no reason while ready: {json}"
    );
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));

    m.set_stopping();
    let s = NodeState::current("lb-1", HaproxyMode::Supervise, &m);
    assert_eq!(s.haproxy, "stopping");
    assert!(!s.ready && s.reason.is_some_and(|r| r.starts_with("stopping")));
}

#[test]
fn a_reader_takes_defaults_for_missing_fields() {
    let s: NodeState =
        serde_json::from_str(r#"{"node":"x","revision":7,"future":1}"#).expect("lenient");
    assert_eq!((s.revision, s.ready, s.held.len()), (7, false, 0));
}

#[test]
fn ages_in_their_largest_unit() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    let ago = |s: u64| age(now, now - Duration::from_secs(s));
    assert_eq!(
        [
            ago(0),
            ago(59),
            ago(60),
            ago(3599),
            ago(3600),
            ago(86400 * 3)
        ],
        ["0s", "59s", "1m", "59m", "1h", "3d"]
    );
    assert_eq!(
        age(now, now + Duration::from_secs(5)),
        "0s",
        "a clock ahead is no age"
    );
}

#[test]
fn the_table_has_a_header_and_one_aligned_row_per_node() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let at = humantime::format_rfc3339_seconds(now - Duration::from_secs(3)).to_string();
    let rows = vec![
        Row {
            state: NodeState {
                node: "lb-1".into(),
                revision: 120,
                hash: "0123456789ab".into(),
                applied_at: Some(at),
                ready: true,
                ..NodeState::default()
            },
            converged: true,
            note: None,
        },
        Row {
            state: NodeState {
                node: "lb-22".into(),
                revision: 7,
                held: vec!["web".into()],
                reason: Some("stopping".into()),
                ..NodeState::default()
            },
            converged: false,
            note: Some("its revision 7 was compacted".into()),
        },
    ];
    let text = table(&rows, now);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("NODE   REVISION  CONVERGED  HASH"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("lb-1   120       yes        0123456789ab  3s   0     yes"),
        "{text}"
    );
    assert!(
        lines[2].ends_with("its revision 7 was compacted; not ready: stopping; guard holds: web"),
        "{text}"
    );
    let json = json_rows(&rows);
    assert_eq!(json[0]["converged"], true);
    assert_eq!(json[1]["note"], "its revision 7 was compacted");
    assert!(json[0].get("note").is_none());
}
