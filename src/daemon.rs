//! `haconfd run`, the daemon: loads the config and templates, starts the source, the file
//! watch, the fleet publisher, the signal handler, the systemd watchdog and the admin endpoint
//! as tasks of one `JoinSet`, and hands every event to the reactor, whose applier ([`Daemon`])
//! renders and deploys. The stop comes in through the signal task: SIGTERM or SIGINT starts
//! the lame duck, then sends `Event::Shutdown`; a second one forces HAProxy down.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::apply::{self, Applier};
use crate::config::{Config, ConfigSource, HaproxyMode};
use crate::failure::Failure;
use crate::haproxy::{ApplyKind, runtime, supervise};
use crate::metrics::Metrics;
use crate::notify::{self, Notifier};
use crate::reactor::{self, Apply, Event, Work};
use crate::reconfig::{self, Reloaded, Reloader};
use crate::render::Templates;
use crate::source::{self, Update};

/// The real applier behind the reactor.
struct Daemon {
    applier: Applier,
    reloader: Reloader,
    notifier: Arc<Notifier>,
    /// `[frontend] lame_duck` in ms (0: none), shared with the signal task; SIGHUP updates it.
    lame_duck_wait: Arc<AtomicU64>,
    /// The update the last apply ran on: a wakeup that only looks at HAProxy renders nothing.
    last_update: Option<Arc<Update>>,
}

impl Daemon {
    /// Reads the config file and templates again and runs on them when they load; returns the
    /// ones it ran on until then. Files that do not load leave the running ones, and
    /// `/readyz` says why until a reading loads.
    fn reconfigure(&mut self) -> Option<(Config, Templates)> {
        match self.reloader.reload(self.applier.config()) {
            Reloaded::Unchanged => {
                tracing::info!("config and templates unchanged; nothing to reload");
                None
            }
            Reloaded::Rejected(why) => {
                tracing::error!(error = %why, "config or templates rejected; keeping the last good ones");
                self.applier
                    .metrics()
                    .set_config_problem(Some(format!("config or templates rejected: {why}")));
                None
            }
            Reloaded::New(new) => {
                let (config, templates) = *new;
                let previous = self.applier.swap(config, templates);
                self.applier.metrics().set_config_problem(None);
                self.take_config();
                tracing::info!("config and templates reloaded");
                Some(previous)
            }
        }
    }

    /// Hands the settings that live outside the applier to their owners.
    fn take_config(&self) {
        let config = self.applier.config();
        self.applier
            .metrics()
            .set_stale_after(config.admin.stale_after);
        self.lame_duck_wait
            .store(lame_duck_millis(config), Ordering::Relaxed);
    }
}

/// Whether an apply that failed just after a reload may have failed because of the reloaded
/// files: a template that does not render, or a config `haproxy -c` rejects. Failures that may
/// pass by themselves (the disk, a timeout, a reload) say nothing about them: the last good
/// files would render what is installed, and that proves nothing.
fn reloaded_files_may_be_at_fault(e: &apply::ApplyError) -> bool {
    match e {
        apply::ApplyError::Render(_) => true,
        apply::ApplyError::Deploy(e) => e.rejected().is_some(),
    }
}

impl Apply for Daemon {
    async fn apply(&mut self, update: Option<Arc<Update>>, work: Work) {
        // `master` mode: an HAProxy that its own supervisor restarted is brought back in line
        // with the installed file first, and the latest state is then applied again.
        let restarted = self.applier.watch_haproxy().await;
        // The config and templates this process ran on before a reload, while the first apply
        // on the new ones has not yet succeeded.
        let mut previous = None;
        if work.reconfigure {
            previous = self.reconfigure();
        }
        if work.confirm {
            self.applier.confirm();
        }
        // Nothing is written before the source's first successful read.
        let Some(update) = update else { return };
        // Test-only fault injection, absent from release builds: `tests/survive_logs.rs` makes
        // a real `haconfd run` panic inside its apply task to prove that the process then exits
        // with `logging::PANIC_EXIT_CODE` instead of running on without its applier.
        #[cfg(debug_assertions)]
        if std::env::var_os("HACONFD_FAULT").is_some_and(|f| f == "panic-in-apply") {
            panic!("HACONFD_FAULT=panic-in-apply: the fault the tests inject");
        }
        // A wakeup for the look at HAProxy alone: this state was applied last, and neither a
        // guard hold nor a retry is due.
        let due = self
            .applier
            .wakeup()
            .is_some_and(|t| t <= tokio::time::Instant::now());
        let same = self
            .last_update
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(l, &update));
        if same && !restarted && !due && work == Work::default() {
            return;
        }
        self.last_update = Some(Arc::clone(&update));
        let span = tracing::info_span!(
            "apply",
            etcd.revision = update.snapshot.revision,
            config.hash = tracing::field::Empty,
            apply.kind = tracing::field::Empty,
        );
        let mut result = self.applier.apply(&update).instrument(span.clone()).await;
        if let (Err(e), Some((config, templates))) = (&result, previous)
            && reloaded_files_may_be_at_fault(e)
        {
            // The new config or templates may be what fails: the last good ones are tried on
            // the same state, and kept when they pass.
            let (new_config, new_templates) = self.applier.swap(config, templates);
            let retried = self.applier.apply(&update).instrument(span.clone()).await;
            if retried.is_ok() {
                let why = format!(
                    "config and templates rejected on their first apply: {}",
                    reconfig::one_line(&format!("{e:#}"))
                );
                tracing::error!(error = %why, "keeping the last good config and templates");
                self.applier.metrics().set_config_problem(Some(why));
                // The same files, sent again, are tried again.
                self.reloader.forget();
                result = retried;
            } else {
                // The last good ones fail as well: the fault is elsewhere, and the operator's
                // new files stay.
                self.applier.swap(new_config, new_templates);
            }
            self.take_config();
        }
        let _in_span = span.enter();
        match result {
            Ok(r) => {
                span.record("config.hash", r.hash.as_str());
                span.record("apply.kind", r.kind.as_str());
                if r.files_follow {
                    // HAProxy serves it; the files follow as an apply of their own, which
                    // logs `applied` when they and HAProxy agree again.
                    tracing::info!(
                        held = ?r.held,
                        ms = r.duration.as_millis() as u64,
                        "served through the Runtime API; the files follow"
                    );
                } else {
                    tracing::info!(
                        apply.kind = r.kind.as_str(),
                        held = ?r.held,
                        held_back = ?r.held_back,
                        config.hash = %r.hash,
                        changed = ?r.changed,
                        ms = r.duration.as_millis() as u64,
                        "applied"
                    );
                }
                // The fleet view publishes it (and wakes for it).
                let running = self.applier.is_running();
                self.applier
                    .metrics()
                    .set_last_apply(&r.hash, r.kind, running);
                // systemd hears READY=1 when /readyz would say ready: the files are installed
                // and the HAProxy this process drives has taken them. Sent once.
                if self.applier.metrics().readiness().is_ok() {
                    self.notifier
                        .ready(&format!("applied revision {}", r.revision));
                }
                // A reload during the lame duck starts a worker whose switch may be on again:
                // the health check must go on failing until HAProxy stops.
                if self.applier.metrics().stopping()
                    && matches!(r.kind, ApplyKind::Reload | ApplyKind::Start)
                    && self.lame_duck_wait.load(Ordering::Relaxed) > 0
                {
                    let socket = &self.applier.config().haproxy.runtime_socket;
                    if let Err(e) = runtime::lame_duck(socket, LAME_DUCK_SWITCH_TIMEOUT).await {
                        tracing::warn!(error = %e, "cannot keep the lame duck on in the reloaded HAProxy");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "apply failed; keeping the last good config")
            }
        }
    }

    async fn shutdown(&mut self) {
        self.notifier.stopping();
        self.applier.shutdown().await;
    }

    fn wakeup(&self) -> Option<tokio::time::Instant> {
        match (self.applier.wakeup(), self.applier.haproxy_look_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// `run`: the daemon.
pub async fn run(cs: &ConfigSource) -> Result<(), Failure> {
    let config = cs.load()?;
    let templates = Templates::load(&config).map_err(|e| Failure::Runtime(e.into()))?;
    let metrics = Arc::new(Metrics::default());
    // Before any process starts: orphans handed to haconfd (as PID 1, or as the subreaper of
    // its reload command's double-forked grandchildren) never stay zombies.
    crate::haproxy::children::reap_orphans(metrics.orphans_reaped.clone());
    let notifier = Arc::new(Notifier::from_env());
    // Every task `run` starts; they end with it.
    let mut tasks = JoinSet::new();
    let (tx, rx) = mpsc::channel::<Event>(1024);

    // Source updates become events.
    let (utx, mut urx) = mpsc::channel::<Update>(64);
    let _source = source::spawn_watch(&config, utx, Arc::clone(&metrics))
        .map_err(|e| Failure::Runtime(e.into()))?;
    // This node's state in etcd for `haconfd fleet`; it leaves the view when `run` ends.
    let fleet = crate::fleet::Publisher::spawn(&config, Arc::clone(&metrics));
    let etx = tx.clone();
    let source_metrics = Arc::clone(&metrics);
    tasks.spawn(async move {
        while let Some(u) = urx.recv().await {
            source_metrics.source_update(u.snapshot.kv.len());
            if etx.send(Event::Update(u)).await.is_err() {
                return;
            }
        }
    });

    // Template and config file changes reload them.
    let mut watched: Vec<PathBuf> = config.templates.iter().map(|t| t.src.clone()).collect();
    watched.extend(cs.path().map(Path::to_path_buf));
    let (watcher, mut changes) =
        source::file::FileWatcher::start(&watched).map_err(|e| Failure::Runtime(e.into()))?;
    if watcher.polling() {
        metrics.file_watch_polling.inc();
    }
    let etx = tx.clone();
    tasks.spawn(async move {
        let _watcher = watcher;
        while let Some(path) = changes.recv().await {
            tracing::info!(file = %path.display(), "template or config changed");
            if etx.send(Event::Reconfigure).await.is_err() {
                return;
            }
        }
    });

    // The applier exists before the signal handler, which may have to force its HAProxy down.
    let wait = config.wait;
    let listen = config.admin.listen;
    metrics.set_stale_after(config.admin.stale_after);
    let lame_duck_wait = Arc::new(AtomicU64::new(lame_duck_millis(&config)));
    let mut applier = Applier::new(config, templates, Arc::clone(&metrics));
    let forced = Arc::new(AtomicBool::new(false));

    // Signals.
    let signals = Signals::install().map_err(|e| Failure::Runtime(e.into()))?;
    let lame_duck = LameDuck {
        socket: applier.config().haproxy.runtime_socket.clone(),
        wait: Arc::clone(&lame_duck_wait),
        metrics: Arc::clone(&metrics),
    };
    tasks.spawn(signals.handle(
        tx.clone(),
        Arc::clone(&notifier),
        applier.stopper(),
        lame_duck,
        Arc::clone(&forced),
    ));
    spawn_watchdog(&mut tasks, &notifier, &tx);
    drop(tx);

    // The admin endpoint. A port already taken is reported, not fatal: the load balancer
    // matters more than its metrics.
    match crate::admin::bind(listen).await {
        Ok(listener) => {
            tracing::info!(listen = %listen, "admin endpoint: /metrics /healthz /readyz");
            tasks.spawn(crate::admin::serve(listener, Arc::clone(&metrics)));
        }
        Err(e) => {
            tracing::error!(listen = %listen, error = %e, "cannot serve the admin endpoint; running without it")
        }
    }

    tracing::info!(config = %applier.config().origin, "haconfd running");
    applier.start_installed().await;
    let daemon = Daemon {
        applier,
        reloader: Reloader::new(cs.path().map(Path::to_path_buf)),
        notifier: Arc::clone(&notifier),
        lame_duck_wait,
        last_update: None,
    };
    reactor::run(daemon, rx, wait).await;
    // The reactor has stopped HAProxy: the signal handler, the watches and the admin endpoint
    // go with it.
    tasks.shutdown().await;
    if let Some(fleet) = fleet {
        fleet.leave().await;
    }
    notifier.stopping();
    if forced.load(Ordering::Relaxed) {
        tracing::warn!("stopped by force (a second SIGTERM or SIGINT)");
    } else {
        tracing::info!("stopped");
    }
    Ok(())
}

/// `WATCHDOG=1` at half of systemd's `WatchdogSec` for as long as the reactor holds its event
/// receiver. The task holds only a weak sender, so it never keeps the reactor's channel open;
/// once the reactor has returned (or the runtime is wedged and this task cannot run), the pings
/// stop and systemd restarts haconfd.
fn spawn_watchdog(tasks: &mut JoinSet<()>, notifier: &Arc<Notifier>, tx: &mpsc::Sender<Event>) {
    let Some(every) = notify::watchdog_interval().filter(|_| notifier.enabled()) else {
        return;
    };
    tracing::info!(every = ?every, "systemd watchdog: pinging");
    let notifier = Arc::clone(notifier);
    let reactor = tx.downgrade();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match reactor.upgrade() {
                Some(tx) if !tx.is_closed() => notifier.watchdog(),
                _ => return,
            }
        }
    });
}

/// How long the runtime socket may take to turn the lame duck on.
const LAME_DUCK_SWITCH_TIMEOUT: Duration = Duration::from_secs(2);

/// `[frontend] lame_duck` in ms where it applies: only a supervised HAProxy stops with haconfd.
fn lame_duck_millis(config: &Config) -> u64 {
    match config.haproxy.mode {
        HaproxyMode::Supervise => {
            config.frontend.lame_duck.as_millis().min(u64::MAX as u128) as u64
        }
        _ => 0,
    }
}

/// The lame duck of a stopping node: the monitor URI fails (through the Runtime API) while
/// everything else is served, so that the load balancer stops sending new connections before
/// HAProxy's soft stop closes the listeners.
struct LameDuck {
    socket: PathBuf,
    wait: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

impl LameDuck {
    /// Turns the switch on and waits out `lame_duck`; returns at once when there is none, or
    /// when the switch cannot be turned on (waiting would drain nothing).
    async fn run(&self) {
        let wait = Duration::from_millis(self.wait.load(Ordering::Relaxed));
        if wait.is_zero() {
            return;
        }
        if let Err(e) = runtime::lame_duck(&self.socket, LAME_DUCK_SWITCH_TIMEOUT).await {
            let (backend, server) = runtime::LAME_DUCK_SWITCH;
            tracing::error!(
                error = %e,
                "lame duck skipped: the health check cannot be failed (a custom template needs the `{backend}` backend with a server `{server}`, and `monitor fail` on it; see docs/templates.md, The default template); soft stop now"
            );
            return;
        }
        tracing::info!(
            lame_duck = %humantime::format_duration(wait),
            "lame duck: the monitor URI answers 503 and responses close their connections; still serving and applying changes until the soft stop (a second SIGTERM or SIGINT stops at once)"
        );
        tokio::time::sleep(wait).await;
        tracing::info!("lame duck over: soft stop");
    }
}

/// The signals `run` answers: SIGHUP reconfigures, SIGUSR1 confirms guard holds, the first
/// SIGTERM or SIGINT stops (through the lame duck), a second one forces the stop.
struct Signals {
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    stop: StopSignals,
}

/// SIGTERM and SIGINT, which mean the same.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// The next SIGTERM or SIGINT, by name. Cancel-safe.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            stop: StopSignals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            },
        })
    }

    async fn handle(
        mut self,
        tx: mpsc::Sender<Event>,
        notifier: Arc<Notifier>,
        stopper: Option<supervise::Stopper>,
        lame_duck: LameDuck,
        forced: Arc<AtomicBool>,
    ) {
        let name = loop {
            let ev = tokio::select! {
                _ = self.hup.recv() => { tracing::info!("SIGHUP: reloading config and templates"); Event::Reconfigure }
                _ = self.usr1.recv() => { tracing::info!("SIGUSR1: confirming what the guard holds"); Event::Confirm }
                name = self.stop.next() => break name,
            };
            if tx.send(ev).await.is_err() {
                return;
            }
        };
        tracing::info!("{name}: stopping");
        // Told at once, although the lame duck, the apply in flight and HAProxy's soft stop
        // follow.
        notifier.stopping();
        lame_duck.metrics.set_stopping();
        // The fleet view shows the node stopping, not ready, at once.
        lame_duck.metrics.poke_fleet();
        // The reactor goes on applying changes during the lame duck; it hears of the stop
        // when it is over, or at once when a second signal cuts it short.
        let again = tokio::select! {
            () = lame_duck.run() => None,
            name = self.stop.next() => Some(name),
        };
        if let Some(name) = again {
            tracing::warn!("{name} again during the lame duck: ending it");
            force(name, &stopper, &forced);
        }
        let _ = tx.send(Event::Shutdown).await;
        drop(tx);
        // Stopping: the apply in flight finishes, then HAProxy drains for up to 35 s. An
        // operator who sends SIGTERM or SIGINT again wants it over now.
        loop {
            let name = tokio::select! {
                name = self.stop.next() => name,
                _ = self.hup.recv() => { tracing::info!("SIGHUP ignored: stopping"); continue }
                _ = self.usr1.recv() => { tracing::info!("SIGUSR1 ignored: stopping"); continue }
            };
            force(name, &stopper, &forced);
        }
    }
}

/// The forced stop, once: a supervised HAProxy stops at once and its open connections are cut.
fn force(name: &str, stopper: &Option<supervise::Stopper>, forced: &AtomicBool) {
    if forced.swap(true, Ordering::Relaxed) {
        tracing::info!("{name}: already stopping at once");
        return;
    }
    match stopper {
        Some(s) => {
            tracing::warn!(
                "{name} again: forced stop; HAProxy stops at once and its open connections are cut"
            );
            s.hard();
        }
        None => tracing::warn!(
            "{name} again: forced stop; HAProxy is not haconfd's to stop, haconfd exits after the apply in flight"
        ),
    }
}
