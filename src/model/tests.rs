use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::*;

fn prefixes() -> Vec<String> {
    vec![SERVICES_PREFIX.to_owned(), ROUTES_PREFIX.to_owned()]
}

/// Screens and parses `pairs`; every rejection is checked never to carry `canary`.
fn parse(pairs: &[(&str, &str)], canary: &str) -> (Registry, Vec<Rejection>) {
    let (snapshot, mut rejected) = Snapshot::screen(1, &prefixes(), pairs.iter().copied());
    let (registry, more) = Registry::parse(&snapshot);
    rejected.extend(more);
    for r in &rejected {
        assert!(
            !canary.is_empty() && !r.to_string().contains(canary),
            "a rejection carries the value: {r}"
        );
    }
    (registry, rejected)
}

#[test]
fn service_names_are_lower_case() {
    assert!(is_service_name("web-1.v2_x"));
    assert!(
        !is_service_name("Web"),
        "Web and web would claim the same Host:"
    );
    assert!(!is_service_name("_web"));
}

#[test]
fn parse_addr_accepts_v4_bracketed_v6_and_host_names() {
    assert_eq!(
        parse_addr("127.0.0.1:8080"),
        Ok((Host::V4(Ipv4Addr::LOCALHOST), 8080))
    );
    assert_eq!(
        parse_addr("[::1]:443"),
        Ok((Host::V6(Ipv6Addr::LOCALHOST), 443))
    );
    assert_eq!(
        parse_addr("[0:0:0:0:0:0:0:1]:1"),
        Ok((Host::V6(Ipv6Addr::LOCALHOST), 1))
    );
    assert_eq!(
        parse_addr("LocalHost:65535"),
        Ok((Host::Name("localhost".into()), 65535))
    );
    assert_eq!(
        parse_addr("api-1.svc.local:80"),
        Ok((Host::Name("api-1.svc.local".into()), 80))
    );
    // Leading zeros are digits all the same.
    assert_eq!(parse_addr("127.0.0.1:0080").map(|a| a.1), Ok(80));
}

#[test]
fn parse_addr_rejects_bad_ports_and_hosts() {
    for bad in [
        "127.0.0.1",         // missing port
        "127.0.0.1:",        // empty port
        "127.0.0.1:0",       // port 0
        "127.0.0.1:65536",   // above 65535
        "127.0.0.1:99999",   //
        "127.0.0.1:123456",  // six digits
        "127.0.0.1:+1",      // sign
        "127.0.0.1:-1",      //
        "127.0.0.1: 80",     // space
        "127.0.0.1:80 ",     //
        "127.0.0.1:8o",      // letter
        "::1:8080",          // bare v6
        "::1",               //
        "[::1]",             // v6 without port
        "[::1]8080",         // v6 without colon
        "[::1]:",            //
        "[fe80::1%eth0]:80", // zone id
        "[fe80::1%25eth0]:80",
        "[127.0.0.1]:80", // v4 in brackets
        "[localhost]:80",
        ":80",      // empty host
        "127.1:80", // short v4, not a name either (numeric last label)
        "127.0.0.256:80",
        "under_score:80",
        "-lead:80",
        "a b:80",
        "host;x:80",
        "",
    ] {
        assert!(parse_addr(bad).is_err(), "{bad:?} was accepted");
    }
}

#[test]
fn addr_errors_never_quote_the_input() {
    for bad in ["canary-x:0", "[canary]:80", "canary_y:80", "canary"] {
        let e = parse_addr(bad).expect_err(bad);
        assert!(!e.contains("canary"), "{e}");
    }
}

#[test]
fn is_hostname_follows_rfc_1123() {
    let label63 = "a".repeat(63);
    let long = [label63.as_str(); 4].join("."); // 255 bytes
    let max = format!("{}.{}", [label63.as_str(); 3].join("."), "a".repeat(61)); // 253
    assert_eq!(max.len(), 253);
    for good in [
        "localhost",
        "localhost.",
        "a",
        "a-b.c-d",
        "x1.example",
        "123.example",
        "UPPER.case",
        label63.as_str(),
        max.as_str(),
    ] {
        assert!(is_hostname(good), "{good:?} was rejected");
    }
    let label64 = "a".repeat(64);
    for bad in [
        "",
        ".",
        "a..b",
        ".a",
        "-a",
        "a-",
        "a.-b",
        "a_b",
        "a b",
        "127.0.0.9",
        "123",
        "a.123",
        label64.as_str(),
        long.as_str(),
        "caf\u{e9}",
        "a/b",
    ] {
        assert!(!is_hostname(bad), "{bad:?} was accepted");
    }
}

#[test]
fn screen_keeps_prefixed_safe_pairs_sorted_and_rejects_by_key() {
    let raw: Vec<(&[u8], &[u8])> = vec![
        (b"/services/b/1", b"127.0.0.1:2"),
        (b"/services/a/1", b"127.0.0.1:1"),
        (b"/other/x", b"ignored\nsilently"),
        (b"/services/nl/1", b"127.0.0.1:1\nCANARY"),
        (b"/services/cr/1", b"127.0.0.1:1\rCANARY"),
        (b"/services/nul/1", b"127.0.0.1:1\0CANARY"),
        (b"/services/tab/1", b"127.0.0.1:1\tCANARY"),
        (b"/services/del/1", b"127.0.0.1:1\x7fCANARY"),
        (b"/services/esc/1", b"\x1b[31mCANARY"),
        (b"/services/c1/1", "CANARY\u{85}".as_bytes()),
        (b"/services/ls/1", "CANARY\u{2028}".as_bytes()),
        (b"/services/ps/1", "CANARY\u{2029}".as_bytes()),
        (b"/services/bidi/1", "CANARY\u{202e}".as_bytes()),
        (b"/services/zw/1", "CANARY\u{200b}".as_bytes()),
        (b"/services/bom/1", "\u{feff}CANARY".as_bytes()),
        (b"/services/fffd/1", "CANARY\u{fffd}".as_bytes()),
        (b"/services/utf8/1", b"CANARY\xff\xfe"),
        (b"/services/key space/1", b"127.0.0.1:1"),
        (b"/services/key#hash/1", b"127.0.0.1:1"),
        (b"/services/key\nnl/1", b"127.0.0.1:1"),
        (b"/services/key\xff/1", b"127.0.0.1:1"),
    ];
    let mut big = b"CANARY".to_vec();
    big.resize(MAX_VALUE_LEN + 1, b'x');
    let mut raw = raw;
    raw.push((b"/services/big/1", &big));
    let long_key = format!("/services/{}", "k".repeat(MAX_KEY_LEN));
    raw.push((long_key.as_bytes(), b"127.0.0.1:1"));
    let (snap, rejected) = Snapshot::screen(7, &prefixes(), raw);
    assert_eq!(snap.revision, 7);
    assert_eq!(
        snap.kv.keys().collect::<Vec<_>>(),
        vec!["/services/a/1", "/services/b/1"]
    );
    assert_eq!(rejected.len(), 20, "{rejected:#?}");
    for r in &rejected {
        let text = r.to_string();
        assert!(!text.contains("CANARY"), "{text}");
        assert!(r.key.starts_with("\"/services/"), "{text}");
        // The key is shown escaped: no raw control character reaches a log line.
        assert!(!text.chars().any(char::is_control), "{text:?}");
    }
    assert!(rejected.iter().any(|r| r.key == "\"/services/key\\nnl/1\""));
    // A value at the limit passes.
    let at_limit = "a".repeat(MAX_VALUE_LEN);
    let (snap, rejected) = Snapshot::screen(1, &prefixes(), [("/services/x/1", at_limit.as_str())]);
    assert!(rejected.is_empty() && snap.kv.len() == 1);
}

#[test]
fn registry_sorts_services_and_instances_and_attaches_routes() {
    let (reg, rejected) = parse(
        &[
            ("/services/zeta/b", "127.0.0.1:2"),
            ("/services/zeta/a", "127.0.0.1:1"),
            ("/services/alpha/x", "[::1]:3"),
            (
                "/services/alpha/w",
                r#"{"addr":"LOCALHOST:4","weight":7,"state":"drain","meta":{"zone":"a","n":3,"b":true}}"#,
            ),
            (
                "/routes/alpha",
                r#"{"hosts":["B.localhost","a.localhost","a.localhost."],"paths":["/z","/a","/z"],"balance":"leastconn","check":"/hc"}"#,
            ),
            ("/routes/lonely", r#"{}"#),
        ],
        "CANARY",
    );
    assert!(rejected.is_empty(), "{rejected:?}");
    let names: Vec<&str> = reg.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["alpha", "lonely", "zeta"]);
    let alpha = &reg.services[0];
    assert_eq!(alpha.backend, "be_alpha");
    let ids: Vec<&str> = alpha.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["w", "x"]);
    let w = &alpha.instances[0];
    assert_eq!(
        (w.addr.as_str(), w.host.as_str(), w.port, w.weight, w.state),
        ("localhost:4", "localhost", 4, 7, State::Drain)
    );
    assert_eq!(w.meta.get("n").map(String::as_str), Some("3"));
    assert_eq!(w.meta.get("b").map(String::as_str), Some("true"));
    assert_eq!(alpha.instances[1].addr, "[::1]:3");
    assert_eq!(alpha.instances[1].weight, 100);
    assert_eq!(alpha.instances[1].state, State::Ready);
    let route = alpha.route.as_ref().expect("route");
    assert_eq!(route.hosts, ["a.localhost", "b.localhost"]);
    assert_eq!(route.paths, ["/a", "/z"]);
    assert_eq!(route.balance, "leastconn");
    assert_eq!(route.check.as_deref(), Some("/hc"));
    let lonely = &reg.services[1];
    assert!(lonely.instances.is_empty());
    assert_eq!(
        lonely.route.as_ref().map(|r| r.balance.as_str()),
        Some("roundrobin")
    );
    assert_eq!(reg.instance_count(), 4);
}

#[test]
fn registry_rejects_by_key_without_the_value() {
    let cases: &[(&str, &str)] = &[
        ("/services/web", "127.0.0.1:1"),
        ("/services/-web/i1", "127.0.0.1:1"),
        ("/services/web@x/i1", "127.0.0.1:1"),
        ("/services/web/-i1", "127.0.0.1:1"),
        ("/services/web/i@1", "127.0.0.1:1"),
        ("/services/web/i1/deeper", "127.0.0.1:1"),
        ("/services/web/port", "canary-host:99999"),
        ("/services/web/addr", "CANARY_x:80"),
        ("/services/web/empty", ""),
        (
            "/services/web/w300",
            r#"{"addr":"canary-w:80","weight":300}"#,
        ),
        (
            "/services/web/wneg",
            r#"{"addr":"canary-w:80","weight":-1}"#,
        ),
        (
            "/services/web/wstr",
            r#"{"addr":"127.0.0.1:80","weight":"CANARY, expected u32"}"#,
        ),
        (
            "/services/web/state",
            r#"{"addr":"127.0.0.1:80","state":"upCANARY"}"#,
        ),
        (
            "/services/web/field",
            r#"{"addr":"127.0.0.1:80","colour":"CANARY"}"#,
        ),
        ("/services/web/noaddr", r#"{"weight":"CANARY"}"#),
        ("/services/web/missing", r#"{"weight":1}"#),
        ("/services/web/json", r#"{"addr":"CANARY"#),
        (
            "/services/web/metav",
            r#"{"addr":"127.0.0.1:80","meta":{"k":"CANARY x"}}"#,
        ),
        (
            "/services/web/metak",
            r#"{"addr":"127.0.0.1:80","meta":{"CANARY<":"x y"}}"#,
        ),
        (
            "/services/web/metao",
            r#"{"addr":"127.0.0.1:80","meta":{"k":{"CANARY":1}}}"#,
        ),
        ("/routes/-web", r#"{}"#),
        ("/routes/web/x", r#"{}"#),
        ("/routes/a", r#"{"hosts":["CANARY host"]}"#),
        ("/routes/b", r#"{"paths":["CANARY"]}"#),
        ("/routes/c", r#"{"paths":["/CANARY;x"]}"#),
        ("/routes/d", r#"{"balance":"CANARY"}"#),
        ("/routes/e", r#"{"check":"/CANARY x"}"#),
        ("/routes/f", r#"{"colour":"CANARY"}"#),
        ("/routes/g", "CANARY"),
    ];
    let mut pairs = cases.to_vec();
    pairs.push(("/services/web/good", "127.0.0.1:8080"));
    let (reg, rejected) = parse(&pairs, "CANARY");
    let keys: Vec<&str> = rejected.iter().map(|r| r.key.as_str()).collect();
    for (k, _) in cases {
        assert!(
            keys.contains(&format!("{k:?}").as_str()),
            "{k} not rejected: {keys:?}"
        );
    }
    assert_eq!(rejected.len(), cases.len(), "{rejected:#?}");
    assert_eq!(reg.instance_count(), 1);
    assert_eq!(reg.services[0].instances[0].addr, "127.0.0.1:8080");
    // The lower-case canary sits in host names above; rejections never show those either.
    for r in &rejected {
        assert!(!r.reason.contains("canary"), "{r}");
    }
}

/// Regression: a type error used to quote the input after the first "expected" inside it.
#[test]
fn type_errors_name_the_expected_type_only() {
    let (_, rejected) = parse(
        &[(
            "/services/web/w",
            r#"{"addr":"127.0.0.1:80","weight":"x expectedCANARY"}"#,
        )],
        "CANARY",
    );
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0].reason.contains("expected u32"),
        "{}",
        rejected[0]
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
    /// The cached parse of a sequence of snapshots equals a fresh parse of each, whatever
    /// the changes: instances, routes, keys of the wrong shape, bad values, services that
    /// come and go.
    #[test]
    fn cached_parse_equals_a_fresh_parse(
        steps in proptest::collection::vec(
            proptest::collection::vec((0usize..14, 0usize..5), 0..8),
            1..8,
        )
    ) {
        const KEYS: [&str; 14] = [
            "/services/a/1", "/services/a/2", "/services/b/1", "/services/b-c/1",
            "/services/b/x/y", "/services/B/1", "/services/c", "/routes/a", "/routes/b",
            "/routes/Bad", "/routes/d", "/services/d/1", "/services/a/3", "/services/e/1",
        ];
        const VALUES: [Option<&str>; 5] = [
            None,
            Some("127.0.0.1:8080"),
            Some("127.0.0.2:9090"),
            Some(r#"{"hosts":["a.test"]}"#),
            Some("not an address"),
        ];
        let mut kv = Kv::new();
        let mut cache = ParseCache::default();
        for (n, step) in steps.iter().enumerate() {
            for &(k, v) in step {
                match VALUES[v] {
                    Some(v) => kv.insert(KEYS[k].to_owned(), v.to_owned()),
                    None => kv.remove(KEYS[k]),
                };
            }
            let snapshot = Arc::new(Snapshot { revision: n as i64, kv: kv.clone() });
            let (cached, mut cached_rej) = Registry::parse_cached(&snapshot, &mut cache);
            let (fresh, mut fresh_rej) = Registry::parse(&snapshot);
            cached_rej.sort_by(|a, b| a.key.cmp(&b.key));
            fresh_rej.sort_by(|a, b| a.key.cmp(&b.key));
            proptest::prop_assert_eq!(cached, fresh);
            proptest::prop_assert_eq!(cached_rej, fresh_rej);
        }
    }
}

/// What [`InstanceValue::encode`] writes, [`InstanceValue::parse`] reads back as the same value;
/// a value with every field at its default is written in the plain form.
#[test]
fn instance_values_round_trip_through_their_writer() {
    let addr = |s: &str| Addr::parse(s).expect("addr");
    let mut drain = InstanceValue::new(addr("[::1]:8080"));
    drain.state = State::Drain;
    drain.weight = 0;
    let mut meta = InstanceValue::new(addr("web1.internal:80"));
    meta.meta.insert("zone".into(), "a".into());
    meta.meta.insert("v".into(), "2".into());
    meta.meta.insert("caf\u{e9}".into(), "\u{fc}ber".into());
    let mut max = InstanceValue::new(addr("127.0.0.1:65535"));
    max.weight = MAX_WEIGHT;
    max.state = State::Maint;
    let cases = [
        (InstanceValue::new(addr("127.0.0.5:8080")), "127.0.0.5:8080"),
        (drain, r#"{"addr":"[::1]:8080","weight":0,"state":"drain"}"#),
        (
            meta,
            r#"{"addr":"web1.internal:80","meta":{"café":"über","v":"2","zone":"a"}}"#,
        ),
        (
            max,
            r#"{"addr":"127.0.0.1:65535","weight":256,"state":"maint"}"#,
        ),
    ];
    for (value, written) in cases {
        let text = value.encode().expect("encodes");
        assert_eq!(text, written);
        assert_eq!(InstanceValue::parse(&text), Ok(value));
    }
}

/// JSON escapes hide characters from the raw screen, which sees only the escape; the meta rule
/// refuses them once decoded, in names and in values, without quoting them.
#[test]
fn meta_refuses_characters_hidden_by_json_escapes() {
    for escaped in [
        r"\u200b", r"\u202e", r"\u2066", r"\ufeff", r"\ufffd", r"\u0085", r"\u2028", r"\n",
    ] {
        let in_value = format!(r#"{{"addr":"127.0.0.1:80","meta":{{"k":"CANARY{escaped}"}}}}"#);
        let in_name = format!(r#"{{"addr":"127.0.0.1:80","meta":{{"CANARY{escaped}":"v"}}}}"#);
        for value in [in_value, in_name] {
            let (reg, rejected) = parse(&[("/services/web/i1", &value)], "CANARY");
            assert_eq!(reg.instance_count(), 0, "{value} was accepted");
            assert_eq!(rejected.len(), 1, "{value}: {rejected:?}");
            assert!(
                rejected[0].reason.starts_with("field meta"),
                "{}",
                rejected[0]
            );
        }
    }
}
