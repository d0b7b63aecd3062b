//! Operations: JSON logs, `version`, completions and the man page, systemd's notify protocol,
//! the node's example config and the container entrypoint, and docs that cannot drift from the
//! binary (the config reference and the sample error in docs/, the confd ports, the survival
//! table's tests, and docs/sample-render.cfg).
//!
//! Snapshots: `UPDATE_SNAPSHOTS=1 cargo test --test ops` rewrites docs/sample-render.cfg.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::etcd::Etcd;
use common::haproxy::{Daemon, Opts, Workspace, pid_alive};
use common::{free_port, haconfd, haconfd_bin, repo, wait_for};
use haconfd::config::{Config, HaproxyMode, SourceKind};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Runs haconfd from the repository root (relative paths in examples/ resolve there).
/// Runs haconfd on the embedded default as `scripts/demo` sets it up: in a directory with the
/// repository's templates and `run/registry.yaml`, a copy of `examples/registry.yaml` (the
/// demo's copy, which a user may edit, is never read). Returns the output and the directory,
/// which the render names in its socket paths.
fn haconfd_on_the_example(args: &[&str]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink(repo().join("templates"), dir.path().join("templates"))
        .expect("link templates");
    std::fs::create_dir(dir.path().join("run")).expect("run dir");
    std::fs::copy(
        repo().join("examples/registry.yaml"),
        dir.path().join("run/registry.yaml"),
    )
    .expect("copy the example registry");
    let out = Command::new(haconfd_bin())
        .args(args)
        .arg("--config")
        .arg(repo().join("examples/haconfd.toml"))
        .env_remove("HACONFD_CONFIG")
        .env_remove("HACONFD_LOG")
        .current_dir(dir.path())
        .output()
        .expect("run haconfd");
    (out, dir)
}

/// Asserts every stderr line is a JSON object with a level and a message; returns them.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    stderr(out)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("stderr line is not JSON ({e}): {l}"));
            assert!(v.get("level").is_some(), "no level: {l}");
            assert!(v.get("timestamp").is_some(), "no timestamp: {l}");
            assert!(v.get("message").is_some(), "no message: {l}");
            v
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Logs, version, completions, man page
// ---------------------------------------------------------------------------------------------

#[test]
fn json_logs_are_one_object_per_line_including_the_final_error() {
    // The embedded default's render from the repository root logs nothing at info; what it
    // does log must still be JSON.
    let (out, _dir) = haconfd_on_the_example(&[
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "render",
        "--print",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!out.stdout.is_empty());
    json_lines(&out);

    // A rejected key is logged at warn, by key, as JSON; stdout stays the bare config.
    let ws = Workspace::new("yaml");
    ws.write_registry(
        "services:\n  web:\n    w1: \"127.0.0.1:8080\"\n    w2: \"127.0.0.1:99999\"\n",
    );
    ws.write_config(&Opts::default());
    let out = ws.haconfd(&["--log-format", "json", "render", "--print"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = json_lines(&out);
    assert!(
        lines.iter().any(|v| v["level"] == "WARN"
            && v.to_string().contains("/services/web/w2")
            && !v.to_string().contains("99999")),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("server "), "{}", stdout(&out));

    // A failing command's last words are JSON too, with the exit code.
    let mut broken = Workspace::new("yaml");
    broken.write_registry("services: {}\n");
    broken.set_template("{{ undefined_thing }}\n");
    broken.write_config(&Opts::default());
    let out = broken.haconfd(&["--log-format", "json", "render", "--print"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines = json_lines(&out);
    let last = lines.last().expect("an error line");
    assert_eq!(last["level"], "ERROR");
    assert_eq!(last["exit_code"], 1);
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("haconfd: ")),
        "{last}"
    );
}

fn version_lines(out: &Output) -> Vec<String> {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    stdout(out).lines().map(str::to_owned).collect()
}

#[test]
fn version_names_haconfd_commit_haproxy_and_etcd() {
    // File source.
    let ws = Workspace::new("yaml");
    ws.write_registry("services: {}\n");
    ws.write_config(&Opts::default());
    let lines = version_lines(&ws.haconfd(&["version"]));
    assert_eq!(lines.len(), 3, "{lines:?}");
    let head = format!("haconfd {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(
        lines[0].starts_with(&head) && lines[0].ends_with(')'),
        "{lines:?}"
    );
    assert!(!lines[0].contains("commit )"), "{lines:?}");
    assert!(
        lines[1].starts_with("haproxy: HAProxy version 2."),
        "{lines:?}"
    );
    assert_eq!(lines[2], "etcd: not used (file source)");

    // etcd source, nothing listening: reported, exit 0.
    let port = free_port();
    let down = etcd_workspace(&format!("http://127.0.0.1:{port}"));
    let lines = version_lines(&down.haconfd(&["version"]));
    let etcd_line = lines.last().expect("etcd line");
    assert!(
        etcd_line.starts_with(&format!("etcd: unreachable at http://127.0.0.1:{port}: ")),
        "{lines:?}"
    );

    // etcd source, a real etcd: its server version.
    let etcd = Etcd::start();
    let up = etcd_workspace(&etcd.endpoint());
    let lines = version_lines(&up.haconfd(&["version"]));
    let want = etcd_server_version();
    assert_eq!(
        lines.last().map(String::as_str),
        Some(format!("etcd: {want} (at {})", etcd.endpoint()).as_str()),
        "{lines:?}"
    );
}

/// `etcd --version`'s "etcd Version: X".
fn etcd_server_version() -> String {
    let out = Command::new("etcd")
        .arg("--version")
        .output()
        .expect("etcd --version");
    stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("etcd Version: "))
        .expect("etcd Version line")
        .trim()
        .to_owned()
}

/// A workspace whose config reads etcd at `endpoint`.
fn etcd_workspace(endpoint: &str) -> Workspace {
    let ws = Workspace::new("yaml");
    let text = ws.config_text(&Opts::default()).replace(
        &format!("[file]\npath = \"{}\"\n", ws.registry.display()),
        &format!("[etcd]\nendpoints = [\"{endpoint}\"]\ndial_timeout = \"1s\"\n"),
    );
    let text = text.replacen("kind = \"file\"", "kind = \"etcd\"", 1);
    std::fs::write(&ws.config, text).expect("write config");
    ws
}

#[test]
fn completions_and_manpage_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let out = haconfd(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", stderr(&out));
        let text = stdout(&out);
        for word in ["haconfd", "render", "announce", "log-format"] {
            assert!(text.contains(word), "{shell} completions lack {word}");
        }
    }
    let out = haconfd(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));

    let out = haconfd(&["manpage"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let man = stdout(&out);
    assert!(
        man.starts_with(".ie"),
        "not roff: {}",
        &man[..man.len().min(200)]
    );
    for word in [
        ".TH haconfd 1",
        "completions",
        "manpage",
        "version",
        "\\-\\-config",
    ] {
        assert!(man.contains(word), "the man page lacks {word}");
    }
}

// ---------------------------------------------------------------------------------------------
// systemd notify
// ---------------------------------------------------------------------------------------------

/// Starts `haconfd run` on `ws` with extra environment, ended by PID on drop.
fn spawn_run_env(ws: &Workspace, env: &[(&str, &str)]) -> Daemon {
    let log = ws.path("haconfd.log");
    let err = std::fs::File::create(&log).expect("create log");
    let mut cmd = Command::new(haconfd_bin());
    cmd.arg("run")
        .arg("--config")
        .arg(&ws.config)
        .env_remove("HACONFD_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env("HACONFD_LOG", "info")
        .current_dir(ws.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Daemon {
        child: cmd.spawn().expect("start haconfd run"),
        log,
    }
}

/// The next datagram within `timeout`, or None.
fn next_datagram(socket: &UnixDatagram, timeout: Duration) -> Option<String> {
    socket.set_read_timeout(Some(timeout)).expect("timeout");
    let mut buf = [0u8; 1024];
    let n = socket.recv(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Waits (bounded) for a datagram that holds `line` as one of its lines, skipping others.
fn wait_datagram(socket: &UnixDatagram, line: &str) -> String {
    wait_for(Duration::from_secs(30), line, || {
        next_datagram(socket, Duration::from_millis(200)).filter(|m| m.lines().any(|l| l == line))
    })
}

#[test]
fn ready_is_sent_only_after_the_first_successful_apply_then_watchdog_and_stopping() {
    let mut ws = Workspace::new("yaml");
    ws.write_registry("services:\n  web:\n    w1: \"127.0.0.1:8080\"\n");
    // The first applies fail `haproxy -c` (an unknown keyword in global, which isolation
    // cannot pin on a service): nothing is installed, so systemd must not hear READY=1.
    let good = Workspace::default_template();
    let bad = good.replacen("global\n", "global\n    no-such-keyword-here\n", 1);
    assert_ne!(bad, good);
    ws.set_template(&bad);
    ws.write_config(&Opts::default());
    let sock_path = ws.path("notify.sock");
    let socket = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let mut daemon = spawn_run_env(
        &ws,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().expect("utf-8 path")),
            // 400 ms: pings every 200 ms.
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    wait_for(Duration::from_secs(30), "a failed apply", || {
        daemon.log_text().contains("apply failed").then_some(())
    });
    assert!(ws.dest_text().is_none(), "nothing is installed");
    // Drain what came so far: only watchdog pings, never READY=1.
    while let Some(m) = next_datagram(&socket, Duration::from_millis(100)) {
        assert_eq!(m, "WATCHDOG=1", "before a successful apply");
    }

    // Fix the template: the next apply installs dest, and only then READY=1 arrives.
    ws.write_template(&good);
    let ready = wait_datagram(&socket, "READY=1");
    assert!(
        ready
            .lines()
            .any(|l| l.starts_with("STATUS=applied revision")),
        "{ready}"
    );
    let installed = ws.dest_text().expect("dest exists when READY=1 arrives");
    assert!(installed.contains("127.0.0.1:8080"), "{installed}");

    // The watchdog keeps pinging while the reactor runs.
    wait_datagram(&socket, "WATCHDOG=1");

    // SIGTERM: STOPPING=1, exit 0.
    assert_eq!(daemon.terminate(Duration::from_secs(30)), Some(0));
    wait_datagram(&socket, "STOPPING=1");
    let log = daemon.log_text();
    assert_eq!(log.matches("systemd watchdog").count(), 1, "{log}");
}

#[test]
fn without_notify_socket_nothing_is_sent_and_run_is_unchanged() {
    let ws = Workspace::new("yaml");
    ws.write_registry("services:\n  web:\n    w1: \"127.0.0.1:8080\"\n");
    ws.write_config(&Opts::default());
    // WATCHDOG_USEC alone (no NOTIFY_SOCKET) starts no pinging.
    let mut daemon = spawn_run_env(&ws, &[("WATCHDOG_USEC", "400000")]);
    wait_for(Duration::from_secs(30), "an apply", || ws.dest_text());
    assert_eq!(daemon.terminate(Duration::from_secs(30)), Some(0));
    assert!(!daemon.log_text().contains("systemd watchdog"));
}

// ---------------------------------------------------------------------------------------------
// The node's config and the container entrypoint
// ---------------------------------------------------------------------------------------------

#[test]
fn the_node_example_config_parses_as_documented() {
    let config = Config::load(&repo().join("haproxy/haconfd.toml")).expect("haproxy/haconfd.toml");
    assert!(matches!(config.source.kind, SourceKind::Etcd(_)));
    assert_eq!(config.haproxy.mode, HaproxyMode::Supervise);
    let t = config.haproxy_template().expect("a checked template");
    assert_eq!(t.dest, Path::new("/etc/haproxy/haproxy.cfg"));
    assert_eq!(
        t.src,
        Path::new("/usr/share/haconfd/templates/haproxy.cfg.tera")
    );
    assert_eq!(config.frontend.bind, vec!["0.0.0.0:80".to_owned()]);
    assert!(config.haproxy.master_socket.starts_with("/run/haconfd"));
    // The Dockerfile installs the template where the config looks for it.
    let dockerfile = read("haproxy/Dockerfile");
    assert!(dockerfile.contains("COPY templates/ /usr/share/haconfd/templates/"));
}

/// The Dockerfile's ENTRYPOINT as an argv.
fn entrypoint() -> Vec<String> {
    let dockerfile = read("haproxy/Dockerfile");
    let line = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("an ENTRYPOINT line");
    serde_json::from_str(line).expect("ENTRYPOINT in exec form")
}

/// haproxy/haconfd.toml made runnable here: etcd at a closed 127.0.0.1 port, the repository's
/// template, and dest, sockets and admin inside the workspace. Only addresses and paths
/// change; every other key is the node's.
fn node_config_here(ws: &Workspace, etcd: &str) {
    let run = ws.path("run");
    let text = read("haproxy/haconfd.toml")
        .lines()
        .map(|l| match l.split_once(" = ").map(|(k, _)| k) {
            Some("endpoints") => format!("endpoints = [\"{etcd}\"]"),
            Some("dial_timeout") => "dial_timeout = \"1s\"".into(),
            Some("src") if l.contains("hosts.map") => format!(
                "src = \"{}/templates/hosts.map.tera\"",
                env!("CARGO_MANIFEST_DIR")
            ),
            Some("dest") if l.contains("hosts.map") => {
                format!("dest = \"{}\"", ws.path("out/hosts.map").display())
            }
            Some("src") => format!("src = \"{}\"", ws.template.display()),
            Some("dest") => format!("dest = \"{}\"", ws.dest.display()),
            Some("binary") => "binary = \"haproxy\"".into(),
            Some("master_socket") => format!("master_socket = \"{}/master.sock\"", run.display()),
            Some("runtime_socket") => format!("runtime_socket = \"{}/admin.sock\"", run.display()),
            Some("state_file") => format!("state_file = \"{}/server-state\"", run.display()),
            Some("bind") => format!("bind = [\"127.0.0.1:{}\"]", ws.bind_port),
            Some("listen") => format!("listen = \"127.0.0.1:{}\"", free_port()),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !text.contains(".internal:2379"),
        "every endpoint was replaced"
    );
    assert!(!text.contains("0.0.0.0"), "the bind was replaced");
    std::fs::write(&ws.config, text).expect("write config");
}

#[test]
fn container_entrypoint_runs_the_daemon_and_survives_an_unreachable_etcd() {
    let argv = entrypoint();
    assert_eq!(
        argv,
        ["/usr/bin/tini", "--", "/usr/local/bin/haconfd", "run"],
        "tini as PID 1, then `haconfd run`"
    );
    let args: Vec<&str> = argv[3..].iter().map(String::as_str).collect();

    let ws = Workspace::new("yaml");
    let port = free_port();
    node_config_here(&ws, &format!("http://127.0.0.1:{port}"));

    // The config the node would mount is valid; `check` needs etcd and says so: exit 1.
    let out = ws.haconfd(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("127.0.0.1:{port}")) || stderr(&out).contains("etcd"),
        "{}",
        stderr(&out)
    );
    // A typo in the mounted config is a usage error naming the key: exit 64.
    let typo = std::fs::read_to_string(&ws.config)
        .expect("read")
        .replace("[wait]\n", "[wait]\nminn = \"1s\"\n");
    let bad = ws.path("bad.toml");
    std::fs::write(&bad, typo).expect("write");
    let out = Command::new(haconfd_bin())
        .args(["check", "--config"])
        .arg(&bad)
        .env_remove("HACONFD_CONFIG")
        .current_dir(ws.dir.path())
        .output()
        .expect("run haconfd");
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("minn"), "{}", stderr(&out));

    // The entrypoint's argv with that config: etcd is unreachable, the daemon stays up,
    // writes nothing, and stops cleanly on SIGTERM (what tini forwards from `docker stop`).
    let log = ws.path("haconfd.log");
    let child = Command::new(haconfd_bin())
        .args(&args)
        .arg("--config")
        .arg(&ws.config)
        .env_remove("HACONFD_CONFIG")
        .env("HACONFD_LOG", "info")
        .current_dir(ws.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start");
    let mut daemon = Daemon { child, log };
    wait_for(Duration::from_secs(30), "an etcd failure logged", || {
        daemon
            .log_text()
            .contains("nothing is rendered before a first full read")
            .then_some(())
    });
    assert!(
        pid_alive(daemon.pid()),
        "run never exits on a source outage"
    );
    assert!(ws.dest_text().is_none());
    assert_eq!(daemon.terminate(Duration::from_secs(30)), Some(0));
}

#[test]
fn image_tags_name_a_commit_and_never_latest() {
    let out = Command::new(repo().join("scripts/image-tag"))
        .output()
        .expect("scripts/image-tag");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let tag = stdout(&out).trim().to_owned();
    let rest = tag.strip_prefix("haconfd:git-").expect("haconfd:git-<sha>");
    let sha = rest.strip_suffix("-dirty").unwrap_or(rest);
    assert!(
        sha.len() >= 7 && sha.chars().all(|c| c.is_ascii_hexdigit()),
        "{tag}"
    );
    let mut files = vec![
        "haproxy/Dockerfile".to_owned(),
        "haproxy/haconfd-container.service".to_owned(),
    ];
    files.extend(doc_files());
    for file in &files {
        assert!(
            !read(file).contains("haconfd:latest"),
            "{file} names :latest"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Docs that cannot drift
// ---------------------------------------------------------------------------------------------

/// The markdown a reader follows: README.md, then docs/*.md by name.
fn doc_files() -> Vec<String> {
    let mut docs: Vec<String> = std::fs::read_dir(repo().join("docs"))
        .expect("read docs/")
        .map(|e| {
            e.expect("a docs/ entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    let mut files = vec!["README.md".to_owned()];
    files.extend(docs);
    files
}

/// The headings of a markdown text, outside fenced code blocks (a TOML comment is no heading):
/// (line index, level, title).
fn headings(text: &str) -> Vec<(usize, usize, String)> {
    let mut fenced = false;
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        let level = line.chars().take_while(|&c| c == '#').count();
        if !fenced && (1..=6).contains(&level) && line[level..].starts_with(' ') {
            found.push((i, level, line[level..].trim().to_owned()));
        }
    }
    found
}

/// The section of the markdown file `rel` under the heading `title` (any level), up to the next
/// heading of the same or a higher level.
fn doc_section(rel: &str, title: &str) -> String {
    let text = read(rel);
    let all = headings(&text);
    let at = all
        .iter()
        .position(|(_, _, t)| t == title)
        .unwrap_or_else(|| panic!("{rel} has no heading {title:?}"));
    let (start, level, _) = all[at];
    let end = all[at + 1..]
        .iter()
        .find(|(_, l, _)| *l <= level)
        .map_or(usize::MAX, |(i, _, _)| *i);
    let lines: Vec<&str> = text.lines().skip(start).take(end - start).collect();
    lines.join("\n") + "\n"
}

/// The body of the first fenced block of `lang` in the section `title` of `rel`.
fn doc_block(rel: &str, title: &str, lang: &str) -> String {
    let section = doc_section(rel, title);
    let fence = format!("```{lang}\n");
    let open = section
        .find(&fence)
        .unwrap_or_else(|| panic!("{rel} {title:?}: no ```{lang} block"))
        + fence.len();
    let close = section[open..].find("\n```").expect("a closed block");
    section[open..open + close + 1].to_owned()
}

#[test]
fn every_key_of_the_config_reference_is_accepted() {
    let block = doc_block("docs/configuration.md", "Config reference", "toml");
    let table: toml::Table = toml::from_str(&block).expect("the reference block is TOML");
    // It shows both sources; the parser takes one at a time, so check each variant.
    for (kind, drop) in [("file", "etcd"), ("etcd", "file")] {
        let mut t = table.clone();
        t.remove(drop);
        t["source"]
            .as_table_mut()
            .expect("[source]")
            .insert("kind".into(), kind.into());
        let text = toml::to_string(&t).expect("serialize");
        if let Err(e) = Config::parse(&text, "docs/configuration.md config reference") {
            panic!("the config reference in docs/configuration.md ({kind} source) is refused: {e}");
        }
    }
    // Every table the parser knows is in the reference.
    for name in [
        "source", "file", "etcd", "template", "haproxy", "wait", "frontend", "guard", "admin",
    ] {
        assert!(
            table.contains_key(name),
            "the reference in docs/configuration.md lacks [{name}]"
        );
    }
    // And the shipped examples parse.
    Config::load(&repo().join("examples/haconfd.toml")).expect("examples/haconfd.toml");
    Config::load(&repo().join("haproxy/haconfd.toml")).expect("haproxy/haconfd.toml");
    assert_eq!(
        read("examples/haconfd.toml"),
        haconfd::config::EMBEDDED_DEFAULT
    );
}

#[test]
fn the_documented_sample_error_is_what_the_binary_prints() {
    let commands = read("docs/commands.md");
    let sample = commands
        .lines()
        .find(|l| l.starts_with("haconfd: config key `wait.min`"))
        .expect("the sample error in docs/commands.md");
    let ws = Workspace::new("yaml");
    ws.write_registry("services: {}\n");
    let text = ws
        .config_text(&Opts::default())
        .replacen("min = \"50ms\"", "min = \"soon\"", 1);
    std::fs::write(&ws.config, text).expect("write config");
    let out = ws.haconfd(&["check"]);
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(stderr(&out).trim_end(), sample);
}

#[test]
fn sample_render_snapshot_matches_the_embedded_default() {
    assert!(
        read("docs/templates.md").contains("](sample-render.cfg)"),
        "docs/templates.md links the sample"
    );
    let (out, dir) = haconfd_on_the_example(&["render", "--print"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The socket and state paths are made absolute from the working directory, which differs
    // between runs: the sample shows it as `<repo>`, where `scripts/demo` runs.
    let root = dir.path().display().to_string();
    let got = String::from_utf8_lossy(&out.stdout)
        .replace(&root, "<repo>")
        .into_bytes();
    let path = repo().join("docs/sample-render.cfg");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &got).expect("write snapshot");
    }
    let want = std::fs::read(&path).unwrap_or_default();
    let out = std::process::Output { stdout: got, ..out };
    assert!(
        want == out.stdout,
        "docs/sample-render.cfg is stale; regenerate with UPDATE_SNAPSHOTS=1 cargo test --test ops\n{}",
        similar::TextDiff::from_lines(
            &String::from_utf8_lossy(&want),
            &String::from_utf8_lossy(&out.stdout)
        )
        .unified_diff()
        .header("docs/sample-render.cfg", "render --print")
    );
}

#[test]
fn the_documented_confd_ports_render() {
    let section = doc_section("docs/confd.md", "Migrating from confd");
    // The blocks in order: confd's template, the straight port, the typed port.
    let blocks: Vec<&str> = section.split("```\n").skip(1).step_by(2).collect();
    assert_eq!(blocks.len(), 3, "confd template, raw port, typed port");
    for (i, port) in blocks[1..].iter().enumerate() {
        let mut ws = Workspace::new("yaml");
        ws.write_registry(
            "services:\n  web:\n    w1: \"127.0.0.1:8080\"\n    w2: '{\"addr\":\"127.0.0.1:8081\",\"state\":\"maint\"}'\n",
        );
        ws.set_template(port);
        ws.write_config(&Opts::default());
        let out = ws.haconfd(&["render", "--print"]);
        assert_eq!(out.status.code(), Some(0), "port {i}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains("backend be_web"), "port {i}: {text}");
        assert!(text.contains("127.0.0.1:8080 "), "port {i}: {text}");
    }
}

/// Every test the "What haconfd survives" table (docs/operations.md) names exists: a row whose
/// test was renamed or removed would promise what nothing proves.
#[test]
fn every_test_the_survival_table_names_exists() {
    let table = doc_section("docs/operations.md", "What haconfd survives");
    let mut named = 0;
    for row in table.lines().filter(|l| l.starts_with("| ")) {
        for cell in row.split('`').skip(1).step_by(2) {
            let Some((file, name)) = cell.split_once("::") else {
                continue;
            };
            assert!(
                test_exists(file, name),
                "docs/operations.md names {file}::{name}, which no test is"
            );
            named += 1;
        }
    }
    assert!(named >= 20, "only {named} tests named");
}

/// Whether `file::name` is a test: `fn name()` in `tests/<file>.rs`, or, for a unit test
/// (`module::tests::name`), `fn <last segment>()` in a file under `src/<module>`.
fn test_exists(file: &str, name: &str) -> bool {
    let integration = repo().join(format!("tests/{file}.rs"));
    if integration.exists() && !name.contains("::") {
        return read(&format!("tests/{file}.rs")).contains(&format!("fn {name}()"));
    }
    let last = name.rsplit("::").next().unwrap_or(name);
    let mut stack = vec![
        repo().join("src").join(file),
        repo().join(format!("src/{file}.rs")),
    ];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).expect("read dir") {
                stack.push(e.expect("entry").path());
            }
        } else if p.is_file()
            && std::fs::read_to_string(&p)
                .expect("read")
                .contains(&format!("fn {last}()"))
        {
            return true;
        }
    }
    false
}

/// GitHub's anchor for a heading: lowercased, every character but letters, digits, spaces, '-'
/// and '_' dropped (so markup and punctuation go), each space a '-'.
fn github_anchor(title: &str) -> String {
    title
        .chars()
        .flat_map(char::to_lowercase)
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors the headings of a markdown text produce; a repeated one gets "-1", "-2", ...
fn anchors(text: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for (_, _, title) in headings(text) {
        let base = github_anchor(&title);
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.push(anchor);
    }
    seen
}

/// The targets of the inline links (`[text](target)`) and link definitions (`[label]: target`)
/// of a markdown text, outside fenced blocks and code spans, with the line each starts on.
fn link_targets(text: &str) -> Vec<(usize, String)> {
    // Paragraphs outside fences, so that a code span or a link broken over two lines is whole.
    let mut paragraphs: Vec<(usize, String)> = Vec::new();
    let mut fenced = false;
    let mut open = false;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("```") {
            fenced = !fenced;
            open = false;
            continue;
        }
        if fenced || line.trim().is_empty() {
            open = false;
            continue;
        }
        match paragraphs.last_mut() {
            Some((_, p)) if open => {
                p.push('\n');
                p.push_str(line);
            }
            _ => paragraphs.push((i + 1, line.to_owned())),
        }
        open = true;
    }
    let mut targets = Vec::new();
    for (first, paragraph) in paragraphs {
        // Code spans hold no links: blank them out, keeping the line breaks where they are.
        let mut code = false;
        let prose: String = paragraph
            .chars()
            .map(|c| {
                if c == '`' {
                    code = !code;
                    ' '
                } else if code && c != '\n' {
                    ' '
                } else {
                    c
                }
            })
            .collect();
        let line_of = |at: usize| first + prose[..at].matches('\n').count();
        for (at, _) in prose.match_indices("](") {
            let rest = &prose[at + 2..];
            let end = rest.find([')', ' ', '\n']).unwrap_or(rest.len());
            targets.push((line_of(at), rest[..end].to_owned()));
        }
        let mut at = 0;
        for l in prose.split_inclusive('\n') {
            if let Some((label, target)) = l.trim_start().split_once("]: ")
                && label.starts_with('[')
                && !label.contains(']')
            {
                targets.push((line_of(at), target.trim().to_owned()));
            }
            at += l.len();
        }
    }
    targets
}

/// Every relative link in README.md and docs/*.md points at a file that exists, and a link
/// with an anchor (`file.md#anchor`, or `#anchor` in the same file) at a heading that makes
/// that anchor: a section moved or renamed would leave a reader at a dead end.
#[test]
fn every_relative_link_in_the_docs_resolves() {
    // The anchors are GitHub's (these are the ones it makes for these headings).
    assert_eq!(
        github_anchor("Out of inotify instances, and orphaned processes"),
        "out-of-inotify-instances-and-orphaned-processes"
    );
    assert_eq!(
        github_anchor("Server-only changes: the Runtime API, no reload"),
        "server-only-changes-the-runtime-api-no-reload"
    );
    assert_eq!(
        github_anchor("`haconfd fleet` — the view"),
        "haconfd-fleet--the-view"
    );
    let links = link_targets(
        "[a](x.md#y) `[b](not-a-link.md)` and [c\n`d`](z.md)\n\n```\n[e](code.md)\n```\n[f]: w.md\n",
    );
    let want = [(1, "x.md#y"), (2, "z.md"), (7, "w.md")].map(|(l, t)| (l, t.to_owned()));
    assert_eq!(links, want, "the link reader");

    let mut checked = 0;
    let mut broken = Vec::new();
    for file in doc_files() {
        let text = read(&file);
        let dir = Path::new(&file).parent().unwrap_or(Path::new(""));
        for (line, target) in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((target.as_str(), ""));
            let rel = match path.strip_prefix('/') {
                Some(from_root) => Path::new(from_root).to_path_buf(),
                None if path.is_empty() => Path::new(&file).to_path_buf(),
                None => dir.join(path),
            };
            checked += 1;
            let full = repo().join(&rel);
            if !full.exists() {
                broken.push(format!(
                    "{file}:{line}: {target}: {} does not exist",
                    rel.display()
                ));
                continue;
            }
            if anchor.is_empty() {
                continue;
            }
            let Ok(target_text) = std::fs::read_to_string(&full) else {
                broken.push(format!(
                    "{file}:{line}: {target}: an anchor into a non-text file"
                ));
                continue;
            };
            if !anchors(&target_text).iter().any(|a| a == anchor) {
                broken.push(format!(
                    "{file}:{line}: {target}: no heading in {} makes the anchor #{anchor}",
                    rel.display()
                ));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked >= 15, "only {checked} relative links checked");
}

/// The README stays what a newcomer reads on one or two screens, and its table of contents
/// links every file in docs/: reference text belongs in docs/, and a new docs/ file that the
/// README does not link is one nobody finds.
#[test]
fn the_readme_stays_short_and_links_every_doc() {
    let readme = read("README.md");
    let lines = readme.lines().count();
    assert!(
        lines <= 130,
        "README.md has {lines} lines; put reference text in docs/ and link it from the README"
    );
    let linked: Vec<String> = link_targets(&readme)
        .into_iter()
        .map(|(_, target)| target.split('#').next().unwrap_or_default().to_owned())
        .collect();
    for file in doc_files().iter().filter(|f| f.starts_with("docs/")) {
        assert!(
            linked.contains(file),
            "README.md does not link {file}: add it to the table of contents"
        );
    }
    for file in ["ARCHITECTURE.md", "CHANGELOG.md"] {
        assert!(
            linked.iter().any(|l| l == file),
            "README.md does not link {file}"
        );
    }
}

/// CI runs exactly the README's test command, so "every test" means the same in both.
#[test]
fn ci_runs_the_readme_test_command() {
    let readme = read("README.md");
    let command = readme
        .lines()
        .find_map(|l| l.strip_prefix("scripts/install-deps && "))
        .expect("the README's test command");
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == command),
        ".ci/run does not run `{command}`"
    );
    assert!(ci.contains("scripts/install-deps"));
}

/// Every test ARCHITECTURE.md names as holding an invariant (after the "—" of each invariant)
/// exists.
#[test]
fn every_test_the_architecture_names_exists() {
    let text = read("ARCHITECTURE.md");
    let invariants = text
        .split("## Invariants")
        .nth(1)
        .expect("ARCHITECTURE.md has its invariants");
    let mut named = 0;
    for bullet in invariants.split("\n- ").skip(1) {
        let Some((_, held_by)) = bullet.rsplit_once('—') else {
            continue;
        };
        for cell in held_by.split('`').skip(1).step_by(2) {
            let Some((file, name)) = cell.split_once("::") else {
                continue;
            };
            if name == "*" || name == "tests" || name.ends_with("::tests") {
                continue;
            }
            assert!(
                test_exists(file, name),
                "ARCHITECTURE.md names {file}::{name}, which no test is"
            );
            named += 1;
        }
    }
    assert!(named >= 25, "only {named} tests named");
}
