//! Connected repositories and the webhook endpoint. Webhook secrets are sealed with the master
//! key before they are proposed and never returned; the webhook endpoint checks each
//! provider's signature in constant time.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, JsonBody, Page, Paged, Path, Query, RawBody, page_of, parse_id, validate_label};
use super::schema;
use super::users::{applied_id, timestamp};
use crate::api_error::ApiError;
use crate::node::Requester;
use crate::outbound::UrlKind;
use crate::scm::events::{self, ScmEvent};
use crate::scm::polling;
use crate::scm::trigger::{self, Triggered};
use crate::state::Command;
use crate::state::ScmSource;
use crate::state::apply::{index, load_id};
use crate::state::command::RepositoryPatch;
use crate::state::records::{Repository, Role, ScmType};
use crate::store::Table;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(connect_repository)).routes(routes!(list_repositories)).routes(routes!(
        get_repository,
        update_repository,
        delete_repository
    ))
}

/// The webhook endpoint, under its own body limit (see `api::documented_routes`).
pub fn webhook_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(webhook)).routes(routes!(repository_webhook))
}

/// The sealing context of a repository's webhook secret.
fn secret_context(repo_url: &str) -> String {
    format!("repository-webhook-secret:{repo_url}")
}

/// The sealing context of a repository's provider access token (commit statuses); distinct
/// from the webhook secret's, so that one sealed value cannot be passed off as the other.
pub fn access_token_context(repo_url: &str) -> String {
    format!("repository-access-token:{repo_url}")
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RepositoryView {
    pub repo_id: u64,
    pub name: String,
    pub repo_url: String,
    pub branch: String,
    #[schema(value_type = schema::ScmTypeName, example = "github")]
    pub scm_type: ScmType,
    /// `"***"` when a secret is set; the value itself is never returned.
    pub webhook_secret: Option<String>,
    pub user_id: Option<u64>,
    pub created_at: String,
    pub updated_at: String,
    /// The provider's API base URL; null for the provider's public API.
    #[serde(default)]
    pub api_url: Option<String>,
    /// `"***"` when an access token is set (commit statuses are then reported); never returned.
    #[serde(default)]
    pub access_token: Option<String>,
    /// The repository's own polling interval in seconds (0: never); null follows the node's
    /// default, which polls only repositories without a webhook secret.
    #[schema(value_type = Option<schema::PollInterval>)]
    pub poll_interval_seconds: Option<u64>,
    /// How often the repository is actually polled with `git ls-remote`, in seconds; null when
    /// it is not polled.
    pub polled_every_seconds: Option<u64>,
}

impl RepositoryView {
    /// The view, with the polling interval this node's `[scm]` default gives the repository.
    fn of(repository: Repository, scm: &crate::config::ScmSettings) -> Self {
        let polled_every_seconds =
            polling::effective_poll_interval(repository.poll_interval_seconds, repository.receives_webhooks(), scm.poll_interval_seconds);
        Self { polled_every_seconds, ..Self::from(repository) }
    }
}

impl From<Repository> for RepositoryView {
    fn from(repository: Repository) -> Self {
        Self {
            repo_id: repository.repo_id,
            name: repository.name,
            repo_url: repository.repo_url,
            branch: repository.branch,
            scm_type: repository.scm_type,
            webhook_secret: repository.webhook_secret.map(|_| "***".to_string()),
            user_id: repository.user_id,
            created_at: timestamp(repository.created_at),
            updated_at: timestamp(repository.updated_at),
            api_url: repository.api_url,
            access_token: repository.access_token.map(|_| "***".to_string()),
            poll_interval_seconds: repository.poll_interval_seconds,
            polled_every_seconds: None,
        }
    }
}

/// What `POST /api/v1/repos/connect` answers: the repository (the seed's fields, unchanged) and
/// what to set up on the provider's side.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConnectedRepositoryView {
    #[serde(flatten)]
    pub repository: RepositoryView,
    /// The URL to paste into the provider's webhook settings.
    pub webhook_url: String,
    /// The events to tick there, in the provider's words.
    pub webhook_events: Vec<String>,
    /// How to set the webhook up, step by step, in one paragraph.
    pub webhook_instructions: String,
}

/// The provider's webhook events Davit acts on, named as its settings page names them.
pub fn webhook_events(scm_type: ScmType) -> Vec<String> {
    let events: &[&str] = match scm_type {
        ScmType::Github => &["Pushes", "Pull requests"],
        ScmType::Gitlab => &["Push events", "Tag push events", "Merge request events"],
        ScmType::Bitbucket => {
            &["Repository: Push", "Pull request: Created", "Pull request: Updated", "Pull request: Merged", "Pull request: Declined"]
        }
        ScmType::Git => &[],
    };
    events.iter().map(|event| event.to_string()).collect()
}

/// Where to click on the provider, and what the secret is called there.
pub fn webhook_instructions(scm_type: ScmType, webhook_url: &str, has_secret: bool) -> String {
    let secret = if has_secret {
        "the same webhook secret as here"
    } else {
        "a webhook secret, and set the same one here (PUT /api/v1/repos/{id} with webhook_secret): deliveries without a valid signature are refused"
    };
    match scm_type {
        ScmType::Github => format!(
            "In the repository's Settings > Webhooks > Add webhook: Payload URL {webhook_url}, content type application/json, \
             Secret: {secret}; choose \"Let me select individual events\" and tick Pushes and Pull requests."
        ),
        ScmType::Gitlab => format!(
            "In the project's Settings > Webhooks > Add new webhook: URL {webhook_url}, Secret token: {secret}; \
             tick Push events, Tag push events and Merge request events."
        ),
        ScmType::Bitbucket => format!(
            "In the repository's Repository settings > Webhooks > Add webhook: URL {webhook_url}, Secret: {secret}; \
             choose \"Choose from a full list of triggers\" and tick Repository Push and Pull Request Created, Updated, Merged and Declined."
        ),
        ScmType::Git => "A plain git server sends no webhooks: Davit polls the repository with git ls-remote \
             (every poll_interval_seconds, or the node's [scm] default) and starts runs for new commits."
            .to_string(),
    }
}

/// Check a repository URL: `https://`, `http://`, `ssh://`, `git://` or `file://` with a path,
/// or scp-like `git@host:org/repo.git`.
pub fn validate_repo_url(url: &str) -> Result<(), ApiError> {
    let error = || {
        ApiError::invalid_field(
            "repo_url",
            format!("repo_url {url:?} must be a repository URL such as https://github.com/org/repo or git@github.com:org/repo.git"),
        )
    };
    if url.chars().count() > 255 || url.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(error());
    }
    if let Some((scheme, rest)) = url.split_once("://") {
        if !["https", "http", "ssh", "git", "file"].contains(&scheme) {
            return Err(error());
        }
        let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
        if (scheme != "file" && host.is_empty()) || path.trim_matches('/').is_empty() {
            return Err(error());
        }
        return Ok(());
    }
    match url.split_once(':') {
        Some((user_host, path)) if user_host.contains('@') && !path.is_empty() && !path.starts_with('/') => Ok(()),
        _ => Err(error()),
    }
}

/// The repository's name: the last path segment of its URL without `.git` (or the whole URL
/// when that leaves nothing), cut to the 100 characters a name may have.
pub fn name_from_url(url: &str) -> String {
    let name = url.trim_end_matches('/').rsplit(['/', ':']).next().unwrap_or(url).trim_end_matches(".git");
    let name = if name.trim().is_empty() { url } else { name };
    name.chars().take(100).collect()
}

pub fn validate_branch(field: &str, branch: &str) -> Result<(), ApiError> {
    if branch_name_is_valid(branch, false) {
        Ok(())
    } else {
        Err(ApiError::invalid_field(field, format!("{field} must be a valid git branch name of at most 50 characters")))
    }
}

/// A pipeline's branch: a branch name, or a pattern with `*` and `**` (`scm::glob`).
/// Mirrors `schema::BRANCH_PATTERN_GLOB`.
pub fn validate_branch_pattern(field: &str, pattern: &str) -> Result<(), ApiError> {
    if branch_name_is_valid(pattern, true) {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            field,
            format!(
                "{field} must be a git branch name or a pattern such as release/* (at most 50 characters; * within a segment, ** across)"
            ),
        ))
    }
}

fn branch_name_is_valid(branch: &str, stars_allowed: bool) -> bool {
    let forbidden = if stars_allowed { "~^:?[\\" } else { "~^:?*[\\" };
    !branch.is_empty()
        && branch.chars().count() <= 50
        && !branch.starts_with(['-', '/'])
        && !branch.contains("..")
        && !branch.chars().any(|c| c.is_whitespace() || c.is_control() || forbidden.contains(c))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    #[schema(value_type = schema::RepoUrl, example = "https://github.com/org/repo")]
    pub repo_url: String,
    /// Defaults to `main`.
    #[schema(value_type = Option<schema::Branch>, example = "main")]
    pub branch: Option<String>,
    #[schema(value_type = schema::ScmTypeName, example = "github")]
    pub scm_type: ScmType,
    /// Sealed before it is stored; `""` or none means no secret.
    #[schema(value_type = Option<schema::WebhookSecret>, example = "secret_key")]
    pub webhook_secret: Option<String>,
    /// Defaults to the last part of the URL.
    #[schema(value_type = Option<schema::Name>)]
    pub name: Option<String>,
    /// The provider's API base URL for GitHub Enterprise (`https://host/api/v3`) or self-managed
    /// GitLab (`https://host/api/v4`); none or `""` for the provider's public API.
    #[serde(default)]
    #[schema(value_type = Option<schema::ApiUrl>, example = "https://ghe.example.com/api/v3")]
    pub api_url: Option<String>,
    /// A provider access token allowed to set commit statuses (GitHub `repo:status`, GitLab
    /// `api`, Bitbucket `repository:write`); sealed before it is stored, never returned. Without one
    /// no commit status is reported.
    #[serde(default)]
    #[schema(value_type = Option<schema::AccessToken>)]
    pub access_token: Option<String>,
    /// Poll the repository with `git ls-remote` this often, in seconds (10 to 86400; 0 never).
    /// Without it, a repository without a webhook secret is polled at the node's default interval
    /// and one with a secret is not polled.
    #[schema(value_type = Option<schema::PollInterval>, example = 60)]
    #[serde(default, deserialize_with = "super::extract::optional_whole_number")]
    pub poll_interval_seconds: Option<u32>,
}

/// Check an API base URL: `http(s)://host[/path]`, no query or fragment, at most 255 characters.
/// `""` is accepted (it means the provider's public API). Mirrors `schema::API_URL_PATTERN`.
pub fn validate_api_url(url: &str) -> Result<(), ApiError> {
    if url.is_empty() {
        return Ok(());
    }
    let error = || {
        ApiError::invalid_field(
            "api_url",
            format!(
                "api_url {url:?} must be the provider's API base URL, such as https://ghe.example.com/api/v3 (GitHub Enterprise) \
                 or https://gitlab.example.com/api/v4 (self-managed GitLab), without a query or fragment"
            ),
        )
    };
    if url.chars().count() > 255 || url.contains(|c: char| c.is_whitespace() || c.is_control() || c == '?' || c == '#') {
        return Err(error());
    }
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://")).ok_or_else(error)?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() {
        return Err(error());
    }
    Ok(())
}

/// Check an access token: at most 2000 characters, no whitespace or control characters (a
/// pasted token with a trailing newline is the usual mistake). Mirrors `schema::ACCESS_TOKEN_PATTERN`.
pub fn validate_access_token(token: &str) -> Result<(), ApiError> {
    if token.chars().count() > 2000 {
        return Err(ApiError::invalid_field("access_token", "access_token must be at most 2000 characters"));
    }
    if token.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::invalid_field(
            "access_token",
            "access_token must not contain whitespace or control characters; paste the token alone, without spaces or a line break",
        ));
    }
    Ok(())
}

/// The API base URL to store: trailing slashes dropped, `""` meaning none.
fn normalized_api_url(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

fn check_poll_interval(seconds: Option<u64>) -> Result<(), ApiError> {
    match seconds {
        Some(seconds) => {
            polling::validate_poll_interval(seconds).map_err(|message| ApiError::invalid_field("poll_interval_seconds", message))
        }
        None => Ok(()),
    }
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    validate_label("name", name, 100)
}

fn validate_webhook_secret(secret: &str) -> Result<(), ApiError> {
    if secret.chars().count() > 100 {
        return Err(ApiError::invalid_field("webhook_secret", "webhook_secret must be at most 100 characters"));
    }
    Ok(())
}

fn view(state: &AppState, repository: Repository) -> RepositoryView {
    RepositoryView::of(repository, &state.node.config.scm)
}

fn load_repository(state: &AppState, repo_id: u64) -> Result<Repository, ApiError> {
    load_id(&state.node.state(), Table::Repositories, repo_id)?
        .ok_or_else(|| ApiError::not_found(format!("repository {repo_id} not found")))
}

/// Connect a code repository (developer).
#[utoipa::path(post, path = "/api/v1/repos/connect", tag = "repositories", request_body = ConnectRequest, security(("bearer" = [])),
    responses((status = 201, body = ConnectedRepositoryView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn connect_repository(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<ConnectRequest>,
) -> Result<(StatusCode, Json<ConnectedRepositoryView>), ApiError> {
    caller.require(Role::Developer, "connecting a repository")?;
    validate_repo_url(&request.repo_url)?;
    state.outbound.check_url("repo_url", &request.repo_url, UrlKind::Repository).await?;
    let branch = request.branch.unwrap_or_else(|| "main".into());
    validate_branch("branch", &branch)?;
    let name = request.name.unwrap_or_else(|| name_from_url(&request.repo_url));
    validate_name(&name)?;
    if let Some(secret) = &request.webhook_secret {
        validate_webhook_secret(secret)?;
    }
    if let Some(url) = &request.api_url {
        validate_api_url(url)?;
        if !url.is_empty() {
            state.outbound.check_url("api_url", url, UrlKind::Http).await?;
        }
    }
    if let Some(token) = &request.access_token {
        validate_access_token(token)?;
    }
    let api_url = request.api_url.as_deref().map(normalized_api_url).filter(|url| !url.is_empty());
    let access_token = request
        .access_token
        .filter(|token| !token.is_empty())
        .map(|token| state.secrets.seal(&token, &access_token_context(&request.repo_url)));
    check_poll_interval(request.poll_interval_seconds.map(u64::from))?;
    let webhook_secret = request
        .webhook_secret
        .filter(|secret| !secret.is_empty())
        .map(|secret| state.secrets.seal(&secret, &secret_context(&request.repo_url)));
    let command = Command::ConnectRepository {
        name,
        repo_url: request.repo_url,
        branch,
        scm_type: request.scm_type,
        webhook_secret,
        api_url,
        access_token,
        poll_interval_seconds: request.poll_interval_seconds.map(u64::from),
    };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    let repo_id = applied_id(outcome)?.expect("connect returns the id");
    let repository = load_repository(&state, repo_id)?;
    let webhook_url = format!("{}/api/v1/repos/webhook", state.node.config.public_base_url());
    Ok((
        StatusCode::CREATED,
        Json(ConnectedRepositoryView {
            webhook_events: webhook_events(repository.scm_type),
            webhook_instructions: webhook_instructions(repository.scm_type, &webhook_url, repository.webhook_secret.is_some()),
            webhook_url,
            repository: view(&state, repository),
        }),
    ))
}

/// List connected repositories.
#[utoipa::path(get, path = "/api/v1/repos", tag = "repositories", params(Page), security(("bearer" = [])),
    responses((status = 200, body = Paged<RepositoryView>), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody)))]
async fn list_repositories(
    State(state): State<AppState>,
    _caller: Caller,
    Query(page): Query<Page>,
) -> Result<Json<Paged<RepositoryView>>, ApiError> {
    state.node.read_barrier().await?;
    let page = page_of::<Repository>(&state.node, Table::Repositories, &page, |_| true)?;
    Ok(Json(Paged { items: page.items.into_iter().map(|repository| view(&state, repository)).collect(), next_cursor: page.next_cursor }))
}

/// One repository.
#[utoipa::path(get, path = "/api/v1/repos/{id}", tag = "repositories", params(("id" = schema::IdText, Path, description = "repository id")), security(("bearer" = [])),
    responses((status = 200, body = RepositoryView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn get_repository(State(state): State<AppState>, _caller: Caller, Path(id): Path<String>) -> Result<Json<RepositoryView>, ApiError> {
    let repo_id = parse_id("id", &id)?;
    state.node.read_barrier().await?;
    Ok(Json(view(&state, load_repository(&state, repo_id)?)))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRepositoryRequest {
    #[schema(value_type = Option<schema::Name>)]
    pub name: Option<String>,
    #[schema(value_type = Option<schema::RepoUrl>)]
    pub repo_url: Option<String>,
    #[schema(value_type = Option<schema::Branch>)]
    pub branch: Option<String>,
    #[schema(value_type = Option<schema::ScmTypeName>, example = "gitlab")]
    pub scm_type: Option<ScmType>,
    /// A new secret; `""` removes it.
    #[schema(value_type = Option<schema::WebhookSecret>)]
    pub webhook_secret: Option<String>,
    /// A new API base URL; `""` goes back to the provider's public API.
    #[serde(default)]
    #[schema(value_type = Option<schema::ApiUrl>)]
    pub api_url: Option<String>,
    /// A new provider access token; `""` removes it (and with it commit statuses).
    #[serde(default)]
    #[schema(value_type = Option<schema::AccessToken>)]
    pub access_token: Option<String>,
    /// A new polling interval in seconds (10 to 86400; 0 never polls).
    #[schema(value_type = Option<schema::PollInterval>)]
    #[serde(default, deserialize_with = "super::extract::optional_whole_number")]
    pub poll_interval_seconds: Option<u32>,
}

/// Update a repository (developer).
#[utoipa::path(put, path = "/api/v1/repos/{id}", tag = "repositories", params(("id" = schema::IdText, Path, description = "repository id")),
    request_body = UpdateRepositoryRequest, security(("bearer" = [])),
    responses((status = 200, body = RepositoryView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn update_repository(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<UpdateRepositoryRequest>,
) -> Result<Json<RepositoryView>, ApiError> {
    caller.require(Role::Developer, "changing a repository")?;
    let repo_id = parse_id("id", &id)?;
    if let Some(url) = &request.repo_url {
        validate_repo_url(url)?;
        state.outbound.check_url("repo_url", url, UrlKind::Repository).await?;
    }
    if let Some(branch) = &request.branch {
        validate_branch("branch", branch)?;
    }
    if let Some(name) = &request.name {
        validate_name(name)?;
    }
    if let Some(secret) = &request.webhook_secret {
        validate_webhook_secret(secret)?;
    }
    if let Some(url) = &request.api_url {
        validate_api_url(url)?;
        if !url.is_empty() {
            state.outbound.check_url("api_url", url, UrlKind::Http).await?;
        }
    }
    if let Some(token) = &request.access_token {
        validate_access_token(token)?;
    }
    check_poll_interval(request.poll_interval_seconds.map(u64::from))?;
    state.node.read_barrier().await?;
    let current = load_repository(&state, repo_id)?;
    let url = request.repo_url.clone().unwrap_or_else(|| current.repo_url.clone());
    // The sealed secret is bound to the URL, so a URL change re-seals the kept secret.
    let webhook_secret = match (&request.webhook_secret, &current.webhook_secret) {
        (Some(secret), _) if secret.is_empty() => Some(String::new()),
        (Some(secret), _) => Some(state.secrets.seal(secret, &secret_context(&url))),
        (None, Some(sealed)) if url != current.repo_url => {
            let clear = state.secrets.open(sealed, &secret_context(&current.repo_url)).map_err(|e| ApiError::internal(e.to_string()))?;
            Some(state.secrets.seal(&clear, &secret_context(&url)))
        }
        (None, _) => None,
    };
    // The access token is bound to the URL the same way.
    let access_token = match (&request.access_token, &current.access_token) {
        (Some(token), _) if token.is_empty() => Some(String::new()),
        (Some(token), _) => Some(state.secrets.seal(token, &access_token_context(&url))),
        (None, Some(sealed)) if url != current.repo_url => {
            let clear =
                state.secrets.open(sealed, &access_token_context(&current.repo_url)).map_err(|e| ApiError::internal(e.to_string()))?;
            Some(state.secrets.seal(&clear, &access_token_context(&url)))
        }
        (None, _) => None,
    };
    let patch = RepositoryPatch {
        name: request.name,
        repo_url: request.repo_url,
        branch: request.branch,
        scm_type: request.scm_type,
        webhook_secret,
        api_url: request.api_url.as_deref().map(normalized_api_url),
        access_token,
        poll_interval_seconds: request.poll_interval_seconds.map(u64::from),
    };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), Command::UpdateRepository { repo_id, patch }).await?;
    applied_id(outcome)?;
    Ok(Json(view(&state, load_repository(&state, repo_id)?)))
}

/// Disconnect a repository and delete its pipelines (developer).
#[utoipa::path(delete, path = "/api/v1/repos/{id}", tag = "repositories", params(("id" = schema::IdText, Path, description = "repository id")), security(("bearer" = [])),
    responses((status = 204), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn delete_repository(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    caller.require(Role::Developer, "deleting a repository")?;
    let repo_id = parse_id("id", &id)?;
    let (outcome, _) = super::propose(&state.node, &caller.requester(), Command::DeleteRepository { repo_id }).await?;
    applied_id(outcome)?;
    Ok(StatusCode::NO_CONTENT)
}

fn normalize_url(url: &str) -> String {
    url.trim_end_matches('/').trim_end_matches(".git").to_ascii_lowercase()
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The connected repository whose URL matches one of `urls` (normalized), via the URL index.
fn find_repository_by_urls(state: &AppState, urls: &[String]) -> Result<Option<Repository>, ApiError> {
    let prefix = format!("{}\0", index::REPOSITORIES_BY_URL);
    let entries = state.node.backend.scan(Table::Indexes, crate::store::prefix_range(prefix.as_bytes()), usize::MAX, false)?;
    for (key, _) in entries {
        // key = index name, 0, URL, 0, id (8 bytes)
        let Some(url_bytes) = key.get(prefix.len()..key.len().saturating_sub(9)) else { continue };
        let url = String::from_utf8_lossy(url_bytes);
        if urls.contains(&normalize_url(&url)) {
            let Some(repo_id) = crate::state::codec::key_id(&key) else { continue };
            return Ok(load_id(&state.node.state(), Table::Repositories, repo_id)?);
        }
    }
    Ok(None)
}

/// Verify a webhook delivery's signature for `scm_type`, in constant time.
pub fn verify_signature(scm_type: ScmType, secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    match scm_type {
        ScmType::Git => false,
        ScmType::Gitlab => header("x-gitlab-token").is_some_and(|token| bool::from(token.as_bytes().ct_eq(secret.as_bytes()))),
        ScmType::Github | ScmType::Bitbucket => {
            let signature = match scm_type {
                ScmType::Github => header("x-hub-signature-256"),
                _ => header("x-hub-signature").or_else(|| header("x-hub-signature-256")),
            };
            let Some(hex_digest) = signature.and_then(|value| value.strip_prefix("sha256=")) else {
                return false;
            };
            let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
            mac.update(body);
            let expected = crate::state::apply::hex(&mac.finalize().into_bytes());
            bool::from(expected.as_bytes().ct_eq(hex_digest.to_ascii_lowercase().as_bytes()))
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAccepted {
    pub repo_id: u64,
    /// The provider's event name, from its event header (e.g. `push`, `Push Hook`, `repo:push`).
    pub event: String,
    /// The provider's delivery id, when it sent one.
    pub delivery: Option<String>,
    /// What the delivery means: one entry per change (a Bitbucket push can carry several).
    pub changes: Vec<WebhookChange>,
    /// The delivery id was already received in the last 72 hours: acknowledged, nothing ran.
    pub duplicate: bool,
    /// The runs (deployments) the delivery started, in order.
    pub deployments: Vec<u64>,
}

#[derive(Debug, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WebhookChangeKind {
    Push,
    Tag,
    PullRequest,
    Ignored,
}

/// One change a delivery reports, as understood; fields that do not apply are null.
#[derive(Debug, Serialize, ToSchema, PartialEq, Eq)]
pub struct WebhookChange {
    pub kind: WebhookChangeKind,
    /// The pushed branch, or a pull request's source branch.
    pub branch: Option<String>,
    pub tag: Option<String>,
    /// The new head of the branch or tag, or the pull request's head commit.
    pub commit: Option<String>,
    /// The previous head of a pushed branch (null when the push created it).
    pub before: Option<String>,
    pub pull_request: Option<u64>,
    /// `opened`, `synchronized`, `reopened`, `closed` or `merged`.
    pub action: Option<String>,
    pub target_branch: Option<String>,
    /// The provider's trial-merge ref the checks of a pull request run on (none on Bitbucket).
    pub merge_ref: Option<String>,
    /// The runs (deployments) this change started, one per matching pipeline.
    pub deployments: Vec<u64>,
    /// Why nothing (or not every pipeline) ran for this change.
    pub reason: Option<String>,
}

impl From<&events::Outcome> for WebhookChange {
    fn from(outcome: &events::Outcome) -> Self {
        let empty = |kind| WebhookChange {
            kind,
            branch: None,
            tag: None,
            commit: None,
            before: None,
            pull_request: None,
            action: None,
            target_branch: None,
            merge_ref: None,
            deployments: Vec::new(),
            reason: None,
        };
        match outcome {
            events::Outcome::Ignored(ignored) => {
                WebhookChange { reason: Some(ignored.reason.clone()), ..empty(WebhookChangeKind::Ignored) }
            }
            events::Outcome::Event(ScmEvent::Push(push)) => WebhookChange {
                branch: Some(push.branch.clone()),
                commit: Some(push.after.clone()),
                before: push.before.clone(),
                ..empty(WebhookChangeKind::Push)
            },
            events::Outcome::Event(ScmEvent::TagPush(tag)) => {
                WebhookChange { tag: Some(tag.tag.clone()), commit: Some(tag.commit.clone()), ..empty(WebhookChangeKind::Tag) }
            }
            events::Outcome::Event(ScmEvent::PullRequest(pull)) => WebhookChange {
                branch: Some(pull.source_branch.clone()),
                commit: pull.head_commit.clone(),
                pull_request: Some(pull.number),
                action: Some(pull.action.as_str().to_string()),
                target_branch: Some(pull.target_branch.clone()),
                merge_ref: pull.merge_ref.clone(),
                ..empty(WebhookChangeKind::PullRequest)
            },
        }
    }
}

/// A body that is not a delivery: 400 saying what is wrong (413 when it is too large).
fn webhook_parse_error(error: events::ParseError) -> ApiError {
    match error {
        events::ParseError::TooLarge { .. } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", error.to_string()),
        error => ApiError::new(StatusCode::BAD_REQUEST, "invalid_webhook", error.to_string()),
    }
}

/// The headers providers send with a delivery, as the OpenAPI document lists them for both
/// webhook routes (the handlers read them from the `HeaderMap`; this type only documents them).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct WebhookHeaders {
    /// GitHub's event name, e.g. push (required for GitHub repositories)
    #[param(rename = "X-GitHub-Event")]
    github_event: Option<String>,
    /// GitHub's delivery id
    #[param(rename = "X-GitHub-Delivery")]
    github_delivery: Option<String>,
    /// GitHub: sha256=<HMAC-SHA256 of the body with the webhook secret>
    #[param(rename = "X-Hub-Signature-256")]
    hub_signature_256: Option<String>,
    /// GitLab's event name, e.g. Push Hook (required for GitLab repositories)
    #[param(rename = "X-Gitlab-Event")]
    gitlab_event: Option<String>,
    /// GitLab: the webhook secret itself
    #[param(rename = "X-Gitlab-Token")]
    gitlab_token: Option<String>,
    /// GitLab's delivery id, kept across retries (17.4+)
    #[param(rename = "Idempotency-Key")]
    idempotency_key: Option<String>,
    /// GitLab's event id (14.8+), used when Idempotency-Key is absent
    #[param(rename = "X-Gitlab-Event-UUID")]
    gitlab_event_uuid: Option<String>,
    /// Bitbucket's event name, e.g. repo:push (required for Bitbucket repositories)
    #[param(rename = "X-Event-Key")]
    event_key: Option<String>,
    /// Bitbucket's delivery id
    #[param(rename = "X-Request-UUID")]
    request_uuid: Option<String>,
    /// Bitbucket: sha256=<HMAC-SHA256 of the body with the webhook secret>
    #[param(rename = "X-Hub-Signature")]
    hub_signature: Option<String>,
}

/// Receive a webhook from GitHub, GitLab or Bitbucket. The payload names the repository; the
/// delivery is authenticated with that repository's webhook secret, the way its provider signs
/// (`X-Hub-Signature-256` for GitHub, `X-Gitlab-Token` for GitLab, `X-Hub-Signature` for
/// Bitbucket), and only then parsed as the event its provider's event header names. Pushes, tag
/// pushes and pull request changes start runs of the repository's matching pipelines (one Raft
/// write); a delivery id already received in the last 72 hours is acknowledged and runs nothing.
/// The answer says what each change started, or why it started nothing.
/// GitHub deliveries may be JSON or form-encoded (the JSON in the `payload` field).
#[utoipa::path(post, path = "/api/v1/repos/webhook", tag = "repositories",
    params(WebhookHeaders),
    request_body(content = Object, content_type = "application/json", description = "The provider's event payload, as it sent it"),
    responses((status = 202, body = WebhookAccepted), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 404, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn webhook(
    State(state): State<AppState>,
    source: super::extract::ClientAddress,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<(StatusCode, Json<WebhookAccepted>), ApiError> {
    let content_type = headers.get("content-type").and_then(|value| value.to_str().ok());
    // The secret that signs a delivery belongs to the repository its payload names, so only the
    // repository URLs are read before the signature check; the event is parsed after it.
    let payload = events::payload_json(&body, content_type).map_err(webhook_parse_error)?;
    let urls: Vec<String> = events::repository_urls(&payload).map_err(webhook_parse_error)?.iter().map(|url| normalize_url(url)).collect();
    drop(payload);
    let repository = if urls.is_empty() { None } else { find_repository_by_urls(&state, &urls)? };
    let repository = repository.ok_or_else(|| ApiError::not_found("no connected repository matches this webhook's repository URL"))?;
    accept_delivery(&state, source, repository, &headers, &body).await
}

/// Receive a webhook for repository `id`, whatever repository URLs the payload names (a mirror,
/// a renamed repository, a self-hosted server reached under another name). Otherwise exactly
/// like `POST /api/v1/repos/webhook`.
#[utoipa::path(post, path = "/api/v1/repos/{id}/webhook", tag = "repositories",
    params(
        ("id" = schema::IdText, Path, description = "repository id"),
        WebhookHeaders
    ),
    request_body(content = Object, content_type = "application/json", description = "The provider's event payload, as it sent it"),
    responses((status = 202, body = WebhookAccepted), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 404, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn repository_webhook(
    State(state): State<AppState>,
    source: super::extract::ClientAddress,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<(StatusCode, Json<WebhookAccepted>), ApiError> {
    let repo_id = parse_id("id", &id)?;
    let repository = load_repository(&state, repo_id)?;
    accept_delivery(&state, source, repository, &headers, &body).await
}

/// Authenticate a delivery for `repository`, parse it, and start what it asks for. The
/// repository is read from this node's applied state without a read barrier, so that a delivery
/// costs one Raft write and answers well within a provider's timeout; a repository connected a
/// moment ago on another node may be missing here for that moment (404, and providers retry).
async fn accept_delivery(
    state: &AppState,
    source: super::extract::ClientAddress,
    repository: Repository,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, Json<WebhookAccepted>), ApiError> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if repository.scm_type == ScmType::Git {
        // The delivery may be well formed; the repository is what takes none (409, not 400).
        return Err(ApiError::new(StatusCode::CONFLICT, "repository_takes_no_webhooks", events::ParseError::NoWebhooks.to_string()));
    }
    let sealed = repository.webhook_secret.as_ref().ok_or_else(|| {
        ApiError::unauthorized(format!("repository {} has no webhook secret; set one to accept webhooks", repository.repo_id))
    })?;
    let secret = state.secrets.open(sealed, &secret_context(&repository.repo_url)).map_err(|e| ApiError::internal(e.to_string()))?;
    if !verify_signature(repository.scm_type, &secret, headers, body) {
        return Err(ApiError::unauthorized("webhook signature does not match the repository's webhook secret"));
    }
    let event = header(events::event_header(repository.scm_type));
    let parsed = events::parse_delivery(repository.scm_type, event, body, header("content-type")).map_err(webhook_parse_error)?;
    let delivery = events::delivery_id_headers(repository.scm_type)
        .iter()
        .find_map(|name| header(name))
        .map(str::trim)
        .filter(|delivery| !delivery.is_empty())
        .map(str::to_string);
    let scm_events: Vec<ScmEvent> = parsed
        .outcomes
        .iter()
        .filter_map(|outcome| match outcome {
            events::Outcome::Event(event) => Some(event.clone()),
            events::Outcome::Ignored(_) => None,
        })
        .collect();
    let mut changes: Vec<WebhookChange> = parsed.outcomes.iter().map(WebhookChange::from).collect();
    // A delivery with nothing to act on (a ping, a deletion) writes nothing; one with events is
    // recorded even when none of them will run, so that its delivery id is remembered.
    let triggered = if scm_events.is_empty() {
        Triggered::default()
    } else {
        let requester = Requester { user_id: None, source: source.0 };
        let source = ScmSource::Webhook { delivery: delivery.clone() };
        trigger::submit(&state.node, &requester, repository.repo_id, source, scm_events).await?
    };
    let mut results = triggered.changes.iter();
    for change in changes.iter_mut().filter(|change| change.kind != WebhookChangeKind::Ignored) {
        if triggered.duplicate {
            change.reason = Some("this delivery id was already received in the last 72 hours; nothing runs again".into());
        } else if let Some(result) = results.next() {
            change.deployments = result.deployments.clone();
            change.reason = (!result.skipped.is_empty()).then(|| result.skipped.join("; "));
        }
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(WebhookAccepted {
            repo_id: repository.repo_id,
            event: event.unwrap_or_default().trim().to_string(),
            delivery,
            changes,
            duplicate: triggered.duplicate,
            deployments: triggered.deployments,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_urls_are_checked() {
        for good in ["https://github.com/org/repo", "git@github.com:org/repo.git", "git://127.0.0.1/repo.git", "file:///srv/git/repo.git"] {
            validate_repo_url(good).unwrap();
        }
        for bad in ["github.com/org/repo", "ftp://x/y", "https://github.com", "not a url", "https:///repo"] {
            assert_eq!(validate_repo_url(bad).unwrap_err().field.as_deref(), Some("repo_url"), "{bad}");
        }
        assert_eq!(name_from_url("https://github.com/org/repo.git"), "repo");
        assert_eq!(name_from_url("git@github.com:org/api"), "api");
    }

    #[test]
    fn api_urls_and_access_tokens_are_checked() {
        for good in ["", "https://api.github.com", "https://ghe.example.com/api/v3", "http://gitlab.internal:8080/api/v4/"] {
            validate_api_url(good).unwrap();
        }
        for bad in ["api.github.com", "ftp://x/api", "https://", "https:///api", "https://h/api?x=1", "https://h/a#b", "https://h /api"] {
            let error = validate_api_url(bad).unwrap_err();
            assert_eq!((error.status, error.field.as_deref()), (StatusCode::BAD_REQUEST, Some("api_url")), "{bad}");
            assert!(error.message.contains("api/v3"), "{}", error.message);
        }
        validate_access_token("ghp_abcdefghijklmnopqrstuvwxyz0123456789").unwrap();
        validate_access_token("").unwrap();
        for bad in ["glpat-abc\n".to_string(), "two words".to_string(), "x".repeat(2001)] {
            assert_eq!(validate_access_token(&bad).unwrap_err().field.as_deref(), Some("access_token"));
        }
        assert_eq!(normalized_api_url("https://gitlab.example.com/api/v4/"), "https://gitlab.example.com/api/v4");
    }

    #[test]
    fn the_connect_answer_says_what_to_set_up_on_the_provider() {
        assert_eq!(webhook_events(ScmType::Github), ["Pushes", "Pull requests"]);
        assert_eq!(webhook_events(ScmType::Gitlab), ["Push events", "Tag push events", "Merge request events"]);
        assert!(webhook_events(ScmType::Bitbucket).contains(&"Repository: Push".to_string()));
        let url = "https://davit.example.com/api/v1/repos/webhook";
        for scm_type in [ScmType::Github, ScmType::Gitlab, ScmType::Bitbucket] {
            let text = webhook_instructions(scm_type, url, false);
            assert!(text.contains(url) && text.contains("webhook_secret"), "{text}");
            assert!(!webhook_instructions(scm_type, url, true).contains("PUT"));
        }
        // The seed's fields stay at the top level of the answer.
        let view = ConnectedRepositoryView {
            repository: RepositoryView {
                repo_id: 1,
                name: "repo".into(),
                repo_url: "https://github.com/org/repo".into(),
                branch: "main".into(),
                scm_type: ScmType::Github,
                webhook_secret: Some("***".into()),
                user_id: Some(1),
                created_at: "t".into(),
                updated_at: "t".into(),
                api_url: None,
                access_token: Some("***".into()),
                poll_interval_seconds: None,
                polled_every_seconds: None,
            },
            webhook_url: url.into(),
            webhook_events: webhook_events(ScmType::Github),
            webhook_instructions: webhook_instructions(ScmType::Github, url, true),
        };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!((json["repo_id"].as_u64(), json["repo_url"].as_str()), (Some(1), Some("https://github.com/org/repo")));
        assert_eq!((json["access_token"].as_str(), json["webhook_url"].as_str()), (Some("***"), Some(url)));
    }

    #[test]
    fn github_signature_is_verified_over_the_exact_bytes() {
        // The fixture's exact bytes are what is signed.
        let body = include_bytes!("../../tests/fixtures/webhooks/github-push.json").to_vec();
        let mut mac = HmacSha256::new_from_slice(b"secret_key").unwrap();
        mac.update(&body);
        let signature = format!("sha256={}", crate::state::apply::hex(&mac.finalize().into_bytes()));
        let mut headers = HeaderMap::new();
        headers.insert("x-hub-signature-256", signature.parse().unwrap());
        assert!(verify_signature(ScmType::Github, "secret_key", &headers, &body));
        assert!(!verify_signature(ScmType::Github, "other", &headers, &body));
        let mut altered = body.clone();
        altered.push(b' ');
        assert!(!verify_signature(ScmType::Github, "secret_key", &headers, &altered));
        let mut gitlab = HeaderMap::new();
        gitlab.insert("x-gitlab-token", "secret_key".parse().unwrap());
        assert!(verify_signature(ScmType::Gitlab, "secret_key", &gitlab, b"{}"));
    }

    #[test]
    fn githubs_published_test_vector_verifies() {
        // docs.github.com, "Validating webhook deliveries" -> "Testing the webhook payload validation".
        let mut headers = HeaderMap::new();
        let signature = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        headers.insert("x-hub-signature-256", signature.parse().unwrap());
        assert!(verify_signature(ScmType::Github, "It's a Secret to Everybody", &headers, b"Hello, World!"));
        assert!(!verify_signature(ScmType::Github, "It's a Secret to Everybody", &headers, b"Hello, World?"));
    }

    #[test]
    fn the_response_reports_what_the_delivery_means() {
        let pull = events::parse_delivery(
            ScmType::Github,
            Some("pull_request"),
            include_bytes!("../../tests/fixtures/webhooks/github-pull_request-synchronize.json"),
            Some("application/json"),
        )
        .unwrap();
        let change = WebhookChange::from(&pull.outcomes[0]);
        assert_eq!(change.kind, WebhookChangeKind::PullRequest);
        assert_eq!((change.pull_request, change.action.as_deref()), (Some(2), Some("synchronized")));
        assert_eq!(change.branch.as_deref(), Some("changes"));
        assert_eq!(change.target_branch.as_deref(), Some("master"));
        assert_eq!(change.commit.as_deref(), Some("ec26c3e57ca3a959ca5aad62de7213c562f8c821"));
        assert_eq!(change.merge_ref.as_deref(), Some("refs/pull/2/merge"));
        let json = serde_json::to_value(&change).unwrap();
        assert_eq!(json["kind"], "pull_request");

        let deleted = events::parse_delivery(
            ScmType::Github,
            Some("push"),
            include_bytes!("../../tests/fixtures/webhooks/github-push-tag-deleted.json"),
            None,
        )
        .unwrap();
        let change = WebhookChange::from(&deleted.outcomes[0]);
        assert_eq!(change.kind, WebhookChangeKind::Ignored);
        assert!(change.reason.as_deref().is_some_and(|reason| reason.contains("simple-tag")));

        let error = webhook_parse_error(events::parse_delivery(ScmType::Gitlab, Some("Push Hook"), b"[1]", None).unwrap_err());
        assert_eq!((error.status, error.code), (StatusCode::BAD_REQUEST, "invalid_webhook"));
    }
}
