//! `haconfd history`: a timeline of the instances that appeared, changed or left.

use crate::cli::HistoryArgs;
use crate::config::ConfigSource;
use crate::failure::Failure;

/// `haconfd history`.
pub async fn command(cs: &ConfigSource, args: HistoryArgs) -> Result<(), Failure> {
    let _ = (cs, args);
    Err(Failure::Usage("history: not built yet".into()))
}
