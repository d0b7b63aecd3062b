//! The Runtime API plan from two typed registries, before anything is rendered.
//!
//! When two registries (both slotted, see `slots::Slots`) hold the same services with the same
//! routes and the same slot layout, and only the instances inside the slots changed (address
//! as an IP literal, port, weight, state), the difference is a list of `set server` commands
//! that can be known in microseconds, without rendering or reading a file: the fast path sends
//! them first and the file follows. Anything else — a service added or removed, a route, a
//! slot added, a host name, an instance's meta — is left to the plan from the rendered files.
//!
//! The commands are those the default template's server lines imply: an instance in a slot is
//! `server <slot> <addr> weight <W>` when ready, `weight 0` when draining, `weight <W>
//! disabled` in maintenance, and a free slot is `server <slot> 127.0.0.1:1 disabled`.
//! [`conforms`] proves that a render follows that shape server line by server line, so that a
//! template which renders them otherwise never takes the fast path.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use super::plan::{Set, parse_server, server_cmds};
use super::{Cmd, NeedsReload};
use crate::model::{Instance, Registry, Service, Slot, State};

/// A free slot: `server <slot> 127.0.0.1:1 disabled` (weight 1, HAProxy's default).
const FREE: Set = Set {
    ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
    port: 1,
    weight: 1,
    disabled: true,
};

/// The instance in `slot` of `service`, if any.
fn occupant<'a>(service: &'a Service, slot: &Slot) -> Result<Option<&'a Instance>, String> {
    match slot.instance {
        None => Ok(None),
        Some(i) => service.instances.get(i).map(Some).ok_or_else(|| {
            format!(
                "{}/{}: the slot names no instance of its service",
                service.backend, slot.name
            )
        }),
    }
}

/// An instance's meta, None for a free slot or no meta.
fn meta(i: Option<&Instance>) -> Option<&std::collections::BTreeMap<String, String>> {
    i.map(|i| &i.meta).filter(|m| !m.is_empty())
}

/// What a server line says for an instance (None: a free slot), or why the Runtime API cannot
/// say it.
fn set_of(instance: Option<&Instance>) -> Result<Set, String> {
    let Some(i) = instance else {
        return Ok(FREE);
    };
    let ip: IpAddr = i
        .host
        .parse()
        .map_err(|_| format!("instance {:?} has a host name, not an IP address", i.id))?;
    let (weight, disabled) = match i.state {
        State::Ready => (i.weight, false),
        State::Drain => (0, false),
        State::Maint => (i.weight, true),
    };
    Ok(Set {
        ip,
        port: i.port,
        weight,
        disabled,
    })
}

/// The commands that take HAProxy from `from` to `to`, two slotted registries, or why the
/// change needs the files (a reload, or a plan from the rendered files).
pub fn plan(from: &Registry, to: &Registry) -> Result<Vec<Cmd>, NeedsReload> {
    let refuse = |why: String| Err(NeedsReload(why));
    if from.services.len() != to.services.len() {
        return refuse("services were added or removed".into());
    }
    let mut cmds = Vec::new();
    for (a, b) in from.services.iter().zip(&to.services) {
        // The same service, unchanged: the parse cache and the slots hand out the same `Arc`.
        if Arc::ptr_eq(a, b) {
            continue;
        }
        if a.name != b.name || a.backend != b.backend {
            return refuse("services were added or removed".into());
        }
        if a.route != b.route {
            return refuse(format!("the route of service {:?} changed", b.name));
        }
        let same_layout = a.slots.len() == b.slots.len()
            && a.slots.iter().zip(&b.slots).all(|(x, y)| x.name == y.name);
        if !same_layout {
            return refuse(format!("the server slots of {} changed", b.backend));
        }
        for (slot_a, slot_b) in a.slots.iter().zip(&b.slots) {
            let ia = occupant(a, slot_a).map_err(NeedsReload)?;
            let ib = occupant(b, slot_b).map_err(NeedsReload)?;
            if ia == ib {
                continue;
            }
            if meta(ia) != meta(ib) {
                return refuse(format!(
                    "{}/{}: an instance's meta changed",
                    b.backend, slot_b.name
                ));
            }
            let (sa, sb) = (set_of(ia), set_of(ib));
            let (sa, sb) = sa
                .and_then(|a| Ok((a, sb?)))
                .map_err(|why| NeedsReload(format!("{}/{}: {why}", b.backend, slot_b.name)))?;
            server_cmds(&b.backend, &slot_b.name, &sa, &sb, &mut cmds)
                .map_err(|why| NeedsReload(format!("{}/{}: {why}", b.backend, slot_b.name)))?;
        }
    }
    Ok(cmds)
}

/// Whether two slotted registries are the same, service by service (the same `Arc`s, or equal).
pub fn same(a: &Registry, b: &Registry) -> bool {
    a.services.len() == b.services.len()
        && a.services
            .iter()
            .zip(&b.services)
            .all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
}

/// Proves that `cfg`, the render of `registry`, holds exactly the server lines [`plan`] assumes:
/// every service's backend, once, with one `server` line per slot in slot order, each with the
/// slot's name and the address, port, weight and maintenance of its instance (or of a free
/// slot). Other lines and the other words of a server line are not looked at: the plan from the
/// files, which checks them, runs on every install. The first difference is the error.
pub fn conforms(registry: &Registry, cfg: &str) -> Result<(), String> {
    let by_backend: HashMap<&str, &Service> = registry
        .services
        .iter()
        .map(|s| (s.backend.as_str(), s.as_ref()))
        .collect();
    let mut seen: HashSet<&str> = HashSet::new();
    // The service whose backend section this is, and how many of its server lines came so far.
    let mut current: Option<(&Service, usize)> = None;
    let end = |current: Option<(&Service, usize)>| match current {
        Some((s, n)) if n != s.slots.len() => Err(format!(
            "backend {} has {n} server lines for {} slots",
            s.backend,
            s.slots.len()
        )),
        _ => Ok(()),
    };
    for line in cfg.lines() {
        let words: Vec<&str> = line
            .split_whitespace()
            .take_while(|w| !w.starts_with('#'))
            .collect();
        let header = words.first().is_some_and(|w| {
            matches!(
                *w,
                "backend" | "frontend" | "listen" | "defaults" | "global"
            ) || !line.starts_with(char::is_whitespace)
        });
        if header {
            end(current.take())?;
            if let ["backend", name] = words[..]
                && let Some(s) = by_backend.get(name)
            {
                if !seen.insert(name) {
                    return Err(format!("backend {name} appears twice"));
                }
                current = Some((s, 0));
            }
            continue;
        }
        let Some((service, n)) = current.as_mut() else {
            continue;
        };
        let ["server", name, ..] = words[..] else {
            continue;
        };
        let at = format!("{}/{name}", service.backend);
        let slot = service
            .slots
            .get(*n)
            .ok_or_else(|| format!("{at}: more server lines than slots"))?;
        *n += 1;
        if name != slot.name {
            return Err(format!("{at}: slot {} was expected here", slot.name));
        }
        let wanted = occupant(service, slot).and_then(set_of);
        match (parse_server(line), wanted) {
            (Some(s), Ok(w)) if s.set == w => {}
            // A host name: neither side can be set through the Runtime API, and `plan` refuses
            // every change to it.
            (None, Err(_)) => {}
            (got, wanted) => {
                return Err(format!(
                    "{at}: the line says {:?}, the slot {:?}",
                    got.map(|s| s.set),
                    wanted
                ));
            }
        }
    }
    end(current)?;
    if let Some(missing) = registry
        .services
        .iter()
        .find(|s| !seen.contains(s.backend.as_str()))
    {
        return Err(format!("backend {} is not in the file", missing.backend));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
