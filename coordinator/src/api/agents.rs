//! The agent fleet over REST: registration tokens (admin), the agents with their state,
//! labels and current jobs, deregistration; and the jobs of a deployment with their steps.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, JsonBody, Path, parse_id};
use super::schema;
use super::users::{applied_id, timestamp};
use crate::api_error::ApiError;
use crate::state::Command;
use crate::state::apply::{index, index_ids, job_status_name, load_id};
use crate::state::codec::decode;
use crate::state::records::{Agent, AgentState, AttemptRecord, Job, JobStatus, RegistrationToken, Role, StepRecord};
use crate::store::{Table, prefix_range};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_agents))
        .routes(routes!(get_agent, deregister_agent))
        .routes(routes!(list_registration_tokens, create_registration_token))
        .routes(routes!(revoke_registration_token))
        .routes(routes!(deployment_jobs))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RunningJobView {
    pub job_id: u64,
    pub deployment_id: u64,
    pub attempt: u32,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    pub agent_id: u64,
    pub name: String,
    /// online, draining, lost or offline.
    #[schema(example = "online")]
    pub state: String,
    pub state_reason: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub capacity: u32,
    pub executors: Vec<String>,
    pub version: String,
    /// The coordinator holding its session.
    pub node_id: Option<u64>,
    pub registered_at: String,
    pub connected_at: Option<String>,
    pub running_jobs: Vec<RunningJobView>,
}

fn state_name(state: AgentState) -> &'static str {
    match state {
        AgentState::Offline => "offline",
        AgentState::Online => "online",
        AgentState::Draining => "draining",
        AgentState::Lost => "lost",
    }
}

fn running_jobs(state: &crate::state::txn::BackendRead<'_>) -> Result<BTreeMap<u64, Vec<RunningJobView>>, ApiError> {
    let mut by_agent: BTreeMap<u64, Vec<RunningJobView>> = BTreeMap::new();
    for job_id in index_ids(state, index::JOBS_BY_STATUS, job_status_name(JobStatus::Running))? {
        if let Some(job) = load_id::<Job>(state, Table::Jobs, job_id)?
            && let Some(lease) = &job.lease
        {
            by_agent.entry(lease.agent_id).or_default().push(RunningJobView {
                job_id,
                deployment_id: job.deployment_id,
                attempt: lease.attempt,
            });
        }
    }
    Ok(by_agent)
}

fn view(agent: Agent, running: &mut BTreeMap<u64, Vec<RunningJobView>>) -> AgentView {
    AgentView {
        agent_id: agent.agent_id,
        name: agent.name,
        state: state_name(agent.state).to_string(),
        state_reason: agent.state_reason,
        labels: agent.labels,
        capacity: agent.capacity,
        executors: agent.executors,
        version: agent.version,
        node_id: agent.node_id,
        registered_at: timestamp(agent.registered_at),
        connected_at: agent.connected_at.map(timestamp),
        running_jobs: running.remove(&agent.agent_id).unwrap_or_default(),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AgentList {
    pub items: Vec<AgentView>,
}

/// The registered agents (deregistered ones are left out) with their state and current jobs.
#[utoipa::path(get, path = "/api/v1/agents", tag = "agents", security(("bearer" = [])),
    responses((status = 200, body = AgentList), (status = 401, body = crate::api_error::ErrorBody)))]
async fn list_agents(State(state): State<AppState>, _caller: Caller) -> Result<Json<AgentList>, ApiError> {
    state.node.read_barrier().await?;
    let view_state = state.node.state();
    let mut running = running_jobs(&view_state)?;
    let mut items = Vec::new();
    for (_, bytes) in state.node.backend.scan(Table::Agents, prefix_range(&[]), usize::MAX, false)? {
        let agent: Agent = decode(Table::Agents, &bytes)?;
        if agent.deregistered_at.is_none() {
            items.push(view(agent, &mut running));
        }
    }
    Ok(Json(AgentList { items }))
}

fn load_agent(state: &AppState, agent_id: u64) -> Result<Agent, ApiError> {
    load_id::<Agent>(&state.node.state(), Table::Agents, agent_id)?
        .ok_or_else(|| ApiError::not_found(format!("agent {agent_id} not found")))
}

/// One agent.
#[utoipa::path(get, path = "/api/v1/agents/{id}", tag = "agents", params(("id" = schema::IdText, Path, description = "agent id")), security(("bearer" = [])),
    responses((status = 200, body = AgentView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn get_agent(State(state): State<AppState>, _caller: Caller, Path(id): Path<String>) -> Result<Json<AgentView>, ApiError> {
    let agent_id = parse_id("id", &id)?;
    state.node.read_barrier().await?;
    let agent = load_agent(&state, agent_id)?;
    let mut running = running_jobs(&state.node.state())?;
    Ok(Json(view(agent, &mut running)))
}

/// Deregister an agent (admin): its credential stops working and its running jobs are retried
/// on other agents.
#[utoipa::path(delete, path = "/api/v1/agents/{id}", tag = "agents", params(("id" = schema::IdText, Path, description = "agent id")), security(("bearer" = [])),
    responses((status = 204), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn deregister_agent(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin, "deregistering an agent")?;
    let agent_id = parse_id("id", &id)?;
    let (outcome, _) = super::propose(&state.node, &caller.requester(), Command::DeregisterAgent { agent_id }).await?;
    applied_id(outcome)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRegistrationTokenRequest {
    /// What the token is for (which fleet).
    #[schema(example = "eu-west build fleet")]
    pub description: Option<String>,
    /// Lifetime in seconds (default 86400, at most 31536000).
    #[serde(default, deserialize_with = "super::extract::optional_whole_number")]
    #[schema(minimum = 60, maximum = 31_536_000)]
    pub expires_in_seconds: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedRegistrationToken {
    pub token_id: u64,
    /// Shown once: give it to `davit-agent register --token`.
    pub token: String,
    pub expires_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegistrationTokenView {
    pub token_id: u64,
    pub description: String,
    pub created_at: String,
    pub expires_at: String,
    pub revoked: bool,
    pub agents_registered: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RegistrationTokenList {
    pub items: Vec<RegistrationTokenView>,
}

/// Create a registration token (admin). Agents exchange it for their own credential; it can be
/// used by many hosts until it expires or is revoked.
#[utoipa::path(post, path = "/api/v1/agents/registration-tokens", tag = "agents", request_body = CreateRegistrationTokenRequest, security(("bearer" = [])),
    responses((status = 201, body = CreatedRegistrationToken), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn create_registration_token(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<CreateRegistrationTokenRequest>,
) -> Result<(StatusCode, Json<CreatedRegistrationToken>), ApiError> {
    caller.require(Role::Admin, "creating an agent registration token")?;
    let lifetime = u64::from(request.expires_in_seconds.unwrap_or(86_400));
    if !(60..=31_536_000).contains(&lifetime) {
        return Err(ApiError::invalid_field("expires_in_seconds", "expires_in_seconds must be between 60 and 31536000"));
    }
    let description = request.description.unwrap_or_default();
    if description.chars().count() > 200 {
        return Err(ApiError::invalid_field("description", "description must be at most 200 characters"));
    }
    let (token_id, token, expires_at) = create_token(&state.node, &caller.requester(), description, lifetime).await?;
    Ok((StatusCode::CREATED, Json(CreatedRegistrationToken { token_id, token, expires_at: timestamp(expires_at) })))
}

/// Create a registration token; used by the API and by `davit up` for its embedded agent.
pub async fn create_token(
    node: &crate::node::Node,
    requester: &crate::node::Requester,
    description: String,
    lifetime_seconds: u64,
) -> Result<(u64, String, i64), ApiError> {
    let token = format!("drt_{}", crate::auth::random_secret(40));
    let expires_at = crate::auth::now_millis() + (lifetime_seconds as i64) * 1000;
    let command = Command::CreateRegistrationToken { description, token_hash: crate::auth::token_hash(&token), expires_at };
    let (outcome, _) = super::propose(node, requester, command).await?;
    let token_id = applied_id(outcome)?.expect("create returns the id");
    Ok((token_id, token, expires_at))
}

/// The registration tokens (admin); the tokens themselves are never shown again.
#[utoipa::path(get, path = "/api/v1/agents/registration-tokens", tag = "agents", security(("bearer" = [])),
    responses((status = 200, body = RegistrationTokenList), (status = 401, body = crate::api_error::ErrorBody), (status = 403, body = crate::api_error::ErrorBody)))]
async fn list_registration_tokens(State(state): State<AppState>, caller: Caller) -> Result<Json<RegistrationTokenList>, ApiError> {
    caller.require(Role::Admin, "listing agent registration tokens")?;
    state.node.read_barrier().await?;
    let mut items = Vec::new();
    for (_, bytes) in state.node.backend.scan(Table::RegistrationTokens, prefix_range(&[]), usize::MAX, false)? {
        let token: RegistrationToken = decode(Table::RegistrationTokens, &bytes)?;
        items.push(RegistrationTokenView {
            token_id: token.token_id,
            description: token.description,
            created_at: timestamp(token.created_at),
            expires_at: timestamp(token.expires_at),
            revoked: token.revoked_at.is_some(),
            agents_registered: token.agents_registered,
        });
    }
    Ok(Json(RegistrationTokenList { items }))
}

/// Revoke a registration token (admin); agents registered with it keep working.
#[utoipa::path(delete, path = "/api/v1/agents/registration-tokens/{id}", tag = "agents", params(("id" = schema::IdText, Path, description = "token id")),
    security(("bearer" = [])),
    responses((status = 204), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn revoke_registration_token(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin, "revoking an agent registration token")?;
    let token_id = parse_id("id", &id)?;
    let (outcome, _) = super::propose(&state.node, &caller.requester(), Command::RevokeRegistrationToken { token_id }).await?;
    applied_id(outcome)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StepView {
    pub index: u32,
    pub name: String,
    /// pending, running, succeeded, failed, skipped or cancelled.
    pub state: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_ms: Option<i64>,
    pub exit_code: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    pub attempt: u32,
    pub agent_id: u64,
    pub assigned_at: String,
    pub ended_at: Option<String>,
    pub outcome: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub job_id: u64,
    pub deployment_id: u64,
    pub name: String,
    /// queued, running, succeeded, failed or cancelled.
    pub status: String,
    pub attempt: u32,
    pub max_attempts: u32,
    pub agent_id: Option<u64>,
    pub failure_reason: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub steps: Vec<StepView>,
    pub attempts: Vec<AttemptView>,
    pub created_at: String,
    pub updated_at: String,
}

fn step_view(step: StepRecord) -> StepView {
    let state = serde_json::to_value(step.state).ok().and_then(|value| value.as_str().map(str::to_string)).unwrap_or_default();
    StepView {
        index: step.index,
        name: step.name,
        state,
        started_at: step.started_at.map(timestamp),
        finished_at: step.finished_at.map(timestamp),
        duration_ms: step.started_at.zip(step.finished_at).map(|(started, finished)| finished - started),
        exit_code: step.exit_code,
    }
}

fn attempt_view(attempt: AttemptRecord) -> AttemptView {
    AttemptView {
        attempt: attempt.attempt,
        agent_id: attempt.agent_id,
        assigned_at: timestamp(attempt.assigned_at),
        ended_at: attempt.ended_at.map(timestamp),
        outcome: attempt.outcome,
        reason: attempt.reason,
    }
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        JobView {
            job_id: job.job_id,
            deployment_id: job.deployment_id,
            name: job.name,
            status: job_status_name(job.status).to_string(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            agent_id: job.lease.as_ref().map(|lease| lease.agent_id),
            failure_reason: job.failure_reason,
            labels: job.labels,
            steps: job.steps.into_iter().map(step_view).collect(),
            attempts: job.attempts.into_iter().map(attempt_view).collect(),
            created_at: timestamp(job.created_at),
            updated_at: timestamp(job.updated_at),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    pub items: Vec<JobView>,
}

/// The jobs of a deployment (build, test, package, deploy) with their steps and attempts.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/jobs", tag = "deployments", params(("id" = schema::IdText, Path, description = "deployment id")),
    security(("bearer" = [])),
    responses((status = 200, body = JobList), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn deployment_jobs(State(state): State<AppState>, _caller: Caller, Path(id): Path<String>) -> Result<Json<JobList>, ApiError> {
    let deployment_id = parse_id("id", &id)?;
    state.node.read_barrier().await?;
    let view_state = state.node.state();
    if load_id::<crate::state::records::Deployment>(&view_state, Table::Deployments, deployment_id)?.is_none() {
        return Err(ApiError::not_found(format!("deployment {deployment_id} not found")));
    }
    let mut items = Vec::new();
    for job_id in index_ids(&view_state, index::JOBS_BY_DEPLOYMENT, &deployment_id.to_string())? {
        items.extend(load_id::<Job>(&view_state, Table::Jobs, job_id)?.map(JobView::from));
    }
    Ok(Json(JobList { items }))
}
