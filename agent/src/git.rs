//! Checking out the exact commit of a job with the real `git`, restricted to the protocols the
//! operator allows (`GIT_ALLOW_PROTOCOL`), never prompting for credentials.

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

/// Clone `url` into the empty directory `workspace` at `commit` (full or abbreviated SHA).
pub async fn checkout(
    url: &str,
    commit: &str,
    workspace: &Path,
    protocols: &[String],
    output: &OutputSender,
) -> Result<String, CheckoutError> {
    let scheme = scheme_of(url);
    if !protocols.iter().any(|allowed| allowed == scheme) {
        return Err(CheckoutError::Job(format!(
            "repository URL {url} uses {scheme}, which this agent does not fetch from (allowed: {}); set git_protocols in the agent config",
            protocols.join(", ")
        )));
    }
    if commit.is_empty() || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CheckoutError::Job(format!("commit {commit:?} is not a hexadecimal SHA")));
    }
    let allowed = protocols.join(":");
    std::fs::create_dir_all(workspace).map_err(|e| CheckoutError::Infrastructure(format!("cannot create the workspace: {e}")))?;
    for arguments in [vec!["init", "-q"], vec!["remote", "add", "origin", url]] {
        if !git(workspace, &arguments, &allowed, output).await? {
            return Err(CheckoutError::Infrastructure(format!("git {} failed in the workspace", arguments.join(" "))));
        }
    }
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
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(workspace)
        .output()
        .await
        .map_err(|e| CheckoutError::Infrastructure(format!("git rev-parse: {e}")))?;
    Ok(String::from_utf8_lossy(&head.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let status = std::process::Command::new("git")
                .args(args)
                .current_dir(origin.path())
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@example.com")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@example.com")
                .status()
                .unwrap();
            assert!(status.success());
        };
        run(&["init", "-q", "-b", "main"]);
        std::fs::write(origin.path().join("file.txt"), "one").unwrap();
        run(&["add", "."]);
        run(&["commit", "-q", "-m", "one"]);
        let first = String::from_utf8(
            std::process::Command::new("git").args(["rev-parse", "HEAD"]).current_dir(origin.path()).output().unwrap().stdout,
        )
        .unwrap()
        .trim()
        .to_string();
        std::fs::write(origin.path().join("file.txt"), "two").unwrap();
        run(&["commit", "-q", "-am", "two"]);
        let (output, mut receiver) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move { while receiver.recv().await.is_some() {} });
        let workspace = tempfile::tempdir().unwrap();
        let url = format!("file://{}", origin.path().display());
        let head = checkout(&url, &first[..10], workspace.path(), &["file".to_string()], &output).await.unwrap();
        assert_eq!(head, first);
        assert_eq!(std::fs::read_to_string(workspace.path().join("file.txt")).unwrap(), "one");
    }
}
