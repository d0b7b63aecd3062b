//! A real etcd for tests: private data dir (on /dev/shm when there is one), free loopback
//! ports, killed by PID on drop. It can be killed and restarted on the same data dir and ports,
//! frozen (SIGSTOP) and thawed (SIGCONT). Keys are written and read through the etcd-client
//! crate on a small runtime owned by the guard.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, CompactionOptions, ConnectOptions, DeleteOptions, GetOptions, Identity,
    Permission, PutOptions, TlsOptions, Txn, TxnOp,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::free_port;

/// How long etcd may take to answer /health after a start.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Files for an etcd that serves clients over TLS and requires client certificates.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Generates a CA, a server certificate for 127.0.0.1 and a client certificate with the
    /// openssl CLI, in `dir`.
    pub fn generate(dir: &Path) -> TlsFiles {
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect(
                    "run openssl (the TLS tests need the openssl CLI: a missing one fails them)",
                );
            assert!(
                out.status.success(),
                "openssl {args:?} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=haconfd-test-ca",
        ]);
        run(&args);
        for (name, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
            ),
            (
                "client",
                "haconfd",
                "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
            ),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).expect("write ext");
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let crt = format!("{name}.crt");
            let ext = format!("{name}.ext");
            let subj = format!("/CN={cn}");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            run(&args);
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ]);
        }
        TlsFiles {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
        }
    }
}

/// Options for [`Etcd::with`].
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    pub tls: Option<TlsFiles>,
    /// More command-line arguments, like `--auth-token-ttl=2`.
    pub extra_args: Vec<String>,
}

/// A real etcd process. Killed by PID when dropped.
pub struct Etcd {
    child: Option<Child>,
    pub client_port: u16,
    pub peer_port: u16,
    pub metrics_port: u16,
    dir: tempfile::TempDir,
    options: EtcdOptions,
    /// Credentials for the helper calls once auth is on.
    auth: Option<(String, String)>,
    rt: tokio::runtime::Runtime,
}

impl Etcd {
    /// Starts a plain etcd and waits until it is healthy.
    pub fn start() -> Etcd {
        let mut e = Etcd::with(EtcdOptions::default());
        // A port picked free can be taken before etcd binds it (an outgoing connection's
        // ephemeral port, under a loaded parallel suite): a first start takes new ports.
        for _ in 0..3 {
            match e.try_launch() {
                Ok(()) => return e,
                Err(log) if log.contains("address already in use") => {
                    let _ = std::fs::remove_dir_all(e.dir.path().join("data"));
                    let _ = std::fs::remove_file(e.log_path());
                    e.client_port = free_port();
                    e.peer_port = free_port();
                    e.metrics_port = free_port();
                }
                Err(log) => panic!("{log}"),
            }
        }
        e.launch();
        e
    }

    /// Prepares an etcd (ports, data dir) without starting it: call [`Etcd::launch`].
    pub fn with(options: EtcdOptions) -> Etcd {
        let dir = match Path::new("/dev/shm").is_dir() {
            true => tempfile::Builder::new()
                .prefix("haconfd-etcd-")
                .tempdir_in("/dev/shm"),
            false => tempfile::Builder::new().prefix("haconfd-etcd-").tempdir(),
        }
        .expect("etcd temp dir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        Etcd {
            child: None,
            client_port: free_port(),
            peer_port: free_port(),
            metrics_port: free_port(),
            dir,
            options,
            auth: None,
            rt,
        }
    }

    fn scheme(&self) -> &'static str {
        if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the process (first start or restart on the same data dir and ports) and waits
    /// for /health.
    pub fn launch(&mut self) {
        if let Err(why) = self.try_launch() {
            panic!("{why}");
        }
    }

    /// [`Etcd::launch`], with why etcd did not start as the error (it is not left running).
    fn try_launch(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "etcd is already running");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let metrics = format!("http://127.0.0.1:{}", self.metrics_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd log");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--initial-cluster-state", "new"])
            .args(["--listen-metrics-urls", &metrics])
            .args(&self.options.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log clone"))
            .stderr(log);
        if let Some(t) = &self.options.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        self.child = Some(cmd.spawn().expect("start etcd (is it installed?)"));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.healthy() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                self.child = None;
                return Err(format!("etcd exited with {status}:\n{}", self.log()));
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy after {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// GET /health on the metrics listener answers {"health":"true"}.
    pub fn healthy(&self) -> bool {
        healthy(self.metrics_port)
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    /// SIGKILL and reap.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = Pid::from_raw(c.id() as i32);
            let _ = kill(pid, Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Saves a snapshot of the data with etcdctl.
    pub fn snapshot_save(&self, path: &Path) {
        assert!(self.options.tls.is_none(), "snapshot_save: plain etcd only");
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &self.endpoint(), "snapshot", "save"])
            .arg(path)
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl snapshot save: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Kills etcd, replaces its data with a snapshot (as a disaster recovery would: the
    /// revision goes back to the snapshot's) and starts it again on the same ports.
    pub fn restore_snapshot(&mut self, path: &Path) {
        self.stop();
        let data = self.dir.path().join("data");
        std::fs::remove_dir_all(&data).expect("remove data dir");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("snapshot")
            .arg("restore")
            .arg(path)
            .arg("--data-dir")
            .arg(&data)
            .args(["--name", "t", "--initial-cluster", &format!("t={peer}")])
            .args(["--initial-advertise-peer-urls", &peer])
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl snapshot restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.launch();
    }

    /// Kill, then start again on the same data dir and ports.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            kill(pid, Signal::SIGSTOP).expect("SIGSTOP etcd");
        }
    }

    /// SIGCONT.
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            kill(pid, Signal::SIGCONT).expect("SIGCONT etcd");
        }
    }

    fn connect_options(&self) -> ConnectOptions {
        let mut o = ConnectOptions::new().with_connect_timeout(Duration::from_secs(5));
        o = o.with_timeout(Duration::from_secs(10));
        if let Some(t) = &self.options.tls {
            let read = |p: &Path| std::fs::read(p).expect("read pem");
            o = o.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(read(&t.ca)))
                    .identity(Identity::from_pem(
                        read(&t.client_cert),
                        read(&t.client_key),
                    )),
            );
        }
        if let Some((u, p)) = &self.auth {
            o = o.with_user(u.clone(), p.clone());
        }
        o
    }

    /// Runs `f` with a fresh client, on the guard's runtime.
    pub fn with_client<T>(
        &self,
        f: impl AsyncFnOnce(&mut Client) -> Result<T, etcd_client::Error>,
    ) -> T {
        let endpoint = self.endpoint();
        let options = self.connect_options();
        self.rt.block_on(async move {
            let mut c = Client::connect([endpoint], Some(options))
                .await
                .expect("connect to the test etcd");
            f(&mut c).await.expect("etcd call")
        })
    }

    /// Puts one key; returns the revision.
    pub fn put(&self, key: &str, value: &str) -> i64 {
        self.with_client(async |c| put(c, key, value).await)
    }

    /// Puts many keys with one client, one after another.
    pub fn put_many(&self, pairs: &[(String, String)]) {
        self.with_client(async |c| {
            for (k, v) in pairs {
                c.put(k.as_str(), v.as_str(), None).await?;
            }
            Ok(())
        })
    }

    /// Puts many keys fast: transactions of up to 128 puts (etcd's default `--max-txn-ops`),
    /// one revision each, with one client. For bulk data; [`Etcd::put_many`] gives every key a
    /// revision of its own.
    pub fn put_txn_batches(&self, pairs: &[(String, String)]) {
        self.with_client(async |c| {
            for chunk in pairs.chunks(128) {
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), None))
                    .collect();
                c.txn(Txn::new().and_then(ops)).await?;
            }
            Ok(())
        })
    }

    /// Deletes one key; returns how many keys were deleted.
    pub fn delete(&self, key: &str) -> i64 {
        self.with_client(async |c| Ok(c.delete(key, None).await?.deleted()))
    }

    /// Deletes many keys with one client.
    pub fn delete_many(&self, keys: &[String]) {
        self.with_client(async |c| {
            for k in keys {
                c.delete(k.as_str(), None).await?;
            }
            Ok(())
        })
    }

    /// Deletes every key under `prefix`.
    pub fn delete_prefix(&self, prefix: &str) -> i64 {
        self.with_client(async |c| {
            Ok(c.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                .await?
                .deleted())
        })
    }

    /// Every key under `prefix`, as text.
    pub fn get_prefix(&self, prefix: &str) -> BTreeMap<String, String> {
        self.with_client(async |c| get_prefix(c, prefix).await)
    }

    /// A key's value and lease id (0 without one), if the key exists.
    pub fn entry(&self, key: &str) -> Option<(String, i64)> {
        self.with_client(async |c| {
            let r = c.get(key, None).await?;
            Ok(r.kvs().first().map(entry_of))
        })
    }

    /// A lease's granted TTL and remaining TTL in seconds (-1 when it does not exist).
    pub fn lease_ttl(&self, lease: i64) -> (i64, i64) {
        self.with_client(async |c| {
            let r = c.lease_time_to_live(lease, None).await?;
            Ok((r.granted_ttl(), r.ttl()))
        })
    }

    /// Revokes a lease: its keys go at once.
    pub fn revoke(&self, lease: i64) {
        self.with_client(async |c| {
            c.lease_revoke(lease).await?;
            Ok(())
        })
    }

    /// Puts one key with raw bytes as key and value (bytes that are not UTF-8, NUL, …).
    pub fn put_bytes(&self, key: &[u8], value: &[u8]) -> i64 {
        self.with_client(async |c| {
            let r = c.put(key.to_vec(), value.to_vec(), None).await?;
            Ok(r.header().map(|h| h.revision()).unwrap_or(0))
        })
    }

    /// Grants a lease of `ttl` seconds and returns its id.
    pub fn grant_lease(&self, ttl: i64) -> i64 {
        self.with_client(async |c| Ok(c.lease_grant(ttl, None).await?.id()))
    }

    /// Puts one key attached to `lease`.
    pub fn put_with_lease(&self, key: &str, value: &str, lease: i64) -> i64 {
        self.with_client(async |c| {
            let r = c
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await?;
            Ok(r.header().map(|h| h.revision()).unwrap_or(0))
        })
    }

    /// Starts keeping leases alive from a thread of its own (the guard's runtime only runs
    /// while a helper call blocks on it). See [`LeaseKeeper`].
    pub fn lease_keeper(&self) -> LeaseKeeper {
        LeaseKeeper::start(self.endpoint(), self.connect_options())
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.with_client(async |c| revision(c).await)
    }

    /// Compacts the history up to `revision` (physically, so it is done when this returns).
    pub fn compact(&self, revision: i64) {
        self.with_client(async |c| {
            c.compact(revision, Some(CompactionOptions::new().with_physical()))
                .await?;
            Ok(())
        })
    }

    /// Creates `root` (password `root_password`) and a user `user` with a role that may only
    /// read keys under `read_prefixes`, then enables auth. Helper calls use root from then on.
    pub fn enable_auth(
        &mut self,
        root_password: &str,
        user: &str,
        password: &str,
        read_prefixes: &[&str],
    ) {
        self.with_client(async |c| {
            c.user_add("root", root_password, None).await?;
            c.user_grant_role("root", "root").await?;
            c.role_add("reader").await?;
            for p in read_prefixes {
                c.role_grant_permission("reader", Permission::read(*p).with_prefix())
                    .await?;
            }
            c.user_add(user, password, None).await?;
            c.user_grant_role(user, "reader").await?;
            c.auth_enable().await?;
            Ok(())
        });
        self.auth = Some(("root".into(), root_password.into()));
    }
}

/// Whether GET /health on the etcd metrics listener at 127.0.0.1:`metrics_port` answers
/// {"health":"true"} (the member sees a leader).
pub fn healthy(metrics_port: u16) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
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

/// Puts one key through `c`; returns the revision.
pub async fn put(c: &mut Client, key: &str, value: &str) -> Result<i64, etcd_client::Error> {
    let r = c.put(key, value, None).await?;
    Ok(r.header().map(|h| h.revision()).unwrap_or(0))
}

/// Every key under `prefix` through `c`, as text.
pub async fn get_prefix(
    c: &mut Client,
    prefix: &str,
) -> Result<BTreeMap<String, String>, etcd_client::Error> {
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
}

/// The current revision, as `c` reads it.
pub async fn revision(c: &mut Client) -> Result<i64, etcd_client::Error> {
    let r = c
        .get("/", Some(GetOptions::new().with_count_only()))
        .await?;
    Ok(r.header().map(|h| h.revision()).unwrap_or(0))
}

/// A key-value pair's value as text and its lease id.
pub fn entry_of(kv: &etcd_client::KeyValue) -> (String, i64) {
    (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease())
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Keeps a set of leases alive with `lease_keep_alive`, once every 500 ms, from a thread with
/// its own runtime and client. [`LeaseKeeper::release`] stops keeping one alive, so that it
/// expires after its TTL, as a crashed service's lease does. Stopped and joined on drop.
pub struct LeaseKeeper {
    leases: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<i64>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LeaseKeeper {
    fn start(endpoint: String, options: ConnectOptions) -> LeaseKeeper {
        use std::sync::atomic::Ordering;
        let leases = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (wanted, stopped) = (leases.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("keeper runtime");
            rt.block_on(async move {
                let mut client = None;
                let mut streams = BTreeMap::new();
                while !stopped.load(Ordering::SeqCst) {
                    if client.is_none() {
                        client = Client::connect([endpoint.as_str()], Some(options.clone()))
                            .await
                            .ok();
                    }
                    let want: Vec<i64> = wanted
                        .lock()
                        .map(|w| w.iter().copied().collect())
                        .unwrap_or_default();
                    // Dropping a keeper and its stream ends that lease's keep-alive stream.
                    streams.retain(|id, _| want.contains(id));
                    if let Some(c) = client.as_mut() {
                        for id in want {
                            if !streams.contains_key(&id)
                                && let Ok(pair) = c.lease_keep_alive(id).await
                            {
                                streams.insert(id, pair);
                            }
                            let Some((keeper, stream)) = streams.get_mut(&id) else {
                                continue;
                            };
                            let sent = keeper.keep_alive().await.is_ok()
                                && matches!(
                                    tokio::time::timeout(Duration::from_secs(2), stream.message())
                                        .await,
                                    Ok(Ok(Some(_)))
                                );
                            if !sent {
                                streams.remove(&id);
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        });
        LeaseKeeper {
            leases,
            stop,
            thread: Some(thread),
        }
    }

    /// Keeps `lease` alive from now on.
    pub fn keep(&self, lease: i64) {
        self.leases.lock().expect("lease set").insert(lease);
    }

    /// Stops keeping `lease` alive: it expires after its TTL.
    pub fn release(&self, lease: i64) {
        self.leases.lock().expect("lease set").remove(&lease);
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
