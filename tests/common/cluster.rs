//! A real 3-member etcd cluster for tests: every member on free loopback ports, with its own
//! data dir (on /dev/shm when there is one), killed by PID on drop. A member can be killed
//! (SIGKILL) and started again on the same data dir and ports; the leader is found with the
//! `status()` call of each member. Keys are written and read through the etcd-client crate,
//! one member at a time (the first that answers), on a small runtime owned by the guard.
//!
//! A partitionable cluster ([`Cluster::start_partitionable`]) puts a small TCP proxy in front of
//! each member's peer port: the member advertises the proxy's port and listens on its own, so
//! every byte of raft traffic between members (streams, pipeline, snapshots, probes, forwarded
//! lease renewals, version checks) goes through a proxy. [`Cluster::partition`] cuts one member
//! off from the other two with no firewall: its proxy closes every connection to it and
//! refuses new ones, and the other proxies close and refuse every connection that the member
//! opened. A connection's opener is found at accept time, from its source port, in
//! /proc/net/tcp and the members' /proc/PID/fd (a socket inode), so no protocol is parsed.
//! Client traffic is untouched: a client of the cut-off member still reaches it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::free_port;

/// How long the cluster (or a restarted member) may take to answer /health.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The bound on one helper call against one member.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Member names, in `--initial-cluster` order.
const NAMES: [&str; 3] = ["a", "b", "c"];

/// One etcd process of the cluster.
pub struct Member {
    pub name: &'static str,
    pub client_port: u16,
    /// The peer port the member advertises (its proxy's, in a partitionable cluster).
    pub peer_port: u16,
    /// The peer port the member listens on (the same as `peer_port` without a proxy).
    pub peer_listen_port: u16,
    pub metrics_port: u16,
    child: Option<Child>,
}

impl Member {
    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn peer_listen_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_listen_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// GET /health on the metrics listener answers {"health":"true"} (this member sees a
    /// leader).
    pub fn healthy(&self) -> bool {
        super::etcd::healthy(self.metrics_port)
    }
}

/// A running 3-member etcd cluster. Every member is killed by PID when dropped.
pub struct Cluster {
    pub members: Vec<Member>,
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    /// The peer proxies of a partitionable cluster.
    net: Option<PeerNet>,
}

impl Cluster {
    /// Starts three members (heartbeat 100 ms, election timeout 1 s) and waits until every
    /// one is healthy.
    pub fn start() -> Cluster {
        Cluster::start_with(false)
    }

    /// As [`Cluster::start`], with every member's peer traffic through a proxy, so that one
    /// member can be cut off from the other two ([`Cluster::partition`]).
    pub fn start_partitionable() -> Cluster {
        Cluster::start_with(true)
    }

    fn start_with(partitionable: bool) -> Cluster {
        // A port picked free can be taken before etcd binds it (an outgoing connection's
        // ephemeral port, under a loaded parallel suite): a cluster that loses one starts over
        // on new ports.
        let mut last = String::new();
        for _ in 0..3 {
            match Cluster::try_start(partitionable) {
                Ok(c) => return c,
                Err(why) if why.contains("address already in use") => last = why,
                Err(why) => panic!("{why}"),
            }
        }
        panic!("{last}")
    }

    fn try_start(partitionable: bool) -> Result<Cluster, String> {
        let dir = match std::path::Path::new("/dev/shm").is_dir() {
            true => tempfile::Builder::new()
                .prefix("haconfd-cluster-")
                .tempdir_in("/dev/shm"),
            false => tempfile::Builder::new()
                .prefix("haconfd-cluster-")
                .tempdir(),
        }
        .expect("cluster temp dir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let members: Vec<Member> = NAMES
            .iter()
            .map(|name| {
                let peer_port = free_port();
                Member {
                    name,
                    client_port: free_port(),
                    peer_port,
                    peer_listen_port: if partitionable {
                        free_port()
                    } else {
                        peer_port
                    },
                    metrics_port: free_port(),
                    child: None,
                }
            })
            .collect();
        let net = partitionable.then(|| {
            PeerNet::start(
                &members
                    .iter()
                    .map(|m| (m.peer_port, m.peer_listen_port))
                    .collect::<Vec<_>>(),
            )
        });
        let mut c = Cluster {
            members,
            dir,
            rt,
            net,
        };
        for i in 0..c.members.len() {
            c.spawn(i);
        }
        for i in 0..c.members.len() {
            c.try_wait_healthy(i)?;
        }
        Ok(c)
    }

    /// Every member's client URL (running or not), as haconfd's `[etcd] endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("etcd-{}.log", self.members[i].name))
    }

    /// Member `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    fn spawn(&mut self, i: usize) {
        assert!(
            self.members[i].child.is_none(),
            "etcd member {i} is already running"
        );
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect();
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("etcd log");
        let client = m.endpoint();
        let peer = m.peer_url();
        let listen_peer = m.peer_listen_url();
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
        let child = Command::new("etcd")
            .args(["--name", m.name, "--data-dir"])
            .arg(self.dir.path().join(format!("data-{}", m.name)))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &listen_peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "haconfd-fleet-test"])
            .args(["--listen-metrics-urls", &metrics])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log clone"))
            .stderr(log)
            .spawn()
            .expect("start etcd (is it installed?)");
        if let Some(net) = &self.net {
            net.shared.set_pid(i, Some(child.id()));
        }
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&mut self, i: usize) {
        if let Err(why) = self.try_wait_healthy(i) {
            panic!("{why}");
        }
    }

    /// Waits until member `i` is healthy; why it exited, if it did.
    fn try_wait_healthy(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.members[i].healthy() {
                return Ok(());
            }
            if let Some(c) = self.members[i].child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.members[i].child = None;
                return Err(format!(
                    "etcd member {i} exited with {status}:\n{}",
                    self.log(i)
                ));
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {i} not healthy after {START_TIMEOUT:?}:\n{}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL member `i` by its PID and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
        if let Some(net) = &self.net {
            net.shared.set_pid(i, None);
        }
    }

    /// Cuts member `i` off from the other two: every peer connection to it or from it is
    /// closed, and new ones are refused until [`Cluster::heal`]. Its clients still reach it.
    /// Panics on a cluster not started with [`Cluster::start_partitionable`].
    pub fn partition(&self, i: usize) {
        self.net
            .as_ref()
            .expect("partition needs Cluster::start_partitionable")
            .shared
            .set_isolated(i, true);
    }

    /// Ends [`Cluster::partition`] of member `i`: its peers reconnect by themselves.
    pub fn heal(&self, i: usize) {
        self.net
            .as_ref()
            .expect("heal needs Cluster::start_partitionable")
            .shared
            .set_isolated(i, false);
    }

    /// What the peer proxies saw: one line per connection (opener, target, first request
    /// line, and whether it was refused), oldest first, at most [`PEER_LOG_MAX`].
    pub fn peer_log(&self) -> Vec<String> {
        self.net
            .as_ref()
            .map(|n| n.shared.log.lock().expect("peer log").clone())
            .unwrap_or_default()
    }

    /// Whether member `i` knows a leader, by its own `status()` (None when it does not
    /// answer).
    pub fn has_leader(&self, i: usize) -> Option<bool> {
        let ep = self.members[i].endpoint();
        let r = self.rt.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, async {
                let mut c = Client::connect([ep.as_str()], Some(Self::options())).await?;
                Ok::<_, etcd_client::Error>(c.status().await?.leader())
            })
            .await
        });
        match r {
            Ok(Ok(leader)) => Some(leader != 0),
            _ => None,
        }
    }

    /// Starts member `i` again on its data dir and ports and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// SIGSTOP member `i`: it keeps its sockets open and answers nothing, like a hung host.
    pub fn freeze(&self, i: usize) {
        if let Some(pid) = self.members[i].pid() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGSTOP);
        }
    }

    /// SIGCONT member `i` after [`Cluster::freeze`].
    pub fn thaw(&self, i: usize) {
        if let Some(pid) = self.members[i].pid() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGCONT);
        }
    }

    /// Makes member `to` the leader (etcd's move-leader, asked of the current leader) and
    /// waits until every running member agrees.
    pub fn move_leader(&self, to: usize) {
        let leader = self.wait_leader(START_TIMEOUT);
        if leader == to {
            return;
        }
        let (target, current) = (self.members[to].endpoint(), self.members[leader].endpoint());
        let moved = self.rt.block_on(async {
            tokio::time::timeout(START_TIMEOUT, async {
                let mut t = Client::connect([target.as_str()], Some(Self::options())).await?;
                let id = t
                    .status()
                    .await?
                    .header()
                    .map(|h| h.member_id())
                    .unwrap_or(0);
                let mut l = Client::connect([current.as_str()], Some(Self::options())).await?;
                l.move_leader(id).await?;
                Ok::<_, etcd_client::Error>(())
            })
            .await
        });
        assert!(
            matches!(moved, Ok(Ok(()))),
            "move-leader to {to}: {moved:?}"
        );
        super::wait_for(START_TIMEOUT, "the moved leader", || {
            (self.leader() == Some(to)).then_some(())
        });
    }

    fn options() -> ConnectOptions {
        ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(CALL_TIMEOUT)
    }

    /// Whether member `i` is cut off by [`Cluster::partition`].
    pub fn is_cut_off(&self, i: usize) -> bool {
        self.net
            .as_ref()
            .is_some_and(|n| n.shared.isolated.lock().expect("isolated")[i])
    }

    /// Runs `f` against one running member after the other (skipping one cut off, whose
    /// reads would wait out their timeout), each bounded by a timeout, and returns the first
    /// success; panics when none answers.
    pub fn with_client<T>(
        &self,
        f: impl AsyncFn(&mut Client) -> Result<T, etcd_client::Error>,
    ) -> T {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, m)| m.running() && !self.is_cut_off(*i))
            .map(|(_, m)| m.endpoint())
            .collect();
        let mut errors = Vec::new();
        for ep in &endpoints {
            let r = self.rt.block_on(async {
                tokio::time::timeout(CALL_TIMEOUT, async {
                    let mut c = Client::connect([ep.as_str()], Some(Self::options())).await?;
                    f(&mut c).await
                })
                .await
            });
            match r {
                Ok(Ok(v)) => return v,
                Ok(Err(e)) => errors.push(format!("{ep}: {e}")),
                Err(_) => errors.push(format!("{ep}: timed out after {CALL_TIMEOUT:?}")),
            }
        }
        panic!("no etcd member answered: {errors:?}");
    }

    /// Runs `f` against member `i` only, bounded by a timeout.
    pub fn with_member<T>(
        &self,
        i: usize,
        f: impl AsyncFn(&mut Client) -> Result<T, etcd_client::Error>,
    ) -> Result<T, String> {
        self.with_member_within(i, CALL_TIMEOUT, f)
    }

    /// Runs `f` against member `i` only, bounded by `timeout`.
    pub fn with_member_within<T>(
        &self,
        i: usize,
        timeout: Duration,
        f: impl AsyncFn(&mut Client) -> Result<T, etcd_client::Error>,
    ) -> Result<T, String> {
        let ep = self.members[i].endpoint();
        let r = self.rt.block_on(async {
            tokio::time::timeout(timeout, async {
                let mut c = Client::connect([ep.as_str()], Some(Self::options())).await?;
                f(&mut c).await
            })
            .await
        });
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("{ep}: {e}")),
            Err(_) => Err(format!("{ep}: timed out after {timeout:?}")),
        }
    }

    /// Puts one key through member `i` only, within `timeout`; returns the revision.
    pub fn put_on(
        &self,
        i: usize,
        timeout: Duration,
        key: &str,
        value: &str,
    ) -> Result<i64, String> {
        self.with_member_within(i, timeout, async |c| super::etcd::put(c, key, value).await)
    }

    /// Member `i`'s Prometheus metrics (GET /metrics on its metrics listener), or "" when it
    /// does not answer.
    pub fn metrics(&self, i: usize) -> String {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.members[i].metrics_port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return String::new();
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body
    }

    /// The value of one metric line of member `i` (`name` with its labels, exactly as
    /// etcd prints it), None when absent.
    pub fn metric(&self, i: usize, name: &str) -> Option<f64> {
        self.metrics(i).lines().find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
    }

    /// How many watchers member `i` serves now (`etcd_debugging_mvcc_watcher_total`).
    pub fn watchers(&self, i: usize) -> Option<f64> {
        self.metric(i, "etcd_debugging_mvcc_watcher_total")
    }

    /// How many lease keep-alive streams member `i` serves now (gRPC streams started minus
    /// handled).
    pub fn lease_keep_alive_streams(&self, i: usize) -> f64 {
        let started = self
            .metrics(i)
            .lines()
            .filter(|l| {
                l.starts_with("grpc_server_started_total{")
                    && l.contains("grpc_method=\"LeaseKeepAlive\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>();
        let handled = self
            .metrics(i)
            .lines()
            .filter(|l| {
                l.starts_with("grpc_server_handled_total{")
                    && l.contains("grpc_method=\"LeaseKeepAlive\"")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>();
        started - handled
    }

    /// The index of the member that is the leader, as the running members report it (None
    /// while they do not agree on one that runs).
    pub fn leader(&self) -> Option<usize> {
        let mut seen = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if !m.running() {
                continue;
            }
            let ep = m.endpoint();
            let r = self.rt.block_on(async {
                tokio::time::timeout(CALL_TIMEOUT, async {
                    let mut c = Client::connect([ep.as_str()], Some(Self::options())).await?;
                    let s = c.status().await?;
                    Ok::<_, etcd_client::Error>((
                        s.header().map(|h| h.member_id()).unwrap_or(0),
                        s.leader(),
                    ))
                })
                .await
            });
            if let Ok(Ok(pair)) = r {
                seen.push((i, pair));
            }
        }
        let (_, (_, leader_id)) = seen.first()?;
        if *leader_id == 0 || seen.iter().any(|(_, (_, l))| l != leader_id) {
            return None;
        }
        seen.iter()
            .find(|(_, (id, _))| id == leader_id)
            .map(|(i, _)| *i)
    }

    /// Waits (bounded) until the running members agree on a leader; its index.
    pub fn wait_leader(&self, timeout: Duration) -> usize {
        super::wait_for(timeout, "an etcd leader", || self.leader())
    }

    /// Puts one key; returns the revision.
    pub fn put(&self, key: &str, value: &str) -> i64 {
        self.with_client(async |c| super::etcd::put(c, key, value).await)
    }

    /// Deletes one key; returns how many keys were deleted.
    pub fn delete(&self, key: &str) -> i64 {
        self.with_client(async |c| Ok(c.delete(key, None).await?.deleted()))
    }

    /// Every key under `prefix`, as text.
    pub fn get_prefix(&self, prefix: &str) -> BTreeMap<String, String> {
        self.with_client(async |c| super::etcd::get_prefix(c, prefix).await)
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.with_client(async |c| super::etcd::revision(c).await)
    }

    /// A key's value and lease id as member `i` reads it: Ok(None) when absent.
    pub fn entry_on(&self, i: usize, key: &str) -> Result<Option<(String, i64)>, String> {
        self.with_member(i, async |c| {
            let r = c.get(key, None).await?;
            Ok(r.kvs().first().map(super::etcd::entry_of))
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if let Some(net) = self.net.take() {
            net.stop();
        }
        if std::thread::panicking() || std::env::var_os("HACONFD_TEST_SHOW_LOG").is_some() {
            for i in 0..self.members.len() {
                let log = self.log(i);
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!(
                    "etcd member {} log (last 20 lines, newest first):\n{}",
                    self.members[i].name,
                    tail.join("\n")
                );
            }
        }
    }
}

/// How many connections [`Cluster::peer_log`] keeps.
pub const PEER_LOG_MAX: usize = 2000;

/// The peer proxies of a partitionable cluster: one accept thread per member, two pump
/// threads per connection. Every thread ends in [`PeerNet::stop`].
struct PeerNet {
    shared: Arc<NetShared>,
    /// The proxies' ports, to wake their accept loops, and the accept threads.
    acceptors: Vec<(u16, JoinHandle<()>)>,
}

/// One proxied connection: who opened it (a member index, None when not found), to whom,
/// and a clone of both sockets to close it from outside.
struct Link {
    id: u64,
    from: Option<usize>,
    to: usize,
    sockets: [TcpStream; 2],
}

#[derive(Default)]
struct NetShared {
    stop: AtomicBool,
    /// Members cut off by [`Cluster::partition`].
    isolated: Mutex<Vec<bool>>,
    /// Each member's PID, to find who opened a connection.
    pids: Mutex<Vec<Option<u32>>>,
    links: Mutex<Vec<Link>>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
    log: Mutex<Vec<String>>,
}

impl NetShared {
    fn set_pid(&self, i: usize, pid: Option<u32>) {
        self.pids.lock().expect("pids")[i] = pid;
    }

    /// Whether a connection from `from` to `to` crosses a cut. One whose opener is unknown
    /// is refused while any member is cut off: it may come from that member.
    fn is_cut(&self, from: Option<usize>, to: usize) -> bool {
        let isolated = self.isolated.lock().expect("isolated");
        isolated[to]
            || match from {
                Some(f) => isolated[f],
                None => isolated.iter().any(|x| *x),
            }
    }

    fn set_isolated(&self, i: usize, cut: bool) {
        self.isolated.lock().expect("isolated")[i] = cut;
        if !cut {
            return;
        }
        let mut links = self.links.lock().expect("links");
        links.retain(|l| {
            let keep = !self.is_cut(l.from, l.to);
            if !keep {
                for s in &l.sockets {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
            keep
        });
    }

    fn note(&self, line: String) {
        let mut log = self.log.lock().expect("peer log");
        if log.len() < PEER_LOG_MAX {
            log.push(line);
        }
    }

    fn member_name(i: Option<usize>) -> &'static str {
        i.map(|i| NAMES[i]).unwrap_or("?")
    }
}

impl PeerNet {
    /// One proxy per `(advertised port, listen port)` pair, member by member.
    fn start(ports: &[(u16, u16)]) -> PeerNet {
        let shared = Arc::new(NetShared {
            isolated: Mutex::new(vec![false; ports.len()]),
            pids: Mutex::new(vec![None; ports.len()]),
            ..NetShared::default()
        });
        let acceptors = ports
            .iter()
            .enumerate()
            .map(|(to, &(port, upstream))| {
                let listener =
                    TcpListener::bind(("127.0.0.1", port)).expect("bind a peer proxy port");
                let shared = shared.clone();
                let t =
                    std::thread::spawn(move || accept_loop(listener, to, port, upstream, shared));
                (port, t)
            })
            .collect();
        PeerNet { shared, acceptors }
    }

    /// Stops accepting, closes every connection and joins every thread.
    fn stop(self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for (port, t) in self.acceptors {
            let _ = TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], port)),
                Duration::from_secs(1),
            );
            let _ = t.join();
        }
        for l in self.shared.links.lock().expect("links").drain(..) {
            for s in &l.sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        let pumps: Vec<_> = self.shared.pumps.lock().expect("pumps").drain(..).collect();
        for p in pumps {
            let _ = p.join();
        }
    }
}

fn accept_loop(listener: TcpListener, to: usize, port: u16, upstream: u16, shared: Arc<NetShared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = conn else { continue };
        let from = client
            .peer_addr()
            .ok()
            .and_then(|a| opener(a.port(), port, &shared.pids.lock().expect("pids")));
        let (fname, tname) = (NetShared::member_name(from), NAMES[to]);
        if shared.is_cut(from, to) {
            shared.note(format!("{fname} -> {tname}: refused (cut off)"));
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let Ok(server) = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], upstream)),
            Duration::from_secs(1),
        ) else {
            shared.note(format!("{fname} -> {tname}: member not listening"));
            continue;
        };
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        shared.links.lock().expect("links").push(Link {
            id,
            from,
            to,
            sockets: [c2, s2],
        });
        let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let label = format!("{fname} -> {tname}");
        let up = {
            let shared = shared.clone();
            std::thread::spawn(move || pump(client, server, id, Some(label), &shared))
        };
        let down = {
            let shared = shared.clone();
            std::thread::spawn(move || pump(s3, c3, id, None, &shared))
        };
        let mut pumps = shared.pumps.lock().expect("pumps");
        pumps.retain(|p| !p.is_finished());
        pumps.push(up);
        pumps.push(down);
    }
}

/// Copies `from` to `to` until either side ends, then closes the connection both ways and
/// forgets it. With `label`, the first request line read is noted in the peer log.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    id: u64,
    label: Option<String>,
    shared: &NetShared,
) {
    let mut buf = [0u8; 16 * 1024];
    let mut label = label;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(l) = label.take() {
            let head = String::from_utf8_lossy(&buf[..n]);
            let first = head.lines().next().unwrap_or("").to_owned();
            let sender = head
                .lines()
                .find_map(|h| h.strip_prefix("X-Server-From: "))
                .map(|v| format!(" X-Server-From {v}"))
                .unwrap_or_default();
            shared.note(format!("{l}: {first}{sender}"));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    shared.links.lock().expect("links").retain(|l| l.id != id);
}

/// The member whose process holds the socket 127.0.0.1:`port` connected to `proxy_port`:
/// the socket's inode from /proc/net/tcp, then each member's /proc/PID/fd.
fn opener(port: u16, proxy_port: u16, pids: &[Option<u32>]) -> Option<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let port_of = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    let inode = table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 9 && port_of(f[1]) == Some(port) && port_of(f[2]) == Some(proxy_port))
            .then(|| f[9].to_owned())
    })?;
    let target = format!("socket:[{inode}]");
    pids.iter().position(|pid| {
        pid.is_some_and(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|dir| {
                dir.flatten().any(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == target)
                })
            })
        })
    })
}
