//! Publishing this node's state: the [`Publisher`] task.

use super::*;

// ---------------------------------------------------------------------------------------------
// Publishing
// ---------------------------------------------------------------------------------------------

/// The task that keeps this node's key in etcd; [`Publisher::leave`] takes it out.
pub struct Publisher {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Publisher {
    /// Starts publishing when `[fleet] publish` is set (it only can be with the etcd source);
    /// None otherwise. The task wakes at every [`Metrics::poke_fleet`].
    pub fn spawn(config: &Config, metrics: Arc<Metrics>) -> Option<Publisher> {
        let SourceKind::Etcd(etcd) = &config.source.kind else {
            return None;
        };
        if !config.fleet.publish {
            return None;
        }
        let key = format!("{}{}", config.fleet.prefix, config.fleet.node);
        tracing::info!(key = %key, ttl = ?LEASE_TTL, "fleet view: publishing this node's state");
        let task = Task {
            etcd: etcd.clone(),
            key,
            node: config.fleet.node.clone(),
            mode: config.haproxy.mode,
            metrics,
            lease: None,
            outage: Outage::new(),
            last_json: None,
            last_write: None,
            members: Members::default(),
        };
        let (stop, stopped) = oneshot::channel();
        Some(Publisher {
            stop,
            task: tokio::spawn(task.run(stopped)),
        })
    }

    /// Revokes the lease, so that the node leaves the view at once; when etcd does not answer
    /// within a second the key goes with its lease. Bounded: it never holds up a stop.
    pub async fn leave(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(REVOKE_TIMEOUT + CALL_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// The publisher's state; it outlives each connection.
pub(super) struct Task {
    etcd: EtcdConfig,
    key: String,
    node: String,
    mode: HaproxyMode,
    metrics: Arc<Metrics>,
    /// The lease held, if any: resumed after an outage, revoked on stop.
    lease: Option<i64>,
    /// Since when etcd has been failing (a warning once per outage), the backoff.
    outage: Outage,
    /// What was last written, and when.
    last_json: Option<String>,
    last_write: Option<tokio::time::Instant>,
    /// Which etcd member to talk to.
    members: Members,
}

pub(super) enum Never {}

impl Task {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let mut client: Option<Client> = None;
        loop {
            let connected = tokio::select! {
                r = lease::connect(&mut self.members, &self.etcd) => r,
                _ = &mut stop => break,
            };
            let c = match connected {
                Ok(c) => c,
                Err(f) => {
                    client = None;
                    if self.wait_after(f, &mut stop).await {
                        break;
                    }
                    continue;
                }
            };
            client = Some(c.clone());
            let lost = tokio::select! {
                lost = self.session(&c) => lost,
                _ = &mut stop => break,
            };
            match lost {
                Lost::Lease(why) => {
                    tracing::warn!(key = %self.key, reason = %why, "fleet view: the node key's lease is gone; publishing again under a new one");
                    self.lease = None;
                }
                Lost::Failed(f) => {
                    // The member in use failed: the next connect starts at another one.
                    self.members.failed(self.etcd.endpoints.len());
                    if self.wait_after(f, &mut stop).await {
                        break;
                    }
                }
            }
        }
        self.revoke(client.as_ref()).await;
    }

    /// Logs a failure (a warning once per outage) and waits the backoff. True when the stop
    /// came meanwhile.
    async fn wait_after(&mut self, f: EtcdFailure, stop: &mut oneshot::Receiver<()>) -> bool {
        let Retry {
            delay,
            retry_in,
            first,
            ..
        } = self.outage.failed(&f);
        if first {
            let fix = if f.kind == Kind::Auth {
                " (the etcd user needs write access to the fleet prefix and lease rights, or set [fleet] publish = false)"
            } else {
                ""
            };
            tracing::warn!(
                error = %f,
                key = %self.key,
                endpoints = %self.etcd.endpoints.join(","),
                retry_in,
                "fleet view: cannot publish this node's state; retrying until etcd answers (the daemon is not affected){fix}"
            );
        } else {
            tracing::debug!(error = %f, retry_in, "fleet view: etcd still unreachable");
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = stop => true,
        }
    }

    async fn session(&mut self, client: &Client) -> Lost {
        match self.session_inner(client).await {
            Ok(never) => match never {},
            Err(lost) => lost,
        }
    }

    /// Resumes or grants the lease, writes the state at once, then writes it again whenever
    /// it changes (at most once a second) while keeping the lease alive.
    async fn session_inner(&mut self, client: &Client) -> Result<Never, Lost> {
        let user = self.etcd.username.clone();
        let user = user.as_deref();
        let (mut held, opened) =
            Held::open(client, &mut self.lease, LEASE_TTL, CALL_TIMEOUT, user).await?;
        if let Opened::Granted {
            replaced: Some((old, why)),
            ..
        } = &opened
        {
            tracing::info!(key = %self.key, lease = format!("{old:x}"), reason = %why, "fleet view: the node key's lease expired while etcd was unreachable; a new one is granted");
        }
        let mut kv = client.kv_client();
        // Always written after a (re)connect: the key may be gone (a new lease, a restored etcd).
        self.publish(&mut kv, held.id(), true, user).await?;
        if let Some(Recovered { down_for, .. }) = self.outage.recovered() {
            tracing::info!(
                key = %self.key,
                down_for,
                "fleet view: etcd reachable again; this node's state is published"
            );
        }
        self.outage.reset_backoff();
        let metrics = Arc::clone(&self.metrics);
        let mut refresh =
            tokio::time::interval_at(tokio::time::Instant::now() + REFRESH_EVERY, REFRESH_EVERY);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pending = false;
        loop {
            let due = self
                .last_write
                .map_or_else(tokio::time::Instant::now, |t| t + MIN_WRITE_INTERVAL);
            tokio::select! {
                lost = held.until_lost(user) => return Err(lost),
                () = metrics.fleet_poked() => pending = true,
                _ = refresh.tick() => pending = true,
                () = tokio::time::sleep_until(due), if pending => {
                    pending = false;
                    self.publish(&mut kv, held.id(), false, user).await?;
                }
            }
        }
    }

    /// Writes the node's state under the lease, unless it equals what was written last
    /// (`force`: write anyway).
    async fn publish(
        &mut self,
        kv: &mut KvClient,
        lease: i64,
        force: bool,
        user: Option<&str>,
    ) -> Result<(), Lost> {
        let state = NodeState::current(&self.node, self.mode, &self.metrics);
        let json = match serde_json::to_string(&state) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "fleet view: cannot encode this node's state");
                return Ok(());
            }
        };
        if !force && self.last_json.as_deref() == Some(json.as_str()) {
            return Ok(());
        }
        let options = PutOptions::new().with_lease(lease);
        lease::call(
            "put of the node key",
            CALL_TIMEOUT,
            user,
            kv.put(self.key.as_str(), json.as_str(), Some(options)),
        )
        .await?;
        tracing::debug!(key = %self.key, revision = state.revision, ready = state.ready, "fleet view: published");
        self.last_json = Some(json);
        self.last_write = Some(tokio::time::Instant::now());
        Ok(())
    }

    /// Revokes the lease (the key goes with it), within [`REVOKE_TIMEOUT`].
    async fn revoke(&self, client: Option<&Client>) {
        let (Some(client), Some(id)) = (client, self.lease) else {
            tracing::debug!("fleet view: nothing to revoke");
            return;
        };
        let mut lc = client.lease_client();
        match tokio::time::timeout(REVOKE_TIMEOUT, lc.revoke(id)).await {
            Ok(Ok(_)) => {
                tracing::info!(key = %self.key, "fleet view: left (lease revoked, node key removed)")
            }
            Ok(Err(e)) if lease::not_found(&e) => {
                tracing::info!(key = %self.key, "fleet view: the node key's lease had already expired")
            }
            Ok(Err(e)) => tracing::warn!(
                key = %self.key,
                error = %EtcdFailure::from_etcd("lease revoke", &e, self.etcd.username.as_deref()),
                "fleet view: cannot revoke the node key's lease; the key goes with it within {}s",
                LEASE_TTL.as_secs()
            ),
            Err(_) => tracing::warn!(
                key = %self.key,
                "fleet view: etcd did not answer the revoke within 1s; the node key goes with its lease within {}s",
                LEASE_TTL.as_secs()
            ),
        }
    }
}
