//! What the installed files say: the plan from the rendered files against them, and the
//! running HAProxy's servers realigned with them.

use std::path::Path;
use std::time::Duration;

use super::fast::FastPath;
use super::{Current, Settings};
use crate::haproxy::{install, master, runtime};
use crate::model::Registry;
use crate::render::Rendered;

/// The plan from the files: the installed files read, each rendered file compared with its
/// installed one. Only the file HAProxy loads (through `set server`) and map files (replaced
/// whole) may change. Proves the templates for the fast path on the way.
pub(super) fn plan_files(
    settings: &Settings,
    fast: &mut FastPath,
    rendered: &[Rendered],
    registry: &Registry,
) -> Result<(Vec<runtime::Cmd>, Current), String> {
    let main = settings.main.as_ref().ok_or("no haproxy template")?;
    let mut plan = None;
    let mut maps = Vec::new();
    let mut current = Vec::with_capacity(rendered.len());
    for r in rendered {
        let installed = install::read_installed(&r.template.dest)
            .map_err(|e| e.to_string())?
            .ok_or("nothing installed yet")?;
        // Strict UTF-8 (a render always is): the lossy conversion walked a megabyte byte by
        // byte on every apply.
        if &r.template.dest == main {
            let (old, new) = (as_text(&installed, r)?, as_text(&r.bytes, r)?);
            fast.prove(registry, new);
            plan = Some(runtime::plan(old, new).map_err(|e| e.0)?);
        } else if installed != r.bytes {
            if !r.template.map {
                return Err(format!("template {:?} changed too", r.template.name));
            }
            let path = r.template.dest.display().to_string();
            let new = as_text(&r.bytes, r)?;
            maps.push(runtime::plan_map(&path, new).map_err(|e| e.0)?);
        }
        current.push(Some(installed));
    }
    let mut cmds = plan.ok_or("the haproxy template was not rendered")?;
    cmds.extend(maps);
    Ok((cmds, current))
}

/// A rendered or installed file as text, for a Runtime API plan.
fn as_text<'a>(bytes: &'a [u8], r: &Rendered) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", r.template.dest.display()))
}

/// Brings the servers the running HAProxy holds (`show servers state` on `runtime_socket`) in
/// line with the installed file `config`, through the Runtime API; says how many commands that
/// took (0: they were in line). An error says why that cannot be done, and a reload is then the
/// way.
pub(super) async fn realign(
    runtime_socket: &Path,
    config: &Path,
    timeout: Duration,
) -> Result<usize, String> {
    let cfg = std::fs::read(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let cfg =
        std::str::from_utf8(&cfg).map_err(|_| format!("{} is not UTF-8", config.display()))?;
    let state = master::command(runtime_socket, "show servers state", timeout)
        .await
        .map_err(|e| e.to_string())?;
    let cmds = runtime::plan_state(&state, cfg).map_err(|e| e.0)?;
    // The caller logs how many; a stale state file can hold thousands of servers.
    for c in &cmds {
        tracing::debug!(command = %c, "realigning a server with the installed file");
    }
    if !cmds.is_empty() {
        runtime::apply(runtime_socket, &cmds, timeout)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(cmds.len())
}
