//! The gRPC API for integrations (proto/davit/api.proto). It shares authentication, roles,
//! validation, sealing of secrets and reads with the REST API; only the encoding differs.

use std::sync::Arc;

use davit_proto::api::config_service_server::ConfigService;
use davit_proto::api::deployment_service_server::DeploymentService;
use davit_proto::api::{
    ConfigEntry as ProtoEntry, DeploymentEventMessage, GetConfigRequest, GetConfigResponse, SetConfigRequest, SetConfigResponse,
    WatchDeploymentRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::configs::{effective_configuration, key_names_a_secret, secret_context};
use crate::api::deployment_events::ProgressFollower;
use crate::api::extract::{Caller, authenticate};
use crate::api::pipelines::validate_environment;
use crate::api_error::ApiError;
use crate::node::Node;
use crate::secrets::MasterKeys;
use crate::state::records::{DeploymentEvent, Role};
use crate::state::{Command, ConfigEntry};

pub struct ConfigGrpc {
    node: Arc<Node>,
    secrets: Arc<MasterKeys>,
}

impl ConfigGrpc {
    pub fn new(node: Arc<Node>, secrets: Arc<MasterKeys>) -> Self {
        Self { node, secrets }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, ApiError> {
        caller_of(&self.node, request)
    }
}

/// Who calls: the `authorization: Bearer <token>` metadata, checked as the REST API checks its
/// header (the same JWTs and API tokens).
fn caller_of<T>(node: &Node, request: &Request<T>) -> Result<Caller, ApiError> {
    let header = request.metadata().get("authorization").and_then(|value| value.to_str().ok());
    authenticate(node, header, request.remote_addr().map(|addr| addr.ip().to_string()))
}

fn pipeline(id: u64) -> Option<u64> {
    (id != 0).then_some(id)
}

#[tonic::async_trait]
impl ConfigService for ConfigGrpc {
    async fn set_config(&self, request: Request<SetConfigRequest>) -> Result<Response<SetConfigResponse>, Status> {
        let caller = self.caller(&request)?;
        caller.require(Role::Developer, "changing configuration")?;
        let request = request.into_inner();
        validate_environment("environment", &request.environment)?;
        let pipeline_id = pipeline(request.pipeline_id);
        let mut entries = Vec::with_capacity(request.entries.len());
        for entry in request.entries {
            if entry.key.is_empty() || entry.key.len() > 100 {
                return Err(ApiError::invalid_field("key", format!("key {:?} must be 1 to 100 characters", entry.key)).into());
            }
            let is_secret = entry.is_secret || key_names_a_secret(&entry.key);
            if is_secret {
                caller.require(Role::Admin, "setting secrets")?;
            }
            let value = if is_secret {
                self.secrets.seal(&entry.value, &secret_context(&request.environment, pipeline_id, &entry.key))
            } else {
                entry.value
            };
            entries.push(ConfigEntry { key: entry.key, value, is_secret });
        }
        let command = Command::SetConfigurations { environment: request.environment, pipeline_id, entries };
        let (outcome, log_index) = self.node.propose(&caller.requester(), command).await.map_err(ApiError::from)?;
        let applied = outcome.result.map_err(ApiError::from)?;
        Ok(Response::new(SetConfigResponse { log_index, written: applied.affected as u32 }))
    }

    async fn get_config(&self, request: Request<GetConfigRequest>) -> Result<Response<GetConfigResponse>, Status> {
        self.caller(&request)?;
        let request = request.into_inner();
        validate_environment("environment", &request.environment)?;
        let rows = effective_configuration(&self.node, &request.environment, pipeline(request.pipeline_id), request.stale_ok).await?;
        let entries = rows
            .into_values()
            .map(|row| ProtoEntry { value: if row.is_secret { "***".into() } else { row.value }, key: row.key, is_secret: row.is_secret })
            .collect();
        Ok(Response::new(GetConfigResponse { entries }))
    }
}

/// `DeploymentService`: a deployment's progress for integrations, from the same
/// [`ProgressFollower`] as `GET /api/v1/deployments/{id}/events`. Unlike the HTTP stream it is
/// not cut after a window: a gRPC client holds one stream for the whole rollout (HTTP/2 keepalive
/// pings keep the connection alive).
pub struct DeploymentGrpc {
    node: Arc<Node>,
}

impl DeploymentGrpc {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// The wire form of a progress event (the one conversion for this API).
pub fn event_message(event: DeploymentEvent) -> DeploymentEventMessage {
    DeploymentEventMessage {
        deployment_id: event.deployment_id,
        seq: event.seq,
        at: event.at,
        kind: event.kind,
        host: event.host,
        region: event.region,
        weight: event.weight.map(u32::from),
        message: event.message,
    }
}

#[tonic::async_trait]
impl DeploymentService for DeploymentGrpc {
    type WatchDeploymentStream = ReceiverStream<Result<DeploymentEventMessage, Status>>;

    async fn watch_deployment(&self, request: Request<WatchDeploymentRequest>) -> Result<Response<Self::WatchDeploymentStream>, Status> {
        caller_of(&self.node, &request)?;
        let WatchDeploymentRequest { deployment_id, after_seq } = request.into_inner();
        let mut follower = ProgressFollower::start(self.node.clone(), deployment_id, after_seq).await?;
        let (sender, receiver) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    batch = follower.next_batch() => batch,
                    _ = sender.closed() => return,
                };
                match batch {
                    Ok(Some(events)) => {
                        for event in events {
                            if sender.send(Ok(event_message(event))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => return,
                    Err(error) => {
                        tracing::warn!(deployment_id, error = %error.message, "watching a deployment failed");
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// Integrations compile their own clients from api.proto: the field numbers of the watch's
    /// message are frozen, and a progress event converts field by field.
    #[test]
    fn frozen_deployment_event_message() {
        let event = DeploymentEvent {
            deployment_id: 7,
            seq: 2,
            at: 1000,
            kind: "canary_step".into(),
            host: Some(4),
            region: Some("eu".into()),
            weight: Some(10),
            message: "m".into(),
        };
        let bytes = event_message(event).encode_to_vec();
        let frozen = [b"\x08\x07\x10\x02\x18\xe8\x07\x22\x0bcanary_step".as_slice(), b"\x28\x04\x32\x02eu\x38\x0a\x42\x01m"].concat();
        assert_eq!(bytes, frozen);
        let without_host = DeploymentEvent {
            deployment_id: 7,
            seq: 1,
            at: 0,
            kind: "queued".into(),
            host: None,
            region: None,
            weight: None,
            message: String::new(),
        };
        let decoded = DeploymentEventMessage::decode(event_message(without_host).encode_to_vec().as_slice()).unwrap();
        assert_eq!((decoded.host, decoded.region, decoded.weight), (None, None, None));
    }
}
