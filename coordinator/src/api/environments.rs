//! Environments: the four every cluster has (development, testing, staging, production) and
//! any other a pipeline or an admin names; each with its protection (approvals, allowed
//! branches), its promotion source, and a strategy over the pipelines' own.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, JsonBody, Path};
use super::pipelines::validate_environment;
use super::repos::validate_branch_pattern;
use super::schema;
use super::users::{applied_id, timestamp};
use crate::api_error::ApiError;
use crate::state::Command;
use crate::state::apply::load;
use crate::state::records::{DEFAULT_ENVIRONMENTS, DeployStrategy, Environment, EnvironmentSettings, Role};
use crate::state::txn::StateRead;
use crate::store::Table;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_environments)).routes(routes!(get_environment, update_environment))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentView {
    #[schema(value_type = schema::EnvironmentName)]
    pub name: String,
    /// Deployments here release only what succeeded in this environment first.
    #[schema(value_type = Option<schema::EnvironmentName>, example = "staging")]
    pub promote_from: Option<String>,
    /// Developer approvals a deployment here waits for (one admin's approval also suffices).
    pub required_approvals: Option<u32>,
    /// Branch patterns deployments here must come from.
    #[schema(value_type = Option<Vec<schema::BranchPattern>>)]
    pub allowed_branches: Option<Vec<String>>,
    /// The rollout strategy here, over the pipelines' own.
    #[schema(value_type = Option<schema::DeployStrategyName>)]
    pub strategy: Option<DeployStrategy>,
    /// Open pull requests' previews, for `pr-<n>` environments.
    pub previews: Vec<u64>,
    pub updated_at: Option<String>,
}

impl EnvironmentView {
    fn of(name: &str, environment: Option<Environment>) -> Self {
        let settings = environment.as_ref().map(|environment| environment.settings.clone()).unwrap_or_default();
        EnvironmentView {
            name: name.to_string(),
            promote_from: settings.promote_from,
            required_approvals: settings.required_approvals,
            allowed_branches: settings.allowed_branches,
            strategy: settings.strategy,
            previews: environment
                .as_ref()
                .map(|environment| environment.previews.iter().map(|owner| owner.pull_request).collect())
                .unwrap_or_default(),
            updated_at: environment.map(|environment| timestamp(environment.updated_at)),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentList {
    pub items: Vec<EnvironmentView>,
}

/// Every environment: the four defaults and those with settings or previews.
#[utoipa::path(get, path = "/api/v1/environments", tag = "environments", security(("bearer" = [])),
    responses((status = 200, body = EnvironmentList), (status = 401, body = crate::api_error::ErrorBody)))]
async fn list_environments(State(state): State<AppState>, _caller: Caller) -> Result<Json<EnvironmentList>, ApiError> {
    state.node.read_barrier().await?;
    let view = state.node.state();
    let mut items: Vec<EnvironmentView> = DEFAULT_ENVIRONMENTS
        .iter()
        .map(|name| Ok(EnvironmentView::of(name, load(&view, Table::Environments, name.as_bytes())?)))
        .collect::<Result<_, ApiError>>()?;
    for (_, bytes) in view.scan_prefix(Table::Environments, b"")? {
        let environment: Environment = crate::state::codec::decode(Table::Environments, &bytes)?;
        if !DEFAULT_ENVIRONMENTS.contains(&environment.name.as_str()) {
            items.push(EnvironmentView::of(&environment.name.clone(), Some(environment)));
        }
    }
    Ok(Json(EnvironmentList { items }))
}

/// One environment's settings.
#[utoipa::path(get, path = "/api/v1/environments/{name}", tag = "environments", params(("name" = schema::EnvironmentName, Path, description = "environment")),
    security(("bearer" = [])),
    responses((status = 200, body = EnvironmentView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody)))]
async fn get_environment(
    State(state): State<AppState>,
    _caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<EnvironmentView>, ApiError> {
    validate_environment("name", &name)?;
    state.node.read_barrier().await?;
    let environment = load::<Environment>(&state.node.state(), Table::Environments, name.as_bytes())?;
    Ok(Json(EnvironmentView::of(&name, environment)))
}

/// New settings of an environment (every field; an absent one is unset).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateEnvironmentRequest {
    #[schema(value_type = Option<schema::EnvironmentName>, example = "staging")]
    pub promote_from: Option<String>,
    #[serde(default, deserialize_with = "super::extract::optional_whole_number")]
    #[schema(minimum = 1, maximum = 20, example = 2)]
    pub required_approvals: Option<u32>,
    #[schema(value_type = Option<Vec<schema::BranchPattern>>, min_items = 1, max_items = 50, example = json!(["main", "release/*"]))]
    pub allowed_branches: Option<Vec<String>>,
    #[schema(value_type = Option<schema::DeployStrategyName>)]
    pub strategy: Option<DeployStrategy>,
}

/// Set an environment's protection, promotion source and strategy (admin).
#[utoipa::path(put, path = "/api/v1/environments/{name}", tag = "environments", params(("name" = schema::EnvironmentName, Path, description = "environment")),
    request_body = UpdateEnvironmentRequest, security(("bearer" = [])),
    responses((status = 200, body = EnvironmentView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn update_environment(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    JsonBody(request): JsonBody<UpdateEnvironmentRequest>,
) -> Result<Json<EnvironmentView>, ApiError> {
    caller.require(Role::Admin, "changing an environment")?;
    validate_environment("name", &name)?;
    if let Some(from) = &request.promote_from {
        validate_environment("promote_from", from)?;
        if *from == name {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "promotes_from_itself",
                format!("{name} cannot promote from itself; set promote_from to the environment before it, such as staging"),
            ));
        }
    }
    if let Some(needed) = request.required_approvals
        && !(1..=20).contains(&needed)
    {
        return Err(ApiError::invalid_field("required_approvals", "required_approvals must be from 1 to 20 (leave it out for none)"));
    }
    if let Some(branches) = &request.allowed_branches {
        if branches.is_empty() || branches.len() > 50 {
            return Err(ApiError::invalid_field(
                "allowed_branches",
                "allowed_branches must list 1 to 50 branch patterns (leave it out for any)",
            ));
        }
        for branch in branches {
            validate_branch_pattern("allowed_branches", branch)?;
        }
    }
    let settings = EnvironmentSettings {
        promote_from: request.promote_from,
        required_approvals: request.required_approvals,
        allowed_branches: request.allowed_branches,
        strategy: request.strategy,
    };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), Command::SetEnvironment { name: name.clone(), settings }).await?;
    applied_id(outcome)?;
    let environment = load::<Environment>(&state.node.state(), Table::Environments, name.as_bytes())?;
    Ok(Json(EnvironmentView::of(&name, environment)))
}
