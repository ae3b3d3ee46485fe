//! The `davit` command: `up` (all-in-one single node), `serve --config`, and the commands
//! people type every day (`login`, `pipelines`, `runs`, `deploy`, `logs`, `artifacts`,
//! `config`, `agents`, `cluster`), which talk to any node's REST API through one [`ApiClient`].
//! Flow: `davit <command> -> ApiClient -> REST /api/v1 -> (the server's handlers)`. Nothing here
//! decides anything the server decides; exit statuses are in [`failure`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

mod artifacts;
mod config;
pub mod credentials;
mod deployments;
pub mod failure;
mod login;
mod logs;
pub(crate) mod progress;

use crate::config::{NodeConfig, RaftTuning};
use crate::server::{RunningServer, serve};
use crate::store::BackendKind;

#[derive(Parser)]
#[command(
    name = "davit",
    version,
    about = "Davit: self-hosted builds and deployments on your own VM fleet",
    after_help = failure::EXIT_STATUS_HELP
)]
pub struct Cli {
    /// Print the API's JSON instead of tables and summaries (when following: one JSON object
    /// per line).
    #[arg(long, global = true)]
    json: bool,
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
    /// Log in to a Davit server and save the token (mode 0600) for the other commands.
    Login(login::LoginArgs),
    /// Forget the saved login.
    Logout,
    /// The pipelines, with their repository, branch, environment and strategy.
    Pipelines {
        #[command(flatten)]
        connection: Connection,
    },
    /// Runs (deployments) of every pipeline or one, newest last.
    Runs(deployments::RunsArgs),
    /// Start a run of a pipeline in its own environment: a branch's current head (default the
    /// pipeline's branch) or a commit.
    #[command(after_help = progress::EXIT_STATUS_HELP)]
    Run(deployments::RunArgs),
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
    /// The agent fleet: list, inspect and deregister agents; registration tokens. `davit agents`
    /// alone lists them.
    Agents(AgentsArgs),
    /// A deployment's jobs, with each step's state and duration.
    Jobs {
        /// The deployment's id.
        deployment_id: u64,
        #[command(flatten)]
        connection: Connection,
    },
    /// Deploy a pipeline (by id or name): the current head of a branch (`--branch`, read from
    /// the repository now; default the pipeline's branch) or a given commit (`--commit`), to
    /// the pipeline's environment or `--env`. With `--follow`, show its progress until it ends.
    #[command(after_help = progress::EXIT_STATUS_HELP)]
    Deploy(deployments::DeployArgs),
    /// Roll a deployment back: deploy again the last good release before it.
    #[command(after_help = progress::EXIT_STATUS_HELP)]
    Rollback {
        /// The deployment to undo.
        deployment_id: u64,
        /// Follow the rollback's progress until it ends; the exit status says how it ended.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Approve a deployment waiting for approvals (not your own, unless you are an admin).
    Approve {
        deployment_id: u64,
        #[command(flatten)]
        connection: Connection,
    },
    /// A run's log lines; `-f` follows them live until the run ends.
    #[command(after_help = progress::EXIT_STATUS_HELP)]
    Logs(logs::LogsArgs),
    /// Artifacts: list them, download one, upload a file or a directory.
    Artifacts {
        #[command(subcommand)]
        command: artifacts::ArtifactsCommand,
    },
    /// Configuration variables of an environment (secrets always shown masked).
    Config {
        #[command(subcommand)]
        command: config::ConfigCommand,
    },
    /// Deployments: their progress events.
    Deployments {
        #[command(subcommand)]
        command: DeploymentsCommand,
    },
    /// Print a shell completion script, e.g. `davit completions bash > /etc/bash_completion.d/davit`.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum DeploymentsCommand {
    /// A deployment's progress events (host started, healthy, switched, weight changed,
    /// verdicts, its end), oldest first.
    #[command(after_help = progress::EXIT_STATUS_HELP)]
    Events {
        /// The deployment's id.
        deployment_id: u64,
        /// Keep showing new events until the deployment ends; the exit status says how it ended.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        connection: Connection,
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
    /// An agent silent this long is lost and its jobs are retried elsewhere.
    #[arg(long, default_value_t = 60)]
    lost_after_seconds: u64,
    /// The external URL of this node (e.g. a tunnel's https URL), for the webhook URL given when
    /// a repository is connected and the links of commit statuses. Default: http://<--http>.
    #[arg(long, env = "DAVIT_PUBLIC_URL")]
    public_url: Option<String>,
    /// How often repositories without a webhook secret are polled for new commits, in seconds
    /// (0: only those that set their own interval).
    #[arg(long, default_value_t = 60)]
    poll_interval_seconds: u64,
}

/// Where an API command sends its requests and with which token: each from its flag, else its
/// environment variable, else the login `davit login` saved (see [`credentials`]).
#[derive(Args, Clone, Default)]
struct Connection {
    /// Any node's URL [default: the saved login's, else http://127.0.0.1:7700; DAVIT_SERVER is
    /// read too].
    #[arg(long, visible_alias = "url", env = "DAVIT_URL")]
    server: Option<String>,
    /// An API token or JWT [default: the saved login's] (or --username/--password log in first).
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
    let json = cli.json;
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
        TopCommand::Cluster { command } => cluster(command, json).await,
        TopCommand::Audit { command: AuditCommand::Verify { data_dir, connection } } => audit_verify(data_dir, connection).await,
        TopCommand::Secrets { command: SecretsCommand::NewKey { key_id } } => {
            if key_id.is_empty() || key_id.contains([':', ' ']) {
                bail!("--key-id must be non-empty and contain no ':' or spaces");
            }
            print!("{}", crate::secrets::MasterKeys::generate_file_text(&key_id));
            Ok(())
        }
        TopCommand::Agents(args) => agents(args, json).await,
        TopCommand::Jobs { deployment_id, connection } => deployment_jobs(deployment_id, json, connection).await,
        TopCommand::Login(args) => login::login(args).await,
        TopCommand::Logout => login::logout().await,
        TopCommand::Pipelines { connection } => deployments::pipelines(&ApiClient::connect(&connection).await?, json).await,
        TopCommand::Runs(args) => deployments::runs(args, json).await,
        TopCommand::Run(args) => deployments::run(args, json).await,
        TopCommand::Deploy(args) => deployments::deploy(args, json).await,
        TopCommand::Rollback { deployment_id, follow, connection } => {
            deployments::rollback(&ApiClient::connect(&connection).await?, deployment_id, follow, json).await
        }
        TopCommand::Approve { deployment_id, connection } => {
            deployments::approve(&ApiClient::connect(&connection).await?, deployment_id, json).await
        }
        TopCommand::Logs(args) => logs::logs(args, json).await,
        TopCommand::Artifacts { command } => artifacts::artifacts(command, json).await,
        TopCommand::Config { command } => config::config(command, json).await,
        TopCommand::Completions { shell } => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "davit", &mut std::io::stdout());
            Ok(())
        }
        TopCommand::Deployments { command: DeploymentsCommand::Events { deployment_id, follow, connection } } => {
            let client = ApiClient::connect(&connection).await?;
            let output = progress::Output::choose(json);
            match progress::show_events(&client, deployment_id, follow, output).await? {
                Some(end) if follow => progress::finish(deployment_id, end, output),
                _ => Ok(()),
            }
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
        agents: crate::config::AgentSettings { lost_after_seconds: args.lost_after_seconds, ..Default::default() },
        retention: Default::default(),
        public_url: args.public_url.clone(),
        // A developer's own machine: their forge, their webhook receiver and their repositories
        // on disk are local, so `up` allows what `serve` refuses by default (and says so).
        outbound: crate::outbound::OutboundSettings { allow_private_networks: true, allow_file_urls: true, ..Default::default() },
        scm: crate::config::ScmSettings { poll_interval_seconds: args.poll_interval_seconds, ..Default::default() },
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
    if let Some(public_url) = &server.node.config.public_url {
        println!("  public URL (webhooks, commit status links): {public_url}");
    }
    println!(
        "  outbound: developer mode allows loopback, private and link-local addresses and file:// URLs for repositories, provider APIs and notifications (`davit serve` refuses them unless [outbound] allows them)"
    );
    report_credentials(&server).await;
    let agent_shutdown = tokio_util::sync::CancellationToken::new();
    let agent = if args.no_agent {
        None
    } else {
        let runtime = embedded_agent(&server, &data_dir_of(&server), &args).await?;
        println!("  embedded agent: {} executor, {} concurrent jobs", runtime.executor_name(), args.agent_capacity);
        if runtime.executor_name() == "shell" {
            println!("    (Docker is not usable here, so builds run as plain processes; start Docker and restart to build in containers)");
        } else {
            println!(
                "    it also deploys to the development environment and pull requests' previews here, on 127.0.0.1 at each pipeline's public_port"
            );
        }
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
/// `<data_dir>/agent`), in both pools: it builds, and it is the development environment's one
/// deploy host (its traffic switches listen on 127.0.0.1 only). Staging and production need
/// deploy agents of their own.
async fn embedded_agent(
    server: &RunningServer,
    data_dir: &std::path::Path,
    args: &UpArgs,
) -> anyhow::Result<davit_agent::runtime::AgentRuntime> {
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
        service_address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        ..AgentConfig::default()
    };
    let identity = match Identity::load(&config.identity_path()) {
        Ok(identity) => identity,
        Err(_) => {
            let (_, token, _) =
                crate::api::agents::create_token(&server.node, &crate::node::Requester::system(), "davit up: embedded agent".into(), 600)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot create the embedded agent's registration token: {}", e.message))?;
            // A developer's own machine: development, and the previews of pull requests.
            let labels = [("pool", "build,deploy"), ("environment", "development,preview")]
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

/// The one HTTP client of every API command: the resolved server, its token, and the hint to
/// give when that token is refused.
struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: String,
    /// Said after a 401 when the token came from the saved login.
    refused_token_hint: Option<String>,
}

impl ApiClient {
    /// The server and token from flags, then environment, then the saved login (see
    /// [`credentials`]); `--username`/`--password` log in first.
    async fn connect(connection: &Connection) -> anyhow::Result<Self> {
        let path = credentials::credentials_path()?;
        let saved = credentials::load(&path)?;
        let server_env = std::env::var("DAVIT_SERVER").ok().filter(|server| !server.is_empty());
        let base = credentials::choose_server(connection.server.as_deref(), server_env.as_deref(), saved.as_ref());
        // The saved login is only for the server it was issued by, with the CA given then.
        let saved_here = saved.as_ref().filter(|login| credentials::normalize_url(&login.url) == base);
        let ca_file = connection.ca_file.clone().or_else(|| saved_here.and_then(|login| login.ca_file.clone()));
        let http = http_client(ca_file.as_deref())?;
        let mut refused_token_hint = None;
        let token = match (&connection.token, &connection.username, &connection.password) {
            (Some(token), _, _) => token.clone(),
            (None, Some(username), Some(password)) => {
                log_in(&http, &base, username, password).await?["token"].as_str().context("login response has no token")?.to_string()
            }
            _ => {
                let login = credentials::saved_token_for(&base, saved.as_ref(), &path, std::time::SystemTime::now())?;
                refused_token_hint = Some(format!("the saved login was refused; run `davit login --url {base}` again"));
                login.token.clone()
            }
        };
        Ok(Self { http, base, token, refused_token_hint })
    }

    /// Send a request, telling an unreachable server (exit 5) from other failures.
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        request.send().await.map_err(|error| failure::send_failure(&self.base, error))
    }

    /// The JSON body of a successful response, else an error with the API's status, message
    /// and code (and what to do when the saved login was refused).
    async fn check(&self, response: reqwest::Response) -> anyhow::Result<serde_json::Value> {
        let unauthorized = response.status() == reqwest::StatusCode::UNAUTHORIZED;
        check(response).await.map_err(|error| match (&self.refused_token_hint, unauthorized) {
            (Some(hint), true) => error.context(hint.clone()),
            _ => error,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token)
    }

    async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let response = self.send(self.request(reqwest::Method::GET, path)).await?;
        self.check(response).await
    }

    /// Every item of a paged list (`{"items", "next_cursor"}`), following the cursors; `path`
    /// may carry a query already.
    async fn get_all(&self, path: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let separator = if path.contains('?') { '&' } else { '?' };
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page_path = match &cursor {
                Some(cursor) => format!("{path}{separator}limit=500&cursor={cursor}"),
                None => format!("{path}{separator}limit=500"),
            };
            let page = self.get(&page_path).await?;
            items.extend(page["items"].as_array().cloned().context("the server's list has no items")?);
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_string()),
                None => return Ok(items),
            }
        }
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let response = self.send(self.request(reqwest::Method::POST, path).json(&body)).await?;
        self.check(response).await
    }

    async fn delete(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let response = self.send(self.request(reqwest::Method::DELETE, path)).await?;
        self.check(response).await
    }
}

/// The HTTP client of the commands, trusting `ca_file` in addition to the system's roots.
fn http_client(ca_file: Option<&std::path::Path>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(180)).connect_timeout(Duration::from_secs(10));
    if let Some(ca_file) = ca_file {
        let pem = std::fs::read(ca_file).with_context(|| format!("cannot read {}", ca_file.display()))?;
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

/// `POST /api/v1/auth/login`: the answer (`token`, `expires_in`).
async fn log_in(http: &reqwest::Client, base: &str, username: &str, password: &str) -> anyhow::Result<serde_json::Value> {
    let response = http
        .post(format!("{base}/api/v1/auth/login"))
        .json(&serde_json::json!({ "username": username, "password": password }))
        .send()
        .await
        .map_err(|error| failure::send_failure(base, error))?;
    check(response).await
}

/// `POST /api/v1/auth/logout`: the server refuses `token` from now on.
async fn log_out(http: &reqwest::Client, base: &str, token: &str) -> anyhow::Result<()> {
    let response = http
        .post(format!("{base}/api/v1/auth/logout"))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|error| failure::send_failure(base, error))?;
    check(response).await.map(|_| ())
}

/// The JSON body of a successful response, else an error with the API's status, message and code.
async fn check(response: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no error message");
        match body["error"]["code"].as_str() {
            Some(code) => bail!("{status}: {message} (code {code})"),
            None => bail!("{status}: {message}"),
        }
    }
    Ok(body)
}

async fn cluster(command: ClusterCommand, json: bool) -> anyhow::Result<()> {
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
            if json {
                return print_json(&status);
            }
            let status: crate::node::ClusterStatus =
                serde_json::from_value(status).context("the server's cluster status is not in the expected shape")?;
            print_cluster_status(&status);
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

/// `davit cluster status` for people: this node's view, then one row per member.
fn print_cluster_status(status: &crate::node::ClusterStatus) {
    let leader = status.leader_id.map(|leader| format!("node {leader}")).unwrap_or_else(|| "none (election under way?)".into());
    let index = |index: Option<u64>| index.map(|index| index.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "Node {} is {}; leader {leader}; term {}; storage {}",
        status.node_id,
        status.state.to_lowercase(),
        status.term,
        status.storage
    );
    println!(
        "Log: last {}, committed {}, applied {}, snapshot {}, purged {}",
        index(status.last_log_index),
        index(status.commit_index),
        index(status.applied_index),
        index(status.snapshot_index),
        index(status.purged_index)
    );
    let rows = status
        .nodes
        .iter()
        .map(|(node_id, node)| {
            let role = if status.leader_id == Some(*node_id) {
                "leader"
            } else if status.voters.contains(node_id) {
                "voter"
            } else if status.learners.contains(node_id) {
                "learner"
            } else {
                "-"
            };
            let matched = status.replication.as_ref().and_then(|replication| replication.get(node_id).copied().flatten());
            vec![
                node_id.to_string(),
                role.to_string(),
                or_dash(node.region.clone()),
                node.http_addr.clone(),
                node.grpc_addr.clone(),
                index(matched),
            ]
        })
        .collect();
    print_table(&["ID", "ROLE", "REGION", "HTTP", "GRPC", "MATCHED"], rows, 0);
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

// ---------------------------------------------------------------------------------------------
// `davit agents ...` and `davit jobs`: the agent fleet and a deployment's jobs, over REST.

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentsArgs {
    #[command(subcommand)]
    command: Option<AgentsCommand>,
    /// With no subcommand: list the agents.
    #[command(flatten)]
    list: ListArgs,
}

#[derive(Args)]
struct ListArgs {
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// List the registered agents with their state, pool, region and running jobs.
    List(ListArgs),
    /// One agent: state, labels, executors, coordinator and running jobs.
    Show {
        agent_id: u64,
        #[command(flatten)]
        connection: Connection,
    },
    /// Deregister an agent (admin): its credential stops working and its running jobs are retried
    /// on other agents.
    Deregister {
        agent_id: u64,
        #[command(flatten)]
        connection: Connection,
    },
    /// Registration tokens, which hosts exchange for their own credential with `davit-agent register`.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a registration token (admin) and print the `davit-agent register` command to run on
    /// each agent host. The token is shown only this once.
    Create {
        /// What the token is for, e.g. "eu-west build fleet".
        #[arg(long)]
        description: Option<String>,
        /// How long the token can be used, e.g. 30m, 24h, 7d (1 minute to 365 days).
        #[arg(long, default_value = "24h", value_parser = parse_token_lifetime)]
        expires_in: Duration,
        /// The coordinators' gRPC address (host:port) agents connect to. The REST API cannot tell
        /// it, so by default it is the --server host with the --server port plus one (davit's
        /// usual layout: HTTP on 7700, gRPC on 7701); give it when your gRPC port differs.
        #[arg(long)]
        grpc_address: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// List the registration tokens (admin); the tokens themselves are never shown again.
    List(ListArgs),
    /// Revoke a registration token (admin); agents registered with it keep working.
    Revoke {
        token_id: u64,
        #[command(flatten)]
        connection: Connection,
    },
}

async fn agents(args: AgentsArgs, json: bool) -> anyhow::Result<()> {
    match args.command.unwrap_or(AgentsCommand::List(args.list)) {
        AgentsCommand::List(ListArgs { connection }) => {
            let list = ApiClient::connect(&connection).await?.get("/api/v1/agents").await?;
            if json {
                return print_json(&list);
            }
            let agents: Vec<crate::api::agents::AgentView> =
                serde_json::from_value(list["items"].clone()).context("the server's agent list is not in the expected shape")?;
            if agents.is_empty() {
                println!("No agents are registered. Create a registration token with `davit agents token create`.");
                return Ok(());
            }
            let rows = agents
                .iter()
                .map(|agent| {
                    vec![
                        agent.agent_id.to_string(),
                        agent.name.clone(),
                        agent.state.clone(),
                        label_or_dash(&agent.labels, "pool"),
                        label_or_dash(&agent.labels, "region"),
                        or_dash(agent.executors.join(",")),
                        format!("{}/{}", agent.running_jobs.len(), agent.capacity),
                        agent.connected_at.as_deref().map(relative_time).unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(&["ID", "NAME", "STATE", "POOL", "REGION", "EXECUTORS", "JOBS", "CONNECTED"], rows, 0);
            Ok(())
        }
        AgentsCommand::Show { agent_id, connection } => {
            let agent = ApiClient::connect(&connection).await?.get(&format!("/api/v1/agents/{agent_id}")).await?;
            if json {
                return print_json(&agent);
            }
            let agent: crate::api::agents::AgentView =
                serde_json::from_value(agent).context("the server's agent is not in the expected shape")?;
            print_agent(&agent);
            Ok(())
        }
        AgentsCommand::Deregister { agent_id, connection } => {
            ApiClient::connect(&connection).await?.delete(&format!("/api/v1/agents/{agent_id}")).await?;
            println!("Deregistered agent {agent_id}: its credential no longer works, and its running jobs are retried on other agents.");
            Ok(())
        }
        AgentsCommand::Token { command } => registration_tokens(command, json).await,
    }
}

fn print_agent(agent: &crate::api::agents::AgentView) {
    let labels = agent.labels.iter().map(|(key, value)| format!("{key}={value}")).collect::<Vec<_>>().join(" ");
    let mut fields = vec![
        ("state", agent.state.clone()),
        ("version", or_dash(agent.version.clone())),
        ("executors", or_dash(agent.executors.join(", "))),
        ("capacity", format!("{} concurrent jobs", agent.capacity)),
        ("labels", or_dash(labels)),
        ("coordinator", agent.node_id.map(|node_id| format!("node {node_id}")).unwrap_or_else(|| "-".into())),
        ("registered", format!("{} ({})", agent.registered_at, relative_time(&agent.registered_at))),
        ("connected", agent.connected_at.as_deref().map(|at| format!("{at} ({})", relative_time(at))).unwrap_or_else(|| "-".into())),
    ];
    if let Some(reason) = &agent.state_reason {
        fields.insert(1, ("reason", reason.clone()));
    }
    println!("Agent {} ({})", agent.agent_id, agent.name);
    for (name, value) in fields {
        println!("  {name:<13} {value}");
    }
    if agent.running_jobs.is_empty() {
        println!("  {:<13} none", "running jobs");
    } else {
        println!("  running jobs:");
        let rows = agent
            .running_jobs
            .iter()
            .map(|job| vec![job.job_id.to_string(), job.deployment_id.to_string(), job.attempt.to_string()])
            .collect();
        print_table(&["JOB", "DEPLOYMENT", "ATTEMPT"], rows, 4);
    }
}

async fn registration_tokens(command: TokenCommand, json: bool) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { description, expires_in, grpc_address, connection } => {
            let client = ApiClient::connect(&connection).await?;
            let derived = grpc_address.is_none();
            let grpc_address = match grpc_address {
                Some(address) => address,
                None => grpc_address_of(&client.base)?,
            };
            let body = serde_json::json!({ "description": description, "expires_in_seconds": expires_in.as_secs() });
            let created = client.post("/api/v1/agents/registration-tokens", body).await?;
            if json {
                return print_json(&created);
            }
            let token = created["token"].as_str().context("the server's answer has no token")?;
            let expires_at = created["expires_at"].as_str().unwrap_or("-");
            println!("Created registration token {} (expires {expires_at}, {}).", created["token_id"], relative_time(expires_at));
            println!("It is shown only this once:");
            println!();
            println!("    {token}");
            println!();
            println!("On each agent host, run:");
            println!();
            println!("    davit-agent register --coordinator {grpc_address} --token {token}");
            println!();
            if derived {
                println!(
                    "The coordinator address is the --server host with its port plus one; pass --grpc-address if gRPC listens elsewhere."
                );
            }
            if client.base.starts_with("https://") {
                println!("The coordinators use TLS: set ca_file in the agent's config (e.g. /etc/davit/agent.toml) before registering.");
            }
            Ok(())
        }
        TokenCommand::List(ListArgs { connection }) => {
            let list = ApiClient::connect(&connection).await?.get("/api/v1/agents/registration-tokens").await?;
            if json {
                return print_json(&list);
            }
            let tokens = list["items"].as_array().cloned().unwrap_or_default();
            if tokens.is_empty() {
                println!("No registration tokens. Create one with `davit agents token create`.");
                return Ok(());
            }
            let now = std::time::SystemTime::now();
            let rows = tokens
                .iter()
                .map(|token| {
                    let expires_at = token["expires_at"].as_str().unwrap_or_default();
                    let expired = humantime::parse_rfc3339(expires_at).is_ok_and(|expires_at| expires_at <= now);
                    let state = if token["revoked"].as_bool() == Some(true) {
                        "revoked"
                    } else if expired {
                        "expired"
                    } else {
                        "active"
                    };
                    vec![
                        token["token_id"].to_string(),
                        or_dash(token["description"].as_str().unwrap_or_default().to_string()),
                        state.to_string(),
                        relative_time(token["created_at"].as_str().unwrap_or_default()),
                        relative_time(expires_at),
                        token["agents_registered"].to_string(),
                    ]
                })
                .collect();
            print_table(&["ID", "DESCRIPTION", "STATE", "CREATED", "EXPIRES", "AGENTS"], rows, 0);
            Ok(())
        }
        TokenCommand::Revoke { token_id, connection } => {
            ApiClient::connect(&connection).await?.delete(&format!("/api/v1/agents/registration-tokens/{token_id}")).await?;
            println!("Revoked registration token {token_id}; agents registered with it keep working.");
            Ok(())
        }
    }
}

/// `--expires-in`: a humantime duration within what the API accepts, so that a wrong value is a
/// usage error (exit 2) that names the flag rather than the API's field.
fn parse_token_lifetime(text: &str) -> Result<Duration, String> {
    let lifetime = humantime::parse_duration(text).map_err(|error| format!("{error} (use e.g. 30m, 24h or 7d)"))?;
    if !(Duration::from_secs(60)..=Duration::from_secs(31_536_000)).contains(&lifetime) {
        return Err("a registration token must live between 1m and 365d".into());
    }
    Ok(lifetime)
}

/// The gRPC address agents should use when only the REST address is known: same host, port
/// plus one (`davit up` and the shipped configs put gRPC right after HTTP).
fn grpc_address_of(server: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(server).with_context(|| format!("--server {server:?} is not a URL like http://127.0.0.1:7700"))?;
    let host = url.host_str().with_context(|| format!("--server {server:?} has no host"))?;
    let port = url.port_or_known_default().with_context(|| format!("--server {server:?} has no port"))?;
    let grpc_port = port.checked_add(1).with_context(|| format!("--server port {port} has no next port; give --grpc-address"))?;
    Ok(format!("{host}:{grpc_port}"))
}

async fn deployment_jobs(deployment_id: u64, json: bool, connection: Connection) -> anyhow::Result<()> {
    let list = ApiClient::connect(&connection).await?.get(&format!("/api/v1/deployments/{deployment_id}/jobs")).await?;
    if json {
        return print_json(&list);
    }
    let jobs: Vec<crate::api::agents::JobView> =
        serde_json::from_value(list["items"].clone()).context("the server's job list is not in the expected shape")?;
    if jobs.is_empty() {
        println!("Deployment {deployment_id} has no jobs.");
        return Ok(());
    }
    for (position, job) in jobs.iter().enumerate() {
        if position > 0 {
            println!();
        }
        let agent = job.agent_id.map(|agent_id| format!("  agent {agent_id}")).unwrap_or_default();
        println!("Job {}  {}  {}  attempt {}/{}{agent}", job.job_id, job.name, job.status, job.attempt, job.max_attempts);
        if let Some(reason) = &job.failure_reason {
            println!("  reason: {reason}");
        }
        if job.steps.is_empty() {
            println!("  (no steps)");
            continue;
        }
        let rows = job
            .steps
            .iter()
            .map(|step| {
                vec![
                    step.index.to_string(),
                    step.name.clone(),
                    step.state.clone(),
                    step_duration(step),
                    step.exit_code.map(|code| code.to_string()).unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        print_table(&["STEP", "NAME", "STATE", "DURATION", "EXIT"], rows, 2);
    }
    Ok(())
}

/// A finished step's duration, or how long a running one has been going.
fn step_duration(step: &crate::api::agents::StepView) -> String {
    if let Some(duration_ms) = step.duration_ms {
        return compact_duration(Duration::from_millis(duration_ms.max(0) as u64));
    }
    let started_at = step.started_at.as_deref().and_then(|at| humantime::parse_rfc3339(at).ok());
    match started_at.and_then(|at| std::time::SystemTime::now().duration_since(at).ok()) {
        Some(elapsed) if step.finished_at.is_none() => format!("{} so far", compact_duration(Duration::from_secs(elapsed.as_secs()))),
        _ => "-".into(),
    }
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Columns padded to their widest cell, two spaces apart, no trailing spaces.
fn print_table(headers: &[&str], rows: Vec<Vec<String>>, indent: usize) {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let header_row = headers.iter().map(|header| header.to_string()).collect();
    for row in std::iter::once(header_row).chain(rows) {
        let mut line = " ".repeat(indent);
        for (column, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        println!("{}", line.trim_end());
    }
}

fn or_dash(text: String) -> String {
    if text.is_empty() { "-".into() } else { text }
}

fn label_or_dash(labels: &std::collections::BTreeMap<String, String>, key: &str) -> String {
    or_dash(labels.get(key).cloned().unwrap_or_default())
}

/// "5m03s ago" or "in 23h59m" for an RFC 3339 time from the API (the time itself if it does not parse).
fn relative_time(at: &str) -> String {
    let Ok(time) = humantime::parse_rfc3339(at) else {
        return or_dash(at.to_string());
    };
    let now = std::time::SystemTime::now();
    match now.duration_since(time) {
        Ok(age) if age.as_secs() == 0 => "just now".into(),
        Ok(age) => format!("{} ago", compact_duration(Duration::from_secs(age.as_secs()))),
        Err(ahead) => format!("in {}", compact_duration(Duration::from_secs(ahead.duration().as_secs().max(1)))),
    }
}

/// At most two units: 850ms, 12.3s, 4m05s, 2h07m, 3d04h.
fn compact_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        0 => format!("{}ms", duration.as_millis()),
        1..60 if duration.subsec_millis() == 0 => format!("{seconds}s"),
        1..60 => format!("{:.1}s", duration.as_secs_f64()),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        3600..86400 => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d{:02}h", seconds / 86400, seconds % 86400 / 3600),
    }
}

#[cfg(test)]
mod agent_command_tests {
    use super::*;

    #[test]
    fn grpc_address_is_the_server_port_plus_one() {
        assert_eq!(grpc_address_of("http://127.0.0.1:7700").unwrap(), "127.0.0.1:7701");
        assert_eq!(grpc_address_of("https://davit.example.com:8443/").unwrap(), "davit.example.com:8444");
        assert_eq!(grpc_address_of("https://davit.example.com").unwrap(), "davit.example.com:444");
        assert_eq!(grpc_address_of("http://[::1]:7700").unwrap(), "[::1]:7701");
        assert!(grpc_address_of("127.0.0.1:7700").is_err(), "a bare host:port is not a URL");
        assert!(grpc_address_of("not a url").is_err());
    }

    #[test]
    fn token_lifetimes_are_checked_before_asking_the_server() {
        assert_eq!(parse_token_lifetime("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert_eq!(parse_token_lifetime("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_token_lifetime("59s").unwrap_err().contains("between 1m and 365d"));
        assert!(parse_token_lifetime("366d").is_err());
        assert!(parse_token_lifetime("soon").unwrap_err().contains("24h"));
    }

    #[test]
    fn durations_are_compact() {
        assert_eq!(compact_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(compact_duration(Duration::from_millis(12_345)), "12.3s");
        assert_eq!(compact_duration(Duration::from_secs(12)), "12s");
        assert_eq!(compact_duration(Duration::from_secs(245)), "4m05s");
        assert_eq!(compact_duration(Duration::from_secs(2 * 3600 + 7 * 60 + 5)), "2h07m");
        assert_eq!(compact_duration(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d04h");
    }

    #[test]
    fn bare_agents_lists_and_subcommands_parse() {
        let cli = Cli::try_parse_from(["davit", "agents", "--json", "--token", "t"]).unwrap();
        assert!(cli.json && matches!(cli.command, TopCommand::Agents(AgentsArgs { command: None, .. })));
        let cli = Cli::try_parse_from(["davit", "agents", "token", "create", "--expires-in", "2h", "--token", "t"]).unwrap();
        let TopCommand::Agents(AgentsArgs {
            command: Some(AgentsCommand::Token { command: TokenCommand::Create { expires_in, .. } }), ..
        }) = cli.command
        else {
            panic!("not a token create");
        };
        assert_eq!(expires_in, Duration::from_secs(7200));
        assert!(Cli::try_parse_from(["davit", "agents", "show", "abc"]).is_err());
        assert!(Cli::try_parse_from(["davit", "jobs", "12", "--json"]).is_ok());
        let cli = Cli::try_parse_from(["davit", "deployments", "events", "12", "--follow", "--json"]).unwrap();
        assert!(cli.json);
        assert!(matches!(
            cli.command,
            TopCommand::Deployments { command: DeploymentsCommand::Events { deployment_id: 12, follow: true, .. } }
        ));
        assert!(Cli::try_parse_from(["davit", "deploy", "--pipeline", "1", "--commit", "abcd", "--follow"]).is_ok());
        assert!(Cli::try_parse_from(["davit", "deployments", "events", "x"]).is_err());
        // `--json` is global: before or after the subcommand.
        assert!(Cli::try_parse_from(["davit", "--json", "pipelines"]).unwrap().json);
        for command in [&["davit", "deploy", "--help"][..], &["davit", "deployments", "events", "--help"]] {
            let Err(help) = Cli::try_parse_from(command) else { panic!("--help is not a command") };
            let help = help.to_string();
            assert!(help.contains("0 the deployment succeeded; 3 it failed; 4 it was rolled back"), "{command:?}: {help}");
        }
    }

    #[test]
    fn everyday_commands_parse() {
        let parses = |args: &[&str]| Cli::try_parse_from(args).map(|_| ()).map_err(|error| error.to_string());
        for args in [
            &["davit", "login", "--url", "http://127.0.0.1:7700", "--username", "ada", "--password-stdin"][..],
            &["davit", "logout"],
            &["davit", "pipelines", "--json"],
            &["davit", "runs", "--pipeline", "web", "--status", "failed", "--limit", "5"],
            &["davit", "run", "web", "--branch", "main"],
            &["davit", "run", "3", "--commit", "abc123", "--follow"],
            &["davit", "deploy", "web", "--env", "staging", "--set", "replicas=3", "--set", "mode=fast", "--follow"],
            &["davit", "rollback", "12", "--follow"],
            &["davit", "approve", "12"],
            &["davit", "logs", "12", "-f", "--level", "ERROR"],
            &["davit", "artifacts", "ls", "--pipeline", "web"],
            &["davit", "artifacts", "pull", "4", "-o", "out.tar", "--raw"],
            &["davit", "artifacts", "push", "web", "dist", "--version", "v1"],
            &["davit", "config", "get", "staging"],
            &["davit", "config", "set", "staging", "a=1", "b=2"],
            &["davit", "cluster", "status", "--url", "http://127.0.0.1:7700"],
            &["davit", "completions", "zsh"],
        ] {
            assert_eq!(parses(args), Ok(()), "{args:?}");
        }
        let refused = |args: &[&str]| Cli::try_parse_from(args).err().map(|error| (error.exit_code(), error.to_string()));
        let (code, message) = refused(&["davit", "deploy", "web", "--set", "replicas"]).expect("a --set without '=' is refused");
        assert_eq!(code, 2);
        assert!(message.contains("--set replicas=3"), "{message}");
        assert!(refused(&["davit", "deploy", "web", "--pipeline", "web"]).is_some(), "one pipeline only");
        assert!(refused(&["davit", "deploy", "--commit", "abc"]).is_some(), "a pipeline is needed");
        assert!(refused(&["davit", "runs", "--status", "sideways"]).is_some());
        assert!(refused(&["davit", "logs", "1", "--level", "LOUD"]).is_some());
        assert!(refused(&["davit", "config", "set", "staging"]).is_some(), "at least one variable");
        assert!(refused(&["davit", "completions", "tcsh"]).is_some());
    }
}
