//! Starting a coordinator: bind the listeners, start the Raft node, serve gRPC (Raft,
//! cluster, integration API) and HTTP (REST, metrics), and initialize a new cluster (token
//! signing key, first admin) once it has a leader.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use davit_proto::agent::agent_service_server::AgentServiceServer;
use davit_proto::api::config_service_server::ConfigServiceServer;
use davit_proto::api::deployment_service_server::DeploymentServiceServer;
use davit_proto::cluster::cluster_service_server::ClusterServiceServer;
use davit_proto::raft::raft_service_server::RaftServiceServer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{AppState, router};
use crate::auth;
use crate::blob_store::{BlobStore, BlobStoreConfig, DirBlobStore};
use crate::cluster_service::ClusterGrpc;
use crate::config::NodeConfig;
use crate::grpc_api::{ConfigGrpc, DeploymentGrpc};
use crate::node::{Node, Requester};
use crate::raft::service::RaftGrpc;
use crate::secrets::MasterKeys;
use crate::state::Command;
use crate::state::records::Role;
use crate::store::Table;
use crate::tls::TlsMaterial;

/// The first admin's credentials, shown once when the cluster creates them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminCredentials {
    pub username: String,
    pub password: String,
}

pub struct RunningServer {
    pub node: Arc<Node>,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub tls: bool,
    /// Set when this process created the first admin.
    pub admin_credentials: watch::Receiver<Option<AdminCredentials>>,
    pub credentials_file: PathBuf,
}

async fn bind(addr: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|error| {
        anyhow::anyhow!("cannot listen for {what} on {addr}: {error}; is another davit running there? pick another address")
    })
}

/// The gRPC listener's connections with TCP_NODELAY. tonic applies `Server::tcp_nodelay` only to
/// listeners it binds itself; without it, a small message (an offer right after a result's
/// acknowledgement, a Raft append) waits up to 40 ms for the peer's delayed ACK.
fn incoming_with_nodelay(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

pub async fn serve(config: NodeConfig) -> anyhow::Result<RunningServer> {
    let http_listener = bind(&config.http_addr, "HTTP").await?;
    let grpc_listener = bind(&config.grpc_addr, "gRPC").await?;
    let http_addr = http_listener.local_addr()?;
    let grpc_addr = grpc_listener.local_addr()?;
    let tls = config.tls.as_ref().map(TlsMaterial::load).transpose()?;
    let secrets = Arc::new(load_master_keys(&config)?);
    let blobs = open_blob_store(&config)?;
    let credentials_file = config.data_dir.join("initial-admin.json");
    let prometheus = crate::observability::prometheus();
    let agent_settings = config.agents.clone();
    let outbound = Arc::new(crate::outbound::OutboundPolicy::new(&config.outbound).map_err(anyhow::Error::msg)?);
    tracing::info!(allowed = %outbound.describe(), "outbound connections");
    let node = Node::start(config).await?;
    let fleet = crate::fleet::Fleet::new();
    let release_usage = Arc::new(crate::release_usage::ReleaseUsage::default());
    let gateway = crate::agent_gateway::AgentGateway::new(
        node.clone(),
        secrets.clone(),
        blobs.clone(),
        fleet.clone(),
        release_usage.clone(),
        Duration::from_millis(agent_settings.heartbeat_interval_ms.max(100)),
    );
    gateway.start();
    let scheduler =
        crate::scheduler::Scheduler::new(node.clone(), fleet.clone(), Duration::from_secs(agent_settings.lost_after_seconds.max(1)));
    tokio::spawn(scheduler.run());
    tokio::spawn(crate::deploy::controller::Controller::new(node.clone()).run());
    tokio::spawn(crate::retention::ArtifactRetention::new(node.clone(), blobs.clone(), node.config.retention.clone()).run());
    crate::commit_status::CommitStatusReporter::new(node.clone(), secrets.clone(), &outbound, Default::default()).start();
    tokio::spawn(crate::scm::poller::Poller::new(node.clone(), outbound.clone()).run());

    // HTTP/2 flow-control windows well above hyper's 1 MiB default, so that an artifact upload
    // (1 MiB messages) or a log stream is not throttled to one message per round trip.
    let mut grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20));
    if let Some(tls) = &tls {
        grpc = grpc.tls_config(tls.tonic_server())?;
    }
    let grpc = grpc
        .add_service(RaftServiceServer::new(RaftGrpc::new(node.raft.clone())).max_decoding_message_size(256 * 1024 * 1024))
        .add_service(ClusterServiceServer::new(ClusterGrpc::new(node.clone(), fleet.clone())))
        .add_service(
            AgentServiceServer::new(crate::agent_gateway::AgentGrpc(gateway.clone()))
                .max_decoding_message_size(16 * 1024 * 1024)
                .max_encoding_message_size(16 * 1024 * 1024),
        )
        .add_service(ConfigServiceServer::new(ConfigGrpc::new(node.clone(), secrets.clone())))
        .add_service(DeploymentServiceServer::new(DeploymentGrpc::new(node.clone())));
    tokio::spawn(async move {
        if let Err(error) = grpc.serve_with_incoming(incoming_with_nodelay(grpc_listener)).await {
            tracing::error!(%error, "gRPC server stopped");
        }
    });

    tracing::info!(blob_store = %blobs.describe(), master_key = secrets.active_key_id(), "storage ready");
    let app = router(AppState { node: node.clone(), prometheus, secrets, blobs, outbound, release_usage });
    match &tls {
        None => {
            tokio::spawn(async move {
                let service = app.into_make_service_with_connect_info::<SocketAddr>();
                // TCP_NODELAY: Server-Sent Events and small answers go out at once.
                let listener = axum::serve::ListenerExt::tap_io(http_listener, |stream: &mut tokio::net::TcpStream| {
                    let _ = stream.set_nodelay(true);
                });
                if let Err(error) = axum::serve(listener, service).await {
                    tracing::error!(%error, "HTTP server stopped");
                }
            });
        }
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.rustls_http_server()?);
            tokio::spawn(serve_https(http_listener, acceptor, app));
        }
    }

    let (credentials_sender, admin_credentials) = watch::channel(None);
    tokio::spawn(initialize_cluster(node.clone(), credentials_file.clone(), credentials_sender));
    Ok(RunningServer { node, http_addr, grpc_addr, tls: tls.is_some(), admin_credentials, credentials_file })
}

/// The secrets master key: `DAVIT_MASTER_KEY`, else the configured file, else (single node
/// only) `<data_dir>/master.key`, generated on first start with mode 0600.
fn load_master_keys(config: &NodeConfig) -> anyhow::Result<MasterKeys> {
    if let Ok(value) = std::env::var("DAVIT_MASTER_KEY") {
        return Ok(MasterKeys::from_env_value(&value)?);
    }
    if let Some(path) = &config.master_key_file {
        if config.generate_master_key {
            create_master_key_file(path)?;
        }
        return Ok(MasterKeys::load_file(path)?);
    }
    if config.is_multi_node() {
        anyhow::bail!(
            "node {} is part of a multi-node cluster but has no master key: every node needs the same key to open secrets. \
             Set master_key_file in the config (make one with `davit secrets new-key > master.key` and copy it to every node) or DAVIT_MASTER_KEY",
            config.node_id
        );
    }
    let path = config.data_dir.join("master.key");
    create_master_key_file(&path)?;
    Ok(MasterKeys::load_file(&path)?)
}

/// Create a master key file with one fresh key (mode 0600) unless it exists. Several nodes on one
/// machine may race here: exactly one creates it and the others read it.
fn create_master_key_file(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Write to a temporary name and link it into place, so no node ever reads a half-written key.
    let temporary = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&temporary)?;
    file.write_all(MasterKeys::generate_file_text("k1").as_bytes())?;
    file.sync_all()?;
    let linked = std::fs::hard_link(&temporary, path);
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(()) => {
            tracing::info!(path = %path.display(), "generated the secrets master key; back it up: secrets cannot be read without it");
            Ok(())
        }
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error.into()),
    }
}

fn open_blob_store(config: &NodeConfig) -> anyhow::Result<Arc<dyn BlobStore>> {
    match &config.blob_store {
        None if config.is_multi_node() => anyhow::bail!(
            "node {} is part of a multi-node cluster but has no [blob_store]: artifacts and logs stored on one node must be readable on every other. \
             Configure a directory every node mounts (kind = \"dir\", shared = true)",
            config.node_id
        ),
        None => Ok(Arc::new(DirBlobStore::open(&config.data_dir.join("blobs"))?)),
        Some(BlobStoreConfig::Dir { shared: false, path }) if config.is_multi_node() => anyhow::bail!(
            "node {}: blob_store directory {} is not declared shared, but this is a multi-node cluster; mount one directory on every node and set shared = true",
            config.node_id,
            path.display()
        ),
        Some(BlobStoreConfig::Dir { path, .. }) => Ok(Arc::new(DirBlobStore::open(path)?)),
    }
}

async fn serve_https(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, app: axum::Router) {
    loop {
        let (stream, remote_addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "HTTPS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone().layer(axum::Extension(axum::extract::ConnectInfo(remote_addr)));
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Once this node leads a new cluster: propose the token signing key and the first admin.
/// Proposals are deterministic in effect: if two leaders in a row both try, the second
/// `InitializeCluster` / `CreateUser admin` is rejected by `apply`, and only the creator
/// reports credentials.
async fn initialize_cluster(node: Arc<Node>, credentials_file: PathBuf, credentials: watch::Sender<Option<AdminCredentials>>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !node.is_leader() {
            if node.token_signing_key().is_some() && has_users(&node) {
                return;
            }
            continue;
        }
        if node.token_signing_key().is_none() {
            let command = Command::InitializeCluster { token_signing_key: auth::random_secret(48) };
            if let Err(error) = node.propose(&Requester::system(), command).await {
                tracing::warn!(%error, "could not initialize the cluster yet");
                continue;
            }
        }
        if has_users(&node) {
            return;
        }
        let (username, password) = match (std::env::var("DAVIT_ADMIN_USER"), std::env::var("DAVIT_ADMIN_PASSWORD")) {
            (Ok(username), Ok(password)) if !username.is_empty() && password.len() >= 8 => (username, password),
            _ => ("admin".to_string(), auth::random_secret(20)),
        };
        let password_hash = match auth::hash_password_async(password.clone()).await {
            Ok(hash) => hash,
            other => {
                tracing::error!(?other, "cannot hash the first admin's password");
                return;
            }
        };
        let command =
            Command::CreateUser { username: username.clone(), email: format!("{username}@localhost"), password_hash, role: Role::Admin };
        match node.propose(&Requester::system(), command).await {
            Ok((outcome, _)) if outcome.result.is_ok() => {
                let created = AdminCredentials { username, password };
                if let Err(error) = write_credentials(&credentials_file, &created) {
                    tracing::warn!(%error, "cannot save the first admin's credentials file");
                }
                tracing::info!(file = %credentials_file.display(), "created the first admin user");
                credentials.send_replace(Some(created));
                return;
            }
            Ok((outcome, _)) => {
                tracing::info!(?outcome, "first admin already exists");
                return;
            }
            Err(error) => tracing::warn!(%error, "could not create the first admin yet"),
        }
    }
}

fn has_users(node: &Node) -> bool {
    node.backend.scan(Table::Users, crate::store::full_range(), 1, false).map(|rows| !rows.is_empty()).unwrap_or(false)
}

fn write_credentials(path: &std::path::Path, credentials: &AdminCredentials) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(&serde_json::to_vec_pretty(credentials).expect("serializes"))?;
    file.sync_all()
}
