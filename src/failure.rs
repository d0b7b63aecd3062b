//! How a command ends when it does not succeed: a [`Failure`] knows its exit code (64 for a bad
//! config or bad usage, 1 for a runtime failure). The library's commands return it; `main`
//! prints it and exits with its code.

use crate::config::ConfigError;

/// A command that did not succeed, with its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    // Our error types carry their causes in their messages: `{:#}` would print each twice.
    #[error("{0}")]
    Runtime(#[from] anyhow::Error),
}

impl Failure {
    pub fn exit_code(&self) -> i32 {
        match self {
            Failure::Usage(_) | Failure::Config(_) => 64,
            Failure::Runtime(_) => 1,
        }
    }
}

/// Writes a command's output; a closed stdout is a failure (exit 1), never a panic.
pub fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| Failure::Runtime(e.into()))
}
