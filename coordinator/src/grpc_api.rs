//! The gRPC API for integrations (proto/davit/api.proto). It shares authentication, commands
//! and reads with the REST API; only the encoding differs.

use std::sync::Arc;

use davit_proto::api::config_service_server::ConfigService;
use davit_proto::api::{
    ConfigEntry as ProtoEntry, GetConfigRequest, GetConfigResponse, SetConfigRequest,
    SetConfigResponse,
};
use tonic::{Request, Response, Status};

use crate::api_error::ApiError;
use crate::auth::Claims;
use crate::http::{applied, authenticate, read_configs};
use crate::node::{Node, Requester};
use crate::state::records::Role;
use crate::state::{Command, ConfigEntry};

pub struct ConfigGrpc {
    node: Arc<Node>,
}

impl ConfigGrpc {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    fn caller<T>(&self, request: &Request<T>, role: Role) -> Result<Claims, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        let claims = authenticate(&self.node, header)?;
        if claims.role < role {
            return Err(ApiError::forbidden(format!("this needs the {role:?} role")).into());
        }
        Ok(claims)
    }
}

fn pipeline(id: u64) -> Option<u64> {
    (id != 0).then_some(id)
}

#[tonic::async_trait]
impl ConfigService for ConfigGrpc {
    async fn set_config(
        &self,
        request: Request<SetConfigRequest>,
    ) -> Result<Response<SetConfigResponse>, Status> {
        let claims = self.caller(&request, Role::Developer)?;
        let request_source = request.remote_addr().map(|addr| addr.ip().to_string());
        let request = request.into_inner();
        let entries = request
            .entries
            .into_iter()
            .map(|entry| ConfigEntry {
                key: entry.key,
                value: entry.value,
                is_secret: entry.is_secret,
            })
            .collect();
        let command = Command::SetConfigurations {
            environment: request.environment,
            pipeline_id: pipeline(request.pipeline_id),
            entries,
        };
        let (outcome, log_index) = self
            .node
            .propose(
                &Requester {
                    user_id: claims.sub.parse().ok(),
                    source: request_source,
                },
                command,
            )
            .await
            .map_err(ApiError::from)?;
        let applied = applied(outcome)?;
        Ok(Response::new(SetConfigResponse {
            log_index,
            written: applied.affected as u32,
        }))
    }

    async fn get_config(
        &self,
        request: Request<GetConfigRequest>,
    ) -> Result<Response<GetConfigResponse>, Status> {
        self.caller(&request, Role::Viewer)?;
        let request = request.into_inner();
        let rows = read_configs(
            &self.node,
            &request.environment,
            pipeline(request.pipeline_id),
            request.stale_ok,
        )
        .await?;
        let entries = rows
            .into_iter()
            .map(|row| ProtoEntry {
                value: if row.is_secret {
                    "***".into()
                } else {
                    row.value
                },
                key: row.key,
                is_secret: row.is_secret,
            })
            .collect();
        Ok(Response::new(GetConfigResponse { entries }))
    }
}
