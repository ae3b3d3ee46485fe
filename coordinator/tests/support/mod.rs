//! The harness of the cluster tests: it starts real `davit` processes from generated TOML
//! configs, talks to them only over their REST API (as an operator or client would), kills them
//! with SIGKILL, and drives write load while recording exactly what the clients were told.
//! It never reaches into a node's memory, and it never leaves a process behind: dropping a
//! `TestCluster` kills every node it started.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::future::Future;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use davit_coordinator::secrets::MasterKeys;
use davit_coordinator::store::BackendKind;
use serde::Deserialize;

/// Every node gets its own loopback address (127.A.B.node_id), so all nodes of all tests can
/// use the same two ports. The ports are below Linux's ephemeral range (32768+), so an outgoing
/// connection can never be holding one when a killed node restarts and binds it again.
const HTTP_PORT: u16 = 7700;
const GRPC_PORT: u16 = 7701;

/// The largest node id any test uses (the grow-to-five test).
const MAX_NODE_ID: u8 = 5;

/// Long enough for a forwarded write that waits the whole quorum timeout, short enough that a
/// hung node fails the test instead of hanging it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Raft timing for tests: fast, but with election timeouts well above the heartbeat so that a
/// busy two-core machine (several tests run at once) does not see spurious elections.
const HEARTBEAT_INTERVAL_MS: u64 = 50;
const ELECTION_TIMEOUT_MIN_MS: u64 = 300;
const ELECTION_TIMEOUT_MAX_MS: u64 = 600;

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub storage: BackendKind,
    pub snapshot_every: u64,
    pub keep_after_snapshot: u64,
    pub quorum_timeout_ms: u64,
    /// Serve HTTPS and gRPC over TLS, with mutual TLS between the nodes (certificates from
    /// `davit_coordinator::tls::generate_cluster_certs`, as `davit cluster certs` makes them).
    pub tls: bool,
    /// `[outbound] allow_ranges` of every node. Empty (the default, as for `davit serve`
    /// without an `[outbound]` section): repositories on loopback are refused, so tests that
    /// serve one with `git daemon` on 127.0.0.1 allow `127.0.0.0/8` here.
    pub outbound_allow_ranges: Vec<String>,
}

impl ClusterOptions {
    /// Snapshots every few hundred entries, so that most tests also cross snapshot and log
    /// compaction boundaries while they run.
    pub fn new(storage: BackendKind) -> Self {
        Self {
            storage,
            snapshot_every: 400,
            keep_after_snapshot: 100,
            quorum_timeout_ms: 3000,
            tls: false,
            outbound_allow_ranges: Vec::new(),
        }
    }
}

/// `GET /api/v1/cluster/status`, the fields the tests look at.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub node_id: u64,
    pub state: String,
    pub term: u64,
    pub leader_id: Option<u64>,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub storage: String,
}

impl Status {
    pub fn applied(&self) -> u64 {
        self.applied_index.unwrap_or(0)
    }
}

/// What a client was told about one write.
#[derive(Debug)]
pub enum WriteError {
    /// The node answered with an error status; `body` is the raw response body.
    Status { status: u16, body: String, elapsed: Duration },
    /// No answer: connection refused, reset or timed out.
    Transport(String),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Status { status, body, elapsed } => write!(f, "HTTP {status} after {elapsed:?}: {body}"),
            WriteError::Transport(message) => write!(f, "no answer: {message}"),
        }
    }
}

pub struct TestNode {
    pub node_id: u64,
    ip: Ipv4Addr,
    dir: PathBuf,
    /// In a mutex so that `&self` probes can notice a node that exited on its own.
    child: Mutex<Option<Child>>,
    starts: u32,
    tls: bool,
}

impl TestNode {
    pub fn http_addr(&self) -> String {
        format!("{}:{HTTP_PORT}", self.ip)
    }

    pub fn grpc_addr(&self) -> String {
        format!("{}:{GRPC_PORT}", self.ip)
    }

    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addr())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("node.toml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("node.log")
    }
}

pub struct TestCluster {
    name: String,
    root: tempfile::TempDir,
    subnet: [u8; 2],
    options: ClusterOptions,
    nodes: BTreeMap<u64, TestNode>,
    pub client: reqwest::Client,
    token: String,
}

/// Pick 127.A.B.0/24 for one cluster: distinct per test within this process (a counter), and
/// very likely distinct from other test processes (seeded by the process id). Checked by
/// binding every address the cluster may use.
fn allocate_subnet() -> [u8; 2] {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..1000 {
        let value = seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % (200 * 250);
        let subnet = [20 + (value / 250) as u8, 1 + (value % 250) as u8];
        let all_free = (1..=MAX_NODE_ID).all(|node| {
            let ip = Ipv4Addr::new(127, subnet[0], subnet[1], node);
            [HTTP_PORT, GRPC_PORT].iter().all(|port| TcpListener::bind(SocketAddrV4::new(ip, *port)).is_ok())
        });
        if all_free {
            return subnet;
        }
    }
    panic!("found no free 127.x.y.0/24 block with ports {HTTP_PORT} and {GRPC_PORT} free after 1000 tries");
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(2))
        // Test traffic must go straight to the loopback addresses, whatever the environment says.
        .no_proxy()
        .build()
        .expect("build the HTTP client")
}

/// An HTTPS client that trusts the test cluster's CA (and nothing else).
fn tls_client(ca_file: &std::path::Path) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca_file).expect("read the CA")).expect("parse the CA");
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(Duration::from_secs(2))
        .no_proxy()
        .tls_certs_only([ca])
        .build()
        .expect("build the HTTPS client")
}

impl TestCluster {
    /// The directory holding the cluster's certificates when it runs with TLS.
    pub fn certs_dir(&self) -> PathBuf {
        self.root.path().join("certs")
    }

    /// Start nodes 1, 2 and 3 as the initial voters, wait until every one of them is ready
    /// (knows the leader, and the cluster has its signing key), and log in as the first admin.
    pub async fn start(name: &str, options: ClusterOptions) -> TestCluster {
        let root = tempfile::Builder::new().prefix(&format!("davit-cluster-test-{name}-")).tempdir().expect("create the test directory");
        // Every node of a cluster shares one secrets master key and one blob directory, as a
        // real multi-node deployment must.
        std::fs::write(root.path().join("master.key"), MasterKeys::generate_file_text("k1")).expect("write the master key");
        std::fs::create_dir_all(root.path().join("blobs")).expect("create the shared blob directory");
        let subnet = allocate_subnet();
        let mut client = http_client();
        if options.tls {
            let nodes: Vec<(u64, Vec<String>)> =
                (1..=MAX_NODE_ID).map(|node| (u64::from(node), vec![Ipv4Addr::new(127, subnet[0], subnet[1], node).to_string()])).collect();
            davit_coordinator::tls::generate_cluster_certs(&root.path().join("certs"), &nodes)
                .expect("make the test cluster's certificates");
            client = tls_client(&root.path().join("certs/ca.pem"));
        }
        let mut cluster =
            TestCluster { name: name.to_string(), root, subnet, options, nodes: BTreeMap::new(), client, token: String::new() };
        for node_id in 1..=3 {
            cluster.add_node_dir(node_id, true);
            cluster.start_node(node_id);
        }
        cluster.wait_until_ready(&[1, 2, 3], Duration::from_secs(60)).await;
        cluster.token = cluster.log_in_as_first_admin(Duration::from_secs(60)).await;
        cluster
    }

    /// Create a node's directory and config. An initial voter lists nodes 1-3 as peers and
    /// bootstraps; a node to be added later has `bootstrap = false` and no peers.
    pub fn add_node_dir(&mut self, node_id: u64, initial_voter: bool) {
        assert!((1..=u64::from(MAX_NODE_ID)).contains(&node_id), "node ids go from 1 to {MAX_NODE_ID}");
        let ip = Ipv4Addr::new(127, self.subnet[0], self.subnet[1], node_id as u8);
        let dir = self.root.path().join(format!("node-{node_id}"));
        std::fs::create_dir_all(&dir).expect("create the node directory");
        let node = TestNode { node_id, ip, dir, child: Mutex::new(None), starts: 0, tls: self.options.tls };
        let ClusterOptions { storage, snapshot_every, keep_after_snapshot, quorum_timeout_ms, .. } = &self.options;
        let (http_addr, grpc_addr) = (node.http_addr(), node.grpc_addr());
        // The operator's format, written out as text: the test goes through the same parsing and
        // path resolution (relative to the config file) as a hand-written config.
        let mut config = format!(
            r#"node_id = {node_id}
region = "test"
http_addr = "{http_addr}"
grpc_addr = "{grpc_addr}"
data_dir = "data"
storage = "{storage}"
bootstrap = {initial_voter}
master_key_file = "../master.key"

[blob_store]
kind = "dir"
path = "../blobs"
shared = true

[raft]
heartbeat_interval_ms = {HEARTBEAT_INTERVAL_MS}
election_timeout_min_ms = {ELECTION_TIMEOUT_MIN_MS}
election_timeout_max_ms = {ELECTION_TIMEOUT_MAX_MS}
snapshot_every = {snapshot_every}
keep_after_snapshot = {keep_after_snapshot}
quorum_timeout_ms = {quorum_timeout_ms}
"#
        );
        if initial_voter {
            for peer in 1..=3u8 {
                let peer_ip = Ipv4Addr::new(127, self.subnet[0], self.subnet[1], peer);
                config.push_str(&format!(
                    r#"
[[peers]]
node_id = {peer}
grpc_addr = "{peer_ip}:{GRPC_PORT}"
http_addr = "{peer_ip}:{HTTP_PORT}"
region = "test"
"#
                ));
            }
        }
        if self.options.tls {
            config.push_str(&format!(
                "\n[tls]\nca_file = \"../certs/ca.pem\"\ncert_file = \"../certs/node-{node_id}.pem\"\nkey_file = \"../certs/node-{node_id}-key.pem\"\n"
            ));
        }
        if !self.options.outbound_allow_ranges.is_empty() {
            let ranges: Vec<String> = self.options.outbound_allow_ranges.iter().map(|range| format!("{range:?}")).collect();
            config.push_str(&format!("\n[outbound]\nallow_ranges = [{}]\n", ranges.join(", ")));
        }
        std::fs::write(node.config_path(), config).expect("write the node config");
        self.nodes.insert(node_id, node);
    }

    /// Start (or restart) a node's process; its stdout and stderr go to `node.log`.
    pub fn start_node(&mut self, node_id: u64) {
        let node = self.nodes.get_mut(&node_id).unwrap_or_else(|| panic!("node {node_id} has no directory yet"));
        let child = node.child.get_mut().expect("child lock");
        assert!(child.is_none(), "node {node_id} is already running");
        node.starts += 1;
        let mut log = OpenOptions::new().create(true).append(true).open(node.log_path()).expect("open the node log");
        writeln!(log, "===== test harness: start #{} of node {node_id} =====", node.starts).expect("write the node log");
        let spawned = Command::new(env!("CARGO_BIN_EXE_davit"))
            .arg("serve")
            .arg("--config")
            .arg(node.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone the log handle")))
            .stderr(Stdio::from(log))
            .env("RUST_BACKTRACE", "1")
            // The log is a file, not a terminal: no colour codes in it.
            .env("NO_COLOR", "1")
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start node {node_id}: {error}"));
        *node.child.get_mut().expect("child lock") = Some(spawned);
    }

    /// SIGKILL a node and reap it: none of its shutdown code runs. (What it had written stays in
    /// the OS page cache, so this is a process crash, not a power cut.)
    pub fn kill_node(&mut self, node_id: u64) {
        let node = self.nodes.get_mut(&node_id).expect("known node");
        let mut child = node.child.get_mut().expect("child lock").take().unwrap_or_else(|| panic!("node {node_id} is not running"));
        child.kill().expect("send SIGKILL");
        child.wait().expect("reap the killed node");
        if let Ok(mut log) = OpenOptions::new().append(true).open(node.log_path()) {
            let _ = writeln!(log, "===== test harness: node {node_id} killed with SIGKILL =====");
        }
    }

    /// A login token of the first admin (not every test file that includes this module uses it).
    #[allow(dead_code)]
    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn node(&self, node_id: u64) -> &TestNode {
        &self.nodes[&node_id]
    }

    pub fn url(&self, node_id: u64, path: &str) -> String {
        format!("{}{path}", self.node(node_id).base_url())
    }

    pub fn base_urls(&self, node_ids: &[u64]) -> Vec<String> {
        node_ids.iter().map(|id| self.node(*id).base_url()).collect()
    }

    /// Panic at once, with its log, if a node the test started has exited on its own: waiting
    /// for it to answer would only turn a clear start-up error into a time-out.
    pub fn assert_started_nodes_alive(&self) {
        for node in self.nodes.values() {
            let mut child = node.child.lock().expect("child lock");
            if let Some(exit) = child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                child.take();
                panic!("node {} exited on its own ({exit}); its log ends with:\n{}", node.node_id, tail(&node.log_path(), 40));
            }
        }
    }

    /// Every listed node answers /readyz with 200 and names the same leader.
    async fn wait_until_ready(&self, node_ids: &[u64], timeout: Duration) {
        wait_until(&format!("nodes {node_ids:?} to be ready and agree on a leader"), timeout, || async {
            self.assert_started_nodes_alive();
            let mut leaders = BTreeSet::new();
            for node_id in node_ids {
                let response = self.client.get(self.url(*node_id, "/readyz")).send().await.map_err(|e| format!("node {node_id}: {e}"))?;
                let status = response.status();
                let body: serde_json::Value = response.json().await.map_err(|e| format!("node {node_id}: {e}"))?;
                if !status.is_success() {
                    return Err(format!("node {node_id} not ready: {status} {body}"));
                }
                leaders.insert(body["leader_id"].as_u64());
            }
            if leaders.len() == 1 { Ok(()) } else { Err(format!("nodes name different leaders: {leaders:?}")) }
        })
        .await
    }

    /// Find `initial-admin.json` in whichever node led when the cluster was created, and log in.
    async fn log_in_as_first_admin(&self, timeout: Duration) -> String {
        let credentials: serde_json::Value = wait_until("the first admin's credentials file", timeout, || async {
            for node in self.nodes.values() {
                if let Ok(text) = std::fs::read_to_string(node.data_dir().join("initial-admin.json"))
                    && let Ok(credentials) = serde_json::from_str::<serde_json::Value>(&text)
                {
                    return Ok(credentials);
                }
            }
            Err("no node has written initial-admin.json yet".to_string())
        })
        .await;
        let node_ids: Vec<u64> = self.nodes.keys().copied().collect();
        wait_until("a successful login as the first admin", timeout, || async {
            let mut errors = Vec::new();
            for node_id in &node_ids {
                match self.client.post(self.url(*node_id, "/api/v1/auth/login")).json(&credentials).send().await {
                    Ok(response) if response.status().is_success() => {
                        let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
                        return body["token"].as_str().map(str::to_string).ok_or_else(|| format!("login answer has no token: {body}"));
                    }
                    Ok(response) => {
                        errors.push(format!("node {node_id}: {} {}", response.status(), response.text().await.unwrap_or_default()))
                    }
                    Err(error) => errors.push(format!("node {node_id}: {error}")),
                }
            }
            Err(errors.join("; "))
        })
        .await
    }

    pub async fn status(&self, node_id: u64) -> Result<Status, String> {
        let response = self
            .client
            .get(self.url(node_id, "/api/v1/cluster/status"))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| format!("status of node {node_id}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("status of node {node_id}: {} {}", response.status(), response.text().await.unwrap_or_default()));
        }
        response.json().await.map_err(|e| format!("status of node {node_id}: {e}"))
    }

    /// The leader, if every listed node names the same one, that node calls itself the leader,
    /// and no other listed node does.
    pub async fn agreed_leader(&self, node_ids: &[u64]) -> Result<u64, String> {
        self.assert_started_nodes_alive();
        let mut statuses = Vec::new();
        for node_id in node_ids {
            statuses.push(self.status(*node_id).await?);
        }
        let named: BTreeSet<Option<u64>> = statuses.iter().map(|status| status.leader_id).collect();
        let self_declared: Vec<u64> = statuses.iter().filter(|status| status.state == "Leader").map(|status| status.node_id).collect();
        let summary = || {
            statuses
                .iter()
                .map(|s| format!("node {}: {} term {} leader {:?}", s.node_id, s.state, s.term, s.leader_id))
                .collect::<Vec<_>>()
                .join("; ")
        };
        match (named.len(), named.iter().next()) {
            (1, Some(Some(leader))) if self_declared == [*leader] => Ok(*leader),
            _ => Err(format!("no agreed leader: {}", summary())),
        }
    }

    pub async fn wait_for_agreed_leader(&self, node_ids: &[u64], timeout: Duration) -> u64 {
        wait_until(&format!("nodes {node_ids:?} to agree on one leader"), timeout, || self.agreed_leader(node_ids)).await
    }

    /// Wait until `node_id` has applied at least `index`.
    pub async fn wait_for_applied(&self, node_id: u64, index: u64, timeout: Duration) -> Status {
        wait_until(&format!("node {node_id} to apply log index {index}"), timeout, || async {
            self.assert_started_nodes_alive();
            let status = self.status(node_id).await?;
            if status.applied() >= index { Ok(status) } else { Err(format!("node {node_id} applied {:?}", status.applied_index)) }
        })
        .await
    }

    /// `POST /api/v1/configs/{environment}`; Ok(how many variables were written) only on 200.
    pub async fn write(&self, node_id: u64, environment: &str, variables: &BTreeMap<String, String>) -> Result<u64, WriteError> {
        write_variables(&self.client, &self.node(node_id).base_url(), &self.token, environment, variables).await
    }

    /// `GET /api/v1/configs/{environment}`: linearizable, or local with `stale_ok`.
    pub async fn read(&self, node_id: u64, environment: &str, stale_ok: bool) -> Result<BTreeMap<String, String>, String> {
        let response = self
            .client
            .get(self.url(node_id, &format!("/api/v1/configs/{environment}?stale_ok={stale_ok}")))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| format!("read from node {node_id}: {e}"))?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.map_err(|e| format!("read from node {node_id}: {e}"))?;
        if !status.is_success() {
            return Err(format!("read from node {node_id}: {status} {body}"));
        }
        let variables = body["variables"].as_object().ok_or_else(|| format!("read from node {node_id}: no variables in {body}"))?;
        variables
            .iter()
            .map(|(key, value)| {
                // Each variable is `{"value", "secret", "scope"}`; a plain string is accepted too.
                let value = value.as_str().or_else(|| value["value"].as_str());
                value
                    .map(|value| (key.clone(), value.to_string()))
                    .ok_or_else(|| format!("read from node {node_id}: {key} has no value in {body}"))
            })
            .collect()
    }

    /// `POST /api/v1/cluster/{operation}` as the admin.
    pub async fn admin(&self, node_id: u64, operation: &str, body: serde_json::Value) -> Result<serde_json::Value, String> {
        let response = self
            .client
            .post(self.url(node_id, &format!("/api/v1/cluster/{operation}")))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("{operation} via node {node_id}: {e}"))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        if !status.is_success() {
            return Err(format!("{operation} via node {node_id}: {status} {text}"));
        }
        serde_json::from_str(&text).map_err(|e| format!("{operation} via node {node_id}: {e} in {text}"))
    }

    /// Read `environment` from `node_id` and compare it with what writers were told: every
    /// acknowledged key must be there with its value, and nothing may be there that no writer
    /// ever sent. Returns how many keys were checked.
    pub async fn assert_all_acknowledged_present(&self, node_id: u64, environment: &str, outcome: &LoadOutcome, stale_ok: bool) -> usize {
        let stored = wait_until(&format!("a read of {environment:?} from node {node_id}"), Duration::from_secs(30), || {
            self.read(node_id, environment, stale_ok)
        })
        .await;
        assert_matches_acknowledged(&format!("node {node_id} (stale_ok={stale_ok})"), &stored, outcome);
        outcome.acknowledged.len()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Compare a read with the writers' record; panics with the differences.
/// How many acknowledged writes `node_id` does not hold (for measurements that must not fail
/// the test, see the sled variant in `cluster.rs`).
impl TestCluster {
    pub async fn count_lost_acknowledged(&self, node_id: u64, environment: &str, outcome: &LoadOutcome) -> usize {
        let stored = wait_until(&format!("a read of {environment:?} from node {node_id}"), Duration::from_secs(30), || {
            self.read(node_id, environment, false)
        })
        .await;
        outcome.acknowledged.iter().filter(|(key, value)| stored.get(*key) != Some(value)).count()
    }
}

fn assert_matches_acknowledged(source: &str, stored: &BTreeMap<String, String>, outcome: &LoadOutcome) {
    let missing: Vec<(&String, &String, Option<&String>)> = outcome
        .acknowledged
        .iter()
        .filter(|(key, value)| stored.get(*key) != Some(value))
        .map(|(key, value)| (key, value, stored.get(key)))
        .collect();
    let unexplained: Vec<&String> = stored.keys().filter(|key| !outcome.attempted.contains_key(*key)).collect();
    assert!(
        missing.is_empty(),
        "{source} lost {} of {} acknowledged writes (key, acknowledged value, stored value), first ones: {:?}",
        missing.len(),
        outcome.acknowledged.len(),
        &missing[..missing.len().min(20)]
    );
    assert!(
        unexplained.is_empty(),
        "{source} holds {} keys that no writer ever sent, first ones: {:?}",
        unexplained.len(),
        &unexplained[..unexplained.len().min(20)]
    );
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.get_mut().map(Option::take).unwrap_or_default() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if failed {
            // Keep the directory for a post-mortem and show the end of every node's log.
            self.root.disable_cleanup(true);
            eprintln!("\n===== test {} failed; its directory is kept at {} =====", self.name, self.root.path().display());
            for node in self.nodes.values() {
                eprintln!("----- last lines of node {} ({}) -----", node.node_id, node.log_path().display());
                eprintln!("{}", tail(&node.log_path(), 150));
            }
        }
    }
}

/// The last `lines` lines of a node log, leaving out openraft's per-attempt replication
/// warnings, which repeat every backoff interval while a peer is down and would push
/// everything else out of view (the full log stays in the kept directory).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|error| format!("(cannot read: {error})"));
    let all: Vec<&str> =
        text.lines().filter(|line| !line.contains("openraft::replication") && !line.contains("replication_handler")).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Poll `probe` every 100 ms until it returns Ok, or panic after `timeout` with the last error.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last_error = match probe().await {
            Ok(value) => return value,
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last observation: {last_error}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn write_variables(
    client: &reqwest::Client,
    base_url: &str,
    token: &str,
    environment: &str,
    variables: &BTreeMap<String, String>,
) -> Result<u64, WriteError> {
    let started = Instant::now();
    let response = client
        .post(format!("{base_url}/api/v1/configs/{environment}"))
        .bearer_auth(token)
        .json(variables)
        .send()
        .await
        .map_err(|error| WriteError::Transport(error_chain(&error)))?;
    let status = response.status();
    let body = response.text().await.map_err(|error| WriteError::Transport(error_chain(&error)))?;
    if status != reqwest::StatusCode::OK {
        return Err(WriteError::Status { status: status.as_u16(), body, elapsed: started.elapsed() });
    }
    let body: serde_json::Value =
        serde_json::from_str(&body).map_err(|error| WriteError::Transport(format!("200 with a body that is not JSON: {error}")))?;
    body["written"].as_u64().ok_or_else(|| WriteError::Transport(format!("200 without a written count: {body}")))
}

/// An error with its causes: reqwest's own message alone ("error sending request") hides
/// whether the connection was refused, reset or timed out.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What the writers of a [`WriteLoad`] were told, merged.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Keys whose write got HTTP 200, with the value written.
    pub acknowledged: BTreeMap<String, String>,
    /// Every key any writer sent, acknowledged or not (an unanswered write may or may not have
    /// been committed; it must just never show up with another value).
    pub attempted: BTreeMap<String, String>,
    pub failures: usize,
    /// A few failure messages, for the test's report.
    pub sample_failures: Vec<String>,
    /// The longest time without any acknowledgement while the load ran: the unavailability a
    /// client saw.
    pub longest_gap: Duration,
}

#[derive(Default)]
struct WriterRecord {
    acknowledged: BTreeMap<String, String>,
    attempted: BTreeMap<String, String>,
    failures: usize,
    sample_failures: Vec<String>,
    acknowledged_at: Vec<Instant>,
}

/// Several concurrent writers, each writing one new unique key per request (`wNN-SSSSSS`),
/// spread over a list of nodes that the test can change while the load runs.
pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    targets: Arc<Mutex<Vec<String>>>,
    acknowledged: Arc<AtomicU64>,
    writers: Vec<tokio::task::JoinHandle<WriterRecord>>,
    started: Instant,
}

impl WriteLoad {
    pub fn start(cluster: &TestCluster, environment: &str, writer_count: usize, targets: Vec<String>) -> WriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let targets = Arc::new(Mutex::new(targets));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let writers = (0..writer_count)
            .map(|writer| {
                let client = cluster.client.clone();
                let token = cluster.token.clone();
                let environment = environment.to_string();
                let stop = stop.clone();
                let targets = targets.clone();
                let acknowledged = acknowledged.clone();
                tokio::spawn(async move {
                    let mut record = WriterRecord::default();
                    let mut sequence = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let target = {
                            let targets = targets.lock().expect("targets lock");
                            targets[(writer + sequence) % targets.len()].clone()
                        };
                        let key = format!("w{writer:02}-{sequence:06}");
                        let value = format!("{environment}/{key}/{}", sequence * 7 + writer);
                        sequence += 1;
                        record.attempted.insert(key.clone(), value.clone());
                        let variables = BTreeMap::from([(key.clone(), value.clone())]);
                        match write_variables(&client, &target, &token, &environment, &variables).await {
                            Ok(_) => {
                                record.acknowledged.insert(key, value);
                                record.acknowledged_at.push(Instant::now());
                                acknowledged.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(error) => {
                                record.failures += 1;
                                if record.sample_failures.len() < 3 {
                                    record.sample_failures.push(format!("{target}: {error}"));
                                }
                                // A refused connection fails at once; do not spin on it.
                                tokio::time::sleep(Duration::from_millis(25)).await;
                            }
                        }
                    }
                    record
                })
            })
            .collect();
        WriteLoad { stop, targets, acknowledged, writers, started: Instant::now() }
    }

    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    pub fn set_targets(&self, targets: Vec<String>) {
        assert!(!targets.is_empty(), "a write load needs at least one target");
        *self.targets.lock().expect("targets lock") = targets;
    }

    /// Wait until `count` more writes than now have been acknowledged.
    pub async fn wait_for_more_acknowledged(&self, count: u64, timeout: Duration) {
        let goal = self.acknowledged() + count;
        wait_until(&format!("{count} more acknowledged writes"), timeout, || async {
            let now = self.acknowledged();
            if now >= goal { Ok(()) } else { Err(format!("{now} acknowledged so far, waiting for {goal}")) }
        })
        .await
    }

    /// Stop the writers (each finishes the request it has in flight) and merge their records.
    pub async fn stop(self) -> LoadOutcome {
        self.stop.store(true, Ordering::Relaxed);
        let mut outcome = LoadOutcome::default();
        let mut acknowledged_at = vec![self.started];
        for writer in self.writers {
            let record = writer.await.expect("a writer task panicked");
            outcome.acknowledged.extend(record.acknowledged);
            outcome.attempted.extend(record.attempted);
            outcome.failures += record.failures;
            outcome.sample_failures.extend(record.sample_failures);
            acknowledged_at.extend(record.acknowledged_at);
        }
        acknowledged_at.sort();
        outcome.longest_gap = acknowledged_at.windows(2).map(|pair| pair[1] - pair[0]).max().unwrap_or_default();
        outcome
    }
}

impl LoadOutcome {
    pub fn summary(&self) -> String {
        format!(
            "{} acknowledged, {} failed or unanswered, longest time without an acknowledgement {:?}, sample failures: {:?}",
            self.acknowledged.len(),
            self.failures,
            self.longest_gap,
            self.sample_failures.iter().take(3).collect::<Vec<_>>()
        )
    }
}

/// Make `count` separate write requests of one new key each, `concurrency` at a time, spread
/// over `targets`; a write that fails is retried (same key, same value) until it is
/// acknowledged or `timeout` passes. Returns every key with its value.
pub async fn write_keys(
    cluster: &TestCluster,
    environment: &str,
    targets: Vec<String>,
    count: usize,
    concurrency: usize,
    timeout: Duration,
) -> BTreeMap<String, String> {
    let next = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + timeout;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = cluster.client.clone();
            let token = cluster.token.clone();
            let environment = environment.to_string();
            let next = next.clone();
            let targets = targets.clone();
            tokio::spawn(async move {
                let mut written = BTreeMap::new();
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if index >= count {
                        return Ok(written);
                    }
                    let key = format!("k{index:06}");
                    let value = format!("{environment}/{key}");
                    let variables = BTreeMap::from([(key.clone(), value.clone())]);
                    let mut attempt = 0;
                    loop {
                        match write_variables(&client, &targets[(index + attempt) % targets.len()], &token, &environment, &variables).await
                        {
                            Ok(_) => break,
                            Err(_) if Instant::now() < deadline => {
                                attempt += 1;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(error) => {
                                return Err(format!("write of {key} not acknowledged before the deadline: {error}"));
                            }
                        }
                    }
                    written.insert(key, value);
                }
            })
        })
        .collect();
    let mut all = BTreeMap::new();
    for task in tasks {
        match task.await.expect("a writer task panicked") {
            Ok(written) => all.extend(written),
            Err(error) => panic!("{error}"),
        }
    }
    assert_eq!(all.len(), count, "every write was acknowledged exactly once");
    all
}
