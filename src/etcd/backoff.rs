//! How a client of etcd waits before it tries again: a floor for refused credentials, and a
//! wait that a fixed password ends early. The delays themselves are [`crate::backoff`]'s.

use std::time::Duration;

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
