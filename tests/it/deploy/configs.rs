//! The example configs of each role (`deploy/control-plane.toml`, `gateway.toml`,
//! `engine.toml`): they pass `--check-config` with the files they name, agree with each other,
//! set and suggest only options the binary knows, each with a comment; and a placeholder
//! where a secret belongs stops the process at start, naming the file.

use super::{deploy_dir, read, text, Placed};
use std::path::Path;

/// (role, example file) of the three roles.
const EXAMPLES: [(&str, &str); 3] =
    [("control-plane", "control-plane.toml"), ("gateway", "gateway.toml"), ("engine", "engine.toml")];

fn example(file: &str) -> String {
    read(&deploy_dir().join(file))
}

#[test]
fn every_example_config_passes_check_config_with_the_files_it_names() {
    for (role, file) in EXAMPLES {
        let text_ = example(file);
        let first = text_.lines().next().unwrap();
        assert_eq!(first, format!("# shoal {role} --config /etc/shoal/{file}"), "{file} says how it is used");
        let placed = Placed::new(file, &text_);
        placed.fill();
        let out = placed.start(role, true);
        assert!(out.status.success(), "{file}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains(": OK"), "{file}: {}", text(&out.stdout));
    }
}

#[test]
fn the_examples_agree_with_each_other() {
    let parse = |file: &str| -> toml::Value { toml::from_str(&example(file)).unwrap() };
    let (cp, gw, engine) = (parse("control-plane.toml"), parse("gateway.toml"), parse("engine.toml"));
    super::assert_engine_agrees(&cp, &[&engine], false, "deploy/");
    // Gateways and agents use the same control plane's internal API, over TLS, on its port.
    let c = &cp["control_plane"];
    for (who, section) in [("gateway", &gw["gateway"]), ("engine agent", &engine["agent"])] {
        let url = section["control_plane_url"].as_str().unwrap();
        assert!(url.starts_with("https://"), "{who}: {url}");
        assert_eq!(super::host_port(url).1, super::port_of(c["internal_listen"].as_str().unwrap()), "{who}");
        assert_eq!(section["control_plane_ca"], gw["gateway"]["control_plane_ca"], "{who}");
    }
    assert_eq!(gw["gateway"]["control_plane_url"], engine["agent"]["control_plane_url"]);
    // The store's password is never in the file (PGPASSFILE names it).
    let url = c["database_url"].as_str().unwrap();
    let userinfo = url.split_once("://").unwrap().1.split_once('@').map(|(u, _)| u).unwrap_or("");
    assert!(!userinfo.contains(':'), "a password in database_url: {url}");
    assert_eq!(
        c["public_endpoint"], gw["gateway"]["advertise"],
        "cache responses point at the gateways' balancer"
    );
}

/// The key of an assignment line `key = value`, if the line is one.
fn key_of(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')).then_some(key)
}

/// An option the binary does not know is ignored silently: probe every option an example
/// sets, and every one it suggests in a `# key = value` line, with values no option takes (a
/// TOML datetime; else a table with an unknown key, for enums). A known option makes the file
/// fail to parse with one of them; an unknown one passes `--check-config` with both.
#[test]
fn every_example_option_is_documented_and_known_to_the_binary() {
    const PROBES: [&str; 2] = ["1979-05-27T07:32:00Z", "{ shoal_probe = 1 }"];
    let mut probes = Vec::new();
    for (role, file) in EXAMPLES {
        let text_ = example(file);
        let lines: Vec<&str> = text_.lines().collect();
        let mut commented_table = false;
        let mut set_here: Vec<&str> = Vec::new();
        let mut paragraph_has_comment = false;
        for (i, line) in lines.iter().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() {
                paragraph_has_comment = false;
                continue;
            }
            if trimmed.starts_with('[') {
                commented_table = false;
                set_here.clear();
                continue;
            }
            if let Some(comment) = trimmed.strip_prefix('#') {
                let comment = comment.trim();
                if comment.starts_with('[') {
                    commented_table = true;
                } else if let (false, Some(key)) = (commented_table, key_of(comment)) {
                    // A suggested option: known unless it is also set in this table.
                    if !set_here.contains(&key) && comment.split_once('=').is_some() {
                        probes.push((role, file, i, key.to_string()));
                    }
                }
                paragraph_has_comment = true;
                continue;
            }
            let key = key_of(line).unwrap_or_else(|| panic!("{file}:{}: not an option: {line}", i + 1));
            assert!(
                paragraph_has_comment || line.contains(" #"),
                "{file}:{}: option {key} has no comment saying what it does",
                i + 1
            );
            set_here.push(key);
            probes.push((role, file, i, key.to_string()));
        }
    }
    assert!(probes.len() > 50, "{} options probed", probes.len());
    let unknown: Vec<String> = std::thread::scope(|s| {
        let chunks: Vec<_> = probes.chunks(probes.len().div_ceil(4)).collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    let mut unknown = Vec::new();
                    for (role, file, i, key) in chunk {
                        let refused = |probe: &str| {
                            let mut lines: Vec<String> = example(file).lines().map(String::from).collect();
                            lines[*i] = format!("{key} = {probe}");
                            let placed = Placed::new(file, &lines.join("\n"));
                            placed.fill();
                            let out = placed.start(role, true);
                            let stderr = text(&out.stderr);
                            !out.status.success()
                                && stderr.contains("parsing")
                                && !stderr.contains("unknown field")
                        };
                        if !PROBES.iter().any(|p| refused(p)) {
                            unknown.push(format!("{file}:{}: {key}", i + 1));
                        }
                    }
                    unknown
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(unknown.is_empty(), "options the binary does not know (or ignores):\n{}", unknown.join("\n"));
}

/// Writes `content` where option `key` of a placed config points, starts the process (for
/// real: no --check-config) and returns its error, asserting it stopped at once, named the
/// option and the file, and said "placeholder".
fn refused_with(placed: &Placed, role: &str, key: &str, content: &str) -> String {
    let path = placed.file(key).to_path_buf();
    let before = std::fs::read(&path).ok();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, content).unwrap();
    let out = placed.start(role, false);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{role} started with {content:?} in {key}:\n{stderr}");
    assert!(
        stderr.contains(&path.display().to_string()) && stderr.contains("placeholder"),
        "{role} with {content:?} in {key}: the error should name the file and say placeholder:\n{stderr}"
    );
    match before {
        Some(b) => std::fs::write(&path, b).unwrap(),
        None => std::fs::remove_file(&path).unwrap(),
    }
    stderr
}

#[test]
fn placeholder_secrets_stop_every_role_at_start_naming_the_file() {
    // The control plane: before it opens the store or any Valkey node.
    let cp = Placed::new("control-plane.toml", &example("control-plane.toml"));
    cp.fill();
    let err = refused_with(&cp, "control-plane", "admin_token_path", "CHANGE_ME\n");
    assert!(err.contains("admin_token_path"), "{err}");
    let err = refused_with(&cp, "control-plane", "audit_key_path", "REPLACE_WITH_THE_AUDIT_KEY");
    assert!(err.contains("audit_key_path"), "{err}");
    let err = refused_with(&cp, "control-plane", "internal_tls_key", "<paste the internal TLS key here>\n");
    assert!(err.contains("internal_tls_key"), "{err}");
    let err = refused_with(&cp, "control-plane", "node_secret_file", "changeme\n");
    assert!(err.contains("node_secret_file"), "{err}");
    // A real admin token is fine (the start then goes on: --check-config stops there).
    std::fs::create_dir_all(cp.file("admin_token_path").parent().unwrap()).unwrap();
    std::fs::write(cp.file("admin_token_path"), format!("shoal_admin_{}\n", super::random_hex())).unwrap();
    assert!(cp.start("control-plane", true).status.success());

    // The gateway: before it binds anything.
    let gw = Placed::new("gateway.toml", &example("gateway.toml"));
    gw.fill();
    let err = refused_with(&gw, "gateway", "internal_credential_file", "REPLACE_WITH_THE_CREDENTIAL\n");
    assert!(err.contains("internal_credential_file") && err.contains("shoal admin gateway create"), "{err}");
    refused_with(
        &gw,
        "gateway",
        "tls_key",
        "-----BEGIN PRIVATE KEY-----\nCHANGE_ME\n-----END PRIVATE KEY-----\n",
    );

    // The engine agent: before any node starts.
    let engine = Placed::new("engine.toml", &example("engine.toml"));
    engine.fill();
    refused_with(&engine, "engine", "node_secret_file", "<the node secret>\n");
    let err = refused_with(&engine, "engine", "internal_credential_file", "${ENGINE_CREDENTIAL}\n");
    assert!(err.contains("internal_credential_file"), "{err}");
    assert!(!Path::new(&engine.root.path().join("var/lib/shoal/valkey")).exists(), "a node started");
}
