//! Sources of key-value data: the file source today, etcd next. A source delivers whole,
//! screened snapshots; the reactor never sees a partial state.

pub mod file;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::{Config, SourceKind};
use crate::model::{Rejection, Snapshot};

/// A failure to read a source. Runtime failures are logged and survived by `run`.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("registry file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("cannot watch files: {0}")]
    Watch(String),
    #[error("the etcd source is not built yet: use source.kind = \"file\"")]
    EtcdUnavailable,
}

/// One complete read of a source.
#[derive(Debug, Clone)]
pub struct Update {
    pub snapshot: Arc<Snapshot>,
    /// Pairs the screen left out, by key.
    pub rejected: Vec<Rejection>,
}

/// Reads the configured source once. `revision` is the revision to stamp on a file read.
pub fn read_once(config: &Config, revision: i64) -> Result<Update, SourceError> {
    match &config.source.kind {
        SourceKind::File(f) => {
            let pairs = file::read(&f.path)?;
            let (snapshot, rejected) = Snapshot::screen(revision, &config.source.prefixes, pairs);
            Ok(Update {
                snapshot: Arc::new(snapshot),
                rejected,
            })
        }
        SourceKind::Etcd(_) => Err(SourceError::EtcdUnavailable),
    }
}

/// Reads the configured source, sends the first [`Update`], then watches it and sends a new one
/// whenever its data changes. A read that fails (a missing or half-written file, a syntax error)
/// is logged and the last good state stays; nothing is sent before the first good read. The
/// task ends when the receiver is dropped.
pub fn spawn_watch(
    config: &Config,
    tx: mpsc::Sender<Update>,
) -> Result<tokio::task::JoinHandle<()>, SourceError> {
    let SourceKind::File(f) = &config.source.kind else {
        return Err(SourceError::EtcdUnavailable);
    };
    // Watch before the first read, so that a change between the two is not missed.
    let (watcher, mut changes) = file::FileWatcher::start(std::slice::from_ref(&f.path))?;
    let config = config.clone();
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        let mut revision = 0;
        let mut last: Option<Arc<Snapshot>> = None;
        loop {
            match read_once(&config, revision + 1) {
                Ok(update) if last.as_ref().is_some_and(|l| l.kv == update.snapshot.kv) => {}
                Ok(update) => {
                    revision += 1;
                    last = Some(Arc::clone(&update.snapshot));
                    if tx.send(update).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
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
