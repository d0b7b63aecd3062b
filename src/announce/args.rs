//! The command line of `haconfd announce`, checked before anything starts. Every registry rule
//! (service name, instance id, address, weight, meta) is `model`'s own function, so the
//! arguments pass exactly when the registry would take the value they make; the rest (TTL,
//! health check, drain, Docker) is announce's own.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use super::{Failure, check, docker};
use crate::cli::AnnounceArgs;
use crate::model::{
    Addr, DEFAULT_WEIGHT, Host, INSTANCE_ID_RULE, InstanceValue, MAX_INSTANCE_ID_LEN, MAX_META,
    MAX_META_NAME, MAX_META_VALUE, MAX_WEIGHT, SERVICE_NAME_RULE, is_http_path, is_instance_id,
    is_instance_id_char, is_service_name, meta_name_problem, meta_value_problem, parse_weight,
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

/// The arguments, checked.
#[derive(Debug, Clone)]
pub(super) struct Spec {
    pub(super) service: String,
    pub(super) id: Option<String>,
    pub(super) target: Target,
    pub(super) ttl: Duration,
    weight: u16,
    meta: BTreeMap<String, String>,
    pub(super) check: Option<check::Check>,
    /// How long to go on running once the key is removed on a stop.
    pub(super) drain: Duration,
}

/// Where the instance listens, or how to find out.
#[derive(Debug, Clone)]
pub(super) enum Target {
    Addr {
        addr: Addr,
    },
    Docker {
        host: Host,
        request: docker::Request,
    },
}

/// A usage error that names the flag, the value, the problem and the fix.
pub(super) fn usage(flag: &str, value: impl fmt::Debug, problem: &str, fix: &str) -> Failure {
    Failure::Usage(format!("{flag} {value:?}: {problem} (fix: {fix})"))
}

impl Spec {
    pub(super) fn parse(args: &AnnounceArgs) -> Result<Spec, Failure> {
        if !is_service_name(&args.service) {
            return Err(usage(
                "--service",
                &args.service,
                "is not a service name",
                &format!("use {SERVICE_NAME_RULE}"),
            ));
        }
        if let Some(id) = &args.id
            && !is_instance_id(id)
        {
            return Err(usage(
                "--id",
                id,
                "is not an instance id",
                &format!(
                    "use {INSTANCE_ID_RULE}, or leave --id out for one derived from the host name and port"
                ),
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
        let weight = match args.weight {
            None => DEFAULT_WEIGHT,
            Some(w) => parse_weight(u32::from(w)).map_err(|e| {
                usage(
                    "--weight",
                    w,
                    &e,
                    &format!("use a weight from 0 to {MAX_WEIGHT}"),
                )
            })?,
        };
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
            weight,
            meta,
            check,
            drain,
        })
    }

    /// The instance to announce once its address is known.
    pub(super) fn instance(&self, addr: &Addr) -> InstanceValue {
        InstanceValue {
            weight: self.weight,
            meta: self.meta.clone(),
            ..InstanceValue::new(addr.clone())
        }
    }

    fn target(args: &AnnounceArgs) -> Result<Target, Failure> {
        let Some(container) = &args.docker_container else {
            let Some(addr) = &args.addr else {
                return Err(Failure::Usage(
                    "--addr is missing (fix: give --addr HOST:PORT, the address HAProxy should send traffic to, or --docker-container NAME --container-port PORT/tcp)".into(),
                ));
            };
            let addr_text = addr;
            let addr = Addr::parse(addr_text).map_err(|e| {
                usage(
                    "--addr",
                    addr_text,
                    &e,
                    "write HOST:PORT, like 127.0.0.1:8080, [::1]:8080 or web1.internal:8080",
                )
            })?;
            if addr.host.is_unspecified() {
                return Err(usage(
                    "--addr",
                    addr_text,
                    "is an unspecified address, which HAProxy cannot connect to",
                    "announce the address of this host that HAProxy reaches",
                ));
            }
            return Ok(Target::Addr { addr });
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
        if flag == "--addr" && Addr::parse(text).is_ok() {
            return Err(usage(
                "--addr",
                text,
                "has a port, but with --docker-container the port comes from Docker",
                "give only the host, like --addr web1.internal, or use --docker-host-ip",
            ));
        }
        let host = Host::parse(text).map_err(|e| {
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
        if host.is_unspecified() {
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
    let fix = format!(
        "write NAME=VALUE with no whitespace, quote, '\\', '#', '$' or ';' (names up to {MAX_META_NAME} bytes, values up to {MAX_META_VALUE})"
    );
    if raw.len() > MAX_META {
        return Err(usage(
            "--meta",
            raw.len(),
            &format!("is given more than {MAX_META} times"),
            &format!("keep to {MAX_META} metadata entries"),
        ));
    }
    let mut meta = BTreeMap::new();
    for item in raw {
        let Some((name, value)) = item.split_once('=') else {
            return Err(usage("--meta", item, "is not NAME=VALUE", &fix));
        };
        if let Err(e) = meta_name_problem(name) {
            return Err(usage("--meta", item, &format!("the name {e}"), &fix));
        }
        if let Err(e) = meta_value_problem(value) {
            return Err(usage("--meta", item, &format!("the value {e}"), &fix));
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
    let addr = Addr::parse(authority)?.to_string();
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

/// `<hostname>-<port>`, cut down to the instance-id rule: stable across restarts of the same
/// instance, distinct for two instances on one host.
pub(super) fn default_id(hostname: &str, port: u16) -> String {
    let suffix = format!("-{port}");
    let cleaned: String = hostname
        .chars()
        .map(|c| if is_instance_id_char(c) { c } else { '-' })
        .collect();
    let mut base = cleaned
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();
    base.truncate(MAX_INSTANCE_ID_LEN - suffix.len());
    if base.is_empty() {
        base = "instance".to_owned();
    }
    format!("{base}{suffix}")
}

#[cfg(test)]
pub(super) mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    pub(in crate::announce) fn args(extra: &[&str]) -> AnnounceArgs {
        let mut argv = vec!["haconfd", "announce", "--service", "web"];
        argv.extend(extra);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Announce(a) => a,
            _ => unreachable!(),
        }
    }

    pub(in crate::announce) fn spec(extra: &[&str]) -> Result<Spec, String> {
        Spec::parse(&args(extra)).map_err(|e| e.to_string())
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
