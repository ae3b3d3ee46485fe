//! The agent's settings (a TOML file, overridden by flags) and its identity on disk: the
//! credential `davit-agent register` received, kept in `<state_dir>/agent.json` with mode 0600.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorChoice {
    /// Docker when the engine answers, else the shell executor, saying so at start.
    Auto,
    Docker,
    Shell,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Where the credential, the log spool and job workspaces live.
    pub state_dir: PathBuf,
    /// Coordinators' gRPC addresses (`host:port`); more are learnt from the cluster.
    pub coordinators: Vec<String>,
    /// This agent's region: coordinators of the same region are preferred.
    pub region: Option<String>,
    /// Concurrent jobs.
    pub capacity: u32,
    pub executor: ExecutorChoice,
    /// Labels announced besides those given at registration.
    pub labels: BTreeMap<String, String>,
    /// URL schemes git may fetch from. `file` only when the operator adds it.
    pub git_protocols: Vec<String>,
    /// A CA certificate (PEM) to verify coordinators with; TLS is used when set.
    pub ca_file: Option<PathBuf>,
    /// Exit once drained (no job running after `davit-agent drain`).
    pub exit_when_drained: bool,
    /// The address the traffic switches of released services listen on (each on its service's
    /// public port). All interfaces by default; one 127.0.0.x per agent when several agents share
    /// a machine, as in tests.
    pub service_address: std::net::IpAddr,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            state_dir: PathBuf::from("/var/lib/davit-agent"),
            coordinators: vec!["127.0.0.1:7701".into()],
            region: None,
            capacity: 2,
            executor: ExecutorChoice::Auto,
            labels: BTreeMap::new(),
            git_protocols: vec!["https".into(), "ssh".into(), "git".into()],
            ca_file: None,
            exit_when_drained: true,
            service_address: std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        }
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read agent config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("agent config {} is not valid: {e}", path.display()))
    }

    pub fn identity_path(&self) -> PathBuf {
        self.state_dir.join("agent.json")
    }

    pub fn drain_path(&self) -> PathBuf {
        self.state_dir.join("drain")
    }
}

/// What registration gave this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub agent_id: u64,
    pub name: String,
    pub credential: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Coordinators known at registration.
    #[serde(default)]
    pub coordinators: Vec<String>,
}

impl Identity {
    pub fn load(path: &Path) -> anyhow::Result<Identity> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!(
                "this agent is not registered ({}: {e}); run `davit-agent register --token <registration token>` first",
                path.display()
            )
        })?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is damaged ({e}); register the agent again", path.display()))
    }

    /// Write the identity with mode 0600 (it holds the credential), atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let temporary = path.with_extension("json.tmp");
        let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&temporary)?;
        file.write_all(serde_json::to_string_pretty(self)?.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        Ok(())
    }
}
