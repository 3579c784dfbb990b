//! One error type for the core crate. Every variant carries the context a user needs to act:
//! which file, which tensor, which shapes.

/// Errors raised while reading weights, building a tokenizer or running the oracle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The byte source could not deliver a range (I/O error, HTTP error, short read).
    #[error("{source_name}: cannot read bytes {start}..{end}: {reason}")]
    Read {
        source_name: String,
        start: u64,
        end: u64,
        reason: String,
    },
    /// The file ended before a structure it declares.
    #[error("{file}: truncated: {what} needs bytes up to {needed} but the file has {len}")]
    Truncated {
        file: String,
        what: String,
        needed: u64,
        len: u64,
    },
    /// The file is not in the format it claims, or a field holds an impossible value.
    #[error("{file}: {what}")]
    Format { file: String, what: String },
    /// A tensor the model needs is not in the file.
    #[error("{file}: missing tensor `{tensor}`")]
    MissingTensor { file: String, tensor: String },
    /// A tensor has a shape other than the model configuration implies.
    #[error("{file}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    Shape {
        file: String,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// A tensor is stored in a type this build does not handle.
    #[error("{file}: tensor `{tensor}` has unsupported type {dtype}")]
    UnsupportedType {
        file: String,
        tensor: String,
        dtype: String,
    },
    /// The model configuration is missing a key or holds an inconsistent value.
    #[error("model config: {0}")]
    Config(String),
    /// Tokenizer construction, encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// A sequence asked for a position past the context it was given.
    #[error("sequence needs position {position} but its context holds {context} positions")]
    ContextFull { position: usize, context: usize },
    /// A message from a peer could not be decoded.
    #[error("wire: {0}")]
    Wire(String),
    /// A caller passed inputs that do not fit the engine (wrong hidden size, bad layer range).
    #[error("invalid input: {0}")]
    Input(String),
    /// The engine itself failed: a GPU device error (lost device, out of memory, validation)
    /// or a compute thread that went away.
    #[error("engine: {0}")]
    Engine(String),
}

/// Result alias for the core crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn format(file: &str, what: impl Into<String>) -> Self {
        Error::Format {
            file: file.to_string(),
            what: what.into(),
        }
    }
}
