// Benchmark: decode speed of a ring of three native nodes, a mixed ring (one native node and
// two tabs), a tabs-only ring on WebGPU and tabs-only rings on the wasm CPU engine (SIMD and
// plain bundles) on this machine, side by side, with per-node bytes downloaded
// and the bytes each engine holds (GPU buffers for the tabs). Prints a table.
//
//   npm run bench:browser            (needs what `npm run test:browser` needs)

import { MDI, TOKEN, closeAll, openTab, ring, startNode, startServer, streamOne, waitReady } from "./lib.mjs";
import { execFileSync } from "node:child_process";

const MAX = Number(process.env.MAX_TOKENS || 32);
const model = execFileSync(MDI, ["fetch"], { encoding: "utf8" }).trim();
const questions = ["Write a short poem about the sea.", "Describe a mountain at dawn.", "Tell a story about a train."];
const rows = [];

async function measure(label, setup) {
  const { url } = await startServer(["--model", model, "--token", TOKEN, "--min-nodes", "3", "--in-flight", "3"]);
  await setup(url);
  const t0 = Date.now();
  const r0 = await waitReady(url, 3, 600_000);
  const formed = (Date.now() - t0) / 1000;
  await streamOne(url, "Hello.", 2); // warm-up
  const one = await streamOne(url, questions[0], MAX);
  const start = performance.now();
  const many = await Promise.all(questions.map((q) => streamOne(url, q, MAX)));
  const wall = (performance.now() - start) / 1000;
  const tokens = many.reduce((a, r) => a + r.tokens, 0);
  await new Promise((r) => setTimeout(r, 1500)); // a heartbeat with final figures
  const r = await ring(url);
  rows.push([label, "1 stream decode", `${((one.tokens - 1) / ((one.end - one.ttft) / 1000)).toFixed(2)} tok/s`, `TTFT ${one.ttft.toFixed(0)} ms`]);
  rows.push([label, "3 streams aggregate", `${(tokens / wall).toFixed(2)} tok/s`, `ring formed in ${formed.toFixed(1)} s`]);
  for (const n of r.nodes) {
    rows.push([
      label,
      `${n.name} (${n.kind}, ${n.backend === "cpu" ? n.adapter : n.backend}) layers ${n.layers[0]}–${n.layers[1]}`,
      `downloaded ${(n.downloaded_bytes / 1e6).toFixed(1)} MB`,
      `engine holds ${(n.weight_bytes / 1e6).toFixed(1)} MB weights + ${(n.kv_bytes / 1e6).toFixed(1)} MB KV` +
        (n.rss_bytes ? `, RSS ${(n.rss_bytes / 1e6).toFixed(0)} MB` : ""),
    ]);
  }
  void r0;
  await closeAll();
}

await measure("3 native nodes (cpu)", async (url) => {
  for (let i = 1; i <= 3; i++) startNode(url, `native-${i}`, "cpu");
});
await measure("1 native + 2 tabs (WebGPU)", async (url) => {
  await openTab(url, "tab-a");
  await openTab(url, "tab-b");
  startNode(url, "native-1", "cpu");
});
await measure("3 tabs (WebGPU)", async (url) => {
  for (let i = 1; i <= 3; i++) await openTab(url, `tab-${i}`);
});
// Tabs without WebGPU: the wasm CPU engine of the SIMD bundle, then of the plain one (what a
// browser without WebAssembly SIMD loads).
for (const [label, simd] of [["3 tabs (CPU, simd128)", true], ["3 tabs (CPU, scalar)", false]]) {
  await measure(label, async (url) => {
    for (let i = 1; i <= 3; i++) await openTab(url, `cpu-${i}`, { backend: "cpu", simd });
  });
}

const widths = [0, 1, 2, 3].map((i) => Math.max(...rows.map((r) => r[i].length), 4));
const line = (r) => "| " + r.map((c, i) => c.padEnd(widths[i])).join(" | ") + " |";
console.log(`\nBrowser ring benchmark (this machine; tabs on headless Chromium's WebGPU), ${MAX} tokens per stream`);
console.log(line(["ring", "what", "value", "context"]));
console.log("|" + widths.map((w) => "-".repeat(w + 2)).join("|") + "|");
rows.forEach((r) => console.log(line(r)));
process.exit(0);
