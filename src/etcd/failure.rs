//! What went wrong talking to etcd, sorted by what to do about it: every etcd-client error
//! becomes a [`Failure`] of one [`Kind`], with a message that names the call, the user (never
//! the password) and, where the cause is a setting, the setting to fix.

use std::fmt;
use std::time::Duration;

use crate::config::EtcdConfig;

// gRPC status codes (tonic is not a direct dependency).
const CODE_INVALID_ARGUMENT: i32 = 3;
const CODE_PERMISSION_DENIED: i32 = 7;
const CODE_OUT_OF_RANGE: i32 = 11;
const CODE_UNAUTHENTICATED: i32 = 16;

/// What went wrong talking to etcd, sorted by what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Down, unreachable, hung, or a stream broke: retry with backoff.
    Unavailable,
    /// Credentials refused or permission denied: retry slowly, log at error.
    Auth,
    /// A revision that etcd has compacted away: re-read at a new revision.
    Compacted,
    /// An answer larger than [`MAX_MESSAGE`]: read fewer keys at once, or read in pages.
    TooLarge,
    /// Anything else (bad TLS files, an unexpected answer): retry with backoff.
    Other,
}

#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) kind: Kind,
    message: String,
}

impl Failure {
    pub(crate) fn new(kind: Kind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }

    /// Classifies an etcd-client error; `what` says what was being done, `user` names the
    /// configured user (never the password) in auth errors.
    pub(crate) fn from_etcd(what: &str, e: &etcd_client::Error, user: Option<&str>) -> Failure {
        use etcd_client::Error as E;
        let who = match user {
            Some(u) => format!("user {u:?}"),
            None => "no user (etcd.username is not set)".to_owned(),
        };
        match e {
            E::GRpcStatus(s) => {
                let code = i32::from(s.code());
                let msg = s.message();
                if code == CODE_OUT_OF_RANGE && msg.contains("compacted") {
                    return Failure::new(Kind::Compacted, format!("{what}: {msg}"));
                }
                // tonic's own answer to a message above the decoding limit.
                if code == CODE_OUT_OF_RANGE && msg.contains("message length too large") {
                    return Failure::new(Kind::TooLarge, format!("{what}: {msg}"));
                }
                let auth = code == CODE_UNAUTHENTICATED
                    || code == CODE_PERMISSION_DENIED
                    || (code == CODE_INVALID_ARGUMENT
                        && (msg.contains("authentication failed")
                            || msg.contains("user name is empty")
                            || msg.contains("invalid auth token")));
                if auth {
                    let hint = if msg.contains("authentication failed") {
                        "check etcd.username and the password in etcd.password_file"
                    } else if msg.contains("user name is empty") {
                        "etcd has authentication enabled: set etcd.username and etcd.password_file"
                    } else if msg.contains("permission denied") && writes(what) {
                        "grant the user a role with readwrite permission on the prefix it writes, e.g. `etcdctl role grant-permission ROLE --prefix=true readwrite /services/`"
                    } else if msg.contains("permission denied") {
                        "grant the user a role that may read every configured source.prefixes"
                    } else {
                        "check the user's credentials and roles"
                    };
                    return Failure::new(
                        Kind::Auth,
                        format!("{what}: etcd refused {who}: {msg} ({hint})"),
                    );
                }
                let kind = if code == CODE_INVALID_ARGUMENT {
                    Kind::Other
                } else {
                    Kind::Unavailable
                };
                let mut text = format!("{what}: {msg}");
                let mut source = std::error::Error::source(s);
                while let Some(cause) = source {
                    let c = cause.to_string();
                    if !text.contains(&c) {
                        text.push_str(": ");
                        text.push_str(&c);
                    }
                    source = cause.source();
                }
                text.push_str(&format!(" ({})", s.code().description()));
                Failure::new(kind, text)
            }
            E::TransportError(_) | E::IoError(_) | E::WatchError(_) => {
                Failure::new(Kind::Unavailable, format!("{what}: {}", chain(e)))
            }
            _ => Failure::new(Kind::Other, format!("{what}: {}", chain(e))),
        }
    }

    /// A connection that failed before etcd said anything can mean the wrong TLS setup, and
    /// tonic only says that the connection was reset or closed: the hint names the setting.
    pub(crate) fn with_connect_hint(mut self, config: &EtcdConfig) -> Failure {
        if self.kind == Kind::Auth || self.kind == Kind::Compacted {
            return self;
        }
        let m = self.message.to_ascii_lowercase();
        let tls = config.ca_file.is_some() || config.cert_file.is_some();
        let plain = config.endpoints.iter().any(|e| e.starts_with("http://"));
        let dropped = [
            "connection reset",
            "connection closed",
            "broken pipe",
            "protocol error",
        ]
        .iter()
        .any(|p| m.contains(p));
        let hint = if !tls && plain && dropped {
            Some("if this etcd serves TLS, write https:// endpoints and set etcd.ca_file")
        } else if tls
            && config.cert_file.is_none()
            && (dropped
                || m.contains("certificate required")
                || m.contains("badcertificate")
                || m.contains("handshake"))
        {
            Some(
                "if etcd asks for client certificates (--client-cert-auth), set etcd.cert_file and etcd.key_file",
            )
        } else if tls && (m.contains("unknownissuer") || m.contains("invalid peer certificate")) {
            Some(
                "etcd's certificate is not signed by etcd.ca_file: point it at the CA that signed etcd's certificate",
            )
        } else {
            None
        };
        if let Some(hint) = hint {
            self.message.push_str(&format!(" ({hint})"));
        }
        self
    }

    pub(crate) fn timeout(what: &str, after: Duration) -> Failure {
        Failure::new(
            Kind::Unavailable,
            format!("{what}: no answer within {after:?} (etcd down, hung or unreachable)"),
        )
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Whether the call named `what` writes (a put, a delete, a lease), as opposed to a read.
fn writes(what: &str) -> bool {
    ["put", "delete", "lease", "txn", "revoke"]
        .iter()
        .any(|w| what.starts_with(w))
}

/// An error with its causes: tonic's transport errors say little at the top.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}
