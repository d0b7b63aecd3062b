//! The binary: parse the command line, set up logging, dispatch, exit with the command's code.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use haconfd::cli::{Cli, Command, LogFormat};
use haconfd::commands;
use haconfd::config::ConfigSource;
use haconfd::failure::Failure;
use haconfd::logging::{self, Mode};

/// jemalloc, unless built without the `jemalloc` feature: a registry is mostly small strings
/// and maps, which glibc's malloc rounds up to 32 bytes with a header each (Cargo.toml).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

async fn dispatch(cli: Cli) -> Result<(), Failure> {
    let json = cli.log_format == LogFormat::Json;
    logging::init_tracing(json, std::io::stderr().is_terminal(), &cli.log_level)
        .map_err(Failure::Usage)?;
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
        Command::Run => haconfd::daemon::run(&cs).await,
        Command::Render(args) => commands::render(&cs, &args).await,
        Command::History(args) => haconfd::forensics::history::command(&cs, args).await,
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
    // The daemons log through a bounded, lossy queue of their own: the one thread that runs
    // them must never wait for stderr's reader, nor die with it. One-shot commands write
    // directly and lose nothing. Both ignore write errors; a panic anywhere exits 70.
    let mode = match cli.command {
        Command::Run | Command::Announce(_) => Mode::Lossy,
        _ => Mode::Direct,
    };
    logging::start(mode, cli.log_format == LogFormat::Json);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            logging::last_words(&format!("haconfd: cannot start the async runtime: {e}"), 1);
            return ExitCode::from(1);
        }
    };
    let code = match runtime.block_on(dispatch(cli)) {
        Ok(()) => 0,
        Err(e) => {
            // With JSON logs the last words are JSON too: log shippers parse every line.
            logging::last_words(&format!("haconfd: {e}"), e.exit_code());
            e.exit_code()
        }
    };
    // The last lines reach stderr, unless its reader stopped reading: then exit regardless.
    logging::flush(logging::FLUSH_BOUND);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
