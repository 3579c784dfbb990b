// The page on phones and laptops, end to end in headless Chromium (one browser process and
// profile per device, loopback only, in a network namespace this script makes):
//
// 1. A phone-sized and a laptop-sized tab and one native node form a ring of three; both pages
//    draw it (three nodes, their layers covering the model), stream the single-node answer in
//    their chat boxes, and are saved as screenshots (target/browser-artifacts/); the QR code
//    decodes to the join link, and a fresh profile opening that link joins the ring.
// 2. `signaling --tls`: a tab trusting the certificate's public key gets a secure context and
//    WebGPU over https on 127.0.0.1 and joins; a native node joins by the fingerprint.
// 3. A hidden tab (another page brought to the front, throttling left on) keeps its ring
//    answering; its decode speed is printed next to the visible one.
// 4. No console errors on any page.

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import {
  MDI, QUESTION, TOKEN, apiAnswer, chatInPage, cleanup, closeAll, consoleErrors, openTab, ring,
  singleNode, startNode, startServer, streamOne, waitFor, waitReady,
} from "./lib.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const artifacts = join(root, "target", "browser-artifacts");
mkdirSync(artifacts, { recursive: true });
const { default: jsQR } = await import("jsqr");
const { PNG } = await import("pngjs");

const model = execFileSync(MDI, ["fetch"], { encoding: "utf8" }).trim();
const expected = singleNode(QUESTION);
const t0 = Date.now();
const elapsed = () => `${((Date.now() - t0) / 1000).toFixed(0)} s`;

const PHONE = { width: 390, height: 844, isMobile: true, hasTouch: true, deviceScaleFactor: 2 };
const LAPTOP = { width: 1280, height: 900 };

async function mapOf(page) {
  return page.$$eval("#ring-nodes .node", (gs) =>
    gs.map((g) => ({ name: g.dataset.name, kind: g.dataset.kind, layers: g.dataset.layers })));
}

function coversModel(nodes, nLayers) {
  const ranges = nodes.map((n) => n.layers.split("-").map(Number)).sort((a, b) => a[0] - b[0]);
  let at = 0;
  for (const [a, b] of ranges) {
    if (a !== at || b <= a) return false;
    at = b;
  }
  return at === nLayers;
}

// ---- 1. Phone and laptop, the ring map, the QR code.
{
  const { url } = await startServer([
    "--model", model, "--token", TOKEN, "--min-nodes", "3", "--wire", "f32",
    "--local-nodes", "1", "--backend", "oracle",
  ]);
  const laptop = await openTab(url, "laptop", { viewport: LAPTOP });
  const phone = await openTab(url, "phone", { viewport: PHONE });
  await waitReady(url, 3);
  for (const tab of [laptop, phone]) {
    assert.equal(await chatInPage(tab.page, QUESTION), expected, `${tab.name}'s chat box`);
    const map = await waitFor(`${tab.name}'s ring map`, 10_000, async () => {
      const m = await mapOf(tab.page);
      return m.length === 3 && m.every((n) => n.layers) ? m : false;
    });
    assert.ok(coversModel(map, 30), `the map's layers cover the model once: ${JSON.stringify(map)}`);
    assert.deepEqual(map.map((n) => n.kind).sort(), ["browser", "browser", "native"]);
    writeFileSync(join(artifacts, `${tab.name}.png`), await tab.page.screenshot({ fullPage: true }));
  }
  // The QR code, as a camera would read it.
  const qr = await laptop.page.$("#qr svg");
  const png = PNG.sync.read(Buffer.from(await qr.screenshot({ type: "png" })));
  const decoded = jsQR(new Uint8ClampedArray(png.data), png.width, png.height);
  assert.ok(decoded, "the QR code decodes");
  const link = await laptop.page.$eval("#join-url", (e) => e.value);
  assert.equal(decoded.data, link);
  assert.ok(link.startsWith(url) && link.includes("room=default") && link.includes(`token=${TOKEN}`), link);
  // A fresh profile opening the link joins (planned in when the ring is idle).
  await openTab(url, "scanned", { href: link, viewport: PHONE });
  const r = await waitReady(url, 4);
  assert.equal(r.nodes.filter((n) => n.kind === "browser").length, 3);
  assert.equal(await apiAnswer(url, QUESTION), expected);
  console.log(`phone and laptop pages, QR join: ok (${elapsed()})`);
  await closeAll();
}

// ---- 2. HTTPS with a certificate made at start.
{
  const { url, fingerprint, spki } = await startServer([
    "--model", model, "--token", TOKEN, "--min-nodes", "2", "--wire", "f32", "--tls",
  ]);
  assert.ok(url.startsWith("https://"), url);
  assert.ok(fingerprint && spki, "the server printed its certificate's fingerprint and key hash");
  startNode(url, "pinned", "oracle", ["--fingerprint", fingerprint]);
  const tab = await openTab(url, "secure", { args: [`--ignore-certificate-errors-spki-list=${spki}`] });
  const secure = await tab.page.evaluate(() => ({ secure: isSecureContext, gpu: !!navigator.gpu }));
  assert.deepEqual(secure, { secure: true, gpu: true }, "https gives the page a secure context and WebGPU");
  await waitFor("a ready ring over https", 300_000, async () => {
    const r = await tab.page.evaluate(async () => (await fetch("/api/ring")).json());
    return r.ready && r.nodes.length === 2 && r.nodes.some((n) => n.kind === "browser" && n.backend === "gpu");
  });
  assert.equal(await chatInPage(tab.page, QUESTION), expected);
  console.log(`https: ok (${elapsed()})`);
  await closeAll();
}

// ---- 3. A hidden tab keeps serving.
{
  const { url } = await startServer([
    "--model", model, "--token", TOKEN, "--min-nodes", "2", "--local-nodes", "1", "--backend", "oracle",
  ]);
  const tab = await openTab(url, "hidden", { keepAwake: false });
  await waitReady(url, 2);
  const visible = await streamOne(url, "Write a short poem about the sea.", 24);
  const front = await tab.browser.newPage();
  await front.bringToFront();
  assert.equal(await tab.page.evaluate(() => document.visibilityState), "hidden");
  const hidden = await streamOne(url, "Write a short poem about the sea.", 24);
  const rate = (s) => (s.tokens - 1) / ((s.end - s.ttft) / 1000);
  assert.ok(hidden.tokens > 0, "the ring with a hidden tab still answers");
  console.log(
    `hidden tab: decode ${rate(hidden).toFixed(2)} tok/s hidden, ${rate(visible).toFixed(2)} tok/s visible ` +
      `(${((100 * rate(hidden)) / rate(visible)).toFixed(0)}%) (${elapsed()})`,
  );
  await closeAll();
}

assert.deepEqual(consoleErrors, [], "no console errors");
console.log("page tests passed");
cleanup();
process.exit(0);
