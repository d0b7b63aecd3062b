//! The Runtime API fast path: apply a server-only change without a reload.
//!
//! The plan is derived from the two rendered files, not from the registry, so it holds for any
//! template: when the old and the new file differ only in `server` lines that keep their
//! backend, position and name, and only in the address, the weight and `disabled`, the
//! difference is exactly a list of `set server` commands. Anything else — a new line, a renamed
//! server, another keyword, a host name instead of an IP — needs a reload. Every token sent to
//! the socket is parsed and printed again (IP address, port, weight), so no raw text from a
//! file or a source reaches a command.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

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
        }
    }
}

/// A parsed `server` line.
#[derive(Debug, PartialEq, Eq)]
struct Server<'a> {
    name: &'a str,
    ip: IpAddr,
    port: u16,
    weight: u16,
    disabled: bool,
    /// Every other token, in order: must be equal on both sides.
    rest: Vec<&'a str>,
}

/// HAProxy's names: letters, digits, '-', '_', '.', ':'.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn parse_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        s.rsplit_once(':')?
    };
    Some((host.parse().ok()?, port.parse().ok()?))
}

fn parse_server(line: &str) -> Option<Server<'_>> {
    let mut words = line.split_whitespace();
    if words.next()? != "server" {
        return None;
    }
    let name = words.next().filter(|n| is_name(n))?;
    let (ip, port) = parse_addr(words.next()?)?;
    let mut weight = 1;
    let mut disabled = false;
    let mut rest = Vec::new();
    while let Some(w) = words.next() {
        match w {
            "weight" => weight = words.next()?.parse().ok()?,
            "disabled" => disabled = true,
            other if other.starts_with('#') => break,
            other => rest.push(other),
        }
    }
    Some(Server {
        name,
        ip,
        port,
        weight,
        disabled,
        rest,
    })
}

/// Why a change needs a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedsReload(pub String);

/// The commands that turn what runs (`old`) into `new`, or why a reload is needed.
pub fn plan(old: &str, new: &str) -> Result<Vec<Cmd>, NeedsReload> {
    let reload = |why: String| Err(NeedsReload(why));
    let (old_lines, new_lines): (Vec<&str>, Vec<&str>) =
        (old.lines().collect(), new.lines().collect());
    if old_lines.len() != new_lines.len() {
        return reload("lines were added or removed".into());
    }
    let mut backend: Option<&str> = None;
    let mut cmds = Vec::new();
    for (i, (a, b)) in old_lines.iter().zip(&new_lines).enumerate() {
        let first = a.split_whitespace().next();
        if first.is_some_and(|w| {
            matches!(w, "backend" | "frontend" | "listen" | "defaults" | "global")
                || !a.starts_with(char::is_whitespace)
        }) {
            backend = match a.split_whitespace().collect::<Vec<_>>()[..] {
                ["backend", name] if is_name(name) => Some(name),
                _ => None,
            };
        }
        if a == b {
            continue;
        }
        let line = i + 1;
        let (Some(be), Some(sa), Some(sb)) = (backend, parse_server(a), parse_server(b)) else {
            return reload(format!(
                "line {line} changed outside a backend's server lines"
            ));
        };
        if sa.name != sb.name || sa.rest != sb.rest {
            return reload(format!("line {line}: the server's name or options changed"));
        }
        let (backend, server) = (be.to_owned(), sb.name.to_owned());
        if sb.disabled && !sa.disabled {
            cmds.push(Cmd::State {
                backend: backend.clone(),
                server: server.clone(),
                ready: false,
            });
        }
        if (sa.ip, sa.port) != (sb.ip, sb.port) {
            cmds.push(Cmd::Addr {
                backend: backend.clone(),
                server: server.clone(),
                ip: sb.ip,
                port: sb.port,
            });
        }
        if sa.weight != sb.weight {
            if sb.weight > 256 {
                return reload(format!("line {line}: weight above 256"));
            }
            cmds.push(Cmd::Weight {
                backend: backend.clone(),
                server: server.clone(),
                weight: sb.weight,
            });
        }
        if sa.disabled && !sb.disabled {
            cmds.push(Cmd::State {
                backend,
                server,
                ready: true,
            });
        }
    }
    Ok(cmds)
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
    }
}

/// Sends `cmds` over one interactive session on the runtime socket, checking every reply.
pub async fn apply(socket: &Path, cmds: &[Cmd], timeout: Duration) -> Result<(), RuntimeError> {
    let path = socket.display().to_string();
    let io = |source| RuntimeError::Io {
        path: path.clone(),
        source,
    };
    let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
        .await
        .map_err(|_| RuntimeError::Timeout {
            cmd: "connect".into(),
            timeout,
        })?
        .map_err(io)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    // Interactive mode: every answer ends with an empty line and the "> " prompt.
    write.write_all(b"prompt\n").await.map_err(io)?;
    read_reply(&mut read, "prompt", timeout).await?;
    for cmd in cmds {
        let text = cmd.to_string();
        write
            .write_all(format!("{text}\n").as_bytes())
            .await
            .map_err(io)?;
        let reply = read_reply(&mut read, &text, timeout).await?;
        if !accepted(cmd, reply.trim()) {
            return Err(RuntimeError::Refused {
                cmd: text,
                reply: reply.trim().chars().take(300).collect(),
            });
        }
    }
    let _ = write.write_all(b"quit\n").await;
    Ok(())
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

    const OLD: &str = "\
global
    master-worker
backend be_web
    balance roundrobin
    server srv1 127.0.0.1:8001 weight 100
    server srv2 127.0.0.1:8002 weight 100
    server srv3 127.0.0.1:1 disabled
backend be_api
    server srv1 [::1]:9000 weight 10
";

    fn cmds(new: &str) -> Vec<String> {
        match plan(OLD, new) {
            Ok(c) => c.iter().map(ToString::to_string).collect(),
            Err(e) => panic!("needs reload: {}", e.0),
        }
    }

    #[test]
    fn address_weight_and_state_changes_become_commands() {
        let new = OLD
            .replace(
                "srv2 127.0.0.1:8002 weight 100",
                "srv2 127.0.0.1:8012 weight 50",
            )
            .replace(
                "srv3 127.0.0.1:1 disabled",
                "srv3 127.0.0.1:8003 weight 100",
            )
            .replace("srv1 [::1]:9000 weight 10", "srv1 127.0.0.1:1 disabled");
        assert_eq!(
            cmds(&new),
            vec![
                "set server be_web/srv2 addr 127.0.0.1 port 8012",
                "set server be_web/srv2 weight 50",
                "set server be_web/srv3 addr 127.0.0.1 port 8003",
                "set server be_web/srv3 weight 100",
                "set server be_web/srv3 state ready",
                "set server be_api/srv1 state maint",
                "set server be_api/srv1 addr 127.0.0.1 port 1",
                "set server be_api/srv1 weight 1",
            ]
        );
        assert!(cmds(OLD).is_empty());
    }

    #[test]
    fn structural_changes_need_a_reload() {
        for new in [
            OLD.replace("balance roundrobin", "balance leastconn"),
            OLD.replace("srv2 127.0.0.1:8002", "srv9 127.0.0.1:8002"),
            OLD.replace(
                "srv2 127.0.0.1:8002 weight 100",
                "srv2 localhost:8002 weight 100",
            ),
            OLD.replace(
                "srv2 127.0.0.1:8002 weight 100",
                "srv2 127.0.0.1:8002 weight 100 backup",
            ),
            format!("{OLD}    server srv2 127.0.0.1:8004 weight 1\n"),
            OLD.replace("    master-worker\n", "    master-worker\n    nbthread 2\n"),
        ] {
            assert!(plan(OLD, &new).is_err(), "should reload:\n{new}");
        }
    }

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
