//! Server-Sent Events responses fed by a task: what the followed forms of the deployment log
//! and of a deployment's progress events share. The task reads the state and sends events; this
//! module owns the channel, the keep-alive comments and the reporting of a failure mid-stream.
//! It never reads the state itself.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::api_error::ApiError;

/// One followed response lasts at most this long; the client then reconnects with
/// `Last-Event-ID` (EventSource does so by itself). Bounding it keeps a stream from pinning a
/// connection forever through proxies and keeps generated-request testing finite.
pub const FOLLOW_WINDOW: Duration = Duration::from_secs(30);

/// A `text/event-stream` response carrying what `produce` sends, with a keep-alive comment
/// every `keep_alive` while it is quiet. An error from `produce` after the response has
/// started is sent as a last `event: stream_error` (`{"code", "message"}`) and logged with
/// `what` and the deployment, since the status line has already gone out as 200.
pub fn stream_from_task<Produce, Producing>(what: &'static str, deployment_id: u64, keep_alive: Duration, produce: Produce) -> Response
where
    Produce: FnOnce(mpsc::Sender<Event>) -> Producing,
    Producing: Future<Output = Result<(), ApiError>> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel::<Event>(64);
    let producing = produce(sender.clone());
    tokio::spawn(async move {
        if let Err(error) = producing.await {
            tracing::warn!(deployment_id, error = %error.message, "{what}");
            let data = serde_json::json!({"code": error.code, "message": error.message});
            let _ = sender.send(Event::default().event("stream_error").data(data.to_string())).await;
        }
    });
    let events = ReceiverStream::new(receiver).map(Ok::<Event, Infallible>);
    Sse::new(events).keep_alive(KeepAlive::new().interval(keep_alive)).into_response()
}
