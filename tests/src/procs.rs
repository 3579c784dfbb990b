//! Helpers for tests that run real processes: a private network namespace, the `signaling`
//! server and `mdi node` processes, and small HTTP calls against them.
//!
//! Network tests stay on loopback inside a namespace the test makes: [`isolated`] re-runs the
//! calling test in a child process under `unshare -n` (as root) or `unshare -rn` (otherwise),
//! brings `lo` up there, and reports the child's result. Every process the test starts
//! inherits the namespace, so nothing but 127.0.0.1 can be reached.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const INSIDE: &str = "MDI_TEST_IN_NETNS";

/// Runs the rest of test `name` (its full path, as libtest names it) inside a fresh network
/// namespace. Returns `true` in the child, where the test body should run; in the parent it
/// waits for the child and panics if it failed, then returns `false`.
pub fn isolated(name: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        assert!(
            up.is_ok_and(|s| s.success()),
            "cannot bring up lo in the test's network namespace (is iproute2 installed?)"
        );
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let mut cmd = Command::new("unshare");
    cmd.arg(if root { "-n" } else { "-rn" })
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1");
    let status = cmd
        .status()
        .expect("cannot run `unshare` (util-linux) to make a network namespace");
    assert!(
        status.success(),
        "{name} failed inside its network namespace"
    );
    false
}

/// The directory of this build's binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("the test binary lives in target/<profile>/deps")
}

/// A binary of this workspace, built by `cargo test --workspace` (or `cargo build`).
pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build it with `cargo build --release -p {}`",
        p.display(),
        if name == "mdi" { "mdi" } else { name }
    );
    p
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
    /// A directory of the process's own, removed with it.
    pub dir: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Proc {
    /// Sends SIGTERM and waits up to `timeout` for a clean exit; returns whether it exited 0.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// A running `signaling` server.
pub struct Server {
    pub proc: Proc,
    pub url: String,
}

/// Starts `signaling` on a free loopback port with `args`, waiting for its `listening on` line.
pub fn start_server(signaling: &Path, args: &[&str]) -> Result<Server> {
    let mut child = Command::new(signaling)
        .args(["--bind", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", signaling.display()))?;
    let stdout = child.stdout.take().context("the server's stdout")?;
    let proc = Proc {
        child,
        name: "signaling".into(),
        dir: None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first);
        }
        // Anything more on stdout would break the one-line promise; the test checks it.
        for line in lines.map_while(Result::ok) {
            eprintln!("signaling stdout (unexpected): {line}");
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .context("the server printed no `listening on` line")?;
    let url = line
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected first line `{line}`"))?
        .to_string();
    Ok(Server { proc, url })
}

/// Starts `mdi node` joining `server`. Unless `extra` says otherwise, the node keeps its
/// downloads in an empty cache directory of its own (removed with it), so what it downloads
/// does not depend on earlier runs or on the other nodes.
pub fn start_node(mdi: &Path, server: &str, name: &str, extra: &[&str]) -> Result<Proc> {
    let mut cmd = Command::new(mdi);
    cmd.args(["node", "--server", server, "--name", name])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut dir = None;
    if !extra
        .iter()
        .any(|a| *a == "--cache-dir" || *a == "--no-cache")
    {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("mdi-test-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        cmd.arg("--cache-dir").arg(&d);
        dir = Some(d);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {} node", mdi.display()))?;
    Ok(Proc {
        child,
        name: name.to_string(),
        dir,
    })
}

/// A blocking HTTP client for tests.
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("an HTTP client")
}

/// `/api/ring` of the default room.
pub fn ring(url: &str) -> Result<serde_json::Value> {
    Ok(http()
        .get(format!("{url}/api/ring"))
        .send()?
        .error_for_status()?
        .json()?)
}

/// Waits until `/api/ring` says ready with `n` nodes.
pub fn wait_ready(url: &str, n: usize, timeout: Duration) -> Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        if let Ok(r) = ring(url) {
            let count = r["nodes"].as_array().map_or(0, Vec::len);
            if r["ready"] == true && count == n {
                return Ok(r);
            }
            if start.elapsed() > timeout {
                bail!("the ring was not ready after {timeout:?}: {r}");
            }
        } else if start.elapsed() > timeout {
            bail!("the server did not answer /api/ring within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `check` holds for `/api/ring`.
pub fn wait_ring(
    url: &str,
    timeout: Duration,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let start = Instant::now();
    loop {
        let r = ring(url)?;
        if check(&r) {
            return Ok(r);
        }
        if start.elapsed() > timeout {
            bail!("{what}: not after {timeout:?}: {r}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The content of each `data:` line of a server-sent event stream, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim_start().to_string())
        .collect()
}
