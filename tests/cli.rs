//! The command line: exit codes, messages, and what each command writes (or does not).
//!
//! Exit codes per the contract: 0 ok, 1 runtime failure (template error, `haproxy -c` failure),
//! 64 bad usage or bad config, with a message that names the key.

mod common;

use common::haproxy::{Opts, Workspace, serves};
use common::{stderr, stdout};
use haconfd::config::Config;
use haconfd::metrics::Metrics;
use haconfd::render::Templates;
use haconfd::source::{Update, file};

const REGISTRY: &str = r#"
services:
  web:
    w1: "127.0.0.1:8080"
    w2: '{"addr":"127.0.0.1:8081","weight":10}'
  api:
    a1: "[::1]:9000"
routes:
  web: '{"hosts":["web.localhost"],"paths":["/b","/a"],"balance":"leastconn"}'
"#;

/// A workspace over [`REGISTRY`] with the default template and `[haproxy] mode = "none"`.
fn workspace() -> Workspace {
    let ws = Workspace::new("yaml");
    ws.write_registry(REGISTRY);
    ws.write_config(&Opts::default());
    ws
}

/// Renders the workspace through the library, as `render --print` should.
fn library_render(ws: &Workspace) -> Vec<u8> {
    let config = Config::load(&ws.config).expect("config");
    let mut templates = Templates::load(&config).expect("templates");
    let pairs = file::read(&ws.registry).expect("registry");
    let update = Update::screen(1, &config.source.prefixes, pairs);
    let rendered =
        haconfd::apply::render(&mut templates, &update, &Metrics::default()).expect("render");
    rendered[0].bytes.clone()
}

/// Every file under the workspace, with its bytes, sorted by path.
fn tree(ws: &Workspace) -> Vec<(String, Vec<u8>)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push((
                    p.display().to_string(),
                    std::fs::read(&p).unwrap_or_default(),
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(ws.dir.path(), &mut out);
    out.sort();
    out
}

#[test]
fn bad_config_exits_64_and_names_the_key() {
    for (label, extra, key) in [
        (
            "unknown key",
            "[guard]\nmax_drop_percentage = 5\n",
            "max_drop_percentage",
        ),
        (
            "bad duration",
            "[guard]\nconfirm_after = \"soon\"\n",
            "guard.confirm_after",
        ),
        ("bad duration in [wait]", "", "wait.min"),
        ("bad bind", "", "frontend.bind[0]"),
        ("stale_after under 2s", "", "admin.stale_after"),
    ] {
        let ws = workspace();
        let mut text = ws.config_text(&Opts {
            extra: extra.to_owned(),
            ..Opts::default()
        });
        if label == "bad duration in [wait]" {
            text = text.replace("min = \"50ms\"", "min = \"50 parsecs\"");
        }
        if label == "bad bind" {
            text = text.replace(
                &format!("bind = [\"127.0.0.1:{}\"]", ws.bind_port),
                "bind = [\"localhost:80\"]",
            );
        }
        if label == "stale_after under 2s" {
            text = text.replace("[admin]\n", "[admin]\nstale_after = \"1s\"\n");
        }
        std::fs::write(&ws.config, text).expect("write config");
        for cmd in [&["check"][..], &["render", "--print"], &["run"]] {
            let out = ws.haconfd(cmd);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(64), "{label} / {cmd:?}: {err}");
            assert!(err.contains(key), "{label} / {cmd:?}: {err}");
            assert!(out.stdout.is_empty(), "{label} / {cmd:?}");
        }
        assert!(!ws.dest.exists(), "{label}: a bad config wrote the dest");
    }
}

#[test]
fn missing_config_file_exits_64() {
    let ws = workspace();
    std::fs::remove_file(&ws.config).expect("remove config");
    let out = ws.haconfd(&["check"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("haconfd.toml"), "{}", stderr(&out));
}

#[test]
fn bad_usage_exits_64() {
    let ws = workspace();
    for args in [
        &["render", "--frobnicate"][..],
        &["render", "--print", "--diff"],
        &["nosuch"],
    ] {
        let out = ws.haconfd(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
    }
    let out = ws.haconfd(&["render", "--print", "--template", "nosuch"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("nosuch"), "{}", stderr(&out));
}

#[test]
fn template_syntax_error_exits_1_naming_file_and_line() {
    let mut ws = workspace();
    ws.set_template("global\n    maxconn 100\n{% if %}\n");
    ws.write_config(&Opts::default());
    for cmd in [&["check"][..], &["render", "--print"], &["render"]] {
        let out = ws.haconfd(cmd);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {err}");
        let at = format!("{}:3:", ws.template.display());
        assert!(err.contains(&at), "{cmd:?}: want {at} in {err}");
        assert!(out.stdout.is_empty());
    }
    assert!(!ws.dest.exists());
}

#[test]
fn undefined_variable_is_an_error_naming_the_line() {
    let mut ws = workspace();
    let text = "global\n    maxconn 100\n{% for s in services %}\n    # {{ s.no_such_field }}\n{% endfor %}\n";
    ws.set_template(text);
    ws.write_config(&Opts::default());
    let out = ws.haconfd(&["render", "--print"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let at = format!("{}:4:", ws.template.display());
    assert!(err.contains(&at) && err.contains("no_such_field"), "{err}");
    assert!(out.stdout.is_empty(), "strict: nothing is printed");

    ws.set_template("global\n{{ nosuch }}\n");
    let out = ws.haconfd(&["render", "--print"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}:2:", ws.template.display())),
        "{err}"
    );
}

#[test]
fn render_print_prints_exactly_the_render_and_writes_nothing() {
    let ws = workspace();
    let before = tree(&ws);
    let out = ws.haconfd(&["render", "--print"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        out.stdout,
        library_render(&ws),
        "stdout is the render, byte for byte"
    );
    assert!(serves(&stdout(&out), "w2", "127.0.0.1:8081"));
    assert_eq!(tree(&ws), before, "render --print wrote a file");
    assert!(!ws.dest.exists());
    // Logs go to stderr only, even at debug level.
    let out = ws.haconfd(&["--log-level", "debug", "render", "--print"]);
    assert_eq!(out.stdout, library_render(&ws));
}

#[test]
fn render_diff_shows_a_unified_diff_against_the_installed_file() {
    let ws = workspace();
    let rendered = String::from_utf8(library_render(&ws)).expect("UTF-8");
    let installed = rendered.replace("127.0.0.1:8081 weight 10", "127.0.0.1:7777 weight 10");
    assert_ne!(installed, rendered);
    std::fs::create_dir_all(ws.dest.parent().expect("parent")).expect("mkdir");
    std::fs::write(&ws.dest, &installed).expect("install");
    let before = tree(&ws);

    let out = ws.haconfd(&["render", "--diff"]);
    let diff = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let dest = ws.dest.display().to_string();
    assert!(
        diff.starts_with(&format!("--- {dest}\n+++ {dest} (rendered)\n@@ ")),
        "{diff}"
    );
    let new_line = rendered
        .lines()
        .find(|l| l.contains("127.0.0.1:8081 weight 10"))
        .expect("w2's server line");
    let old_line = new_line.replace("8081", "7777");
    assert!(diff.contains(&format!("\n-{old_line}\n")), "{diff}");
    assert!(diff.contains(&format!("\n+{new_line}\n")), "{diff}");
    let changed = diff
        .lines()
        .filter(|l| {
            (l.starts_with('-') || l.starts_with('+'))
                && !l.starts_with("---")
                && !l.starts_with("+++")
        })
        .count();
    assert_eq!(changed, 2, "{diff}");
    assert_eq!(tree(&ws), before, "render --diff wrote a file");

    // Against the same bytes the diff is empty.
    std::fs::write(&ws.dest, &rendered).expect("install");
    let out = ws.haconfd(&["render", "--diff"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
}

#[test]
fn check_exits_0_when_valid_and_1_when_haproxy_rejects() {
    let mut ws = workspace();
    let before = tree(&ws);
    let out = ws.haconfd(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("haproxy: valid"), "{}", stderr(&out));
    assert_eq!(tree(&ws), before, "check wrote a file");

    let bad = Workspace::default_template().replace(
        "    option redispatch\n",
        "    option redispatch\n    frobnicate-the-widgets on\n",
    );
    ws.set_template(&bad);
    ws.write_config(&Opts::default());
    let before = tree(&ws);
    let out = ws.haconfd(&["check"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("haproxy -c rejected") && err.contains("frobnicate-the-widgets"),
        "{err}"
    );
    assert!(err.contains("failed haproxy -c"), "{err}");
    assert_eq!(tree(&ws), before, "check wrote a file");
}

#[test]
fn version_prints_haconfd_and_haproxy_versions() {
    let ws = workspace();
    let out = ws.haconfd(&["version"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        text.starts_with(&format!("haconfd {} ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let haproxy = std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .expect("haproxy -v");
    let first = String::from_utf8_lossy(&haproxy.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    assert!(first.starts_with("HAProxy version"), "{first}");
    assert!(text.contains(&format!("haproxy: {first}")), "{text}");
}

/// The confd-equivalent functions and filters, as documented in src/render/functions.rs, over a
/// small registry, in one custom template.
#[test]
fn template_functions_and_filters_work_as_documented() {
    let mut ws = Workspace::new("yaml");
    ws.write_registry(
        r#"
services:
  web:
    w2: "127.0.0.1:8081"
    w1: "127.0.0.1:8080"
  api:
    a1: "127.0.0.1:9000"
routes:
  web: '{"hosts":["web.localhost","www.localhost"],"paths":["/a"]}'
app:
  name: demo
  tags: "a,b,c"
  deep:
    x: "1"
other:
  hidden: "not in a prefix"
"#,
    );
    ws.set_template(
        r#"getv={{ getv(key="/app/name") }}
getv_default={{ getv(key="/app/missing", default="dflt") }}
exists={{ exists(key="/app/name") }},{{ exists(key="/app/missing") }},{{ exists(key="/other/hidden") }}
gets={% for p in gets(pattern="/services/web/*") %}{{ p.key }}={{ p.value }} {% endfor %}
getvs={{ getvs(pattern="/services/*/*") | join(sep=",") }}
ls={{ ls(dir="/services") | join(sep=",") }}
ls_web={{ ls(dir="/services/web/") | join(sep=",") }}
ls_app={{ ls(dir="/app") | join(sep=",") }}
lsdir={{ lsdir(dir="/") | join(sep=",") }}
lsdir_app={{ lsdir(dir="/app") | join(sep=",") }}
getenv={{ getenv(name="HACONFD_TEST_VAR") }}
getenv_default={{ getenv(name="HACONFD_TEST_UNSET_VAR", default="none") }}
getenv_empty=[{{ getenv(name="HACONFD_TEST_UNSET_VAR") }}]
base={{ "/services/web/w1" | base }}
dir={{ "/services/web/w1" | dir }}
{% set r = getv(key="/routes/web") | json -%}
json={{ r.hosts | join(sep=" ") }} {{ r.paths[0] }}
split={{ getv(key="/app/tags") | split(sep=",") | length }}
join={{ getv(key="/app/tags") | split(sep=",") | join(sep="+") }}
keys={% for k in gets(pattern="/services/*/*") %}{{ k.key | dir | base }}/{{ k.key | base }} {% endfor %}
"#,
    );
    ws.write_config(&Opts {
        check: false,
        prefixes: &["/services/", "/routes/", "/app/"],
        ..Opts::default()
    });
    let out = ws.haconfd_env(&["render", "--print"], &[("HACONFD_TEST_VAR", "from-env")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let want = r#"getv=demo
getv_default=dflt
exists=true,false,false
gets=/services/web/w1=127.0.0.1:8080 /services/web/w2=127.0.0.1:8081 
getvs=127.0.0.1:8080,127.0.0.1:8081,127.0.0.1:9000
ls=api,web
ls_web=w1,w2
ls_app=deep,name,tags
lsdir=app,routes,services
lsdir_app=deep
getenv=from-env
getenv_default=none
getenv_empty=[]
base=w1
dir=/services/web
json=web.localhost www.localhost /a
split=3
join=a+b+c
keys=api/a1 web/w1 web/w2 
"#;
    common::assert_same_lines("the custom template's render", want, &stdout(&out));
    // getv without default on a missing key is an error naming the key.
    ws.set_template("{{ getv(key=\"/app/missing\") }}\n");
    let out = ws.haconfd(&["render", "--print"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("/app/missing"), "{}", stderr(&out));
}

/// `check` proves the render with its own map: none is installed yet, and none is written.
/// `render --print` prints the HAProxy file, which loads the map.
#[test]
fn check_and_print_with_a_host_map() {
    let ws = workspace();
    ws.write_config(&Opts {
        hosts_map: true,
        ..Opts::default()
    });
    let map = ws.path("out/hosts.map");
    let out = ws.haconfd(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("haproxy: valid"), "{}", stderr(&out));
    assert!(!map.exists() && !ws.dest.exists(), "check wrote a file");
    let out = ws.haconfd(&["render", "--print"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The frontend looks every host up in the map: one line, the map's path in it.
    let text = stdout(&out);
    let lookups: Vec<&str> = text.lines().filter(|l| l.contains("map(")).collect();
    assert_eq!(
        lookups,
        [format!(
            "    use_backend %[var(txn.host),map({},_no_route)]",
            map.display()
        )],
        "{text}"
    );
    // The map: api by its name; web has path routes, so it keeps its acl rules instead.
    let out = ws.haconfd(&["render", "--print", "--template", "hosts"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    common::assert_same_lines(
        "the rendered host map",
        "# Rendered by haconfd from templates/hosts.map.tera: <host> <backend>\napi be_api\n\n",
        &stdout(&out),
    );
}
