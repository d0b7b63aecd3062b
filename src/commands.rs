//! The one-shot subcommands (`render`, `check`, `version`, `completions`, `manpage`; `run` is
//! `daemon`'s). Each returns `Ok(())` or a [`Failure`] that knows its exit code: 64 for a
//! bad config or bad usage, 1 for a runtime failure.

use std::sync::Arc;

use crate::apply::{self, Applier};
use crate::cli::RenderArgs;
use crate::config::{Config, ConfigError, ConfigSource, SourceKind};
pub use crate::failure::{Failure, write_stdout};
use crate::haproxy::install;
use crate::metrics::Metrics;
use crate::render::Templates;
use crate::source::{self, Update};

fn load_templates(config: &Config) -> Result<Templates, Failure> {
    Templates::load(config).map_err(|e| Failure::Runtime(e.into()))
}

async fn read_source(config: &Config) -> Result<Update, Failure> {
    source::read_once(config, 1)
        .await
        .map_err(|e| Failure::Runtime(e.into()))
}

/// `render --print`, `render --diff`, and `render` (one shot).
pub async fn render(cs: &ConfigSource, args: &RenderArgs) -> Result<(), Failure> {
    if args.explain || args.revision.is_some() || args.at.is_some() || args.from.is_some() {
        return crate::forensics::past::command(cs, args).await;
    }
    let (print, diff, template) = (args.print, args.diff, args.template.as_deref());
    let config = cs.load()?;
    let mut templates = load_templates(&config)?;
    let update = read_source(&config).await?;
    let metrics = Metrics::default();
    if print || diff {
        let rendered = apply::render(&mut templates, &update, &metrics)
            .map_err(|e| Failure::Runtime(e.into()))?;
        let chosen =
            crate::render::choose(&rendered, &config, template, print).map_err(Failure::Usage)?;
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for r in chosen {
            if print {
                out.write_all(&r.bytes)
                    .map_err(|e| Failure::Runtime(e.into()))?;
            } else {
                let installed = install::read_installed(&r.template.dest)
                    .map_err(|e| Failure::Runtime(e.into()))?
                    .unwrap_or_default();
                let old = String::from_utf8_lossy(&installed);
                let new = String::from_utf8_lossy(&r.bytes);
                let dest = r.template.dest.display().to_string();
                let text = similar::TextDiff::from_lines(old.as_ref(), new.as_ref())
                    .unified_diff()
                    .context_radius(3)
                    .header(&dest, &format!("{dest} (rendered)"))
                    .to_string();
                out.write_all(text.as_bytes())
                    .map_err(|e| Failure::Runtime(e.into()))?;
            }
        }
        return Ok(());
    }
    if template.is_some() {
        return Err(Failure::Usage(
            "--template applies to --print and --diff; a one-shot render installs every template"
                .into(),
        ));
    }
    let mut applier = Applier::one_shot(config, templates, Arc::new(metrics)).await;
    let report = applier
        .apply(&update)
        .await
        .map_err(|e| Failure::Runtime(e.into()))?;
    tracing::info!(
        apply.kind = report.kind.as_str(),
        etcd.revision = report.revision,
        config.hash = %report.hash,
        changed = ?report.changed,
        "render applied"
    );
    Ok(())
}

/// `check`: render and prove with `haproxy -c`; writes nothing beside a private temp dir.
pub async fn check(cs: &ConfigSource, template: Option<&str>) -> Result<(), Failure> {
    let mut config = cs.load()?;
    let dir = install::CheckDir::new(config.haproxy.check_user.is_some())
        .map_err(|e| Failure::Runtime(e.into()))?;
    // Maps are rendered into the private dir too, and the HAProxy file loads them from there:
    // the check proves this render, not whatever map is installed (or not yet).
    for t in config.templates.iter_mut().filter(|t| t.map) {
        t.dest = dir.path(&format!("{}.map", t.name));
    }
    let mut templates = load_templates(&config)?;
    let update = read_source(&config).await?;
    let metrics = Metrics::default();
    let rendered =
        apply::render(&mut templates, &update, &metrics).map_err(|e| Failure::Runtime(e.into()))?;
    for r in rendered.iter().filter(|r| r.template.map) {
        dir.write(&r.template.dest, &r.bytes)
            .map_err(|e| Failure::Runtime(e.into()))?;
    }
    let mut failed = 0;
    let check = install::Check::of(&config.haproxy);
    for r in crate::render::choose(&rendered, &config, template, false).map_err(Failure::Usage)? {
        if !r.template.check {
            tracing::info!(template = %r.template.name, "check = false: rendered, not proven");
            continue;
        }
        let path = dir.path(&format!("{}.cfg", r.template.name));
        // The verdicts go to stderr in order with the log, and a closed stderr never panics.
        match install::prove(&path, &r.bytes, &check).await {
            Ok(()) => crate::logging::line(&format!("{}: valid", r.template.name)),
            Err(install::InstallError::Invalid(e)) => {
                crate::logging::line(&format!("{}: {e}", r.template.name));
                failed += 1;
            }
            Err(e) => return Err(Failure::Runtime(e.into())),
        }
    }
    if metrics.rejected() > 0 {
        crate::logging::line(&format!(
            "{} key(s) left out; see the warnings above",
            metrics.rejected()
        ));
    }
    if failed > 0 {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "{failed} template(s) failed haproxy -c"
        )));
    }
    Ok(())
}

/// `version`. A closed stdout is a failure (exit 1), never a panic.
pub async fn version(cs: &ConfigSource) -> Result<(), Failure> {
    let config = cs.load();
    let binary = config
        .as_ref()
        .map(|c| c.haproxy.binary.clone())
        .unwrap_or_else(|_| "haproxy".into());
    let text = format!(
        "haconfd {} (commit {})\nhaproxy: {}\netcd: {}\n",
        env!("CARGO_PKG_VERSION"),
        env!("HACONFD_GIT_COMMIT"),
        crate::haproxy::version(&binary).await,
        etcd_version(&config).await
    );
    write_stdout(text.as_bytes())
}

/// How long `version` waits for etcd: it reports, it does not wait out an outage.
const VERSION_ETCD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The etcd server version for `version`, or why there is none. Never an error: a down etcd is
/// exactly when an operator runs `version`.
async fn etcd_version(config: &Result<Config, ConfigError>) -> String {
    let config = match config {
        Ok(c) => c,
        Err(e) => return format!("unknown (the config does not load: {e})"),
    };
    let SourceKind::Etcd(etcd) = &config.source.kind else {
        return "not used (file source)".into();
    };
    let mut etcd = etcd.clone();
    etcd.dial_timeout = etcd.dial_timeout.min(VERSION_ETCD_TIMEOUT);
    let endpoints = etcd.endpoints.join(",");
    let connected = match crate::etcd::connect_options(&etcd) {
        Ok(options) => crate::etcd::connect_with(&etcd, options).await,
        Err(e) => Err(e),
    };
    let mut client = match connected {
        Ok((client, _)) => client,
        Err(e) => return format!("unreachable at {endpoints}: {e}"),
    };
    match tokio::time::timeout(VERSION_ETCD_TIMEOUT, client.status()).await {
        Ok(Ok(status)) => format!("{} (at {endpoints})", status.version()),
        Ok(Err(e)) => format!("unreachable at {endpoints}: status: {e}"),
        Err(_) => {
            format!("unreachable at {endpoints}: status: no answer within {VERSION_ETCD_TIMEOUT:?}")
        }
    }
}

/// `completions SHELL`: the completion script, generated from the clap definition.
pub fn completions(shell: clap_complete::Shell) -> Result<(), Failure> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut crate::cli::Cli::command(), "haconfd", &mut out);
    write_stdout(&out)
}

/// `manpage`: haconfd(1) in roff, generated from the clap definition.
pub fn manpage() -> Result<(), Failure> {
    use clap::CommandFactory;
    let mut out = Vec::new();
    clap_mangen::Man::new(crate::cli::Cli::command())
        .render(&mut out)
        .map_err(|e| Failure::Runtime(e.into()))?;
    write_stdout(&out)
}
