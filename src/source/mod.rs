//! Sources of key-value data: the file source (`file`) and etcd (`etcd`). A source delivers whole,
//! screened snapshots; the reactor never sees a partial state.

pub mod etcd;
pub mod file;

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::config::{Config, SourceKind};
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
        SourceKind::File(f) => file::read_update(f, &config.source.prefixes, revision),
        SourceKind::Etcd(e) => etcd::read_once(e, &config.source.prefixes).await,
    }
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
    file::spawn_watch(f, &config.source.prefixes, tx, metrics)
}
