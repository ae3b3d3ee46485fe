//! Configuration variables and secrets per environment (and optionally per pipeline, which
//! overrides the environment-wide value). Secret values are sealed with the master key before
//! they are proposed, so they never reach the Raft log, the store or a snapshot in clear; the
//! API always returns them masked. Setting or deleting a secret needs an admin. Every set of a
//! key makes a new version (`state::config_history`); `GET .../{key}/versions` lists them.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::deployments::scalar_to_string;
use super::extract::{Caller, JsonBody, Path, Query, parse_id};
use super::pipelines::{load_pipeline, validate_environment};
use super::schema;
use super::users::{applied_id, timestamp};
use crate::api_error::ApiError;
use crate::node::Node;
use crate::state::apply::{configuration_key, load};
use crate::state::config_history;
use crate::state::records::{Configuration, Role};
use crate::state::{Command, ConfigEntry};
use crate::store::Table;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_configs, set_configs)).routes(routes!(delete_config)).routes(routes!(list_config_versions))
}

/// Words that make a key a secret even when the request does not say so.
const SECRET_WORDS: [&str; 6] = ["password", "secret", "token", "key", "credential", "passwd"];

pub fn key_names_a_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|word| key.contains(word))
}

/// The sealing context of a configuration value: the row it belongs to.
pub fn secret_context(environment: &str, pipeline_id: Option<u64>, key: &str) -> String {
    format!("configuration:{environment}:{}:{key}", pipeline_id.unwrap_or(0))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConfigScope {
    /// A pipeline's own values, which override the environment-wide ones.
    #[param(value_type = Option<schema::IdText>)]
    pub pipeline_id: Option<String>,
    /// Serve from this node without a read barrier (may lag slightly).
    #[serde(default)]
    pub stale_ok: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfigValue {
    /// The value, or `"***"` for a secret.
    pub value: String,
    pub secret: bool,
    /// `environment` or `pipeline`: where the value comes from.
    pub scope: String,
    /// The key's current version: every set makes a new one (see `.../{key}/versions`).
    pub version: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfigView {
    pub environment: String,
    pub pipeline_id: Option<u64>,
    /// Every key with its effective value.
    pub variables: BTreeMap<String, ConfigValue>,
}

/// The effective configuration rows of an environment for a pipeline (pipeline rows override
/// environment-wide ones), after a read barrier unless `stale_ok`.
pub async fn effective_configuration(
    node: &Node,
    environment: &str,
    pipeline_id: Option<u64>,
    stale_ok: bool,
) -> Result<BTreeMap<String, Configuration>, ApiError> {
    if !stale_ok {
        node.read_barrier().await?;
    }
    Ok(config_history::effective_rows(&node.state(), environment, pipeline_id)?)
}

/// Get configuration variables for a specific environment (secrets masked).
#[utoipa::path(get, path = "/api/v1/configs/{environment}", tag = "configuration", params(("environment" = schema::EnvironmentName, Path), ConfigScope),
    security(("bearer" = [])),
    responses((status = 200, body = ConfigView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn get_configs(
    State(state): State<AppState>,
    _caller: Caller,
    Path(environment): Path<String>,
    Query(scope): Query<ConfigScope>,
) -> Result<Json<ConfigView>, ApiError> {
    validate_environment("environment", &environment)?;
    let pipeline_id = scope.pipeline_id.as_deref().map(|id| parse_id("pipeline_id", id)).transpose()?;
    let effective = effective_configuration(&state.node, &environment, pipeline_id, scope.stale_ok).await?;
    if let Some(pipeline_id) = pipeline_id {
        load_pipeline(&state, pipeline_id)?;
    }
    let variables = effective
        .into_iter()
        .map(|(key, row)| {
            let version = row.current_version();
            let value = ConfigValue {
                value: if row.is_secret { "***".into() } else { row.value },
                secret: row.is_secret,
                scope: scope_name(row.pipeline_id).into(),
                version,
            };
            (key, value)
        })
        .collect();
    Ok(Json(ConfigView { environment, pipeline_id, variables }))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConfigWritten {
    pub environment: String,
    pub pipeline_id: Option<u64>,
    pub written: u64,
    /// Keys stored as secrets (sealed, shown masked).
    pub secret_keys: Vec<String>,
    /// The version each key written now has.
    pub versions: BTreeMap<String, u64>,
}

/// Add or update configuration variables. The body is the seed's flat object
/// (`{"db_password": "new_password", "api_key": "12345"}`); a value may also be
/// `{"value": "...", "secret": true}`. Keys that name a secret (password, secret, token, key,
/// credential) are secrets. Secrets need an admin.
#[utoipa::path(post, path = "/api/v1/configs/{environment}", tag = "configuration", params(("environment" = schema::EnvironmentName, Path), ConfigScope),
    request_body(content = schema::ConfigVariables, example = json!({"db_password": "new_password", "api_key": "12345"})), security(("bearer" = [])),
    responses((status = 200, body = ConfigWritten), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn set_configs(
    State(state): State<AppState>,
    caller: Caller,
    Path(environment): Path<String>,
    Query(scope): Query<ConfigScope>,
    JsonBody(body): JsonBody<serde_json::Map<String, serde_json::Value>>,
) -> Result<Json<ConfigWritten>, ApiError> {
    caller.require(Role::Developer, "changing configuration")?;
    validate_environment("environment", &environment)?;
    let pipeline_id = scope.pipeline_id.as_deref().map(|id| parse_id("pipeline_id", id)).transpose()?;
    if body.is_empty() {
        return Err(ApiError::bad_request("give at least one variable, like {\"api_key\": \"12345\"}"));
    }
    if body.len() > 500 {
        return Err(ApiError::bad_request("at most 500 variables per request"));
    }
    let mut entries = Vec::with_capacity(body.len());
    let mut secret_keys = Vec::new();
    for (key, value) in body {
        validate_key(&key)?;
        let (value, marked_secret) = match value {
            serde_json::Value::Object(mut object) => {
                let secret = match object.remove("secret") {
                    None => false,
                    Some(serde_json::Value::Bool(flag)) => flag,
                    Some(_) => return Err(ApiError::invalid_field(&format!("{key}.secret"), "secret must be true or false")),
                };
                let value = object
                    .remove("value")
                    .ok_or_else(|| ApiError::invalid_field(&format!("{key}.value"), format!("{key} needs a \"value\"")))?;
                if let Some(unknown) = object.keys().next() {
                    return Err(ApiError::invalid_field(&format!("{key}.{unknown}"), "only \"value\" and \"secret\" are allowed"));
                }
                (scalar_to_string(&format!("{key}.value"), value)?, secret)
            }
            other => (scalar_to_string(&key, other)?, false),
        };
        if value.chars().count() > 65_536 {
            return Err(ApiError::invalid_field(&key, "values must be at most 64 KiB"));
        }
        let is_secret = marked_secret || key_names_a_secret(&key);
        let value = if is_secret {
            secret_keys.push(key.clone());
            state.secrets.seal(&value, &secret_context(&environment, pipeline_id, &key))
        } else {
            value
        };
        entries.push(ConfigEntry { key, value, is_secret });
    }
    if !secret_keys.is_empty() {
        caller.require(Role::Admin, &format!("setting secrets ({})", secret_keys.join(", ")))?;
    }
    let command = Command::SetConfigurations { environment: environment.clone(), pipeline_id, entries };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    let applied = outcome.result.map_err(ApiError::from)?;
    Ok(Json(ConfigWritten { environment, pipeline_id, written: applied.affected, secret_keys, versions: applied.config_versions }))
}

/// Delete one variable (admin for a secret).
#[utoipa::path(delete, path = "/api/v1/configs/{environment}/{key}", tag = "configuration",
    params(("environment" = schema::EnvironmentName, Path), ("key" = String, Path), ConfigScope), security(("bearer" = [])),
    responses((status = 204), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn delete_config(
    State(state): State<AppState>,
    caller: Caller,
    Path((environment, key)): Path<(String, String)>,
    Query(scope): Query<ConfigScope>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Developer, "changing configuration")?;
    validate_environment("environment", &environment)?;
    let pipeline_id = scope.pipeline_id.as_deref().map(|id| parse_id("pipeline_id", id)).transpose()?;
    state.node.read_barrier().await?;
    let row: Option<Configuration> = load(&state.node.state(), Table::Configurations, &configuration_key(&environment, pipeline_id, &key))?;
    if row.as_ref().is_some_and(|row| row.is_secret) {
        caller.require(Role::Admin, "deleting a secret")?;
    }
    let command = Command::DeleteConfiguration { environment, pipeline_id, key };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    applied_id(outcome)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `environment` or `pipeline`: where a row of this pipeline (or none) comes from.
pub fn scope_name(pipeline_id: Option<u64>) -> &'static str {
    if pipeline_id.is_some() { "pipeline" } else { "environment" }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfigVersionView {
    /// The row the version belongs to; a key deleted and set again is a new row, whose
    /// versions start at 1 again.
    pub config_id: u64,
    pub version: u64,
    /// The value, or `"***"` for a secret.
    pub value: String,
    pub secret: bool,
    /// When it was set (RFC 3339) and by which user.
    pub created_at: String,
    pub created_by: Option<u64>,
    /// The key's value now.
    pub current: bool,
    /// A stored deployment runs (or ran) with it, so it is kept for rollbacks.
    pub in_use: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfigVersions {
    pub environment: String,
    pub pipeline_id: Option<u64>,
    pub key: String,
    /// The key's current version; null when the key was deleted (versions that deployments
    /// still reference are kept).
    pub current_version: Option<u64>,
    /// Newest first. Kept: versions referenced by stored deployments and the last 10 of an
    /// existing key; older ones are pruned.
    pub versions: Vec<ConfigVersionView>,
}

/// List the stored versions of one variable, newest first (secret values masked). Every set of
/// a key makes a new version; deployments record the versions they resolved, and a rollback
/// runs with its target's.
#[utoipa::path(get, path = "/api/v1/configs/{environment}/{key}/versions", tag = "configuration",
    params(("environment" = schema::EnvironmentName, Path), ("key" = String, Path), ConfigScope), security(("bearer" = [])),
    responses((status = 200, body = ConfigVersions), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 404, body = crate::api_error::ErrorBody)))]
async fn list_config_versions(
    State(state): State<AppState>,
    _caller: Caller,
    Path((environment, key)): Path<(String, String)>,
    Query(scope): Query<ConfigScope>,
) -> Result<Json<ConfigVersions>, ApiError> {
    validate_environment("environment", &environment)?;
    // Any key may be asked for: one that cannot exist is simply not found.
    let pipeline_id = scope.pipeline_id.as_deref().map(|id| parse_id("pipeline_id", id)).transpose()?;
    if !scope.stale_ok {
        state.node.read_barrier().await?;
    }
    let view = state.node.state();
    let current: Option<Configuration> = load(&view, Table::Configurations, &configuration_key(&environment, pipeline_id, &key))?;
    let mut versions = Vec::new();
    for version in config_history::versions_of(&view, &environment, pipeline_id, &key)?.into_iter().rev() {
        let is_current = current.as_ref().is_some_and(|row| row.config_id == version.config_id && row.current_version() == version.version);
        versions.push(ConfigVersionView {
            config_id: version.config_id,
            version: version.version,
            value: if version.is_secret { "***".into() } else { version.value },
            secret: version.is_secret,
            created_at: timestamp(version.created_at),
            created_by: version.created_by,
            current: is_current,
            in_use: config_history::in_use(&view, version.config_id, version.version)?,
        });
    }
    if versions.is_empty() {
        let scope = pipeline_id.map(|id| format!(" for pipeline {id}")).unwrap_or_default();
        return Err(ApiError::not_found(format!("configuration {key:?} not found in environment {environment:?}{scope}")));
    }
    Ok(Json(ConfigVersions { environment, pipeline_id, key, current_version: current.map(|row| row.current_version()), versions }))
}

/// Keys are 1 to 100 printable ASCII characters: they become variable names in build
/// environments, and the state machine counts its limit of 100 in bytes.
fn validate_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > 100 || !key.bytes().all(|byte| (0x20..=0x7e).contains(&byte)) {
        return Err(ApiError::invalid_field(key, format!("key {key:?} must be 1 to 100 printable ASCII characters")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_keys_are_recognized() {
        for key in ["db_password", "API_KEY", "github_token", "client_secret", "aws_credentials"] {
            assert!(key_names_a_secret(key), "{key}");
        }
        for key in ["env", "db_host", "replicas"] {
            assert!(!key_names_a_secret(key), "{key}");
        }
    }
}
