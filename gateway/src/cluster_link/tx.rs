//! Transactions on a cluster: one node runs MULTI … EXEC, the one of the first key's slot
//! (or of the keys WATCHed); every key must be in that slot.

use super::conns::{sent, unwanted, Kind, Sent};
use super::plan::Merge;
use super::plan::{self, Plan};
use super::{Link, Request};
use bytes::Bytes;

/// A transaction being queued: where it runs, and what waits for that to be known.
pub(super) struct Tx {
    /// The slot of its keys (all must share one, as in a Valkey cluster) and its node.
    pub(super) slot: Option<(u16, String)>,
    pub(super) multi_sent: bool,
    pub(super) held: Vec<(u64, Bytes)>,
    pub(super) dirty: bool,
}

impl Link {
    /// A command in a transaction: queued on the transaction's node, which its first key
    /// decides; every key must be in that key's slot.
    pub(super) async fn queue_in_tx(&mut self, plan: Plan, request: Request) {
        let target = match plan {
            Plan::Slot(slot) => Ok(Some(slot)),
            Plan::Split(_) | Plan::CrossSlot(_) => Err(plan::CROSSSLOT),
            Plan::ReadOnly => Err(plan::READONLY),
            _ => Ok(None),
        };
        let tx = self.tx.as_mut().expect("in a transaction");
        match (tx.slot.clone(), target) {
            (_, Err(error)) => {
                tx.dirty = true;
                self.local(error);
            }
            (None, Ok(None)) => {
                let seq = self.entry(1, Merge::First);
                self.tx.as_mut().expect("in a transaction").held.push((seq, request.bytes));
            }
            (None, Ok(Some(slot))) => {
                let held = std::mem::take(&mut tx.held);
                let node = self.map.primary(slot).to_string();
                let tx = self.tx.as_mut().expect("in a transaction");
                tx.slot = Some((slot, node.clone()));
                tx.multi_sent = true;
                self.start_tx(&node, false, held).await;
                let seq = self.entry(1, Merge::First);
                self.send(&node, Kind::Data, Sent { in_tx: true, ..sent(seq, 0, request.bytes) }).await;
            }
            (Some((slot, node)), Ok(target)) if target.is_none_or(|t| t == slot) => {
                let seq = self.entry(1, Merge::First);
                self.send(&node, Kind::Data, Sent { in_tx: true, ..sent(seq, 0, request.bytes) }).await;
            }
            (Some(_), _) => {
                tx.dirty = true;
                self.local(plan::CROSSSLOT);
            }
        }
    }

    /// MULTI (unless sent) and the commands that waited for the transaction's node.
    pub(super) async fn start_tx(&mut self, node: &str, multi_sent: bool, held: Vec<(u64, Bytes)>) {
        if !multi_sent {
            self.send(node, Kind::Data, unwanted(Request::built(&[b"MULTI"]), true)).await;
        }
        for (seq, bytes) in held {
            self.send(node, Kind::Data, Sent { in_tx: true, ..sent(seq, 0, bytes) }).await;
        }
    }
}
