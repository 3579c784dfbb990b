//! `signaling`: serve a model to a ring of devices and an OpenAI-compatible API over it.
//! Prints exactly one line on stdout, `listening on http://ADDR`, once it accepts connections;
//! everything else goes to stderr (`RUST_LOG` sets the detail).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use mdi_core::wire::WireDtype;
use mdi_runtime::platform::{parse_bytes, Backend};
use signaling::model::ServedModel;
use signaling::room::{Hub, RoomConfig};
use signaling::{app, spawn_ticker, AppState, DEFAULT_ROOM};

#[derive(Parser)]
#[command(
    name = "signaling",
    version,
    about = "Serve a model to a ring of devices, and an OpenAI-compatible API over the ring",
    after_help = "Examples:\n  signaling --local-nodes 3\n  signaling --bind 127.0.0.1:9000 --model model.gguf --token secret --min-nodes 2"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    bind: String,
    /// A GGUF file or a Hugging Face folder [default: the default model, fetched once].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Require this token from nodes (join) and API callers (Authorization: Bearer).
    #[arg(long)]
    token: Option<String>,
    /// Also start this many ring nodes inside this process.
    #[arg(long, default_value_t = 0)]
    local_nodes: usize,
    /// Nodes needed before a ring forms [default: --local-nodes, at least 1].
    #[arg(long)]
    min_nodes: Option<usize>,
    /// Sequences in flight at once (concurrent requests beyond it queue).
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Engine of the local nodes: auto, gpu, cpu or oracle.
    #[arg(long, default_value = "auto")]
    backend: String,
    /// Memory budget of each local node (e.g. 1G) [default: a share of available memory].
    #[arg(long)]
    node_memory: Option<String>,
    /// Completion tokens when a request gives no max_tokens.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// KV positions the plan reserves per sequence in flight.
    #[arg(long, default_value_t = 256)]
    reserve_positions: usize,
    /// Seconds a request may wait for a ready ring before it fails.
    #[arg(long, default_value_t = 300)]
    queue_timeout: u64,
    /// The web page's folder (index.html, app.js, and the wasm bundle built into pkg/)
    /// [default: web/ of this source tree].
    #[arg(long)]
    web: Option<PathBuf>,
    /// Serve HTTPS with a self-signed certificate made at start (phones need a secure context
    /// for WebGPU); the certificate's fingerprint is printed on stderr.
    #[arg(long)]
    tls: bool,
    /// Serve HTTPS with this certificate chain (PEM) instead of a self-signed one.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The base URL phones use to reach this server, for join links and QR codes
    /// [default: the address the browser used, or this machine's LAN address].
    #[arg(long)]
    public_url: Option<String>,
    /// Element type of activations between nodes: f16 halves the bytes per hop; f32 keeps
    /// every answer bit-identical to a single node's.
    #[arg(long, default_value = "f16", value_parser = ["f16", "f32"])]
    wire: String,
    /// Once a ring has run a while, plan it again from its nodes' measured busy times (each
    /// node reloads its new layers when the ring is next idle); at most twice between changes
    /// of membership.
    #[arg(long)]
    rebalance: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,webrtc=warn,rtc=warn".into()),
        )
        .init();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let backend = Backend::parse(&args.backend).map_err(anyhow::Error::msg)?;
    let node_memory = match &args.node_memory {
        Some(s) => parse_bytes(s).map_err(anyhow::Error::msg)?,
        None => mdi_runtime::native::default_memory_budget() / args.local_nodes.max(1) as u64,
    };
    let path = match args.model {
        Some(p) => p,
        None => mdi::fetch::ensure_default_model()?,
    };
    let model = ServedModel::open(&path).with_context(|| format!("serving {}", path.display()))?;
    let hub = Hub::new(RoomConfig {
        min_nodes: args.min_nodes.unwrap_or(args.local_nodes).max(1),
        in_flight: args.in_flight.max(1),
        reserve_positions: args.reserve_positions.max(1),
        max_queued: 1024,
        queue_timeout: Duration::from_secs(args.queue_timeout),
        wire: if args.wire == "f32" {
            WireDtype::F32
        } else {
            WireDtype::F16
        },
        rebalance: args.rebalance,
    });
    let mut state = AppState::new(model, hub, args.token.clone(), args.max_tokens.max(1));
    let web = args.web.clone().unwrap_or_else(signaling::default_web_dir);
    if web.join("index.html").is_file() {
        if !web.join("pkg/node_wasm.js").is_file() {
            tracing::warn!(
                "{}: no browser node bundle (pkg/); build it with `npm run build` so tabs can join",
                web.display()
            );
        } else if !web.join("pkg-simd/node_wasm.js").is_file() {
            tracing::warn!(
                "{}: no SIMD bundle (pkg-simd/): tabs without WebGPU run the scalar CPU kernels; \
                 build both with `npm run build`",
                web.display()
            );
        }
        state.web_dir = Some(web);
    } else {
        tracing::warn!(
            "{}: no web page; serving the status page at /",
            web.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = std::net::TcpListener::bind(&args.bind)
            .with_context(|| format!("cannot listen on {}", args.bind))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let tls = if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            Some(signaling::tls::from_files(cert, key)?)
        } else if args.tls {
            let mut ips = vec![addr.ip()];
            ips.extend(lan_ip());
            Some(signaling::tls::self_signed(&ips)?)
        } else {
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        state.reach = signaling::join::Reach {
            public_url: args.public_url.clone(),
            bound: Some(addr),
            scheme,
        };
        if let Some(t) = &tls {
            state.fingerprint = Some(t.fingerprint.clone());
        }
        let state = Arc::new(state);
        let url = format!("{scheme}://{addr}");
        println!("listening on {url}");
        std::io::stdout().flush()?;
        if let Some(t) = &tls {
            // On stderr, so stdout stays the one line tests and scripts read.
            eprintln!("tls certificate sha256 fingerprint: {}", t.fingerprint);
            eprintln!("tls public key sha256 (spki, base64): {}", t.spki_sha256);
        }
        tracing::info!("serving {} ({})", path.display(), state.model.id);
        spawn_ticker(&state);
        let local = if args.local_nodes > 0 {
            signaling::local::start(
                args.local_nodes,
                &url,
                DEFAULT_ROOM,
                args.token.clone(),
                tls.as_ref().map(|t| t.fingerprint.clone()),
                node_memory,
                backend,
            )
        } else {
            Default::default()
        };
        // On Ctrl-C or SIGTERM the local nodes leave the room first, then the server stops.
        let stopping = async move {
            shutdown().await;
            local.stop();
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let service = app(state).into_make_service();
        match tls {
            None => {
                use axum::serve::ListenerExt;
                // Without TCP_NODELAY a response's last small write waits for the client's
                // delayed ACK: each of a node's many ranged requests would lose ~40 ms.
                let listener = tokio::net::TcpListener::from_std(listener)?.tap_io(|tcp| {
                    if let Err(e) = tcp.set_nodelay(true) {
                        tracing::debug!("cannot set TCP_NODELAY: {e}");
                    }
                });
                axum::serve(listener, service)
                    .with_graceful_shutdown(stopping)
                    .await
                    .context("serving")
            }
            Some(t) => {
                let handle = axum_server::Handle::new();
                let h = handle.clone();
                tokio::spawn(async move {
                    stopping.await;
                    h.graceful_shutdown(Some(Duration::from_secs(2)));
                });
                let config = axum_server::tls_rustls::RustlsConfig::from_config(t.config);
                // TLS over streams with TCP_NODELAY, for the same reason as above.
                let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(config)
                    .acceptor(axum_server::accept::NoDelayAcceptor::new());
                axum_server::from_tcp(listener)
                    .acceptor(acceptor)
                    .handle(handle)
                    .serve(service)
                    .await
                    .context("serving")
            }
        }
    })
}

/// This machine's LAN address, if it has one (nothing is sent).
fn lan_ip() -> Option<std::net::IpAddr> {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
    let s = UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).ok()?;
    s.connect(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 9))
        .ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback()).then_some(ip)
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
