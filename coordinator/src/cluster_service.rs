//! The gRPC service coordinators call on each other: forwarded writes, read index and admin
//! operations. Only the leader serves `Propose` and `ReadIndex`; a node that lost leadership
//! in between answers UNAVAILABLE and the caller retries.

use std::sync::Arc;

use davit_proto::cluster::cluster_service_server::ClusterService;
use davit_proto::cluster::{
    AdminRequest, AdminResponse, AgentReport, AgentReportAck, ProposeRequest, ProposeResponse, ReadIndexRequest, ReadIndexResponse,
};
use tonic::{Request, Response, Status};

use crate::fleet::{AgentPresence, Fleet};
use crate::node::{AdminOp, Node, NodeError, Requester};
use crate::state::Command;

pub struct ClusterGrpc {
    node: Arc<Node>,
    fleet: Arc<Fleet>,
}

impl ClusterGrpc {
    pub fn new(node: Arc<Node>, fleet: Arc<Fleet>) -> Self {
        Self { node, fleet }
    }

    fn require_leader(&self) -> Result<(), Status> {
        if self.node.is_leader() {
            Ok(())
        } else {
            Err(NodeError::Unavailable(format!(
                "node {} is no longer the leader (leader: {:?}); retry",
                self.node.id(),
                self.node.metrics().current_leader
            ))
            .into())
        }
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterGrpc {
    async fn propose(&self, request: Request<ProposeRequest>) -> Result<Response<ProposeResponse>, Status> {
        self.require_leader()?;
        let request = request.into_inner();
        let command: Command = serde_json::from_slice(&request.command_json)
            .map_err(|e| Status::invalid_argument(format!("malformed command (is this node older than the caller?): {e}")))?;
        let requester = Requester {
            user_id: (request.actor_user_id != 0).then_some(request.actor_user_id),
            source: (!request.source.is_empty()).then_some(request.source),
        };
        let (outcome, log_index) = self.node.propose_as_leader(requester, command).await?;
        let outcome_json = serde_json::to_vec(&outcome).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ProposeResponse { outcome_json, log_index }))
    }

    async fn read_index(&self, _request: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
        self.require_leader()?;
        let read_index = self.node.read_index_as_leader().await?;
        Ok(Response::new(ReadIndexResponse { read_index, leader_id: self.node.id() }))
    }

    async fn admin(&self, request: Request<AdminRequest>) -> Result<Response<AdminResponse>, Status> {
        let op: AdminOp = serde_json::from_slice(&request.into_inner().op_json)
            .map_err(|e| Status::invalid_argument(format!("malformed admin operation: {e}")))?;
        let result = match op {
            // The leader asks the transfer target to campaign.
            AdminOp::TransferLeader { node_id } if node_id == self.node.id() && !self.node.is_leader() => {
                self.node.campaign().await?;
                serde_json::json!({ "campaigning": node_id })
            }
            op => self.node.admin(op).await?,
        };
        let result_json = serde_json::to_vec(&result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(AdminResponse { result_json }))
    }

    async fn report_agents(&self, request: Request<AgentReport>) -> Result<Response<AgentReportAck>, Status> {
        self.require_leader()?;
        let report = request.into_inner();
        let sessions: Vec<AgentPresence> =
            serde_json::from_slice(&report.sessions_json).map_err(|e| Status::invalid_argument(format!("malformed agent report: {e}")))?;
        self.fleet.report(report.node_id, sessions);
        Ok(Response::new(AgentReportAck {}))
    }
}
