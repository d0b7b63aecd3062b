//! The fast path of a server-only change: its decisions, without I/O.
//!
//! A server-only change (see [`typed`]) is sent to HAProxy from the typed registries, before
//! anything is rendered, and the files follow: once changes pause for `[wait] min`, and at the
//! latest `[wait] max` after the first change sent ahead of them. Until then HAProxy is *ahead*
//! of the installed files, by server-only changes only, in a *window*. Every window ends with
//! the files installed and HAProxy checked against them, or with HAProxy put back to the
//! installed files:
//!
//! - the install succeeds: the plan from the files must equal the typed plan from the registry
//!   of the installed files (else the template renders server lines otherwise, and the fast
//!   path turns itself off); HAProxy then needs only what changed since the last send (usually
//!   nothing), unless it may not hold what was sent — a send that failed, a reload or restart
//!   of HAProxy seen in the master's `show proc` or in the restart count, new templates — and
//!   then it is realigned with the installed file from `show servers state`;
//! - the install or the reload fails: HAProxy is realigned with the installed (previous) file,
//!   and after a failure on the disk nothing is sent ahead until an install lands again, so
//!   that HAProxy never serves what the disk could not take.
//!
//! The fast path runs only for a template proven to render what the typed plan assumes
//! ([`typed::conforms`], once per set of templates), over an installed file this process
//! proved, with the master's `show proc` known since the last commit.
//!
//! [`typed`]: crate::haproxy::runtime::typed

use tokio::time::Instant;

use crate::config::WaitConfig;
use crate::haproxy::runtime::{Cmd, typed};
use crate::model::Registry;

/// Whether the templates render the server lines the typed plan assumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// Not yet looked at: the next render is.
    Unproven,
    Proven,
    /// They render otherwise: server-only changes are installed first, then sent, as the files
    /// say.
    Off,
}

/// What HAProxy was seen running after the last commit: the master's PID and reload count
/// (`show proc`), and the restarts of a supervised HAProxy counted so far. Any other value at
/// the end of a window means HAProxy loaded the installed file since, dropping what was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub master_pid: u32,
    pub reloads: u64,
    pub restarts: u64,
}

/// What to make HAProxy do once the files of a window are installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// These commands (what changed since the last send; often none).
    Send(Vec<Cmd>),
    /// Compare it with the installed file (`show servers state`) and set what differs.
    Realign,
}

/// HAProxy ahead of the installed files.
#[derive(Debug, Clone)]
struct Window {
    /// The registry of the installed files.
    installed: Registry,
    /// The registry whose servers HAProxy holds.
    served: Registry,
    opened: Instant,
    last_send: Instant,
    /// HAProxy may not hold `served`: a send failed part-way, HAProxy was set from the
    /// installed file or restarted, or the templates changed. Nothing more is sent ahead, and
    /// the window closes at once, with a realign.
    dirty: bool,
}

/// The fast path's state across applies.
#[derive(Debug)]
pub struct FastPath {
    proof: Proof,
    window: Option<Window>,
    /// What HAProxy was seen running after the last commit (None: unknown, no fast path).
    seen: Option<Seen>,
    /// An install failed on the disk and none landed since.
    disk_failed: bool,
    wait: WaitConfig,
}

impl FastPath {
    pub fn new(wait: WaitConfig) -> FastPath {
        FastPath {
            proof: Proof::Unproven,
            window: None,
            seen: None,
            disk_failed: false,
            wait,
        }
    }

    pub fn proof(&self) -> Proof {
        self.proof
    }

    /// New config and templates: the templates are proven again, and a window open on the
    /// old ones closes with a realign.
    pub fn configure(&mut self, wait: WaitConfig) {
        self.wait = wait;
        self.proof = Proof::Unproven;
        self.disturbed();
    }

    /// HAProxy was set from the installed file behind the window's back (`master` mode's look
    /// at a restarted HAProxy): the window closes at once, with a realign.
    pub fn disturbed(&mut self) {
        if let Some(w) = self.window.as_mut() {
            w.dirty = true;
        }
    }

    /// Proves the templates once, on a render of `registry` whose HAProxy file is `cfg`.
    pub fn prove(&mut self, registry: &Registry, cfg: &str) {
        if self.proof != Proof::Unproven {
            return;
        }
        match typed::conforms(registry, cfg) {
            Ok(()) => {
                self.proof = Proof::Proven;
                tracing::debug!(
                    "the HAProxy template renders server lines the typed plan follows: server-only changes are sent before the render"
                );
            }
            Err(why) => {
                self.proof = Proof::Off;
                tracing::warn!(reason = %why, "the HAProxy template renders server lines otherwise than the slots say; server-only changes are installed first and then sent, as the files say");
            }
        }
    }

    /// The registry HAProxy serves while it is ahead of the installed files.
    pub fn served(&self) -> Option<&Registry> {
        self.window.as_ref().map(|w| &w.served)
    }

    /// When the files must follow what was sent ahead of them.
    pub fn due(&self) -> Option<Instant> {
        let w = self.window.as_ref()?;
        Some(if w.dirty {
            w.opened
        } else {
            (w.last_send + self.wait.min).min(w.opened + self.wait.max)
        })
    }

    /// The commands that take HAProxy to `wanted` ahead of the files, when the fast path may
    /// send them: `installed` is the registry of the installed files, `file_proven` whether
    /// they are the files this process proved, `restarts` the supervised HAProxy's restarts
    /// counted so far. None: the files go first. A window that is due (see
    /// [`FastPath::due`]) still takes the change, and the same apply then installs the files,
    /// so that a stream of changes cannot keep them behind for longer than `[wait] max`.
    pub fn commands(
        &mut self,
        installed: &Registry,
        wanted: &Registry,
        file_proven: bool,
        restarts: u64,
    ) -> Option<Vec<Cmd>> {
        let seen = self.seen?;
        if seen.restarts != restarts {
            // HAProxy restarted on the installed file since the last commit.
            self.disturbed();
            return None;
        }
        if self.proof != Proof::Proven || self.disk_failed || !file_proven {
            return None;
        }
        let base = match &self.window {
            Some(w) if w.dirty => return None,
            Some(w) => &w.served,
            None => installed,
        };
        match typed::plan(base, wanted) {
            Ok(cmds) if !cmds.is_empty() => Some(cmds),
            Ok(_) => None,
            Err(why) => {
                tracing::debug!(reason = %why.0, "not a server-only change of the slots: the files go first");
                None
            }
        }
    }

    /// The commands of [`FastPath::commands`] were sent (`ok`: and every reply checked):
    /// HAProxy serves `wanted` ahead of the files.
    pub fn sent(&mut self, installed: &Registry, wanted: Registry, ok: bool, now: Instant) {
        match self.window.as_mut() {
            Some(w) => {
                w.served = wanted;
                w.last_send = now;
                w.dirty |= !ok;
            }
            None => {
                self.window = Some(Window {
                    installed: installed.clone(),
                    served: wanted,
                    opened: now,
                    last_send: now,
                    dirty: !ok,
                });
            }
        }
    }

    /// Once the files of `registry` are rendered and planned (`files`: the plan from the files,
    /// or why they need a reload), what HAProxy needs after their install, when a window is
    /// open. A plan from the files that is not the typed plan from the installed registry
    /// turns the fast path off: the template renders server lines otherwise.
    pub fn closing(&mut self, registry: &Registry, files: Result<&[Cmd], &str>) -> Option<After> {
        let w = self.window.as_ref()?;
        if w.dirty || self.proof != Proof::Proven {
            return Some(After::Realign);
        }
        let expected = typed::plan(&w.installed, registry);
        // Only what was sent ahead changed since the files were installed.
        let only_sent = typed::same(&w.served, registry);
        let disagree = match (&expected, files) {
            (Ok(typed), Ok(files)) => {
                let (maps, servers): (Vec<&Cmd>, Vec<&Cmd>) =
                    files.iter().partition(|c| matches!(c, Cmd::Map { .. }));
                if typed.len() != servers.len() || typed.iter().zip(&servers).any(|(a, b)| a != *b)
                {
                    Some(format!("the files set {servers:?}, the registry {typed:?}"))
                } else if only_sent && !maps.is_empty() {
                    // A map that follows the instances lagged behind them.
                    Some("a map changed with the instances".to_owned())
                } else {
                    None
                }
            }
            // The files need a reload for what was sent ahead alone.
            (_, Err(why)) if only_sent => Some(why.to_owned()),
            _ => None,
        };
        if let Some(why) = disagree {
            self.proof = Proof::Off;
            tracing::warn!(reason = %why, "the HAProxy template renders server lines otherwise than the slots say; HAProxy is realigned with the installed file, and server-only changes are installed first from now on");
            return Some(After::Realign);
        }
        if only_sent {
            return Some(After::Send(Vec::new()));
        }
        Some(match typed::plan(&w.served, registry) {
            Ok(cmds) => After::Send(cmds),
            Err(_) => After::Realign,
        })
    }

    /// `after` once the files are installed and HAProxy was seen as `now`: a realign when
    /// HAProxy loaded a file since the last commit (or cannot be seen).
    pub fn after_install(&self, after: After, now: Option<Seen>) -> After {
        match (self.seen, now) {
            (Some(before), Some(now)) if before == now => after,
            _ => After::Realign,
        }
    }

    /// A commit ended with the files installed and HAProxy holding them (seen as `now`): the
    /// window is closed.
    pub fn committed(&mut self, now: Option<Seen>) {
        self.window = None;
        self.seen = now;
        self.disk_failed = false;
    }

    /// A commit failed (`disk`: on the disk) and the previous files are in place. Says whether
    /// HAProxy was ahead of them and must be put back.
    pub fn failed(&mut self, disk: bool) -> bool {
        self.disk_failed |= disk;
        // Until the next commit says what runs.
        self.seen = None;
        self.window.take().is_some()
    }
}

#[cfg(test)]
mod tests;
