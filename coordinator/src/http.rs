//! The REST API over axum: health, metrics, login, configuration and cluster operations.
//! Handlers turn requests into `Command`s (writes go through `Node::propose`) or read the
//! replicated state after a read barrier. Flow: `HTTP -> handler -> Command -> Node::propose
//! -> Raft -> apply -> state`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::api_error::ApiError;
use crate::auth::{self, Claims};
use crate::node::{AdminOp, Node, Requester};
use crate::state::apply::{configuration_prefix, index, index_ids, load_id};
use crate::state::codec::decode;
use crate::state::records::{Configuration, Role, User};
use crate::state::{Command, ConfigEntry, Outcome};
use crate::store::Table;

#[derive(Clone)]
pub struct AppState {
    pub node: Arc<Node>,
    pub prometheus: metrics_exporter_prometheus::PrometheusHandle,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_endpoint))
        .route("/api/v1/auth/login", post(login))
        .route(
            "/api/v1/configs/{environment}",
            get(get_configs).post(set_configs),
        )
        .route("/api/v1/cluster/status", get(cluster_status))
        .route("/api/v1/cluster/{operation}", post(cluster_operation))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see README.md for the API",
            )
        })
        .with_state(state)
}

/// The authenticated caller, from `Authorization: Bearer <jwt>`, and where it called from.
pub struct Caller(pub Claims, pub Option<String>);

impl Caller {
    pub fn user_id(&self) -> Option<u64> {
        self.0.sub.parse().ok()
    }

    pub fn requester(&self) -> Requester {
        Requester {
            user_id: self.user_id(),
            source: self.1.clone(),
        }
    }

    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.0.role >= role {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                format!("this needs the {role:?} role; you are {:?}", self.0.role).to_lowercase(),
            ))
        }
    }
}

pub fn authenticate(node: &Node, authorization: Option<&str>) -> Result<Claims, ApiError> {
    let header = authorization.ok_or_else(|| {
        ApiError::unauthorized("missing Authorization header; send `Authorization: Bearer <token>` from POST /api/v1/auth/login")
    })?;
    let token = header
        .strip_prefix("Bearer ")
        .ok_or_else(|| ApiError::unauthorized("Authorization header must be `Bearer <token>`"))?;
    let key = node.token_signing_key().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the cluster is still initializing; retry shortly",
        )
    })?;
    auth::check_token(&key, token).map_err(|error| ApiError::unauthorized(error.to_string()))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok());
        let source = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip().to_string());
        authenticate(&state.node, header).map(|claims| Caller(claims, source))
    }
}

/// Turn an apply outcome into a response or the matching error.
pub fn applied(outcome: Outcome) -> Result<crate::state::Applied, ApiError> {
    outcome.result.map_err(ApiError::from)
}

/// JSON bodies with a readable 400 instead of axum's plain-text rejection.
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(
        request: axum::extract::Request,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => Err(ApiError::bad_request(format!(
                "request body: {}",
                rejection.body_text()
            ))),
        }
    }
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let status = state.node.status();
    match status.leader_id {
        Some(leader_id) if state.node.token_signing_key().is_some() => Ok(Json(
            serde_json::json!({ "status": "ready", "leader_id": leader_id, "node_id": status.node_id }),
        )),
        Some(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the cluster is initializing",
        )),
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "node {} knows no leader (term {}); it may be cut off from the majority",
                status.node_id, status.term
            ),
        )),
    }
}

async fn metrics_endpoint(State(state): State<AppState>) -> impl IntoResponse {
    crate::observability::record_raft_metrics(&state.node);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.prometheus.render(),
    )
}

#[derive(Deserialize)]
struct LoginRequest {
    username: String,
    password: String,
}

async fn login(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<LoginRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if request.username.is_empty() || request.password.is_empty() {
        return Err(ApiError::bad_request(
            "username and password must not be empty",
        ));
    }
    state.node.read_barrier().await?;
    let node = &state.node;
    let view = node.state();
    let user: Option<User> =
        match index_ids(&view, index::USERS_BY_NAME, &request.username)?.first() {
            Some(user_id) => load_id(&view, Table::Users, *user_id)?,
            None => None,
        };
    let wrong = || ApiError::unauthorized("wrong username or password");
    let user = user.ok_or_else(wrong)?;
    let password_hash = user.password_hash.clone();
    let password = request.password.clone();
    // argon2 is deliberately slow; keep it off the async workers.
    let verified =
        tokio::task::spawn_blocking(move || auth::verify_password(&password, &password_hash))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })?;
    if !verified {
        return Err(wrong());
    }
    let key = node.token_signing_key().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the cluster is still initializing",
        )
    })?;
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let token = auth::issue_token(&key, user.user_id, &user.username, user.role, now)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(Json(
        serde_json::json!({ "token": token, "expires_in": auth::TOKEN_LIFETIME_SECONDS }),
    ))
}

#[derive(Deserialize, Default)]
struct ConfigQuery {
    pipeline_id: Option<u64>,
    /// Serve from this node without a read barrier (may lag the leader slightly).
    #[serde(default)]
    stale_ok: bool,
}

/// The configuration of an environment as `{key: value}`, secrets masked.
pub async fn read_configs(
    node: &Node,
    environment: &str,
    pipeline_id: Option<u64>,
    stale_ok: bool,
) -> Result<Vec<Configuration>, ApiError> {
    if !stale_ok {
        node.read_barrier().await?;
    }
    let prefix = configuration_prefix(environment, pipeline_id);
    let rows = node.state().0.scan(
        Table::Configurations,
        crate::store::prefix_range(&prefix),
        usize::MAX,
        false,
    )?;
    rows.into_iter()
        .map(|(_, bytes)| decode(Table::Configurations, &bytes).map_err(ApiError::from))
        .collect()
}

async fn get_configs(
    State(state): State<AppState>,
    _caller: Caller,
    Path(environment): Path<String>,
    Query(query): Query<ConfigQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = read_configs(&state.node, &environment, query.pipeline_id, query.stale_ok).await?;
    let variables: BTreeMap<String, String> = rows
        .into_iter()
        .map(|row| {
            (
                row.key,
                if row.is_secret {
                    "***".to_string()
                } else {
                    row.value
                },
            )
        })
        .collect();
    Ok(Json(
        serde_json::json!({ "environment": environment, "pipeline_id": query.pipeline_id, "variables": variables }),
    ))
}

/// `POST /api/v1/configs/{environment}` with the seed's flat body `{"db_password": "...", ...}`.
async fn set_configs(
    State(state): State<AppState>,
    caller: Caller,
    Path(environment): Path<String>,
    Query(query): Query<ConfigQuery>,
    JsonBody(body): JsonBody<serde_json::Map<String, serde_json::Value>>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    caller.require(Role::Developer)?;
    let mut entries = Vec::with_capacity(body.len());
    for (key, value) in body {
        let value = match value {
            serde_json::Value::String(text) => text,
            serde_json::Value::Number(number) => number.to_string(),
            serde_json::Value::Bool(flag) => flag.to_string(),
            other => {
                return Err(ApiError::bad_request(format!(
                    "value of {key:?} must be a string, number or boolean, not {other}"
                )));
            }
        };
        entries.push(ConfigEntry {
            key,
            value,
            is_secret: false,
        });
    }
    let command = Command::SetConfigurations {
        environment: environment.clone(),
        pipeline_id: query.pipeline_id,
        entries,
    };
    let (outcome, log_index) = state.node.propose(&caller.requester(), command).await?;
    let applied = applied(outcome)?;
    Ok((
        StatusCode::OK,
        Json(
            serde_json::json!({ "environment": environment, "written": applied.affected, "log_index": log_index }),
        ),
    ))
}

async fn cluster_status(
    State(state): State<AppState>,
    _caller: Caller,
) -> Json<crate::node::ClusterStatus> {
    Json(state.node.status())
}

#[derive(Deserialize, Default)]
struct ClusterOperationBody {
    node_id: Option<u64>,
    node_ids: Option<Vec<u64>>,
    grpc_addr: Option<String>,
    http_addr: Option<String>,
    region: Option<String>,
}

async fn cluster_operation(
    State(state): State<AppState>,
    caller: Caller,
    Path(operation): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(Role::Admin)?;
    let body: ClusterOperationBody = if body.iter().all(u8::is_ascii_whitespace) {
        ClusterOperationBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?
    };
    let ids = || -> Result<Vec<u64>, ApiError> {
        match (&body.node_ids, body.node_id) {
            (Some(ids), _) if !ids.is_empty() => Ok(ids.clone()),
            (_, Some(id)) => Ok(vec![id]),
            _ => Err(ApiError::bad_request("give node_id or node_ids")),
        }
    };
    let op = match operation.as_str() {
        "add" => AdminOp::AddLearner {
            node_id: body
                .node_id
                .ok_or_else(|| ApiError::bad_request("add needs node_id"))?,
            grpc_addr: body
                .grpc_addr
                .clone()
                .ok_or_else(|| ApiError::bad_request("add needs grpc_addr (host:port)"))?,
            http_addr: body
                .http_addr
                .clone()
                .ok_or_else(|| ApiError::bad_request("add needs http_addr (host:port)"))?,
            region: body.region.clone().unwrap_or_else(|| "default".into()),
        },
        "promote" => AdminOp::Promote { node_ids: ids()? },
        "remove" => AdminOp::Remove { node_ids: ids()? },
        "transfer-leader" => AdminOp::TransferLeader {
            node_id: body
                .node_id
                .ok_or_else(|| ApiError::bad_request("transfer-leader needs node_id"))?,
        },
        "snapshot" => AdminOp::Snapshot,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "unknown cluster operation {other:?}; use add, promote, remove, transfer-leader or snapshot"
                ),
            ));
        }
    };
    Ok(Json(state.node.admin(op).await?))
}
