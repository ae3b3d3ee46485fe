//! The client side of the Raft transport: openraft's `RaftNetwork` over tonic. openraft's
//! messages travel as JSON inside protobuf `bytes` (see proto/davit/raft.proto); snapshots are
//! streamed in chunks over one client-streaming call.

use std::collections::HashMap;
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use davit_proto::raft::raft_service_client::RaftServiceClient;
use davit_proto::raft::{RaftPayload, SnapshotChunk};
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use super::{DavitNode, NodeId, Snapshot, TypeConfig, Vote};
use crate::tls::ClientTls;

/// Size of one snapshot chunk on the wire.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// Channels to other coordinators, shared by the Raft network and request forwarding.
#[derive(Clone)]
pub struct Channels {
    tls: Option<Arc<ClientTls>>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Channels {
    pub fn new(tls: Option<Arc<ClientTls>>) -> Self {
        Self { tls, channels: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// A lazily connecting channel to `grpc_addr` (host:port), reused across calls.
    pub fn get(&self, grpc_addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().expect("channel map lock");
        if let Some(channel) = channels.get(grpc_addr) {
            return Ok(channel.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{grpc_addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.tonic_config(grpc_addr))?;
        }
        let channel = endpoint.connect_lazy();
        channels.insert(grpc_addr.to_string(), channel.clone());
        Ok(channel)
    }
}

#[derive(Clone)]
pub struct NetworkFactory {
    channels: Channels,
}

impl NetworkFactory {
    pub fn new(channels: Channels) -> Self {
        Self { channels }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = NetworkConnection;

    async fn new_client(&mut self, target: NodeId, node: &DavitNode) -> Self::Network {
        NetworkConnection { target, channel: self.channels.get(&node.grpc_addr).map_err(|e| e.to_string()) }
    }
}

pub struct NetworkConnection {
    target: NodeId,
    channel: Result<Channel, String>,
}

fn to_payload<T: Serialize>(message: &T) -> RaftPayload {
    RaftPayload { json: serde_json::to_vec(message).expect("raft messages serialize") }
}

fn unreachable<E: std::error::Error>(error: impl std::fmt::Display) -> RPCError<NodeId, DavitNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(error.to_string())))
}

impl NetworkConnection {
    fn client(&self) -> Result<RaftServiceClient<Channel>, String> {
        self.channel.clone().map(|channel| RaftServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
    }

    /// Decode the remote's `Result<Response, RaftError<..>>`.
    fn decode<R: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &self,
        payload: RaftPayload,
    ) -> Result<R, RPCError<NodeId, DavitNode, RaftError<NodeId, E>>> {
        let result: Result<R, RaftError<NodeId, E>> =
            serde_json::from_slice(&payload.json).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }
}

fn status_to_rpc_error<E: std::error::Error>(status: tonic::Status) -> RPCError<NodeId, DavitNode, E> {
    // A node that is down, restarting or cut off is "unreachable": openraft backs off instead of
    // hammering it.
    unreachable(format!("{}: {}", status.code(), status.message()))
}

impl RaftNetwork<TypeConfig> for NetworkConnection {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, DavitNode, RaftError<NodeId>>> {
        let mut client = self.client().map_err(unreachable)?;
        let mut grpc_request = tonic::Request::new(to_payload(&request));
        grpc_request.set_timeout(option.hard_ttl());
        let response = client.append_entries(grpc_request).await.map_err(status_to_rpc_error)?;
        self.decode(response.into_inner())
    }

    async fn install_snapshot(
        &mut self,
        _request: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, DavitNode, RaftError<NodeId, InstallSnapshotError>>> {
        // openraft only calls this from its default `full_snapshot`, which we replace with a
        // streaming call below.
        Err(unreachable("davit sends snapshots with full_snapshot streaming; chunked install_snapshot is not used"))
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, DavitNode, RaftError<NodeId>>> {
        let mut client = self.client().map_err(unreachable)?;
        let mut grpc_request = tonic::Request::new(to_payload(&request));
        grpc_request.set_timeout(option.hard_ttl());
        let response = client.vote(grpc_request).await.map_err(status_to_rpc_error)?;
        self.decode(response.into_inner())
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let mut client = self.client().map_err(|e| StreamingError::Unreachable(Unreachable::new(&std::io::Error::other(e))))?;
        let header = serde_json::to_vec(&(vote, &snapshot.meta)).expect("snapshot header serializes");
        let mut data = snapshot.snapshot;
        data.seek(SeekFrom::Start(0)).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let mut bytes = Vec::new();
        data.read_to_end(&mut bytes).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let mut chunks: Vec<SnapshotChunk> =
            bytes.chunks(SNAPSHOT_CHUNK_BYTES).map(|chunk| SnapshotChunk { header_json: Vec::new(), data: chunk.to_vec() }).collect();
        if chunks.is_empty() {
            chunks.push(SnapshotChunk::default());
        }
        chunks[0].header_json = header;
        metrics::counter!("davit_raft_snapshots_sent_total").increment(1);
        let call = client.install_snapshot(tokio_stream::iter(chunks));
        let response = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            response = call => response,
        };
        let response = response
            .map_err(|status| StreamingError::Unreachable(Unreachable::new(&std::io::Error::other(status.message().to_string()))))?;
        let result: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> =
            serde_json::from_slice(&response.into_inner().json).map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        result.map_err(|fatal| StreamingError::RemoteError(RemoteError::new(self.target, fatal)))
    }
}
