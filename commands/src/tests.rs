use super::*;

#[test]
fn the_table_parses_and_knows_valkey_9_commands() {
    let t = table();
    assert_eq!(t.lookup(b"get", None).unwrap().treatment, Treatment::Pass);
    assert_eq!(t.lookup(b"GeT", None).unwrap().first_key, 1);
    assert!(t.lookup(b"hsetex", None).is_some(), "Valkey 9 hash field expiration");
    assert!(t.lookup(b"delifeq", None).is_some());
    assert!(t.lookup(b"nosuchcommand", None).is_none());
    assert_eq!(t.get("get").unwrap().hits, Hits::Value);
    assert_eq!(t.get("mget").unwrap().hits, Hits::Elements);
    assert_eq!(t.get("set").unwrap().hits, Hits::None);
}

#[test]
fn columns_are_found_by_name_and_bad_cells_are_named() {
    let tsv = "# comment\nshoal\tname\tarity\tflags\tfirst_key\tlast_key\tstep\tacl_categories\ttreatment\tweight\tper_element\thits\textra\n\
               barrier\tinfo\t-1\tloading\t0\t0\t0\tslow\tvirtual\t1000\t0\t-\tx\n";
    let t = CommandTable::parse(tsv).unwrap();
    assert!(t.get("info").unwrap().shoal.barrier);
    let bad = tsv.replace("\tvirtual\t", "\tmaybe\t");
    assert!(CommandTable::parse(&bad).unwrap_err().contains("bad treatment"));
    let missing = tsv.replace("hits\t", "hats\t");
    assert!(CommandTable::parse(&missing).unwrap_err().contains("no column \"hits\""));
}

#[test]
fn dangerous_commands_are_denied_and_subcommands_resolve() {
    let t = table();
    for (name, sub) in [
        ("DEBUG", Some("SLEEP")),
        ("SHUTDOWN", None),
        ("MONITOR", None),
        ("SWAPDB", None),
        ("ACL", Some("SETUSER")),
        ("FUNCTION", Some("LOAD")),
        ("SCRIPT", Some("FLUSH")),
        ("CLIENT", Some("PAUSE")),
        ("MEMORY", Some("DOCTOR")),
        ("SLOWLOG", Some("GET")),
        ("CONFIG", Some("SET")),
        ("MODULE", Some("LOAD")),
        ("REPLICAOF", None),
        ("MIGRATE", None),
    ] {
        let spec = t.lookup(name.as_bytes(), sub.map(str::as_bytes)).unwrap();
        assert_eq!(spec.treatment, Treatment::Deny, "{name} {sub:?}");
    }
    assert_eq!(t.lookup(b"client", Some(b"GETNAME")).unwrap().treatment, Treatment::Pass);
    assert_eq!(t.lookup(b"acl", Some(b"whoami")).unwrap().treatment, Treatment::Virtual);
    assert_eq!(t.lookup(b"memory", Some(b"usage")).unwrap().treatment, Treatment::Pass);
    assert_eq!(t.lookup(b"script", Some(b"load")).unwrap().treatment, Treatment::Pass);
    assert_eq!(t.lookup(b"FLUSHALL", None).unwrap().treatment, Treatment::Virtual);
    assert_eq!(t.lookup(b"config", Some(b"get")).unwrap().treatment, Treatment::Virtual);
    assert_eq!(t.lookup(b"restore", None).unwrap().treatment, Treatment::Pass);
    assert_eq!(t.get("config|get").unwrap().display_name(), "CONFIG GET");
}

#[test]
fn only_connection_free_commands_are_multiplexed() {
    let t = table();
    for name in ["get", "set", "mget", "eval", "evalsha", "flushdb", "ping", "echo", "script|load", "xadd"] {
        assert!(t.get(name).unwrap().mux, "{name}");
    }
    for name in [
        "multi",
        "exec",
        "watch",
        "unwatch",
        "discard",
        "blpop",
        "xread",
        "wait",
        "waitaof",
        "client|id",
        "client|setname",
        "select",
        "hello",
        "reset",
        "subscribe",
        "publish",
        "script|debug",
        "auth",
        "client|no-touch",
        "command|getkeys",
        "asking",
    ] {
        assert!(!t.get(name).unwrap().mux, "{name}");
    }
}

#[test]
fn flags_the_gateway_relies_on() {
    let t = table();
    let named = |pick: fn(&CommandSpec) -> bool| {
        let mut names: Vec<&str> = t.iter().filter(|s| pick(s)).map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        names
    };
    assert_eq!(named(|s| s.no_auth), ["auth", "hello", "quit", "reset"]);
    assert_eq!(named(|s| s.shoal.transaction), ["discard", "exec", "multi"]);
    assert_eq!(named(|s| s.script), ["eval", "eval_ro", "evalsha", "evalsha_ro", "fcall", "fcall_ro"]);
    for name in ["eval", "evalsha", "fcall", "set", "lpush", "copy"] {
        assert!(t.get(name).unwrap().refused_when_full, "{name}");
    }
    for name in ["eval_ro", "evalsha_ro", "del", "unlink", "expire", "get"] {
        assert!(!t.get(name).unwrap().refused_when_full, "{name}");
    }
    assert!(t.get("info").unwrap().shoal.barrier && t.get("pubsub|numsub").unwrap().shoal.barrier);
    assert!(t.get("select").unwrap().acl_exempt() && t.get("reset").unwrap().acl_exempt());
    assert!(!t.get("get").unwrap().acl_exempt());
    // Inside MULTI the gateway queues only what it forwards (rewritten): SELECT, PUBLISH …
    assert!(t.get("select").unwrap().shoal.multi_ok && t.get("publish").unwrap().shoal.multi_ok);
    assert!(!t.get("client|list").unwrap().shoal.multi_ok && !t.get("info").unwrap().shoal.multi_ok);
}

#[test]
fn keys_follow_first_last_and_step() {
    let t = table();
    let argv: Vec<&[u8]> = vec![b"mset", b"k1", b"v1", b"k2", b"v2"];
    assert_eq!(t.get("mset").unwrap().keys(&argv), [b"k1" as &[u8], b"k2"]);
    let argv: Vec<&[u8]> = vec![b"del", b"a", b"b", b"c"];
    assert_eq!(t.get("del").unwrap().keys(&argv).len(), 3);
    let argv: Vec<&[u8]> = vec![b"eval", b"return 1", b"1", b"k"];
    assert!(t.get("eval").unwrap().keys(&argv).is_empty(), "keys that move count none");
    let argv: Vec<&[u8]> = vec![b"get"];
    assert!(t.get("get").unwrap().keys(&argv).is_empty(), "a short command has no key");
}

#[test]
fn node_rules_deny_what_the_gateway_denies_that_the_categories_leave() {
    let rules = table().node_acl_rules(Placement::Shared);
    assert_eq!(&rules[..2], ["-@admin", "-@dangerous"]);
    for rule in [
        "+flushdb",
        "+keys",
        "+sort",
        "+sort_ro",
        "-function",
        "-fcall",
        "-fcall_ro",
        "-script|flush",
        "-script|kill",
        "-script|debug",
        "-pubsub",
        "-memory|stats",
        "-memory|doctor",
        "-memory|purge",
        "-memory|malloc-stats",
        "-client|tracking",
        "-client|trackinginfo",
        "-client|caching",
        "-client|getredir",
        "-cluster",
        "-client|reply",
        // ACL CAT/GENPASS/HELP pass: the container is open, and the one subcommand the
        // gateway answers is refused by name (the others are @admin).
        "+restore",
        "-acl|whoami",
    ] {
        assert!(rules.iter().any(|r| r == rule), "{rule} missing from {rules:?}");
    }
    // The gateway's connections to a cluster's replicas (the reader endpoint) send READONLY;
    // it changes nothing but where a replica serves reads.
    assert!(!rules.iter().any(|r| r == "-readonly" || r == "-readwrite"), "{rules:?}");
    // CONFIG HELP passes, so CONFIG is refused subcommand by subcommand; a refused
    // container's subcommands are not listed one by one.
    assert!(
        !rules.iter().any(|r| r == "-config" || r == "-function|load" || r == "-cluster|nodes"),
        "{rules:?}"
    );
    assert!(rules.len() < 40, "rules stay short: each tenant user carries them ({} rules)", rules.len());
}

#[test]
fn a_dedicated_cache_may_run_functions_and_manage_its_script_cache() {
    let t = table();
    let rules = t.node_acl_rules(Placement::Dedicated);
    for gone in ["-function", "-fcall", "-fcall_ro", "-script|flush", "-script|show"] {
        assert!(!rules.iter().any(|r| r == gone), "{gone} in {rules:?}");
    }
    // What is node-wide for the platform stays refused.
    for kept in ["-pubsub", "-script|kill", "-client|tracking", "-acl|whoami"] {
        assert!(rules.iter().any(|r| r == kept), "{kept} missing from {rules:?}");
    }
    let load = t.lookup(b"FUNCTION", Some(b"LOAD")).unwrap();
    assert!(load.refused_on(Placement::Shared) && !load.refused_on(Placement::Dedicated));
    let config_set = t.get("config|set").unwrap();
    assert!(config_set.refused_on(Placement::Dedicated), "node settings stay the platform's");
}

#[test]
fn blocking_calls_and_dense_indexes() {
    let t = table();
    let blocks = |args: &[&str]| {
        let argv: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        t.lookup(argv[0], argv.get(1).copied()).unwrap().blocks(&argv)
    };
    for args in [
        &["BLPOP", "q", "0"][..],
        &["brpop", "q", "1"],
        &["BLMOVE", "a", "b", "LEFT", "RIGHT", "0"],
        &["BLMPOP", "0", "1", "q", "LEFT"],
        &["BZPOPMIN", "z", "0"],
        &["BZPOPMAX", "z", "0"],
        &["BZMPOP", "0", "1", "z", "MIN"],
        &["WAIT", "1", "0"],
        &["WAITAOF", "0", "1", "0"],
        &["XREAD", "BLOCK", "0", "STREAMS", "s", "$"],
        &["XREADGROUP", "GROUP", "g", "c", "block", "0", "STREAMS", "s", ">"],
    ] {
        assert!(blocks(args), "{args:?}");
    }
    for args in [
        &["XREAD", "STREAMS", "block", "$"][..],
        &["XREAD", "COUNT", "1", "STREAMS", "s", "0"],
        &["LPOP", "q"],
        &["GET", "k"],
    ] {
        assert!(!blocks(args), "{args:?}");
    }
    let mut seen = vec![false; t.len()];
    for spec in t.iter() {
        assert!(!std::mem::replace(&mut seen[spec.index], true), "{} shares its index", spec.name);
    }
    assert!(seen.iter().all(|s| *s));
}
