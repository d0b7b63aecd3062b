//! systemd's notify protocol, without a crate: one datagram per state change to the unix socket
//! named by `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`).
//!
//! In: the environment systemd sets for `Type=notify` (`NOTIFY_SOCKET`) and `WatchdogSec=`
//! (`WATCHDOG_USEC`, `WATCHDOG_PID`). Out: `READY=1` once, after the first successful apply;
//! `WATCHDOG=1` at half the watchdog interval; `STOPPING=1` when shutdown begins. Without
//! `NOTIFY_SOCKET` (a terminal, a container, the tests) every call does nothing.
//!
//! Sending never fails the daemon: a notify socket that went away is logged once at debug and
//! the load balancer keeps running.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where notifications go, or nowhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    ready: AtomicBool,
    stopping: AtomicBool,
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }

    /// From `$NOTIFY_SOCKET`; disabled when it is unset, empty, or cannot be used (logged).
    pub fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(v) if !v.is_empty() => match Notifier::to(&v.to_string_lossy()) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "NOTIFY_SOCKET is set but unusable; not notifying systemd");
                    Notifier::disabled()
                }
            },
            _ => Notifier::disabled(),
        }
    }

    /// A notifier for this socket name: a path, or `@name` for an abstract socket.
    pub fn to(name: &str) -> io::Result<Notifier> {
        let addr = socket_addr(name)?;
        let socket = UnixDatagram::unbound()?;
        Ok(Notifier {
            target: Some((socket, addr)),
            ..Notifier::disabled()
        })
    }

    /// Whether notifications go anywhere.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one state string (`KEY=VALUE` lines).
    pub fn send(&self, state: &str) -> io::Result<()> {
        match &self.target {
            Some((socket, addr)) => socket.send_to_addr(state.as_bytes(), addr).map(|_| ()),
            None => Ok(()),
        }
    }

    /// `READY=1`, the first time only; `status` goes along as `STATUS=`.
    pub fn ready(&self, status: &str) {
        if self.enabled() && !self.ready.swap(true, Ordering::Relaxed) {
            self.log(self.send(&format!("READY=1\nSTATUS={}", one_line(status))));
        }
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.log(self.send("WATCHDOG=1"));
    }

    /// `STOPPING=1`, the first time only.
    pub fn stopping(&self) {
        if self.enabled() && !self.stopping.swap(true, Ordering::Relaxed) {
            self.log(self.send("STOPPING=1"));
        }
    }

    fn log(&self, r: io::Result<()>) {
        if let Err(e) = r {
            tracing::debug!(error = %e, "cannot notify systemd");
        }
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when the watchdog is meant for
/// this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval() -> Option<Duration> {
    interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec / 2))
}

fn socket_addr(name: &str) -> io::Result<SocketAddr> {
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())
        }
        None if name.starts_with('/') => SocketAddr::from_pathname(name),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NOTIFY_SOCKET {name:?} is neither an absolute path nor @abstract"),
        )),
    }
}

/// A status is one line: the protocol separates assignments by newlines.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_once_each_for_ready_and_stopping() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier::to(path.to_str().expect("utf-8")).expect("notifier");
        n.ready("applied\nrevision 3");
        n.ready("again");
        n.watchdog();
        n.stopping();
        n.stopping();
        assert_eq!(recv(&server), "READY=1\nSTATUS=applied revision 3");
        assert_eq!(recv(&server), "WATCHDOG=1");
        assert_eq!(recv(&server), "STOPPING=1");
        server.set_nonblocking(true).expect("nonblocking");
        assert!(server.recv(&mut [0u8; 64]).is_err(), "nothing more is sent");
    }

    #[test]
    fn honours_abstract_sockets() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("haconfd-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let server = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        Notifier::to(&format!("@{name}"))
            .expect("notifier")
            .ready("up");
        assert_eq!(recv(&server), "READY=1\nSTATUS=up");
    }

    #[test]
    fn rejects_relative_names_and_does_nothing_when_disabled() {
        assert!(Notifier::to("notify.sock").is_err());
        let n = Notifier::disabled();
        assert!(!n.enabled());
        assert!(n.send("READY=1").is_ok());
    }

    #[test]
    fn watchdog_interval_is_half_and_only_for_this_pid() {
        assert_eq!(
            interval_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            interval_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(interval_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(interval_from(Some("0"), None, 7), None);
        assert_eq!(interval_from(Some("soon"), None, 7), None);
        assert_eq!(interval_from(None, None, 7), None);
    }
}
