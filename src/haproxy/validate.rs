//! `haproxy -c`: proves a staged config before it replaces the live one.
//!
//! The check runs with an argv (no shell), a cleared environment, no inherited descriptors
//! (Rust opens everything close-on-exec, stdin is null), in its own process group that is killed
//! whole on timeout. Its output is captured for the error report.

use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

use crate::haproxy::Finished;

/// Why a config was not proven.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("haproxy -c rejected {file} (exit {code}):\n{output}")]
    Rejected {
        file: String,
        code: i32,
        output: String,
    },
    #[error("haproxy -c on {file} did not finish within {timeout:?}; killed")]
    Timeout { file: String, timeout: Duration },
    #[error("haproxy.check_user {0:?} does not exist on this host")]
    NoUser(String),
    #[error("cannot run {binary:?}: {source}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
}

/// The `PATH` given to child processes whose environment is otherwise cleared.
pub const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `binary -c -f file` and returns its output on success (warnings included).
pub async fn check(binary: &str, file: &Path, timeout: Duration) -> Result<String, ValidateError> {
    check_as(binary, file, timeout, None).await
}

/// [`check`], run as `user` (with that user's primary group and no supplementary groups) when
/// haconfd runs as root: `haproxy -c` executes `lua-load` code, so a config that slipped past
/// every other screen runs with no privilege. The file is handed to the user for the check and
/// taken back after it. `None`, or not running as root: run as haconfd itself.
pub async fn check_as(
    binary: &str,
    file: &Path,
    timeout: Duration,
    user: Option<&str>,
) -> Result<String, ValidateError> {
    let drop_to = match user {
        Some(name) if nix::unistd::geteuid().is_root() => {
            let u = nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| ValidateError::NoUser(name.to_owned()))?;
            Some((u.uid.as_raw(), u.gid.as_raw()))
        }
        _ => None,
    };
    if let Some((uid, gid)) = drop_to {
        std::os::unix::fs::chown(file, Some(uid), Some(gid)).map_err(|source| {
            ValidateError::Spawn {
                binary: binary.to_owned(),
                source,
            }
        })?;
    }
    let result = run_check(binary, file, timeout, drop_to).await;
    if drop_to.is_some() {
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        let _ = std::os::unix::fs::chown(file, Some(uid.as_raw()), Some(gid.as_raw()));
    }
    result
}

async fn run_check(
    binary: &str,
    file: &Path,
    timeout: Duration,
    drop_to: Option<(u32, u32)>,
) -> Result<String, ValidateError> {
    let mut cmd = Command::new(binary);
    if let Some((uid, gid)) = drop_to {
        // std drops supplementary groups when it switches from root to `uid`.
        cmd.uid(uid).gid(gid);
    }
    cmd.arg("-c")
        .arg("-f")
        .arg(file)
        .env_clear()
        .env("PATH", SAFE_PATH);
    match crate::haproxy::run_bounded(&mut cmd, timeout).await {
        // Exit 2 means "valid, but no listener": valid for a file that only holds backends.
        Ok(Finished::Exited { status, output }) => match status.code() {
            Some(0) | Some(2) => Ok(output),
            code => Err(ValidateError::Rejected {
                file: file.display().to_string(),
                code: code.unwrap_or(-1),
                output,
            }),
        },
        Ok(Finished::TimedOut) => Err(ValidateError::Timeout {
            file: file.display().to_string(),
            timeout,
        }),
        Err(source) => Err(ValidateError::Spawn {
            binary: binary.to_owned(),
            source,
        }),
    }
}
