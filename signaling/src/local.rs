//! `--local-nodes N`: ring nodes inside the server's own process, each on its own thread with
//! its own async runtime, joining through the server's WebSocket and downloading their layers
//! over HTTP exactly as separate devices do. One command then gives a working ring.

use mdi_runtime::native::{run_node_blocking, NativeOptions};
use mdi_runtime::platform::Backend;
use mdi_runtime::protocol::NodeKind;
use mdi_runtime::session::NodeOptions;

/// The server's local nodes; [`stop`](Self::stop) makes them leave the room.
#[derive(Default)]
pub struct LocalNodes {
    stops: Vec<futures::channel::oneshot::Sender<()>>,
}

impl LocalNodes {
    /// Every local node leaves its room and stops.
    pub fn stop(self) {
        for s in self.stops {
            let _ = s.send(());
        }
    }
}

/// Starts `n` local nodes that join `room` of the server at `server`.
pub fn start(
    n: usize,
    server: &str,
    room: &str,
    token: Option<String>,
    fingerprint: Option<String>,
    memory_budget: u64,
    backend: Backend,
) -> LocalNodes {
    let mut nodes = LocalNodes::default();
    // The nodes share this machine's cores.
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = (cores / n.max(1)).max(1);
    for i in 1..=n {
        let opts = NodeOptions {
            server: server.to_string(),
            room: room.to_string(),
            token: token.clone(),
            name: format!("local-{i}"),
            kind: NodeKind::Native,
            memory_budget,
            backend,
            link_delay: std::time::Duration::ZERO,
        };
        let fingerprint = fingerprint.clone();
        let (stop_tx, stop_rx) = futures::channel::oneshot::channel::<()>();
        nodes.stops.push(stop_tx);
        let spawned = std::thread::Builder::new()
            .name(format!("local node {i}"))
            .spawn(move || {
                let native = NativeOptions {
                    cpu_threads: threads,
                    fingerprint,
                    // Nodes of this process share the server's file; nothing to keep.
                    cache_dir: None,
                    cache_max: 0,
                };
                if let Err(e) = run_node_blocking(
                    opts,
                    native,
                    mdi_runtime::session::no_status(),
                    async move {
                        let _ = stop_rx.await;
                    },
                ) {
                    tracing::error!("local node {i}: {e}");
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start local node {i}: {e}");
        }
    }
    nodes
}
