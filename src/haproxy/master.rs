//! HAProxy's master CLI: `show proc`, and a `reload` that is confirmed, never fired and
//! forgotten.
//!
//! In 2.6 `reload` prints nothing and closes the connection; success shows in `show proc`: the
//! master's reload counter rises and `[failed: 0]`. A reload sent without confirmation can be
//! lost or merged with another, so every reload here waits for the counter to move.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("master socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("master socket {path} did not answer within {timeout:?}")]
    Timeout { path: String, timeout: Duration },
    #[error("unexpected `show proc` answer from {path}: {answer:?}")]
    Unparsable { path: String, answer: String },
    #[error(
        "reload not confirmed: the reload counter stayed at {reloads} for {timeout:?} (master socket {path})"
    )]
    NotConfirmed {
        path: String,
        reloads: u64,
        timeout: Duration,
    },
    #[error(
        "HAProxy could not load the new config (reload {reloads}, failed: {failed}); the old worker keeps serving"
    )]
    LoadFailed { reloads: u64, failed: u64 },
}

/// The master's line of `show proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcInfo {
    pub master_pid: u32,
    pub reloads: u64,
    pub failed: u64,
    pub workers: usize,
}

/// Parses `show proc`:
/// ```text
/// #<PID>          <type>          <reloads>       <uptime>        <version>
/// 6988            master          1 [failed: 0]   0d00h00m01s     2.6.12-1+deb12u4
/// # workers
/// 6999            worker          0               0d00h00m00s     2.6.12-1+deb12u4
/// ```
pub fn parse_show_proc(text: &str) -> Option<ProcInfo> {
    let mut master = None;
    let mut workers = 0;
    let mut in_workers = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            in_workers = line.contains("workers");
            if line.contains("programs") {
                in_workers = false;
            }
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.get(1) {
            Some(&"master") => {
                let pid = fields.first()?.parse().ok()?;
                let reloads = fields.get(2)?.parse().ok()?;
                let failed = match (fields.get(3), fields.get(4)) {
                    (Some(&"[failed:"), Some(n)) => n.trim_end_matches(']').parse().ok()?,
                    _ => 0,
                };
                master = Some((pid, reloads, failed));
            }
            Some(&"worker") if in_workers => workers += 1,
            _ => {}
        }
    }
    let (master_pid, reloads, failed) = master?;
    Some(ProcInfo {
        master_pid,
        reloads,
        failed,
        workers,
    })
}

/// Sends one command to a HAProxy CLI socket and returns the whole answer.
pub async fn command(socket: &Path, cmd: &str, timeout: Duration) -> Result<String, MasterError> {
    let path = socket.display().to_string();
    let talk = async {
        let mut s = UnixStream::connect(socket).await?;
        s.write_all(cmd.as_bytes()).await?;
        s.write_all(b"\n").await?;
        // Half-close: the master CLI answers and closes only once it sees the end of input.
        s.shutdown().await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    match tokio::time::timeout(timeout, talk).await {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(source)) => Err(MasterError::Io { path, source }),
        Err(_) => Err(MasterError::Timeout { path, timeout }),
    }
}

/// `show proc`, parsed.
pub async fn show_proc(socket: &Path, timeout: Duration) -> Result<ProcInfo, MasterError> {
    let answer = command(socket, "show proc", timeout).await?;
    parse_show_proc(&answer).ok_or_else(|| MasterError::Unparsable {
        path: socket.display().to_string(),
        answer: answer.chars().take(300).collect(),
    })
}

/// Waits until the master socket answers `show proc` with at least one worker.
pub async fn wait_ready(socket: &Path, timeout: Duration) -> Result<ProcInfo, MasterError> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = show_proc(socket, Duration::from_secs(1)).await;
        match last {
            Ok(info) if info.workers > 0 => return Ok(info),
            _ if Instant::now() >= deadline => {
                return Err(last.err().unwrap_or(MasterError::Timeout {
                    path: socket.display().to_string(),
                    timeout,
                }));
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Reloads through the master socket and confirms it: the reload counter must rise within
/// `timeout` and `failed` must be 0 afterwards.
pub async fn reload(socket: &Path, timeout: Duration) -> Result<ProcInfo, MasterError> {
    let before = show_proc(socket, timeout).await?;
    // `reload` answers nothing and closes; an error here may just be the master re-executing.
    let _ = command(socket, "reload", timeout).await;
    let deadline = Instant::now() + timeout;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The master socket is briefly gone while the master re-executes: keep polling.
        if let Ok(info) = show_proc(socket, Duration::from_secs(1)).await
            && info.reloads > before.reloads
        {
            if info.failed > 0 {
                return Err(MasterError::LoadFailed {
                    reloads: info.reloads,
                    failed: info.failed,
                });
            }
            return Ok(info);
        }
        if Instant::now() >= deadline {
            return Err(MasterError::NotConfirmed {
                path: socket.display().to_string(),
                reloads: before.reloads,
                timeout,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_show_proc_of_2_6() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>\n\
                    6988            master          1 [failed: 0]   0d00h00m01s     2.6.12-1+deb12u4\n\
                    # workers\n\
                    6999            worker          0               0d00h00m00s     2.6.12-1+deb12u4\n\
                    # programs\n\n";
        assert_eq!(
            parse_show_proc(text),
            Some(ProcInfo {
                master_pid: 6988,
                reloads: 1,
                failed: 0,
                workers: 1
            })
        );
        let failed = text.replace("[failed: 0]", "[failed: 2]");
        assert_eq!(parse_show_proc(&failed).map(|p| p.failed), Some(2));
        assert_eq!(parse_show_proc("Unknown command\n"), None);
    }
}
