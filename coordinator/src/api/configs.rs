//! Configuration variables and secrets per environment (and optionally per pipeline, which
//! overrides the environment-wide value). Secret values are sealed with the master key before
//! they are proposed, so they never reach the Raft log, the store or a snapshot in clear; the
//! API always returns them masked. Setting or deleting a secret needs an admin.

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
use super::users::applied_id;
use crate::api_error::ApiError;
use crate::node::Node;
use crate::state::apply::{configuration_key, configuration_prefix, load};
use crate::state::codec::decode;
use crate::state::records::{Configuration, Role};
use crate::state::{Command, ConfigEntry};
use crate::store::{Table, prefix_range};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_configs, set_configs)).routes(routes!(delete_config))
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
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfigView {
    pub environment: String,
    pub pipeline_id: Option<u64>,
    /// Every key with its effective value.
    pub variables: BTreeMap<String, ConfigValue>,
}

fn rows(node: &Node, environment: &str, pipeline_id: Option<u64>) -> Result<Vec<Configuration>, ApiError> {
    let prefix = configuration_prefix(environment, pipeline_id);
    node.backend
        .scan(Table::Configurations, prefix_range(&prefix), usize::MAX, false)?
        .into_iter()
        .map(|(_, bytes)| decode(Table::Configurations, &bytes).map_err(ApiError::from))
        .collect()
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
    let mut effective: BTreeMap<String, Configuration> =
        rows(node, environment, None)?.into_iter().map(|row| (row.key.clone(), row)).collect();
    if pipeline_id.is_some() {
        effective.extend(rows(node, environment, pipeline_id)?.into_iter().map(|row| (row.key.clone(), row)));
    }
    Ok(effective)
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
            let value = ConfigValue {
                value: if row.is_secret { "***".into() } else { row.value },
                secret: row.is_secret,
                scope: if row.pipeline_id.is_some() { "pipeline".into() } else { "environment".into() },
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
        // Printable ASCII: keys become variable names in build environments, and the state
        // machine counts its limit of 100 in bytes.
        if key.is_empty() || key.len() > 100 || !key.bytes().all(|byte| (0x20..=0x7e).contains(&byte)) {
            return Err(ApiError::invalid_field(&key, format!("key {key:?} must be 1 to 100 printable ASCII characters")));
        }
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
    Ok(Json(ConfigWritten { environment, pipeline_id, written: applied.affected, secret_keys }))
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
