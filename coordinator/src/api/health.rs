//! Liveness, readiness and Prometheus metrics. Not part of the versioned API.

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use super::AppState;
use crate::api_error::ApiError;

pub fn routes() -> Router<AppState> {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).route("/metrics", get(metrics_endpoint))
}

/// The process is up.
async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// The node can serve: it knows a leader and the cluster is initialized.
async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let status = state.node.status();
    let unavailable = |message: String| ApiError {
        retry_after: Some(1),
        ..ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    };
    match status.leader_id {
        Some(leader_id) if state.node.token_signing_key().is_some() => {
            state.node.check_leader_quorum().map_err(|error| unavailable(error.to_string()))?;
            Ok(Json(serde_json::json!({ "status": "ready", "leader_id": leader_id, "node_id": status.node_id })))
        }
        Some(_) => Err(unavailable("the cluster is initializing".into())),
        None => {
            Err(unavailable(format!("node {} knows no leader (term {}); it may be cut off from the majority", status.node_id, status.term)))
        }
    }
}

/// Prometheus text: the recorder's metrics, then the deployment figures computed from this
/// node's state (a local read: a scrape never waits on the quorum).
async fn metrics_endpoint(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    crate::observability::record_raft_metrics(&state.node);
    let mut text = state.prometheus.render();
    let figures = super::monitoring::deployment_figures(&state, None, None, crate::observability::SCRAPED_DEPLOYMENTS)?;
    text.push_str(&crate::observability::render_state_metrics(&figures, &text));
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text))
}
