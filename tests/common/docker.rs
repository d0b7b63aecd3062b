//! A fake Docker Engine API on a unix socket, whose answers are the fixtures of
//! `tests/fixtures/docker/` (Docker Engine API v1.43 answers, as the fixtures' comments say):
//! `GET /containers/web-1/json` gets the container's current inspect answer, any other request
//! the 404 of a container that does not exist. It records the request lines it served.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::repo;

/// The container the fake knows.
pub const CONTAINER: &str = "web-1";
/// The host port `inspect-published.http` publishes 8080/tcp on.
pub const HOST_PORT: u16 = 32768;

/// One recorded answer: the status line's code and text, the headers, and the body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: String,
    pub headers: Vec<String>,
    pub body: String,
}

impl Answer {
    /// Reads `tests/fixtures/docker/<name>`: comment lines (`#`), then the status line, the
    /// headers, a blank line and the body.
    pub fn fixture(name: &str) -> Answer {
        let path = repo().join("tests/fixtures/docker").join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let text: String = text
            .lines()
            .skip_while(|l| l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let (head, body) = text
            .split_once("\n\n")
            .unwrap_or_else(|| panic!("{name}: no blank line after the headers"));
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.strip_prefix("HTTP/1.1 "))
            .unwrap_or_else(|| panic!("{name}: no HTTP/1.1 status line"))
            .to_owned();
        Answer {
            status,
            headers: lines.map(str::to_owned).collect(),
            body: body.to_owned(),
        }
    }

    /// The whole response, framed with Content-Length, or chunked in two chunks.
    fn framed(&self, chunked: bool) -> String {
        let mut out = format!("HTTP/1.1 {}\r\n", self.status);
        for h in &self.headers {
            out.push_str(h);
            out.push_str("\r\n");
        }
        if chunked {
            let (a, b) = self.body.split_at(self.body.len() / 2);
            out.push_str(&format!(
                "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            ));
        } else {
            out.push_str(&format!(
                "Content-Length: {}\r\n\r\n{}",
                self.body.len(),
                self.body
            ));
        }
        out
    }
}

/// The fake Engine API. Its thread serves a temp socket and ends with the test process.
pub struct FakeEngine {
    pub socket: PathBuf,
    /// The request lines served, oldest first.
    pub requests: Arc<Mutex<Vec<String>>>,
    /// What `GET /containers/web-1/json` answers now.
    container: Arc<Mutex<Answer>>,
    _dir: tempfile::TempDir,
}

impl FakeEngine {
    /// Serves `container` (a fixture's name) for web-1, with Content-Length framing or chunked.
    pub fn start(container: &str, chunked: bool) -> FakeEngine {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("docker.sock");
        let listener = UnixListener::bind(&socket).expect("bind the fake Docker socket");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let current = Arc::new(Mutex::new(Answer::fixture(container)));
        let missing = Answer::fixture("no-such-container.http");
        let (seen, answer) = (Arc::clone(&requests), Arc::clone(&current));
        let web = format!("GET /containers/{CONTAINER}/json ");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let line = text.lines().next().unwrap_or("").to_owned();
                let response = match line.starts_with(&web) {
                    true => answer.lock().expect("lock").framed(chunked),
                    false => missing.framed(chunked),
                };
                seen.lock().expect("lock").push(line);
                let _ = conn.write_all(response.as_bytes());
            }
        });
        FakeEngine {
            socket,
            requests,
            container: current,
            _dir: dir,
        }
    }

    /// From now on, web-1 is described by the fixture `name`.
    pub fn set_container(&self, name: &str) {
        *self.container.lock().expect("lock") = Answer::fixture(name);
    }

    /// How many requests were served.
    pub fn served(&self) -> usize {
        self.requests.lock().expect("lock").len()
    }

    pub fn socket_str(&self) -> String {
        self.socket.to_str().expect("utf-8 socket path").to_owned()
    }
}
