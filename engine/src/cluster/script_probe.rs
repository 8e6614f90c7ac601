//! The script probe: Valkey 9.1.2 leaves a cluster node refusing every keyed script after a
//! script ran one command whose keys are in two slots; the engine finds such a node and
//! heals it (see `docs/engine-cluster.md`).

use super::*;

/// How often the script probe runs a keyed script on every primary (see
/// [`Cluster::probe_scripts`]).
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// The probe: one local key, read. Cheap, and fails only on a poisoned node.
const PROBE_SCRIPT: &str = "return redis.call('EXISTS', KEYS[1])";
/// What a poisoned node answers to every keyed script (see [`Cluster::probe_scripts`]).
const POISONED: &str = "non local key in a cluster node script";
/// Longest the heal waits for a replica of the poisoned node's shard to be in sync.
const REPLICA_SYNC_WAIT: Duration = Duration::from_secs(5);
/// Longest the heal waits for the replica's `CLUSTER FAILOVER` to make it the primary.
const HEAL_FAILOVER_WAIT: Duration = Duration::from_secs(10);

impl Cluster {
    /// Every [`PROBE_INTERVAL`]: [`PROBE_SCRIPT`] on every shard's primary, as the admin
    /// user, on a key of a slot it owns. Valkey 9.1.2 has a bug: a script that runs one
    /// command whose keys are in two slots (`EVAL "return redis.call('MGET','b','c')" 0`)
    /// leaves the node refusing every keyed script after it, for every client ("Attempted to
    /// access a non local key in a cluster node script"), until the process restarts; any
    /// cache can do that to a shard. A node answering so is healed ([`Cluster::heal`]).
    pub(super) async fn probe_scripts(self: Arc<Self>) {
        // Shard id → (its slots when the key was chosen, a key of one of them).
        let mut keys: BTreeMap<String, (Ranges, String)> = BTreeMap::new();
        while !self.stopping.load(Ordering::SeqCst) {
            tokio::time::sleep(PROBE_INTERVAL).await;
            let Ok((_, shards)) = self.shards().await else { continue };
            for shard in shards.iter().filter(|s| !s.slots.is_empty()) {
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Some(node) = shard.primary_id().and_then(|id| self.member_by_id(&id).ok()) else {
                    continue;
                };
                // Not an agent's node (no pid here): healing restarts it, which its agent does.
                if node.pid().is_none() || !node.healthy() {
                    continue;
                }
                let key = match keys.get(&shard.id) {
                    Some((slots, key)) if *slots == shard.slots => key.clone(),
                    _ => match probe_key(&node, &shard.slots).await {
                        Ok(key) => {
                            keys.insert(shard.id.clone(), (shard.slots.clone(), key.clone()));
                            key
                        }
                        Err(e) => {
                            tracing::debug!(node = node.name(), error = %e, "no probe key yet");
                            continue;
                        }
                    },
                };
                if probe(&node, &key).await {
                    tracing::warn!(
                        node = node.name(),
                        shard = shard.id,
                        "node poisoned: every keyed script on it fails ('non local key in a cluster \
                         node script', Valkey's multi-slot-script bug); healing it"
                    );
                    let began = Instant::now();
                    match self.heal(&node, &key).await {
                        Ok("none") => {}
                        Ok(how) => {
                            tracing::warn!(node = node.name(), how, elapsed = ?began.elapsed(), "poisoned node healed");
                            metrics::counter!("shoal_cluster_script_heals_total", "node" => node.name().to_string(), "how" => how)
                                .increment(1);
                        }
                        Err(e) => {
                            tracing::error!(node = node.name(), error = %e, elapsed = ?began.elapsed(), "poisoned node not healed yet; tried again");
                        }
                    }
                }
            }
        }
    }

    /// Heals a poisoned primary (one change of topology at a time): with a replica that is
    /// online and in sync, `CLUSTER FAILOVER` on it (Valkey's graceful failover: the primary
    /// pauses its clients until the replica has every write, so nothing acknowledged is lost)
    /// and, once the replica is the primary, the poisoned node restarted (a clean shutdown,
    /// no delay), which comes back as the new primary's replica. Without such a replica, or
    /// if the failover does not finish within [`HEAL_FAILOVER_WAIT`], it is restarted in
    /// place: its slots do not answer for the restart (its AOF is loaded again). How it was
    /// healed: `failover` or `restart` (`none`: not poisoned, or no longer the primary, once
    /// the lock was had).
    async fn heal(&self, node: &Arc<Node>, key: &str) -> Result<&'static str, EngineError> {
        let _topology = self.topology.lock().await;
        // Still the primary, still poisoned (not healed meanwhile, nor moved)?
        let (_, shards) = self.shards().await?;
        let my = my_id(node).await?;
        let Some(shard) = shards.iter().find(|s| s.primary_id().as_deref() == Some(my.as_str())) else {
            return Ok("none");
        };
        if !probe(node, key).await {
            return Ok("none");
        }
        let mut how = "restart";
        let mut replica_port = 0;
        if let Some(replica) = self.replica_to_take_over(shard).await {
            match self.fail_over_to(&replica).await {
                Ok(()) => {
                    how = "failover";
                    replica_port = replica.spec.port;
                    // Until the old primary knows it too: the clients the failover paused on
                    // it are then answered (with redirects) before it restarts, rather than
                    // cut off owing replies.
                    let _ = tokio::time::timeout(HEAL_FAILOVER_WAIT, async {
                        while !admin_value(node, &["ROLE"])
                            .await
                            .is_ok_and(|r| items(&r).first().map(text).as_deref() == Some("slave"))
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    })
                    .await;
                }
                Err(e) => tracing::warn!(
                    node = node.name(),
                    replica = replica.name(),
                    error = %e,
                    "failover to the replica did not finish: restarting the poisoned node in place"
                ),
            }
        } else {
            tracing::warn!(
                node = node.name(),
                "no replica in sync: restarting the poisoned node in place (its slots wait for it)"
            );
        }
        let before = node.restarts();
        node.restart_now("poisoned by a multi-slot script");
        poll(node, || async { node.restarts() > before && node.ping().await }).await?;
        // What the keeper does after any restart (ACL users), here under the same lock.
        self.rejoin(node).await?;
        if let Some(m) = self.members.lock().unwrap().iter_mut().find(|m| m.node.name() == node.name()) {
            m.restarts_seen = node.restarts();
        }
        match how {
            "failover" => {
                // Back as the replica of the node that took over.
                let port = replica_port.to_string();
                poll(node, || async {
                    admin_value(node, &["ROLE"]).await.is_ok_and(|r| {
                        let r = items(&r);
                        r.first().map(text).as_deref() == Some("slave")
                            && r.get(2).map(text).as_deref() == Some(port.as_str())
                    })
                })
                .await?;
                wait_synced(node).await?
            }
            _ => wait_state_ok(node).await?,
        }
        Ok(how)
    }

    /// A synced replica of `shard` ([`Cluster::synced_replica`]); if it has replicas but none
    /// is synced yet (one just healed and still catching up, or seen online by the cluster a
    /// moment later), waits for one up to [`REPLICA_SYNC_WAIT`]: a failover a moment later
    /// costs the shard less than a restart in place, whose slots do not answer meanwhile.
    async fn replica_to_take_over(&self, shard: &Shard) -> Option<Arc<Node>> {
        if let Some(replica) = self.synced_replica(shard).await {
            return Some(replica);
        }
        if !shard.nodes.iter().any(|n| n.role == Role::Replica) {
            return None;
        }
        let deadline = Instant::now() + REPLICA_SYNC_WAIT;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let Ok((_, shards)) = self.shards().await else { continue };
            if let Some(now) = shards.iter().find(|s| s.id == shard.id) {
                if let Some(replica) = self.synced_replica(now).await {
                    return Some(replica);
                }
            }
        }
        None
    }

    /// A replica of `shard` the cluster sees online, that answers and has its link to the
    /// primary up.
    async fn synced_replica(&self, shard: &Shard) -> Option<Arc<Node>> {
        for n in shard.nodes.iter().filter(|n| n.role == Role::Replica && n.health == "online") {
            let Ok(node) = self.member_by_id(&n.id) else { continue };
            if node.pid().is_none() || !node.healthy() {
                continue;
            }
            if linked(&node).await {
                return Some(node);
            }
        }
        None
    }

    /// `CLUSTER FAILOVER` on `replica`, then until it says it is a primary
    /// ([`HEAL_FAILOVER_WAIT`] at most).
    pub(super) async fn fail_over_to(&self, replica: &Node) -> Result<(), EngineError> {
        admin(replica, &["CLUSTER", "FAILOVER"]).await?;
        let deadline = Instant::now() + HEAL_FAILOVER_WAIT;
        loop {
            let role = admin_value(replica, &["ROLE"]).await;
            if role.is_ok_and(|r| items(&r).first().map(text).as_deref() == Some("master")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EngineError::NotReady(replica.name().to_string()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether a node answers the script probe with the poisoned error (any other answer,
/// errors and timeouts included, is not this).
async fn probe(node: &Node, key: &str) -> bool {
    let answered =
        tokio::time::timeout(Duration::from_secs(1), admin_value(node, &["EVAL", PROBE_SCRIPT, "1", key]))
            .await;
    matches!(answered, Ok(Err(EngineError::Valkey { source, .. })) if source.to_string().contains(POISONED))
}

/// A key (`{shoal-probe-<n>}`) whose slot is in `slots`, found with `CLUSTER KEYSLOT` (the
/// node's own hashing), 512 candidates a round trip.
async fn probe_key(node: &Node, slots: &[(u16, u16)]) -> Result<String, EngineError> {
    let mut conn = admin_conn(node).await?;
    const BATCH: u32 = 512;
    for batch in 0..(4 * u32::from(SLOTS) / BATCH) {
        let names: Vec<String> =
            (batch * BATCH..(batch + 1) * BATCH).map(|n| format!("{{shoal-probe-{n}}}")).collect();
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.cmd("CLUSTER").arg("KEYSLOT").arg(name);
        }
        let got: Vec<u16> = pipe.query_async(&mut conn).await.map_err(|e| node.valkey_err(e))?;
        if let Some((name, _)) =
            names.iter().zip(got).find(|(_, slot)| slots.iter().any(|(a, b)| a <= slot && slot <= b))
        {
            return Ok(name.clone());
        }
    }
    Err(EngineError::UnknownNode(format!("a key for slots {slots:?}")))
}
