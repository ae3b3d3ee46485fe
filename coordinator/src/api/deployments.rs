//! Deployments: one run of a pipeline for a commit and an environment (its build, test and
//! deploy steps), however it was started. Deploying to `production` needs an admin.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, FlexibleId, JsonBody, Page, Paged, Path, Query, page_of, parse_id};
use super::pipelines::{load_pipeline, validate_environment};
use super::schema;
use super::users::{applied_id, timestamp};
use crate::api_error::ApiError;
use crate::log_segments::{self, LogLevel};
use crate::state::Command;
use crate::state::apply::{index, index_ids, load_id};
use crate::state::records::{Deployment, DeploymentStatus, Role, ScmOrigin};
use crate::store::Table;

/// The environment whose deployments need an admin.
pub const PRODUCTION: &str = "production";

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_deployments, create_deployment))
        .routes(routes!(get_deployment))
        .routes(routes!(cancel_deployment))
        .routes(routes!(rollback_deployment))
        .routes(routes!(approve_deployment))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeploymentView {
    pub deployment_id: u64,
    pub pipeline_id: u64,
    pub commit_hash: String,
    #[schema(value_type = schema::DeploymentStatusName, example = "pending")]
    pub status: DeploymentStatus,
    pub status_reason: Option<String>,
    pub environment: String,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    pub triggered_by: Option<u64>,
    pub rollback_of: Option<u64>,
    pub config_overrides: BTreeMap<String, String>,
    pub created_at: String,
    pub updated_at: String,
    /// The source-control event that started the run; null when a person or a rollback did.
    pub scm: Option<ScmOriginView>,
    /// The rollout to the environment's hosts, once it began.
    pub rollout: Option<RolloutView>,
    /// The branch deployed, when the deployment names one.
    pub branch: Option<String>,
    /// The deployment whose build this one releases (a promotion or a rollback).
    pub release_of: Option<u64>,
    /// The environment is protected: developer approvals needed (or one admin's), and given.
    pub required_approvals: Option<u32>,
    pub approvals: Vec<ApprovalView>,
    /// The configuration the deployment runs with, resolved when it was created (a rollback
    /// takes its target's): each key with its version, never a value. `config_overrides` apply
    /// on top. Null for a deployment from before configuration versions that has not rolled out.
    pub configuration: Option<Vec<ResolvedVariableView>>,
}

/// One key of a deployment's configuration.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResolvedVariableView {
    pub key: String,
    /// The version of the key the deployment runs with (see
    /// `GET /api/v1/configs/{environment}/{key}/versions`); null for a rollout recorded before
    /// configuration versions, which holds a copy.
    pub version: Option<u64>,
    pub config_id: u64,
    pub secret: bool,
    /// `environment` or `pipeline`: where the value comes from.
    pub scope: String,
}

/// The keys and versions a deployment runs with: its references, or the copies of a rollout
/// recorded before versions.
fn resolved_configuration(deployment: &Deployment) -> Option<Vec<ResolvedVariableView>> {
    if let Some(references) = &deployment.configuration {
        return Some(
            references
                .iter()
                .map(|reference| ResolvedVariableView {
                    key: reference.key.clone(),
                    version: Some(reference.version),
                    config_id: reference.config_id,
                    secret: reference.is_secret,
                    scope: super::configs::scope_name(reference.pipeline_id).into(),
                })
                .collect(),
        );
    }
    deployment.rollout.as_ref().map(|rollout| {
        rollout
            .config
            .iter()
            .map(|row| ResolvedVariableView {
                key: row.key.clone(),
                version: None,
                config_id: row.config_id,
                secret: row.is_secret,
                scope: super::configs::scope_name(row.pipeline_id).into(),
            })
            .collect()
    })
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApprovalView {
    pub user_id: u64,
    pub username: String,
    #[schema(value_type = String, example = "developer")]
    pub role: Role,
    pub at: String,
}

/// Where a rollout stands: the release, and each host's part in it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RolloutView {
    /// The release this deployment brings (`d<id>`) and the one it replaces.
    pub release: String,
    pub previous: Option<String>,
    pub artifact_digest: String,
    pub artifact_kind: String,
    #[schema(value_type = Object)]
    pub strategy: serde_json::Value,
    /// Set once the rollout is being undone, with why.
    pub rolling_back: Option<String>,
    /// Canary: the current step (1-based) and its latest verdict.
    pub canary_step: Option<usize>,
    pub canary_verdict: Option<String>,
    pub hosts: Vec<RolloutHostView>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RolloutHostView {
    pub agent_id: u64,
    pub name: String,
    pub region: Option<String>,
    /// The new release on the host: absent, running, healthy, failed, stopped.
    #[schema(example = "healthy")]
    pub release: String,
    pub failure: Option<String>,
    /// Percent of the host's traffic on the new release.
    pub weight: u8,
    pub old_stopped: bool,
    /// A release step is in flight on the host.
    pub busy: bool,
    pub lost: bool,
}

impl From<&crate::state::records::Rollout> for RolloutView {
    fn from(rollout: &crate::state::records::Rollout) -> Self {
        use crate::deploy::plan::{NewRelease, Verdict};
        let facts = &rollout.facts;
        RolloutView {
            release: rollout.release.clone(),
            previous: rollout.previous.clone(),
            artifact_digest: rollout.artifact_digest.clone(),
            artifact_kind: rollout.artifact_kind.clone(),
            strategy: serde_json::to_value(&facts.strategy).unwrap_or_default(),
            rolling_back: facts.rolling_back.clone(),
            canary_step: facts.canary.step.map(|step| step + 1),
            canary_verdict: facts.canary.verdict.as_ref().map(|(verdict, _)| match verdict {
                Verdict::Pass => "pass".to_string(),
                Verdict::Fail(why) => format!("fail: {why}"),
                Verdict::Inconclusive(why) => format!("inconclusive: {why}"),
            }),
            hosts: rollout
                .hosts
                .iter()
                .zip(&facts.hosts)
                .map(|(host, facts)| {
                    let (release, failure) = match &facts.new {
                        NewRelease::Absent => ("absent", None),
                        NewRelease::Running => ("running", None),
                        NewRelease::Healthy => ("healthy", None),
                        NewRelease::Failed(why) => ("failed", Some(why.clone())),
                        NewRelease::Stopped => ("stopped", None),
                    };
                    RolloutHostView {
                        agent_id: host.agent_id,
                        name: host.name.clone(),
                        region: host.region.clone(),
                        release: release.to_string(),
                        failure,
                        weight: facts.weight,
                        old_stopped: facts.old_stopped,
                        busy: facts.busy,
                        lost: facts.lost,
                    }
                })
                .collect(),
        }
    }
}

/// Where a run started by source control came from.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ScmOriginView {
    pub repo_id: u64,
    /// `webhook` or `poll`.
    #[schema(example = "webhook")]
    pub source: String,
    /// `push`, `tag` or `pull_request`.
    #[schema(example = "push")]
    pub event: String,
    /// `refs/heads/<branch>`, `refs/tags/<tag>`, or the ref a pull request's checks run on
    /// (the provider's merge ref such as `refs/pull/7/merge`, or the source branch).
    #[schema(example = "refs/heads/main")]
    pub git_ref: String,
    /// The pushed commit, or the pull request's head commit.
    pub head_commit: String,
    pub pull_request: Option<u64>,
    /// The provider's delivery id, for a webhook that sent one.
    pub delivery: Option<String>,
}

impl From<ScmOrigin> for ScmOriginView {
    fn from(origin: ScmOrigin) -> Self {
        ScmOriginView {
            repo_id: origin.repo_id,
            source: origin.source,
            event: origin.event,
            git_ref: origin.git_ref,
            head_commit: origin.head_commit,
            pull_request: origin.pull_request,
            delivery: origin.delivery,
        }
    }
}

impl From<Deployment> for DeploymentView {
    fn from(deployment: Deployment) -> Self {
        let configuration = resolved_configuration(&deployment);
        Self {
            configuration,
            deployment_id: deployment.deployment_id,
            pipeline_id: deployment.pipeline_id,
            commit_hash: deployment.commit_hash,
            status: deployment.status,
            status_reason: deployment.status_reason,
            environment: deployment.environment,
            start_time: deployment.start_time.map(timestamp),
            end_time: deployment.end_time.map(timestamp),
            triggered_by: deployment.triggered_by,
            rollback_of: deployment.rollback_of,
            config_overrides: deployment.config_overrides,
            created_at: timestamp(deployment.created_at),
            updated_at: timestamp(deployment.updated_at),
            scm: deployment.scm.map(ScmOriginView::from),
            rollout: deployment.rollout.as_deref().map(RolloutView::from),
            branch: deployment.branch,
            release_of: deployment.release_of,
            required_approvals: deployment.required_approvals,
            approvals: deployment
                .approvals
                .into_iter()
                .map(|approval| ApprovalView {
                    user_id: approval.user_id,
                    username: approval.username,
                    role: approval.role,
                    at: timestamp(approval.at),
                })
                .collect(),
        }
    }
}

fn load_deployment(state: &AppState, deployment_id: u64) -> Result<Deployment, ApiError> {
    load_id(&state.node.state(), Table::Deployments, deployment_id)?
        .ok_or_else(|| ApiError::not_found(format!("deployment {deployment_id} not found")))
}

fn validate_commit(commit_hash: &str) -> Result<(), ApiError> {
    let valid = (4..=40).contains(&commit_hash.len()) && commit_hash.chars().all(|c| c.is_ascii_hexdigit());
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid_field("commit_hash", "commit_hash must be 4 to 40 hexadecimal characters (a git commit id)"))
    }
}

/// Scalar JSON values as configuration strings; anything nested is refused.
pub fn scalar_to_string(field: &str, value: serde_json::Value) -> Result<String, ApiError> {
    match value {
        serde_json::Value::String(text) => Ok(text),
        serde_json::Value::Number(number) => Ok(number.to_string()),
        serde_json::Value::Bool(flag) => Ok(flag.to_string()),
        other => Err(ApiError::invalid_field(field, format!("{field} must be a string, number or boolean, not {other}"))),
    }
}

/// The role that may cancel or roll back deployments of `environment` (the dashboard shows
/// those buttons by the same rule).
pub fn environment_role(environment: &str) -> Role {
    if environment == PRODUCTION { Role::Admin } else { Role::Developer }
}

fn require_environment_role(caller: &Caller, environment: &str, action: &str) -> Result<(), ApiError> {
    caller.require(environment_role(environment), &format!("{action} in {environment}"))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeploymentFilter {
    #[param(value_type = Option<schema::IdText>)]
    pub pipeline_id: Option<String>,
    /// pending, in_progress, success, failed or rolled_back.
    #[param(value_type = Option<schema::DeploymentStatusName>)]
    pub status: Option<String>,
    pub environment: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<schema::Cursor>)]
    pub cursor: Option<String>,
}

/// List deployments, newest last, filtered by pipeline, status or environment.
#[utoipa::path(get, path = "/api/v1/deployments", tag = "deployments", params(DeploymentFilter), security(("bearer" = [])),
    responses((status = 200, body = Paged<DeploymentView>), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody)))]
async fn list_deployments(
    State(state): State<AppState>,
    _caller: Caller,
    Query(filter): Query<DeploymentFilter>,
) -> Result<Json<Paged<DeploymentView>>, ApiError> {
    let pipeline_id = filter.pipeline_id.as_deref().map(|id| parse_id("pipeline_id", id)).transpose()?;
    let status: Option<DeploymentStatus> = filter
        .status
        .as_deref()
        .map(|status| {
            serde_json::from_value(serde_json::Value::String(status.to_string()))
                .map_err(|_| ApiError::invalid_field("status", "status must be pending, in_progress, success, failed or rolled_back"))
        })
        .transpose()?;
    state.node.read_barrier().await?;
    let page = Page { limit: filter.limit, cursor: filter.cursor };
    let page = page_of::<Deployment>(&state.node, Table::Deployments, &page, |deployment| {
        pipeline_id.is_none_or(|id| deployment.pipeline_id == id)
            && status.is_none_or(|status| deployment.status == status)
            && filter.environment.as_ref().is_none_or(|environment| &deployment.environment == environment)
    })?;
    Ok(Json(Paged { items: page.items.into_iter().map(DeploymentView::from).collect(), next_cursor: page.next_cursor }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDeploymentRequest {
    #[schema(example = "pipeline123")]
    pub pipeline_id: FlexibleId,
    /// The commit to deploy. Exactly one of `commit_hash` and `branch` is given.
    #[schema(value_type = Option<schema::CommitHash>, example = "abc123def")]
    pub commit_hash: Option<String>,
    /// Deploy the head of this branch of the pipeline's repository, as `git ls-remote` finds it
    /// now. Exactly one of `commit_hash` and `branch` is given.
    #[schema(value_type = Option<schema::Branch>, example = "main")]
    pub branch: Option<String>,
    /// Defaults to the pipeline's environment.
    #[schema(value_type = Option<schema::EnvironmentName>, example = "staging")]
    pub environment: Option<String>,
    /// Configuration values for this deployment only, over the environment's.
    #[serde(default)]
    #[schema(value_type = schema::ConfigOverrides, example = json!({"env": "staging", "db_host": "staging-db.example.com"}))]
    pub config_overrides: serde_json::Map<String, serde_json::Value>,
}

/// The documented body of `POST /api/v1/deployments`: the request's fields, with exactly one of
/// `commit_hash` and `branch` given as a string (the other absent or null, as the handler reads
/// it), which a derived schema cannot say.
pub struct CreateDeploymentBody;

impl utoipa::PartialSchema for CreateDeploymentBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
        let RefOr::T(Schema::Object(fields)) = CreateDeploymentRequest::schema() else {
            unreachable!("a derived struct schema is an inline object")
        };
        let requiring = |given: &str, given_schema: RefOr<Schema>, absent: &str| {
            let mut object = fields.clone();
            object.properties.insert(given.to_string(), given_schema);
            object.properties.insert(absent.to_string(), ObjectBuilder::new().schema_type(Type::Null).into());
            object.required.retain(|field| field != given && field != absent);
            object.required.push(given.to_string());
            object
        };
        OneOfBuilder::new()
            .item(requiring("commit_hash", schema::CommitHash::schema(), "branch"))
            .item(requiring("branch", schema::Branch::schema(), "commit_hash"))
            .description(Some("A deployment of a commit (`commit_hash`) or of a branch's current head (`branch`)."))
            .into()
    }
}

impl ToSchema for CreateDeploymentBody {
    /// The components the request's fields refer to (`ConfigOverrides`, ...), which the
    /// document must carry for the references in the schema above to resolve.
    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        <CreateDeploymentRequest as ToSchema>::schemas(schemas);
    }
}

/// Which commit a request deploys: the one it names, or the head of a branch to look up.
enum Revision {
    Commit(String),
    BranchHead(String),
}

fn requested_revision(commit_hash: Option<String>, branch: Option<String>) -> Result<Revision, ApiError> {
    match (commit_hash, branch) {
        (Some(commit_hash), None) => {
            validate_commit(&commit_hash)?;
            Ok(Revision::Commit(commit_hash.to_ascii_lowercase()))
        }
        (None, Some(branch)) => {
            super::repos::validate_branch("branch", &branch)?;
            Ok(Revision::BranchHead(branch))
        }
        (Some(_), Some(_)) => Err(ApiError::invalid_field("branch", "give either commit_hash or branch, not both")),
        (None, None) => Err(ApiError::invalid_field(
            "commit_hash",
            "commit_hash (the commit to deploy) or branch (whose current head is deployed) is required",
        )),
    }
}

/// The head commit of `branch` in the pipeline's repository, read with `git ls-remote` as the
/// poller reads it: 404 when the branch does not exist or the repository cannot be read (with
/// git's reason), 400 when the repository's URL uses a protocol the coordinator may not use.
async fn resolve_branch_head(state: &AppState, repo_id: u64, branch: &str) -> Result<String, ApiError> {
    use crate::scm::polling;
    let repository: crate::state::records::Repository = load_id(&state.node.state(), Table::Repositories, repo_id)?
        .ok_or_else(|| ApiError::not_found(format!("repository {repo_id} of the pipeline not found")))?;
    let protocols = state.outbound.git_allowed_protocols();
    let timeout = std::time::Duration::from_secs(state.node.config.scm.ls_remote_timeout_seconds);
    let shown_url = polling::redact_url(&repository.repo_url);
    // The URL is checked again at the moment of use (a refusal is a 400), and git pinned to the
    // addresses checked.
    let pins = state.outbound.git_arguments_for("repo_url", &repository.repo_url).await?;
    match polling::resolve_branch(&repository.repo_url, branch, protocols, &pins, timeout).await {
        Ok(Some(commit)) => Ok(commit),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "branch_not_found",
            format!("branch {branch:?} does not exist in repository {repo_id} ({shown_url})"),
        )),
        Err(error @ polling::LsRemoteError::ProtocolNotAllowed { .. }) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, "repository_url_refused", format!("cannot read branch {branch:?}: {error}")))
        }
        Err(polling::LsRemoteError::Spawn(message)) => Err(ApiError::internal(format!("cannot run git on the coordinator: {message}"))),
        Err(error) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "repository_unreachable",
            format!(
                "cannot read branch {branch:?} of repository {repo_id}: {error}; check the repository URL and that the coordinator can reach it"
            ),
        )),
    }
}

/// Trigger a deployment manually (developer; admin for production), of a commit or of the
/// current head of a branch.
#[utoipa::path(post, path = "/api/v1/deployments", tag = "deployments", request_body = CreateDeploymentBody, security(("bearer" = [])),
    responses((status = 201, body = DeploymentView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody),
        (status = 413, body = crate::api_error::ErrorBody)))]
async fn create_deployment(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<CreateDeploymentRequest>,
) -> Result<(StatusCode, Json<DeploymentView>), ApiError> {
    caller.require(Role::Developer, "triggering a deployment")?;
    let pipeline_id = request.pipeline_id.id("pipeline_id")?;
    let revision = requested_revision(request.commit_hash, request.branch)?;
    if let Some(environment) = &request.environment {
        validate_environment("environment", environment)?;
    }
    if request.config_overrides.len() > 200 {
        return Err(ApiError::invalid_field("config_overrides", "at most 200 config_overrides"));
    }
    let mut config_overrides = BTreeMap::new();
    for (key, value) in request.config_overrides {
        if key.is_empty() || key.chars().count() > 100 {
            return Err(ApiError::invalid_field("config_overrides", format!("override key {key:?} must be 1 to 100 characters")));
        }
        let value = scalar_to_string(&format!("config_overrides.{key}"), value)?;
        config_overrides.insert(key, value);
    }
    state.node.read_barrier().await?;
    let pipeline = load_pipeline(&state, pipeline_id)?;
    let environment = request.environment.unwrap_or(pipeline.environment);
    require_environment_role(&caller, &environment, "deploying")?;
    if !pipeline.is_active {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "pipeline_inactive",
            format!("pipeline {pipeline_id} is not active; activate it first"),
        ));
    }
    // The branch is looked up last, once everything that could refuse the request has passed.
    let (commit_hash, source, branch) = match revision {
        Revision::Commit(commit_hash) => (commit_hash, String::new(), None),
        Revision::BranchHead(branch) => {
            let commit_hash = resolve_branch_head(&state, pipeline.repo_id, &branch).await?;
            (commit_hash, format!(" (the head of branch {branch})"), Some(branch))
        }
    };
    let command = Command::CreateDeployment {
        pipeline_id,
        commit_hash,
        environment: environment.clone(),
        config_overrides,
        rollback_of: None,
        branch,
        release_of: None,
    };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    let deployment_id = applied_id(outcome)?.expect("create returns the id");
    let deployment = load_deployment(&state, deployment_id)?;
    log_segments::system_line(
        &state.node,
        state.blobs.as_ref(),
        deployment_id,
        LogLevel::Info,
        format!("deployment {deployment_id} of commit {}{source} to {environment} created by {}", deployment.commit_hash, caller.username),
    )
    .await;
    Ok((StatusCode::CREATED, Json(deployment.into())))
}

/// One deployment.
#[utoipa::path(get, path = "/api/v1/deployments/{id}", tag = "deployments", params(("id" = schema::IdText, Path, description = "deployment id")),
    security(("bearer" = [])),
    responses((status = 200, body = DeploymentView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn get_deployment(State(state): State<AppState>, _caller: Caller, Path(id): Path<String>) -> Result<Json<DeploymentView>, ApiError> {
    let deployment_id = parse_id("id", &id)?;
    state.node.read_barrier().await?;
    Ok(Json(load_deployment(&state, deployment_id)?.into()))
}

/// Cancel a deployment that has not ended: it ends as failed, with the reason.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/cancel", tag = "deployments", params(("id" = schema::IdText, Path, description = "deployment id")),
    security(("bearer" = [])),
    responses((status = 200, body = DeploymentView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody)))]
async fn cancel_deployment(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    let deployment_id = parse_id("id", &id)?;
    state.node.read_barrier().await?;
    let deployment = load_deployment(&state, deployment_id)?;
    require_environment_role(&caller, &deployment.environment, "cancelling a deployment")?;
    if deployment.status.is_final() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_ended",
            format!("deployment {deployment_id} already ended as {}", crate::state::apply::status_name(deployment.status)),
        ));
    }
    let reason = format!("cancelled by {}", caller.username);
    // A rollout under way is undone (all traffic back to the release before it), not dropped.
    let command = if deployment.rollout.is_some() {
        Command::AbortRollout { deployment_id, reason: reason.clone() }
    } else {
        Command::SetDeploymentStatus { deployment_id, status: DeploymentStatus::Failed, reason: Some(reason.clone()) }
    };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    applied_id(outcome)?;
    log_segments::system_line(
        &state.node,
        state.blobs.as_ref(),
        deployment_id,
        LogLevel::Warning,
        format!("deployment {deployment_id} {reason}"),
    )
    .await;
    Ok(Json(load_deployment(&state, deployment_id)?.into()))
}

/// Roll back: deploy again the commit of the last successful deployment before this one, of the
/// same pipeline and environment. The new deployment records `rollback_of`.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/rollback", tag = "deployments", params(("id" = schema::IdText, Path, description = "deployment id")),
    security(("bearer" = [])),
    responses((status = 201, body = DeploymentView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody)))]
async fn rollback_deployment(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DeploymentView>), ApiError> {
    let deployment_id = parse_id("id", &id)?;
    state.node.read_barrier().await?;
    let deployment = load_deployment(&state, deployment_id)?;
    require_environment_role(&caller, &deployment.environment, "rolling back")?;
    let view = state.node.state();
    let mut target: Option<Deployment> = None;
    for earlier_id in index_ids(&view, index::DEPLOYMENTS_BY_PIPELINE, &deployment.pipeline_id.to_string())? {
        if earlier_id >= deployment_id {
            break;
        }
        if let Some(earlier) = load_id::<Deployment>(&view, Table::Deployments, earlier_id)?
            && earlier.environment == deployment.environment
            && earlier.status == DeploymentStatus::Success
            && earlier.commit_hash != deployment.commit_hash
        {
            target = Some(earlier);
        }
    }
    let target = target.ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "nothing_to_roll_back_to",
            format!("no successful deployment of another commit precedes deployment {deployment_id} in {}", deployment.environment),
        )
    })?;
    let command = Command::CreateDeployment {
        pipeline_id: deployment.pipeline_id,
        commit_hash: target.commit_hash.clone(),
        environment: deployment.environment.clone(),
        config_overrides: target.config_overrides.clone(),
        rollback_of: Some(deployment_id),
        branch: target.branch.clone(),
        release_of: Some(target.deployment_id),
    };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    let rollback_id = applied_id(outcome)?.expect("create returns the id");
    log_segments::system_line(
        &state.node,
        state.blobs.as_ref(),
        rollback_id,
        LogLevel::Info,
        format!(
            "rollback of deployment {deployment_id} to commit {} (deployment {}) by {}",
            target.commit_hash, target.deployment_id, caller.username
        ),
    )
    .await;
    Ok((StatusCode::CREATED, Json(load_deployment(&state, rollback_id)?.into())))
}

/// Approve a deployment waiting for approvals (developer or admin; not one's own, unless an
/// admin). One admin's approval, or the environment's number of developers', lets it roll out.
#[utoipa::path(post, path = "/api/v1/deployments/{id}/approve", tag = "deployments", params(("id" = schema::IdText, Path, description = "deployment id")),
    security(("bearer" = [])),
    responses((status = 200, body = DeploymentView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody)))]
async fn approve_deployment(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    caller.require(Role::Developer, "approving a deployment")?;
    let deployment_id = parse_id("id", &id)?;
    let (outcome, _) = super::propose(&state.node, &caller.requester(), Command::ApproveDeployment { deployment_id }).await?;
    applied_id(outcome)?;
    Ok(Json(load_deployment(&state, deployment_id)?.into()))
}
