//! A service instance for fleet tests, on 127.0.0.1: it answers every request after `delay`
//! with `200` and its name, each connection on a thread of its own, and stopping it cuts the
//! requests still in flight (the connection closes with no response), as a service process
//! that exits does. Unlike [`super::haproxy::Backend`], requests are in flight on it for a
//! while, so a service stopped while a node still routes to it fails requests.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// At most this many connections are served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 256;

pub struct Service {
    pub port: u16,
    pub name: String,
    stop: Arc<AtomicBool>,
    /// Requests answered, and requests cut by the stop.
    answered: Arc<AtomicUsize>,
    cut: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Service {
    pub fn start(name: &str, delay: Duration) -> Service {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind service");
        let port = listener.local_addr().expect("local addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let cut = Arc::new(AtomicUsize::new(0));
        let (flag, ok, lost) = (Arc::clone(&stop), Arc::clone(&answered), Arc::clone(&cut));
        let body = name.to_owned();
        let thread = std::thread::spawn(move || {
            let active = Arc::new(AtomicUsize::new(0));
            let mut workers: Vec<JoinHandle<()>> = Vec::new();
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                workers.retain(|w| !w.is_finished());
                let Ok(conn) = conn else { continue };
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (flag, ok, lost, active, body) = (
                    Arc::clone(&flag),
                    Arc::clone(&ok),
                    Arc::clone(&lost),
                    Arc::clone(&active),
                    body.clone(),
                );
                workers.push(std::thread::spawn(move || {
                    serve(conn, &body, delay, &flag, &ok, &lost);
                    active.fetch_sub(1, Ordering::SeqCst);
                }));
            }
            // The listener closes here: new connections are refused. Connections in flight
            // see the flag within a few ms and are cut.
            drop(listener);
            for w in workers {
                let _ = w.join();
            }
        });
        Service {
            port,
            name: name.to_owned(),
            stop,
            answered,
            cut,
            thread: Some(thread),
        }
    }

    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::SeqCst)
    }

    /// Requests the stop cut before their response.
    pub fn cut(&self) -> usize {
        self.cut.load(Ordering::SeqCst)
    }

    /// Stops the service: refuses new connections and cuts the requests in flight.
    pub fn stop(&mut self) {
        super::stop_accept_loop(&self.stop, self.port, &mut self.thread);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one request head (bounded in size and time), waits `delay` unless stopped, and
/// answers; a stop during the wait closes the connection with no response. A bare connect (a
/// TCP health check) gets nothing.
fn serve(
    mut conn: TcpStream,
    body: &str,
    delay: Duration,
    stop: &AtomicBool,
    answered: &AtomicUsize,
    cut: &AtomicUsize,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    while buf.len() < 16 * 1024
        && !buf.windows(4).any(|w| w == b"\r\n\r\n")
        && Instant::now() < deadline
        && !stop.load(Ordering::SeqCst)
    {
        match conn.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let _ = conn.shutdown(Shutdown::Both);
        return;
    }
    let until = Instant::now() + delay;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            cut.fetch_add(1, Ordering::SeqCst);
            let _ = conn.shutdown(Shutdown::Both);
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if conn.write_all(resp.as_bytes()).is_ok() {
        answered.fetch_add(1, Ordering::SeqCst);
    }
    let _ = conn.shutdown(Shutdown::Both);
}
