#!/usr/bin/env bash
# Runs the GPU kernel and engine tests (gpu/tests/kernels_match_cpu_reference.rs,
# gpu/tests/engine_matches_oracle_on_every_target.rs) compiled to wasm32 inside
# headless Chromium, on its WebGPU adapter (SwiftShader without a GPU: no shader-f16, at most 256
# invocations per workgroup), with wasm-bindgen-test-runner driving Chromium via chromedriver.
# The same test bodies run natively in scripts/test.sh. A missing WebGPU adapter fails the tests.
# Extra arguments go to the GPU tests' harness (e.g. `--nocapture`, or a test-name filter).
# Then the CPU engine's kernel tests (cpu/tests/kernels_match_scalar_and_oracle.rs) compiled to
# wasm32, with and without simd128, run in Node.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

export CHROMEDRIVER="${CHROMEDRIVER:-/usr/bin/chromedriver}"
# Chromium's flags (WebGPU on, no background traffic); the runner adds headless and no-sandbox.
export WASM_BINDGEN_TEST_WEBDRIVER_JSON="$PWD/gpu/webdriver.json"
# The runner's default of 20 s for the whole page is too short for SwiftShader.
export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-600}"
# Set here rather than in .cargo/config.toml so native builds and tests are unaffected.
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test -p mdi-gpu --target wasm32-unknown-unknown --release \
  --test kernels_match_cpu_reference --test engine_matches_oracle_on_every_target \
  -- "$@" 2>&1 | tee "$log"
# A cfg slip can compile the wrappers away, and the runner passes when there is nothing to run.
if [ "$(grep -Ec 'test result: ok\. [1-9][0-9]* passed' "$log")" -lt 2 ]; then
  echo "test-browser: no kernel test ran in the browser" >&2
  exit 1
fi

# The CPU engine's kernel tests compiled to wasm32 and run in Node: with simd128 (the kernels
# of the page's SIMD bundle, in the target folder `npm run build` uses for it) and without (the
# plain bundle's scalar kernels). The simd128 run fails if that set is not the one chosen.
for simd in yes no; do
  flags=()
  if [ "$simd" = yes ]; then
    flags=(CARGO_TARGET_DIR="$PWD/target/wasm-simd" RUSTFLAGS="-C target-feature=+simd128")
  fi
  env "${flags[@]}" cargo test -p mdi-cpu --target wasm32-unknown-unknown --release \
    --test kernels_match_scalar_and_oracle 2>&1 | tee "$log"
  if ! grep -Eq 'test result: ok\. [1-9][0-9]* passed' "$log"; then
    echo "test-browser: no CPU kernel test ran in wasm32 (simd128: $simd)" >&2
    exit 1
  fi
done
