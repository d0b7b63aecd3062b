//! The config file: TOML in, a validated [`Config`] out.
//!
//! Parsing happens in two steps: serde reads the file into `Raw*` structs that reject unknown
//! keys, then [`Config::from_raw`] checks every value and converts it into typed settings. Every
//! error names the key, the bad value and the fix, and maps to exit code 64.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::is_instance_id;

/// The config used when neither `--config` nor `HACONFD_CONFIG` is given and the default path
/// does not exist: the file source over `examples/registry.yaml`, HAProxy on loopback ports.
pub const EMBEDDED_DEFAULT: &str = include_str!("../examples/haconfd.toml");

/// The default config path.
pub const DEFAULT_PATH: &str = "/etc/haconfd/haconfd.toml";

/// A config that cannot be used. Displays as `key = value: problem (fix: …)`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {origin} is not valid TOML for haconfd: {message}")]
    Syntax { origin: String, message: String },
    #[error("config key `{key}` = {value}: {problem} (fix: {fix})")]
    Invalid {
        key: String,
        value: String,
        problem: String,
        fix: String,
    },
}

fn invalid(
    key: impl Into<String>,
    value: impl fmt::Debug,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: format!("{value:?}"),
        problem: problem.into(),
        fix: fix.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// The raw file, as serde reads it.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: RawSource,
    #[serde(default)]
    etcd: Option<RawEtcd>,
    #[serde(default)]
    file: Option<RawFile>,
    #[serde(default)]
    template: Vec<RawTemplate>,
    #[serde(default)]
    haproxy: RawHaproxy,
    #[serde(default)]
    wait: RawWait,
    #[serde(default)]
    frontend: RawFrontend,
    #[serde(default)]
    guard: RawGuard,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    fleet: RawFleet,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    kind: String,
    #[serde(default = "default_prefixes")]
    prefixes: Vec<String>,
    #[serde(default = "default_resync")]
    resync: String,
}

fn default_prefixes() -> Vec<String> {
    vec!["/services/".into(), "/routes/".into()]
}
fn default_resync() -> String {
    "5m".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    #[serde(default = "default_endpoints")]
    endpoints: Vec<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    username: Option<String>,
    password_file: Option<PathBuf>,
    #[serde(default = "default_dial_timeout")]
    dial_timeout: String,
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

fn default_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".into()]
}
fn default_dial_timeout() -> String {
    "5s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    name: String,
    src: PathBuf,
    dest: PathBuf,
    #[serde(default = "default_mode")]
    mode: String,
    owner: Option<String>,
    group: Option<String>,
    /// Default: true, but false for a map.
    check: Option<bool>,
    #[serde(default)]
    map: bool,
}

fn default_mode() -> String {
    "0644".into()
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHaproxy {
    #[serde(default = "default_haproxy_mode")]
    mode: String,
    #[serde(default = "default_binary")]
    binary: String,
    #[serde(default = "default_master_socket")]
    master_socket: PathBuf,
    #[serde(default = "default_runtime_socket")]
    runtime_socket: PathBuf,
    #[serde(default = "default_state_file")]
    state_file: PathBuf,
    #[serde(default = "default_true")]
    runtime_updates: bool,
    #[serde(default)]
    reload_cmd: Vec<String>,
    #[serde(default = "default_reload_timeout")]
    reload_timeout: String,
    #[serde(default = "default_check_timeout")]
    check_timeout: String,
    #[serde(default = "default_spare_slots")]
    spare_slots: u32,
    #[serde(default)]
    check_user: String,
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

fn default_haproxy_mode() -> String {
    "supervise".into()
}
fn default_binary() -> String {
    "haproxy".into()
}
fn default_master_socket() -> PathBuf {
    "/run/haconfd/master.sock".into()
}
fn default_runtime_socket() -> PathBuf {
    "/run/haconfd/admin.sock".into()
}
fn default_state_file() -> PathBuf {
    "/run/haconfd/server-state".into()
}
fn default_reload_timeout() -> String {
    "10s".into()
}
fn default_check_timeout() -> String {
    "30s".into()
}
fn default_spare_slots() -> u32 {
    4
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWait {
    #[serde(default = "default_wait_min")]
    min: String,
    #[serde(default = "default_wait_max")]
    max: String,
}

impl Default for RawWait {
    fn default() -> Self {
        RawWait {
            min: default_wait_min(),
            max: default_wait_max(),
        }
    }
}

fn default_wait_min() -> String {
    "200ms".into()
}
fn default_wait_max() -> String {
    "2s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFrontend {
    #[serde(default = "default_bind")]
    bind: Vec<String>,
    #[serde(default)]
    default_domain: String,
    #[serde(default = "default_monitor_uri")]
    monitor_uri: String,
    #[serde(default = "default_lame_duck")]
    lame_duck: String,
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

fn default_lame_duck() -> String {
    "0s".into()
}

fn default_bind() -> Vec<String> {
    vec!["0.0.0.0:80".into()]
}
fn default_monitor_uri() -> String {
    "/_haconfd/health".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuard {
    #[serde(default = "default_max_drop")]
    max_drop_percent: u32,
    #[serde(default = "default_confirm_after")]
    confirm_after: String,
}

impl Default for RawGuard {
    fn default() -> Self {
        RawGuard {
            max_drop_percent: default_max_drop(),
            confirm_after: default_confirm_after(),
        }
    }
}

fn default_max_drop() -> u32 {
    50
}
fn default_confirm_after() -> String {
    "10m".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    listen: String,
    #[serde(default = "default_stale_after")]
    stale_after: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin_listen(),
            stale_after: default_stale_after(),
        }
    }
}

fn default_admin_listen() -> String {
    "127.0.0.1:9101".into()
}
fn default_stale_after() -> String {
    "30s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    /// Empty: the host name.
    #[serde(default)]
    node: String,
    /// Default: true with the etcd source, false with the file source.
    publish: Option<bool>,
    #[serde(default = "default_fleet_prefix")]
    prefix: String,
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

fn default_fleet_prefix() -> String {
    "/haconfd/nodes/".into()
}

/// The shortest `admin.stale_after`: the etcd source hears from etcd about once a second, so a
/// shorter threshold would flip readiness on ordinary jitter.
pub const MIN_STALE_AFTER: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// The validated config.
// ---------------------------------------------------------------------------------------------

/// A validated config: every value has been checked and converted.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from: a path, or `embedded default`.
    pub origin: String,
    pub source: SourceConfig,
    pub templates: Vec<TemplateConfig>,
    pub haproxy: HaproxyConfig,
    pub wait: WaitConfig,
    pub frontend: FrontendConfig,
    pub guard: GuardConfig,
    pub admin: AdminConfig,
    pub fleet: FleetConfig,
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub kind: SourceKind,
    /// Key prefixes that the source reads; keys outside them are ignored.
    pub prefixes: Vec<String>,
    pub resync: Duration,
}

#[derive(Debug, Clone)]
pub enum SourceKind {
    Etcd(EtcdConfig),
    File(FileConfig),
}

#[derive(Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    /// The password is read from this file when the source connects; it is never held in the
    /// config and never logged.
    pub password_file: Option<PathBuf>,
    pub dial_timeout: Duration,
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("username", &self.username)
            .field(
                "password_file",
                &self.password_file.as_ref().map(|_| "<redacted>"),
            )
            .field("dial_timeout", &self.dial_timeout)
            .finish()
    }
}

/// The defaults of an `[etcd]` table left out (what `announce` and `fleet` use with a config
/// whose source is the file).
impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: default_endpoints(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            dial_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FileConfig {
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct TemplateConfig {
    pub name: String,
    pub src: PathBuf,
    pub dest: PathBuf,
    pub mode: u32,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub check: bool,
    /// An HAProxy map file that the HAProxy template loads (`map(<dest>)`): when only maps
    /// and server lines change, the maps are replaced through the Runtime API (`prepare map`,
    /// `add map`, `commit map`) without a reload.
    pub map: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaproxyMode {
    Supervise,
    Master,
    Command,
    None,
}

#[derive(Debug, Clone)]
pub struct HaproxyConfig {
    pub mode: HaproxyMode,
    pub binary: String,
    pub master_socket: PathBuf,
    pub runtime_socket: PathBuf,
    pub state_file: PathBuf,
    pub runtime_updates: bool,
    pub reload_cmd: Vec<String>,
    pub reload_timeout: Duration,
    pub check_timeout: Duration,
    pub spare_slots: u32,
    /// Run `haproxy -c` as this user when haconfd runs as root; None: as haconfd.
    pub check_user: Option<String>,
}

#[derive(Debug, Clone, Copy)]
pub struct WaitConfig {
    pub min: Duration,
    pub max: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct FrontendConfig {
    pub bind: Vec<String>,
    pub default_domain: String,
    pub monitor_uri: String,
    /// How long the monitor URI fails before HAProxy's soft stop, on the first SIGTERM or
    /// SIGINT (supervise mode). Not a template value: the template only holds the switch.
    #[serde(skip)]
    pub lame_duck: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct GuardConfig {
    pub max_drop_percent: u32,
    pub confirm_after: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// `/readyz` turns not ready once the source has not confirmed its state for this long.
    pub stale_after: Duration,
}

/// `[fleet]`: what this node publishes for `haconfd fleet`, and where. Read once at start.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The node's name in the fleet view (its key is `<prefix><node>`).
    pub node: String,
    /// Whether `run` publishes this node's state (only ever true with the etcd source).
    pub publish: bool,
    /// Where every node's key lives; it starts and ends with '/' and lies outside the watched
    /// prefixes, so that publishing never feeds back into the registry.
    pub prefix: String,
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text, &path.display().to_string())?;
        config.check_files()?;
        Ok(config)
    }

    /// Checks that the files the config names for later (etcd's TLS files and password) can
    /// be read now: a missing one is a bad config (exit 64), not an etcd outage to retry.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        let SourceKind::Etcd(e) = &self.source.kind else {
            return Ok(());
        };
        let files = [
            (
                "etcd.ca_file",
                &e.ca_file,
                "the CA certificate (PEM) that signed etcd's",
            ),
            (
                "etcd.cert_file",
                &e.cert_file,
                "the client certificate (PEM)",
            ),
            (
                "etcd.key_file",
                &e.key_file,
                "the client certificate's key (PEM)",
            ),
            (
                "etcd.password_file",
                &e.password_file,
                "a file that holds the password",
            ),
        ];
        for (key, path, what) in files {
            let Some(path) = path else { continue };
            if let Err(err) = std::fs::File::open(path) {
                return Err(invalid(
                    key,
                    path.display().to_string(),
                    format!("cannot be read: {err}"),
                    format!("point {key} at {what}, readable by this user, or remove it"),
                ));
            }
        }
        Ok(())
    }

    /// The embedded default config.
    pub fn embedded_default() -> Result<Config, ConfigError> {
        Config::parse(EMBEDDED_DEFAULT, "embedded default")
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Config::from_raw(raw, origin)
    }

    fn from_raw(raw: RawConfig, origin: &str) -> Result<Config, ConfigError> {
        let source = validate_source(raw.source, raw.etcd, raw.file)?;
        let fleet = validate_fleet(raw.fleet, &source)?;
        let templates = validate_templates(raw.template)?;
        let haproxy = validate_haproxy(raw.haproxy)?;
        let wait = WaitConfig {
            min: duration("wait.min", &raw.wait.min)?,
            max: duration("wait.max", &raw.wait.max)?,
        };
        if wait.min > wait.max {
            return Err(invalid(
                "wait.min",
                &raw.wait.min,
                format!("is longer than wait.max ({:?})", raw.wait.max),
                "make wait.min at most wait.max",
            ));
        }
        let frontend = validate_frontend(raw.frontend)?;
        if raw.guard.max_drop_percent > 100 {
            return Err(invalid(
                "guard.max_drop_percent",
                raw.guard.max_drop_percent,
                "is a percentage above 100",
                "use a number from 0 to 100",
            ));
        }
        let guard = GuardConfig {
            max_drop_percent: raw.guard.max_drop_percent,
            confirm_after: duration("guard.confirm_after", &raw.guard.confirm_after)?,
        };
        let listen = raw.admin.listen.parse().map_err(|_| {
            invalid(
                "admin.listen",
                &raw.admin.listen,
                "is not an IP:PORT address",
                "write it like \"127.0.0.1:9101\"",
            )
        })?;
        let stale_after = duration("admin.stale_after", &raw.admin.stale_after)?;
        if stale_after < MIN_STALE_AFTER {
            return Err(invalid(
                "admin.stale_after",
                &raw.admin.stale_after,
                "is shorter than 2s: the etcd source confirms its state about once a second, so /readyz would flicker",
                "use 2s or more, like \"30s\"",
            ));
        }
        if matches!(haproxy.mode, HaproxyMode::Supervise | HaproxyMode::Master)
            && !templates.iter().any(|t| t.check)
        {
            return Err(invalid(
                "haproxy.mode",
                format!("{:?}", haproxy.mode).to_lowercase(),
                "drives HAProxy, but no [[template]] has check = true to say which file HAProxy loads",
                "set check = true on the haproxy.cfg template, or use haproxy.mode = \"command\" or \"none\"",
            ));
        }
        Ok(Config {
            origin: origin.to_owned(),
            source,
            templates,
            haproxy,
            wait,
            frontend,
            guard,
            admin: AdminConfig {
                listen,
                stale_after,
            },
            fleet,
        })
    }

    /// The template HAProxy loads: the first one proven with `haproxy -c`.
    pub fn haproxy_template(&self) -> Option<&TemplateConfig> {
        self.templates.iter().find(|t| t.check)
    }

    /// Looks up a template by name.
    pub fn template(&self, name: &str) -> Option<&TemplateConfig> {
        self.templates.iter().find(|t| t.name == name)
    }
}

/// Parses a human duration such as `200ms`, `2s` or `5m`.
fn duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value).map_err(|e| {
        invalid(
            key,
            value,
            format!("is not a duration ({e})"),
            "write a number with a unit, like \"200ms\", \"2s\" or \"5m\"",
        )
    })
}

/// A duration that must not be zero (a zero resync would re-read etcd in a loop).
fn positive(key: &str, value: &str) -> Result<Duration, ConfigError> {
    let d = duration(key, value)?;
    if d.is_zero() {
        return Err(invalid(
            key,
            value,
            "is zero",
            "use a positive duration, like \"5m\" or \"5s\"",
        ));
    }
    Ok(d)
}

fn validate_source(
    raw: RawSource,
    etcd: Option<RawEtcd>,
    file: Option<RawFile>,
) -> Result<SourceConfig, ConfigError> {
    if raw.prefixes.is_empty() {
        return Err(invalid(
            "source.prefixes",
            &raw.prefixes,
            "is empty, so nothing would be read",
            "list at least one prefix, like [\"/services/\", \"/routes/\"]",
        ));
    }
    for (i, p) in raw.prefixes.iter().enumerate() {
        if !p.starts_with('/') || p.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid(
                format!("source.prefixes[{i}]"),
                p,
                "is not a key prefix",
                "start it with '/' and use no spaces or control characters, like \"/services/\"",
            ));
        }
    }
    let kind = match raw.kind.as_str() {
        "etcd" => {
            if file.is_some() {
                return Err(invalid(
                    "file",
                    "[file]",
                    "is set while source.kind is \"etcd\"",
                    "remove the [file] table or set source.kind = \"file\"",
                ));
            }
            SourceKind::Etcd(validate_etcd(etcd.unwrap_or_else(|| RawEtcd {
                endpoints: default_endpoints(),
                ca_file: None,
                cert_file: None,
                key_file: None,
                username: None,
                password_file: None,
                dial_timeout: default_dial_timeout(),
            }))?)
        }
        "file" => {
            if etcd.is_some() {
                return Err(invalid(
                    "etcd",
                    "[etcd]",
                    "is set while source.kind is \"file\"",
                    "remove the [etcd] table or set source.kind = \"etcd\"",
                ));
            }
            let Some(file) = file else {
                return Err(invalid(
                    "file.path",
                    "(missing)",
                    "source.kind is \"file\" but no [file] table names the file",
                    "add [file] with path = \"/etc/haconfd/registry.yaml\"",
                ));
            };
            let ext = file.path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "yaml" | "yml" | "json" | "toml") {
                return Err(invalid(
                    "file.path",
                    file.path.display().to_string(),
                    "has no .yaml, .yml, .json or .toml extension, which selects the format",
                    "rename the file with one of those extensions",
                ));
            }
            SourceKind::File(FileConfig { path: file.path })
        }
        other => {
            return Err(invalid(
                "source.kind",
                other,
                "is not a known source",
                "use \"etcd\" or \"file\"",
            ));
        }
    };
    Ok(SourceConfig {
        kind,
        prefixes: raw.prefixes,
        resync: positive("source.resync", &raw.resync)?,
    })
}

/// This host's name (the kernel's, else /etc/hostname): the default of `[fleet] node` and of
/// announce's instance ids. None when neither can be read.
pub fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .into_iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| text.trim().to_owned())
        .find(|name| !name.is_empty())
}

fn validate_fleet(raw: RawFleet, source: &SourceConfig) -> Result<FleetConfig, ConfigError> {
    let etcd = matches!(source.kind, SourceKind::Etcd(_));
    if raw.publish == Some(true) && !etcd {
        return Err(invalid(
            "fleet.publish",
            true,
            "needs the etcd source: the fleet view lives in etcd, and source.kind is \"file\"",
            "remove fleet.publish (it defaults to false with the file source), or set source.kind = \"etcd\"",
        ));
    }
    let publish = raw.publish.unwrap_or(etcd);
    let p = &raw.prefix;
    if !p.starts_with('/')
        || !p.ends_with('/')
        || p.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(invalid(
            "fleet.prefix",
            p,
            "is not a key prefix that starts and ends with '/'",
            "write it like \"/haconfd/nodes/\"",
        ));
    }
    // A node key under a watched prefix would be read as registry data, and every publish
    // would be a change to apply, which publishes again.
    if let Some(w) = source
        .prefixes
        .iter()
        .find(|w| w.starts_with(p.as_str()) || p.starts_with(w.as_str()))
    {
        return Err(invalid(
            "fleet.prefix",
            p,
            format!(
                "overlaps the watched prefix {w:?} (source.prefixes): node keys would feed back into the registry"
            ),
            "use a prefix outside every source.prefixes entry, like \"/haconfd/nodes/\"",
        ));
    }
    const NODE_FIX: &str = "set fleet.node to 1-128 of [A-Za-z0-9._:-], starting with a letter or digit, like \"lb-1\"";
    let node = if raw.node.is_empty() {
        match hostname() {
            Some(h) if is_instance_id(&h) || !publish => h,
            Some(h) => {
                return Err(invalid(
                    "fleet.node",
                    h,
                    "is empty, and this host's name (shown) is not a node name",
                    NODE_FIX,
                ));
            }
            None if publish => {
                return Err(invalid(
                    "fleet.node",
                    "",
                    "is empty, and this host's name cannot be read",
                    NODE_FIX,
                ));
            }
            None => String::new(),
        }
    } else if is_instance_id(&raw.node) {
        raw.node
    } else {
        return Err(invalid(
            "fleet.node",
            &raw.node,
            "is not a node name",
            NODE_FIX,
        ));
    };
    Ok(FleetConfig {
        node,
        publish,
        prefix: raw.prefix,
    })
}

fn validate_etcd(raw: RawEtcd) -> Result<EtcdConfig, ConfigError> {
    if raw.endpoints.is_empty() {
        return Err(invalid(
            "etcd.endpoints",
            &raw.endpoints,
            "is empty",
            "list at least one endpoint, like [\"http://127.0.0.1:2379\"]",
        ));
    }
    for (i, e) in raw.endpoints.iter().enumerate() {
        if !is_endpoint_url(e) {
            return Err(invalid(
                format!("etcd.endpoints[{i}]"),
                e,
                "is not an etcd client URL",
                "write it like \"http://127.0.0.1:2379\" or \"https://etcd1:2379\"",
            ));
        }
    }
    if raw.cert_file.is_some() != raw.key_file.is_some() {
        return Err(invalid(
            "etcd.cert_file",
            raw.cert_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            "a client certificate needs both cert_file and key_file",
            "set both etcd.cert_file and etcd.key_file, or neither",
        ));
    }
    if raw.ca_file.is_some() || raw.cert_file.is_some() {
        if let Some((i, e)) = raw
            .endpoints
            .iter()
            .enumerate()
            .find(|(_, e)| !e.starts_with("https://"))
        {
            return Err(invalid(
                format!("etcd.endpoints[{i}]"),
                e,
                "is not https:// while etcd.ca_file or etcd.cert_file is set",
                "write https:// endpoints, or remove the TLS settings",
            ));
        }
    }
    if raw.password_file.is_some() && raw.username.is_none() {
        return Err(invalid(
            "etcd.username",
            "(missing)",
            "etcd.password_file is set without a user name",
            "set etcd.username",
        ));
    }
    Ok(EtcdConfig {
        endpoints: raw.endpoints,
        ca_file: raw.ca_file,
        cert_file: raw.cert_file,
        key_file: raw.key_file,
        username: raw.username,
        password_file: raw.password_file,
        dial_timeout: positive("etcd.dial_timeout", &raw.dial_timeout)?,
    })
}

/// An etcd client URL: `http://` or `https://`, then a host and port, no path, no spaces.
pub fn is_endpoint_url(s: &str) -> bool {
    s.strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .is_some_and(|r| {
            !r.is_empty()
                && !r.contains('/')
                && !r.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

/// Template names appear in file names and logs: keep them to a safe token.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A map path that can be written into a Runtime API command as it is.
pub fn is_map_path(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
}

fn validate_templates(raw: Vec<RawTemplate>) -> Result<Vec<TemplateConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "template",
            "(none)",
            "no [[template]] is configured, so nothing would be rendered",
            "add a [[template]] with name, src and dest",
        ));
    }
    let mut out: Vec<TemplateConfig> = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("template[{i}].{field}");
        if !is_token(&t.name) {
            return Err(invalid(
                key("name"),
                &t.name,
                "is not a simple name",
                "use letters, digits, '-', '_' or '.', like \"haproxy\"",
            ));
        }
        if out.iter().any(|o| o.name == t.name) {
            return Err(invalid(
                key("name"),
                &t.name,
                "is used by two templates",
                "give every [[template]] its own name",
            ));
        }
        if t.dest.file_name().is_none() {
            return Err(invalid(
                key("dest"),
                t.dest.display().to_string(),
                "does not name a file",
                "write the path of the file to install, like \"/etc/haproxy/haproxy.cfg\"",
            ));
        }
        if let Some(o) = out.iter().find(|o| o.dest == t.dest) {
            return Err(invalid(
                key("dest"),
                t.dest.display().to_string(),
                format!("is also the dest of template {:?}", o.name),
                "give every [[template]] its own dest",
            ));
        }
        let mode = u32::from_str_radix(t.mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                invalid(
                    key("mode"),
                    &t.mode,
                    "is not an octal file mode",
                    "write it like \"0640\"",
                )
            })?;
        for (field, v) in [("owner", &t.owner), ("group", &t.group)] {
            if let Some(v) = v
                && !is_token(v)
            {
                return Err(invalid(
                    key(field),
                    v,
                    "is not a user or group name",
                    "write a name like \"haproxy\"",
                ));
            }
        }
        let check = t.check.unwrap_or(!t.map);
        if t.map && check {
            return Err(invalid(
                key("check"),
                "true",
                "a map file is data, not a config `haproxy -c` can read",
                "set check = false: the HAProxy template's check loads the map",
            ));
        }
        if t.map && !is_map_path(&t.dest.display().to_string()) {
            return Err(invalid(
                key("dest"),
                t.dest.display().to_string(),
                "names the map on the Runtime API, which takes no spaces or quotes",
                "use a path of letters, digits, '/', '-', '_' and '.'",
            ));
        }
        if t.map && out.iter().any(|o| o.check) {
            return Err(invalid(
                key("map"),
                "true",
                "comes after the HAProxy template, whose `haproxy -c` must load the new map",
                "list map templates before the HAProxy template",
            ));
        }
        out.push(TemplateConfig {
            name: t.name,
            src: t.src,
            dest: t.dest,
            mode,
            owner: t.owner,
            group: t.group,
            check,
            map: t.map,
        });
    }
    Ok(out)
}

fn validate_haproxy(raw: RawHaproxy) -> Result<HaproxyConfig, ConfigError> {
    let mode = match raw.mode.as_str() {
        "supervise" => HaproxyMode::Supervise,
        "master" => HaproxyMode::Master,
        "command" => HaproxyMode::Command,
        "none" => HaproxyMode::None,
        other => {
            return Err(invalid(
                "haproxy.mode",
                other,
                "is not a known mode",
                "use \"supervise\", \"master\", \"command\" or \"none\"",
            ));
        }
    };
    if mode == HaproxyMode::Command && raw.reload_cmd.is_empty() {
        return Err(invalid(
            "haproxy.reload_cmd",
            &raw.reload_cmd,
            "is empty while haproxy.mode is \"command\"",
            "give the reload command as an argv list, like [\"/usr/local/bin/reload-haproxy\"]",
        ));
    }
    if mode != HaproxyMode::Command && !raw.reload_cmd.is_empty() {
        return Err(invalid(
            "haproxy.reload_cmd",
            &raw.reload_cmd,
            format!(
                "is only used with haproxy.mode = \"command\", not {:?}",
                raw.mode
            ),
            "remove reload_cmd or set haproxy.mode = \"command\"",
        ));
    }
    if raw.binary.is_empty() {
        return Err(invalid(
            "haproxy.binary",
            &raw.binary,
            "is empty",
            "name the haproxy executable, like \"haproxy\" or \"/usr/sbin/haproxy\"",
        ));
    }
    // HAProxy reads a relative socket path as host:port: make every path absolute.
    let absolute = |key: &str, p: PathBuf| {
        std::path::absolute(&p).map_err(|e| {
            invalid(
                key,
                p.display().to_string(),
                format!("cannot be made absolute ({e})"),
                "write an absolute path",
            )
        })
    };
    let master_socket = absolute("haproxy.master_socket", raw.master_socket)?;
    let runtime_socket = absolute("haproxy.runtime_socket", raw.runtime_socket)?;
    let state_file = absolute("haproxy.state_file", raw.state_file)?;
    // A unix socket path longer than sun_path (108 bytes with the NUL) cannot be bound.
    for (key, p) in [
        ("haproxy.master_socket", &master_socket),
        ("haproxy.runtime_socket", &runtime_socket),
    ] {
        let s = p.display().to_string();
        if s.is_empty() || s.len() > 107 || s.chars().any(|c| c.is_whitespace() || c == ',') {
            return Err(invalid(
                key,
                s,
                "is not a usable unix socket path (empty, longer than 107 bytes, or holds a space or comma)",
                "use a short path like \"/run/haconfd/master.sock\"",
            ));
        }
    }
    if raw.spare_slots > 1000 {
        return Err(invalid(
            "haproxy.spare_slots",
            raw.spare_slots,
            "is more spare server lines per backend than is useful",
            "use a number from 0 to 1000",
        ));
    }
    if !raw.check_user.is_empty() && !is_token(&raw.check_user) {
        return Err(invalid(
            "haproxy.check_user",
            &raw.check_user,
            "is not a user name",
            "write a name like \"haproxy\" or \"nobody\", or \"\" to check as haconfd's own user",
        ));
    }
    Ok(HaproxyConfig {
        mode,
        binary: raw.binary,
        master_socket,
        runtime_socket,
        state_file,
        runtime_updates: raw.runtime_updates,
        reload_cmd: raw.reload_cmd,
        reload_timeout: duration("haproxy.reload_timeout", &raw.reload_timeout)?,
        check_timeout: duration("haproxy.check_timeout", &raw.check_timeout)?,
        spare_slots: raw.spare_slots,
        check_user: (!raw.check_user.is_empty()).then_some(raw.check_user),
    })
}

/// The longest lame duck: a stop that takes longer than this is a misconfiguration, and systemd
/// or Docker would kill the process long before (their stop timeouts must exceed it).
const MAX_LAME_DUCK: Duration = Duration::from_secs(600);

fn validate_frontend(raw: RawFrontend) -> Result<FrontendConfig, ConfigError> {
    if raw.bind.is_empty() {
        return Err(invalid(
            "frontend.bind",
            &raw.bind,
            "is empty, so HAProxy would listen nowhere",
            "list at least one address, like [\"0.0.0.0:80\"]",
        ));
    }
    let mut bind = Vec::with_capacity(raw.bind.len());
    for (i, b) in raw.bind.iter().enumerate() {
        let addr: SocketAddr = b.parse().map_err(|_| {
            invalid(
                format!("frontend.bind[{i}]"),
                b,
                "is not an IP:PORT address",
                "write it like \"0.0.0.0:80\", \"127.0.0.1:18080\" or \"[::]:80\"",
            )
        })?;
        bind.push(addr.to_string());
    }
    if !raw.default_domain.is_empty() && !crate::model::is_hostname(&raw.default_domain) {
        return Err(invalid(
            "frontend.default_domain",
            &raw.default_domain,
            "is not a DNS name",
            "write a domain like \"example.com\", or \"\" for none",
        ));
    }
    if !crate::model::is_http_path(&raw.monitor_uri) {
        return Err(invalid(
            "frontend.monitor_uri",
            &raw.monitor_uri,
            "is not a plain URL path",
            "write a path like \"/_haconfd/health\"",
        ));
    }
    let lame_duck = duration("frontend.lame_duck", &raw.lame_duck)?;
    if lame_duck > MAX_LAME_DUCK {
        return Err(invalid(
            "frontend.lame_duck",
            &raw.lame_duck,
            "is longer than 10 minutes",
            "size it from the load balancer's health check: interval x unhealthy threshold, plus a margin (AWS ELB defaults: 30s x 2 = \"60s\")",
        ));
    }
    Ok(FrontendConfig {
        bind,
        default_domain: raw.default_domain.to_ascii_lowercase(),
        monitor_uri: raw.monitor_uri,
        lame_duck,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[source]
kind = "file"
[file]
path = "registry.yaml"
[[template]]
name = "haproxy"
src = "t.tera"
dest = "/tmp/x.cfg"
"#;

    fn err(text: &str) -> String {
        match Config::parse(text, "test") {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL, "test").expect("valid");
        assert_eq!(c.wait.min, Duration::from_millis(200));
        assert_eq!(c.wait.max, Duration::from_secs(2));
        assert_eq!(c.haproxy.mode, HaproxyMode::Supervise);
        assert_eq!(c.templates[0].mode, 0o644);
        assert!(c.templates[0].check);
        assert_eq!(c.source.prefixes, vec!["/services/", "/routes/"]);
    }

    #[test]
    fn embedded_default_is_valid() {
        Config::embedded_default().expect("embedded default config is valid");
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let e = err(&format!("{MINIMAL}\n[wait]\nminn = \"1s\"\n"));
        assert!(e.contains("unknown field `minn`"), "{e}");
    }

    #[test]
    fn errors_name_key_value_and_fix() {
        let e = err(&format!("{MINIMAL}\n[wait]\nmin = \"soon\"\n"));
        assert!(
            e.contains("`wait.min`") && e.contains("\"soon\"") && e.contains("fix:"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}\n[wait]\nmin = \"5s\"\nmax = \"1s\"\n"));
        assert!(e.contains("`wait.min`"), "{e}");
        let e = err(&MINIMAL.replace("\"file\"", "\"consul\""));
        assert!(e.contains("`source.kind`") && e.contains("consul"), "{e}");
        let e = err(&format!(
            "{MINIMAL}\n[frontend]\nbind = [\"localhost:80\"]\n"
        ));
        assert!(e.contains("`frontend.bind[0]`"), "{e}");
        let e = err(&format!("{MINIMAL}\n[haproxy]\nmode = \"command\"\n"));
        assert!(e.contains("`haproxy.reload_cmd`"), "{e}");
        let e = err(&MINIMAL.replace("\"/tmp/x.cfg\"", "\"/tmp/x.cfg\"\nmode = \"999\""));
        assert!(e.contains("`template[0].mode`"), "{e}");
        let e = err(&MINIMAL.replace("kind = \"file\"", "kind = \"file\"\nresync = \"0s\""));
        assert!(e.contains("`source.resync`") && e.contains("zero"), "{e}");
        let e = err(&format!("{MINIMAL}\n[guard]\nmax_drop_percent = 150\n"));
        assert!(e.contains("`guard.max_drop_percent`"), "{e}");
        let e = err(&format!("{MINIMAL}\n[frontend]\nlame_duck = \"1h\"\n"));
        assert!(
            e.contains("`frontend.lame_duck`") && e.contains("10 minutes"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}\n[frontend]\nlame_duck = \"-1s\"\n"));
        assert!(e.contains("`frontend.lame_duck`"), "{e}");
    }

    #[test]
    fn lame_duck_defaults_to_none() {
        let c = Config::parse(MINIMAL, "test").expect("valid");
        assert_eq!(c.frontend.lame_duck, Duration::ZERO);
        let c = Config::parse(
            &format!("{MINIMAL}\n[frontend]\nlame_duck = \"30s\"\n"),
            "test",
        )
        .expect("valid");
        assert_eq!(c.frontend.lame_duck, Duration::from_secs(30));
    }

    #[test]
    fn map_templates_come_first_unchecked_with_a_plain_path() {
        let map = "[[template]]\nname = \"hosts\"\nsrc = \"m.tera\"\ndest = \"/tmp/hosts.map\"\nmap = true\n";
        let with_map = MINIMAL.replace("[[template]]", &format!("{map}[[template]]"));
        let c = Config::parse(&with_map, "test").expect("valid");
        assert!(
            c.templates[0].map && !c.templates[0].check,
            "check defaults to false"
        );
        assert_eq!(
            c.haproxy_template().map(|t| t.name.as_str()),
            Some("haproxy")
        );
        let e = err(&format!("{MINIMAL}{map}"));
        assert!(
            e.contains("`template[1].map`") && e.contains("before"),
            "{e}"
        );
        let e = err(&with_map.replace("map = true", "map = true\ncheck = true"));
        assert!(e.contains("`template[0].check`"), "{e}");
        let e = err(&with_map.replace("/tmp/hosts.map", "/tmp/my hosts.map"));
        assert!(e.contains("`template[0].dest`"), "{e}");
    }

    #[test]
    fn stale_after_defaults_to_30s_and_rejects_nonsense() {
        let c = Config::parse(MINIMAL, "test").expect("valid");
        assert_eq!(c.admin.stale_after, Duration::from_secs(30));
        let c = Config::parse(
            &format!("{MINIMAL}\n[admin]\nstale_after = \"2m\"\n"),
            "test",
        )
        .expect("valid");
        assert_eq!(c.admin.stale_after, Duration::from_secs(120));
        for (value, problem) in [
            ("\"soon\"", "is not a duration"),
            ("\"1s\"", "shorter than 2s"),
            ("\"0s\"", "shorter than 2s"),
        ] {
            let e = err(&format!("{MINIMAL}\n[admin]\nstale_after = {value}\n"));
            assert!(
                e.contains("`admin.stale_after`")
                    && e.contains(value)
                    && e.contains(problem)
                    && e.contains("fix:"),
                "{e}"
            );
        }
    }

    #[test]
    fn password_file_is_not_in_debug_output() {
        let text = r#"
[source]
kind = "etcd"
[etcd]
username = "reader"
password_file = "/secret/etcd-password"
[[template]]
name = "haproxy"
src = "t.tera"
dest = "/tmp/x.cfg"
"#;
        let c = Config::parse(text, "test").expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("/secret/etcd-password"), "{dbg}");
    }

    /// MINIMAL with the etcd source instead of the file.
    fn etcd_minimal() -> String {
        MINIMAL.replace(
            "kind = \"file\"\n[file]\npath = \"registry.yaml\"",
            "kind = \"etcd\"",
        )
    }

    #[test]
    fn fleet_defaults_follow_the_source() {
        let c = Config::parse(&etcd_minimal(), "test").expect("valid");
        assert!(c.fleet.publish, "the etcd source publishes by default");
        assert_eq!(c.fleet.prefix, "/haconfd/nodes/");
        assert_eq!(Some(c.fleet.node.clone()), hostname());
        let c = Config::parse(MINIMAL, "test").expect("valid");
        assert!(
            !c.fleet.publish,
            "the file source has nothing to publish to"
        );
        let c = Config::parse(
            &format!(
                "{}\n[fleet]\nnode = \"lb-1\"\npublish = false\nprefix = \"/fleet/\"\n",
                etcd_minimal()
            ),
            "test",
        )
        .expect("valid");
        assert_eq!(
            (
                c.fleet.node.as_str(),
                c.fleet.publish,
                c.fleet.prefix.as_str()
            ),
            ("lb-1", false, "/fleet/")
        );
    }

    #[test]
    fn fleet_errors_name_the_key() {
        let etcd = etcd_minimal();
        for (text, key, value, problem) in [
            (
                format!("{MINIMAL}\n[fleet]\npublish = true\n"),
                "fleet.publish",
                "true",
                "etcd source",
            ),
            (
                format!("{etcd}\n[fleet]\nnode = \"lb 1\"\n"),
                "fleet.node",
                "\"lb 1\"",
                "not a node name",
            ),
            (
                format!("{etcd}\n[fleet]\nnode = \"-lb\"\n"),
                "fleet.node",
                "\"-lb\"",
                "not a node name",
            ),
            (
                format!("{etcd}\n[fleet]\nprefix = \"/nodes\"\n"),
                "fleet.prefix",
                "\"/nodes\"",
                "starts and ends",
            ),
            (
                format!("{etcd}\n[fleet]\nprefix = \"nodes/\"\n"),
                "fleet.prefix",
                "\"nodes/\"",
                "starts and ends",
            ),
            // Under a watched prefix, and above one.
            (
                format!("{etcd}\n[fleet]\nprefix = \"/services/nodes/\"\n"),
                "fleet.prefix",
                "\"/services/nodes/\"",
                "overlaps the watched prefix \"/services/\"",
            ),
            (
                format!("{etcd}\n[fleet]\nprefix = \"/\"\n"),
                "fleet.prefix",
                "\"/\"",
                "overlaps",
            ),
            (
                format!("{etcd}\n[fleet]\nprefix = \"/routes/\"\n"),
                "fleet.prefix",
                "\"/routes/\"",
                "overlaps the watched prefix \"/routes/\"",
            ),
        ] {
            let e = err(&text);
            assert!(
                e.contains(&format!("`{key}` = {value}"))
                    && e.contains(problem)
                    && e.contains("fix:"),
                "{e}"
            );
        }
        // Overlap is checked against the configured prefixes, not the defaults.
        let text = etcd.replace(
            "kind = \"etcd\"",
            "kind = \"etcd\"\nprefixes = [\"/lb/services/\"]",
        );
        let e = err(&format!("{text}\n[fleet]\nprefix = \"/lb/\"\n"));
        assert!(
            e.contains("`fleet.prefix`") && e.contains("/lb/services/"),
            "{e}"
        );
        let e = err(&format!("{etcd}\n[fleet]\nnodes = \"lb-1\"\n"));
        assert!(e.contains("unknown field `nodes`"), "{e}");
    }
}
