//! One error type for the whole crate, modelled on tokio-postgres' `Error`: a boxed inner
//! value with a private kind, an optional cause and extra JSON fields for the response.
//! Every error a client can see is mapped to an HTTP status in exactly one place,
//! [`Error::status`], so a new failure mode cannot accidentally become a 500.

use std::error::Error as StdError;
use std::fmt;

use serde_json::Value;

/// What went wrong, coarsely enough to choose an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The client sent something invalid (400).
    BadRequest,
    /// The route or the resource does not exist (404).
    NotFound,
    /// The route exists with another method (405).
    MethodNotAllowed,
    /// The request conflicts with the current state: a client price that is not the
    /// catalogue's (409). (Insufficient stock is a 400, as in the original system.)
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
    pub fn new(kind: Kind, message: impl Into<String>) -> Error {
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

    pub fn conflict(message: impl Into<String>) -> Error {
        Error::new(Kind::Conflict, message)
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

    /// Adds a field to the JSON error body, beside `error`.
    pub fn with_field(mut self, name: &'static str, value: impl Into<Value>) -> Error {
        self.0.fields.push((name, value.into()));
        self
    }

    pub fn with_cause(mut self, cause: impl StdError + Send + Sync + 'static) -> Error {
        self.0.cause = Some(Box::new(cause));
        self
    }

    /// The extra field `name` of the JSON body, if set.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.0
            .fields
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    pub fn kind(&self) -> Kind {
        self.0.kind
    }

    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The HTTP status for this error: the one place where kinds become statuses.
    pub fn status(&self) -> u16 {
        match self.0.kind {
            Kind::BadRequest => 400,
            Kind::NotFound => 404,
            Kind::MethodNotAllowed => 405,
            Kind::Conflict => 409,
            Kind::PayloadTooLarge => 413,
            Kind::UnsupportedMediaType => 415,
            Kind::Unprocessable => 422,
            Kind::Unavailable => 503,
            Kind::Config | Kind::Internal => 500,
        }
    }

    /// The JSON body clients see: `{"error": "...", <fields>}`. Internal details stay in the log.
    pub fn to_json(&self) -> String {
        let mut body = serde_json::Map::new();
        let message = match self.0.kind {
            Kind::Internal | Kind::Config => "internal error".to_string(),
            _ => self.0.message.clone(),
        };
        body.insert("error".into(), Value::String(message));
        for (name, value) in &self.0.fields {
            body.insert((*name).into(), value.clone());
        }
        Value::Object(body).to_string()
    }

    /// True when retrying the same work later may succeed (connection loss, deadlock, timeout).
    pub fn is_transient(&self) -> bool {
        self.0.kind == Kind::Unavailable
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

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.message)?;
        if let Some(cause) = &self.0.cause {
            write!(f, ": {cause}")?;
        }
        Ok(())
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

impl From<postgres::Error> for Error {
    fn from(e: postgres::Error) -> Error {
        use postgres::error::SqlState;
        let transient = e.is_closed()
            || e.as_db_error().is_none()
            || e.code().is_some_and(|c| {
                let code = c.code();
                code.starts_with("08")
                    || code.starts_with("57")
                    || code.starts_with("53")
                    || *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::LOCK_NOT_AVAILABLE
                    || *c == SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT
            });
        let kind = if transient {
            Kind::Unavailable
        } else {
            Kind::Internal
        };
        Error::new(kind, "database error").with_cause(e)
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
