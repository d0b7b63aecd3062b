//! Checks every raw value and converts it into typed settings; every error names the key, the
//! bad value and the fix.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::*;
use super::*;

/// Parses a human duration such as `200ms`, `2s` or `5m`.
pub(super) fn duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value).map_err(|e| {
        invalid(
            key,
            value,
            format!("is not a duration ({e})"),
            "write a number with a unit, like \"200ms\", \"2s\" or \"5m\"",
        )
    })
}

/// A duration that must not be zero (a zero resync would re-read etcd in a loop).
pub(super) fn positive(key: &str, value: &str) -> Result<Duration, ConfigError> {
    let d = duration(key, value)?;
    if d.is_zero() {
        return Err(invalid(
            key,
            value,
            "is zero",
            "use a positive duration, like \"5m\" or \"5s\"",
        ));
    }
    Ok(d)
}

pub(super) fn validate_source(
    raw: RawSource,
    etcd: Option<RawEtcd>,
    file: Option<RawFile>,
) -> Result<SourceConfig, ConfigError> {
    if raw.prefixes.is_empty() {
        return Err(invalid(
            "source.prefixes",
            &raw.prefixes,
            "is empty, so nothing would be read",
            "list at least one prefix, like [\"/services/\", \"/routes/\"]",
        ));
    }
    for (i, p) in raw.prefixes.iter().enumerate() {
        if !p.starts_with('/') || p.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid(
                format!("source.prefixes[{i}]"),
                p,
                "is not a key prefix",
                "start it with '/' and use no spaces or control characters, like \"/services/\"",
            ));
        }
    }
    let kind = match raw.kind.as_str() {
        "etcd" => {
            if file.is_some() {
                return Err(invalid(
                    "file",
                    "[file]",
                    "is set while source.kind is \"etcd\"",
                    "remove the [file] table or set source.kind = \"file\"",
                ));
            }
            SourceKind::Etcd(validate_etcd(etcd.unwrap_or_default())?)
        }
        "file" => {
            if etcd.is_some() {
                return Err(invalid(
                    "etcd",
                    "[etcd]",
                    "is set while source.kind is \"file\"",
                    "remove the [etcd] table or set source.kind = \"etcd\"",
                ));
            }
            let Some(file) = file else {
                return Err(invalid(
                    "file.path",
                    "(missing)",
                    "source.kind is \"file\" but no [file] table names the file",
                    "add [file] with path = \"/etc/haconfd/registry.yaml\"",
                ));
            };
            let ext = file.path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "yaml" | "yml" | "json" | "toml") {
                return Err(invalid(
                    "file.path",
                    file.path.display().to_string(),
                    "has no .yaml, .yml, .json or .toml extension, which selects the format",
                    "rename the file with one of those extensions",
                ));
            }
            SourceKind::File(FileConfig { path: file.path })
        }
        other => {
            return Err(invalid(
                "source.kind",
                other,
                "is not a known source",
                "use \"etcd\" or \"file\"",
            ));
        }
    };
    Ok(SourceConfig {
        kind,
        prefixes: raw.prefixes,
        resync: positive("source.resync", &raw.resync)?,
    })
}

/// This host's name (the kernel's, else /etc/hostname): the default of `[fleet] node` and of
/// announce's instance ids. None when neither can be read.
pub fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .into_iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| text.trim().to_owned())
        .find(|name| !name.is_empty())
}

pub(super) fn validate_fleet(
    raw: RawFleet,
    source: &SourceConfig,
) -> Result<FleetConfig, ConfigError> {
    let etcd = matches!(source.kind, SourceKind::Etcd(_));
    if raw.publish == Some(true) && !etcd {
        return Err(invalid(
            "fleet.publish",
            true,
            "needs the etcd source: the fleet view lives in etcd, and source.kind is \"file\"",
            "remove fleet.publish (it defaults to false with the file source), or set source.kind = \"etcd\"",
        ));
    }
    let publish = raw.publish.unwrap_or(etcd);
    let p = &raw.prefix;
    if !p.starts_with('/')
        || !p.ends_with('/')
        || p.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(invalid(
            "fleet.prefix",
            p,
            "is not a key prefix that starts and ends with '/'",
            "write it like \"/haconfd/nodes/\"",
        ));
    }
    // A node key under a watched prefix would be read as registry data, and every publish
    // would be a change to apply, which publishes again.
    if let Some(w) = source
        .prefixes
        .iter()
        .find(|w| w.starts_with(p.as_str()) || p.starts_with(w.as_str()))
    {
        return Err(invalid(
            "fleet.prefix",
            p,
            format!(
                "overlaps the watched prefix {w:?} (source.prefixes): node keys would feed back into the registry"
            ),
            "use a prefix outside every source.prefixes entry, like \"/haconfd/nodes/\"",
        ));
    }
    const NODE_FIX: &str = "set fleet.node to 1-128 of [A-Za-z0-9._:-], starting with a letter or digit, like \"lb-1\"";
    let node = if raw.node.is_empty() {
        match hostname() {
            Some(h) if is_instance_id(&h) || !publish => h,
            Some(h) => {
                return Err(invalid(
                    "fleet.node",
                    h,
                    "is empty, and this host's name (shown) is not a node name",
                    NODE_FIX,
                ));
            }
            None if publish => {
                return Err(invalid(
                    "fleet.node",
                    "",
                    "is empty, and this host's name cannot be read",
                    NODE_FIX,
                ));
            }
            None => String::new(),
        }
    } else if is_instance_id(&raw.node) {
        raw.node
    } else {
        return Err(invalid(
            "fleet.node",
            &raw.node,
            "is not a node name",
            NODE_FIX,
        ));
    };
    Ok(FleetConfig {
        node,
        publish,
        prefix: raw.prefix,
    })
}

pub(super) fn validate_etcd(raw: RawEtcd) -> Result<EtcdConfig, ConfigError> {
    if raw.endpoints.is_empty() {
        return Err(invalid(
            "etcd.endpoints",
            &raw.endpoints,
            "is empty",
            "list at least one endpoint, like [\"http://127.0.0.1:2379\"]",
        ));
    }
    for (i, e) in raw.endpoints.iter().enumerate() {
        if !is_endpoint_url(e) {
            return Err(invalid(
                format!("etcd.endpoints[{i}]"),
                e,
                "is not an etcd client URL",
                "write it like \"http://127.0.0.1:2379\" or \"https://etcd1:2379\"",
            ));
        }
    }
    if raw.cert_file.is_some() != raw.key_file.is_some() {
        return Err(invalid(
            "etcd.cert_file",
            raw.cert_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            "a client certificate needs both cert_file and key_file",
            "set both etcd.cert_file and etcd.key_file, or neither",
        ));
    }
    if raw.ca_file.is_some() || raw.cert_file.is_some() {
        if let Some((i, e)) = raw
            .endpoints
            .iter()
            .enumerate()
            .find(|(_, e)| !e.starts_with("https://"))
        {
            return Err(invalid(
                format!("etcd.endpoints[{i}]"),
                e,
                "is not https:// while etcd.ca_file or etcd.cert_file is set",
                "write https:// endpoints, or remove the TLS settings",
            ));
        }
    }
    if raw.password_file.is_some() && raw.username.is_none() {
        return Err(invalid(
            "etcd.username",
            "(missing)",
            "etcd.password_file is set without a user name",
            "set etcd.username",
        ));
    }
    Ok(EtcdConfig {
        endpoints: raw.endpoints,
        ca_file: raw.ca_file,
        cert_file: raw.cert_file,
        key_file: raw.key_file,
        username: raw.username,
        password_file: raw.password_file,
        dial_timeout: positive("etcd.dial_timeout", &raw.dial_timeout)?,
    })
}

/// An etcd client URL: `http://` or `https://`, then a host and port, no path, no spaces.
pub fn is_endpoint_url(s: &str) -> bool {
    s.strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .is_some_and(|r| {
            !r.is_empty()
                && !r.contains('/')
                && !r.chars().any(|c| c.is_whitespace() || c.is_control())
        })
}

/// Template names appear in file names and logs: keep them to a safe token.
pub(super) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A map path that can be written into a Runtime API command as it is.
pub fn is_map_path(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
}

pub(super) fn validate_templates(
    raw: Vec<RawTemplate>,
) -> Result<Vec<TemplateConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(invalid(
            "template",
            "(none)",
            "no [[template]] is configured, so nothing would be rendered",
            "add a [[template]] with name, src and dest",
        ));
    }
    let mut out: Vec<TemplateConfig> = Vec::with_capacity(raw.len());
    for (i, t) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("template[{i}].{field}");
        if !is_token(&t.name) {
            return Err(invalid(
                key("name"),
                &t.name,
                "is not a simple name",
                "use letters, digits, '-', '_' or '.', like \"haproxy\"",
            ));
        }
        if out.iter().any(|o| o.name == t.name) {
            return Err(invalid(
                key("name"),
                &t.name,
                "is used by two templates",
                "give every [[template]] its own name",
            ));
        }
        if t.dest.file_name().is_none() {
            return Err(invalid(
                key("dest"),
                t.dest.display().to_string(),
                "does not name a file",
                "write the path of the file to install, like \"/etc/haproxy/haproxy.cfg\"",
            ));
        }
        if let Some(o) = out.iter().find(|o| o.dest == t.dest) {
            return Err(invalid(
                key("dest"),
                t.dest.display().to_string(),
                format!("is also the dest of template {:?}", o.name),
                "give every [[template]] its own dest",
            ));
        }
        let mode = u32::from_str_radix(t.mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                invalid(
                    key("mode"),
                    &t.mode,
                    "is not an octal file mode",
                    "write it like \"0640\"",
                )
            })?;
        for (field, v) in [("owner", &t.owner), ("group", &t.group)] {
            if let Some(v) = v
                && !is_token(v)
            {
                return Err(invalid(
                    key(field),
                    v,
                    "is not a user or group name",
                    "write a name like \"haproxy\"",
                ));
            }
        }
        let check = t.check.unwrap_or(!t.map);
        if t.map && check {
            return Err(invalid(
                key("check"),
                "true",
                "a map file is data, not a config `haproxy -c` can read",
                "set check = false: the HAProxy template's check loads the map",
            ));
        }
        if t.map && !is_map_path(&t.dest.display().to_string()) {
            return Err(invalid(
                key("dest"),
                t.dest.display().to_string(),
                "names the map on the Runtime API, which takes no spaces or quotes",
                "use a path of letters, digits, '/', '-', '_' and '.'",
            ));
        }
        if t.map && out.iter().any(|o| o.check) {
            return Err(invalid(
                key("map"),
                "true",
                "comes after the HAProxy template, whose `haproxy -c` must load the new map",
                "list map templates before the HAProxy template",
            ));
        }
        out.push(TemplateConfig {
            name: t.name,
            src: t.src,
            dest: t.dest,
            mode,
            owner: t.owner,
            group: t.group,
            check,
            map: t.map,
        });
    }
    Ok(out)
}

pub(super) fn validate_haproxy(raw: RawHaproxy) -> Result<HaproxyConfig, ConfigError> {
    let mode = match raw.mode.as_str() {
        "supervise" => HaproxyMode::Supervise,
        "master" => HaproxyMode::Master,
        "command" => HaproxyMode::Command,
        "none" => HaproxyMode::None,
        other => {
            return Err(invalid(
                "haproxy.mode",
                other,
                "is not a known mode",
                "use \"supervise\", \"master\", \"command\" or \"none\"",
            ));
        }
    };
    if mode == HaproxyMode::Command && raw.reload_cmd.is_empty() {
        return Err(invalid(
            "haproxy.reload_cmd",
            &raw.reload_cmd,
            "is empty while haproxy.mode is \"command\"",
            "give the reload command as an argv list, like [\"/usr/local/bin/reload-haproxy\"]",
        ));
    }
    if mode != HaproxyMode::Command && !raw.reload_cmd.is_empty() {
        return Err(invalid(
            "haproxy.reload_cmd",
            &raw.reload_cmd,
            format!(
                "is only used with haproxy.mode = \"command\", not {:?}",
                raw.mode
            ),
            "remove reload_cmd or set haproxy.mode = \"command\"",
        ));
    }
    if raw.binary.is_empty() {
        return Err(invalid(
            "haproxy.binary",
            &raw.binary,
            "is empty",
            "name the haproxy executable, like \"haproxy\" or \"/usr/sbin/haproxy\"",
        ));
    }
    // HAProxy reads a relative socket path as host:port: make every path absolute.
    let absolute = |key: &str, p: PathBuf| {
        std::path::absolute(&p).map_err(|e| {
            invalid(
                key,
                p.display().to_string(),
                format!("cannot be made absolute ({e})"),
                "write an absolute path",
            )
        })
    };
    let master_socket = absolute("haproxy.master_socket", raw.master_socket)?;
    let runtime_socket = absolute("haproxy.runtime_socket", raw.runtime_socket)?;
    let state_file = absolute("haproxy.state_file", raw.state_file)?;
    // A unix socket path longer than sun_path (108 bytes with the NUL) cannot be bound.
    for (key, p) in [
        ("haproxy.master_socket", &master_socket),
        ("haproxy.runtime_socket", &runtime_socket),
    ] {
        let s = p.display().to_string();
        if s.is_empty() || s.len() > 107 || s.chars().any(|c| c.is_whitespace() || c == ',') {
            return Err(invalid(
                key,
                s,
                "is not a usable unix socket path (empty, longer than 107 bytes, or holds a space or comma)",
                "use a short path like \"/run/haconfd/master.sock\"",
            ));
        }
    }
    if raw.spare_slots > 1000 {
        return Err(invalid(
            "haproxy.spare_slots",
            raw.spare_slots,
            "is more spare server lines per backend than is useful",
            "use a number from 0 to 1000",
        ));
    }
    if !raw.check_user.is_empty() && !is_token(&raw.check_user) {
        return Err(invalid(
            "haproxy.check_user",
            &raw.check_user,
            "is not a user name",
            "write a name like \"haproxy\" or \"nobody\", or \"\" to check as haconfd's own user",
        ));
    }
    Ok(HaproxyConfig {
        mode,
        binary: raw.binary,
        master_socket,
        runtime_socket,
        state_file,
        runtime_updates: raw.runtime_updates,
        reload_cmd: raw.reload_cmd,
        reload_timeout: duration("haproxy.reload_timeout", &raw.reload_timeout)?,
        check_timeout: duration("haproxy.check_timeout", &raw.check_timeout)?,
        spare_slots: raw.spare_slots,
        check_user: (!raw.check_user.is_empty()).then_some(raw.check_user),
    })
}

/// The longest lame duck: a stop that takes longer than this is a misconfiguration, and systemd
/// or Docker would kill the process long before (their stop timeouts must exceed it).
pub(super) const MAX_LAME_DUCK: Duration = Duration::from_secs(600);

pub(super) fn validate_frontend(raw: RawFrontend) -> Result<FrontendConfig, ConfigError> {
    if raw.bind.is_empty() {
        return Err(invalid(
            "frontend.bind",
            &raw.bind,
            "is empty, so HAProxy would listen nowhere",
            "list at least one address, like [\"0.0.0.0:80\"]",
        ));
    }
    let mut bind = Vec::with_capacity(raw.bind.len());
    for (i, b) in raw.bind.iter().enumerate() {
        let addr: SocketAddr = b.parse().map_err(|_| {
            invalid(
                format!("frontend.bind[{i}]"),
                b,
                "is not an IP:PORT address",
                "write it like \"0.0.0.0:80\", \"127.0.0.1:18080\" or \"[::]:80\"",
            )
        })?;
        bind.push(addr.to_string());
    }
    if !raw.default_domain.is_empty() && !crate::model::is_hostname(&raw.default_domain) {
        return Err(invalid(
            "frontend.default_domain",
            &raw.default_domain,
            "is not a DNS name",
            "write a domain like \"example.com\", or \"\" for none",
        ));
    }
    if !crate::model::is_http_path(&raw.monitor_uri) {
        return Err(invalid(
            "frontend.monitor_uri",
            &raw.monitor_uri,
            "is not a plain URL path",
            "write a path like \"/_haconfd/health\"",
        ));
    }
    let lame_duck = duration("frontend.lame_duck", &raw.lame_duck)?;
    if lame_duck > MAX_LAME_DUCK {
        return Err(invalid(
            "frontend.lame_duck",
            &raw.lame_duck,
            "is longer than 10 minutes",
            "size it from the load balancer's health check: interval x unhealthy threshold, plus a margin (AWS ELB defaults: 30s x 2 = \"60s\")",
        ));
    }
    Ok(FrontendConfig {
        bind,
        default_domain: raw.default_domain.to_ascii_lowercase(),
        monitor_uri: raw.monitor_uri,
        lame_duck,
    })
}
