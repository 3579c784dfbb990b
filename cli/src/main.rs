//! `mdi`: generate and chat on one machine, join a ring as a node, fetch the default model,
//! benchmark. Answers go to stdout; notes and diagnostics to stderr (`-v`, `RUST_LOG`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::sync::Arc;

use mdi::generate::{generate, Generation, Request};
use mdi::ring::{RingOptions, TransportKind};
use mdi_core::starter::{Finish, SeqRequest};
use mdi_core::wire::WireDtype;
use mdi_core::{Oracle, SamplingParams, StageSpec, StageWeights};
use mdi_core::{StageEngine, Tokenizer};
use mdi_gpu::{GpuContext, GpuEngine};

#[derive(Parser)]
#[command(
    name = "mdi",
    version,
    about = "Run a language model split across a ring of devices",
    after_help = "Examples:\n  mdi generate --chat \"What is the capital of France?\"\n  mdi chat\n  mdi node --server http://192.168.1.20:8080\n  mdi completions bash > ~/.local/share/bash-completion/completions/mdi"
)]
struct Cli {
    /// More diagnostics on stderr (-v: progress details, -vv: debugging); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt or a chat message.
    #[command(
        after_help = "Examples:\n  mdi generate --chat \"What is the capital of France?\"\n  mdi generate --prompt \"Once upon a time\" --max-tokens 64 --temperature 0.8 --seed 7\n  mdi generate --nodes 3 --prompts prompts.jsonl --json"
    )]
    Generate(GenerateArgs),
    /// Chat in the terminal: several turns, answers streamed; Ctrl-C stops an answer.
    #[command(
        after_help = "Examples:\n  mdi chat\n  mdi chat --system \"Answer in one sentence.\" --backend cpu\n  mdi chat --server http://127.0.0.1:8080"
    )]
    Chat(ChatArgs),
    /// Download the default model (SmolLM2-135M-Instruct, Q4_1) into the cache and print its path.
    #[command(after_help = "Examples:\n  mdi fetch\n  MDI_CACHE_DIR=/data/models mdi fetch")]
    Fetch,
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  mdi completions bash > ~/.local/share/bash-completion/completions/mdi\n  mdi completions zsh > ~/.zfunc/_mdi"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Benchmarks that print tables: the GPU engine against the adapter's own bounds, and the
    /// ring against one node.
    #[command(
        after_help = "Examples:\n  mdi bench\n  mdi bench --skip-gpu --skip-cpu --nodes 4 --sequences 8\n  mdi bench --skip-gpu --skip-cpu --skip-ring --api 4 --api-backend cpu\n  sudo mdi bench --skip-gpu --skip-cpu --skip-ring --cluster 4\n  mdi bench --skip-gpu --skip-cpu --skip-ring --recovery 5"
    )]
    Bench(BenchArgs),
    /// Join a ring as a node: download only the assigned layers from the server, link to the
    /// neighbours over WebRTC, and serve until stopped (Ctrl-C leaves the room cleanly).
    #[command(
        after_help = "Examples:\n  mdi node --server http://127.0.0.1:8080\n  mdi node --server http://192.168.1.20:8080 --name laptop --memory-budget 2G --backend cpu"
    )]
    Node(NodeArgs),
}

#[derive(Args)]
struct ChatArgs {
    /// A GGUF file or a Hugging Face checkpoint folder [default: the cached default model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Chat through a running ring's API instead of a local engine, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: Option<String>,
    /// The API's token, with --server.
    #[arg(long)]
    token: Option<String>,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// 0 picks the most likely token every step (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    backend: Backend,
}

#[derive(Args)]
struct NodeArgs {
    /// The signaling server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    server: String,
    /// Trust an https server by its certificate's SHA-256 fingerprint (what `signaling --tls`
    /// prints), instead of by a certificate authority.
    #[arg(long)]
    fingerprint: Option<String>,
    /// How the ring map and /api/ring call this device [default: host name + a short id].
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "default")]
    room: String,
    /// The room's token, if the server has one.
    #[arg(long)]
    token: Option<String>,
    /// Bytes this node may spend on weights and KV caches, e.g. 512M or 2G
    /// [default: half the available memory, at most 4G].
    #[arg(long)]
    memory_budget: Option<String>,
    /// auto: a hardware GPU if there is one, else the CPU.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Threads of the CPU engine [default: one per core this process may use].
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Keep downloaded layers here, so a re-formed ring (or a restart) reads the ranges this
    /// machine already has from disk [default: pieces/ in the model cache directory].
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Keep no downloaded layers on disk.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
    /// Disk space the kept layers may take, e.g. 500M or 8G; the least recently used go first.
    #[arg(long, default_value = "4G", conflicts_with = "no_cache")]
    cache_max: String,
    /// Emulate a slower network: hold every incoming message this long (benchmarks).
    #[arg(long, default_value_t = 0.0, hide = true)]
    link_delay_ms: f64,
}

#[derive(Args)]
struct BenchArgs {
    /// A GGUF file or a Hugging Face checkpoint folder [default: the cached default model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Nodes of the ring benchmark.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Sequences in flight in the ring benchmark.
    #[arg(long, default_value_t = 6)]
    sequences: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 24)]
    max_tokens: usize,
    /// Leave out the GPU engine benchmark.
    #[arg(long)]
    skip_gpu: bool,
    /// Leave out the CPU engine benchmark (against llama.cpp when llama-cpp-python is
    /// installed, and the memory-bandwidth bound).
    #[arg(long)]
    skip_cpu: bool,
    /// Leave out the ring benchmark.
    #[arg(long)]
    skip_ring: bool,
    /// Also run the API benchmark: a signaling server and 1..=N `mdi node` processes, N
    /// concurrent streaming clients each (needs the `signaling` binary beside this one).
    #[arg(long, value_name = "N")]
    api: Option<usize>,
    /// Engine of the API benchmark's nodes.
    #[arg(long, default_value = "auto")]
    api_backend: String,
    /// Memory budget of each API benchmark node.
    #[arg(long, default_value = "2G")]
    api_memory: String,
    /// Also run the emulated edge cluster (as root): 1..=N `mdi node` processes, each in its
    /// own network namespace and cgroup, with shaped links, and S = N and 2N clients, each
    /// generating --max-tokens but at least 128 (steady decoding, not mostly prefill).
    #[arg(long, value_name = "N")]
    cluster: Option<usize>,
    /// CPUs per cluster node (a cgroup CPU quota).
    #[arg(long, default_value_t = 0.5)]
    cluster_cpu: f64,
    /// One-way delay of each cluster node's link, milliseconds.
    #[arg(long, default_value_t = 2.0)]
    cluster_delay_ms: f64,
    /// Rate of each cluster node's link, Mbit/s.
    #[arg(long, default_value_t = 100)]
    cluster_rate_mbit: u32,
    /// Memory limit of each node in the memory-capped table (a cgroup limit): below what one
    /// node holding the whole model needs (the default suits the default model).
    #[arg(long, default_value = "112M")]
    cluster_memory: String,
    /// Engine of the cluster's nodes.
    #[arg(long, default_value = "cpu")]
    cluster_backend: String,
    /// Rounds over N = 1..=N in the cluster benchmark; each figure is the best of them (a
    /// shared machine's speed drifts between minutes).
    #[arg(long, default_value_t = 2)]
    cluster_rounds: usize,
    /// The scaling table on a deeper model: the model's layers repeated this many times (the
    /// work per token of a larger model of the same widths; its text means nothing). The
    /// memory table keeps the model as it is.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    cluster_depth: u16,
    /// Also measure recovery: a server and 3 `mdi node` processes serve 4 streaming clients,
    /// and mid-answer a secondary node is SIGKILLed R times, then the starter R times.
    #[arg(long, value_name = "R")]
    recovery: Option<usize>,
    /// Engine of the recovery benchmark's nodes.
    #[arg(long, default_value = "cpu")]
    recovery_backend: String,
}

#[derive(Clone, Copy, PartialEq, ValueEnum)]
enum Backend {
    /// A hardware GPU when wgpu finds one, else the CPU engine (a software GPU adapter such as
    /// lavapipe is slower than the CPU engine on the same cores).
    Auto,
    /// WGSL kernels through wgpu; weights stay quantized in GPU memory.
    Gpu,
    /// The CPU engine: weights stay quantized, SIMD kernels, all cores.
    Cpu,
    /// The plain f32 CPU oracle: the reference every engine is tested against.
    Oracle,
}

/// The engine a command runs on.
enum Chosen {
    Gpu(Arc<GpuContext>),
    Cpu,
    Oracle,
}

fn choose(backend: Backend) -> Result<Chosen> {
    match backend {
        Backend::Cpu => Ok(Chosen::Cpu),
        Backend::Oracle => Ok(Chosen::Oracle),
        Backend::Gpu => {
            let ctx = pollster::block_on(GpuContext::new()).context(
                "--backend gpu: no GPU adapter; use --backend cpu, or install a Vulkan driver",
            )?;
            Ok(Chosen::Gpu(Arc::new(ctx)))
        }
        Backend::Auto => match pollster::block_on(GpuContext::new()) {
            Ok(ctx) if !ctx.is_cpu() => Ok(Chosen::Gpu(Arc::new(ctx))),
            _ => Ok(Chosen::Cpu),
        },
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Wire {
    F16,
    F32,
}

#[derive(Clone, Copy, ValueEnum)]
enum Transport {
    /// WebRTC data channels over loopback.
    Webrtc,
    /// In-process channels.
    Memory,
}

#[derive(Args)]
struct GenerateArgs {
    /// A GGUF file or a Hugging Face checkpoint folder [default: the cached default model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Raw prompt text; special tokens such as <|im_start|> are parsed.
    #[arg(long, conflicts_with_all = ["chat", "prompts"], required_unless_present_any = ["chat", "prompts"])]
    prompt: Option<String>,
    /// One user message, wrapped in the model's chat template.
    #[arg(long, conflicts_with = "prompts")]
    chat: Option<String>,
    /// JSON Lines of requests: {"prompt": "...", "max_tokens": n} or {"chat": "...", ...}.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Nodes in the ring, each holding only its own layers (1: the single-node engine).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Sequences circulating at once [default: all].
    #[arg(long)]
    in_flight: Option<usize>,
    /// Element type of activations between nodes.
    #[arg(long, value_enum, default_value = "f16")]
    wire: Wire,
    /// What links the nodes of a local ring.
    #[arg(long, value_enum, default_value = "webrtc")]
    transport: Transport,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 picks the most likely token every step (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample among the most likely tokens holding this much probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value = "auto")]
    backend: Backend,
    /// Print one JSON object with tokens, text and speeds after the text.
    #[arg(long)]
    json: bool,
    /// Show special tokens such as <|im_end|> in the text.
    #[arg(long)]
    show_special: bool,
}

fn main() {
    private_runtime_dir();
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 => "warn",
        1 => "info,webrtc=warn,rtc=warn,rtc_dtls=error,rtc_sctp=error",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .init();
    if let Err(e) = run(cli) {
        // One line: what went wrong and, where the error knows, what to do.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

/// The Vulkan loader prints errors when `XDG_RUNTIME_DIR` is missing; give it a private one
/// (made before any thread starts, so setting the variable races with nothing).
fn private_runtime_dir() {
    let ok = std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| std::path::Path::new(&d).is_dir());
    if ok {
        return;
    }
    let dir = std::env::temp_dir().join(format!("mdi-runtime-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_ok() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        // SAFETY of intent: main has not started any thread yet.
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch => {
            println!("{}", mdi::fetch::ensure_default_model()?.display());
            Ok(())
        }
        Command::Generate(args) => run_generate(args),
        Command::Chat(args) => run_chat(args),
        Command::Node(args) => run_node(args),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "mdi", &mut std::io::stdout());
            Ok(())
        }
        Command::Bench(args) => {
            let path = model_path(args.model)?;
            let model = mdi::open_model(&path)?;
            if !args.skip_cpu {
                // First: it measures the resident memory of an engine before any other exists.
                let rows =
                    mdi_cpu::bench::run(&model.config, &*model.store, &path, &Default::default())?;
                mdi_cpu::bench::print_table(
                    &format!("CPU engine: {} ({})", path.display(), model.config.arch),
                    &rows,
                );
            }
            if !args.skip_gpu {
                let ctx = Arc::new(pollster::block_on(GpuContext::new())?);
                let spec = StageSpec::whole(&model.config);
                let weights = StageWeights::load(model.store.as_ref(), &model.config, &spec)?;
                let report =
                    mdi_gpu::bench::run(ctx, model.config.clone(), weights, &Default::default())?;
                mdi_gpu::bench::print_table(&report);
            }
            if !args.skip_ring {
                let rows = mdi::bench::ring(&model, args.nodes, args.sequences, args.max_tokens)?;
                mdi::bench::print_table(
                    &format!("Ring benchmark: {} ({})", path.display(), model.config.arch),
                    &rows,
                );
            }
            if let Some(n) = args.api {
                let rows = mdi::bench_api::run(&mdi::bench_api::ApiBench {
                    model: path.clone(),
                    max_nodes: n.max(1),
                    max_tokens: args.max_tokens,
                    backend: args.api_backend.clone(),
                    memory_budget: args.api_memory.clone(),
                })?;
                mdi::bench::print_table(
                    &format!(
                        "API benchmark: signaling + mdi node processes, {}",
                        path.display()
                    ),
                    &rows,
                );
            }
            if let Some(r) = args.recovery {
                let rows = mdi::bench_recovery::run(&mdi::bench_recovery::RecoveryBench {
                    model: path.clone(),
                    rounds: r.max(1),
                    max_tokens: args.max_tokens.max(32),
                    backend: args.recovery_backend.clone(),
                    memory_budget: args.api_memory.clone(),
                })?;
                mdi::bench::print_table(
                    &format!(
                        "Recovery: nodes SIGKILLed mid-answer, signaling + mdi node processes, {}",
                        path.display()
                    ),
                    &rows,
                );
            }
            if let Some(n) = args.cluster {
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let flag = stop.clone();
                ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst))
                    .context("cannot catch Ctrl-C")?;
                let bench = mdi::bench_cluster::ClusterBench {
                    model: path.clone(),
                    max_nodes: n.max(1),
                    cpu: args.cluster_cpu,
                    delay_ms: args.cluster_delay_ms,
                    rate_mbit: args.cluster_rate_mbit,
                    max_tokens: args.max_tokens.max(128),
                    memory_limit: mdi_runtime::platform::parse_bytes(&args.cluster_memory)
                        .map_err(anyhow::Error::msg)?,
                    backend: args.cluster_backend.clone(),
                    rounds: args.cluster_rounds,
                    depth: args.cluster_depth.into(),
                };
                let (scaling, memory) = mdi::bench_cluster::run(&bench, stop)?;
                let deeper = if bench.depth > 1 {
                    format!(" with its layers repeated {}× (a deeper model's work per token; its text means nothing)", bench.depth)
                } else {
                    String::new()
                };
                mdi::bench::print_table(
                    &format!(
                        "Edge cluster: signaling + 1..{n} mdi node processes in their own network namespaces and cgroups, {}{deeper}",
                        path.display()
                    ),
                    &scaling,
                );
                mdi::bench::print_table(
                    "Edge cluster under a per-node memory limit below the whole model's needs",
                    &memory,
                );
            }
            Ok(())
        }
    }
}

fn run_chat(args: ChatArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--temperature must be ≥ 0 and --top-p within (0, 1]");
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: 0,
        top_p: args.top_p,
        seed: args.seed,
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst))
        .context("cannot catch Ctrl-C")?;
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    if let Some(server) = args.server {
        let mut remote = mdi::chat::Remote {
            server,
            token: args.token,
            max_tokens: args.max_tokens,
            params,
            client: reqwest::blocking::Client::builder().timeout(None).build()?,
        };
        return mdi::chat::run(
            &mut remote,
            args.system,
            &mut input,
            &mut out,
            &mut err,
            &stop,
        );
    }
    let path = model_path(args.model)?;
    let model = mdi::open_model(&path)?;
    let weights = StageWeights::load(
        model.store.as_ref(),
        &model.config,
        &StageSpec::whole(&model.config),
    )?;
    let config = model.config.clone();
    macro_rules! chat_on {
        ($engine:expr) => {{
            let mut local = mdi::chat::Local {
                engine: $engine,
                tokenizer: model.tokenizer,
                config,
                max_tokens: args.max_tokens,
                params,
            };
            mdi::chat::run(
                &mut local,
                args.system,
                &mut input,
                &mut out,
                &mut err,
                &stop,
            )
        }};
    }
    match choose(args.backend)? {
        Chosen::Gpu(ctx) => chat_on!(GpuEngine::new(ctx, model.config.clone(), weights, 128)?),
        Chosen::Cpu => chat_on!(mdi_cpu::CpuEngine::new(model.config.clone(), weights, 0)?),
        Chosen::Oracle => chat_on!(Oracle::new(model.config.clone(), weights)?),
    }
}

/// `--model`, checked, or the default model (fetched once).
fn model_path(model: Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) if p.exists() => Ok(p),
        Some(p) => bail!(
            "there is no model at {}: pass --model a GGUF file or a Hugging Face folder, or leave \
             --model out to use the default model",
            p.display()
        ),
        None => mdi::fetch::ensure_default_model(),
    }
}

fn run_node(args: NodeArgs) -> Result<()> {
    let backend = mdi_runtime::Backend::parse(&args.backend).map_err(anyhow::Error::msg)?;
    let memory_budget = match &args.memory_budget {
        Some(s) => mdi_runtime::platform::parse_bytes(s).map_err(anyhow::Error::msg)?,
        None => mdi_runtime::native::default_memory_budget(),
    };
    let name = args.name.unwrap_or_else(default_node_name);
    let opts = mdi_runtime::NodeOptions {
        server: args.server,
        room: args.room,
        token: args.token,
        name,
        kind: mdi_runtime::protocol::NodeKind::Native,
        memory_budget,
        backend,
        link_delay: std::time::Duration::from_secs_f64(args.link_delay_ms.max(0.0) / 1e3),
    };
    let native = mdi_runtime::native::NativeOptions {
        cpu_threads: args.threads,
        fingerprint: args.fingerprint,
        cache_max: mdi_runtime::platform::parse_bytes(&args.cache_max)
            .map_err(|e| anyhow::anyhow!("--cache-max: {e}"))?,
        cache_dir: (!args.no_cache).then(|| {
            args.cache_dir
                .unwrap_or_else(|| mdi::fetch::cache_dir().join("pieces"))
        }),
    };
    mdi_runtime::native::run_node_blocking(opts, native, node_status(), stop_signal())
        .map_err(anyhow::Error::msg)
}

/// What `mdi node` tells the person who started it, on stderr: state changes as lines, the
/// download of its layers as a progress bar (plain lines when stderr is not a terminal).
fn node_status() -> mdi_runtime::session::StatusSink {
    use mdi_runtime::session::Status;
    let bar: std::cell::RefCell<Option<mdi::progress::Progress>> = Default::default();
    std::rc::Rc::new(move |s: &Status| match s {
        Status::Profiled {
            backend,
            adapter,
            gmacs,
        } => eprintln!("engine: {backend} on {adapter}, {gmacs:.2} GMAC/s"),
        Status::Joined { id, room } => eprintln!("joined room `{room}` as node {id}"),
        Status::Assigned {
            index,
            n_nodes,
            layers,
            starter,
            ..
        } => eprintln!(
            "position {index} of {n_nodes}: layers {}..{}{}",
            layers[0],
            layers[1],
            if *starter { " (starter)" } else { "" }
        ),
        Status::Downloading {
            done,
            total,
            cached,
        } => {
            let mut b = bar.borrow_mut();
            b.get_or_insert_with(|| {
                mdi::progress::Progress::new("downloading this node's layers", *total)
            })
            .set(*done);
            if done == total {
                if let Some(p) = b.take() {
                    p.finish();
                }
                eprintln!(
                    "downloaded {:.1} MB of layers ({:.1} MB from the cache)",
                    *total as f64 / 1e6,
                    *cached as f64 / 1e6
                );
            }
        }
        Status::Ready { .. } => eprintln!("ready"),
        Status::Unassigned { reason } => eprintln!("waiting: {reason}"),
        Status::Failed { message } => eprintln!("this assignment failed: {message}"),
    })
}

/// The host name and a short id, so two nodes on one machine differ.
fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{host}-{:04x}", (nanos ^ std::process::id()) & 0xffff)
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// Text for a reader: special tokens (EOS, `<|im_end|>`) only when asked for.
fn display(tok: &Tokenizer, ids: &[u32], show_special: bool) -> Result<String> {
    Ok(if show_special {
        tok.decode(ids)?
    } else {
        tok.decode_text(ids)?
    })
}

/// Generate on `engine`, streaming text to stdout as tokens arrive: decode everything
/// generated so far and print what is new, holding back while the tail is an incomplete
/// UTF-8 sequence.
fn stream<E: StageEngine>(
    engine: &mut E,
    req: &Request,
    tok: &Tokenizer,
    show_special: bool,
) -> Result<Generation> {
    let mut ids = Vec::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout();
    let gen = generate(engine, req, |t| {
        ids.push(t);
        let text = display(tok, &ids, show_special)?;
        if !text.ends_with('\u{FFFD}') && text.len() > printed && text.is_char_boundary(printed) {
            stdout.write_all(&text.as_bytes()[printed..])?;
            stdout.flush()?;
            printed = text.len();
        }
        Ok(())
    })?;
    let text = display(tok, &gen.tokens, show_special)?;
    if text.len() > printed && text.is_char_boundary(printed) {
        stdout.write_all(&text.as_bytes()[printed..])?;
    }
    writeln!(stdout)?;
    Ok(gen)
}

fn run_generate(args: GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && (0.0..=1.0).contains(&args.top_p)) {
        bail!("--temperature must be ≥ 0 and --top-p within 0..=1");
    }
    let path = model_path(args.model.clone())?;
    let model = mdi::open_model(&path)?;
    let tok = &model.tokenizer;
    if args.prompts.is_some() || args.nodes > 1 {
        return run_ring(&args, &model);
    }
    let prompt_tokens = match (&args.prompt, &args.chat) {
        (Some(p), _) => tok.encode(p, true)?,
        (None, Some(c)) => tok.encode(&tok.chat_prompt(c)?, false)?,
        (None, None) => bail!("give --prompt, --chat or --prompts"),
    };
    let spec = StageSpec::whole(&model.config);
    let weights = StageWeights::load(model.store.as_ref(), &model.config, &spec)
        .with_context(|| format!("loading {}", path.display()))?;
    let req = Request {
        prompt_tokens,
        max_tokens: args.max_tokens,
        params: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        eos_ids: model.config.eos_ids.clone(),
        context: model.config.context,
    };

    let gen = match choose(args.backend)? {
        Chosen::Gpu(ctx) => {
            let max_batch = req.prompt_tokens.len().clamp(1, 128);
            let mut engine = GpuEngine::new(ctx, model.config.clone(), weights, max_batch)?;
            stream(&mut engine, &req, tok, args.show_special)?
        }
        Chosen::Cpu => stream(
            &mut mdi_cpu::CpuEngine::new(model.config.clone(), weights, 0)?,
            &req,
            tok,
            args.show_special,
        )?,
        Chosen::Oracle => stream(
            &mut Oracle::new(model.config.clone(), weights)?,
            &req,
            tok,
            args.show_special,
        )?,
    };
    let text = display(tok, &gen.tokens, args.show_special)?;
    if gen.hit_context {
        eprintln!(
            "note: stopped at the model's context of {} positions",
            req.context
        );
    }
    let mut stdout = std::io::stdout();
    if args.json {
        let json = serde_json::json!({
            "prompt_tokens": req.prompt_tokens,
            "tokens": gen.tokens,
            "text": text,
            "prefill_tok_s": gen.prefill_tok_s(req.prompt_tokens.len()),
            "decode_tok_s": gen.decode_tok_s(),
        });
        writeln!(stdout, "{json}")?;
    }
    Ok(())
}

/// One line of a `--prompts` file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    prompt: Option<String>,
    chat: Option<String>,
    max_tokens: Option<usize>,
}

/// Requests from `--prompts` (or the single `--prompt`/`--chat`), sampling as the flags say.
fn read_requests(args: &GenerateArgs, model: &mdi::Model) -> Result<Vec<(Vec<u32>, usize)>> {
    let tok = &model.tokenizer;
    let Some(path) = &args.prompts else {
        let ids = match (&args.prompt, &args.chat) {
            (Some(p), _) => tok.encode(p, true)?,
            (None, Some(c)) => tok.encode(&tok.chat_prompt(c)?, false)?,
            (None, None) => bail!("give --prompt, --chat or --prompts"),
        };
        return Ok(vec![(ids, args.max_tokens)]);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let where_ = || format!("{} line {}", path.display(), i + 1);
        let p: PromptLine = serde_json::from_str(line).with_context(where_)?;
        let ids = match (p.prompt, p.chat) {
            (Some(p), None) => tok.encode(&p, true)?,
            (None, Some(c)) => tok.encode(&tok.chat_prompt(&c)?, false)?,
            _ => bail!("{}: give exactly one of \"prompt\" and \"chat\"", where_()),
        };
        out.push((ids, p.max_tokens.unwrap_or(args.max_tokens)));
    }
    if out.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(out)
}

fn run_ring(args: &GenerateArgs, model: &mdi::Model) -> Result<()> {
    let requests = read_requests(args, model)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let seqs: Vec<SeqRequest> = requests
        .iter()
        .enumerate()
        .map(|(i, (ids, max))| SeqRequest {
            prompt_tokens: ids.clone(),
            max_tokens: *max,
            // Each sequence samples on its own stream.
            params: SamplingParams {
                seed: params.seed.wrapping_add(i as u64),
                ..params
            },
            eos_ids: model.config.eos_ids.clone(),
        })
        .collect();
    let opts = RingOptions {
        nodes: args.nodes,
        in_flight: args.in_flight.unwrap_or(seqs.len()),
        wire: match args.wire {
            Wire::F16 => WireDtype::F16,
            Wire::F32 => WireDtype::F32,
        },
        transport: match args.transport {
            Transport::Webrtc => TransportKind::WebRtc,
            Transport::Memory => TransportKind::InProcess,
        },
    };
    let run = match choose(args.backend)? {
        // Every node gets its own engine; on one machine they share the device.
        Chosen::Gpu(ctx) => mdi::ring::run_ring_gpu(model, seqs, &opts, ctx)?,
        Chosen::Cpu => mdi::ring::run_ring_cpu(model, seqs, &opts)?,
        Chosen::Oracle => mdi::ring::run_ring(model, seqs, &opts)?,
    };
    let tok = &model.tokenizer;
    let mut stdout = std::io::stdout();
    for (i, ((ids, _), tokens)) in requests.iter().zip(&run.tokens).enumerate() {
        let text = display(tok, tokens, args.show_special)?;
        if let Some(Finish::Error(e)) = &run.finish[i] {
            eprintln!("sequence {i} failed: {e}");
        }
        if args.json {
            let line = serde_json::json!({
                "index": i, "prompt_tokens": ids, "tokens": tokens, "text": text,
            });
            writeln!(stdout, "{line}")?;
        } else {
            writeln!(stdout, "[{i}] {text}")?;
        }
    }
    for e in &run.node_errors {
        eprintln!("ring: {e}");
    }
    if args.json {
        let summary = serde_json::json!({"summary": {
            "nodes": args.nodes,
            "tok_s": run.tok_s(),
            "per_node": run.per_node,
            "hop_rtt_ms_p50": run.hop_rtt_p50(),
        }});
        writeln!(stdout, "{summary}")?;
    } else {
        eprintln!(
            "{} tokens in {:.2} s: {:.1} tok/s over {} nodes",
            run.generated(),
            run.elapsed.as_secs_f64(),
            run.tok_s(),
            args.nodes
        );
    }
    Ok(())
}
