//! The README's quickstart, run as written: its shell commands (curl with the admin token
//! file), the replies it shows (the same fields), its `redis-cli` session and its Python
//! snippet, against a real `shoal dev`. Only the ports and the cache id differ from the text.

use crate::support::ShoalDev;
use std::process::{Command, Stdio};

/// The README's `## Quickstart` section.
fn quickstart() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("## Quickstart").expect("the README has a quickstart");
    let rest = &readme[start + 3..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
}

/// The fenced code blocks of `text` in `language`.
fn blocks(text: &str, language: &str) -> Vec<String> {
    let fence = format!("```{language}\n");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(&fence) {
        let body = &rest[at + fence.len()..];
        let end = body.find("```").unwrap();
        out.push(body[..end].to_string());
        rest = &body[end..];
    }
    out
}

/// The shell commands of a block (joined continuation lines) and the reply each documents
/// in the comment lines after it (`# …`).
fn commands(block: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut pending = String::new();
    for line in block.lines() {
        // A reply starts `# {` and goes on in lines that start `#  `; other comments are prose.
        if let Some(comment) = line.strip_prefix('#') {
            let continues = comment.starts_with("  ") && out.last().is_some_and(|l| !l.1.is_empty());
            if let Some(last) = out.last_mut().filter(|_| comment.starts_with(" {") || continues) {
                last.1.push_str(comment.trim_start());
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        if let Some(part) = line.strip_suffix('\\') {
            pending.push_str(part);
            continue;
        }
        pending.push_str(line);
        out.push((std::mem::take(&mut pending), String::new()));
    }
    out
}

fn bash(dir: &std::path::Path, script: &str) -> String {
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn keys(v: &serde_json::Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

#[tokio::test]
async fn the_quickstart_runs_as_written() {
    let dev = ShoalDev::start().await;
    let text = quickstart();
    let here = |s: &str| {
        s.replace("localhost:8080", &format!("localhost:{}", dev.rest_port))
            .replace("-p 6380", &format!("-p {}", dev.resp_port))
            .replace("port=6380", &format!("port={}", dev.resp_port))
    };

    // The shell block: each command as written, in a directory holding `.shoal/admin.token`.
    let shell = &blocks(&text, "sh")[0];
    let steps = commands(shell);
    assert!(steps.len() >= 3, "{steps:?}");
    let mut env = String::new();
    let mut documented_id = String::new();
    let mut cache_id = String::new();
    let mut token = String::new();
    for (command, reply) in &steps {
        if !command.starts_with("curl") {
            env.push_str(&format!("{}\n", here(command)));
            continue;
        }
        let mut command = here(command);
        if !documented_id.is_empty() {
            command = command.replace(&documented_id, &cache_id);
        }
        let out = bash(&dev.dir, &format!("{env}{command}"));
        let got: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{command}: {e}: {out}"));
        let shown: serde_json::Value = serde_json::from_str(&reply.replace('…', ""))
            .unwrap_or_else(|e| panic!("the README's reply to {command}: {e}: {reply}"));
        assert_eq!(keys(&got), keys(&shown), "the fields of {command}'s reply, as the README shows them");
        if let Some(id) = got["id"].as_str() {
            (cache_id, documented_id) = (id.to_string(), shown["id"].as_str().unwrap().to_string());
            assert_eq!(got["name"], shown["name"]);
            assert_eq!(got["limits"], shown["limits"]);
        }
        if let Some(t) = got["token"].as_str() {
            token = t.to_string();
        }
    }
    assert!(!cache_id.is_empty() && !token.is_empty(), "the quickstart creates a cache and mints a token");

    // The redis-cli session: the commands after each prompt, the replies shown.
    let session = blocks(&text, "sh")[1].clone();
    let mut lines = session.lines();
    let cli = here(lines.next().unwrap());
    let mut input = String::new();
    let mut expected = Vec::new();
    for line in lines {
        match line.split_once("> ") {
            Some((_, cmd)) => input.push_str(&format!("{}\n", cmd.replace("eyJ0eXAiOiJKV1Qi…", &token))),
            None => expected.push(line.trim_matches('"').to_string()),
        }
    }
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&cli)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(got, expected, "redis-cli as in the README");

    // The Python snippet, with the token.
    let python = &blocks(&text, "python")[0];
    let script = format!("TOKEN = {token:?}\n{}", here(python));
    let out = Command::new("python3").arg("-c").arg(&script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.starts_with("100 {") && printed.contains("'name': 'ada'"), "{printed}");
}
