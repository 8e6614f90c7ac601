//! One `shoal dev` shared by the tests of a run that only need a platform to make caches in:
//! they create their own caches, read their own keys and check nothing platform-wide (no
//! restart, signal, log line, audit count or global limit). Starting the platform once
//! instead of per test lets such a group be split into small tests at no extra cost.
//!
//! nextest runs each test in its own process, so the platform is shared across processes:
//! the first test of a run (`NEXTEST_RUN_ID`; under `cargo test`, the test process) starts it
//! detached, under a lock, and writes where it listens; the others read that. A watchdog
//! stops it and removes its directory once the process that ran the tests (the test's
//! parent) is gone, keeping its log as `target/tmp/shared-platform[-cluster].log`.

use super::ShoalDev;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Databases per node on the shared platform: room for every shared test's caches.
const DATABASES: &str = "512";

/// The run's shared platform, started by whichever test asks first. Dropping the handle
/// leaves the platform running.
pub async fn shared() -> ShoalDev {
    let run = std::env::var("NEXTEST_RUN_ID").unwrap_or_else(|_| format!("pid{}", std::process::id()));
    let dir = std::env::temp_dir().join(format!("shoal-it-shared-{run}"));
    let _lock = Lock::take(dir.with_extension("lock"));
    let state = dir.join("platform");
    if let Ok(text) = std::fs::read_to_string(&state) {
        return ShoalDev::attach(dir, &text);
    }
    std::fs::create_dir_all(&dir).unwrap();
    // No dedicated node: its share of the host's memory goes to the shared nodes, which
    // hold every shared test's caches (100 MB of storage limit each).
    let mut dev = ShoalDev::unstarted(dir.clone(), &["--databases", DATABASES, "--dedicated-nodes", "0"]);
    dev.detached = true;
    dev.start_on_free_ports().await;
    let pid = dev.pid();
    std::fs::write(&state, dev.describe()).unwrap();
    stop_after_runner(pid, &dir);
    dev.forget_child();
    dev
}

/// Stops `pid` (SIGTERM, then SIGKILL) and removes `dir` once the test runner is gone.
#[allow(clippy::zombie_processes, reason = "the watchdog outlives the test that starts it")]
fn stop_after_runner(pid: i32, dir: &std::path::Path) {
    let runner = std::os::unix::process::parent_id().to_string();
    let lane = if super::in_cluster_lane() { "-cluster" } else { "" };
    let kept = format!("{}/shared-platform{lane}.log", env!("CARGO_TARGET_TMPDIR"));
    Command::new("sh")
        .args([
            "-c",
            "while kill -0 \"$1\" 2>/dev/null; do sleep 1; done; kill \"$2\"; \
             for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 \"$2\" 2>/dev/null || break; sleep 1; done; \
             kill -9 \"$2\" 2>/dev/null; cp \"$3/shoal.log\" \"$4\"; rm -rf \"$3\" \"$3.lock\"",
            "watchdog",
            &runner,
            &pid.to_string(),
            dir.to_str().unwrap(),
            &kept,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("sh runs");
}

/// An exclusive `flock` on a file, released when dropped.
struct Lock(File);

impl Lock {
    fn take(path: PathBuf) -> Lock {
        let file = File::options().create(true).truncate(false).write(true).open(path).unwrap();
        // Blocking: held only while one test starts the platform or reads where it is.
        assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) }, 0, "flock");
        Lock(file)
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}
