// Browser nodes, end to end, in headless Chromium: one browser process and profile per
// simulated device, loopback only, inside a network namespace the script makes for itself.
//
// 1. `signaling` + 2 tabs + 1 `mdi node`: the ring forms with the tabs as nodes (`/api/ring`
//    says "kind": "browser" for them); a chat completion through the API equals the
//    single-node greedy answer; each tab downloaded exactly its own byte ranges (counted by the
//    server). Then a tab is closed while two clients stream their answers: the ring re-forms
//    without it and both streams complete with their undisturbed greedy answers.
// 2. 3 tabs and no native node (a tab is the starter): the page's chat box and the API both
//    give the single-node greedy answer; a reloaded tab takes its layers from its cache.
// 3. Tabs on the wasm CPU engine: one with `backend=auto`, which takes the CPU engine exactly
//    when the browser's WebGPU adapter is a software fallback (SwiftShader here), from the SIMD
//    bundle (its node reports simd128 kernels); one with `backend=cpu&simd=0`, the plain bundle
//    (scalar kernels, as a browser without WebAssembly SIMD). The ring's answer equals the
//    single-node one.
// 4. No console errors on any page during the runs.
//
// Needs target/release/{signaling,mdi} (`cargo build --release -p signaling -p mdi`), the
// wasm bundle (`npm run build`), Chromium at /usr/bin/chromium and `npm install`.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import {
  MDI, QUESTION, TOKEN, apiAnswer, checkDownloads, cleanup, closeAll, consoleErrors, openTab,
  ring, singleNode, startNode, startServer, streamText, waitFor, waitReady,
} from "./lib.mjs";

const model = execFileSync(MDI, ["fetch"], { encoding: "utf8" }).trim();
const expected = singleNode(QUESTION);
console.log(`single-node answer: ${JSON.stringify(expected)}`);
const LONG_QUESTIONS = ["Write a poem about autumn leaves.", "Explain how rain forms, step by step."];
const LONG_TOKENS = 16;
const longExpected = LONG_QUESTIONS.map((q) => singleNode(q, LONG_TOKENS));
const t0 = Date.now();

// ---- 1. Two tabs and one native node.
{
  const { url } = await startServer(["--model", model, "--token", TOKEN, "--min-nodes", "3", "--wire", "f32"]);
  const tabA = await openTab(url, "tab-a");
  await openTab(url, "tab-b");
  startNode(url, "native-1");
  const r = await waitReady(url, 3);
  const kinds = r.nodes.map((n) => n.kind).sort();
  assert.deepEqual(kinds, ["browser", "browser", "native"]);
  for (const n of r.nodes.filter((n) => n.kind === "browser")) {
    assert.equal(n.backend, "gpu", `${n.name} runs on WebGPU`);
    // A tab has no RSS; its WebAssembly memory is measured instead (the module, its buffers).
    assert.equal(n.rss_bytes, null, `${n.name}: no RSS in a tab`);
    assert.ok(n.wasm_memory_bytes > 0, `${n.name} reports its wasm memory: ${n.wasm_memory_bytes}`);
  }
  const native = r.nodes.find((n) => n.kind === "native");
  assert.ok(native.rss_bytes > 0 && native.wasm_memory_bytes == null, `native memory: ${JSON.stringify(native)}`);
  assert.equal(await apiAnswer(url, QUESTION), expected);
  await checkDownloads(url, r);
  console.log(`mixed ring: ok (${((Date.now() - t0) / 1000).toFixed(0)} s)`);

  // A tab closes mid-answer.
  const streams = LONG_QUESTIONS.map((q) => streamText(url, q, LONG_TOKENS));
  await waitFor("both streams under way", 300_000, async () => streams.every((s) => s.pieces.length >= 2));
  const closedAt = performance.now();
  await tabA.page.close();
  const texts = await Promise.all(streams.map((s) => s.done));
  assert.deepEqual(texts, longExpected, "the streams equal their undisturbed answers");
  const waits = streams.map((s) => (s.pieces.find((p) => p.t > closedAt)?.t ?? NaN) - closedAt);
  const after = await waitReady(url, 2);
  assert.ok(after.sequences.recovery.resumed > 0, `the close came mid-answer: ${JSON.stringify(after.sequences)}`);
  console.log(
    `tab closed mid-answer: ok; close → next token ${waits.map((w) => w.toFixed(0)).join(", ")} ms; ` +
      `${after.sequences.recovery.replayed_tokens} tokens replayed (${((Date.now() - t0) / 1000).toFixed(0)} s)`,
  );
  await closeAll();
}

// ---- 2. Three tabs, no native node: a tab is the starter.
{
  const { url } = await startServer(["--model", model, "--token", TOKEN, "--min-nodes", "3", "--wire", "f32"]);
  const tabs = [await openTab(url, "tab-1"), await openTab(url, "tab-2"), await openTab(url, "tab-3")];
  let r = await waitReady(url, 3);
  assert.ok(r.nodes.every((n) => n.kind === "browser"));
  assert.equal(r.nodes.find((n) => n.role === "starter")?.kind, "browser");
  await checkDownloads(url, r);
  assert.equal(await apiAnswer(url, QUESTION), expected);
  // The page's chat box.
  const page = tabs[0].page;
  await page.type("#prompt", QUESTION);
  await page.click("#send");
  await page.waitForSelector('.msg.assistant[data-state="done"]', { timeout: 300_000 });
  const shown = await page.$eval(".msg.assistant", (e) => e.textContent);
  assert.equal(shown, expected);
  // A reloaded tab rejoins and takes its layers from its cache.
  await tabs[1].page.reload();
  r = await waitFor("the reloaded tab in a ready ring", 300_000, async () => {
    const x = await ring(url);
    const t = x.nodes.find((n) => n.name === "tab-2");
    return x.ready && x.nodes.length === 3 && t && t.state === "ready" ? x : false;
  });
  const t2 = r.nodes.find((n) => n.name === "tab-2");
  const [, total, cached] = t2.download;
  assert.ok(cached > 0, `the reloaded tab used its cache: ${JSON.stringify(t2.download)}`);
  assert.equal(t2.downloaded_bytes, total - cached, "only what was not cached came from the server");
  assert.equal(await apiAnswer(url, QUESTION), expected);
  console.log(`tabs-only ring: ok (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
  await closeAll();
}

// ---- 3. CPU tabs: the SIMD and the plain bundle.
{
  const { url } = await startServer(["--model", model, "--token", TOKEN, "--min-nodes", "3", "--wire", "f32"]);
  const auto = await openTab(url, "cpu-simd", { backend: "auto" });
  await openTab(url, "cpu-plain", { backend: "cpu", simd: false });
  startNode(url, "native-1");
  const r = await waitReady(url, 3);
  const tab = (name) => r.nodes.find((n) => n.name === name);
  const fallback = await auto.page.evaluate(async () => {
    const a = await navigator.gpu?.requestAdapter();
    return !a || a.info.isFallbackAdapter;
  });
  assert.equal(tab("cpu-simd")?.backend, fallback ? "cpu" : "gpu", `auto with a fallback adapter: ${fallback}`);
  for (const [name, isa] of [["cpu-simd", "simd128"], ["cpu-plain", "scalar"]]) {
    const n = tab(name);
    if (n?.backend === "gpu") continue; // auto on a hardware adapter
    assert.ok(n && n.kind === "browser" && n.backend === "cpu", `${name} is a CPU node: ${JSON.stringify(n)}`);
    assert.ok(n.adapter.includes(isa), `${name} runs the ${isa} kernels: ${n.adapter}`);
    // The wasm CPU engine keeps its weights in the module's memory: a measured memory smaller
    // than the weights the engine says it holds would be a report that lies.
    assert.ok(
      n.wasm_memory_bytes >= n.weight_bytes && n.weight_bytes > 0,
      `${name}: wasm memory ${n.wasm_memory_bytes} holds its ${n.weight_bytes} weight bytes`,
    );
  }
  await checkDownloads(url, r);
  assert.equal(await apiAnswer(url, QUESTION), expected);
  const held = (n) => `${(n.wasm_memory_bytes / 1e6).toFixed(1)} MB wasm memory, ${(n.weight_bytes / 1e6).toFixed(1)} MB weights`;
  console.log(
    `CPU tabs (${tab("cpu-simd").adapter}: ${held(tab("cpu-simd"))}; ${tab("cpu-plain").adapter}: ` +
      `${held(tab("cpu-plain"))}): ok (${((Date.now() - t0) / 1000).toFixed(0)} s)`,
  );
  await closeAll();
}

assert.deepEqual(consoleErrors, [], "no console errors");
console.log("browser tests passed");
cleanup();
process.exit(0);
