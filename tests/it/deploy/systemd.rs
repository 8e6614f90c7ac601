//! `deploy/systemd/`: one hardened unit per role, each verified by `systemd-analyze verify`
//! (with ExecStart pointing at the binary just built: verify wants it to exist), starting
//! the role with its example config; the engine's stop stops its Valkey nodes and nothing
//! else does.

use super::{deploy_dir, read, run, text};
use std::process::Command;
use std::time::Duration;

const UNITS: [(&str, &str); 3] = [
    ("shoal-control-plane.service", "control-plane"),
    ("shoal-gateway.service", "gateway"),
    ("shoal-engine.service", "engine"),
];

/// The values of `key` in section `[section]` of a unit file.
fn values<'a>(unit: &'a str, section: &str, key: &str) -> Vec<&'a str> {
    let mut current = "";
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            current = line.trim_matches(|c| c == '[' || c == ']');
        } else if let Some((k, v)) = line.split_once('=') {
            if current == section && k.trim() == key {
                out.push(v.trim());
            }
        }
    }
    out
}

fn one<'a>(unit: &'a str, name: &str, section: &str, key: &str) -> &'a str {
    match values(unit, section, key)[..] {
        [v] => v,
        ref v => panic!("{name}: [{section}] {key} should be set once, is {v:?}"),
    }
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: scripts/setup.sh --test installs it (Debian: systemd)"
    );
    let dir = tempfile::tempdir().unwrap();
    for (name, _) in UNITS {
        let unit = read(&deploy_dir().join("systemd").join(name));
        let exec = one(&unit, name, "Service", "ExecStart");
        assert!(exec.starts_with("/usr/local/bin/shoal "), "{name}: {exec}");
        // verify checks that ExecStart's binary exists: the one just built stands in.
        let copy = unit.replace(
            "ExecStart=/usr/local/bin/shoal ",
            &format!("ExecStart={} ", env!("CARGO_BIN_EXE_shoal")),
        );
        let path = dir.path().join(name);
        std::fs::write(&path, copy).unwrap();
        let out = run(Command::new("systemd-analyze").arg("verify").arg(&path), Duration::from_secs(30));
        // Unknown keys and bad values are only warnings (exit 0): any line about this unit fails.
        let stderr = text(&out.stderr);
        let about_it: Vec<&str> = stderr.lines().filter(|l| l.contains(name)).collect();
        assert!(out.status.success() && about_it.is_empty(), "{name}:\n{stderr}{}", text(&out.stdout));
    }
}

#[test]
fn the_units_are_hardened_and_run_their_role_with_its_example_config() {
    for (name, role) in UNITS {
        let unit = read(&deploy_dir().join("systemd").join(name));
        let s = |key: &str| one(&unit, name, "Service", key);
        assert_eq!(
            s("ExecStart"),
            format!("/usr/local/bin/shoal {role} --config /etc/shoal/{role}.toml"),
            "{name}"
        );
        let example = read(&deploy_dir().join(format!("{role}.toml")));
        assert!(
            example.starts_with(&format!("# shoal {role} --config /etc/shoal/{role}.toml")),
            "{role}.toml"
        );
        for (key, want) in [
            ("User", "shoal"),
            ("Group", "shoal"),
            ("ProtectSystem", "strict"),
            ("ReadWritePaths", "/var/lib/shoal"),
            ("NoNewPrivileges", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("ProtectHome", "yes"),
            ("CapabilityBoundingSet", ""),
            ("AmbientCapabilities", ""),
            ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
            ("SystemCallFilter", "@system-service"),
            ("SystemCallArchitectures", "native"),
            ("RestrictSUIDSGID", "yes"),
            ("UMask", "0077"),
            ("Restart", "on-failure"),
        ] {
            assert_eq!(s(key), want, "{name}: [Service] {key}");
        }
        assert!(values(&unit, "Service", "DynamicUser").iter().all(|v| *v == "no"), "{name}: its own user");
        assert!(
            s("StateDirectory").split(' ').any(|d| d == "shoal"),
            "{name}: /var/lib/shoal is made for it"
        );

        // Under ProtectSystem=strict only /var/lib/shoal is writable: everything the example
        // config has the process write must be there.
        let config: toml::Value = toml::from_str(&example).unwrap();
        let section = match role {
            "control-plane" => &config["control_plane"],
            "gateway" => &config["gateway"],
            _ => &config["engine"],
        };
        let mut written: Vec<&str> = ["admin_token_path", "audit_key_path", "data_dir"]
            .iter()
            .filter_map(|k| section.get(*k).and_then(|v| v.as_str()))
            .collect();
        if role == "engine" {
            written.push(config["engine"]["dir"].as_str().unwrap());
        }
        assert!(!written.is_empty(), "{name}");
        for path in written {
            assert!(
                path.starts_with("/var/lib/shoal/"),
                "{name}: {role}.toml writes {path}, read-only under ProtectSystem=strict"
            );
        }
    }
}

#[test]
fn only_the_engine_unit_stops_the_valkey_nodes() {
    let unit = |name: &str| read(&deploy_dir().join("systemd").join(name));
    let (cp, engine) = (unit("shoal-control-plane.service"), unit("shoal-engine.service"));
    // The engine: SIGTERM to the agent (it stops its nodes, which write their AOF), then
    // SIGKILL to whatever is left of the unit: its Valkey children never outlive it.
    assert_eq!(one(&engine, "engine", "Service", "KillMode"), "mixed");
    let stop: u64 = one(&engine, "engine", "Service", "TimeoutStopSec").parse().unwrap();
    assert!(stop >= 30, "the nodes need time to write their AOF: TimeoutStopSec={stop}");
    // The control plane: no tie to the engine unit (a restart of it would propagate), and it
    // runs no node itself (its example config leaves them to the agents).
    for (section, key) in [
        ("Unit", "Requires"),
        ("Unit", "BindsTo"),
        ("Unit", "PartOf"),
        ("Unit", "Requisite"),
        ("Unit", "Upholds"),
        ("Unit", "PropagatesReloadTo"),
        ("Unit", "PropagatesStopTo"),
        ("Unit", "Conflicts"),
    ] {
        for (name, text_, other) in
            [("control-plane", &cp, "shoal-engine"), ("engine", &engine, "shoal-control-plane")]
        {
            assert!(
                values(text_, section, key).iter().all(|v| !v.contains(other)),
                "{name}: [{section}] {key} ties it to {other}"
            );
        }
    }
    for key in ["ExecStop", "ExecStopPost", "ExecStartPre", "ExecReload"] {
        assert!(values(&cp, "Service", key).is_empty(), "control plane: {key} set");
    }
    assert!(
        !values(&cp, "Service", "KillMode").contains(&"none"),
        "a control plane's children must die with it"
    );
    let config: toml::Value = toml::from_str(&read(&deploy_dir().join("control-plane.toml"))).unwrap();
    assert_eq!(config["engine"]["supervisor"].as_str(), Some("agents"));
    // The store's password comes from PGPASSFILE, a file only shoal reads.
    assert_eq!(values(&cp, "Service", "Environment"), ["PGPASSFILE=/etc/shoal/pgpass", "SHOAL_LOG_JSON=1"]);
}
