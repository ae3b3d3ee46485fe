//! A fleet for end-to-end tests: `davit-agent` processes with their own state directories,
//! the REST calls the tests make, and the Docker readiness check (with the local images).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::single_node::SingleNode;

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub fn peers_required() -> bool {
    std::env::var("DAVIT_TEST_REQUIRE_PEERS").is_ok_and(|value| value == "1")
}

/// Whether the Docker engine is usable, with the build image built (by `.ci/build-images`).
pub fn docker_ready(test: &str) -> bool {
    let engine =
        Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]).output().is_ok_and(|output| output.status.success());
    if !engine {
        if peers_required() {
            panic!("{test}: the Docker engine is not reachable and DAVIT_TEST_REQUIRE_PEERS=1");
        }
        eprintln!("{test}: skipped, no Docker engine (set DAVIT_TEST_REQUIRE_PEERS=1 to make this a failure)");
        return false;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/build-images");
    let built = Command::new(&script).status().unwrap_or_else(|error| panic!("{test}: cannot run {}: {error}", script.display()));
    assert!(built.success(), "{test}: .ci/build-images failed");
    true
}

pub fn agent_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_davit")).with_file_name("davit-agent");
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p davit-agent`, or run the whole suite with `cargo test --workspace`)",
        path.display()
    );
    path
}

/// A `davit-agent` process with its own state directory.
pub struct AgentProcess {
    pub name: String,
    pub state_dir: PathBuf,
    pub coordinators: Vec<String>,
    pub executor: String,
    /// Further arguments of `davit-agent run`.
    pub run_args: Vec<String>,
    pub child: Option<Child>,
    _root: tempfile::TempDir,
}

impl AgentProcess {
    pub fn register(name: &str, coordinators: &[String], token: &str, executor: &str) -> AgentProcess {
        AgentProcess::register_with(name, coordinators, token, executor, &["--pool", "build"])
    }

    /// A deploy agent (Docker) of `region` serving `environment`, whose traffic switches bind
    /// `service_address`.
    pub fn register_deploy(
        name: &str,
        coordinators: &[String],
        token: &str,
        region: &str,
        environment: &str,
        service_address: &str,
    ) -> AgentProcess {
        let mut agent = AgentProcess::register_with(
            name,
            coordinators,
            token,
            "docker",
            &["--pool", "deploy", "--region", region, "--environment", environment],
        );
        agent.run_args = vec!["--service-address".into(), service_address.into()];
        agent
    }

    fn register_with(name: &str, coordinators: &[String], token: &str, executor: &str, register_args: &[&str]) -> AgentProcess {
        let root = tempfile::Builder::new().prefix(&format!("davit-agent-{name}-")).tempdir().expect("temp dir");
        let state_dir = root.path().join("state");
        let mut command = Command::new(agent_binary());
        command.arg("--state-dir").arg(&state_dir);
        for coordinator in coordinators {
            command.arg("--coordinator").arg(coordinator);
        }
        let output =
            command.args(["register", "--token", token, "--name", name]).args(register_args).output().expect("run davit-agent register");
        assert!(output.status.success(), "registering {name} failed: {}", String::from_utf8_lossy(&output.stderr));
        AgentProcess {
            name: name.into(),
            state_dir,
            coordinators: coordinators.to_vec(),
            executor: executor.into(),
            run_args: Vec::new(),
            child: None,
            _root: root,
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.state_dir.join("agent.log")
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("agent log");
        let mut command = Command::new(agent_binary());
        command.arg("--state-dir").arg(&self.state_dir);
        for coordinator in &self.coordinators {
            command.arg("--coordinator").arg(coordinator);
        }
        let child = command
            .args(["run", "--executor", &self.executor, "--capacity", "1"])
            .args(&self.run_args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start davit-agent");
        self.child = Some(child);
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()]).status().expect("kill");
        assert!(status.success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("CONT");
        }
        self.kill();
        if std::thread::panicking() {
            eprintln!("----- agent {} log -----\n{}", self.name, self.log());
        }
    }
}

/// REST calls the tests need, against any node.
pub struct Api {
    pub client: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Api {
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap_or_else(|error| panic!("{path}: {error}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let (status, value) = self.call(reqwest::Method::POST, path, Some(body)).await;
        assert!((200..300).contains(&status), "POST {path}: {status} {value}");
        value
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, value) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {value}");
        value
    }

    pub async fn bytes(&self, path: &str) -> Vec<u8> {
        let response = self.client.get(format!("{}{path}", self.base)).bearer_auth(&self.token).send().await.expect("download");
        assert!(response.status().is_success(), "GET {path}: {}", response.status());
        response.bytes().await.expect("body").to_vec()
    }

    pub async fn registration_token(&self) -> String {
        self.post("/api/v1/agents/registration-tokens", json!({"description": "tests"})).await["token"].as_str().unwrap().to_string()
    }

    /// A repository and a pipeline building it; returns the pipeline id.
    pub async fn pipeline(&self, repo_url: &str, name: &str, build_command: &str, build: Value) -> u64 {
        let repo = self.post("/api/v1/repos/connect", json!({"repo_url": repo_url, "branch": "main", "scm_type": "github"})).await;
        let pipeline = self
            .post(
                "/api/v1/pipelines",
                json!({"name": name, "repo_id": repo["repo_id"], "branch": "main", "build_command": build_command, "deploy_strategy": "rolling", "build": build}),
            )
            .await;
        pipeline["pipeline_id"].as_u64().unwrap()
    }

    pub async fn deploy(&self, pipeline_id: u64, commit: &str) -> u64 {
        let deployment = self
            .post(
                "/api/v1/deployments",
                json!({"pipeline_id": pipeline_id.to_string(), "commit_hash": commit, "environment": "development"}),
            )
            .await;
        deployment["deployment_id"].as_u64().unwrap()
    }

    pub async fn job(&self, deployment_id: u64) -> Value {
        self.get(&format!("/api/v1/deployments/{deployment_id}/jobs")).await["items"][0].clone()
    }

    pub async fn wait_for_job(&self, deployment_id: u64, timeout: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            // A cluster that just lost a node may answer 503 for a moment: ask again.
            let (status, jobs) = self.call(reqwest::Method::GET, &format!("/api/v1/deployments/{deployment_id}/jobs"), None).await;
            let job = jobs["items"][0].clone();
            if status == 200 && done(&job) {
                return job;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; last answer {status}: {jobs:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_for_agents(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let agents = self.get("/api/v1/agents").await;
            let online = agents["items"].as_array().unwrap().iter().filter(|agent| agent["state"] == "online").count();
            if online >= count {
                return;
            }
            assert!(Instant::now() < deadline, "only {online} of {count} agents came online: {agents:#}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn deployment_status(&self, deployment_id: u64) -> String {
        self.get(&format!("/api/v1/deployments/{deployment_id}")).await["status"].as_str().unwrap().to_string()
    }
}

pub fn api_for(node: &SingleNode) -> Api {
    Api { client: node.client.clone(), base: node.base_url(), token: node.admin_token.clone() }
}

/// Remove the release containers and images the agent with `state_dir` left behind.
pub fn remove_releases_of(state_dir: &std::path::Path) {
    let instance = davit_agent::release::instance_of(state_dir);
    let leftovers =
        Command::new("docker").args(["ps", "-aq", "--filter", &format!("label=davit.agent={instance}")]).output().expect("docker ps");
    for id in String::from_utf8_lossy(&leftovers.stdout).split_whitespace() {
        let _ = Command::new("docker").args(["rm", "-f", id]).output();
    }
    let images = Command::new("docker")
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", &format!("reference=davit-release/{instance}-*")])
        .output()
        .expect("docker images");
    for image in String::from_utf8_lossy(&images.stdout).split_whitespace() {
        let _ = Command::new("docker").args(["rmi", image]).output();
    }
}
