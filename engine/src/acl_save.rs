//! Tenant ACL users without an `ACL SAVE` per change.
//!
//! `ACL SAVE` rewrites the node's whole `users.acl` (about 500 bytes per user), so saving on
//! every create made creates linear in the caches already there, and saving on every token
//! mint or cache user change let one tenant keep every cache on the node waiting. Instead
//! each change of an ACL user the platform makes for tenants (a cache's own user, its cache
//! users', LDAP roles' and scoped tokens' upstream users) is noted in the node's
//! [`AclJournal`], and a background task ([`Node::keep_acl`]) saves it. A save holds the node
//! (Valkey runs commands one at a time) for about 10 µs per user — 0.16 s measured at 14,000
//! users — so saves are paced: the next one waits [`SAVE_PACING`] times as long as the last
//! one took, at least [`ACL_SAVE_INTERVAL`].
//! What a restart may lose — the changes since the last save — is still in the journal: the
//! task asks the node for its `run_id` (Valkey's, new on every start) every
//! [`ACL_SAVE_INTERVAL`] while the journal has changes, and when it is not the one the
//! journal was last made whole on, every change in it is applied again (idempotent: each
//! change is the user's whole rules, `SETUSER user reset …`, or `DELUSER`) and saved. The
//! supervisor kicks the task as soon as a restarted node answers; a node an engine agent runs
//! is found restarted at the next check.
//! A control plane that itself restarted lost its journal: it makes the nodes' users match
//! its store at start (`restore_tenant_users`, `restore_login_users`).

use crate::node::Node;
use crate::EngineError;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often a journal with changes is checked against a restart of its node, and the
/// shortest time between two saves.
pub const ACL_SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// The next save waits this many times as long as the last one took: saving holds the node
/// at most about 1% of the time, however many users it has.
pub const SAVE_PACING: u32 = 100;

/// An ACL user's change: its whole `ACL SETUSER` rules, starting with `reset`, or None:
/// deleted.
pub type UserChange = Option<Vec<String>>;

/// The node's tenant ACL changes not yet saved in its `users.acl`.
#[derive(Default)]
pub struct AclJournal {
    state: std::sync::Mutex<JournalState>,
    /// Held (shared) by each create or delete from its pipeline to its journal entry, and
    /// (exclusively) by a replay, so a replay never undoes a change made meanwhile.
    changing: tokio::sync::RwLock<()>,
    /// Wakes [`Node::keep_acl`] early (a restarted node is back).
    kick: tokio::sync::Notify,
}

#[derive(Default)]
struct JournalState {
    seq: u64,
    /// user → (seq of its last change, the change).
    changes: HashMap<String, (u64, UserChange)>,
    /// `run_id` of the node process that holds every change in the journal (None: unknown).
    made_whole_on: Option<String>,
}

impl AclJournal {
    fn note(&self, user: &str, change: UserChange) {
        debug_assert!(change.as_ref().is_none_or(|rules| rules.first().is_some_and(|r| r == "reset")));
        let mut state = self.state.lock().unwrap();
        state.seq += 1;
        let seq = state.seq;
        state.changes.insert(user.to_string(), (seq, change));
    }

    /// Drops the changes up to `seq`: a save wrote them.
    fn saved(&self, seq: u64, run_id: Option<String>) {
        let mut state = self.state.lock().unwrap();
        state.changes.retain(|_, (s, _)| *s > seq);
        if run_id.is_some() {
            state.made_whole_on = run_id;
        }
    }

    /// How many changes wait for a save.
    pub fn pending(&self) -> usize {
        self.state.lock().unwrap().changes.len()
    }

    /// Asks for a check now (the node restarted).
    pub fn kick(&self) {
        self.kick.notify_one();
    }
}

impl Node {
    /// Runs a pipeline that makes, changes or deletes ACL users (on the kept admin
    /// connection) and notes their `changes` for the next save.
    pub(crate) async fn change_users(
        &self,
        pipe: &redis::Pipeline,
        changes: &[(&str, UserChange)],
    ) -> Result<(), EngineError> {
        let _changing = self.changing_users().await;
        self.provision(pipe).await?;
        for (user, change) in changes {
            self.note_user(user, change.clone());
        }
        Ok(())
    }

    /// Held while ACL users are changed and until their changes are noted
    /// ([`Node::note_user`]): a replay waits for it.
    pub(crate) async fn changing_users(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.acl.changing.read().await
    }

    /// Notes an ACL user's change, made under [`Node::changing_users`], for the next save.
    pub(crate) fn note_user(&self, user: &str, change: UserChange) {
        self.acl.note(user, change)
    }

    /// Checks the journal against a node restart every [`ACL_SAVE_INTERVAL`] (or when
    /// kicked), replaying it on a node that restarted, and saves it when a save is due (see
    /// the module's doc); until the node stops.
    pub(crate) async fn keep_acl(self: std::sync::Arc<Self>) {
        let mut next_save = Instant::now();
        while !self.is_stopping() {
            tokio::select! {
                _ = tokio::time::sleep(ACL_SAVE_INTERVAL) => {}
                _ = self.acl.kick.notified() => {}
            }
            let started = Instant::now();
            match self.sync_acl(started >= next_save).await {
                Ok(true) => {
                    tracing::debug!(node = self.name(), took = ?started.elapsed(), "tenant ACL users saved");
                    next_save = Instant::now() + (started.elapsed() * SAVE_PACING).max(ACL_SAVE_INTERVAL)
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(node = self.name(), error = %e, "tenant ACL users not saved yet; retrying")
                }
            }
        }
    }

    /// One save of the journal (see the module's doc); nothing when it is empty.
    pub async fn save_acl(&self) -> Result<(), EngineError> {
        self.sync_acl(true).await.map(|_| ())
    }

    /// Replays the journal on a node that restarted (and saves it); otherwise saves it only
    /// if `save`. Returns whether it saved.
    async fn sync_acl(&self, save: bool) -> Result<bool, EngineError> {
        let (seq, whole_on) = {
            let state = self.acl.state.lock().unwrap();
            if state.changes.is_empty() {
                return Ok(false);
            }
            (state.seq, state.made_whole_on.clone())
        };
        let mut conn = crate::pool::admin_conn(self).await?;
        if whole_on.is_some() {
            // INFO and SAVE on one connection: both answered by the same process.
            let mut pipe = redis::pipe();
            pipe.cmd("INFO").arg("server");
            if save {
                pipe.cmd("ACL").arg("SAVE").ignore();
            }
            let (info,): (String,) = pipe.query_async(&mut conn).await.map_err(|e| self.valkey_err(e))?;
            if run_id(&info) == whole_on {
                if save {
                    self.acl.saved(seq, None);
                }
                return Ok(save);
            }
        }
        // Restarted (or first save since this process started): replay every change.
        let _replaying = self.acl.changing.write().await;
        let (seq, changes) = {
            let state = self.acl.state.lock().unwrap();
            (
                state.seq,
                state.changes.iter().map(|(u, (_, acl))| (u.clone(), acl.clone())).collect::<Vec<_>>(),
            )
        };
        let mut pipe = redis::pipe();
        for (user, change) in &changes {
            match change {
                Some(rules) => pipe.cmd("ACL").arg("SETUSER").arg(user).arg(rules).ignore(),
                None => pipe.cmd("ACL").arg("DELUSER").arg(user).ignore(),
            };
        }
        pipe.cmd("INFO").arg("server").cmd("ACL").arg("SAVE").ignore();
        let (info,): (String,) = pipe.query_async(&mut conn).await.map_err(|e| self.valkey_err(e))?;
        let now = run_id(&info);
        if whole_on.is_some() {
            tracing::info!(
                node = self.name(),
                changes = changes.len(),
                "node restarted: unsaved tenant ACL users replayed"
            );
        }
        self.acl.saved(seq, now);
        Ok(true)
    }
}

/// `run_id` of an `INFO server` reply.
fn run_id(info: &str) -> Option<String> {
    info.lines().find_map(|l| l.strip_prefix("run_id:")).map(|v| v.trim().to_string())
}
