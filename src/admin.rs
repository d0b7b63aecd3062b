//! The admin endpoint on `[admin] listen`: `/metrics` (Prometheus / OpenMetrics text),
//! `/healthz` (the process answers) and `/readyz` (a first apply succeeded and the source
//! confirmed its state within `[admin] stale_after`; otherwise 503 with a short reason). A minimal HTTP/1.1 responder: one request per
//! connection, bounded reads, no keep-alive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

/// Binds `listen` and serves until the task is dropped.
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen).await
}

/// Serves requests on `listener` forever.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &metrics)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, ctype, body) = route(method, path, metrics);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The response for one request: status line, content type, body.
pub fn route(method: &str, path: &str, metrics: &Metrics) -> (&'static str, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "GET only\n".into());
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => ("200 OK", TEXT, "ok\n".into()),
        "/readyz" => {
            // A disconnection not yet stale, an install failing on the disk not yet for long, and
            // what is held back follow the verdict, one line each.
            let detail: String = metrics
                .source_detail()
                .into_iter()
                .chain(metrics.install_detail())
                .chain(metrics.config_detail())
                .chain(metrics.held_detail())
                .map(|l| format!("{l}\n"))
                .collect();
            match metrics.readiness() {
                Ok(()) => ("200 OK", TEXT, format!("ready\n{detail}")),
                // A stopping node says so first: its operator knows why, a probe needs no more.
                Err(why) if metrics.stopping() => {
                    ("503 Service Unavailable", TEXT, format!("{why}\n{detail}"))
                }
                Err(why) => (
                    "503 Service Unavailable",
                    TEXT,
                    format!("not ready: {why}\n{detail}"),
                ),
            }
        }
        _ => (
            "404 Not Found",
            TEXT,
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::haproxy::ApplyKind;

    #[test]
    fn routes_answer_as_documented() {
        let m = Metrics::default();
        assert_eq!(route("GET", "/healthz", &m).0, "200 OK");
        let (status, _, body) = route("GET", "/readyz", &m);
        assert_eq!(status, "503 Service Unavailable");
        assert!(body.contains("no successful apply yet"), "{body}");
        m.source_update(1);
        m.applied(ApplyKind::Start, 1);
        assert_eq!(route("GET", "/readyz", &m).0, "200 OK");
        m.set_held(&["web".into()], &["/services/api/a1".into()]);
        let body = route("GET", "/readyz", &m).2;
        assert!(body.starts_with("ready\n"), "{body}");
        assert!(
            body.contains("guard holds (SIGUSR1 confirms): web"),
            "{body}"
        );
        assert!(body.contains("/services/api/a1"), "{body}");
        m.source_down("etcd unreachable");
        let (status, _, body) = route("GET", "/readyz", &m);
        assert_eq!(status, "200 OK", "not stale yet: {body}");
        assert!(
            body.starts_with("ready\nsource not connected: etcd unreachable; state stale for"),
            "{body}"
        );
        m.set_stale_after(std::time::Duration::ZERO);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let (status, _, body) = route("GET", "/readyz", &m);
        assert_eq!(status, "503 Service Unavailable");
        assert!(
            body.starts_with("not ready: state stale for 0s, past stale_after 0s (source not connected: etcd unreachable)\n"),
            "{body}"
        );
        m.set_stopping();
        let (status, _, body) = route("GET", "/readyz", &m);
        assert_eq!(status, "503 Service Unavailable");
        assert!(body.starts_with("stopping (lame duck"), "{body}");
        assert!(route("GET", "/metrics", &m).2.ends_with("# EOF\n"));
        assert_eq!(route("POST", "/metrics", &m).0, "405 Method Not Allowed");
        assert_eq!(route("GET", "/nope", &m).0, "404 Not Found");
    }
}
