//! Retry delays: exponential backoff with jitter, for every retry loop (etcd clients, installs
//! that failed on the disk).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Retry delays.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Exponential backoff with ±20 % jitter from a tiny xorshift generator.
pub struct Backoff {
    next: Duration,
    rng: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

impl Backoff {
    pub fn new() -> Backoff {
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

    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// The delay before the next attempt, at least `floor`; doubles the next one.
    pub fn next(&mut self, floor: Duration) -> Duration {
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
        let floor = Duration::from_secs(1);
        assert!(b.next(floor) >= floor.mul_f64(0.79));
    }
}
