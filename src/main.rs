//! The binary: parse the command line, set up logging, dispatch, exit with the command's code.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use haconfd::cli::{Cli, Command, LogFormat};
use haconfd::commands::{self, ConfigSource, Failure};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat, level: &str) -> Result<(), Failure> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| Failure::Usage(format!("--log-level {level:?}: {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    init_logging(cli.log_format, &cli.log_level)?;
    let cs = ConfigSource::resolve(cli.config);
    let reads_config = !matches!(
        cli.command,
        Command::Version | Command::Completions { .. } | Command::Manpage
    );
    if matches!(cs, ConfigSource::Embedded) && reads_config {
        tracing::info!(
            "no config file given and none at the default path: using the embedded default"
        );
    }
    match cli.command {
        Command::Run => commands::run(&cs).await,
        Command::Render {
            print,
            diff,
            template,
        } => commands::render(&cs, print, diff, template.as_deref()).await,
        Command::Check { template } => commands::check(&cs, template.as_deref()).await,
        Command::Announce(args) => haconfd::announce::run(&cs, args).await,
        Command::Fleet(args) => haconfd::fleet::command(&cs, args).await,
        Command::Version => commands::version(&cs).await,
        Command::Completions { shell } => commands::completions(shell),
        Command::Manpage => commands::manpage(),
    }
}

fn main() -> ExitCode {
    // clap exits 2 on bad usage; the contract says 64.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(64);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("haconfd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json = cli.log_format == LogFormat::Json;
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // With JSON logs every stderr line is JSON, the last words included: log shippers
            // parse lines, and a plain one would be lost or mangled.
            if json {
                let line = serde_json::json!({
                    "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
                    "level": "ERROR",
                    "message": format!("haconfd: {e}"),
                    "exit_code": e.exit_code(),
                });
                eprintln!("{line}");
            } else {
                eprintln!("haconfd: {e}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
