// Shared helpers of the browser end-to-end tests and benchmark: a private network namespace,
// the server and native nodes as child processes, one headless Chromium per simulated device.
//
// Importing this module re-runs the importing script inside `unshare -n` (`-rn` when not
// root) with `lo` up, so every server, node and browser it starts can reach only 127.0.0.1.

import { spawn, spawnSync, execFileSync } from "node:child_process";
import { mkdtempSync, existsSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import readline from "node:readline";
import assert from "node:assert/strict";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

// Re-runs the calling script in a network namespace of its own (only `lo`, brought up).
if (!process.env.MDI_IN_NETNS) {
  const asRoot = process.getuid?.() === 0;
  const r = spawnSync("unshare", [asRoot ? "-n" : "-rn", process.execPath, ...process.argv.slice(1)], {
    stdio: "inherit",
    env: { ...process.env, MDI_IN_NETNS: "1" },
  });
  if (r.error) {
    console.error(`cannot make a network namespace with unshare: ${r.error.message}`);
  }
  process.exit(r.status ?? 1);
}
execFileSync("ip", ["link", "set", "lo", "up"]);

const { default: puppeteer } = await import("puppeteer-core");
// The binaries of a release build (`$MDI_BIN_DIR` when they were built elsewhere).
const bin = (name) => {
  const p = join(process.env.MDI_BIN_DIR || join(root, "target", "release"), name);
  if (!existsSync(p)) throw new Error(`${p} is missing: cargo build --release -p ${name}`);
  return p;
};
if (!existsSync(join(root, "web", "pkg", "node_wasm.js"))) {
  throw new Error("web/pkg is missing: npm run build");
}
export const SIGNALING = bin("signaling");
export const MDI = bin("mdi");
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
export const TOKEN = "tab-token";
export const MAX_TOKENS = 8;
export const QUESTION = "What is the capital of France?";
const children = [];
const browsers = [];
export const consoleErrors = [];

const caches = [];

export function cleanup() {
  for (const b of browsers) b.process()?.kill("SIGKILL");
  for (const c of children) c.kill("SIGKILL");
  for (const d of caches.splice(0)) rmSync(d, { recursive: true, force: true });
}
process.on("exit", cleanup);

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function waitFor(what, timeoutMs, check) {
  const start = Date.now();
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e.message;
    }
    if (Date.now() - start > timeoutMs) throw new Error(`${what}: not within ${timeoutMs} ms (${JSON.stringify(last)?.slice(0, 600)})`);
    await sleep(250);
  }
}

// Starts the server; resolves with its URL (and, with --tls, the certificate's fingerprint
// and public-key hash it prints on stderr).
export function startServer(args) {
  const child = spawn(SIGNALING, ["--bind", "127.0.0.1:0", ...args], { stdio: ["ignore", "pipe", "pipe"] });
  children.push(child);
  const tls = {};
  let tlsLines = 0;
  const wantTls = args.includes("--tls");
  const seen = new Promise((resolve) => {
    if (!wantTls) return resolve();
    readline.createInterface({ input: child.stderr }).on("line", (line) => {
      process.stderr.write(line + "\n");
      let m = /tls certificate sha256 fingerprint: (\S+)/.exec(line);
      if (m) { tls.fingerprint = m[1]; tlsLines++; }
      m = /tls public key sha256 \(spki, base64\): (\S+)/.exec(line);
      if (m) { tls.spki = m[1]; tlsLines++; }
      if (tlsLines === 2) resolve();
    });
  });
  if (!wantTls) child.stderr.pipe(process.stderr);
  return new Promise((resolve, reject) => {
    const rl = readline.createInterface({ input: child.stdout });
    rl.once("line", async (line) => {
      const m = /^listening on (https?:\/\/\S+)$/.exec(line);
      if (!m) return reject(new Error(`unexpected server output: ${line}`));
      await seen;
      resolve({ child, url: m[1], ...tls });
    });
    child.once("exit", (code) => reject(new Error(`signaling exited with ${code}`)));
  });
}

// A native node. It keeps its downloads in an empty cache directory of its own, so what it
// fetches from the server does not depend on earlier runs.
export function startNode(url, name, backend = "oracle", extra = []) {
  const cache = mkdtempSync(join(tmpdir(), `mdi-cache-${name}-`));
  caches.push(cache);
  const child = spawn(MDI, ["node", "--server", url, "--name", name, "--token", TOKEN, "--backend", backend, "--memory-budget", "2G", "--cache-dir", cache, ...extra], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  children.push(child);
  return child;
}

// Chromium's flags for a simulated device; `keepAwake` also turns off background throttling
// (the hidden-tab test measures with it on).
function chromiumArgs(keepAwake, extra) {
  const args = [
    "--no-sandbox",
    "--enable-unsafe-webgpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-loopback-in-peer-connection",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
  ];
  if (keepAwake) {
    args.push(
      "--disable-background-timer-throttling",
      "--disable-renderer-backgrounding",
      "--disable-backgrounding-occluded-windows",
    );
  }
  return args.concat(extra);
}

// A simulated device: its own Chromium process and profile, on the page of room `default`.
// Options: viewport, args (extra flags), keepAwake (default true), backend (default "gpu"),
// simd (default true; false loads the plain bundle), href (the whole URL, instead of these).
export async function openTab(url, name, opts = {}) {
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    userDataDir: mkdtempSync(join(tmpdir(), `mdi-${name}-`)),
    args: chromiumArgs(opts.keepAwake ?? true, opts.args ?? []),
    acceptInsecureCerts: false,
  });
  browsers.push(browser);
  const page = await browser.newPage();
  if (opts.viewport) await page.setViewport(opts.viewport);
  page.on("console", (m) => {
    if (m.type() === "error") consoleErrors.push(`${name}: ${m.text()}`);
  });
  page.on("pageerror", (e) => consoleErrors.push(`${name}: ${e.message}`));
  // WebGPU unless asked otherwise: `auto` would take the CPU engine on a software adapter
  // (SwiftShader here), and these tabs stand for devices with a GPU.
  const query = `room=default&token=${TOKEN}&name=${name}&memory=2G&backend=${opts.backend ?? "gpu"}` +
    (opts.simd === false ? "&simd=0" : "");
  await page.goto(opts.href ?? `${url}/?${query}`);
  return { browser, page, name };
}

export async function ring(url) {
  return (await fetch(`${url}/api/ring`)).json();
}

export async function waitReady(url, n, timeoutMs = 300_000) {
  return waitFor(`a ready ring of ${n}`, timeoutMs, async () => {
    const r = await ring(url);
    return r.ready && r.nodes.length === n ? r : false;
  });
}

// The page's chat box: asks `question` and returns the answer once it has streamed in.
export async function chatInPage(page, question, timeout = 300_000) {
  const before = await page.$$eval(".msg.assistant", (e) => e.length);
  await page.type("#prompt", question);
  await page.click("#send");
  await page.waitForFunction(
    (n) => {
      const all = document.querySelectorAll(".msg.assistant");
      return all.length > n && all[all.length - 1].dataset.state === "done";
    },
    { timeout },
    before,
  );
  return page.$$eval(".msg.assistant", (e) => e[e.length - 1].textContent);
}

export async function apiAnswer(url, question) {
  const resp = await fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${TOKEN}` },
    body: JSON.stringify({ messages: [{ role: "user", content: question }], max_tokens: MAX_TOKENS, temperature: 0 }),
  });
  const body = await resp.json();
  assert.equal(resp.status, 200, JSON.stringify(body));
  return body.choices[0].message.content;
}

// The single-node greedy answer, from the CLI on this machine.
export function singleNode(question, maxTokens = MAX_TOKENS) {
  const out = execFileSync(MDI, ["generate", "--chat", question, "--max-tokens", String(maxTokens), "--backend", "oracle", "--json"], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
  });
  const lines = out.trim().split("\n");
  return JSON.parse(lines[lines.length - 1]).text;
}

export async function manifest(url) {
  const r = await fetch(`${url}/model/manifest`, { headers: { authorization: `Bearer ${TOKEN}` } });
  return r.json();
}

// Bytes of the tensors a stage holds, from the manifest.
export function stageBytes(m, layers, starter) {
  let total = 0;
  for (let l = layers[0]; l < layers[1]; l++) for (const t of m.layers[l]) total += t.len;
  if (starter) {
    for (const t of m.global) {
      const isHead = /output\.weight$|lm_head/.test(t.name);
      if (!isHead || !m.config.tied_embeddings) total += t.len;
    }
  }
  return total;
}

export async function closeAll() {
  for (const b of browsers.splice(0)) await b.close().catch(() => {});
  for (const c of children.splice(0)) {
    c.kill("SIGTERM");
  }
  await sleep(500);
}

export async function checkDownloads(url, r) {
  const m = await manifest(url);
  for (const n of r.nodes) {
    const want = stageBytes(m, n.layers, n.role === "starter");
    assert.equal(n.downloaded_bytes, want, `${n.name} (${n.kind}, layers ${n.layers}) downloaded ${n.downloaded_bytes}, its share is ${want}`);
  }
}


// Streams one request; returns the completion tokens, the time to the first content and the
// time to the end (ms).
export async function streamOne(url, question, maxTokens) {
  const t0 = performance.now();
  const resp = await fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${TOKEN}` },
    body: JSON.stringify({
      messages: [{ role: "user", content: question }],
      max_tokens: maxTokens,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    }),
  });
  assert.equal(resp.status, 200);
  // Read as it streams, so the first content's time is when it arrived.
  let first = null;
  let tokens = 0;
  let buf = "";
  const decoder = new TextDecoder();
  for await (const chunk of resp.body) {
    buf += decoder.decode(chunk, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, cut);
      buf = buf.slice(cut + 1);
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const v = JSON.parse(line.slice(6));
      if (v.choices?.[0]?.delta?.content && first === null) first = performance.now() - t0;
      if (v.usage) tokens = v.usage.completion_tokens;
    }
  }
  return { tokens, ttft: first ?? performance.now() - t0, end: performance.now() - t0 };
}

// Streams one greedy request in the background: `pieces` fills as content arrives (each with
// its arrival time, ms); `done` resolves with the whole text once the stream ends.
export function streamText(url, question, maxTokens) {
  const pieces = [];
  const done = (async () => {
    const resp = await fetch(`${url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${TOKEN}` },
      body: JSON.stringify({ messages: [{ role: "user", content: question }], max_tokens: maxTokens, temperature: 0, stream: true }),
    });
    assert.equal(resp.status, 200);
    let buf = "";
    let finished = false;
    const decoder = new TextDecoder();
    for await (const chunk of resp.body) {
      buf += decoder.decode(chunk, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, cut);
        buf = buf.slice(cut + 1);
        if (line === "data: [DONE]") finished = true;
        if (!line.startsWith("data: ") || finished) continue;
        const v = JSON.parse(line.slice(6));
        if (v.error) throw new Error(`the stream ended with an error: ${JSON.stringify(v.error)}`);
        const c = v.choices?.[0]?.delta?.content;
        if (c) pieces.push({ t: performance.now(), text: c });
      }
    }
    assert.ok(finished, "the stream ended with [DONE]");
    return pieces.map((p) => p.text).join("");
  })();
  return { pieces, done };
}
