//! The host port Docker published for a container's port: `GET /containers/{name}/json` from
//! the Docker Engine API on its unix socket, `NetworkSettings.Ports["8080/tcp"][0].HostPort`.
//! A small HTTP/1.1 client: one request per connection, `Content-Length`, chunked, or
//! read-to-close bodies, all bounded in size and time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// One request to the Engine API may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest response accepted (an inspect answer is a few KiB).
const MAX_RESPONSE: usize = 4 << 20;
/// The largest response head accepted.
const MAX_HEAD: usize = 64 << 10;

/// What to ask Docker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Request {
    pub(super) socket: PathBuf,
    pub(super) container: String,
    /// `8080/tcp`.
    pub(super) port: String,
}

/// A container name or id as Docker allows it: `[A-Za-z0-9][A-Za-z0-9_.-]*`. Nothing else can
/// reach the request line.
pub(super) fn is_container_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 255
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// `8080`, `8080/tcp`, `53/udp` → the key of `NetworkSettings.Ports` (`8080/tcp`).
pub(super) fn parse_container_port(s: &str) -> Option<String> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    if !matches!(proto, "tcp" | "udp" | "sctp")
        || port.is_empty()
        || port.len() > 5
        || !port.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    match port.parse::<u32>() {
        Ok(p @ 1..=65535) => Some(format!("{p}/{proto}")),
        _ => None,
    }
}

/// Asks Docker for the host port.
pub(super) async fn host_port(request: &Request) -> Result<u16, String> {
    let path = format!("/containers/{}/json", request.container);
    let (status, body) = get(&request.socket, &path).await?;
    match status {
        200 => parse_host_port(&body, &request.container, &request.port),
        404 => Err(format!(
            "Docker has no container {:?} ({})",
            request.container,
            message(&body)
        )),
        _ => Err(format!(
            "Docker answered {status} to GET {path}: {}",
            message(&body)
        )),
    }
}

/// The `message` of an Engine API error body, shown safely.
fn message(body: &[u8]) -> String {
    let text = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let short: String = text.chars().take(200).collect();
    format!("{short:?}")
}

/// Finds `NetworkSettings.Ports[port][0].HostPort` in an inspect answer.
pub(super) fn parse_host_port(body: &[u8], container: &str, port: &str) -> Result<u16, String> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("Docker's answer for {container:?} is not JSON: {e}"))?;
    if v.pointer("/State/Running") == Some(&serde_json::Value::Bool(false)) {
        return Err(format!("container {container:?} is not running"));
    }
    let ports = v
        .pointer("/NetworkSettings/Ports")
        .and_then(|p| p.as_object())
        .ok_or_else(|| format!("container {container:?} has no port map (is it running?)"))?;
    let bindings = ports.get(port).and_then(|b| b.as_array());
    let Some(first) = bindings.and_then(|b| b.first()) else {
        let published: Vec<&str> = ports
            .iter()
            .filter(|(_, b)| b.as_array().is_some_and(|a| !a.is_empty()))
            .map(|(k, _)| k.as_str())
            .collect();
        return Err(format!(
            "port {port} of container {container:?} is not published to the host (published: {}; fix: run it with -p HOSTPORT:{port} or -P)",
            if published.is_empty() {
                "none".to_owned()
            } else {
                published.join(", ")
            }
        ));
    };
    let host_port = first
        .get("HostPort")
        .and_then(|p| p.as_str())
        .ok_or_else(|| format!("port {port} of container {container:?} has no HostPort"))?;
    match host_port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!(
            "port {port} of container {container:?} has HostPort {:?}, not a port number",
            host_port.chars().take(16).collect::<String>()
        )),
    }
}

/// One GET over the unix socket; returns the status and the body.
async fn get(socket: &Path, path: &str) -> Result<(u16, Vec<u8>), String> {
    let exchange = async {
        let mut s = UnixStream::connect(socket).await.map_err(|e| {
            format!(
                "cannot connect to the Docker socket {}: {e}",
                socket.display()
            )
        })?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: docker\r\nUser-Agent: haconfd-announce\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
        );
        s.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write to the Docker socket: {e}"))?;
        let mut buf = Vec::with_capacity(8192);
        let mut chunk = [0u8; 8192];
        loop {
            match parse_response(&buf, false)? {
                Parsed::Complete(status, body) => return Ok((status, body)),
                Parsed::Incomplete => {}
            }
            if buf.len() > MAX_RESPONSE {
                return Err(format!(
                    "Docker's answer is larger than {MAX_RESPONSE} bytes"
                ));
            }
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read from the Docker socket: {e}"))?;
            if n == 0 {
                return match parse_response(&buf, true)? {
                    Parsed::Complete(status, body) => Ok((status, body)),
                    Parsed::Incomplete => {
                        Err("Docker closed the connection in the middle of its answer".into())
                    }
                };
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            format!(
                "Docker did not answer within {}s on {}",
                REQUEST_TIMEOUT.as_secs(),
                socket.display()
            )
        })?
}

/// A response parsed so far.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed {
    Incomplete,
    Complete(u16, Vec<u8>),
}

/// Parses an HTTP/1.1 response from `buf`. `eof` says the peer closed: a body without a
/// length then ends there.
pub(super) fn parse_response(buf: &[u8], eof: bool) -> Result<Parsed, String> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err("Docker's response head is too large".into());
        }
        return Ok(Parsed::Incomplete);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| "Docker's response head is not text".to_owned())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = super::check::status_code(format!("{status_line}\n").as_bytes())
        .ok_or_else(|| format!("not an HTTP response: {:?}", truncate(status_line)))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse()
                    .map_err(|_| format!("bad Content-Length {:?}", truncate(value)))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        }
    }
    let body = &buf[head_end + 4..];
    if chunked {
        return Ok(match dechunk(body)? {
            Some(body) => Parsed::Complete(status, body),
            None => Parsed::Incomplete,
        });
    }
    if status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok(Parsed::Complete(status, Vec::new()));
    }
    match length {
        Some(n) if body.len() >= n => Ok(Parsed::Complete(status, body[..n].to_vec())),
        Some(n) if n > MAX_RESPONSE => Err(format!("Docker announced a {n}-byte body")),
        Some(_) => Ok(Parsed::Incomplete),
        None if eof => Ok(Parsed::Complete(status, body.to_vec())),
        None => Ok(Parsed::Incomplete),
    }
}

/// Decodes a chunked body; None until all of it is there.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line =
            std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size line".to_owned())?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {:?}", truncate(size_text)))?;
        if size > MAX_RESPONSE {
            return Err(format!("Docker announced a {size}-byte chunk"));
        }
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                if end == 0 {
                    return Ok(Some(body));
                }
                rest = &rest[end + 2..];
            }
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        if &rest[size..size + 2] != b"\r\n" {
            return Err("a chunk does not end with CRLF".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSPECT: &str = r#"{"Id":"abc","State":{"Running":true},"NetworkSettings":{"Ports":{"8080/tcp":[{"HostIp":"0.0.0.0","HostPort":"32768"},{"HostIp":"::","HostPort":"32768"}],"9000/tcp":null}}}"#;

    #[test]
    fn responses_with_length_chunks_or_close() {
        let whole = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{INSPECT}",
            INSPECT.len()
        );
        let bytes = whole.as_bytes();
        for cut in [10, bytes.len() - 1] {
            assert_eq!(parse_response(&bytes[..cut], false), Ok(Parsed::Incomplete));
        }
        assert_eq!(
            parse_response(bytes, false),
            Ok(Parsed::Complete(200, INSPECT.as_bytes().to_vec()))
        );

        let (a, b) = INSPECT.split_at(20);
        let chunked = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:X};ext=1\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        );
        let bytes = chunked.as_bytes();
        assert_eq!(
            parse_response(&bytes[..bytes.len() - 2], false),
            Ok(Parsed::Incomplete)
        );
        assert_eq!(
            parse_response(bytes, false),
            Ok(Parsed::Complete(200, INSPECT.as_bytes().to_vec()))
        );

        let close = format!("HTTP/1.0 200 OK\r\n\r\n{INSPECT}");
        assert_eq!(
            parse_response(close.as_bytes(), false),
            Ok(Parsed::Incomplete)
        );
        assert_eq!(
            parse_response(close.as_bytes(), true),
            Ok(Parsed::Complete(200, INSPECT.as_bytes().to_vec()))
        );
        assert!(parse_response(b"garbage\r\n\r\n", true).is_err());
    }

    #[test]
    fn host_port_from_inspect() {
        assert_eq!(
            parse_host_port(INSPECT.as_bytes(), "web", "8080/tcp"),
            Ok(32768)
        );
        let err = parse_host_port(INSPECT.as_bytes(), "web", "9000/tcp").expect_err("null");
        assert!(
            err.contains("not published") && err.contains("8080/tcp"),
            "{err}"
        );
        let stopped = r#"{"State":{"Running":false},"NetworkSettings":{"Ports":{}}}"#;
        assert!(
            parse_host_port(stopped.as_bytes(), "web", "8080/tcp")
                .expect_err("stopped")
                .contains("not running")
        );
    }

    #[test]
    fn names_and_ports() {
        assert!(is_container_name("web-1_a.b"));
        assert!(!is_container_name("../x") && !is_container_name("a b") && !is_container_name(""));
        assert_eq!(parse_container_port("8080").as_deref(), Some("8080/tcp"));
        assert_eq!(parse_container_port("53/udp").as_deref(), Some("53/udp"));
        assert_eq!(parse_container_port("0/tcp"), None);
        assert_eq!(parse_container_port("80/http"), None);
    }
}
