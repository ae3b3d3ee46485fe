//! The agent files shipped in `cluster-configs/agent/` work as shipped: `agent.toml` parses with
//! the agent's own loader (which denies unknown keys), with and without its optional settings,
//! and the systemd unit runs the agent with that file and the state directory it names.

use std::path::{Path, PathBuf};

use davit_agent::config::{AgentConfig, ExecutorChoice};

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-configs/agent").join(name)
}

#[test]
fn shipped_agent_config_parses() {
    let config = AgentConfig::load(&shipped("agent.toml")).unwrap_or_else(|error| panic!("{error:#}"));
    assert_eq!(config.state_dir, PathBuf::from("/var/lib/davit-agent"));
    assert_eq!(config.coordinators.len(), 3, "{:?}", config.coordinators);
    assert!(config.coordinators.iter().all(|address| address.ends_with(":7701")), "{:?}", config.coordinators);
    assert_eq!(config.executor, ExecutorChoice::Auto);
    assert_eq!(config.capacity, 2);
    assert!(config.exit_when_drained);
    assert_eq!(config.git_protocols, ["https", "ssh", "git"]);
    assert_eq!(config.labels.get("disk").map(String::as_str), Some("ssd"));
    assert_eq!(config.ca_file, None, "TLS is off unless the operator turns it on");
    assert_eq!(config.service_address, AgentConfig::default().service_address);
}

/// Optional settings are shipped commented out as `#key = value`; with the `#` removed they
/// must parse too, so that the example never documents a misspelt key.
#[test]
fn optional_settings_in_the_shipped_config_parse() {
    let text = std::fs::read_to_string(shipped("agent.toml")).expect("read agent.toml");
    let mut uncommented = 0;
    let text: String = text
        .lines()
        .map(|line| match line.strip_prefix('#') {
            Some(setting) if setting.starts_with(|c: char| c.is_ascii_lowercase()) && setting.contains(" = ") => {
                uncommented += 1;
                format!("{setting}\n")
            }
            _ => format!("{line}\n"),
        })
        .collect();
    assert!(uncommented >= 1, "agent.toml should show ca_file as an optional setting");
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("agent.toml");
    std::fs::write(&path, text).expect("write the uncommented config");
    let config = AgentConfig::load(&path).unwrap_or_else(|error| panic!("{error:#}"));
    assert_eq!(config.ca_file, Some(PathBuf::from("/etc/davit/ca.pem")));
}

#[test]
fn shipped_service_unit_runs_the_shipped_config() {
    let unit = std::fs::read_to_string(shipped("davit-agent.service")).expect("read davit-agent.service");
    let setting = |key: &str| {
        unit.lines()
            .find_map(|line| line.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
            .unwrap_or_else(|| panic!("davit-agent.service has no {key}="))
    };
    assert_eq!(setting("ExecStart"), "/usr/local/bin/davit-agent --config /etc/davit/agent.toml run");
    assert_eq!(setting("KillSignal"), "SIGTERM");
    assert!(setting("TimeoutStopSec").parse::<u64>().is_ok_and(|seconds| seconds >= 3600), "draining needs time");
    let config = AgentConfig::load(&shipped("agent.toml")).unwrap_or_else(|error| panic!("{error:#}"));
    assert_eq!(Path::new("/var/lib").join(setting("StateDirectory")), config.state_dir, "the unit creates the config's state_dir");
}
