//! `mdi bench --cluster`: the MDI-LLM experiment on one machine. A `signaling` server and N
//! `mdi node` processes, each node in its own network namespace behind a veth pair on a bridge,
//! with a CPU quota and (for the memory table) a memory limit of its own cgroup; requests come
//! through the API from S concurrent clients. It prints, for N = 1..max: aggregate tokens per
//! second and the scaling against one node, time to first token, each node's resident memory
//! against its share of the weights, and the hop latency; then the model under a per-node
//! memory limit too small for one node: one node cannot hold it, N nodes serve it.
//!
//! Links: each node's uplink is rate-limited with `tc` (token bucket) and delayed with `netem`
//! where the kernel has it; where it does not (some VM kernels), the delay is applied by the
//! nodes' own links instead (a delay line on every incoming message), and the table says so.
//! Everything it makes — processes, cgroups, namespaces — is removed when it ends, also on
//! Ctrl-C. Needs root (namespaces, cgroup v1 at /sys/fs/cgroup) and the `signaling` binary
//! beside this one.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mdi_core::plan::ModelCost;
use serde_json::Value;

use crate::bench::Row;
use crate::bench_api::{get_ring, stream_one, QUESTIONS};

/// How to run the cluster benchmark.
#[derive(Debug, Clone)]
pub struct ClusterBench {
    pub model: PathBuf,
    pub max_nodes: usize,
    /// CPUs per node (cgroup CPU quota).
    pub cpu: f64,
    /// One-way delay of each node's link, milliseconds.
    pub delay_ms: f64,
    /// Rate of each node's link, Mbit/s.
    pub rate_mbit: u32,
    pub max_tokens: usize,
    /// Per-node memory limit of the memory table, bytes.
    pub memory_limit: u64,
    pub backend: String,
    /// Rounds over N = 1..max; each figure is the best of them.
    pub rounds: usize,
    /// The scaling table's model has `model`'s layers repeated this many times (1: `model`
    /// itself): the work per token of a deeper model, where no larger checkpoint is at hand.
    /// The memory table always uses `model`.
    pub depth: usize,
}

/// A model file made for this run, removed when dropped.
struct TempModel(PathBuf);

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const SUBNET: &str = "10.77.0";

/// CFS bandwidth period and quota (µs) for `cpu` CPUs: the shortest period whose quota is
/// still the kernel's minimum of 1 ms or more. A device of half the speed is steadily slower;
/// a quota in long periods runs it at full speed, then stops it for the rest of the period,
/// and a frame that arrives while it is stopped waits — with 10 ms periods, up to 5 ms a hop.
fn cfs_period_quota(cpu: f64) -> (u64, u64) {
    let cpu = cpu.max(0.01);
    let period = ((1000.0 / cpu.min(1.0)).ceil() as u64).max(2000);
    (period, ((cpu * period as f64) as u64).max(1000))
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Namespaces, links, cgroups and processes of one run; dropping it removes them all.
struct Cluster {
    tag: String,
    nodes: usize,
    children: Vec<Child>,
    cgroups: Vec<PathBuf>,
    netem: bool,
}

impl Cluster {
    fn switch(&self) -> String {
        format!("{}-sw", self.tag)
    }

    /// Where a process of this run writes its log (kept after the run, for a failed one).
    fn log(&self, what: &str) -> PathBuf {
        std::env::temp_dir().join(format!("mdi-cluster-{}-{what}.log", &self.tag[..3]))
    }

    fn node_ns(&self, i: usize) -> String {
        format!("{}-n{i}", self.tag)
    }

    /// The bridge namespace (server, clients) and one namespace per node, each behind a veth
    /// pair whose node end is shaped.
    fn build(tag: String, nodes: usize, delay_ms: f64, rate_mbit: u32) -> Result<Self> {
        let mut c = Cluster {
            tag,
            nodes: 0,
            children: Vec::new(),
            cgroups: Vec::new(),
            netem: false,
        };
        let sw = c.switch();
        sh(&["ip", "netns", "add", &sw])?;
        sh(&["ip", "-n", &sw, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&[
            "ip",
            "-n",
            &sw,
            "addr",
            "add",
            &format!("{SUBNET}.1/24"),
            "dev",
            "br0",
        ])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        // Is netem there? A probe on the bridge namespace's loopback.
        c.netem = sh(&[
            "tc", "-n", &sw, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
        ])
        .is_ok();
        if c.netem {
            let _ = sh(&["tc", "-n", &sw, "qdisc", "del", "dev", "lo", "root"]);
        }
        for i in 1..=nodes {
            let ns = c.node_ns(i);
            sh(&["ip", "netns", "add", &ns])?;
            c.nodes = i;
            let (inside, outside) = (format!("v{i}"), format!("b{i}"));
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            sh(&[
                "ip", "-n", &ns, "link", "add", &inside, "type", "veth", "peer", "name", &outside,
                "netns", &sw,
            ])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{SUBNET}.{}/24", 10 + i),
                "dev",
                &inside,
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", &inside, "up"])?;
            sh(&["ip", "-n", &sw, "link", "set", &outside, "master", "br0"])?;
            sh(&["ip", "-n", &sw, "link", "set", &outside, "up"])?;
            let rate = format!("{rate_mbit}mbit");
            // The node's uplink: delay (netem) and rate; its downlink: rate.
            if c.netem {
                sh(&[
                    "tc",
                    "-n",
                    &ns,
                    "qdisc",
                    "add",
                    "dev",
                    &inside,
                    "root",
                    "netem",
                    "delay",
                    &format!("{delay_ms}ms"),
                    "rate",
                    &rate,
                ])?;
            } else {
                sh(&[
                    "tc", "-n", &ns, "qdisc", "add", "dev", &inside, "root", "tbf", "rate", &rate,
                    "burst", "64kb", "latency", "100ms",
                ])?;
            }
            sh(&[
                "tc", "-n", &sw, "qdisc", "add", "dev", &outside, "root", "tbf", "rate", &rate,
                "burst", "64kb", "latency", "100ms",
            ])?;
        }
        Ok(c)
    }

    /// A cgroup (cpu and memory) for node `i`; returns the shell commands that put a process
    /// into it.
    fn cgroup(&mut self, i: usize, cpu: f64, memory: Option<u64>) -> Result<String> {
        let name = format!("{}-n{i}", self.tag);
        let cpu_dir = Path::new("/sys/fs/cgroup/cpu").join(&name);
        let mem_dir = Path::new("/sys/fs/cgroup/memory").join(&name);
        std::fs::create_dir_all(&cpu_dir).context("making a cpu cgroup (cgroup v1, as root)")?;
        self.cgroups.push(cpu_dir.clone());
        let (period, quota) = cfs_period_quota(cpu);
        std::fs::write(cpu_dir.join("cpu.cfs_period_us"), period.to_string())?;
        std::fs::write(cpu_dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        let mut enter = format!("echo $$ > {}/cgroup.procs", cpu_dir.display());
        if let Some(m) = memory {
            std::fs::create_dir_all(&mem_dir).context("making a memory cgroup")?;
            self.cgroups.push(mem_dir.clone());
            std::fs::write(mem_dir.join("memory.limit_in_bytes"), m.to_string())?;
            enter.push_str(&format!("; echo $$ > {}/cgroup.procs", mem_dir.display()));
        }
        Ok(enter)
    }

    fn spawn_node(
        &mut self,
        i: usize,
        mdi: &Path,
        server: &str,
        args: &[String],
        cpu: f64,
        memory: Option<u64>,
    ) -> Result<()> {
        let enter = self.cgroup(i, cpu, memory)?;
        // Into the cgroups first, then exec: the node never runs outside its limits.
        let script = format!(
            "{enter}; exec ip netns exec {} {} node --server {server} --name edge-{i} --no-cache --threads {} {}",
            self.node_ns(i),
            mdi.display(),
            cpu.ceil().max(1.0),
            args.join(" ")
        );
        let log = std::fs::File::create(self.log(&format!("node-{i}")))?;
        let child = Command::new("sh")
            .args(["-c", &script])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting a node")?;
        self.children.push(child);
        Ok(())
    }

    fn spawn_server(&mut self, signaling: &Path, args: &[String]) -> Result<String> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.switch()])
            .arg(signaling)
            .args(["--bind", &format!("{SUBNET}.1:0")])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.log("signaling"))?)
            .spawn()
            .context("starting signaling")?;
        let out = child.stdout.take().context("server stdout")?;
        self.children.push(child);
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        line.trim()
            .strip_prefix("listening on ")
            .map(str::to_string)
            .with_context(|| format!("unexpected server output `{line}`"))
    }
}

impl Cluster {
    /// The server for a ring of `n` nodes and `in_flight` sequences (with `rebalance`, planned
    /// again from the nodes' measured busy times); returns its URL.
    fn start_server(
        &mut self,
        signaling: &Path,
        model: &str,
        n: usize,
        in_flight: usize,
        rebalance: bool,
    ) -> Result<String> {
        let mut args = vec![
            "--model".to_string(),
            model.into(),
            "--min-nodes".into(),
            n.to_string(),
            "--in-flight".into(),
            in_flight.to_string(),
        ];
        if rebalance {
            args.push("--rebalance".into());
        }
        self.spawn_server(signaling, &args)
    }

    /// `mdi node` arguments: engine, memory budget and, without netem, the links' delay.
    fn node_args(&self, b: &ClusterBench, memory_budget: &str) -> Vec<String> {
        let mut args = vec![
            "--backend".to_string(),
            b.backend.clone(),
            "--memory-budget".into(),
            memory_budget.into(),
        ];
        if !self.netem {
            args.push(format!("--link-delay-ms={}", b.delay_ms));
        }
        args
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        // A node's process may still be exiting: give the cgroup a moment to empty.
        for dir in self.cgroups.drain(..).rev() {
            for _ in 0..50 {
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        for i in (1..=self.nodes).rev() {
            let _ = sh(&["ip", "netns", "del", &self.node_ns(i)]);
        }
        let _ = sh(&["ip", "netns", "del", &self.switch()]);
    }
}

/// Runs `f` on a thread that lives in network namespace `ns` (so its sockets, and those of
/// threads it starts, reach the cluster's addresses).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a file descriptor we own; it moves only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("cannot enter network namespace {ns_}", ns_ = path);
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// Waits until `n` nodes have joined (they join once they have measured themselves) and, with
/// `ready`, until their ring is ready.
fn wait_ready(url: &str, n: usize, ready: bool, stop: &AtomicBool) -> Result<Value> {
    let client = reqwest::blocking::Client::new();
    let start = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if let Ok(r) = get_ring(&client, url) {
            if (!ready || r["ready"] == true) && r["nodes"].as_array().map_or(0, Vec::len) == n {
                return Ok(r);
            }
            if start.elapsed() > Duration::from_secs(300) {
                bail!(
                    "{n} nodes: no ready ring in 300 s: {} (logs: {})",
                    r["status"],
                    std::env::temp_dir().join("mdi-cluster-*.log").display()
                );
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs S = 2N streams until the server stops planning the ring again from its nodes'
/// measured busy times (a self-benchmark of one layer, on a shared machine, can be far
/// off; the LM head costs more per multiply-add than a layer), and returns the ready ring.
fn calibrate(url: &str, n: usize, max_tokens: usize, stop: &AtomicBool) -> Result<Value> {
    let client = reqwest::blocking::Client::new();
    let mut ring = get_ring(&client, url)?;
    for _ in 0..3 {
        let epoch = ring["epoch"].as_u64();
        load(url, 2 * n, max_tokens)?;
        // The server plans again at its next tick once the ring is idle.
        std::thread::sleep(Duration::from_millis(1000));
        let now = get_ring(&client, url)?;
        if now["epoch"].as_u64() == epoch {
            return Ok(now);
        }
        ring = wait_ready(url, n, true, stop)?;
        eprintln!(
            "N={n}: planned again from measured busy times: {}",
            ring["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| format!("{} {}..{}", x["name"], x["layers"][0], x["layers"][1]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(ring)
}

/// Each node's peak (RSS, KV) bytes over a run, by name.
type Peaks = HashMap<String, (u64, u64)>;

/// Runs `f` while polling the ring view: each node's peak RSS and KV bytes.
fn with_peaks<T: Send>(url: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<(T, Peaks)> {
    let done = AtomicBool::new(false);
    let mut peaks = Peaks::new();
    let out = std::thread::scope(|sc| {
        let poller = sc.spawn(|| {
            let client = reqwest::blocking::Client::new();
            while !done.load(Ordering::SeqCst) {
                if let Ok(r) = get_ring(&client, url) {
                    for node in r["nodes"].as_array().into_iter().flatten() {
                        let name = node["name"].as_str().unwrap_or("?").to_string();
                        let e = peaks.entry(name).or_default();
                        e.0 = e.0.max(node["rss_bytes"].as_u64().unwrap_or(0));
                        e.1 = e.1.max(node["kv_bytes"].as_u64().unwrap_or(0));
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let out = f();
        done.store(true, Ordering::SeqCst);
        let _ = poller.join();
        out
    })?;
    Ok((out, peaks))
}

/// What a node's engine did over a run, from the counters its heartbeats carry.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Work {
    /// Share of the run's wall time spent in steps.
    busy: f64,
    /// Steps run, and the jobs (one sequence's input each) they carried.
    steps: f64,
    jobs: f64,
    /// Each step's seconds times its jobs: the time sequences spent in this node's steps.
    job_busy_s: f64,
}

/// Each node's [`Work`] over a run, by name.
type WorkByNode = HashMap<String, Work>;

/// The counters of every node (cumulative over the epoch): busy seconds in `busy`.
fn counters(ring: &Value) -> WorkByNode {
    ring["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            let work = Work {
                busy: n["busy_s"].as_f64()?,
                steps: n["steps"].as_f64()?,
                jobs: n["jobs"].as_f64()?,
                job_busy_s: n["job_busy_s"].as_f64()?,
            };
            Some((n["name"].as_str()?.to_string(), work))
        })
        .collect()
}

/// [`load`], and what each node's engine did over it: the counters the nodes report in their
/// heartbeats (every half second; one after the run has the final figures), the busy seconds
/// over the run's wall time.
fn load_busy(url: &str, s: usize, max_tokens: usize) -> Result<((f64, f64, u64), WorkByNode)> {
    let client = reqwest::blocking::Client::new();
    let before = counters(&get_ring(&client, url)?);
    let t0 = Instant::now();
    let run = load(url, s, max_tokens)?;
    let wall = t0.elapsed().as_secs_f64().max(1e-9);
    std::thread::sleep(Duration::from_millis(1200));
    let after = counters(&get_ring(&client, url)?);
    let busy = after
        .into_iter()
        .filter_map(|(name, a)| {
            let b = before.get(&name)?;
            let d = Work {
                busy: ((a.busy - b.busy) / wall).min(1.0),
                steps: a.steps - b.steps,
                jobs: a.jobs - b.jobs,
                job_busy_s: a.job_busy_s - b.job_busy_s,
            };
            // A node whose epoch changed during the run started counting again: no figure.
            (d.busy >= 0.0 && d.steps >= 0.0 && d.jobs >= 0.0 && d.job_busy_s >= 0.0)
                .then_some((name, d))
        })
        .collect();
    Ok((run, busy))
}

/// One ring size's figures, the best over the rounds.
#[derive(Clone)]
struct Measured {
    /// What the nodes are (the table's "on" column).
    on: String,
    /// The ring view after the round best at S = N.
    ring: Value,
    /// (tok/s, TTFT p50 ms, tokens) at S = N and S = 2N.
    runs: [(f64, f64, u64); 2],
    /// Peak RSS and KV per node over the round best at S = N.
    peaks: Peaks,
    /// How busy each node was in the best run of each S.
    busy: [WorkByNode; 2],
}

/// How a memory-capped ring ended: the server's status, and (served) tok/s and each node's RSS.
type Outcome = (String, Option<(f64, Vec<u64>)>);

/// S concurrent streams: (aggregate tok/s, TTFT p50 ms).
fn load(url: &str, s: usize, max_tokens: usize) -> Result<(f64, f64, u64)> {
    let t0 = Instant::now();
    let results: Vec<Result<(Duration, u64, Instant)>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..s)
            .map(|i| sc.spawn(move || stream_one(url, QUESTIONS[i % QUESTIONS.len()], max_tokens)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("a client panicked")))
            .collect()
    });
    let results: Vec<_> = results.into_iter().collect::<Result<_>>()?;
    let end = results.iter().map(|r| r.2).max().unwrap_or(t0);
    let tokens: u64 = results.iter().map(|r| r.1).sum();
    let mut ttft: Vec<f64> = results.iter().map(|r| r.0.as_secs_f64() * 1e3).collect();
    ttft.sort_by(f64::total_cmp);
    Ok((
        tokens as f64 / end.duration_since(t0).as_secs_f64().max(1e-9),
        ttft[ttft.len() / 2],
        tokens,
    ))
}

/// A token's trip around a ring with `s` sequences in flight at `tok_s` aggregate tokens per
/// second, split by what the nodes measured.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Trip {
    /// One sequence's time per token: s ÷ tok_s.
    total_ms: f64,
    /// The stages' steps: at each node, the time its sequences spent inside its steps (each
    /// step's time × the jobs it carried, summed) over the tokens that went through.
    compute_ms: f64,
    /// The hops' one-way latency, as the nodes' pings measured it.
    hops_ms: f64,
    /// The rest: waiting in queues (a stage's batch filling up, a busy stage), and for
    /// processes stopped by their CPU quota.
    waiting_ms: f64,
    /// Sequences a step of the secondaries carried on average (none in a ring of one).
    batch: Option<f64>,
}

impl Trip {
    /// The split as a table cell. The steps are measured; the hops are pings taken apart
    /// from the tokens, so where they came out longer than the tokens' own hops the rest
    /// falls below zero, which is said instead of printed as a negative wait.
    fn describe(&self) -> String {
        // (Rounding can leave a trip with no waiting a hair below zero.)
        let rest = if self.waiting_ms > -0.05 {
            format!("waiting {:.1}", self.waiting_ms.max(0.0))
        } else {
            format!(
                "no waiting (the pings over-count the hops by {:.1} ms)",
                -self.waiting_ms
            )
        };
        let batch = self
            .batch
            .map_or(String::new(), |b| format!("; {b:.2} sequences a step"));
        format!(
            "{:.1} ms = steps {:.1} + hops {:.1} + {rest}{batch}",
            self.total_ms, self.compute_ms, self.hops_ms
        )
    }
}

/// The trip of `s` sequences at `tok_s` that made `tokens` tokens, from each node's [`Work`]
/// (and whether it is the starter) and each hop's one-way latency.
fn trip(s: usize, tok_s: f64, tokens: u64, work: &[(Work, bool)], hops_ms: &[f64]) -> Trip {
    let tok_s = tok_s.max(1e-9);
    let tokens = tokens.max(1) as f64;
    let total_ms = s as f64 / tok_s * 1e3;
    let compute_ms = work.iter().fold(0.0, |a, (w, _)| a + w.job_busy_s) / tokens * 1e3;
    let hops_ms = hops_ms.iter().fold(0.0, |a, h| a + h);
    // The starter's steps hold heads and layers of different tokens: its jobs are not
    // sequences a step. The secondaries' are.
    let (jobs, steps) = work
        .iter()
        .filter(|(_, starter)| !starter)
        .fold((0.0, 0.0), |(j, s), (w, _)| (j + w.jobs, s + w.steps));
    Trip {
        total_ms,
        compute_ms,
        hops_ms,
        waiting_ms: total_ms - compute_ms - hops_ms,
        batch: (steps > 0.0).then(|| jobs / steps),
    }
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// The benchmark; returns the scaling table and the memory table.
pub fn run(b: &ClusterBench, stop: Arc<AtomicBool>) -> Result<(Vec<Row>, Vec<Row>)> {
    let signaling = std::env::current_exe()?.with_file_name("signaling");
    if !signaling.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p signaling`",
            signaling.display()
        );
    }
    let mdi = std::env::current_exe()?;
    let _deeper;
    let scaled = if b.depth > 1 {
        let path = std::env::temp_dir().join(format!(
            "mdi-bench-{}-layers-x{}.gguf",
            std::process::id(),
            b.depth
        ));
        _deeper = TempModel(path.clone());
        crate::files::write_repeated_layers(&b.model, b.depth, &path)?;
        path
    } else {
        b.model.clone()
    };
    let (model, original) = (scaled.display().to_string(), b.model.display().to_string());
    // The planner's own costs: multiply-adds per token of each layer and of the head.
    let opened = crate::open_model(&scaled)?;
    let cost = ModelCost::from_store(opened.store.as_ref(), &opened.config)?;
    drop(opened);
    let mut scaling = Vec::new();
    let mut base: [Option<f64>; 2] = [None, None];
    // Each round measures every N once; a configuration keeps its best figures over the
    // rounds. A shared machine's speed drifts over minutes, so N = 1 and N = 4 measured
    // minutes apart once can compare different machines; rounds interleave them.
    let mut best: Vec<Option<Measured>> = vec![None; b.max_nodes + 1];
    for _round in 0..b.rounds.max(1) {
        for (n, kept) in best.iter_mut().enumerate().skip(1) {
            if stop.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            let tag = format!("mdi{}", std::process::id() % 100_000);
            let mut c = Cluster::build(tag, n, b.delay_ms, b.rate_mbit)?;
            let delay_note = if c.netem {
                format!("netem {} ms, {} Mbit/s", b.delay_ms, b.rate_mbit)
            } else {
                format!(
                    "{} ms in the nodes' links (no netem here), tbf {} Mbit/s",
                    b.delay_ms, b.rate_mbit
                )
            };
            let url = c.start_server(&signaling, &model, n, 2 * n, true)?;
            let node_args = c.node_args(b, "4G");
            for i in 1..=n {
                c.spawn_node(i, &mdi, &url, &node_args, b.cpu, None)?;
                // One at a time: a node joins once it has timed itself, and nodes timing
                // themselves together on these shared cores measured each other, which gave
                // equal devices speeds up to 3× apart and lopsided plans.
                let (sw, u, st) = (c.switch(), url.clone(), stop.clone());
                in_netns(&sw, move || wait_ready(&u, i, false, &st))?;
            }
            let (sw, u, t, st) = (c.switch(), url.clone(), b.max_tokens, stop.clone());
            let (ring, runs, peaks, busy) = in_netns(&sw, move || {
                let mut ring0 = wait_ready(&u, n, true, &st)?;
                stream_one(&u, "Hello.", 4)?; // warm-up
                if n > 1 {
                    ring0 = calibrate(&u, n, t, &st)?;
                }
                // `load_busy` waits for a heartbeat after each run: the ring view below has
                // the final figures.
                let ((one, two), peaks) =
                    with_peaks(&u, || Ok((load_busy(&u, n, t)?, load_busy(&u, 2 * n, t)?)))?;
                let client = reqwest::blocking::Client::new();
                let ring = get_ring(&client, &u).unwrap_or(ring0);
                Ok((ring, [one.0, two.0], peaks, [one.1, two.1]))
            })?;
            let on = format!("{n} × ({} CPU, {delay_note})", b.cpu);
            drop(c);
            match kept {
                Some(m) => {
                    // The best run of each S; the ring and memory of the round best at S = N.
                    let [busy_one, busy_two] = busy;
                    if runs[0].0 > m.runs[0].0 {
                        (m.ring, m.peaks) = (ring, peaks);
                        m.runs[0] = runs[0];
                        m.busy[0] = busy_one;
                    }
                    if runs[1].0 > m.runs[1].0 {
                        m.runs[1] = runs[1];
                        m.busy[1] = busy_two;
                    }
                }
                slot => {
                    *slot = Some(Measured {
                        on,
                        ring,
                        runs,
                        peaks,
                        busy,
                    })
                }
            }
        }
    }
    for (n, m) in best.into_iter().enumerate() {
        let Some(Measured {
            on,
            ring,
            runs,
            peaks,
            busy,
        }) = m
        else {
            continue;
        };
        for (k, (tok_s, ttft, tokens)) in runs.iter().enumerate() {
            let s = n * (k + 1);
            let b0 = *base[k].get_or_insert(*tok_s);
            let scale = tok_s / b0;
            scaling.push(Row {
                what: format!("N={n}, S={s}: aggregate tok/s (TTFT p50)"),
                on: on.clone(),
                value: format!("{tok_s:.1} tok/s ({ttft:.0} ms; {tokens} tokens)"),
                bound: if n == 1 {
                    "reference".into()
                } else {
                    let target = format!("scaling {scale:.2}× ≥ 0.9·N = {:.1}×", 0.9 * n as f64);
                    // Each stage runs its share, S / N = k + 1 sequences, as one batch, and a
                    // batch's token crosses N links in turn: N batches make S tokens per (one
                    // node's time for a step of that batch + N delays) at best, however fast
                    // the hops are otherwise. One node's step of k + 1 sequences takes
                    // (k + 1) / its tok/s at S = k + 1.
                    let (t, d) = ((k + 1) as f64 / b0, b.delay_ms / 1e3);
                    let allows = n as f64 * t / (t + n as f64 * d);
                    let batches = if k == 0 {
                        String::new()
                    } else {
                        format!("in batches of {}, ", k + 1)
                    };
                    format!("{target} ({batches}the links' delay alone allows ≤ {allows:.2}×)")
                },
                ok: (n > 1).then_some(scale >= 0.9 * n as f64),
            });
        }
        let nodes = ring["nodes"].as_array().cloned().unwrap_or_default();
        // The most this plan can scale on equal devices: one node's work per token over the
        // work of the busiest stage (the starter's includes the LM head).
        let head_work = cost.starter_work;
        // (work, name, layers) of the busiest stage.
        let busiest = nodes
            .iter()
            .map(|node| {
                let at = |i: usize| node["layers"][i].as_u64().unwrap_or(0) as usize;
                let layers = cost.layer_work.get(at(0)..at(1)).unwrap_or(&[]);
                let starter = node["role"] == "starter";
                let head = if starter { head_work } else { 0.0 };
                let name = node["name"].as_str().unwrap_or("?");
                let what = if starter {
                    format!("{name}: layers {}..{} + the LM head", at(0), at(1))
                } else {
                    format!("{name}: layers {}..{}", at(0), at(1))
                };
                (layers.iter().sum::<f64>() + head, what, starter)
            })
            .fold(
                (0.0, String::new(), false),
                |a, b| if b.0 > a.0 { b } else { a },
            );
        if n > 1 && busiest.0 > 0.0 {
            let whole = cost.layer_work.iter().sum::<f64>() + head_work;
            let head_part = if busiest.2 {
                format!("the head {:.0}% of it", 100.0 * head_work / busiest.0)
            } else {
                format!(
                    "the starter's head is {:.0}% of one node's",
                    100.0 * head_work / whole
                )
            };
            scaling.push(Row {
                what: format!("N={n}: the plan's bound on scaling (equal devices)"),
                on: on.clone(),
                value: format!("{:.2}×", whole / busiest.0),
                bound: format!(
                    "one node's work ÷ the busiest stage's ({}; {head_part})",
                    busiest.1
                ),
                ok: None,
            });
        }
        // Names in ring order (with whether it is the starter), and each hop's one-way
        // latency where its node measured one.
        let mut names = Vec::new();
        let mut hops_ms = Vec::new();
        for node in nodes {
            // Peaks over the run (the heartbeats report every half second): the KV cache
            // is freed when the streams end, the memory it took is not all returned.
            let name = node["name"].as_str().unwrap_or("?");
            names.push((name.to_string(), node["role"] == "starter"));
            let (peak_rss, peak_kv) = peaks.get(name).copied().unwrap_or_default();
            let rss = peak_rss.max(node["rss_bytes"].as_u64().unwrap_or(0));
            let share = node["planned_weight_bytes"].as_u64().unwrap_or(0);
            let kv = peak_kv.max(node["kv_bytes"].as_u64().unwrap_or(0));
            let bound = share + kv + 40_000_000;
            let rtt = node["rtt_ms"].as_f64();
            hops_ms.extend(rtt.map(|r| r / 2.0));
            let busy = busy.each_ref().map(|b| {
                b.get(name)
                    .map_or("–".to_string(), |w| format!("{:.0}%", 100.0 * w.busy))
            });
            scaling.push(Row {
                what: format!(
                    "N={n}: {} layers {}..{}: peak RSS (hop latency; speed; busy at S=N, 2N)",
                    node["name"].as_str().unwrap_or("?"),
                    node["layers"][0],
                    node["layers"][1]
                ),
                on: on.clone(),
                value: format!(
                    "{} ({}; {:.1} GMAC/s; {}, {})",
                    mb(rss),
                    rtt.map_or("–".into(), |r| format!("{:.1} ms", r / 2.0)),
                    node["speed_gmacs"].as_f64().unwrap_or(0.0),
                    busy[0],
                    busy[1]
                ),
                bound: format!("≤ share {} + peak KV {} + 40 MB", mb(share), mb(kv)),
                ok: Some(rss > 0 && rss <= bound),
            });
        }
        // Where a token's time around the ring goes, from the figures above: the scaling
        // rows say how far from the target a ring is, this says what the rest of the trip is.
        let every_hop = n > 1 && hops_ms.len() == n;
        for (k, (tok_s, _, tokens)) in runs.iter().enumerate().filter(|_| every_hop) {
            let s = n * (k + 1);
            let work: Vec<(Work, bool)> = names
                .iter()
                .filter_map(|(name, starter)| Some((*busy[k].get(name)?, *starter)))
                .collect();
            if work.len() != n || work.iter().all(|(w, _)| w.jobs == 0.0) {
                continue;
            }
            let t = trip(s, *tok_s, *tokens, &work, &hops_ms);
            scaling.push(Row {
                what: format!("N={n}, S={s}: a token's trip around the ring"),
                on: on.clone(),
                value: t.describe(),
                bound: format!(
                    "S ÷ aggregate tok/s = the time a token spent in the stages' steps (each \
                     step's time × its sequences, over the tokens) + the hops' measured latency \
                     ({:.1} ms of it the links' delay) + the rest: queues and stopped processes",
                    n as f64 * b.delay_ms
                ),
                ok: None,
            });
        }
    }

    // The memory table: a limit per node below the whole model's needs.
    let mut memory = Vec::new();
    let limit = b.memory_limit;
    let budget = limit.saturating_sub(40 << 20);
    for n in 1..=b.max_nodes.min(3) {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let tag = format!("mdm{}", std::process::id() % 100_000);
        let mut c = Cluster::build(tag, n, b.delay_ms, b.rate_mbit)?;
        let url = c.start_server(&signaling, &original, n, 2, false)?;
        let node_args = c.node_args(b, &budget.to_string());
        for i in 1..=n {
            c.spawn_node(i, &mdi, &url, &node_args, b.cpu, Some(limit))?;
        }
        let (sw, u, t, st) = (c.switch(), url.clone(), b.max_tokens, stop.clone());
        let outcome = in_netns(&sw, move || -> Result<Outcome> {
            let client = reqwest::blocking::Client::new();
            let start = Instant::now();
            loop {
                if st.load(Ordering::SeqCst) {
                    bail!("interrupted");
                }
                if let Ok(r) = get_ring(&client, &u) {
                    let joined = r["nodes"].as_array().map_or(0, Vec::len);
                    if r["ready"] == true && joined == n {
                        let (tok_s, _, _) = load(&u, 2, t)?;
                        std::thread::sleep(Duration::from_millis(1500));
                        let r = get_ring(&client, &u)?;
                        let rss = r["nodes"]
                            .as_array()
                            .map(|ns| {
                                ns.iter()
                                    .map(|x| x["rss_bytes"].as_u64().unwrap_or(0))
                                    .collect()
                            })
                            .unwrap_or_default();
                        return Ok(("served".into(), Some((tok_s, rss))));
                    }
                    let status = r["status"].as_str().unwrap_or("").to_string();
                    if joined == n && status.contains("cannot hold") {
                        return Ok((status, None));
                    }
                    if start.elapsed() > Duration::from_secs(240) {
                        return Ok((format!("no ring after 240 s: {status}"), None));
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })?;
        let on = format!("{n} × ({} CPU, memory limit {})", b.cpu, mb(limit));
        match outcome {
            (_, Some((tok_s, rss))) => memory.push(Row {
                what: format!(
                    "N={n}: the model served, RSS per node {}",
                    rss.iter().map(|r| mb(*r)).collect::<Vec<_>>().join(", ")
                ),
                on,
                value: format!("{tok_s:.1} tok/s"),
                bound: format!("every node ≤ its limit {}", mb(limit)),
                ok: Some(rss.iter().all(|r| *r > 0 && *r <= limit)),
            }),
            (status, None) => memory.push(Row {
                what: format!("N={n}: the model cannot be loaded"),
                on,
                value: status.chars().take(120).collect(),
                bound: "a clear error, nothing served".into(),
                ok: Some(n == 1),
            }),
        }
        drop(c);
    }
    Ok((scaling, memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trip_splits_into_steps_hops_and_waiting() {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let work = |steps: f64, jobs: f64, job_busy_s: f64| Work {
            busy: 0.9,
            steps,
            jobs,
            job_busy_s,
        };
        // Two stages, one sequence each, 10 tok/s for 100 tokens: the secondary's 100 steps
        // of one job took 90 ms each, the starter's 200 (a head, then the next token's
        // layers) 45 ms each. A token spends 2 × 90 ms in steps and 2 × 10 ms in hops of its
        // 200 ms: no waiting.
        let one_each = [
            (work(200.0, 200.0, 9.0), true),
            (work(100.0, 100.0, 9.0), false),
        ];
        let t = trip(2, 10.0, 100, &one_each, &[10.0, 10.0]);
        assert!(
            close(t.total_ms, 200.0) && close(t.compute_ms, 180.0),
            "{t:?}"
        );
        assert!(close(t.hops_ms, 20.0) && close(t.waiting_ms, 0.0), "{t:?}");
        assert_eq!(
            t.describe(),
            "200.0 ms = steps 180.0 + hops 20.0 + waiting 0.0; 1.00 sequences a step"
        );
        // Batches of two (S = 2N) at twice the rate: 100 steps of two jobs, 90 ms each, make
        // 200 tokens; each token still sits 90 ms in each stage's step.
        let ring = [
            (work(200.0, 400.0, 18.0), true),
            (work(100.0, 200.0, 18.0), false),
        ];
        let t = trip(4, 20.0, 200, &ring, &[10.0, 10.0]);
        assert!(
            close(t.compute_ms, 180.0) && close(t.waiting_ms, 0.0),
            "{t:?}"
        );
        assert_eq!(t.batch, Some(2.0));
        // The batches did not form: 200 steps of one job, 50 ms each. The steps are what
        // they were, and the trip's other 80 ms went to waiting.
        let ring = [
            (work(400.0, 400.0, 10.0), true),
            (work(200.0, 200.0, 10.0), false),
        ];
        let t = trip(4, 20.0, 200, &ring, &[10.0, 10.0]);
        assert!(
            close(t.compute_ms, 100.0) && close(t.waiting_ms, 80.0),
            "{t:?}"
        );
        assert_eq!(t.batch, Some(1.0));
        // Pings slower than the tokens' own hops: the cell says so instead of a negative wait.
        let t = trip(2, 10.0, 100, &one_each, &[60.0, 60.0]);
        assert!(close(t.waiting_ms, -100.0), "{t:?}");
        assert!(
            t.describe()
                .contains("no waiting (the pings over-count the hops by 100.0 ms)"),
            "{}",
            t.describe()
        );
        // A ring of one has no hops, and no secondaries to count sequences a step on.
        let t = trip(1, 10.0, 100, &[(work(200.0, 200.0, 9.0), true)], &[]);
        assert_eq!(t.batch, None);
        assert_eq!(
            t.describe(),
            "100.0 ms = steps 90.0 + hops 0.0 + waiting 10.0"
        );
    }

    #[test]
    fn cpu_quotas_use_short_periods_within_the_kernels_limits() {
        for (cpu, want) in [
            (0.5, (2000, 1000)),
            (0.25, (4000, 1000)),
            (1.0, (2000, 2000)),
            (2.0, (2000, 4000)),
        ] {
            assert_eq!(cfs_period_quota(cpu), want, "{cpu} CPU");
        }
        // Tiny quotas: the period grows so the quota stays at the 1 ms minimum (and the
        // period under the kernel's 1 s maximum).
        let (p, q) = cfs_period_quota(0.0);
        assert_eq!((p, q), (100_000, 1000));
        for cpu in [0.01, 0.1, 0.3, 0.7, 1.5, 3.0] {
            let (p, q) = cfs_period_quota(cpu);
            assert!(
                (1000..=1_000_000).contains(&p) && q >= 1000,
                "{cpu}: {p} {q}"
            );
            assert!(
                (q as f64 / p as f64 - cpu).abs() < 0.01 * cpu.max(1.0),
                "{cpu}: {p} {q}"
            );
        }
    }
}
