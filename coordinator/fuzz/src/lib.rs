//! The webhook payload parser, compiled on its own for fuzzing: `scm/events.rs` and the record
//! types it names are the coordinator's own files, included by path, so what is fuzzed is
//! exactly what the coordinator runs, without building Raft, gRPC or the HTTP stack.

/// The coordinator's `state::records`, where `ScmType` lives (it needs only serde). Included
/// at the top level (a `#[path]` inside an inline module resolves through a directory that does
/// not exist) and re-exported where `events.rs` looks for it, `crate::state::records`.
#[path = "../../src/state/records.rs"]
pub mod records;

pub mod state {
    pub use super::records;
}

/// The deployment planner, whose facts a deployment's record holds (`crate::deploy::plan`).
#[path = "../../src/deploy/plan.rs"]
pub mod plan;

pub mod deploy {
    pub use super::plan;
}

/// The agent's job specs, which a rollout's record holds (`crate::release_spec`, as the
/// coordinator re-exports them).
#[path = "../../../agent/src/job_spec.rs"]
pub mod release_spec;

/// The coordinator's `scm::events`.
#[path = "../../src/scm/events.rs"]
pub mod events;

use events::{Outcome, ScmEvent};
use state::records::ScmType;

/// A fuzz input is `<event header value>\n<content type>\n<body>`: the three things a delivery
/// gives the parser. An empty header line means the header is absent. `run` turns the webhook
/// fixtures into seeds of this shape.
pub fn split_input(data: &[u8]) -> (Option<&str>, Option<&str>, &[u8]) {
    let mut parts = data.splitn(3, |&byte| byte == b'\n');
    let (event, content_type, body) = (parts.next().unwrap_or(&[]), parts.next().unwrap_or(&[]), parts.next().unwrap_or(&[]));
    (header_value(event), header_value(content_type), body)
}

fn header_value(line: &[u8]) -> Option<&str> {
    std::str::from_utf8(line).ok().filter(|line| !line.is_empty())
}

/// Parse one fuzz input as a delivery from `provider` and check what the parser promises on
/// any input: it returns (never panics), and a delivery it accepts has at least one outcome,
/// with branch and tag names and commit ids of the shapes it validated.
pub fn check_delivery(provider: ScmType, data: &[u8]) {
    let (event, content_type, body) = split_input(data);
    let Ok(delivery) = events::parse_delivery(provider, event, body, content_type) else {
        return;
    };
    assert!(!delivery.outcomes.is_empty(), "an accepted delivery has at least one outcome");
    let commit_shape = |commit: &str| (4..=64).contains(&commit.len()) && commit.bytes().all(|byte| byte.is_ascii_hexdigit());
    let name_shape = |name: &str| !name.is_empty() && name.len() <= 255 && !name.starts_with('-') && !name.contains(char::is_whitespace);
    for outcome in &delivery.outcomes {
        match outcome {
            Outcome::Ignored(ignored) => assert!(!ignored.reason.is_empty(), "an ignored change says why"),
            Outcome::Event(ScmEvent::Push(push)) => {
                assert!(name_shape(&push.branch), "branch {:?}", push.branch);
                assert!(commit_shape(&push.after), "after {:?}", push.after);
            }
            Outcome::Event(ScmEvent::TagPush(tag)) => {
                assert!(name_shape(&tag.tag), "tag {:?}", tag.tag);
                assert!(commit_shape(&tag.commit), "tag commit {:?}", tag.commit);
            }
            Outcome::Event(ScmEvent::PullRequest(pull)) => {
                assert!(name_shape(&pull.source_branch), "source branch {:?}", pull.source_branch);
                assert!(name_shape(&pull.target_branch), "target branch {:?}", pull.target_branch);
                if pull.action.runs_checks() {
                    assert!(pull.head_commit.as_deref().is_some_and(commit_shape), "head commit {:?}", pull.head_commit);
                }
            }
        }
    }
}
