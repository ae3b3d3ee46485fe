//! The server side of the Raft transport: hands incoming messages to the local openraft node.

use std::io::Cursor;

use davit_proto::raft::raft_service_server::RaftService;
use davit_proto::raft::{RaftPayload, SnapshotChunk};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use serde::Serialize;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{NodeId, Raft, Snapshot, SnapshotMeta, TypeConfig, Vote};

pub struct RaftGrpc {
    raft: Raft,
}

impl RaftGrpc {
    pub fn new(raft: Raft) -> Self {
        Self { raft }
    }
}

fn reply<T: Serialize>(result: &T) -> Result<Response<RaftPayload>, Status> {
    Ok(Response::new(RaftPayload { json: serde_json::to_vec(result).map_err(|e| Status::internal(e.to_string()))? }))
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(payload).map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn append_entries(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let request: AppendEntriesRequest<TypeConfig> = parse(&request.into_inner().json)?;
        reply(&self.raft.append_entries(request).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let request: VoteRequest<NodeId> = parse(&request.into_inner().json)?;
        reply(&self.raft.vote(request).await)
    }

    async fn install_snapshot(&self, request: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftPayload>, Status> {
        let mut stream = request.into_inner();
        let mut header: Option<(Vote, SnapshotMeta)> = None;
        let mut data = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if !chunk.header_json.is_empty() {
                header = Some(parse(&chunk.header_json)?);
            }
            data.extend_from_slice(&chunk.data);
        }
        let Some((vote, meta)) = header else {
            return Err(Status::invalid_argument("snapshot stream carried no header"));
        };
        tracing::info!(bytes = data.len(), last_log_id = ?meta.last_log_id, "received snapshot");
        let snapshot = Snapshot { meta, snapshot: Box::new(Cursor::new(data)) };
        reply(&self.raft.install_full_snapshot(vote, snapshot).await)
    }
}
