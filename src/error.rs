//! The library's error type: every failure a user can cause names what went wrong and where.

use std::path::PathBuf;

/// Errors raised by the wordloom library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },

    #[error("model `{0}` not found: give a directory with config.json, a .gguf file, or a hub id `org/name`")]
    ModelNotFound(String),

    #[error("unsupported architecture `{found}` (supported: {supported})")]
    UnsupportedArchitecture {
        found: String,
        supported: &'static str,
    },

    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },

    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    ChatTemplate(String),

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error(
        "the prompt has {prompt_tokens} tokens but the model's context window is {context} tokens"
    )]
    ContextOverflow {
        prompt_tokens: usize,
        context: usize,
    },

    #[error("hub: {0}")]
    Hub(String),

    #[error("remote API: {0}")]
    Remote(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::File {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}
