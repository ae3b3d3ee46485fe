//! What a job asks the agent to do, as the coordinator writes it into the job record and the
//! offer (`JobOffer.spec_json`). The coordinator builds it with these same types, so the two
//! sides cannot drift apart. Fields are only added, with defaults, never renamed.

use serde::{Deserialize, Serialize};

/// A command step of a build (build, test, package).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandStep {
    pub name: String,
    pub command: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSpec {
    pub pipeline_name: String,
    /// What git clones: https, ssh, git or file URL.
    pub repository_url: String,
    /// The exact commit to build (full or abbreviated SHA).
    pub commit: String,
    #[serde(default)]
    pub branch: Option<String>,
    /// A ref to fetch and build instead of `commit`, such as a pull request's trial merge
    /// `refs/pull/7/merge`: the provider's merge of the request into its target, which has no
    /// commit id until fetched. `commit` stays the pull request's head (what statuses name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_ref: Option<String>,
    /// Image of the build container (the Docker executor; the shell executor ignores it).
    pub image: String,
    pub steps: Vec<CommandStep>,
    /// Workspace-relative paths packed into the `files` artifact.
    #[serde(default)]
    pub artifacts: Vec<String>,
    /// A Dockerfile (workspace-relative) built into an image and exported as the `image` artifact.
    #[serde(default)]
    pub dockerfile: Option<String>,
    pub timeout_seconds: u64,
    /// The version artifacts are recorded under.
    pub artifact_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSpec {
    Build(BuildSpec),
}

pub const CHECKOUT_STEP: &str = "checkout";
pub const IMAGE_STEP: &str = "image";
pub const ARTIFACTS_STEP: &str = "artifacts";

impl JobSpec {
    /// Every step the job reports, in order: checkout, the commands, then the image build and
    /// the artifact upload when the job has them.
    pub fn step_names(&self) -> Vec<String> {
        match self {
            JobSpec::Build(build) => {
                let mut names = vec![CHECKOUT_STEP.to_string()];
                names.extend(build.steps.iter().map(|step| step.name.clone()));
                if build.dockerfile.is_some() {
                    names.push(IMAGE_STEP.to_string());
                }
                if !build.artifacts.is_empty() || build.dockerfile.is_some() {
                    names.push(ARTIFACTS_STEP.to_string());
                }
                names
            }
        }
    }
}
