//! The poller, on the leader: each repository that polls (see
//! `polling::effective_poll_interval`) is read with `git ls-remote` at its interval (±10 %
//! jitter), and what changed since the known heads is submitted through `trigger::submit`,
//! exactly as a webhook's events are, so that `apply` de-duplicates the two. Each poll is its
//! own task: a slow or failing repository (retried with backoff) never delays another. It never
//! decides what runs; `apply` does.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::polling::{self, LsRemoteError, PollSchedule};
use super::trigger::{self, Triggered};
use crate::api_error::ApiError;
use crate::config::ScmSettings;
use crate::node::{Node, Requester};
use crate::outbound::OutboundPolicy;
use crate::state::ScmSource;
use crate::state::codec::decode;
use crate::state::events::StateEvent;
use crate::state::records::{Repository, Timestamp};
use crate::store::{StoreError, Table, full_range};

/// How often the poller looks for repositories that are due.
const TICK: Duration = Duration::from_millis(500);
/// The list of repositories that poll is read again on every repository change (a state event)
/// and at least this often, in case an event was missed.
const RELOAD_REPOSITORIES_EVERY: Duration = Duration::from_secs(30);
/// The most `git ls-remote` processes one leader runs at once.
const MAX_CONCURRENT_POLLS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    LsRemote(#[from] LsRemoteError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("submitting the changes failed: {0}")]
    Submit(String),
    /// The repository URL is refused by the outbound policy at the moment of use.
    #[error(transparent)]
    Outbound(#[from] crate::outbound::OutboundError),
}

impl From<ApiError> for PollError {
    fn from(error: ApiError) -> Self {
        PollError::Submit(error.message)
    }
}

/// What one poll of a repository did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOutcome {
    /// The remote matches the known heads.
    Unchanged,
    /// The first look at the repository: its heads were recorded, nothing ran.
    Baseline { refs: usize },
    /// Changes were submitted; `triggered` says what ran.
    Submitted { changes: usize, triggered: Triggered },
}

/// The poller of one node; only the leader's polls.
pub struct Poller {
    node: Arc<Node>,
    /// Checks each repository URL when it is polled and pins git to the addresses it checked.
    outbound: Arc<OutboundPolicy>,
    settings: ScmSettings,
    /// `GIT_ALLOW_PROTOCOL` for every `ls-remote` (see `polling::git_allowed_protocols`).
    protocols: &'static str,
    schedule: Arc<Mutex<PollSchedule>>,
    /// The repositories that poll, with their interval, and when they were read; `None` once a
    /// repository changed. Ticks read this, not the store.
    repositories: Mutex<Option<(std::time::Instant, Arc<PolledRepositories>)>>,
}

type PolledRepositories = BTreeMap<u64, (Repository, u64)>;

impl Poller {
    pub fn new(node: Arc<Node>, outbound: Arc<OutboundPolicy>) -> Self {
        let settings = node.config.scm.clone();
        let protocols = outbound.git_allowed_protocols();
        Poller {
            node,
            outbound,
            settings,
            protocols,
            schedule: Arc::new(Mutex::new(PollSchedule::default())),
            repositories: Mutex::new(None),
        }
    }

    /// Every [`TICK`], [`Poller::start_due_polls`]; shares `self` with the poll tasks.
    pub async fn run(self) {
        let poller = Arc::new(self);
        let mut events = poller.node.subscribe();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                event = events.recv() => {
                    match event {
                        Ok(StateEvent::RepositoriesChanged) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            poller.forget_repositories();
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                    continue;
                }
            }
            if let Err(error) = poller.start_due_polls(crate::auth::now_millis()) {
                tracing::warn!(%error, "the poller could not read the repositories; it tries again shortly");
            }
        }
    }

    /// One unit of work: bring the schedule in line with the repositories that poll now, then
    /// start a task for each one that is due (at most [`MAX_CONCURRENT_POLLS`] running). Returns
    /// the repositories whose polls started. A follower forgets its schedule and starts nothing.
    pub fn start_due_polls(self: &Arc<Self>, now: Timestamp) -> Result<Vec<u64>, StoreError> {
        if !self.node.is_leader() {
            self.schedule.lock().expect("poll schedule lock").clear();
            self.forget_repositories();
            return Ok(Vec::new());
        }
        let repositories = self.polled_repositories()?;
        let intervals: Vec<(u64, u64)> = repositories.iter().map(|(repo_id, (_, seconds))| (*repo_id, *seconds)).collect();
        let due = {
            let mut schedule = self.schedule.lock().expect("poll schedule lock");
            schedule.sync(&intervals, now, rand::random::<f64>);
            schedule.take_due(now, MAX_CONCURRENT_POLLS)
        };
        for repo_id in &due {
            let Some((repository, _)) = repositories.get(repo_id).cloned() else { continue };
            let poller = Arc::clone(self);
            tokio::spawn(async move {
                let baselined = poller.schedule.lock().expect("poll schedule lock").baselined(repository.repo_id);
                let result = poller.poll_repository(&repository, baselined).await;
                poller.finish(&repository, &result);
            });
        }
        Ok(due)
    }

    /// Record how a poll ended in the schedule, and say so in the log.
    fn finish(&self, repository: &Repository, result: &Result<PollOutcome, PollError>) {
        let now = crate::auth::now_millis();
        let mut schedule = self.schedule.lock().expect("poll schedule lock");
        let wait = schedule.finished(repository.repo_id, now, result.is_ok(), rand::random::<f64>());
        let url = polling::redact_url(&repository.repo_url);
        match result {
            Ok(PollOutcome::Unchanged) => {}
            Ok(PollOutcome::Baseline { refs }) => {
                tracing::info!(repo_id = repository.repo_id, %url, refs, "first poll: recorded the repository's heads, nothing runs for them")
            }
            Ok(PollOutcome::Submitted { changes, triggered }) => tracing::info!(
                repo_id = repository.repo_id,
                %url,
                changes,
                deployments = ?triggered.deployments,
                "poll found changes"
            ),
            Err(error) => tracing::warn!(
                repo_id = repository.repo_id,
                %url,
                %error,
                failures_in_a_row = schedule.consecutive_failures(repository.repo_id),
                retry_in_seconds = wait.unwrap_or(0) / 1000,
                "polling the repository failed; it is retried later"
            ),
        }
    }

    /// Read the repositories again at the next tick (one of them changed).
    pub fn forget_repositories(&self) {
        *self.repositories.lock().expect("repositories lock") = None;
    }

    /// The repositories that poll, with their interval in seconds: the list read last, unless a
    /// repository changed since or it is older than [`RELOAD_REPOSITORIES_EVERY`].
    fn polled_repositories(&self) -> Result<Arc<PolledRepositories>, StoreError> {
        let mut cached = self.repositories.lock().expect("repositories lock");
        if let Some((read_at, repositories)) = cached.as_ref()
            && read_at.elapsed() < RELOAD_REPOSITORIES_EVERY
        {
            return Ok(Arc::clone(repositories));
        }
        let repositories = Arc::new(self.read_polled_repositories()?);
        *cached = Some((std::time::Instant::now(), Arc::clone(&repositories)));
        Ok(repositories)
    }

    /// The repositories that poll, with their interval in seconds, read from this node's state.
    fn read_polled_repositories(&self) -> Result<PolledRepositories, StoreError> {
        let mut polled = BTreeMap::new();
        for (_, bytes) in self.node.backend.scan(Table::Repositories, full_range(), usize::MAX, false)? {
            let repository: Repository = decode(Table::Repositories, &bytes)?;
            let interval = polling::effective_poll_interval(
                repository.poll_interval_seconds,
                repository.receives_webhooks(),
                self.settings.poll_interval_seconds,
            );
            if let Some(seconds) = interval {
                polled.insert(repository.repo_id, (repository, seconds));
            }
        }
        Ok(polled)
    }

    /// Poll one repository now: `git ls-remote`, compare with the known heads, submit what
    /// changed (a baseline on the first look, see `polling::plan_poll`).
    pub async fn poll_repository(&self, repository: &Repository, baselined: bool) -> Result<PollOutcome, PollError> {
        let timeout = Duration::from_secs(self.settings.ls_remote_timeout_seconds);
        // Checked now, not only when the repository was connected (a name may resolve elsewhere
        // today), and git is pinned to the addresses just checked.
        let pins = self.outbound.git_arguments_for("repo_url", &repository.repo_url).await?;
        let remote = polling::ls_remote(&repository.repo_url, &[], self.protocols, &pins, timeout).await?;
        let known = trigger::known_heads(&self.node.state(), repository.repo_id);
        let Some(plan) = polling::plan_poll(&known, &remote, baselined) else {
            return Ok(PollOutcome::Unchanged);
        };
        let changes = plan.events.len();
        if plan.baseline && plan.events.is_empty() {
            // An empty repository: nothing to record, and nothing to run.
            return Ok(PollOutcome::Baseline { refs: 0 });
        }
        let source = ScmSource::Poll { baseline: plan.baseline };
        let triggered = trigger::submit(&self.node, &Requester::system(), repository.repo_id, source, plan.events).await?;
        Ok(if plan.baseline { PollOutcome::Baseline { refs: changes } } else { PollOutcome::Submitted { changes, triggered } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Command;
    use crate::state::records::{DeployStrategy, Deployment, ScmType};

    fn git(dir: &std::path::Path, args: &[&str]) -> String {
        let output = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .unwrap();
        assert!(output.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn commit(dir: &std::path::Path, message: &str) -> String {
        std::fs::write(dir.join("file"), message).unwrap();
        git(dir, &["add", "."]);
        git(dir, &["commit", "-q", "-m", message]);
        git(dir, &["rev-parse", "HEAD"])
    }

    fn deployments(node: &Node) -> Vec<Deployment> {
        node.backend
            .scan(Table::Deployments, full_range(), usize::MAX, false)
            .unwrap()
            .into_iter()
            .map(|(_, bytes)| decode(Table::Deployments, &bytes).unwrap())
            .collect()
    }

    /// The unit of work against a real single node and a real repository: the first poll only
    /// records the heads (three branches, no run), a push runs once, a commit a webhook already
    /// delivered runs nothing when polled, and the schedule starts due polls on the leader.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_real_node_baselines_then_runs_each_new_commit_once() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("repo");
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        commit(&work, "one");
        git(&work, &["branch", "feature-a"]);
        git(&work, &["branch", "feature-b"]);
        let node = crate::node::testing::single_leader(&dir.path().join("data"), "[scm]\npoll_interval_seconds = 1\n").await;
        let propose = |command: Command| {
            let node = node.clone();
            async move {
                let (outcome, _) = node.propose(&Requester::system(), command).await.unwrap();
                outcome.result.unwrap().id.unwrap()
            }
        };
        let repo_id = propose(Command::ConnectRepository {
            name: "repo".into(),
            repo_url: format!("file://{}", work.display()),
            branch: "main".into(),
            scm_type: ScmType::Github,
            webhook_secret: None,
            api_url: None,
            access_token: None,
            poll_interval_seconds: None,
        })
        .await;
        propose(Command::CreatePipeline {
            name: "build".into(),
            repo_id,
            branch: Some("*".into()),
            build_command: None,
            deploy_strategy: DeployStrategy::Rolling,
            environment: "development".into(),
            build: Default::default(),
            deploy: Default::default(),
        })
        .await;
        let repository: Repository = crate::state::apply::load_id(&node.state(), Table::Repositories, repo_id).unwrap().unwrap();
        // The test's repository is on this machine's disk: a developer's `davit up` policy.
        let settings = crate::outbound::OutboundSettings { allow_private_networks: true, allow_file_urls: true, ..Default::default() };
        let poller = Arc::new(Poller::new(node.clone(), Arc::new(OutboundPolicy::new(&settings).unwrap())));

        assert_eq!(poller.poll_repository(&repository, false).await.unwrap(), PollOutcome::Baseline { refs: 3 });
        assert_eq!(deployments(&node).len(), 0, "connecting a repository with three branches starts no run");
        assert_eq!(trigger::known_heads(&node.state(), repo_id).len(), 3);
        assert_eq!(poller.poll_repository(&repository, true).await.unwrap(), PollOutcome::Unchanged);

        let second = commit(&work, "two");
        match poller.poll_repository(&repository, true).await.unwrap() {
            PollOutcome::Submitted { changes: 1, triggered } => assert_eq!(triggered.deployments.len(), 1),
            other => panic!("a push gives one change and one run, not {other:?}"),
        }
        assert_eq!(deployments(&node).iter().map(|deployment| deployment.commit_hash.as_str()).collect::<Vec<_>>(), [second.as_str()]);
        assert_eq!(poller.poll_repository(&repository, true).await.unwrap(), PollOutcome::Unchanged);

        // A webhook delivers the next commit first; the poll that sees it later runs nothing.
        let third = commit(&work, "three");
        let push =
            crate::scm::events::Push { branch: "main".into(), before: Some(second), after: third, created: false, head_commit: None };
        let delivered = trigger::submit(
            &node,
            &Requester::system(),
            repo_id,
            ScmSource::Webhook { delivery: Some("d-1".into()) },
            vec![crate::scm::events::ScmEvent::Push(push)],
        )
        .await
        .unwrap();
        assert_eq!(delivered.deployments.len(), 1);
        assert_eq!(poller.poll_repository(&repository, true).await.unwrap(), PollOutcome::Unchanged);
        assert_eq!(deployments(&node).len(), 2);

        // The schedule: a repository is first due within its interval (at a random point of it),
        // and is polled again only an interval after that poll ended.
        let now = crate::auth::now_millis();
        let mut started = poller.start_due_polls(now).unwrap();
        started.extend(poller.start_due_polls(now + 1_000).unwrap());
        assert_eq!(started, vec![repo_id]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(poller.start_due_polls(crate::auth::now_millis()).unwrap(), Vec::<u64>::new());
        assert_eq!(deployments(&node).len(), 2, "nothing new to run");
    }
}
