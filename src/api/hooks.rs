//! Thorn's REST views: `/hooks/` (POST subscribe, GET list) and
//! `/hooks/{id}/` (GET, PUT, PATCH, DELETE), scoped to the caller.
//!
//! Order of checks on every route: the token (401), then the id (unknown,
//! malformed or another owner's: 404, indistinguishable), then the body
//! (400 naming every bad field). Validity comes from the database
//! ([`subscribers::problems`]); the URL is also checked against the address
//! guard, so a subscription that could never be delivered is refused now.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::uri::Authority;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::auth::Caller;
use super::errors::ApiError;
use super::Api;
use crate::db::subscribers::{self, Changes, FieldErrors, Subscription};
use crate::sign::Secret;

/// A subscription as the API shows it: the row, Thorn's name for its
/// owner (`user`, so Thorn's clients keep reading it) and its own URL.
#[derive(Serialize)]
struct View {
    #[serde(flatten)]
    row: Subscription,
    user: Option<String>,
    subscription: String,
}

/// A subscription's own URL: under `api.public_url`, else under the Host
/// the request named, if it is a host and port (not markup to echo).
fn link(api: &Api, headers: &HeaderMap, id: Uuid) -> String {
    let base = match &api.public_url {
        Some(base) => base.trim_end_matches('/').to_owned(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| h.parse::<Authority>().is_ok_and(|a| a.as_str() == *h))
                .filter(|h| !h.contains('@'))
                .unwrap_or("localhost");
            format!("http://{host}")
        }
    };
    format!("{base}/hooks/{id}/")
}

fn view(api: &Api, headers: &HeaderMap, row: Subscription) -> View {
    let subscription = link(api, headers, row.id);
    View {
        user: row.owner.clone(),
        row,
        subscription,
    }
}

/// `PUT` and `POST` need every required field; `PATCH` takes any subset.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Create,
    Replace,
    Patch,
}

/// Reads the writable fields of a JSON object body, recording every field
/// of the wrong type or missing. Unknown and read-only fields are ignored,
/// as Thorn's serializer did.
fn parse_body(
    body: &[u8],
    mode: Mode,
    caller: &Caller,
) -> Result<(Changes, FieldErrors), ApiError> {
    let object: Map<String, Value> = match serde_json::from_slice(body) {
        Ok(Value::Object(o)) => o,
        Ok(_) => return Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => return Err(ApiError::bad_request(format!("the body is not JSON: {e}"))),
    };
    let mut errors = FieldErrors::new();
    let mut problem = |field: &str, message: &str| {
        errors
            .entry(field.to_owned())
            .or_default()
            .push(message.to_owned());
    };
    let mut text = |field: &str, required: bool| -> Option<String> {
        match object.get(field) {
            None if required => {
                problem(field, "this field is required");
                None
            }
            None => None,
            // PostgreSQL text cannot hold NUL.
            Some(Value::String(s)) if s.contains('\0') => {
                problem(field, "may not contain the NUL character");
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Null) => {
                problem(field, "may not be null");
                None
            }
            Some(_) => {
                problem(field, "must be a string");
                None
            }
        }
    };
    let required = mode != Mode::Patch;
    let mut changes = Changes {
        event: text("event", required),
        url: text("url", required),
        content_type: text("content_type", false),
        hmac_digest: text("hmac_digest", false),
        hmac_secret: text("hmac_secret", false).map(Secret),
        hmac_signer: text("hmac_signer", false),
        ..Changes::default()
    };
    for (field, slot) in [
        ("ordered", &mut changes.ordered),
        ("active", &mut changes.active),
    ] {
        match object.get(field) {
            None => {}
            Some(Value::Bool(b)) => *slot = Some(*b),
            Some(_) => problem(field, "must be true or false"),
        }
    }
    // `owner` is the caller's name; only an admin may file a subscription
    // under another name (or none: anonymous subscriptions receive only
    // events without a sender).
    match object.get("owner") {
        None => {}
        Some(Value::String(s)) if s.contains('\0') => {
            problem("owner", "may not contain the NUL character")
        }
        Some(Value::String(s)) if *s == caller.owner => changes.owner = Some(Some(s.clone())),
        Some(Value::String(s)) if caller.admin => changes.owner = Some(Some(s.clone())),
        Some(Value::Null) if caller.admin => changes.owner = Some(None),
        Some(Value::String(_)) | Some(Value::Null) => {
            problem("owner", "only an admin may set another owner")
        }
        Some(_) => problem("owner", "must be a string or null"),
    }
    // An admin is an operator: their switch-off holds against the owner,
    // and their switch-on lifts an operator's (only when `active` changes:
    // see subscribers::update).
    if caller.admin {
        changes.operator_off = changes.active.map(|active| !active);
    }
    if mode == Mode::Create && changes.owner.is_none() {
        changes.owner = Some(Some(caller.owner.clone()));
    }
    Ok((changes, errors))
}

/// What the address guard says of a URL being written. Asked before a
/// database connection is taken: it may wait for DNS, and the API's
/// connections are few.
async fn url_problem(api: &Api, changes: &Changes) -> Option<String> {
    api.check_url(changes.url.as_deref()?).await.err()
}

/// Collects every problem: types and required fields, the database's rules
/// for the fields that parsed, then the address guard's for a URL the
/// database accepts.
async fn validate(
    db: &tokio_postgres::Client,
    base: Option<&Subscription>,
    changes: &Changes,
    mut errors: FieldErrors,
    url_problem: Option<String>,
) -> Result<(), ApiError> {
    let found = subscribers::problems(db, base, changes).await?;
    for (field, messages) in found {
        // A field already reported as missing or mistyped was not sent.
        errors.entry(field).or_insert(messages);
    }
    if let Some(message) = url_problem {
        errors.entry("url".into()).or_insert_with(|| vec![message]);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(errors))
    }
}

/// The caller, from the request's token: extracted before anything else,
/// so that nobody without a valid token gets a body read or an id judged.
impl FromRequestParts<Arc<Api>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Arc<Api>) -> Result<Caller, ApiError> {
        api.auth.caller(&parts.headers)
    }
}

/// The `{id}` of an item route. Only the hyphenated form, as in the URLs
/// this API hands out; anything else (not even UTF-8) is a 404 like an
/// unknown id.
pub struct Id(Uuid);

impl<S: Send + Sync> FromRequestParts<S> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Id, ApiError> {
        let Ok(Path(raw)) = Path::<String>::from_request_parts(parts, state).await else {
            return Err(ApiError::not_found());
        };
        match Uuid::try_parse(&raw) {
            Ok(id) if raw.len() == 36 => Ok(Id(id)),
            _ => Err(ApiError::not_found()),
        }
    }
}

/// A subscription is a few short fields: far below this.
pub const MAX_BODY: usize = 64 * 1024;

/// Reads a request body up to [`MAX_BODY`]; item routes call it once the
/// id is known to be the caller's.
async fn read_body(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|error| {
        let too_large = std::error::Error::source(&error)
            .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
        if too_large {
            ApiError::too_large(MAX_BODY)
        } else {
            ApiError::bad_request("the request body could not be read")
        }
    })
}

/// The request body of a POST, read after the token.
pub struct Body64k(Bytes);

impl<S: Send + Sync> FromRequest<S> for Body64k {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Body64k, ApiError> {
        read_body(request.into_body()).await.map(Body64k)
    }
}

pub async fn create(
    State(api): State<Arc<Api>>,
    caller: Caller,
    headers: HeaderMap,
    Body64k(body): Body64k,
) -> Result<Response, ApiError> {
    let (changes, errors) = parse_body(&body, Mode::Create, &caller)?;
    let url_problem = url_problem(&api, &changes).await;
    let db = api.db().await?;
    validate(&db, None, &changes, errors, url_problem).await?;
    let row = subscribers::insert(&**db, &changes).await?;
    tracing::info!(subscriber = %row.id, owner = ?row.owner, event = %row.event, "subscribed through the API");
    let location = link(&api, &headers, row.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view(&api, &headers, row)),
    )
        .into_response())
}

pub async fn list(
    State(api): State<Arc<Api>>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let db = api.db().await?;
    let rows = subscribers::list(&**db, caller.scope()).await?;
    let views: Vec<View> = rows.into_iter().map(|r| view(&api, &headers, r)).collect();
    Ok(Json(views).into_response())
}

pub async fn show(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Id(id): Id,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let db = api.db().await?;
    let row = subscribers::get(&**db, id, caller.scope())
        .await?
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(view(&api, &headers, row)).into_response())
}

async fn change(
    api: &Api,
    caller: Caller,
    id: Uuid,
    headers: &HeaderMap,
    body: Body,
    mode: Mode,
) -> Result<Response, ApiError> {
    // Existence first: another owner's id is a 404 even with a bad body,
    // which is not read.
    let current = subscribers::get(&**api.db().await?, id, caller.scope())
        .await?
        .ok_or_else(ApiError::not_found)?;
    let body = read_body(body).await?;
    let (changes, errors) = parse_body(&body, mode, &caller)?;
    let mut url_problem = url_problem(api, &changes).await;
    // A URL the guard refuses, written back as the row has it (GET, edit,
    // PUT of an operator's subscription), is kept: the UPDATE checks that
    // the row still has it, or it is refused after all.
    let kept_url = url_problem.take_if(|_| changes.url.as_deref() == Some(current.url.as_str()));
    let db = api.db().await?;
    validate(&db, Some(&current), &changes, errors, url_problem).await?;
    let row = subscribers::update(&**db, id, caller.scope(), &changes, kept_url.is_some()).await?;
    match (row, kept_url) {
        (Some(row), _) => Ok(Json(view(api, headers, row)).into_response()),
        (None, Some(problem)) if subscribers::get(&**db, id, caller.scope()).await?.is_some() => {
            Err(ApiError::invalid(
                [("url".to_owned(), vec![problem])].into(),
            ))
        }
        (None, _) => Err(ApiError::not_found()),
    }
}

pub async fn replace(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Id(id): Id,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    change(&api, caller, id, &headers, body, Mode::Replace).await
}

pub async fn patch(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Id(id): Id,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    change(&api, caller, id, &headers, body, Mode::Patch).await
}

pub async fn remove(
    State(api): State<Arc<Api>>,
    caller: Caller,
    Id(id): Id,
) -> Result<Response, ApiError> {
    let db = api.db().await?;
    if !subscribers::delete(&**db, id, caller.scope()).await? {
        return Err(ApiError::not_found());
    }
    tracing::info!(subscriber = %id, "unsubscribed through the API");
    Ok(StatusCode::NO_CONTENT.into_response())
}
