//! Connecting to etcd: TLS, auth, keep-alive, and one member at a time.
//!
//! - Every connection uses HTTP/2 keep-alive (2 s ping, 2 s timeout, also while idle): without
//!   it a frozen etcd (SIGSTOP, a hung host) leaves a watch waiting forever with no error.
//! - `Client::connect` succeeds when nothing listens, so a connection is proven with `status()`.
//! - The password is read from `password_file` at every connect (so rotation works) and is
//!   never logged; an expired token is renewed by etcd-client (`with_auto_token_refresh`).
//! - [`Members`] talks to one member at a time and moves on when it fails or knows no leader.

use std::fmt;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, MaintenanceClient, TlsOptions};

use super::{Failure, Kind};
use crate::config::EtcdConfig;

/// HTTP/2 keep-alive: a ping every 2 s, a connection without an answer for 2 s is dead.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub(crate) const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Floors for durations the config accepts down to zero: a zero dial timeout would fail every
/// connect, a zero resync would re-read in a tight loop.
const MIN_DIAL_TIMEOUT: Duration = Duration::from_millis(100);

/// A password that never shows in Debug output or logs.
struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

fn read_password(config: &EtcdConfig) -> Result<Option<Password>, Failure> {
    let Some(path) = &config.password_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::new(
            Kind::Other,
            format!("cannot read etcd.password_file {}: {e}", path.display()),
        )
    })?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    Ok(Some(Password(text.to_owned())))
}

fn read_pem(key: &str, path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| {
        Failure::new(
            Kind::Other,
            format!("cannot read {key} {}: {e}", path.display()),
        )
    })
}

pub(crate) fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, Failure> {
    let mut options = ConnectOptions::new()
        .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(dial_timeout(config))
        // Adds the "hasleader: true" header: a member cut off from its cluster refuses to
        // serve stale data and cancels our watch instead of silently going quiet.
        .with_require_leader(true)
        // Renews an expired token and retries the call once, with the stored credentials.
        .with_auto_token_refresh(true);
    if config.ca_file.is_some() || config.cert_file.is_some() {
        if let Some(e) = config.endpoints.iter().find(|e| !e.starts_with("https://")) {
            return Err(Failure::new(
                Kind::Other,
                format!(
                    "etcd.endpoints: {e:?} is not https:// while etcd.ca_file or etcd.cert_file is set; write https:// endpoints"
                ),
            ));
        }
        let mut tls = TlsOptions::new();
        if let Some(ca) = &config.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read_pem("etcd.ca_file", ca)?));
        }
        if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
            tls = tls.identity(Identity::from_pem(
                read_pem("etcd.cert_file", cert)?,
                read_pem("etcd.key_file", key)?,
            ));
        }
        options = options.with_tls(tls);
    }
    if let Some(user) = &config.username {
        let password = read_password(config)?.unwrap_or(Password(String::new()));
        options = options.with_user(user.clone(), password.0);
    }
    Ok(options)
}

pub(crate) fn dial_timeout(config: &EtcdConfig) -> Duration {
    config.dial_timeout.max(MIN_DIAL_TIMEOUT)
}

/// Connects with `options` and proves the connection with `status()`: `Client::connect`
/// succeeds when nothing listens, the first real call fails. With credentials, connect
/// authenticates, a call that can hang: both are bounded.
async fn connect_status(
    config: &EtcdConfig,
    options: ConnectOptions,
) -> Result<(Client, etcd_client::StatusResponse), Failure> {
    let user = config.username.as_deref();
    let deadline = dial_timeout(config) + KEEP_ALIVE_TIMEOUT;
    let mut client =
        tokio::time::timeout(deadline, Client::connect(&config.endpoints, Some(options)))
            .await
            .map_err(|_| Failure::timeout("connect", deadline))?
            .map_err(|e| Failure::from_etcd("connect", &e, user).with_connect_hint(config))?;
    let status = tokio::time::timeout(deadline, client.status())
        .await
        .map_err(|_| Failure::timeout("status", deadline))?
        .map_err(|e| Failure::from_etcd("status", &e, user).with_connect_hint(config))?;
    Ok((client, status))
}

/// Connects to every endpoint at once with options built by the caller from
/// [`connect_options`], for one-off calls (`version`, `fleet`). Returns the client and etcd's
/// current revision.
pub(crate) async fn connect_with(
    config: &EtcdConfig,
    options: ConnectOptions,
) -> Result<(Client, i64), Failure> {
    let (client, status) = connect_status(config, options).await?;
    Ok((client, status.header().map(|h| h.revision()).unwrap_or(0)))
}

/// Connects to the one member `config.endpoints` names and proves it can serve now: it
/// answers `status()` and knows a leader. A member in an election, or cut off from the others,
/// is refused here, so the caller moves on to the next member at once instead of waiting out
/// calls that cannot succeed (or, with `require_leader`, a watch that is canceled). Returns the
/// client and etcd's current revision.
async fn connect_member(
    config: &EtcdConfig,
    options: ConnectOptions,
) -> Result<(Client, i64), Failure> {
    let (client, status) = connect_status(config, options).await?;
    if status.leader() == 0 {
        return Err(Failure::new(Kind::Unavailable, NO_LEADER));
    }
    Ok((client, status.header().map(|h| h.revision()).unwrap_or(0)))
}

const NO_LEADER: &str =
    "status: the member knows no leader (an election, or cut off from the cluster)";

/// Whether the member `maintenance` talks to still knows a leader, by its `status()` within
/// `deadline`. A member cut off from the others keeps answering what needs no quorum (status,
/// watch progress, HTTP/2 pings) and keeps a watch open that simply gets no events, so neither
/// the keep-alive nor a quiet watch notices. etcd cancels the streams of a `require_leader`
/// client only after three election timeouts without a leader: 4 to 6 s after the cut with
/// the default 1 s, when a follower also needs 1 to 2 s to notice it lost its leader. Asking
/// the member itself finds it as soon as it knows. With `require_leader` a leaderless member
/// refuses the call ("etcdserver: no leader"): a failure too.
pub(crate) async fn leader_known(
    maintenance: &mut MaintenanceClient,
    deadline: Duration,
    user: Option<&str>,
) -> Result<(), Failure> {
    let status = tokio::time::timeout(deadline, maintenance.status())
        .await
        .map_err(|_| Failure::timeout("status", deadline))?
        .map_err(|e| Failure::from_etcd("status", &e, user))?;
    if status.leader() == 0 {
        return Err(Failure::new(Kind::Unavailable, NO_LEADER));
    }
    Ok(())
}

/// The members of `[etcd] endpoints`, talked to one at a time. A client over every endpoint
/// spreads its calls and streams over them, dead and frozen members included: with one of
/// three members down, a lease holder's session of four calls succeeded about one time in
/// five, and a watch could be re-created on the frozen member again and again. Talking to one
/// member, and moving to the next as soon as it fails, makes failover take about one election.
#[derive(Debug, Default)]
pub(crate) struct Members {
    /// The index of the member to try first.
    next: usize,
}

impl Members {
    /// Connects to the first member that answers and knows a leader, trying each once, from
    /// the one after the last failure; `options` makes each member's connect options (TLS,
    /// auth, keep-alive). Returns the client and etcd's current revision.
    pub(crate) async fn connect(
        &mut self,
        config: &EtcdConfig,
        options: impl Fn(&EtcdConfig) -> Result<ConnectOptions, Failure>,
    ) -> Result<(Client, i64), Failure> {
        let n = config.endpoints.len();
        let mut last = Failure::new(Kind::Other, "etcd.endpoints is empty");
        for i in 0..n {
            let at = (self.next + i) % n;
            let mut one = config.clone();
            one.endpoints = vec![config.endpoints[at].clone()];
            match connect_member(&one, options(&one)?).await {
                Ok(connected) => {
                    self.next = at;
                    return Ok(connected);
                }
                Err(f) => {
                    // With one endpoint the caller's own log line says it all.
                    if n > 1 {
                        tracing::debug!(endpoint = %config.endpoints[at], error = %f, "etcd member unusable; trying the next");
                    }
                    last = f;
                }
            }
        }
        self.failed(n);
        Err(last)
    }

    /// The member in use failed: the next connect starts at the one after it.
    pub(crate) fn failed(&mut self, members: usize) {
        self.next = (self.next + 1) % members.max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_is_trimmed_and_redacted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\r\n").expect("write");
        let config = EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: Some("reader".into()),
            password_file: Some(path),
            dial_timeout: Duration::from_secs(1),
        };
        let pw = read_password(&config).expect("read").expect("some");
        assert_eq!(pw.0, "s3cret");
        assert_eq!(format!("{pw:?}"), "<redacted>");
    }
}
