use std::collections::BTreeMap;

use super::apply;
use super::apply::{audit_hash, configuration_key, index, index_ids, load, load_id};
use super::codec::{decode, encode};
use super::command::*;
use super::records::*;
use super::txn::{EmptyState, StateRead, Txn};
use crate::store::Table;

pub(super) fn propose(txn: &mut Txn, time: i64, command: Command) -> Outcome {
    let proposal = Proposal { time, actor: Some(1), command, source: None };
    apply(txn, &proposal, time as u64).unwrap()
}

fn id(outcome: Outcome) -> u64 {
    outcome.result.expect("applied").id.expect("an id")
}

pub(super) fn seed_pipeline(txn: &mut Txn) -> u64 {
    let repo_id = id(propose(
        txn,
        1,
        Command::ConnectRepository {
            name: "repo".into(),
            repo_url: "https://github.com/org/repo".into(),
            branch: "main".into(),
            scm_type: ScmType::Github,
            webhook_secret: Some("sealed".into()),
            api_url: None,
            access_token: None,
            poll_interval_seconds: None,
        },
    ));
    id(propose(
        txn,
        2,
        Command::CreatePipeline {
            name: "production-pipeline".into(),
            repo_id,
            branch: Some("main".into()),
            build_command: Some("mvn clean package".into()),
            deploy_strategy: DeployStrategy::BlueGreen,
            environment: "production".into(),
            build: Default::default(),
            deploy: Default::default(),
        },
    ))
}

#[test]
fn users_are_unique_by_name_and_email() {
    let mut txn = Txn::new(&EmptyState);
    let create = |name: &str, email: &str| Command::CreateUser {
        username: name.into(),
        email: email.into(),
        password_hash: "h".into(),
        role: Role::Developer,
    };
    assert_eq!(id(propose(&mut txn, 1, create("john_doe", "j@x"))), 1);
    let duplicate = propose(&mut txn, 2, create("john_doe", "other@x"));
    assert_eq!(duplicate.result.unwrap_err().code, RejectionCode::Conflict);
    let duplicate_email = propose(&mut txn, 3, create("jane", "j@x"));
    assert_eq!(duplicate_email.result.unwrap_err().code, RejectionCode::Conflict);
    assert_eq!(id(propose(&mut txn, 4, create("jane", "jane@x"))), 2);
}

#[test]
fn rejected_commands_leave_no_trace_and_no_audit_entry() {
    let mut txn = Txn::new(&EmptyState);
    let outcome = propose(&mut txn, 1, Command::DeletePipeline { pipeline_id: 9 });
    assert_eq!(outcome.result.unwrap_err().message, "pipeline 9 not found");
    assert!(txn.scan_prefix(Table::AuditLogs, b"").unwrap().is_empty());
    assert!(txn.scan_prefix(Table::StateMeta, b"").unwrap().is_empty());
}

#[test]
fn configurations_upsert_per_environment_and_pipeline() {
    let mut txn = Txn::new(&EmptyState);
    let pipeline_id = seed_pipeline(&mut txn);
    let entries = vec![
        ConfigEntry { key: "db_password".into(), value: "new_password".into(), is_secret: true },
        ConfigEntry { key: "api_key".into(), value: "12345".into(), is_secret: false },
    ];
    let set = |entries: Vec<ConfigEntry>, pipeline_id| Command::SetConfigurations { environment: "staging".into(), pipeline_id, entries };
    assert_eq!(propose(&mut txn, 3, set(entries.clone(), None)).result.unwrap().affected, 2);
    propose(&mut txn, 4, set(vec![ConfigEntry { key: "api_key".into(), value: "67890".into(), is_secret: false }], None));
    propose(&mut txn, 5, set(entries, Some(pipeline_id)));
    let row: Configuration = load(&txn, Table::Configurations, &configuration_key("staging", None, "api_key")).unwrap().unwrap();
    assert_eq!(row.value, "67890");
    assert_eq!(row.created_at, 3);
    assert_eq!(row.updated_at, 4);
    assert_eq!(txn.scan_prefix(Table::Configurations, b"staging\0").unwrap().len(), 4);
}

#[test]
fn deleting_a_repository_cascades_to_pipelines_deployments_artifacts_and_configurations() {
    let mut txn = Txn::new(&EmptyState);
    let pipeline_id = seed_pipeline(&mut txn);
    let deployment_id = id(propose(
        &mut txn,
        3,
        Command::CreateDeployment {
            pipeline_id,
            commit_hash: "abc123def".into(),
            environment: "staging".into(),
            config_overrides: BTreeMap::from([("env".into(), "staging".into())]),
            rollback_of: None,
            branch: None,
            release_of: None,
        },
    ));
    propose(
        &mut txn,
        4,
        Command::RecordArtifact {
            pipeline_id,
            version: "v1.0.0".into(),
            artifact_path: "sha256/ab".into(),
            digest: "ab".into(),
            size_bytes: 10,
            produced_by: None,
        },
    );
    propose(
        &mut txn,
        5,
        Command::SetConfigurations {
            environment: "staging".into(),
            pipeline_id: Some(pipeline_id),
            entries: vec![ConfigEntry { key: "k".into(), value: "v".into(), is_secret: false }],
        },
    );
    let deployment: Deployment = load_id(&txn, Table::Deployments, deployment_id).unwrap().unwrap();
    assert_eq!(deployment.triggered_by, Some(1));
    assert_eq!(deployment.status, DeploymentStatus::Pending);

    let outcome = propose(&mut txn, 6, Command::DeleteRepository { repo_id: 1 });
    // Repository, pipeline, deployment, its build job, artifact, configuration.
    assert_eq!(outcome.result.unwrap().affected, 6);
    for table in [Table::Repositories, Table::Pipelines, Table::Deployments, Table::Artifacts, Table::Configurations] {
        assert!(txn.scan_prefix(table, b"").unwrap().is_empty(), "{table:?} still has rows");
    }
    assert!(index_ids(&txn, index::DEPLOYMENTS_BY_STATUS, "pending").unwrap().is_empty());
}

#[test]
fn a_lease_fences_out_stale_attempts_and_retries_until_the_limit() {
    let mut txn = Txn::new(&EmptyState);
    let pipeline_id = seed_pipeline(&mut txn);
    let deployment_id = id(propose(
        &mut txn,
        3,
        Command::CreateDeployment {
            pipeline_id,
            commit_hash: "abc".into(),
            environment: "staging".into(),
            config_overrides: BTreeMap::new(),
            rollback_of: None,
            branch: None,
            release_of: None,
        },
    ));
    propose(&mut txn, 3, Command::CreateRegistrationToken { description: "fleet".into(), token_hash: "t".into(), expires_at: 1_000 })
        .result
        .unwrap();
    let agent = |name: &str| Command::RegisterAgent {
        name: name.into(),
        labels: BTreeMap::new(),
        credential_hash: "h".into(),
        registration_token_hash: "t".into(),
    };
    let connected = |agent_id: u64| Command::AgentConnected {
        agent_id,
        node_id: 1,
        labels: BTreeMap::new(),
        capacity: 1,
        executors: vec!["shell".into()],
        draining: false,
        version: "test".into(),
    };
    let agent_a = id(propose(&mut txn, 4, agent("a")));
    let agent_b = id(propose(&mut txn, 5, agent("b")));
    propose(&mut txn, 5, connected(agent_a)).result.unwrap();
    propose(&mut txn, 5, connected(agent_b)).result.unwrap();
    let job_id = id(propose(
        &mut txn,
        6,
        Command::EnqueueJob { deployment_id, name: "build".into(), labels: BTreeMap::new(), spec: serde_json::json!({}), max_attempts: 2 },
    ));
    propose(&mut txn, 7, Command::AssignJob { job_id, agent_id: agent_a, attempt: 1, lease_expires_at: 100 }).result.unwrap();
    propose(&mut txn, 8, Command::ExpireLease { job_id, attempt: 1, reason: None }).result.unwrap();
    propose(&mut txn, 9, Command::AssignJob { job_id, agent_id: agent_b, attempt: 2, lease_expires_at: 200 }).result.unwrap();
    // The first agent comes back late: its report is refused.
    let late = propose(&mut txn, 10, Command::CompleteJob { job_id, attempt: 1, succeeded: true, failure_reason: None });
    assert_eq!(late.result.unwrap_err().code, RejectionCode::StaleAttempt);
    propose(&mut txn, 11, Command::ExpireLease { job_id, attempt: 2, reason: None }).result.unwrap();
    let job: Job = load_id(&txn, Table::Jobs, job_id).unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Failed);
    assert!(job.failure_reason.unwrap().contains("no attempts left"));
}

#[test]
fn the_audit_log_is_hash_chained() {
    let mut txn = Txn::new(&EmptyState);
    seed_pipeline(&mut txn);
    let entries: Vec<AuditLog> =
        txn.scan_prefix(Table::AuditLogs, b"").unwrap().into_iter().map(|(_, bytes)| decode(Table::AuditLogs, &bytes).unwrap()).collect();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].previous_hash, "");
    assert_eq!(entries[1].previous_hash, entries[0].hash);
    for entry in &entries {
        assert_eq!(audit_hash(&entry.previous_hash, entry), entry.hash);
    }
    assert!(!entries[0].details.contains("sealed"), "webhook secret leaked into the audit log");
}

/// A batch entry behaves exactly like its proposals written one entry each: same rows, same
/// audit chain, same outcomes, a rejected member changing nothing and not stopping the rest.
#[test]
fn a_batch_applies_like_its_proposals_one_by_one() {
    let user = |name: &str, time: i64| Proposal {
        time,
        actor: Some(1),
        command: Command::CreateUser { username: name.into(), email: format!("{name}@x"), password_hash: "h".into(), role: Role::Viewer },
        source: Some("10.0.0.1".into()),
    };
    let members = vec![
        user("ann", 5),
        user("ann", 6),
        Proposal { command: Command::DeletePipeline { pipeline_id: 9 }, ..user("x", 7) },
        user("bob", 8),
    ];

    let mut one_by_one = Txn::new(&EmptyState);
    let separate: Vec<Outcome> = members.iter().map(|proposal| apply(&mut one_by_one, proposal, 3).unwrap()).collect();

    let mut batched = Txn::new(&EmptyState);
    let batch = Proposal { time: 9, actor: None, command: Command::Batch { proposals: members.clone() }, source: None };
    let outcome = apply(&mut batched, &batch, 3).unwrap();
    assert_eq!(outcome.batch, separate);
    assert_eq!(outcome.result.unwrap().affected, 2, "two of the four members apply");
    assert_eq!(separate[1].result.clone().unwrap_err().code, RejectionCode::Conflict);
    assert_eq!(one_by_one.into_batch(), batched.into_batch());

    let mut nested = Txn::new(&EmptyState);
    let outer = Proposal { command: Command::Batch { proposals: vec![batch.clone(), user("cy", 9)] }, ..batch };
    let outcome = apply(&mut nested, &outer, 4).unwrap();
    assert_eq!(outcome.batch[0].result.clone().unwrap_err().message, "batches do not nest");
    assert!(outcome.batch[1].result.is_ok());
}

#[test]
fn apply_is_deterministic() {
    let run = || {
        let mut txn = Txn::new(&EmptyState);
        seed_pipeline(&mut txn);
        txn.into_batch()
    };
    assert_eq!(run(), run());
}

/// Version 1 of the stored formats, frozen: these bytes were written by this version of davit
/// and must decode forever.
#[test]
fn frozen_v1_records_still_decode() {
    let user = b"\x01{\"user_id\":1,\"username\":\"admin\",\"email\":\"admin@localhost\",\"password_hash\":\"$argon2id$x\",\"role\":\"admin\",\"created_at\":1764134400000,\"updated_at\":1764134400000}";
    let user: User = decode(Table::Users, user).unwrap();
    assert_eq!(user.role, Role::Admin);
    assert_eq!(user.username, "admin");

    let proposal = b"{\"time\":1764134400000,\"actor\":1,\"command\":{\"type\":\"set_configurations\",\"environment\":\"staging\",\"pipeline_id\":null,\"entries\":[{\"key\":\"api_key\",\"value\":\"12345\",\"is_secret\":false}]}}";
    let proposal: Proposal = serde_json::from_slice(proposal).unwrap();
    assert!(matches!(proposal.command, Command::SetConfigurations { ref entries, .. } if entries[0].value == "12345"));

    let pipeline = b"\x01{\"pipeline_id\":3,\"name\":\"p\",\"repo_id\":1,\"branch\":\"main\",\"build_command\":null,\"deploy_strategy\":\"blue-green\",\"environment\":\"development\",\"is_active\":true,\"created_at\":1,\"updated_at\":2}";
    let pipeline: Pipeline = decode(Table::Pipelines, pipeline).unwrap();
    assert_eq!(pipeline.deploy_strategy, DeployStrategy::BlueGreen);

    // And what we write today is still version 1.
    assert_eq!(encode(&user)[0], 1);
    assert!(decode::<User>(Table::Users, b"\x02{}").unwrap_err().to_string().contains("newer davit"));
}

/// A repository and its connect command as version 1 wrote them before polling settings
/// existed: they still decode, and the repository follows the node's default interval.
#[test]
fn frozen_repository_without_polling_settings_still_decodes() {
    let repository = b"\x01{\"repo_id\":1,\"name\":\"repo\",\"repo_url\":\"https://github.com/org/repo\",\"branch\":\"main\",\"scm_type\":\"github\",\"webhook_secret\":null,\"user_id\":1,\"created_at\":1,\"updated_at\":2}";
    let repository: Repository = decode(Table::Repositories, repository).unwrap();
    assert_eq!(repository.poll_interval_seconds, None);
    let proposal = b"{\"time\":1,\"actor\":1,\"command\":{\"type\":\"connect_repository\",\"name\":\"repo\",\"repo_url\":\"https://github.com/org/repo\",\"branch\":\"main\",\"scm_type\":\"github\",\"webhook_secret\":null}}";
    let proposal: Proposal = serde_json::from_slice(proposal).unwrap();
    assert!(matches!(proposal.command, Command::ConnectRepository { poll_interval_seconds: None, .. }));
    // Unset, the field is not written, so older versions read what this one writes.
    assert!(!String::from_utf8_lossy(&encode(&repository)).contains("poll_interval_seconds"));
}

/// An agent's measurements of a build (commit time, container usage) land on the job and the
/// commit time on its deployment; a promotion of that build carries the commit time along, and
/// a result without measurements (an older agent) leaves what was recorded.
#[test]
fn a_builds_measurements_are_recorded_and_a_promotion_carries_its_commit_time() {
    let mut txn = Txn::new(&EmptyState);
    let pipeline_id = seed_pipeline(&mut txn);
    let create = |environment: &str, release_of: Option<u64>| Command::CreateDeployment {
        pipeline_id,
        commit_hash: "a".repeat(40),
        environment: environment.into(),
        config_overrides: BTreeMap::new(),
        rollback_of: None,
        branch: None,
        release_of,
    };
    let staging = id(propose(&mut txn, 3, create("staging", None)));
    propose(&mut txn, 3, Command::CreateRegistrationToken { description: "fleet".into(), token_hash: "t".into(), expires_at: 1_000 })
        .result
        .unwrap();
    let register = Command::RegisterAgent {
        name: "a".into(),
        labels: BTreeMap::new(),
        credential_hash: "h".into(),
        registration_token_hash: "t".into(),
    };
    let agent_id = id(propose(&mut txn, 4, register));
    let connected = Command::AgentConnected {
        agent_id,
        node_id: 1,
        labels: BTreeMap::new(),
        capacity: 1,
        executors: vec!["shell".into()],
        draining: false,
        version: "test".into(),
    };
    propose(&mut txn, 4, connected).result.unwrap();
    let job_id = index_ids(&txn, index::JOBS_BY_DEPLOYMENT, &staging.to_string()).unwrap()[0];
    propose(&mut txn, 5, Command::AssignJob { job_id, agent_id, attempt: 1, lease_expires_at: 100 }).result.unwrap();
    let usage = ResourceUsage {
        samples: 4,
        cpu_millicores_peak: 990,
        cpu_millicores_mean: 700,
        memory_bytes_peak: 300 << 20,
        memory_bytes_mean: 200 << 20,
    };
    let measured = JobMeasurements { commit_time: Some(1_000), resources: Some(usage.clone()) };
    let finish = Command::FinishJob { job_id, attempt: 1, end: JobEnd::Succeeded, reason: None, output: None, measured };
    propose(&mut txn, 6, finish).result.unwrap();
    let job: Job = load_id(&txn, Table::Jobs, job_id).unwrap().unwrap();
    assert_eq!((job.commit_time, job.resources), (Some(1_000), Some(usage)));
    let built: Deployment = load_id(&txn, Table::Deployments, staging).unwrap().unwrap();
    assert_eq!((built.status, built.commit_time), (DeploymentStatus::Success, Some(1_000)));
    let promoted = id(propose(&mut txn, 7, create("production", Some(staging))));
    let promoted: Deployment = load_id(&txn, Table::Deployments, promoted).unwrap().unwrap();
    assert_eq!(promoted.commit_time, Some(1_000), "the promoted build's commit is as old as it was");

    // The old wire form of FinishJob (no `measured`) still decodes, and records nothing.
    let old: Command = serde_json::from_str(r#"{"type":"finish_job","job_id":1,"attempt":1,"end":"succeeded","reason":null}"#)
        .expect("old FinishJob decodes");
    assert!(matches!(old, Command::FinishJob { ref measured, .. } if measured.is_empty()));
}
