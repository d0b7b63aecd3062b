//! One apply: an [`Update`] in, files installed and HAProxy told, or the last good state kept.
//!
//! parse the registry → render every template → install each (skip unchanged bytes; stage,
//! prove, rename) → reload once when anything changed. When a later step fails, every file this
//! apply installed is put back, so the set of files on disk stays one consistent generation.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::config::Config;
use crate::haproxy::install::{self, Check, InstallError, Outcome};
use crate::haproxy::{ApplyKind, Controller, ReloadError, StateSave};
use crate::metrics::Metrics;
use crate::model::{Registry, Rejection};
use crate::render::{RenderError, Rendered, Templates};
use crate::source::Update;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("template {template:?}: {source}")]
    Install {
        template: String,
        #[source]
        source: InstallError,
    },
    #[error("reload failed, previous files restored: {0}")]
    Reload(#[from] ReloadError),
}

/// What an apply did.
#[derive(Debug, Clone)]
pub struct Report {
    pub kind: ApplyKind,
    pub revision: i64,
    /// Short hash of the rendered bytes of all templates.
    pub hash: String,
    pub changed: Vec<String>,
    pub duration: Duration,
}

/// Logs rejected keys, by key only, and counts them.
pub fn report_rejections(rejected: &[Rejection], metrics: &Metrics) {
    for r in rejected {
        tracing::warn!(key = %r.key, reason = %r.reason, "key left out");
    }
    metrics.set_rejected(rejected.len() as u64);
}

/// Parses and renders an update: the pure half of an apply.
pub fn render(
    templates: &mut Templates,
    update: &Update,
    metrics: &Metrics,
) -> Result<Vec<Rendered>, RenderError> {
    let (registry, mut rejected) = Registry::parse(&update.snapshot);
    rejected.extend(update.rejected.iter().cloned());
    rejected.sort_by(|a, b| a.key.cmp(&b.key));
    report_rejections(&rejected, metrics);
    templates.render_all(&update.snapshot, &registry)
}

/// A short, stable hash of rendered output, for logs and metrics.
pub fn hash(rendered: &[Rendered]) -> String {
    let mut h = Sha256::new();
    for r in rendered {
        h.update(r.template.name.as_bytes());
        h.update([0]);
        h.update(&r.bytes);
    }
    let mut out = String::with_capacity(12);
    for b in &h.finalize()[..6] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Owns the templates and the HAProxy controller across applies.
pub struct Applier {
    pub config: Config,
    pub templates: Templates,
    pub controller: Controller,
    pub metrics: Arc<Metrics>,
}

impl Applier {
    pub fn new(config: Config, templates: Templates, metrics: Arc<Metrics>) -> Applier {
        let controller = Controller::new(&config);
        Applier {
            config,
            templates,
            controller,
            metrics,
        }
    }

    fn check(&self) -> Check {
        Check {
            binary: self.config.haproxy.binary.clone(),
            timeout: self.config.haproxy.check_timeout,
        }
    }

    /// Renders, installs and reloads. On error the files on disk are those of before.
    pub async fn apply(&mut self, update: &Update) -> Result<Report, ApplyError> {
        let started = Instant::now();
        let rendered = render(&mut self.templates, update, &self.metrics).inspect_err(|_| {
            self.metrics.render_failures.inc();
        })?;
        let hash = hash(&rendered);
        let check = self.check();
        let mut installed: Vec<(usize, Option<Vec<u8>>)> = Vec::new();
        for (i, r) in rendered.iter().enumerate() {
            let outcome =
                install::install(&r.template, &r.bytes, r.template.check.then_some(&check))
                    .await
                    .map_err(|source| ApplyError::Install {
                        template: r.template.name.clone(),
                        source,
                    });
            match outcome {
                Ok(Outcome::Unchanged) => {}
                Ok(Outcome::Installed { previous }) => installed.push((i, previous)),
                Err(e) => {
                    if matches!(
                        e,
                        ApplyError::Install {
                            source: InstallError::Invalid(_),
                            ..
                        }
                    ) {
                        self.metrics.check_failures.inc();
                    }
                    restore(&rendered, &installed);
                    return Err(e);
                }
            }
        }
        let changed: Vec<String> = installed
            .iter()
            .map(|(i, _)| rendered[*i].template.name.clone())
            .collect();
        let kind = if installed.is_empty() && !self.controller.needs_start() {
            ApplyKind::None
        } else {
            let state = StateSave {
                runtime_socket: self.config.haproxy.runtime_socket.clone(),
                state_file: self.config.haproxy.state_file.clone(),
            };
            match self.controller.reload(Some(&state)).await {
                Ok(kind) => kind,
                Err(e) => {
                    self.metrics.reload_failures.inc();
                    restore(&rendered, &installed);
                    return Err(e.into());
                }
            }
        };
        self.metrics.applied(kind, update.snapshot.revision);
        Ok(Report {
            kind,
            revision: update.snapshot.revision,
            hash,
            changed,
            duration: started.elapsed(),
        })
    }

    /// Reloads the config file and templates (SIGHUP, or a template file changed). A config or
    /// template that does not load is reported and the current ones stay.
    pub fn reconfigure(&mut self, path: Option<&std::path::Path>) {
        let config = match path {
            Some(p) => Config::load(p),
            None => Ok(self.config.clone()),
        };
        let config = match config {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "new config rejected; keeping the current one");
                return;
            }
        };
        match Templates::load(&config) {
            Ok(t) => {
                if config.haproxy.mode != self.config.haproxy.mode
                    || config.haproxy.master_socket != self.config.haproxy.master_socket
                {
                    tracing::warn!("[haproxy] mode and sockets change only on restart");
                }
                self.templates = t;
                self.config = config;
                tracing::info!("config and templates reloaded");
            }
            Err(e) => tracing::error!(error = %e, "templates rejected; keeping the current ones"),
        }
    }
}

/// Puts back the files an apply installed, newest first.
fn restore(rendered: &[Rendered], installed: &[(usize, Option<Vec<u8>>)]) {
    for (i, previous) in installed.iter().rev() {
        let t = &rendered[*i].template;
        if let Err(e) = install::restore(t, previous.as_deref()) {
            tracing::error!(template = %t.name, error = %e, "cannot restore the previous file");
        }
    }
}
