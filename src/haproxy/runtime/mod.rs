//! The Runtime API fast path: apply a server-only change without a reload.
//!
//! [`plan`] derives the commands from files (two rendered files, a map file, or the running
//! servers against the installed file); this module sends them over one interactive session on
//! the runtime socket and checks every reply, and turns the lame-duck switch on.

mod plan;
pub mod typed;

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

pub use plan::{NeedsReload, filter_state, plan, plan_map, plan_state};

/// One `set server` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    Addr {
        backend: String,
        server: String,
        ip: IpAddr,
        port: u16,
    },
    Weight {
        backend: String,
        server: String,
        weight: u16,
    },
    State {
        backend: String,
        server: String,
        ready: bool,
    },
    /// Replaces a map's whole content in one step: `prepare map`, `add map @<version>` per
    /// entry, `commit map`. Until the commit, lookups see the old content.
    Map {
        path: String,
        entries: Vec<(String, String)>,
    },
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cmd::Addr {
                backend,
                server,
                ip,
                port,
            } => write!(f, "set server {backend}/{server} addr {ip} port {port}"),
            Cmd::Weight {
                backend,
                server,
                weight,
            } => write!(f, "set server {backend}/{server} weight {weight}"),
            Cmd::State {
                backend,
                server,
                ready,
            } => write!(
                f,
                "set server {backend}/{server} state {}",
                if *ready { "ready" } else { "maint" }
            ),
            Cmd::Map { path, entries } => {
                write!(f, "replace map {path} ({} entries)", entries.len())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("runtime socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime socket did not answer `{cmd}` within {timeout:?}")]
    Timeout { cmd: String, timeout: Duration },
    #[error("`{cmd}` was refused: {reply:?}")]
    Refused { cmd: String, reply: String },
}

/// Whether a reply to `cmd` means success. `set server … weight/state` answer nothing;
/// `addr` answers with what changed.
fn accepted(cmd: &Cmd, reply: &str) -> bool {
    match cmd {
        Cmd::Addr { .. } => {
            reply.starts_with("IP changed from")
                || reply.starts_with("port changed from")
                || reply.starts_with("no need to change the addr")
        }
        Cmd::Weight { .. } | Cmd::State { .. } => reply.is_empty(),
        Cmd::Map { .. } => false,
    }
}

/// Sends `cmds` over one interactive session on the runtime socket, checking every reply.
pub async fn apply(socket: &Path, cmds: &[Cmd], timeout: Duration) -> Result<(), RuntimeError> {
    let mut session = Session::open(socket, timeout).await?;
    for cmd in cmds {
        if let Cmd::Map { path, entries } = cmd {
            session.replace_map(path, entries).await?;
            continue;
        }
        let text = cmd.to_string();
        let reply = session.send(&text).await?;
        if !accepted(cmd, reply.trim()) {
            return Err(refused(text, &reply));
        }
    }
    let _ = session.write.write_all(b"quit\n").await;
    Ok(())
}

/// The lame-duck switch the default template holds: a server that is never sent traffic,
/// whose maintenance makes `monitor fail` answer the monitor URI with 503 and every response
/// carry `Connection: close`.
pub const LAME_DUCK_SWITCH: (&str, &str) = ("_lameduck", "serving");

/// Turns the lame duck on in the running HAProxy: one `set server` on the runtime socket, no
/// reload. Refused when the template lacks the switch (`No such backend`).
pub async fn lame_duck(socket: &Path, timeout: Duration) -> Result<(), RuntimeError> {
    let (backend, server) = LAME_DUCK_SWITCH;
    let cmd = Cmd::State {
        backend: backend.into(),
        server: server.into(),
        ready: false,
    };
    apply(socket, &[cmd], timeout).await
}

fn refused(cmd: String, reply: &str) -> RuntimeError {
    RuntimeError::Refused {
        cmd,
        reply: reply.trim().chars().take(300).collect(),
    }
}

/// An interactive session on the runtime socket: every answer ends with the `> ` prompt.
struct Session {
    read: BufReader<tokio::net::unix::OwnedReadHalf>,
    write: tokio::net::unix::OwnedWriteHalf,
    path: String,
    timeout: Duration,
}

impl Session {
    async fn open(socket: &Path, timeout: Duration) -> Result<Session, RuntimeError> {
        let path = socket.display().to_string();
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| RuntimeError::Timeout {
                cmd: "connect".into(),
                timeout,
            })?
            .map_err(|source| RuntimeError::Io {
                path: path.clone(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let mut session = Session {
            read: BufReader::new(read),
            write,
            path,
            timeout,
        };
        session.send("prompt").await?;
        Ok(session)
    }

    fn io(&self) -> impl FnOnce(std::io::Error) -> RuntimeError + use<> {
        let path = self.path.clone();
        move |source| RuntimeError::Io { path, source }
    }

    /// Sends one command and reads its answer.
    async fn send(&mut self, cmd: &str) -> Result<String, RuntimeError> {
        let io = self.io();
        self.write
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .map_err(io)?;
        read_reply(&mut self.read, cmd, self.timeout).await
    }

    /// One map replaced in one step. The adds go out in one write while their (empty) answers
    /// are read: one round trip per entry would cost tens of milliseconds for a few thousand
    /// hosts. An uncommitted version is dropped by HAProxy, so a failure leaves the map as it
    /// was.
    async fn replace_map(
        &mut self,
        path: &str,
        entries: &[(String, String)],
    ) -> Result<(), RuntimeError> {
        let prepare = format!("prepare map {path}");
        let reply = self.send(&prepare).await?;
        let version: u64 = reply
            .trim()
            .strip_prefix("New version created: ")
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| refused(prepare.clone(), &reply))?;
        let mut batch = String::with_capacity(entries.len() * 64);
        for (k, v) in entries {
            batch.push_str(&format!("add map @{version} {path} {k} {v}\n"));
        }
        let (io, timeout) = (self.io(), self.timeout);
        let (read, write) = (&mut self.read, &mut self.write);
        let send = async { write.write_all(batch.as_bytes()).await.map_err(io) };
        let check = async {
            for (k, _) in entries {
                let cmd = format!("add map @{version} {path} {k}");
                let reply = read_reply(read, &cmd, timeout).await?;
                if !reply.trim().is_empty() {
                    return Err(refused(cmd, &reply));
                }
            }
            Ok(())
        };
        let (sent, checked) = tokio::join!(send, check);
        sent?;
        checked?;
        let commit = format!("commit map @{version} {path}");
        let reply = self.send(&commit).await?;
        if !reply.trim().is_empty() {
            return Err(refused(commit, &reply));
        }
        Ok(())
    }
}

/// Reads one answer: everything up to the prompt `> ` that follows it.
async fn read_reply(
    read: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    cmd: &str,
    timeout: Duration,
) -> Result<String, RuntimeError> {
    let mut out = Vec::new();
    let work = async {
        loop {
            let mut byte = [0u8; 1];
            let n = tokio::io::AsyncReadExt::read(read, &mut byte).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            out.push(byte[0]);
            if out.ends_with(b"\n> ") || out == b"> " {
                out.truncate(out.len() - 2);
                return Ok(());
            }
            if out.len() > 1 << 20 {
                return Ok(());
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => Ok(String::from_utf8_lossy(&out).into_owned()),
        Ok(Err(source)) => Err(RuntimeError::Io {
            path: String::new(),
            source,
        }),
        Err(_) => Err(RuntimeError::Timeout {
            cmd: cmd.to_owned(),
            timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_checked_exactly() {
        let w = Cmd::Weight {
            backend: "b".into(),
            server: "s".into(),
            weight: 1,
        };
        assert!(accepted(&w, ""));
        assert!(!accepted(&w, "No such server."));
        let a = Cmd::Addr {
            backend: "b".into(),
            server: "s".into(),
            ip: "127.0.0.1".parse().expect("ip"),
            port: 1,
        };
        assert!(accepted(
            &a,
            "IP changed from '127.0.0.1' to '127.0.0.2' by 'stats socket command'"
        ));
        assert!(!accepted(&a, "Require 'backend/server'."));
    }
}
