//! What the session does with one request, decided from the command table and a few facts
//! about the session, with no I/O: the rules of dispatch in one place, checked by the unit
//! tests below. [`super::dispatch`] carries the decisions out.

use super::{MAX_FREE_REQUEST, MAX_HELD_REQUEST, NOAUTH, READONLY, STORAGE_FULL};
use shoal_commands::{CommandSpec, Placement, Treatment};
use std::time::Duration;

/// What becomes of a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// An error reply, metered (inside MULTI it makes EXEC abort).
    Refuse(String),
    /// The gateway answers or rewrites it ([`crate::cmd`]).
    Virtual,
    /// Forwarded byte for byte: on the cache's shared connection (`mux`) or the session's own.
    Forward { mux: bool },
}

/// What the decisions need to know about the session. Asked lazily: some answers cost
/// (the storage check counts the write it allows).
pub(crate) trait Facts {
    fn authenticated(&self) -> bool;
    /// The cache is over its storage limit for a write of `bytes`.
    fn storage_refuses(&self, bytes: u64) -> bool;
    /// The session came in on the reader endpoint.
    fn reader(&self) -> bool;
    /// The login's access string, if it has one (the gateway checks it for the commands
    /// it answers itself; the node checks the rest).
    fn access(&self) -> Option<&shoal_auth::AccessString>;
    /// The cache's scripts are paused after one was ended by force: for how long.
    fn scripts_paused(&self) -> Option<Duration>;
    /// The session may use the cache's shared connection.
    fn can_mux(&self) -> bool;
    /// Where the cache lives: a dedicated cache also runs the node-wide commands.
    fn placement(&self) -> Placement;
}

/// Before metering: the error of a request refused without being counted (before AUTH; a
/// write on the reader endpoint or while the cache is full).
pub(crate) fn reject(spec: Option<&CommandSpec>, len: usize, facts: &impl Facts) -> Option<&'static str> {
    if !facts.authenticated() {
        return (!spec.is_some_and(|s| s.no_auth)).then_some(NOAUTH);
    }
    if facts.reader() && spec.is_some_and(|s| s.writes()) {
        return Some(READONLY);
    }
    let full = spec.is_some_and(|s| s.refused_when_full) && facts.storage_refuses(len as u64);
    full.then_some(STORAGE_FULL)
}

/// Most members with repeats one `SRANDMEMBER`, `HRANDFIELD` or `ZRANDMEMBER` may ask for
/// (a negative count): from a key of one member Valkey makes replies until the connection's
/// output limit (513 MB), holding its node 6 s or so; 100,000 take it some milliseconds.
pub(crate) const MAX_REPEATS: u64 = 100_000;

/// The refusal of a request whose arguments alone would hold the node: a count of members
/// with repeats past [`MAX_REPEATS`].
pub(crate) fn refuse_arguments(spec: &CommandSpec, argv: &[&[u8]]) -> Option<String> {
    let asked = spec.repeats_asked(argv)?;
    (asked > MAX_REPEATS).then(|| {
        format!("ERR count is out of range: at most {MAX_REPEATS} members with repeats (a negative count) on Shoal")
    })
}

/// After metering: what the request becomes. Commands the table does not know are
/// forwarded (Valkey answers them).
pub(crate) fn decide(spec: Option<&CommandSpec>, len: usize, facts: &impl Facts) -> Action {
    let Some(spec) = spec else { return Action::Forward { mux: false } };
    match spec.treatment {
        Treatment::Deny if spec.refused_on(facts.placement()) => Action::Refuse(match &spec.refusal_reason {
            Some(why) => {
                format!("NOPERM the {} command is not allowed on Shoal caches: {why}", spec.display_name())
            }
            None => format!("NOPERM the {} command is not allowed on Shoal caches", spec.display_name()),
        }),
        Treatment::Virtual if len > MAX_HELD_REQUEST => {
            Action::Refuse(super::dispatch::too_large(&spec.display_name(), MAX_HELD_REQUEST as u64))
        }
        Treatment::Virtual if len as u64 > MAX_FREE_REQUEST && spec.weight == 0 => {
            Action::Refuse(super::dispatch::too_large(&spec.display_name(), MAX_FREE_REQUEST))
        }
        Treatment::Virtual => match refused_by_access(spec, facts.access()) {
            Some(refusal) => Action::Refuse(refusal),
            None => Action::Virtual,
        },
        // What a dedicated cache may run though shared ones may not.
        Treatment::Pass | Treatment::Deny => {
            if let Some(pause) = spec.script.then(|| facts.scripts_paused()).flatten() {
                return Action::Refuse(format!(
                    "ERR scripts of this cache are paused for {} s: one ran past the platform's script time limit",
                    pause.as_secs() + 1
                ));
            }
            Action::Forward { mux: spec.mux && facts.can_mux() }
        }
    }
}

/// A login's access string also holds for the commands the gateway answers itself
/// (logging in, choosing a database and resetting excepted, as upstream).
fn refused_by_access(spec: &CommandSpec, access: Option<&shoal_auth::AccessString>) -> Option<String> {
    let access = access?;
    let (name, sub) = match spec.name.split_once('|') {
        Some((n, s)) => (n, Some(s)),
        None => (spec.name.as_str(), None),
    };
    if spec.acl_exempt() || shoal_auth::access::allows_command(access, name, sub) {
        return None;
    }
    let shown = sub.map_or(name.to_string(), |s| format!("{name}|{s}"));
    Some(format!("NOPERM this user has no permissions to run the '{shown}' command"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[derive(Default)]
    struct Session {
        authenticated: bool,
        full: bool,
        access: Option<shoal_auth::AccessString>,
        paused: Option<Duration>,
        can_mux: bool,
        reader: bool,
        placement: Placement,
        storage_asked: Cell<u32>,
    }

    impl Facts for Session {
        fn authenticated(&self) -> bool {
            self.authenticated
        }
        fn storage_refuses(&self, _: u64) -> bool {
            self.storage_asked.set(self.storage_asked.get() + 1);
            self.full
        }
        fn access(&self) -> Option<&shoal_auth::AccessString> {
            self.access.as_ref()
        }
        fn scripts_paused(&self) -> Option<Duration> {
            self.paused
        }
        fn can_mux(&self) -> bool {
            self.can_mux
        }
        fn reader(&self) -> bool {
            self.reader
        }
        fn placement(&self) -> Placement {
            self.placement
        }
    }

    fn spec(name: &str) -> Option<&'static CommandSpec> {
        Some(shoal_commands::table().get(name).unwrap_or_else(|| panic!("{name} is in the table")))
    }

    #[test]
    fn counts_of_members_with_repeats_are_bounded() {
        let refused = |argv: &[&str]| {
            let name = argv[0].to_ascii_lowercase();
            let argv: Vec<&[u8]> = argv.iter().map(|a| a.as_bytes()).collect();
            refuse_arguments(spec(&name).unwrap(), &argv)
        };
        for name in ["SRANDMEMBER", "HRANDFIELD", "ZRANDMEMBER"] {
            assert_eq!(refused(&[name, "k"]), None, "{name}");
            assert_eq!(refused(&[name, "k", "-100000"]), None, "{name}");
            assert_eq!(refused(&[name, "k", "1000000000"]), None, "{name}: no repeats, bounded by the key");
            assert_eq!(refused(&[name, "k", "x"]), None, "{name}: Valkey's own error");
            let over = refused(&[name, "k", "-100001"]).unwrap_or_else(|| panic!("{name}"));
            assert!(over.starts_with("ERR count is out of range"), "{over}");
            assert!(refused(&[name, "k", "-9223372036854775808"]).is_some(), "{name}");
        }
        assert!(refused(&["HRANDFIELD", "k", "-200000", "WITHVALUES"]).is_some());
        assert_eq!(refused(&["LRANGE", "k", "-200000", "-1"]), None);
    }

    fn logged_in() -> Session {
        Session { authenticated: true, can_mux: true, ..Default::default() }
    }

    #[test]
    fn before_auth_only_what_valkey_runs_before_auth() {
        let s = Session::default();
        for name in ["auth", "hello", "quit", "reset"] {
            assert_eq!(reject(spec(name), 10, &s), None, "{name}");
        }
        for name in ["get", "ping", "select", "client|list", "flushall"] {
            assert_eq!(reject(spec(name), 10, &s), Some(NOAUTH), "{name}");
        }
        assert_eq!(reject(None, 10, &s), Some(NOAUTH), "unknown commands too");
    }

    #[test]
    fn a_full_cache_refuses_writes_and_is_asked_only_for_them() {
        let s = Session { full: true, ..logged_in() };
        assert_eq!(reject(spec("set"), 10, &s), Some(STORAGE_FULL));
        assert_eq!(reject(spec("eval"), 10, &s), Some(STORAGE_FULL), "scripts may write");
        assert_eq!(s.storage_asked.get(), 2);
        for name in ["get", "del", "expire", "eval_ro"] {
            assert_eq!(reject(spec(name), 10, &s), None, "{name}");
        }
        assert_eq!(s.storage_asked.get(), 2, "reads do not count as writes");
    }

    #[test]
    fn denied_commands_are_refused_naming_the_command() {
        let s = logged_in();
        assert_eq!(
            decide(spec("config|set"), 10, &s),
            Action::Refuse("NOPERM the CONFIG SET command is not allowed on Shoal caches".into())
        );
        assert!(matches!(decide(spec("swapdb"), 10, &s), Action::Refuse(m) if m.contains("SWAPDB")));
    }

    #[test]
    fn a_dedicated_cache_runs_functions_but_not_node_settings() {
        let shared = logged_in();
        let dedicated = Session { placement: Placement::Dedicated, ..logged_in() };
        for name in ["function|load", "fcall", "script|flush"] {
            assert!(matches!(decide(spec(name), 10, &shared), Action::Refuse(_)), "{name}");
            assert_eq!(decide(spec(name), 10, &dedicated), Action::Forward { mux: false }, "{name}");
        }
        assert!(matches!(decide(spec("config|set"), 10, &dedicated), Action::Refuse(_)));
        let paused = Session { paused: Some(Duration::from_secs(3)), ..dedicated };
        assert!(matches!(decide(spec("fcall"), 10, &paused), Action::Refuse(m) if m.contains("paused")));
    }

    #[test]
    fn stateless_commands_share_a_connection_when_the_session_can() {
        let s = logged_in();
        assert_eq!(decide(spec("get"), 10, &s), Action::Forward { mux: true });
        assert_eq!(decide(spec("blpop"), 10, &s), Action::Forward { mux: false }, "blocking");
        assert_eq!(decide(spec("multi"), 10, &s), Action::Forward { mux: false }, "transaction state");
        assert_eq!(decide(None, 10, &s), Action::Forward { mux: false }, "unknown: Valkey answers");
        let dedicated = Session { can_mux: false, ..logged_in() };
        assert_eq!(decide(spec("get"), 10, &dedicated), Action::Forward { mux: false });
    }

    #[test]
    fn virtual_commands_answer_to_the_access_string_but_login_commands_do_not() {
        let access = shoal_auth::AccessString::parse("on ~app:* +@read").unwrap();
        let s = Session { access: Some(access), ..logged_in() };
        assert!(matches!(decide(spec("flushall"), 10, &s), Action::Refuse(m) if m.contains("'flushall'")));
        for name in ["select", "reset", "auth", "hello"] {
            assert_eq!(decide(spec(name), 10, &s), Action::Virtual, "{name}");
        }
        assert_eq!(decide(spec("flushall"), 10, &logged_in()), Action::Virtual, "no access string");
    }

    #[test]
    fn big_requests_of_held_commands_are_refused() {
        let s = logged_in();
        let big = MAX_FREE_REQUEST as usize + 1;
        assert!(matches!(decide(spec("ping"), big, &s), Action::Forward { .. }), "forwarded, billed by size");
        assert!(matches!(decide(spec("auth"), big, &s), Action::Refuse(m) if m.contains("too large")));
        assert_eq!(decide(spec("select"), big, &s), Action::Virtual, "a metered virtual command may be big");
        let huge = MAX_HELD_REQUEST + 1;
        assert!(matches!(decide(spec("select"), huge, &s), Action::Refuse(m) if m.contains("too large")));
    }

    #[test]
    fn paused_scripts_are_refused_and_other_commands_go_on() {
        let s = Session { paused: Some(Duration::from_secs(9)), ..logged_in() };
        assert!(matches!(decide(spec("eval"), 10, &s), Action::Refuse(m) if m.contains("paused for 10 s")));
        assert!(matches!(decide(spec("evalsha_ro"), 10, &s), Action::Refuse(_)));
        assert_eq!(decide(spec("get"), 10, &s), Action::Forward { mux: true });
    }

    #[test]
    fn the_reader_endpoint_refuses_writes_and_scripts_that_may_write() {
        let reader = Session { reader: true, ..logged_in() };
        for write in ["set", "del", "eval", "flushdb"] {
            assert_eq!(reject(spec(write), 10, &reader), Some(READONLY), "{write}");
        }
        for read in ["get", "eval_ro", "ping", "scan"] {
            assert_eq!(reject(spec(read), 10, &reader), None, "{read}");
        }
    }
}
