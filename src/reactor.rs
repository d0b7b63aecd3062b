//! The one event loop of `haconfd run`: a closed enum of events in, applies out.
//!
//! At most one apply runs at a time: the applier is moved into the task that applies and comes
//! back when it is done. Coalescing follows `[wait]`: a change that arrives while nothing is
//! pending and no apply runs is applied at once; changes that arrive while an apply runs are
//! gathered until none has come for `min`, and never longer than `max`; then one apply takes
//! them all. The latest state always lands: the last change before quiet starts an apply.
//!
//! One refinement of the contract: a *single* change that arrived while an apply ran is applied
//! as soon as that apply ends. Waiting `min` exists to gather bursts; a lone change gathers
//! nothing by waiting, and waiting it out put 200 ms on the latency tail of every change that
//! happened to arrive during a reload. Two or more changes are a burst and wait for quiet.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::config::WaitConfig;
use crate::source::Update;

/// Everything that can happen to the daemon.
#[derive(Debug)]
pub enum Event {
    /// The source has a new complete state.
    Update(Update),
    /// Reload the config file and templates, then re-render (SIGHUP, or a template changed).
    Reconfigure,
    /// The operator confirms the state the guard holds back (SIGUSR1).
    Confirm,
    /// Finish the apply in flight and stop (SIGTERM, SIGINT).
    Shutdown,
}

/// What an apply must do besides rendering the latest state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Work {
    /// Reload the config file and templates first.
    pub reconfigure: bool,
    /// Release every guard hold.
    pub confirm: bool,
}

/// What the reactor drives. The real one renders and installs; tests use fakes.
pub trait Apply: Send + 'static {
    /// Applies `update` (None: the source has not been read yet), doing `work` first.
    fn apply(&mut self, update: Option<Arc<Update>>, work: Work)
    -> impl Future<Output = ()> + Send;
    /// When the applier wants to apply again although nothing changed (a guard hold that
    /// expires).
    fn wakeup(&self) -> Option<Instant> {
        None
    }
    /// Stops what the applier owns (a supervised HAProxy).
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}

/// Changes seen but not yet applied.
#[derive(Default)]
struct Pending {
    /// When the first unapplied change arrived (bounds the wait by `max`).
    first: Option<Instant>,
    /// When the latest change arrived (the quiet period runs from here).
    last: Option<Instant>,
    /// How many changes arrived since the last apply started.
    count: u32,
    work: Work,
}

/// Runs until a `Shutdown` event or the end of the event stream; finishes the apply in flight,
/// then shuts the applier down.
pub async fn run<A: Apply>(applier: A, mut events: mpsc::Receiver<Event>, wait: WaitConfig) {
    let mut latest: Option<Arc<Update>> = None;
    let mut pending = Pending::default();
    // The applier is here when idle, and inside `inflight` while it applies.
    let mut idle: Option<A> = Some(applier);
    let mut inflight: Option<JoinHandle<A>> = None;
    let mut shutting_down = false;
    // An apply the applier asked for at a time of its own.
    let mut wakeup: Option<Instant> = None;

    loop {
        if shutting_down && inflight.is_none() {
            break;
        }
        let deadline = match (pending.first, pending.last) {
            _ if inflight.is_some() || shutting_down => None,
            (Some(first), Some(last)) => {
                let gathered = if pending.count <= 1 {
                    last
                } else {
                    (last + wait.min).min(first + wait.max)
                };
                Some(wakeup.map_or(gathered, |w| w.min(gathered)))
            }
            _ => wakeup,
        };
        tokio::select! {
            ev = events.recv(), if !shutting_down => {
                match ev {
                    Some(Event::Update(u)) => latest = Some(Arc::new(u)),
                    Some(Event::Reconfigure) => pending.work.reconfigure = true,
                    Some(Event::Confirm) => pending.work.confirm = true,
                    Some(Event::Shutdown) | None => {
                        shutting_down = true;
                        continue;
                    }
                }
                if inflight.is_none() && pending.first.is_none() {
                    // An isolated change: apply at once.
                    inflight = start(&mut idle, &latest, &mut pending);
                } else {
                    let now = Instant::now();
                    pending.first.get_or_insert(now);
                    pending.last = Some(now);
                    pending.count += 1;
                }
            }
            done = async { inflight.as_mut().expect("guarded").await }, if inflight.is_some() => {
                inflight = None;
                match done {
                    Ok(a) => {
                        wakeup = a.wakeup();
                        idle = Some(a);
                    }
                    Err(e) => {
                        // A panic inside an apply is a bug; the applier died with it.
                        tracing::error!(error = %e, "apply task failed; stopping");
                        break;
                    }
                }
            }
            () = async { sleep_until(deadline.expect("guarded")).await }, if deadline.is_some() => {
                wakeup = None;
                inflight = start(&mut idle, &latest, &mut pending);
            }
        }
    }
    if let Some(mut a) = idle {
        a.shutdown().await;
    }
}

/// Starts an apply of the latest state with the idle applier, consuming what was pending.
fn start<A: Apply>(
    idle: &mut Option<A>,
    latest: &Option<Arc<Update>>,
    pending: &mut Pending,
) -> Option<JoinHandle<A>> {
    let mut a = idle.take()?;
    let update = latest.clone();
    let work = std::mem::take(pending).work;
    Some(tokio::spawn(async move {
        a.apply(update, work).await;
        a
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::model::Snapshot;

    /// Records when each apply started and which revision it saw; each apply takes `cost`.
    #[derive(Clone)]
    struct Fake {
        log: Arc<Mutex<Vec<(Duration, i64, bool)>>>,
        cost: Duration,
        t0: Instant,
        shut: Arc<Mutex<bool>>,
        wake: Arc<Mutex<Option<Instant>>>,
    }

    impl Apply for Fake {
        async fn apply(&mut self, update: Option<Arc<Update>>, work: Work) {
            let reconfigure = work.reconfigure;
            let rev = update.map_or(-1, |u| u.snapshot.revision);
            self.log
                .lock()
                .expect("lock")
                .push((self.t0.elapsed(), rev, reconfigure));
            tokio::time::sleep(self.cost).await;
        }
        async fn shutdown(&mut self) {
            *self.shut.lock().expect("lock") = true;
        }
        fn wakeup(&self) -> Option<Instant> {
            *self.wake.lock().expect("lock")
        }
    }

    fn update(rev: i64) -> Event {
        Event::Update(Update {
            snapshot: Arc::new(Snapshot {
                revision: rev,
                kv: Default::default(),
            }),
            rejected: Vec::new(),
        })
    }

    fn setup(cost_ms: u64) -> (Fake, mpsc::Sender<Event>, mpsc::Receiver<Event>) {
        let fake = Fake {
            log: Arc::default(),
            cost: Duration::from_millis(cost_ms),
            t0: Instant::now(),
            shut: Arc::default(),
            wake: Arc::default(),
        };
        let (tx, rx) = mpsc::channel(4096);
        (fake, tx, rx)
    }

    const WAIT: WaitConfig = WaitConfig {
        min: Duration::from_millis(200),
        max: Duration::from_secs(2),
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn isolated_change_applies_at_once() {
        let (fake, tx, rx) = setup(50);
        let log = Arc::clone(&fake.log);
        let shut = Arc::clone(&fake.shut);
        let task = tokio::spawn(run(fake, rx, WAIT));
        tx.send(update(1)).await.expect("send");
        tokio::time::sleep(ms(500)).await;
        tx.send(update(2)).await.expect("send");
        tokio::time::sleep(ms(10)).await;
        tx.send(Event::Shutdown).await.expect("send");
        task.await.expect("reactor");
        let log = log.lock().expect("lock").clone();
        assert_eq!(log.iter().map(|l| l.1).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(log[0].0, ms(0));
        assert_eq!(
            log[1].0,
            ms(500),
            "second isolated change waits for nothing"
        );
        assert!(*shut.lock().expect("lock"), "shutdown reached the applier");
    }

    #[tokio::test(start_paused = true)]
    async fn burst_during_apply_is_gathered_until_quiet() {
        let (fake, tx, rx) = setup(100);
        let log = Arc::clone(&fake.log);
        let task = tokio::spawn(run(fake, rx, WAIT));
        // One change every 10 ms for 1 s: the first applies at once, the rest are gathered.
        for rev in 1..=100 {
            tx.send(update(rev)).await.expect("send");
            tokio::time::sleep(ms(10)).await;
        }
        tokio::time::sleep(ms(3000)).await;
        tx.send(Event::Shutdown).await.expect("send");
        task.await.expect("reactor");
        let log = log.lock().expect("lock").clone();
        let revs: Vec<i64> = log.iter().map(|l| l.1).collect();
        assert_eq!(revs.first(), Some(&1));
        assert_eq!(revs.last(), Some(&100), "the final state lands: {revs:?}");
        assert_eq!(
            revs.len(),
            2,
            "one apply for the isolated change, one for the burst: {revs:?}"
        );
        // The burst ended at 1000 ms (last send at 990 ms): applied after 200 ms of quiet.
        assert_eq!(log[1].0, ms(990 + 200));
    }

    #[tokio::test(start_paused = true)]
    async fn endless_stream_is_applied_every_max() {
        let (fake, tx, rx) = setup(10);
        let log = Arc::clone(&fake.log);
        let task = tokio::spawn(run(fake, rx, WAIT));
        // A change every 100 ms for 5 s never leaves 200 ms of quiet: `max` bounds the wait.
        for rev in 1..=50 {
            tx.send(update(rev)).await.expect("send");
            tokio::time::sleep(ms(100)).await;
        }
        tokio::time::sleep(ms(3000)).await;
        tx.send(Event::Shutdown).await.expect("send");
        task.await.expect("reactor");
        let log = log.lock().expect("lock").clone();
        let starts: Vec<Duration> = log.iter().map(|l| l.0).collect();
        assert_eq!(starts[0], ms(0));
        assert_eq!(
            starts[1],
            ms(100),
            "changes after an apply finished and nothing pending apply at once"
        );
        for pair in starts.windows(2).skip(1) {
            assert!(pair[1] - pair[0] <= ms(2000) + ms(100), "{starts:?}");
        }
        assert_eq!(log.last().map(|l| l.1), Some(50));
    }

    #[tokio::test(start_paused = true)]
    async fn reconfigure_is_carried_by_the_next_apply() {
        let (fake, tx, rx) = setup(100);
        let log = Arc::clone(&fake.log);
        let task = tokio::spawn(run(fake, rx, WAIT));
        tx.send(update(1)).await.expect("send");
        tokio::time::sleep(ms(20)).await;
        tx.send(Event::Reconfigure).await.expect("send");
        tokio::time::sleep(ms(1000)).await;
        tx.send(Event::Shutdown).await.expect("send");
        task.await.expect("reactor");
        let log = log.lock().expect("lock").clone();
        assert_eq!(log.len(), 2);
        assert_eq!((log[1].1, log[1].2), (1, true));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_the_apply_in_flight() {
        let (fake, tx, rx) = setup(1000);
        let shut = Arc::clone(&fake.shut);
        let task = tokio::spawn(run(fake, rx, WAIT));
        let t0 = Instant::now();
        tx.send(update(1)).await.expect("send");
        tokio::time::sleep(ms(10)).await;
        tx.send(Event::Shutdown).await.expect("send");
        task.await.expect("reactor");
        assert!(
            t0.elapsed() >= ms(1000),
            "returned before the apply finished"
        );
        assert!(*shut.lock().expect("lock"));
    }

    #[tokio::test(start_paused = true)]
    async fn applier_wakeup_triggers_an_apply_without_a_change() {
        let (fake, tx, rx) = setup(10);
        let log = Arc::clone(&fake.log);
        *fake.wake.lock().expect("lock") = Some(Instant::now() + ms(5000));
        let wake = Arc::clone(&fake.wake);
        let task = tokio::spawn(run(fake, rx, WAIT));
        tx.send(update(1)).await.expect("send");
        tokio::time::sleep(ms(100)).await;
        *wake.lock().expect("lock") = None;
        tokio::time::sleep(ms(6000)).await;
        tx.send(Event::Shutdown).await.expect("send");
        task.await.expect("reactor");
        let log = log.lock().expect("lock").clone();
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!(log[1].0, ms(5000));
        assert_eq!(log[1].1, 1, "the wakeup re-applies the latest state");
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_change_during_an_apply_goes_right_after_it() {
        let (fake, tx, rx) = setup(100);
        let log = Arc::clone(&fake.log);
        let task = tokio::spawn(run(fake, rx, WAIT));
        tx.send(update(1)).await.expect("send");
        tokio::time::sleep(ms(30)).await;
        tx.send(update(2)).await.expect("send");
        tokio::time::sleep(ms(1000)).await;
        tx.send(Event::Shutdown).await.expect("send");
        task.await.expect("reactor");
        let log = log.lock().expect("lock").clone();
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!(
            (log[1].0, log[1].1),
            (ms(100), 2),
            "no 200 ms wait for a lone change"
        );
    }
}
