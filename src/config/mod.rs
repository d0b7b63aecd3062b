//! The config file: TOML in, a validated [`Config`] out.
//!
//! Parsing happens in two steps: serde reads the file into `Raw*` structs that reject unknown
//! keys, then [`Config::from_raw`] checks every value and converts it into typed settings. Every
//! error names the key, the bad value and the fix, and maps to exit code 64.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::model::is_instance_id;

mod raw;
mod validate;

use self::raw::*;
use self::validate::*;
pub use self::validate::{hostname, is_endpoint_url, is_map_path};

/// The config used when neither `--config` nor `HACONFD_CONFIG` is given and the default path
/// does not exist: the file source over `examples/registry.yaml`, HAProxy on loopback ports.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../examples/haconfd.toml");

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
    #[error("{flag} {value:?}: {problem} (fix: {fix})")]
    Flag {
        flag: &'static str,
        value: String,
        problem: String,
        fix: String,
    },
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

/// Where the config comes from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    Path(PathBuf),
    Embedded,
}

impl ConfigSource {
    /// `--config` / `HACONFD_CONFIG` when given; else the default path when it exists; else the
    /// embedded default.
    pub fn resolve(given: Option<PathBuf>) -> ConfigSource {
        match given {
            Some(p) => ConfigSource::Path(p),
            None if Path::new(DEFAULT_PATH).exists() => ConfigSource::Path(DEFAULT_PATH.into()),
            None => ConfigSource::Embedded,
        }
    }

    pub fn load(&self) -> Result<Config, ConfigError> {
        match self {
            ConfigSource::Path(p) => Config::load(p),
            ConfigSource::Embedded => Config::embedded_default(),
        }
    }

    /// The config file's path; None for the embedded default.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigSource::Path(p) => Some(p),
            ConfigSource::Embedded => None,
        }
    }
}

/// The etcd a client command (`announce`, `fleet`) talks to: the config's `[etcd]` when its
/// source is etcd, else the defaults; `urls` (`--etcd`), when given, replace the endpoints.
pub fn etcd_for_client(config: &Config, urls: &[String]) -> Result<EtcdConfig, ConfigError> {
    let mut etcd = match &config.source.kind {
        SourceKind::Etcd(e) => e.clone(),
        SourceKind::File(_) => EtcdConfig::default(),
    };
    if let Some(u) = urls.iter().find(|u| !is_endpoint_url(u)) {
        return Err(ConfigError::Flag {
            flag: "--etcd",
            value: u.clone(),
            problem: "is not an etcd client URL".into(),
            fix: "write it like http://127.0.0.1:2379 or https://etcd1:2379".into(),
        });
    }
    if !urls.is_empty() {
        etcd.endpoints = urls.to_vec();
    }
    Ok(etcd)
}

#[cfg(test)]
mod tests;
