//! Fuzzing on stable Rust for everything a node or the server reads from outside: model files
//! (GGUF, safetensors with `config.json`, the manifest), activation frames through the wire
//! decoder, the reassembler and the node and starter state machines, the links' credit and
//! control messages, the signaling JSON, and chat templates with their messages.
//!
//! No nightly toolchain and no libFuzzer: [`engine`] is a small mutation fuzzer with
//! behaviour-guided corpus growth, the ring and credit targets decode raw bytes into whole
//! message sequences with `arbitrary`, and [`meter`] is this crate's global allocator, which
//! measures each input's peak live bytes so an input that makes the code allocate beyond the
//! limit its configuration implies fails like a panic does.
//!
//! `cargo test -p mdi-fuzz` runs every target briefly (100 000 inputs each by default,
//! `MDI_FUZZ_INPUTS` to change); `scripts/fuzz.sh` runs them long.

pub mod engine;
pub mod meter;
pub mod targets;

#[global_allocator]
static ALLOC: meter::Counting = meter::Counting;
