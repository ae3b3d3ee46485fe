//! `replicated-writes`: a closed-loop load generator that measures durable, replicated writes
//! per second and their latency on real Davit clusters (`davit serve`) and, in the same run on
//! the same machine, on real etcd clusters, driven by the same Rust gRPC client stack.
//!
//! Every measured point gets a fresh cluster in a fresh temporary directory, started here and
//! killed here (on drop, so also on error or Ctrl-C). It never talks to anything but 127.0.0.1,
//! and every load loop is bounded both in time and in count.

mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::{Parser, ValueEnum};
use davit_benches::harness::{
    Machine, ResultsSection, STARTUP_TIMEOUT, ServerProcess, davit_source, free_addresses, log_tail, milliseconds, parse_prometheus,
    process_cpu_seconds, quoted_arguments,
};
use davit_proto::api::config_service_client::ConfigServiceClient;
use davit_proto::api::{ConfigEntry, SetConfigRequest};
use etcdserverpb::kv_client::KvClient;
use etcdserverpb::maintenance_client::MaintenanceClient;
use etcdserverpb::{PutRequest, StatusRequest};
use rand::{Rng, RngCore};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

/// How long one write may take before it counts as failed. It bounds the run's length even if
/// a cluster stops answering.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

const RESULTS: ResultsSection = ResultsSection { benchmark: "replicated-writes", heading: "## Replicated writes" };

/// The comparison point the target is stated for.
const TARGET_NODES: usize = 3;
const TARGET_CLIENTS: usize = 64;
const TARGET_THROUGHPUT_RATIO: f64 = 1.5;

#[derive(Parser, Debug)]
#[command(about = "Replicated-write throughput and latency: Davit (redb and sled) beside etcd, on fresh local clusters")]
struct Arguments {
    /// The `davit` binary (build it with `cargo build --release -p davit-coordinator`).
    #[arg(long, default_value = "/var/cache/davit-target/release/davit")]
    davit_binary: PathBuf,
    /// The `etcd` server binary (Debian: `apt-get install etcd-server`).
    #[arg(long, default_value = "etcd")]
    etcd_binary: PathBuf,
    /// Systems to measure, in the order they run at each point.
    #[arg(long, value_delimiter = ',', default_value = "etcd,davit-redb,davit-sled")]
    systems: Vec<SystemKind>,
    /// Cluster sizes (voting members on 127.0.0.1).
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    nodes: Vec<usize>,
    /// Concurrent closed-loop clients; each has its own connection and waits for one write's
    /// answer before it sends the next.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Length of the measured window of each point.
    #[arg(long, default_value_t = 10)]
    duration_seconds: u64,
    /// Writes before the measured window (connections, caches, the first log pages).
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    /// Size of each written value (random ASCII letters and digits).
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Hard cap on writes per point, warm-up included, so a point is bounded in count too.
    #[arg(long, default_value_t = 3_000_000)]
    max_writes_per_point: u64,
    /// Write the report into this markdown file's "## Replicated writes" section.
    #[arg(long)]
    results_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SystemKind {
    Etcd,
    DavitRedb,
    DavitSled,
}

impl SystemKind {
    fn name(self) -> &'static str {
        match self {
            SystemKind::Etcd => "etcd",
            SystemKind::DavitRedb => "davit-redb",
            SystemKind::DavitSled => "davit-sled",
        }
    }

    fn davit_storage(self) -> Option<&'static str> {
        match self {
            SystemKind::Etcd => None,
            SystemKind::DavitRedb => Some("redb"),
            SystemKind::DavitSled => Some("sled"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    davit_benches::harness::run_until_interrupted(run(Arguments::parse())).await
}

async fn run(arguments: Arguments) -> anyhow::Result<()> {
    if arguments.nodes.is_empty() || arguments.clients.is_empty() || arguments.systems.is_empty() {
        bail!("--nodes, --clients and --systems must each name at least one value");
    }
    if arguments.nodes.contains(&0) || arguments.clients.contains(&0) {
        bail!("--nodes and --clients must be 1 or more");
    }
    if arguments.systems.iter().any(|system| system.davit_storage().is_some()) && !arguments.davit_binary.is_file() {
        bail!(
            "davit binary {} not found; build it with `cargo build --release -p davit-coordinator` or pass --davit-binary",
            arguments.davit_binary.display()
        );
    }
    let etcd_version = if arguments.systems.contains(&SystemKind::Etcd) { Some(etcd_version(&arguments.etcd_binary)?) } else { None };
    let machine = Machine::describe()?;
    eprintln!("{}", machine.render());

    let mut results = Vec::new();
    // Systems alternate inside each (nodes, clients) point, so a disturbance on the machine
    // (another build, a noisy disk) hits them alike rather than one system's whole series.
    for &nodes in &arguments.nodes {
        for &clients in &arguments.clients {
            for &system in &arguments.systems {
                eprintln!("== {} with {nodes} node(s), {clients} client(s)", system.name());
                let result = run_point(&arguments, system, nodes, clients)
                    .await
                    .with_context(|| format!("{} with {nodes} node(s) and {clients} client(s)", system.name()))?;
                eprintln!("   {}", result.summary());
                results.push(result);
            }
        }
    }

    let report = Report { arguments: &arguments, machine: &machine, etcd_version: etcd_version.as_deref(), results: &results };
    let markdown = report.render();
    println!("{markdown}");
    if let Some(path) = &arguments.results_file {
        RESULTS.write(path, &markdown)?;
    }
    Ok(())
}

fn etcd_version(binary: &Path) -> anyhow::Result<String> {
    let output = Command::new(binary).arg("--version").output().with_context(|| {
        format!("cannot run {} --version; install etcd (apt-get install etcd-server) or pass --etcd-binary", binary.display())
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.lines().next().unwrap_or("").trim().trim_start_matches("etcd Version:").trim().to_string();
    if version.is_empty() {
        bail!("{} --version printed nothing", binary.display());
    }
    // Debian's package revision says which patches the binary carries.
    let package = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "etcd-server"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string());
    Ok(match package {
        Some(package) if !package.is_empty() => format!("{version} (Debian package etcd-server {package}, `{}`)", binary.display()),
        _ => format!("{version} (`{}`)", binary.display()),
    })
}

// ---------------------------------------------------------------------------------------------
// One measured point
// ---------------------------------------------------------------------------------------------

struct PointResult {
    system: SystemKind,
    nodes: usize,
    clients: usize,
    measured_seconds: f64,
    /// Sorted latencies of the writes that completed inside the measured window.
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
    hit_write_cap: bool,
    /// CPU time of all server processes, as a share of one core, over the measured window.
    server_cpu_percent: f64,
    /// The same for this load generator.
    load_generator_cpu_percent: f64,
    davit_internals: Option<DavitInternals>,
}

impl PointResult {
    fn writes_per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.measured_seconds
    }

    fn percentile(&self, fraction: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        // Nearest-rank: the smallest latency that at least `fraction` of writes do not exceed.
        let rank = ((fraction * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1]
    }

    fn max(&self) -> Duration {
        self.latencies.last().copied().unwrap_or(Duration::ZERO)
    }

    fn summary(&self) -> String {
        let mut line = format!(
            "{:.0} writes/s, p50 {} ms, p99 {} ms, max {} ms, {} errors, server CPU {:.0}%, load generator CPU {:.0}%",
            self.writes_per_second(),
            milliseconds(self.percentile(0.50)),
            milliseconds(self.percentile(0.99)),
            milliseconds(self.max()),
            self.errors,
            self.server_cpu_percent,
            self.load_generator_cpu_percent,
        );
        if let Some(error) = &self.first_error {
            let _ = write!(line, " (first error: {error})");
        }
        if self.hit_write_cap {
            line.push_str(" (hit --max-writes-per-point before the window ended)");
        }
        line
    }
}

async fn run_point(arguments: &Arguments, system: SystemKind, nodes: usize, clients: usize) -> anyhow::Result<PointResult> {
    let directory = tempfile::Builder::new().prefix("davit-bench-").tempdir().context("cannot create a temporary directory")?;
    let cluster = match system.davit_storage() {
        Some(storage) => Cluster::start_davit(&arguments.davit_binary, storage, nodes, directory).await?,
        None => Cluster::start_etcd(&arguments.etcd_binary, nodes, directory).await?,
    };

    let mut writers = Vec::with_capacity(clients);
    for _ in 0..clients {
        writers.push(cluster.connect_writer().await?);
    }

    let warmup = Duration::from_secs(arguments.warmup_seconds);
    let duration = Duration::from_secs(arguments.duration_seconds.max(1));
    let started = Instant::now();
    let plan = Arc::new(LoadPlan {
        window_start: started + warmup,
        window_end: started + warmup + duration,
        value_bytes: arguments.value_bytes,
        max_writes: arguments.max_writes_per_point,
        issued: AtomicU64::new(0),
    });
    let tasks: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(client_index, writer)| tokio::spawn(client_loop(writer, client_index, plan.clone())))
        .collect();

    tokio::time::sleep_until(plan.window_start.into()).await;
    let cpu_before = cluster.cpu_seconds();
    let self_cpu_before = process_cpu_seconds("self");
    let metrics_before = cluster.scrape_davit_metrics().await;
    let window_started = Instant::now();

    tokio::time::sleep_until(plan.window_end.into()).await;
    let window_seconds = window_started.elapsed().as_secs_f64();
    let cpu_after = cluster.cpu_seconds();
    let self_cpu_after = process_cpu_seconds("self");
    let metrics_after = cluster.scrape_davit_metrics().await;

    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let outcome = task.await.context("a client task panicked")?;
        latencies.extend(outcome.latencies);
        errors += outcome.errors;
        if first_error.is_none() {
            first_error = outcome.first_error;
        }
    }
    latencies.sort_unstable();
    let davit_internals = match (metrics_before, metrics_after) {
        (Some(before), Some(after)) => Some(DavitInternals::between(&before, &after, cluster.leader_index, duration.as_secs_f64())),
        _ => None,
    };
    drop(cluster);

    Ok(PointResult {
        system,
        nodes,
        clients,
        measured_seconds: duration.as_secs_f64(),
        latencies,
        errors,
        first_error,
        hit_write_cap: plan.issued.load(Ordering::Relaxed) >= plan.max_writes,
        server_cpu_percent: 100.0 * (cpu_after - cpu_before) / window_seconds,
        load_generator_cpu_percent: 100.0 * (self_cpu_after - self_cpu_before) / window_seconds,
        davit_internals,
    })
}

struct LoadPlan {
    window_start: Instant,
    window_end: Instant,
    value_bytes: usize,
    max_writes: u64,
    /// Writes started by all clients so far, for the count bound.
    issued: AtomicU64,
}

#[derive(Default)]
struct ClientOutcome {
    latencies: Vec<Duration>,
    errors: u64,
    first_error: Option<String>,
}

/// One closed-loop client: write, wait for the answer, write again, until the window ends.
/// A write counts when it completes inside the measured window, so throughput is writes
/// completed per second of window, and the writes cut off at either edge are left out.
async fn client_loop(mut writer: Writer, client_index: usize, plan: Arc<LoadPlan>) -> ClientOutcome {
    let mut outcome = ClientOutcome::default();
    let mut sequence: u64 = 0;
    while Instant::now() < plan.window_end && plan.issued.fetch_add(1, Ordering::Relaxed) < plan.max_writes {
        let key = format!("bench-{client_index}-{sequence}");
        sequence += 1;
        let value = random_value(plan.value_bytes);
        let write_started = Instant::now();
        let result = tokio::time::timeout(REQUEST_TIMEOUT, writer.write(key, value)).await;
        let write_finished = Instant::now();
        let in_window = write_finished >= plan.window_start && write_finished <= plan.window_end;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(status)) => Some(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Some(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())),
        };
        match error {
            None if in_window => outcome.latencies.push(write_finished - write_started),
            None => {}
            Some(error) => {
                if in_window {
                    outcome.errors += 1;
                }
                outcome.first_error.get_or_insert(error);
                // A failing cluster answers fast; do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    outcome
}

fn random_value(length: usize) -> String {
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(length).map(char::from).collect()
}

/// A client connection to the leader of one system, and how to write one key to it.
enum Writer {
    Davit { client: ConfigServiceClient<Channel>, authorization: MetadataValue<Ascii> },
    Etcd { client: KvClient<Channel> },
}

impl Writer {
    async fn write(&mut self, key: String, value: String) -> Result<(), tonic::Status> {
        match self {
            Writer::Davit { client, authorization } => {
                let mut request = tonic::Request::new(SetConfigRequest {
                    environment: "bench".into(),
                    pipeline_id: 0,
                    entries: vec![ConfigEntry { key, value, is_secret: false }],
                });
                request.metadata_mut().insert("authorization", authorization.clone());
                let response = client.set_config(request).await?.into_inner();
                if response.written != 1 {
                    return Err(tonic::Status::internal(format!("davit wrote {} entries instead of 1", response.written)));
                }
                Ok(())
            }
            Writer::Etcd { client } => {
                let request = PutRequest { key: key.into_bytes(), value: value.into_bytes(), ..Default::default() };
                client.put(request).await?;
                Ok(())
            }
        }
    }
}

async fn connect(grpc_addr: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{grpc_addr}"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {grpc_addr}"))
}

// ---------------------------------------------------------------------------------------------
// Clusters: starting, finding the leader, stopping
// ---------------------------------------------------------------------------------------------

/// Davit-only state: the token writes carry and where to scrape metrics.
struct DavitAccess {
    authorization: MetadataValue<Ascii>,
    http_addrs: Vec<String>,
    http: reqwest::Client,
}

struct Cluster {
    // Field order matters: the processes are killed before their directory is deleted.
    processes: Vec<ServerProcess>,
    leader_grpc_addr: String,
    leader_index: usize,
    davit: Option<DavitAccess>,
    _directory: tempfile::TempDir,
}

impl Cluster {
    async fn start_davit(binary: &Path, storage: &str, nodes: usize, directory: tempfile::TempDir) -> anyhow::Result<Cluster> {
        let addresses = free_addresses(2 * nodes)?;
        let http_addrs: Vec<String> = addresses[..nodes].to_vec();
        let grpc_addrs: Vec<String> = addresses[nodes..].to_vec();
        let mut peers = String::new();
        if nodes > 1 {
            for index in 0..nodes {
                let _ = write!(
                    peers,
                    "\n[[peers]]\nnode_id = {}\ngrpc_addr = \"{}\"\nhttp_addr = \"{}\"\nregion = \"local\"\n",
                    index + 1,
                    grpc_addrs[index],
                    http_addrs[index]
                );
            }
        }
        // Every node of a cluster needs the same secrets master key and one blob directory
        // they all see; on one machine a directory beside the configs is truly shared.
        let mut master_key = [0u8; 32];
        rand::rng().fill_bytes(&mut master_key);
        std::fs::write(directory.path().join("master.key"), format!("bench {}\n", BASE64.encode(master_key)))?;
        let mut processes = Vec::with_capacity(nodes);
        for index in 0..nodes {
            let node_id = index + 1;
            let config = format!(
                "node_id = {node_id}\nregion = \"local\"\nhttp_addr = \"{}\"\ngrpc_addr = \"{}\"\ndata_dir = \"node-{node_id}\"\n\
                 storage = \"{storage}\"\nmaster_key_file = \"master.key\"\n\n\
                 [blob_store]\nkind = \"dir\"\npath = \"blobs\"\nshared = true\n{peers}",
                http_addrs[index], grpc_addrs[index]
            );
            let config_path = directory.path().join(format!("node-{node_id}.toml"));
            std::fs::write(&config_path, config)?;
            let mut command = Command::new(binary);
            command.arg("serve").arg("--config").arg(&config_path);
            processes.push(ServerProcess::spawn(
                format!("davit node {node_id}"),
                command,
                directory.path().join(format!("node-{node_id}.log")),
            )?);
        }

        // 127.0.0.1 only; a proxy from the environment must not be asked.
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build()?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        for (index, http_addr) in http_addrs.iter().enumerate() {
            loop {
                processes[index].check_running()?;
                match http.get(format!("http://{http_addr}/readyz")).send().await {
                    Ok(response) if response.status().is_success() => break,
                    _ if Instant::now() > deadline => bail!(
                        "davit node {} was not ready within {} s; the end of its log:\n{}",
                        index + 1,
                        STARTUP_TIMEOUT.as_secs(),
                        log_tail(&processes[index].log_path)
                    ),
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }

        // The leader that initialized the cluster wrote the first admin's credentials.
        let credentials_paths: Vec<PathBuf> =
            (1..=nodes).map(|node_id| directory.path().join(format!("node-{node_id}/initial-admin.json"))).collect();
        let credentials: serde_json::Value = loop {
            if let Some(text) = credentials_paths.iter().find_map(|path| std::fs::read_to_string(path).ok())
                && let Ok(value) = serde_json::from_str(&text)
            {
                break value;
            }
            if Instant::now() > deadline {
                bail!("no node wrote initial-admin.json within {} s", STARTUP_TIMEOUT.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let login: serde_json::Value = http
            .post(format!("http://{}/api/v1/auth/login", http_addrs[0]))
            .json(&serde_json::json!({ "username": credentials["username"], "password": credentials["password"] }))
            .send()
            .await?
            .error_for_status()
            .context("login with the initial admin's credentials failed")?
            .json()
            .await?;
        let token = login["token"].as_str().context("the login answer has no token")?;
        let status: serde_json::Value = http
            .get(format!("http://{}/api/v1/cluster/status", http_addrs[0]))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()
            .context("GET /api/v1/cluster/status failed")?
            .json()
            .await?;
        let leader_id = status["leader_id"].as_u64().context("cluster status names no leader")?;
        let leader_grpc_addr = status["nodes"][leader_id.to_string()]["grpc_addr"]
            .as_str()
            .context("cluster status has no address for the leader")?
            .to_string();
        let leader_index = grpc_addrs.iter().position(|addr| *addr == leader_grpc_addr).context("the leader is not one of our nodes")?;
        let authorization = format!("Bearer {token}").parse().context("the token is not valid header text")?;
        Ok(Cluster {
            processes,
            leader_grpc_addr,
            leader_index,
            davit: Some(DavitAccess { authorization, http_addrs, http }),
            _directory: directory,
        })
    }

    async fn start_etcd(binary: &Path, nodes: usize, directory: tempfile::TempDir) -> anyhow::Result<Cluster> {
        let addresses = free_addresses(2 * nodes)?;
        let client_addrs: Vec<String> = addresses[..nodes].to_vec();
        let peer_addrs: Vec<String> = addresses[nodes..].to_vec();
        let initial_cluster =
            (0..nodes).map(|index| format!("member-{}=http://{}", index + 1, peer_addrs[index])).collect::<Vec<_>>().join(",");
        let mut processes = Vec::with_capacity(nodes);
        for index in 0..nodes {
            let name = format!("member-{}", index + 1);
            let mut command = Command::new(binary);
            // Defaults otherwise: etcd fsyncs its WAL before it acknowledges, as Davit does.
            command
                .arg("--name")
                .arg(&name)
                .arg("--data-dir")
                .arg(directory.path().join(&name))
                .arg("--listen-client-urls")
                .arg(format!("http://{}", client_addrs[index]))
                .arg("--advertise-client-urls")
                .arg(format!("http://{}", client_addrs[index]))
                .arg("--listen-peer-urls")
                .arg(format!("http://{}", peer_addrs[index]))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://{}", peer_addrs[index]))
                .arg("--initial-cluster")
                .arg(&initial_cluster)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg("davit-bench")
                .arg("--logger")
                .arg("zap");
            processes.push(ServerProcess::spawn(format!("etcd {name}"), command, directory.path().join(format!("{name}.log")))?);
        }

        // Ask every member for its status until all of them agree on a leader.
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let leader_index = loop {
            for process in &mut processes {
                process.check_running()?;
            }
            let mut member_ids = Vec::with_capacity(nodes);
            let mut leaders = Vec::with_capacity(nodes);
            for client_addr in &client_addrs {
                if let Ok(Ok(channel)) = tokio::time::timeout(Duration::from_secs(2), connect(client_addr)).await
                    && let Ok(Ok(response)) =
                        tokio::time::timeout(Duration::from_secs(2), MaintenanceClient::new(channel).status(StatusRequest {})).await
                {
                    let response = response.into_inner();
                    member_ids.push(response.header.map(|header| header.member_id).unwrap_or(0));
                    leaders.push(response.leader);
                }
            }
            let agreed = leaders.len() == nodes && leaders[0] != 0 && leaders.iter().all(|leader| *leader == leaders[0]);
            if agreed && let Some(index) = member_ids.iter().position(|member_id| *member_id == leaders[0]) {
                break index;
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not elect a leader within {} s; the end of member-1's log:\n{}",
                    STARTUP_TIMEOUT.as_secs(),
                    log_tail(&processes[0].log_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Ok(Cluster { processes, leader_grpc_addr: client_addrs[leader_index].clone(), leader_index, davit: None, _directory: directory })
    }

    async fn connect_writer(&self) -> anyhow::Result<Writer> {
        let channel = connect(&self.leader_grpc_addr).await?;
        Ok(match &self.davit {
            Some(davit) => Writer::Davit { client: ConfigServiceClient::new(channel), authorization: davit.authorization.clone() },
            None => Writer::Etcd { client: KvClient::new(channel) },
        })
    }

    /// CPU seconds (user + system) all server processes have used so far.
    fn cpu_seconds(&self) -> f64 {
        self.processes.iter().map(|process| process_cpu_seconds(&process.child.id().to_string())).sum()
    }

    /// Every Davit node's Prometheus metrics, in node order; `None` for etcd or on failure.
    async fn scrape_davit_metrics(&self) -> Option<Vec<BTreeMap<String, f64>>> {
        let davit = self.davit.as_ref()?;
        let mut all = Vec::with_capacity(davit.http_addrs.len());
        for http_addr in &davit.http_addrs {
            let text = davit.http.get(format!("http://{http_addr}/metrics")).send().await.ok()?.text().await.ok()?;
            all.push(parse_prometheus(&text));
        }
        Some(all)
    }
}

// ---------------------------------------------------------------------------------------------
// Davit's own view of where the time goes
// ---------------------------------------------------------------------------------------------

/// Davit's Raft pipeline over the measured window, from its `/metrics` counters.
struct DavitInternals {
    leader_entries_per_append: f64,
    leader_writes_per_fsync: f64,
    leader_fsyncs_per_second: f64,
    follower_entries_per_append: Option<f64>,
    follower_fsyncs_per_second: Option<f64>,
    proposal_mean_seconds: f64,
}

impl DavitInternals {
    fn between(before: &[BTreeMap<String, f64>], after: &[BTreeMap<String, f64>], leader_index: usize, seconds: f64) -> Self {
        let delta = |node: usize, name: &str| {
            after[node].get(name).copied().unwrap_or(0.0) - before.get(node).and_then(|m| m.get(name)).copied().unwrap_or(0.0)
        };
        let ratio = |numerator: f64, denominator: f64| {
            if denominator > 0.0 { numerator / denominator } else { 0.0 }
        };
        let followers: Vec<usize> = (0..after.len()).filter(|node| *node != leader_index).collect();
        let follower_mean = |f: &dyn Fn(usize) -> f64| {
            (!followers.is_empty()).then(|| followers.iter().map(|node| f(*node)).sum::<f64>() / followers.len() as f64)
        };
        Self {
            leader_entries_per_append: ratio(
                delta(leader_index, "davit_raft_append_batch_sum"),
                delta(leader_index, "davit_raft_append_batch_count"),
            ),
            leader_writes_per_fsync: ratio(
                delta(leader_index, "davit_raft_log_flush_batch_sum"),
                delta(leader_index, "davit_raft_log_flush_batch_count"),
            ),
            leader_fsyncs_per_second: delta(leader_index, "davit_raft_log_flush_batch_count") / seconds,
            follower_entries_per_append: follower_mean(&|node| {
                ratio(delta(node, "davit_raft_append_batch_sum"), delta(node, "davit_raft_append_batch_count"))
            }),
            follower_fsyncs_per_second: follower_mean(&|node| delta(node, "davit_raft_log_flush_batch_count") / seconds),
            proposal_mean_seconds: ratio(
                delta(leader_index, "davit_proposal_seconds_sum"),
                delta(leader_index, "davit_proposal_seconds_count"),
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

struct Report<'a> {
    arguments: &'a Arguments,
    machine: &'a Machine,
    etcd_version: Option<&'a str>,
    results: &'a [PointResult],
}

impl Report<'_> {
    fn find(&self, system: SystemKind, nodes: usize, clients: usize) -> Option<&PointResult> {
        self.results.iter().find(|result| result.system == system && result.nodes == nodes && result.clients == clients)
    }

    fn render(&self) -> String {
        let arguments = self.arguments;
        let mut out = String::new();
        let _ = writeln!(out, "### Run of {}\n", self.machine.date);
        out.push_str(&self.machine.render());
        let _ = writeln!(out, "- etcd: {}", self.etcd_version.unwrap_or("not measured"));
        let _ = writeln!(
            out,
            "- Davit: `{}`, workspace at git `{}` (`-dirty`: uncommitted changes), release build, default Raft tuning",
            arguments.davit_binary.display(),
            davit_source()
        );
        let _ = writeln!(
            out,
            "- Load: closed loop, each client on its own gRPC connection to the leader, one write at a time; \
             each write is one new key with a {}-byte random value (Davit: `ConfigService/SetConfig`, one entry; \
             etcd: `KV/Put`). {} s warm-up, then {} s measured per point; a fresh cluster per point; \
             all processes on this one machine over 127.0.0.1.",
            arguments.value_bytes, arguments.warmup_seconds, arguments.duration_seconds
        );
        let _ = writeln!(out, "- Reproduce:\n\n```sh\n{}\n```\n", reproduce_command());

        // Side by side: one row per (nodes, clients), one column group per system.
        let _ = writeln!(out, "#### Writes per second and latency (p50 / p99 / max, ms)\n");
        let has_etcd = arguments.systems.contains(&SystemKind::Etcd);
        let mut header = String::from("| nodes | clients |");
        let mut rule = String::from("|---:|---:|");
        for system in &arguments.systems {
            let _ = write!(header, " {} writes/s | {} p50 / p99 / max |", system.name(), system.name());
            rule.push_str("---:|---:|");
            if has_etcd && *system != SystemKind::Etcd {
                let _ = write!(header, " {} ÷ etcd |", system.name());
                rule.push_str("---:|");
            }
        }
        let _ = writeln!(out, "{header}\n{rule}");
        for &nodes in &arguments.nodes {
            for &clients in &arguments.clients {
                let mut row = format!("| {nodes} | {clients} |");
                let etcd = self.find(SystemKind::Etcd, nodes, clients);
                for &system in &arguments.systems {
                    match self.find(system, nodes, clients) {
                        Some(result) => {
                            let _ = write!(
                                row,
                                " {:.0} | {} / {} / {} |",
                                result.writes_per_second(),
                                milliseconds(result.percentile(0.50)),
                                milliseconds(result.percentile(0.99)),
                                milliseconds(result.max())
                            );
                            if has_etcd && system != SystemKind::Etcd {
                                match etcd {
                                    Some(etcd) if etcd.writes_per_second() > 0.0 => {
                                        let _ = write!(row, " {:.2}x |", result.writes_per_second() / etcd.writes_per_second());
                                    }
                                    _ => row.push_str(" - |"),
                                }
                            }
                        }
                        None => row.push_str(" - | - |"),
                    }
                }
                let _ = writeln!(out, "{row}");
            }
        }
        out.push('\n');

        let _ = writeln!(out, "{}\n", self.target_verdict());

        let _ = writeln!(out, "#### Every point\n");
        let _ = writeln!(
            out,
            "CPU is the share of one core used over the measured window ({} cores in all, shared by the servers and the load generator).\n",
            self.machine.cpus
        );
        let _ = writeln!(
            out,
            "| system | nodes | clients | writes counted | errors | writes/s | p50 ms | p99 ms | max ms | servers CPU | load generator CPU |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for result in self.results {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {:.0}% | {:.0}% |",
                result.system.name(),
                result.nodes,
                result.clients,
                result.latencies.len(),
                result.errors,
                result.writes_per_second(),
                milliseconds(result.percentile(0.50)),
                milliseconds(result.percentile(0.99)),
                milliseconds(result.max()),
                result.server_cpu_percent,
                result.load_generator_cpu_percent
            );
        }
        let notes: Vec<String> = self
            .results
            .iter()
            .filter(|result| result.first_error.is_some() || result.hit_write_cap)
            .map(|result| {
                format!("- {} with {} node(s), {} client(s): {}", result.system.name(), result.nodes, result.clients, result.summary())
            })
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(out, "\nErrors and caps:\n\n{}", notes.join("\n"));
        }
        out.push('\n');

        if self.results.iter().any(|result| result.davit_internals.is_some()) {
            let _ = writeln!(out, "#### Davit's Raft pipeline during the window (from `/metrics`)\n");
            let _ = writeln!(
                out,
                "Entries per append = `davit_raft_append_batch` (entries openraft hands the log store at once); \
                 appends per fsync = `davit_raft_log_flush_batch` (appends that share one durable commit); \
                 proposal = `davit_proposal_seconds` on the leader (from `propose` to the applied outcome).\n"
            );
            let _ = writeln!(
                out,
                "| system | nodes | clients | leader entries/append | leader appends/fsync | leader fsyncs/s | follower entries/append | follower fsyncs/s | mean proposal ms |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
            for result in self.results {
                if let Some(internals) = &result.davit_internals {
                    let optional = |value: Option<f64>, precision: usize| value.map_or("-".to_string(), |v| format!("{v:.precision$}"));
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {} | {} | {:.2} |",
                        result.system.name(),
                        result.nodes,
                        result.clients,
                        internals.leader_entries_per_append,
                        internals.leader_writes_per_fsync,
                        internals.leader_fsyncs_per_second,
                        optional(internals.follower_entries_per_append, 1),
                        optional(internals.follower_fsyncs_per_second, 0),
                        internals.proposal_mean_seconds * 1000.0
                    );
                }
            }
            out.push('\n');
        }
        out
    }

    fn target_verdict(&self) -> String {
        let mut out = format!(
            "**Target:** at {TARGET_CLIENTS} clients, {TARGET_NODES} nodes, {TARGET_THROUGHPUT_RATIO}x etcd's writes/s with p99 no worse than etcd's."
        );
        let Some(etcd) = self.find(SystemKind::Etcd, TARGET_NODES, TARGET_CLIENTS) else {
            out.push_str(" Not measured in this run (it needs etcd at that point).");
            return out;
        };
        for system in [SystemKind::DavitRedb, SystemKind::DavitSled] {
            if let Some(davit) = self.find(system, TARGET_NODES, TARGET_CLIENTS) {
                let ratio = davit.writes_per_second() / etcd.writes_per_second().max(f64::MIN_POSITIVE);
                let p99_ok = davit.percentile(0.99) <= etcd.percentile(0.99);
                let met = ratio >= TARGET_THROUGHPUT_RATIO && p99_ok && davit.errors == 0;
                let _ = write!(
                    out,
                    "\n- {}: {:.0} writes/s = {:.2}x etcd's {:.0}; p99 {} ms vs etcd's {} ms: **{}**.",
                    system.name(),
                    davit.writes_per_second(),
                    ratio,
                    etcd.writes_per_second(),
                    milliseconds(davit.percentile(0.99)),
                    milliseconds(etcd.percentile(0.99)),
                    if met { "met" } else { "not met" }
                );
            }
        }
        out
    }
}

/// The command line that reproduces this run, from the workspace root.
fn reproduce_command() -> String {
    format!(
        "export CARGO_TARGET_DIR=/var/cache/davit-target\n\
         apt-get install -y etcd-server etcd-client   # Debian bookworm: etcd 3.4\n\
         cargo build --release -p davit-coordinator -p davit-benches\n\
         $CARGO_TARGET_DIR/release/replicated-writes {}",
        quoted_arguments()
    )
}
