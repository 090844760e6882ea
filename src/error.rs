//! The library's error type. Every variant names what went wrong and where
//! (a file, a tensor, a flag), so the binary can print one line and exit.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be opened, read or written. (The I/O error is part
    /// of the message, not a separate `source`, so it is printed once.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// The file was read, but its contents are wrong (truncated, corrupt, a
    /// tensor of the wrong shape, a missing or mistyped field).
    #[error("{}: {msg}", path.display())]
    Format { path: PathBuf, msg: String },
    /// A well-formed input asks for something engine does not do.
    #[error("{0}")]
    Unsupported(String),
    /// A bad argument or request.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, err: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            err,
        }
    }

    pub fn format(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}
