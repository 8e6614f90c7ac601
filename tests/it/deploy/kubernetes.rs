//! `deploy/kubernetes/`: the manifests validate (kubernetes-validate --strict, offline, against
//! a pinned Kubernetes version whose schemas the package ships) and fit together: probes,
//! Services, PodDisruptionBudgets and Secrets point at what exists, every pod meets the
//! restricted Pod Security Standard, and the configs in the ConfigMaps agree with the pods
//! that mount them and pass `--check-config`.

use super::{deploy_dir, read, run, text, Placed};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The Kubernetes version the manifests are validated against (schemas shipped by the
/// kubernetes-validate that scripts/setup.sh --test installs).
const KUBERNETES: &str = "1.33.0";

fn k8s_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

/// The files of kustomization.yaml, asserted to be every other YAML file of the folder.
fn resources() -> Vec<PathBuf> {
    let kustomization = &super::yaml(&k8s_dir().join("kustomization.yaml"))[0];
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(k8s_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml lists every manifest");
    listed.iter().map(|n| k8s_dir().join(n)).collect()
}

#[test]
fn the_manifests_validate_against_the_kubernetes_api() {
    let files = resources();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet", "-k", KUBERNETES])
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("kubernetes-validate ({e}): scripts/setup.sh --test installs it"));
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    // It does check: a field the API does not have fails.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        read(&k8s_dir().join("gateway.yaml")).replacen("readinessProbe:", "readinessProbes:", 1),
    )
    .unwrap();
    let out = run(
        Command::new("kubernetes-validate").args(["--strict", "--quiet", "-k", KUBERNETES]).arg(&bad),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "kubernetes-validate let an unknown field through");
}

/// A Deployment or StatefulSet.
struct Workload {
    kind: String,
    name: String,
    replicas: u64,
    labels: serde_json::Map<String, Value>,
    pod: Value,
    service_name: Option<String>,
}

fn containers(pod: &Value) -> impl Iterator<Item = &Value> {
    pod["containers"].as_array().unwrap().iter().chain(pod["initContainers"].as_array().into_iter().flatten())
}

fn selects(selector: &Value, labels: &serde_json::Map<String, Value>) -> bool {
    let selector = selector.as_object().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A container port (by name or number) → its number.
fn port(pod: &Value, port: &Value) -> Option<u64> {
    containers(pod).flat_map(|c| c["ports"].as_array().into_iter().flatten()).find_map(|p| {
        (p["name"] == *port || p["containerPort"] == *port).then(|| p["containerPort"].as_u64().unwrap())
    })
}

/// Where a file lives in a container: the volume mounted at the longest prefix of its path,
/// and the path inside that volume.
/// A StatefulSet's claims are volumes too (`{"name": …, "claim": true}`).
fn try_volume_of(pod: &Value, container: &Value, path: &Path) -> Option<(Value, PathBuf)> {
    let (mount, rest) = container["volumeMounts"]
        .as_array()?
        .iter()
        .filter_map(|m| {
            path.strip_prefix(m["mountPath"].as_str().unwrap()).ok().map(|rest| (m, rest.to_path_buf()))
        })
        .max_by_key(|(m, _)| m["mountPath"].as_str().unwrap().len())?;
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).cloned();
    Some((volume.unwrap_or_else(|| serde_json::json!({"name": mount["name"], "claim": true})), rest))
}

fn volume_of(pod: &Value, container: &Value, path: &Path) -> (Value, PathBuf) {
    try_volume_of(pod, container, path)
        .unwrap_or_else(|| panic!("{} is mounted from no volume", path.display()))
}

/// The Secret and key a file of a container comes from, if it comes from one.
fn secret_key(pod: &Value, container: &Value, path: &Path) -> Option<(String, String)> {
    let (volume, rest) = try_volume_of(pod, container, path)?;
    let secret = volume["secret"]["secretName"].as_str()?;
    let file = rest.to_str().unwrap();
    let key = match volume["secret"]["items"].as_array() {
        Some(items) => {
            let item = items.iter().find(|i| i["path"] == file);
            item.unwrap_or_else(|| panic!("{file} is no item of the Secret {secret}"))["key"]
                .as_str()
                .unwrap()
        }
        None => file,
    };
    Some((secret.to_string(), key.to_string()))
}

#[test]
fn the_manifests_fit_together_and_their_configs_check_out() {
    let docs: Vec<Value> = resources().iter().flat_map(|f| super::yaml(f)).collect();
    let of_kind = |kind: &'static str| docs.iter().filter(move |d| d["kind"] == kind);
    assert_eq!(
        of_kind("Secret").count(),
        0,
        "no Secret (with values) in the manifests: docs/deploy.md makes them"
    );
    let namespace = of_kind("Namespace").next().expect("a Namespace");
    assert_eq!(namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted");
    let ns = namespace["metadata"]["name"].as_str().unwrap();
    for d in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], ns, "{} {}", d["kind"], d["metadata"]["name"]);
        }
    }
    let workloads: Vec<Workload> = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
        .map(|d| Workload {
            kind: d["kind"].as_str().unwrap().into(),
            name: d["metadata"]["name"].as_str().unwrap().into(),
            replicas: d["spec"]["replicas"].as_u64().unwrap(),
            labels: d["spec"]["template"]["metadata"]["labels"].as_object().unwrap().clone(),
            pod: d["spec"]["template"]["spec"].clone(),
            service_name: d["spec"]["serviceName"].as_str().map(String::from),
        })
        .collect();
    let role = |w: &Workload| w.pod["containers"][0]["args"][0].as_str().unwrap().to_string();
    let with_role = |r: &str| workloads.iter().filter(|w| role(w) == r).collect::<Vec<_>>();
    let (cps, gateways, engines) = (with_role("control-plane"), with_role("gateway"), with_role("engine"));
    assert!(cps.iter().all(|w| w.kind == "Deployment") && cps.iter().map(|w| w.replicas).sum::<u64>() >= 2);
    assert!(gateways.iter().all(|w| w.kind == "Deployment") && !gateways.is_empty());
    assert!(matches!(&engines[..], [w] if w.kind == "StatefulSet"), "the engine hosts are one StatefulSet");
    let engine = engines[0];
    let claims =
        docs.iter().find(|d| d["kind"] == "StatefulSet").unwrap()["spec"]["volumeClaimTemplates"].clone();
    let claim = claims[0]["metadata"]["name"].as_str().expect("volumeClaimTemplates");
    assert!(
        engine.pod["containers"][0]["volumeMounts"].as_array().unwrap().iter().any(|m| m["name"] == claim),
        "the engine's data is on its claim"
    );

    let openapi: Value = serde_json::from_slice(&super::shoal(&["openapi"]).stdout).unwrap();
    for w in &workloads {
        let pod = &w.pod;
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{}", w.name);
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{}", w.name);
        assert_eq!(pod["automountServiceAccountToken"], false, "{}", w.name);
        for c in containers(pod) {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{} {}", w.name, c["name"]);
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{} {}", w.name, c["name"]);
            assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]), "{} {}", w.name, c["name"]);
        }
        // Ready means serving: the probe asks a port the pod has, a route the binary serves.
        let probe = &pod["containers"][0]["readinessProbe"];
        assert!(!probe.is_null(), "{}: no readinessProbe", w.name);
        let probe_port = match probe["httpGet"].is_object() {
            true => probe["httpGet"]["port"].clone(),
            false => probe["tcpSocket"]["port"].clone(),
        };
        assert!(
            port(pod, &probe_port).is_some(),
            "{}: the probe's port {probe_port} is not the pod's",
            w.name
        );
        if let Some(path) = probe["httpGet"]["path"].as_str() {
            assert!(openapi["paths"].get(path).is_some(), "{}: shoal serves no {path}", w.name);
        }
        // A PodDisruptionBudget covers it.
        assert!(
            of_kind("PodDisruptionBudget").any(|p| selects(&p["spec"]["selector"]["matchLabels"], &w.labels)),
            "{}: no PodDisruptionBudget",
            w.name
        );
    }
    // Every Service selects pods that have its target ports.
    for s in of_kind("Service") {
        let name = s["metadata"]["name"].as_str().unwrap();
        let selected: Vec<&Workload> =
            workloads.iter().filter(|w| selects(&s["spec"]["selector"], &w.labels)).collect();
        assert!(!selected.is_empty(), "Service {name} selects no pod");
        for p in s["spec"]["ports"].as_array().unwrap() {
            for w in &selected {
                assert!(
                    port(&w.pod, &p["targetPort"]).is_some(),
                    "Service {name}: {} has no port {}",
                    w.name,
                    p["targetPort"]
                );
            }
        }
    }
    let service = |name: &str| {
        of_kind("Service")
            .find(|s| s["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no Service {name}"))
    };
    // The engine pods' names: <pod>.<headless Service>.<namespace>.svc.cluster.local.
    let headless = service(engine.service_name.as_deref().expect("serviceName"));
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    // One control plane at a time serves the internal API.
    let internal = service("shoal-internal");
    assert_eq!(
        cps.iter().filter(|w| selects(&internal["spec"]["selector"], &w.labels)).count(),
        1,
        "shoal-internal"
    );
    let internal_host = format!("shoal-internal.{ns}.svc.cluster.local");
    let internal_port = internal["spec"]["ports"][0]["port"].as_u64().unwrap() as u16;

    // The configs: each mounted by its pods, agreeing with them, checked by the binary.
    let config_maps: BTreeMap<String, &Value> = of_kind("ConfigMap")
        .map(|c| (c["metadata"]["name"].as_str().unwrap().to_string(), &c["data"]))
        .collect();
    let mut secret_keys: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut cp_config: Option<toml::Value> = None;
    let mut agents = Vec::new();
    for w in &workloads {
        let container = &w.pod["containers"][0];
        let args: Vec<&str> =
            container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        let [role, "--config", config_path] = args[..] else { panic!("{}: args {args:?}", w.name) };
        // The config files of its pods: a StatefulSet's by pod name.
        let pod_names: Vec<String> = match w.kind.as_str() {
            "StatefulSet" => (0..w.replicas).map(|i| format!("{}-{i}", w.name)).collect(),
            _ => vec![String::new()],
        };
        let (volume, _) = volume_of(&w.pod, container, Path::new(config_path));
        let map = config_maps[volume["configMap"]["name"].as_str().expect("the config is a ConfigMap's")];
        if w.kind == "StatefulSet" {
            assert!(config_path.contains("$(POD_NAME)"), "{}: one config per pod", w.name);
            assert_eq!(container["env"][0]["name"], "POD_NAME");
            assert_eq!(container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
            let keys: BTreeSet<String> = map.as_object().unwrap().keys().cloned().collect();
            let want: BTreeSet<String> = pod_names.iter().map(|p| format!("{p}.toml")).collect();
            assert_eq!(keys, want, "{}: a config for each pod", w.name);
        }
        for pod_name in &pod_names {
            let path = config_path.replace("$(POD_NAME)", pod_name);
            let key = Path::new(&path).file_name().unwrap().to_str().unwrap();
            let text_ = map[key].as_str().unwrap_or_else(|| panic!("{}: no {key} in the ConfigMap", w.name));
            let config: toml::Value = toml::from_str(text_).unwrap_or_else(|e| panic!("{key}: {e}"));
            match role {
                "control-plane" => {
                    let c = &config["control_plane"];
                    assert_eq!(
                        port(&w.pod, &"rest".into()),
                        Some(super::port_of(c["listen"].as_str().unwrap()) as u64)
                    );
                    assert_eq!(
                        port(&w.pod, &"internal".into()),
                        Some(super::port_of(c["internal_listen"].as_str().unwrap()) as u64)
                    );
                    if let Some(other) = &cp_config {
                        assert_eq!(other, &config, "the control planes share one config");
                    }
                    cp_config = Some(config.clone());
                }
                "gateway" => {
                    let g = &config["gateway"];
                    assert_eq!(
                        port(&w.pod, &"resp".into()),
                        Some(super::port_of(g["listen"].as_str().unwrap()) as u64)
                    );
                    let url = g["control_plane_url"].as_str().unwrap();
                    assert_eq!(super::host_port(url), (internal_host.clone(), internal_port), "{}", w.name);
                }
                "engine" => {
                    assert_eq!(config["agent"]["name"].as_str(), Some(pod_name.as_str()));
                    let url = config["agent"]["control_plane_url"].as_str().unwrap();
                    assert_eq!(super::host_port(url), (internal_host.clone(), internal_port), "{pod_name}");
                    let fqdn =
                        format!("{pod_name}.{}.{ns}.svc.cluster.local", w.service_name.as_deref().unwrap());
                    for (_, host, node_port) in super::nodes(&config) {
                        assert_eq!(host, fqdn, "{pod_name} runs a node of another host");
                        assert_eq!(port(&w.pod, &"valkey".into()), Some(node_port as u64), "{pod_name}");
                    }
                    agents.push(config.clone());
                }
                other => panic!("{}: role {other}", w.name),
            }
            // Every file it names is mounted: a Secret's key, an item of it, or a writable volume.
            let placed = Placed::new(key, text_);
            for (option, placed_path) in &placed.files {
                let original = placed.original(placed_path);
                if option == "dir" && role == "control-plane" {
                    continue; // the engine hosts hold the nodes' data
                }
                match secret_key(&w.pod, container, &original) {
                    Some((secret, key)) => {
                        secret_keys.entry(secret).or_default().insert(key);
                    }
                    None => {
                        let (volume, _) = volume_of(&w.pod, container, &original);
                        assert!(
                            volume["emptyDir"].is_object()
                                || (volume["claim"] == true && volume["name"] == claim),
                            "{}: {option} {} is on a read-only volume",
                            w.name,
                            original.display()
                        );
                    }
                }
            }
            placed.fill();
            let out = placed.start(role, true);
            assert!(out.status.success(), "{} {key}: {}", w.name, text(&out.stderr));
        }
    }
    super::assert_engine_agrees(
        cp_config.as_ref().unwrap(),
        &agents.iter().collect::<Vec<_>>(),
        true,
        "kubernetes",
    );
    // The audit key is copied into its writable folder by the init container.
    for w in &cps {
        let init = w.pod["initContainers"][0]["command"].as_array().unwrap();
        let target = cp_config.as_ref().unwrap()["control_plane"]["audit_key_path"].as_str().unwrap();
        assert_eq!(init.last().unwrap(), target, "{}", w.name);
    }
    // Every Secret a pod mounts, with each key it reads (its configs' files above, and the
    // paths its containers' environment and commands name), is made in docs/deploy.md.
    for w in &workloads {
        for c in containers(&w.pod) {
            let env = c["env"].as_array().into_iter().flatten().filter_map(|e| e["value"].as_str());
            let command = c["command"].as_array().into_iter().flatten().filter_map(|a| a.as_str());
            for path in env.chain(command).filter(|p| p.starts_with('/')) {
                if let Some((secret, key)) = secret_key(&w.pod, c, Path::new(path)) {
                    secret_keys.entry(secret).or_default().insert(key);
                }
            }
        }
        for v in w.pod["volumes"].as_array().unwrap() {
            if let Some(secret) = v["secret"]["secretName"].as_str() {
                let entry = secret_keys.entry(secret.into()).or_default();
                for item in v["secret"]["items"].as_array().into_iter().flatten() {
                    entry.insert(item["key"].as_str().unwrap().into());
                }
            }
        }
    }
    for (secret, key) in [
        ("shoal-control-plane", "admin.token"),
        ("shoal-control-plane", "audit.key"),
        ("shoal-control-plane", "pgpass"),
    ] {
        assert!(secret_keys[secret].contains(key), "{secret} {key}: {secret_keys:?}");
    }
    let docs_text = read(&deploy_dir().join("../docs/deploy.md"));
    let commands: Vec<String> = docs_text
        .split("\nkubectl ")
        .skip(1)
        .map(|c| c.split("\n\n").next().unwrap().replace("\\\n", " "))
        .collect();
    for (secret, keys) in &secret_keys {
        let command = commands
            .iter()
            .find(|c| {
                c.contains(&format!(" secret generic {secret} "))
                    || c.contains(&format!(" secret tls {secret} "))
            })
            .unwrap_or_else(|| {
                panic!("docs/deploy.md makes no Secret {secret} (kubectl -n {ns} create secret …)")
            });
        for key in keys {
            let tls = command.contains(" secret tls ") && (key == "tls.crt" || key == "tls.key");
            assert!(
                tls || command.contains(&format!("--from-file={key}=")),
                "docs/deploy.md: Secret {secret} lacks {key}: {command}"
            );
        }
    }
}
