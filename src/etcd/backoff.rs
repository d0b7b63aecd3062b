//! Retry delays: exponential backoff with jitter, and a wait that a fixed password ends early.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::EtcdConfig;

/// Retry delays.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
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

/// Exponential backoff with ±20 % jitter from a tiny xorshift generator.
pub(crate) struct Backoff {
    next: Duration,
    rng: u64,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        Backoff {
            next: BACKOFF_MIN,
            rng: seed | 1,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// The delay before the next attempt, at least `floor`; doubles the next one.
    pub(crate) fn next(&mut self, floor: Duration) -> Duration {
        let base = self.next.max(floor).min(BACKOFF_MAX);
        self.next = (base * 2).min(BACKOFF_MAX);
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D);
        // A factor in [0.8, 1.2).
        let factor = 0.8 + 0.4 * ((r >> 11) as f64 / (1u64 << 53) as f64);
        base.mul_f64(factor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new();
        let mut last = Duration::ZERO;
        for i in 0..20 {
            let d = b.next(Duration::ZERO);
            let base = (BACKOFF_MIN * 2u32.pow(i.min(10))).min(BACKOFF_MAX);
            assert!(
                d >= base.mul_f64(0.79) && d <= base.mul_f64(1.21),
                "{i}: {d:?}"
            );
            last = d;
        }
        assert!(last <= BACKOFF_MAX.mul_f64(1.21));
        b.reset();
        assert!(b.next(Duration::ZERO) <= BACKOFF_MIN.mul_f64(1.21));
        assert!(b.next(BACKOFF_AUTH_MIN) >= BACKOFF_AUTH_MIN.mul_f64(0.79));
    }
}
