//! Forensics: the registry's past, from the history etcd keeps until it compacts.
//!
//! - `clock`: when a revision happened, from the fleet view's published applies ([`Clock`]).
//! - `explain`: which keys every rendered line came from, and why the others are left out.
//! - `history`: a service's instances appearing, changing and leaving, revision by revision.
//!
//! In: the config's `[etcd]`, `[source] prefixes` and `[fleet] prefix`, and etcd's history
//! (`crate::etcd::history`). Out: text or JSON for the operator; nothing is written anywhere.
//! `render --revision`, `--diff --from` and `--explain` are `commands::render`'s, which reads
//! the past through `source::etcd::read_at` and renders it exactly as a live render would.

use crate::config::{Config, EtcdConfig, SourceKind};
use crate::etcd::{Client, Members, connect_options};
use crate::failure::Failure;

pub mod clock;
pub mod explain;
pub mod history;
pub mod past;

pub use clock::{Clock, Record};

/// A connection for the forensic commands, with the settings it was made with.
pub struct Etcd {
    pub client: Client,
    pub config: EtcdConfig,
}

/// The config's etcd settings; `what` names the command in the error a file source gets
/// (exit 64: the file source keeps no history).
pub fn etcd_config<'a>(config: &'a Config, what: &str) -> Result<&'a EtcdConfig, Failure> {
    match &config.source.kind {
        SourceKind::Etcd(etcd) => Ok(etcd),
        SourceKind::File(_) => Err(Failure::Usage(format!(
            "{what} reads etcd's history, and the file source keeps none (fix: use a config whose [source] kind = \"etcd\")"
        ))),
    }
}

impl Etcd {
    /// Connects to the config's etcd (see [`etcd_config`]).
    pub async fn connect(config: &Config, what: &str) -> Result<Etcd, Failure> {
        Etcd::connect_to(etcd_config(config, what)?).await
    }

    /// Connects to the etcd `etcd` describes (a config's `[etcd]` with `--etcd` applied).
    pub async fn connect_to(etcd: &EtcdConfig) -> Result<Etcd, Failure> {
        let (client, _) = Members::default()
            .connect(etcd, connect_options)
            .await
            .map_err(|f| {
                Failure::Runtime(anyhow::anyhow!("etcd: {f} ({})", etcd.endpoints.join(", ")))
            })?;
        Ok(Etcd {
            client,
            config: etcd.clone(),
        })
    }

    /// etcd's current revision.
    pub async fn now(&self) -> Result<i64, Failure> {
        crate::etcd::history::current_revision(&self.client, self.user())
            .await
            .map_err(|f| Failure::Runtime(anyhow::anyhow!("etcd: {f}")))
    }

    /// The user the connection authenticates as, for error messages.
    pub fn user(&self) -> Option<&str> {
        self.config.username.as_deref()
    }

    /// The fleet's clock over revisions `from..=to`. A failure to read it is a warning and an
    /// empty clock: times are "where known".
    pub async fn clock(&self, fleet_prefix: &str, from: i64, to: i64) -> Clock {
        match Clock::read(&self.client, fleet_prefix, from, to, self.user()).await {
            Ok(clock) => clock,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the fleet's published applies: times are unknown");
                Clock::default()
            }
        }
    }
}
