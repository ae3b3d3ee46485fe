//! The everyday `davit` commands against a real `davit up` (embedded agent, shell executor)
//! building from a repository served by a real `git daemon`, each run as the built binary in a
//! subprocess with its own config directory: `login` writes a 0600 file that the later commands
//! use; `pipelines`, `runs`, `run`, `deploy --set --follow`, `logs --level`, `artifacts
//! ls/pull/push`, `config get/set`, `agents` and `cluster status` in human and `--json` form;
//! `completions`; the exit statuses (0, 1 API refusal, 2 usage or no login, 3 failed, 5
//! unreachable) and their messages.

#[allow(dead_code)]
mod git_server;
#[allow(dead_code)]
mod single_node;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use git_server::GitServer;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use single_node::{ADMIN_USERNAME, SingleNode, expect_status};

/// The output of one command, for assertions and failure messages.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn describe(&self) -> String {
        format!("exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.code, self.stdout, self.stderr)
    }

    #[track_caller]
    fn success(self, what: &str) -> Ran {
        assert_eq!(self.code, 0, "{what} failed: {}", self.describe());
        self
    }

    #[track_caller]
    fn exits(self, code: i32, what: &str) -> Ran {
        assert_eq!(self.code, code, "{what}: {}", self.describe());
        self
    }

    #[track_caller]
    fn json(&self, what: &str) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|error| panic!("{what}: output is not JSON ({error}): {}", self.describe()))
    }
}

/// A user of the CLI: their own config directory and no davit variables from the test's
/// environment, so only what the test gives (flags, the saved login) counts.
struct User {
    config_dir: tempfile::TempDir,
}

impl User {
    fn new() -> User {
        User { config_dir: tempfile::Builder::new().prefix("davit-cli-config-").tempdir().expect("a config directory") }
    }

    fn credentials(&self) -> PathBuf {
        self.config_dir.path().join("davit").join("credentials.json")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_davit"));
        command.args(args).env("DAVIT_CONFIG_DIR", self.config_dir.path().join("davit")).env("NO_COLOR", "1").stdin(Stdio::null());
        for name in ["DAVIT_URL", "DAVIT_SERVER", "DAVIT_TOKEN", "DAVIT_USERNAME", "DAVIT_PASSWORD", "DAVIT_CA_FILE"] {
            command.env_remove(name);
        }
        command
    }

    fn davit(&self, args: &[&str]) -> Ran {
        let output = self.command(args).output().expect("run davit");
        Ran {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Run with `input` on standard input.
    fn davit_with_input(&self, args: &[&str], input: &str) -> Ran {
        let mut child = self.command(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run davit");
        child.stdin.take().expect("stdin").write_all(input.as_bytes()).expect("write stdin");
        let output = child.wait_with_output().expect("wait for davit");
        Ran {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

async fn pipeline(node: &SingleNode, body: Value) -> u64 {
    let created = node.post("/api/v1/pipelines", &node.admin_token, &body).await;
    expect_status(&created, 201, "create a pipeline");
    created.json["pipeline_id"].as_u64().expect("pipeline id")
}

/// The deployment id in `Deployment 12 of commit ...`.
fn deployment_id_in(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("Deployment ")?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no deployment id in: {stdout}"))
}

/// The id of the first deployment to `environment`, once there is one.
async fn wait_for_a_deployment(node: &SingleNode, environment: &str) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let list = node.get(&format!("/api/v1/deployments?environment={environment}"), &node.admin_token).await;
        if let Some(id) = list.json["items"][0]["deployment_id"].as_u64() {
            return id;
        }
        assert!(std::time::Instant::now() < deadline, "no deployment to {environment} appeared: {}", list.text());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn sha256_of(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read the download");
    Sha256::digest(&bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_everyday_commands_work_against_a_real_node() {
    let (git_server, commit) = GitServer::start_with(
        "cli",
        &[("build.sh", "#!/bin/sh\necho building the widget\nmkdir -p dist\necho widget > dist/widget.txt\n")],
    );
    let node = SingleNode::start_with("cli", &["--agent-executor", "shell"]).await;
    let url = node.base_url();
    let user = User::new();

    // Not logged in: every API command says to log in, exit 2, nothing sent.
    let no_login = user.davit(&["pipelines", "--url", &url]).exits(2, "pipelines before login");
    assert!(no_login.stderr.contains("davit login"), "{}", no_login.describe());
    // No server there: exit 5, whatever the token.
    let unreachable = user.davit(&["pipelines", "--url", "http://127.0.0.1:9", "--token", "x"]).exits(5, "an unreachable server");
    assert!(unreachable.stderr.contains("cannot reach http://127.0.0.1:9"), "{}", unreachable.describe());

    // A wrong password is the API's refusal (exit 1) and saves nothing.
    let refused = user.davit_with_input(&["login", "--url", &url, "--username", ADMIN_USERNAME, "--password-stdin"], "wrong-password\n");
    assert_eq!(refused.code, 1, "{}", refused.describe());
    assert!(refused.stderr.contains("wrong username or password"), "{}", refused.describe());
    assert!(!user.credentials().exists());

    // Login saves the token in a 0600 file in a 0700 directory.
    let password_line = format!("{}\n", node.admin_password);
    let login = user
        .davit_with_input(&["login", "--url", &format!("{url}/"), "--username", ADMIN_USERNAME, "--password-stdin"], &password_line)
        .success("login");
    assert!(login.stdout.contains(&format!("Logged in to {url} as admin")), "{}", login.describe());
    let mode = |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&user.credentials()), 0o600);
    assert_eq!(mode(user.credentials().parent().unwrap()), 0o700);
    let saved: Value = serde_json::from_slice(&std::fs::read(user.credentials()).unwrap()).unwrap();
    assert_eq!(saved["url"], url.as_str());
    assert_eq!(saved["username"], ADMIN_USERNAME);
    assert!(saved["token"].as_str().is_some_and(|token| !token.is_empty()), "{saved}");
    // The saved token is for that server only.
    let elsewhere = user.davit(&["pipelines", "--url", "http://127.0.0.1:9"]).exits(2, "another server with the saved login");
    assert!(elsewhere.stderr.contains(&format!("you are logged in to {url}")), "{}", elsewhere.describe());

    // Pipelines, from here on with the saved login only.
    let repo = node
        .post(
            "/api/v1/repos/connect",
            &node.admin_token,
            &json!({"repo_url": git_server.url(), "branch": "main", "scm_type": "git", "poll_interval_seconds": 0}),
        )
        .await;
    expect_status(&repo, 201, "connect the repository");
    let repo_id = repo.json["repo_id"].as_u64().expect("repo id");
    let builds = pipeline(
        &node,
        json!({"name": "widget", "repo_id": repo_id, "branch": "main", "build_command": "sh build.sh",
               "deploy_strategy": "rolling", "environment": "development", "build": {"artifacts": ["dist"]}}),
    )
    .await;
    let breaks = pipeline(
        &node,
        json!({"name": "breaks", "repo_id": repo_id, "branch": "main", "deploy_strategy": "rolling", "environment": "development",
               "build_command": "echo building; echo 'error: the widget broke'; exit 1"}),
    )
    .await;
    let table = user.davit(&["pipelines"]).success("pipelines");
    let header = table.stdout.lines().next().unwrap_or_default();
    assert!(header.starts_with("ID") && header.contains("NAME") && header.contains("ENVIRONMENT"), "{}", table.describe());
    assert!(table.stdout.lines().any(|line| line.starts_with(&builds.to_string()) && line.contains("widget")), "{}", table.describe());
    let listed = user.davit(&["pipelines", "--json"]).success("pipelines --json").json("pipelines --json");
    let names: Vec<&str> = listed["items"].as_array().unwrap().iter().map(|pipeline| pipeline["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["widget", "breaks"], "{listed}");

    // Bad input says what to fix.
    let unknown = user.davit(&["run", "no-such-pipeline"]).exits(1, "an unknown pipeline");
    assert!(
        unknown.stderr.contains("no pipeline is named \"no-such-pipeline\"") && unknown.stderr.contains("widget"),
        "{}",
        unknown.describe()
    );
    let bad_set = user.davit(&["deploy", "widget", "--set", "replicas"]).exits(2, "a --set without '='");
    assert!(bad_set.stderr.contains("--set replicas=3"), "{}", bad_set.describe());
    let missing = user.davit(&["deploy", "4242", "--commit", &commit]).exits(1, "an unknown pipeline id");
    assert!(missing.stderr.contains("pipeline 4242 not found"), "{}", missing.describe());

    // A run of the pipeline's own branch, by name, followed: exit 0.
    let run = user.davit(&["run", "widget", "--follow"]).success("run --follow");
    let first_run = deployment_id_in(&run.stdout);
    assert!(run.stdout.trim_end().ends_with("succeeded."), "{}", run.describe());
    // A deploy with overrides, followed: exit 0, the overrides recorded.
    let deploy = user
        .davit(&["deploy", "widget", "--env", "development", "--commit", &commit, "--set", "replicas=3", "--set", "mode=a=b", "--follow"])
        .success("deploy --set --follow");
    let deployed = deployment_id_in(&deploy.stdout);
    let recorded = node.get(&format!("/api/v1/deployments/{deployed}"), &node.admin_token).await;
    assert_eq!(recorded.json["config_overrides"], json!({"replicas": "3", "mode": "a=b"}), "{}", recorded.text());
    // A build that exits 1, followed through the older --pipeline form: exit 3.
    let failed = user.davit(&["deploy", "--pipeline", "breaks", "--commit", &commit, "--follow"]).exits(3, "a failing deployment");
    let failed_id = deployment_id_in(&failed.stdout);
    assert!(failed.stdout.trim_end().ends_with("failed."), "{}", failed.describe());
    // Without --follow: created, exit 0, the id to follow.
    let queued = user.davit(&["run", &breaks.to_string(), "--commit", &commit]).success("run without --follow");
    assert!(queued.stdout.contains("davit logs"), "{}", queued.describe());

    // Runs: all, one pipeline's, by status, newest N.
    let runs = user.davit(&["runs"]).success("runs");
    for id in [first_run, deployed, failed_id] {
        assert!(runs.stdout.lines().any(|line| line.starts_with(&format!("{id} "))), "run {id} missing: {}", runs.describe());
    }
    let failed_runs = user.davit(&["runs", "--pipeline", "breaks", "--status", "failed", "--json"]).success("runs --json");
    let items = failed_runs.json("runs --json")["items"].as_array().cloned().unwrap();
    assert!(!items.is_empty() && items.iter().all(|run| run["status"] == "failed" && run["pipeline_id"] == breaks), "{items:?}");
    let newest = user.davit(&["runs", "--limit", "1", "--json"]).success("runs --limit 1").json("runs --limit 1");
    assert_eq!(newest["items"].as_array().unwrap().len(), 1, "{newest}");

    // Logs, all levels and only errors; followed to the end of a failed run: exit 3.
    let logs = user.davit(&["logs", &failed_id.to_string()]).success("logs");
    assert!(logs.stdout.contains("building") && logs.stdout.contains("error: the widget broke"), "{}", logs.describe());
    let errors = user.davit(&["logs", &failed_id.to_string(), "--level", "ERROR"]).success("logs --level ERROR");
    assert!(errors.stdout.contains("error: the widget broke"), "{}", errors.describe());
    assert!(errors.stdout.lines().all(|line| line.contains("  ERROR  ")), "only ERROR lines: {}", errors.describe());
    assert!(!errors.stdout.contains("building\n"), "{}", errors.describe());
    let errors_json = user.davit(&["logs", &failed_id.to_string(), "--level", "error", "--json"]).success("logs --json");
    let lines = errors_json.json("logs --json")["lines"].as_array().cloned().unwrap();
    assert!(!lines.is_empty() && lines.iter().all(|line| line["level"] == "ERROR"), "{lines:?}");
    let followed = user.davit(&["logs", &failed_id.to_string(), "-f"]).exits(3, "logs -f of a failed run");
    assert!(followed.stdout.contains("error: the widget broke"), "{}", followed.describe());

    // Artifacts: the build's, listed and pulled with a matching digest.
    let artifacts = user.davit(&["artifacts", "ls", "--pipeline", "widget", "--json"]).success("artifacts ls --json").json("artifacts ls");
    let built =
        artifacts["items"].as_array().and_then(|items| items.first()).cloned().unwrap_or_else(|| panic!("no artifact: {artifacts}"));
    let artifact_id = built["artifact_id"].as_u64().unwrap().to_string();
    let table = user.davit(&["artifacts", "ls"]).success("artifacts ls");
    assert!(table.stdout.lines().any(|line| line.starts_with(&format!("{artifact_id} "))), "{}", table.describe());
    let downloads = tempfile::tempdir().unwrap();
    let pulled = downloads.path().join("built.tar");
    user.davit(&["artifacts", "pull", &artifact_id, "-o", pulled.to_str().unwrap()]).success("artifacts pull");
    assert_eq!(sha256_of(&pulled), built["digest"].as_str().unwrap(), "the pulled bytes are the artifact's");
    let raw = downloads.path().join("built.tar.zst");
    user.davit(&["artifacts", "pull", &artifact_id, "-o", raw.to_str().unwrap(), "--raw"]).success("artifacts pull --raw");
    let unpacked = zstd::decode_all(std::fs::File::open(&raw).unwrap()).expect("the raw form is zstd");
    assert_eq!(unpacked, std::fs::read(&pulled).unwrap());

    // Push a directory: packed as a tar, recorded, and pulled back the same.
    let upload = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(upload.path().join("site/assets")).unwrap();
    std::fs::write(upload.path().join("site/index.html"), "<h1>hello</h1>\n").unwrap();
    std::fs::write(upload.path().join("site/assets/app.js"), "console.log(1)\n").unwrap();
    let pushed = user
        .davit(&["artifacts", "push", "widget", upload.path().join("site").to_str().unwrap(), "--version", "v9.0.0", "--json"])
        .success("artifacts push")
        .json("artifacts push");
    assert_eq!(pushed["version"], "v9.0.0");
    assert_eq!(pushed["pipeline_id"], builds);
    let back = downloads.path().join("pushed.tar");
    user.davit(&["artifacts", "pull", &pushed["artifact_id"].to_string(), "-o", back.to_str().unwrap()]).success("pull the pushed one");
    assert_eq!(sha256_of(&back), pushed["digest"].as_str().unwrap());
    let mut archive = tar::Archive::new(std::fs::File::open(&back).unwrap());
    let names: Vec<String> = archive.entries().unwrap().map(|entry| entry.unwrap().path().unwrap().display().to_string()).collect();
    assert_eq!(names, ["assets", "assets/app.js", "index.html"]);
    let human =
        user.davit(&["artifacts", "push", "widget", upload.path().join("site/index.html").to_str().unwrap(), "--version", "v9.0.1"]);
    assert!(human.success("push a file").stdout.contains("Uploaded"));
    let nothing = user.davit(&["artifacts", "push", "widget", "/no/such/path", "--version", "v1"]).exits(2, "push of a missing path");
    assert!(nothing.stderr.contains("/no/such/path"), "{}", nothing.describe());

    // Configuration: set, then get in both forms; secrets masked.
    let set = user.davit(&["config", "set", "development", "api_url=https://api.example.com", "db_password=hunter2"]).success("config set");
    assert!(set.stdout.contains("Set 2 variables in development (db_password stored as secrets)"), "{}", set.describe());
    let got = user.davit(&["config", "get", "development"]).success("config get");
    assert!(got.stdout.lines().any(|line| line.starts_with("api_url") && line.contains("https://api.example.com")), "{}", got.describe());
    assert!(got.stdout.lines().any(|line| line.starts_with("db_password") && line.contains("***")), "{}", got.describe());
    assert!(!got.stdout.contains("hunter2"));
    let got = user.davit(&["config", "get", "development", "--json"]).success("config get --json").json("config get");
    assert_eq!(got["variables"]["api_url"]["value"], "https://api.example.com");
    assert_eq!(got["variables"]["db_password"]["value"], "***");
    // Every set is a new version of the key.
    user.davit(&["config", "set", "development", "api_url=https://api2.example.com"]).success("config set again");
    let got = user.davit(&["config", "get", "development", "--json"]).success("config get --json").json("config get");
    assert_eq!((&got["variables"]["api_url"]["version"], &got["variables"]["db_password"]["version"]), (&json!(2), &json!(1)));
    user.davit(&["config", "set", "development", "novalue"]).exits(2, "config set without '='");

    // Agents and the cluster, both forms.
    let agents = user.davit(&["agents"]).success("agents");
    assert!(agents.stdout.lines().any(|line| line.contains("embedded") && line.contains("online")), "{}", agents.describe());
    let agents = user.davit(&["--json", "agents"]).success("--json agents").json("agents");
    assert_eq!(agents["items"][0]["name"], "embedded");
    let status = user.davit(&["cluster", "status"]).success("cluster status");
    assert!(status.stdout.contains("leader node 1"), "{}", status.describe());
    assert!(status.stdout.lines().any(|line| line.starts_with("1 ") && line.contains("leader")), "{}", status.describe());
    let status = user.davit(&["cluster", "status", "--json"]).success("cluster status --json").json("cluster status");
    assert_eq!(status["leader_id"], 1);

    // Rollback of the newest good deployment: nothing earlier of another commit, refused (exit 1).
    let nothing = user.davit(&["rollback", &deployed.to_string()]).exits(1, "a rollback with nothing to go back to");
    assert!(nothing.stderr.contains("nothing_to_roll_back_to"), "{}", nothing.describe());
    // A pipeline that rolls out to testing, protected by one approval: `deploy --follow` waits
    // for the approval given meanwhile, then the rollout fails for lack of deploy agents (the
    // embedded agent only builds): exit 3, with the reason.
    pipeline(
        &node,
        json!({"name": "web", "repo_id": repo_id, "branch": "main", "build_command": "sh build.sh", "deploy_strategy": "rolling",
               "environment": "testing", "build": {"artifacts": ["dist"]}, "deploy": {"public_port": 18089}}),
    )
    .await;
    let protect = node.put("/api/v1/environments/testing", &node.admin_token, &json!({"required_approvals": 1})).await;
    expect_status(&protect, 200, "protect testing");
    let following = user
        .command(&["deploy", "web", "--env", "testing", "--commit", &commit, "--follow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start deploy --follow");
    let waiting_id = wait_for_a_deployment(&node, "testing").await.to_string();
    let approved = user.davit(&["approve", &waiting_id]).success("approve");
    assert!(approved.stdout.contains(&format!("Approved deployment {waiting_id} to testing (1 of 1 approvals")), "{}", approved.describe());
    let twice = user.davit(&["approve", &waiting_id, "--json"]).exits(1, "approving twice");
    assert!(twice.stderr.contains(&waiting_id), "{}", twice.describe());
    let output = following.wait_with_output().expect("wait for deploy --follow");
    let rolled_out = Ran {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
    .exits(3, "a rollout without deploy agents");
    assert!(
        rolled_out.stdout.contains("approval_required") && rolled_out.stdout.contains("no online deploy agent"),
        "{}",
        rolled_out.describe()
    );
    let not_waiting = user.davit(&["approve", &deployed.to_string()]).exits(1, "approving what needs no approval");
    assert!(not_waiting.stderr.contains("does not wait for approvals"), "{}", not_waiting.describe());

    // Logout: the server refuses the token from then on, the file is gone, and commands ask for
    // a login again.
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(user.credentials()).unwrap()).unwrap();
    let saved_token = saved["token"].as_str().unwrap().to_string();
    let logged_out = user.davit(&["logout"]).success("logout");
    assert!(logged_out.stdout.contains("no longer accepts the token"), "{}", logged_out.describe());
    assert!(!user.credentials().exists());
    let copy = user.davit(&["pipelines", "--url", &url, "--token", &saved_token]).exits(1, "pipelines with the logged-out token");
    assert!(copy.stderr.contains("logout"), "{}", copy.describe());
    let again = user.davit(&["pipelines", "--url", &url]).exits(2, "pipelines after logout");
    assert!(again.stderr.contains("davit login"), "{}", again.describe());
    // An explicit token still works without a login.
    user.davit(&["pipelines", "--url", &url, "--token", &node.admin_token]).success("pipelines with --token");
}

#[test]
fn completions_are_scripts_for_each_shell() {
    let user = User::new();
    for (shell, marker) in [("bash", "complete -F _davit"), ("zsh", "#compdef davit"), ("fish", "complete -c davit")] {
        let script = user.davit(&["completions", shell]).success(shell);
        assert!(script.stdout.contains(marker), "{shell}: {}", script.describe());
        for command in ["login", "pipelines", "artifacts", "completions"] {
            assert!(script.stdout.contains(command), "{shell} completes {command}");
        }
    }
    let unknown = user.davit(&["completions", "tcsh"]).exits(2, "an unknown shell");
    assert!(unknown.stderr.contains("bash"), "{}", unknown.describe());
}
