//! A deployment's progress events (host started, healthy, switched, weight changed, verdicts,
//! its end) read by clients: one page of them as JSON, or followed live as Server-Sent Events.
//! [`ProgressFollower`] is the one follower, shared with the gRPC watch (`grpc_api.rs`): it
//! wakes on the node's `StateEvent::DeploymentProgress` instead of polling. This module never
//! writes events; `apply` appends them (`state/progress.rs`).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, Page, Paged, Path, Query, parse_id};
use super::{schema, sse};
use crate::api_error::ApiError;
use crate::node::Node;
use crate::state::apply::load_id;
use crate::state::events::StateEvent;
use crate::state::progress::events_after;
use crate::state::records::{Deployment, DeploymentEvent};
use crate::store::Table;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(deployment_events))
}

/// Keep-alive comments on a quiet stream, so that proxies and clients see the connection live.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// A follower reads again this long after its last wake-up even without one: a safety net for
/// a wake-up the broadcast could not deliver, never the way events normally arrive.
const RECHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Events read per state read while following.
const FOLLOW_BATCH: usize = 256;

/// Follows one deployment's progress events in order, from after a sequence number: what
/// exists first, then each event as this node applies it, until the deployment has ended and
/// its last event was returned. Reads are local, after one read barrier at the start, so a
/// follower never sees less than a linearizable read would have at the moment it started, and
/// what it sees afterwards only grows.
pub struct ProgressFollower {
    node: Arc<Node>,
    deployment_id: u64,
    after_seq: u64,
    wake_ups: Receiver<StateEvent>,
}

impl ProgressFollower {
    /// A follower of `deployment_id` after `after_seq` (0: from the first event); a 404 error
    /// when the deployment does not exist.
    pub async fn start(node: Arc<Node>, deployment_id: u64, after_seq: u64) -> Result<Self, ApiError> {
        // Subscribed before the first read, so that no event applied after it goes unnoticed.
        let wake_ups = node.subscribe();
        node.read_barrier().await?;
        load_existing(&node, deployment_id)?;
        Ok(Self { node, deployment_id, after_seq, wake_ups })
    }

    /// The `seq` of the last event returned (what a client resumes after).
    pub fn after_seq(&self) -> u64 {
        self.after_seq
    }

    /// The next events, in order, waiting until there are some; `None` once the deployment has
    /// ended and every event up to its last was returned, or it was deleted. Dropping the
    /// future while it waits loses nothing: the position moves only when events are returned.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<DeploymentEvent>>, ApiError> {
        loop {
            let events = events_after(&self.node.state(), self.deployment_id, self.after_seq, FOLLOW_BATCH)?;
            if let Some(last) = events.last() {
                self.after_seq = last.seq;
                return Ok(Some(events));
            }
            // Read after the events: the deployment's count of events tells whether any was
            // appended in between (they are written in the same command as its end).
            match load_id::<Deployment>(&self.node.state(), Table::Deployments, self.deployment_id)? {
                None => return Ok(None),
                Some(deployment) if deployment.status.is_final() && deployment.events <= self.after_seq => return Ok(None),
                Some(_) => self.wait_for_progress().await,
            }
        }
    }

    /// Until this deployment has new events (or changed), a wake-up was missed, or
    /// [`RECHECK_INTERVAL`] passed.
    async fn wait_for_progress(&mut self) {
        let recheck = tokio::time::sleep(RECHECK_INTERVAL);
        tokio::pin!(recheck);
        loop {
            tokio::select! {
                _ = &mut recheck => return,
                event = self.wake_ups.recv() => match event {
                    Ok(StateEvent::DeploymentProgress { deployment_id } | StateEvent::DeploymentChanged { deployment_id })
                        if deployment_id == self.deployment_id => return,
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => return,
                    // The node is shutting down: nothing will wake us, so only the recheck does.
                    Err(RecvError::Closed) => {
                        recheck.await;
                        return;
                    }
                },
            }
        }
    }
}

fn load_existing(node: &Node, deployment_id: u64) -> Result<Deployment, ApiError> {
    load_id(&node.state(), Table::Deployments, deployment_id)?
        .ok_or_else(|| ApiError::not_found(format!("deployment {deployment_id} not found")))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeploymentEventsQuery {
    /// `true`: Server-Sent Events (also chosen by `Accept: text/event-stream`): the events
    /// after `after` (or `Last-Event-ID`), then each new one as it is recorded, until the event
    /// that ends the deployment. One response lasts at most 30 s, after which the client
    /// reconnects with `Last-Event-ID` (EventSource does). `false`: one JSON page.
    pub follow: Option<bool>,
    /// Start after this event's `seq` (0 or absent: from the first). With `follow`, a
    /// `Last-Event-ID` header takes precedence, as it is what a reconnecting client sends.
    #[param(minimum = 0, maximum = 9_007_199_254_740_991_u64)]
    pub after: Option<u64>,
    /// JSON form: events per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
    /// JSON form: `next_cursor` of the previous page (it wins over `after`).
    #[param(value_type = Option<schema::Cursor>)]
    pub cursor: Option<String>,
}

/// A deployment's progress events, oldest first: one page of JSON, or followed live as
/// Server-Sent Events (`follow=true` or `Accept: text/event-stream`), each event as `id: <seq>`,
/// `event: <kind>`, `data: <the event as JSON>`. Readable by every role.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/events", tag = "deployments",
    params(("id" = schema::IdText, Path, description = "deployment id"), DeploymentEventsQuery,
        ("Last-Event-ID" = Option<String>, Header,
            description = "When following: the `seq` of the last event received; the stream resumes after it. A value that is not a number is ignored.")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "One page of events as JSON; with `follow=true` or `Accept: text/event-stream`, `text/event-stream` (one event per progress event, ending after the one that ends the deployment: `succeeded`, `failed` or `rolled_back`).",
            content((Paged<DeploymentEvent> = "application/json"), (String = "text/event-stream"))),
        (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn deployment_events(
    State(state): State<AppState>,
    _caller: Caller,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<DeploymentEventsQuery>,
) -> Result<Response, ApiError> {
    let deployment_id = parse_id("id", &id)?;
    if query.after.is_some_and(|after| after > schema::MAX_JSON_ID) {
        return Err(ApiError::invalid_field("after", format!("after must be at most {}", schema::MAX_JSON_ID)));
    }
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.to_ascii_lowercase().contains("text/event-stream"));
    if query.follow.unwrap_or(wants_stream) {
        // An id this stream never sent resumes from `after`, as a fresh EventSource would.
        let last_event_id =
            headers.get("last-event-id").and_then(|value| value.to_str().ok()).and_then(|text| text.trim().parse::<u64>().ok());
        let after_seq = last_event_id.or(query.after).unwrap_or(0);
        let follower = ProgressFollower::start(state.node.clone(), deployment_id, after_seq).await?;
        return Ok(follow_events(follower));
    }
    let page = Page { limit: query.limit, cursor: query.cursor };
    let limit = page.limit()?;
    let after_seq = page.after()?.or(query.after).unwrap_or(0);
    state.node.read_barrier().await?;
    load_existing(&state.node, deployment_id)?;
    let mut items = events_after(&state.node.state(), deployment_id, after_seq, limit + 1)?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|event| event.seq.to_string())
    } else {
        None
    };
    Ok(Json(Paged { items, next_cursor }).into_response())
}

/// The followed form: every event as one SSE event, for at most [`sse::FOLLOW_WINDOW`].
fn follow_events(mut follower: ProgressFollower) -> Response {
    let deployment_id = follower.deployment_id;
    sse::stream_from_task("following a deployment's events failed", deployment_id, KEEP_ALIVE, |sender| async move {
        send_events(&mut follower, &sender).await
    })
}

async fn send_events(follower: &mut ProgressFollower, sender: &mpsc::Sender<Event>) -> Result<(), ApiError> {
    let window_ends = tokio::time::Instant::now() + sse::FOLLOW_WINDOW;
    if sender.send(Event::default().retry(Duration::from_secs(1))).await.is_err() {
        return Ok(());
    }
    loop {
        let batch = tokio::select! {
            batch = follower.next_batch() => batch?,
            _ = tokio::time::sleep_until(window_ends) => return Ok(()),
            _ = sender.closed() => return Ok(()),
        };
        let Some(events) = batch else { return Ok(()) };
        for event in events {
            if sender.send(sse_event(&event)?).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// `id: <seq>`, `event: <kind>`, `data: <event JSON>`.
fn sse_event(event: &DeploymentEvent) -> Result<Event, ApiError> {
    // A line break would end the field early (and axum refuses one); kinds are plain names.
    let kind: String = event.kind.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).collect();
    Event::default().id(event.seq.to_string()).event(kind).json_data(event).map_err(|error| ApiError::internal(error.to_string()))
}

#[cfg(test)]
mod tests;
