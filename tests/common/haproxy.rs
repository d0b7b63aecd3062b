//! Real HAProxy processes and local HTTP backends for tests, on 127.0.0.1 only.
//!
//! A [`Workspace`] is one temp dir holding a registry file, a config that points at it (or at
//! etcd), and the dest and sockets haconfd writes; a [`Daemon`] is a `haconfd run` ended by its
//! PID on drop; a [`Backend`] is a tiny HTTP server that answers every request with its own name.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::admin::Admin;
pub use super::run::Daemon;
use super::run::run_command;
use super::{free_port, haconfd_bin, repo, write_atomic};

/// How a workspace's config file is written.
#[derive(Debug, Clone)]
pub struct Opts {
    /// `[haproxy] mode`.
    pub mode: &'static str,
    /// `check` of the template.
    pub check: bool,
    /// `mode` of the template's dest.
    pub file_mode: &'static str,
    /// `[source] prefixes`.
    pub prefixes: &'static [&'static str],
    /// More TOML appended at the end (a table of its own).
    pub extra: String,
    /// Route hosts through the map `out/hosts.map`, rendered by the repository's
    /// `templates/hosts.map.tera` as the `[[template]]` named "hosts".
    pub hosts_map: bool,
    /// The map's template instead of the repository's.
    pub hosts_map_src: Option<PathBuf>,
    /// `[frontend] lame_duck`.
    pub lame_duck: &'static str,
    /// The etcd source instead of the file: the lines of the `[etcd]` table (see
    /// [`etcd_table`]).
    pub etcd: Option<String>,
    /// `[wait] min` and `max`.
    pub wait: (&'static str, &'static str),
}

/// The lines of an `[etcd]` table for `endpoints`, in this order.
pub fn etcd_table(endpoints: &[String]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!("endpoints = [{}]\n", list.join(", "))
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            mode: "none",
            check: true,
            file_mode: "0644",
            prefixes: &["/services/", "/routes/"],
            extra: String::new(),
            hosts_map: false,
            hosts_map_src: None,
            lame_duck: "0s",
            etcd: None,
            wait: ("50ms", "500ms"),
        }
    }
}

/// A temp dir with a registry file, a template, a config, and where haconfd writes.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    /// The registry file the file source reads.
    pub registry: PathBuf,
    /// The template the config names: the repository's default until replaced.
    pub template: PathBuf,
    /// Where the rendered haproxy.cfg goes.
    pub dest: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// The frontend's port on 127.0.0.1.
    pub bind_port: u16,
}

impl Workspace {
    /// A workspace whose registry file is `registry.<ext>` (yaml, json or toml).
    pub fn new(ext: &str) -> Workspace {
        let dir = tempfile::Builder::new()
            .prefix("hc-")
            .tempdir()
            .expect("create temp dir");
        let root = dir.path().to_path_buf();
        Workspace {
            registry: root.join(format!("registry.{ext}")),
            template: repo().join("templates/haproxy.cfg.tera"),
            dest: root.join("out/haproxy.cfg"),
            config: root.join("haconfd.toml"),
            bind_port: free_port(),
            dir,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes the registry file atomically.
    pub fn write_registry(&self, bytes: impl AsRef<[u8]>) {
        write_atomic(&self.registry, bytes.as_ref());
    }

    /// Points the config at a template in the workspace with this text (written atomically).
    pub fn set_template(&mut self, text: &str) {
        self.template = self.path("haproxy.cfg.tera");
        write_atomic(&self.template, text.as_bytes());
    }

    /// Rewrites the workspace's own template (after [`Workspace::set_template`]) atomically.
    pub fn write_template(&self, text: &str) {
        assert!(
            self.template.starts_with(self.dir.path()),
            "call set_template first: the repository's template is never written"
        );
        write_atomic(&self.template, text.as_bytes());
    }

    /// The default template's text.
    pub fn default_template() -> String {
        std::fs::read_to_string(repo().join("templates/haproxy.cfg.tera")).expect("read template")
    }

    /// The admin endpoint's port, as the written config names it.
    pub fn admin_port(&self) -> Option<u16> {
        Some(self.admin()?.port)
    }

    /// The admin endpoint, as the written config names it.
    pub fn admin(&self) -> Option<Admin> {
        Admin::of_config(&self.config)
    }

    /// The master socket path of this workspace.
    pub fn master_socket(&self) -> PathBuf {
        self.path("run/master.sock")
    }

    /// The config text for `opts`.
    pub fn config_text(&self, opts: &Opts) -> String {
        let prefixes: Vec<String> = opts.prefixes.iter().map(|p| format!("{p:?}")).collect();
        let prefixes = prefixes.join(", ");
        let source = match &opts.etcd {
            Some(table) => format!("kind = \"etcd\"\nprefixes = [{prefixes}]\n\n[etcd]\n{table}"),
            None => format!(
                "kind = \"file\"\nprefixes = [{prefixes}]\n\n[file]\npath = \"{}\"\n",
                self.registry.display()
            ),
        };
        format!(
            r#"[source]
{source}{hosts}
[[template]]
name = "haproxy"
src = "{template}"
dest = "{dest}"
mode = "{file_mode}"
check = {check}

[haproxy]
mode = "{mode}"
master_socket = "{run}/master.sock"
runtime_socket = "{run}/admin.sock"
state_file = "{run}/server-state"
spare_slots = 2
reload_timeout = "20s"

[wait]
min = "{wait_min}"
max = "{wait_max}"

[frontend]
bind = ["127.0.0.1:{port}"]
lame_duck = "{lame_duck}"

[admin]
listen = "127.0.0.1:{admin}"
{extra}"#,
            template = self.template.display(),
            dest = self.dest.display(),
            file_mode = opts.file_mode,
            check = opts.check,
            mode = opts.mode,
            run = self.path("run").display(),
            port = self.bind_port,
            lame_duck = opts.lame_duck,
            wait_min = opts.wait.0,
            wait_max = opts.wait.1,
            admin = free_port(),
            extra = opts.extra,
            hosts = if opts.hosts_map {
                let src = opts.hosts_map_src.clone().unwrap_or_else(|| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("templates/hosts.map.tera")
                });
                format!(
                    "\n[[template]]\nname = \"hosts\"\nsrc = \"{}\"\ndest = \"{}\"\nmap = true\n",
                    src.display(),
                    self.path("out/hosts.map").display()
                )
            } else {
                String::new()
            },
        )
    }

    /// Writes the config file for `opts`.
    pub fn write_config(&self, opts: &Opts) {
        write_atomic(&self.config, self.config_text(opts).as_bytes());
    }

    /// Writes the config file for `opts` with the etcd source at `endpoint` instead of the
    /// registry file.
    pub fn write_etcd_config(&self, opts: &Opts, endpoint: &str) {
        let text = self.config_text(opts);
        let file_table = format!("[file]\npath = \"{}\"\n", self.registry.display());
        assert!(text.contains(&file_table), "{text}");
        let text = text
            .replacen("kind = \"file\"", "kind = \"etcd\"", 1)
            .replacen(
                &file_table,
                &format!("[etcd]\nendpoints = [\"{endpoint}\"]\ndial_timeout = \"1s\"\n"),
                1,
            );
        write_atomic(&self.config, text.as_bytes());
    }

    /// Runs `haconfd ARGS --config <config>` to completion, with extra environment variables.
    pub fn haconfd_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(haconfd_bin());
        cmd.args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("HACONFD_CONFIG")
            .env_remove("HACONFD_LOG")
            .current_dir(self.dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run haconfd")
    }

    /// Runs `haconfd ARGS --config <config>` to completion.
    pub fn haconfd(&self, args: &[&str]) -> Output {
        self.haconfd_env(args, &[])
    }

    /// `haconfd run` on this workspace's config, in its dir, at `filter`: a command to
    /// adjust, then [`Daemon::spawn`].
    pub fn run_command(&self, filter: &str) -> Command {
        run_command(&self.config, self.dir.path(), filter)
    }

    /// Starts `haconfd run` with its stderr in `<workspace>/haconfd.log`.
    pub fn spawn_run(&self) -> Daemon {
        Daemon::spawn(self.run_command("info"), self.path("haconfd.log"))
    }

    /// The installed dest, if any, as text.
    pub fn dest_text(&self) -> Option<String> {
        std::fs::read(&self.dest)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }

    /// The names in the dest's directory, sorted.
    pub fn dest_dir_names(&self) -> Vec<String> {
        let dir = self.dest.parent().expect("dest has a parent");
        let mut names: Vec<String> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .map(|e| {
                    e.expect("dir entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned()
                })
                // The guard's per-service counts live beside dest by design.
                .filter(|n| !n.ends_with(".haconfd-guard.json"))
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }
}

/// Sends `sig` to one process by PID.
pub fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// Whether a process exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends one command to a HAProxy CLI socket (master or runtime) and returns the answer.
pub fn cli_command(socket: &Path, cmd: &str) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("{cmd}\n").as_bytes()).ok()?;
    // The master CLI answers and closes once it sees the end of input.
    s.shutdown(Shutdown::Write).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The master's PID from `show proc` on the master socket.
pub fn master_pid(socket: &Path) -> Option<u32> {
    let answer = cli_command(socket, "show proc")?;
    answer.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&"master"))
            .then(|| f.first()?.parse().ok())
            .flatten()
    })
}

/// A response to a raw HTTP request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Sends `GET path` with `Host: host` over HTTP/1.1 to 127.0.0.1:port and reads the response
/// until the server closes (the request asks for `Connection: close`).
pub fn http_get(port: u16, host: &str, path: &str) -> Result<Response, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: haconfd-tests\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete response: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line: {head:?}"))?;
    Ok(Response {
        status,
        body: body.to_owned(),
    })
}

/// A local HTTP backend on 127.0.0.1 that answers every request with `200` and its name as the
/// body. Stopped and joined on drop.
pub struct Backend {
    pub port: u16,
    pub name: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Three backends named backend-A, backend-B and backend-C.
    pub fn abc() -> (Backend, Backend, Backend) {
        (
            Backend::start("backend-A"),
            Backend::start("backend-B"),
            Backend::start("backend-C"),
        )
    }

    pub fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let port = listener.local_addr().expect("local addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let body = name.to_owned();
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(conn) = conn {
                    answer(conn, &body);
                }
            }
        });
        Backend {
            port,
            name: name.to_owned(),
            stop,
            thread: Some(thread),
        }
    }
}

/// Reads one request head (bounded in size and time) and answers it; a bare connect, such as a
/// TCP health check, gets nothing.
fn answer(mut conn: TcpStream, body: &str) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while buf.len() < 16 * 1024 && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    if buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(resp.as_bytes());
    }
    let _ = conn.shutdown(Shutdown::Both);
}

impl Drop for Backend {
    fn drop(&mut self) {
        super::stop_accept_loop(&self.stop, self.port, &mut self.thread);
    }
}

/// Ends a process the test caused (a HAProxy master started by haconfd) by its PID on drop, in
/// case the test fails before haconfd stopped it.
pub struct PidGuard(pub Option<u32>);

impl Drop for PidGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0
            && pid_alive(pid)
        {
            signal(pid, nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// The instances a rendered haproxy.cfg serves, as `(instance id, address)` in file order: the
/// `server` lines of occupied slots, `server srvN ADDR weight W [disabled]  # ID`. Free slots
/// (no `# ID`) are left out.
pub fn instances(cfg: &str) -> Vec<(String, String)> {
    cfg.lines()
        .filter_map(|l| {
            let rest = l.trim_start().strip_prefix("server ")?;
            let (line, id) = rest.split_once("  # ")?;
            let addr = line.split(' ').nth(1)?;
            Some((id.trim().to_owned(), addr.to_owned()))
        })
        .collect()
}

/// Whether `cfg` serves instance `id` at `addr`.
pub fn serves(cfg: &str, id: &str, addr: &str) -> bool {
    instances(cfg).iter().any(|(i, a)| i == id && a == addr)
}

/// A template that puts an instance's `meta.opt` on its server line: a meta value HAProxy does
/// not know as a keyword passes every screen and fails `haproxy -c` (isolation tests).
pub const META_TEMPLATE: &str = r#"defaults
    mode http
    timeout connect 1s
    timeout client 1s
    timeout server 1s
{% for s in services %}
backend {{ s.backend }}
{%- for i in s.instances %}
    server {{ i.name }} {{ i.addr }}{% if i.meta.opt %} {{ i.meta.opt }}{% endif %}  # {{ i.id }}
{%- endfor %}
{% endfor %}
"#;

/// One server as the file and the runtime socket describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub name: String,
    pub addr: String,
    pub weight: u32,
    pub maint: bool,
}

/// The `server` lines of `backend` in a rendered file (`weight` defaults to 1 as in HAProxy).
pub fn file_servers(cfg: &str, backend: &str) -> Vec<Srv> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in cfg.lines() {
        if !line.starts_with(char::is_whitespace) && !line.is_empty() {
            inside = line.split_whitespace().collect::<Vec<_>>() == ["backend", backend];
            continue;
        }
        let words: Vec<&str> = line
            .split_whitespace()
            .take_while(|w| !w.starts_with('#'))
            .collect();
        if !inside || words.first() != Some(&"server") {
            continue;
        }
        let weight = words
            .iter()
            .position(|w| *w == "weight")
            .and_then(|i| words.get(i + 1)?.parse().ok())
            .unwrap_or(1);
        out.push(Srv {
            name: words[1].to_owned(),
            addr: words[2].to_owned(),
            weight,
            maint: words.contains(&"disabled"),
        });
    }
    out
}

/// The servers of `backend` as the running HAProxy has them (`show servers state`); none
/// when the socket does not answer.
pub fn runtime_servers(socket: &Path, backend: &str) -> Vec<Srv> {
    let Some(text) = cli_command(socket, &format!("show servers state {backend}")) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            // be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight
            // srv_iweight … (18) srv_port
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 19 || f[1] != backend {
                return None;
            }
            let admin: u32 = f[6].parse().ok()?;
            Some(Srv {
                name: f[3].to_owned(),
                addr: format!("{}:{}", f[4], f[18]),
                weight: f[7].parse().ok()?,
                // In maintenance: FMAINT 0x01, IMAINT 0x02, RMAINT 0x20 (SRV_ADMF_MAINT).
                // CMAINT 0x04 only records that the config said `disabled`: it stays after
                // `set server … state ready`, and the server serves.
                maint: admin & 0x23 != 0,
            })
        })
        .collect()
}

/// One registry instance: id and YAML value (an address, or a JSON object in quotes).
pub type Inst = (&'static str, String);

/// A YAML registry file with these services, plus raw YAML appended (other prefixes).
pub fn registry(services: &[(&str, &[Inst])], extra: &str) -> String {
    let mut text = String::from("services:\n");
    for (name, instances) in services {
        text.push_str(&format!("  {name}:\n"));
        for (id, value) in *instances {
            text.push_str(&format!("    {id}: {value}\n"));
        }
    }
    text.push_str(extra);
    text
}

/// An instance at a backend, as a plain address.
pub fn at(id: &'static str, b: &Backend) -> Inst {
    (id, format!("\"127.0.0.1:{}\"", b.port))
}
