//! The REST API (`/api/v1`), one module per resource of the seed. Handlers turn requests into
//! `Command`s (writes go through `Node::propose`, from any node) or read the replicated state
//! after a read barrier. Flow: `HTTP -> api::<resource> handler -> Command -> Node::propose ->
//! Raft -> apply -> state`. The OpenAPI document is generated from the handlers themselves.

pub mod agents;
pub mod artifacts;
pub mod audit;
pub mod cluster;
pub mod configs;
pub mod delivery;
pub mod deployment_events;
pub mod deployments;
pub mod environments;
pub mod extract;
pub mod health;
pub mod logs;
pub mod monitoring;
pub mod pipelines;
pub mod query_parameters;
pub mod repos;
pub mod schema;
pub mod sse;
pub mod users;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::get;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;

use crate::api_error::ApiError;
use crate::blob_store::BlobStore;
use crate::node::{Node, Requester};
use crate::secrets::MasterKeys;
use crate::state::{Command, Outcome};

/// Largest JSON request body accepted (artifact uploads have their own, larger limit).
pub const JSON_BODY_LIMIT: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
    pub secrets: Arc<MasterKeys>,
    pub blobs: Arc<dyn BlobStore>,
    /// What the coordinator may connect to on a user's behalf: handlers check URLs with it
    /// when they are saved, and its `http_client()` checks again when it connects.
    pub outbound: Arc<crate::outbound::OutboundPolicy>,
    /// Live CPU and memory of release containers, from the agents connected to this node.
    pub release_usage: Arc<crate::release_usage::ReleaseUsage>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Davit API", description = "Builds and deployments on your own VM fleet. Authenticate with `Authorization: Bearer <token>` from POST /api/v1/auth/login or an API token."),
    modifiers(&BearerAuth),
    components(schemas(
        crate::api_error::ErrorBody,
        // Schemas that only parameters refer to; the derive registers those of bodies itself.
        schema::IdText,
        schema::Cursor,
        schema::SearchCursor,
        schema::EnvironmentName,
        schema::Version,
        schema::DateTime,
        schema::TimeOrMillis,
        schema::LogLevelName,
        schema::DeploymentStatusName,
        schema::ClusterOperationName
    ))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT or API token").build()),
        );
    }
}

/// Propose a command through Raft, from any node, and wait until this node has applied it: a
/// follower applies an entry only after the leader has answered, and handlers read their own
/// write back from the local state right after (`load_pipeline` after `CreatePipeline`).
pub async fn propose(node: &Node, requester: &Requester, command: Command) -> Result<(Outcome, u64), ApiError> {
    let (outcome, log_index) = node.propose(requester, command).await?;
    node.wait_applied(log_index).await?;
    Ok((outcome, log_index))
}

/// The whole HTTP surface: REST, OpenAPI document, health, metrics and the dashboard.
pub fn router(state: AppState) -> Router {
    let (router, openapi) = documented_routes().split_for_parts();
    let mut query_parameters = query_parameters::QueryParameters::from_document(&openapi);
    query_parameters.allow(axum::http::Method::POST, "/api/v1/artifacts/upload", &["pipeline_id", "version"]);
    let router = router.route_layer(axum::middleware::from_fn_with_state(Arc::new(query_parameters), query_parameters::reject_unknown));
    let document = Arc::new(openapi.to_pretty_json().expect("the OpenAPI document serializes"));
    router
        .route("/api/v1/openapi.json", get(move || openapi_json(document.clone())))
        .merge(health::routes())
        .merge(crate::dashboard::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint; GET /api/v1/openapi.json lists them all") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method; see GET /api/v1/openapi.json",
            )
        })
        .with_state(state)
}

async fn openapi_json(document: Arc<String>) -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], document.as_ref().clone())
}

/// The OpenAPI document, for tests and tools.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    documented_routes().split_for_parts().1
}

/// Every `/api/v1` route with its OpenAPI description. Artifact uploads and webhook deliveries
/// (GitHub sends up to 25 MB) get their own, larger body limits, so they are merged after the
/// JSON limit is applied to the rest.
fn documented_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(users::routes())
        .merge(repos::routes())
        .merge(pipelines::routes())
        .merge(deployments::routes())
        .merge(environments::routes())
        .merge(deployment_events::routes())
        .merge(configs::routes())
        .merge(logs::routes())
        .merge(monitoring::routes())
        .merge(delivery::routes())
        .merge(audit::routes())
        .merge(cluster::routes())
        .merge(agents::routes())
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(JSON_BODY_LIMIT, extract::refuse_oversized))
        .merge(
            repos::webhook_routes()
                .layer(DefaultBodyLimit::max(crate::scm::events::MAX_PAYLOAD_BYTES))
                .layer(axum::middleware::from_fn_with_state(crate::scm::events::MAX_PAYLOAD_BYTES, extract::refuse_oversized)),
        )
        .merge(artifacts::routes())
}
