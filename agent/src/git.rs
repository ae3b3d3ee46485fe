//! Checking out the exact commit of a job with the real `git`, restricted to the protocols the
//! operator allows (`GIT_ALLOW_PROTOCOL`), never prompting for credentials.
//!
//! A checkout is on every build's critical path, and each git process costs several
//! milliseconds to start on a busy host, so it runs as few as it can: the workspace's empty
//! repository is written directly (what `git init` + `git remote add` would write), then one
//! `git fetch` of the commit and one `git checkout`; HEAD is read from the file.

use std::path::Path;
use std::process::Stdio;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::executor::OutputSender;

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// The repository or commit is wrong: retrying elsewhere will not help.
    #[error("{0}")]
    Job(String),
    /// git is missing or the host failed.
    #[error("{0}")]
    Infrastructure(String),
}

fn scheme_of(url: &str) -> &str {
    match url.split_once("://") {
        Some((scheme, _)) => scheme,
        // scp-like `user@host:path` is ssh; a plain path is a local file.
        None if url.contains('@') && url.contains(':') => "ssh",
        None => "file",
    }
}

async fn git(workspace: &Path, arguments: &[&str], allowed: &str, output: &OutputSender) -> Result<bool, CheckoutError> {
    let mut command = Command::new("git");
    command
        .args(arguments)
        .current_dir(workspace)
        .env("GIT_ALLOW_PROTOCOL", allowed)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| CheckoutError::Infrastructure(format!("cannot run git (is it installed?): {e}")))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (read_out, read_err) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
    read_out.and(read_err).map_err(|e| CheckoutError::Infrastructure(format!("reading git's output: {e}")))?;
    let status = child.wait().await.map_err(|e| CheckoutError::Infrastructure(format!("waiting for git: {e}")))?;
    let mut text = format!("$ git {}\n", arguments.join(" ")).into_bytes();
    text.extend_from_slice(&out);
    text.extend_from_slice(&err);
    let _ = output.send(text).await;
    Ok(status.success())
}

/// A git config value in double quotes, with `\\` and `"` escaped (git-config(1), "Syntax").
fn config_value(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Write an empty non-bare repository in `workspace` with `url` as its `origin`: the files
/// `git init` and `git remote add origin <url>` would leave (gitrepository-layout(5)), without
/// two processes. Automatic gc and maintenance are off: the repository lives for one build.
fn write_empty_repository(workspace: &Path, url: &str) -> std::io::Result<()> {
    let git_dir = workspace.join(".git");
    for directory in ["objects/info", "objects/pack", "refs/heads", "refs/tags"] {
        std::fs::create_dir_all(git_dir.join(directory))?;
    }
    std::fs::write(git_dir.join("HEAD"), "ref: refs/heads/main\n")?;
    let config = format!(
        "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\tlogallrefupdates = true\n\
         [gc]\n\tauto = 0\n[maintenance]\n\tauto = false\n\
         [remote \"origin\"]\n\turl = {}\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n",
        config_value(url)
    );
    std::fs::write(git_dir.join("config"), config)
}

/// The commit HEAD points at: a detached HEAD holds it; otherwise ask git.
async fn head_commit(workspace: &Path) -> Result<String, CheckoutError> {
    if let Ok(head) = std::fs::read_to_string(workspace.join(".git/HEAD")) {
        let head = head.trim();
        if head.len() >= 40 && head.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(head.to_string());
        }
    }
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(workspace)
        .output()
        .await
        .map_err(|e| CheckoutError::Infrastructure(format!("git rev-parse: {e}")))?;
    Ok(String::from_utf8_lossy(&head.stdout).trim().to_string())
}

/// The committer time of the commit checked out in `workspace`, in Unix milliseconds
/// (`git show -s --format=%ct HEAD`): where a deployment's lead time starts. `None` when the
/// workspace holds no commit.
pub async fn commit_time(workspace: &Path) -> Option<i64> {
    if !workspace.join(".git").is_dir() {
        return None;
    }
    let output = Command::new("git")
        .args(["show", "-s", "--format=%ct", "HEAD"])
        .current_dir(workspace)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .kill_on_drop(true)
        .output()
        .await
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let seconds: i64 = String::from_utf8_lossy(&output.stdout).trim().parse().ok()?;
    Some(seconds * 1000)
}

/// Refuse a URL whose protocol the operator does not allow.
fn check_protocol(url: &str, protocols: &[String]) -> Result<(), CheckoutError> {
    let scheme = scheme_of(url);
    if !protocols.iter().any(|allowed| allowed == scheme) {
        return Err(CheckoutError::Job(format!(
            "repository URL {url} uses {scheme}, which this agent does not fetch from (allowed: {}); set git_protocols in the agent config",
            protocols.join(", ")
        )));
    }
    Ok(())
}

/// Write the workspace's empty repository with `url` as `origin` (after the checks). Returns the
/// `GIT_ALLOW_PROTOCOL` value for the git processes.
fn prepare(url: &str, workspace: &Path, protocols: &[String]) -> Result<String, CheckoutError> {
    if url.chars().any(char::is_control) {
        return Err(CheckoutError::Job(format!("repository URL {url:?} contains control characters")));
    }
    std::fs::create_dir_all(workspace)
        .and_then(|()| write_empty_repository(workspace, url))
        .map_err(|e| CheckoutError::Infrastructure(format!("cannot create the workspace's repository: {e}")))?;
    Ok(protocols.join(":"))
}

/// Clone `url` into the empty directory `workspace` at `commit` (full or abbreviated SHA).
pub async fn checkout(
    url: &str,
    commit: &str,
    workspace: &Path,
    protocols: &[String],
    output: &OutputSender,
) -> Result<String, CheckoutError> {
    check_protocol(url, protocols)?;
    if commit.is_empty() || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CheckoutError::Job(format!("commit {commit:?} is not a hexadecimal SHA")));
    }
    let allowed = prepare(url, workspace, protocols)?;
    // A full SHA can be fetched alone on servers that allow it; otherwise fetch every branch and
    // tag and find the commit among them (also how abbreviated SHAs resolve).
    let fetched_alone = commit.len() == 40 && git(workspace, &["fetch", "-q", "--depth", "1", "origin", commit], &allowed, output).await?;
    if !fetched_alone {
        let all = ["fetch", "-q", "--tags", "origin", "+refs/heads/*:refs/remotes/origin/*"];
        if !git(workspace, &all, &allowed, output).await? {
            return Err(CheckoutError::Job(format!(
                "cannot fetch from {url}: see the log above (is the URL right, and reachable from the agent?)"
            )));
        }
    }
    let target = format!("{commit}^{{commit}}");
    if !git(workspace, &["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", &target], &allowed, output).await? {
        return Err(CheckoutError::Job(format!("commit {commit} is not in {url}")));
    }
    head_commit(workspace).await
}

/// A ref name safe to hand to `git fetch`: under `refs/`, no `..`, `:`, whitespace, control
/// characters or the other characters git forbids in ref names (git-check-ref-format(1)).
fn valid_fetch_ref(git_ref: &str) -> bool {
    git_ref.starts_with("refs/")
        && git_ref.len() <= 255
        && !git_ref.contains("..")
        && !git_ref.contains("@{")
        && !git_ref.ends_with(['/', '.'])
        && !git_ref.chars().any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
}

/// Clone `url` into the empty directory `workspace` at what `git_ref` points to, such as a pull
/// request's trial merge `refs/pull/7/merge`: a commit the provider made that no payload names,
/// so it can only be fetched by its ref. `head` is the pull request's head commit, logged beside
/// the commit the ref resolved to. Returns the commit checked out.
pub async fn checkout_ref(
    url: &str,
    git_ref: &str,
    head: &str,
    workspace: &Path,
    protocols: &[String],
    output: &OutputSender,
) -> Result<String, CheckoutError> {
    check_protocol(url, protocols)?;
    if !valid_fetch_ref(git_ref) {
        return Err(CheckoutError::Job(format!("{git_ref:?} is not a ref name git can fetch (it must start with refs/)")));
    }
    let allowed = prepare(url, workspace, protocols)?;
    let destination = "refs/davit/checkout";
    let refspec = format!("+{git_ref}:{destination}");
    if !git(workspace, &["fetch", "-q", "--depth", "1", "origin", &refspec], &allowed, output).await? {
        return Err(CheckoutError::Job(format!(
            "cannot fetch {git_ref} from {url}: see the log above (for a pull request, the provider may not have made its merge yet, or it conflicts)"
        )));
    }
    if !git(workspace, &["-c", "advice.detachedHead=false", "checkout", "-q", "--detach", destination], &allowed, output).await? {
        return Err(CheckoutError::Job(format!("cannot check out {git_ref} of {url}: see the log above")));
    }
    let resolved = head_commit(workspace).await?;
    let _ = output.send(format!("{git_ref} resolved to commit {resolved} (head commit {head})\n").into_bytes()).await;
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run git in `dir` as a test author; its trimmed output.
    fn git_in(dir: &Path, args: &[&str]) -> String {
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
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    }

    #[test]
    fn schemes() {
        assert_eq!(scheme_of("https://github.com/org/repo"), "https");
        assert_eq!(scheme_of("git@github.com:org/repo.git"), "ssh");
        assert_eq!(scheme_of("git://127.0.0.1/repo"), "git");
        assert_eq!(scheme_of("/srv/repo"), "file");
        assert_eq!(scheme_of("file:///srv/repo"), "file");
    }

    #[tokio::test]
    async fn refuses_protocols_not_allowed_and_bad_commits() {
        let (output, _receiver) = tokio::sync::mpsc::channel(16);
        let dir = tempfile::tempdir().unwrap();
        let protocols = vec!["https".to_string()];
        let error = checkout("file:///srv/repo", "abc1234", dir.path(), &protocols, &output).await.unwrap_err();
        assert!(error.to_string().contains("does not fetch from"), "{error}");
        let protocols = vec!["file".to_string()];
        let error = checkout("file:///srv/repo", "main; rm -rf /", dir.path(), &protocols, &output).await.unwrap_err();
        assert!(error.to_string().contains("not a hexadecimal SHA"), "{error}");
    }

    #[tokio::test]
    async fn checks_out_a_local_repository_at_a_commit() {
        let origin = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            git_in(origin.path(), args);
        };
        run(&["init", "-q", "-b", "main"]);
        std::fs::write(origin.path().join("file.txt"), "one").unwrap();
        run(&["add", "."]);
        run(&["commit", "-q", "-m", "one"]);
        let first = git_in(origin.path(), &["rev-parse", "HEAD"]);
        std::fs::write(origin.path().join("file.txt"), "two").unwrap();
        run(&["commit", "-q", "-am", "two"]);
        let (output, mut receiver) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move { while receiver.recv().await.is_some() {} });
        let workspace = tempfile::tempdir().unwrap();
        let url = format!("file://{}", origin.path().display());
        let head = checkout(&url, &first[..10], workspace.path(), &["file".to_string()], &output).await.unwrap();
        assert_eq!(head, first);
        assert_eq!(std::fs::read_to_string(workspace.path().join("file.txt")).unwrap(), "one");

        // A full SHA is fetched alone; the workspace is an ordinary repository to git.
        let second = git_in(origin.path(), &["rev-parse", "HEAD"]);
        let workspace = tempfile::tempdir().unwrap();
        let head = checkout(&url, &second, workspace.path(), &["file".to_string()], &output).await.unwrap();
        assert_eq!(head, second);
        assert_eq!(std::fs::read_to_string(workspace.path().join("file.txt")).unwrap(), "two");
        let in_workspace = |args: &[&str]| git_in(workspace.path(), args);
        assert_eq!(in_workspace(&["rev-parse", "HEAD"]), second);
        assert_eq!(in_workspace(&["remote", "get-url", "origin"]), url);
        assert_eq!(in_workspace(&["status", "--porcelain"]), "");
        let committed: i64 = git_in(origin.path(), &["show", "-s", "--format=%ct", "HEAD"]).parse().unwrap();
        assert_eq!(commit_time(workspace.path()).await, Some(committed * 1000));
        assert_eq!(commit_time(tempfile::tempdir().unwrap().path()).await, None);
    }

    #[tokio::test]
    async fn checks_out_what_a_pull_requests_merge_ref_points_to() {
        // A real repository laid out like GitHub's: the pull request's branch, and the provider's
        // trial merge of it into main under refs/pull/7/merge, which no branch contains.
        let origin = tempfile::tempdir().unwrap();
        let git_in_origin = |args: &[&str]| git_in(origin.path(), args);
        git_in_origin(&["init", "-q", "-b", "main"]);
        std::fs::write(origin.path().join("main.txt"), "main").unwrap();
        git_in_origin(&["add", "."]);
        git_in_origin(&["commit", "-q", "-m", "main"]);
        git_in_origin(&["checkout", "-q", "-b", "feature"]);
        std::fs::write(origin.path().join("feature.txt"), "feature").unwrap();
        git_in_origin(&["add", "."]);
        git_in_origin(&["commit", "-q", "-m", "feature"]);
        let pull_request_head = git_in_origin(&["rev-parse", "HEAD"]);
        git_in_origin(&["checkout", "-q", "main"]);
        std::fs::write(origin.path().join("main.txt"), "main, moved on").unwrap();
        git_in_origin(&["commit", "-q", "-am", "main moves on"]);
        git_in_origin(&["merge", "-q", "--no-ff", "-m", "Merge feature into main", "feature"]);
        let merge = git_in_origin(&["rev-parse", "HEAD"]);
        git_in_origin(&["update-ref", "refs/pull/7/merge", &merge]);
        git_in_origin(&["update-ref", "refs/pull/7/head", &pull_request_head]);
        git_in_origin(&["reset", "-q", "--hard", "HEAD~1"]);
        assert_ne!(git_in_origin(&["rev-parse", "main"]), merge, "the merge is on no branch");

        let (output, mut receiver) = tokio::sync::mpsc::channel(64);
        let log = tokio::spawn(async move {
            let mut log = Vec::new();
            while let Some(chunk) = receiver.recv().await {
                log.extend(chunk);
            }
            String::from_utf8(log).unwrap()
        });
        let workspace = tempfile::tempdir().unwrap();
        let url = format!("file://{}", origin.path().display());
        let protocols = vec!["file".to_string()];
        let head = checkout_ref(&url, "refs/pull/7/merge", &pull_request_head, workspace.path(), &protocols, &output).await.unwrap();
        assert_eq!(head, merge, "the build runs on the merge, not on the pull request's head");
        assert_eq!(std::fs::read_to_string(workspace.path().join("main.txt")).unwrap(), "main, moved on");
        assert_eq!(std::fs::read_to_string(workspace.path().join("feature.txt")).unwrap(), "feature");

        // A ref that does not exist fails the job; a ref that is not one is refused before git runs.
        let missing =
            checkout_ref(&url, "refs/pull/8/merge", &pull_request_head, tempfile::tempdir().unwrap().path(), &protocols, &output).await;
        assert!(matches!(missing, Err(CheckoutError::Job(message)) if message.contains("cannot fetch refs/pull/8/merge")));
        for bad in ["main", "refs/pull/7/merge:refs/heads/x", "refs/../x", "--upload-pack=x", "refs/pull/7 merge"] {
            let refused = checkout_ref(&url, bad, &pull_request_head, tempfile::tempdir().unwrap().path(), &protocols, &output).await;
            assert!(matches!(refused, Err(CheckoutError::Job(message)) if message.contains("not a ref name")), "{bad}");
        }
        drop(output);
        let log = log.await.unwrap();
        assert!(log.contains(&format!("refs/pull/7/merge resolved to commit {merge} (head commit {pull_request_head})")), "{log}");
    }

    #[test]
    fn the_written_repository_reads_back_its_origin_exactly() {
        let workspace = tempfile::tempdir().unwrap();
        let url = r#"https://example.com/a "quoted" \path; # not a comment"#;
        write_empty_repository(workspace.path(), url).unwrap();
        let output = std::process::Command::new("git")
            .args(["config", "--get", "remote.origin.url"])
            .current_dir(workspace.path())
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(String::from_utf8(output.stdout).unwrap().trim_end_matches('\n'), url);
    }
}
