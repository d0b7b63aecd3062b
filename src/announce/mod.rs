//! The presence sidecar: `haconfd announce` registers one service instance in etcd under a
//! lease, keeps the lease alive, and removes the key when the instance stops or fails its
//! health check.
//!
//! In: the command line and the config's `[etcd]` (endpoints, TLS, auth). Out: one key,
//! `/services/<service>/<id>`, whose value the daemon is known to accept: every argument is
//! checked with the registry's own rules (`model`), and the finished key and value are read
//! back through `Snapshot::screen` and `Registry::parse` before anything is written.
//!
//! - `check`: the tcp:// and http:// health probes with rise / fall.
//! - `docker`: the published host port of a container, from the Docker Engine API.
//! - `session`: the lease, its keep-alive, re-registration after outages and lease loss, and
//!   the revoke on SIGTERM / SIGINT.

mod check;
mod docker;
mod session;

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv6Addr;
use std::time::Duration;

use serde::Serialize;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::backoff::Backoff;
use crate::cli::AnnounceArgs;
use crate::config::ConfigSource;
use crate::config::EtcdConfig;
use crate::failure::Failure;
use crate::model::{
    self, Host, MAX_VALUE_LEN, Registry, SERVICES_PREFIX, Snapshot, is_config_unsafe, is_http_path,
    is_instance_id, is_service_name,
};

/// Lease TTL bounds: below 5 s a short etcd hiccup drops the instance; above an hour a
/// crashed instance lingers too long in every HAProxy.
const MIN_TTL: Duration = Duration::from_secs(5);
const MAX_TTL: Duration = Duration::from_secs(3600);
/// Health-check interval bounds.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(600);
/// Rise and fall bounds.
const MAX_RISE_FALL: u32 = 100;
/// The longest `--drain`: the service's stop timeout must exceed it.
const MAX_DRAIN: Duration = Duration::from_secs(600);
/// The host announced with a port discovered from Docker when no other is given.
const DEFAULT_DOCKER_HOST: &str = "127.0.0.1";
/// Meta limits, as the registry enforces them.
const MAX_META: usize = 32;
const MAX_META_NAME: usize = 64;
const MAX_META_VALUE: usize = 256;

/// Runs until SIGTERM / SIGINT.
pub async fn run(cs: &ConfigSource, args: AnnounceArgs) -> Result<(), Failure> {
    let spec = Spec::parse(&args)?;
    let etcd = etcd_config(cs, &args.etcd)?;
    // Installed before anything waits, so that a stop during start-up is clean too.
    let mut shutdown = Shutdown::install()?;
    let addr = match &spec.target {
        Target::Addr { addr, .. } => addr.clone(),
        Target::Docker { host, request } => match discover(request, host, &mut shutdown).await {
            Some(addr) => addr,
            None => return Ok(()),
        },
    };
    let id = match &spec.id {
        Some(id) => id.clone(),
        None => default_id(&hostname()?, addr.port),
    };
    let registration = Registration::build(&spec, &id, &addr)?;
    tracing::info!(
        key = %registration.key,
        value = %registration.value,
        ttl = %humantime::format_duration(registration.ttl),
        etcd = %etcd.endpoints.join(","),
        check = spec.check.as_ref().map(|c| c.url.as_str()).unwrap_or("none"),
        "announcing"
    );
    let health = check::Health::spawn(spec.check.clone());
    session::run(etcd, registration, health, &mut shutdown).await?;
    drain(spec.drain, &mut shutdown).await;
    Ok(())
}

/// Waits `--drain` after the key is gone, so that the instance goes on serving while every
/// node takes it out; a second SIGTERM or SIGINT ends the wait.
async fn drain(wait: Duration, shutdown: &mut Shutdown) {
    if wait.is_zero() {
        return;
    }
    tracing::info!(drain = %humantime::format_duration(wait), "draining: the instance keeps serving while the nodes take it out (a second SIGTERM or SIGINT ends the wait)");
    tokio::select! {
        () = tokio::time::sleep(wait) => tracing::info!("drained; exiting"),
        signal = shutdown.wait() => tracing::info!(signal, "drain cut short; exiting"),
    }
}

/// The arguments, checked.
#[derive(Debug, Clone)]
struct Spec {
    service: String,
    id: Option<String>,
    target: Target,
    ttl: Duration,
    weight: Option<u16>,
    meta: BTreeMap<String, String>,
    check: Option<check::Check>,
    /// How long to go on running once the key is removed on a stop.
    drain: Duration,
}

/// Where the instance listens, or how to find out.
#[derive(Debug, Clone)]
enum Target {
    Addr {
        addr: Addr,
    },
    Docker {
        host: Host,
        request: docker::Request,
    },
}

/// A checked `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Addr {
    host: Host,
    port: u16,
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::V6(ip) => write!(f, "[{ip}]:{}", self.port),
            h => write!(f, "{h}:{}", self.port),
        }
    }
}

/// A usage error that names the flag, the value, the problem and the fix.
fn usage(flag: &str, value: impl fmt::Debug, problem: &str, fix: &str) -> Failure {
    Failure::Usage(format!("{flag} {value:?}: {problem} (fix: {fix})"))
}

/// A text the registry's raw screen (control characters, line separators, invisible
/// formatting characters) lets through, or why not.
fn screen_text(text: &str) -> Result<(), String> {
    let prefixes = ["/".to_owned()];
    let (_, rejected) = Snapshot::screen(0, &prefixes, [("/announce", text)]);
    match rejected.first() {
        Some(r) => Err(r
            .reason
            .strip_prefix("value ")
            .unwrap_or(&r.reason)
            .to_owned()),
        None => Ok(()),
    }
}

/// Parses a host without a port: an IP address (`::1` or `[::1]`) or a host name.
fn parse_host(s: &str) -> Result<Host, String> {
    let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
    if let Ok(ip) = bare.unwrap_or(s).parse::<Ipv6Addr>() {
        return Ok(Host::V6(ip));
    }
    if bare.is_some() {
        return Err("the part in brackets is not an IPv6 address".into());
    }
    model::parse_addr(&format!("{s}:1")).map(|(h, _)| h)
}

fn unspecified(host: &Host) -> bool {
    match host {
        Host::V4(ip) => ip.is_unspecified(),
        Host::V6(ip) => ip.is_unspecified(),
        Host::Name(_) => false,
    }
}

impl Spec {
    fn parse(args: &AnnounceArgs) -> Result<Spec, Failure> {
        if !is_service_name(&args.service) {
            return Err(usage(
                "--service",
                &args.service,
                "is not a service name",
                "use 1-63 lower-case letters, digits, '-', '_' or '.', starting with a letter or digit",
            ));
        }
        if let Some(id) = &args.id
            && !is_instance_id(id)
        {
            return Err(usage(
                "--id",
                id,
                "is not an instance id",
                "use 1-128 of [A-Za-z0-9._:-], starting with a letter or digit, or leave --id out for one derived from the host name and port",
            ));
        }
        let target = Spec::target(args)?;
        let ttl = parse_duration("--ttl", &args.ttl)?;
        if ttl.subsec_nanos() != 0 {
            return Err(usage(
                "--ttl",
                &args.ttl,
                "is not a whole number of seconds (etcd leases count seconds)",
                "write it like \"30s\" or \"5m\"",
            ));
        }
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(usage(
                "--ttl",
                &args.ttl,
                "is out of range",
                "use a TTL from 5s to 1h (the default is 5m)",
            ));
        }
        if let Some(w) = args.weight
            && w > 256
        {
            return Err(usage(
                "--weight",
                w,
                "is above 256",
                "use a weight from 0 to 256",
            ));
        }
        let drain = parse_duration("--drain", &args.drain)?;
        if drain > MAX_DRAIN {
            return Err(usage(
                "--drain",
                &args.drain,
                "is longer than 10 minutes",
                "size it from how long every node takes to apply a removal (`haconfd fleet --wait` measures it) plus the longest request, like \"5s\"",
            ));
        }
        let meta = parse_meta(&args.meta)?;
        let check = match &args.check {
            None => None,
            Some(url) => Some(Spec::check(args, url)?),
        };
        Ok(Spec {
            service: args.service.clone(),
            id: args.id.clone(),
            target,
            ttl,
            weight: args.weight,
            meta,
            check,
            drain,
        })
    }

    fn target(args: &AnnounceArgs) -> Result<Target, Failure> {
        let Some(container) = &args.docker_container else {
            let Some(addr) = &args.addr else {
                return Err(Failure::Usage(
                    "--addr is missing (fix: give --addr HOST:PORT, the address HAProxy should send traffic to, or --docker-container NAME --container-port PORT/tcp)".into(),
                ));
            };
            let (host, port) = model::parse_addr(addr).map_err(|e| {
                usage(
                    "--addr",
                    addr,
                    &e,
                    "write HOST:PORT, like 127.0.0.1:8080, [::1]:8080 or web1.internal:8080",
                )
            })?;
            if unspecified(&host) {
                return Err(usage(
                    "--addr",
                    addr,
                    "is an unspecified address, which HAProxy cannot connect to",
                    "announce the address of this host that HAProxy reaches",
                ));
            }
            return Ok(Target::Addr {
                addr: Addr { host, port },
            });
        };
        if !docker::is_container_name(container) {
            return Err(usage(
                "--docker-container",
                container,
                "is not a container name or id",
                "use the name `docker ps` shows, like \"web-1\" ([A-Za-z0-9][A-Za-z0-9_.-]*)",
            ));
        }
        let container_port = args.container_port.as_deref().unwrap_or("");
        let port = docker::parse_container_port(container_port).ok_or_else(|| {
            usage(
                "--container-port",
                container_port,
                "is not a container port",
                "write PORT/PROTO, like 8080/tcp",
            )
        })?;
        let (flag, text) = match (&args.addr, &args.docker_host_ip) {
            (Some(a), _) => ("--addr", a.as_str()),
            (None, Some(ip)) => ("--docker-host-ip", ip.as_str()),
            (None, None) => ("--docker-host-ip", DEFAULT_DOCKER_HOST),
        };
        if flag == "--addr" && model::parse_addr(text).is_ok() {
            return Err(usage(
                "--addr",
                text,
                "has a port, but with --docker-container the port comes from Docker",
                "give only the host, like --addr web1.internal, or use --docker-host-ip",
            ));
        }
        let host = parse_host(text).map_err(|e| {
            usage(
                flag,
                text,
                &e,
                "give the host HAProxy reaches the published port on, like web1.internal",
            )
        })?;
        if flag == "--docker-host-ip" && matches!(host, Host::Name(_)) {
            return Err(usage(
                flag,
                text,
                "is not an IP address",
                "write an IP address like 127.0.0.1, or a host name with --addr",
            ));
        }
        if unspecified(&host) {
            return Err(usage(
                flag,
                text,
                "is an unspecified address, which HAProxy cannot connect to",
                "announce the address of this host that HAProxy reaches",
            ));
        }
        Ok(Target::Docker {
            host,
            request: docker::Request {
                socket: args.docker_socket.clone(),
                container: container.clone(),
                port,
            },
        })
    }

    fn check(args: &AnnounceArgs, url: &str) -> Result<check::Check, Failure> {
        let probe = parse_check_url(url).map_err(|e| {
            usage(
                "--check",
                url,
                &e,
                "write tcp://HOST:PORT or http://HOST:PORT/path, like http://127.0.0.1:8080/health",
            )
        })?;
        let interval = parse_duration("--check-interval", &args.check_interval)?;
        if !(MIN_CHECK_INTERVAL..=MAX_CHECK_INTERVAL).contains(&interval) {
            return Err(usage(
                "--check-interval",
                &args.check_interval,
                "is out of range",
                "use an interval from 100ms to 10m (the default is 2s)",
            ));
        }
        for (flag, n) in [("--rise", args.rise), ("--fall", args.fall)] {
            if !(1..=MAX_RISE_FALL).contains(&n) {
                return Err(usage(
                    flag,
                    n,
                    "is out of range",
                    "use a count of consecutive checks from 1 to 100",
                ));
            }
        }
        Ok(check::Check {
            url: url.to_owned(),
            probe,
            interval,
            rise: args.rise,
            fall: args.fall,
        })
    }
}

fn parse_duration(flag: &str, text: &str) -> Result<Duration, Failure> {
    humantime::parse_duration(text).map_err(|e| {
        usage(
            flag,
            text,
            &format!("is not a duration ({e})"),
            "write a number with a unit, like \"2s\" or \"5m\"",
        )
    })
}

/// `--meta k=v`, with the registry's rules for names and values.
fn parse_meta(raw: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    const FIX: &str = "write NAME=VALUE with no whitespace, quote, '\\', '#', '$' or ';' (names up to 64 bytes, values up to 256)";
    if raw.len() > MAX_META {
        return Err(usage(
            "--meta",
            raw.len(),
            "is given more than 32 times",
            "keep to 32 metadata entries",
        ));
    }
    let mut meta = BTreeMap::new();
    for item in raw {
        let Some((name, value)) = item.split_once('=') else {
            return Err(usage("--meta", item, "is not NAME=VALUE", FIX));
        };
        let token_ok = |s: &str, max: usize| {
            !s.is_empty() && s.len() <= max && !s.chars().any(is_config_unsafe)
        };
        if !token_ok(name, MAX_META_NAME) {
            return Err(usage(
                "--meta",
                item,
                "the name is empty, too long or holds a forbidden character",
                FIX,
            ));
        }
        if !token_ok(value, MAX_META_VALUE) {
            return Err(usage(
                "--meta",
                item,
                "the value is empty, too long or holds a forbidden character",
                FIX,
            ));
        }
        if let Err(e) = screen_text(name).and_then(|()| screen_text(value)) {
            return Err(usage("--meta", item, &e, FIX));
        }
        if meta.insert(name.to_owned(), value.to_owned()).is_some() {
            return Err(usage(
                "--meta",
                item,
                "names a key that an earlier --meta already set",
                "give each name once",
            ));
        }
    }
    Ok(meta)
}

/// `tcp://HOST:PORT` or `http://HOST:PORT[/path]`.
fn parse_check_url(url: &str) -> Result<check::Probe, String> {
    let (tcp, rest) = if let Some(rest) = url.strip_prefix("tcp://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err("only tcp:// and http:// checks are supported".into());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let (host, port) = model::parse_addr(authority)?;
    let addr = Addr { host, port }.to_string();
    if tcp {
        if !path.is_empty() && path != "/" {
            return Err("a tcp:// check has no path".into());
        }
        return Ok(check::Probe::Tcp { addr });
    }
    let path = if path.is_empty() { "/" } else { path };
    let (plain, query) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    let query_ok = query.is_none_or(|q| {
        q.len() <= 256
            && q.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'-' | b'.' | b'_' | b'~' | b'%' | b'+' | b'=' | b'&')
            })
    });
    if !is_http_path(plain) || !query_ok {
        return Err(
            "the path may only hold letters, digits and - . _ ~ % + / (and = & in a query)".into(),
        );
    }
    Ok(check::Probe::Http {
        addr,
        path: path.to_owned(),
    })
}

/// etcd settings: the config's [etcd] when its source is etcd, else the defaults; --etcd
/// replaces the endpoints.
fn etcd_config(cs: &ConfigSource, urls: &[String]) -> Result<EtcdConfig, Failure> {
    Ok(crate::config::etcd_for_client(&cs.load()?, urls)?)
}

/// This host's name, for the default instance id.
fn hostname() -> Result<String, Failure> {
    crate::config::hostname().ok_or_else(|| {
        Failure::Usage(
            "cannot read this host's name for the default instance id (fix: give --id)".into(),
        )
    })
}

/// `<hostname>-<port>`, cut down to the instance-id rule: stable across restarts of the same
/// instance, distinct for two instances on one host.
fn default_id(hostname: &str, port: u16) -> String {
    let suffix = format!("-{port}");
    let cleaned: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut base = cleaned
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();
    base.truncate(128 - suffix.len());
    if base.is_empty() {
        base = "instance".to_owned();
    }
    format!("{base}{suffix}")
}

/// The key and value to keep in etcd.
#[derive(Debug, Clone)]
struct Registration {
    key: String,
    value: String,
    ttl: Duration,
}

#[derive(Serialize)]
struct JsonValue<'a> {
    addr: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight: Option<u16>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    meta: &'a BTreeMap<String, String>,
}

impl Registration {
    fn build(spec: &Spec, id: &str, addr: &Addr) -> Result<Registration, Failure> {
        if !is_instance_id(id) {
            return Err(usage(
                "--id",
                id,
                "the derived instance id is not valid",
                "give --id",
            ));
        }
        let key = format!("{SERVICES_PREFIX}{}/{id}", spec.service);
        let value = if spec.weight.is_none() && spec.meta.is_empty() {
            addr.to_string()
        } else {
            serde_json::to_string(&JsonValue {
                addr: addr.to_string(),
                weight: spec.weight,
                meta: &spec.meta,
            })
            .map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot encode the value: {e}")))?
        };
        if value.len() > MAX_VALUE_LEN {
            return Err(usage(
                "--meta",
                format!("{} entries", spec.meta.len()),
                "the value would be longer than the registry accepts (8 KiB)",
                "give fewer or shorter --meta entries",
            ));
        }
        registry_accepts(&key, &value).map_err(|e| {
            Failure::Usage(format!(
                "the registry would reject {key} with these arguments: {e} (fix: change --addr, --weight or --meta)"
            ))
        })?;
        Ok(Registration {
            key,
            value,
            ttl: spec.ttl,
        })
    }
}

/// Reads the key and value back the way the daemon does: the raw screen, then the typed
/// registry. Announce never writes what the daemon would leave out.
fn registry_accepts(key: &str, value: &str) -> Result<(), String> {
    let prefixes = [SERVICES_PREFIX.to_owned()];
    let (snapshot, mut rejected) = Snapshot::screen(0, &prefixes, [(key, value)]);
    let (registry, more) = Registry::parse(&snapshot);
    rejected.extend(more);
    if let Some(r) = rejected.first() {
        return Err(r.reason.clone());
    }
    if registry.instance_count() != 1 {
        return Err("the registry does not read it as one instance".into());
    }
    Ok(())
}

/// Finds the published port, retrying until it is there (the container may still be
/// starting) or a stop is asked for (None).
async fn discover(request: &docker::Request, host: &Host, shutdown: &mut Shutdown) -> Option<Addr> {
    let mut backoff = Backoff::new();
    let mut attempts = 0u32;
    loop {
        let attempt = tokio::select! {
            r = docker::host_port(request) => r,
            s = shutdown.wait() => {
                tracing::info!(signal = s, "stopping before the port was discovered");
                return None;
            }
        };
        match attempt {
            Ok(port) => {
                tracing::info!(
                    container = %request.container,
                    container_port = %request.port,
                    host_port = port,
                    "discovered the published port from Docker"
                );
                return Some(Addr {
                    host: host.clone(),
                    port,
                });
            }
            Err(e) => {
                attempts += 1;
                let delay = backoff.next(Duration::ZERO);
                tracing::warn!(
                    error = %e,
                    attempts,
                    retry_in = format!("{}ms", delay.as_millis()),
                    "cannot discover the published port from Docker"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    s = shutdown.wait() => {
                        tracing::info!(signal = s, "stopping before the port was discovered");
                        return None;
                    }
                }
            }
        }
    }
}

/// SIGTERM and SIGINT.
pub(crate) struct Shutdown {
    term: Signal,
    int: Signal,
}

impl Shutdown {
    fn install() -> Result<Shutdown, Failure> {
        let install = |kind| {
            signal(kind).map_err(|e| {
                Failure::Runtime(anyhow::anyhow!("cannot install a signal handler: {e}"))
            })
        };
        Ok(Shutdown {
            term: install(SignalKind::terminate())?,
            int: install(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next signal and names it. Cancel-safe.
    pub(crate) async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(extra: &[&str]) -> AnnounceArgs {
        let mut argv = vec!["haconfd", "announce", "--service", "web"];
        argv.extend(extra);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Announce(a) => a,
            _ => unreachable!(),
        }
    }

    fn spec(extra: &[&str]) -> Result<Spec, String> {
        Spec::parse(&args(extra)).map_err(|e| e.to_string())
    }

    fn value(extra: &[&str]) -> String {
        let s = spec(extra).expect("valid");
        let Target::Addr { addr } = &s.target else {
            panic!("not an addr")
        };
        Registration::build(&s, "i1", addr).expect("builds").value
    }

    #[test]
    fn plain_and_json_values() {
        assert_eq!(value(&["--addr", "127.0.0.5:8080"]), "127.0.0.5:8080");
        assert_eq!(value(&["--addr", "[::1]:80"]), "[::1]:80");
        assert_eq!(value(&["--addr", "Web1.Internal:80"]), "web1.internal:80");
        assert_eq!(
            value(&["--addr", "127.0.0.5:8080", "--weight", "7"]),
            r#"{"addr":"127.0.0.5:8080","weight":7}"#
        );
        assert_eq!(
            value(&[
                "--addr",
                "127.0.0.5:8080",
                "--meta",
                "zone=a",
                "--meta",
                "v=2"
            ]),
            r#"{"addr":"127.0.0.5:8080","meta":{"v":"2","zone":"a"}}"#
        );
    }

    #[test]
    fn bad_arguments_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--addr", "127.0.0.5"], "--addr \"127.0.0.5\""),
            (&["--addr", "0.0.0.0:80"], "--addr"),
            (&[], "--addr is missing"),
            (&["--addr", "127.0.0.9:80", "--id=-x"], "--id"),
            (&["--addr", "127.0.0.9:80", "--ttl", "1s"], "--ttl"),
            (&["--addr", "127.0.0.9:80", "--ttl", "2h"], "--ttl"),
            (&["--addr", "127.0.0.9:80", "--ttl", "5500ms"], "--ttl"),
            (&["--addr", "127.0.0.9:80", "--ttl", "soon"], "--ttl"),
            (&["--addr", "127.0.0.9:80", "--drain", "11m"], "--drain"),
            (&["--addr", "127.0.0.9:80", "--drain", "later"], "--drain"),
            (&["--addr", "127.0.0.9:80", "--weight", "257"], "--weight"),
            (&["--addr", "127.0.0.9:80", "--meta", "novalue"], "--meta"),
            (&["--addr", "127.0.0.9:80", "--meta", "k=a b"], "--meta"),
            (&["--addr", "127.0.0.9:80", "--meta", "k=a;b"], "--meta"),
            (
                &["--addr", "127.0.0.9:80", "--meta", "k=a\u{200b}"],
                "--meta",
            ),
            (
                &["--addr", "127.0.0.9:80", "--meta", "k=1", "--meta", "k=2"],
                "--meta",
            ),
            (
                &["--addr", "127.0.0.9:80", "--check", "udp://127.0.0.9:80"],
                "--check",
            ),
            (
                &["--addr", "127.0.0.9:80", "--check", "http://127.0.0.9/x"],
                "--check",
            ),
            (
                &[
                    "--addr",
                    "127.0.0.9:80",
                    "--check",
                    "http://127.0.0.9:80/a b",
                ],
                "--check",
            ),
            (
                &[
                    "--addr",
                    "127.0.0.9:80",
                    "--check",
                    "tcp://127.0.0.9:80",
                    "--rise",
                    "0",
                ],
                "--rise",
            ),
            (
                &[
                    "--addr",
                    "127.0.0.9:80",
                    "--check",
                    "tcp://127.0.0.9:80",
                    "--check-interval",
                    "1ms",
                ],
                "--check-interval",
            ),
            (
                &["--docker-container", "a/../b", "--container-port", "80/tcp"],
                "--docker-container",
            ),
            (
                &["--docker-container", "web", "--container-port", "80/foo"],
                "--container-port",
            ),
            (
                &[
                    "--docker-container",
                    "web",
                    "--container-port",
                    "80",
                    "--addr",
                    "127.0.0.9:80",
                ],
                "--addr",
            ),
            (
                &[
                    "--docker-container",
                    "web",
                    "--container-port",
                    "80",
                    "--docker-host-ip",
                    "web1",
                ],
                "--docker-host-ip",
            ),
        ];
        for (extra, needle) in cases {
            let err = spec(extra).expect_err(&format!("{extra:?} should be refused"));
            assert!(err.contains(needle), "{extra:?}: {err}");
            assert!(err.contains("fix"), "{extra:?}: {err}");
        }
        let mut service = args(&["--addr", "127.0.0.9:80"]);
        service.service = "Web".into();
        assert!(Spec::parse(&service).is_err());
    }

    #[test]
    fn check_urls() {
        assert_eq!(
            parse_check_url("tcp://127.0.0.1:80"),
            Ok(check::Probe::Tcp {
                addr: "127.0.0.1:80".into()
            })
        );
        assert_eq!(
            parse_check_url("http://[::1]:8080"),
            Ok(check::Probe::Http {
                addr: "[::1]:8080".into(),
                path: "/".into()
            })
        );
        assert_eq!(
            parse_check_url("http://localhost:8080/health?full=1"),
            Ok(check::Probe::Http {
                addr: "localhost:8080".into(),
                path: "/health?full=1".into()
            })
        );
        assert!(parse_check_url("tcp://127.0.0.1:80/x").is_err());
        assert!(parse_check_url("https://127.0.0.1:443/").is_err());
    }

    #[test]
    fn docker_target_takes_the_host_from_addr_or_host_ip() {
        let s = spec(&["--docker-container", "web-1", "--container-port", "8080"]).expect("ok");
        let Target::Docker { host, request } = s.target else {
            panic!("not docker")
        };
        assert_eq!(host.to_string(), "127.0.0.1");
        assert_eq!(request.port, "8080/tcp");
        let s = spec(&[
            "--docker-container",
            "web-1",
            "--container-port",
            "8080/tcp",
            "--addr",
            "::1",
        ])
        .expect("ok");
        let Target::Docker { host, .. } = s.target else {
            panic!("not docker")
        };
        assert_eq!(Addr { host, port: 9 }.to_string(), "[::1]:9");
    }

    #[test]
    fn default_ids_are_valid_and_stable() {
        assert_eq!(
            default_id("node-3.example.com", 8080),
            "node-3.example.com-8080"
        );
        assert_eq!(default_id("-weird host!", 80), "weird-host--80");
        assert_eq!(default_id("", 80), "instance-80");
        let long = "a".repeat(300);
        let id = default_id(&long, 65535);
        assert!(is_instance_id(&id) && id.ends_with("-65535"), "{id}");
        for h in ["ümlaut", "_x", "a:b", "..."] {
            assert!(is_instance_id(&default_id(h, 1)), "{h}");
        }
    }
}
