//! The presence sidecar: `haconfd announce` registers one service instance under a lease,
//! keeps it alive, and deletes it when the instance stops. (Being built.)

use crate::cli::AnnounceArgs;
use crate::commands::{ConfigSource, Failure};

/// Runs until SIGTERM / SIGINT.
pub async fn run(_cs: &ConfigSource, _args: AnnounceArgs) -> Result<(), Failure> {
    Err(Failure::Usage("announce is not built yet".into()))
}
