//! A model of the cloud load balancer in front of the nodes, and bounded load through it.
//!
//! [`Elb`] is a plain HAProxy (not haconfd) on a free 127.0.0.1 port whose one backend holds
//! the nodes, each health-checked on its monitor URI every 500 ms (`fall 2 rise 2`), with no
//! retries and no redispatch, as an AWS ELB behaves: a connection a node refuses is an error
//! for the client. [`ElbWatch`] records, from the ELB's stats socket, when each node left the
//! ELB and came back. [`Load`] sends requests through it at a fixed rate, with keep-alive and
//! without, and records every failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::haproxy::cli_command;
use super::{free_port, wait_for};

/// The ELB's view of one node: its server name in the ELB's backend and its port.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub port: u16,
}

/// A plain HAProxy in front of the nodes, in its own process group, killed by PID on drop.
pub struct Elb {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Elb {
    /// Starts the ELB model in front of `targets`, health-checking `monitor_uri` on each.
    pub fn start(targets: &[Target], monitor_uri: &str) -> Elb {
        let dir = tempfile::Builder::new()
            .prefix("haconfd-elb-")
            .tempdir()
            .expect("elb temp dir");
        let port = free_port();
        let servers: Vec<String> = targets
            .iter()
            .map(|t| format!("    server {} 127.0.0.1:{}", t.name, t.port))
            .collect();
        let cfg = format!(
            r#"global
    stats socket {sock} mode 600 level admin

defaults
    mode http
    # As an ELB: a request that fails to connect is an error for the client.
    retries 0
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    timeout http-request 5s
    timeout http-keep-alive 10s

frontend elb
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance roundrobin
    option httpchk GET {monitor_uri}
    http-check expect status 200
    default-server check inter 500ms fall 2 rise 2
{servers}
"#,
            sock = dir.path().join("elb.sock").display(),
            servers = servers.join("\n"),
        );
        let cfg_path = dir.path().join("elb.cfg");
        std::fs::write(&cfg_path, cfg).expect("write elb cfg");
        let check = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&cfg_path)
            .output()
            .expect("run haproxy -c");
        assert!(
            check.status.success(),
            "the ELB model's config does not pass haproxy -c:\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(dir.path().join("elb.log")).expect("elb log");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log clone"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start the ELB model's haproxy");
        let elb = Elb {
            port,
            dir,
            child: Some(child),
        };
        wait_for(
            Duration::from_secs(10),
            "the ELB model's stats socket",
            || elb.show_stat().map(|_| ()),
        );
        elb
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("elb.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("elb.log")).unwrap_or_default()
    }

    /// `show stat` on the stats socket.
    pub fn show_stat(&self) -> Option<String> {
        cli_command(&self.socket(), "show stat").filter(|s| s.starts_with('#'))
    }

    /// Each node's status as the ELB sees it (`UP`, `DOWN`, `UP 1/2`, `DOWN 1/2`, …).
    pub fn statuses(&self) -> Option<Vec<(String, String)>> {
        parse_statuses(&self.show_stat()?)
    }

    /// Whether the ELB holds node `name` UP (fully: not `UP 1/2` on its way down).
    pub fn is_up(&self, name: &str) -> bool {
        self.statuses()
            .is_some_and(|s| s.iter().any(|(n, st)| n == name && st == "UP"))
    }

    /// Waits (bounded) until the ELB holds every node in `names` UP.
    pub fn wait_up(&self, names: &[&str], timeout: Duration) {
        wait_for(timeout, &format!("the ELB to hold {names:?} UP"), || {
            names.iter().all(|n| self.is_up(n)).then_some(())
        });
    }
}

impl Drop for Elb {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = c.wait();
        }
    }
}

/// The server rows of backend `nodes` in `show stat` output: (server name, status).
fn parse_statuses(csv: &str) -> Option<Vec<(String, String)>> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (px, sv, st) = (col("pxname")?, col("svname")?, col("status")?);
    Some(
        lines
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                let name = *f.get(sv)?;
                (f.get(px) == Some(&"nodes") && name != "BACKEND" && name != "FRONTEND")
                    .then(|| (name.to_owned(), f.get(st).unwrap_or(&"").to_string()))
            })
            .collect(),
    )
}

/// One change of a node's status in the ELB, at a time since the watch started.
#[derive(Debug, Clone)]
pub struct Transition {
    pub at: Instant,
    pub node: String,
    pub status: String,
}

/// Polls the ELB's stats socket every 50 ms from a thread of its own and records each node's
/// status changes. Stopped and joined on drop; bounded by `max` in time.
pub struct ElbWatch {
    transitions: Arc<Mutex<Vec<Transition>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ElbWatch {
    pub fn start(elb: &Elb, max: Duration) -> ElbWatch {
        let socket = elb.socket();
        let transitions = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, stopped) = (Arc::clone(&transitions), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut last: Vec<(String, String)> = Vec::new();
            while !stopped.load(Ordering::SeqCst) && start.elapsed() < max {
                if let Some(now) = cli_command(&socket, "show stat")
                    .as_deref()
                    .and_then(parse_statuses)
                {
                    for (node, status) in &now {
                        let before = last.iter().find(|(n, _)| n == node).map(|(_, s)| s);
                        if before != Some(status) {
                            out.lock().expect("transitions").push(Transition {
                                at: Instant::now(),
                                node: node.clone(),
                                status: status.clone(),
                            });
                        }
                    }
                    last = now;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        ElbWatch {
            transitions,
            stop,
            thread: Some(thread),
        }
    }

    pub fn transitions(&self) -> Vec<Transition> {
        self.transitions.lock().expect("transitions").clone()
    }

    /// How long `node` was out of the ELB (any status but a full `UP`: `UP 1/2` already
    /// counts, since the ELB stops sending to it only at `DOWN`, but the first failed check
    /// is when it starts to leave) between `from` and its first full `UP` after that, and
    /// when it was really out (`DOWN`) over the same span.
    pub fn out_of_elb(&self, node: &str, from: Instant) -> Option<OutOfElb> {
        let ts: Vec<Transition> = self
            .transitions()
            .into_iter()
            .filter(|t| t.node == node && t.at >= from)
            .collect();
        let leaving = ts.iter().find(|t| t.status != "UP")?;
        let down = ts
            .iter()
            .find(|t| t.status.starts_with("DOWN") && !t.status.contains('/'))?;
        let back = ts.iter().find(|t| t.at > down.at && t.status == "UP")?;
        Some(OutOfElb {
            first_failed_check: leaving.at.duration_since(from),
            marked_down: down.at.duration_since(from),
            back_up: back.at.duration_since(from),
            down_for: back.at.duration_since(down.at),
        })
    }
}

/// When a node restart showed in the ELB, relative to the restart's start.
#[derive(Debug, Clone, Copy)]
pub struct OutOfElb {
    pub first_failed_check: Duration,
    pub marked_down: Duration,
    pub back_up: Duration,
    /// From `DOWN` to `UP` again: how long the ELB sent this node nothing.
    pub down_for: Duration,
}

impl Drop for ElbWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One failed request.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Since the load started.
    pub at: Duration,
    pub keep_alive: bool,
    /// Whether the request went over a connection that had carried a request before.
    pub reused: bool,
    pub what: String,
}

/// What a load run saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub sent: usize,
    pub ok: usize,
    pub failures: Vec<Failure>,
    /// Requests per response body (the backend's name), to see who served.
    pub bodies: std::collections::BTreeMap<String, usize>,
}

impl Report {
    fn merge(&mut self, other: Report) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.failures.extend(other.failures);
        for (k, v) in other.bodies {
            *self.bodies.entry(k).or_default() += v;
        }
    }

    pub fn failed(&self) -> usize {
        self.failures.len()
    }

    /// The first failures, one a line, for an assertion message.
    pub fn describe_failures(&self, n: usize) -> String {
        let mut out: Vec<String> = self
            .failures
            .iter()
            .take(n)
            .map(|f| {
                format!(
                    "  at {:>7.3}s {} {}: {}",
                    f.at.as_secs_f64(),
                    if f.keep_alive {
                        "keep-alive"
                    } else {
                        "close     "
                    },
                    if f.reused { "reused" } else { "new   " },
                    f.what
                )
            })
            .collect();
        if self.failures.len() > n {
            out.push(format!("  … and {} more", self.failures.len() - n));
        }
        out.join("\n")
    }
}

/// Bounded load through a port on 127.0.0.1: `clients` threads that reuse their connection
/// (keep-alive) and as many that open a new connection per request, each sending a `GET /`
/// with `Host: <host>` every `interval` (or as soon as its previous response came, when that
/// took longer), until stopped, `max_duration` is over, or `max_requests` per thread were
/// sent.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Report>>,
}

/// How a load runs.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub port: u16,
    pub host: String,
    pub interval: Duration,
    pub max_duration: Duration,
    pub max_requests: usize,
    /// Client threads per kind (keep-alive, close).
    pub clients: usize,
}

impl Load {
    pub fn start(spec: LoadSpec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = [true, false]
            .into_iter()
            .flat_map(|keep_alive| std::iter::repeat_n(keep_alive, spec.clients.max(1)))
            .map(|keep_alive| {
                let (spec, stop) = (spec.clone(), Arc::clone(&stop));
                std::thread::spawn(move || run_client(&spec, keep_alive, &stop))
            })
            .collect();
        Load { stop, threads }
    }

    /// Stops both clients and returns what they saw together.
    pub fn finish(mut self) -> Report {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = Report::default();
        for t in self.threads.drain(..) {
            total.merge(t.join().expect("load thread"));
        }
        total
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A connection that has carried `used` requests.
struct Conn {
    reader: BufReader<TcpStream>,
    used: usize,
}

fn run_client(spec: &LoadSpec, keep_alive: bool, stop: &AtomicBool) -> Report {
    let start = Instant::now();
    let mut report = Report::default();
    let mut conn: Option<Conn> = None;
    let mut next = start;
    while !stop.load(Ordering::SeqCst)
        && start.elapsed() < spec.max_duration
        && report.sent < spec.max_requests
    {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        // A fixed rate, without bursts to catch up after a slow request.
        next = (next + spec.interval).max(Instant::now());
        report.sent += 1;
        let reused = conn.as_ref().is_some_and(|c| c.used > 0);
        let at = start.elapsed();
        match request(&mut conn, spec, keep_alive) {
            Ok((status, body, close)) => {
                if (200..300).contains(&status) {
                    report.ok += 1;
                    *report.bodies.entry(body).or_default() += 1;
                } else {
                    report.failures.push(Failure {
                        at,
                        keep_alive,
                        reused,
                        what: format!(
                            "HTTP {status}: {:?}",
                            body.chars().take(80).collect::<String>()
                        ),
                    });
                }
                if close || !keep_alive {
                    conn = None;
                }
            }
            Err(e) => {
                conn = None;
                report.failures.push(Failure {
                    at,
                    keep_alive,
                    reused,
                    what: e,
                });
            }
        }
    }
    report
}

/// Sends one request on `conn` (connecting first when there is none) and reads the response:
/// (status, body, whether the server closes the connection).
fn request(
    conn: &mut Option<Conn>,
    spec: &LoadSpec,
    keep_alive: bool,
) -> Result<(u16, String, bool), String> {
    if conn.is_none() {
        let addr = SocketAddr::from(([127, 0, 0, 1], spec.port));
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let _ = s.set_nodelay(true);
        *conn = Some(Conn {
            reader: BufReader::new(s),
            used: 0,
        });
    }
    let c = conn.as_mut().expect("connected");
    c.used += 1;
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nUser-Agent: haconfd-fleet-load\r\n{}\r\n",
        spec.host,
        if keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        }
    );
    c.reader
        .get_mut()
        .write_all(req.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    read_response(&mut c.reader)
}

fn read_response(r: &mut BufReader<TcpStream>) -> Result<(u16, String, bool), String> {
    let mut line = String::new();
    let n = r
        .read_line(&mut line)
        .map_err(|e| format!("read status line: {e}"))?;
    if n == 0 {
        return Err("connection closed before any response byte".into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut close = line.starts_with("HTTP/1.0");
    for _ in 0..100 {
        let mut h = String::new();
        let n = r
            .read_line(&mut h)
            .map_err(|e| format!("read header (HTTP {status}): {e}"))?;
        if n == 0 {
            return Err(format!("connection closed in the headers (HTTP {status})"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => length = value.parse().ok(),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if let Some(len) = length {
        body.resize(len.min(1 << 20), 0);
        r.read_exact(&mut body)
            .map_err(|e| format!("read body (HTTP {status}): {e}"))?;
    } else if chunked {
        for _ in 0..1000 {
            let mut size = String::new();
            r.read_line(&mut size)
                .map_err(|e| format!("read chunk size (HTTP {status}): {e}"))?;
            let size = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| format!("bad chunk size {size:?}"))?;
            let mut chunk = vec![0; size.min(1 << 20) + 2];
            r.read_exact(&mut chunk)
                .map_err(|e| format!("read chunk (HTTP {status}): {e}"))?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        r.take(1 << 20)
            .read_to_end(&mut body)
            .map_err(|e| format!("read body to close (HTTP {status}): {e}"))?;
        close = true;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned(), close))
}
