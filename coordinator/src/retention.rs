//! Artifact retention, on the leader: deletes artifact records older than `[retention]
//! artifact_days` that no deployment still needs (through Raft, `Command::DeleteArtifact`), then
//! the blobs under `artifacts/` that no record refers to any more. It never deletes a blob it
//! has not seen unreferenced for [`BLOB_GRACE_MS`]: an upload writes its blob before its record
//! lands. What to delete is decided by pure functions; `run_once` does the IO.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::artifacts::blob_key;
use crate::blob_store::{BlobError, BlobStore};
use crate::config::RetentionSettings;
use crate::node::{Node, NodeError, Requester};
use crate::state::codec::decode;
use crate::state::records::{Artifact, Deployment, DeploymentStatus, Timestamp};
use crate::state::{Command, RejectionCode};
use crate::store::{StoreError, Table, full_range};

/// A blob no record refers to is deleted only once it has been seen unreferenced this long.
pub const BLOB_GRACE_MS: Timestamp = 3_600_000;
/// Records deleted per run at most (one Raft entry each); the rest go in the next runs.
const MAX_DELETIONS_PER_RUN: usize = 1000;
const DAY_MS: Timestamp = 86_400_000;

#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("deleting artifact {artifact_id} was refused: {message}")]
    Refused { artifact_id: u64, message: String },
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// This node is not the leader; nothing was looked at.
    pub not_leader: bool,
    pub artifacts_deleted: Vec<u64>,
    /// Old enough to go, kept because a deployment needs them.
    pub artifacts_kept_for_deployments: usize,
    pub blobs_deleted: Vec<String>,
    /// Unreferenced blobs still within their grace period.
    pub blobs_in_grace: usize,
}

/// The deployments whose artifacts must stay: every one not finished yet, and the latest
/// successful one of each (pipeline, environment), which is what runs there now.
pub fn deployments_in_use(deployments: &[Deployment]) -> Vec<&Deployment> {
    let mut latest_success: BTreeMap<(u64, &str), &Deployment> = BTreeMap::new();
    let mut in_use = Vec::new();
    for deployment in deployments {
        if !deployment.status.is_final() {
            in_use.push(deployment);
        } else if deployment.status == DeploymentStatus::Success {
            let finished = |d: &Deployment| (d.end_time.unwrap_or(d.updated_at), d.deployment_id);
            latest_success
                .entry((deployment.pipeline_id, deployment.environment.as_str()))
                .and_modify(|latest| {
                    if finished(deployment) > finished(latest) {
                        *latest = deployment;
                    }
                })
                .or_insert(deployment);
        }
    }
    in_use.extend(latest_success.into_values());
    in_use
}

/// The artifacts created before `cutoff` that no deployment in use needs, and how many old
/// ones were kept because one does. An artifact is needed when it was built for such a
/// deployment, or built by the same pipeline from the commit such a deployment deploys.
pub fn expired_artifacts(artifacts: &[Artifact], deployments: &[Deployment], cutoff: Timestamp) -> (Vec<u64>, usize) {
    let in_use = deployments_in_use(deployments);
    let deployment_ids: BTreeSet<u64> = in_use.iter().map(|deployment| deployment.deployment_id).collect();
    let commits: BTreeSet<(u64, &str)> =
        in_use.iter().map(|deployment| (deployment.pipeline_id, deployment.commit_hash.as_str())).collect();
    let mut expired = Vec::new();
    let mut kept = 0;
    for artifact in artifacts.iter().filter(|artifact| artifact.created_at < cutoff) {
        let needed = artifact.deployment_id.is_some_and(|id| deployment_ids.contains(&id))
            || artifact.commit_hash.as_deref().is_some_and(|commit| commits.contains(&(artifact.pipeline_id, commit)));
        if needed {
            kept += 1;
        } else {
            expired.push(artifact.artifact_id);
        }
    }
    (expired, kept)
}

/// Whether `key` is an artifact blob as uploads write them (`artifacts/sha256/ab/<digest>.zst`);
/// anything else under `artifacts/` is not ours to collect.
pub fn is_artifact_blob(key: &str) -> bool {
    key.strip_prefix("artifacts/sha256/")
        .and_then(|rest| rest.get(3..))
        .and_then(|file| file.strip_suffix(".zst"))
        .is_some_and(|digest| digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) && blob_key(digest) == key)
}

/// The blobs to delete now, and when each blob still unreferenced was first seen so (what the
/// next run gets as `first_seen`). A blob referenced again leaves the map, so its grace period
/// starts over if it is ever unreferenced again.
pub fn collectable_blobs(
    keys: &[String],
    referenced: &BTreeSet<String>,
    first_seen: &BTreeMap<String, Timestamp>,
    now: Timestamp,
) -> (Vec<String>, BTreeMap<String, Timestamp>) {
    let mut delete = Vec::new();
    let mut still_waiting = BTreeMap::new();
    for key in keys.iter().filter(|key| is_artifact_blob(key) && !referenced.contains(*key)) {
        let seen = first_seen.get(key).copied().unwrap_or(now);
        if now - seen >= BLOB_GRACE_MS {
            delete.push(key.clone());
        } else {
            still_waiting.insert(key.clone(), seen);
        }
    }
    (delete, still_waiting)
}

/// The retention worker. One per node; only the leader's does anything.
pub struct ArtifactRetention {
    node: Arc<Node>,
    blobs: Arc<dyn BlobStore>,
    settings: RetentionSettings,
    /// When each unreferenced artifact blob was first seen so, by this node (kept in memory: a
    /// new leader starts the grace periods over, which only delays collection).
    unreferenced_since: Mutex<BTreeMap<String, Timestamp>>,
}

impl ArtifactRetention {
    pub fn new(node: Arc<Node>, blobs: Arc<dyn BlobStore>, settings: RetentionSettings) -> Self {
        ArtifactRetention { node, blobs, settings, unreferenced_since: Mutex::new(BTreeMap::new()) }
    }

    /// Every `interval_seconds` (the first run after at most a minute), one [`run_once`].
    ///
    /// [`run_once`]: ArtifactRetention::run_once
    pub async fn run(self) {
        let interval = Duration::from_secs(self.settings.interval_seconds.max(1));
        let first = tokio::time::Instant::now() + interval.min(Duration::from_secs(60));
        let mut ticker = tokio::time::interval_at(first, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match self.run_once(crate::auth::now_millis()).await {
                Ok(report) if report.not_leader => {}
                Ok(report) => tracing::info!(
                    artifacts_deleted = report.artifacts_deleted.len(),
                    artifacts_kept_for_deployments = report.artifacts_kept_for_deployments,
                    blobs_deleted = report.blobs_deleted.len(),
                    blobs_in_grace = report.blobs_in_grace,
                    "artifact retention ran"
                ),
                Err(error) => tracing::warn!(%error, "artifact retention failed; it runs again at the next interval"),
            }
        }
    }

    /// One pass: delete the expired records, then the blobs unreferenced for the grace period.
    pub async fn run_once(&self, now: Timestamp) -> Result<RetentionReport, RetentionError> {
        if !self.node.is_leader() {
            return Ok(RetentionReport { not_leader: true, ..Default::default() });
        }
        self.node.read_barrier().await?;
        let mut report = RetentionReport::default();
        let artifacts: Vec<Artifact> = self.rows(Table::Artifacts)?;
        let deployments: Vec<Deployment> = self.rows(Table::Deployments)?;
        let retention_ms = Timestamp::try_from(self.settings.artifact_days).unwrap_or(Timestamp::MAX).saturating_mul(DAY_MS);
        let (expired, kept) = expired_artifacts(&artifacts, &deployments, now.saturating_sub(retention_ms));
        report.artifacts_kept_for_deployments = kept;
        for artifact_id in expired.into_iter().take(MAX_DELETIONS_PER_RUN) {
            let (outcome, _) = self.node.propose(&Requester::system(), Command::DeleteArtifact { artifact_id }).await?;
            match outcome.result {
                Ok(_) => report.artifacts_deleted.push(artifact_id),
                // Deleted through the API meanwhile.
                Err(rejection) if rejection.code == RejectionCode::NotFound => {}
                Err(rejection) => return Err(RetentionError::Refused { artifact_id, message: rejection.message }),
            }
        }

        // The leader has applied its own deletions when `propose` returns.
        let keys = self.blobs.list("artifacts/").await?;
        let referenced = self.referenced_blobs()?;
        let candidates = {
            let mut unreferenced_since = self.unreferenced_since.lock().expect("retention state lock");
            let (candidates, waiting) = collectable_blobs(&keys, &referenced, &unreferenced_since, now);
            report.blobs_in_grace = waiting.len();
            *unreferenced_since = waiting;
            candidates
        };
        if !candidates.is_empty() {
            // Look once more right before deleting, to narrow the window in which a record of
            // the same bytes lands between the look above and the deletion. (An upload through
            // the REST API also puts its blob back if it finds it gone after recording.)
            let referenced = self.referenced_blobs()?;
            for key in candidates.into_iter().filter(|key| !referenced.contains(key)) {
                self.blobs.delete(&key).await?;
                report.blobs_deleted.push(key);
            }
        }
        Ok(report)
    }

    fn rows<T: serde::de::DeserializeOwned>(&self, table: Table) -> Result<Vec<T>, StoreError> {
        self.node.backend.scan(table, full_range(), usize::MAX, false)?.into_iter().map(|(_, bytes)| decode(table, &bytes)).collect()
    }

    fn referenced_blobs(&self) -> Result<BTreeSet<String>, StoreError> {
        Ok(self.rows::<Artifact>(Table::Artifacts)?.into_iter().map(|artifact| artifact.artifact_path).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = 100 * DAY_MS;
    const CUTOFF: Timestamp = NOW - 30 * DAY_MS;

    fn deployment(
        deployment_id: u64,
        pipeline_id: u64,
        environment: &str,
        commit: &str,
        status: DeploymentStatus,
        ended: Timestamp,
    ) -> Deployment {
        Deployment {
            deployment_id,
            pipeline_id,
            commit_hash: commit.into(),
            status,
            environment: environment.into(),
            start_time: None,
            end_time: status.is_final().then_some(ended),
            triggered_by: None,
            rollback_of: None,
            config_overrides: BTreeMap::new(),
            status_reason: None,
            scm: None,
            events: 0,
            rollout: None,
            rolls_out: false,
            branch: None,
            release_of: None,
            required_approvals: None,
            approvals: Vec::new(),
            commit_time: None,
            configuration: None,
            created_at: ended - 1000,
            updated_at: ended,
        }
    }

    fn artifact(artifact_id: u64, pipeline_id: u64, created_at: Timestamp, commit: Option<&str>, deployment_id: Option<u64>) -> Artifact {
        let digest = format!("{artifact_id:064x}");
        Artifact {
            artifact_id,
            pipeline_id,
            version: "v1".into(),
            artifact_path: blob_key(&digest),
            digest,
            size_bytes: 1,
            created_at,
            updated_at: created_at,
            commit_hash: commit.map(str::to_string),
            deployment_id,
            job_id: None,
            kind: None,
        }
    }

    #[test]
    fn old_artifacts_go_unless_a_deployment_needs_them() {
        let old = CUTOFF - 1;
        let deployments = vec![
            // Pipeline 1, staging: 10 succeeded, then 11 succeeded later (11 runs there now).
            deployment(10, 1, "staging", "aaa", DeploymentStatus::Success, 5 * DAY_MS),
            deployment(11, 1, "staging", "bbb", DeploymentStatus::Success, 6 * DAY_MS),
            // Pipeline 1, production: still runs aaa's predecessor "zzz"; a failed attempt at ccc.
            deployment(12, 1, "production", "zzz", DeploymentStatus::Success, 4 * DAY_MS),
            deployment(13, 1, "production", "ccc", DeploymentStatus::Failed, 7 * DAY_MS),
            // In progress, and pending.
            deployment(14, 1, "staging", "ddd", DeploymentStatus::InProgress, 8 * DAY_MS),
            deployment(15, 2, "staging", "eee", DeploymentStatus::Pending, 8 * DAY_MS),
            deployment(16, 1, "staging", "fff", DeploymentStatus::RolledBack, 9 * DAY_MS),
        ];
        let artifacts = vec![
            artifact(1, 1, old, None, None),             // an old upload: goes
            artifact(2, 1, CUTOFF, None, None),          // exactly at the cutoff: young enough
            artifact(3, 1, old, Some("aaa"), Some(10)),  // superseded in staging: goes
            artifact(4, 1, old, Some("bbb"), Some(11)),  // runs in staging: kept
            artifact(5, 1, old, Some("zzz"), None),      // runs in production: kept by commit
            artifact(6, 1, old, Some("ccc"), Some(13)),  // a failed deployment's: goes
            artifact(7, 1, old, Some("ddd"), Some(14)),  // in progress: kept
            artifact(8, 2, old, None, Some(15)),         // built for a pending deployment: kept
            artifact(9, 2, old, Some("bbb"), None),      // same commit, other pipeline: goes
            artifact(10, 1, old, Some("fff"), Some(16)), // rolled back: goes
            artifact(11, 1, NOW, Some("aaa"), None),     // new: stays whatever it is
        ];
        let (expired, kept) = expired_artifacts(&artifacts, &deployments, CUTOFF);
        assert_eq!(expired, vec![1, 3, 6, 9, 10]);
        assert_eq!(kept, 4);
        let in_use: BTreeSet<u64> = deployments_in_use(&deployments).iter().map(|d| d.deployment_id).collect();
        assert_eq!(in_use, BTreeSet::from([11, 12, 14, 15]));
    }

    #[test]
    fn the_latest_success_is_the_last_to_finish() {
        // 21 was created after 20 but finished first: 20 is what runs now.
        let deployments = vec![
            deployment(20, 1, "staging", "aaa", DeploymentStatus::Success, 9 * DAY_MS),
            deployment(21, 1, "staging", "bbb", DeploymentStatus::Success, 8 * DAY_MS),
        ];
        let in_use: Vec<u64> = deployments_in_use(&deployments).iter().map(|d| d.deployment_id).collect();
        assert_eq!(in_use, vec![20]);
    }

    #[test]
    fn blobs_go_only_after_their_grace_period_unreferenced() {
        let key = |n: u64| blob_key(&format!("{n:064x}"));
        let keys = vec![key(1), key(2), key(3), "artifacts/readme.txt".to_string(), "artifacts/sha256/zz/nothex.zst".to_string()];
        let referenced = BTreeSet::from([key(1)]);
        // First look: 2 and 3 are unreferenced since now.
        let (delete, waiting) = collectable_blobs(&keys, &referenced, &BTreeMap::new(), NOW);
        assert!(delete.is_empty());
        assert_eq!(waiting, BTreeMap::from([(key(2), NOW), (key(3), NOW)]));
        // Just before the grace period ends, nothing yet; 3 got referenced meanwhile.
        let referenced = BTreeSet::from([key(1), key(3)]);
        let (delete, waiting) = collectable_blobs(&keys, &referenced, &waiting, NOW + BLOB_GRACE_MS - 1);
        assert!(delete.is_empty());
        assert_eq!(waiting, BTreeMap::from([(key(2), NOW)]));
        // At the end of it, 2 goes.
        let (delete, waiting) = collectable_blobs(&keys, &referenced, &waiting, NOW + BLOB_GRACE_MS);
        assert_eq!(delete, vec![key(2)]);
        assert!(waiting.is_empty());
    }

    #[test]
    fn only_upload_shaped_keys_are_artifact_blobs() {
        let digest = "ab".repeat(32);
        assert!(is_artifact_blob(&blob_key(&digest)));
        for other in [
            format!("artifacts/sha256/cd/{digest}.zst"),
            format!("artifacts/sha256/ab/{digest}"),
            format!("artifacts/sha256/ab/{}.zst", &digest[..62]),
            format!("logs/sha256/ab/{digest}.zst"),
            "artifacts/sha256/ab".to_string(),
        ] {
            assert!(!is_artifact_blob(&other), "{other}");
        }
    }

    /// The IO half against a real single node: records go through Raft, blobs wait out their
    /// grace period, and a blob referenced again is spared.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_real_node_deletes_expired_records_then_their_blobs() {
        use crate::blob_store::DirBlobStore;
        use crate::state::records::{DeployStrategy, ScmType};
        let dir = tempfile::tempdir().unwrap();
        let node = crate::node::testing::single_leader(&dir.path().join("data"), "").await;
        let blobs: Arc<dyn BlobStore> = Arc::new(DirBlobStore::open(&dir.path().join("blobs")).unwrap());
        let propose = |command: Command| {
            let node = node.clone();
            async move {
                let (outcome, _) = node.propose(&Requester::system(), command).await.unwrap();
                outcome.result.unwrap().id.unwrap()
            }
        };
        let repo_id = propose(Command::ConnectRepository {
            name: "repo".into(),
            repo_url: "https://github.com/org/repo".into(),
            branch: "main".into(),
            scm_type: ScmType::Github,
            webhook_secret: None,
            api_url: None,
            access_token: None,
            poll_interval_seconds: None,
        })
        .await;
        let pipeline_id = propose(Command::CreatePipeline {
            name: "build".into(),
            repo_id,
            branch: None,
            build_command: None,
            deploy_strategy: DeployStrategy::Rolling,
            environment: "staging".into(),
            build: Default::default(),
            deploy: Default::default(),
        })
        .await;
        let digest = |n: u64| format!("{n:064x}");
        let record = |n: u64| Command::RecordArtifact {
            pipeline_id,
            version: format!("v{n}"),
            artifact_path: blob_key(&digest(n)),
            digest: digest(n),
            size_bytes: 1,
            produced_by: None,
        };
        // Blob 1 is referenced twice, blob 2 once, blob 3 never; a stranger under artifacts/.
        let first = propose(record(1)).await;
        let second = propose(record(1)).await;
        let third = propose(record(2)).await;
        for key in [blob_key(&digest(1)), blob_key(&digest(2)), blob_key(&digest(3)), "artifacts/notes.txt".to_string()] {
            blobs.put(&key, b"x".to_vec()).await.unwrap();
        }

        let retention =
            ArtifactRetention::new(node.clone(), blobs.clone(), RetentionSettings { artifact_days: 30, interval_seconds: 3600 });
        let now = crate::auth::now_millis();
        let report = retention.run_once(now).await.unwrap();
        assert_eq!(report, RetentionReport { blobs_in_grace: 1, ..Default::default() }, "nothing is 30 days old yet");

        let later = now + 31 * DAY_MS;
        let report = retention.run_once(later).await.unwrap();
        assert_eq!(report.artifacts_deleted, vec![first, second, third]);
        // Blob 3 has been unreferenced since the first run; 1 and 2 only since now.
        assert_eq!(report.blobs_deleted, vec![blob_key(&digest(3))]);
        assert_eq!(report.blobs_in_grace, 2);
        let report = retention.run_once(later + BLOB_GRACE_MS - 1).await.unwrap();
        assert!(report.artifacts_deleted.is_empty() && report.blobs_deleted.is_empty());

        // Blob 2's bytes are recorded again. A new leader (here with a longer retention) starts
        // the grace periods over, and spares what a record refers to.
        propose(record(2)).await;
        let new_leader =
            ArtifactRetention::new(node.clone(), blobs.clone(), RetentionSettings { artifact_days: 365, interval_seconds: 3600 });
        let report = new_leader.run_once(later + BLOB_GRACE_MS).await.unwrap();
        assert_eq!(report, RetentionReport { blobs_in_grace: 1, ..Default::default() });
        let report = new_leader.run_once(later + 2 * BLOB_GRACE_MS).await.unwrap();
        assert_eq!(report, RetentionReport { blobs_deleted: vec![blob_key(&digest(1))], ..Default::default() });
        let left = blobs.list("artifacts/").await.unwrap();
        assert_eq!(left, vec!["artifacts/notes.txt".to_string(), blob_key(&digest(2))]);
    }

    #[test]
    fn the_retention_section_has_defaults() {
        let settings: RetentionSettings = toml::from_str("").unwrap();
        assert_eq!(settings, RetentionSettings { artifact_days: 30, interval_seconds: 3600 });
        let settings: RetentionSettings = toml::from_str("artifact_days = 7").unwrap();
        assert_eq!(settings, RetentionSettings { artifact_days: 7, interval_seconds: 3600 });
        assert!(toml::from_str::<RetentionSettings>("artifact_dayz = 7").is_err());
    }
}
