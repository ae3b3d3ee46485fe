//! The release manager's file per service, `<state_dir>/releases/<service>.json`: what runs
//! behind the service's switch and how traffic is split, so that a restarted agent resumes it.
//! Written whole to a temporary file and renamed into place, so a crash leaves the old or the
//! new file, never half of one. The format is documented in the module doc of `release`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The version written into every file; a reader refuses versions it does not know.
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    pub version: u32,
    pub service: String,
    /// The port the service's switch owns (0 before the first operation bound it).
    #[serde(default)]
    pub public_port: u16,
    /// Every release ever started on this host for the service, oldest first; stopped ones
    /// stay (with `stopped: true`) so that image clean-up knows their order.
    #[serde(default)]
    pub releases: Vec<ReleaseRecord>,
    /// The current routing: release name to percent of requests (absent means 0).
    #[serde(default)]
    pub weights: BTreeMap<String, u8>,
    /// Every routing change, in order; a change that changes nothing is not recorded.
    #[serde(default)]
    pub history: Vec<RoutingChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// `d<deployment id>`.
    pub name: String,
    pub container_id: String,
    /// The port on 127.0.0.1 that Docker published the release's `container_port` on.
    pub host_port: u16,
    /// The port the release listens on inside its container.
    #[serde(default)]
    pub container_port: u16,
    /// The image the container runs (`sha256:...` id), and the tag the agent gave it.
    pub image: String,
    #[serde(default)]
    pub image_tag: String,
    /// The artifact digest the release came from.
    pub digest: String,
    /// Unix milliseconds.
    pub started_at: i64,
    pub stopped: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingChange {
    /// Unix milliseconds.
    pub at_ms: i64,
    pub weights: BTreeMap<String, u8>,
}

impl ServiceState {
    pub fn new(service: &str) -> ServiceState {
        ServiceState {
            version: STATE_VERSION,
            service: service.to_string(),
            public_port: 0,
            releases: Vec::new(),
            weights: BTreeMap::new(),
            history: Vec::new(),
        }
    }

    pub fn release(&self, name: &str) -> Option<&ReleaseRecord> {
        self.releases.iter().find(|release| release.name == name)
    }

    pub fn release_mut(&mut self, name: &str) -> Option<&mut ReleaseRecord> {
        self.releases.iter_mut().find(|release| release.name == name)
    }

    /// Whether `name` is a release that runs (started and not stopped).
    pub fn is_running(&self, name: &str) -> bool {
        self.release(name).is_some_and(|release| !release.stopped)
    }

    /// Replace the routing with `weights` (zero weights dropped); records a history entry and
    /// returns true only when that changes something.
    pub fn set_weights(&mut self, weights: BTreeMap<String, u8>, now_ms: i64) -> bool {
        let weights: BTreeMap<String, u8> = weights.into_iter().filter(|(_, weight)| *weight > 0).collect();
        if weights == self.weights {
            return false;
        }
        self.weights = weights.clone();
        self.history.push(RoutingChange { at_ms: now_ms, weights });
        true
    }
}

/// `<state_dir>/releases/<service>.json`.
pub fn state_path(releases_dir: &Path, service: &str) -> PathBuf {
    releases_dir.join(format!("{service}.json"))
}

pub fn load(path: &Path) -> Result<ServiceState, String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let state: ServiceState = serde_json::from_str(&text)
        .map_err(|error| format!("{} is damaged ({error}); move it away to let the agent start the service afresh", path.display()))?;
    if state.version != STATE_VERSION {
        return Err(format!(
            "{} has version {} but this agent reads version {STATE_VERSION}; upgrade the agent",
            path.display(),
            state.version
        ));
    }
    Ok(state)
}

/// Write `state` to `path` through a temporary file, fsynced and renamed into place.
pub fn save(path: &Path, state: &ServiceState) -> Result<(), String> {
    use std::io::Write;
    let failed = |error: std::io::Error| format!("cannot write the release state {}: {error}", path.display());
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    let temporary = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(state).map_err(|error| format!("cannot encode the release state: {error}"))?;
    let mut file = std::fs::File::create(&temporary).map_err(failed)?;
    file.write_all(&text).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)
}

/// Service names become file and container names: letters, digits, `-`, `_` and `.` only.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 100
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(format!("{what} {name:?} must be 1 to 100 letters, digits, '-', '_' or '.', starting with a letter or digit"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_weight_change_that_changes_nothing_is_not_recorded() {
        let mut state = ServiceState::new("web-production");
        assert!(state.set_weights(BTreeMap::from([("d1".to_string(), 100)]), 10));
        assert!(!state.set_weights(BTreeMap::from([("d1".to_string(), 100), ("d0".to_string(), 0)]), 20));
        assert_eq!(state.history.len(), 1);
        assert!(state.set_weights(BTreeMap::from([("d1".to_string(), 90), ("d2".to_string(), 10)]), 30));
        assert_eq!(state.history.iter().map(|change| change.at_ms).collect::<Vec<_>>(), vec![10, 30]);
    }

    #[test]
    fn version_1_files_still_load() {
        let frozen = r#"{"version":1,"service":"web-staging","public_port":8080,
            "releases":[{"name":"d3","container_id":"abc","host_port":32768,"image":"sha256:1","image_tag":"davit-release/web-staging:d3",
            "digest":"ff","started_at":5,"stopped":false}],
            "weights":{"d3":100},"history":[{"at_ms":6,"weights":{"d3":100}}]}"#;
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("web-staging.json");
        std::fs::write(&path, frozen).unwrap();
        let state = load(&path).unwrap();
        assert_eq!(state.releases[0].host_port, 32768);
        assert_eq!(state.history[0].weights["d3"], 100);
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), state);
    }

    #[test]
    fn names_that_would_escape_a_path_are_refused() {
        assert!(check_name("service", "web-production").is_ok());
        assert!(check_name("service", "../etc").is_err());
        assert!(check_name("service", "").is_err());
        assert!(check_name("release", "d 1").is_err());
    }
}
