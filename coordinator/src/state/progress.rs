//! Progress events of deployments: appended by `apply` (numbered per deployment, timed by the
//! proposal), read by `GET /api/v1/deployments/{id}/events`, the gRPC watch and the CLI.

use super::apply::{load_id, store};
use super::codec::{decode, id_key};
use super::command::{NewDeploymentEvent, Outcome};
use super::records::{Deployment, DeploymentEvent, Timestamp};
use super::txn::{StateRead, Txn};
use crate::store::{StoreResult, Table};

/// Key of a progress event: deployment, sequence.
pub fn event_key(deployment_id: u64, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&id_key(deployment_id));
    key.extend_from_slice(&id_key(seq));
    key
}

/// Append `events` to the deployment, numbered on from its last; returns how many.
pub(super) fn append(txn: &mut Txn, deployment: &mut Deployment, events: &[NewDeploymentEvent], now: Timestamp) -> u64 {
    for event in events {
        deployment.events += 1;
        let record = DeploymentEvent {
            deployment_id: deployment.deployment_id,
            seq: deployment.events,
            at: now,
            kind: event.kind.clone(),
            host: event.host,
            region: event.region.clone(),
            weight: event.weight,
            message: event.message.clone(),
        };
        store(txn, Table::DeploymentEvents, event_key(deployment.deployment_id, record.seq), &record);
    }
    events.len() as u64
}

/// The deployments that `writes` gives new events, in id order (for [`super::command::Applied::progressed`]).
pub(super) fn progressed(writes: &super::txn::Writes) -> Vec<u64> {
    let mut ids: Vec<u64> = writes
        .keys()
        .filter(|(table, _)| *table == Table::DeploymentEvents)
        .filter_map(|(_, key)| key.get(..8).and_then(|id| id.try_into().ok()).map(u64::from_be_bytes))
        .collect();
    ids.dedup();
    ids
}

/// `Command::RecordDeploymentEvents`.
pub(super) fn record(txn: &mut Txn, deployment_id: u64, events: &[NewDeploymentEvent], now: Timestamp) -> StoreResult<Outcome> {
    let Some(mut deployment) = load_id::<Deployment>(txn, Table::Deployments, deployment_id)? else {
        return Ok(super::apply::not_found("deployment", deployment_id));
    };
    let affected = append(txn, &mut deployment, events, now);
    store(txn, Table::Deployments, id_key(deployment_id), &deployment);
    Ok(Outcome::applied(Some(deployment_id), affected + 1))
}

/// The deployment's events after `after_seq` (0: from the first), at most `limit`, in order.
pub fn events_after(state: &dyn StateRead, deployment_id: u64, after_seq: u64, limit: usize) -> StoreResult<Vec<DeploymentEvent>> {
    let rows = state.scan_prefix(Table::DeploymentEvents, &id_key(deployment_id))?;
    let start = event_key(deployment_id, after_seq.saturating_add(1));
    rows.into_iter()
        .filter(|(key, _)| key.as_slice() >= start.as_slice())
        .take(limit)
        .map(|(_, value)| decode(Table::DeploymentEvents, &value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::command::Command;
    use crate::state::records::event_kind;
    use crate::state::tests::{propose, seed_pipeline};
    use crate::state::txn::EmptyState;

    #[test]
    fn events_are_numbered_per_deployment_and_read_after_a_sequence() {
        let mut txn = Txn::new(&EmptyState);
        let pipeline_id = seed_pipeline(&mut txn);
        for _ in 0..2 {
            let create = Command::CreateDeployment {
                pipeline_id,
                commit_hash: "a".repeat(40),
                environment: "staging".into(),
                config_overrides: Default::default(),
                rollback_of: None,
                branch: None,
                release_of: None,
            };
            propose(&mut txn, 10, create).result.expect("created");
        }
        for (deployment_id, count) in [(1u64, 3usize), (2, 2), (1, 2)] {
            let events: Vec<NewDeploymentEvent> =
                (0..count).map(|index| NewDeploymentEvent::new(event_kind::HOST_STARTED, format!("event {index}"))).collect();
            let outcome = propose(&mut txn, 1_000 + deployment_id as i64, Command::RecordDeploymentEvents { deployment_id, events });
            assert_eq!(outcome.result.expect("applied").progressed, vec![deployment_id]);
        }
        let all = events_after(&txn, 1, 0, 100).unwrap();
        // Event 1 of each is `queued`, from its creation.
        assert_eq!(all.iter().map(|event| event.seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(all[0].kind, event_kind::QUEUED);
        assert!(all[1..].iter().all(|event| event.deployment_id == 1 && event.at == 1_001));
        let later = events_after(&txn, 1, 3, 1).unwrap();
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].seq, 4);
        assert_eq!(events_after(&txn, 2, 0, 100).unwrap().len(), 3);
        assert!(events_after(&txn, 2, 3, 100).unwrap().is_empty());
        let missing = propose(&mut txn, 1, Command::RecordDeploymentEvents { deployment_id: 9, events: Vec::new() });
        assert!(missing.result.is_err());
    }
}
