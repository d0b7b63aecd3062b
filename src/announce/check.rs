//! Health checks: a probe every interval; the instance counts as up after the first passing
//! probe, down after `fall` failures in a row, and up again after `rise` passes in a row.
//! The session watches the verdict and keeps the key only while it is up.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// The longest a probe may take, at most the interval.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of an HTTP answer read to find its status line.
const MAX_STATUS_LINE: usize = 4096;

/// What to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Probe {
    /// Connect to `addr` (`host:port`, `[v6]:port`).
    Tcp { addr: String },
    /// `GET path` from `addr`, passing on a 2xx or 3xx status.
    Http { addr: String, path: String },
}

/// A health check, as given on the command line.
#[derive(Debug, Clone)]
pub(super) struct Check {
    /// The --check URL, for logs.
    pub(super) url: String,
    pub(super) probe: Probe,
    pub(super) interval: Duration,
    pub(super) rise: u32,
    pub(super) fall: u32,
}

/// The current verdict: always up without a check.
pub(super) struct Health {
    rx: Option<watch::Receiver<bool>>,
}

impl Health {
    /// Starts probing (when there is a check). Until the first probe answers, the instance
    /// counts as down, so that a dead instance is never registered.
    pub(super) fn spawn(check: Option<Check>) -> Health {
        let Some(check) = check else {
            return Health { rx: None };
        };
        let (tx, rx) = watch::channel(false);
        tokio::spawn(run(check, tx));
        Health { rx: Some(rx) }
    }

    pub(super) fn is_up(&self) -> bool {
        self.rx.as_ref().is_none_or(|rx| *rx.borrow())
    }

    /// Waits for the verdict to change. Never returns without a check. Cancel-safe.
    pub(super) async fn changed(&mut self) {
        match &mut self.rx {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    // The checker is gone (it only ends with the process): nothing changes
                    // any more.
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

async fn run(check: Check, tx: watch::Sender<bool>) {
    let timeout = check.interval.min(PROBE_TIMEOUT);
    let mut ticker = tokio::time::interval(check.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    let mut passes = 0u32;
    let mut failures = 0u32;
    loop {
        ticker.tick().await;
        let result = probe(&check.probe, timeout).await;
        let up = *tx.borrow();
        match result {
            Ok(()) => {
                passes += 1;
                failures = 0;
                if !up && (first || passes >= check.rise) {
                    tracing::info!(check = %check.url, passes, "health check passes: registering");
                    let _ = tx.send(true);
                }
            }
            Err(e) => {
                failures += 1;
                passes = 0;
                if first {
                    tracing::warn!(check = %check.url, error = %e, "health check fails: not registering until it passes");
                } else if up && failures >= check.fall {
                    tracing::warn!(check = %check.url, error = %e, failures, "health check fails: removing the key");
                    let _ = tx.send(false);
                } else {
                    tracing::debug!(check = %check.url, error = %e, failures, "health check failed");
                }
            }
        }
        first = false;
        if tx.is_closed() {
            return;
        }
    }
}

/// One probe, bounded by `timeout`.
pub(super) async fn probe(probe: &Probe, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, probe_once(probe)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}ms", timeout.as_millis())),
    }
}

async fn probe_once(probe: &Probe) -> Result<(), String> {
    match probe {
        Probe::Tcp { addr } => TcpStream::connect(addr.as_str())
            .await
            .map(drop)
            .map_err(|e| format!("connect to {addr}: {e}")),
        Probe::Http { addr, path } => {
            let mut s = TcpStream::connect(addr.as_str())
                .await
                .map_err(|e| format!("connect to {addr}: {e}"))?;
            let request = format!(
                "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: haconfd-announce\r\nConnection: close\r\n\r\n"
            );
            s.write_all(request.as_bytes())
                .await
                .map_err(|e| format!("send to {addr}: {e}"))?;
            let mut buf = Vec::with_capacity(256);
            let mut chunk = [0u8; 512];
            while !buf.contains(&b'\n') && buf.len() < MAX_STATUS_LINE {
                let n = s
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("read from {addr}: {e}"))?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let status = status_code(&buf)
                .ok_or_else(|| format!("{addr} answered without an HTTP status line"))?;
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(format!("GET {path} answered {status}"))
            }
        }
    }
}

/// The status of an HTTP/1.x status line (`HTTP/1.1 200 OK`).
pub(super) fn status_code(head: &[u8]) -> Option<u16> {
    let end = head.iter().position(|b| *b == b'\n')?;
    let line = std::str::from_utf8(&head[..end]).ok()?.trim_end();
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok().filter(|c| (100..600).contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status_code(b"HTTP/1.0 302 Found\r\nLocation: /\r\n"),
            Some(302)
        );
        assert_eq!(status_code(b"HTTP/1.1 503\r\n"), Some(503));
        assert_eq!(status_code(b"HTTP/1.1 200 OK"), None);
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 2000 OK\r\n"), None);
    }
}
