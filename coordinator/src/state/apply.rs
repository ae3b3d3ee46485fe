//! `apply`: the pure function from (state, proposal) to (new state, outcome). It never reads
//! the clock, draws a random number or does IO beyond the [`StateRead`] it is handed; the time
//! and the actor come from the proposal, ids from counters in the state itself. Every replica
//! therefore computes the same result from the same log.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::codec::{decode, encode, id_key, key_id};
use super::command::{Assignment, Command, ConfigEntry, JobEnd, JobMeasurements, NewDeploymentEvent, Outcome, Proposal, RejectionCode};
use super::records::*;
use super::txn::{StateRead, Txn};
use crate::store::{StoreResult, Table};

/// Keys of the state machine's bookkeeping in [`Table::StateMeta`].
pub mod meta_keys {
    pub const AUDIT_HEAD: &[u8] = b"audit_head";
    pub const TOKEN_SIGNING_KEY: &[u8] = b"token_signing_key";
    pub fn login_failures(username: &str) -> Vec<u8> {
        format!("login_failures/{username}").into_bytes()
    }
    pub fn next_id(table: crate::store::Table) -> Vec<u8> {
        format!("next_id/{}", table.name()).into_bytes()
    }
}

/// Index names (the first part of a key in [`Table::Indexes`]).
pub mod index {
    pub const USERS_BY_NAME: &str = "users.username";
    pub const USERS_BY_EMAIL: &str = "users.email";
    pub const TOKENS_BY_HASH: &str = "api_tokens.token_hash";
    pub const TOKENS_BY_USER: &str = "api_tokens.user_id";
    pub const REPOSITORIES_BY_URL: &str = "repositories.repo_url";
    pub const REPOSITORIES_BY_USER: &str = "repositories.user_id";
    pub const PIPELINES_BY_REPO: &str = "pipelines.repo_id";
    pub const DEPLOYMENTS_BY_PIPELINE: &str = "deployments.pipeline_id";
    pub const DEPLOYMENTS_BY_STATUS: &str = "deployments.status";
    pub const ARTIFACTS_BY_PIPELINE: &str = "artifacts.pipeline_id";
    pub const CONFIGURATIONS_BY_PIPELINE: &str = "configurations.pipeline_id";
    pub const NOTIFICATIONS_BY_USER: &str = "notifications.user_id";
    pub const JOBS_BY_DEPLOYMENT: &str = "jobs.deployment_id";
    pub const JOBS_BY_STATUS: &str = "jobs.status";
    pub const AGENTS_BY_NAME: &str = "agents.name";
    pub const AGENTS_BY_CREDENTIAL: &str = "agents.credential_hash";
    pub const REGISTRATION_TOKENS_BY_HASH: &str = "registration_tokens.token_hash";
}

pub fn index_prefix(name: &str, value: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + value.len() + 10);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(value.as_bytes());
    key.push(0);
    key
}

pub(super) fn index_key(name: &str, value: &str, id: u64) -> Vec<u8> {
    let mut key = index_prefix(name, value);
    key.extend_from_slice(&id_key(id));
    key
}

/// The ids an index holds for `value`, in id order.
pub fn index_ids(state: &dyn StateRead, name: &str, value: &str) -> StoreResult<Vec<u64>> {
    Ok(state.scan_prefix(Table::Indexes, &index_prefix(name, value))?.into_iter().filter_map(|(key, _)| key_id(&key)).collect())
}

/// Key of a configuration row: environment, pipeline (0 = all pipelines), key.
pub fn configuration_key(environment: &str, pipeline_id: Option<u64>, key: &str) -> Vec<u8> {
    let mut bytes = configuration_prefix(environment, pipeline_id);
    bytes.extend_from_slice(key.as_bytes());
    bytes
}

pub fn configuration_prefix(environment: &str, pipeline_id: Option<u64>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(environment.len() + 10);
    bytes.extend_from_slice(environment.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&id_key(pipeline_id.unwrap_or(0)));
    bytes
}

/// Key of a log segment: deployment, job, sequence.
pub fn log_segment_key(deployment_id: u64, job_id: u64, sequence: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(24);
    key.extend_from_slice(&id_key(deployment_id));
    key.extend_from_slice(&id_key(job_id));
    key.extend_from_slice(&id_key(sequence));
    key
}

pub fn load<T: DeserializeOwned>(state: &dyn StateRead, table: Table, key: &[u8]) -> StoreResult<Option<T>> {
    state.get(table, key)?.map(|bytes| decode(table, &bytes)).transpose()
}

pub fn load_id<T: DeserializeOwned>(state: &dyn StateRead, table: Table, id: u64) -> StoreResult<Option<T>> {
    load(state, table, &id_key(id))
}

pub(super) fn store<T: Serialize>(txn: &mut Txn, table: Table, key: impl Into<Vec<u8>>, value: &T) {
    txn.put(table, key, encode(value));
}

pub(super) fn next_id(txn: &mut Txn, table: Table) -> StoreResult<u64> {
    let key = meta_keys::next_id(table);
    let id: u64 = load(txn, Table::StateMeta, &key)?.unwrap_or(1);
    store(txn, Table::StateMeta, key, &(id + 1));
    Ok(id)
}

/// Failed logins are counted over this window (15 minutes) for the lockout.
pub const LOGIN_LOCKOUT_WINDOW_MS: i64 = 15 * 60 * 1000;

/// Failed logins of `username` still inside the lockout window at `now`, oldest first.
pub fn recent_login_failures(state: &dyn StateRead, username: &str, now: Timestamp) -> StoreResult<Vec<Timestamp>> {
    let failures: Vec<Timestamp> = load(state, Table::StateMeta, &meta_keys::login_failures(username))?.unwrap_or_default();
    Ok(failures.into_iter().filter(|at| now - at < LOGIN_LOCKOUT_WINDOW_MS).collect())
}

pub(super) fn not_found(what: &str, id: u64) -> Outcome {
    Outcome::rejected(RejectionCode::NotFound, format!("{what} {id} not found"))
}

/// Apply one proposal. Rejected commands change nothing; accepted ones (that are audited)
/// also append one hash-chained audit entry.
pub fn apply(state: &mut Txn, proposal: &Proposal, log_index: u64) -> StoreResult<Outcome> {
    if let Command::Batch { proposals } = &proposal.command {
        let mut outcomes = Vec::with_capacity(proposals.len());
        for inner in proposals {
            outcomes.push(if matches!(inner.command, Command::Batch { .. }) {
                Outcome::rejected(RejectionCode::Invalid, "batches do not nest")
            } else {
                apply(state, inner, log_index)?
            });
        }
        let mut outcome = Outcome::applied(None, outcomes.iter().filter(|outcome| outcome.result.is_ok()).count() as u64);
        outcome.batch = outcomes;
        return Ok(outcome);
    }
    let (outcome, writes) = {
        let mut child = Txn::new(state);
        let mut outcome = execute(&mut child, proposal)?;
        if outcome.result.is_ok() && proposal.command.is_audited() {
            append_audit(&mut child, proposal, log_index)?;
        }
        let writes = child.into_writes();
        if let Ok(applied) = &mut outcome.result {
            applied.progressed = super::progress::progressed(&writes);
        }
        (outcome, writes)
    };
    if outcome.result.is_ok() {
        state.absorb(writes);
    }
    Ok(outcome)
}

pub fn audit_hash(previous_hash: &str, entry: &AuditLog) -> String {
    let mut hasher = Sha256::new();
    hasher.update(previous_hash.as_bytes());
    let unhashed = AuditLog { hash: String::new(), ..entry.clone() };
    hasher.update(serde_json::to_vec(&unhashed).expect("audit entries serialize"));
    hex(&hasher.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn append_audit(txn: &mut Txn, proposal: &Proposal, log_index: u64) -> StoreResult<()> {
    let previous_hash: String = load(txn, Table::StateMeta, meta_keys::AUDIT_HEAD)?.unwrap_or_default();
    let audit_id = next_id(txn, Table::AuditLogs)?;
    let mut entry = AuditLog {
        audit_id,
        user_id: proposal.actor,
        action: proposal.command.action().to_string(),
        details: proposal.command.audit_details(),
        timestamp: proposal.time,
        log_index,
        previous_hash: previous_hash.clone(),
        hash: String::new(),
        source: proposal.source.clone(),
    };
    entry.hash = audit_hash(&previous_hash, &entry);
    store(txn, Table::StateMeta, meta_keys::AUDIT_HEAD.to_vec(), &entry.hash);
    store(txn, Table::AuditLogs, id_key(audit_id), &entry);
    Ok(())
}

fn execute(txn: &mut Txn, proposal: &Proposal) -> StoreResult<Outcome> {
    let now = proposal.time;
    match &proposal.command {
        // `apply` takes batches apart; one reaching here was nested in another.
        Command::Batch { .. } => Ok(Outcome::rejected(RejectionCode::Invalid, "batches do not nest")),
        Command::InitializeCluster { token_signing_key } => {
            if txn.get(Table::StateMeta, meta_keys::TOKEN_SIGNING_KEY)?.is_some() {
                return Ok(Outcome::rejected(RejectionCode::Conflict, "the cluster is already initialized"));
            }
            store(txn, Table::StateMeta, meta_keys::TOKEN_SIGNING_KEY.to_vec(), token_signing_key);
            Ok(Outcome::applied(None, 1))
        }
        Command::CreateUser { username, email, password_hash, role } => {
            if username.trim().is_empty() || username.len() > 50 {
                return Ok(Outcome::rejected(RejectionCode::Invalid, "username must be 1 to 50 characters"));
            }
            if !index_ids(txn, index::USERS_BY_NAME, username)?.is_empty() {
                return Ok(Outcome::rejected(RejectionCode::Conflict, format!("username {username:?} is taken")));
            }
            if !index_ids(txn, index::USERS_BY_EMAIL, email)?.is_empty() {
                return Ok(Outcome::rejected(RejectionCode::Conflict, format!("email {email:?} is already used")));
            }
            let user_id = next_id(txn, Table::Users)?;
            let user = User {
                user_id,
                username: username.clone(),
                email: email.clone(),
                password_hash: password_hash.clone(),
                role: *role,
                created_at: now,
                updated_at: now,
            };
            store(txn, Table::Users, id_key(user_id), &user);
            txn.put(Table::Indexes, index_key(index::USERS_BY_NAME, username, user_id), Vec::new());
            txn.put(Table::Indexes, index_key(index::USERS_BY_EMAIL, email, user_id), Vec::new());
            Ok(Outcome::applied(Some(user_id), 1))
        }
        Command::UpdateUser { user_id, email, password_hash, role, username } => {
            let Some(mut user) = load_id::<User>(txn, Table::Users, *user_id)? else {
                return Ok(not_found("user", *user_id));
            };
            if let Some(username) = username {
                if index_ids(txn, index::USERS_BY_NAME, username)?.iter().any(|id| id != user_id) {
                    return Ok(Outcome::rejected(RejectionCode::Conflict, format!("username {username:?} is taken")));
                }
                txn.delete(Table::Indexes, index_key(index::USERS_BY_NAME, &user.username, *user_id));
                txn.put(Table::Indexes, index_key(index::USERS_BY_NAME, username, *user_id), Vec::new());
                user.username = username.clone();
            }
            if let Some(email) = email {
                if index_ids(txn, index::USERS_BY_EMAIL, email)?.iter().any(|id| id != user_id) {
                    return Ok(Outcome::rejected(RejectionCode::Conflict, format!("email {email:?} is already used")));
                }
                txn.delete(Table::Indexes, index_key(index::USERS_BY_EMAIL, &user.email, *user_id));
                txn.put(Table::Indexes, index_key(index::USERS_BY_EMAIL, email, *user_id), Vec::new());
                user.email = email.clone();
            }
            if let Some(password_hash) = password_hash {
                user.password_hash = password_hash.clone();
            }
            if let Some(role) = role {
                user.role = *role;
            }
            user.updated_at = now;
            store(txn, Table::Users, id_key(*user_id), &user);
            Ok(Outcome::applied(Some(*user_id), 1))
        }
        Command::RecordLogin { username, succeeded, .. } => {
            // Failures inside the lockout window, oldest first; a success clears them.
            let key = meta_keys::login_failures(username);
            let mut failures: Vec<Timestamp> = load(txn, Table::StateMeta, &key)?.unwrap_or_default();
            failures.retain(|at| now - at < LOGIN_LOCKOUT_WINDOW_MS);
            if *succeeded {
                txn.delete(Table::StateMeta, key);
            } else {
                failures.push(now);
                store(txn, Table::StateMeta, key, &failures);
            }
            Ok(Outcome::applied(None, 1))
        }
        Command::DeleteUser { user_id } => {
            let Some(user) = load_id::<User>(txn, Table::Users, *user_id)? else {
                return Ok(not_found("user", *user_id));
            };
            let mut affected = 1;
            txn.delete(Table::Users, id_key(*user_id));
            txn.delete(Table::Indexes, index_key(index::USERS_BY_NAME, &user.username, *user_id));
            txn.delete(Table::Indexes, index_key(index::USERS_BY_EMAIL, &user.email, *user_id));
            // Repositories keep existing without an owner (ON DELETE SET NULL); tokens and
            // notification subscriptions go with the user (ON DELETE CASCADE).
            let owner = user_id.to_string();
            for repo_id in index_ids(txn, index::REPOSITORIES_BY_USER, &owner)? {
                if let Some(mut repository) = load_id::<Repository>(txn, Table::Repositories, repo_id)? {
                    repository.user_id = None;
                    repository.updated_at = now;
                    store(txn, Table::Repositories, id_key(repo_id), &repository);
                }
                txn.delete(Table::Indexes, index_key(index::REPOSITORIES_BY_USER, &owner, repo_id));
                affected += 1;
            }
            for token_id in index_ids(txn, index::TOKENS_BY_USER, &owner)? {
                affected += delete_token(txn, token_id)?;
            }
            for notification_id in index_ids(txn, index::NOTIFICATIONS_BY_USER, &owner)? {
                affected += delete_notification(txn, notification_id)?;
            }
            Ok(Outcome::applied(Some(*user_id), affected))
        }
        Command::CreateApiToken { user_id, name, token_hash, expires_at } => {
            if load_id::<User>(txn, Table::Users, *user_id)?.is_none() {
                return Ok(not_found("user", *user_id));
            }
            let token_id = next_id(txn, Table::ApiTokens)?;
            let token = ApiToken {
                token_id,
                user_id: *user_id,
                name: name.clone(),
                token_hash: token_hash.clone(),
                created_at: now,
                expires_at: *expires_at,
            };
            store(txn, Table::ApiTokens, id_key(token_id), &token);
            txn.put(Table::Indexes, index_key(index::TOKENS_BY_HASH, token_hash, token_id), Vec::new());
            txn.put(Table::Indexes, index_key(index::TOKENS_BY_USER, &user_id.to_string(), token_id), Vec::new());
            Ok(Outcome::applied(Some(token_id), 1))
        }
        Command::RevokeApiToken { token_id } => match delete_token(txn, *token_id)? {
            0 => Ok(not_found("API token", *token_id)),
            affected => Ok(Outcome::applied(Some(*token_id), affected)),
        },
        Command::ConnectRepository { name, repo_url, branch, scm_type, webhook_secret, api_url, access_token, poll_interval_seconds } => {
            if repo_url.trim().is_empty() {
                return Ok(Outcome::rejected(RejectionCode::Invalid, "repo_url must not be empty"));
            }
            if let Some(existing) = index_ids(txn, index::REPOSITORIES_BY_URL, repo_url)?.first() {
                return Ok(Outcome::rejected(
                    RejectionCode::Conflict,
                    format!("repository {repo_url} is already connected as repository {existing}"),
                ));
            }
            let repo_id = next_id(txn, Table::Repositories)?;
            let repository = Repository {
                repo_id,
                name: name.clone(),
                repo_url: repo_url.clone(),
                branch: branch.clone(),
                scm_type: *scm_type,
                webhook_secret: webhook_secret.clone(),
                user_id: proposal.actor,
                created_at: now,
                updated_at: now,
                api_url: api_url.clone(),
                access_token: access_token.clone(),
                poll_interval_seconds: *poll_interval_seconds,
            };
            store(txn, Table::Repositories, id_key(repo_id), &repository);
            txn.put(Table::Indexes, index_key(index::REPOSITORIES_BY_URL, repo_url, repo_id), Vec::new());
            if let Some(user_id) = proposal.actor {
                txn.put(Table::Indexes, index_key(index::REPOSITORIES_BY_USER, &user_id.to_string(), repo_id), Vec::new());
            }
            Ok(Outcome::applied(Some(repo_id), 1))
        }
        Command::UpdateRepository { repo_id, patch } => {
            let Some(mut repository) = load_id::<Repository>(txn, Table::Repositories, *repo_id)? else {
                return Ok(not_found("repository", *repo_id));
            };
            if let Some(repo_url) = &patch.repo_url
                && *repo_url != repository.repo_url
            {
                if let Some(existing) = index_ids(txn, index::REPOSITORIES_BY_URL, repo_url)?.first() {
                    return Ok(Outcome::rejected(
                        RejectionCode::Conflict,
                        format!("repository {repo_url} is already connected as repository {existing}"),
                    ));
                }
                txn.delete(Table::Indexes, index_key(index::REPOSITORIES_BY_URL, &repository.repo_url, *repo_id));
                txn.put(Table::Indexes, index_key(index::REPOSITORIES_BY_URL, repo_url, *repo_id), Vec::new());
                repository.repo_url = repo_url.clone();
            }
            if let Some(name) = &patch.name {
                repository.name = name.clone();
            }
            if let Some(branch) = &patch.branch {
                repository.branch = branch.clone();
            }
            if let Some(scm_type) = patch.scm_type {
                repository.scm_type = scm_type;
            }
            if let Some(secret) = &patch.webhook_secret {
                repository.webhook_secret = (!secret.is_empty()).then(|| secret.clone());
            }
            if let Some(api_url) = &patch.api_url {
                repository.api_url = (!api_url.is_empty()).then(|| api_url.clone());
            }
            if let Some(token) = &patch.access_token {
                repository.access_token = (!token.is_empty()).then(|| token.clone());
            }
            if let Some(seconds) = patch.poll_interval_seconds {
                repository.poll_interval_seconds = Some(seconds);
            }
            repository.updated_at = now;
            store(txn, Table::Repositories, id_key(*repo_id), &repository);
            Ok(Outcome::applied(Some(*repo_id), 1))
        }
        Command::DeleteRepository { repo_id } => {
            let Some(repository) = load_id::<Repository>(txn, Table::Repositories, *repo_id)? else {
                return Ok(not_found("repository", *repo_id));
            };
            let mut affected = 1;
            txn.delete(Table::Repositories, id_key(*repo_id));
            txn.delete(Table::Indexes, index_key(index::REPOSITORIES_BY_URL, &repository.repo_url, *repo_id));
            if let Some(user_id) = repository.user_id {
                txn.delete(Table::Indexes, index_key(index::REPOSITORIES_BY_USER, &user_id.to_string(), *repo_id));
            }
            for pipeline_id in index_ids(txn, index::PIPELINES_BY_REPO, &repo_id.to_string())? {
                affected += delete_pipeline(txn, pipeline_id)?;
            }
            affected += super::scm::forget_repository(txn, *repo_id)?;
            Ok(Outcome::applied(Some(*repo_id), affected))
        }
        Command::CreatePipeline { name, repo_id, branch, build_command, deploy_strategy, environment, build, deploy } => {
            if name.trim().is_empty() {
                return Ok(Outcome::rejected(RejectionCode::Invalid, "pipeline name must not be empty"));
            }
            if load_id::<Repository>(txn, Table::Repositories, *repo_id)?.is_none() {
                return Ok(not_found("repository", *repo_id));
            }
            if let Some(existing) = pipeline_named(txn, *repo_id, name)? {
                return Ok(Outcome::rejected(
                    RejectionCode::Conflict,
                    format!("repository {repo_id} already has a pipeline named {name:?} (pipeline {existing})"),
                ));
            }
            let pipeline_id = next_id(txn, Table::Pipelines)?;
            let pipeline = Pipeline {
                pipeline_id,
                name: name.clone(),
                repo_id: *repo_id,
                branch: branch.clone(),
                build_command: build_command.clone(),
                deploy_strategy: *deploy_strategy,
                environment: environment.clone(),
                is_active: true,
                created_at: now,
                updated_at: now,
                build: build.clone(),
                deploy: deploy.clone(),
            };
            store(txn, Table::Pipelines, id_key(pipeline_id), &pipeline);
            txn.put(Table::Indexes, index_key(index::PIPELINES_BY_REPO, &repo_id.to_string(), pipeline_id), Vec::new());
            Ok(Outcome::applied(Some(pipeline_id), 1))
        }
        Command::UpdatePipeline { pipeline_id, patch } => {
            let Some(mut pipeline) = load_id::<Pipeline>(txn, Table::Pipelines, *pipeline_id)? else {
                return Ok(not_found("pipeline", *pipeline_id));
            };
            if let Some(name) = &patch.name {
                if name.trim().is_empty() {
                    return Ok(Outcome::rejected(RejectionCode::Invalid, "pipeline name must not be empty"));
                }
                if let Some(existing) = pipeline_named(txn, pipeline.repo_id, name)?.filter(|id| id != pipeline_id) {
                    return Ok(Outcome::rejected(
                        RejectionCode::Conflict,
                        format!("repository {} already has a pipeline named {name:?} (pipeline {existing})", pipeline.repo_id),
                    ));
                }
                pipeline.name = name.clone();
            }
            if let Some(branch) = &patch.branch {
                pipeline.branch = Some(branch.clone());
            }
            if let Some(build_command) = &patch.build_command {
                pipeline.build_command = Some(build_command.clone());
            }
            if let Some(strategy) = patch.deploy_strategy {
                pipeline.deploy_strategy = strategy;
            }
            if let Some(environment) = &patch.environment {
                pipeline.environment = environment.clone();
            }
            if let Some(is_active) = patch.is_active {
                pipeline.is_active = is_active;
            }
            if let Some(build) = &patch.build {
                pipeline.build = build.clone();
            }
            if let Some(deploy) = &patch.deploy {
                pipeline.deploy = deploy.clone();
            }
            pipeline.updated_at = now;
            store(txn, Table::Pipelines, id_key(*pipeline_id), &pipeline);
            Ok(Outcome::applied(Some(*pipeline_id), 1))
        }
        Command::DeletePipeline { pipeline_id } => match delete_pipeline(txn, *pipeline_id)? {
            0 => Ok(not_found("pipeline", *pipeline_id)),
            affected => Ok(Outcome::applied(Some(*pipeline_id), affected)),
        },
        Command::CreateDeployment { pipeline_id, commit_hash, environment, config_overrides, rollback_of, branch, release_of } => {
            let Some(pipeline) = load_id::<Pipeline>(txn, Table::Pipelines, *pipeline_id)? else {
                return Ok(not_found("pipeline", *pipeline_id));
            };
            if let Some(previous) = rollback_of
                && load_id::<Deployment>(txn, Table::Deployments, *previous)?.is_none()
            {
                return Ok(not_found("deployment to roll back", *previous));
            }
            if let Some(source) = release_of
                && load_id::<Deployment>(txn, Table::Deployments, *source)?.is_none_or(|source| source.pipeline_id != *pipeline_id)
            {
                return Ok(not_found(&format!("deployment of pipeline {pipeline_id} to release"), *source));
            }
            let mut new = NewDeployment {
                commit_hash: commit_hash.clone(),
                environment: environment.clone(),
                config_overrides: config_overrides.clone(),
                rollback_of: *rollback_of,
                release_of: *release_of,
                scm: None,
                checkout: Checkout { branch: branch.clone(), fetch_ref: None },
            };
            if let Err(refusal) = super::environments::admit(txn, &pipeline, &mut new)? {
                return Ok(Outcome::rejected(RejectionCode::Refused, refusal));
            }
            let (deployment_id, affected) = create_deployment(txn, proposal, &pipeline, new)?;
            Ok(Outcome::applied(Some(deployment_id), affected))
        }
        Command::SetDeploymentStatus { deployment_id, status, reason } => {
            let Some(mut deployment) = load_id::<Deployment>(txn, Table::Deployments, *deployment_id)? else {
                return Ok(not_found("deployment", *deployment_id));
            };
            if deployment.status.is_final() && deployment.status != *status {
                return Ok(Outcome::rejected(
                    RejectionCode::Conflict,
                    format!("deployment {deployment_id} already ended as {:?}", deployment.status),
                ));
            }
            set_deployment_status(txn, &mut deployment, *status, reason.clone(), now);
            let mut affected = 1;
            if status.is_final() {
                let reason = reason.clone().unwrap_or_else(|| format!("deployment {deployment_id} ended"));
                affected += cancel_deployment_jobs(txn, *deployment_id, &reason, now)?;
            }
            Ok(Outcome::applied(Some(*deployment_id), affected))
        }
        Command::RecordArtifact { pipeline_id, version, artifact_path, digest, size_bytes, produced_by } => {
            if let Some(origin) = produced_by
                && !holds_lease(txn, origin.job_id, origin.attempt)?
            {
                return Ok(stale_attempt(origin.job_id, origin.attempt));
            }
            if load_id::<Pipeline>(txn, Table::Pipelines, *pipeline_id)?.is_none() {
                return Ok(not_found("pipeline", *pipeline_id));
            }
            let artifact_id = next_id(txn, Table::Artifacts)?;
            let artifact = Artifact {
                artifact_id,
                pipeline_id: *pipeline_id,
                version: version.clone(),
                artifact_path: artifact_path.clone(),
                digest: digest.clone(),
                size_bytes: *size_bytes,
                created_at: now,
                updated_at: now,
                commit_hash: produced_by.as_ref().map(|origin| origin.commit_hash.clone()),
                deployment_id: produced_by.as_ref().map(|origin| origin.deployment_id),
                job_id: produced_by.as_ref().map(|origin| origin.job_id),
                kind: produced_by.as_ref().map(|origin| origin.kind.clone()),
            };
            store(txn, Table::Artifacts, id_key(artifact_id), &artifact);
            txn.put(Table::Indexes, index_key(index::ARTIFACTS_BY_PIPELINE, &pipeline_id.to_string(), artifact_id), Vec::new());
            Ok(Outcome::applied(Some(artifact_id), 1))
        }
        Command::DeleteArtifact { artifact_id } => match delete_artifact(txn, *artifact_id)? {
            0 => Ok(not_found("artifact", *artifact_id)),
            affected => Ok(Outcome::applied(Some(*artifact_id), affected)),
        },
        Command::SetConfigurations { environment, pipeline_id, entries } => {
            set_configurations(txn, now, environment, *pipeline_id, entries)
        }
        Command::DeleteConfiguration { environment, pipeline_id, key } => {
            let row_key = configuration_key(environment, *pipeline_id, key);
            let Some(row) = load::<Configuration>(txn, Table::Configurations, &row_key)? else {
                return Ok(Outcome::rejected(
                    RejectionCode::NotFound,
                    format!("configuration {key:?} not found in environment {environment:?}"),
                ));
            };
            txn.delete(Table::Configurations, row_key.clone());
            if let Some(pipeline_id) = pipeline_id {
                txn.delete(Table::Indexes, configuration_index_key(*pipeline_id, &row_key));
            }
            Ok(Outcome::applied(Some(row.config_id), 1))
        }
        Command::RecordLogSegment {
            deployment_id,
            job_id,
            sequence,
            blob_key,
            bytes,
            lines,
            error_lines,
            first_timestamp,
            last_timestamp,
        } => {
            let segment = LogSegment {
                deployment_id: *deployment_id,
                job_id: *job_id,
                sequence: *sequence,
                blob_key: blob_key.clone(),
                bytes: *bytes,
                lines: *lines,
                error_lines: *error_lines,
                first_timestamp: *first_timestamp,
                last_timestamp: *last_timestamp,
            };
            let key = log_segment_key(*deployment_id, *job_id, *sequence);
            // Recording the same segment twice (a retried upload) is not an error.
            if let Some(existing) = load::<LogSegment>(txn, Table::Logs, &key)? {
                if existing == segment {
                    return Ok(Outcome::applied(None, 0));
                }
                return Ok(Outcome::rejected(
                    RejectionCode::Conflict,
                    format!("log segment {sequence} of job {job_id} was already recorded with other contents"),
                ));
            }
            store(txn, Table::Logs, key, &segment);
            Ok(Outcome::applied(None, 1))
        }
        Command::CreateNotification { user_id, notification_type, target, events } => {
            if load_id::<User>(txn, Table::Users, *user_id)?.is_none() {
                return Ok(not_found("user", *user_id));
            }
            if target.trim().is_empty() {
                return Ok(Outcome::rejected(RejectionCode::Invalid, "notification target must not be empty"));
            }
            let notification_id = next_id(txn, Table::Notifications)?;
            let notification = Notification {
                notification_id,
                user_id: *user_id,
                notification_type: *notification_type,
                target: target.clone(),
                events: events.clone(),
                is_active: true,
                created_at: now,
                updated_at: now,
            };
            store(txn, Table::Notifications, id_key(notification_id), &notification);
            txn.put(Table::Indexes, index_key(index::NOTIFICATIONS_BY_USER, &user_id.to_string(), notification_id), Vec::new());
            Ok(Outcome::applied(Some(notification_id), 1))
        }
        Command::DeleteNotification { notification_id } => match delete_notification(txn, *notification_id)? {
            0 => Ok(not_found("notification", *notification_id)),
            affected => Ok(Outcome::applied(Some(*notification_id), affected)),
        },
        Command::RegisterAgent { name, labels, credential_hash, registration_token_hash } => {
            if name.trim().is_empty() || name.len() > 100 {
                return Ok(Outcome::rejected(RejectionCode::Invalid, "agent name must be 1 to 100 characters"));
            }
            let token_id = index_ids(txn, index::REGISTRATION_TOKENS_BY_HASH, registration_token_hash)?.first().copied();
            let Some(mut token) =
                token_id.map(|id| load_id::<RegistrationToken>(txn, Table::RegistrationTokens, id)).transpose()?.flatten()
            else {
                return Ok(Outcome::rejected(
                    RejectionCode::Invalid,
                    "the registration token is not valid; ask an admin for one (`davit agents token create`)",
                ));
            };
            if token.revoked_at.is_some() || token.expires_at <= now {
                return Ok(Outcome::rejected(
                    RejectionCode::Invalid,
                    format!("registration token {} has expired or was revoked; ask an admin for a new one", token.token_id),
                ));
            }
            for agent_id in index_ids(txn, index::AGENTS_BY_NAME, name)? {
                if let Some(agent) = load_id::<Agent>(txn, Table::Agents, agent_id)?
                    && agent.deregistered_at.is_none()
                {
                    return Ok(Outcome::rejected(
                        RejectionCode::Conflict,
                        format!(
                            "an agent named {name:?} is already registered (agent {agent_id}); deregister it first or pick another name"
                        ),
                    ));
                }
            }
            let agent_id = next_id(txn, Table::Agents)?;
            let agent = Agent {
                agent_id,
                name: name.clone(),
                labels: labels.clone(),
                credential_hash: credential_hash.clone(),
                registered_at: now,
                deregistered_at: None,
                state: AgentState::Offline,
                capacity: 0,
                executors: Vec::new(),
                version: String::new(),
                node_id: None,
                connected_at: None,
                state_reason: None,
            };
            store(txn, Table::Agents, id_key(agent_id), &agent);
            txn.put(Table::Indexes, index_key(index::AGENTS_BY_NAME, name, agent_id), Vec::new());
            txn.put(Table::Indexes, index_key(index::AGENTS_BY_CREDENTIAL, credential_hash, agent_id), Vec::new());
            token.agents_registered += 1;
            store(txn, Table::RegistrationTokens, id_key(token.token_id), &token);
            Ok(Outcome::applied(Some(agent_id), 1))
        }
        Command::DeregisterAgent { agent_id } => {
            let Some(mut agent) = load_id::<Agent>(txn, Table::Agents, *agent_id)? else {
                return Ok(not_found("agent", *agent_id));
            };
            agent.deregistered_at.get_or_insert(now);
            agent.state = AgentState::Offline;
            store(txn, Table::Agents, id_key(*agent_id), &agent);
            txn.delete(Table::Indexes, index_key(index::AGENTS_BY_CREDENTIAL, &agent.credential_hash, *agent_id));
            let affected = 1 + release_agent_jobs(txn, *agent_id, &format!("agent {agent_id} was deregistered"), now)?;
            Ok(Outcome::applied(Some(*agent_id), affected))
        }
        Command::CreateRegistrationToken { description, token_hash, expires_at } => {
            if *expires_at <= now {
                return Ok(Outcome::rejected(RejectionCode::Invalid, "the registration token must expire in the future"));
            }
            let token_id = next_id(txn, Table::RegistrationTokens)?;
            let token = RegistrationToken {
                token_id,
                description: description.clone(),
                token_hash: token_hash.clone(),
                created_by: proposal.actor,
                created_at: now,
                expires_at: *expires_at,
                revoked_at: None,
                agents_registered: 0,
            };
            store(txn, Table::RegistrationTokens, id_key(token_id), &token);
            txn.put(Table::Indexes, index_key(index::REGISTRATION_TOKENS_BY_HASH, token_hash, token_id), Vec::new());
            Ok(Outcome::applied(Some(token_id), 1))
        }
        Command::RevokeRegistrationToken { token_id } => {
            let Some(mut token) = load_id::<RegistrationToken>(txn, Table::RegistrationTokens, *token_id)? else {
                return Ok(not_found("registration token", *token_id));
            };
            token.revoked_at.get_or_insert(now);
            store(txn, Table::RegistrationTokens, id_key(*token_id), &token);
            Ok(Outcome::applied(Some(*token_id), 1))
        }
        Command::AgentConnected { agent_id, node_id, labels, capacity, executors, draining, version } => {
            let Some(mut agent) = load_id::<Agent>(txn, Table::Agents, *agent_id)? else {
                return Ok(not_found("agent", *agent_id));
            };
            if agent.deregistered_at.is_some() {
                return Ok(Outcome::rejected(RejectionCode::Invalid, format!("agent {agent_id} was deregistered; register it again")));
            }
            agent.labels = labels.clone();
            agent.capacity = *capacity;
            agent.executors = executors.clone();
            agent.version = version.clone();
            if agent.node_id != Some(*node_id) || !matches!(agent.state, AgentState::Online | AgentState::Draining) {
                agent.connected_at = Some(now);
            }
            agent.node_id = Some(*node_id);
            agent.state = if *draining { AgentState::Draining } else { AgentState::Online };
            agent.state_reason = None;
            store(txn, Table::Agents, id_key(*agent_id), &agent);
            Ok(Outcome::applied(Some(*agent_id), 1))
        }
        Command::AgentLost { agent_id, reason } => {
            let Some(mut agent) = load_id::<Agent>(txn, Table::Agents, *agent_id)? else {
                return Ok(not_found("agent", *agent_id));
            };
            if !matches!(agent.state, AgentState::Online | AgentState::Draining) {
                return Ok(Outcome::rejected(RejectionCode::Conflict, format!("agent {agent_id} is not connected")));
            }
            agent.state = AgentState::Lost;
            agent.state_reason = Some(reason.clone());
            store(txn, Table::Agents, id_key(*agent_id), &agent);
            let affected = 1 + release_agent_jobs(txn, *agent_id, reason, now)?;
            Ok(Outcome::applied(Some(*agent_id), affected))
        }
        Command::EnqueueJob { deployment_id, name, labels, spec, max_attempts } => {
            let Some(deployment) = load_id::<Deployment>(txn, Table::Deployments, *deployment_id)? else {
                return Ok(not_found("deployment", *deployment_id));
            };
            let job_id = enqueue_job(txn, now, &deployment, name, labels.clone(), spec.clone(), *max_attempts)?;
            Ok(Outcome::applied(Some(job_id), 1))
        }
        Command::AssignJob { job_id, agent_id, attempt, lease_expires_at } => {
            let assignment = Assignment { job_id: *job_id, agent_id: *agent_id, attempt: *attempt };
            match assign(txn, &assignment, *lease_expires_at, now)? {
                None => Ok(Outcome::applied(Some(*job_id), 1)),
                Some(refusal) => Ok(refusal),
            }
        }
        Command::AssignJobs { assignments, lease_expires_at } => {
            let mut assigned = 0;
            for assignment in assignments {
                if assign(txn, assignment, *lease_expires_at, now)?.is_none() {
                    assigned += 1;
                }
            }
            Ok(Outcome::applied(None, assigned))
        }
        Command::AcceptJob { job_id, agent_id, attempt } => {
            let Some(mut job) = load_id::<Job>(txn, Table::Jobs, *job_id)? else {
                return Ok(not_found("job", *job_id));
            };
            match &mut job.lease {
                Some(lease) if lease.attempt == *attempt && lease.agent_id == *agent_id && job.status == JobStatus::Running => {
                    lease.accepted_at.get_or_insert(now);
                }
                _ => return Ok(stale_attempt(*job_id, *attempt)),
            }
            job.updated_at = now;
            store(txn, Table::Jobs, id_key(*job_id), &job);
            Ok(Outcome::applied(Some(*job_id), 1))
        }
        Command::RecordStep { job_id, attempt, step } => {
            let Some(mut job) = load_id::<Job>(txn, Table::Jobs, *job_id)? else {
                return Ok(not_found("job", *job_id));
            };
            if job.status != JobStatus::Running || job.lease.as_ref().map(|lease| lease.attempt) != Some(*attempt) {
                return Ok(stale_attempt(*job_id, *attempt));
            }
            match job.steps.iter_mut().find(|existing| existing.index == step.index) {
                Some(existing) => *existing = step.clone(),
                None => {
                    job.steps.push(step.clone());
                    job.steps.sort_by_key(|step| step.index);
                }
            }
            job.updated_at = now;
            store(txn, Table::Jobs, id_key(*job_id), &job);
            Ok(Outcome::applied(Some(*job_id), 1))
        }
        Command::RenewLease { job_id, agent_id, attempt, lease_expires_at } => {
            let Some(mut job) = load_id::<Job>(txn, Table::Jobs, *job_id)? else {
                return Ok(not_found("job", *job_id));
            };
            match &mut job.lease {
                Some(lease) if lease.attempt == *attempt && lease.agent_id == *agent_id && job.status == JobStatus::Running => {
                    lease.expires_at = (*lease_expires_at).max(lease.expires_at);
                }
                _ => return Ok(stale_attempt(*job_id, *attempt)),
            }
            job.updated_at = now;
            store(txn, Table::Jobs, id_key(*job_id), &job);
            Ok(Outcome::applied(Some(*job_id), 1))
        }
        Command::CompleteJob { job_id, attempt, succeeded, failure_reason } => {
            let end = if *succeeded { JobEnd::Succeeded } else { JobEnd::Failed };
            finish_job(txn, *job_id, *attempt, end, failure_reason.clone(), None, &JobMeasurements::default(), now)
        }
        Command::FinishJob { job_id, attempt, end, reason, output, measured } => {
            finish_job(txn, *job_id, *attempt, *end, reason.clone(), output.as_deref(), measured, now)
        }
        Command::ExpireLease { job_id, attempt, reason } => {
            let reason = reason.clone().unwrap_or_else(|| format!("the lease of attempt {attempt} ran out"));
            finish_job(txn, *job_id, *attempt, JobEnd::Infrastructure, Some(reason), None, &JobMeasurements::default(), now)
        }
        Command::RecordScmChanges { repo_id, source, changes } => super::scm::record_changes(txn, proposal, *repo_id, source, changes),
        Command::RecordDeploymentEvents { deployment_id, events } => super::progress::record(txn, *deployment_id, events, now),
        Command::SetEnvironment { name, settings } => super::environments::set(txn, name, settings, now),
        Command::AbortRollout { deployment_id, reason } => super::rollout::abort(txn, *deployment_id, reason, now),
        Command::ApproveDeployment { deployment_id } => super::environments::approve(txn, *deployment_id, proposal.actor, now),
        Command::StartRollout { deployment_id, hosts, artifact_digest, artifact_kind, previous, config } => {
            let release = super::rollout::Release { digest: artifact_digest, kind: artifact_kind, previous: previous.clone(), config };
            super::rollout::start(txn, *deployment_id, hosts, release, now)
        }
        Command::RolloutStep { deployment_id, version, actions } => super::rollout::step(txn, *deployment_id, *version, actions, now),
        Command::CancelJob { job_id, reason } => {
            let Some(job) = load_id::<Job>(txn, Table::Jobs, *job_id)? else {
                return Ok(not_found("job", *job_id));
            };
            if is_final_job(job.status) {
                return Ok(Outcome::rejected(RejectionCode::Conflict, format!("job {job_id} already ended as {:?}", job.status)));
            }
            let deployment_id = job.deployment_id;
            end_job(txn, job, JobStatus::Cancelled, Some(reason.clone()), "cancelled", now);
            refresh_deployment(txn, deployment_id, now)?;
            Ok(Outcome::applied(Some(*job_id), 1))
        }
    }
}

fn is_final_job(status: JobStatus) -> bool {
    matches!(status, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
}

/// Whether `attempt` is the running attempt of `job_id` (the fencing check of every report).
pub fn holds_lease(state: &dyn StateRead, job_id: u64, attempt: u32) -> StoreResult<bool> {
    Ok(load_id::<Job>(state, Table::Jobs, job_id)?
        .is_some_and(|job| job.status == JobStatus::Running && job.lease.as_ref().is_some_and(|lease| lease.attempt == attempt)))
}

/// What a new deployment is: everything `CreateDeployment` says, plus what a source-control
/// trigger adds (its origin, and which ref the build checks out).
pub(super) struct NewDeployment {
    pub commit_hash: String,
    pub environment: String,
    pub config_overrides: std::collections::BTreeMap<String, String>,
    pub rollback_of: Option<u64>,
    /// The deployment whose build is released again (no new build).
    pub release_of: Option<u64>,
    pub scm: Option<ScmOrigin>,
    pub checkout: Checkout,
}

/// Where the build's checkout comes from, beyond the commit.
#[derive(Default)]
pub(super) struct Checkout {
    /// The branch being built; the pipeline's (or the repository's) branch when `None`.
    pub branch: Option<String>,
    /// A ref the agent fetches and builds instead of the exact commit (a pull request's merge ref).
    pub fetch_ref: Option<String>,
}

/// Create a deployment of `pipeline` and queue its build job: the one code path behind
/// `CreateDeployment` and source-control triggers. Returns the new id and the rows written.
pub(super) fn create_deployment(txn: &mut Txn, proposal: &Proposal, pipeline: &Pipeline, new: NewDeployment) -> StoreResult<(u64, u64)> {
    let now = proposal.time;
    let pipeline_id = pipeline.pipeline_id;
    let deployment_id = next_id(txn, Table::Deployments)?;
    // Approvals gate the rollout; a deployment that only builds has nothing to approve.
    let required_approvals =
        if pipeline.deploy.rolls_out() { super::environments::required_approvals(txn, &new.environment)? } else { None };
    // A deployment that releases an earlier build (a promotion, a rollback) deploys that build's
    // commit, made when that build's checkout said.
    let commit_time = match new.release_of {
        Some(source) => load_id::<Deployment>(txn, Table::Deployments, source)?.and_then(|source| source.commit_time),
        None => None,
    };
    let deployment = Deployment {
        deployment_id,
        pipeline_id,
        commit_hash: new.commit_hash,
        status: DeploymentStatus::Pending,
        environment: new.environment,
        start_time: None,
        end_time: None,
        triggered_by: proposal.actor,
        rollback_of: new.rollback_of,
        config_overrides: new.config_overrides,
        status_reason: None,
        created_at: now,
        updated_at: now,
        scm: new.scm,
        events: 0,
        rollout: None,
        rolls_out: pipeline.deploy.rolls_out(),
        branch: new.checkout.branch.clone(),
        release_of: new.release_of,
        required_approvals,
        approvals: Vec::new(),
        commit_time,
    };
    let mut deployment = deployment;
    let queued =
        NewDeploymentEvent::new(event_kind::QUEUED, format!("deployment {deployment_id} to {} was created", deployment.environment));
    super::progress::append(txn, &mut deployment, &[queued], now);
    if let Some(needed) = deployment.required_approvals {
        let waiting = NewDeploymentEvent::new(
            event_kind::APPROVAL_REQUIRED,
            format!("{} is protected: the rollout waits for {needed} developer approval(s) or one admin's", deployment.environment),
        );
        super::progress::append(txn, &mut deployment, &[waiting], now);
    }
    store(txn, Table::Deployments, id_key(deployment_id), &deployment);
    txn.put(Table::Indexes, index_key(index::DEPLOYMENTS_BY_PIPELINE, &pipeline_id.to_string(), deployment_id), Vec::new());
    txn.put(Table::Indexes, index_key(index::DEPLOYMENTS_BY_STATUS, "pending", deployment_id), Vec::new());
    let mut affected = 1;
    // A rollback or a promotion releases what was built; only a fresh deployment builds.
    if deployment.rollback_of.is_none()
        && deployment.release_of.is_none()
        && let Some(spec) = build_spec(txn, pipeline, &deployment.commit_hash, new.checkout)?
    {
        let mut labels = pipeline.build.agent_labels.clone();
        labels.insert("pool".into(), "build".into());
        let max_attempts = 1 + pipeline.build.max_retries.unwrap_or(DEFAULT_MAX_RETRIES);
        enqueue_job(txn, now, &deployment, "build", labels, spec, max_attempts)?;
        affected += 1;
    }
    Ok((deployment_id, affected))
}

/// The build job's spec for `pipeline` at `commit`, or `None` when the pipeline has nothing to
/// build (no commands, no image).
fn build_spec(txn: &Txn, pipeline: &Pipeline, commit: &str, checkout: Checkout) -> StoreResult<Option<serde_json::Value>> {
    use davit_agent::job_spec::{BuildSpec, CommandStep, JobSpec};
    let build = &pipeline.build;
    let mut steps = Vec::new();
    for (name, command) in [("build", &pipeline.build_command), ("test", &build.test_command), ("package", &build.package_command)] {
        if let Some(command) = command.as_ref().filter(|command| !command.trim().is_empty()) {
            steps.push(CommandStep { name: name.to_string(), command: command.clone() });
        }
    }
    if steps.is_empty() && build.dockerfile.is_none() {
        return Ok(None);
    }
    let Some(repository) = load_id::<Repository>(txn, Table::Repositories, pipeline.repo_id)? else {
        return Ok(None);
    };
    let short_commit: String = commit.chars().take(12).collect();
    let spec = JobSpec::Build(BuildSpec {
        pipeline_name: pipeline.name.clone(),
        repository_url: repository.repo_url.clone(),
        commit: commit.to_string(),
        // A pipeline's branch may be a pattern (`release/*`), which names no branch to build.
        branch: checkout
            .branch
            .or_else(|| pipeline.branch.clone().filter(|branch| !branch.contains('*')))
            .or(Some(repository.branch.clone())),
        fetch_ref: checkout.fetch_ref,
        image: build.image.clone().unwrap_or_else(|| DEFAULT_BUILD_IMAGE.to_string()),
        steps,
        artifacts: build.artifacts.clone(),
        dockerfile: build.dockerfile.clone(),
        timeout_seconds: build.timeout_seconds.unwrap_or(DEFAULT_BUILD_TIMEOUT_SECONDS),
        artifact_version: short_commit,
    });
    Ok(Some(serde_json::to_value(spec).expect("job specs serialize")))
}

pub(super) fn enqueue_job(
    txn: &mut Txn,
    now: Timestamp,
    deployment: &Deployment,
    name: &str,
    labels: std::collections::BTreeMap<String, String>,
    spec: serde_json::Value,
    max_attempts: u32,
) -> StoreResult<u64> {
    let steps = serde_json::from_value::<davit_agent::job_spec::JobSpec>(spec.clone())
        .map(|spec| spec.step_names())
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(index, name)| StepRecord {
            index: index as u32,
            name,
            state: StepState::Pending,
            started_at: None,
            finished_at: None,
            exit_code: None,
        })
        .collect();
    let job_id = next_id(txn, Table::Jobs)?;
    let job = Job {
        job_id,
        deployment_id: deployment.deployment_id,
        name: name.to_string(),
        labels,
        spec,
        status: JobStatus::Queued,
        attempt: 0,
        max_attempts: max_attempts.max(1),
        lease: None,
        failure_reason: None,
        created_at: now,
        updated_at: now,
        pipeline_id: deployment.pipeline_id,
        queued_at: now,
        steps,
        attempts: Vec::new(),
        commit_time: None,
        resources: None,
    };
    store(txn, Table::Jobs, id_key(job_id), &job);
    txn.put(Table::Indexes, index_key(index::JOBS_BY_DEPLOYMENT, &deployment.deployment_id.to_string(), job_id), Vec::new());
    set_job_status_index(txn, job_id, None, JobStatus::Queued);
    Ok(job_id)
}

/// Lease a queued job to an agent; `Some(rejection)` when the scheduler's view was stale.
fn assign(txn: &mut Txn, assignment: &Assignment, lease_expires_at: Timestamp, now: Timestamp) -> StoreResult<Option<Outcome>> {
    let Assignment { job_id, agent_id, attempt } = *assignment;
    let Some(mut job) = load_id::<Job>(txn, Table::Jobs, job_id)? else {
        return Ok(Some(not_found("job", job_id)));
    };
    if job.status != JobStatus::Queued || attempt != job.attempt + 1 {
        return Ok(Some(Outcome::rejected(
            RejectionCode::StaleAttempt,
            format!("job {job_id} is {:?} at attempt {}; cannot assign attempt {attempt}", job.status, job.attempt),
        )));
    }
    match load_id::<Agent>(txn, Table::Agents, agent_id)? {
        Some(agent) if agent.deregistered_at.is_none() && agent.state == AgentState::Online => {}
        Some(agent) if agent.deregistered_at.is_none() => {
            return Ok(Some(Outcome::rejected(RejectionCode::Conflict, format!("agent {agent_id} is {:?}", agent.state))));
        }
        _ => return Ok(Some(not_found("agent", agent_id))),
    }
    set_job_status_index(txn, job_id, Some(job.status), JobStatus::Running);
    job.status = JobStatus::Running;
    job.attempt = attempt;
    job.lease = Some(Lease { agent_id, attempt, expires_at: lease_expires_at, accepted_at: None });
    job.attempts.push(AttemptRecord { attempt, agent_id, assigned_at: now, ended_at: None, outcome: None, reason: None });
    for step in &mut job.steps {
        *step = StepRecord { state: StepState::Pending, started_at: None, finished_at: None, exit_code: None, ..step.clone() };
    }
    job.updated_at = now;
    let deployment_id = job.deployment_id;
    store(txn, Table::Jobs, id_key(job_id), &job);
    refresh_deployment(txn, deployment_id, now)?;
    Ok(None)
}

/// End an attempt as the agent (or the leader, for a lost lease) reported it.
#[allow(clippy::too_many_arguments)]
fn finish_job(
    txn: &mut Txn,
    job_id: u64,
    attempt: u32,
    end: JobEnd,
    reason: Option<String>,
    output: Option<&str>,
    measured: &JobMeasurements,
    now: Timestamp,
) -> StoreResult<Outcome> {
    let Some(mut job) = load_id::<Job>(txn, Table::Jobs, job_id)? else {
        return Ok(not_found("job", job_id));
    };
    if job.status != JobStatus::Running || job.lease.as_ref().map(|lease| lease.attempt) != Some(attempt) {
        return Ok(stale_attempt(job_id, attempt));
    }
    let deployment_id = job.deployment_id;
    let release_job = super::rollout::is_release_job(&job);
    // What the agent measured belongs to this (the last) attempt; an older agent sends nothing
    // and leaves what an earlier attempt recorded.
    if measured.commit_time.is_some() {
        job.commit_time = measured.commit_time;
    }
    if measured.resources.is_some() {
        job.resources = measured.resources.clone();
    }
    if !release_job
        && let Some(commit_time) = measured.commit_time
        && let Some(mut deployment) = load_id::<Deployment>(txn, Table::Deployments, deployment_id)?
        && deployment.commit_time != Some(commit_time)
    {
        deployment.commit_time = Some(commit_time);
        store(txn, Table::Deployments, id_key(deployment_id), &deployment);
    }
    match end {
        JobEnd::Succeeded => end_job(txn, job, JobStatus::Succeeded, None, "succeeded", now),
        JobEnd::Failed => end_job(txn, job, JobStatus::Failed, reason, "failed", now),
        JobEnd::Cancelled => end_job(txn, job, JobStatus::Cancelled, reason, "cancelled", now),
        JobEnd::Infrastructure => retry_or_fail(txn, job, reason.unwrap_or_else(|| "infrastructure failure".into()), now),
    }
    if release_job {
        super::rollout::job_ended(txn, job_id, output, now)?;
    }
    refresh_deployment(txn, deployment_id, now)?;
    Ok(Outcome::applied(Some(job_id), 1))
}

/// Close the current attempt's record and the lease, and set the job's final status.
fn end_job(txn: &mut Txn, mut job: Job, status: JobStatus, reason: Option<String>, outcome: &str, now: Timestamp) {
    close_attempt(&mut job, outcome, reason.clone(), now);
    set_job_status_index(txn, job.job_id, Some(job.status), status);
    job.status = status;
    job.lease = None;
    if reason.is_some() {
        job.failure_reason = reason;
    }
    job.updated_at = now;
    store(txn, Table::Jobs, id_key(job.job_id), &job);
}

fn close_attempt(job: &mut Job, outcome: &str, reason: Option<String>, now: Timestamp) {
    if let Some(record) = job.attempts.iter_mut().rev().find(|record| record.attempt == job.attempt && record.ended_at.is_none()) {
        record.ended_at = Some(now);
        record.outcome = Some(outcome.to_string());
        record.reason = reason;
    }
}

/// An attempt lost to the infrastructure: queue the job again while attempts remain.
fn retry_or_fail(txn: &mut Txn, mut job: Job, reason: String, now: Timestamp) {
    if job.attempt < job.max_attempts {
        close_attempt(&mut job, "infrastructure", Some(reason.clone()), now);
        set_job_status_index(txn, job.job_id, Some(job.status), JobStatus::Queued);
        job.status = JobStatus::Queued;
        job.lease = None;
        job.queued_at = now;
        job.failure_reason = Some(format!("attempt {} failed: {reason}; retrying", job.attempt));
        job.updated_at = now;
        store(txn, Table::Jobs, id_key(job.job_id), &job);
    } else {
        let message = format!("attempt {} of {} failed: {reason}; no attempts left", job.attempt, job.max_attempts);
        end_job(txn, job, JobStatus::Failed, Some(message), "infrastructure", now);
    }
}

/// Retry (or fail) every job an agent holds; used when it is lost or deregistered.
fn release_agent_jobs(txn: &mut Txn, agent_id: u64, reason: &str, now: Timestamp) -> StoreResult<u64> {
    let mut released = 0;
    for job_id in index_ids(txn, index::JOBS_BY_STATUS, job_status_name(JobStatus::Running))? {
        let Some(job) = load_id::<Job>(txn, Table::Jobs, job_id)? else { continue };
        if job.lease.as_ref().is_some_and(|lease| lease.agent_id == agent_id) {
            let deployment_id = job.deployment_id;
            let release_job = super::rollout::is_release_job(&job);
            retry_or_fail(txn, job, reason.to_string(), now);
            if release_job {
                super::rollout::job_ended(txn, job_id, None, now)?;
            }
            refresh_deployment(txn, deployment_id, now)?;
            released += 1;
        }
    }
    Ok(released)
}

pub(super) fn cancel_deployment_jobs(txn: &mut Txn, deployment_id: u64, reason: &str, now: Timestamp) -> StoreResult<u64> {
    let mut cancelled = 0;
    for job_id in index_ids(txn, index::JOBS_BY_DEPLOYMENT, &deployment_id.to_string())? {
        let Some(job) = load_id::<Job>(txn, Table::Jobs, job_id)? else { continue };
        if !is_final_job(job.status) {
            end_job(txn, job, JobStatus::Cancelled, Some(reason.to_string()), "cancelled", now);
            cancelled += 1;
        }
    }
    Ok(cancelled)
}

pub(super) fn set_deployment_status(
    txn: &mut Txn,
    deployment: &mut Deployment,
    status: DeploymentStatus,
    reason: Option<String>,
    now: Timestamp,
) {
    let deployment_id = deployment.deployment_id;
    txn.delete(Table::Indexes, index_key(index::DEPLOYMENTS_BY_STATUS, status_name(deployment.status), deployment_id));
    txn.put(Table::Indexes, index_key(index::DEPLOYMENTS_BY_STATUS, status_name(status), deployment_id), Vec::new());
    if status == DeploymentStatus::InProgress && deployment.start_time.is_none() {
        deployment.start_time = Some(now);
    }
    if status.is_final() && deployment.end_time.is_none() {
        deployment.end_time = Some(now);
    }
    let ended = status.is_final() && !deployment.status.is_final();
    deployment.status = status;
    if reason.is_some() {
        deployment.status_reason = reason;
    }
    deployment.updated_at = now;
    if ended {
        let kind = match status {
            DeploymentStatus::Success => event_kind::SUCCEEDED,
            DeploymentStatus::RolledBack => event_kind::ROLLED_BACK,
            _ => event_kind::FAILED,
        };
        let message =
            deployment.status_reason.clone().unwrap_or_else(|| format!("deployment {deployment_id} ended: {}", status_name(status)));
        super::progress::append(txn, deployment, &[super::command::NewDeploymentEvent::new(kind, message)], now);
    }
    store(txn, Table::Deployments, id_key(deployment_id), deployment);
}

/// A deployment's status follows its jobs: in progress once one runs, failed when one fails,
/// successful when all succeeded.
fn refresh_deployment(txn: &mut Txn, deployment_id: u64, now: Timestamp) -> StoreResult<()> {
    let Some(mut deployment) = load_id::<Deployment>(txn, Table::Deployments, deployment_id)? else {
        return Ok(());
    };
    if deployment.status.is_final() {
        return Ok(());
    }
    let mut jobs = Vec::new();
    for job_id in index_ids(txn, index::JOBS_BY_DEPLOYMENT, &deployment_id.to_string())? {
        jobs.extend(load_id::<Job>(txn, Table::Jobs, job_id)?);
    }
    // Release jobs are the rollout's business: their results are facts for its planner.
    jobs.retain(|job| !super::rollout::is_release_job(job));
    if jobs.is_empty() {
        return Ok(());
    }
    let failed = jobs.iter().find(|job| matches!(job.status, JobStatus::Failed | JobStatus::Cancelled));
    let (status, reason) = if let Some(job) = failed {
        let verb = if job.status == JobStatus::Failed { "failed" } else { "was cancelled" };
        let detail = job.failure_reason.as_deref().map(|reason| format!(": {reason}")).unwrap_or_default();
        (DeploymentStatus::Failed, Some(format!("job {} ({}) {verb}{detail}", job.job_id, job.name)))
    } else if jobs.iter().all(|job| job.status == JobStatus::Succeeded) {
        if deployment.rolls_out {
            // Built; the controller rolls it out next and the rollout decides how it ends.
            (DeploymentStatus::InProgress, None)
        } else {
            (DeploymentStatus::Success, None)
        }
    } else if jobs.iter().any(|job| job.status != JobStatus::Queued) || deployment.status == DeploymentStatus::InProgress {
        (DeploymentStatus::InProgress, None)
    } else {
        return Ok(());
    };
    if status != deployment.status {
        set_deployment_status(txn, &mut deployment, status, reason.clone(), now);
        if status.is_final() {
            cancel_deployment_jobs(txn, deployment_id, reason.as_deref().unwrap_or("deployment ended"), now)?;
        }
    }
    Ok(())
}

/// The pipeline of repository `repo_id` named `name`, if any (names are unique per repository).
fn pipeline_named(txn: &Txn, repo_id: u64, name: &str) -> StoreResult<Option<u64>> {
    for pipeline_id in index_ids(txn, index::PIPELINES_BY_REPO, &repo_id.to_string())? {
        if let Some(pipeline) = load_id::<Pipeline>(txn, Table::Pipelines, pipeline_id)?
            && pipeline.name == name
        {
            return Ok(Some(pipeline_id));
        }
    }
    Ok(None)
}

fn stale_attempt(job_id: u64, attempt: u32) -> Outcome {
    Outcome::rejected(
        RejectionCode::StaleAttempt,
        format!("attempt {attempt} of job {job_id} no longer holds the lease; its report is refused"),
    )
}

pub fn status_name(status: DeploymentStatus) -> &'static str {
    match status {
        DeploymentStatus::Pending => "pending",
        DeploymentStatus::InProgress => "in_progress",
        DeploymentStatus::Success => "success",
        DeploymentStatus::Failed => "failed",
        DeploymentStatus::RolledBack => "rolled_back",
    }
}

pub fn job_status_name(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Queued => "queued",
        JobStatus::Running => "running",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
    }
}

fn set_job_status_index(txn: &mut Txn, job_id: u64, old: Option<JobStatus>, new: JobStatus) {
    if let Some(old) = old {
        txn.delete(Table::Indexes, index_key(index::JOBS_BY_STATUS, job_status_name(old), job_id));
    }
    txn.put(Table::Indexes, index_key(index::JOBS_BY_STATUS, job_status_name(new), job_id), Vec::new());
}

fn configuration_index_key(pipeline_id: u64, row_key: &[u8]) -> Vec<u8> {
    let mut key = index_prefix(index::CONFIGURATIONS_BY_PIPELINE, &pipeline_id.to_string());
    key.extend_from_slice(row_key);
    key
}

fn set_configurations(
    txn: &mut Txn,
    now: Timestamp,
    environment: &str,
    pipeline_id: Option<u64>,
    entries: &[ConfigEntry],
) -> StoreResult<Outcome> {
    if environment.trim().is_empty() || environment.len() > 20 {
        return Ok(Outcome::rejected(RejectionCode::Invalid, "environment must be 1 to 20 characters"));
    }
    if entries.is_empty() {
        return Ok(Outcome::rejected(RejectionCode::Invalid, "give at least one configuration variable"));
    }
    if let Some(pipeline_id) = pipeline_id
        && load_id::<Pipeline>(txn, Table::Pipelines, pipeline_id)?.is_none()
    {
        return Ok(not_found("pipeline", pipeline_id));
    }
    for entry in entries {
        if entry.key.is_empty() || entry.key.len() > 100 {
            return Ok(Outcome::rejected(RejectionCode::Invalid, format!("configuration key {:?} must be 1 to 100 characters", entry.key)));
        }
    }
    let mut last_id = None;
    for entry in entries {
        let row_key = configuration_key(environment, pipeline_id, &entry.key);
        let row = match load::<Configuration>(txn, Table::Configurations, &row_key)? {
            Some(mut row) => {
                row.value = entry.value.clone();
                row.is_secret = entry.is_secret;
                row.updated_at = now;
                row
            }
            None => Configuration {
                config_id: next_id(txn, Table::Configurations)?,
                environment: environment.to_string(),
                key: entry.key.clone(),
                value: entry.value.clone(),
                is_secret: entry.is_secret,
                pipeline_id,
                created_at: now,
                updated_at: now,
            },
        };
        last_id = Some(row.config_id);
        if let Some(pipeline_id) = pipeline_id {
            txn.put(Table::Indexes, configuration_index_key(pipeline_id, &row_key), Vec::new());
        }
        store(txn, Table::Configurations, row_key, &row);
    }
    Ok(Outcome::applied(last_id, entries.len() as u64))
}

fn delete_token(txn: &mut Txn, token_id: u64) -> StoreResult<u64> {
    let Some(token) = load_id::<ApiToken>(txn, Table::ApiTokens, token_id)? else {
        return Ok(0);
    };
    txn.delete(Table::ApiTokens, id_key(token_id));
    txn.delete(Table::Indexes, index_key(index::TOKENS_BY_HASH, &token.token_hash, token_id));
    txn.delete(Table::Indexes, index_key(index::TOKENS_BY_USER, &token.user_id.to_string(), token_id));
    Ok(1)
}

fn delete_notification(txn: &mut Txn, notification_id: u64) -> StoreResult<u64> {
    let Some(notification) = load_id::<Notification>(txn, Table::Notifications, notification_id)? else {
        return Ok(0);
    };
    txn.delete(Table::Notifications, id_key(notification_id));
    txn.delete(Table::Indexes, index_key(index::NOTIFICATIONS_BY_USER, &notification.user_id.to_string(), notification_id));
    Ok(1)
}

fn delete_artifact(txn: &mut Txn, artifact_id: u64) -> StoreResult<u64> {
    let Some(artifact) = load_id::<Artifact>(txn, Table::Artifacts, artifact_id)? else {
        return Ok(0);
    };
    txn.delete(Table::Artifacts, id_key(artifact_id));
    txn.delete(Table::Indexes, index_key(index::ARTIFACTS_BY_PIPELINE, &artifact.pipeline_id.to_string(), artifact_id));
    Ok(1)
}

fn delete_deployment(txn: &mut Txn, deployment_id: u64) -> StoreResult<u64> {
    let Some(deployment) = load_id::<Deployment>(txn, Table::Deployments, deployment_id)? else {
        return Ok(0);
    };
    let mut affected = 1;
    txn.delete(Table::Deployments, id_key(deployment_id));
    txn.delete(Table::Indexes, index_key(index::DEPLOYMENTS_BY_PIPELINE, &deployment.pipeline_id.to_string(), deployment_id));
    txn.delete(Table::Indexes, index_key(index::DEPLOYMENTS_BY_STATUS, status_name(deployment.status), deployment_id));
    for (key, _) in txn.scan_prefix(Table::Logs, &id_key(deployment_id))? {
        txn.delete(Table::Logs, key);
        affected += 1;
    }
    for job_id in index_ids(txn, index::JOBS_BY_DEPLOYMENT, &deployment_id.to_string())? {
        if let Some(job) = load_id::<Job>(txn, Table::Jobs, job_id)? {
            txn.delete(Table::Indexes, index_key(index::JOBS_BY_STATUS, job_status_name(job.status), job_id));
        }
        txn.delete(Table::Jobs, id_key(job_id));
        txn.delete(Table::Indexes, index_key(index::JOBS_BY_DEPLOYMENT, &deployment_id.to_string(), job_id));
        affected += 1;
    }
    Ok(affected)
}

/// Delete a pipeline and everything that hangs off it (ON DELETE CASCADE in the seed).
fn delete_pipeline(txn: &mut Txn, pipeline_id: u64) -> StoreResult<u64> {
    let Some(pipeline) = load_id::<Pipeline>(txn, Table::Pipelines, pipeline_id)? else {
        return Ok(0);
    };
    let mut affected = 1;
    txn.delete(Table::Pipelines, id_key(pipeline_id));
    txn.delete(Table::Indexes, index_key(index::PIPELINES_BY_REPO, &pipeline.repo_id.to_string(), pipeline_id));
    let owner = pipeline_id.to_string();
    for deployment_id in index_ids(txn, index::DEPLOYMENTS_BY_PIPELINE, &owner)? {
        affected += delete_deployment(txn, deployment_id)?;
    }
    for artifact_id in index_ids(txn, index::ARTIFACTS_BY_PIPELINE, &owner)? {
        affected += delete_artifact(txn, artifact_id)?;
    }
    let prefix = index_prefix(index::CONFIGURATIONS_BY_PIPELINE, &owner);
    for (index_entry, _) in txn.scan_prefix(Table::Indexes, &prefix)? {
        txn.delete(Table::Configurations, index_entry[prefix.len()..].to_vec());
        txn.delete(Table::Indexes, index_entry);
        affected += 1;
    }
    Ok(affected)
}
