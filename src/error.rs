//! One error type for the whole crate, modelled on tokio-postgres' `Error`: a boxed inner
//! value with a private kind, an optional cause and extra JSON fields for the response.
//! Errors are built through constructors named after what happened. Every error a client
//! can see is mapped to an HTTP status in exactly one place, [`Error::status`], so a new
//! failure mode cannot accidentally become a 500; PostgreSQL errors are classified in
//! exactly one place too, [`classify_postgres`].

use std::error::Error as StdError;
use std::fmt;

use serde_json::Value;

/// What went wrong, coarsely enough to choose an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// The client sent something invalid (400).
    BadRequest,
    /// The route or the resource does not exist (404).
    NotFound,
    /// The route exists with these other methods (405, with an `Allow` header).
    MethodNotAllowed { allow: String },
    /// The request conflicts with the current state: stock, price (409).
    Conflict,
    /// The body is larger than the limit (413).
    PayloadTooLarge,
    /// The body is not declared as JSON (415).
    UnsupportedMediaType,
    /// An idempotency key was reused with another request (422).
    Unprocessable,
    /// A dependency (database, broker) is unreachable or timed out (503).
    Unavailable,
    /// A configuration value is malformed (start-up only).
    Config,
    /// A stop was requested while waiting (start-up only).
    Stopped,
    /// A bug or an unexpected server-side failure (500).
    Internal,
}

struct Inner {
    kind: Kind,
    message: String,
    fields: Vec<(&'static str, Value)>,
    cause: Option<Box<dyn StdError + Send + Sync>>,
}

/// The crate's error: a kind, a human-readable sentence and optional extra fields.
pub struct Error(Box<Inner>);

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    fn new(kind: Kind, message: impl Into<String>) -> Error {
        Error(Box::new(Inner {
            kind,
            message: message.into(),
            fields: Vec::new(),
            cause: None,
        }))
    }

    pub fn bad_request(message: impl Into<String>) -> Error {
        Error::new(Kind::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(Kind::NotFound, message)
    }

    /// The route exists, with the methods `allow` (the `Allow` header's value).
    pub fn method_not_allowed(allow: &str) -> Error {
        Error::new(
            Kind::MethodNotAllowed {
                allow: allow.to_string(),
            },
            format!("method not allowed; use {allow}"),
        )
    }

    pub fn conflict(message: impl Into<String>) -> Error {
        Error::new(Kind::Conflict, message)
    }

    pub fn payload_too_large(message: impl Into<String>) -> Error {
        Error::new(Kind::PayloadTooLarge, message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Error {
        Error::new(Kind::UnsupportedMediaType, message)
    }

    pub fn unprocessable(message: impl Into<String>) -> Error {
        Error::new(Kind::Unprocessable, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Error {
        Error::new(Kind::Unavailable, message)
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(Kind::Internal, message)
    }

    pub fn config(message: impl Into<String>) -> Error {
        Error::new(Kind::Config, message)
    }

    /// A stop was requested while `what` was still being waited for.
    pub fn stopped(what: &str) -> Error {
        Error::new(Kind::Stopped, format!("stopped while waiting for {what}"))
    }

    /// Adds a field to the JSON error body, beside `error`.
    pub fn with_field(mut self, name: &'static str, value: impl Into<Value>) -> Error {
        self.0.fields.push((name, value.into()));
        self
    }

    pub fn with_cause(mut self, cause: impl StdError + Send + Sync + 'static) -> Error {
        self.0.cause = Some(Box::new(cause));
        self
    }

    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The methods the route allows, for the `Allow` header of a 405.
    pub fn allow(&self) -> Option<&str> {
        match &self.0.kind {
            Kind::MethodNotAllowed { allow } => Some(allow),
            _ => None,
        }
    }

    /// True for a malformed configuration: the binary exits with code 2.
    pub fn is_config(&self) -> bool {
        self.0.kind == Kind::Config
    }

    /// True when a stop was requested while waiting ([`Error::stopped`]).
    pub fn is_stopped(&self) -> bool {
        self.0.kind == Kind::Stopped
    }

    /// True when retrying the same work later may succeed (connection loss, deadlock, timeout).
    pub fn is_transient(&self) -> bool {
        self.0.kind == Kind::Unavailable
    }

    /// The HTTP status for this error: the one place where kinds become statuses.
    pub fn status(&self) -> u16 {
        match self.0.kind {
            Kind::BadRequest => 400,
            Kind::NotFound => 404,
            Kind::MethodNotAllowed { .. } => 405,
            Kind::Conflict => 409,
            Kind::PayloadTooLarge => 413,
            Kind::UnsupportedMediaType => 415,
            Kind::Unprocessable => 422,
            Kind::Unavailable => 503,
            Kind::Config | Kind::Stopped | Kind::Internal => 500,
        }
    }

    /// The JSON body clients see: `{"error": "...", <fields>}`. Internal details stay in the log.
    pub fn to_json(&self) -> String {
        let mut body = serde_json::Map::new();
        let message = match self.0.kind {
            Kind::Internal | Kind::Config | Kind::Stopped => "internal error".to_string(),
            _ => self.0.message.clone(),
        };
        body.insert("error".into(), Value::String(message));
        if let Some(allow) = self.allow() {
            body.insert("allowed".into(), Value::String(allow.to_string()));
        }
        for (name, value) in &self.0.fields {
            body.insert((*name).into(), value.clone());
        }
        Value::Object(body).to_string()
    }
}

/// The message of a panic's payload (what `panic!` was given), for logs.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "a panic without a message"
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.0.kind)
            .field("message", &self.0.message)
            .field("cause", &self.0.cause)
            .finish()
    }
}

/// The message, then the cause. A PostgreSQL error shows its SQLSTATE and the server's
/// message (`55P03 canceling statement due to lock timeout`), which `postgres::Error`'s
/// own `Display` hides behind "db error"; its other errors show their source too.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)?;
        let Some(cause) = &self.0.cause else {
            return Ok(());
        };
        match cause.downcast_ref::<postgres::Error>() {
            Some(pg) => match pg.as_db_error() {
                Some(db) => write!(f, ": {} {}", db.code().code(), db.message()),
                None => match pg.source() {
                    Some(source) => write!(f, ": {pg}: {source}"),
                    None => write!(f, ": {pg}"),
                },
            },
            None => write!(f, ": {cause}"),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0
            .cause
            .as_ref()
            .map(|e| &**e as &(dyn StdError + 'static))
    }
}

/// What a PostgreSQL error means to whoever would retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostgresFailure {
    /// The connection itself is gone (closed socket, or the server ended the session):
    /// nothing sent on it after the last commit can have committed.
    ConnectionLost,
    /// The server refused for now (overload, deadlock, serialization, lock or idle
    /// timeout): the same work may succeed later.
    Transient,
    /// The statement itself failed: retrying it changes nothing.
    Permanent,
}

/// Classifies a PostgreSQL error: the one place SQLSTATEs are interpreted.
pub fn classify_postgres(e: &postgres::Error) -> PostgresFailure {
    use postgres::error::SqlState;
    let Some(code) = e.code().filter(|_| !e.is_closed()) else {
        return PostgresFailure::ConnectionLost;
    };
    let class = code.code();
    if class.starts_with("57P") {
        PostgresFailure::ConnectionLost
    } else if class.starts_with("08")
        || class.starts_with("57")
        || class.starts_with("53")
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
    {
        PostgresFailure::Transient
    } else {
        PostgresFailure::Permanent
    }
}

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        let error = match classify_postgres(&e) {
            PostgresFailure::ConnectionLost | PostgresFailure::Transient => {
                Error::unavailable("database error")
            }
            PostgresFailure::Permanent => Error::internal("database error"),
        };
        error.with_cause(e)
    }
}

impl From<r2d2::Error> for Error {
    fn from(e: r2d2::Error) -> Error {
        Error::unavailable("database unavailable").with_cause(e)
    }
}

impl From<amiquip::Error> for Error {
    fn from(e: amiquip::Error) -> Error {
        Error::unavailable("broker error").with_cause(e)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::unavailable("i/o error").with_cause(e)
    }
}
