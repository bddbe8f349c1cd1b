//! The API's one error shape:
//! `{"error": "<code>", "message": "<for people>", "fields": {"<field>": ["<problem>", …]}}`
//! (`fields` is `{}` unless the request had bad fields). Nothing here carries
//! a secret or a database message other than the validation ones.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::db::subscribers::{FieldErrors, StoreError};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub fields: FieldErrors,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            fields: FieldErrors::new(),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// Unknown ids, malformed ids and other owners' ids look the same.
    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such subscription")
    }

    pub fn no_route() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not take that method",
        )
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body may be at most {limit} bytes"),
        )
    }

    pub fn invalid(fields: FieldErrors) -> ApiError {
        let names: Vec<&str> = fields.keys().map(String::as_str).collect();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid",
            message: format!("invalid fields: {}", names.join(", ")),
            fields,
        }
    }

    pub fn internal(error: &dyn std::error::Error) -> ApiError {
        tracing::error!(%error, "api request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the request could not be completed; see the daemon's log",
        )
    }

    /// A database error: 503 when waiting or reconnecting may help (a row
    /// locked past the API's `lock_timeout`, a statement past its
    /// `statement_timeout`, a lost connection), else 500. The log gets the
    /// server's code and message, never its detail, which may quote values.
    fn database(error: &tokio_postgres::Error) -> ApiError {
        use tokio_postgres::error::SqlState;
        let Some(db) = error.as_db_error() else {
            tracing::warn!(error = %crate::db::Why(error), "api request failed: the database cannot be reached");
            return ApiError::unavailable("the database cannot be reached; try again");
        };
        let code = db.code();
        // Class 53: out of connections, memory or disk; 40001 and 40P01
        // lose to a concurrent transaction; all of them pass.
        if [
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::QUERY_CANCELED,
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
        ]
        .contains(code)
            || ["08", "53", "57P"]
                .iter()
                .any(|class| code.code().starts_with(class))
        {
            tracing::warn!(
                code = code.code(),
                message = db.message(),
                "api request failed for now"
            );
            return ApiError::unavailable(
                "the database is busy (a row is locked, or the server is slow); try again",
            );
        }
        tracing::error!(
            code = code.code(),
            message = db.message(),
            "api request failed"
        );
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the request could not be completed; see the daemon's log",
        )
    }

    pub fn unavailable(message: &str) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl From<tokio_postgres::Error> for ApiError {
    fn from(error: tokio_postgres::Error) -> ApiError {
        ApiError::database(&error)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        match error {
            StoreError::Invalid(fields) => ApiError::invalid(fields),
            StoreError::FromConfig(message) => {
                ApiError::new(StatusCode::CONFLICT, "from_config", message)
            }
            StoreError::OperatorOff(message) => {
                ApiError::new(StatusCode::CONFLICT, "operator_off", message)
            }
            StoreError::Db(error) => ApiError::database(&error),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.code,
            "message": self.message,
            "fields": self.fields,
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
