//! A real 3-member etcd cluster for tests: every member on free loopback ports, with its own
//! data dir (on /dev/shm when there is one), killed by PID on drop. A member can be killed
//! (SIGKILL) and started again on the same data dir and ports; the leader is found with the
//! `status()` call of each member. Keys are written and read through the etcd-client crate,
//! one member at a time (the first that answers), on a small runtime owned by the guard.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions};
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
    pub peer_port: u16,
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

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// GET /health on the metrics listener answers {"health":"true"} (this member sees a
    /// leader).
    pub fn healthy(&self) -> bool {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.metrics_port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }
}

/// A running 3-member etcd cluster. Every member is killed by PID when dropped.
pub struct Cluster {
    pub members: Vec<Member>,
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl Cluster {
    /// Starts three members (heartbeat 100 ms, election timeout 1 s) and waits until every
    /// one is healthy.
    pub fn start() -> Cluster {
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
        let members = NAMES
            .iter()
            .map(|name| Member {
                name,
                client_port: free_port(),
                peer_port: free_port(),
                metrics_port: free_port(),
                child: None,
            })
            .collect();
        let mut c = Cluster { members, dir, rt };
        for i in 0..c.members.len() {
            c.spawn(i);
        }
        for i in 0..c.members.len() {
            c.wait_healthy(i);
        }
        c
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
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
        let child = Command::new("etcd")
            .args(["--name", m.name, "--data-dir"])
            .arg(self.dir.path().join(format!("data-{}", m.name)))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
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
        self.members[i].child = Some(child);
    }

    fn wait_healthy(&mut self, i: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.members[i].healthy() {
                return;
            }
            if let Some(c) = self.members[i].child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("etcd member {i} exited with {status}:\n{}", self.log(i));
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

    /// Runs `f` against one running member after the other, each bounded by a timeout, and
    /// returns the first success; panics when none answers.
    pub fn with_client<T>(
        &self,
        f: impl AsyncFn(&mut Client) -> Result<T, etcd_client::Error>,
    ) -> T {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.running())
            .map(Member::endpoint)
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
        self.with_client(async |c| {
            let r = c.put(key, value, None).await?;
            Ok(r.header().map(|h| h.revision()).unwrap_or(0))
        })
    }

    /// Deletes one key; returns how many keys were deleted.
    pub fn delete(&self, key: &str) -> i64 {
        self.with_client(async |c| Ok(c.delete(key, None).await?.deleted()))
    }

    /// Every key under `prefix`, as text.
    pub fn get_prefix(&self, prefix: &str) -> BTreeMap<String, String> {
        self.with_client(async |c| {
            let r = c.get(prefix, Some(GetOptions::new().with_prefix())).await?;
            Ok(r.kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    )
                })
                .collect())
        })
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.with_client(async |c| {
            let r = c
                .get("/", Some(GetOptions::new().with_count_only()))
                .await?;
            Ok(r.header().map(|h| h.revision()).unwrap_or(0))
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
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
