//! `/api/ring` (the ring's state as JSON, for pages and tests) and `/`, a status page that
//! shows it, refreshed every second.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;

use crate::AppState;

/// `GET /api/ring[?room=NAME]`
pub async fn ring(
    State(app): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let room = q.get("room").map_or(crate::DEFAULT_ROOM, String::as_str);
    let served = |id| app.model.served_to(id);
    let view = app.hub().view(room, &app.model.facts, &served);
    Json(view).into_response()
}

/// `GET /`: the web page, or the status page when the server has no page to serve.
pub async fn index(State(app): State<Arc<AppState>>) -> Response {
    if let Some(dir) = &app.web_dir {
        if let Ok(html) = tokio::fs::read_to_string(dir.join("index.html")).await {
            return Html(html).into_response();
        }
    }
    Html(PAGE).into_response()
}

/// `GET /status`: the ring as a table, without joining it.
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mdi ring</title>
<style>
  body { font: 15px system-ui, sans-serif; margin: 1.5em; color: #222; }
  table { border-collapse: collapse; margin-top: 1em; }
  th, td { padding: .3em .7em; border-bottom: 1px solid #ddd; text-align: left; }
  td.n { text-align: right; font-variant-numeric: tabular-nums; }
  .ready { color: #186a18; } .waiting { color: #a15c00; }
  code { background: #f3f3f3; padding: .1em .3em; }
</style>
</head>
<body>
<h1>mdi ring</h1>
<p id="status">loading…</p>
<table>
  <thead><tr><th>node</th><th>kind</th><th>role</th><th>layers</th><th>state</th><th>backend</th>
  <th>tok/s</th><th>RTT ms</th><th>weights MB</th><th>KV MB</th><th>resident MB</th><th>downloaded MB</th></tr></thead>
  <tbody id="nodes"></tbody>
</table>
<p>Chat through the OpenAI-compatible API: <code>POST /v1/chat/completions</code>.</p>
<script>
const mb = b => b == null ? "–" : (b / 1e6).toFixed(1);
// Measured memory: a process's RSS, or a tab's WebAssembly memory (tabs have no RSS).
const resident = n => n.rss_bytes != null ? mb(n.rss_bytes) :
  n.wasm_memory_bytes != null ? mb(n.wasm_memory_bytes) + " wasm" : "–";
async function refresh() {
  try {
    const r = await (await fetch("/api/ring")).json();
    const s = document.getElementById("status");
    s.textContent = (r.ready ? "ready" : "not ready: " + r.status) + " — model " + r.model +
      ", " + r.sequences.in_flight + " sequences in flight, " + r.sequences.requests_waiting + " waiting";
    s.className = r.ready ? "ready" : "waiting";
    const rows = r.nodes.map(n => {
      const cells = [n.name, n.kind, n.role ?? "–", n.layers ? n.layers[0] + "–" + n.layers[1] : "–",
        n.state, n.backend, n.tok_s.toFixed(1), n.rtt_ms == null ? "–" : n.rtt_ms.toFixed(2),
        mb(n.weight_bytes), mb(n.kv_bytes), resident(n), mb(n.downloaded_bytes)];
      const tr = document.createElement("tr");
      cells.forEach((c, i) => { const td = document.createElement("td"); td.textContent = c;
        if (i >= 6) td.className = "n"; tr.appendChild(td); });
      return tr;
    });
    document.getElementById("nodes").replaceChildren(...rows);
  } catch (e) {
    document.getElementById("status").textContent = "the server is gone (" + e + ")";
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"#;
