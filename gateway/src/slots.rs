//! Connection slots that one source address may hold: connections that have not
//! authenticated yet, and TLS handshakes in progress. Every slot is a guard given back when
//! dropped, however the connection ends (a panic included).
//!
//! A source is an IPv4 address, or an IPv6 /64 (one host usually has a whole /64).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The source a peer address counts against.
pub fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// At most `max` slots per source.
pub struct PerSource {
    max: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One slot of a source, given back when dropped.
pub struct SourceSlot {
    owner: Arc<PerSource>,
    source: IpAddr,
}

impl PerSource {
    pub fn new(max: usize) -> Arc<PerSource> {
        Arc::new(PerSource { max, held: Mutex::default() })
    }

    /// A slot for `ip`'s source, unless it holds `max` already.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let source = source(ip);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(source).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot { owner: self.clone(), source })
    }

    /// Slots `ip`'s source holds.
    pub fn held(&self, ip: IpAddr) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).get(&source(ip)).copied().unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.source);
            }
        }
    }
}

/// The slots of a connection that has not authenticated yet: one of the gateway's
/// `max_unauthenticated` and one of its source's `max_unauthenticated_per_source`.
pub struct Unauthenticated {
    _total: OwnedSemaphorePermit,
    _source: SourceSlot,
    /// When the connection was accepted: its time to authenticate counts from here.
    pub since: std::time::Instant,
}

/// Takes both slots for a new connection from `ip`, or says which limit it is over.
pub fn unauthenticated(
    total: &Arc<Semaphore>,
    per_source: &Arc<PerSource>,
    ip: IpAddr,
) -> Result<Unauthenticated, &'static str> {
    let source =
        per_source.take(ip).ok_or("ERR max number of unauthenticated clients reached for this address")?;
    let total =
        total.clone().try_acquire_owned().map_err(|_| "ERR max number of unauthenticated clients reached")?;
    Ok(Unauthenticated { _total: total, _source: source, since: std::time::Instant::now() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_source_and_given_back() {
        let (total, per_source) = (Arc::new(Semaphore::new(3)), PerSource::new(2));
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let a1 = unauthenticated(&total, &per_source, a).unwrap();
        let _a2 = unauthenticated(&total, &per_source, a).unwrap();
        let refused = unauthenticated(&total, &per_source, a).err().unwrap();
        assert!(refused.ends_with("for this address"), "{refused}");
        let _b1 = unauthenticated(&total, &per_source, b).unwrap();
        assert_eq!(total.available_permits(), 0);
        assert!(unauthenticated(&total, &per_source, b).err().unwrap().ends_with("reached"));
        assert_eq!(per_source.held(b), 1, "a refusal over the total holds nothing");
        drop(a1);
        assert_eq!(per_source.held(a), 1);
        assert!(unauthenticated(&total, &per_source, a).is_ok());
        // A panic gives slots back as well.
        let (t, p) = (total.clone(), per_source.clone());
        let _ = std::thread::spawn(move || {
            let _slot = unauthenticated(&t, &p, "127.0.0.3".parse().unwrap());
            panic!("session bug");
        })
        .join();
        assert_eq!(per_source.held("127.0.0.3".parse().unwrap()), 0);
    }

    #[test]
    fn an_ipv6_host_is_one_source() {
        let p = PerSource::new(1);
        let _one = p.take("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(p.take("2001:db8:1:2:ffff::9".parse().unwrap()).is_none(), "same /64");
        assert!(p.take("2001:db8:1:3::1".parse().unwrap()).is_some(), "another /64");
        let _v4 = p.take("10.0.0.1".parse().unwrap()).unwrap();
        assert!(p.take("::ffff:10.0.0.1".parse().unwrap()).is_none(), "v4-mapped is the v4 address");
    }
}
