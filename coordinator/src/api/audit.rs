//! The audit log: every mutating request, every login and every secret read, hash-chained so an
//! edited or removed entry is detected (`GET /audit-logs/verify`, `davit audit verify`).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, Page, Paged, Query, page_of, parse_id};
use super::schema;
use super::users::timestamp;
use crate::api_error::ApiError;
use crate::state::apply::{audit_hash, meta_keys};
use crate::state::codec::{decode, key_id};
use crate::state::records::{AuditLog, Role};
use crate::store::{Backend, StoreError, Table, full_range};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_audit_logs)).routes(routes!(verify_audit_log))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditView {
    pub audit_id: u64,
    pub user_id: Option<u64>,
    pub action: String,
    pub details: String,
    pub timestamp: String,
    pub source: Option<String>,
    pub log_index: u64,
    pub hash: String,
}

impl From<AuditLog> for AuditView {
    fn from(entry: AuditLog) -> Self {
        Self {
            audit_id: entry.audit_id,
            user_id: entry.user_id,
            action: entry.action,
            details: entry.details,
            timestamp: timestamp(entry.timestamp),
            source: entry.source,
            log_index: entry.log_index,
            hash: entry.hash,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditFilter {
    #[param(value_type = Option<schema::IdText>)]
    pub user_id: Option<String>,
    /// An action such as `pipeline.create` or a prefix such as `auth.`.
    pub action: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<schema::Cursor>)]
    pub cursor: Option<String>,
}

/// The audit log, oldest first (admin).
#[utoipa::path(get, path = "/api/v1/audit-logs", tag = "audit", params(AuditFilter), security(("bearer" = [])),
    responses((status = 200, body = Paged<AuditView>), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody)))]
async fn list_audit_logs(
    State(state): State<AppState>,
    caller: Caller,
    Query(filter): Query<AuditFilter>,
) -> Result<Json<Paged<AuditView>>, ApiError> {
    caller.require(Role::Admin, "reading the audit log")?;
    let user_id = filter.user_id.as_deref().map(|id| parse_id("user_id", id)).transpose()?;
    state.node.read_barrier().await?;
    let page = Page { limit: filter.limit, cursor: filter.cursor };
    let page = page_of::<AuditLog>(&state.node, Table::AuditLogs, &page, |entry| {
        user_id.is_none_or(|id| entry.user_id == Some(id))
            && filter.action.as_ref().is_none_or(|action| entry.action.starts_with(action.as_str()))
    })?;
    Ok(Json(Paged { items: page.items.into_iter().map(AuditView::from).collect(), next_cursor: page.next_cursor }))
}

/// What checking the chain found.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct AuditVerification {
    pub ok: bool,
    pub entries_checked: u64,
    /// The first entry that does not fit the chain, with the reason.
    pub first_bad_entry: Option<u64>,
    pub problem: Option<String>,
}

/// Walk the whole chain: each entry's hash must match its contents and its predecessor's hash,
/// ids must have no gaps, and the last hash must be the recorded head.
pub fn verify_chain(backend: &dyn Backend) -> Result<AuditVerification, StoreError> {
    let mut previous_hash = String::new();
    let mut expected_id = 1;
    let mut checked = 0;
    let bad = |audit_id: u64, checked: u64, problem: String| AuditVerification {
        ok: false,
        entries_checked: checked,
        first_bad_entry: Some(audit_id),
        problem: Some(problem),
    };
    for (key, bytes) in backend.scan(Table::AuditLogs, full_range(), usize::MAX, false)? {
        let audit_id = key_id(&key).unwrap_or(0);
        let entry: AuditLog = match decode(Table::AuditLogs, &bytes) {
            Ok(entry) => entry,
            Err(error) => return Ok(bad(audit_id, checked, format!("entry {audit_id} does not decode: {error}"))),
        };
        if audit_id != expected_id {
            return Ok(bad(expected_id, checked, format!("entry {expected_id} is missing (next present entry is {audit_id})")));
        }
        if entry.audit_id != audit_id {
            return Ok(bad(audit_id, checked, format!("entry stored under id {audit_id} claims id {}", entry.audit_id)));
        }
        if entry.previous_hash != previous_hash {
            return Ok(bad(audit_id, checked, format!("entry {audit_id} does not link to entry {}", audit_id - 1)));
        }
        if audit_hash(&previous_hash, &entry) != entry.hash {
            return Ok(bad(audit_id, checked, format!("entry {audit_id} was altered: its contents do not match its hash")));
        }
        previous_hash = entry.hash;
        expected_id += 1;
        checked += 1;
    }
    let head: String = match backend.get(Table::StateMeta, meta_keys::AUDIT_HEAD)? {
        Some(bytes) => decode(Table::StateMeta, &bytes)?,
        None => String::new(),
    };
    if head != previous_hash {
        return Ok(bad(
            expected_id,
            checked,
            format!(
                "the chain ends at entry {} but the recorded head is a later entry: entries were removed from the end",
                expected_id - 1
            ),
        ));
    }
    Ok(AuditVerification { ok: true, entries_checked: checked, first_bad_entry: None, problem: None })
}

/// Check the audit chain on this node's store (admin).
#[utoipa::path(get, path = "/api/v1/audit-logs/verify", tag = "audit", security(("bearer" = [])),
    responses((status = 200, body = AuditVerification), (status = 401, body = crate::api_error::ErrorBody), (status = 403, body = crate::api_error::ErrorBody)))]
async fn verify_audit_log(State(state): State<AppState>, caller: Caller) -> Result<Json<AuditVerification>, ApiError> {
    caller.require(Role::Admin, "verifying the audit log")?;
    state.node.read_barrier().await?;
    let backend = state.node.backend.clone();
    let result =
        tokio::task::spawn_blocking(move || verify_chain(backend.as_ref())).await.map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(Json(result))
}
