//! Requests that go to more than one node: multi-key commands split per slot, SCAN shard
//! after shard, and connection state that every connection must share.

use super::conns::{sent, Kind, Sent};
use super::plan::Merge;
use super::plan::{self, Split};
use super::{Link, Request, UNAVAILABLE};

impl Link {
    pub(super) async fn split(&mut self, kind: Split, request: &Request) {
        let argv = request.argv();
        let groups = plan::split(kind, &argv);
        let merge = match kind {
            Split::Values => Merge::Values {
                positions: groups.iter().map(|g| g.2.clone()).collect(),
                keys: argv.len() - 1,
            },
            Split::Pairs => Merge::AllOk,
            Split::Count => Merge::Sum,
        };
        let seq = self.entry(groups.len(), merge);
        for (i, (slot, args, _)) in groups.iter().enumerate() {
            let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let addr = self.node_for(*slot);
            if kind != Split::Values && !self.reader {
                self.last_written = Some(addr.clone());
            }
            self.send(&addr, Kind::Data, Sent { slot: Some(*slot), ..sent(seq, i, Request::built(&args)) })
                .await;
        }
    }

    /// SCAN on the shard its cursor names, with that shard's own cursor.
    pub(super) async fn scan(&mut self, request: &Request) {
        let argv = request.argv();
        let client: u64 = std::str::from_utf8(argv.get(1).copied().unwrap_or_default())
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(u64::MAX);
        if client == u64::MAX {
            return self.local(b"-ERR invalid cursor\r\n");
        }
        let (cursor, shard) = plan::scan_cursor(client);
        let nodes = self.every_shard().await;
        let Some((addr, _)) = nodes.get(shard) else {
            return self.local(b"*2\r\n$1\r\n0\r\n*0\r\n");
        };
        let cursor = cursor.to_string();
        let mut args = argv.clone();
        args[1] = cursor.as_bytes();
        let seq = self.entry(1, Merge::Scan { shard, shards: nodes.len() });
        let addr = addr.clone();
        self.send(&addr, Kind::Data, sent(seq, 0, Request::built(&args))).await;
    }

    /// Connection state: remembered for connections opened later, sent on every open one.
    pub(super) async fn setup(&mut self, request: Request) {
        let argv = request.argv();
        let name = String::from_utf8_lossy(argv[0]).to_ascii_lowercase();
        let key = match argv.get(1) {
            Some(sub) if name == "client" => {
                format!("client {}", String::from_utf8_lossy(sub).to_ascii_lowercase())
            }
            _ => name.clone(),
        };
        match name.as_str() {
            "select" => match std::str::from_utf8(argv.get(1).copied().unwrap_or_default())
                .ok()
                .and_then(|d| d.parse().ok())
            {
                Some(db) => self.db = db,
                None => return self.local(b"-ERR value is not an integer or out of range\r\n"),
            },
            "auth" if argv.len() == 3 => {
                self.user = String::from_utf8_lossy(argv[1]).into_owned();
                self.password = String::from_utf8_lossy(argv[2]).into_owned();
            }
            "hello" => {
                self.resp3 = argv.get(1).is_some_and(|v| *v == b"3");
                self.setup.retain(|(k, _)| *k != key);
                self.setup.push((key, request.bytes.clone()));
            }
            _ => {
                self.setup.retain(|(k, _)| *k != key);
                self.setup.push((key, request.bytes.clone()));
            }
        }
        drop(argv);
        if !self.conns.values().any(|c| c.kind == Kind::Data) {
            let addr = self.any_node();
            if self.open_conn(&addr, Kind::Data).await.is_err() {
                return self.local(UNAVAILABLE);
            }
            // Its replay already carries the new state; sending it again answers it.
        }
        // Subscriber connections got the state when opened; once subscribed (RESP2) they
        // would refuse it.
        let targets: Vec<(String, Kind)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.kind == Kind::Data)
            .map(|(k, c)| (k.0.clone(), c.kind))
            .collect();
        let seq = self.entry(targets.len(), Merge::First);
        for (i, (addr, kind)) in targets.iter().enumerate() {
            self.send(addr, *kind, sent(seq, i, request.bytes.clone())).await;
        }
    }
}
