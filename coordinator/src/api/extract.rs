//! What every handler needs from a request: the authenticated caller, a JSON body with a
//! readable 400, paging parameters, and ids in the seed's forms.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::AppState;
use crate::api_error::ApiError;
use crate::auth::{self, Claims};
use crate::node::{Node, Requester};
use crate::state::apply::{index, index_ids, load, load_id, meta_keys};
use crate::state::codec::key_id;
use crate::state::records::{ApiToken, Role, Timestamp, User};
use crate::store::Table;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user_id: u64,
    pub username: String,
    pub role: Role,
    /// The client address, for the audit log.
    pub source: Option<String>,
}

impl Caller {
    pub fn requester(&self) -> Requester {
        Requester { user_id: Some(self.user_id), source: self.source.clone() }
    }

    /// 403 unless the caller has at least `role` (viewer < developer < admin).
    pub fn require(&self, role: Role, action: &str) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "{action} needs the {} role; user {} is a {}",
                role_name(role),
                self.username,
                role_name(self.role)
            )))
        }
    }
}

pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Viewer => "viewer",
        Role::Developer => "developer",
        Role::Admin => "admin",
    }
}

/// API tokens are recognizable by their prefix; anything else is taken for a JWT.
pub const API_TOKEN_PREFIX: &str = "davit_";

/// Check a bearer credential (a login JWT or an API token) against the replicated state.
pub fn authenticate(node: &Node, authorization: Option<&str>, source: Option<String>) -> Result<Caller, ApiError> {
    let header = authorization.ok_or_else(|| {
        ApiError::unauthorized("missing Authorization header; send `Authorization: Bearer <token>` (POST /api/v1/auth/login gives one)")
    })?;
    let token = header
        .strip_prefix("Bearer ")
        .map(str::trim)
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <token>`"))?;
    authenticate_token(node, token, source)
}

/// Check a credential (a login JWT or an API token), from the Authorization header or the
/// dashboard's session cookie, against the replicated state.
pub fn authenticate_token(node: &Node, token: &str, source: Option<String>) -> Result<Caller, ApiError> {
    let state = node.state();
    if let Some(secret) = token.strip_prefix(API_TOKEN_PREFIX) {
        let token_hash = auth::token_hash(secret);
        let token_id = index_ids(&state, index::TOKENS_BY_HASH, &token_hash)?
            .first()
            .copied()
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked API token"))?;
        let token: ApiToken =
            load_id(&state, Table::ApiTokens, token_id)?.ok_or_else(|| ApiError::unauthorized("unknown or revoked API token"))?;
        if token.expires_at.is_some_and(|expires_at| expires_at <= auth::now_millis()) {
            return Err(ApiError::unauthorized("this API token has expired; create a new one"));
        }
        let user: User =
            load_id(&state, Table::Users, token.user_id)?.ok_or_else(|| ApiError::unauthorized("the API token's user no longer exists"))?;
        return Ok(Caller { user_id: user.user_id, username: user.username, role: user.role, source });
    }
    let key = node.token_signing_key().ok_or_else(|| {
        ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the cluster is still initializing; retry shortly")
    })?;
    let claims: Claims = auth::check_token(&key, token).map_err(|error| ApiError::unauthorized(error.to_string()))?;
    if load::<Timestamp>(&state, Table::StateMeta, &meta_keys::revoked_login(&auth::token_hash(token)))?.is_some() {
        return Err(ApiError::unauthorized("this login token ended with a logout; log in again with POST /api/v1/auth/login"));
    }
    let user_id: u64 = claims.sub.parse().map_err(|_| ApiError::unauthorized("malformed token subject"))?;
    // The role comes from the current user record, so a demoted or deleted user loses access
    // at once rather than when the token expires.
    let user: User = load_id(&state, Table::Users, user_id)?.ok_or_else(|| ApiError::unauthorized("this token's user no longer exists"))?;
    Ok(Caller { user_id, username: user.username, role: user.role, source })
}

pub fn client_address(parts: &Parts) -> Option<String> {
    parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|info| info.0.ip().to_string())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(axum::http::header::AUTHORIZATION).and_then(|value| value.to_str().ok());
        // Without an Authorization header, the dashboard's session cookie; a request that
        // changes something must then also carry the session's CSRF token in a header, which
        // another site's page cannot read (see `dashboard::session`).
        if header.is_none()
            && let Some(session) = crate::dashboard::session::session_token(&parts.headers)
        {
            if !parts.method.is_safe() {
                crate::dashboard::session::check_csrf_header(&parts.headers, &session)?;
            }
            return authenticate_token(&state.node, &session, client_address(parts));
        }
        authenticate(&state.node, header, client_address(parts))
    }
}

/// A JSON body; anything else (not JSON, wrong shape, wrong content type) is a 400 with the
/// parser's explanation, never a 500.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|rejection| ApiError::new(rejection.status(), "invalid_body", rejection.body_text()))?;
        if bytes.is_empty() {
            return Err(ApiError::bad_request("the request needs a JSON body"));
        }
        // Every request body of this API is a JSON object; serde would also take a struct's
        // fields from an array, which no client means.
        if bytes.iter().find(|byte| !byte.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::bad_request("the request body must be a JSON object ({...})"));
        }
        let deserializer = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(deserializer).map(JsonBody).map_err(|error| {
            let path = error.path().to_string();
            let message = format!("request body: {}", error.inner());
            if path == "." { ApiError::bad_request(message) } else { ApiError::invalid_field(&path, message) }
        })
    }
}

/// The body's bytes, with a JSON error (413 over the limit) instead of axum's plain text.
pub struct RawBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::body::Bytes::from_request(request, state)
            .await
            .map(RawBody)
            .map_err(|rejection| ApiError::new(rejection.status(), "invalid_body", rejection.body_text()))
    }
}

/// Query parameters; one that does not parse is a JSON 400 naming the parameter (axum's own
/// `Query` answers in plain text).
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => {
                // Axum keeps serde_path_to_error's error (whose path is the parameter) a few
                // sources down the rejection's chain.
                let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&rejection);
                while let Some(error) = source {
                    if let Some(error) = error.downcast_ref::<serde_path_to_error::Error<serde::de::value::Error>>() {
                        let field = error.path().to_string();
                        if field != "." {
                            return Err(ApiError::invalid_field(&field, format!("query parameter {field}: {}", error.inner())));
                        }
                    }
                    source = error.source();
                }
                Err(ApiError::bad_request(rejection.body_text()))
            }
        }
    }
}

/// Path parameters, with a JSON 400 when one does not decode (axum's own `Path` answers in
/// plain text).
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Path(value))
            .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
    }
}

/// `?limit=&cursor=` of list endpoints. The cursor is the last id of the previous page.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<super::schema::Cursor>)]
    pub cursor: Option<String>,
}

impl Page {
    pub fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(50),
            Some(limit) if (1..=500).contains(&limit) => Ok(limit),
            Some(_) => Err(ApiError::invalid_field("limit", "limit must be between 1 and 500")),
        }
    }

    pub fn after(&self) -> Result<Option<u64>, ApiError> {
        parse_cursor(self.cursor.as_deref())
    }
}

/// A `cursor` parameter: empty or absent for the first page, else the digits of an id (at most
/// 19, so that every cursor the schema allows fits in a u64).
pub fn parse_cursor(cursor: Option<&str>) -> Result<Option<u64>, ApiError> {
    let error = || ApiError::invalid_field("cursor", "cursor must be a next_cursor value from a previous page");
    match cursor {
        None | Some("") => Ok(None),
        Some(digits) if digits.len() <= 19 && digits.bytes().all(|byte| byte.is_ascii_digit()) => {
            digits.parse().map(Some).map_err(|_| error())
        }
        Some(_) => Err(error()),
    }
}

/// One page of a list.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Paged<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Read one page of rows keyed by id from `table`, keeping those `keep` accepts.
pub fn page_of<T: DeserializeOwned>(
    node: &Node,
    table: Table,
    page: &Page,
    mut keep: impl FnMut(&T) -> bool,
) -> Result<Paged<T>, ApiError> {
    let limit = page.limit()?;
    let start = match page.after()? {
        Some(after) => std::ops::Bound::Excluded(after.to_be_bytes().to_vec()),
        None => std::ops::Bound::Unbounded,
    };
    let mut items = Vec::new();
    let mut next_start = start;
    let mut last_id = None;
    // Scan in chunks so filters do not force reading the whole table at once.
    'scan: loop {
        let rows = node.backend.scan(table, (next_start.clone(), std::ops::Bound::Unbounded), 256, false)?;
        if rows.is_empty() {
            break;
        }
        for (key, bytes) in &rows {
            let row: T = crate::state::codec::decode(table, bytes)?;
            next_start = std::ops::Bound::Excluded(key.clone());
            if keep(&row) {
                if items.len() == limit {
                    // There is at least one more item: the page ends at the previous one.
                    break 'scan;
                }
                last_id = key_id(key);
                items.push(row);
            }
        }
        if rows.len() < 256 {
            last_id = None;
            break;
        }
    }
    let next_cursor = if items.len() == limit { last_id.map(|id| id.to_string()) } else { None };
    Ok(Paged { items, next_cursor })
}

/// An id as the seed writes it: a number, a numeric string, or a string such as `"repo123"`:
/// ASCII letters or `_`, then decimal digits, nothing else (`schema::ID_PATTERN`).
pub fn parse_id(field: &str, text: &str) -> Result<u64, ApiError> {
    let digits = text.trim_start_matches(|c: char| c.is_ascii_alphabetic() || c == '_');
    let parsed = if !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()) { digits.parse::<u64>().ok() } else { None };
    match parsed {
        Some(id) if id > 0 => Ok(id),
        _ => Err(ApiError::invalid_field(field, format!("{field} must be a positive integer id (like 12 or \"12\"), not {text:?}"))),
    }
}

/// A name or label: 1 to `max_chars` characters, not only whitespace, no control characters
/// (`schema::LABEL_PATTERN`).
pub fn validate_label(field: &str, text: &str, max_chars: usize) -> Result<(), ApiError> {
    let valid = !text.trim().is_empty() && text.chars().count() <= max_chars && !text.contains(char::is_control);
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            field,
            format!("{field} must be 1 to {max_chars} characters, not only whitespace, without control characters"),
        ))
    }
}

/// Serde helper for id fields that accept a number or a string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlexibleId(pub String);

impl<'de> Deserialize<'de> for FlexibleId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            // JSON Schema's `integer` admits `12.0`, so the API does too.
            Float(f64),
            Text(String),
        }
        let error = || serde::de::Error::custom("expected an id: a positive integer or a string such as \"12\"");
        Ok(FlexibleId(match Raw::deserialize(deserializer).map_err(|_| error())? {
            Raw::Number(number) => number.to_string(),
            Raw::Float(number) if number.fract() == 0.0 && (1.0..=super::schema::MAX_JSON_ID as f64).contains(&number) => {
                (number as u64).to_string()
            }
            Raw::Float(_) => return Err(error()),
            Raw::Text(text) => text,
        }))
    }
}

impl utoipa::PartialSchema for FlexibleId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::OneOfBuilder::new()
            .item(
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::Integer)
                    .minimum(Some(1))
                    .maximum(Some(super::schema::MAX_JSON_ID)),
            )
            .item(super::schema::IdText::schema())
            .into()
    }
}

impl utoipa::ToSchema for FlexibleId {}

impl FlexibleId {
    pub fn id(&self, field: &str) -> Result<u64, ApiError> {
        parse_id(field, &self.0)
    }
}

/// Serde helper for an optional whole-number field that JSON may spell `30` or `30.0` (JSON
/// Schema's `integer` admits both). Use with `#[serde(default, deserialize_with = ...)]`.
pub fn optional_whole_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    number
        .as_u64()
        .or_else(|| {
            number.as_f64().filter(|value| value.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(value)).map(|value| value as u64)
        })
        .and_then(|value| u32::try_from(value).ok())
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("expected a whole number from 0 to {}, not {number}", u32::MAX)))
}

/// The client address alone, for endpoints without authentication (login).
pub struct ClientAddress(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddress {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddress(client_address(parts)))
    }
}

/// Refuses a request whose declared `Content-Length` is over `limit` with a JSON 413, after
/// reading and discarding what the client sends (up to [`DRAIN_LIMIT`] bytes for at most
/// [`DRAIN_TIME`]). Answering without reading would close the connection on a client that is
/// still writing, which then sees a reset instead of the answer.
pub async fn refuse_oversized(
    axum::extract::State(limit): axum::extract::State<usize>,
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use futures::StreamExt;
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    let Some(declared) = declared.filter(|&declared| declared > limit as u64) else {
        return next.run(request).await;
    };
    if declared <= DRAIN_LIMIT {
        let mut body = request.into_body().into_data_stream();
        let drain = async {
            let mut read = 0u64;
            while let Some(Ok(chunk)) = body.next().await {
                read += chunk.len() as u64;
                if read > DRAIN_LIMIT {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    }
    ApiError::new(
        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("the request body is {declared} bytes; this endpoint takes at most {limit} bytes"),
    )
    .into_response()
}

/// The most an over-limit body is read to answer it cleanly; a larger one is cut off.
const DRAIN_LIMIT: u64 = 64 << 20;
/// How long an over-limit body is read before the connection is closed.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_digits_or_empty() {
        assert_eq!(parse_cursor(None).unwrap(), None);
        assert_eq!(parse_cursor(Some("")).unwrap(), None);
        assert_eq!(parse_cursor(Some("42")).unwrap(), Some(42));
        for bad in ["abc", "+1", " 1", "-1", "12345678901234567890"] {
            assert_eq!(parse_cursor(Some(bad)).unwrap_err().field.as_deref(), Some("cursor"), "{bad}");
        }
    }

    #[test]
    fn labels_need_a_visible_character_and_no_control_characters() {
        validate_label("name", "production-pipeline", 100).unwrap();
        validate_label("name", " a b ", 100).unwrap();
        validate_label("name", &"ü".repeat(100), 100).unwrap();
        for bad in ["", "   ", "\u{3000}", "a\nb", "a\u{1c}", &"x".repeat(101)] {
            assert_eq!(validate_label("name", bad, 100).unwrap_err().field.as_deref(), Some("name"), "{bad:?}");
        }
    }

    #[test]
    fn ids_in_the_seeds_forms() {
        assert_eq!(parse_id("repo_id", "repo123").unwrap(), 123);
        assert_eq!(parse_id("repo_id", "7").unwrap(), 7);
        assert_eq!(parse_id("pipeline_id", "pipeline_9").unwrap(), 9);
        assert_eq!(parse_id("repo_id", "repo_0012").unwrap(), 12);
        for bad in ["", "repo", "0", "-3", "1.5", "12abc", " 12", "12 ", "+12", "repo+1", "99999999999999999999999"] {
            let error = parse_id("repo_id", bad).unwrap_err();
            assert_eq!(error.field.as_deref(), Some("repo_id"), "{bad}");
        }
    }
}
