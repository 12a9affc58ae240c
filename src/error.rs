//! The crate's one error type. The Python layer maps each variant to a Python exception in one place
//! (`src/python/errors.rs`), so messages here are written for the user who will read them.

use std::path::PathBuf;

/// Everything that can go wrong in the core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder the caller named does not exist.
    #[error("{what} not found: {path}")]
    NotFound { what: String, path: PathBuf },

    /// An operating-system error while reading or writing a file.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// A configuration file or field is malformed or unsupported.
    #[error("{0}")]
    Config(String),

    /// A checkpoint tensor is missing, unexpected, or has the wrong shape or type.
    #[error("{0}")]
    Checkpoint(String),

    /// A caller passed an argument that cannot be used (wrong shape, range, type or value).
    #[error("{0}")]
    InvalidArgument(String),

    /// An argument has the wrong type (e.g. a float tensor where token ids are expected).
    #[error("{0}")]
    Type(String),

    /// The requested feature or device is not available here.
    #[error("{0}")]
    Unsupported(String),

    /// A request needs more memory than the machine has (said before allocating); a `MemoryError` in Python.
    #[error("{0}")]
    OutOfMemory(String),

    /// The model is in use by another call (training or generating) and cannot be used until it returns.
    #[error("{0}")]
    Busy(String),

    /// Code the caller handed in (a Python callback, a collective) raised; the bindings re-raise the
    /// caller's own exception, this says where it came from.
    #[error("{0}")]
    Callback(String),

    /// An error raised inside libtorch.
    #[error("libtorch error: {}", torch_message(.0))]
    Torch(#[from] tch::TchError),
}

/// libtorch's message without the C++ backtrace it appends.
fn torch_message(e: &tch::TchError) -> String {
    let text = e.to_string();
    let cut = text.find("\nException raised from").unwrap_or(text.len());
    text[..cut].trim_end().to_string()
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
    pub fn checkpoint(msg: impl Into<String>) -> Self {
        Error::Checkpoint(msg.into())
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    pub fn type_error(msg: impl Into<String>) -> Self {
        Error::Type(msg.into())
    }
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
    pub fn not_found(what: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Error::NotFound {
            what: what.into(),
            path: path.into(),
        }
    }
}
