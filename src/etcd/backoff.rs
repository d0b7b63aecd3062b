//! How a client of etcd waits before it tries again: a floor for refused credentials, and a
//! wait that a fixed password ends early. The delays themselves are [`crate::backoff`]'s.

use std::time::{Duration, Instant};

use super::{Backoff, Failure, Kind};

use crate::config::EtcdConfig;

/// Refused credentials are not retried faster than this.
pub(crate) const BACKOFF_AUTH_MIN: Duration = Duration::from_secs(1);

/// How often a client that failed looks at `etcd.password_file` for a fix.
const PASSWORD_POLL: Duration = Duration::from_millis(250);

/// Waits out `delay`, or less when `etcd.password_file` changes meanwhile: an operator who fixed
/// a refused password should not wait out a backoff of up to 10 s. The file is compared, not
/// watched, so a secret swapped through a symlink (Kubernetes) counts too, and it is only read
/// while etcd fails. Returns true when the file changed.
pub(crate) async fn backoff_sleep(config: &EtcdConfig, delay: Duration) -> bool {
    let Some(path) = &config.password_file else {
        tokio::time::sleep(delay).await;
        return false;
    };
    let before = std::fs::read(path).ok();
    let until = tokio::time::Instant::now() + delay;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        tokio::time::sleep(left.min(PASSWORD_POLL)).await;
        if std::fs::read(path).ok() != before {
            tracing::info!(file = %path.display(), "etcd.password_file changed; connecting again now");
            return true;
        }
    }
}

/// An outage as a client of etcd lives it: since when calls fail, how many attempts failed,
/// and the backoff before the next one. The source's watcher, announce and the fleet publisher
/// keep one each.
pub(crate) struct Outage {
    backoff: Backoff,
    since: Option<Instant>,
    attempts: u32,
}

/// One failed attempt, as the log reports it.
pub(crate) struct Retry {
    /// How long to wait before the next attempt.
    pub(crate) delay: Duration,
    /// Attempts failed since the outage began, this one included.
    pub(crate) attempts: u32,
    /// How long the outage has lasted, for the log.
    pub(crate) down_for: String,
    /// `delay` in ms, for the log.
    pub(crate) retry_in: String,
    /// This failure began the outage.
    pub(crate) first: bool,
}

/// How an outage ended, for the log.
pub(crate) struct Recovered {
    pub(crate) down_for: String,
    pub(crate) attempts: u32,
}

impl Outage {
    pub(crate) fn new() -> Outage {
        Outage {
            backoff: Backoff::new(),
            since: None,
            attempts: 0,
        }
    }

    /// A failed attempt: the wait before the next one, at least [`BACKOFF_AUTH_MIN`] when
    /// etcd refused the credentials.
    pub(crate) fn failed(&mut self, f: &Failure) -> Retry {
        let first = self.since.is_none();
        let since = *self.since.get_or_insert_with(Instant::now);
        self.attempts += 1;
        let floor = if f.kind == Kind::Auth {
            BACKOFF_AUTH_MIN
        } else {
            Duration::ZERO
        };
        let delay = self.backoff.next(floor);
        Retry {
            delay,
            attempts: self.attempts,
            down_for: format_since(since),
            retry_in: format!("{}ms", delay.as_millis()),
            first,
        }
    }

    /// A call succeeded: the outage, if there was one, is over. The backoff is left as it is
    /// (see [`Outage::reset_backoff`]).
    pub(crate) fn recovered(&mut self) -> Option<Recovered> {
        let attempts = std::mem::take(&mut self.attempts);
        self.since.take().map(|since| Recovered {
            down_for: format_since(since),
            attempts,
        })
    }

    /// The next failure waits the shortest delay again.
    pub(crate) fn reset_backoff(&mut self) {
        self.backoff.reset();
    }
}

fn format_since(since: Instant) -> String {
    humantime::format_duration(Duration::from_millis(since.elapsed().as_millis() as u64))
        .to_string()
}
