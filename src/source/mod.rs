//! Sources of key-value data: the file source today, etcd next. A source delivers whole,
//! screened snapshots; the reactor never sees a partial state.

pub mod etcd;
pub mod file;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::{Config, FileConfig, SourceKind};
use crate::metrics::Metrics;
use crate::model::{Rejection, Snapshot};

/// A failure to read a source. Runtime failures are logged and survived by `run`.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("registry file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("cannot watch files: {0}")]
    Watch(String),
    #[error("etcd: {0}")]
    Etcd(String),
}

/// One complete read of a source.
#[derive(Debug, Clone)]
pub struct Update {
    pub snapshot: Arc<Snapshot>,
    /// Pairs the screen left out, by key.
    pub rejected: Vec<Rejection>,
}

impl Update {
    /// Screens raw pairs read at `revision` into an update.
    pub fn screen<I, K, V>(revision: i64, prefixes: &[String], raw: I) -> Update
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let (snapshot, rejected) = Snapshot::screen(revision, prefixes, raw);
        Update {
            snapshot: Arc::new(snapshot),
            rejected,
        }
    }
}

/// Reads the configured source once: one consistent read of every prefix. `revision` is the
/// revision stamped on a file read; etcd reads carry etcd's.
pub async fn read_once(config: &Config, revision: i64) -> Result<Update, SourceError> {
    match &config.source.kind {
        SourceKind::File(f) => read_file(f, &config.source.prefixes, revision),
        SourceKind::Etcd(e) => etcd::read_once(e, &config.source.prefixes).await,
    }
}

fn read_file(f: &FileConfig, prefixes: &[String], revision: i64) -> Result<Update, SourceError> {
    Ok(Update::screen(revision, prefixes, file::read(&f.path)?))
}

/// Reads the configured source, sends the first [`Update`], then watches it and sends a new one
/// whenever its data changes. A read that fails (a missing or half-written file, a syntax error)
/// is logged and the last good state stays; nothing is sent before the first good read. The
/// task ends when the receiver is dropped.
pub fn spawn_watch(
    config: &Config,
    tx: mpsc::Sender<Update>,
    metrics: Arc<Metrics>,
) -> Result<tokio::task::JoinHandle<()>, SourceError> {
    let f = match &config.source.kind {
        SourceKind::File(f) => f,
        SourceKind::Etcd(_) => return Ok(etcd::spawn_watch(config, tx, metrics)),
    };
    // Watch before the first read, so that a change between the two is not missed.
    let (watcher, mut changes) = file::FileWatcher::start(std::slice::from_ref(&f.path))?;
    if watcher.polling() {
        metrics.file_watch_polling.inc();
    }
    let (f, prefixes) = (f.clone(), config.source.prefixes.clone());
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        let mut revision = 0;
        let mut last: Option<Arc<Snapshot>> = None;
        loop {
            match read_file(&f, &prefixes, revision + 1) {
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
