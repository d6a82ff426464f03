//! Errors of agent operations, as the CLI shows them.

use super::*;

/// An error of an agent operation, as the CLI shows it.
pub type OpError = ErrorReply;
pub(super) type OpResult<T> = Result<T, OpError>;

pub(super) fn err(code: ErrorCode, message: impl Into<String>) -> OpError {
    ErrorReply {
        code,
        message: message.into(),
    }
}

pub(super) fn failed(e: impl std::fmt::Display) -> OpError {
    err(ErrorCode::Failed, e.to_string())
}

impl From<ClientError> for ErrorReply {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Remote { kind, .. } => match kind {
                ErrorKind::NotFound => ErrorCode::NotFound,
                ErrorKind::AlreadyExists => ErrorCode::Exists,
                ErrorKind::Invalid => ErrorCode::Invalid,
                ErrorKind::Corrupt => ErrorCode::Verify,
                _ => ErrorCode::Failed,
            },
            _ => ErrorCode::Failed,
        };
        err(code, e.to_string())
    }
}

impl From<FetchError> for ErrorReply {
    fn from(e: FetchError) -> Self {
        let code = match e {
            FetchError::Corrupt(_) => ErrorCode::Verify,
            _ => ErrorCode::Failed,
        };
        err(code, format!("download failed: {e}"))
    }
}

/// A failure to read a tree (a mount, an upper layer, a local directory to put): bad input
/// when the tree is at fault, else a failure (a full local disk says so).
pub(super) fn scan_err(e: scan::ScanError, context: &str) -> OpError {
    let code = if e.is_input() {
        ErrorCode::Invalid
    } else {
        ErrorCode::Failed
    };
    err(code, format!("{context}{e}"))
}

pub(super) fn db_err(e: impl std::fmt::Display) -> OpError {
    failed(format!("agent database: {e}"))
}
