//! A real git repository served by `git daemon` on a loopback port, that tests can push new
//! commits to (through its working clone) while a node watches it. The daemon is killed when
//! the `GitServer` is dropped.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct GitServer {
    root: tempfile::TempDir,
    port: u16,
    daemon: Child,
    name: String,
}

pub fn free_port() -> u16 {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).expect("bind a free port").local_addr().expect("address").port()
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Davit Test")
        .env("GIT_AUTHOR_EMAIL", "test@davit.invalid")
        .env("GIT_COMMITTER_NAME", "Davit Test")
        .env("GIT_COMMITTER_EMAIL", "test@davit.invalid")
        .output()
        .expect("run git");
    assert!(output.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

impl GitServer {
    /// Serve a bare repository `name` whose `main` holds one commit with a README; returns the
    /// server and that commit.
    pub fn start(name: &str) -> (GitServer, String) {
        Self::start_with(name, &[("README", "first\n")])
    }

    /// Serve a bare repository `name` whose `main` holds one commit of `files` (path, content).
    pub fn start_with(name: &str, files: &[(&str, &str)]) -> (GitServer, String) {
        let root = tempfile::Builder::new().prefix("davit-git-").tempdir().expect("temp dir");
        let work = root.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        for (path, content) in files {
            let file = work.join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, content).unwrap();
        }
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "first"]);
        let commit = git(&work, &["rev-parse", "HEAD"]);
        let served = root.path().join("served");
        std::fs::create_dir_all(&served).unwrap();
        let bare = served.join(format!("{name}.git"));
        git(root.path(), &["clone", "-q", "--bare", work.to_str().unwrap(), bare.to_str().unwrap()]);
        git(&work, &["remote", "add", "served", bare.to_str().unwrap()]);
        let port = free_port();
        // `git-daemon` itself, not the `git daemon` wrapper: killing the wrapper would leave the
        // daemon it forked running after the test.
        let daemon = Command::new(Path::new(&git(root.path(), &["--exec-path"])).join("git-daemon"))
            .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1", &format!("--port={port}")])
            .arg(format!("--base-path={}", served.display()))
            .arg(&served)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start git daemon");
        let server = GitServer { root, port, daemon, name: name.to_string() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        (server, commit)
    }

    pub fn url(&self) -> String {
        format!("git://127.0.0.1:{}/{}.git", self.port, self.name)
    }

    /// The working clone that commits are made in (its remote `served` is the served repository).
    pub fn work(&self) -> PathBuf {
        self.root.path().join("work")
    }

    /// The served bare repository, for pushing refs that are not branches.
    pub fn bare(&self) -> PathBuf {
        self.root.path().join("served").join(format!("{}.git", self.name))
    }

    /// Commit a change on `branch` (created from the current commit when new) and push it to
    /// the served repository; returns the new commit.
    pub fn push_commit(&self, branch: &str, message: &str) -> String {
        let work = self.work();
        git(&work, &["checkout", "-q", "-B", branch]);
        std::fs::write(work.join("README"), format!("{message}\n")).unwrap();
        git(&work, &["commit", "-q", "-am", message]);
        git(&work, &["push", "-q", "served", &format!("{branch}:refs/heads/{branch}")]);
        git(&work, &["rev-parse", "HEAD"])
    }
}

impl GitServer {
    /// Commit files on `main` (content `None` deletes the file) and push; returns the commit.
    pub fn commit_files(&self, files: &[(&str, Option<&str>)], message: &str) -> String {
        let work = self.work();
        git(&work, &["checkout", "-q", "main"]);
        for (path, content) in files {
            let file = work.join(path);
            match content {
                Some(content) => {
                    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                    std::fs::write(&file, content).unwrap();
                    git(&work, &["add", path]);
                }
                None => {
                    git(&work, &["rm", "-q", path]);
                }
            }
        }
        git(&work, &["commit", "-q", "-m", message]);
        git(&work, &["push", "-q", "served", "main:refs/heads/main"]);
        git(&work, &["rev-parse", "HEAD"])
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}
