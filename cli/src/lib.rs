//! Native side of the `mdi` command: files as byte sources, opening a model from disk, the
//! default-model cache, and the generation loop shared by the CLI and the tests.

pub mod bench;
pub mod bench_api;
pub mod bench_cluster;
pub mod bench_recovery;
pub mod chat;
pub mod fetch;
pub mod files;
pub mod generate;
pub mod progress;
pub mod ring;

pub use files::{open_model, FileSource, Model};
