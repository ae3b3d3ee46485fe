//! What changed in the applied state that someone outside the state machine waits for: the
//! scheduler (work queued, capacity freed), agent gateways (a job assigned to or taken from one
//! of their agents), log followers. Derived from each applied command and its outcome, after
//! the write, on every node alike.

use super::command::{Command, Outcome};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateEvent {
    /// Jobs were queued or capacity may have been freed: the scheduler should look again.
    WorkChanged,
    /// These jobs were leased (to the agent and attempt now in their records).
    JobsAssigned { job_ids: Vec<u64> },
    /// These jobs changed status (ended, were cancelled or retried).
    JobsChanged { job_ids: Vec<u64> },
    /// Jobs of this deployment may have changed (cancellation of the deployment).
    DeploymentChanged { deployment_id: u64 },
    /// An agent connected, was lost or deregistered; its jobs may have moved.
    AgentChanged { agent_id: u64 },
    /// A repository was connected, changed or disconnected (the poller reloads its list).
    RepositoriesChanged,
    /// The deployment has new progress events (its followers read on).
    DeploymentProgress { deployment_id: u64 },
}

/// The events of one applied command; none for a rejected one.
pub fn events_of(command: &Command, outcome: &Outcome) -> Vec<StateEvent> {
    let Ok(applied) = &outcome.result else {
        return Vec::new();
    };
    let mut events: Vec<StateEvent> =
        applied.progressed.iter().map(|&deployment_id| StateEvent::DeploymentProgress { deployment_id }).collect();
    events.extend(events_of_command(command, outcome, applied));
    events
}

fn events_of_command(command: &Command, outcome: &Outcome, applied: &super::command::Applied) -> Vec<StateEvent> {
    match command {
        Command::Batch { proposals } => {
            proposals.iter().zip(&outcome.batch).flat_map(|(proposal, outcome)| events_of(&proposal.command, outcome)).collect()
        }
        Command::CreateDeployment { .. } | Command::EnqueueJob { .. } => vec![StateEvent::WorkChanged],
        Command::AssignJob { job_id, .. } => vec![StateEvent::JobsAssigned { job_ids: vec![*job_id] }],
        Command::AssignJobs { assignments, .. } if applied.affected > 0 => {
            vec![StateEvent::JobsAssigned { job_ids: assignments.iter().map(|assignment| assignment.job_id).collect() }]
        }
        Command::FinishJob { job_id, .. }
        | Command::CompleteJob { job_id, .. }
        | Command::ExpireLease { job_id, .. }
        | Command::CancelJob { job_id, .. } => {
            vec![StateEvent::JobsChanged { job_ids: vec![*job_id] }, StateEvent::WorkChanged]
        }
        Command::SetDeploymentStatus { deployment_id, .. } => {
            vec![StateEvent::DeploymentChanged { deployment_id: *deployment_id }, StateEvent::WorkChanged]
        }
        Command::AgentConnected { agent_id, .. } | Command::AgentLost { agent_id, .. } | Command::DeregisterAgent { agent_id } => {
            vec![StateEvent::AgentChanged { agent_id: *agent_id }, StateEvent::WorkChanged]
        }
        Command::DeletePipeline { .. } | Command::UpdatePipeline { .. } => vec![StateEvent::WorkChanged],
        Command::ConnectRepository { .. } | Command::UpdateRepository { .. } | Command::DeleteRepository { .. } => {
            vec![StateEvent::RepositoriesChanged]
        }
        Command::RecordScmChanges { .. } => {
            let Some(report) = &applied.scm else { return Vec::new() };
            let mut events: Vec<StateEvent> =
                report.cancelled_deployments.iter().map(|&deployment_id| StateEvent::DeploymentChanged { deployment_id }).collect();
            if !report.deployments().is_empty() || !events.is_empty() {
                events.push(StateEvent::WorkChanged);
            }
            events
        }
        _ => Vec::new(),
    }
}
