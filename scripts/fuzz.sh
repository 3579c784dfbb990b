#!/usr/bin/env bash
# Long fuzz runs of every reader of outside input (model files, activation frames, control and
# signaling messages, chat templates) on stable Rust. Arguments go to mdi-fuzz, e.g.
#   scripts/fuzz.sh --target ring --inputs 10000000 --jobs 2
# Failing inputs are written under fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -p mdi-fuzz -- "${@:---inputs 10000000}"
