//! The config file as serde reads it: every table and key, unknown keys rejected, defaults
//! filled in. [`super::Config::from_raw`] validates it into the typed config.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) source: RawSource,
    #[serde(default)]
    pub(super) etcd: Option<RawEtcd>,
    #[serde(default)]
    pub(super) file: Option<RawFile>,
    #[serde(default)]
    pub(super) template: Vec<RawTemplate>,
    #[serde(default)]
    pub(super) haproxy: RawHaproxy,
    #[serde(default)]
    pub(super) wait: RawWait,
    #[serde(default)]
    pub(super) frontend: RawFrontend,
    #[serde(default)]
    pub(super) guard: RawGuard,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    #[serde(default)]
    pub(super) fleet: RawFleet,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    pub(super) kind: String,
    #[serde(default = "default_prefixes")]
    pub(super) prefixes: Vec<String>,
    #[serde(default = "default_resync")]
    pub(super) resync: String,
}

pub(super) fn default_prefixes() -> Vec<String> {
    vec!["/services/".into(), "/routes/".into()]
}
pub(super) fn default_resync() -> String {
    "5m".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEtcd {
    #[serde(default = "default_endpoints")]
    pub(super) endpoints: Vec<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) cert_file: Option<PathBuf>,
    pub(super) key_file: Option<PathBuf>,
    pub(super) username: Option<String>,
    pub(super) password_file: Option<PathBuf>,
    #[serde(default = "default_dial_timeout")]
    pub(super) dial_timeout: String,
}

/// An `[etcd]` table left out: every default.
impl Default for RawEtcd {
    fn default() -> Self {
        RawEtcd {
            endpoints: default_endpoints(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            dial_timeout: default_dial_timeout(),
        }
    }
}

// Written by hand so that a future secret field cannot leak through a derive.
impl fmt::Debug for RawEtcd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawEtcd")
            .field("endpoints", &self.endpoints)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

pub(super) fn default_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}
pub(super) fn default_dial_timeout() -> String {
    "5s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTemplate {
    pub(super) name: String,
    pub(super) src: PathBuf,
    pub(super) dest: PathBuf,
    #[serde(default = "default_mode")]
    pub(super) mode: String,
    pub(super) owner: Option<String>,
    pub(super) group: Option<String>,
    /// Default: true, but false for a map.
    pub(super) check: Option<bool>,
    #[serde(default)]
    pub(super) map: bool,
}

pub(super) fn default_mode() -> String {
    "0644".into()
}
pub(super) fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHaproxy {
    #[serde(default = "default_haproxy_mode")]
    pub(super) mode: String,
    #[serde(default = "default_binary")]
    pub(super) binary: String,
    #[serde(default = "default_master_socket")]
    pub(super) master_socket: PathBuf,
    #[serde(default = "default_runtime_socket")]
    pub(super) runtime_socket: PathBuf,
    #[serde(default = "default_state_file")]
    pub(super) state_file: PathBuf,
    #[serde(default = "default_true")]
    pub(super) runtime_updates: bool,
    #[serde(default)]
    pub(super) reload_cmd: Vec<String>,
    #[serde(default = "default_reload_timeout")]
    pub(super) reload_timeout: String,
    #[serde(default = "default_check_timeout")]
    pub(super) check_timeout: String,
    #[serde(default = "default_spare_slots")]
    pub(super) spare_slots: u32,
    #[serde(default)]
    pub(super) check_user: String,
}

impl Default for RawHaproxy {
    fn default() -> Self {
        RawHaproxy {
            mode: default_haproxy_mode(),
            binary: default_binary(),
            master_socket: default_master_socket(),
            runtime_socket: default_runtime_socket(),
            state_file: default_state_file(),
            runtime_updates: true,
            reload_cmd: Vec::new(),
            reload_timeout: default_reload_timeout(),
            check_timeout: default_check_timeout(),
            spare_slots: default_spare_slots(),
            check_user: String::new(),
        }
    }
}

pub(super) fn default_haproxy_mode() -> String {
    "supervise".into()
}
pub(super) fn default_binary() -> String {
    "haproxy".into()
}
pub(super) fn default_master_socket() -> PathBuf {
    "/run/haconfd/master.sock".into()
}
pub(super) fn default_runtime_socket() -> PathBuf {
    "/run/haconfd/admin.sock".into()
}
pub(super) fn default_state_file() -> PathBuf {
    "/run/haconfd/server-state".into()
}
pub(super) fn default_reload_timeout() -> String {
    "10s".into()
}
pub(super) fn default_check_timeout() -> String {
    "30s".into()
}
pub(super) fn default_spare_slots() -> u32 {
    4
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWait {
    #[serde(default = "default_wait_min")]
    pub(super) min: String,
    #[serde(default = "default_wait_max")]
    pub(super) max: String,
}

impl Default for RawWait {
    fn default() -> Self {
        RawWait {
            min: default_wait_min(),
            max: default_wait_max(),
        }
    }
}

pub(super) fn default_wait_min() -> String {
    "200ms".into()
}
pub(super) fn default_wait_max() -> String {
    "2s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFrontend {
    #[serde(default = "default_bind")]
    pub(super) bind: Vec<String>,
    #[serde(default)]
    pub(super) default_domain: String,
    #[serde(default = "default_monitor_uri")]
    pub(super) monitor_uri: String,
    #[serde(default = "default_lame_duck")]
    pub(super) lame_duck: String,
}

impl Default for RawFrontend {
    fn default() -> Self {
        RawFrontend {
            bind: default_bind(),
            default_domain: String::new(),
            monitor_uri: default_monitor_uri(),
            lame_duck: default_lame_duck(),
        }
    }
}

pub(super) fn default_lame_duck() -> String {
    "0s".into()
}

pub(super) fn default_bind() -> Vec<String> {
    vec!["0.0.0.0:80".into()]
}
pub(super) fn default_monitor_uri() -> String {
    "/_haconfd/health".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGuard {
    #[serde(default = "default_max_drop")]
    pub(super) max_drop_percent: u32,
    #[serde(default = "default_confirm_after")]
    pub(super) confirm_after: String,
}

impl Default for RawGuard {
    fn default() -> Self {
        RawGuard {
            max_drop_percent: default_max_drop(),
            confirm_after: default_confirm_after(),
        }
    }
}

pub(super) fn default_max_drop() -> u32 {
    50
}
pub(super) fn default_confirm_after() -> String {
    "10m".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    pub(super) listen: String,
    #[serde(default = "default_stale_after")]
    pub(super) stale_after: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin_listen(),
            stale_after: default_stale_after(),
        }
    }
}

pub(super) fn default_admin_listen() -> String {
    "127.0.0.1:9101".into()
}
pub(super) fn default_stale_after() -> String {
    "30s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    /// Empty: the host name.
    #[serde(default)]
    pub(super) node: String,
    /// Default: true with the etcd source, false with the file source.
    pub(super) publish: Option<bool>,
    #[serde(default = "default_fleet_prefix")]
    pub(super) prefix: String,
}

impl Default for RawFleet {
    fn default() -> Self {
        RawFleet {
            node: String::new(),
            publish: None,
            prefix: default_fleet_prefix(),
        }
    }
}

pub(super) fn default_fleet_prefix() -> String {
    "/haconfd/nodes/".into()
}
