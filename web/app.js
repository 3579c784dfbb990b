// The page: joins the room named in the URL as a ring node (no clicks needed), shows what this
// device does, chats through the OpenAI-compatible API, and shows the ring.
//
// URL parameters: room, token, name, backend (auto|gpu|cpu), memory (bytes, or 512M / 2G),
// temperature and max_tokens (for the chat box; greedy by default).

const params = new URLSearchParams(location.search);
const room = params.get("room") || "default";
const token = params.get("token") || "";
const $ = (id) => document.getElementById(id);
const mb = (b) => (b == null ? "–" : (b / 1e6).toFixed(1));
// Measured memory: a process's RSS, or a tab's WebAssembly memory (tabs have no RSS).
const resident = (n) =>
  n.rss_bytes != null ? mb(n.rss_bytes) : n.wasm_memory_bytes != null ? `${mb(n.wasm_memory_bytes)} wasm` : "–";

function parseBytes(s) {
  if (!s) return null;
  const m = /^([0-9.]+)\s*([kmgt]?)i?b?$/i.exec(s.trim());
  if (!m) return null;
  const scale = { "": 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40 }[m[2].toLowerCase()];
  return Number(m[1]) * scale;
}

function defaultBudget() {
  // navigator.deviceMemory is in GiB (Chrome, capped at 8): offer a quarter of it.
  const gib = navigator.deviceMemory || 4;
  return Math.max(256 * 2 ** 20, Math.min(4 * 2 ** 30, (gib * 2 ** 30) / 4));
}

function authHeaders() {
  return token ? { authorization: `Bearer ${token}` } : {};
}

// Messages a person can act on, for the errors people meet.
function friendly(message) {
  if (/token/i.test(message) && /refused/i.test(message)) {
    return "The server refused this device: the room's token in the link is wrong or missing. Open the link the ring's page shows (or scan its QR code).";
  }
  if (/cannot connect|closed/i.test(message) && /ws/i.test(message)) {
    return `The server is not reachable (${message}). Check that it runs and that this device is on its network.`;
  }
  if (/limit|binding|exceeds/i.test(message) && /GPU|WebGPU|buffer/i.test(message)) {
    return `This device's WebGPU limits are too small for its layers (${message}). Open the page with ?backend=cpu to join as a CPU node.`;
  }
  return message;
}

function showError(text) {
  const e = $("device-error");
  e.textContent = text;
  e.hidden = false;
}

// ---- This device as a ring node.

let node = null;
let myName = null;
const download = { start: null };

function onStatus(json) {
  let s;
  try {
    s = JSON.parse(json);
  } catch {
    return;
  }
  switch (s.type) {
    case "profiled":
      $("device-engine").textContent = `${s.backend} on ${s.adapter} (${s.gmacs.toFixed(2)} GMAC/s)`;
      if (s.backend !== "gpu") {
        $("device-status").textContent = "no usable WebGPU here: this device joins as a CPU node";
      }
      break;
    case "joined":
      $("device-status").textContent = `joined room “${s.room}” as node ${s.id}; waiting for a plan`;
      break;
    case "assigned":
      download.start = null;
      $("device-role").textContent = s.starter ? "starter" : `node ${s.index} of ${s.n_nodes}`;
      $("device-layers").textContent = `${s.layers[0]}–${s.layers[1]}`;
      $("device-status").textContent = "downloading this device's layers";
      break;
    case "downloading": {
      const p = $("download");
      p.hidden = false;
      p.max = s.total || 1;
      p.value = s.done;
      const now = performance.now();
      download.start ??= now;
      const fetched = s.done - s.cached;
      const secs = Math.max((now - download.start) / 1000, 1e-3);
      const rate = fetched > 0 ? `, ${(fetched / 1e6 / secs).toFixed(1)} MB/s from the network` : "";
      $("download-text").textContent =
        `${mb(s.done)} of ${mb(s.total)} MB` + rate +
        (s.cached ? ` (${mb(s.cached)} MB from this browser's cache)` : "") +
        (s.done === s.total ? " — done" : "");
      break;
    }
    case "ready":
      $("device-status").textContent = "ready: serving its layers";
      $("device-status").className = "ready";
      break;
    case "unassigned":
      $("device-status").textContent = `not in the ring for now: ${s.reason}`;
      break;
    case "failed":
      showError(`this device's part failed: ${s.message}`);
      break;
    case "left":
      $("device-status").textContent = "left the ring";
      break;
    case "error":
      showError(friendly(s.message));
      $("device-status").textContent = "stopped";
      break;
  }
}

async function unlockLoopbackCandidates() {
  // Chromium gathers no loopback ICE candidates unless the page may use a media device.
  // Only for pages served from loopback (tests, a single machine); a LAN page never asks.
  const loopback = ["127.0.0.1", "localhost", "[::1]"].includes(location.hostname);
  if (!loopback || !navigator.mediaDevices?.getUserMedia) return;
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    stream.getTracks().forEach((t) => t.stop());
  } catch (e) {
    $("device-status").textContent = `no microphone permission (${e.name}); links to other tabs may fail`;
  }
}

// The smallest module using a SIMD instruction (i32x4.splat): it validates only where the
// browser has WebAssembly SIMD (Chrome 91, Firefox 89, Safari 16.4 and later).
const SIMD_PROBE = new Uint8Array([
  0, 97, 115, 109, 1, 0, 0, 0, 1, 4, 1, 96, 0, 0, 3, 2, 1, 0, 10, 9, 1, 7, 0, 65, 0, 253, 17, 26, 11,
]);

// The node bundle built with SIMD kernels where the browser runs them, else the plain one
// (`?simd=0` forces the plain one, to compare the two).
async function loadBundle() {
  const load = async (path) => {
    const m = await import(path);
    await m.default();
    return m;
  };
  if (params.get("simd") !== "0" && WebAssembly.validate(SIMD_PROBE)) {
    try {
      return await load("/web/pkg-simd/node_wasm.js");
    } catch (e) {
      console.warn(`no SIMD bundle (${e.message}); loading the plain one`);
    }
  }
  return load("/web/pkg/node_wasm.js");
}

async function startNode() {
  const name = params.get("name") || `tab-${Math.floor(Math.random() * 65536).toString(16)}`;
  myName = name;
  $("device-name").textContent = name;
  if (!navigator.gpu) {
    $("device-status").textContent = isSecureContext
      ? "this browser has no WebGPU: joining as a CPU node"
      : "WebGPU needs a secure page (https, or localhost): joining as a CPU node. Open the server's https link for the GPU";
  }
  let wasm;
  try {
    wasm = await loadBundle();
  } catch (e) {
    showError("the browser node is not built on this server (run `npm run build`): " + e.message);
    return;
  }
  await unlockLoopbackCandidates();
  const options = {
    server: location.origin,
    room,
    token,
    name,
    backend: params.get("backend") || "auto",
    memory_budget: parseBytes(params.get("memory")) || defaultBudget(),
  };
  try {
    node = wasm.start_node(JSON.stringify(options), onStatus);
  } catch (e) {
    showError(String(e.message || e));
  }
}

addEventListener("pagehide", () => node?.leave());

// ---- Chat through the API (the same path as any OpenAI client).

const history = [];
let controller = null;

function bubble(role, text) {
  const d = document.createElement("div");
  d.className = `msg ${role}`;
  d.textContent = text;
  $("transcript").appendChild(d);
  return d;
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.state = "streaming";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let chunks = 0;
  let answer = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json", ...authHeaders() },
      body: JSON.stringify({
        model: "default",
        messages: history,
        stream: true,
        temperature: Number(params.get("temperature") ?? 0),
        max_tokens: Number(params.get("max_tokens") ?? 256),
      }),
      signal: controller.signal,
    });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      throw new Error(body.error?.message || `HTTP ${resp.status}`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const msg = JSON.parse(data);
          if (msg.error) throw new Error(msg.error.message);
          const delta = msg.choices?.[0]?.delta?.content;
          if (delta) {
            answer += delta;
            chunks += 1;
            out.textContent = answer;
            const s = (performance.now() - started) / 1000;
            $("chat-speed").textContent = `${chunks} pieces in ${s.toFixed(1)} s (${(chunks / s).toFixed(1)}/s)`;
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") out.textContent = answer + `\n[${e.message}]`;
  } finally {
    history.push({ role: "assistant", content: answer });
    out.dataset.state = "done";
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("stop").addEventListener("click", () => controller?.abort());

// ---- The ring map: nodes around a circle in ring order (the starter on top), arrows along
// the direction activations travel, a token circulating while sequences are in flight.

const SVG = "http://www.w3.org/2000/svg";
function el(name, attrs = {}, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function drawMap(r) {
  const nodes = r.nodes;
  const n = nodes.length;
  const cx = 200, cy = 200, radius = 140;
  const pos = (i) => {
    const a = (i / Math.max(n, 1)) * 2 * Math.PI - Math.PI / 2;
    return [cx + radius * Math.cos(a), cy + radius * Math.sin(a)];
  };
  const edges = [];
  if (n > 1) {
    for (let i = 0; i < n; i++) {
      const [x1, y1] = pos(i);
      const [x2, y2] = pos((i + 1) % n);
      // Shorten each chord so the arrow ends at the next node's edge.
      const dx = x2 - x1, dy = y2 - y1, d = Math.hypot(dx, dy) || 1;
      const k = 40 / d;
      edges.push(el("line", {
        x1: x1 + dx * k, y1: y1 + dy * k, x2: x2 - dx * k, y2: y2 - dy * k,
        stroke: "#8a8f98", "stroke-width": 2, "marker-end": "url(#arrow)",
      }));
    }
  }
  $("ring-edges").replaceChildren(...edges);
  const groups = nodes.map((node, i) => {
    const [x, y] = pos(i);
    const classes = ["node", node.state];
    if (node.role === "starter") classes.push("starter");
    if (node.name === myName) classes.push("me");
    const g = el("g", {
      class: classes.join(" "),
      "data-name": node.name,
      "data-kind": node.kind,
      "data-layers": node.layers ? `${node.layers[0]}-${node.layers[1]}` : "",
    });
    g.append(el("circle", { class: "halo", cx: x, cy: y, r: 38 }));
    g.append(el("circle", { class: "body", cx: x, cy: y, r: 32 }));
    g.append(el("text", { class: "inside", x, y: y - 3 }, node.layers ? `${node.layers[0]}–${node.layers[1]}` : node.state));
    g.append(el("text", { class: "inside", x, y: y + 11 }, node.kind === "browser" ? "tab" : "native"));
    const below = y > cy ? y + 48 : y - 54;
    g.append(el("text", { class: "name", x, y: below }, node.name + (node.role === "starter" ? " ★" : "")));
    const detail = node.state === "loading" && node.download[1] > 0
      ? `${Math.round((100 * node.download[0]) / node.download[1])}% downloaded`
      : `${node.backend} · ${node.tok_s.toFixed(1)} tok/s` + (node.rtt_ms == null ? "" : ` · ${node.rtt_ms.toFixed(1)} ms`);
    g.append(el("text", { x, y: below + 14 }, detail));
    const title = el("title", {}, `${node.name}: ${node.kind}, ${node.backend} (${node.adapter}), ${node.state}` +
      (node.failure ? ` — ${node.failure}` : ""));
    g.append(title);
    return g;
  });
  $("ring-nodes").replaceChildren(...groups);
  // The token: one dot per ten sequences in flight, around the ring at the ring's pace.
  const flow = [];
  const inFlight = r.sequences.in_flight;
  if (r.ready && inFlight > 0 && n > 0) {
    const tokS = Math.max(...nodes.map((x) => x.tok_s), 0.5);
    const lap = Math.min(Math.max(n / tokS, 0.4), 8);
    for (let k = 0; k < Math.min(inFlight, 8); k++) {
      const dot = el("circle", { class: "token", r: 6 });
      const motion = el("animateMotion", {
        dur: `${lap}s`, repeatCount: "indefinite", begin: `${(k * lap) / Math.min(inFlight, 8)}s`,
        path: `M ${cx} ${cy - radius} A ${radius} ${radius} 0 1 1 ${cx - 0.01} ${cy - radius}`,
      });
      dot.append(motion);
      flow.push(dot);
    }
  }
  $("ring-flow").replaceChildren(...flow);
  $("ring-center").textContent = r.ready ? `ready · ${n} node${n === 1 ? "" : "s"}` : "not ready";
  $("ring-center2").textContent = r.ready
    ? `${inFlight} sequence${inFlight === 1 ? "" : "s"} in flight`
    : r.status.length > 48 ? r.status.slice(0, 46) + "…" : r.status;
}

// ---- Join by QR code or link.

async function showJoin() {
  try {
    const q = new URLSearchParams({ room });
    if (token) q.set("token", token);
    const j = await (await fetch(`/api/join?${q}`)).json();
    $("join-url").value = j.url;
    $("qr").innerHTML = j.svg;
    if (j.fingerprint) {
      $("fingerprint").hidden = false;
      $("fingerprint").textContent = `certificate SHA-256: ${j.fingerprint}`;
    }
  } catch {
    $("join-url").value = location.href;
  }
}
$("copy").addEventListener("click", async () => {
  $("join-url").select();
  try {
    await navigator.clipboard.writeText($("join-url").value);
    $("copy").textContent = "Copied";
  } catch {
    document.execCommand?.("copy");
  }
});

// ---- The ring.

async function refreshRing() {
  try {
    const r = await (await fetch(`/api/ring?room=${encodeURIComponent(room)}`)).json();
    const s = $("ring-status");
    s.textContent = (r.ready ? "ring ready" : `ring not ready: ${r.status}`) +
      ` — ${r.model}, ${r.nodes.length} nodes, ${r.sequences.in_flight} sequences in flight`;
    s.className = r.ready ? "ready" : "muted";
    drawMap(r);
    const rows = r.nodes.map((n) => {
      const cells = [n.name, n.kind, n.role ?? "–", n.layers ? `${n.layers[0]}–${n.layers[1]}` : "–", n.state,
        n.backend, n.tok_s.toFixed(1), n.rtt_ms == null ? "–" : n.rtt_ms.toFixed(2), mb(n.weight_bytes),
        mb(n.kv_bytes), resident(n), mb(n.downloaded_bytes)];
      const tr = document.createElement("tr");
      cells.forEach((c, i) => {
        const td = document.createElement("td");
        td.textContent = c;
        if (i >= 6) td.className = "n";
        tr.appendChild(td);
      });
      return tr;
    });
    $("nodes").replaceChildren(...rows);
  } catch {
    $("ring-status").textContent = "the server is not answering; this page keeps trying";
    $("ring-status").className = "error";
  }
}

refreshRing();
setInterval(refreshRing, 1000);
showJoin();
startNode();
