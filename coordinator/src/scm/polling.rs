//! Polling repositories that send no webhooks: `git ls-remote` (the real git, sandboxed: only
//! the allowed protocols, no prompts, no credential helpers, no user or system git config,
//! bounded in time and output), the pure parsing of its output, the pure comparison of the
//! remote refs with the heads already known, and the pure schedule (interval, jitter, backoff).
//! Nothing here proposes anything: the leader's poller (`scm::poller`) acts on what it returns.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::events::{Push, ScmEvent, TagPush};
use crate::state::records::Timestamp;

/// The shortest interval a repository may set for itself: polling a forge more often than this
/// is the kind of load that gets a server's address blocked.
pub const MIN_POLL_INTERVAL_SECONDS: u64 = 10;
/// The longest: a day.
pub const MAX_POLL_INTERVAL_SECONDS: u64 = 86_400;
/// The most `git ls-remote` may print before it is stopped: about 150,000 refs.
pub const MAX_LS_REMOTE_OUTPUT_BYTES: usize = 16 * 1024 * 1024;
/// The most of git's standard error kept for the error message.
const MAX_STDERR_BYTES: usize = 64 * 1024;
/// The longest branch or tag name a poll reports (as for webhooks): longer ones are skipped.
const MAX_REF_NAME_BYTES: usize = 255;
/// A repository that keeps failing is retried at most this far apart (or at its interval, when
/// that is longer).
const MAX_BACKOFF_MS: Timestamp = 3_600_000;

/// The protocols git may use for a repository of the cluster, as `GIT_ALLOW_PROTOCOL` takes them.
///
/// `file` lets a repository URL read the coordinator's own disk, so it is allowed only when the
/// node's outbound policy allows `file://` URLs (`OutboundPolicy::git_allowed_protocols`, the
/// only caller outside tests). Every git command the coordinator runs on a repository URL takes
/// its list from here, so there is one place to change.
pub fn git_allowed_protocols(allow_file: bool) -> &'static str {
    if allow_file { "https:ssh:git:file" } else { "https:ssh:git" }
}

/// The polling interval a repository actually gets, in seconds, or `None` when it is not
/// polled: its own setting when it has one (`0`: never), otherwise the node's default
/// (`[scm] poll_interval_seconds`, `0` turning it off) for a repository without a webhook
/// secret; a repository with a secret receives webhooks and is not polled unless it asks.
pub fn effective_poll_interval(own_setting: Option<u64>, has_webhook_secret: bool, node_default_seconds: u64) -> Option<u64> {
    match own_setting {
        Some(0) => None,
        Some(seconds) => Some(seconds),
        None if has_webhook_secret => None,
        None => (node_default_seconds > 0).then_some(node_default_seconds),
    }
}

/// Check a repository's own polling interval: 0, or 10 seconds to a day.
pub fn validate_poll_interval(seconds: u64) -> Result<(), String> {
    if seconds == 0 || (MIN_POLL_INTERVAL_SECONDS..=MAX_POLL_INTERVAL_SECONDS).contains(&seconds) {
        Ok(())
    } else {
        Err(format!(
            "poll_interval_seconds must be 0 (never poll) or {MIN_POLL_INTERVAL_SECONDS} to {MAX_POLL_INTERVAL_SECONDS} seconds, not {seconds}"
        ))
    }
}

/// The ref name of a branch as the known-heads table keys it.
pub fn branch_ref(branch: &str) -> String {
    format!("refs/heads/{branch}")
}

/// The ref name of a tag as the known-heads table keys it.
pub fn tag_ref(tag: &str) -> String {
    format!("refs/tags/{tag}")
}

/// A tag on the remote: the object its ref holds (the tag object of an annotated tag, what
/// GitHub and GitLab webhooks report) and, for an annotated tag, the commit it peels to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTag {
    pub object: String,
    pub peeled: Option<String>,
}

/// The branches and tags of a remote repository, by name (without `refs/heads/`, `refs/tags/`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteRefs {
    pub branches: BTreeMap<String, String>,
    pub tags: BTreeMap<String, RemoteTag>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LsRemoteError {
    #[error("repository URL {url} uses {scheme}, which the coordinator does not fetch from (allowed: {allowed})")]
    ProtocolNotAllowed { url: String, scheme: String, allowed: String },
    #[error("cannot run git (is it installed on the coordinator?): {0}")]
    Spawn(String),
    #[error("git ls-remote {url} did not answer within {seconds} s")]
    TimedOut { url: String, seconds: u64 },
    #[error("git ls-remote {url} failed: {message}")]
    Failed { url: String, message: String },
    #[error("git ls-remote {url} printed more than {limit} bytes of refs; the repository has too many refs to poll")]
    OutputTooLarge { url: String, limit: usize },
    #[error("git ls-remote printed a line that is not `<object id> TAB <ref>` (line {line}): {reason}")]
    Malformed { line: usize, reason: String },
}

fn is_object_id(text: &str) -> bool {
    // SHA-1 repositories have 40 hex digits, SHA-256 ones 64.
    (text.len() == 40 || text.len() == 64) && text.bytes().all(|byte| byte.is_ascii_hexdigit())
}

/// Parse `git ls-remote` output: `<object id>\t<ref>` per line. Branches and tags are kept,
/// annotated tags' peeled lines (`refs/tags/v1^{}`) give the commit they point at; other refs
/// (`HEAD`, `refs/pull/...`, `refs/merge-requests/...`, notes) are not ours to build and are
/// skipped, as are names longer than a webhook would carry. A line that is not in git's format
/// at all is an error: the output is not what we think it is.
pub fn parse_ls_remote(output: &str) -> Result<RemoteRefs, LsRemoteError> {
    let mut refs = RemoteRefs::default();
    let mut peeled: BTreeMap<String, String> = BTreeMap::new();
    for (index, line) in output.lines().enumerate() {
        let malformed = |reason: &str| LsRemoteError::Malformed { line: index + 1, reason: reason.to_string() };
        if line.is_empty() {
            continue;
        }
        let (object, name) = line.split_once('\t').ok_or_else(|| malformed("no tab between the object id and the ref"))?;
        if !is_object_id(object) {
            return Err(malformed("the object id is not 40 or 64 hexadecimal digits"));
        }
        if name.is_empty() || name.contains(char::is_control) {
            return Err(malformed("the ref name is empty or holds control characters"));
        }
        let object = object.to_ascii_lowercase();
        if let Some(tag) = name.strip_prefix("refs/tags/") {
            if let Some(tag) = tag.strip_suffix("^{}") {
                if !tag.is_empty() && tag.len() <= MAX_REF_NAME_BYTES {
                    peeled.insert(tag.to_string(), object);
                }
            } else if !tag.is_empty() && tag.len() <= MAX_REF_NAME_BYTES {
                refs.tags.insert(tag.to_string(), RemoteTag { object, peeled: None });
            }
        } else if let Some(branch) = name.strip_prefix("refs/heads/")
            && !branch.is_empty()
            && branch.len() <= MAX_REF_NAME_BYTES
        {
            refs.branches.insert(branch.to_string(), object);
        }
    }
    // git prints a tag's peeled line right after the tag's own, but a peeled line without its
    // tag is possible in a pattern-filtered listing; it is then ignored.
    for (tag, commit) in peeled {
        if let Some(remote) = refs.tags.get_mut(&tag) {
            remote.peeled = Some(commit);
        }
    }
    Ok(refs)
}

/// The events a poll reports: each branch that is new or whose head moved (with its previous
/// head as `before`), and each tag that is new or moved. `known` maps ref names
/// (`refs/heads/main`, `refs/tags/v1`) to the head recorded for them. A tag counts as unchanged
/// when the recorded head is its object or the commit it peels to (webhooks record one or the
/// other depending on the provider). Refs deleted on the remote report nothing, as deletions
/// delivered by webhook run nothing either.
pub fn changed_refs(known: &BTreeMap<String, String>, remote: &RemoteRefs) -> Vec<ScmEvent> {
    let mut events = Vec::new();
    for (branch, head) in &remote.branches {
        let before = known.get(&branch_ref(branch));
        if before.is_some_and(|before| before.eq_ignore_ascii_case(head)) {
            continue;
        }
        events.push(ScmEvent::Push(Push {
            branch: branch.clone(),
            before: before.cloned(),
            after: head.clone(),
            created: before.is_none(),
            head_commit: None,
        }));
    }
    for (tag, remote_tag) in &remote.tags {
        let unchanged = known.get(&tag_ref(tag)).is_some_and(|recorded| {
            recorded.eq_ignore_ascii_case(&remote_tag.object)
                || remote_tag.peeled.as_ref().is_some_and(|peeled| recorded.eq_ignore_ascii_case(peeled))
        });
        if !unchanged {
            events.push(ScmEvent::TagPush(TagPush { tag: tag.clone(), commit: remote_tag.object.clone() }));
        }
    }
    events
}

/// What one poll submits: whether it only records the heads (`baseline`), and the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollPlan {
    pub baseline: bool,
    pub events: Vec<ScmEvent>,
}

/// What to submit after a poll, or `None` when nothing changed. The first poll of a repository
/// with no known heads is a baseline: every ref is recorded and nothing runs, so connecting a
/// repository with 50 branches does not start 50 runs. `baselined` says whether this poller
/// already made that first poll (an empty repository stays without known heads after it, and
/// its first branch must then run).
pub fn plan_poll(known: &BTreeMap<String, String>, remote: &RemoteRefs, baselined: bool) -> Option<PollPlan> {
    let events = changed_refs(known, remote);
    if known.is_empty() && !baselined {
        return Some(PollPlan { baseline: true, events });
    }
    (!events.is_empty()).then_some(PollPlan { baseline: false, events })
}

/// `url` with any `user:password@` removed, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => url.to_string(),
            }
        }
        None => url.to_string(),
    }
}

/// The protocol a repository URL uses, as `GIT_ALLOW_PROTOCOL` names it.
pub fn scheme_of(url: &str) -> &str {
    match url.split_once("://") {
        Some((scheme, _)) => scheme,
        // scp-like `user@host:path` is ssh; a plain path is a local file.
        None if url.contains('@') && url.contains(':') => "ssh",
        None => "file",
    }
}

/// The line of git's standard error that says what went wrong: the first `fatal:` line, or the
/// last line, cut to 300 characters.
fn git_failure_message(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
    let line = lines.iter().find(|line| line.starts_with("fatal:")).or(lines.last()).copied().unwrap_or("git exited without saying why");
    line.chars().take(300).collect()
}

/// Kills the whole process group of a git command (git, its remote helper, ssh) when dropped,
/// so a timed-out or abandoned `ls-remote` leaves nothing behind.
struct ProcessGroupGuard(Option<i32>);

impl Drop for ProcessGroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) with a negative pid signals the group git leads; it has no memory
            // effects. The group may already be gone, which is fine.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
    }
}

/// Read at most `limit` bytes; `Err(())` when the stream has more.
async fn read_bounded(mut stream: impl AsyncRead + Unpin, limit: usize) -> std::io::Result<Result<Vec<u8>, ()>> {
    let mut bytes = Vec::new();
    (&mut stream).take(limit as u64 + 1).read_to_end(&mut bytes).await?;
    Ok(if bytes.len() > limit { Err(()) } else { Ok(bytes) })
}

/// Run `git ls-remote --heads --tags <url> [patterns]` with git sandboxed: only `protocols`
/// (see [`git_allowed_protocols`]), no terminal prompt, no askpass, no credential helper, no
/// system or global config (so no `insteadOf` rewrites or helpers of the coordinator's user),
/// ssh in batch mode, killed with its children after `timeout`, output bounded.
/// `config_arguments` go before `ls-remote` (`-c name=value` pairs, such as the outbound
/// policy's pinning of a checked host to its addresses).
pub async fn ls_remote(
    url: &str,
    patterns: &[String],
    protocols: &str,
    config_arguments: &[String],
    timeout: Duration,
) -> Result<RemoteRefs, LsRemoteError> {
    let shown_url = redact_url(url);
    let scheme = scheme_of(url);
    if !protocols.split(':').any(|allowed| allowed == scheme) {
        return Err(LsRemoteError::ProtocolNotAllowed {
            url: shown_url,
            scheme: scheme.to_string(),
            allowed: protocols.replace(':', ", "),
        });
    }
    if url.starts_with('-') || url.chars().any(char::is_control) {
        return Err(LsRemoteError::Failed { url: shown_url, message: "the URL is not a repository URL".into() });
    }
    let mut command = tokio::process::Command::new("git");
    command
        .args(["-c", "credential.helper=", "-c", "core.askPass="])
        .args(config_arguments)
        .args(["ls-remote", "--heads", "--tags", "--", url])
        .args(patterns)
        .env("GIT_ALLOW_PROTOCOL", protocols)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new")
        .env_remove("GIT_ASKPASS")
        .env_remove("SSH_ASKPASS")
        .env_remove("GIT_DIR")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|error| LsRemoteError::Spawn(error.to_string()))?;
    let mut group = ProcessGroupGuard(child.id().and_then(|pid| i32::try_from(pid).ok()));
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let run = async {
        let stderr_task = async {
            let mut stderr = stderr;
            let kept = read_bounded(&mut stderr, MAX_STDERR_BYTES).await;
            // Whatever is beyond the kept part is drained so that git never blocks writing it.
            let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
            kept.ok().map(|kept| kept.unwrap_or_else(|()| b"(git's error output was too long)".to_vec())).unwrap_or_default()
        };
        let (out, err) = tokio::join!(read_bounded(stdout, MAX_LS_REMOTE_OUTPUT_BYTES), stderr_task);
        let out = out.map_err(|error| LsRemoteError::Failed { url: shown_url.clone(), message: format!("reading its output: {error}") })?;
        let Ok(out) = out else {
            return Err(LsRemoteError::OutputTooLarge { url: shown_url.clone(), limit: MAX_LS_REMOTE_OUTPUT_BYTES });
        };
        let status = child.wait().await.map_err(|error| LsRemoteError::Spawn(error.to_string()))?;
        // git has exited and waited for its helpers: nothing is left to kill, and its process
        // group id must not be signalled once it may be reused.
        group.0 = None;
        if !status.success() {
            return Err(LsRemoteError::Failed { url: shown_url.clone(), message: git_failure_message(&err) });
        }
        let text = String::from_utf8(out).map_err(|_| LsRemoteError::Malformed { line: 0, reason: "the output is not UTF-8".into() })?;
        parse_ls_remote(&text)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(result) => result,
        Err(_) => Err(LsRemoteError::TimedOut { url: shown_url, seconds: timeout.as_secs().max(1) }),
    }
}

/// The head commit of `branch` on the remote, or `None` when the branch does not exist.
pub async fn resolve_branch(
    url: &str,
    branch: &str,
    protocols: &str,
    config_arguments: &[String],
    timeout: Duration,
) -> Result<Option<String>, LsRemoteError> {
    let mut refs = ls_remote(url, &[branch_ref(branch)], protocols, config_arguments, timeout).await?;
    // ls-remote matches patterns against the end of ref names, so `refs/heads/x/refs/heads/main`
    // would match `refs/heads/main` too: take the exact branch only.
    Ok(refs.branches.remove(branch))
}

/// `interval_ms` spread by ±10 %: `unit` in `[0, 1)` is drawn by the poller (never by `apply`),
/// so that repositories connected together do not poll their forge together.
pub fn jittered(interval_ms: Timestamp, unit: f64) -> Timestamp {
    let factor = 0.9 + 0.2 * unit.clamp(0.0, 1.0);
    ((interval_ms as f64) * factor).round() as Timestamp
}

/// How long after its `failures`-th failure in a row a repository is polled again: its interval
/// doubled per failure, capped at an hour (or the interval, when that is longer).
pub fn backoff_ms(interval_ms: Timestamp, failures: u32) -> Timestamp {
    let cap = MAX_BACKOFF_MS.max(interval_ms);
    interval_ms.saturating_mul(1 << failures.min(20)).min(cap)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ScheduleEntry {
    interval_ms: Timestamp,
    next_poll_at: Timestamp,
    consecutive_failures: u32,
    in_flight: bool,
    /// This poller made the repository's first (baseline) poll.
    baselined: bool,
}

/// When each polled repository is polled next, on this leader (kept in memory: a new leader
/// starts over, spreading its first polls over each interval; the known heads that make polls
/// idempotent are replicated). Pure: the caller passes the time and the random draws.
#[derive(Debug, Clone, Default)]
pub struct PollSchedule {
    entries: BTreeMap<u64, ScheduleEntry>,
}

impl PollSchedule {
    /// Follow the repositories that poll now (`(repo_id, interval in seconds)`): a repository
    /// seen for the first time is polled after a random part of its interval (`draw()` in
    /// `[0, 1)`); one that no longer polls is forgotten; a shorter interval takes effect now.
    pub fn sync(&mut self, polled: &[(u64, u64)], now: Timestamp, mut draw: impl FnMut() -> f64) {
        let wanted: BTreeMap<u64, Timestamp> = polled
            .iter()
            .map(|(repo_id, seconds)| (*repo_id, Timestamp::try_from(*seconds).unwrap_or(Timestamp::MAX / 2_000) * 1000))
            .collect();
        self.entries.retain(|repo_id, _| wanted.contains_key(repo_id));
        for (repo_id, interval_ms) in wanted {
            match self.entries.get_mut(&repo_id) {
                Some(entry) => {
                    if entry.interval_ms != interval_ms {
                        entry.interval_ms = interval_ms;
                        entry.next_poll_at = entry.next_poll_at.min(now + jittered(interval_ms, draw()));
                    }
                }
                None => {
                    let first = ((interval_ms as f64) * draw().clamp(0.0, 1.0)) as Timestamp;
                    self.entries.insert(
                        repo_id,
                        ScheduleEntry {
                            interval_ms,
                            next_poll_at: now + first,
                            consecutive_failures: 0,
                            in_flight: false,
                            baselined: false,
                        },
                    );
                }
            }
        }
    }

    /// The repositories due at `now` that are not being polled already, at most `limit`,
    /// earliest first; they are marked in flight until [`PollSchedule::finished`].
    pub fn take_due(&mut self, now: Timestamp, limit: usize) -> Vec<u64> {
        let in_flight = self.entries.values().filter(|entry| entry.in_flight).count();
        let mut due: Vec<(Timestamp, u64)> = self
            .entries
            .iter()
            .filter(|(_, entry)| !entry.in_flight && entry.next_poll_at <= now)
            .map(|(repo_id, entry)| (entry.next_poll_at, *repo_id))
            .collect();
        due.sort_unstable();
        due.truncate(limit.saturating_sub(in_flight));
        for (_, repo_id) in &due {
            if let Some(entry) = self.entries.get_mut(repo_id) {
                entry.in_flight = true;
            }
        }
        due.into_iter().map(|(_, repo_id)| repo_id).collect()
    }

    /// Whether this poller already made the repository's baseline poll.
    pub fn baselined(&self, repo_id: u64) -> bool {
        self.entries.get(&repo_id).is_some_and(|entry| entry.baselined)
    }

    /// A poll ended at `now`: after a success the next one is an interval (±10 %) away; after a
    /// failure the wait doubles with each failure in a row. Returns the wait, in milliseconds
    /// (`None` when the repository stopped polling meanwhile).
    pub fn finished(&mut self, repo_id: u64, now: Timestamp, succeeded: bool, unit: f64) -> Option<Timestamp> {
        let entry = self.entries.get_mut(&repo_id)?;
        entry.in_flight = false;
        let wait = if succeeded {
            entry.consecutive_failures = 0;
            entry.baselined = true;
            jittered(entry.interval_ms, unit)
        } else {
            entry.consecutive_failures = entry.consecutive_failures.saturating_add(1);
            jittered(backoff_ms(entry.interval_ms, entry.consecutive_failures), unit)
        };
        entry.next_poll_at = now + wait;
        Some(wait)
    }

    /// The failures in a row of a repository's polls.
    pub fn consecutive_failures(&self, repo_id: u64) -> u32 {
        self.entries.get(&repo_id).map_or(0, |entry| entry.consecutive_failures)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: &str = "1111111111111111111111111111111111111111";
    const FEATURE: &str = "2222222222222222222222222222222222222222";
    const TAG_OBJECT: &str = "3333333333333333333333333333333333333333";
    const TAGGED_COMMIT: &str = "4444444444444444444444444444444444444444";
    const LIGHT_TAG: &str = "5555555555555555555555555555555555555555";

    fn output() -> String {
        format!(
            "{MAIN}\tHEAD\n{FEATURE}\trefs/heads/feature/x\n{MAIN}\trefs/heads/main\n{FEATURE}\trefs/pull/7/head\n\
             {TAG_OBJECT}\trefs/tags/v1.0\n{TAGGED_COMMIT}\trefs/tags/v1.0^{{}}\n{LIGHT_TAG}\trefs/tags/light\n"
        )
    }

    #[test]
    fn ls_remote_output_gives_branches_and_tags_with_peeled_commits() {
        let refs = parse_ls_remote(&output()).unwrap();
        assert_eq!(refs.branches, BTreeMap::from([("feature/x".to_string(), FEATURE.to_string()), ("main".to_string(), MAIN.to_string())]));
        assert_eq!(refs.tags["v1.0"], RemoteTag { object: TAG_OBJECT.into(), peeled: Some(TAGGED_COMMIT.into()) });
        assert_eq!(refs.tags["light"], RemoteTag { object: LIGHT_TAG.into(), peeled: None });
        assert_eq!(refs.tags.len(), 2, "the peeled line is not a tag of its own");
        // SHA-256 repositories, upper-case hex and an empty listing.
        let sha256 = "a".repeat(64);
        assert_eq!(parse_ls_remote(&format!("{}\trefs/heads/main\n", sha256.to_uppercase())).unwrap().branches["main"], sha256);
        assert_eq!(parse_ls_remote("").unwrap(), RemoteRefs::default());
    }

    #[test]
    fn ls_remote_output_that_is_not_gits_is_refused_by_line() {
        for (bad, line) in [
            (format!("{MAIN} refs/heads/main"), 1),
            (format!("{MAIN}\trefs/heads/main\nnot-a-sha\trefs/heads/x"), 2),
            (format!("{}\trefs/heads/main", &MAIN[..39]), 1),
            (format!("{MAIN}\t"), 1),
            (format!("{MAIN}\trefs/heads/a\u{7}b"), 1),
        ] {
            match parse_ls_remote(&bad) {
                Err(LsRemoteError::Malformed { line: reported, .. }) => assert_eq!(reported, line, "{bad:?}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
        // Names a webhook would not carry are skipped, not fatal.
        let long = format!("{MAIN}\trefs/heads/{}\n{MAIN}\trefs/heads/ok\n", "b".repeat(300));
        assert_eq!(parse_ls_remote(&long).unwrap().branches.keys().collect::<Vec<_>>(), ["ok"]);
    }

    #[test]
    fn new_and_moved_branches_and_new_tags_are_events_deleted_refs_are_not() {
        let remote = parse_ls_remote(&output()).unwrap();
        let known = BTreeMap::from([
            (branch_ref("main"), "9999999999999999999999999999999999999999".to_string()),
            (branch_ref("gone"), MAIN.to_string()),
            (tag_ref("light"), LIGHT_TAG.to_string()),
            (tag_ref("deleted"), LIGHT_TAG.to_string()),
        ]);
        let events = changed_refs(&known, &remote);
        assert_eq!(
            events,
            vec![
                ScmEvent::Push(Push { branch: "feature/x".into(), before: None, after: FEATURE.into(), created: true, head_commit: None }),
                ScmEvent::Push(Push {
                    branch: "main".into(),
                    before: Some("9999999999999999999999999999999999999999".into()),
                    after: MAIN.into(),
                    created: false,
                    head_commit: None,
                }),
                ScmEvent::TagPush(TagPush { tag: "v1.0".into(), commit: TAG_OBJECT.into() }),
            ]
        );
    }

    #[test]
    fn unchanged_refs_are_no_events_whichever_id_a_webhook_recorded_for_a_tag() {
        let remote = parse_ls_remote(&output()).unwrap();
        for tag_head in [TAG_OBJECT, TAGGED_COMMIT] {
            let known = BTreeMap::from([
                (branch_ref("main"), MAIN.to_uppercase()),
                (branch_ref("feature/x"), FEATURE.to_string()),
                (tag_ref("v1.0"), tag_head.to_string()),
                (tag_ref("light"), LIGHT_TAG.to_string()),
            ]);
            assert_eq!(changed_refs(&known, &remote), vec![], "tag recorded as {tag_head}");
            assert_eq!(plan_poll(&known, &remote, false), None);
        }
        // A tag moved to another commit is a tag push again, as a webhook reports it.
        let known = BTreeMap::from([(tag_ref("light"), MAIN.to_string())]);
        assert!(changed_refs(&known, &remote).contains(&ScmEvent::TagPush(TagPush { tag: "light".into(), commit: LIGHT_TAG.into() })));
    }

    #[test]
    fn the_first_poll_is_a_baseline_and_later_ones_report_only_changes() {
        let remote = parse_ls_remote(&output()).unwrap();
        let baseline = plan_poll(&BTreeMap::new(), &remote, false).unwrap();
        assert!(baseline.baseline);
        assert_eq!(baseline.events.len(), 4, "every branch and tag is recorded: {:?}", baseline.events);
        // An empty repository's baseline records nothing; its first branch then runs.
        let empty = plan_poll(&BTreeMap::new(), &RemoteRefs::default(), false).unwrap();
        assert_eq!(empty, PollPlan { baseline: true, events: vec![] });
        let first_branch = plan_poll(&BTreeMap::new(), &remote, true).unwrap();
        assert!(!first_branch.baseline);
        assert_eq!(first_branch.events.len(), 4);
        let known = BTreeMap::from([(branch_ref("main"), MAIN.to_string())]);
        let later = plan_poll(&known, &remote, false).unwrap();
        assert!(!later.baseline, "known heads mean the baseline was made, by this leader or another");
        assert_eq!(later.events.len(), 3);
    }

    #[test]
    fn polling_intervals_follow_the_repository_then_the_node() {
        assert_eq!(effective_poll_interval(None, false, 60), Some(60));
        assert_eq!(effective_poll_interval(None, true, 60), None, "a repository with a webhook secret gets webhooks");
        assert_eq!(effective_poll_interval(Some(300), true, 60), Some(300), "unless it asks to be polled too");
        assert_eq!(effective_poll_interval(Some(0), false, 60), None);
        assert_eq!(effective_poll_interval(None, false, 0), None);
        assert_eq!(effective_poll_interval(Some(30), false, 0), Some(30));
        for good in [0, 10, 60, 86_400] {
            validate_poll_interval(good).unwrap();
        }
        for bad in [1, 9, 86_401, u64::MAX] {
            assert!(validate_poll_interval(bad).unwrap_err().contains("poll_interval_seconds must be 0"), "{bad}");
        }
    }

    #[test]
    fn git_runs_with_the_allowed_protocols_only() {
        assert_eq!(git_allowed_protocols(false), "https:ssh:git");
        assert_eq!(git_allowed_protocols(true), "https:ssh:git:file");
        assert_eq!(scheme_of("https://github.com/org/repo"), "https");
        assert_eq!(scheme_of("git@github.com:org/repo.git"), "ssh");
        assert_eq!(scheme_of("/srv/repo"), "file");
        assert_eq!(redact_url("https://user:token@github.com/org/repo"), "https://***@github.com/org/repo");
        assert_eq!(redact_url("https://github.com/org/a@b"), "https://github.com/org/a@b");
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_failures_back_off() {
        assert_eq!(jittered(60_000, 0.0), 54_000);
        assert_eq!(jittered(60_000, 0.5), 60_000);
        assert!(jittered(60_000, 0.999_999) <= 66_000);
        assert_eq!(backoff_ms(60_000, 1), 120_000);
        assert_eq!(backoff_ms(60_000, 3), 480_000);
        assert_eq!(backoff_ms(60_000, 50), MAX_BACKOFF_MS);
        assert_eq!(backoff_ms(86_400_000, 5), 86_400_000, "never shorter than the interval");
    }

    #[test]
    fn the_schedule_spreads_first_polls_runs_each_repository_once_at_a_time_and_backs_off() {
        let mut schedule = PollSchedule::default();
        let mut draws = [0.0, 0.5].into_iter();
        schedule.sync(&[(1, 10), (2, 10)], 0, || draws.next().unwrap());
        assert_eq!(schedule.take_due(0, 8), vec![1], "repository 2 is due half an interval later");
        assert_eq!(schedule.take_due(1_000, 8), Vec::<u64>::new(), "repository 1 is in flight");
        assert_eq!(schedule.take_due(5_000, 8), vec![2]);
        assert!(!schedule.baselined(1));
        assert_eq!(schedule.finished(1, 6_000, true, 0.5), Some(10_000));
        assert!(schedule.baselined(1));
        assert_eq!(schedule.finished(2, 6_000, false, 0.5), Some(20_000));
        assert_eq!(schedule.finished(2, 6_000, false, 0.5), Some(40_000));
        assert_eq!(schedule.consecutive_failures(2), 2);
        assert_eq!(schedule.take_due(16_000, 8), vec![1]);
        // The limit counts polls in flight.
        assert_eq!(schedule.take_due(100_000, 1), Vec::<u64>::new());
        schedule.finished(1, 16_000, true, 0.5);
        // A repository that stops polling is forgotten; one that polls faster is polled sooner.
        schedule.sync(&[(1, 2)], 16_000, || 0.5);
        assert_eq!(schedule.len(), 1);
        assert_eq!(schedule.finished(2, 17_000, true, 0.5), None);
        assert_eq!(schedule.take_due(18_000, 8), vec![1]);
    }

    /// A real bare repository served through `file://` (allowed explicitly here), with a
    /// branch, a lightweight tag and an annotated one: the real git's output parses.
    #[tokio::test]
    async fn ls_remote_reads_a_real_repository_and_refuses_what_is_not_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let output = std::process::Command::new("git")
                .args(args)
                .current_dir(dir.path())
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@example.com")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@example.com")
                .output()
                .unwrap();
            assert!(output.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        };
        git(&["init", "-q", "-b", "main"]);
        std::fs::write(dir.path().join("file"), "one").unwrap();
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "one"]);
        let head = git(&["rev-parse", "HEAD"]);
        git(&["tag", "light"]);
        git(&["tag", "-a", "v1", "-m", "release"]);
        let tag_object = git(&["rev-parse", "v1"]);
        git(&["branch", "feature"]);
        let url = format!("file://{}", dir.path().display());
        let timeout = Duration::from_secs(20);

        let refs = ls_remote(&url, &[], git_allowed_protocols(true), &[], timeout).await.unwrap();
        assert_eq!(refs.branches, BTreeMap::from([("feature".to_string(), head.clone()), ("main".to_string(), head.clone())]));
        assert_eq!(refs.tags["v1"], RemoteTag { object: tag_object, peeled: Some(head.clone()) });
        assert_eq!(refs.tags["light"].object, head);

        assert_eq!(resolve_branch(&url, "main", git_allowed_protocols(true), &[], timeout).await.unwrap(), Some(head));
        assert_eq!(resolve_branch(&url, "nope", git_allowed_protocols(true), &[], timeout).await.unwrap(), None);

        let refused = ls_remote(&url, &[], git_allowed_protocols(false), &[], timeout).await.unwrap_err();
        assert!(matches!(refused, LsRemoteError::ProtocolNotAllowed { .. }), "{refused}");
        let missing = format!("file://{}/missing", dir.path().display());
        let failed = ls_remote(&missing, &[], git_allowed_protocols(true), &[], timeout).await.unwrap_err();
        assert!(matches!(failed, LsRemoteError::Failed { .. }), "{failed}");
    }

    /// A server that accepts the connection and never answers: the timeout ends the poll.
    #[tokio::test]
    async fn ls_remote_gives_up_on_a_silent_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let started = std::time::Instant::now();
        let url = format!("git://127.0.0.1:{port}/repo.git");
        let error = ls_remote(&url, &[], git_allowed_protocols(false), &[], Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(error, LsRemoteError::TimedOut { seconds: 1, .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
        hold.abort();
    }
}
