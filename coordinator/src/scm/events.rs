//! Webhook deliveries from GitHub, GitLab and Bitbucket Cloud, normalized into `ScmEvent`s:
//! branch pushes, tag pushes and pull/merge request changes, or an `Ignored` with the reason.
//! It only reads bytes and header values: it never authenticates a delivery (the API checks
//! the signature first), never panics on any input, and does work proportional to the body.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::state::records::ScmType;

/// The largest body parsed. GitHub caps its payloads at 25 MB; the others send less.
pub const MAX_PAYLOAD_BYTES: usize = 25 * 1024 * 1024;

/// The longest branch or tag name accepted; git itself has no limit, but file systems do.
const MAX_REF_NAME_BYTES: usize = 255;

/// A delivery understood: the repository it names and what happened to it. A Bitbucket push
/// can carry several changes, so `outcomes` has one entry per change (at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The URLs the payload names its repository by (web page, HTTPS and SSH clone URLs).
    pub repository_urls: Vec<String>,
    pub outcomes: Vec<Outcome>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Event(ScmEvent),
    Ignored(Ignored),
}

/// A change Davit does not act on, with the reason in words a user understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScmEvent {
    /// Commits pushed to a branch (or a new branch pushed).
    Push(Push),
    /// A tag created or moved.
    TagPush(TagPush),
    /// A pull request (GitHub, Bitbucket) or merge request (GitLab) changed.
    PullRequest(PullRequest),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// Without `refs/heads/`.
    pub branch: String,
    /// The branch's previous head; `None` when the push created the branch.
    pub before: Option<String>,
    /// The branch's new head.
    pub after: String,
    pub created: bool,
    /// The head commit's message and author, when the payload carries them.
    pub head_commit: Option<CommitSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagPush {
    /// Without `refs/tags/`.
    pub tag: String,
    /// What the tag points at (for an annotated tag on GitHub and GitLab, the tag object).
    pub commit: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitSummary {
    pub message: String,
    /// `Name <email>`, or whichever of the two the payload has.
    pub author: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullRequestAction {
    Opened,
    /// New commits on the source branch.
    Synchronized,
    Reopened,
    /// Closed without merging.
    Closed,
    Merged,
}

impl PullRequestAction {
    /// Whether the action puts new code up for checks (as opposed to ending the request).
    pub fn runs_checks(self) -> bool {
        matches!(self, Self::Opened | Self::Synchronized | Self::Reopened)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Opened => "opened",
            Self::Synchronized => "synchronized",
            Self::Reopened => "reopened",
            Self::Closed => "closed",
            Self::Merged => "merged",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    /// GitHub's and Bitbucket's pull request number, GitLab's merge request IID.
    pub number: u64,
    pub action: PullRequestAction,
    pub title: String,
    pub source_branch: String,
    /// The source branch's head. Always present when `action.runs_checks()`. Bitbucket sends
    /// 12-character abbreviated hashes here.
    pub head_commit: Option<String>,
    /// The source repository's clone URL when the payload names it (it differs from the
    /// target's for a pull request from a fork).
    pub source_repository_url: Option<String>,
    pub target_branch: String,
    /// The ref holding the provider's trial merge of source into target (GitHub
    /// `refs/pull/N/merge`, GitLab `refs/merge-requests/N/merge`). Bitbucket has none, so
    /// checks run on `head_commit` there.
    pub merge_ref: Option<String>,
    /// The merge commit, once merged, when the provider names it.
    pub merge_commit: Option<String>,
}

/// Why a body is not a valid delivery: the API answers 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the {header} header is missing; {provider} sends it with every webhook delivery")]
    MissingEventHeader { provider: &'static str, header: &'static str },
    #[error("the webhook body has {size} bytes, more than the {limit} accepted")]
    TooLarge { size: usize, limit: usize },
    #[error("the form-encoded webhook body {problem}")]
    Form { problem: String },
    #[error("the webhook body is not a valid {what}: {problem}")]
    Json { what: String, problem: String },
    #[error("the {what} has an invalid {field}: {problem}")]
    Invalid { what: String, field: &'static str, problem: String },
    #[error(
        "the repository is a plain git repository (scm_type \"git\"), whose server sends no webhooks Davit reads; \
         Davit polls it with git ls-remote instead (set its poll_interval_seconds), or connect it as github, gitlab or bitbucket"
    )]
    NoWebhooks,
}

/// The header that names the event, for each provider.
pub fn event_header(provider: ScmType) -> &'static str {
    match provider {
        ScmType::Github => "x-github-event",
        ScmType::Gitlab => "x-gitlab-event",
        ScmType::Bitbucket => "x-event-key",
        // Plain git servers send no webhooks: `parse_delivery` refuses them before any header.
        ScmType::Git => "x-event",
    }
}

/// The headers that identify a delivery, best first. A redelivery keeps the id, so it is what
/// de-duplication keys on: GitLab's `Idempotency-Key` (17.4+) stays the same across retries,
/// so it comes before `X-Gitlab-Event-UUID` (14.8+), which older GitLab versions send alone.
pub fn delivery_id_headers(provider: ScmType) -> &'static [&'static str] {
    match provider {
        ScmType::Github => &["x-github-delivery"],
        ScmType::Gitlab => &["idempotency-key", "x-gitlab-event-uuid", "x-gitlab-webhook-uuid"],
        ScmType::Bitbucket => &["x-request-uuid"],
        ScmType::Git => &[],
    }
}

fn provider_name(provider: ScmType) -> &'static str {
    match provider {
        ScmType::Github => "GitHub",
        ScmType::Gitlab => "GitLab",
        ScmType::Bitbucket => "Bitbucket",
        ScmType::Git => "a plain git server",
    }
}

/// The JSON document of a delivery: the body itself, or for a GitHub hook set up with
/// `application/x-www-form-urlencoded`, its `payload` field.
pub fn payload_json<'a>(body: &'a [u8], content_type: Option<&str>) -> Result<Cow<'a, [u8]>, ParseError> {
    if body.len() > MAX_PAYLOAD_BYTES {
        return Err(ParseError::TooLarge { size: body.len(), limit: MAX_PAYLOAD_BYTES });
    }
    let media_type = content_type.and_then(|value| value.split(';').next()).map(str::trim);
    if media_type.is_some_and(|media_type| media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded")) {
        let payload = form_field(body, b"payload")?.ok_or_else(|| ParseError::Form { problem: "has no `payload` field".into() })?;
        return Ok(Cow::Owned(payload));
    }
    Ok(Cow::Borrowed(body))
}

/// The value of the form field `name`, percent-decoded. Hand-written (twenty lines) rather
/// than pulling in `form_urlencoded`, because it is the only form this crate ever reads.
fn form_field(body: &[u8], name: &[u8]) -> Result<Option<Vec<u8>>, ParseError> {
    for pair in body.split(|&byte| byte == b'&') {
        let (key, value) = match pair.iter().position(|&byte| byte == b'=') {
            Some(equals) => (&pair[..equals], &pair[equals + 1..]),
            None => (pair, &[][..]),
        };
        if percent_decode(key)? == name {
            return percent_decode(value).map(Some);
        }
    }
    Ok(None)
}

fn percent_decode(encoded: &[u8]) -> Result<Vec<u8>, ParseError> {
    let hex_value = |byte: u8| (byte as char).to_digit(16);
    let mut decoded = Vec::with_capacity(encoded.len());
    let mut index = 0;
    while let Some(&byte) = encoded.get(index) {
        match byte {
            b'+' => decoded.push(b' '),
            b'%' => {
                let high = encoded.get(index + 1).copied().and_then(hex_value);
                let low = encoded.get(index + 2).copied().and_then(hex_value);
                let (Some(high), Some(low)) = (high, low) else {
                    return Err(ParseError::Form { problem: format!("has a malformed percent escape at byte {index}") });
                };
                decoded.push((high * 16 + low) as u8);
                index += 2;
            }
            _ => decoded.push(byte),
        }
        index += 1;
    }
    Ok(decoded)
}

/// Decode `json` as `T`, naming the field at fault when it does not fit.
fn decode<T: DeserializeOwned>(json: &[u8], what: &str) -> Result<T, ParseError> {
    let error = |problem: String| ParseError::Json { what: what.to_string(), problem };
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." { error(inner.to_string()) } else { error(format!("{path}: {inner}")) }
    })?;
    deserializer.end().map_err(|e| error(e.to_string()))?;
    Ok(value)
}

#[derive(Deserialize)]
struct Href {
    href: Option<String>,
}

#[derive(Deserialize)]
struct Links {
    html: Option<Href>,
}

/// The two objects that name a repository. They are kept as JSON values and read leniently:
/// this runs before the signature check, where a field of an unexpected type is simply not a
/// URL (the provider-specific parse, after the check, is the strict one).
#[derive(Deserialize)]
struct RepositoryNames {
    repository: Option<serde_json::Value>,
    project: Option<serde_json::Value>,
}

/// The repository URLs a payload names, whichever provider sent it: GitHub's `repository`
/// (`html_url`, `clone_url`, `ssh_url`, `git_url`), GitLab's `project` and `repository`,
/// Bitbucket's `repository.links.html.href`. The API reads these before it can check the
/// signature, because the signing secret belongs to the repository the payload names.
pub fn repository_urls(payload: &[u8]) -> Result<Vec<String>, ParseError> {
    // serde would also read a struct from a JSON array; a delivery is always an object.
    let problem = match payload.iter().find(|byte| !byte.is_ascii_whitespace()) {
        Some(b'{') => None,
        Some(_) => Some("it is not a JSON object"),
        None => Some("it is empty"),
    };
    if let Some(problem) = problem {
        return Err(ParseError::Json { what: "webhook payload".into(), problem: problem.into() });
    }
    let names: RepositoryNames = decode(payload, "webhook payload")?;
    let repository_pointers =
        ["/html_url", "/clone_url", "/ssh_url", "/git_url", "/git_http_url", "/git_ssh_url", "/homepage", "/links/html/href"];
    let project_pointers = ["/web_url", "/git_http_url", "/git_ssh_url"];
    let found = |value: &Option<serde_json::Value>, pointers: &[&str]| -> Vec<String> {
        let Some(value) = value else { return Vec::new() };
        pointers.iter().filter_map(|pointer| value.pointer(pointer)?.as_str().map(str::to_string)).collect()
    };
    let mut unique = Vec::new();
    for url in found(&names.repository, &repository_pointers).into_iter().chain(found(&names.project, &project_pointers)) {
        if !url.is_empty() && !unique.contains(&url) {
            unique.push(url);
        }
    }
    Ok(unique)
}

/// Parse one delivery: `event` is the value of the provider's event header (see
/// `event_header`), `body` the raw request body and `content_type` its `Content-Type`.
/// The signature must have been checked before: this trusts what the body says.
pub fn parse_delivery(provider: ScmType, event: Option<&str>, body: &[u8], content_type: Option<&str>) -> Result<Delivery, ParseError> {
    if provider == ScmType::Git {
        return Err(ParseError::NoWebhooks);
    }
    let event = event.map(str::trim).filter(|event| !event.is_empty()).ok_or(ParseError::MissingEventHeader {
        provider: provider_name(provider),
        header: match provider {
            ScmType::Github => "X-GitHub-Event",
            ScmType::Gitlab => "X-Gitlab-Event",
            ScmType::Bitbucket => "X-Event-Key",
            ScmType::Git => "X-Event",
        },
    })?;
    let payload = payload_json(body, content_type)?;
    let repository_urls = repository_urls(&payload)?;
    let outcomes = match provider {
        ScmType::Github => github(event, &payload)?,
        ScmType::Gitlab => gitlab(event, &payload)?,
        ScmType::Bitbucket => bitbucket(event, &payload)?,
        ScmType::Git => return Err(ParseError::NoWebhooks),
    };
    Ok(Delivery { repository_urls, outcomes })
}

fn ignored(reason: impl Into<String>) -> Vec<Outcome> {
    vec![Outcome::Ignored(Ignored { reason: reason.into() })]
}

/// A commit id: 4 to 64 hexadecimal digits (full SHA-1 or SHA-256, or an abbreviation), or
/// `None` for git's all-zero "no commit".
/// A pull request's head commit: checked when present, required when the action runs checks.
/// `fields` names the commit object and its id field for the error.
fn head_commit(
    what: &str,
    action: PullRequestAction,
    id: Option<&str>,
    fields: (&'static str, &'static str),
    why: &str,
) -> Result<Option<String>, ParseError> {
    let head = match id {
        Some(id) => commit_id(what, fields.1, id)?,
        None => None,
    };
    if head.is_none() && action.runs_checks() {
        return Err(ParseError::Invalid { what: what.into(), field: fields.0, problem: format!("is missing; {why}") });
    }
    Ok(head)
}

fn commit_id(what: &str, field: &'static str, value: &str) -> Result<Option<String>, ParseError> {
    let valid = (4..=64).contains(&value.len()) && value.bytes().all(|byte| byte.is_ascii_hexdigit());
    if !valid {
        let shown: String = value.chars().take(80).collect();
        return Err(ParseError::Invalid { what: what.to_string(), field, problem: format!("{shown:?} is not a commit id") });
    }
    Ok(if value.bytes().all(|byte| byte == b'0') { None } else { Some(value.to_ascii_lowercase()) })
}

/// A commit id that must name a commit.
fn required_commit(what: &str, field: &'static str, value: &str) -> Result<String, ParseError> {
    commit_id(what, field, value)?.ok_or_else(|| ParseError::Invalid {
        what: what.to_string(),
        field,
        problem: "is all zeros, not a commit".into(),
    })
}

/// A branch or tag name as the payload gives it, checked enough to be safe to hand to git
/// later: not empty, not too long, no control characters or spaces, not an option.
fn ref_name(what: &str, field: &'static str, name: &str) -> Result<String, ParseError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_REF_NAME_BYTES
        && !name.starts_with('-')
        && !name.chars().any(|c| c.is_control() || c.is_whitespace());
    if !valid {
        let shown: String = name.chars().take(80).collect();
        return Err(ParseError::Invalid { what: what.to_string(), field, problem: format!("{shown:?} is not a branch or tag name") });
    }
    Ok(name.to_string())
}

/// What a full ref names.
enum RefKind<'a> {
    Branch(&'a str),
    Tag(&'a str),
    Other,
}

fn ref_kind(git_ref: &str) -> RefKind<'_> {
    if let Some(branch) = git_ref.strip_prefix("refs/heads/") {
        RefKind::Branch(branch)
    } else if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
        RefKind::Tag(tag)
    } else {
        RefKind::Other
    }
}

fn author_text(name: Option<String>, email: Option<String>) -> Option<String> {
    let name = name.filter(|name| !name.is_empty());
    let email = email.filter(|email| !email.is_empty());
    match (name, email) {
        (Some(name), Some(email)) => Some(format!("{name} <{email}>")),
        (name, email) => name.or(email),
    }
}

/// A push of one ref, as GitHub and GitLab describe it (`ref`, `before`, `after`).
struct RefUpdate<'a> {
    what: &'a str,
    git_ref: &'a str,
    before: &'a str,
    after: &'a str,
    deleted: bool,
    created: bool,
    head_commit: Option<CommitSummary>,
}

fn ref_update(update: RefUpdate<'_>) -> Result<Vec<Outcome>, ParseError> {
    let RefUpdate { what, git_ref, before, after, deleted, created, head_commit } = update;
    let before = commit_id(what, "before", before)?;
    let after = commit_id(what, "after", after)?;
    let Some(after) = after.filter(|_| !deleted) else {
        return Ok(ignored(match ref_kind(git_ref) {
            RefKind::Tag(tag) => format!("tag {tag} was deleted; deletions start no runs"),
            RefKind::Branch(branch) => format!("branch {branch} was deleted; deletions start no runs"),
            RefKind::Other => format!("{git_ref} was deleted; deletions start no runs"),
        }));
    };
    match ref_kind(git_ref) {
        RefKind::Branch(branch) => Ok(vec![Outcome::Event(ScmEvent::Push(Push {
            branch: ref_name(what, "ref", branch)?,
            created: created || before.is_none(),
            before,
            after,
            head_commit,
        }))]),
        RefKind::Tag(tag) => Ok(vec![Outcome::Event(ScmEvent::TagPush(TagPush { tag: ref_name(what, "ref", tag)?, commit: after }))]),
        RefKind::Other => {
            let shown: String = git_ref.chars().take(80).collect();
            Ok(ignored(format!("{shown} is neither a branch nor a tag")))
        }
    }
}

// GitHub: https://docs.github.com/en/webhooks/webhook-events-and-payloads

#[derive(Deserialize)]
struct GithubPerson {
    name: Option<String>,
    email: Option<String>,
}

#[derive(Deserialize)]
struct GithubCommit {
    message: Option<String>,
    author: Option<GithubPerson>,
}

#[derive(Deserialize)]
struct GithubPush {
    #[serde(rename = "ref")]
    git_ref: String,
    before: String,
    after: String,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    deleted: bool,
    head_commit: Option<GithubCommit>,
}

#[derive(Deserialize)]
struct GithubRepo {
    clone_url: Option<String>,
}

#[derive(Deserialize)]
struct GithubBranchEnd {
    #[serde(rename = "ref")]
    branch: String,
    sha: String,
    repo: Option<GithubRepo>,
}

#[derive(Deserialize)]
struct GithubPullRequest {
    number: u64,
    title: String,
    #[serde(default)]
    merged: bool,
    merge_commit_sha: Option<String>,
    head: GithubBranchEnd,
    base: GithubBranchEnd,
}

#[derive(Deserialize)]
struct GithubPullRequestEvent {
    action: String,
    pull_request: GithubPullRequest,
}

fn github(event: &str, payload: &[u8]) -> Result<Vec<Outcome>, ParseError> {
    match event {
        "push" => {
            let what = "GitHub push";
            let push: GithubPush = decode(payload, what)?;
            let head_commit = push.head_commit.map(|commit| CommitSummary {
                message: commit.message.unwrap_or_default(),
                author: commit.author.and_then(|author| author_text(author.name, author.email)),
            });
            ref_update(RefUpdate {
                what,
                git_ref: &push.git_ref,
                before: &push.before,
                after: &push.after,
                deleted: push.deleted,
                created: push.created,
                head_commit,
            })
        }
        "pull_request" => {
            let what = "GitHub pull request";
            let event: GithubPullRequestEvent = decode(payload, what)?;
            let pull = event.pull_request;
            let action = match event.action.as_str() {
                "opened" => PullRequestAction::Opened,
                "synchronize" => PullRequestAction::Synchronized,
                "reopened" => PullRequestAction::Reopened,
                "closed" if pull.merged => PullRequestAction::Merged,
                "closed" => PullRequestAction::Closed,
                other => {
                    let shown: String = other.chars().take(40).collect();
                    return Ok(ignored(format!("pull request #{} was {shown}; only new code or closing starts runs", pull.number)));
                }
            };
            let merge_commit = match (&pull.merge_commit_sha, action) {
                (Some(sha), PullRequestAction::Merged) => commit_id(what, "pull_request.merge_commit_sha", sha)?,
                _ => None,
            };
            Ok(vec![Outcome::Event(ScmEvent::PullRequest(PullRequest {
                number: pull.number,
                action,
                title: pull.title,
                source_branch: ref_name(what, "pull_request.head.ref", &pull.head.branch)?,
                head_commit: Some(required_commit(what, "pull_request.head.sha", &pull.head.sha)?),
                source_repository_url: pull.head.repo.and_then(|repo| repo.clone_url),
                target_branch: ref_name(what, "pull_request.base.ref", &pull.base.branch)?,
                merge_ref: Some(format!("refs/pull/{}/merge", pull.number)),
                merge_commit,
            }))])
        }
        "ping" => Ok(ignored("ping: GitHub checks that the webhook is set up; it starts no runs")),
        other => Ok(ignored(format!("GitHub {} events start no runs", shown_event(other)))),
    }
}

fn shown_event(event: &str) -> String {
    let shown: String = event.chars().take(60).collect();
    format!("{shown:?}")
}

// GitLab: https://docs.gitlab.com/user/project/integrations/webhook_events/

#[derive(Deserialize)]
struct GitlabPerson {
    name: Option<String>,
    email: Option<String>,
}

#[derive(Deserialize)]
struct GitlabCommit {
    id: String,
    message: Option<String>,
    author: Option<GitlabPerson>,
}

#[derive(Deserialize)]
struct GitlabPush {
    #[serde(rename = "ref")]
    git_ref: String,
    before: String,
    after: String,
    #[serde(default)]
    commits: Vec<GitlabCommit>,
}

#[derive(Deserialize)]
struct GitlabProject {
    git_http_url: Option<String>,
}

#[derive(Deserialize)]
struct GitlabMergeRequest {
    iid: u64,
    title: String,
    source_branch: String,
    target_branch: String,
    action: Option<String>,
    oldrev: Option<String>,
    last_commit: Option<GitlabCommit>,
    merge_commit_sha: Option<String>,
    source: Option<GitlabProject>,
}

#[derive(Deserialize)]
struct GitlabMergeRequestEvent {
    object_attributes: GitlabMergeRequest,
}

fn gitlab(event: &str, payload: &[u8]) -> Result<Vec<Outcome>, ParseError> {
    match event {
        "Push Hook" | "Tag Push Hook" => {
            let what = if event == "Push Hook" { "GitLab push" } else { "GitLab tag push" };
            let push: GitlabPush = decode(payload, what)?;
            // GitLab lists at most 20 commits, oldest first; the head is the one named `after`.
            let head_commit =
                push.commits.into_iter().rev().find(|commit| commit.id.eq_ignore_ascii_case(&push.after)).map(|commit| CommitSummary {
                    message: commit.message.unwrap_or_default(),
                    author: commit.author.and_then(|author| author_text(author.name, author.email)),
                });
            ref_update(RefUpdate {
                what,
                git_ref: &push.git_ref,
                before: &push.before,
                after: &push.after,
                deleted: false,
                created: false,
                head_commit,
            })
        }
        "Merge Request Hook" => {
            let what = "GitLab merge request";
            let event: GitlabMergeRequestEvent = decode(payload, what)?;
            let request = event.object_attributes;
            let action = match request.action.as_deref() {
                Some("open") => PullRequestAction::Opened,
                Some("reopen") => PullRequestAction::Reopened,
                Some("close") => PullRequestAction::Closed,
                Some("merge") => PullRequestAction::Merged,
                // An update without `oldrev` changed the title, labels, reviewers...: no new code.
                Some("update") if request.oldrev.is_some() => PullRequestAction::Synchronized,
                Some("update") => {
                    return Ok(ignored(format!("merge request !{} was updated without new commits", request.iid)));
                }
                other => {
                    let shown: String = other.unwrap_or("changed").chars().take(40).collect();
                    return Ok(ignored(format!("merge request !{} was {shown}; only new code or closing starts runs", request.iid)));
                }
            };
            let head_commit = head_commit(
                what,
                action,
                request.last_commit.as_ref().map(|commit| commit.id.as_str()),
                ("object_attributes.last_commit", "object_attributes.last_commit.id"),
                "GitLab sends the head commit of an open merge request",
            )?;
            let merge_commit = match (&request.merge_commit_sha, action) {
                (Some(sha), PullRequestAction::Merged) => commit_id(what, "object_attributes.merge_commit_sha", sha)?,
                _ => None,
            };
            Ok(vec![Outcome::Event(ScmEvent::PullRequest(PullRequest {
                number: request.iid,
                action,
                title: request.title,
                source_branch: ref_name(what, "object_attributes.source_branch", &request.source_branch)?,
                head_commit,
                source_repository_url: request.source.and_then(|project| project.git_http_url),
                target_branch: ref_name(what, "object_attributes.target_branch", &request.target_branch)?,
                merge_ref: Some(format!("refs/merge-requests/{}/merge", request.iid)),
                merge_commit,
            }))])
        }
        other => Ok(ignored(format!("GitLab {} events start no runs", shown_event(other)))),
    }
}

// Bitbucket Cloud: https://support.atlassian.com/bitbucket-cloud/docs/event-payloads/

#[derive(Deserialize)]
struct BitbucketAuthor {
    raw: Option<String>,
}

#[derive(Deserialize)]
struct BitbucketCommit {
    hash: String,
    message: Option<String>,
    author: Option<BitbucketAuthor>,
}

#[derive(Deserialize)]
struct BitbucketRefState {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    target: BitbucketCommit,
}

#[derive(Deserialize)]
struct BitbucketChange {
    old: Option<BitbucketRefState>,
    new: Option<BitbucketRefState>,
}

#[derive(Deserialize)]
struct BitbucketPush {
    changes: Vec<BitbucketChange>,
}

#[derive(Deserialize)]
struct BitbucketPushEvent {
    push: BitbucketPush,
}

#[derive(Deserialize)]
struct BitbucketBranch {
    name: String,
}

#[derive(Deserialize)]
struct BitbucketCommitRef {
    hash: String,
}

#[derive(Deserialize)]
struct BitbucketRepository {
    links: Option<Links>,
}

#[derive(Deserialize)]
struct BitbucketEnd {
    branch: BitbucketBranch,
    commit: Option<BitbucketCommitRef>,
    repository: Option<BitbucketRepository>,
}

#[derive(Deserialize)]
struct BitbucketPullRequest {
    id: u64,
    title: String,
    source: BitbucketEnd,
    destination: BitbucketEnd,
    merge_commit: Option<BitbucketCommitRef>,
}

#[derive(Deserialize)]
struct BitbucketPullRequestEvent {
    pullrequest: BitbucketPullRequest,
}

fn bitbucket(event: &str, payload: &[u8]) -> Result<Vec<Outcome>, ParseError> {
    match event {
        "repo:push" => {
            let what = "Bitbucket push";
            let push: BitbucketPushEvent = decode(payload, what)?;
            if push.push.changes.is_empty() {
                return Ok(ignored("the push carries no ref changes"));
            }
            push.push.changes.into_iter().map(|change| bitbucket_change(what, change)).collect()
        }
        "pullrequest:created" | "pullrequest:updated" | "pullrequest:fulfilled" | "pullrequest:rejected" => {
            let what = "Bitbucket pull request";
            let event_value = event;
            let event: BitbucketPullRequestEvent = decode(payload, what)?;
            let pull = event.pullrequest;
            // Bitbucket has no reopen (a declined pull request stays declined), and its
            // `updated` does not say whether commits changed: treat it as new code, and let
            // de-duplication by commit drop a run for a head already built.
            let action = match event_value {
                "pullrequest:created" => PullRequestAction::Opened,
                "pullrequest:updated" => PullRequestAction::Synchronized,
                "pullrequest:fulfilled" => PullRequestAction::Merged,
                _ => PullRequestAction::Closed,
            };
            let head_commit = head_commit(
                what,
                action,
                pull.source.commit.as_ref().map(|commit| commit.hash.as_str()),
                ("pullrequest.source.commit", "pullrequest.source.commit.hash"),
                "Bitbucket sends the head commit of an open pull request",
            )?;
            let merge_commit = match (&pull.merge_commit, action) {
                (Some(commit), PullRequestAction::Merged) => commit_id(what, "pullrequest.merge_commit.hash", &commit.hash)?,
                _ => None,
            };
            let source_repository_url =
                pull.source.repository.and_then(|repository| repository.links).and_then(|links| links.html).and_then(|html| html.href);
            Ok(vec![Outcome::Event(ScmEvent::PullRequest(PullRequest {
                number: pull.id,
                action,
                title: pull.title,
                source_branch: ref_name(what, "pullrequest.source.branch.name", &pull.source.branch.name)?,
                head_commit,
                source_repository_url,
                target_branch: ref_name(what, "pullrequest.destination.branch.name", &pull.destination.branch.name)?,
                merge_ref: None,
                merge_commit,
            }))])
        }
        other => Ok(ignored(format!("Bitbucket {} events start no runs", shown_event(other)))),
    }
}

fn bitbucket_change(what: &str, change: BitbucketChange) -> Result<Outcome, ParseError> {
    let Some(new) = change.new else {
        let reason = match &change.old {
            Some(old) if old.kind == "branch" => format!("branch {} was deleted; deletions start no runs", old.name),
            Some(old) => format!("tag {} was deleted; deletions start no runs", old.name),
            None => "a change with neither an old nor a new state".to_string(),
        };
        return Ok(Outcome::Ignored(Ignored { reason }));
    };
    let after = required_commit(what, "push.changes[].new.target.hash", &new.target.hash)?;
    match new.kind.as_str() {
        "branch" => {
            let before = match &change.old {
                Some(old) => commit_id(what, "push.changes[].old.target.hash", &old.target.hash)?,
                None => None,
            };
            Ok(Outcome::Event(ScmEvent::Push(Push {
                branch: ref_name(what, "push.changes[].new.name", &new.name)?,
                created: before.is_none(),
                before,
                after,
                head_commit: Some(CommitSummary {
                    message: new.target.message.unwrap_or_default(),
                    author: new.target.author.and_then(|author| author.raw).filter(|raw| !raw.is_empty()),
                }),
            })))
        }
        "tag" | "annotated_tag" => {
            Ok(Outcome::Event(ScmEvent::TagPush(TagPush { tag: ref_name(what, "push.changes[].new.name", &new.name)?, commit: after })))
        }
        other => {
            let shown: String = other.chars().take(40).collect();
            Ok(Outcome::Ignored(Ignored { reason: format!("a change of a {shown:?}, neither a branch nor a tag") }))
        }
    }
}
