//! The rows of the replicated state: one struct per table of the client's data model (seed.txt)
//! plus what the design adds (API tokens, environments, agents, jobs). Fields are only added,
//! with `#[serde(default)]`, never renamed: stored bytes must keep decoding.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, stamped by the leader.
pub type Timestamp = i64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Developer,
    Admin,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub user_id: u64,
    pub username: String,
    pub email: String,
    pub password_hash: String,
    pub role: Role,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub token_id: u64,
    pub user_id: u64,
    pub name: String,
    /// SHA-256 of the token; the token itself is shown once and never stored.
    pub token_hash: String,
    pub created_at: Timestamp,
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScmType {
    Github,
    Gitlab,
    Bitbucket,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    pub repo_id: u64,
    pub name: String,
    pub repo_url: String,
    pub branch: String,
    pub scm_type: ScmType,
    /// Sealed (encrypted) by the API layer before it is proposed; never stored in clear.
    #[serde(default)]
    pub webhook_secret: Option<String>,
    #[serde(default)]
    pub user_id: Option<u64>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeployStrategy {
    #[serde(rename = "blue-green")]
    BlueGreen,
    #[serde(rename = "canary")]
    Canary,
    #[serde(rename = "rolling")]
    Rolling,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    pub pipeline_id: u64,
    pub name: String,
    pub repo_id: u64,
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub build_command: Option<String>,
    pub deploy_strategy: DeployStrategy,
    pub environment: String,
    pub is_active: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    Pending,
    InProgress,
    Success,
    Failed,
    RolledBack,
}

impl DeploymentStatus {
    pub fn is_final(self) -> bool {
        matches!(self, DeploymentStatus::Success | DeploymentStatus::Failed | DeploymentStatus::RolledBack)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub deployment_id: u64,
    pub pipeline_id: u64,
    pub commit_hash: String,
    pub status: DeploymentStatus,
    pub environment: String,
    #[serde(default)]
    pub start_time: Option<Timestamp>,
    #[serde(default)]
    pub end_time: Option<Timestamp>,
    #[serde(default)]
    pub triggered_by: Option<u64>,
    #[serde(default)]
    pub rollback_of: Option<u64>,
    #[serde(default)]
    pub config_overrides: BTreeMap<String, String>,
    /// Why the deployment ended as it did (failure, cancellation), when not plain success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub artifact_id: u64,
    pub pipeline_id: u64,
    pub version: String,
    /// Where the bytes live in the blob store (content-addressed by `digest`).
    pub artifact_path: String,
    /// SHA-256 of the uncompressed bytes, lower-case hex.
    pub digest: String,
    pub size_bytes: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    pub config_id: u64,
    pub environment: String,
    pub key: String,
    /// For a secret, the sealed (encrypted) value; the API never returns it in clear.
    pub value: String,
    pub is_secret: bool,
    #[serde(default)]
    pub pipeline_id: Option<u64>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// Metadata of one stored log segment; the lines themselves live in the blob store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSegment {
    pub deployment_id: u64,
    pub job_id: u64,
    pub sequence: u64,
    pub blob_key: String,
    pub bytes: u64,
    pub lines: u64,
    pub error_lines: u64,
    pub first_timestamp: Timestamp,
    pub last_timestamp: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotificationType {
    Email,
    Slack,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub notification_id: u64,
    pub user_id: u64,
    #[serde(rename = "type")]
    pub notification_type: NotificationType,
    pub target: String,
    pub events: Vec<String>,
    pub is_active: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// One entry of the hash-chained audit log: `hash = sha256(previous_hash || entry)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    pub audit_id: u64,
    #[serde(default)]
    pub user_id: Option<u64>,
    pub action: String,
    pub details: String,
    pub timestamp: Timestamp,
    pub log_index: u64,
    pub previous_hash: String,
    pub hash: String,
    /// Where the request came from (client address), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub agent_id: u64,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// SHA-256 of the agent's credential.
    pub credential_hash: String,
    pub registered_at: Timestamp,
    #[serde(default)]
    pub deregistered_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub agent_id: u64,
    /// The fencing token: reports carrying an older attempt are refused.
    pub attempt: u32,
    pub expires_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: u64,
    pub deployment_id: u64,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Executor-specific description (image, command, environment), opaque to the state machine.
    #[serde(default)]
    pub spec: serde_json::Value,
    pub status: JobStatus,
    pub attempt: u32,
    pub max_attempts: u32,
    #[serde(default)]
    pub lease: Option<Lease>,
    #[serde(default)]
    pub failure_reason: Option<String>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}
