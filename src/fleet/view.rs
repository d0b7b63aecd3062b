//! Reading the fleet: `haconfd fleet`, every live node and whether it has converged.

use super::*;

// ---------------------------------------------------------------------------------------------
// `haconfd fleet`
// ---------------------------------------------------------------------------------------------

/// One live node as `fleet` shows it.
#[derive(Debug, Clone)]
pub(super) struct Row {
    /// The published state; the node name is the key's (the identity in etcd).
    pub(super) state: NodeState,
    pub(super) converged: bool,
    /// Why it has not converged, or what else an operator should know.
    pub(super) note: Option<String>,
}

impl Row {
    /// Whether `--wait` waits for this node. A node whose haconfd is stopping has failed the
    /// load balancer's health check (the lame duck) and applies nothing more once HAProxy
    /// soft-stops, yet keeps its key until then: waiting for it would hold every deploy during
    /// a node restart for up to the drain.
    fn holds_the_gate(&self) -> bool {
        !self.converged && self.state.haproxy != HAPROXY_STOPPING
    }
}

/// Whether the registry at one revision is the registry now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    Converged,
    Behind(String),
}

/// `haconfd fleet`: the table (or `--json`) of every live node; with `--wait`, the deploy gate.
pub async fn command(cs: &ConfigSource, args: FleetArgs) -> Result<(), Failure> {
    let timeout = humantime::parse_duration(&args.timeout).map_err(|e| {
        Failure::Usage(format!(
            "--timeout {:?}: is not a duration ({e}) (fix: write a number with a unit, like \"30s\" or \"2m\")",
            args.timeout
        ))
    })?;
    let config = cs.load()?;
    let etcd = crate::config::etcd_for_client(&config, &args.etcd)?;
    let prefixes = config.source.prefixes.clone();
    let fleet_prefix = config.fleet.prefix.clone();
    let endpoints = etcd.endpoints.join(",");
    let deadline = tokio::time::Instant::now() + timeout;

    let mut client: Option<Client> = None;
    let mut last_rows: Option<Vec<Row>> = None;
    let mut last_error: Option<String> = None;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let attempt = async {
            let c = match &client {
                Some(c) => c.clone(),
                None => {
                    let options = crate::etcd::connect_options(&etcd)?;
                    let (c, _) = crate::etcd::connect_with(&etcd, options).await?;
                    client = Some(c.clone());
                    c
                }
            };
            view(&c, &prefixes, &fleet_prefix, etcd.username.as_deref()).await
        };
        let result = tokio::time::timeout(remaining.max(WAIT_POLL), attempt)
            .await
            .unwrap_or_else(|_| Err(EtcdFailure::timeout("fleet view", remaining)));
        match result {
            Ok(rows) => {
                let done = !rows.is_empty() && !rows.iter().any(Row::holds_the_gate);
                if !args.wait || done {
                    if rows.is_empty() {
                        tracing::warn!(prefix = %fleet_prefix, "no live node has published its state (is [fleet] publish on, and do the nodes reach etcd?)");
                    }
                    return print(&rows, args.json);
                }
                last_rows = Some(rows);
                last_error = None;
            }
            Err(f) => {
                client = None;
                let message = format!("etcd unreachable at {endpoints}: {f}");
                if !args.wait {
                    return Err(Failure::Runtime(anyhow::anyhow!(
                        "cannot read the fleet view: {message}"
                    )));
                }
                if last_error.is_none() {
                    tracing::warn!("{message}; trying again until the timeout");
                }
                last_error = Some(message);
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(WAIT_POLL.min(deadline - now)).await;
    }
    // Timed out waiting.
    let waited = humantime::format_duration(timeout);
    if let Some(e) = last_error {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "the fleet did not converge within {waited}: {e}"
        )));
    }
    let rows = last_rows.unwrap_or_default();
    print(&rows, args.json)?;
    if rows.is_empty() {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "no live node published its state under {fleet_prefix:?} within {waited} (is [fleet] publish on, and do the nodes reach etcd?)"
        )));
    }
    let lagging: Vec<String> = rows
        .iter()
        .filter(|r| r.holds_the_gate())
        .map(|r| match &r.note {
            Some(n) => format!("{} ({n})", r.state.node),
            None => r.state.node.clone(),
        })
        .collect();
    Err(Failure::Runtime(anyhow::anyhow!(
        "not every node converged within {waited}; lagging: {}",
        lagging.join(", ")
    )))
}

/// Reads every live node and judges each one's convergence, all at one etcd revision.
pub(super) async fn view(
    client: &Client,
    prefixes: &[String],
    fleet_prefix: &str,
    user: Option<&str>,
) -> Result<Vec<Row>, EtcdFailure> {
    let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let resp = get(
        &mut kv,
        "read of the fleet prefix",
        fleet_prefix,
        GetOptions::new().with_prefix(),
        user,
    )
    .await?;
    let now = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut rows = Vec::with_capacity(resp.kvs().len());
    for item in resp.kvs() {
        let key = String::from_utf8_lossy(item.key());
        let node = key.strip_prefix(fleet_prefix).unwrap_or(&key).to_owned();
        match serde_json::from_slice::<NodeState>(item.value()) {
            Ok(mut state) => {
                state.node = node;
                rows.push(Row {
                    state,
                    converged: false,
                    note: None,
                });
            }
            Err(e) => rows.push(Row {
                state: NodeState {
                    node,
                    ..NodeState::default()
                },
                converged: false,
                note: Some(format!("unreadable state: {e}")),
            }),
        }
    }
    let revisions: BTreeSet<i64> = rows
        .iter()
        .filter(|r| r.note.is_none())
        .map(|r| r.state.revision)
        .collect();
    let mut verdicts: BTreeMap<i64, Verdict> = BTreeMap::new();
    for r in revisions {
        let verdict = if r <= 0 {
            Verdict::Behind("no successful apply yet".into())
        } else if r > now {
            Verdict::Behind(format!(
                "its revision {r} is ahead of etcd's {now} (etcd restored from a backup?)"
            ))
        } else {
            converged(&mut kv, prefixes, r, now, user).await?
        };
        verdicts.insert(r, verdict);
    }
    for row in rows.iter_mut().filter(|r| r.note.is_none()) {
        match verdicts.get(&row.state.revision) {
            Some(Verdict::Converged) => row.converged = true,
            Some(Verdict::Behind(why)) => row.note = Some(why.clone()),
            None => {}
        }
    }
    for row in rows
        .iter_mut()
        .filter(|r| !r.converged && !r.holds_the_gate())
    {
        let why = row
            .note
            .take()
            .map_or_else(String::new, |n| format!("{n}; "));
        row.note = Some(format!(
            "{why}stopping: out of the load balancer, not waited for"
        ));
    }
    rows.sort_by(|a, b| a.state.node.cmp(&b.state.node));
    Ok(rows)
}

/// Whether etcd holds under `prefixes` at revision `now` what it held at `r`.
pub(super) async fn converged(
    kv: &mut KvClient,
    prefixes: &[String],
    r: i64,
    now: i64,
    user: Option<&str>,
) -> Result<Verdict, EtcdFailure> {
    for prefix in prefixes {
        match prefix_converged(kv, prefix, r, now, user).await {
            Ok(Verdict::Converged) => {}
            Ok(behind) => return Ok(behind),
            Err(f) if f.kind == Kind::Compacted => {
                return Ok(Verdict::Behind(format!(
                    "its revision {r} was compacted in etcd: whether a change came after it cannot be told"
                )));
            }
            Err(f) => return Err(f),
        }
    }
    Ok(Verdict::Converged)
}

/// One prefix: the keys whose revision moved past `r` must hold the value they held at `r`
/// (a put of the same value changes nothing), and as many keys must exist as at `r` (every
/// key that exists now existed then, so an equal count means none went away). Every answer is
/// bounded: a probe of at most [`PER_KEY_COMPARE_MAX`] changed keys (keys only), then either
/// one `get` per changed key, or, when more changed, the prefix read in pages at both
/// revisions side by side.
pub(super) async fn prefix_converged(
    kv: &mut KvClient,
    prefix: &str,
    r: i64,
    now: i64,
    user: Option<&str>,
) -> Result<Verdict, EtcdFailure> {
    // The count of a range is taken before the revision filter: the keys that exist now.
    let moved = get(
        kv,
        "read of changed keys",
        prefix,
        GetOptions::new()
            .with_prefix()
            .with_revision(now)
            .with_min_mod_revision(r + 1)
            .with_keys_only()
            .with_limit(PER_KEY_COMPARE_MAX as i64),
        user,
    )
    .await?;
    let count_now = moved.count();
    if moved.more() {
        if let Some(behind) = first_changed_in_pages(kv, prefix, r, now, user).await? {
            return Ok(behind);
        }
    } else {
        for k in moved.kvs() {
            let key = String::from_utf8_lossy(k.key());
            let value_at = async |kv: &mut KvClient, rev: i64| {
                get(
                    kv,
                    "read at the node's revision",
                    &key,
                    GetOptions::new().with_revision(rev),
                    user,
                )
                .await
            };
            let then = value_at(kv, r).await?;
            let current = value_at(kv, now).await?;
            if then.kvs().first().map(|t| t.value()) != current.kvs().first().map(|t| t.value()) {
                return Ok(changed(k.key(), r, k.mod_revision()));
            }
        }
    }
    let count_then = get(
        kv,
        "count at the node's revision",
        prefix,
        GetOptions::new()
            .with_prefix()
            .with_revision(r)
            .with_count_only(),
        user,
    )
    .await?
    .count();
    if count_then != count_now {
        return Ok(Verdict::Behind(format!(
            "{} key(s) under {prefix} deleted after its revision {r}",
            (count_then - count_now).abs()
        )));
    }
    Ok(Verdict::Converged)
}

pub(super) fn changed(key: &[u8], r: i64, rev: i64) -> Verdict {
    Verdict::Behind(format!(
        "{} changed at revision {rev}, after its revision {r}",
        String::from_utf8_lossy(key)
    ))
}

/// Reads `prefix` in pages at `now` and at `r` side by side (both sorted by key) and returns
/// the first key that moved past `r` to a value it did not hold at `r`, if any. Memory: two
/// pages, whatever the prefix holds.
pub(super) async fn first_changed_in_pages(
    kv: &mut KvClient,
    prefix: &str,
    r: i64,
    now: i64,
    user: Option<&str>,
) -> Result<Option<Verdict>, EtcdFailure> {
    let what_now = format!("read of {prefix:?} now");
    let what_then = format!("read of {prefix:?} at the node's revision");
    let mut at_now = Pages::prefix(prefix.as_bytes(), now);
    let mut at_then = Pages::prefix(prefix.as_bytes(), r);
    let mut then_page: Vec<KeyValue> = Vec::new();
    let mut i = 0;
    while let Some(page) = at_now.next(kv, &what_now, user).await? {
        // A value too large to read cannot be compared: changed, if it moved.
        if let Some((k, rev)) = page.unreadable.iter().find(|(_, rev)| *rev > r) {
            return Ok(Some(changed(k, r, *rev)));
        }
        for k in page.kvs.iter().filter(|k| k.mod_revision() > r) {
            let same = loop {
                match then_page.get(i) {
                    Some(t) if t.key() < k.key() => i += 1,
                    Some(t) => break t.key() == k.key() && t.value() == k.value(),
                    None => match at_then.next(kv, &what_then, user).await? {
                        Some(p) => {
                            then_page = p.kvs;
                            i = 0;
                        }
                        None => break false,
                    },
                }
            };
            if !same {
                return Ok(Some(changed(k.key(), r, k.mod_revision())));
            }
        }
    }
    Ok(None)
}

/// One `get` with a deadline.
pub(super) async fn get(
    kv: &mut KvClient,
    what: &str,
    key: &str,
    options: GetOptions,
    user: Option<&str>,
) -> Result<crate::etcd::GetResponse, EtcdFailure> {
    let what = format!("{what} {key:?}");
    tokio::time::timeout(CALL_TIMEOUT, kv.get(key, Some(options)))
        .await
        .map_err(|_| EtcdFailure::timeout(&what, CALL_TIMEOUT))?
        .map_err(|e| EtcdFailure::from_etcd(&what, &e, user))
}

/// Writes the rows to stdout, as the table or as JSON.
pub(super) fn print(rows: &[Row], json: bool) -> Result<(), Failure> {
    let text = if json {
        let mut out = serde_json::to_string_pretty(&json_rows(rows))
            .map_err(|e| Failure::Runtime(e.into()))?;
        out.push('\n');
        out
    } else {
        table(rows, SystemTime::now())
    };
    crate::failure::write_stdout(text.as_bytes())
}

/// `--json`: every published field, plus `converged` and, when there is one, `note`.
pub(super) fn json_rows(rows: &[Row]) -> serde_json::Value {
    let items = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(&r.state).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("converged".into(), r.converged.into());
                if let Some(n) = &r.note {
                    o.insert("note".into(), n.clone().into());
                }
            }
            v
        })
        .collect();
    serde_json::Value::Array(items)
}

/// The table: a header row, then one row per node, columns padded to their widest cell.
pub(super) fn table(rows: &[Row], now: SystemTime) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let mut cells: Vec<Vec<String>> = vec![
        [
            "NODE",
            "REVISION",
            "CONVERGED",
            "HASH",
            "AGE",
            "HELD",
            "READY",
            "NOTE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        let s = &r.state;
        let mut notes: Vec<String> = r.note.iter().cloned().collect();
        if let Some(why) = s.reason.as_ref().filter(|_| !s.ready) {
            notes.push(format!("not ready: {why}"));
        }
        if !s.held.is_empty() {
            notes.push(format!("guard holds: {}", s.held.join(", ")));
        }
        if !s.held_back.is_empty() {
            notes.push(format!("held back: {}", s.held_back.join(", ")));
        }
        cells.push(vec![
            s.node.clone(),
            s.revision.to_string(),
            yes_no(r.converged),
            if s.hash.is_empty() {
                "-".into()
            } else {
                s.hash.clone()
            },
            s.applied_at
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .map_or_else(|| "-".to_owned(), |t| age(now, t)),
            s.held.len().to_string(),
            yes_no(s.ready),
            notes.join("; "),
        ]);
    }
    let columns = cells[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &cells {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < columns {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// How long ago `then` was, in its largest unit: "3s", "5m", "2h", "4d".
pub(super) fn age(now: SystemTime, then: SystemTime) -> String {
    let s = now.duration_since(then).unwrap_or_default().as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
