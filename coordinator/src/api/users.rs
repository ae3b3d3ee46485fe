//! Login, users and API tokens. Only admins manage users; everyone manages their own tokens
//! and password. Failed logins are replicated (and audited), and ten of them within fifteen
//! minutes lock the account for the rest of that window (429 with `Retry-After`).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{API_TOKEN_PREFIX, Caller, JsonBody, Page, Paged, Path, Query, page_of, parse_id, validate_label};
use super::schema;
use crate::api_error::ApiError;
use crate::auth;
use crate::state::apply::{LOGIN_LOCKOUT_WINDOW_MS, index, index_ids, load_id, recent_login_failures};
use crate::state::records::{ApiToken, Role, User};
use crate::state::{Command, Outcome};
use crate::store::Table;

/// Failed logins allowed per account within the lockout window.
pub const MAX_FAILED_LOGINS: usize = 10;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(logout))
        .routes(routes!(me))
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user, update_user, delete_user))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
}

pub fn timestamp(millis: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(millis.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// A user as the API shows it: never the password hash.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub user_id: u64,
    pub username: String,
    pub email: String,
    #[schema(value_type = schema::RoleName, example = "developer")]
    pub role: Role,
    pub created_at: String,
    pub updated_at: String,
}

impl From<User> for UserView {
    fn from(user: User) -> Self {
        Self {
            user_id: user.user_id,
            username: user.username,
            email: user.email,
            role: user.role,
            created_at: timestamp(user.created_at),
            updated_at: timestamp(user.updated_at),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    #[schema(example = "john_doe", min_length = 1)]
    pub username: String,
    #[schema(example = "your_password", min_length = 1)]
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    pub token: String,
    /// Seconds until the token expires (3600).
    pub expires_in: i64,
}

/// Map an apply outcome to the created/changed id or the matching 4xx.
pub fn applied_id(outcome: Outcome) -> Result<Option<u64>, ApiError> {
    outcome.result.map(|applied| applied.id).map_err(ApiError::from)
}

/// Authenticate a user and issue a token.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = LoginResponse), (status = 400, body = crate::api_error::ErrorBody),
        (status = 401, body = crate::api_error::ErrorBody), (status = 429, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn login(
    State(state): State<AppState>,
    source: super::extract::ClientAddress,
    JsonBody(request): JsonBody<LoginRequest>,
) -> Result<Json<LoginResponse>, ApiError> {
    let token = log_in(&state, source.0, &request).await?;
    Ok(Json(LoginResponse { token, expires_in: auth::TOKEN_LIFETIME_SECONDS }))
}

/// Check a username and password (lockout, argon2id, the audited `RecordLogin`) and issue a
/// login token: what `POST /api/v1/auth/login` and the dashboard's login form share.
pub async fn log_in(state: &AppState, source: Option<String>, request: &LoginRequest) -> Result<String, ApiError> {
    if request.username.is_empty() {
        return Err(ApiError::invalid_field("username", "username must not be empty"));
    }
    if request.password.is_empty() {
        return Err(ApiError::invalid_field("password", "password must not be empty"));
    }
    let node = &state.node;
    node.read_barrier().await?;
    let now = auth::now_millis();
    let failures = recent_login_failures(&node.state(), &request.username, now)?;
    if failures.len() >= MAX_FAILED_LOGINS {
        let oldest = failures[failures.len() - MAX_FAILED_LOGINS];
        let retry_after = ((oldest + LOGIN_LOCKOUT_WINDOW_MS - now) / 1000).max(1) as u64;
        return Err(ApiError {
            retry_after: Some(retry_after),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_failed_logins",
                format!("too many failed logins for {:?}; try again in {retry_after} s", request.username),
            )
        });
    }
    let user: Option<User> = match index_ids(&node.state(), index::USERS_BY_NAME, &request.username)?.first() {
        Some(user_id) => load_id(&node.state(), Table::Users, *user_id)?,
        None => None,
    };
    // Hashes even for an unknown user so response time does not reveal which usernames exist.
    let stored_hash = user.as_ref().map(|user| user.password_hash.clone());
    let verified =
        auth::verify_password_async(request.password.clone(), stored_hash).await.map_err(|e| ApiError::internal(e.to_string()))?;
    let requester = crate::node::Requester { user_id: user.as_ref().map(|user| user.user_id), source };
    let record =
        Command::RecordLogin { username: request.username.clone(), user_id: user.as_ref().map(|user| user.user_id), succeeded: verified };
    super::propose(node, &requester, record).await?;
    let user = match user {
        Some(user) if verified => user,
        _ => return Err(ApiError::unauthorized("wrong username or password")),
    };
    let key = node
        .token_signing_key()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the cluster is still initializing"))?;
    auth::issue_token(&key, user.user_id, &user.username, user.role, now / 1000).map_err(|e| ApiError::internal(e.to_string()))
}

/// End the caller's login session: the login token this request presents (bearer header or the
/// dashboard's cookie) is refused from now on, on every node. API tokens are not sessions; they
/// are revoked with `DELETE /api/v1/tokens/{id}`.
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204, description = "The login token is revoked"), (status = 400, body = crate::api_error::ErrorBody),
        (status = 401, body = crate::api_error::ErrorBody)))]
async fn logout(State(state): State<AppState>, caller: Caller, headers: axum::http::HeaderMap) -> Result<StatusCode, ApiError> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(|token| token.trim().to_string());
    let token = bearer.or_else(|| crate::dashboard::session::session_token(&headers)).unwrap_or_default();
    revoke_login_token(&state, &caller, &token).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revoke the login token `token` that authenticated `caller` (what `POST /api/v1/auth/logout`
/// and the dashboard's logout share).
pub async fn revoke_login_token(state: &AppState, caller: &Caller, token: &str) -> Result<(), ApiError> {
    if token.starts_with(API_TOKEN_PREFIX) {
        return Err(ApiError::invalid_field(
            "authorization",
            "an API token is not a login session: revoke it with DELETE /api/v1/tokens/{id} (GET /api/v1/tokens lists them)",
        ));
    }
    let key = state.node.token_signing_key().ok_or_else(|| ApiError::internal("the token signing key is missing"))?;
    let claims = auth::check_token(&key, token).map_err(|error| ApiError::unauthorized(error.to_string()))?;
    let command = Command::RevokeLoginToken { token_hash: auth::token_hash(token), expires_at: claims.exp.saturating_mul(1000) };
    super::propose(&state.node, &caller.requester(), command).await?;
    Ok(())
}

/// The caller's own user record.
#[utoipa::path(get, path = "/api/v1/auth/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 401, body = crate::api_error::ErrorBody)))]
async fn me(State(state): State<AppState>, caller: Caller) -> Result<Json<UserView>, ApiError> {
    let user: User = load_id(&state.node.state(), Table::Users, caller.user_id)?
        .ok_or_else(|| ApiError::not_found(format!("user {} not found", caller.user_id)))?;
    Ok(Json(user.into()))
}

fn validate_username(username: &str) -> Result<(), ApiError> {
    let valid = !username.is_empty() && username.len() <= 50 && username.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if valid { Ok(()) } else { Err(ApiError::invalid_field("username", "username must be 1 to 50 letters, digits, '_', '.' or '-'")) }
}

fn validate_email(email: &str) -> Result<(), ApiError> {
    let valid = email.chars().count() <= 100
        && email.split_once('@').is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty() && !domain.contains('@'))
        && !email.contains(|c: char| c.is_whitespace() || c.is_control());
    if valid { Ok(()) } else { Err(ApiError::invalid_field("email", "email must look like name@example.com (at most 100 characters)")) }
}

fn validate_password(password: &str) -> Result<(), ApiError> {
    if (8..=1024).contains(&password.chars().count()) {
        Ok(())
    } else {
        Err(ApiError::invalid_field("password", "password must be 8 to 1024 characters"))
    }
}

async fn hash(password: String) -> Result<String, ApiError> {
    auth::hash_password_async(password).await.map_err(|e| ApiError::internal(e.to_string()))
}

fn load_user(state: &AppState, user_id: u64) -> Result<User, ApiError> {
    load_id(&state.node.state(), Table::Users, user_id)?.ok_or_else(|| ApiError::not_found(format!("user {user_id} not found")))
}

/// List users (admin).
#[utoipa::path(get, path = "/api/v1/users", tag = "users", params(Page), security(("bearer" = [])),
    responses((status = 200, body = Paged<UserView>), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody)))]
async fn list_users(State(state): State<AppState>, caller: Caller, Query(page): Query<Page>) -> Result<Json<Paged<UserView>>, ApiError> {
    caller.require(Role::Admin, "listing users")?;
    state.node.read_barrier().await?;
    let page = page_of::<User>(&state.node, Table::Users, &page, |_| true)?;
    Ok(Json(Paged { items: page.items.into_iter().map(UserView::from).collect(), next_cursor: page.next_cursor }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    #[schema(value_type = schema::Username, example = "john_doe")]
    pub username: String,
    #[schema(value_type = schema::Email, example = "john@example.com")]
    pub email: String,
    #[schema(value_type = schema::Password)]
    pub password: String,
    #[schema(value_type = schema::RoleName, example = "developer")]
    pub role: Role,
}

/// Create a user (admin).
#[utoipa::path(post, path = "/api/v1/users", tag = "users", request_body = CreateUserRequest, security(("bearer" = [])),
    responses((status = 201, body = UserView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn create_user(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<CreateUserRequest>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    caller.require(Role::Admin, "creating users")?;
    validate_username(&request.username)?;
    validate_email(&request.email)?;
    validate_password(&request.password)?;
    let password_hash = hash(request.password).await?;
    let command = Command::CreateUser { username: request.username, email: request.email, password_hash, role: request.role };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    let user_id = applied_id(outcome)?.expect("create returns the id");
    Ok((StatusCode::CREATED, Json(load_user(&state, user_id)?.into())))
}

/// One user (admin, or the user themself).
#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "users", params(("id" = schema::IdText, Path, description = "user id")), security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn get_user(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<Json<UserView>, ApiError> {
    let user_id = parse_id("id", &id)?;
    if user_id != caller.user_id {
        caller.require(Role::Admin, "reading other users")?;
    }
    state.node.read_barrier().await?;
    Ok(Json(load_user(&state, user_id)?.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateUserRequest {
    #[schema(value_type = Option<schema::Username>)]
    pub username: Option<String>,
    #[schema(value_type = Option<schema::Email>)]
    pub email: Option<String>,
    #[schema(value_type = Option<schema::Password>)]
    pub password: Option<String>,
    #[schema(value_type = Option<schema::RoleName>, example = "viewer")]
    pub role: Option<Role>,
}

/// Update a user: admins change anything; users change their own email and password.
#[utoipa::path(put, path = "/api/v1/users/{id}", tag = "users", params(("id" = schema::IdText, Path, description = "user id")), request_body = UpdateUserRequest,
    security(("bearer" = [])),
    responses((status = 200, body = UserView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn update_user(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<UpdateUserRequest>,
) -> Result<Json<UserView>, ApiError> {
    let user_id = parse_id("id", &id)?;
    if user_id != caller.user_id || request.role.is_some() || request.username.is_some() {
        caller.require(Role::Admin, "changing another user, a role or a username")?;
    }
    // An admin who demoted themself could leave the cluster without any admin; another admin
    // has to do it, as with deleting one's own account.
    if user_id == caller.user_id && request.role.is_some_and(|role| role != caller.role) {
        return Err(ApiError::forbidden("you cannot change your own role; ask another admin"));
    }
    if let Some(username) = &request.username {
        validate_username(username)?;
    }
    if let Some(email) = &request.email {
        validate_email(email)?;
    }
    let password_hash = match request.password {
        Some(password) => {
            validate_password(&password)?;
            Some(hash(password).await?)
        }
        None => None,
    };
    let command = Command::UpdateUser { user_id, email: request.email, password_hash, role: request.role, username: request.username };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    applied_id(outcome)?;
    Ok(Json(load_user(&state, user_id)?.into()))
}

/// Delete a user (admin). Their repositories stay, without an owner.
#[utoipa::path(delete, path = "/api/v1/users/{id}", tag = "users", params(("id" = schema::IdText, Path, description = "user id")), security(("bearer" = [])),
    responses((status = 204), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn delete_user(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin, "deleting users")?;
    let user_id = parse_id("id", &id)?;
    if user_id == caller.user_id {
        return Err(ApiError::forbidden("you cannot delete your own account; ask another admin"));
    }
    let (outcome, _) = super::propose(&state.node, &caller.requester(), Command::DeleteUser { user_id }).await?;
    applied_id(outcome)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub token_id: u64,
    pub user_id: u64,
    pub name: String,
    pub created_at: String,
    pub expires_at: Option<String>,
}

impl From<ApiToken> for TokenView {
    fn from(token: ApiToken) -> Self {
        Self {
            token_id: token.token_id,
            user_id: token.user_id,
            name: token.name,
            created_at: timestamp(token.created_at),
            expires_at: token.expires_at.map(timestamp),
        }
    }
}

/// The caller's API tokens (admins see everyone's).
#[utoipa::path(get, path = "/api/v1/tokens", tag = "tokens", params(Page), security(("bearer" = [])),
    responses((status = 200, body = Paged<TokenView>), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody)))]
async fn list_tokens(State(state): State<AppState>, caller: Caller, Query(page): Query<Page>) -> Result<Json<Paged<TokenView>>, ApiError> {
    state.node.read_barrier().await?;
    let admin = caller.role == Role::Admin;
    let page = page_of::<ApiToken>(&state.node, Table::ApiTokens, &page, |token| admin || token.user_id == caller.user_id)?;
    Ok(Json(Paged { items: page.items.into_iter().map(TokenView::from).collect(), next_cursor: page.next_cursor }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    #[schema(value_type = schema::Name, example = "ci")]
    pub name: String,
    /// Days until it expires, 1 to 3650; none means it lasts until revoked.
    #[schema(minimum = 1, maximum = 3650)]
    #[serde(default, deserialize_with = "super::extract::optional_whole_number")]
    pub expires_in_days: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    pub token_id: u64,
    /// Shown once: keep it; only its hash is stored.
    pub token: String,
    pub expires_at: Option<String>,
}

/// Create an API token for automation; it acts with the caller's role.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", request_body = CreateTokenRequest, security(("bearer" = [])),
    responses((status = 201, body = CreatedToken), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    validate_label("name", &request.name, 100)?;
    if request.expires_in_days.is_some_and(|days| days == 0 || days > 3650) {
        return Err(ApiError::invalid_field("expires_in_days", "expires_in_days must be 1 to 3650"));
    }
    let secret = auth::random_secret(40);
    let expires_at = request.expires_in_days.map(|days| auth::now_millis() + i64::from(days) * 86_400_000);
    let command =
        Command::CreateApiToken { user_id: caller.user_id, name: request.name, token_hash: auth::token_hash(&secret), expires_at };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    let token_id = applied_id(outcome)?.expect("create returns the id");
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken { token_id, token: format!("{API_TOKEN_PREFIX}{secret}"), expires_at: expires_at.map(timestamp) }),
    ))
}

/// Revoke an API token (its owner or an admin).
#[utoipa::path(delete, path = "/api/v1/tokens/{id}", tag = "tokens", params(("id" = schema::IdText, Path, description = "token id")), security(("bearer" = [])),
    responses((status = 204), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn revoke_token(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let token_id = parse_id("id", &id)?;
    state.node.read_barrier().await?;
    let token: ApiToken = load_id(&state.node.state(), Table::ApiTokens, token_id)?
        .ok_or_else(|| ApiError::not_found(format!("API token {token_id} not found")))?;
    if token.user_id != caller.user_id {
        caller.require(Role::Admin, "revoking another user's token")?;
    }
    let (outcome, _) = super::propose(&state.node, &caller.requester(), Command::RevokeApiToken { token_id }).await?;
    applied_id(outcome)?;
    Ok(StatusCode::NO_CONTENT)
}
