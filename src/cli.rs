//! The command line (clap). Parsing only: `commands` does the work.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "haconfd",
    version,
    about = "Renders haproxy.cfg from etcd or a file, proves it with haproxy -c, installs it atomically and reloads HAProxy safely"
)]
pub struct Cli {
    /// Config file. Without it (and without HACONFD_CONFIG), /etc/haconfd/haconfd.toml, and when
    /// that does not exist the embedded default (file source over run/registry.yaml, which `scripts/demo` copies from examples/registry.yaml).
    #[arg(long, global = true, env = "HACONFD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or filter (tracing's EnvFilter syntax, e.g. "info" or "haconfd=debug").
    #[arg(long, global = true, default_value = "info", env = "HACONFD_LOG")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of the announce variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon: watch the source, render, validate, install, reload.
    Run,
    /// Read the source once and render. Without --print or --diff: install and reload once,
    /// then exit (confd -onetime).
    Render(RenderArgs),
    /// Render with the current data and prove it with `haproxy -c`; write nothing. Exit 0 when
    /// valid, 1 when not.
    Check {
        /// Only this template (by its [[template]] name).
        #[arg(long)]
        template: Option<String>,
    },
    /// Presence sidecar: register a service instance in etcd under a lease, keep it alive,
    /// and remove it when stopped.
    Announce(AnnounceArgs),
    /// Every live node's published state ([fleet] in the config): applied revision, converged
    /// or not, hash, age of the last apply, held services, ready. A node has converged when
    /// nothing under the watched prefixes changed after its revision. With --wait, the deploy
    /// gate: exit 0 once every live node has converged, 1 at the timeout naming the laggards.
    Fleet(FleetArgs),
    /// A timeline, from etcd's history, of the instances that appeared, changed or left: time
    /// where known, revision, key, old -> new address, weight and state, and whether a delete
    /// or the end of a lease removed it. Bounded by compaction, and says so.
    History(HistoryArgs),
    /// Print the version, the git commit, the HAProxy version found and, with the etcd source,
    /// the etcd server version (an unreachable etcd is reported, not fatal).
    Version,
    /// Print a shell completion script to stdout, generated from this command line.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout, generated from this command line.
    Manpage,
}

/// `haconfd render`: see src/commands.rs; the past is read through src/forensics/.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RenderArgs {
    /// Print exactly the rendered bytes to stdout; write nothing, reload nothing.
    #[arg(long, conflicts_with_all = ["diff", "explain"])]
    pub print: bool,
    /// Print a unified diff of the installed file against the render (with --from, of two
    /// points in etcd's history); write nothing.
    #[arg(long, conflicts_with = "explain")]
    pub diff: bool,
    /// Print the render with every line that came from the registry annotated with the keys
    /// it came from (mod and create revisions), then every key left out and why.
    #[arg(long)]
    pub explain: bool,
    /// With --explain: the same as JSON, for tools.
    #[arg(long, requires = "explain")]
    pub json: bool,
    /// With --print or --explain: render the registry as it was at this etcd revision.
    #[arg(long, value_name = "REV", conflicts_with = "at")]
    pub revision: Option<i64>,
    /// With --print or --explain: render what the fleet had applied at this time (RFC 3339,
    /// like 2026-12-04T03:00:00Z), found through the nodes' published applies.
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// With --diff: the older point, an etcd revision or an RFC 3339 time.
    #[arg(long, value_name = "REV|TIME", requires = "diff")]
    pub from: Option<String>,
    /// With --diff --from: the newer point (default: now).
    #[arg(long, value_name = "REV|TIME", requires = "from")]
    pub to: Option<String>,
    /// Only this template (by its [[template]] name).
    #[arg(long)]
    pub template: Option<String>,
}

/// `haconfd history`: see src/forensics/history.rs.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HistoryArgs {
    /// Only this service's instances (and its route).
    #[arg(long)]
    pub service: Option<String>,
    /// Only changes this recent, like 1h or 30m (the start is found through the nodes'
    /// published applies, else etcd's oldest revision).
    #[arg(long, value_name = "DURATION", conflicts_with = "from")]
    pub since: Option<String>,
    /// Only changes from this etcd revision on.
    #[arg(long, value_name = "REV")]
    pub from: Option<i64>,
    /// One JSON object, for tools: the range (from, to, oldest, compacted_before, truncated)
    /// and `changes`, an array of one object per change.
    #[arg(long)]
    pub json: bool,
    /// etcd endpoint(s), overriding the config's [etcd] endpoints.
    #[arg(long = "etcd", value_name = "URL")]
    pub etcd: Vec<String>,
}

/// `haconfd fleet`: see src/fleet.rs.
#[derive(Debug, Clone, clap::Args)]
pub struct FleetArgs {
    /// Print a JSON array, one object per node (every published field, plus `converged` and
    /// a `note` on why not), instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Wait until every live node has converged, checking every 100 ms; exit 1 at the
    /// timeout, naming the nodes that lag (or saying that no node is live).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, and how long etcd may take to answer without it.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub timeout: String,
    /// etcd endpoint(s), overriding the config's [etcd] endpoints.
    #[arg(long = "etcd", value_name = "URL")]
    pub etcd: Vec<String>,
}

/// `haconfd announce`: see src/announce.rs.
#[derive(Debug, Clone, clap::Args)]
pub struct AnnounceArgs {
    /// Service name (the `<service>` of /services/<service>/<id>).
    #[arg(long)]
    pub service: String,
    /// HOST:PORT HAProxy should send traffic to ([V6]:PORT for IPv6).
    #[arg(long)]
    pub addr: Option<String>,
    /// Instance id; default: stable for this instance (host name and port).
    #[arg(long)]
    pub id: Option<String>,
    /// Lease TTL.
    #[arg(long, default_value = "5m")]
    pub ttl: String,
    /// Weight 0-256 (written in the JSON form).
    #[arg(long)]
    pub weight: Option<u16>,
    /// Metadata, k=v, repeatable (written in the JSON form).
    #[arg(long = "meta", value_name = "K=V")]
    pub meta: Vec<String>,
    /// Health check: tcp://127.0.0.1:PORT or http://127.0.0.1:PORT/path; the key exists only
    /// while it passes.
    #[arg(long)]
    pub check: Option<String>,
    /// etcd endpoint(s), overriding the config's [etcd] endpoints.
    #[arg(long = "etcd", value_name = "URL")]
    pub etcd: Vec<String>,
    /// On SIGTERM / SIGINT: remove the key first, then keep running this long before exiting
    /// 0, so that every node takes the instance out while it still serves. Stop the service
    /// after announce has exited. A second signal ends the wait.
    #[arg(long, default_value = "0s", value_name = "DURATION")]
    pub drain: String,
    /// Time between two health checks (with --check).
    #[arg(long, default_value = "2s")]
    pub check_interval: String,
    /// Consecutive passing checks that put a removed key back.
    #[arg(long, default_value_t = 2)]
    pub rise: u32,
    /// Consecutive failing checks that remove the key.
    #[arg(long, default_value_t = 3)]
    pub fall: u32,
    /// Docker container whose published port is announced (read from the Docker Engine API);
    /// the host is --addr HOST (no port) or --docker-host-ip.
    #[arg(long, value_name = "NAME", requires = "container_port")]
    pub docker_container: Option<String>,
    /// The container's port whose host binding is announced, like 8080/tcp.
    #[arg(long, value_name = "PORT/PROTO", requires = "docker_container")]
    pub container_port: Option<String>,
    /// The Docker Engine API socket.
    #[arg(long, value_name = "PATH", default_value = "/var/run/docker.sock")]
    pub docker_socket: PathBuf,
    /// The host address announced with the discovered port; default 127.0.0.1.
    #[arg(
        long,
        value_name = "IP",
        requires = "docker_container",
        conflicts_with = "addr"
    )]
    pub docker_host_ip: Option<String>,
}
