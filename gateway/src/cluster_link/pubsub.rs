//! Subscriptions on a cluster: their own connections, and telling RESP2 messages and
//! confirmations from replies on them.

use super::conns::{unwanted, Kind, MAX_SUBSCRIPTION_HISTORY};
use super::{Hold, Link, Request};

impl Link {
    /// (P)(UN)SUBSCRIBE on the subscriber connection; keyspace-notification channels and
    /// patterns on every primary's too (a node publishes the events of its own keys only).
    pub(super) async fn subscribe(&mut self, request: Request) {
        let argv = request.argv();
        let notifications = argv.len() > 1 && argv[1..].iter().all(|p| p.starts_with(b"__key"));
        drop(argv);
        let home = self.sub_home.get_or_insert_with(|| self.map.shards[0].primary.clone()).clone();
        self.send_subscription(&home, Kind::Subscriber { echo: true }, &request.bytes).await;
        if notifications {
            for (addr, _) in self.every_shard().await.into_iter().filter(|(a, _)| *a != home) {
                self.send_subscription(&addr, Kind::Subscriber { echo: false }, &request.bytes).await;
            }
        }
    }

    /// Subscriber connections on a node that is no longer its shard's primary as the map
    /// says now (checked for a while after a topology change: a node can come back from a
    /// restart as a replica, its subscribers already moved onto it by a map read before the
    /// cluster agreed): their subscriptions move to the primary ([`Link::resubscribe`]).
    pub(super) async fn check_subscriptions(&mut self) {
        if let Ok(map) = self.seeds.refresh(Some(&self.map)).await {
            self.map = map;
        }
        let astray: Vec<(String, Kind)> = self
            .conns
            .iter()
            .filter(|(k, c)| k.1 != Kind::Data && c.history.is_some() && !self.map.serves(&k.0))
            .filter(|(_, c)| c.inflight.iter().all(|s| s.to.is_none() && !s.in_tx))
            .map(|(k, _)| k.clone())
            .collect();
        for key in astray {
            self.resubscribe(key).await;
        }
    }

    /// Whether [`Link::check_subscriptions`] is due: subscriptions, and a topology change
    /// not long ago.
    pub(super) fn subscriptions_unsettled(&self) -> bool {
        !self.seeds.settled(&self.map) && self.conns.keys().any(|k| k.1 != Kind::Data)
    }

    /// A (un)subscribe command: its confirmations come out of band, so nothing waits for
    /// them in order.
    pub(super) async fn send_subscription(&mut self, addr: &str, kind: Kind, request: &[u8]) {
        let key = (addr.to_string(), kind);
        if !self.conns.contains_key(&key) && self.open_conn(addr, kind).await.is_err() {
            // Like a lost connection: the session cannot be told which confirmations failed.
            self.closed = true;
            return;
        }
        let conn = self.conns.get_mut(&key).expect("opened above");
        conn.subscribed = true;
        conn.out.extend_from_slice(request);
        if let Some(history) = &mut conn.history {
            history.push(bytes::Bytes::copy_from_slice(request));
            if history.len() > MAX_SUBSCRIPTION_HISTORY {
                conn.history = None;
            }
        }
        if kind == (Kind::Subscriber { echo: true }) {
            let ping = Request::built(&[b"PING"]);
            conn.out.extend_from_slice(&ping);
            conn.inflight.push_back(unwanted(ping, false));
            self.hold = Hold::Confirming(key);
        }
    }
}

/// A RESP2 array that a subscribed connection sends out of band: a message or a
/// subscription confirmation (not a PING's `pong`, not a reply to what it was sent before).
pub(super) fn is_pubsub_message(frame: &[u8]) -> bool {
    frame.first() == Some(&b'*')
        && first_element_is(
            frame,
            &[
                b"message",
                b"pmessage",
                b"smessage",
                b"subscribe",
                b"unsubscribe",
                b"psubscribe",
                b"punsubscribe",
                b"ssubscribe",
                b"sunsubscribe",
            ],
        )
}

/// A message (not a confirmation).
pub(super) fn is_message(frame: &[u8]) -> bool {
    first_element_is(frame, &[b"message", b"pmessage", b"smessage"])
}

pub(super) fn first_element_is(frame: &[u8], words: &[&[u8]]) -> bool {
    let Some(cr) = crate::resp::find_crlf(frame, 1) else { return false };
    let rest = &frame[cr + 2..];
    let Some(cr2) = crate::resp::find_crlf(rest, 1) else { return false };
    let body = &rest[cr2 + 2..];
    words.iter().any(|w| {
        body.len() >= w.len() + 2
            && body[..w.len()].eq_ignore_ascii_case(w)
            && &body[w.len()..w.len() + 2] == b"\r\n"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn subscribed_connections_tell_messages_from_replies() {
        assert!(is_pubsub_message(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n"));
        assert!(is_pubsub_message(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"));
        assert!(!is_pubsub_message(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"));
        assert!(!is_pubsub_message(b"-ERR nope\r\n"));
        assert!(!is_pubsub_message(b"*2\r\n$6\r\nserver\r\n$6\r\nvalkey\r\n"), "a HELLO reply");
        assert!(is_message(b"*4\r\n$8\r\npmessage\r\n$1\r\np\r\n$1\r\nc\r\n$1\r\nm\r\n"));
        assert!(!is_message(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"));
    }
}
