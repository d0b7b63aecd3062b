use super::*;

#[test]
fn encodes_prometheus_text_and_tracks_readiness() {
    let m = Metrics::default();
    assert!(m.readiness().is_err());
    m.source_update(3);
    m.applied(ApplyKind::Reload, 42);
    m.check_failures.inc();
    assert_eq!(m.readiness(), Ok(()));
    let text = m.encode();
    assert!(
        text.contains("haconfd_applies_total{kind=\"reload\"} 1"),
        "{text}"
    );
    assert!(text.contains("haconfd_applied_revision 42"), "{text}");
    assert!(text.contains("haconfd_check_failures_total 1"), "{text}");
    assert!(text.contains("haconfd_watched_keys 3"), "{text}");
    m.source_down("etcd unreachable");
    assert_eq!(
        m.readiness(),
        Ok(()),
        "a fresh disconnection is not staleness"
    );
    let detail = m.source_detail().expect("a detail line while disconnected");
    assert!(
        detail.starts_with("source not connected: etcd unreachable; state stale for 0s"),
        "{detail}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_disconnection_turns_not_ready_only_past_stale_after() {
    let m = Metrics::default();
    m.set_stale_after(Duration::from_secs(30));
    m.source_update(1);
    m.applied(ApplyKind::Start, 1);
    tokio::time::advance(Duration::from_secs(600)).await;
    assert_eq!(m.readiness(), Ok(()), "a connected file source never ages");
    assert_eq!(m.source_stale_for(), Duration::ZERO);

    m.source_down("registry file unreadable");
    tokio::time::advance(Duration::from_secs(30)).await;
    assert_eq!(m.readiness(), Ok(()), "30 s down is not past 30 s");
    assert!(m.source_detail().is_some());
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        m.readiness(),
        Err("state stale for 31s, past stale_after 30s (source not connected: registry file unreadable)".into())
    );
    assert_eq!(m.source_detail(), None, "the verdict says it already");
    assert!(
        m.encode().contains("haconfd_source_stale_seconds 31.0"),
        "{}",
        m.encode()
    );
    m.source_ok();
    assert_eq!(m.readiness(), Ok(()));
    assert!(m.encode().contains("haconfd_source_stale_seconds 0.0"));
}

#[tokio::test(start_paused = true)]
async fn an_install_failing_on_the_disk_turns_not_ready_past_stale_after() {
    let m = Metrics::default();
    m.set_stale_after(Duration::from_secs(30));
    m.source_update(1);
    m.applied(ApplyKind::Start, 1);
    let what = "cannot install /etc/haproxy/haproxy.cfg: disk full";
    m.install_failed("disk_full", what.into());
    assert_eq!(m.readiness(), Ok(()), "a fresh failure is not staleness");
    let detail = m.install_detail().expect("a detail line while failing");
    assert!(detail.starts_with(what), "{detail}");
    let text = m.encode();
    assert!(text.contains("haconfd_install_failing 1"), "{text}");
    assert!(
        text.contains("haconfd_install_failures_total{reason=\"disk_full\"} 1"),
        "{text}"
    );
    // Retries that fail again keep the start of the streak.
    tokio::time::advance(Duration::from_secs(20)).await;
    m.install_failed("disk_full", what.into());
    tokio::time::advance(Duration::from_secs(11)).await;
    let why = m.readiness().expect_err("failing past stale_after");
    assert!(why.starts_with(what), "{why}");
    assert!(
        why.contains("failing for 31s, past stale_after 30s"),
        "{why}"
    );
    assert_eq!(m.install_detail(), None, "the verdict says it already");
    m.install_ok();
    assert_eq!(m.readiness(), Ok(()));
    assert!(m.encode().contains("haconfd_install_failing 0"));
    assert!(
        m.encode()
            .contains("haconfd_install_failures_total{reason=\"disk_full\"} 2")
    );
}

#[tokio::test(start_paused = true)]
async fn a_heartbeating_source_ages_from_its_last_answer() {
    let m = Metrics::default();
    m.set_stale_after(Duration::from_secs(10));
    m.source_ok();
    m.applied(ApplyKind::Start, 1);
    for _ in 0..20 {
        tokio::time::advance(Duration::from_secs(1)).await;
        m.source_current();
    }
    assert_eq!(m.readiness(), Ok(()));
    // Connected, yet silent: a hung watch ages too.
    tokio::time::advance(Duration::from_secs(11)).await;
    let why = m.readiness().expect_err("silent past stale_after");
    assert!(why.contains("connected but has confirmed nothing"), "{why}");
    // The watch fails 4 s later (keep-alive): the age still runs from the last answer.
    m.source_current();
    tokio::time::advance(Duration::from_secs(4)).await;
    m.source_down("etcd unreachable");
    assert_eq!(m.source_stale_for(), Duration::from_secs(4));
    tokio::time::advance(Duration::from_secs(7)).await;
    let why = m.readiness().expect_err("stale");
    assert!(why.starts_with("state stale for 11s"), "{why}");
    assert!(
        why.contains("source not connected: etcd unreachable"),
        "{why}"
    );
}
