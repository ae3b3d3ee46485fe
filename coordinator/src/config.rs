//! The node configuration file (TOML). `davit serve --config FILE` reads one; `davit up` builds
//! one for a single node.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::BackendKind;
use crate::tls::TlsFiles;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub node_id: u64,
    #[serde(default = "default_region")]
    pub region: String,
    /// host:port for REST, the dashboard and /metrics.
    pub http_addr: String,
    /// host:port for gRPC: Raft, forwarding between coordinators, agents, integrations.
    pub grpc_addr: String,
    pub data_dir: PathBuf,
    /// Which embedded database holds the state (`redb`, the default, or `sled`).
    #[serde(default)]
    pub storage: BackendKind,
    /// The initial voters. A node listed here with no state yet initializes the cluster with
    /// exactly these members; a node that will be added later has `bootstrap = false`.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default = "default_true")]
    pub bootstrap: bool,
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// The secrets master key file (`<key id> <base64 key>` per line; the last seals). Every
    /// node of a cluster needs the same file. `DAVIT_MASTER_KEY` overrides it. A single node
    /// without one generates `<data_dir>/master.key`.
    #[serde(default)]
    pub master_key_file: Option<PathBuf>,
    /// Create `master_key_file` if it does not exist. Only for clusters whose nodes share one
    /// file system (test clusters on one machine): elsewhere each node would make its own key.
    #[serde(default)]
    pub generate_master_key: bool,
    /// Where artifact and log bytes go. Default: `<data_dir>/blobs`, for a single node only.
    #[serde(default)]
    pub blob_store: Option<crate::blob_store::BlobStoreConfig>,
    #[serde(default)]
    pub raft: RaftTuning,
    #[serde(default)]
    pub agents: AgentSettings,
    #[serde(default)]
    pub retention: RetentionSettings,
    /// The dashboard's external base URL (e.g. `https://davit.example.com`), used in the webhook
    /// URL a repository's connection answers with and in the links of commit statuses. Default:
    /// `http://<http_addr>` (`https://` with `[tls]`), which only suits a node reachable there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Which internal hosts and ranges the coordinator may connect to on a user's behalf
    /// (repositories, provider APIs, notification webhooks); see `outbound.rs`.
    #[serde(default)]
    pub outbound: crate::outbound::OutboundSettings,
    #[serde(default)]
    pub scm: ScmSettings,
}

/// The `[scm]` section: how repositories are watched (see `scm/polling.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScmSettings {
    /// How often the leader runs `git ls-remote` on a repository that has no webhook secret and
    /// no interval of its own, in seconds; 0 polls only repositories that set their own.
    pub poll_interval_seconds: u64,
    /// The longest one `git ls-remote` may take before it is killed and counted as a failure.
    pub ls_remote_timeout_seconds: u64,
}

impl Default for ScmSettings {
    fn default() -> Self {
        ScmSettings { poll_interval_seconds: 60, ls_remote_timeout_seconds: 30 }
    }
}

/// The `[retention]` section: how long artifacts are kept (see `retention.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionSettings {
    /// Artifacts older than this many days are deleted, unless a deployment still needs them
    /// (one in progress, or the latest successful one of its pipeline and environment).
    pub artifact_days: u64,
    /// How often the leader applies the retention, in seconds.
    pub interval_seconds: u64,
}

impl Default for RetentionSettings {
    fn default() -> Self {
        RetentionSettings { artifact_days: 30, interval_seconds: 3600 }
    }
}

/// The `[agents]` section: how agents' liveness is judged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSettings {
    /// An agent silent this long is lost: its jobs are retried on other agents. Also the grace
    /// every lease gets after a leader change.
    pub lost_after_seconds: u64,
    /// How often agents send a heartbeat.
    pub heartbeat_interval_ms: u64,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings { lost_after_seconds: 60, heartbeat_interval_ms: 2000 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub node_id: u64,
    pub grpc_addr: String,
    pub http_addr: String,
    #[serde(default = "default_region")]
    pub region: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log) every this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept in the log after a snapshot, so a briefly lagging follower catches up from
    /// the log rather than by snapshot.
    pub keep_after_snapshot: u64,
    /// How long a client write or linearizable read may wait for a quorum before the node
    /// answers 503.
    pub quorum_timeout_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_every: 5000,
            keep_after_snapshot: 1000,
            quorum_timeout_ms: 5000,
        }
    }
}

fn default_region() -> String {
    "default".into()
}

fn default_true() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut config: NodeConfig =
            toml::from_str(&text).map_err(|error| ConfigError::Invalid { path: path.to_path_buf(), message: error.to_string() })?;
        // Relative paths in a config file are relative to the file, so shipped configs work from
        // any working directory.
        let base = path.parent().unwrap_or(Path::new("."));
        config.data_dir = base.join(&config.data_dir);
        if let Some(tls) = &mut config.tls {
            tls.ca_file = base.join(&tls.ca_file);
            tls.cert_file = base.join(&tls.cert_file);
            tls.key_file = base.join(&tls.key_file);
        }
        if let Some(master_key_file) = &mut config.master_key_file {
            *master_key_file = base.join(&*master_key_file);
        }
        if let Some(crate::blob_store::BlobStoreConfig::Dir { path, .. }) = &mut config.blob_store {
            *path = base.join(&*path);
        }
        config.validate().map_err(|message| ConfigError::Invalid { path: path.to_path_buf(), message })?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.node_id == 0 {
            return Err("node_id must be 1 or more".into());
        }
        for addr in [&self.http_addr, &self.grpc_addr] {
            if addr.rsplit_once(':').is_none_or(|(_, port)| port.parse::<u16>().is_err()) {
                return Err(format!("address {addr:?} must be host:port"));
            }
        }
        if self.http_addr == self.grpc_addr {
            return Err("http_addr and grpc_addr must differ".into());
        }
        let mut ids: Vec<u64> = self.peers.iter().map(|peer| peer.node_id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.peers.len() {
            return Err("peers lists a node_id twice".into());
        }
        if self.bootstrap && !self.peers.is_empty() && !self.peers.iter().any(|peer| peer.node_id == self.node_id) {
            return Err(format!(
                "node {} bootstraps but is not in its own peers list; add it, or set bootstrap = false for a node that will be added later",
                self.node_id
            ));
        }
        if let Some(public_url) = &self.public_url {
            let rest = public_url.strip_prefix("https://").or_else(|| public_url.strip_prefix("http://"));
            if rest.is_none_or(|rest| rest.trim_end_matches('/').is_empty() || rest.contains(['?', '#']))
                || public_url.contains(|c: char| c.is_whitespace() || c.is_control())
            {
                return Err(format!("public_url {public_url:?} must be an http:// or https:// URL such as https://davit.example.com"));
            }
        }
        let raft = &self.raft;
        if raft.election_timeout_min_ms <= raft.heartbeat_interval_ms || raft.election_timeout_max_ms <= raft.election_timeout_min_ms {
            return Err("raft timeouts must satisfy heartbeat_interval_ms < election_timeout_min_ms < election_timeout_max_ms".into());
        }
        crate::outbound::OutboundPolicy::new(&self.outbound)?;
        if self.scm.poll_interval_seconds > 86_400 {
            return Err("[scm] poll_interval_seconds must be at most 86400 (a day); 0 turns the default polling off".into());
        }
        if !(1..=3600).contains(&self.scm.ls_remote_timeout_seconds) {
            return Err("[scm] ls_remote_timeout_seconds must be 1 to 3600".into());
        }
        Ok(())
    }

    /// The external base URL of the dashboard and API, without a trailing slash: `public_url`, or
    /// the HTTP listener's address.
    pub fn public_base_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("{}://{}", if self.tls.is_some() { "https" } else { "http" }, self.http_addr),
        }
    }

    /// Whether this node is (or will be) one of several: then blobs and the master key must be
    /// shared, not made up locally.
    pub fn is_multi_node(&self) -> bool {
        self.peers.len() > 1 || !self.bootstrap
    }

    /// The members the cluster starts with: the peers list, or just this node.
    pub fn initial_members(&self) -> Vec<PeerConfig> {
        if self.peers.is_empty() {
            vec![PeerConfig {
                node_id: self.node_id,
                grpc_addr: self.grpc_addr.clone(),
                http_addr: self.http_addr.clone(),
                region: self.region.clone(),
            }]
        } else {
            self.peers.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-configs");
        let mut count = 0;
        for dir in ["local-1", "local-3", "regions-5"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
                if entry.path().extension().is_some_and(|ext| ext == "toml") {
                    let config = NodeConfig::load(&entry.path()).unwrap();
                    assert!(config.peers.is_empty() || config.peers.iter().any(|p| p.node_id == config.node_id));
                    count += 1;
                }
            }
        }
        assert_eq!(count, 1 + 3 + 5);
        let regions: Vec<String> =
            NodeConfig::load(&root.join("regions-5/node-1.toml")).unwrap().peers.into_iter().map(|p| p.region).collect();
        assert_eq!(regions, ["a", "a", "b", "b", "c"]);
    }

    #[test]
    fn bad_configs_say_what_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "node_id = 1\nhttp_addr = \"127.0.0.1:1\"\ngrpc_addr = \"127.0.0.1\"\ndata_dir = \"d\"\n").unwrap();
        let error = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("must be host:port"), "{error}");
        std::fs::write(&path, "node_id = 1\nhttp_adr = \"x\"\n").unwrap();
        let error = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("http_adr"), "{error}");
        std::fs::write(
            &path,
            "node_id = 1\nhttp_addr = \"127.0.0.1:1\"\ngrpc_addr = \"127.0.0.1:2\"\ndata_dir = \"d\"\npublic_url = \"davit.example.com\"\n",
        )
        .unwrap();
        let error = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("public_url"), "{error}");
        let valid = "node_id = 1\nhttp_addr = \"127.0.0.1:1\"\ngrpc_addr = \"127.0.0.1:2\"\ndata_dir = \"d\"\n";
        std::fs::write(&path, format!("{valid}[outbound]\nallow_ranges = [\"10.0.0.1/8\"]\n")).unwrap();
        let error = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("[outbound] allow_ranges entry \"10.0.0.1/8\" has bits set after the prefix"), "{error}");
        std::fs::write(&path, format!("{valid}[outbound]\nallow_privat_networks = true\n")).unwrap();
        let error = NodeConfig::load(&path).unwrap_err().to_string();
        assert!(error.contains("allow_privat_networks"), "{error}");
        std::fs::write(&path, format!("{valid}[outbound]\nallow_hosts = [\"git.internal\"]\nallow_ranges = [\"10.20.0.0/16\"]\n")).unwrap();
        let config = NodeConfig::load(&path).unwrap();
        assert_eq!(config.outbound.allow_hosts, ["git.internal"]);
        assert!(!config.outbound.allow_private_networks && !config.outbound.allow_file_urls, "serve allows nothing internal by default");
    }

    #[test]
    fn the_public_url_defaults_to_the_http_listener() {
        let mut config: NodeConfig =
            toml::from_str("node_id = 1\nhttp_addr = \"10.0.0.5:8080\"\ngrpc_addr = \"10.0.0.5:9090\"\ndata_dir = \"d\"\n").unwrap();
        assert_eq!(config.public_base_url(), "http://10.0.0.5:8080");
        config.public_url = Some("https://davit.example.com/".into());
        config.validate().unwrap();
        assert_eq!(config.public_base_url(), "https://davit.example.com");
    }
}
