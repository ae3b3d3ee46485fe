//! Cluster operations over REST (`davit cluster ...` uses these): status for any user, changes
//! for admins. Any node accepts them; followers forward changes to the leader.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, Path, RawBody};
use super::schema;
use crate::api_error::ApiError;
use crate::node::{AdminOp, ClusterStatus};
use crate::state::records::Role;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(cluster_status)).routes(routes!(cluster_operation))
}

/// The cluster as this node sees it: leader, term, log indexes, members, replication.
#[utoipa::path(get, path = "/api/v1/cluster/status", tag = "cluster", security(("bearer" = [])),
    responses((status = 200, body = Object), (status = 401, body = crate::api_error::ErrorBody)))]
async fn cluster_status(State(state): State<AppState>, _caller: Caller) -> Json<ClusterStatus> {
    Json(state.node.status())
}

#[derive(Debug, Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClusterOperationBody {
    pub node_id: Option<u64>,
    pub node_ids: Option<Vec<u64>>,
    pub grpc_addr: Option<String>,
    pub http_addr: Option<String>,
    pub region: Option<String>,
}

/// Change the cluster (admin): `add` a learner, `promote` learners, `remove` nodes,
/// `transfer-leader`, or build a `snapshot`.
#[utoipa::path(post, path = "/api/v1/cluster/{operation}", tag = "cluster",
    params(("operation" = schema::ClusterOperationName, Path, description = "add, promote, remove, transfer-leader or snapshot")),
    request_body(content = ClusterOperationBody), security(("bearer" = [])),
    responses((status = 200, body = Object), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody), (status = 503, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn cluster_operation(
    State(state): State<AppState>,
    caller: Caller,
    Path(operation): Path<String>,
    RawBody(body): RawBody,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Role::Admin, "changing the cluster")?;
    let body: ClusterOperationBody = if body.iter().all(u8::is_ascii_whitespace) {
        ClusterOperationBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("request body: {e}")))?
    };
    let ids = || -> Result<Vec<u64>, ApiError> {
        match (&body.node_ids, body.node_id) {
            (Some(ids), _) if !ids.is_empty() => Ok(ids.clone()),
            (_, Some(id)) => Ok(vec![id]),
            _ => Err(ApiError::invalid_field("node_ids", "give node_id or node_ids")),
        }
    };
    let required = |value: &Option<String>, field: &str| {
        value.clone().ok_or_else(|| ApiError::invalid_field(field, format!("{operation} needs {field} (host:port)")))
    };
    let op = match operation.as_str() {
        "add" => AdminOp::AddLearner {
            node_id: body.node_id.ok_or_else(|| ApiError::invalid_field("node_id", "add needs node_id"))?,
            grpc_addr: required(&body.grpc_addr, "grpc_addr")?,
            http_addr: required(&body.http_addr, "http_addr")?,
            region: body.region.clone().unwrap_or_else(|| "default".into()),
        },
        "promote" => AdminOp::Promote { node_ids: ids()? },
        "remove" => AdminOp::Remove { node_ids: ids()? },
        "transfer-leader" => AdminOp::TransferLeader {
            node_id: body.node_id.ok_or_else(|| ApiError::invalid_field("node_id", "transfer-leader needs node_id"))?,
        },
        "snapshot" => AdminOp::Snapshot,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("unknown cluster operation {other:?}; use add, promote, remove, transfer-leader or snapshot"),
            ));
        }
    };
    Ok(Json(state.node.admin(op).await?))
}
