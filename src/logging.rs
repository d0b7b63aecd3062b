//! Log output that can neither wedge nor kill the process. In: formatted lines from tracing
//! (text or JSON), the panic hook's report and `main`'s last words. Out: stderr, and the count
//! of lines that could not be written (`haconfd_log_dropped_total`).
//!
//! A daemon (`run`, `announce`) writes through a bounded queue that one thread of its own
//! drains to stderr. The thread that runs the daemon never waits for stderr's reader: a line
//! that does not fit in the queue (a reader that stopped reading), or whose write fails (a
//! reader that has gone), is dropped and counted. A one-shot command writes straight to stderr,
//! so that it loses nothing, and ignores write errors. Either way nothing here panics on an I/O
//! error, and a panic anywhere ends the process with [`PANIC_EXIT_CODE`].

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use tracing_subscriber::EnvFilter;

/// The exit code after a panic anywhere in the process (`EX_SOFTWARE`): non-zero, so that
/// systemd (`Restart=on-failure`) or Docker (`--restart on-failure`) starts haconfd again.
pub const PANIC_EXIT_CODE: u8 = 70;

/// At most this many lines wait in the queue.
pub const MAX_QUEUED_LINES: usize = 8192;

/// At most this many bytes wait in the queue: a burst (a first read that leaves out thousands
/// of keys, one warning each) fits, and memory stays bounded however long stderr is stuck.
pub const MAX_QUEUED_BYTES: usize = 1 << 20;

/// How long an exit waits for the queue to reach stderr: the last lines say why the process
/// ended, but a reader that stopped reading must not keep a stopping daemon alive.
pub const FLUSH_BOUND: Duration = Duration::from_secs(1);

/// The drain thread writes up to this many bytes per write call.
const BATCH_BYTES: usize = 64 * 1024;

/// How log lines reach stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through the bounded queue and its own thread; lines that cannot be written are dropped
    /// and counted. For the daemons, whose one thread must never wait for stderr.
    Lossy,
    /// Straight to stderr, blocking like any command-line tool, write errors ignored. For the
    /// one-shot commands, which should lose nothing.
    Direct,
}

/// The process's log output, set once by [`start`].
struct Output {
    json: bool,
    queue: Option<Arc<Queue>>,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Sets up the log output for this process and installs the panic hook. Called once, first
/// thing in `main`; a second call changes nothing.
pub fn start(mode: Mode, json: bool) {
    let _ = OUTPUT.get_or_init(|| Output {
        json,
        queue: (mode == Mode::Lossy).then(|| Queue::start(stderr_writer())),
    });
    std::panic::set_hook(Box::new(on_panic));
}

/// tracing's subscriber, writing through [`writer`]. `level` is an `EnvFilter` directive; a
/// bad one is returned as the message for a usage error.
pub fn init_tracing(json: bool, ansi: bool, level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("--log-level {level:?}: {e}"))?;
    // Without `log_internal_errors(false)` a failed write is reported on stderr with the
    // standard library's print macro, which panics on a stderr whose reader has gone.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer)
        .log_internal_errors(false);
    // A subscriber set already (only ever in tests) keeps logging where it did.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    Ok(())
}

/// A writer into the process's log output; tracing makes one per event.
pub fn writer() -> Writer {
    Writer
}

/// Writes each buffer it is given as one entry of the log output. It never fails: a line that
/// cannot be written is dropped (and, through the queue, counted).
#[derive(Debug, Clone, Copy, Default)]
pub struct Writer;

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        emit(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes one line (a command's report, such as `check`'s verdicts) in order with the log.
pub fn line(text: &str) {
    let mut bytes = Vec::with_capacity(text.len() + 1);
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    emit(&bytes);
}

/// The last line before the process exits with `exit_code`, as JSON when the logs are JSON (a
/// log shipper parses every line, the last one included), then a bounded flush.
pub fn last_words(message: &str, exit_code: i32) {
    let json = OUTPUT.get().is_some_and(|o| o.json);
    if json {
        let line = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": "ERROR",
            "message": message,
            "exit_code": exit_code,
        });
        self::line(&line.to_string());
    } else {
        self::line(message);
    }
    flush(FLUSH_BOUND);
}

/// Waits up to `bound` for the queued lines to be written; true when they were (or when there
/// is no queue). Called before the process exits.
pub fn flush(bound: Duration) -> bool {
    match OUTPUT.get().and_then(|o| o.queue.as_ref()) {
        Some(q) => q.flush(bound),
        None => true,
    }
}

/// Lines dropped so far: the queue was full, or stderr refused them.
pub fn dropped() -> u64 {
    OUTPUT
        .get()
        .and_then(|o| o.queue.as_ref())
        .map_or(0, |q| q.dropped())
}

fn emit(bytes: &[u8]) {
    match OUTPUT.get().and_then(|o| o.queue.as_ref()) {
        Some(q) => q.push(bytes),
        None => {
            let _ = io::stderr().lock().write_all(bytes);
        }
    }
}

/// The drain thread's own handle on stderr (a duplicate of fd 2): it never takes the lock of
/// std's `Stderr`, so a write blocked on a full pipe holds up no one else's `stderr()`.
fn stderr_writer() -> Box<dyn Write + Send> {
    match io::stderr().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(std::fs::File::from(fd)),
        Err(_) => Box::new(io::stderr()),
    }
}

/// The panic hook: a panic in any task or thread is a bug, and a process that went on without
/// the task would serve a load balancer nobody updates. It reports the panic through the log
/// output (so it cannot block either) and exits with [`PANIC_EXIT_CODE`] for the service
/// manager to restart haconfd.
fn on_panic(info: &std::panic::PanicHookInfo<'_>) {
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if PANICKING.swap(true, Ordering::SeqCst) {
        // Another thread panicked first and is exiting the process; two exits would race.
        loop {
            std::thread::park();
        }
    }
    let thread = std::thread::current();
    let payload = info
        .payload()
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a payload that is not a string)");
    let at = info
        .location()
        .map_or_else(|| "an unknown place".to_owned(), ToString::to_string);
    let mut message = format!(
        "haconfd: panic in thread '{}' at {at}: {payload}; exiting with code {PANIC_EXIT_CODE} so that the service manager restarts haconfd (a bug: please report it)",
        thread.name().unwrap_or("<unnamed>"),
    );
    let backtrace = std::backtrace::Backtrace::capture();
    if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
        message.push_str(&format!("\nbacktrace:\n{backtrace}"));
    }
    last_words(&message, i32::from(PANIC_EXIT_CODE));
    std::process::exit(i32::from(PANIC_EXIT_CODE));
}

/// `haconfd_log_dropped_total`: read from the log output when `/metrics` is encoded. The
/// writer counts before `Metrics` exists, so the count lives here and the metric only reads it.
#[derive(Debug, Clone, Copy, Default)]
pub struct DroppedLines;

impl TypedMetric for DroppedLines {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for DroppedLines {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&dropped(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The bounded queue and the state its drain thread shares with the writers.
struct Queue {
    state: Mutex<State>,
    /// The drain thread waits here for lines.
    ready: Condvar,
    /// Flushes wait here for the queue to be written out.
    idle: Condvar,
    dropped: AtomicU64,
}

struct State {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The drain thread is writing a batch it took from `lines`.
    writing: bool,
    /// The drain thread runs; without it every line is dropped.
    alive: bool,
}

impl Queue {
    /// A queue drained into `out` by a thread of its own.
    fn start(out: Box<dyn Write + Send>) -> Arc<Queue> {
        let queue = Arc::new(Queue {
            state: Mutex::new(State {
                lines: VecDeque::new(),
                bytes: 0,
                writing: false,
                alive: true,
            }),
            ready: Condvar::new(),
            idle: Condvar::new(),
            dropped: AtomicU64::new(0),
        });
        let drain = Arc::clone(&queue);
        let spawned = std::thread::Builder::new()
            .name("haconfd-log".into())
            .spawn(move || drain.drain(out));
        if spawned.is_err() {
            queue.lock().alive = false;
        }
        queue
    }

    // No code holds the lock across anything that can panic, so a poisoned lock still guards
    // a consistent state.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queues one line, or drops and counts it when it does not fit. Never waits for stderr.
    fn push(&self, line: &[u8]) {
        let mut st = self.lock();
        if !st.alive
            || st.lines.len() >= MAX_QUEUED_LINES
            || st.bytes + line.len() > MAX_QUEUED_BYTES
        {
            drop(st);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        st.bytes += line.len();
        st.lines.push_back(line.to_vec());
        drop(st);
        self.ready.notify_one();
    }

    /// Waits up to `bound` until every queued line was written (or dropped).
    fn flush(&self, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        let mut st = self.lock();
        while st.alive && (st.writing || !st.lines.is_empty()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = match self.idle.wait_timeout(st, left) {
                Ok((st, _)) => st,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        true
    }

    /// The drain thread: takes batches of whole lines and writes them, outside the lock. A
    /// line not written whole is counted as dropped.
    fn drain(&self, mut out: Box<dyn Write + Send>) {
        let mut st = self.lock();
        loop {
            if st.lines.is_empty() {
                st.writing = false;
                self.idle.notify_all();
                st = self.ready.wait(st).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let mut batch = Vec::new();
            let mut ends = Vec::new();
            while let Some(next) = st.lines.front() {
                if !batch.is_empty() && batch.len() + next.len() > BATCH_BYTES {
                    break;
                }
                let Some(line) = st.lines.pop_front() else {
                    break;
                };
                st.bytes -= line.len();
                batch.extend_from_slice(&line);
                ends.push(batch.len());
            }
            st.writing = true;
            drop(st);
            let written = write_some(&mut out, &batch);
            let lost = ends.iter().filter(|&&end| end > written).count();
            if lost > 0 {
                self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
            }
            st = self.lock();
        }
    }
}

/// Writes as much of `bytes` as `out` takes before an error; how much that was.
fn write_some(out: &mut dyn Write, bytes: &[u8]) -> usize {
    let mut done = 0;
    while done < bytes.len() {
        match out.write(&bytes[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A stderr whose reader has gone: every write fails with EPIPE.
    struct Gone;

    impl Write for Gone {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A stderr whose reader stopped reading: a write blocks until the test lets it go, then
    /// hands what it got to the test.
    struct Stuck {
        release: mpsc::Receiver<()>,
        got: mpsc::Sender<Vec<u8>>,
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.release.recv();
            let _ = self.got.send(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Waits (bounded) until the drain thread is inside a write.
    fn wait_writing(q: &Queue) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !q.lock().writing {
            assert!(Instant::now() < deadline, "the drain thread never wrote");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn lines_whose_write_fails_are_dropped_and_counted() {
        let q = Queue::start(Box::new(Gone));
        for _ in 0..10 {
            q.push(b"a line\n");
        }
        assert!(q.flush(Duration::from_secs(5)), "an EPIPE is not a wait");
        assert_eq!(q.dropped(), 10);
    }

    #[test]
    fn a_stuck_reader_costs_lines_never_a_wait() {
        let (release, rx) = mpsc::channel();
        let (got, written) = mpsc::channel();
        let q = Queue::start(Box::new(Stuck { release: rx, got }));
        q.push(b"first\n");
        // The drain thread takes the first line and blocks writing it; the queue fills.
        wait_writing(&q);
        let t0 = Instant::now();
        for _ in 0..MAX_QUEUED_LINES + 100 {
            q.push(b"x\n");
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "a push waited");
        assert_eq!(q.dropped(), 100);
        assert!(!q.flush(Duration::from_millis(50)), "the flush is bounded");

        // The reader reads again: what was queued is written, in order.
        drop(release);
        assert!(q.flush(Duration::from_secs(10)));
        let bytes: Vec<u8> = written.try_iter().flatten().collect();
        assert!(bytes.starts_with(b"first\nx\nx\n"));
        let lines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        assert_eq!(lines + q.dropped(), MAX_QUEUED_LINES as u64 + 101);
    }

    #[test]
    fn the_byte_bound_holds_for_long_lines() {
        let (_release, rx) = mpsc::channel();
        let (got, _written) = mpsc::channel();
        let q = Queue::start(Box::new(Stuck { release: rx, got }));
        let long = vec![b'y'; MAX_QUEUED_BYTES / 4];
        q.push(&long);
        wait_writing(&q);
        for _ in 0..9 {
            q.push(&long);
        }
        // One line is in the blocked write, four fit behind it, the rest are dropped.
        assert_eq!(q.dropped(), 5);
        assert!(q.lock().bytes <= MAX_QUEUED_BYTES);
    }

    #[test]
    fn the_count_is_a_prometheus_counter() {
        let text = crate::metrics::Metrics::default().encode();
        assert!(
            text.contains("# TYPE haconfd_log_dropped counter"),
            "{text}"
        );
        assert!(text.contains("\nhaconfd_log_dropped_total "), "{text}");
    }

    #[test]
    fn a_partial_write_counts_the_lines_not_written_whole() {
        /// Takes 5 bytes, then fails.
        struct Short(usize);
        impl Write for Short {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::from(io::ErrorKind::BrokenPipe));
                }
                let n = buf.len().min(self.0);
                self.0 -= n;
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut out = Short(5);
        assert_eq!(write_some(&mut out, b"abc\ndef\n"), 5);
    }
}
