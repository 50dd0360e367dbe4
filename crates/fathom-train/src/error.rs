//! Training errors: each names the file, field or step at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{file}: {msg}")]
    Config { file: String, msg: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    #[error("step {step}: loss is {value}; stopped. The last good checkpoint is kept{}",
        last_good.as_ref().map(|p| format!(" at {}", p.display())).unwrap_or_default())]
    NonFinite {
        step: usize,
        value: f64,
        last_good: Option<PathBuf>,
    },
    #[error(transparent)]
    Core(#[from] fathom_core::FathomError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, TrainError>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
