//! The fuzz targets, one per kind of outside input.

mod chat;
mod control;
mod files;
mod model;
mod protocol;
mod ring;

pub use chat::ChatTarget;
pub use control::ControlTarget;
pub use files::{GgufTarget, SafetensorsTarget};
pub use protocol::ProtocolTarget;
pub use ring::RingTarget;

use crate::engine::Target;

/// Every target's name.
pub const NAMES: [&str; 6] = ["gguf", "safetensors", "ring", "control", "protocol", "chat"];

/// The target called `name`.
pub fn by_name(name: &str) -> Option<Box<dyn Target>> {
    Some(match name {
        "gguf" => Box::new(GgufTarget::new()),
        "safetensors" => Box::new(SafetensorsTarget::new()),
        "ring" => Box::new(RingTarget),
        "control" => Box::new(ControlTarget),
        "protocol" => Box::new(ProtocolTarget::new()),
        "chat" => Box::new(ChatTarget),
        _ => return None,
    })
}
