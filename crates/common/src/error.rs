//! What kind of failure an error is, so every edge can answer it the same way: the admin
//! API turns it into an HTTP status, the CLI into its exit message (docs/errors.md).

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is wrong (a bad value, an unknown item): fix it and retry.
    InvalidArgument,
    /// What the request names does not exist.
    NotFound,
    /// The request is valid but the system's state refuses it now (a check that would
    /// break something, another peer holding the role): change the state, or force it.
    Conflict,
    /// A peer or service it needs cannot be reached: retry once it is back.
    Unavailable,
    /// It was sent but no answer came in time: it may still take effect.
    Timeout,
    /// Something on this node failed (disk, key files): see its log.
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::Unavailable => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::Internal => 500,
        }
    }
}

/// An error a caller may branch on.
pub trait CodedError: std::error::Error {
    fn code(&self) -> ErrorCode;
}

/// An operator-facing refusal: a message that says what to do next, and its code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

impl CodedError for Refusal {
    fn code(&self) -> ErrorCode {
        self.code
    }
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Timeout, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

/// A plain message is a refusal of the request as given (a value that does not parse, an
/// item that cannot be set); every other kind is made with its constructor.
impl From<String> for Refusal {
    fn from(message: String) -> Self {
        Self::invalid(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_code_has_its_own_status() {
        let all = [
            ErrorCode::InvalidArgument,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::Unavailable,
            ErrorCode::Timeout,
            ErrorCode::Internal,
        ];
        let mut statuses: Vec<u16> = all.iter().map(|c| c.http_status()).collect();
        statuses.dedup();
        assert_eq!(statuses.len(), all.len());
        assert_eq!(
            serde_json::to_string(&ErrorCode::InvalidArgument).unwrap(),
            "\"invalid_argument\""
        );
    }
}
