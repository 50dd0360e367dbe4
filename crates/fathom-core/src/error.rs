//! One error type for everything read from disk: each variant names the file, and the field or
//! tensor at fault, so a user can fix the checkpoint rather than guess.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FathomError {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: field `{field}`: {msg}")]
    Config {
        file: PathBuf,
        field: String,
        msg: String,
    },
    #[error("{file}: tensor `{tensor}`: {msg}")]
    Weights {
        file: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error("{file}: {msg}")]
    Tokenizer { file: PathBuf, msg: String },
    #[error("chat template: {0}")]
    Template(String),
    /// A load error already phrased with its file and tensor (passed through candle's VarBuilder).
    #[error("{0}")]
    Load(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl FathomError {
    pub fn io(file: &Path, source: std::io::Error) -> Self {
        FathomError::Io {
            file: file.to_path_buf(),
            source,
        }
    }
    pub fn weights(file: &Path, tensor: &str, msg: impl Into<String>) -> Self {
        FathomError::Weights {
            file: file.to_path_buf(),
            tensor: tensor.to_string(),
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, FathomError>;
