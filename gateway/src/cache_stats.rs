//! What `INFO` tells about a cache beyond its clients, on this gateway: the clients blocked
//! in a blocking command, `commandstats`, `errorstats` and the ECPU behind `used_cpu_*`.
//!
//! Blocked clients are counted in place (a blocking command is rare, and its count must be
//! right at once). The other counters cost a command nothing shared: each session adds to
//! its own [`Tally`] (a few additions), and hands it to the cache's [`CacheStats`] with its
//! metering counters, within [`crate::metering::FLUSH_EVERY`] (at once before the session
//! answers `INFO` itself, and when it ends).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Distinct error codes `errorstats` keeps, as Valkey (`ERROR_STATS_NUMBER`): past them it
/// drops them all and shows `errorstat_ERRORSTATS_DISABLED:count=1` instead.
pub const MAX_ERROR_CODES: usize = 128;

/// Commands a session tallies before it hands its tally over whatever the time.
const MAX_TALLIED: usize = 64;

/// One command's counters, as `cmdstat_<name>` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandStat {
    /// Calls that ran (failed ones included, rejected ones not: as Valkey counts).
    pub calls: u64,
    pub usec: u64,
    /// Refused before they ran (unknown subcommand, arity, NOPERM, OOM, THROTTLED …).
    pub rejected: u64,
    /// Ran and answered an error.
    pub failed: u64,
}

impl CommandStat {
    fn add(&mut self, o: &CommandStat) {
        self.calls += o.calls;
        self.usec += o.usec;
        self.rejected += o.rejected;
        self.failed += o.failed;
    }
}

/// How a command ended, for its counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    Rejected,
}

/// A session's counters not yet in its cache's [`CacheStats`].
#[derive(Default)]
pub struct Tally {
    /// By command table index; a session uses few commands, so a short list.
    commands: Vec<(usize, CommandStat)>,
    errors: Vec<(Box<[u8]>, u64)>,
    pub ecpu_milli: u64,
}

impl Tally {
    /// Counts `calls` calls of the command with table index `index` (`usec`: their time);
    /// whether the tally should be handed over now (it holds many commands).
    #[inline]
    pub fn command(&mut self, index: usize, calls: u64, usec: u64, outcome: Outcome) -> bool {
        let at = match self.commands.iter().position(|(i, _)| *i == index) {
            Some(at) => at,
            None => {
                self.commands.push((index, CommandStat::default()));
                self.commands.len() - 1
            }
        };
        let stat = &mut self.commands[at].1;
        match outcome {
            Outcome::Rejected => stat.rejected += calls,
            Outcome::Failed => {
                stat.calls += calls;
                stat.usec += usec;
                stat.failed += calls;
            }
            Outcome::Ok => {
                stat.calls += calls;
                stat.usec += usec;
            }
        }
        self.commands.len() >= MAX_TALLIED
    }

    /// Counts an error reply by its code; whether the tally should be handed over now.
    pub fn error(&mut self, code: &[u8]) -> bool {
        match self.errors.iter_mut().find(|(c, _)| &**c == code) {
            Some((_, n)) => *n += 1,
            None => self.errors.push((code.into(), 1)),
        }
        self.errors.len() >= MAX_TALLIED
    }

    pub fn is_empty(&self) -> bool {
        self.commands.is_empty() && self.errors.is_empty() && self.ecpu_milli == 0
    }
}

/// The counters `INFO` shows for one cache on this gateway, since the gateway started.
#[derive(Default)]
pub struct CacheStats {
    blocked: AtomicU64,
    totals: Mutex<Totals>,
}

#[derive(Default)]
struct Totals {
    /// By the command table's index: only the commands the cache used (a cache uses few,
    /// and thousands of caches each holding a row per command would cost megabytes).
    commands: BTreeMap<usize, CommandStat>,
    errors: BTreeMap<Box<[u8]>, u64>,
    /// More than [`MAX_ERROR_CODES`] codes came: none are kept any more.
    errors_disabled: bool,
    ecpu_milli: u64,
}

/// One client of the cache blocked in a blocking command, until dropped (its reply came,
/// the connection to the node broke, or the session ended however it did).
pub struct Blocked(Arc<CacheStats>);

impl Drop for Blocked {
    fn drop(&mut self) {
        self.0.blocked.fetch_sub(1, Ordering::Relaxed);
    }
}

impl CacheStats {
    /// Counts a client as blocked until the guard is dropped.
    pub fn block(self: &Arc<Self>) -> Blocked {
        self.blocked.fetch_add(1, Ordering::Relaxed);
        Blocked(self.clone())
    }

    pub fn blocked(&self) -> u64 {
        self.blocked.load(Ordering::Relaxed)
    }

    /// Takes a session's tally (leaving it empty).
    pub fn add(&self, tally: &mut Tally) {
        if tally.is_empty() {
            return;
        }
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        totals.ecpu_milli += std::mem::take(&mut tally.ecpu_milli);
        for (index, stat) in tally.commands.drain(..) {
            totals.commands.entry(index).or_default().add(&stat);
        }
        for (code, n) in tally.errors.drain(..) {
            if totals.errors_disabled {
                break;
            }
            if !totals.errors.contains_key(&code) && totals.errors.len() >= MAX_ERROR_CODES {
                totals.errors.clear();
                totals.errors.insert(b"ERRORSTATS_DISABLED"[..].into(), 1);
                totals.errors_disabled = true;
                break;
            }
            *totals.errors.entry(code).or_default() += n;
        }
        tally.errors.clear();
    }

    /// `(command name, counters)` of the commands called or refused, by name.
    pub fn commands(&self) -> Vec<(&'static str, CommandStat)> {
        let totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        if totals.commands.is_empty() {
            return Vec::new();
        }
        let mut out: Vec<_> = shoal_commands::table()
            .iter()
            .filter_map(|spec| {
                let stat = *totals.commands.get(&spec.index)?;
                (stat != CommandStat::default()).then_some((spec.name.as_str(), stat))
            })
            .collect();
        out.sort_unstable_by_key(|(name, _)| *name);
        out
    }

    /// `(error code, count)`, by code.
    pub fn errors(&self) -> Vec<(String, u64)> {
        let totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        totals.errors.iter().map(|(c, n)| (String::from_utf8_lossy(c).into_owned(), *n)).collect()
    }

    /// Milli-ECPU metered for the cache on this gateway.
    pub fn ecpu_milli(&self) -> u64 {
        self.totals.lock().unwrap_or_else(|p| p.into_inner()).ecpu_milli
    }
}

/// The code `errorstats` counts an error reply under (`-ERR …`, `-WRONGTYPE …`, or a RESP3
/// blob error): its first word, as Valkey takes it (up to a space within the first 32
/// bytes; `ERR` when there is none). None for a reply that is not an error.
pub fn error_code(reply: &[u8]) -> Option<&[u8]> {
    error_message(reply).map(code_of)
}

/// The code of an error message (see [`error_code`]).
pub fn code_of(message: &[u8]) -> &[u8] {
    let head = &message[..message.len().min(32)];
    match head.iter().position(|&b| b == b' ') {
        Some(end) if end > 0 => &head[..end],
        _ => b"ERR",
    }
}

/// The text of an error reply (without `-` and the line end); None for other replies.
#[inline]
pub fn error_message(reply: &[u8]) -> Option<&[u8]> {
    let line_end = |b: &[u8]| b.iter().position(|&c| c == b'\r').unwrap_or(b.len());
    match reply.first()? {
        b'-' => Some(&reply[1..line_end(reply)]),
        b'!' => {
            let body =
                reply.iter().position(|&b| b == b'\n').map_or(&reply[reply.len()..], |i| &reply[i + 1..]);
            Some(&body[..line_end(body)])
        }
        _ => None,
    }
}

/// Whether Valkey counts an error as a rejected call rather than a failed one: refused
/// before the command ran (`processCommand`: arity, unknown subcommand, ACL, memory,
/// cluster redirections, a replica's or a loading node's refusals…).
pub fn rejected(message: &[u8]) -> bool {
    const CODES: [&[u8]; 15] = [
        b"NOPERM",
        b"OOM",
        b"READONLY",
        b"LOADING",
        b"BUSY",
        b"MISCONF",
        b"NOAUTH",
        b"MASTERDOWN",
        b"NOREPLICAS",
        b"MOVED",
        b"ASK",
        b"CROSSSLOT",
        b"TRYAGAIN",
        b"CLUSTERDOWN",
        b"THROTTLED",
    ];
    const ERR_PREFIXES: [&[u8]; 2] = [b"ERR wrong number of arguments", b"ERR unknown subcommand"];
    let code = message.split(|&b| b == b' ').next().unwrap_or_default();
    CODES.contains(&code) || ERR_PREFIXES.iter().any(|p| message.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(name: &str) -> usize {
        shoal_commands::table().get(name).unwrap().index
    }

    #[test]
    fn tallies_add_up_by_command_and_error_code() {
        let stats = CacheStats::default();
        let mut a = Tally::default();
        a.command(index("get"), 1, 10, Outcome::Ok);
        a.command(index("get"), 1, 5, Outcome::Ok);
        a.command(index("incr"), 1, 3, Outcome::Failed);
        a.command(index("set"), 1, 0, Outcome::Rejected);
        a.error(b"ERR");
        a.error(b"OOM");
        a.ecpu_milli = 3000;
        stats.add(&mut a);
        assert!(a.is_empty());
        let mut b = Tally::default();
        b.command(index("get"), 1, 1, Outcome::Ok);
        b.error(b"ERR");
        stats.add(&mut b);
        let commands = stats.commands();
        assert_eq!(
            commands,
            vec![
                ("get", CommandStat { calls: 3, usec: 16, rejected: 0, failed: 0 }),
                ("incr", CommandStat { calls: 1, usec: 3, rejected: 0, failed: 1 }),
                ("set", CommandStat { calls: 0, usec: 0, rejected: 1, failed: 0 }),
            ]
        );
        assert_eq!(stats.errors(), vec![("ERR".to_string(), 2), ("OOM".to_string(), 1)]);
        assert_eq!(stats.ecpu_milli(), 3000);
    }

    #[test]
    fn too_many_error_codes_disable_errorstats_as_in_valkey() {
        let stats = CacheStats::default();
        for i in 0..MAX_ERROR_CODES {
            let mut t = Tally::default();
            t.error(format!("E{i}").as_bytes());
            stats.add(&mut t);
        }
        assert_eq!(stats.errors().len(), MAX_ERROR_CODES);
        let mut t = Tally::default();
        t.error(b"ONEMORE");
        t.error(b"ERR");
        stats.add(&mut t);
        assert_eq!(stats.errors(), vec![("ERRORSTATS_DISABLED".to_string(), 1)]);
        assert!(t.is_empty());
    }

    #[test]
    fn blocked_clients_are_counted_while_their_guard_lives() {
        let stats = Arc::new(CacheStats::default());
        let a = stats.block();
        let b = stats.block();
        assert_eq!(stats.blocked(), 2);
        drop(a);
        assert_eq!(stats.blocked(), 1);
        drop(b);
        assert_eq!(stats.blocked(), 0);
    }

    #[test]
    fn error_codes_and_rejections() {
        assert_eq!(error_code(b"-ERR no such key\r\n"), Some(&b"ERR"[..]));
        assert_eq!(error_code(b"-WRONGTYPE Operation against a key\r\n"), Some(&b"WRONGTYPE"[..]));
        assert_eq!(error_code(b"-NOSPACEINTHISERRORATALLBUTLONGERTHAN32BYTES\r\n"), Some(&b"ERR"[..]));
        assert_eq!(error_code(b"!21\r\nSYNTAX invalid syntax\r\n"), Some(&b"SYNTAX"[..]));
        assert_eq!(error_code(b"+OK\r\n"), None);
        assert_eq!(error_code(b"$5\r\n-ERR \r\n"), None);
        assert!(rejected(b"ERR wrong number of arguments for 'get' command"));
        assert!(rejected(b"NOPERM this user has no permissions"));
        assert!(rejected(b"OOM cache data storage limit reached"));
        assert!(rejected(b"THROTTLED ECPU limit of cache a exceeded"));
        assert!(!rejected(b"WRONGTYPE Operation against a key holding the wrong kind of value"));
        assert!(!rejected(b"ERR value is not an integer or out of range"));
    }
}
