//! A running coordinator node: the openraft instance with its stores and network, and the two
//! operations everything above is built on: `propose` (a write, forwarded to the leader from
//! any node) and `read_barrier` (wait until this node's state is current, for linearizable
//! reads). Neither ever hangs: without a quorum they fail with `NodeError::Unavailable`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use davit_proto::cluster::cluster_service_client::ClusterServiceClient;
use davit_proto::cluster::{AdminRequest, ProposeRequest, ReadIndexRequest};
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::config::NodeConfig;
use crate::raft::log_store::LogStore;
use crate::raft::network::{Channels, NetworkFactory};
use crate::raft::snapshot::SnapshotDir;
use crate::raft::state_machine::StateMachineStore;
use crate::raft::{DavitNode, NodeId, Raft, RaftMetrics};
use crate::state::apply::meta_keys;
use crate::state::codec::decode;
use crate::state::txn::BackendRead;
use crate::state::{Command, Outcome, Proposal};
use crate::store::{Backend, Table, open_backend};
use crate::tls::TlsMaterial;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// No leader, no quorum, or the leader cannot be reached: try again (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    /// The operation's arguments are wrong (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Who asks for a change: the acting user and the client address, both for the audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requester {
    pub user_id: Option<u64>,
    pub source: Option<String>,
}

impl Requester {
    pub fn system() -> Self {
        Self::default()
    }
}

/// Membership and leadership operations (`davit cluster ...`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminOp {
    /// Add a node as a learner; it starts receiving the log.
    AddLearner { node_id: NodeId, grpc_addr: String, http_addr: String, region: String },
    /// Make learners voters.
    Promote { node_ids: Vec<NodeId> },
    /// Remove nodes from the cluster (voters are demoted and removed).
    Remove { node_ids: Vec<NodeId> },
    /// Hand leadership to another voter.
    TransferLeader { node_id: NodeId },
    /// Build a snapshot now and compact the log.
    Snapshot,
}

/// A summary of the cluster as one node sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    pub state: String,
    pub term: u64,
    pub leader_id: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub nodes: BTreeMap<NodeId, DavitNode>,
    /// On the leader: the last log index each member has acknowledged.
    pub replication: Option<BTreeMap<NodeId, Option<u64>>>,
    pub storage: String,
}

pub struct Node {
    pub config: NodeConfig,
    pub raft: Raft,
    pub backend: Arc<dyn Backend>,
    pub channels: Channels,
    applied_index: watch::Receiver<u64>,
    committed_index: Arc<std::sync::atomic::AtomicU64>,
    quorum_timeout: Duration,
    events: tokio::sync::broadcast::Sender<crate::state::events::StateEvent>,
    proposals: mpsc::UnboundedSender<PendingProposal>,
}

impl Node {
    /// Subscribe to what the state machine applies on this node (see `state::events`).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::state::events::StateEvent> {
        self.events.subscribe()
    }

    pub async fn start(config: NodeConfig) -> anyhow::Result<Arc<Node>> {
        let tls = config.tls.as_ref().map(TlsMaterial::load).transpose()?;
        let channels = Channels::new(tls.as_ref().map(|tls| Arc::new(tls.client())));
        let backend = open_backend(config.storage, &config.data_dir.join("store"))?;
        let snapshots = SnapshotDir::open(&config.data_dir.join("snapshots"))?;
        let log_store = LogStore::new(backend.clone())?;
        let committed_index = log_store.committed_index();
        let state_machine = StateMachineStore::open(backend.clone(), snapshots)?.apply_after_durable_log(log_store.durable_log_end());
        let applied_index = state_machine.applied_index();
        let events = state_machine.events();
        let tuning = &config.raft;
        let raft_config = openraft::Config {
            cluster_name: "davit".into(),
            heartbeat_interval: tuning.heartbeat_interval_ms,
            election_timeout_min: tuning.election_timeout_min_ms,
            election_timeout_max: tuning.election_timeout_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(tuning.snapshot_every),
            max_in_snapshot_log_to_keep: tuning.keep_after_snapshot,
            max_payload_entries: 512,
            replication_lag_threshold: tuning.snapshot_every,
            install_snapshot_timeout: 30_000,
            ..Default::default()
        };
        let raft_config = Arc::new(raft_config.validate()?);
        let raft = Raft::new(config.node_id, raft_config, NetworkFactory::new(channels.clone()), log_store, state_machine).await?;
        let quorum_timeout = Duration::from_millis(config.raft.quorum_timeout_ms);
        let proposals = ProposalBatcher::spawn(raft.clone(), config.node_id);
        let node = Arc::new(Node { config, raft, backend, channels, applied_index, committed_index, quorum_timeout, events, proposals });
        node.bootstrap_if_new().await?;
        Ok(node)
    }

    async fn bootstrap_if_new(&self) -> anyhow::Result<()> {
        if !self.config.bootstrap || self.raft.is_initialized().await? {
            return Ok(());
        }
        let members: BTreeMap<NodeId, DavitNode> = self
            .config
            .initial_members()
            .into_iter()
            .map(|peer| (peer.node_id, DavitNode { grpc_addr: peer.grpc_addr, http_addr: peer.http_addr, region: peer.region }))
            .collect();
        tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "initializing a new cluster");
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            // Another member initialized first and already replicated to us.
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    pub fn id(&self) -> NodeId {
        self.config.node_id
    }

    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    pub fn is_leader(&self) -> bool {
        self.metrics().current_leader == Some(self.id())
    }

    /// On a leader: fail unless a majority of voters acknowledged it within the last election
    /// timeout. openraft 0.9 keeps a leader that lost its quorum in the Leader state (only
    /// followers run an election timer), so without this an isolated leader would call itself
    /// ready while every write sent to it times out. Other nodes always pass.
    pub fn check_leader_quorum(&self) -> Result<(), NodeError> {
        let metrics = self.metrics();
        if metrics.current_leader != Some(self.id()) {
            return Ok(());
        }
        let limit = self.config.raft.election_timeout_max_ms;
        match metrics.millis_since_quorum_ack {
            Some(millis) if millis <= limit => Ok(()),
            Some(millis) => Err(NodeError::Unavailable(format!(
                "node {} is the leader of term {} but no majority of voters has acknowledged it for {millis} ms; it may be cut off from the majority",
                self.id(),
                metrics.current_term
            ))),
            None => Err(NodeError::Unavailable(format!(
                "node {} was just elected leader of term {} and no majority has acknowledged it yet; retry shortly",
                self.id(),
                metrics.current_term
            ))),
        }
    }

    pub fn leader(&self) -> Result<(NodeId, DavitNode), NodeError> {
        let metrics = self.metrics();
        let leader_id = metrics.current_leader.ok_or_else(|| {
            NodeError::Unavailable(format!(
                "node {} knows no leader right now (term {}); the cluster may be electing one or may have lost its quorum; retry shortly",
                self.id(),
                metrics.current_term
            ))
        })?;
        let node = metrics
            .membership_config
            .membership()
            .get_node(&leader_id)
            .cloned()
            .ok_or_else(|| NodeError::Unavailable(format!("leader {leader_id} is not in this node's membership view yet")))?;
        Ok((leader_id, node))
    }

    pub fn cluster_client(&self, node: &DavitNode) -> Result<ClusterServiceClient<tonic::transport::Channel>, NodeError> {
        let channel = self.channels.get(&node.grpc_addr).map_err(|e| NodeError::Internal(e.to_string()))?;
        Ok(ClusterServiceClient::new(channel))
    }

    /// Propose a command: on the leader, stamp it and write it through Raft; elsewhere forward
    /// it to the leader. Returns the outcome of applying it and its log index.
    pub async fn propose(&self, requester: &Requester, command: Command) -> Result<(Outcome, u64), NodeError> {
        let started = std::time::Instant::now();
        let result = match self.leader()? {
            (leader_id, _) if leader_id == self.id() => self.propose_as_leader(requester.clone(), command).await,
            (leader_id, leader) => {
                let request = ProposeRequest {
                    command_json: serde_json::to_vec(&command).map_err(|e| NodeError::Internal(e.to_string()))?,
                    actor_user_id: requester.user_id.unwrap_or(0),
                    source: requester.source.clone().unwrap_or_default(),
                };
                let mut request = tonic::Request::new(request);
                request.set_timeout(self.quorum_timeout + Duration::from_secs(1));
                let response = self
                    .cluster_client(&leader)?
                    .propose(request)
                    .await
                    .map_err(|status| status_to_node_error(status, &format!("forwarding the write to leader {leader_id} failed")))?;
                let response = response.into_inner();
                let outcome: Outcome = serde_json::from_slice(&response.outcome_json).map_err(|e| NodeError::Internal(e.to_string()))?;
                Ok((outcome, response.log_index))
            }
        };
        metrics::histogram!("davit_proposal_seconds").record(started.elapsed().as_secs_f64());
        result
    }

    /// Stamp and propose on this node, which must be the leader. Proposals that arrive while
    /// earlier writes are in flight share one Raft entry (see [`ProposalBatcher`]).
    pub async fn propose_as_leader(&self, requester: Requester, command: Command) -> Result<(Outcome, u64), NodeError> {
        let proposal = Proposal { time: crate::auth::now_millis(), actor: requester.user_id, command, source: requester.source };
        let (reply, outcome) = oneshot::channel();
        self.proposals.send(PendingProposal { proposal, reply }).map_err(|_| NodeError::Internal("the node is shutting down".into()))?;
        match tokio::time::timeout(self.quorum_timeout, outcome).await {
            Err(_) => Err(NodeError::Unavailable(format!(
                "the write was not committed within {} ms: node {} cannot reach a majority of voters. It may still commit later; check before retrying",
                self.quorum_timeout.as_millis(),
                self.id()
            ))),
            Ok(Err(_)) => Err(NodeError::Internal("the write was dropped before it was proposed".into())),
            Ok(Ok(result)) => result,
        }
    }

    /// On the leader: confirm leadership with a quorum and return the index reads must wait for.
    pub async fn read_index_as_leader(&self) -> Result<u64, NodeError> {
        let check = self.raft.get_read_log_id();
        match tokio::time::timeout(self.quorum_timeout, check).await {
            Err(_) => Err(NodeError::Unavailable(format!(
                "node {} could not confirm its leadership with a majority within {} ms",
                self.id(),
                self.quorum_timeout.as_millis()
            ))),
            Ok(Ok((read_log_id, applied))) => Ok(read_log_id.max(applied).map(|id| id.index).unwrap_or(0)),
            Ok(Err(error)) => Err(NodeError::Unavailable(format!("read index failed: {error}"))),
        }
    }

    /// Wait until this node has applied everything committed when the call began (a
    /// linearizable read barrier, Raft's read index). On a follower it asks the leader.
    pub async fn read_barrier(&self) -> Result<(), NodeError> {
        let read_index = match self.leader()? {
            (leader_id, _) if leader_id == self.id() => self.read_index_as_leader().await?,
            (leader_id, leader) => {
                let mut request = tonic::Request::new(ReadIndexRequest {});
                request.set_timeout(self.quorum_timeout + Duration::from_secs(1));
                let response = self
                    .cluster_client(&leader)?
                    .read_index(request)
                    .await
                    .map_err(|status| status_to_node_error(status, &format!("read index from leader {leader_id} failed")))?;
                response.into_inner().read_index
            }
        };
        self.wait_applied(read_index).await
    }

    pub async fn wait_applied(&self, index: u64) -> Result<(), NodeError> {
        let mut applied = self.applied_index.clone();
        let wait = applied.wait_for(|applied| *applied >= index);
        match tokio::time::timeout(self.quorum_timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(NodeError::Internal("state machine stopped".into())),
            Err(_) => Err(NodeError::Unavailable(format!(
                "node {} did not catch up to log index {index} within {} ms",
                self.id(),
                self.quorum_timeout.as_millis()
            ))),
        }
    }

    /// Reads of the local state (after `read_barrier` for linearizable ones).
    pub fn state(&self) -> BackendRead<'_> {
        BackendRead(self.backend.as_ref())
    }

    pub fn token_signing_key(&self) -> Option<String> {
        let bytes = self.backend.get(Table::StateMeta, meta_keys::TOKEN_SIGNING_KEY).ok()??;
        decode(Table::StateMeta, &bytes).ok()
    }

    /// Run an admin operation; followers forward it to the leader.
    pub async fn admin(&self, op: AdminOp) -> Result<serde_json::Value, NodeError> {
        let (leader_id, leader) = self.leader()?;
        if leader_id != self.id() {
            let op_json = serde_json::to_vec(&op).map_err(|e| NodeError::Internal(e.to_string()))?;
            let mut request = tonic::Request::new(AdminRequest { op_json });
            request.set_timeout(Duration::from_secs(120));
            let response = self
                .cluster_client(&leader)?
                .admin(request)
                .await
                .map_err(|status| status_to_node_error(status, &format!("admin call on leader {leader_id} failed")))?;
            return serde_json::from_slice(&response.into_inner().result_json).map_err(|e| NodeError::Internal(e.to_string()));
        }
        self.admin_as_leader(op).await
    }

    pub async fn admin_as_leader(&self, op: AdminOp) -> Result<serde_json::Value, NodeError> {
        let membership = self.metrics().membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let internal = |error: &dyn std::fmt::Display| NodeError::Invalid(error.to_string());
        match op {
            AdminOp::AddLearner { node_id, grpc_addr, http_addr, region } => {
                if voters.contains(&node_id) {
                    return Err(NodeError::Invalid(format!("node {node_id} is already a voter")));
                }
                let node = DavitNode { grpc_addr, http_addr, region };
                // Blocking: returns once the learner has caught up with the log.
                let response = self.raft.add_learner(node_id, node, true).await.map_err(|e| internal(&e))?;
                Ok(serde_json::json!({ "added_learner": node_id, "log_index": response.log_id.index }))
            }
            AdminOp::Promote { node_ids } => {
                let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
                if let Some(missing) = node_ids.iter().find(|id| !learners.contains(id) && !voters.contains(id)) {
                    return Err(NodeError::Invalid(format!(
                        "node {missing} is not a learner of this cluster; run `davit cluster add {missing} ...` first"
                    )));
                }
                let mut new_voters = voters.clone();
                new_voters.extend(node_ids.iter().copied());
                let response = self.raft.change_membership(new_voters.clone(), false).await.map_err(|e| internal(&e))?;
                Ok(serde_json::json!({ "voters": new_voters, "log_index": response.log_id.index }))
            }
            AdminOp::Remove { node_ids } => {
                let new_voters: BTreeSet<NodeId> = voters.iter().copied().filter(|id| !node_ids.contains(id)).collect();
                if new_voters.is_empty() {
                    return Err(NodeError::Invalid("cannot remove every voter".into()));
                }
                // Removing voters turns them into learners first; a second change drops them.
                self.raft.change_membership(new_voters.clone(), false).await.map_err(|e| internal(&e))?;
                let remove: BTreeSet<NodeId> = node_ids.iter().copied().collect();
                let response =
                    self.raft.change_membership(openraft::ChangeMembers::RemoveNodes(remove), false).await.map_err(|e| internal(&e))?;
                Ok(serde_json::json!({ "voters": new_voters, "removed": node_ids, "log_index": response.log_id.index }))
            }
            AdminOp::TransferLeader { node_id } => {
                if !voters.contains(&node_id) {
                    return Err(NodeError::Invalid(format!("node {node_id} is not a voter; only a voter can lead")));
                }
                if node_id == self.id() {
                    return Ok(serde_json::json!({ "leader": node_id }));
                }
                let target = membership.get_node(&node_id).cloned().expect("voters are nodes");
                // openraft 0.9 has no leadership transfer, and followers refuse votes while
                // they hear from a leader (leader lease). So the leader goes quiet and asks the
                // target to campaign until the target wins; the target's log is at least as
                // current as any other's once it has caught up, so it wins the next term.
                self.raft.runtime_config().heartbeat(false);
                let result = self.hand_over_to(node_id, &target).await;
                self.raft.runtime_config().heartbeat(true);
                result?;
                Ok(serde_json::json!({ "leader": node_id }))
            }
            AdminOp::Snapshot => {
                self.raft.trigger().snapshot().await.map_err(|e| internal(&e))?;
                let mut metrics = self.raft.metrics();
                let applied = self.metrics().last_applied;
                let wait = metrics.wait_for(|m| m.snapshot >= applied);
                tokio::time::timeout(Duration::from_secs(60), wait)
                    .await
                    .map_err(|_| NodeError::Unavailable("snapshot did not finish within 60 s".into()))?
                    .map_err(|_| NodeError::Internal("raft stopped".into()))?;
                Ok(serde_json::json!({ "snapshot_index": self.metrics().snapshot.map(|id| id.index) }))
            }
        }
    }

    async fn hand_over_to(&self, node_id: NodeId, target: &DavitNode) -> Result<(), NodeError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let mut metrics = self.raft.metrics();
        while tokio::time::Instant::now() < deadline {
            let op_json = serde_json::to_vec(&AdminOp::TransferLeader { node_id }).expect("serializes");
            if let Err(status) = self.cluster_client(target)?.admin(AdminRequest { op_json }).await {
                tracing::warn!(node_id, %status, "leadership transfer: target did not start an election");
            }
            let wait = metrics.wait_for(|m| m.current_leader == Some(node_id));
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(1500), wait).await {
                return Ok(());
            }
        }
        Err(NodeError::Unavailable(format!("node {node_id} did not become leader within 15 s")))
    }

    /// A transfer-leader request reaching the target: start an election now.
    pub async fn campaign(&self) -> Result<(), NodeError> {
        self.raft.trigger().elect().await.map_err(|e| NodeError::Internal(e.to_string()))
    }

    /// The highest log index this node knows to be committed. On a follower it can trail the
    /// leader's by a heartbeat.
    pub fn commit_index(&self) -> u64 {
        self.committed_index.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn status(&self) -> ClusterStatus {
        let metrics = self.metrics();
        let membership = metrics.membership_config.membership();
        ClusterStatus {
            node_id: self.id(),
            state: format!("{:?}", metrics.state),
            term: metrics.current_term,
            leader_id: metrics.current_leader,
            last_log_index: metrics.last_log_index,
            commit_index: Some(self.commit_index()),
            applied_index: metrics.last_applied.map(|id| id.index),
            snapshot_index: metrics.snapshot.map(|id| id.index),
            purged_index: metrics.purged.map(|id| id.index),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            nodes: membership.nodes().map(|(id, node)| (*id, node.clone())).collect(),
            replication: metrics
                .replication
                .as_ref()
                .map(|replication| replication.iter().map(|(id, log_id)| (*id, log_id.map(|l| l.index))).collect()),
            storage: self.backend.kind().to_string(),
        }
    }
}

fn status_to_node_error(status: tonic::Status, context: &str) -> NodeError {
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => NodeError::Invalid(status.message().to_string()),
        tonic::Code::Internal => NodeError::Internal(format!("{context}: {}", status.message())),
        _ => NodeError::Unavailable(format!("{context}: {}", status.message())),
    }
}

impl From<NodeError> for tonic::Status {
    fn from(error: NodeError) -> Self {
        match error {
            NodeError::Unavailable(message) => tonic::Status::unavailable(message),
            NodeError::Invalid(message) => tonic::Status::invalid_argument(message),
            NodeError::Internal(message) => tonic::Status::internal(message),
        }
    }
}

/// A proposal waiting for the leader's next Raft write, and where its outcome goes.
struct PendingProposal {
    proposal: Proposal,
    reply: oneshot::Sender<Result<(Outcome, u64), NodeError>>,
}

/// Group commit for proposals. openraft 0.9 writes each `client_write` as its own log append
/// and waits for that append to be durable before it takes the next, so one proposal per entry
/// means one durable commit per write whatever the concurrency. The batcher keeps at most
/// [`ProposalBatcher::WRITES_IN_FLIGHT`] writes in openraft; whatever arrives meanwhile is
/// proposed together as one [`Command::Batch`] entry, applied in order with an outcome per
/// proposal. A lone proposal (an idle leader) is written as it is, without waiting.
struct ProposalBatcher;

impl ProposalBatcher {
    const WRITES_IN_FLIGHT: usize = 2;
    const MAX_PROPOSALS: usize = 256;

    fn spawn(raft: Raft, node_id: NodeId) -> mpsc::UnboundedSender<PendingProposal> {
        let (sender, mut receiver) = mpsc::unbounded_channel::<PendingProposal>();
        tokio::spawn(async move {
            let in_flight = Arc::new(Semaphore::new(Self::WRITES_IN_FLIGHT));
            loop {
                let permit = in_flight.clone().acquire_owned().await.expect("the semaphore is never closed");
                let Some(first) = receiver.recv().await else { return };
                let mut pending = vec![first];
                while pending.len() < Self::MAX_PROPOSALS
                    && let Ok(next) = receiver.try_recv()
                {
                    pending.push(next);
                }
                // A caller that gave up (its timeout passed) while queued is not written.
                pending.retain(|proposal| !proposal.reply.is_closed());
                if pending.is_empty() {
                    continue;
                }
                let raft = raft.clone();
                tokio::spawn(async move {
                    Self::write(&raft, node_id, pending).await;
                    drop(permit);
                });
            }
        });
        sender
    }

    async fn write(raft: &Raft, node_id: NodeId, pending: Vec<PendingProposal>) {
        metrics::histogram!("davit_proposal_batch").record(pending.len() as f64);
        let (mut proposals, replies): (Vec<Proposal>, Vec<_>) =
            pending.into_iter().map(|pending| (pending.proposal, pending.reply)).unzip();
        let batched = proposals.len() > 1;
        let entry = if batched {
            Proposal { time: crate::auth::now_millis(), actor: None, command: Command::Batch { proposals }, source: None }
        } else {
            proposals.pop().expect("at least one proposal")
        };
        match raft.client_write(entry).await {
            Ok(response) => {
                let index = response.log_id.index;
                let outcomes = if batched { response.data.batch } else { vec![response.data] };
                let mut outcomes = outcomes.into_iter();
                for reply in replies {
                    let result = outcomes
                        .next()
                        .map(|outcome| (outcome, index))
                        .ok_or_else(|| NodeError::Internal(format!("the batch at log index {index} returned too few outcomes")));
                    let _ = reply.send(result);
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(match &error {
                        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => NodeError::Unavailable(format!(
                            "node {node_id} stopped being the leader (new leader: {:?}); retry",
                            forward.leader_id
                        )),
                        error => NodeError::Internal(error.to_string()),
                    }));
                }
            }
        }
    }
}

/// For unit tests of what runs beside the state machine (retention, the poller, commit statuses):
/// one in-process node with fast elections, leading.
#[cfg(test)]
pub mod testing {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::Node;

    /// A single node with its data in `data_dir`, once it leads; `extra_toml` is appended to its
    /// configuration (top-level keys first, then sections).
    pub async fn single_leader(data_dir: &std::path::Path, extra_toml: &str) -> Arc<Node> {
        let (top_level, sections) = extra_toml.split_once('[').map_or((extra_toml, String::new()), |(top, rest)| (top, format!("[{rest}")));
        let config: crate::config::NodeConfig = toml::from_str(&format!(
            "node_id = 1\nhttp_addr = \"127.0.0.1:1\"\ngrpc_addr = \"127.0.0.1:2\"\ndata_dir = {data_dir:?}\n{top_level}\n\
             [raft]\nheartbeat_interval_ms = 50\nelection_timeout_min_ms = 150\nelection_timeout_max_ms = 300\n{sections}"
        ))
        .expect("test node configuration");
        let node = Node::start(config).await.expect("start the test node");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node.is_leader() {
            assert!(Instant::now() < deadline, "the node did not lead within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        node
    }

    /// A repository (with a webhook secret, so nothing polls it), a pipeline of it and `count`
    /// deployments of that pipeline in `development`, proposed on `node`; nothing runs their
    /// builds. The deployments' ids, oldest first.
    pub async fn deployments_of_a_new_pipeline(node: &Node, count: usize) -> Vec<u64> {
        use crate::state::Command;
        use crate::state::records::{DeployStrategy, ScmType};
        let propose = |command| async move {
            let (outcome, _) = node.propose(&super::Requester::system(), command).await.expect("proposed");
            outcome.result.expect("applied").id.expect("an id")
        };
        let repo_id = propose(Command::ConnectRepository {
            name: "repo".into(),
            repo_url: "https://github.com/org/repo".into(),
            branch: "main".into(),
            scm_type: ScmType::Github,
            webhook_secret: Some("sealed".into()),
            api_url: None,
            access_token: None,
            poll_interval_seconds: None,
        })
        .await;
        let pipeline_id = propose(Command::CreatePipeline {
            name: "web".into(),
            repo_id,
            branch: Some("main".into()),
            build_command: Some("true".into()),
            deploy_strategy: DeployStrategy::Rolling,
            environment: "development".into(),
            build: Default::default(),
            deploy: Default::default(),
        })
        .await;
        let mut deployment_ids = Vec::new();
        for _ in 0..count {
            let create = Command::CreateDeployment {
                pipeline_id,
                commit_hash: "a".repeat(40),
                environment: "development".into(),
                config_overrides: Default::default(),
                rollback_of: None,
                branch: None,
                release_of: None,
            };
            deployment_ids.push(propose(create).await);
        }
        deployment_ids
    }
}
