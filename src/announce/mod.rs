//! The presence sidecar: `haconfd announce` registers one service instance in etcd under a
//! lease, keeps the lease alive, and removes the key when the instance stops or fails its
//! health check.
//!
//! In: the command line and the config's `[etcd]` (endpoints, TLS, auth). Out: one key,
//! `/services/<service>/<id>`, whose value the daemon is known to accept: every argument is
//! checked with the registry's own rules (`model`), and the finished key and value are read
//! back through `Snapshot::screen` and `Registry::parse` before anything is written.
//!
//! - `args`: the command line, checked with `model`'s rules before anything starts.
//! - `check`: the tcp:// and http:// health probes with rise / fall.
//! - `docker`: the published host port of a container, from the Docker Engine API.
//! - `session`: the lease, its keep-alive, re-registration after outages and lease loss, and
//!   the revoke on SIGTERM / SIGINT.

mod args;
mod check;
mod docker;
mod session;

use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::backoff::Backoff;
use crate::cli::AnnounceArgs;
use crate::config::ConfigSource;
use crate::config::EtcdConfig;
use crate::failure::Failure;
use crate::model::{
    Addr, Host, InstanceValue, MAX_VALUE_LEN, Registry, SERVICES_PREFIX, Snapshot, is_instance_id,
};
use args::{Spec, Target, default_id, usage};

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

/// The key and value to keep in etcd.
#[derive(Debug, Clone)]
struct Registration {
    key: String,
    value: String,
    ttl: Duration,
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
        let instance = spec.instance(addr);
        let value = instance
            .encode()
            .map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot encode the value: {e}")))?;
        if value.len() > MAX_VALUE_LEN {
            return Err(usage(
                "--meta",
                format!("{} entries", instance.meta.len()),
                &format!(
                    "the value would be longer than the registry accepts ({MAX_VALUE_LEN} bytes)"
                ),
                "give fewer or shorter --meta entries",
            ));
        }
        registry_accepts(&key, &value, &instance).map_err(|e| {
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
/// registry. Announce never writes what the daemon would leave out, or read as another
/// instance than `instance`.
fn registry_accepts(key: &str, value: &str, instance: &InstanceValue) -> Result<(), String> {
    let prefixes = [SERVICES_PREFIX.to_owned()];
    let (snapshot, mut rejected) = Snapshot::screen(0, &prefixes, [(key, value)]);
    let (registry, more) = Registry::parse(&snapshot);
    rejected.extend(more);
    if let Some(r) = rejected.first() {
        return Err(r.reason.clone());
    }
    let read = match registry.services.as_slice() {
        [service] => match service.instances.as_slice() {
            [read] => read,
            _ => return Err("the registry does not read it as one instance".into()),
        },
        _ => return Err("the registry does not read it as one instance".into()),
    };
    if (read.addr.as_str(), read.weight, read.state, &read.meta)
        != (
            instance.addr.to_string().as_str(),
            instance.weight,
            instance.state,
            &instance.meta,
        )
    {
        return Err("the registry reads it as another instance".into());
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
    use super::args::tests::{args, spec};
    use super::*;

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

    /// What announce writes, the registry reads back as the instance announce meant: the same
    /// typed value through `InstanceValue::parse`, and the same instance through the daemon's
    /// own path (the raw screen, then `Registry::parse`).
    #[test]
    fn what_announce_writes_reads_back_as_the_same_instance() {
        let cases: &[&[&str]] = &[
            &["--addr", "127.0.0.5:8080"],
            &["--addr", "[::1]:80", "--weight", "0"],
            &[
                "--addr",
                "Web1.Internal:80",
                "--weight",
                "256",
                "--meta",
                "zone=a",
                "--meta",
                "build=1.2.3",
            ],
            &["--addr", "127.0.0.1:9000", "--weight", "100"],
            &[
                "--addr",
                "127.0.0.1:9000",
                "--meta",
                "caf\u{e9}=\u{fc}ber=1",
            ],
        ];
        for extra in cases {
            let s = spec(extra).expect("valid");
            let Target::Addr { addr } = &s.target else {
                panic!("not an addr")
            };
            let meant = s.instance(addr);
            let reg = Registration::build(&s, "i1", addr).expect("builds");
            assert_eq!(reg.key, "/services/web/i1");
            assert_eq!(
                InstanceValue::parse(&reg.value),
                Ok(meant.clone()),
                "{extra:?}"
            );
            let prefixes = [SERVICES_PREFIX.to_owned()];
            let (snapshot, rejected) =
                Snapshot::screen(1, &prefixes, [(reg.key.as_str(), reg.value.as_str())]);
            let (registry, more) = Registry::parse(&snapshot);
            assert!(rejected.is_empty() && more.is_empty(), "{extra:?}");
            let read = &registry.services[0].instances[0];
            assert_eq!(
                (read.id.as_str(), read.addr.clone(), read.weight, read.state),
                ("i1", meant.addr.to_string(), meant.weight, meant.state),
                "{extra:?}"
            );
            assert_eq!(read.meta, meant.meta, "{extra:?}");
        }
    }

    /// One instance, given to announce as arguments and to the registry as a hand-written key
    /// and value.
    #[derive(Debug, Clone)]
    struct Row {
        service: String,
        id: String,
        addr: String,
        weight: Option<u16>,
        meta: Vec<(String, String)>,
    }

    impl Row {
        fn announce_takes(&self) -> bool {
            let mut argv = vec![format!("--id={}", self.id), format!("--addr={}", self.addr)];
            if let Some(w) = self.weight {
                argv.push(format!("--weight={w}"));
            }
            for (k, v) in &self.meta {
                argv.push(format!("--meta={k}={v}"));
            }
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let mut a = args(&argv);
            a.service = self.service.clone();
            let Ok(s) = Spec::parse(&a) else {
                return false;
            };
            let Target::Addr { addr } = &s.target else {
                panic!("not an addr")
            };
            Registration::build(&s, &self.id, addr).is_ok()
        }

        /// The registry's verdict on the value a hand writes: JSON only when a field needs it;
        /// with `escape`, every non-ASCII character as a JSON `\u` escape, which the raw screen
        /// cannot see through.
        fn registry_takes(&self, escape: bool) -> bool {
            let key = format!("{SERVICES_PREFIX}{}/{}", self.service, self.id);
            let value = if self.weight.is_none() && self.meta.is_empty() {
                self.addr.clone()
            } else {
                let mut json = serde_json::Map::new();
                json.insert("addr".into(), self.addr.clone().into());
                if let Some(w) = self.weight {
                    json.insert("weight".into(), w.into());
                }
                if !self.meta.is_empty() {
                    let meta: serde_json::Map<String, serde_json::Value> = self
                        .meta
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone().into()))
                        .collect();
                    json.insert("meta".into(), meta.into());
                }
                let text = serde_json::Value::Object(json).to_string();
                if escape {
                    let mut out = String::new();
                    for c in text.chars() {
                        if c.is_ascii() {
                            out.push(c);
                        } else {
                            for unit in c.encode_utf16(&mut [0; 2]) {
                                out.push_str(&format!("\\u{unit:04x}"));
                            }
                        }
                    }
                    out
                } else {
                    text
                }
            };
            let prefixes = [SERVICES_PREFIX.to_owned()];
            let (snapshot, mut rejected) =
                Snapshot::screen(1, &prefixes, [(key.as_str(), value.as_str())]);
            let (registry, more) = Registry::parse(&snapshot);
            rejected.extend(more);
            rejected.is_empty() && registry.instance_count() == 1
        }
    }

    /// Announce refuses exactly what the registry refuses: every rule announce applies to a
    /// registry field is the registry's own. The one exception is an unspecified address,
    /// which the registry takes and announce refuses (no proxy can connect to it).
    #[test]
    fn announce_refuses_exactly_what_the_registry_refuses() {
        let base = Row {
            service: "web".into(),
            id: "i1".into(),
            addr: "127.0.0.1:8080".into(),
            weight: None,
            meta: Vec::new(),
        };
        let mut rows = vec![base.clone()];
        let long = |c: &str, n: usize| c.repeat(n);
        for service in [
            "web-1.v2_x".to_owned(),
            "9web".into(),
            "Web".into(),
            "_web".into(),
            String::new(),
            long("a", 63),
            long("a", 64),
            "web@x".into(),
            "w\u{e9}b".into(),
        ] {
            rows.push(Row {
                service,
                ..base.clone()
            });
        }
        for id in [
            "a:b.c_d-e".to_owned(),
            "I-1".into(),
            "-i1".into(),
            ".i1".into(),
            "i@1".into(),
            String::new(),
            long("x", 128),
            long("x", 129),
            "a/b".into(),
            "\u{e9}".into(),
        ] {
            rows.push(Row { id, ..base.clone() });
        }
        for addr in [
            "[::1]:80",
            "LOCALHOST:4",
            "web1.internal:65535",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1",
            "::1:80",
            "under_score:80",
            "[fe80::1%eth0]:80",
            "127.1:80",
            "a b:80",
            "host;x:80",
        ] {
            rows.push(Row {
                addr: addr.into(),
                ..base.clone()
            });
        }
        for weight in [0, 1, 100, 256, 257, 65535] {
            rows.push(Row {
                weight: Some(weight),
                ..base.clone()
            });
        }
        let one = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        let metas = [
            one("zone", "a"),
            one("caf\u{e9}", "\u{fc}ber"),
            one("k", ""),
            one("k", "a b"),
            one("k", "a\tb"),
            one("k", "a;b"),
            one("k", "a\"b"),
            one("k", "a\\b"),
            one("k", "a#b"),
            one("k", "a$b"),
            one("k", "a'b"),
            one("k", "a\u{85}"),
            one("k", "a\u{2028}"),
            one("k", "a\u{200b}"),
            one("k", "a\u{202e}"),
            one("k", "\u{feff}x"),
            one("k", "a\u{fffd}"),
            one("k", &long("x", 256)),
            one("k", &long("x", 257)),
            one(&long("n", 64), "v"),
            one(&long("n", 65), "v"),
            one("k#", "v"),
            one("k\u{200b}", "v"),
            one("", "v"),
            (0..32).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
            (0..33).map(|i| (format!("k{i}"), "v".to_owned())).collect(),
            // 32 entries at the name and value limits: over the registry's 8 KiB per value.
            (0..32)
                .map(|i| (format!("{i:0>64}"), long("v", 256)))
                .collect(),
        ];
        for meta in metas {
            rows.push(Row {
                meta,
                ..base.clone()
            });
        }
        let (mut taken, mut refused) = (0, 0);
        for row in &rows {
            let announce = row.announce_takes();
            assert_eq!(announce, row.registry_takes(false), "{row:?}");
            assert_eq!(announce, row.registry_takes(true), "escaped: {row:?}");
            if announce {
                taken += 1;
            } else {
                refused += 1;
            }
        }
        assert!(
            taken >= 15 && refused >= 40,
            "{taken} taken, {refused} refused"
        );
        for addr in ["0.0.0.0:80", "[::]:80"] {
            let row = Row {
                addr: addr.into(),
                ..base.clone()
            };
            assert!(row.registry_takes(false) && !row.announce_takes(), "{addr}");
        }
    }
}
