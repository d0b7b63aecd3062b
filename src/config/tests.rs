use super::*;

const MINIMAL: &str = r#"
[source]
kind = "file"
[file]
path = "registry.yaml"
[[template]]
name = "haproxy"
src = "t.tera"
dest = "/tmp/x.cfg"
"#;

fn err(text: &str) -> String {
    match Config::parse(text, "test") {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::parse(MINIMAL, "test").expect("valid");
    assert_eq!(c.wait.min, Duration::from_millis(200));
    assert_eq!(c.wait.max, Duration::from_secs(2));
    assert_eq!(c.haproxy.mode, HaproxyMode::Supervise);
    assert_eq!(c.templates[0].mode, 0o644);
    assert!(c.templates[0].check);
    assert_eq!(c.source.prefixes, vec!["/services/", "/routes/"]);
}

#[test]
fn embedded_default_is_valid() {
    Config::embedded_default().expect("embedded default config is valid");
}

#[test]
fn unknown_key_is_rejected_by_name() {
    let e = err(&format!("{MINIMAL}\n[wait]\nminn = \"1s\"\n"));
    assert!(e.contains("unknown field `minn`"), "{e}");
}

#[test]
fn errors_name_key_value_and_fix() {
    let e = err(&format!("{MINIMAL}\n[wait]\nmin = \"soon\"\n"));
    assert!(
        e.contains("`wait.min`") && e.contains("\"soon\"") && e.contains("fix:"),
        "{e}"
    );
    let e = err(&format!("{MINIMAL}\n[wait]\nmin = \"5s\"\nmax = \"1s\"\n"));
    assert!(e.contains("`wait.min`"), "{e}");
    let e = err(&MINIMAL.replace("\"file\"", "\"consul\""));
    assert!(e.contains("`source.kind`") && e.contains("consul"), "{e}");
    let e = err(&format!(
        "{MINIMAL}\n[frontend]\nbind = [\"localhost:80\"]\n"
    ));
    assert!(e.contains("`frontend.bind[0]`"), "{e}");
    let e = err(&format!("{MINIMAL}\n[haproxy]\nmode = \"command\"\n"));
    assert!(e.contains("`haproxy.reload_cmd`"), "{e}");
    let e = err(&MINIMAL.replace("\"/tmp/x.cfg\"", "\"/tmp/x.cfg\"\nmode = \"999\""));
    assert!(e.contains("`template[0].mode`"), "{e}");
    let e = err(&MINIMAL.replace("kind = \"file\"", "kind = \"file\"\nresync = \"0s\""));
    assert!(e.contains("`source.resync`") && e.contains("zero"), "{e}");
    let e = err(&format!("{MINIMAL}\n[guard]\nmax_drop_percent = 150\n"));
    assert!(e.contains("`guard.max_drop_percent`"), "{e}");
    let e = err(&format!("{MINIMAL}\n[frontend]\nlame_duck = \"1h\"\n"));
    assert!(
        e.contains("`frontend.lame_duck`") && e.contains("10 minutes"),
        "{e}"
    );
    let e = err(&format!("{MINIMAL}\n[frontend]\nlame_duck = \"-1s\"\n"));
    assert!(e.contains("`frontend.lame_duck`"), "{e}");
}

#[test]
fn lame_duck_defaults_to_none() {
    let c = Config::parse(MINIMAL, "test").expect("valid");
    assert_eq!(c.frontend.lame_duck, Duration::ZERO);
    let c = Config::parse(
        &format!("{MINIMAL}\n[frontend]\nlame_duck = \"30s\"\n"),
        "test",
    )
    .expect("valid");
    assert_eq!(c.frontend.lame_duck, Duration::from_secs(30));
}

#[test]
fn map_templates_come_first_unchecked_with_a_plain_path() {
    let map =
        "[[template]]\nname = \"hosts\"\nsrc = \"m.tera\"\ndest = \"/tmp/hosts.map\"\nmap = true\n";
    let with_map = MINIMAL.replace("[[template]]", &format!("{map}[[template]]"));
    let c = Config::parse(&with_map, "test").expect("valid");
    assert!(
        c.templates[0].map && !c.templates[0].check,
        "check defaults to false"
    );
    assert_eq!(
        c.haproxy_template().map(|t| t.name.as_str()),
        Some("haproxy")
    );
    let e = err(&format!("{MINIMAL}{map}"));
    assert!(
        e.contains("`template[1].map`") && e.contains("before"),
        "{e}"
    );
    let e = err(&with_map.replace("map = true", "map = true\ncheck = true"));
    assert!(e.contains("`template[0].check`"), "{e}");
    let e = err(&with_map.replace("/tmp/hosts.map", "/tmp/my hosts.map"));
    assert!(e.contains("`template[0].dest`"), "{e}");
}

#[test]
fn stale_after_defaults_to_30s_and_rejects_nonsense() {
    let c = Config::parse(MINIMAL, "test").expect("valid");
    assert_eq!(c.admin.stale_after, Duration::from_secs(30));
    let c = Config::parse(
        &format!("{MINIMAL}\n[admin]\nstale_after = \"2m\"\n"),
        "test",
    )
    .expect("valid");
    assert_eq!(c.admin.stale_after, Duration::from_secs(120));
    for (value, problem) in [
        ("\"soon\"", "is not a duration"),
        ("\"1s\"", "shorter than 2s"),
        ("\"0s\"", "shorter than 2s"),
    ] {
        let e = err(&format!("{MINIMAL}\n[admin]\nstale_after = {value}\n"));
        assert!(
            e.contains("`admin.stale_after`")
                && e.contains(value)
                && e.contains(problem)
                && e.contains("fix:"),
            "{e}"
        );
    }
}

#[test]
fn password_file_is_not_in_debug_output() {
    let text = r#"
[source]
kind = "etcd"
[etcd]
username = "reader"
password_file = "/secret/etcd-password"
[[template]]
name = "haproxy"
src = "t.tera"
dest = "/tmp/x.cfg"
"#;
    let c = Config::parse(text, "test").expect("valid");
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("/secret/etcd-password"), "{dbg}");
}

/// MINIMAL with the etcd source instead of the file.
fn etcd_minimal() -> String {
    MINIMAL.replace(
        "kind = \"file\"\n[file]\npath = \"registry.yaml\"",
        "kind = \"etcd\"",
    )
}

#[test]
fn fleet_defaults_follow_the_source() {
    let c = Config::parse(&etcd_minimal(), "test").expect("valid");
    assert!(c.fleet.publish, "the etcd source publishes by default");
    assert_eq!(c.fleet.prefix, "/haconfd/nodes/");
    assert_eq!(Some(c.fleet.node.clone()), hostname());
    let c = Config::parse(MINIMAL, "test").expect("valid");
    assert!(
        !c.fleet.publish,
        "the file source has nothing to publish to"
    );
    let c = Config::parse(
        &format!(
            "{}\n[fleet]\nnode = \"lb-1\"\npublish = false\nprefix = \"/fleet/\"\n",
            etcd_minimal()
        ),
        "test",
    )
    .expect("valid");
    assert_eq!(
        (
            c.fleet.node.as_str(),
            c.fleet.publish,
            c.fleet.prefix.as_str()
        ),
        ("lb-1", false, "/fleet/")
    );
}

#[test]
fn fleet_errors_name_the_key() {
    let etcd = etcd_minimal();
    for (text, key, value, problem) in [
        (
            format!("{MINIMAL}\n[fleet]\npublish = true\n"),
            "fleet.publish",
            "true",
            "etcd source",
        ),
        (
            format!("{etcd}\n[fleet]\nnode = \"lb 1\"\n"),
            "fleet.node",
            "\"lb 1\"",
            "not a node name",
        ),
        (
            format!("{etcd}\n[fleet]\nnode = \"-lb\"\n"),
            "fleet.node",
            "\"-lb\"",
            "not a node name",
        ),
        (
            format!("{etcd}\n[fleet]\nprefix = \"/nodes\"\n"),
            "fleet.prefix",
            "\"/nodes\"",
            "starts and ends",
        ),
        (
            format!("{etcd}\n[fleet]\nprefix = \"nodes/\"\n"),
            "fleet.prefix",
            "\"nodes/\"",
            "starts and ends",
        ),
        // Under a watched prefix, and above one.
        (
            format!("{etcd}\n[fleet]\nprefix = \"/services/nodes/\"\n"),
            "fleet.prefix",
            "\"/services/nodes/\"",
            "overlaps the watched prefix \"/services/\"",
        ),
        (
            format!("{etcd}\n[fleet]\nprefix = \"/\"\n"),
            "fleet.prefix",
            "\"/\"",
            "overlaps",
        ),
        (
            format!("{etcd}\n[fleet]\nprefix = \"/routes/\"\n"),
            "fleet.prefix",
            "\"/routes/\"",
            "overlaps the watched prefix \"/routes/\"",
        ),
    ] {
        let e = err(&text);
        assert!(
            e.contains(&format!("`{key}` = {value}")) && e.contains(problem) && e.contains("fix:"),
            "{e}"
        );
    }
    // Overlap is checked against the configured prefixes, not the defaults.
    let text = etcd.replace(
        "kind = \"etcd\"",
        "kind = \"etcd\"\nprefixes = [\"/lb/services/\"]",
    );
    let e = err(&format!("{text}\n[fleet]\nprefix = \"/lb/\"\n"));
    assert!(
        e.contains("`fleet.prefix`") && e.contains("/lb/services/"),
        "{e}"
    );
    let e = err(&format!("{etcd}\n[fleet]\nnodes = \"lb-1\"\n"));
    assert!(e.contains("unknown field `nodes`"), "{e}");
}
