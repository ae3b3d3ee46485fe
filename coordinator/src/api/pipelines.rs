//! Deployment pipelines: which repository and branch, how to build, how to deploy, and to
//! which environment by default.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, FlexibleId, JsonBody, Page, Paged, Path, Query, page_of, parse_id, validate_label};
use super::repos::validate_branch_pattern;
use super::schema;
use super::users::{applied_id, timestamp};
use crate::api_error::ApiError;
use crate::state::Command;
use crate::state::apply::load_id;
use crate::state::command::PipelinePatch;
use crate::state::records::{BuildSettings, DeploySettings, DeployStrategy, Pipeline, Role, TriggerEvent};
use crate::store::Table;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_pipelines, create_pipeline)).routes(routes!(get_pipeline, update_pipeline, delete_pipeline))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PipelineView {
    pub pipeline_id: u64,
    pub name: String,
    pub repo_id: u64,
    pub branch: Option<String>,
    pub build_command: Option<String>,
    #[schema(value_type = schema::DeployStrategyName, example = "blue-green")]
    pub deploy_strategy: DeployStrategy,
    pub environment: String,
    pub is_active: bool,
    pub created_at: String,
    pub updated_at: String,
    /// How the pipeline builds.
    pub build: BuildFields,
    /// How the pipeline's releases run on the environment's deploy agents and roll out.
    pub deploy: DeployFields,
}

/// How releases run on the deploy agents and roll out (all optional). Without `public_port`
/// the pipeline only builds. A field sent as `null` in an update returns to its default.
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployFields {
    /// The service's port on every deploy host, owned by the agent's traffic switch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 65535, example = 8080)]
    pub public_port: Option<u16>,
    /// The port the release listens on inside its container (default 8080).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 65535)]
    pub container_port: Option<u16>,
    /// `image` (the image the build exported) or `files` (the build's files, mounted in
    /// `run_image` and started by `start_command`, or by the image's own command without one);
    /// default `image` when the pipeline builds a Dockerfile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(image|files)$")]
    pub artifact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::ImageReference>)]
    pub run_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::BuildCommand>)]
    pub start_command: Option<String>,
    /// HTTP path answered 2xx/3xx when healthy; a TCP connect check when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^/[!-~]{0,499}$", example = "/health")]
    pub health_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 100, maximum = 600000)]
    pub health_interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 100, maximum = 600000)]
    pub health_timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub healthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub unhealthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 86400)]
    pub health_deadline_seconds: Option<u64>,
    /// Rolling: hosts per batch (default 1), or `batch_percent` of the hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10000)]
    pub batch_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub batch_percent: Option<u8>,
    /// Rolling: hosts being updated at once (default: the batch size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10000)]
    pub max_unavailable: Option<u32>,
    /// Blue-green: how long the old release stays warm after the switch (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 604800)]
    pub keep_old_seconds: Option<u64>,
    /// Canary: percent of traffic at each step (default [10, 50, 100]); kept in increasing
    /// order, each once, and a last step of 100 is implied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<schema::TrafficPercent>>, max_items = 20, example = json!([10, 50, 100]))]
    pub canary_steps: Option<Vec<u8>>,
    /// Canary: how long each step is observed before its verdict (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 86400)]
    pub analysis_window_seconds: Option<u64>,
    /// Canary: a step fails above this percent of 5xx answers (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 100)]
    pub max_error_percent: Option<u32>,
    /// Canary: a step fails above this 95th percentile latency (default: not judged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 600000)]
    pub max_latency_p95_ms: Option<u64>,
    /// Canary: fewer requests than this in a window is inconclusive (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 1000000000)]
    pub min_requests: Option<u64>,
    /// Canary: `rollback` (default) or `wait` when a step is inconclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^(rollback|wait)$")]
    pub on_inconclusive: Option<String>,
    /// Canary, with `wait`: how long past the first window to keep waiting (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 604800)]
    pub max_wait_seconds: Option<u64>,
    /// Region waves: regions in rollout order (the others follow, by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<schema::Name>>, max_items = 50)]
    pub regions: Option<Vec<String>>,
    /// Release container CPU in millicpus (default 1000, one CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 10, maximum = 256000)]
    pub cpu_millis: Option<u64>,
    /// Release container memory in MB (default 2048).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 16, maximum = 1048576)]
    pub memory_mb: Option<u64>,
    /// Images of this many recent releases stay on each host (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub keep_images: Option<u32>,
    /// Previews (`pr-<n>` environments, see `build.preview_environments`): pull request n's
    /// service listens on this port + n on the preview hosts, so that several pull requests'
    /// previews share hosts; without it a preview listens on `public_port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 65535, example = 20000)]
    pub preview_port_base: Option<u16>,
}

impl From<DeploySettings> for DeployFields {
    fn from(settings: DeploySettings) -> Self {
        serde_json::from_value(serde_json::to_value(settings).expect("settings serialize")).expect("the same fields")
    }
}

/// Numbers written with a fraction of zero (`153.0`) as the integers they are: JSON Schema's
/// `integer` includes them, and serde would refuse them for an integer field.
fn integral_numbers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(number) => {
            if let Some(float) = number.as_f64().filter(|_| number.is_f64())
                && float.fract() == 0.0
            {
                if float >= 0.0 && float <= u64::MAX as f64 {
                    *number = serde_json::Number::from(float as u64);
                } else if float < 0.0 && float >= i64::MIN as f64 {
                    *number = serde_json::Number::from(float as i64);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_numbers),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(integral_numbers),
        _ => {}
    }
}

/// Lay the request's `deploy` object over `current`: a field present replaces the current one,
/// `null` returns it to its default, a missing one keeps it. Then check the result.
fn merge_deploy_fields(current: &DeploySettings, fields: Option<serde_json::Value>) -> Result<DeploySettings, ApiError> {
    let Some(mut fields) = fields else { return Ok(current.clone()) };
    integral_numbers(&mut fields);
    let serde_json::Value::Object(fields) = fields else {
        return Err(ApiError::invalid_field("deploy", "deploy must be an object of settings, such as {\"public_port\": 8080}"));
    };
    // Type and name checks first, with the field named.
    serde_path_to_error::deserialize::<_, DeployFields>(serde_json::Value::Object(fields.clone())).map_err(|error| {
        let field = format!("deploy.{}", error.path());
        ApiError::invalid_field(&field, format!("{field}: {}", error.inner()))
    })?;
    let mut merged = serde_json::to_value(current).expect("settings serialize");
    let object = merged.as_object_mut().expect("settings are an object");
    for (key, value) in fields {
        if value.is_null() {
            object.remove(&key);
        } else {
            object.insert(key, value);
        }
    }
    let mut settings: DeploySettings =
        serde_json::from_value(merged).map_err(|error| ApiError::invalid_field("deploy", format!("deploy: {error}")))?;
    validate_deploy(&settings)?;
    // Steps are taken in increasing order, each once (a last step of 100 is implied).
    if let Some(steps) = &mut settings.canary_steps {
        steps.sort_unstable();
        steps.dedup();
    }
    Ok(settings)
}

fn validate_deploy(settings: &DeploySettings) -> Result<(), ApiError> {
    let invalid =
        |field: &str, message: &str| Err(ApiError::invalid_field(&format!("deploy.{field}"), format!("deploy.{field} {message}")));
    if settings.public_port == Some(0) {
        return invalid("public_port", "must be a port from 1 to 65535");
    }
    if settings.container_port == Some(0) {
        return invalid("container_port", "must be a port from 1 to 65535");
    }
    if settings.preview_port_base == Some(0) {
        return invalid("preview_port_base", "must be a port from 1 to 65535");
    }
    if let Some(artifact) = &settings.artifact
        && artifact != "image"
        && artifact != "files"
    {
        return invalid("artifact", "must be \"image\" or \"files\"");
    }
    if let Some(path) = &settings.health_path
        && (!path.starts_with('/') || path.len() > 500 || path.chars().any(|c| c.is_whitespace() || c.is_control()))
    {
        return invalid("health_path", "must be a URL path starting with / (like /health), without spaces");
    }
    for (field, value, min, max) in [
        ("health_interval_ms", settings.health_interval_ms, 100, 600_000),
        ("health_timeout_ms", settings.health_timeout_ms, 100, 600_000),
        ("health_deadline_seconds", settings.health_deadline_seconds, 1, 86_400),
        ("keep_old_seconds", settings.keep_old_seconds, 0, 604_800),
        ("analysis_window_seconds", settings.analysis_window_seconds, 1, 86_400),
        ("max_latency_p95_ms", settings.max_latency_p95_ms, 1, 600_000),
        ("max_wait_seconds", settings.max_wait_seconds, 0, 604_800),
        ("cpu_millis", settings.cpu_millis, 10, 256_000),
        ("memory_mb", settings.memory_mb, 16, 1_048_576),
        ("min_requests", settings.min_requests, 0, 1_000_000_000),
    ] {
        if let Some(value) = value
            && !(min..=max).contains(&value)
        {
            return invalid(field, &format!("must be from {min} to {max}"));
        }
    }
    for (field, value, min, max) in [
        ("healthy_threshold", settings.healthy_threshold, 1, 100),
        ("unhealthy_threshold", settings.unhealthy_threshold, 1, 100),
        ("batch_size", settings.batch_size, 1, 10_000),
        ("max_unavailable", settings.max_unavailable, 1, 10_000),
        ("max_error_percent", settings.max_error_percent, 0, 100),
        ("keep_images", settings.keep_images, 1, 100),
    ] {
        if let Some(value) = value
            && !(min..=max).contains(&value)
        {
            return invalid(field, &format!("must be from {min} to {max}"));
        }
    }
    if let Some(percent) = settings.batch_percent
        && !(1..=100).contains(&percent)
    {
        return invalid("batch_percent", "must be from 1 to 100");
    }
    if let Some(steps) = &settings.canary_steps
        && (steps.is_empty() || steps.len() > 20 || steps.iter().any(|step| !(1..=100).contains(step)))
    {
        return invalid("canary_steps", "must be 1 to 20 percentages from 1 to 100, such as [10, 50, 100]");
    }
    if let Some(mode) = &settings.on_inconclusive
        && mode != "rollback"
        && mode != "wait"
    {
        return invalid("on_inconclusive", "must be \"rollback\" or \"wait\"");
    }
    if let Some(regions) = &settings.regions {
        if regions.len() > 50 {
            return invalid("regions", "must list at most 50 regions");
        }
        for region in regions {
            super::extract::validate_label("deploy.regions", region, 100)?;
        }
    }
    Ok(())
}

/// How the pipeline builds (all optional): the build container's image, further steps, what
/// the build produces, and how its jobs are scheduled.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildFields {
    /// Image of the build container (default `davit/build-base:latest`); it must exist on the agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::ImageReference>, example = "maven:3-eclipse-temurin-21")]
    pub image: Option<String>,
    /// Run after the build command, in the same workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::BuildCommand>)]
    pub test_command: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::BuildCommand>)]
    pub package_command: Option<String>,
    /// Workspace-relative files or directories packed (tar + zstd) into the build's artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<schema::WorkspacePath>>, max_items = 100, example = json!(["target/app.jar"]))]
    pub artifacts: Option<Vec<String>>,
    /// A Dockerfile in the repository to build into an image, exported as an artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::OptionalWorkspacePath>, example = "Dockerfile")]
    pub dockerfile: Option<String>,
    /// Time limit of a build in seconds (default 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "super::extract::optional_whole_number")]
    #[schema(minimum = 1, maximum = 86400)]
    pub timeout_seconds: Option<u32>,
    /// Retries after an infrastructure failure such as a lost agent (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "super::extract::optional_whole_number")]
    #[schema(minimum = 0, maximum = 10)]
    pub max_retries: Option<u32>,
    /// At most this many builds of the pipeline run at once (default unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(deserialize_with = "super::extract::optional_whole_number")]
    #[schema(minimum = 1, maximum = 1000)]
    pub concurrency: Option<u32>,
    /// Labels an agent must carry to run the builds, such as `{"region": "eu-west"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::AgentLabels>)]
    pub agent_labels: Option<std::collections::BTreeMap<String, String>>,
    /// Which source-control events start runs: `push`, `tag`, `pull_request` (default
    /// `["push", "pull_request"]`; tags only when listed). Pushes and pull requests match the
    /// pipeline's branch pattern (a pull request by its target branch); tags match any tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<schema::TriggerEventName>>, example = json!(["push", "tag", "pull_request"]))]
    pub trigger_events: Option<Vec<String>>,
    /// Pull requests deploy into a preview environment of their own, `pr-<number>`, removed
    /// (with its running deployments cancelled) when the pull request is closed or merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_environments: Option<bool>,
}

impl From<BuildSettings> for BuildFields {
    fn from(build: BuildSettings) -> Self {
        BuildFields {
            image: build.image,
            test_command: build.test_command,
            package_command: build.package_command,
            artifacts: (!build.artifacts.is_empty()).then_some(build.artifacts),
            dockerfile: build.dockerfile,
            timeout_seconds: build.timeout_seconds.map(|seconds| seconds.min(u64::from(u32::MAX)) as u32),
            max_retries: build.max_retries,
            concurrency: build.concurrency,
            agent_labels: (!build.agent_labels.is_empty()).then_some(build.agent_labels),
            trigger_events: build.trigger_events.map(|events| events.iter().map(|event| event.as_str().to_string()).collect()),
            preview_environments: build.preview_environments.then_some(true),
        }
    }
}

/// Mirrors `schema::WORKSPACE_PATH_PATTERN`: `.`, or `/`-separated segments of letters, digits,
/// `_`, `-`, `.` that do not start with `.` (so never `..`), optionally ending in `/`.
fn validate_workspace_path(field: &str, path: &str) -> Result<(), ApiError> {
    let segment_ok = |segment: &str| {
        segment.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    };
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let valid = path == "." || (path.len() <= 1000 && !trimmed.is_empty() && trimmed.split('/').all(segment_ok));
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid_field(
            field,
            format!(
                "{field} entries must be paths inside the repository like dist or target/app.jar: letters, digits, '_', '-', '.', no segment starting with '.' (got {path:?})"
            ),
        ))
    }
}

/// `trigger_events`: any of `push`, `tag`, `pull_request`; one listed twice counts once (an
/// empty list turns source-control triggers off).
fn parse_trigger_events(events: &[String]) -> Result<Vec<TriggerEvent>, ApiError> {
    let mut parsed = Vec::with_capacity(events.len());
    for event in events {
        let trigger = match event.as_str() {
            "push" => TriggerEvent::Push,
            "tag" => TriggerEvent::Tag,
            "pull_request" => TriggerEvent::PullRequest,
            other => {
                return Err(ApiError::invalid_field(
                    "trigger_events",
                    format!("trigger_events entries must be push, tag or pull_request, not {other:?}"),
                ));
            }
        };
        if !parsed.contains(&trigger) {
            parsed.push(trigger);
        }
    }
    Ok(parsed)
}

/// Mirrors `schema::IMAGE_PATTERN`.
fn validate_image(image: &str) -> Result<(), ApiError> {
    let valid = image.len() <= 255
        && image.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && image.bytes().all(|b| b.is_ascii_alphanumeric() || b"._/:@-".contains(&b));
    if valid { Ok(()) } else { Err(ApiError::invalid_field("image", "image must be a Docker image reference such as alpine:3.20")) }
}

/// Check the request's build fields and lay them over `current` (a field left out keeps its value).
fn merge_build_fields(current: BuildSettings, fields: BuildFields) -> Result<BuildSettings, ApiError> {
    let mut build = current;
    if let Some(image) = fields.image {
        validate_image(&image)?;
        build.image = Some(image);
    }
    for (field, value, target) in [
        ("test_command", fields.test_command, &mut build.test_command),
        ("package_command", fields.package_command, &mut build.package_command),
    ] {
        if let Some(command) = value {
            if command.chars().count() > 10_000 {
                return Err(ApiError::invalid_field(field, format!("{field} must be at most 10000 characters")));
            }
            *target = (!command.is_empty()).then_some(command);
        }
    }
    if let Some(artifacts) = fields.artifacts {
        if artifacts.len() > 100 {
            return Err(ApiError::invalid_field("artifacts", "at most 100 artifact paths"));
        }
        for path in &artifacts {
            validate_workspace_path("artifacts", path)?;
        }
        build.artifacts = artifacts;
    }
    if let Some(dockerfile) = fields.dockerfile {
        if !dockerfile.is_empty() {
            validate_workspace_path("dockerfile", &dockerfile)?;
        }
        build.dockerfile = (!dockerfile.is_empty()).then_some(dockerfile);
    }
    if let Some(timeout) = fields.timeout_seconds {
        if !(1..=86_400).contains(&timeout) {
            return Err(ApiError::invalid_field("timeout_seconds", "timeout_seconds must be between 1 and 86400"));
        }
        build.timeout_seconds = Some(u64::from(timeout));
    }
    if let Some(retries) = fields.max_retries {
        if retries > 10 {
            return Err(ApiError::invalid_field("max_retries", "max_retries must be between 0 and 10"));
        }
        build.max_retries = Some(retries);
    }
    if let Some(concurrency) = fields.concurrency {
        if !(1..=1000).contains(&concurrency) {
            return Err(ApiError::invalid_field("concurrency", "concurrency must be between 1 and 1000"));
        }
        build.concurrency = Some(concurrency);
    }
    if let Some(labels) = fields.agent_labels {
        if labels.len() > 20 {
            return Err(ApiError::invalid_field("agent_labels", "at most 20 agent_labels"));
        }
        for (key, value) in &labels {
            validate_label("agent_labels", key, 63)?;
            validate_label("agent_labels", value, 255)?;
        }
        build.agent_labels = labels;
    }
    if let Some(events) = fields.trigger_events {
        build.trigger_events = Some(parse_trigger_events(&events)?);
    }
    if let Some(preview) = fields.preview_environments {
        build.preview_environments = preview;
    }
    Ok(build)
}

impl From<Pipeline> for PipelineView {
    fn from(pipeline: Pipeline) -> Self {
        Self {
            pipeline_id: pipeline.pipeline_id,
            name: pipeline.name,
            repo_id: pipeline.repo_id,
            branch: pipeline.branch,
            build_command: pipeline.build_command,
            deploy_strategy: pipeline.deploy_strategy,
            environment: pipeline.environment,
            is_active: pipeline.is_active,
            created_at: timestamp(pipeline.created_at),
            updated_at: timestamp(pipeline.updated_at),
            build: pipeline.build.into(),
            deploy: pipeline.deploy.into(),
        }
    }
}

/// Environment names: 1 to 20 lower-case letters, digits, '-' or '_' (the seed's VARCHAR(20)).
pub fn validate_environment(field: &str, environment: &str) -> Result<(), ApiError> {
    let valid = !environment.is_empty()
        && environment.len() <= 20
        && environment.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid_field(field, format!("{field} must be 1 to 20 lower-case letters, digits, '-' or '_' (like staging)")))
    }
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    validate_label("name", name, 100)
}

fn validate_build_command(command: &str) -> Result<(), ApiError> {
    if command.chars().count() > 10_000 {
        return Err(ApiError::invalid_field("build_command", "build_command must be at most 10000 characters"));
    }
    Ok(())
}

pub fn load_pipeline(state: &AppState, pipeline_id: u64) -> Result<Pipeline, ApiError> {
    load_id(&state.node.state(), Table::Pipelines, pipeline_id)?
        .ok_or_else(|| ApiError::not_found(format!("pipeline {pipeline_id} not found")))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PipelineFilter {
    /// Only the pipelines of this repository.
    #[param(value_type = Option<schema::IdText>)]
    pub repo_id: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<schema::Cursor>)]
    pub cursor: Option<String>,
}

/// List all deployment pipelines.
#[utoipa::path(get, path = "/api/v1/pipelines", tag = "pipelines", params(PipelineFilter), security(("bearer" = [])),
    responses((status = 200, body = Paged<PipelineView>), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody)))]
async fn list_pipelines(
    State(state): State<AppState>,
    _caller: Caller,
    Query(filter): Query<PipelineFilter>,
) -> Result<Json<Paged<PipelineView>>, ApiError> {
    let repo_id = filter.repo_id.as_deref().map(|id| parse_id("repo_id", id)).transpose()?;
    state.node.read_barrier().await?;
    let page = Page { limit: filter.limit, cursor: filter.cursor };
    let page = page_of::<Pipeline>(&state.node, Table::Pipelines, &page, |pipeline| repo_id.is_none_or(|id| pipeline.repo_id == id))?;
    Ok(Json(Paged { items: page.items.into_iter().map(PipelineView::from).collect(), next_cursor: page.next_cursor }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePipelineRequest {
    #[schema(value_type = schema::Name, example = "production-pipeline")]
    pub name: String,
    #[schema(example = "repo123")]
    pub repo_id: FlexibleId,
    /// The branches the pipeline builds: a name or a pattern (`*` within a path segment, `**`
    /// across), such as `release/*`; the repository's branch when absent.
    #[schema(value_type = Option<schema::BranchPattern>, example = "main")]
    pub branch: Option<String>,
    #[schema(value_type = Option<schema::BuildCommand>, example = "mvn clean package")]
    pub build_command: Option<String>,
    #[schema(value_type = schema::DeployStrategyName, example = "blue-green")]
    pub deploy_strategy: DeployStrategy,
    /// Defaults to `development`.
    #[schema(value_type = Option<schema::EnvironmentName>)]
    pub environment: Option<String>,
    /// How the pipeline builds (image, further steps, artifacts, scheduling).
    pub build: Option<BuildFields>,
    /// How releases run on the deploy agents and roll out.
    #[schema(value_type = Option<DeployFields>)]
    pub deploy: Option<serde_json::Value>,
}

/// Create a new deployment pipeline (developer).
#[utoipa::path(post, path = "/api/v1/pipelines", tag = "pipelines", request_body = CreatePipelineRequest, security(("bearer" = [])),
    responses((status = 201, body = PipelineView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn create_pipeline(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<CreatePipelineRequest>,
) -> Result<(StatusCode, Json<PipelineView>), ApiError> {
    caller.require(Role::Developer, "creating a pipeline")?;
    validate_name(&request.name)?;
    let repo_id = request.repo_id.id("repo_id")?;
    if let Some(branch) = &request.branch {
        validate_branch_pattern("branch", branch)?;
    }
    if let Some(command) = &request.build_command {
        validate_build_command(command)?;
    }
    let environment = request.environment.unwrap_or_else(|| "development".into());
    validate_environment("environment", &environment)?;
    let build = merge_build_fields(BuildSettings::default(), request.build.unwrap_or_default())?;
    let deploy = merge_deploy_fields(&DeploySettings::default(), request.deploy)?;
    let command = Command::CreatePipeline {
        name: request.name,
        repo_id,
        branch: request.branch,
        build_command: request.build_command,
        deploy_strategy: request.deploy_strategy,
        environment,
        build,
        deploy,
    };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    let pipeline_id = applied_id(outcome)?.expect("create returns the id");
    Ok((StatusCode::CREATED, Json(load_pipeline(&state, pipeline_id)?.into())))
}

/// One pipeline.
#[utoipa::path(get, path = "/api/v1/pipelines/{pipelineId}", tag = "pipelines", params(("pipelineId" = schema::IdText, Path, description = "pipeline id")),
    security(("bearer" = [])),
    responses((status = 200, body = PipelineView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn get_pipeline(
    State(state): State<AppState>,
    _caller: Caller,
    Path(pipeline_id): Path<String>,
) -> Result<Json<PipelineView>, ApiError> {
    let pipeline_id = parse_id("pipelineId", &pipeline_id)?;
    state.node.read_barrier().await?;
    Ok(Json(load_pipeline(&state, pipeline_id)?.into()))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePipelineRequest {
    #[schema(value_type = Option<schema::Name>)]
    pub name: Option<String>,
    #[schema(value_type = Option<schema::BranchPattern>)]
    pub branch: Option<String>,
    #[schema(value_type = Option<schema::BuildCommand>)]
    pub build_command: Option<String>,
    #[schema(value_type = Option<schema::DeployStrategyName>, example = "canary")]
    pub deploy_strategy: Option<DeployStrategy>,
    #[schema(value_type = Option<schema::EnvironmentName>)]
    pub environment: Option<String>,
    pub is_active: Option<bool>,
    /// Build settings to change; a field left out keeps its value.
    pub build: Option<BuildFields>,
    /// Deploy settings to change; a field left out keeps its value, `null` resets it.
    #[schema(value_type = Option<DeployFields>)]
    pub deploy: Option<serde_json::Value>,
}

/// Update pipeline settings (developer).
#[utoipa::path(put, path = "/api/v1/pipelines/{pipelineId}", tag = "pipelines", params(("pipelineId" = schema::IdText, Path, description = "pipeline id")),
    request_body = UpdatePipelineRequest, security(("bearer" = [])),
    responses((status = 200, body = PipelineView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody), (status = 409, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn update_pipeline(
    State(state): State<AppState>,
    caller: Caller,
    Path(pipeline_id): Path<String>,
    JsonBody(request): JsonBody<UpdatePipelineRequest>,
) -> Result<Json<PipelineView>, ApiError> {
    caller.require(Role::Developer, "changing a pipeline")?;
    let pipeline_id = parse_id("pipelineId", &pipeline_id)?;
    if let Some(name) = &request.name {
        validate_name(name)?;
    }
    if let Some(branch) = &request.branch {
        validate_branch_pattern("branch", branch)?;
    }
    if let Some(command) = &request.build_command {
        validate_build_command(command)?;
    }
    if let Some(environment) = &request.environment {
        validate_environment("environment", environment)?;
    }
    state.node.read_barrier().await?;
    let current = load_pipeline(&state, pipeline_id)?;
    let build = merge_build_fields(current.build.clone(), request.build.unwrap_or_default())?;
    let deploy = merge_deploy_fields(&current.deploy, request.deploy)?;
    let patch = PipelinePatch {
        name: request.name,
        branch: request.branch,
        build_command: request.build_command,
        deploy_strategy: request.deploy_strategy,
        environment: request.environment,
        is_active: request.is_active,
        build: (build != current.build).then_some(build),
        deploy: (deploy != current.deploy).then_some(deploy),
    };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), Command::UpdatePipeline { pipeline_id, patch }).await?;
    applied_id(outcome)?;
    Ok(Json(load_pipeline(&state, pipeline_id)?.into()))
}

/// Delete a pipeline with its deployments, artifacts and configuration (developer).
#[utoipa::path(delete, path = "/api/v1/pipelines/{pipelineId}", tag = "pipelines", params(("pipelineId" = schema::IdText, Path, description = "pipeline id")),
    security(("bearer" = [])),
    responses((status = 204), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn delete_pipeline(State(state): State<AppState>, caller: Caller, Path(pipeline_id): Path<String>) -> Result<StatusCode, ApiError> {
    caller.require(Role::Developer, "deleting a pipeline")?;
    let pipeline_id = parse_id("pipelineId", &pipeline_id)?;
    let (outcome, _) = super::propose(&state.node, &caller.requester(), Command::DeletePipeline { pipeline_id }).await?;
    applied_id(outcome)?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// JSON Schema's integers include `153.0`; the deploy settings take it as 153.
    #[test]
    fn deploy_settings_take_integers_written_with_a_zero_fraction() {
        let fields = serde_json::json!({"public_port": 8080.0, "cpu_millis": 153.0, "canary_steps": [10.0, 50]});
        let settings = merge_deploy_fields(&DeploySettings::default(), Some(fields)).unwrap();
        assert_eq!((settings.public_port, settings.cpu_millis), (Some(8080), Some(153)));
        assert_eq!(settings.canary_steps, Some(vec![10, 50]));
        let error = merge_deploy_fields(&DeploySettings::default(), Some(serde_json::json!({"cpu_millis": 1.5}))).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("deploy.cpu_millis"));
    }

    #[test]
    fn trigger_events_are_checked_and_kept() {
        let fields = BuildFields {
            trigger_events: Some(vec!["push".into(), "tag".into(), "pull_request".into()]),
            preview_environments: Some(true),
            ..BuildFields::default()
        };
        let build = merge_build_fields(BuildSettings::default(), fields).unwrap();
        assert_eq!(build.trigger_events, Some(vec![TriggerEvent::Push, TriggerEvent::Tag, TriggerEvent::PullRequest]));
        assert!(build.preview_environments && build.triggers_on(TriggerEvent::Tag));
        let view = BuildFields::from(build.clone());
        assert_eq!(view.trigger_events.as_deref(), Some(&["push".to_string(), "tag".to_string(), "pull_request".to_string()][..]));
        // Left out, the events stay as they were; the default runs pushes and pull requests only.
        assert_eq!(merge_build_fields(build, BuildFields::default()).unwrap().trigger_events.unwrap().len(), 3);
        let default = BuildSettings::default();
        assert!(default.triggers_on(TriggerEvent::Push) && default.triggers_on(TriggerEvent::PullRequest));
        assert!(!default.triggers_on(TriggerEvent::Tag));

        let fields = BuildFields { trigger_events: Some(vec!["merge".into()]), ..BuildFields::default() };
        let error = merge_build_fields(BuildSettings::default(), fields).unwrap_err();
        assert_eq!(error.field.as_deref(), Some("trigger_events"));
        assert!(error.message.contains("not \"merge\""), "{}", error.message);
        let fields = BuildFields { trigger_events: Some(vec!["tag".into(), "tag".into()]), ..BuildFields::default() };
        assert_eq!(merge_build_fields(BuildSettings::default(), fields).unwrap().trigger_events, Some(vec![TriggerEvent::Tag]));
    }

    #[test]
    fn pipeline_branches_may_be_patterns() {
        for good in ["main", "release/*", "feature/**", "v*.x"] {
            validate_branch_pattern("branch", good).unwrap();
        }
        for bad in ["", "-x", "a..b", "release/?", "a b", "[abc]"] {
            assert_eq!(validate_branch_pattern("branch", bad).unwrap_err().field.as_deref(), Some("branch"), "{bad:?}");
        }
        assert!(super::super::repos::validate_branch("branch", "release/*").is_err(), "a repository's branch is a name, not a pattern");
    }
}
