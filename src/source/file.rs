//! The file source: a YAML, JSON or TOML file of nested maps, flattened to `/a/b/c` keys the way
//! confd's file backend does, and a watcher that reports when the file (or any other watched
//! file) changes.
//!
//! Files are watched through their parent directory and filtered by name: a watch on the file
//! itself goes silent after the first rename over it, and editors and deploy tools write by
//! renaming a temporary file. Where inotify is out of instances or watches (a host busy with
//! other watchers), the files are polled instead: a node still gets its load balancer.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use std::sync::Arc;

use super::{SourceError, Update};
use crate::config::FileConfig;
use crate::metrics::Metrics;
use crate::model::Snapshot;

/// Reads and flattens the registry file. The file may hold bytes that are not UTF-8: they become
/// U+FFFD, which the snapshot screen rejects by key, so one bad value never loses the others.
pub fn read(path: &Path) -> Result<Vec<(String, String)>, SourceError> {
    let bytes = std::fs::read(path).map_err(|e| SourceError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let err = |message: String| SourceError::File {
        path: path.to_owned(),
        message,
    };
    let tree: serde_json::Value = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(&text).map_err(|e| err(e.to_string()))?,
        Some("toml") => toml::from_str(&text).map_err(|e| err(e.to_string()))?,
        _ => {
            let y: serde_yaml::Value =
                serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))?;
            yaml_to_json(y).map_err(err)?
        }
    };
    let mut out = Vec::new();
    match tree {
        serde_json::Value::Object(_) => flatten("", &tree, &mut out),
        serde_json::Value::Null => {} // an empty file
        _ => return Err(err("the top level is not a map of keys".into())),
    }
    Ok(out)
}

fn yaml_to_json(y: serde_yaml::Value) -> Result<serde_json::Value, String> {
    use serde_yaml::Value as Y;
    Ok(match y {
        Y::Null => serde_json::Value::Null,
        Y::Bool(b) => b.into(),
        Y::Number(n) => serde_json::Value::String(n.to_string()),
        Y::String(s) => s.into(),
        Y::Sequence(seq) => seq
            .into_iter()
            .map(yaml_to_json)
            .collect::<Result<Vec<_>, _>>()?
            .into(),
        Y::Mapping(m) => {
            let mut obj = serde_json::Map::new();
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    _ => return Err("a map key is not a string, number or bool".into()),
                };
                obj.insert(key, yaml_to_json(v)?);
            }
            obj.into()
        }
        Y::Tagged(t) => yaml_to_json(t.value)?,
    })
}

/// Flattens nested maps to `/a/b/c` keys; list items get their index as a segment; scalars
/// become their text; null becomes the empty string (which the registry then rejects by key).
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value as J;
    match v {
        J::Object(m) => {
            for (k, child) in m {
                let seg = k.trim_matches('/');
                flatten(&format!("{prefix}/{seg}"), child, out);
            }
        }
        J::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                flatten(&format!("{prefix}/{i}"), child, out);
            }
        }
        J::String(s) => out.push((prefix.to_owned(), s.clone())),
        J::Null => out.push((prefix.to_owned(), String::new())),
        J::Bool(b) => out.push((prefix.to_owned(), b.to_string())),
        J::Number(n) => out.push((prefix.to_owned(), n.to_string())),
    }
}

/// How often a [`FileWatcher`] that cannot use inotify looks at its files.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Whether a polling watcher has warned yet: the fix is the same for every watcher, so the
/// warning is logged once per process.
static POLL_WARNED: AtomicBool = AtomicBool::new(false);

/// One read of the registry file, screened and stamped with `revision`.
pub(crate) fn read_update(
    f: &FileConfig,
    prefixes: &[String],
    revision: i64,
) -> Result<Update, SourceError> {
    Ok(Update::screen(revision, prefixes, read(&f.path)?))
}

/// The file source: reads the registry file, sends the first [`Update`], then watches it and
/// sends a new one whenever its data changes. A read that fails (a missing or half-written
/// file, a syntax error) is logged and the last good state stays; nothing is sent before the
/// first good read. The task ends when the receiver is dropped.
pub(crate) fn spawn_watch(
    f: &FileConfig,
    prefixes: &[String],
    tx: mpsc::Sender<Update>,
    metrics: Arc<Metrics>,
) -> Result<tokio::task::JoinHandle<()>, SourceError> {
    // Watch before the first read, so that a change between the two is not missed.
    let (watcher, mut changes) = FileWatcher::start(std::slice::from_ref(&f.path))?;
    if watcher.polling() {
        metrics.file_watch_polling.inc();
    }
    let (f, prefixes) = (f.clone(), prefixes.to_vec());
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        let mut revision = 0;
        let mut last: Option<Arc<Snapshot>> = None;
        loop {
            match read_update(&f, &prefixes, revision + 1) {
                Ok(update) if last.as_ref().is_some_and(|l| l.kv == update.snapshot.kv) => {
                    // Readable again with the same data: nothing to send, but current.
                    metrics.source_ok();
                }
                Ok(update) => {
                    revision += 1;
                    last = Some(Arc::clone(&update.snapshot));
                    if tx.send(update).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    metrics.source_down("registry file unreadable");
                    tracing::warn!(error = %e, "registry file unreadable; keeping the last good state")
                }
            }
            if changes.recv().await.is_none() {
                return;
            }
            // Drain what queued up behind this event: one read covers them all.
            while changes.try_recv().is_ok() {}
        }
    }))
}

/// Watches files through their parent directories (inotify), or, where inotify is out of
/// instances or watches, by looking at each file every [`POLL_INTERVAL`]. Dropping it stops
/// the watch.
pub struct FileWatcher {
    watch: Watch,
}

/// What the watch holds: dropping it ends the watch.
enum Watch {
    Notify(#[allow(dead_code)] notify::RecommendedWatcher),
    /// Dropping the sender ends the polling thread at once.
    Poll(#[allow(dead_code)] std::sync::mpsc::Sender<()>),
}

impl FileWatcher {
    /// Starts watching `files`; the path of every changed file is sent on the returned channel.
    /// Several events for one write arrive as several messages: the receiver coalesces.
    ///
    /// When inotify cannot be used because a limit is reached (the user's inotify instances,
    /// its watches, or open files), the files are polled instead: the watch still reports
    /// every change, up to [`POLL_INTERVAL`] late. [`FileWatcher::polling`] tells which.
    pub fn start(files: &[PathBuf]) -> Result<(FileWatcher, mpsc::Receiver<PathBuf>), SourceError> {
        let (tx, rx) = mpsc::channel(256);
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut wanted: Vec<(PathBuf, OsString, PathBuf)> = Vec::new();
        for f in files {
            let abs = std::path::absolute(f).map_err(|e| SourceError::File {
                path: f.clone(),
                message: e.to_string(),
            })?;
            let dir = abs
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| "/".into());
            let name = abs.file_name().map(OsString::from).unwrap_or_default();
            if !dirs.contains(&dir) {
                dirs.push(dir.clone());
            }
            wanted.push((dir, name, f.clone()));
        }
        match notify_watch(&dirs, wanted, tx.clone()) {
            Ok(w) => Ok((
                FileWatcher {
                    watch: Watch::Notify(w),
                },
                rx,
            )),
            Err(e) if e.limit => {
                let what = files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                if POLL_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::info!(files = %what, error = %e.message, "inotify unavailable; polling these files too");
                } else {
                    tracing::warn!(
                        files = %what,
                        error = %e.message,
                        interval = ?POLL_INTERVAL,
                        "cannot watch files with inotify: a limit is reached (the user's inotify instances or watches, or open files); polling them instead, so a change applies up to one interval late. Fix: raise the sysctls fs.inotify.max_user_instances and fs.inotify.max_user_watches (or the open-file limit) and restart haconfd"
                    );
                }
                Ok((
                    FileWatcher {
                        watch: Watch::Poll(spawn_poll(files.to_vec(), tx, POLL_INTERVAL)?),
                    },
                    rx,
                ))
            }
            Err(e) => Err(SourceError::Watch(e.message)),
        }
    }

    /// Whether this watch polls its files (inotify was out of instances or watches).
    pub fn polling(&self) -> bool {
        matches!(self.watch, Watch::Poll(_))
    }
}

/// Why inotify could not watch; `limit` when a per-user or per-process limit was reached,
/// which polling works around.
struct WatchFailure {
    message: String,
    limit: bool,
}

impl WatchFailure {
    fn new(e: &notify::Error, dir: Option<&Path>) -> WatchFailure {
        let limit = match &e.kind {
            notify::ErrorKind::MaxFilesWatch => true,
            notify::ErrorKind::Io(io) => matches!(
                io.raw_os_error().map(Errno::from_raw),
                Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOSPC)
            ),
            _ => false,
        };
        WatchFailure {
            message: match dir {
                Some(d) => format!("{}: {e}", d.display()),
                None => e.to_string(),
            },
            limit,
        }
    }
}

/// inotify on each parent directory, filtered by file name.
fn notify_watch(
    dirs: &[PathBuf],
    wanted: Vec<(PathBuf, OsString, PathBuf)>,
    tx: mpsc::Sender<PathBuf>,
) -> Result<notify::RecommendedWatcher, WatchFailure> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(event) = res else { return };
        if event.kind.is_access() {
            return;
        }
        for p in &event.paths {
            let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                continue;
            };
            for (wdir, wname, original) in &wanted {
                if wname == name && wdir == dir {
                    // A full channel already holds a pending change: dropping this is fine.
                    let _ = tx.try_send(original.clone());
                }
            }
        }
    })
    .map_err(|e| WatchFailure::new(&e, None))?;
    for d in dirs {
        watcher
            .watch(d, RecursiveMode::NonRecursive)
            .map_err(|e| WatchFailure::new(&e, Some(d)))?;
    }
    Ok(watcher)
}

/// What a poll compares: the file's identity, size and times, and a hash of its bytes (a
/// rewrite inside the timestamps' granularity that keeps the size changes only the bytes).
/// None while the file cannot be read.
type Fingerprint = Option<(u64, u64, u64, i64, i64, i64, i64, u64)>;

fn fingerprint(path: &Path) -> Fingerprint {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut file = std::fs::File::open(path).ok()?;
    let m = file.metadata().ok()?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        hasher.digest(),
    ))
}

/// Polls `files` every `every` on a thread of its own (reading them never holds up the
/// daemon's thread), sending the path of each file whose fingerprint changed. The files are
/// looked at by path: a file replaced by a rename, removed or created is seen like an edit.
/// The first fingerprints are taken before this returns, so that a change between the start
/// of the watch and the caller's first read is not missed. The thread ends when the returned
/// sender is dropped, or when the receiver of `tx` is.
fn spawn_poll(
    files: Vec<PathBuf>,
    tx: mpsc::Sender<PathBuf>,
    every: Duration,
) -> Result<std::sync::mpsc::Sender<()>, SourceError> {
    let mut last: Vec<Fingerprint> = files.iter().map(|f| fingerprint(f)).collect();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("file-poll".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every)
            {
                if tx.is_closed() {
                    return;
                }
                for (f, seen) in files.iter().zip(last.iter_mut()) {
                    let now = fingerprint(f);
                    if now != *seen {
                        *seen = now;
                        // A full channel already holds a pending change: dropping this is fine.
                        let _ = tx.try_send(f.clone());
                    }
                }
            }
        })
        .map_err(|e| SourceError::Watch(format!("cannot start the polling thread: {e}")))?;
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_str(name: &str, text: &[u8]) -> Result<Vec<(String, String)>, SourceError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        read(&p)
    }

    #[test]
    fn yaml_json_and_toml_flatten_alike() {
        let yaml = b"services:\n  web:\n    w1: 127.0.0.1:8080\n    w2: 8081\nlist: [a, b]\n";
        let json = br#"{"services":{"web":{"w1":"127.0.0.1:8080","w2":8081}},"list":["a","b"]}"#;
        let toml = b"list = [\"a\", \"b\"]\n[services.web]\nw1 = \"127.0.0.1:8080\"\nw2 = 8081\n";
        let want = vec![
            ("/list/0".to_owned(), "a".to_owned()),
            ("/list/1".to_owned(), "b".to_owned()),
            ("/services/web/w1".to_owned(), "127.0.0.1:8080".to_owned()),
            ("/services/web/w2".to_owned(), "8081".to_owned()),
        ];
        for (name, text) in [
            ("r.yaml", &yaml[..]),
            ("r.json", &json[..]),
            ("r.toml", &toml[..]),
        ] {
            let mut got = read_str(name, text).expect(name);
            got.sort();
            assert_eq!(got, want, "{name}");
        }
    }

    /// The next path the poller reports, within a bound that only caps a failing test.
    async fn next(rx: &mut mpsc::Receiver<PathBuf>, what: &str) -> PathBuf {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no change reported for {what}"))
            .expect("the poller ended")
    }

    /// The poller that stands in for inotify sees what deploy tools and editors do, however
    /// close together: a rename over the file, a rewrite in place that keeps its size (inside
    /// the timestamps' granularity only the bytes differ), a removal, and a file that appears
    /// only after the watch began.
    #[tokio::test]
    async fn polling_sees_renames_rewrites_removals_and_creations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("r.yaml");
        let absent = dir.path().join("later.yaml");
        std::fs::write(&p, "a: 1\n").expect("write");
        let (tx, mut rx) = mpsc::channel(16);
        let _stop = spawn_poll(
            vec![p.clone(), absent.clone()],
            tx,
            Duration::from_millis(20),
        )
        .expect("start polling");

        let tmp = dir.path().join("r.yaml.tmp");
        std::fs::write(&tmp, "a: 2\n").expect("write temp");
        std::fs::rename(&tmp, &p).expect("rename");
        assert_eq!(next(&mut rx, "the rename").await, p);

        std::fs::write(&p, "a: 3\n").expect("rewrite");
        assert_eq!(next(&mut rx, "the rewrite in place").await, p);

        std::fs::remove_file(&p).expect("remove");
        assert_eq!(next(&mut rx, "the removal").await, p);

        std::fs::write(&absent, "b: 1\n").expect("create");
        assert_eq!(next(&mut rx, "the creation").await, absent);

        // Nothing else changed: nothing more is reported.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "a change reported twice");
    }

    #[test]
    fn a_limit_reached_falls_back_and_other_failures_do_not() {
        let io = |errno: Errno| notify::Error::io(std::io::Error::from_raw_os_error(errno as i32));
        assert!(WatchFailure::new(&io(Errno::EMFILE), None).limit);
        assert!(WatchFailure::new(&io(Errno::ENOSPC), None).limit);
        assert!(
            WatchFailure::new(&notify::Error::new(notify::ErrorKind::MaxFilesWatch), None).limit
        );
        let denied = WatchFailure::new(&io(Errno::EACCES), Some(Path::new("/etc/haconfd")));
        assert!(!denied.limit);
        assert!(
            denied.message.contains("/etc/haconfd"),
            "{}",
            denied.message
        );
    }

    #[test]
    fn syntax_error_names_the_file() {
        let e = read_str("r.yaml", b"a: [unclosed\n").expect_err("bad yaml");
        assert!(e.to_string().contains("r.yaml"), "{e}");
    }

    #[test]
    fn non_utf8_value_survives_as_replacement_char() {
        let got = read_str("r.yaml", b"a: \"ok\"\nb: \"\xff\xfe\"\n").expect("lossy read");
        assert!(got.iter().any(|(k, v)| k == "/b" && v.contains('\u{fffd}')));
        assert!(got.iter().any(|(k, v)| k == "/a" && v == "ok"));
    }
}
