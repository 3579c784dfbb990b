#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, the golden end-to-end tests on the default
# model (fetched into the cache on first use), the GPU kernel tests (on lavapipe when the
# machine has no GPU), rings of real processes, and browser nodes in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The Vulkan loader complains without a private runtime folder.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "${XDG_RUNTIME_DIR}" ]; then
  XDG_RUNTIME_DIR="$(mktemp -d)"
  chmod 700 "$XDG_RUNTIME_DIR"
  export XDG_RUNTIME_DIR
fi
cargo test --workspace --release "$@"
# The same GPU kernel and engine tests again, compiled to wasm32, in headless Chromium's WebGPU;
# the CPU kernel tests compiled to wasm32 (with and without simd128) in Node.
scripts/test-browser.sh
# Browser nodes end to end: the tab's wasm bundle, then rings of headless Chromium tabs and
# native nodes (binaries from the cargo test run above).
npm run build
npm run test:browser
