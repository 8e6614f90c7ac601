//! Usage batches to the control plane: every second the ledger becomes a `UsageBatch`
//! (`gateway_id`, `seq`), sent in order, each until the control plane acknowledges it (it
//! stores each `(gateway_id, seq)` once, so a resend after a lost answer counts once).
//!
//! With a data dir, every batch is written to `<data_dir>/usage/spool/` (one file per
//! batch) before the [`super::journal`] counts its counters as sent, and deleted once the
//! control plane has it: batches outlive control-plane outages and a kill of the gateway.
//! Without one, batches wait in memory (at most `usage_memory_batches`, default 120: two
//! minutes; past that the oldest is dropped, loudly). The gateway's id and next `seq`
//! persist in `<data_dir>/usage/state.json`, so a restarted gateway never reuses a `seq`.
//! On shutdown the last counters are batched and sent (or stay spooled).

use super::Ledger;
use crate::clients::Registry;
use crate::control_plane::ControlPlane;
use crate::GatewayError;
use rand::Rng;
use serde::{Deserialize, Serialize};
use shoal_types::UsageBatch;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the ledger becomes a batch.
pub const INTERVAL: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize)]
struct State {
    gateway_id: String,
    next_seq: u64,
}

/// Batches not yet acknowledged, oldest first: the spool's, then memory's.
pub struct Outbox {
    gateway_id: String,
    next_seq: u64,
    dir: Option<PathBuf>,
    memory: VecDeque<UsageBatch>,
    memory_batches: usize,
    /// Sequence numbers in the spool, ascending.
    spooled: VecDeque<u64>,
    /// Batches not yet acknowledged (for the metrics).
    pending: Arc<AtomicU64>,
}

impl Outbox {
    /// Opens the outbox under `data_dir` (creating the gateway's id on first start); with no
    /// data dir, a fresh id and memory only.
    pub fn open(data_dir: Option<&Path>, memory_batches: usize) -> std::io::Result<Outbox> {
        let Some(data_dir) = data_dir else {
            return Ok(Outbox::new(new_gateway_id(), 0, None, VecDeque::new(), memory_batches));
        };
        let dir = data_dir.join("usage");
        std::fs::create_dir_all(dir.join("spool"))?;
        let state = match std::fs::read(dir.join("state.json")) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                State { gateway_id: new_gateway_id(), next_seq: 0 }
            }
            Err(e) => return Err(e),
        };
        let mut spooled: Vec<u64> = std::fs::read_dir(dir.join("spool"))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".json")?.parse().ok())
            .collect();
        spooled.sort_unstable();
        // A spooled batch past the saved seq means the state file lagged: never reuse a seq.
        let next_seq = state.next_seq.max(spooled.last().map_or(0, |s| s + 1));
        let outbox = Outbox::new(state.gateway_id, next_seq, Some(dir), spooled.into(), memory_batches);
        outbox.save_state()?;
        Ok(outbox)
    }

    fn new(
        gateway_id: String,
        next_seq: u64,
        dir: Option<PathBuf>,
        spooled: VecDeque<u64>,
        memory_batches: usize,
    ) -> Outbox {
        let pending = Arc::new(AtomicU64::new(spooled.len() as u64));
        Outbox { gateway_id, next_seq, dir, memory: VecDeque::new(), memory_batches, spooled, pending }
    }

    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// Batches waiting for the control plane (shared with the metrics).
    pub fn pending(&self) -> Arc<AtomicU64> {
        self.pending.clone()
    }

    fn save_state(&self) -> std::io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let state = State { gateway_id: self.gateway_id.clone(), next_seq: self.next_seq };
        write_atomic(&dir.join("state.json"), &serde_json::to_vec(&state).expect("state serializes"))
    }

    /// Where the usage journal lives (with a data dir).
    pub fn journal_dir(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join("journal"))
    }

    /// Whether batch `seq` is in the spool (for [`super::journal::Journal::open`]).
    pub fn spooled(&self, seq: u64) -> bool {
        self.spooled.contains(&seq)
    }

    /// Turns the ledger's counters and the caches' connection peaks into the next batch (if
    /// there are any: no traffic and no connections, no batch). With a data dir, the batch
    /// is spooled before the ledger counts it as sent, so a kill loses and doubles nothing.
    pub fn collect(&mut self, ledger: &Ledger, clients: &Registry) {
        let taking = ledger.take(self.next_seq, clients.take_peaks());
        if taking.usage.is_empty() {
            ledger.commit(taking);
            return;
        }
        let batch = UsageBatch {
            gateway_id: self.gateway_id.clone(),
            seq: self.next_seq,
            usage: taking.usage.clone(),
        };
        if let Some(dir) = &self.dir {
            let path = spool_path(dir, batch.seq);
            if let Err(e) = write_atomic(&path, &serde_json::to_vec(&batch).expect("batches serialize")) {
                tracing::error!(error = %e, path = %path.display(), "could not spool a usage batch; retrying with the next");
                ledger.abort(taking);
                return;
            }
            self.spooled.push_back(batch.seq);
        } else {
            self.memory.push_back(batch);
            self.drop_overflow();
        }
        self.next_seq += 1;
        if let Err(e) = self.save_state() {
            tracing::error!(error = %e, "could not save the usage sequence number");
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        ledger.commit(taking);
    }

    /// Without a data dir, batches wait in memory, at most `memory_batches`: past that the
    /// oldest goes, loudly.
    fn drop_overflow(&mut self) {
        while self.memory.len() > self.memory_batches {
            if let Some(b) = self.memory.pop_front() {
                self.pending.fetch_sub(1, Ordering::Relaxed);
                tracing::error!(seq = b.seq, "usage batch dropped: no data_dir to spool it to");
            }
        }
    }

    /// Sends batches oldest first until all are acknowledged or one fails.
    pub async fn deliver(&mut self, client: &ControlPlane) -> Result<(), GatewayError> {
        loop {
            if let (Some(&seq), Some(dir)) = (self.spooled.front(), self.dir.as_ref()) {
                let path = spool_path(dir, seq);
                let batch = std::fs::read(&path)
                    .ok()
                    .and_then(|bytes| serde_json::from_slice::<UsageBatch>(&bytes).ok());
                match batch {
                    Some(batch) => client.post_usage(&batch).await?,
                    None => tracing::error!(path = %path.display(), "unreadable spooled usage batch skipped"),
                }
                let _ = std::fs::remove_file(&path);
                self.spooled.pop_front();
            } else if let Some(batch) = self.memory.front() {
                client.post_usage(batch).await?;
                self.memory.pop_front();
            } else {
                return Ok(());
            }
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Ships usage every second until `shutdown`; gives the outbox back for [`finish`].
pub async fn run(
    mut outbox: Outbox,
    ledger: &Ledger,
    clients: &Registry,
    control_plane: &ControlPlane,
    mut shutdown: watch::Receiver<bool>,
) -> Outbox {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return outbox,
        }
        outbox.collect(ledger, clients);
        if let Err(e) = outbox.deliver(control_plane).await {
            tracing::warn!(error = %e, pending = outbox.pending.load(Ordering::Relaxed), "usage not delivered yet");
        }
        crate::metrics::pending_usage_batches(outbox.pending.load(Ordering::Relaxed));
    }
}

/// The last delivery at shutdown: what the control plane does not take within `wait` is
/// spooled for the next start.
pub async fn finish(
    mut outbox: Outbox,
    ledger: &Ledger,
    clients: &Registry,
    client: &ControlPlane,
    wait: Duration,
) {
    outbox.collect(ledger, clients);
    match tokio::time::timeout(wait, outbox.deliver(client)).await {
        Ok(Ok(())) => tracing::info!("usage delivered"),
        Ok(Err(e)) => tracing::warn!(error = %e, "usage not delivered at shutdown; spooling it"),
        Err(_) => tracing::warn!("control plane too slow at shutdown; spooling usage"),
    }
}

fn spool_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join("spool").join(format!("{seq:020}.json"))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn new_gateway_id() -> String {
    format!("g{:016x}", rand::thread_rng().gen::<u64>())
}

#[cfg(test)]
mod tests {
    use super::super::journal::Journal;
    use super::*;
    use shoal_types::CacheId;
    use shoal_types::UsageCounters;

    const MEMORY: usize = 10;

    /// A ledger on the journal of `outbox`'s data dir, as the gateway opens it.
    fn ledger_of(outbox: &Outbox) -> Ledger {
        let journal = Journal::open(outbox.journal_dir().as_deref(), |seq| outbox.spooled(seq)).unwrap();
        Ledger::new(journal)
    }

    #[test]
    fn spooled_batches_survive_a_restart_and_keep_their_order_and_seq() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CacheId::generate();
        let mut outbox = Outbox::open(Some(dir.path()), MEMORY).unwrap();
        let ledger = ledger_of(&outbox);
        let id = outbox.gateway_id().to_string();
        for i in 0..5 {
            ledger.slot(&cache, 60).add(&UsageCounters { commands: i + 1, ..Default::default() });
            outbox.collect(&ledger, &Registry::default());
        }
        // Every batch is on disk as soon as it is made.
        assert_eq!(outbox.spooled.len(), 5);
        assert_eq!(outbox.pending.load(Ordering::Relaxed), 5);
        drop((outbox, ledger));

        let mut again = Outbox::open(Some(dir.path()), MEMORY).unwrap();
        let ledger = ledger_of(&again);
        assert_eq!(again.gateway_id(), id, "the gateway keeps its id");
        assert_eq!(again.next_seq, 5, "and never reuses a seq");
        let seqs: Vec<u64> = again.spooled.iter().copied().collect();
        assert_eq!(seqs, (0..5).collect::<Vec<_>>());
        ledger.slot(&cache, 120).add(&UsageCounters { commands: 1, ..Default::default() });
        again.collect(&ledger, &Registry::default());
        assert_eq!(again.spooled.back(), Some(&5));
    }

    /// The total of commands in the spool's batches.
    fn spooled_commands(outbox: &Outbox) -> u64 {
        let dir = outbox.dir.as_ref().unwrap();
        outbox
            .spooled
            .iter()
            .map(|&seq| {
                let batch: UsageBatch =
                    serde_json::from_slice(&std::fs::read(spool_path(dir, seq)).unwrap()).unwrap();
                batch.usage.iter().map(|u| u.counters.commands).sum::<u64>()
            })
            .sum()
    }

    /// A gateway killed at any point of making a batch (its process gone, its files as
    /// they were) loses and doubles nothing: what sessions counted is in exactly one batch.
    #[test]
    fn a_kill_at_any_step_of_a_batch_loses_and_doubles_nothing() {
        let cache = CacheId::generate();
        for kill_at in ["counting", "after take", "after spooling", "after commit"] {
            let dir = tempfile::tempdir().unwrap();
            let mut outbox = Outbox::open(Some(dir.path()), MEMORY).unwrap();
            let ledger = ledger_of(&outbox);
            // One session ended, one still counting; a batch already sent.
            ledger.slot(&cache, 60).add(&UsageCounters { commands: 1, ..Default::default() });
            let live = ledger.slot(&cache, 60);
            live.add(&UsageCounters { commands: 10, ..Default::default() });
            outbox.collect(&ledger, &Registry::default());
            live.add(&UsageCounters { commands: 100, ..Default::default() });
            match kill_at {
                "counting" => {}
                "after take" => {
                    std::mem::forget(ledger.take(outbox.next_seq, vec![]));
                }
                "after spooling" | "after commit" => {
                    let taking = ledger.take(outbox.next_seq, vec![]);
                    let batch = UsageBatch {
                        gateway_id: outbox.gateway_id.clone(),
                        seq: outbox.next_seq,
                        usage: taking.usage.clone(),
                    };
                    let path = spool_path(outbox.dir.as_ref().unwrap(), batch.seq);
                    write_atomic(&path, &serde_json::to_vec(&batch).unwrap()).unwrap();
                    if kill_at == "after commit" {
                        ledger.commit(taking);
                    } else {
                        std::mem::forget(taking);
                    }
                }
                _ => unreachable!(),
            }
            // The kill: nothing more runs, not even the slot's drop.
            std::mem::forget(live);
            drop(ledger);
            drop(outbox);

            let mut again = Outbox::open(Some(dir.path()), MEMORY).unwrap();
            let ledger = ledger_of(&again);
            again.collect(&ledger, &Registry::default());
            assert_eq!(spooled_commands(&again), 111, "killed {kill_at}");
            again.collect(&ledger, &Registry::default());
            assert_eq!(spooled_commands(&again), 111, "killed {kill_at}: nothing more later");
        }
    }

    #[test]
    fn batches_carry_each_caches_peak_of_connections_even_without_commands() {
        let (ledger, clients) = (Ledger::default(), Registry::default());
        let mut outbox = Outbox::open(None, MEMORY).unwrap();
        let (busy, idle) = (CacheId::generate(), CacheId::generate());
        let open = |cache: &CacheId| clients.register(cache, 10, "a".into(), "b".into()).unwrap().0;
        let busy_conns: Vec<_> = (0..3).map(|_| open(&busy)).collect();
        let idle_conn = open(&idle);
        // Two of busy's clients leave within the interval: the peak is still 3.
        clients.unregister(&busy, &busy_conns[0]);
        clients.unregister(&busy, &busy_conns[1]);
        ledger
            .slot(&busy, super::super::current_minute())
            .add(&UsageCounters { commands: 5, ..Default::default() });
        outbox.collect(&ledger, &clients);
        let batch = outbox.memory.back().unwrap();
        // (Entries are per minute: a minute may have turned since the `add`.)
        let peak =
            |c: &CacheId| batch.usage.iter().filter(|u| &u.cache_id == c).map(|u| u.peak_connections).max();
        let commands = |c: &CacheId| {
            batch.usage.iter().filter(|u| &u.cache_id == c).map(|u| u.counters.commands).sum::<u64>()
        };
        assert_eq!(peak(&busy), Some(3));
        assert_eq!(commands(&busy), 5);
        assert_eq!(peak(&idle), Some(1), "connected, no commands: still in the batch");

        // The next interval starts from the connections still open: peaks no higher than
        // those already sent this minute add nothing (see `Ledger::take`).
        assert_eq!(clients.take_peaks().into_iter().map(|(_, p)| p).sum::<u32>(), 2, "busy 1 + idle 1");

        // No connections and no traffic: no batch at all.
        clients.unregister(&idle, &idle_conn);
        clients.unregister(&busy, &busy_conns[2]);
        clients.take_peaks();
        let batches = outbox.memory.len();
        outbox.collect(&ledger, &clients);
        assert_eq!(outbox.memory.len(), batches, "nothing connected, nothing metered: no batch");
    }
}
