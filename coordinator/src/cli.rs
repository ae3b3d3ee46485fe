//! The `davit` command: `up` (all-in-one single node), `serve --config`, and the operator
//! commands under `cluster`, which talk to any node's REST API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::config::{NodeConfig, RaftTuning};
use crate::server::{RunningServer, serve};
use crate::store::BackendKind;

#[derive(Parser)]
#[command(name = "davit", version, about = "Davit: self-hosted builds and deployments on your own VM fleet")]
pub struct Cli {
    #[command(subcommand)]
    command: TopCommand,
}

#[derive(Subcommand)]
enum TopCommand {
    /// Start a single-node Davit here: embedded store, local blobs, dashboard on --http.
    Up(UpArgs),
    /// Start a coordinator node from a TOML config file.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Operate a cluster: status, membership, leadership, snapshots, certificates.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Check the audit log's hash chain.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Master keys for secrets.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify that no audit entry was edited or removed: on a stopped node's data directory
    /// (`--data-dir`), or through a running node (`--server`).
    Verify {
        /// A node's data directory (the node must be stopped).
        #[arg(long, conflicts_with = "server")]
        data_dir: Option<PathBuf>,
        #[command(flatten)]
        connection: Connection,
    },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Print a new master key file (one fresh 256-bit key) to standard output.
    NewKey {
        #[arg(long, default_value = "k1")]
        key_id: String,
    },
}

#[derive(Args)]
struct UpArgs {
    #[arg(long, default_value = "./davit-data")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:7700")]
    http: String,
    #[arg(long, default_value = "127.0.0.1:7701")]
    grpc: String,
    /// Embedded database: redb (default) or sled.
    #[arg(long, default_value = "redb")]
    storage: BackendKind,
    /// Executor of the embedded agent: auto (Docker when its socket answers, else shell), docker or shell.
    #[arg(long, default_value = "auto")]
    agent_executor: String,
    /// Concurrent jobs of the embedded agent.
    #[arg(long, default_value_t = 2)]
    agent_capacity: u32,
    /// Start without the embedded agent.
    #[arg(long)]
    no_agent: bool,
}

#[derive(Args, Clone)]
struct Connection {
    /// Any node's HTTP address.
    #[arg(long, env = "DAVIT_SERVER", default_value = "http://127.0.0.1:7700")]
    server: String,
    /// An API token or JWT (else --username/--password log in first).
    #[arg(long, env = "DAVIT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long, env = "DAVIT_USERNAME")]
    username: Option<String>,
    #[arg(long, env = "DAVIT_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// CA certificate to trust for an https:// server.
    #[arg(long, env = "DAVIT_CA_FILE")]
    ca_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Show leader, term, log indexes, members and replication.
    Status(Connection),
    /// Add a node as a learner (it copies the log; promote it after).
    Add {
        node_id: u64,
        #[arg(long)]
        grpc_addr: String,
        #[arg(long)]
        http_addr: String,
        #[arg(long, default_value = "default")]
        region: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Make learners voters.
    Promote {
        #[arg(required = true)]
        node_ids: Vec<u64>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Remove nodes from the cluster.
    Remove {
        #[arg(required = true)]
        node_ids: Vec<u64>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Hand leadership to another voter.
    TransferLeader {
        node_id: u64,
        #[command(flatten)]
        connection: Connection,
    },
    /// Build a snapshot now and compact the log.
    Snapshot(Connection),
    /// Make a CA and node certificates for a test cluster.
    Certs {
        #[arg(long)]
        out: PathBuf,
        /// ID=NAME[,NAME...], e.g. 1=127.0.0.1,localhost; repeat per node.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
    },
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    crate::observability::init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        TopCommand::Up(args) => up(args).await,
        TopCommand::Serve { config } => {
            let config = NodeConfig::load(&config)?;
            let server = serve(config).await?;
            eprintln!("davit node {} serving HTTP on {} and gRPC on {}", server.node.id(), server.http_addr, server.grpc_addr);
            report_credentials(&server).await;
            wait_for_shutdown().await;
            Ok(())
        }
        TopCommand::Cluster { command } => cluster(command).await,
        TopCommand::Audit { command: AuditCommand::Verify { data_dir, connection } } => audit_verify(data_dir, connection).await,
        TopCommand::Secrets { command: SecretsCommand::NewKey { key_id } } => {
            if key_id.is_empty() || key_id.contains([':', ' ']) {
                bail!("--key-id must be non-empty and contain no ':' or spaces");
            }
            print!("{}", crate::secrets::MasterKeys::generate_file_text(&key_id));
            Ok(())
        }
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;
    let config = NodeConfig {
        node_id: 1,
        region: "local".into(),
        http_addr: args.http.clone(),
        grpc_addr: args.grpc.clone(),
        data_dir,
        storage: args.storage,
        peers: Vec::new(),
        bootstrap: true,
        tls: None,
        master_key_file: None,
        generate_master_key: false,
        blob_store: None,
        raft: RaftTuning { election_timeout_min_ms: 150, election_timeout_max_ms: 300, heartbeat_interval_ms: 50, ..Default::default() },
        agents: Default::default(),
    };
    config.validate().map_err(anyhow::Error::msg)?;
    let server = serve(config).await?;
    let mut ready = server.node.raft.metrics();
    tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|m| m.current_leader.is_some()))
        .await
        .context("the single node did not elect itself within 10 s")??;
    println!("Davit is up.");
    println!("  dashboard and REST API: http://{}", server.http_addr);
    println!("  gRPC (agents, integrations): {}", server.grpc_addr);
    report_credentials(&server).await;
    let agent_shutdown = tokio_util::sync::CancellationToken::new();
    let agent = if args.no_agent {
        None
    } else {
        let runtime = embedded_agent(&server, &data_dir_of(&server), &args).await?;
        println!("  embedded agent: {} executor, {} concurrent jobs", runtime.executor_name(), args.agent_capacity);
        if runtime.executor_name() == "shell" {
            println!("    (Docker is not usable here, so builds run as plain processes; start Docker and restart to build in containers)");
        }
        println!("  outbound: this developer instance lets builds fetch from file:// and private/loopback addresses");
        Some(tokio::spawn(runtime.run(agent_shutdown.clone())))
    };
    println!("Stop with Ctrl-C; data stays in the data directory.");
    wait_for_shutdown().await;
    agent_shutdown.cancel();
    if let Some(agent) = agent {
        // Running jobs are given a moment; a job cut short is retried at the next start.
        let _ = tokio::time::timeout(Duration::from_secs(5), agent).await;
    }
    Ok(())
}

fn data_dir_of(server: &RunningServer) -> PathBuf {
    server.node.config.data_dir.clone()
}

/// The agent `davit up` runs in-process: registered once (its identity lives in
/// `<data_dir>/agent`), labelled for builds and every default environment.
async fn embedded_agent(server: &RunningServer, data_dir: &std::path::Path, args: &UpArgs) -> anyhow::Result<davit_agent::runtime::AgentRuntime> {
    use davit_agent::config::{AgentConfig, ExecutorChoice, Identity};
    let executor = match args.agent_executor.as_str() {
        "auto" => ExecutorChoice::Auto,
        "docker" => ExecutorChoice::Docker,
        "shell" => ExecutorChoice::Shell,
        other => anyhow::bail!("--agent-executor {other:?} must be auto, docker or shell"),
    };
    let config = AgentConfig {
        state_dir: data_dir.join("agent"),
        coordinators: vec![server.grpc_addr.to_string()],
        region: Some(server.node.config.region.clone()),
        capacity: args.agent_capacity.max(1),
        executor,
        git_protocols: vec!["https".into(), "ssh".into(), "git".into(), "file".into()],
        exit_when_drained: false,
        ..AgentConfig::default()
    };
    let identity = match Identity::load(&config.identity_path()) {
        Ok(identity) => identity,
        Err(_) => {
            let (_, token, _) =
                crate::api::agents::create_token(&server.node, &crate::node::Requester::system(), "davit up: embedded agent".into(), 600)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot create the embedded agent's registration token: {}", e.message))?;
            let labels = [("pool", "build"), ("environment", "development,testing,staging,production")]
                .into_iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect();
            davit_agent::runtime::register(&config, &token, "embedded", labels).await?
        }
    };
    davit_agent::runtime::AgentRuntime::new(config, identity).await
}

/// Print the first admin's credentials if this process created them, else where they are.
async fn report_credentials(server: &RunningServer) {
    let mut credentials = server.admin_credentials.clone();
    let created = tokio::time::timeout(Duration::from_secs(5), credentials.wait_for(|c| c.is_some())).await;
    match created {
        Ok(Ok(credentials)) => {
            let credentials = credentials.clone().expect("waited for Some");
            println!("  first admin: username {}  password {}", credentials.username, credentials.password);
            println!("  (shown once; also saved to {} with mode 0600)", server.credentials_file.display());
        }
        _ if server.credentials_file.exists() => {
            println!("  admin credentials were created at first start: see {}", server.credentials_file.display());
        }
        _ => {}
    }
}

async fn wait_for_shutdown() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl ApiClient {
    async fn connect(connection: &Connection) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(180));
        if let Some(ca_file) = &connection.ca_file {
            let pem = std::fs::read(ca_file).with_context(|| format!("cannot read {}", ca_file.display()))?;
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        let http = builder.build()?;
        let base = connection.server.trim_end_matches('/').to_string();
        let token = match (&connection.token, &connection.username, &connection.password) {
            (Some(token), _, _) => token.clone(),
            (None, Some(username), Some(password)) => {
                let response = http
                    .post(format!("{base}/api/v1/auth/login"))
                    .json(&serde_json::json!({ "username": username, "password": password }))
                    .send()
                    .await
                    .with_context(|| format!("cannot reach {base}"))?;
                let body: serde_json::Value = check(response).await?;
                body["token"].as_str().context("login response has no token")?.to_string()
            }
            _ => bail!("give --token (or DAVIT_TOKEN), or --username and --password (or DAVIT_USERNAME / DAVIT_PASSWORD)"),
        };
        Ok(Self { http, base, token })
    }

    async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let response = self.http.get(format!("{}{path}", self.base)).bearer_auth(&self.token).send().await?;
        check(response).await
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let response = self.http.post(format!("{}{path}", self.base)).bearer_auth(&self.token).json(&body).send().await?;
        check(response).await
    }
}

async fn check(response: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no error message");
        bail!("{status}: {message}");
    }
    Ok(body)
}

async fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    let (connection, path, body) = match command {
        ClusterCommand::Certs { out, nodes } => {
            let mut parsed = Vec::new();
            for node in nodes {
                let (id, names) = node.split_once('=').context("--node must be ID=NAME[,NAME...]")?;
                let id: u64 = id.parse().context("--node ID must be a number")?;
                parsed.push((id, names.split(',').map(str::to_string).collect()));
            }
            for path in crate::tls::generate_cluster_certs(&out, &parsed)? {
                println!("wrote {}", path.display());
            }
            return Ok(());
        }
        ClusterCommand::Status(connection) => {
            let client = ApiClient::connect(&connection).await?;
            let status = client.get("/api/v1/cluster/status").await?;
            println!("{}", serde_json::to_string_pretty(&status)?);
            return Ok(());
        }
        ClusterCommand::Add { node_id, grpc_addr, http_addr, region, connection } => {
            (connection, "add", serde_json::json!({ "node_id": node_id, "grpc_addr": grpc_addr, "http_addr": http_addr, "region": region }))
        }
        ClusterCommand::Promote { node_ids, connection } => (connection, "promote", serde_json::json!({ "node_ids": node_ids })),
        ClusterCommand::Remove { node_ids, connection } => (connection, "remove", serde_json::json!({ "node_ids": node_ids })),
        ClusterCommand::TransferLeader { node_id, connection } => {
            (connection, "transfer-leader", serde_json::json!({ "node_id": node_id }))
        }
        ClusterCommand::Snapshot(connection) => (connection, "snapshot", serde_json::json!({})),
    };
    let client = ApiClient::connect(&connection).await?;
    let result = client.post(&format!("/api/v1/cluster/{path}"), body).await?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

async fn audit_verify(data_dir: Option<PathBuf>, connection: Connection) -> anyhow::Result<()> {
    let verification: crate::api::audit::AuditVerification = match data_dir {
        Some(data_dir) => {
            let store = data_dir.join("store");
            let kind = if store.join("state.sled").exists() { BackendKind::Sled } else { BackendKind::Redb };
            if !store.exists() {
                bail!("{} holds no davit store (expected {}/store)", data_dir.display(), data_dir.display());
            }
            let backend = crate::store::open_backend(kind, &store)
                .with_context(|| format!("cannot open the store in {}; stop the node first, or use --server", store.display()))?;
            crate::api::audit::verify_chain(backend.as_ref())?
        }
        None => serde_json::from_value(ApiClient::connect(&connection).await?.get("/api/v1/audit-logs/verify").await?)?,
    };
    if verification.ok {
        println!("audit log intact: {} entries checked", verification.entries_checked);
        Ok(())
    } else {
        println!(
            "audit log TAMPERED: entry {} — {}",
            verification.first_bad_entry.unwrap_or(0),
            verification.problem.clone().unwrap_or_default()
        );
        std::process::exit(1);
    }
}
