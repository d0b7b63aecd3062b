//! The Runtime API plan: the commands that turn one file into another, or why a reload is needed.
//!
//! The plan is derived from the two rendered files, not from the registry, so it holds for any
//! template: when the old and the new file differ only in `server` lines that keep their
//! backend, position and name, and only in the address, the weight and `disabled`, the
//! difference is exactly a list of `set server` commands. Anything else — a new line, a renamed
//! server, another keyword, a host name instead of an IP — needs a reload. Every token sent to
//! the socket is parsed and printed again (IP address, port, weight), so no raw text from a
//! file or a source reaches a command.

use std::net::IpAddr;

use super::{Cmd, LAME_DUCK_SWITCH};

/// A parsed `server` line.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Server<'a> {
    pub(super) name: &'a str,
    pub(super) set: Set,
    /// Every other token, in order: must be equal on both sides.
    rest: Vec<&'a str>,
}

/// What the Runtime API sets on a server: its address, its weight and its maintenance
/// (`disabled` in the file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Set {
    pub(super) ip: IpAddr,
    pub(super) port: u16,
    pub(super) weight: u16,
    pub(super) disabled: bool,
}

/// Appends the commands that take server `backend/server` from `a` to `b`: into maintenance
/// first, out of it last, so that it never takes traffic at a half-set address. Both plans
/// (from the files and from the typed registries) go through here, so the same change is the
/// same commands in the same order. A weight above 256 cannot be set: the caller reloads.
pub(super) fn server_cmds(
    backend: &str,
    server: &str,
    a: &Set,
    b: &Set,
    cmds: &mut Vec<Cmd>,
) -> Result<(), String> {
    let (backend, server) = (backend.to_owned(), server.to_owned());
    if b.weight != a.weight && b.weight > 256 {
        return Err("weight above 256".into());
    }
    if b.disabled && !a.disabled {
        cmds.push(Cmd::State {
            backend: backend.clone(),
            server: server.clone(),
            ready: false,
        });
    }
    if (a.ip, a.port) != (b.ip, b.port) {
        cmds.push(Cmd::Addr {
            backend: backend.clone(),
            server: server.clone(),
            ip: b.ip,
            port: b.port,
        });
    }
    if a.weight != b.weight {
        cmds.push(Cmd::Weight {
            backend: backend.clone(),
            server: server.clone(),
            weight: b.weight,
        });
    }
    if a.disabled && !b.disabled {
        cmds.push(Cmd::State {
            backend,
            server,
            ready: true,
        });
    }
    Ok(())
}

/// HAProxy's names: letters, digits, '-', '_', '.', ':'.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn parse_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h, p)
    } else {
        s.rsplit_once(':')?
    };
    Some((host.parse().ok()?, port.parse().ok()?))
}

pub(super) fn parse_server(line: &str) -> Option<Server<'_>> {
    let mut words = line.split_whitespace();
    if words.next()? != "server" {
        return None;
    }
    let name = words.next().filter(|n| is_name(n))?;
    let (ip, port) = parse_addr(words.next()?)?;
    let mut weight = 1;
    let mut disabled = false;
    let mut rest = Vec::new();
    while let Some(w) = words.next() {
        match w {
            "weight" => weight = words.next()?.parse().ok()?,
            "disabled" => disabled = true,
            other if other.starts_with('#') => break,
            other => rest.push(other),
        }
    }
    Some(Server {
        name,
        set: Set {
            ip,
            port,
            weight,
            disabled,
        },
        rest,
    })
}

/// A map key or value written into `add map` as it is: no spaces, quotes, `;` or `#`.
fn is_map_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

/// The command that makes the map HAProxy loaded from `path` hold `text`, a map file of
/// `<key> <value>` lines (blank lines and `#` comments aside). Every token is checked, so
/// no raw text reaches a command: a line that is anything else needs a reload.
pub fn plan_map(path: &str, text: &str) -> Result<Cmd, NeedsReload> {
    if !crate::config::is_map_path(path) {
        return Err(NeedsReload(format!(
            "map path {path:?} cannot be named on the socket"
        )));
    }
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            [k, v] if is_map_token(k) && is_map_token(v) => {
                entries.push((k.to_owned(), v.to_owned()));
            }
            _ => {
                return Err(NeedsReload(format!(
                    "map {path} line {}: not `<key> <value>` of plain tokens",
                    i + 1
                )));
            }
        }
    }
    Ok(Cmd::Map {
        path: path.to_owned(),
        entries,
    })
}

/// Why a change needs a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedsReload(pub String);

/// The commands that turn what runs (`old`) into `new`, or why a reload is needed.
pub fn plan(old: &str, new: &str) -> Result<Vec<Cmd>, NeedsReload> {
    let reload = |why: String| Err(NeedsReload(why));
    let (old_lines, new_lines): (Vec<&str>, Vec<&str>) =
        (old.lines().collect(), new.lines().collect());
    if old_lines.len() != new_lines.len() {
        return reload("lines were added or removed".into());
    }
    let mut backend: Option<&str> = None;
    let mut cmds = Vec::new();
    for (i, (a, b)) in old_lines.iter().zip(&new_lines).enumerate() {
        let first = a.split_whitespace().next();
        if first.is_some_and(|w| {
            matches!(w, "backend" | "frontend" | "listen" | "defaults" | "global")
                || !a.starts_with(char::is_whitespace)
        }) {
            backend = match a.split_whitespace().collect::<Vec<_>>()[..] {
                ["backend", name] if is_name(name) => Some(name),
                _ => None,
            };
        }
        if a == b {
            continue;
        }
        let line = i + 1;
        let (Some(be), Some(sa), Some(sb)) = (backend, parse_server(a), parse_server(b)) else {
            return reload(format!(
                "line {line} changed outside a backend's server lines"
            ));
        };
        if sa.name != sb.name || sa.rest != sb.rest {
            return reload(format!("line {line}: the server's name or options changed"));
        }
        server_cmds(be, sb.name, &sa.set, &sb.set, &mut cmds)
            .map_err(|why| NeedsReload(format!("line {line}: {why}")))?;
    }
    Ok(cmds)
}

/// The `show servers state` text to save before a reload of `new_cfg`, without the servers
/// that `new_cfg` changes.
///
/// HAProxy 2.6 restores a server's port from the state file over the config's, and its user
/// weight (when the config weight is unchanged) and forced maintenance too. A slot whose
/// address, port, weight or `disabled` changes in the same apply as a reload (exhausted spare
/// slots, a new route together with a moved instance) would come back with its old values and
/// disagree with the file. Those lines are dropped, so that those servers start from the config;
/// every other server keeps its health and state.
pub fn filter_state(state: &str, new_cfg: &str) -> String {
    let mut wanted = std::collections::HashMap::new();
    let mut backend: Option<&str> = None;
    for line in new_cfg.lines() {
        let words: Vec<&str> = line
            .split_whitespace()
            .take_while(|w| !w.starts_with('#'))
            .collect();
        if !line.starts_with(char::is_whitespace) {
            backend = match words[..] {
                ["backend", name] => Some(name),
                _ => None,
            };
            continue;
        }
        let (Some(be), ["server", name, addr, rest @ ..]) = (backend, &words[..]) else {
            continue;
        };
        let (host, port) = match addr.strip_prefix('[') {
            Some(v6) => v6.split_once("]:").unwrap_or((v6, "")),
            None => addr.rsplit_once(':').unwrap_or((addr, "")),
        };
        let weight = rest
            .iter()
            .position(|w| *w == "weight")
            .and_then(|i| rest.get(i + 1));
        wanted.insert(
            (be, *name),
            (
                host.parse::<IpAddr>().ok(),
                port.to_owned(),
                weight.map_or("1", |w| w),
                rest.contains(&"disabled"),
            ),
        );
    }
    let mut out = String::with_capacity(state.len());
    for line in state.lines() {
        // be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight
        // srv_iweight … srv_port (field 18)
        let f: Vec<&str> = line.split_whitespace().collect();
        let keep = line.starts_with('#')
            || f.len() < 19
            || wanted
                .get(&(f[1], f[3]))
                .is_none_or(|(ip, port, weight, disabled)| {
                    // In maintenance: FMAINT, IMAINT or RMAINT (SRV_ADMF_MAINT, 0x23).
                    let maint = f[6].parse::<u32>().is_ok_and(|a| a & 0x23 != 0);
                    ip.is_none_or(|ip| f[4].parse::<IpAddr>().ok() == Some(ip))
                        && f[18] == port
                        && f[7] == *weight
                        && maint == *disabled
                });
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The commands that bring the servers a running HAProxy holds (`show servers state`) in line
/// with `cfg`, the file it is meant to run, or why only a reload can.
///
/// An HAProxy that its own supervisor restarted loads the file and then the server state file
/// haconfd saved before its last reload, so a server the Runtime API changed since comes back
/// with its older address, port, weight or maintenance. Only what the Runtime API sets is
/// compared; a server whose address is a host name is left to HAProxy's resolver. A server on
/// one side only means that HAProxy runs another file. The lame-duck switch is haconfd's own
/// and keeps its state.
pub fn plan_state(state: &str, cfg: &str) -> Result<Vec<Cmd>, NeedsReload> {
    let reload = |why: String| Err(NeedsReload(why));
    // be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight
    // srv_iweight … srv_port (field 18)
    let mut live = std::collections::HashMap::new();
    for line in state.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with('#') || f.len() < 19 {
            continue;
        }
        // In maintenance: FMAINT, IMAINT or RMAINT (SRV_ADMF_MAINT, 0x23).
        let maint = f[6].parse::<u32>().is_ok_and(|a| a & 0x23 != 0);
        live.insert((f[1], f[3]), (f[4], f[18], f[7], maint));
    }
    let mut cmds = Vec::new();
    let mut section: Option<&str> = None;
    for line in cfg.lines() {
        let words: Vec<&str> = line
            .split_whitespace()
            .take_while(|w| !w.starts_with('#'))
            .collect();
        if !line.starts_with(char::is_whitespace) {
            section = match words[..] {
                ["backend" | "listen", name] if is_name(name) => Some(name),
                _ => None,
            };
            continue;
        }
        let (Some(be), ["server", name, ..]) = (section, &words[..]) else {
            continue;
        };
        let Some((addr, port, weight, maint)) = live.remove(&(be, *name)) else {
            return reload(format!(
                "HAProxy has no server {be}/{name}: it runs another file"
            ));
        };
        let Some(Server { set: s, .. }) =
            parse_server(line).filter(|_| (be, *name) != LAME_DUCK_SWITCH)
        else {
            continue;
        };
        let (backend, server) = (be.to_string(), name.to_string());
        if s.disabled && !maint {
            cmds.push(Cmd::State {
                backend: backend.clone(),
                server: server.clone(),
                ready: false,
            });
        }
        if addr.parse::<IpAddr>().ok() != Some(s.ip) || port.parse::<u16>().ok() != Some(s.port) {
            cmds.push(Cmd::Addr {
                backend: backend.clone(),
                server: server.clone(),
                ip: s.ip,
                port: s.port,
            });
        }
        if weight.parse::<u16>().ok() != Some(s.weight) {
            if s.weight > 256 {
                return reload(format!("{be}/{name}: weight above 256"));
            }
            cmds.push(Cmd::Weight {
                backend: backend.clone(),
                server: server.clone(),
                weight: s.weight,
            });
        }
        if maint && !s.disabled {
            cmds.push(Cmd::State {
                backend,
                server,
                ready: true,
            });
        }
    }
    if let Some((be, name)) = live.keys().min() {
        return reload(format!(
            "HAProxy runs server {be}/{name}, which the file does not hold"
        ));
    }
    Ok(cmds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "\
global
    master-worker
backend be_web
    balance roundrobin
    server srv1 127.0.0.1:8001 weight 100
    server srv2 127.0.0.1:8002 weight 100
    server srv3 127.0.0.1:1 disabled
backend be_api
    server srv1 [::1]:9000 weight 10
";

    fn cmds(new: &str) -> Vec<String> {
        match plan(OLD, new) {
            Ok(c) => c.iter().map(ToString::to_string).collect(),
            Err(e) => panic!("needs reload: {}", e.0),
        }
    }

    #[test]
    fn a_map_file_becomes_one_replace_of_checked_tokens() {
        let text = "# comment\n\napi be_api\n  www.test   be_web  \n";
        match plan_map("/run/x/hosts.map", text) {
            Ok(Cmd::Map { path, entries }) => {
                assert_eq!(path, "/run/x/hosts.map");
                assert_eq!(
                    entries,
                    [
                        ("api".to_owned(), "be_api".to_owned()),
                        ("www.test".to_owned(), "be_web".to_owned())
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "api be_api extra\n",
            "api\n",
            "a;show be_api\n",
            "api \"be_api\"\n",
            "api be#x\n",
        ] {
            assert!(plan_map("/run/hosts.map", bad).is_err(), "{bad:?}");
        }
        assert!(plan_map("/run/my hosts.map", "a b\n").is_err());
    }

    #[test]
    fn address_weight_and_state_changes_become_commands() {
        let new = OLD
            .replace(
                "srv2 127.0.0.1:8002 weight 100",
                "srv2 127.0.0.1:8012 weight 50",
            )
            .replace(
                "srv3 127.0.0.1:1 disabled",
                "srv3 127.0.0.1:8003 weight 100",
            )
            .replace("srv1 [::1]:9000 weight 10", "srv1 127.0.0.1:1 disabled");
        assert_eq!(
            cmds(&new),
            vec![
                "set server be_web/srv2 addr 127.0.0.1 port 8012",
                "set server be_web/srv2 weight 50",
                "set server be_web/srv3 addr 127.0.0.1 port 8003",
                "set server be_web/srv3 weight 100",
                "set server be_web/srv3 state ready",
                "set server be_api/srv1 state maint",
                "set server be_api/srv1 addr 127.0.0.1 port 1",
                "set server be_api/srv1 weight 1",
            ]
        );
        assert!(cmds(OLD).is_empty());
    }

    #[test]
    fn structural_changes_need_a_reload() {
        for new in [
            OLD.replace("balance roundrobin", "balance leastconn"),
            OLD.replace("srv2 127.0.0.1:8002", "srv9 127.0.0.1:8002"),
            OLD.replace(
                "srv2 127.0.0.1:8002 weight 100",
                "srv2 localhost:8002 weight 100",
            ),
            OLD.replace(
                "srv2 127.0.0.1:8002 weight 100",
                "srv2 127.0.0.1:8002 weight 100 backup",
            ),
            format!("{OLD}    server srv2 127.0.0.1:8004 weight 1\n"),
            OLD.replace("    master-worker\n", "    master-worker\n    nbthread 2\n"),
        ] {
            assert!(plan(OLD, &new).is_err(), "should reload:\n{new}");
        }
    }

    #[test]
    fn saved_state_drops_the_servers_the_new_config_changes() {
        let head = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n";
        let line = |srv: &str, addr: &str, admin: u32, uweight: u32, port: u16| {
            format!(
                "3 be_web 1 {srv} {addr} 2 {admin} {uweight} 100 5 6 3 4 6 0 0 0 - {port} - 0 0 - - 0\n"
            )
        };
        let state = format!(
            "{head}{}{}{}{}{}",
            // srv1 runs as the file says: kept (CMAINT alone is not maintenance).
            line("srv1", "127.0.0.1", 4, 100, 8001),
            // srv2 was a free slot; the new file puts an instance there: dropped.
            line("srv2", "127.0.0.1", 5, 1, 1),
            // srv3 runs at weight 50; the new file says 100: dropped.
            line("srv3", "127.0.0.1", 0, 50, 8003),
            // srv4 forced into maintenance; the new file makes it ready: dropped.
            line("srv4", "127.0.0.1", 1, 100, 8004),
            // srv5 is not in the new file: kept (HAProxy ignores it).
            line("srv5", "127.0.0.1", 0, 100, 8005),
        );
        let cfg = "backend be_web\n    balance roundrobin\n    \
                   server srv1 127.0.0.1:8001 weight 100  # a\n    \
                   server srv2 127.0.0.1:8002 weight 100  # b\n    \
                   server srv3 127.0.0.1:8003 weight 100  # c\n    \
                   server srv4 127.0.0.1:8004 weight 100  # d\n";
        let kept = filter_state(&state, cfg);
        let names: Vec<&str> = kept
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_whitespace().nth(3))
            .collect();
        assert_eq!(names, ["srv1", "srv5"], "{kept}");
        assert!(kept.starts_with(head), "{kept}");
        // Another backend of the same name in another file does not match.
        assert_eq!(
            filter_state(&state, "backend be_api\n    server srv2 127.0.0.1:1\n"),
            state
        );
    }

    #[test]
    fn running_servers_are_brought_in_line_with_the_file() {
        let head = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n";
        let line = |be: &str, srv: &str, addr: &str, admin: u32, uweight: u32, port: u16| {
            format!(
                "3 {be} 1 {srv} {addr} 2 {admin} {uweight} 100 5 6 3 4 6 0 0 0 - {port} - 0 0 - - 0\n"
            )
        };
        let cfg = "backend be_web\n    balance roundrobin\n    \
                   server srv1 127.0.0.1:8001 weight 100  # a\n    \
                   server srv2 127.0.0.1:8002 weight 100  # b\n    \
                   server srv3 127.0.0.1:1 disabled\n    \
                   server srv4 db.internal:5432 weight 3\n\
                   backend _lameduck\n    server serving 127.0.0.1:1 no-check\n";
        let state = |srv2: String, srv3: String| {
            format!(
                "{head}{}{srv2}{srv3}{}{}",
                // As the file says (CMAINT alone is not maintenance).
                line("be_web", "srv1", "127.0.0.1", 4, 100, 8001),
                // A host name: HAProxy's resolver owns its address.
                line("be_web", "srv4", "127.0.0.9", 0, 3, 5432),
                // The lame-duck switch is on: haconfd's own, kept.
                line("_lameduck", "serving", "127.0.0.1", 1, 1, 1),
            )
        };
        let in_line = state(
            line("be_web", "srv2", "127.0.0.1", 0, 100, 8002),
            line("be_web", "srv3", "127.0.0.1", 5, 1, 1),
        );
        assert_eq!(plan_state(&in_line, cfg), Ok(Vec::new()));
        // What a stale server state file restores: srv2 at its old port and weight and in
        // maintenance, the free slot srv3 still serving an instance that moved on.
        let stale = state(
            line("be_web", "srv2", "127.0.0.1", 1, 50, 8009),
            line("be_web", "srv3", "127.0.0.1", 4, 100, 8003),
        );
        let cmds: Vec<String> = plan_state(&stale, cfg)
            .expect("set server commands")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            cmds,
            [
                "set server be_web/srv2 addr 127.0.0.1 port 8002",
                "set server be_web/srv2 weight 100",
                "set server be_web/srv2 state ready",
                "set server be_web/srv3 state maint",
                "set server be_web/srv3 addr 127.0.0.1 port 1",
                "set server be_web/srv3 weight 1",
            ]
        );
        // Another file: a server on one side only.
        let short = cfg.replace("    server srv3 127.0.0.1:1 disabled\n", "");
        let why = plan_state(&in_line, &short).expect_err("a reload");
        assert!(
            why.0.contains("be_web/srv3, which the file does not hold"),
            "{}",
            why.0
        );
        let long = format!("{cfg}backend be_new\n    server srv1 127.0.0.1:8100\n");
        let why = plan_state(&in_line, &long).expect_err("a reload");
        assert!(why.0.contains("no server be_new/srv1"), "{}", why.0);
    }
}
