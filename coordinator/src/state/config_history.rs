//! The version history of configuration keys, inside `apply`: every set of a key writes a new
//! [`ConfigVersion`] (1, 2, ...) to `Table::ConfigVersions`; a deployment resolves the
//! environment's configuration once, when it is created, into [`ConfigReference`]s (config id,
//! key, version; never a value), and its jobs open exactly those versions later. This module
//! never seals or opens a secret: the history holds the sealed string the row held.
//!
//! Retention: a version stays while a stored deployment references it (rollbacks can go back to
//! any stored deployment, so "could still be rolled back to" is "still stored"), and a key that
//! exists keeps its last [`VERSIONS_KEPT`] versions; any other version is pruned when its key
//! is set or deleted, or when the last deployment referencing it is deleted.

use std::collections::BTreeMap;

use super::apply::{configuration_key, configuration_prefix, index, index_ids, index_key, index_prefix, load, store};
use super::codec::{decode, id_key};
use super::records::{ConfigReference, ConfigVersion, Configuration, Timestamp};
use super::txn::{StateRead, Txn};
use crate::store::{StoreResult, Table};

/// Versions of an existing key kept whether or not anything references them (the current one
/// included).
pub const VERSIONS_KEPT: u64 = 10;

/// Key of one version in `Table::ConfigVersions`: config id, then version, both big-endian.
pub fn version_key(config_id: u64, version: u64) -> Vec<u8> {
    let mut key = id_key(config_id).to_vec();
    key.extend_from_slice(&id_key(version));
    key
}

/// The value a configuration row is indexed under in [`index::CONFIG_VERSIONS_BY_ROW`]:
/// unambiguous because the environment's length leads and the pipeline id is digits.
fn row_index_value(environment: &str, pipeline_id: Option<u64>, key: &str) -> String {
    format!("{}:{environment}:{}:{key}", environment.len(), pipeline_id.unwrap_or(0))
}

/// The value a version is indexed under in [`index::CONFIG_VERSIONS_USED_BY`].
fn use_index_value(config_id: u64, version: u64) -> String {
    format!("{config_id}:{version}")
}

pub fn load_version(state: &dyn StateRead, config_id: u64, version: u64) -> StoreResult<Option<ConfigVersion>> {
    load(state, Table::ConfigVersions, &version_key(config_id, version))
}

/// Whether any stored deployment references this version.
pub fn in_use(state: &dyn StateRead, config_id: u64, version: u64) -> StoreResult<bool> {
    let prefix = index_prefix(index::CONFIG_VERSIONS_USED_BY, &use_index_value(config_id, version));
    Ok(!state.scan_prefix_first(Table::Indexes, &prefix, 1)?.is_empty())
}

/// Every stored version of the key `key` (of `environment`, environment-wide or the pipeline's
/// own), oldest first: the versions of earlier rows of the same name that were deleted while
/// deployments still referenced them come first (lower config ids). A row stored before
/// versions existed shows its value as version 1.
pub fn versions_of(state: &dyn StateRead, environment: &str, pipeline_id: Option<u64>, key: &str) -> StoreResult<Vec<ConfigVersion>> {
    let mut versions = Vec::new();
    for config_id in index_ids(state, index::CONFIG_VERSIONS_BY_ROW, &row_index_value(environment, pipeline_id, key))? {
        for (_, bytes) in state.scan_prefix(Table::ConfigVersions, &id_key(config_id))? {
            versions.push(decode::<ConfigVersion>(Table::ConfigVersions, &bytes)?);
        }
    }
    if let Some(row) = load::<Configuration>(state, Table::Configurations, &configuration_key(environment, pipeline_id, key))?
        && row.version == 0
    {
        versions.push(as_version(&row));
    }
    Ok(versions)
}

/// The effective configuration rows of `environment` for `pipeline_id`: the pipeline's own
/// keys over the environment-wide ones, by key.
pub fn effective_rows(state: &dyn StateRead, environment: &str, pipeline_id: Option<u64>) -> StoreResult<BTreeMap<String, Configuration>> {
    let mut effective = BTreeMap::new();
    let scopes = if pipeline_id.is_some() { vec![None, pipeline_id] } else { vec![None] };
    for scope in scopes {
        for (_, bytes) in state.scan_prefix(Table::Configurations, &configuration_prefix(environment, scope))? {
            let row: Configuration = decode(Table::Configurations, &bytes)?;
            effective.insert(row.key.clone(), row);
        }
    }
    Ok(effective)
}

/// A row's value as the version it is (a row stored before versions existed: version 1).
pub fn as_version(row: &Configuration) -> ConfigVersion {
    ConfigVersion {
        config_id: row.config_id,
        version: row.current_version(),
        environment: row.environment.clone(),
        pipeline_id: row.pipeline_id,
        key: row.key.clone(),
        value: row.value.clone(),
        is_secret: row.is_secret,
        created_at: row.updated_at,
        created_by: None,
    }
}

fn record(txn: &mut Txn, version: &ConfigVersion) {
    store(txn, Table::ConfigVersions, version_key(version.config_id, version.version), version);
    let row = row_index_value(&version.environment, version.pipeline_id, &version.key);
    txn.put(Table::Indexes, index_key(index::CONFIG_VERSIONS_BY_ROW, &row, version.config_id), Vec::new());
}

/// Give a row stored before versions existed its version 1 in the history (the caller stores
/// the row). Rows that have a version already are left alone.
fn ensure_recorded(txn: &mut Txn, row: &mut Configuration) {
    if row.version == 0 {
        record(txn, &as_version(row));
        row.version = 1;
    }
}

/// Set `key` to `value`: the row's next version (1 for a new row), recorded in the history,
/// with versions no longer kept pruned. The caller has checked the key. Returns the row stored.
#[allow(clippy::too_many_arguments)]
pub(super) fn set(
    txn: &mut Txn,
    environment: &str,
    pipeline_id: Option<u64>,
    key: &str,
    value: &str,
    is_secret: bool,
    actor: Option<u64>,
    now: Timestamp,
) -> StoreResult<Configuration> {
    let row_key = configuration_key(environment, pipeline_id, key);
    let row = match load::<Configuration>(txn, Table::Configurations, &row_key)? {
        Some(mut row) => {
            ensure_recorded(txn, &mut row);
            row.value = value.to_string();
            row.is_secret = is_secret;
            row.updated_at = now;
            row.version += 1;
            row
        }
        None => Configuration {
            config_id: super::apply::next_id(txn, Table::Configurations)?,
            environment: environment.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            is_secret,
            pipeline_id,
            created_at: now,
            updated_at: now,
            version: 1,
        },
    };
    record(
        txn,
        &ConfigVersion {
            config_id: row.config_id,
            version: row.version,
            environment: environment.to_string(),
            pipeline_id,
            key: key.to_string(),
            value: value.to_string(),
            is_secret,
            created_at: now,
            created_by: actor,
        },
    );
    store(txn, Table::Configurations, row_key, &row);
    prune(txn, row.config_id)?;
    Ok(row)
}

/// Resolve the effective configuration of `environment` for `pipeline_id` into references,
/// recording version 1 of rows stored before versions existed.
pub(super) fn resolve(txn: &mut Txn, environment: &str, pipeline_id: u64) -> StoreResult<Vec<ConfigReference>> {
    let mut references = Vec::new();
    for (_, mut row) in effective_rows(txn, environment, Some(pipeline_id))? {
        if row.version == 0 {
            ensure_recorded(txn, &mut row);
            store(txn, Table::Configurations, configuration_key(&row.environment, row.pipeline_id, &row.key), &row);
        }
        references.push(ConfigReference {
            config_id: row.config_id,
            key: row.key,
            version: row.version,
            is_secret: row.is_secret,
            pipeline_id: row.pipeline_id,
        });
    }
    Ok(references)
}

/// `deployment_id` references these versions: they are kept while it is stored.
pub(super) fn hold(txn: &mut Txn, deployment_id: u64, references: &[ConfigReference]) {
    for reference in references {
        let value = use_index_value(reference.config_id, reference.version);
        txn.put(Table::Indexes, index_key(index::CONFIG_VERSIONS_USED_BY, &value, deployment_id), Vec::new());
    }
}

/// `deployment_id` is being deleted: it no longer holds its versions, which are pruned when
/// nothing else keeps them.
pub(super) fn release(txn: &mut Txn, deployment_id: u64, references: &[ConfigReference]) -> StoreResult<()> {
    for reference in references {
        let value = use_index_value(reference.config_id, reference.version);
        txn.delete(Table::Indexes, index_key(index::CONFIG_VERSIONS_USED_BY, &value, deployment_id));
    }
    let mut config_ids: Vec<u64> = references.iter().map(|reference| reference.config_id).collect();
    config_ids.sort_unstable();
    config_ids.dedup();
    for config_id in config_ids {
        prune(txn, config_id)?;
    }
    Ok(())
}

/// Delete the versions of `config_id` nothing keeps: not referenced by a stored deployment, and
/// not among the last [`VERSIONS_KEPT`] of a row that still exists (so once a row is deleted,
/// only its referenced versions stay). Returns how many went.
pub(super) fn prune(txn: &mut Txn, config_id: u64) -> StoreResult<u64> {
    let stored = txn.scan_prefix(Table::ConfigVersions, &id_key(config_id))?;
    let Some((_, first)) = stored.first() else {
        return Ok(0);
    };
    let first: ConfigVersion = decode(Table::ConfigVersions, first)?;
    let row = load::<Configuration>(txn, Table::Configurations, &configuration_key(&first.environment, first.pipeline_id, &first.key))?
        .filter(|row| row.config_id == config_id);
    // Versions from `kept_from` on are the row's last ones; a deleted row keeps none that way.
    let kept_from = row.map(|row| row.version.saturating_sub(VERSIONS_KEPT - 1));
    let mut pruned = 0;
    for (key, bytes) in &stored {
        let version: ConfigVersion = decode(Table::ConfigVersions, bytes)?;
        if kept_from.is_some_and(|from| version.version >= from) || in_use(txn, config_id, version.version)? {
            continue;
        }
        txn.delete(Table::ConfigVersions, key.clone());
        pruned += 1;
    }
    if pruned == stored.len() as u64 {
        let row = row_index_value(&first.environment, first.pipeline_id, &first.key);
        txn.delete(Table::Indexes, index_key(index::CONFIG_VERSIONS_BY_ROW, &row, config_id));
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::apply::{index, load_id};
    use crate::state::codec::encode;
    use crate::state::command::{Command, ConfigEntry};
    use crate::state::records::{AuditLog, Deployment, RolloutHost};
    use crate::state::tests::{propose, seed_pipeline};
    use crate::state::txn::EmptyState;

    fn set(key: &str, value: &str, is_secret: bool) -> Command {
        Command::SetConfigurations {
            environment: "staging".into(),
            pipeline_id: None,
            entries: vec![ConfigEntry { key: key.into(), value: value.into(), is_secret }],
        }
    }

    fn deploy(pipeline_id: u64, environment: &str, release_of: Option<u64>) -> Command {
        Command::CreateDeployment {
            pipeline_id,
            commit_hash: "c".repeat(40),
            environment: environment.into(),
            config_overrides: BTreeMap::from([("env".into(), environment.into())]),
            // A release in the same environment is a rollback; in another, a promotion.
            rollback_of: release_of.filter(|_| environment == "staging"),
            branch: None,
            release_of,
        }
    }

    fn deployment(txn: &Txn, deployment_id: u64) -> Deployment {
        load_id(txn, Table::Deployments, deployment_id).unwrap().unwrap()
    }

    fn stored_versions(txn: &Txn, key: &str) -> Vec<u64> {
        versions_of(txn, "staging", None, key).unwrap().into_iter().map(|version| version.version).collect()
    }

    fn row(txn: &Txn, key: &str) -> Option<Configuration> {
        load(txn, Table::Configurations, &configuration_key("staging", None, key)).unwrap()
    }

    #[test]
    fn every_set_makes_a_new_version_and_the_audit_entry_names_it() {
        let mut txn = Txn::new(&EmptyState);
        let first = propose(&mut txn, 10, set("db_password", "davit-sealed:v1:k:first", true)).result.unwrap();
        assert_eq!(first.config_versions, BTreeMap::from([("db_password".to_string(), 1)]));
        let second = propose(&mut txn, 20, set("db_password", "davit-sealed:v1:k:second", true)).result.unwrap();
        assert_eq!(second.config_versions["db_password"], 2);
        assert_eq!(row(&txn, "db_password").unwrap().version, 2);
        let history = versions_of(&txn, "staging", None, "db_password").unwrap();
        let values: Vec<(u64, &str, i64)> =
            history.iter().map(|version| (version.version, version.value.as_str(), version.created_at)).collect();
        assert_eq!(values, [(1, "davit-sealed:v1:k:first", 10), (2, "davit-sealed:v1:k:second", 20)]);
        assert_eq!(history[1].created_by, Some(1));
        // Another key counts its own versions.
        assert_eq!(propose(&mut txn, 30, set("db_host", "db", false)).result.unwrap().config_versions["db_host"], 1);

        let audit: Vec<AuditLog> =
            txn.scan_prefix(Table::AuditLogs, b"").unwrap().iter().map(|(_, bytes)| decode(Table::AuditLogs, bytes).unwrap()).collect();
        let details: Vec<&str> = audit.iter().map(|entry| entry.details.as_str()).collect();
        assert!(details[1].ends_with("keys=db_password versions=db_password@2"), "{details:?}");
        assert!(!details.iter().any(|details| details.contains("sealed")), "{details:?}");
        propose(&mut txn, 40, Command::DeleteConfiguration { environment: "staging".into(), pipeline_id: None, key: "db_host".into() })
            .result
            .unwrap();
        let last: AuditLog = decode(Table::AuditLogs, &txn.scan_prefix(Table::AuditLogs, b"").unwrap().last().unwrap().1).unwrap();
        assert_eq!(last.action, "configuration.delete");
        assert!(last.details.ends_with("versions=db_host@1"), "{}", last.details);
    }

    /// A deployment records references, never values; a rollback takes its target's versions,
    /// a promotion resolves its own environment's.
    #[test]
    fn a_deployment_references_the_versions_it_resolved_and_a_rollback_takes_its_targets() {
        let mut txn = Txn::new(&EmptyState);
        let pipeline_id = seed_pipeline(&mut txn);
        propose(&mut txn, 3, set("db_password", "davit-sealed:v1:k:one", true)).result.unwrap();
        propose(&mut txn, 3, set("db_host", "db-1", false)).result.unwrap();
        let pipeline_scoped = Command::SetConfigurations {
            environment: "staging".into(),
            pipeline_id: Some(pipeline_id),
            entries: vec![ConfigEntry { key: "db_host".into(), value: "own-db".into(), is_secret: false }],
        };
        propose(&mut txn, 3, pipeline_scoped).result.unwrap();
        let first = propose(&mut txn, 4, deploy(pipeline_id, "staging", None)).result.unwrap().id.unwrap();
        propose(&mut txn, 5, set("db_password", "davit-sealed:v1:k:two", true)).result.unwrap();
        let second = propose(&mut txn, 6, deploy(pipeline_id, "staging", None)).result.unwrap().id.unwrap();
        let rollback = propose(&mut txn, 7, deploy(pipeline_id, "staging", Some(first))).result.unwrap().id.unwrap();
        let promoted = propose(&mut txn, 8, deploy(pipeline_id, "production", Some(second))).result.unwrap().id.unwrap();

        let keys = |deployment_id| -> Vec<(String, u64, bool, Option<u64>)> {
            deployment(&txn, deployment_id)
                .configuration
                .expect("resolved")
                .into_iter()
                .map(|reference| (reference.key, reference.version, reference.is_secret, reference.pipeline_id))
                .collect()
        };
        let own = Some(pipeline_id);
        assert_eq!(keys(first), [("db_host".into(), 1, false, own), ("db_password".into(), 1, true, None)]);
        assert_eq!(keys(second), [("db_host".into(), 1, false, own), ("db_password".into(), 2, true, None)]);
        assert_eq!(keys(rollback), keys(first), "a rollback runs with exactly what its target ran with");
        assert!(keys(promoted).is_empty(), "production has no configuration of its own");
        for deployment_id in [first, second, rollback] {
            let stored = String::from_utf8(encode(&deployment(&txn, deployment_id))).unwrap();
            assert!(!stored.contains("davit-sealed") && !stored.contains("db-1"), "values in the record: {stored}");
        }
        assert!(in_use(&txn, deployment(&txn, first).configuration.unwrap()[1].config_id, 1).unwrap());
    }

    /// A deleted key's versions stay while a deployment references them and go with the last
    /// such deployment; unreferenced ones go at once.
    #[test]
    fn a_deleted_keys_history_is_kept_while_a_deployment_references_it() {
        let mut txn = Txn::new(&EmptyState);
        let pipeline_id = seed_pipeline(&mut txn);
        propose(&mut txn, 3, set("api_key", "davit-sealed:v1:k:one", true)).result.unwrap();
        propose(&mut txn, 3, set("api_key", "davit-sealed:v1:k:two", true)).result.unwrap();
        let deployed = propose(&mut txn, 4, deploy(pipeline_id, "staging", None)).result.unwrap().id.unwrap();
        propose(&mut txn, 5, set("api_key", "davit-sealed:v1:k:three", true)).result.unwrap();
        let config_id = row(&txn, "api_key").unwrap().config_id;
        propose(&mut txn, 6, Command::DeleteConfiguration { environment: "staging".into(), pipeline_id: None, key: "api_key".into() })
            .result
            .unwrap();
        assert!(row(&txn, "api_key").is_none());
        assert_eq!(stored_versions(&txn, "api_key"), [2], "only the referenced version outlives the key");
        assert_eq!(load_version(&txn, config_id, 2).unwrap().unwrap().value, "davit-sealed:v1:k:two");

        // Set again, the key is a new row whose versions start at 1; the old one's stays listed.
        propose(&mut txn, 7, set("api_key", "davit-sealed:v1:k:four", true)).result.unwrap();
        let versions: Vec<(u64, u64)> =
            versions_of(&txn, "staging", None, "api_key").unwrap().iter().map(|version| (version.config_id, version.version)).collect();
        let new_id = row(&txn, "api_key").unwrap().config_id;
        assert_ne!(new_id, config_id);
        assert_eq!(versions, [(config_id, 2), (new_id, 1)]);

        // Deleting the pipeline deletes its deployments: nothing references version 2 any more.
        propose(&mut txn, 8, Command::DeletePipeline { pipeline_id }).result.unwrap();
        assert_eq!(stored_versions(&txn, "api_key"), [1]);
        assert!(load_version(&txn, config_id, 2).unwrap().is_none());
        let row_index = index_prefix(index::CONFIG_VERSIONS_BY_ROW, &row_index_value("staging", None, "api_key"));
        assert_eq!(txn.scan_prefix(Table::Indexes, &row_index).unwrap().len(), 1, "the old row's index entry went with its versions");
        assert!(txn.scan_prefix(Table::Indexes, index::CONFIG_VERSIONS_USED_BY.as_bytes()).unwrap().is_empty());
        assert!(deployment_exists(&txn, deployed).is_none());
    }

    fn deployment_exists(txn: &Txn, deployment_id: u64) -> Option<Deployment> {
        load_id(txn, Table::Deployments, deployment_id).unwrap()
    }

    #[test]
    fn pruning_keeps_the_last_versions_and_every_referenced_one() {
        let mut txn = Txn::new(&EmptyState);
        let pipeline_id = seed_pipeline(&mut txn);
        propose(&mut txn, 3, set("replicas", "1", false)).result.unwrap();
        propose(&mut txn, 3, set("replicas", "2", false)).result.unwrap();
        propose(&mut txn, 4, deploy(pipeline_id, "staging", None)).result.unwrap();
        for value in 3..=25 {
            propose(&mut txn, 5, set("replicas", &value.to_string(), false)).result.unwrap();
        }
        let mut kept = vec![2];
        kept.extend(25 - VERSIONS_KEPT + 1..=25);
        assert_eq!(stored_versions(&txn, "replicas"), kept, "version 2 is referenced, 16..=25 are the last ten");
        assert_eq!(row(&txn, "replicas").unwrap().version, 25);
    }

    /// Rows and rollouts stored before versions existed keep working: a row's value becomes
    /// its version 1 when first touched, a rollback to a rollout that holds copies gets those
    /// copies again, and a deployment that never rolled out resolves versions when it does.
    #[test]
    fn rows_and_rollouts_from_before_versions_keep_working() {
        let mut txn = Txn::new(&EmptyState);
        let pipeline_id = seed_pipeline(&mut txn);
        // As version 1 of the format wrote rows before versions (no `version`).
        let old_row = b"\x01{\"config_id\":7,\"environment\":\"staging\",\"key\":\"db_password\",\"value\":\"davit-sealed:v1:k:old\",\"is_secret\":true,\"pipeline_id\":null,\"created_at\":1,\"updated_at\":2}";
        let decoded: Configuration = decode(Table::Configurations, old_row).unwrap();
        assert_eq!((decoded.version, decoded.current_version()), (0, 1));
        txn.put(Table::Configurations, configuration_key("staging", None, "db_password"), old_row.to_vec());
        assert_eq!(stored_versions(&txn, "db_password"), [1], "listed as version 1 before it is in the history");

        // A deployment stored before versions, whose rollout holds copies, as version 1 of the
        // format wrote it (no `configuration`, rows without `version`).
        let frozen = br#"{"deployment_id":1,"pipeline_id":1,"commit_hash":"cccccccccccccccccccccccccccccccccccccccc","status":"success","environment":"staging","start_time":4,"end_time":5,"triggered_by":1,"rollback_of":null,"config_overrides":{"env":"staging"},"created_at":3,"updated_at":5,"events":2,"rollout":{"service":"p1-staging","release":"d1","previous":null,"artifact_digest":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","artifact_kind":"image","hosts":[{"agent_id":9,"name":"h","region":null,"job":null,"unwind_failures":0}],"facts":{"strategy":{"strategy":"blue_green","keep_old_ms":300000},"hosts":[{"host":9,"new":"healthy","weight":100,"old_stopped":true,"busy":false,"lost":false,"wave":0}],"now":0,"rolling_back":null,"canary":{"step":null,"step_started_at":0,"verdict":null,"wave":0},"switched_at":null,"cleaning_up":false},"version":1,"config":[{"config_id":7,"environment":"staging","key":"db_password","value":"davit-sealed:v1:k:old","is_secret":true,"pipeline_id":null,"created_at":1,"updated_at":2}],"run":{"container_port":8080,"public_port":0,"image":null,"command":null,"cpu_millis":1000,"memory_bytes":2147483648,"keep_images":3},"health":{"http_path":null,"interval_ms":1000,"timeout_ms":2000,"healthy_threshold":2,"unhealthy_threshold":3,"deadline_ms":120000},"started_at":4}}"#;
        let legacy: Deployment = serde_json::from_slice(frozen).unwrap();
        assert_eq!(
            (legacy.configuration.as_ref(), legacy.rollout.as_ref().unwrap().config.as_slice()),
            (None, [decoded.clone()].as_slice())
        );
        let mut bytes = vec![crate::state::codec::FORMAT_V1];
        bytes.extend_from_slice(frozen);
        txn.put(Table::Deployments, id_key(1), bytes);
        store(&mut txn, Table::StateMeta, crate::state::apply::meta_keys::next_id(Table::Deployments), &2u64);
        let legacy = 1;
        let host = RolloutHost { agent_id: 9, name: "h".into(), region: None, job: None, unwind_failures: 0 };
        let start = |deployment_id| Command::StartRollout {
            deployment_id,
            hosts: vec![host.clone()],
            artifact_digest: "a".repeat(64),
            artifact_kind: "image".into(),
            previous: Some("d1".into()),
            config: Vec::new(),
        };

        // Set since: version 2. A rollback to the old deployment gets its copies, not version 2.
        assert_eq!(
            propose(&mut txn, 6, set("db_password", "davit-sealed:v1:k:new", true)).result.unwrap().config_versions["db_password"],
            2
        );
        let rollback = propose(&mut txn, 7, deploy(pipeline_id, "staging", Some(legacy))).result.unwrap().id.unwrap();
        assert_eq!(deployment(&txn, rollback).configuration, None);
        propose(&mut txn, 8, start(rollback)).result.unwrap();
        let rolled_back = deployment(&txn, rollback);
        assert_eq!((rolled_back.configuration, rolled_back.rollout.unwrap().config), (None, vec![decoded.clone()]));

        // A deployment created before versions that was never rolled out resolves when it
        // starts; the old row's value became version 1 when it was first set again.
        assert_eq!(load_version(&txn, 7, 1).unwrap().unwrap().value, "davit-sealed:v1:k:old");
        let pending = propose(&mut txn, 9, deploy(pipeline_id, "staging", None)).result.unwrap().id.unwrap();
        let mut record = deployment(&txn, pending);
        record.configuration = None;
        txn.put(Table::Deployments, id_key(pending), encode(&record));
        propose(&mut txn, 10, start(pending)).result.unwrap();
        let started = deployment(&txn, pending);
        assert!(started.rollout.unwrap().config.is_empty());
        assert_eq!(started.configuration.unwrap()[0].version, 2);
        // A rollout proposed before versions (its command carries copies) records them.
        let copied = propose(&mut txn, 11, deploy(pipeline_id, "staging", None)).result.unwrap().id.unwrap();
        let mut command = start(copied);
        if let Command::StartRollout { config, .. } = &mut command {
            config.push(decoded.clone());
        }
        propose(&mut txn, 12, command).result.unwrap();
        assert_eq!(deployment(&txn, copied).rollout.unwrap().config, [decoded]);
    }
}
