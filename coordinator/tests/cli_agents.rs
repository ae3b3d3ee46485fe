//! `davit agents ...` and `davit jobs` against a real `davit up`, with a real `davit-agent`
//! process: a token made with the CLI registers an agent with exactly the command line the CLI
//! prints, the agent shows up online, drains and exits by itself; bad and revoked tokens are
//! refused with a clear message; API errors exit 1 and usage errors 2.
//!
//! `davit-agent` is a binary of another package, so Cargo does not build it for this test: run
//! `cargo build -p davit-agent` (same target directory) first.

#[allow(dead_code)]
mod single_node;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use single_node::{SingleNode, expect_status};

const AGENT_NAME: &str = "cli-test-agent";

/// The output of one command, for assertions and failure messages.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn from(output: Output) -> Ran {
        Ran {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn describe(&self) -> String {
        format!("exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}", self.code, self.stdout, self.stderr)
    }

    #[track_caller]
    fn success(self, what: &str) -> Ran {
        assert_eq!(self.code, 0, "{what} failed: {}", self.describe());
        self
    }

    #[track_caller]
    fn json(&self, what: &str) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|error| panic!("{what}: output is not JSON ({error}): {}", self.describe()))
    }
}

/// `davit <args> --server <node> --token <admin token>`.
fn davit(node: &SingleNode, args: &[&str]) -> Ran {
    davit_as(node, &node.admin_token, args)
}

/// `davit <args> --server <node> --token <token>`.
fn davit_as(node: &SingleNode, token: &str, args: &[&str]) -> Ran {
    let output = Command::new(env!("CARGO_BIN_EXE_davit"))
        .args(args)
        .arg("--server")
        .arg(node.base_url())
        .arg("--token")
        .arg(token)
        .env_remove("DAVIT_SERVER")
        .env_remove("DAVIT_TOKEN")
        .env_remove("DAVIT_USERNAME")
        .env_remove("DAVIT_PASSWORD")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run davit");
    Ran::from(output)
}

fn agent_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_davit")).with_file_name("davit-agent");
    assert!(
        path.exists(),
        "{} does not exist: this test runs the real agent binary, which Cargo builds only for its own package; \
         run `cargo build -p davit-agent` (with the same CARGO_TARGET_DIR) before `cargo test -p davit-coordinator --test cli_agents`",
        path.display()
    );
    path
}

fn davit_agent(args: &[&str]) -> Ran {
    let output = Command::new(agent_binary())
        .args(args)
        .env_remove("DAVIT_AGENT_CONFIG")
        .env_remove("DAVIT_AGENT_STATE_DIR")
        .env_remove("DAVIT_REGISTRATION_TOKEN")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run davit-agent");
    Ran::from(output)
}

/// A `davit-agent run` in the background; killed if the test ends while it still runs.
struct RunningAgent {
    child: Option<Child>,
    log: PathBuf,
}

impl RunningAgent {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for the process to exit on its own; its exit status and how long it took.
    fn wait_for_exit(&mut self, timeout: Duration) -> (std::process::ExitStatus, Duration) {
        let child = self.child.as_mut().expect("the agent runs");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("poll the agent") {
                self.child = None;
                return (status, started.elapsed());
            }
            assert!(started.elapsed() < timeout, "the agent did not exit within {timeout:?} after drain; its log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- davit-agent log ({}) -----\n{}", self.log.display(), self.log());
        }
    }
}

fn find_agent<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["items"].as_array().expect("items").iter().find(|agent| agent["name"] == name)
}

/// The registration token and the `davit-agent register ...` arguments from `token create`'s output.
fn printed_registration(output: &Ran) -> (String, Vec<String>) {
    let line = output
        .stdout
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("davit-agent register "))
        .unwrap_or_else(|| panic!("token create printed no `davit-agent register` line: {}", output.describe()));
    let words: Vec<String> = line.split_whitespace().skip(1).map(str::to_string).collect();
    let token = words
        .iter()
        .position(|word| word == "--token")
        .and_then(|index| words.get(index + 1))
        .unwrap_or_else(|| panic!("no --token in {line:?}"))
        .clone();
    assert!(token.starts_with("drt_"), "{token}");
    assert!(output.stdout.lines().any(|line| line.trim() == token), "the token is shown on its own line: {}", output.describe());
    (token, words)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_tokens_through_the_cli_with_a_real_agent() {
    let agent_binary = agent_binary();
    let node = SingleNode::start("cli-agents").await;
    let state = tempfile::tempdir().expect("a state directory");
    let state_dir = state.path().join("agent");
    let state_dir_text = state_dir.to_str().expect("a UTF-8 path").to_string();

    // A token; the printed command line names the gRPC address (HTTP port + 1 in the harness).
    let created =
        davit(&node, &["agents", "token", "create", "--description", "cli test fleet", "--expires-in", "1h"]).success("token create");
    let (token, register_args) = printed_registration(&created);
    let grpc_address = node.http_addr().replace(":7710", ":7711");
    assert_eq!(register_args[..3], ["register", "--coordinator", grpc_address.as_str()], "{}", created.describe());

    // A wrong token is refused, clearly, and leaves no credential behind.
    let refused_dir = state.path().join("refused");
    let refused = davit_agent(&[
        "register",
        "--coordinator",
        &grpc_address,
        "--token",
        "drt_not-a-real-token",
        "--state-dir",
        refused_dir.to_str().unwrap(),
        "--name",
        "nope",
    ]);
    assert_ne!(refused.code, 0, "a bad token must fail: {}", refused.describe());
    assert!(refused.stderr.contains("registration token is not valid"), "{}", refused.describe());
    assert!(!refused_dir.join("agent.json").exists());

    // Register with exactly the printed command line.
    let mut args: Vec<&str> = register_args.iter().map(String::as_str).collect();
    args.extend(["--state-dir", &state_dir_text, "--name", AGENT_NAME]);
    davit_agent(&args).success("davit-agent register with the printed command line");
    let credential = state_dir.join("agent.json");
    let mode = std::fs::metadata(&credential).unwrap_or_else(|error| panic!("{}: {error}", credential.display())).permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the credential file is private");

    // Run it, and wait until the CLI shows it online.
    let log = state.path().join("agent.log");
    let log_file = std::fs::File::create(&log).expect("create the agent log");
    let child = Command::new(&agent_binary)
        .args(["--state-dir", &state_dir_text, "--coordinator", &grpc_address, "run", "--executor", "shell"])
        .env_remove("DAVIT_AGENT_CONFIG")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file.try_clone().expect("clone the log handle")))
        .stderr(Stdio::from(log_file))
        .spawn()
        .expect("start davit-agent run");
    let mut agent = RunningAgent { child: Some(child), log };
    let deadline = Instant::now() + Duration::from_secs(30);
    let online = loop {
        let list = davit(&node, &["agents", "list", "--json"]).success("agents list --json").json("agents list --json");
        if let Some(found) = find_agent(&list, AGENT_NAME).filter(|agent| agent["state"] == "online") {
            break found.clone();
        }
        assert!(Instant::now() < deadline, "the agent did not come online within 30 s; last list: {list}\nagent log:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(250));
    };
    let agent_id = online["agent_id"].as_u64().expect("agent_id");
    assert_eq!(online["executors"], json!(["shell"]));
    assert_eq!(online["labels"]["pool"], "build");

    // The table: the header and a row for our agent.
    let table = davit(&node, &["agents", "list"]).success("agents list");
    let mut lines = table.stdout.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(header, ["ID", "NAME", "STATE", "POOL", "REGION", "EXECUTORS", "JOBS", "CONNECTED"]);
    let row = lines
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|row| row.get(1) == Some(&AGENT_NAME))
        .unwrap_or_else(|| panic!("no row for {AGENT_NAME}: {}", table.describe()));
    assert_eq!(row[..7], [agent_id.to_string().as_str(), AGENT_NAME, "online", "build", "-", "shell", "0/2"], "{}", table.stdout);
    // `davit agents` alone lists too.
    let bare = davit(&node, &["agents", "--json"]).success("agents --json").json("agents --json");
    assert!(find_agent(&bare, AGENT_NAME).is_some(), "{bare}");

    let shown = davit(&node, &["agents", "show", &agent_id.to_string()]).success("agents show");
    assert!(shown.stdout.starts_with(&format!("Agent {agent_id} ({AGENT_NAME})")), "{}", shown.stdout);
    assert!(shown.stdout.contains("pool=build"), "{}", shown.stdout);
    let shown = davit(&node, &["agents", "show", &agent_id.to_string(), "--json"]).success("agents show --json").json("agents show");
    assert_eq!(shown["name"], AGENT_NAME);

    // Drain: the agent finishes (it has no jobs) and exits 0 by itself.
    let drained = davit_agent(&["--state-dir", &state_dir_text, "drain"]).success("davit-agent drain");
    assert!(drained.stdout.contains("drain"), "{}", drained.describe());
    let (status, took) = agent.wait_for_exit(Duration::from_secs(20));
    assert!(status.success(), "the drained agent exited with {status}; its log:\n{}", agent.log());
    eprintln!("the drained agent exited after {took:?}");
    let list = davit(&node, &["agents", "list", "--json"]).success("agents list after drain").json("agents list");
    assert!(find_agent(&list, AGENT_NAME).is_some(), "the drained agent is still registered: {list}");

    // Tokens: listed (used once), revoked, then refused.
    let tokens = davit(&node, &["agents", "token", "list", "--json"]).success("token list --json").json("token list");
    let listed = tokens["items"]
        .as_array()
        .expect("items")
        .iter()
        .find(|item| item["description"] == "cli test fleet")
        .unwrap_or_else(|| panic!("the token is not listed: {tokens}"))
        .clone();
    assert_eq!(listed["revoked"], false);
    assert_eq!(listed["agents_registered"], 1);
    assert!(!tokens.to_string().contains(&token), "a token is never shown again");
    let token_id = listed["token_id"].as_u64().expect("token_id").to_string();
    let table = davit(&node, &["agents", "token", "list"]).success("token list");
    assert!(table.stdout.lines().any(|line| line.starts_with(&token_id) && line.contains("active")), "{}", table.stdout);
    let revoked = davit(&node, &["agents", "token", "revoke", &token_id]).success("token revoke");
    assert!(revoked.stdout.contains(&format!("Revoked registration token {token_id}")), "{}", revoked.describe());
    let table = davit(&node, &["agents", "token", "list"]).success("token list");
    assert!(table.stdout.lines().any(|line| line.starts_with(&token_id) && line.contains("revoked")), "{}", table.stdout);
    let again_dir = state.path().join("again");
    let mut args: Vec<&str> = register_args.iter().map(String::as_str).collect();
    args.extend(["--state-dir", again_dir.to_str().unwrap(), "--name", "second"]);
    let refused = davit_agent(&args);
    assert_ne!(refused.code, 0, "a revoked token must fail: {}", refused.describe());
    assert!(refused.stderr.contains("expired or was revoked"), "{}", refused.describe());
    assert!(!again_dir.join("agent.json").exists());

    // API errors exit 1 with the server's message and code; usage errors exit 2.
    let missing = davit(&node, &["agents", "show", "999999"]);
    assert_eq!(missing.code, 1, "{}", missing.describe());
    assert!(missing.stderr.contains("agent 999999 not found") && missing.stderr.contains("not_found"), "{}", missing.describe());
    let missing = davit(&node, &["agents", "token", "revoke", "999999"]);
    assert_eq!(missing.code, 1, "{}", missing.describe());
    let usage = davit(&node, &["agents", "show", "not-a-number"]);
    assert_eq!(usage.code, 2, "{}", usage.describe());
    let usage = davit(&node, &["agents", "token", "create", "--expires-in", "soon"]);
    assert_eq!(usage.code, 2, "{}", usage.describe());
    let too_short = davit(&node, &["agents", "token", "create", "--expires-in", "10s"]);
    assert_eq!(too_short.code, 2, "{}", too_short.describe());
    assert!(too_short.stderr.contains("between 1m and 365d"), "{}", too_short.describe());
    let (_, viewer_token) = node.create_user("viewer", "viewer-password-1", "viewer").await;
    let forbidden = davit_as(&node, &viewer_token, &["agents", "token", "create"]);
    assert_eq!(forbidden.code, 1, "{}", forbidden.describe());
    assert!(forbidden.stderr.contains("403") && forbidden.stderr.contains("(code forbidden)"), "{}", forbidden.describe());
    let viewer_list = davit_as(&node, &viewer_token, &["agents", "list", "--json"]).success("agents list as a viewer").json("agents list");
    assert!(find_agent(&viewer_list, AGENT_NAME).is_some(), "{viewer_list}");
    let unauthorized = davit_as(&node, "not-a-valid-token", &["agents", "list"]);
    assert_eq!(unauthorized.code, 1, "{}", unauthorized.describe());
    assert!(unauthorized.stderr.contains("401"), "{}", unauthorized.describe());

    // Deregister: gone from the list.
    davit(&node, &["agents", "deregister", &agent_id.to_string()]).success("agents deregister");
    let list = davit(&node, &["agents", "list", "--json"]).success("agents list after deregister").json("agents list");
    assert!(find_agent(&list, AGENT_NAME).is_none(), "a deregistered agent is not listed: {list}");

    // `davit jobs`: a deployment's build job with its steps.
    let repo = node
        .post(
            "/api/v1/repos/connect",
            &node.admin_token,
            &json!({"repo_url": "https://example.invalid/org/app.git", "branch": "main", "scm_type": "github"}),
        )
        .await;
    expect_status(&repo, 201, "connect a repository");
    let pipeline = node
        .post(
            "/api/v1/pipelines",
            &node.admin_token,
            &json!({"name": "app", "repo_id": repo.json["repo_id"], "build_command": "make", "deploy_strategy": "rolling"}),
        )
        .await;
    expect_status(&pipeline, 201, "create a pipeline");
    let deployment = node
        .post(
            "/api/v1/deployments",
            &node.admin_token,
            &json!({"pipeline_id": pipeline.json["pipeline_id"], "commit_hash": "abc123def", "environment": "staging"}),
        )
        .await;
    expect_status(&deployment, 201, "trigger a deployment");
    let deployment_id = deployment.json["deployment_id"].as_u64().expect("deployment_id").to_string();
    let jobs = davit(&node, &["jobs", &deployment_id, "--json"]).success("jobs --json").json("jobs --json");
    let items = jobs["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{jobs}");
    assert_eq!(items[0]["name"], "build");
    let steps: Vec<&str> = items[0]["steps"].as_array().expect("steps").iter().map(|step| step["name"].as_str().unwrap()).collect();
    assert_eq!(steps, ["checkout", "build"], "{jobs}");
    let table = davit(&node, &["jobs", &deployment_id]).success("jobs");
    assert!(table.stdout.starts_with(&format!("Job {} ", items[0]["job_id"])), "{}", table.stdout);
    let header = table.stdout.lines().find(|line| line.trim_start().starts_with("STEP")).unwrap_or_else(|| panic!("{}", table.stdout));
    assert_eq!(header.split_whitespace().collect::<Vec<_>>(), ["STEP", "NAME", "STATE", "DURATION", "EXIT"]);
    assert!(table.stdout.lines().any(|line| line.split_whitespace().nth(1) == Some("checkout")), "{}", table.stdout);
    let missing = davit(&node, &["jobs", "999999"]);
    assert_eq!(missing.code, 1, "{}", missing.describe());
    assert!(missing.stderr.contains("deployment 999999 not found"), "{}", missing.describe());
}
