//! Commit statuses: which state a run shows on its commit, and the exact HTTP request each
//! provider's commit-status API takes for it. Pure: no network, clock or store; the reporter
//! (`commit_status.rs`) sends what this builds. It must never put the access token anywhere but
//! the authentication header, nor let it reach a `Debug` print.
//!
//! The providers' documentation this follows:
//! - GitHub: "Create a commit status", <https://docs.github.com/en/rest/commits/statuses#create-a-commit-status>
//!   (`POST /repos/{owner}/{repo}/statuses/{sha}`; state `error`, `failure`, `pending` or `success`;
//!   `target_url`, `description`, `context`).
//! - GitLab: "Set the pipeline status of a commit", <https://docs.gitlab.com/api/commits/#set-the-pipeline-status-of-a-commit>
//!   (`POST /projects/:id/statuses/:sha`, `:id` the URL-encoded path; state `pending`, `running`,
//!   `success`, `failed` or `canceled`; `name`, `target_url`, `description`; `PRIVATE-TOKEN`).
//! - Bitbucket Cloud: "Create a build status for a commit",
//!   <https://developer.atlassian.com/cloud/bitbucket/rest/api-group-commit-statuses/#api-repositories-workspace-repo-slug-commit-commit-statuses-build-post>
//!   (`POST /repositories/{workspace}/{repo_slug}/commit/{commit}/statuses/build`; `key`, state
//!   `INPROGRESS`, `SUCCESSFUL`, `FAILED` or `STOPPED`, `name`, `url`, `description`; a status
//!   with the same key is overwritten).

use serde_json::json;

use crate::state::records::{Deployment, DeploymentStatus, Job, JobStatus, ScmType};

/// GitHub limits a status description to 140 characters; the others take more, but a line
/// that long says all a status needs to.
pub const MAX_DESCRIPTION_CHARS: usize = 140;

/// The public API of each provider, used when a repository names no `api_url`.
pub fn default_api_base(provider: ScmType) -> &'static str {
    match provider {
        ScmType::Github => "https://api.github.com",
        ScmType::Gitlab => "https://gitlab.com/api/v4",
        ScmType::Bitbucket => "https://api.bitbucket.org/2.0",
        ScmType::Git => "",
    }
}

/// What a run looks like on its commit. Richer than any one provider's list: each maps it to
/// its own states (GitHub has no "running" or "cancelled", for example).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CommitState {
    /// Waiting for an agent.
    Queued,
    Running,
    Succeeded,
    /// The build's own commands failed (or its deployment was rolled back).
    Failed,
    /// The infrastructure failed it (agents lost with no attempts left): not the commit's fault.
    Errored,
    /// Cancelled by a user.
    Cancelled,
}

impl CommitState {
    pub fn is_final(self) -> bool {
        !matches!(self, CommitState::Queued | CommitState::Running)
    }

    /// A one-line description for the provider's UI.
    pub fn describe(self) -> &'static str {
        match self {
            CommitState::Queued => "Queued: waiting for an agent",
            CommitState::Running => "Running",
            CommitState::Succeeded => "Succeeded",
            CommitState::Failed => "Failed",
            CommitState::Errored => "Infrastructure error",
            CommitState::Cancelled => "Cancelled",
        }
    }
}

/// The state a deployment shows on its commit, given its jobs. A failed deployment is a
/// failure of the commit only when one of its jobs failed on its own commands; a cancellation
/// (jobs cancelled, none failed) or an infrastructure failure (the failed job's last attempt ended
/// as `infrastructure` or `lost`) is an error, so that a red cross on a commit always means
/// "your change broke the build".
pub fn commit_state(deployment: &Deployment, jobs: &[Job]) -> CommitState {
    match deployment.status {
        DeploymentStatus::Pending => CommitState::Queued,
        DeploymentStatus::InProgress => CommitState::Running,
        DeploymentStatus::Success => CommitState::Succeeded,
        DeploymentStatus::RolledBack => CommitState::Failed,
        DeploymentStatus::Failed => {
            let mut failed_jobs = jobs.iter().filter(|job| job.status == JobStatus::Failed).peekable();
            if failed_jobs.peek().is_none() {
                return CommitState::Cancelled;
            }
            let infrastructure = |job: &Job| {
                job.attempts
                    .last()
                    .and_then(|attempt| attempt.outcome.as_deref())
                    .is_some_and(|outcome| matches!(outcome, "infrastructure" | "lost"))
            };
            if failed_jobs.all(infrastructure) { CommitState::Errored } else { CommitState::Failed }
        }
    }
}

/// The commit whose status a deployment reports: for a run started by source control, the commit
/// the provider announced (a pull request's own head, where the provider shows its checks — the
/// run itself builds the trial merge); otherwise the deployed commit.
pub fn reported_commit(deployment: &Deployment) -> String {
    match &deployment.scm {
        Some(origin) if !origin.head_commit.is_empty() => origin.head_commit.clone(),
        _ => deployment.commit_hash.clone(),
    }
}

/// The path of a repository on its provider, from its clone URL: `owner/repo` on GitHub and
/// Bitbucket (`workspace/repo_slug`), `group/subgroup/project` on GitLab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryPath {
    pub segments: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    #[error("repository URL {url:?} has no owner/repository path to report commit statuses to")]
    NoRepositoryPath { url: String },
    #[error("repository URL {url:?} must name exactly {expected} for {provider}, not {found} path segments")]
    WrongPathDepth { url: String, provider: &'static str, expected: &'static str, found: usize },
    #[error("commit {commit:?} is not a hexadecimal commit hash")]
    InvalidCommit { commit: String },
    #[error("API base URL {url:?} must start with https:// or http://")]
    InvalidApiBase { url: String },
    #[error("a plain git server has no commit-status API")]
    NoStatusApi,
}

/// Parse the provider path out of a clone URL: `https://host/owner/repo(.git)`,
/// `ssh://git@host:22/owner/repo.git`, or scp-like `git@host:owner/repo.git`. A trailing slash and
/// `.git` are dropped.
pub fn repository_path(repo_url: &str) -> Result<RepositoryPath, StatusError> {
    let missing = || StatusError::NoRepositoryPath { url: repo_url.to_string() };
    let path = if let Some((_, rest)) = repo_url.split_once("://") {
        // host[:port] then the path; user info sits before the host and has no slash.
        rest.split_once('/').map(|(_, path)| path).ok_or_else(missing)?
    } else {
        // scp-like: [user@]host:path
        repo_url.split_once(':').map(|(_, path)| path).ok_or_else(missing)?
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    let segments: Vec<String> = path.split('/').filter(|segment| !segment.is_empty()).map(str::to_string).collect();
    if segments.is_empty() || segments.iter().any(|segment| segment == "." || segment == "..") {
        return Err(missing());
    }
    Ok(RepositoryPath { segments })
}

/// One commit status to send, everything in clear: the request builder's input.
pub struct StatusUpdate<'a> {
    pub provider: ScmType,
    /// The API base (`api_url`, or [`default_api_base`]).
    pub api_base: &'a str,
    pub repo_url: &'a str,
    pub commit: &'a str,
    pub state: CommitState,
    /// The run's page in the dashboard.
    pub target_url: &'a str,
    pub description: &'a str,
    /// Tells this status apart from other systems' and other pipelines' on the same commit
    /// (GitHub `context`, GitLab `name`, Bitbucket `key` and `name`).
    pub context: &'a str,
    pub access_token: &'a str,
}

/// An HTTP request to a provider, ready to send. `Debug` hides the authentication header.
#[derive(Clone, PartialEq, Eq)]
pub struct StatusRequest {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    pub body: serde_json::Value,
}

impl std::fmt::Debug for StatusRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<(&str, &str)> =
            self.headers.iter().map(|(name, value)| (*name, if is_credential_header(name) { "***" } else { value.as_str() })).collect();
        f.debug_struct("StatusRequest")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &headers)
            .field("body", &self.body)
            .finish()
    }
}

fn is_credential_header(name: &str) -> bool {
    name.eq_ignore_ascii_case("authorization") || name.eq_ignore_ascii_case("private-token")
}

/// The provider's state name for `state`.
pub fn provider_state(provider: ScmType, state: CommitState) -> &'static str {
    match (provider, state) {
        (ScmType::Github, CommitState::Queued | CommitState::Running) => "pending",
        (ScmType::Github, CommitState::Succeeded) => "success",
        (ScmType::Github, CommitState::Failed) => "failure",
        (ScmType::Github, CommitState::Errored | CommitState::Cancelled) => "error",
        (ScmType::Gitlab, CommitState::Queued) => "pending",
        (ScmType::Gitlab, CommitState::Running) => "running",
        (ScmType::Gitlab, CommitState::Succeeded) => "success",
        (ScmType::Gitlab, CommitState::Failed | CommitState::Errored) => "failed",
        (ScmType::Gitlab, CommitState::Cancelled) => "canceled",
        (ScmType::Bitbucket, CommitState::Queued | CommitState::Running) => "INPROGRESS",
        (ScmType::Bitbucket, CommitState::Succeeded) => "SUCCESSFUL",
        (ScmType::Bitbucket, CommitState::Failed | CommitState::Errored) => "FAILED",
        (ScmType::Bitbucket, CommitState::Cancelled) => "STOPPED",
        (ScmType::Git, _) => "",
    }
}

/// Percent-encode everything but RFC 3986's unreserved characters, so that a path segment
/// (or GitLab's `namespace/project`, slash included) stays one segment.
fn encode_segment(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn truncate_chars(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The request that sets `update.state` on the commit, per the provider's documentation (see
/// the module comment).
pub fn build_request(update: &StatusUpdate) -> Result<StatusRequest, StatusError> {
    let api_base = update.api_base.trim_end_matches('/');
    if !(api_base.starts_with("https://") || api_base.starts_with("http://")) || api_base.contains(['?', '#']) {
        return Err(StatusError::InvalidApiBase { url: update.api_base.to_string() });
    }
    if !(7..=64).contains(&update.commit.len()) || !update.commit.bytes().all(|byte| byte.is_ascii_hexdigit()) {
        return Err(StatusError::InvalidCommit { commit: update.commit.to_string() });
    }
    let commit = update.commit.to_ascii_lowercase();
    let path = repository_path(update.repo_url)?;
    let description = truncate_chars(update.description, MAX_DESCRIPTION_CHARS);
    let state = provider_state(update.provider, update.state);
    let owner_and_name = |provider: &'static str, expected: &'static str| match path.segments.as_slice() {
        [owner, name] => Ok((encode_segment(owner), encode_segment(name))),
        segments => Err(StatusError::WrongPathDepth { url: update.repo_url.to_string(), provider, expected, found: segments.len() }),
    };
    let json_content = ("Content-Type", "application/json".to_string());
    Ok(match update.provider {
        ScmType::Github => {
            let (owner, repo) = owner_and_name("GitHub", "owner/repository")?;
            StatusRequest {
                method: "POST",
                url: format!("{api_base}/repos/{owner}/{repo}/statuses/{commit}"),
                headers: vec![
                    ("Authorization", format!("Bearer {}", update.access_token)),
                    ("Accept", "application/vnd.github+json".to_string()),
                    ("X-GitHub-Api-Version", "2022-11-28".to_string()),
                    json_content,
                ],
                body: json!({
                    "state": state,
                    "target_url": update.target_url,
                    "description": description,
                    "context": update.context,
                }),
            }
        }
        ScmType::Gitlab => {
            let project = encode_segment(&path.segments.join("/"));
            StatusRequest {
                method: "POST",
                url: format!("{api_base}/projects/{project}/statuses/{commit}"),
                headers: vec![("PRIVATE-TOKEN", update.access_token.to_string()), json_content],
                body: json!({
                    "state": state,
                    "target_url": update.target_url,
                    "description": description,
                    "name": update.context,
                }),
            }
        }
        ScmType::Bitbucket => {
            let (workspace, repo_slug) = owner_and_name("Bitbucket", "workspace/repository")?;
            StatusRequest {
                method: "POST",
                url: format!("{api_base}/repositories/{workspace}/{repo_slug}/commit/{commit}/statuses/build"),
                headers: vec![("Authorization", format!("Bearer {}", update.access_token)), json_content],
                body: json!({
                    "key": bitbucket_key(update.context),
                    "state": state,
                    "name": update.context,
                    "url": update.target_url,
                    "description": description,
                }),
            }
        }
        ScmType::Git => return Err(StatusError::NoStatusApi),
    })
}

/// Bitbucket identifies a status by its `key` (a later status with the same key replaces it);
/// the context is that identity. Kept to 40 characters (what Bitbucket Data Center allows), the
/// rest replaced by a hash so that two long contexts stay apart.
pub fn bitbucket_key(context: &str) -> String {
    if context.chars().count() <= 40 {
        return context.to_string();
    }
    use sha2::Digest;
    let digest = crate::state::apply::hex(&sha2::Sha256::digest(context.as_bytes()));
    let head: String = context.chars().take(31).collect();
    format!("{head}-{}", &digest[..8])
}

/// The context of a pipeline's statuses: `davit/<pipeline>`, with the environment when the run
/// deploys somewhere other than the pipeline's own environment (so that the two do not replace
/// each other's status on the same commit).
pub fn status_context(pipeline_name: &str, pipeline_environment: &str, deployment_environment: &str) -> String {
    if pipeline_environment == deployment_environment {
        format!("davit/{pipeline_name}")
    } else {
        format!("davit/{pipeline_name} ({deployment_environment})")
    }
}

/// The run's page in the dashboard.
pub fn run_url(public_base_url: &str, deployment_id: u64) -> String {
    format!("{}/runs/{deployment_id}", public_base_url.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::records::AttemptRecord;

    const SHA: &str = "ec26c3e57ca3a959ca5aad62de7213c562f8c821";

    fn update<'a>(provider: ScmType, api_base: &'a str, repo_url: &'a str, state: CommitState) -> StatusUpdate<'a> {
        StatusUpdate {
            provider,
            api_base,
            repo_url,
            commit: SHA,
            state,
            target_url: "https://davit.example.com/runs/7",
            description: "Running",
            context: "davit/build",
            access_token: "token-123",
        }
    }

    fn header<'a>(request: &'a StatusRequest, name: &str) -> Option<&'a str> {
        request.headers.iter().find(|(header, _)| header.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    #[test]
    fn repository_paths_come_from_https_ssh_and_scp_urls() {
        let path = |url: &str| repository_path(url).unwrap().segments;
        assert_eq!(path("https://github.com/octo-org/hello-world"), ["octo-org", "hello-world"]);
        assert_eq!(path("https://github.com/octo-org/hello-world.git"), ["octo-org", "hello-world"]);
        assert_eq!(path("https://github.com/octo-org/hello-world/"), ["octo-org", "hello-world"]);
        assert_eq!(path("https://user:pw@ghe.example.com:8443/org/repo.git"), ["org", "repo"]);
        assert_eq!(path("git@github.com:octo-org/hello-world.git"), ["octo-org", "hello-world"]);
        assert_eq!(path("ssh://git@gitlab.example.com:2222/group/sub/project.git"), ["group", "sub", "project"]);
        assert_eq!(path("git@gitlab.com:group/sub/project"), ["group", "sub", "project"]);
        assert_eq!(path("https://bitbucket.org/workspace/repo-slug.git"), ["workspace", "repo-slug"]);
        for bad in ["https://github.com", "https://github.com/", "git@github.com:", "no-path", "https://h/a/../b"] {
            assert!(matches!(repository_path(bad), Err(StatusError::NoRepositoryPath { .. })), "{bad}");
        }
    }

    #[test]
    fn github_requests_follow_the_statuses_api() {
        let request = build_request(&StatusUpdate {
            description: &"x".repeat(300),
            ..update(ScmType::Github, "https://api.github.com/", "git@github.com:octo-org/hello-world.git", CommitState::Running)
        })
        .unwrap();
        assert_eq!(request.method, "POST");
        assert_eq!(request.url, format!("https://api.github.com/repos/octo-org/hello-world/statuses/{SHA}"));
        assert_eq!(header(&request, "authorization"), Some("Bearer token-123"));
        assert_eq!(header(&request, "accept"), Some("application/vnd.github+json"));
        assert_eq!(header(&request, "x-github-api-version"), Some("2022-11-28"));
        assert_eq!(request.body["state"], "pending");
        assert_eq!(request.body["context"], "davit/build");
        assert_eq!(request.body["target_url"], "https://davit.example.com/runs/7");
        assert_eq!(request.body["description"].as_str().unwrap().chars().count(), 140);
        let states: Vec<&str> = [CommitState::Succeeded, CommitState::Failed, CommitState::Errored, CommitState::Cancelled]
            .into_iter()
            .map(|state| provider_state(ScmType::Github, state))
            .collect();
        assert_eq!(states, ["success", "failure", "error", "error"]);
        // GitHub Enterprise: the same paths under the instance's /api/v3.
        let enterprise = build_request(&update(
            ScmType::Github,
            "https://ghe.example.com/api/v3",
            "https://ghe.example.com/org/repo",
            CommitState::Queued,
        ))
        .unwrap();
        assert_eq!(enterprise.url, format!("https://ghe.example.com/api/v3/repos/org/repo/statuses/{SHA}"));
        // Two segments exactly: a deeper path is not a GitHub repository.
        assert!(matches!(
            build_request(&update(ScmType::Github, "https://api.github.com", "https://github.com/a/b/c", CommitState::Queued)),
            Err(StatusError::WrongPathDepth { found: 3, .. })
        ));
    }

    #[test]
    fn gitlab_requests_encode_the_project_path_and_use_a_private_token() {
        let request = build_request(&update(
            ScmType::Gitlab,
            "https://gitlab.example.com/api/v4",
            "https://gitlab.example.com/group/sub.group/project.git",
            CommitState::Running,
        ))
        .unwrap();
        assert_eq!(request.url, format!("https://gitlab.example.com/api/v4/projects/group%2Fsub.group%2Fproject/statuses/{SHA}"));
        assert_eq!(header(&request, "private-token"), Some("token-123"));
        assert_eq!(header(&request, "authorization"), None);
        assert_eq!(
            request.body,
            json!({"state": "running", "target_url": "https://davit.example.com/runs/7", "description": "Running", "name": "davit/build"})
        );
        let states: Vec<&str> =
            [CommitState::Queued, CommitState::Succeeded, CommitState::Failed, CommitState::Errored, CommitState::Cancelled]
                .into_iter()
                .map(|state| provider_state(ScmType::Gitlab, state))
                .collect();
        assert_eq!(states, ["pending", "success", "failed", "failed", "canceled"]);
    }

    #[test]
    fn bitbucket_requests_follow_the_build_status_api() {
        let request = build_request(&update(
            ScmType::Bitbucket,
            default_api_base(ScmType::Bitbucket),
            "git@bitbucket.org:my-workspace/my-repo.git",
            CommitState::Succeeded,
        ))
        .unwrap();
        assert_eq!(request.url, format!("https://api.bitbucket.org/2.0/repositories/my-workspace/my-repo/commit/{SHA}/statuses/build"));
        assert_eq!(header(&request, "authorization"), Some("Bearer token-123"));
        assert_eq!(
            request.body,
            json!({"key": "davit/build", "state": "SUCCESSFUL", "name": "davit/build", "url": "https://davit.example.com/runs/7", "description": "Running"})
        );
        let states: Vec<&str> = [CommitState::Queued, CommitState::Running, CommitState::Failed, CommitState::Cancelled]
            .into_iter()
            .map(|state| provider_state(ScmType::Bitbucket, state))
            .collect();
        assert_eq!(states, ["INPROGRESS", "INPROGRESS", "FAILED", "STOPPED"]);
        let long = "davit/a-pipeline-with-a-very-long-name (production-eu-west)";
        let key = bitbucket_key(long);
        assert_eq!(key.chars().count(), 40);
        assert_ne!(key, bitbucket_key("davit/a-pipeline-with-a-very-long-name (production-us-east)"));
    }

    #[test]
    fn bad_input_is_refused_and_the_token_never_prints() {
        let github = |commit: &'static str, api_base: &'static str| {
            build_request(&StatusUpdate { commit, ..update(ScmType::Github, api_base, "https://github.com/o/r", CommitState::Queued) })
        };
        assert!(matches!(github("not-a-sha", "https://api.github.com"), Err(StatusError::InvalidCommit { .. })));
        assert!(matches!(github("abc/../../x", "https://api.github.com"), Err(StatusError::InvalidCommit { .. })));
        assert!(matches!(github(SHA, "ftp://api.github.com"), Err(StatusError::InvalidApiBase { .. })));
        let request = github(SHA, "https://api.github.com").unwrap();
        let printed = format!("{request:?}");
        assert!(!printed.contains("token-123"), "{printed}");
        assert!(printed.contains("***"));
        // Owner and repository names are one path segment each, whatever they contain.
        let odd = build_request(&update(ScmType::Github, "https://api.github.com", "https://github.com/o%2e/r?x#y", CommitState::Queued))
            .unwrap();
        assert_eq!(odd.url, format!("https://api.github.com/repos/o%252e/r/statuses/{SHA}"));
    }

    fn deployment(status: DeploymentStatus) -> Deployment {
        Deployment {
            deployment_id: 7,
            pipeline_id: 1,
            commit_hash: SHA.into(),
            status,
            environment: "staging".into(),
            start_time: None,
            end_time: None,
            triggered_by: None,
            rollback_of: None,
            config_overrides: Default::default(),
            status_reason: None,
            created_at: 0,
            updated_at: 0,
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
        }
    }

    fn job(status: JobStatus, last_outcome: Option<&str>) -> Job {
        Job {
            job_id: 1,
            deployment_id: 7,
            name: "build".into(),
            labels: Default::default(),
            spec: serde_json::Value::Null,
            status,
            attempt: 1,
            max_attempts: 3,
            lease: None,
            failure_reason: None,
            created_at: 0,
            updated_at: 0,
            pipeline_id: 1,
            queued_at: 0,
            steps: Vec::new(),
            attempts: last_outcome
                .map(|outcome| AttemptRecord {
                    attempt: 1,
                    agent_id: 1,
                    assigned_at: 0,
                    ended_at: Some(1),
                    outcome: Some(outcome.into()),
                    reason: None,
                })
                .into_iter()
                .collect(),
            commit_time: None,
            resources: None,
        }
    }

    #[test]
    fn deployment_statuses_map_to_commit_states() {
        assert_eq!(commit_state(&deployment(DeploymentStatus::Pending), &[]), CommitState::Queued);
        assert_eq!(commit_state(&deployment(DeploymentStatus::InProgress), &[]), CommitState::Running);
        assert_eq!(commit_state(&deployment(DeploymentStatus::Success), &[]), CommitState::Succeeded);
        assert_eq!(commit_state(&deployment(DeploymentStatus::RolledBack), &[]), CommitState::Failed);
        let failed = deployment(DeploymentStatus::Failed);
        // The build's commands failed: the commit's fault.
        assert_eq!(
            commit_state(&failed, &[job(JobStatus::Failed, Some("failed")), job(JobStatus::Cancelled, Some("cancelled"))]),
            CommitState::Failed
        );
        // Agents lost until no attempt was left: the infrastructure's fault.
        assert_eq!(commit_state(&failed, &[job(JobStatus::Failed, Some("infrastructure"))]), CommitState::Errored);
        // Cancelled by a user: jobs cancelled, none failed (or no job yet).
        assert_eq!(commit_state(&failed, &[job(JobStatus::Cancelled, Some("cancelled"))]), CommitState::Cancelled);
        assert_eq!(commit_state(&failed, &[]), CommitState::Cancelled);
        assert_eq!(reported_commit(&failed), SHA);
        // A pull request's run reports on the pull request's head, not on the merge it built.
        let head = "0123456789abcdef0123456789abcdef01234567";
        let pull_request = Deployment {
            scm: Some(crate::state::records::ScmOrigin {
                repo_id: 1,
                source: "webhook".into(),
                event: "pull_request".into(),
                git_ref: "refs/pull/7/merge".into(),
                head_commit: head.into(),
                pull_request: Some(7),
                delivery: None,
            }),
            ..failed
        };
        assert_eq!(reported_commit(&pull_request), head);
    }

    #[test]
    fn contexts_and_links() {
        assert_eq!(status_context("build", "staging", "staging"), "davit/build");
        assert_eq!(status_context("build", "staging", "production"), "davit/build (production)");
        assert_eq!(run_url("https://davit.example.com/", 12), "https://davit.example.com/runs/12");
    }
}
