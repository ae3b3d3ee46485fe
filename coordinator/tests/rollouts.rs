//! Rollouts end to end with real parts: a small HTTP service built by the platform from a
//! repository served by `git daemon` (a Dockerfile, built by a Docker build agent), released to
//! four deploy agents in two regions — real `davit-agent` processes, each with its own traffic
//! switch on its own loopback address — while clients send requests to every host throughout.

#[allow(dead_code)]
mod fleet;
#[allow(dead_code)]
mod git_server;
#[allow(dead_code)]
mod single_node;
#[allow(dead_code)]
mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet::{AgentProcess, Api, api_for, docker_ready, remove_releases_of};
use git_server::GitServer;
use serde_json::{Value, json};
use single_node::SingleNode;

const DOCKERFILE: &str = "FROM davit/build-base:latest\nCOPY www /www\nRUN [\"chmod\", \"755\", \"/www/cgi-bin/index.cgi\"]\nEXPOSE 8080\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n";
/// Answers `/` when `index.html` is missing: the broken version.
const FAILING_CGI: &str = "#!/bin/sh\necho \"Status: 500 Internal Server Error\"\necho \"Content-Type: text/plain\"\necho\necho broken\n";

/// The hosts: (agent name, region, the address its traffic switch binds).
const HOSTS: [(&str, &str, &str); 4] =
    [("eu-1", "eu", "127.0.40.1"), ("eu-2", "eu", "127.0.40.2"), ("us-1", "us", "127.0.40.3"), ("us-2", "us", "127.0.40.4")];

/// What the clients saw: per host, answers by body (or error).
#[derive(Default)]
struct Seen {
    answers: BTreeMap<String, BTreeMap<String, u64>>,
    failures: Vec<String>,
}

/// One client per host, sending requests back to back until stopped.
struct Clients {
    /// What was seen in the current phase; `reset` starts a new phase (a new epoch).
    seen: Arc<Mutex<(u64, Seen)>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    fn start(port: u16) -> Clients {
        let seen = Arc::new(Mutex::new((0, Seen::default())));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = HOSTS
            .iter()
            .map(|(name, _, address)| {
                let (seen, stop, name) = (seen.clone(), stop.clone(), name.to_string());
                let url = format!("http://{address}:{port}/");
                tokio::spawn(async move {
                    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        // A request sent before a reset belongs to the phase before it.
                        let epoch = seen.lock().unwrap().0;
                        let answer = match client.get(&url).send().await {
                            Ok(response) => {
                                let status = response.status().as_u16();
                                let body = response.text().await.unwrap_or_default();
                                if status == 200 { Ok(body.trim().to_string()) } else { Err(format!("{status} {}", body.trim())) }
                            }
                            Err(error) => Err(format!("error: {error}")),
                        };
                        record(&seen, epoch, &name, answer);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Clients { seen, stop, tasks }
    }

    /// Forget what was seen so far (a new phase begins).
    fn reset(&self) {
        let mut seen = self.seen.lock().unwrap();
        *seen = (seen.0 + 1, Seen::default());
    }

    fn take(&self) -> Seen {
        std::mem::take(&mut self.seen.lock().unwrap().1)
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn record(seen: &Mutex<(u64, Seen)>, epoch: u64, host: &str, answer: Result<String, String>) {
    let mut seen = seen.lock().unwrap();
    if seen.0 != epoch {
        return;
    }
    let seen = &mut seen.1;
    let key = match &answer {
        Ok(body) => body.clone(),
        Err(failure) => failure.clone(),
    };
    *seen.answers.entry(host.to_string()).or_default().entry(key).or_default() += 1;
    if let Err(failure) = answer {
        seen.failures.push(format!("{host}: {failure}"));
    }
}

async fn host_answers(port: u16) -> Vec<String> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let mut answers = Vec::new();
    for (_, _, address) in HOSTS {
        let answer = match client.get(format!("http://{address}:{port}/")).send().await {
            Ok(response) => format!("{} {}", response.status().as_u16(), response.text().await.unwrap_or_default().trim()),
            Err(error) => format!("error: {error}"),
        };
        answers.push(answer);
    }
    answers
}

async fn wait_for_end(api: &Api, deployment_id: u64, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        // A cluster that just lost its leader may answer 503 for a moment: ask again.
        let (status, deployment) = api.call(reqwest::Method::GET, &format!("/api/v1/deployments/{deployment_id}"), None).await;
        let state = deployment["status"].as_str().unwrap_or_default();
        if status == 200 && ["success", "failed", "rolled_back"].contains(&state) {
            return deployment;
        }
        assert!(
            Instant::now() < deadline,
            "deployment {deployment_id} did not end: {deployment:#}\n{:#?}",
            events(api, deployment_id).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn events(api: &Api, deployment_id: u64) -> Vec<Value> {
    let page = api.get(&format!("/api/v1/deployments/{deployment_id}/events?limit=500")).await;
    page["items"].as_array().cloned().unwrap_or_default()
}

async fn deploy(api: &Api, pipeline_id: u64, commit: &str, strategy: &str) -> u64 {
    let (status, body) =
        api.call(reqwest::Method::PUT, &format!("/api/v1/pipelines/{pipeline_id}"), Some(json!({"deploy_strategy": strategy}))).await;
    assert_eq!(status, 200, "{body}");
    let deployment = api
        .post("/api/v1/deployments", json!({"pipeline_id": pipeline_id.to_string(), "commit_hash": commit, "environment": "staging"}))
        .await;
    deployment["deployment_id"].as_u64().unwrap()
}

/// The switch history the agent keeps for the service: how many times each host moved all its
/// traffic to `release`.
fn switches_to(agent: &AgentProcess, service: &str, release: &str) -> usize {
    let path = agent.state_dir.join("releases").join(format!("{service}.json"));
    let state: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap();
    state["history"].as_array().unwrap().iter().filter(|change| change["weights"][release] == 100).count()
}

/// The service's repository (v1: answers `v1`, healthy), served by `git daemon` and connected;
/// returns its first commit and the connected repository.
async fn service_repository(api: &Api, name: &str) -> (GitServer, String, Value) {
    let files = [("Dockerfile", DOCKERFILE), ("www/index.html", "v1\n"), ("www/health", "ok\n"), ("www/cgi-bin/index.cgi", FAILING_CGI)];
    connected_repository(api, name, &files).await
}

/// A repository of these files served by `git daemon` and connected; returns its first commit
/// and the connected repository.
async fn connected_repository(api: &Api, name: &str, files: &[(&str, &str)]) -> (GitServer, String, Value) {
    let (git_server, commit) = GitServer::start_with(name, files);
    // Not polled: each version is deployed by the test, and a run the poller started for a new
    // commit would roll out beside (and after) the test's own deployment of it.
    let connect = json!({"repo_url": git_server.url(), "branch": "main", "scm_type": "git", "poll_interval_seconds": 0});
    let repo = api.post("/api/v1/repos/connect", connect).await;
    (git_server, commit, repo)
}

/// A pipeline releasing the repository's image, blue-green, to development: on `davit up`, its
/// embedded agent on this machine. Returns the pipeline's id and the service's port.
async fn development_pipeline(api: &Api, repo: &Value, name: &str) -> (u64, u16) {
    let port = git_server::free_port();
    let pipeline = api
        .post(
            "/api/v1/pipelines",
            json!({
                "name": name, "repo_id": repo["repo_id"], "branch": "main", "deploy_strategy": "blue-green", "environment": "development",
                "build": {"dockerfile": "Dockerfile"},
                "deploy": {"public_port": port, "container_port": 8080, "health_path": "/health", "health_interval_ms": 200, "keep_old_seconds": 1}
            }),
        )
        .await;
    (pipeline["pipeline_id"].as_u64().unwrap(), port)
}

/// What the service answers on this machine: status and body, or the error.
async fn local_answer(port: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{port}/")).await {
        Ok(response) => format!("{} {}", response.status().as_u16(), response.text().await.unwrap_or_default().trim()),
        Err(error) => format!("error: {error}"),
    }
}

/// The service's repository, its pipeline, a Docker build agent and the four deploy agents.
struct Service {
    git_server: GitServer,
    first_commit: String,
    agents: Vec<AgentProcess>,
    pipeline_id: u64,
    port: u16,
    /// The service's name on the hosts (their agents keep its state under it).
    service: String,
}

impl Service {
    async fn start(api: &Api, coordinators: &[String]) -> Service {
        let (git_server, first_commit, repo) = service_repository(api, "service").await;
        let token = api.registration_token().await;
        let mut agents = vec![AgentProcess::register("builder", coordinators, &token, "docker")];
        for (name, region, address) in HOSTS {
            agents.push(AgentProcess::register_deploy(name, coordinators, &token, region, "staging", address));
        }
        for agent in &mut agents {
            agent.start();
        }
        api.wait_for_agents(agents.len()).await;
        let port = git_server::free_port();
        let pipeline = api
            .post(
                "/api/v1/pipelines",
                json!({
                    "name": "service", "repo_id": repo["repo_id"], "branch": "main", "deploy_strategy": "blue-green", "environment": "staging",
                    "build": {"dockerfile": "Dockerfile"},
                    "deploy": {
                        "public_port": port, "container_port": 8080, "health_path": "/health", "health_interval_ms": 200,
                        "healthy_threshold": 2, "unhealthy_threshold": 3, "health_deadline_seconds": 20, "keep_old_seconds": 2,
                        "analysis_window_seconds": 3, "min_requests": 10, "max_error_percent": 5, "regions": ["eu", "us"]
                    }
                }),
            )
            .await;
        let pipeline_id = pipeline["pipeline_id"].as_u64().unwrap();
        Service { git_server, first_commit, agents, pipeline_id, port, service: format!("p{pipeline_id}-staging") }
    }

    /// Stop the agents and remove the release containers they leave running.
    fn stop(mut self) {
        for agent in &mut self.agents {
            agent.kill();
        }
        // Only these agents' containers: another test's may run the same service name.
        for agent in &self.agents {
            remove_releases_of(&agent.state_dir);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn davit_up_builds_and_deploys_to_development_with_its_embedded_agent() {
    let test = "up_deploys";
    if !docker_ready(test) {
        return;
    }
    let node = SingleNode::start_with(test, &["--agent-executor", "docker"]).await;
    let api = api_for(&node);
    let (_git_server, commit, repo) = service_repository(&api, "up-service").await;
    let (pipeline_id, port) = development_pipeline(&api, &repo, "local").await;
    let created = api
        .post("/api/v1/deployments", json!({"pipeline_id": pipeline_id.to_string(), "commit_hash": commit, "environment": "development"}))
        .await;
    let deployment_id = created["deployment_id"].as_u64().unwrap();
    let ended = wait_for_end(&api, deployment_id, Duration::from_secs(240)).await;
    let state_dir = node.data_dir().join("agent");
    let answer = local_answer(port).await;
    remove_releases_of(&state_dir);
    assert_eq!(ended["status"], "success", "{ended:#}\n{:#?}\n{}", events(&api, deployment_id).await, node.log_tail(40));
    assert_eq!(answer, "200 v1", "the release answers on 127.0.0.1:{port}");
    // Staging has no deploy host here: the embedded agent deploys to development only.
    let hosts: Vec<Value> = events(&api, deployment_id).await.into_iter().filter(|event| event["kind"] == "host_healthy").collect();
    assert_eq!(hosts.len(), 1, "one host: the embedded agent");
}

/// Answers with its version and what its environment says (the CGI runs with the release
/// container's environment).
fn environment_cgi(version: &str) -> String {
    format!("#!/bin/sh\necho \"Content-Type: text/plain\"\necho\necho \"{version} db_password=$DB_PASSWORD greeting=$GREETING env=$env\"\n")
}

/// A secret at version 1 is released, changed to version 2 and released with a new commit; the
/// rollback to the first deployment runs with version 1 again, because deployments record the
/// versions they resolved (never the values), and nothing stored with a deployment holds the
/// secret, sealed or not.
#[tokio::test(flavor = "multi_thread")]
async fn a_rollback_releases_the_configuration_versions_its_target_ran_with() {
    let test = "config_versions";
    if !docker_ready(test) {
        return;
    }
    const FIRST_SECRET: &str = "hunter2-version-one";
    const SECOND_SECRET: &str = "hunter2-version-two";
    let mut node = SingleNode::start_with(test, &["--agent-executor", "docker"]).await;
    let api = api_for(&node);
    let v1_cgi = environment_cgi("v1");
    let files = [("Dockerfile", DOCKERFILE), ("www/health", "ok\n"), ("www/cgi-bin/index.cgi", v1_cgi.as_str())];
    let (git_server, first_commit, repo) = connected_repository(&api, "versioned-service", &files).await;
    let (pipeline_id, port) = development_pipeline(&api, &repo, "versioned").await;
    let deploy = |commit: String| {
        let api = &api;
        async move {
            let body = json!({"pipeline_id": pipeline_id.to_string(), "commit_hash": commit, "environment": "development",
                "config_overrides": {"env": "dev-override"}});
            let deployment_id = api.post("/api/v1/deployments", body).await["deployment_id"].as_u64().unwrap();
            let ended = wait_for_end(api, deployment_id, Duration::from_secs(240)).await;
            assert_eq!(ended["status"], "success", "{ended:#}\n{:#?}", events(api, deployment_id).await);
            deployment_id
        }
    };

    // The seed's body: a secret (by its name) and a plain value, both version 1.
    let written = api.post("/api/v1/configs/development", json!({"db_password": FIRST_SECRET, "GREETING": "hello"})).await;
    assert_eq!(written["versions"], json!({"db_password": 1, "GREETING": 1}), "{written}");
    let first = deploy(first_commit.clone()).await;
    assert_eq!(local_answer(port).await, format!("200 v1 db_password={FIRST_SECRET} greeting=hello env=dev-override"));

    // The secret changes (version 2) and a new commit is released with it.
    let written = api.post("/api/v1/configs/development", json!({"db_password": SECOND_SECRET})).await;
    assert_eq!(written["versions"], json!({"db_password": 2}), "{written}");
    let second_commit = git_server.commit_files(&[("www/cgi-bin/index.cgi", Some(environment_cgi("v2").as_str()))], "v2");
    let second = deploy(second_commit).await;
    assert_eq!(local_answer(port).await, format!("200 v2 db_password={SECOND_SECRET} greeting=hello env=dev-override"));
    let listed = api.get("/api/v1/configs/development").await;
    assert_eq!((&listed["variables"]["db_password"]["version"], &listed["variables"]["db_password"]["value"]), (&json!(2), &json!("***")));

    // Rolled back: the first commit, with the secret's version 1.
    let (status, rollback) = api.call(reqwest::Method::POST, &format!("/api/v1/deployments/{second}/rollback"), None).await;
    assert_eq!(status, 201, "{rollback}");
    let rollback_id = rollback["deployment_id"].as_u64().unwrap();
    assert_eq!(rollback["release_of"], first);
    let ended = wait_for_end(&api, rollback_id, Duration::from_secs(240)).await;
    assert_eq!(ended["status"], "success", "{ended:#}\n{:#?}", events(&api, rollback_id).await);
    assert_eq!(local_answer(port).await, format!("200 v1 db_password={FIRST_SECRET} greeting=hello env=dev-override"));

    // The deployments show keys and versions, never a value.
    let versions_of = |deployment: &Value| -> Vec<(String, u64, bool)> {
        deployment["configuration"]
            .as_array()
            .unwrap_or_else(|| panic!("no configuration: {deployment:#}"))
            .iter()
            .map(|key| (key["key"].as_str().unwrap().to_string(), key["version"].as_u64().unwrap(), key["secret"].as_bool().unwrap()))
            .collect()
    };
    let first_view = api.get(&format!("/api/v1/deployments/{first}")).await;
    let expected_first = vec![("GREETING".to_string(), 1, false), ("db_password".to_string(), 1, true)];
    assert_eq!(versions_of(&first_view), expected_first);
    assert_eq!(versions_of(&api.get(&format!("/api/v1/deployments/{second}")).await)[1], ("db_password".to_string(), 2, true));
    let rollback_view = api.get(&format!("/api/v1/deployments/{rollback_id}")).await;
    assert_eq!(versions_of(&rollback_view), expected_first);
    assert_eq!(rollback_view["config_overrides"], json!({"env": "dev-override"}));
    for view in [&first_view, &rollback_view] {
        let text = view.to_string();
        assert!(!text.contains(FIRST_SECRET) && !text.contains("davit-sealed"), "{text}");
    }

    // The key's history: both versions, masked, both kept for the deployments that use them.
    let history = api.get("/api/v1/configs/development/db_password/versions").await;
    assert_eq!(history["current_version"], 2, "{history:#}");
    let listed: Vec<(u64, &str, bool, bool)> = history["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|version| {
            let number = version["version"].as_u64().unwrap();
            (number, version["value"].as_str().unwrap(), version["current"].as_bool().unwrap(), version["in_use"].as_bool().unwrap())
        })
        .collect();
    assert_eq!(listed, [(2, "***", true, true), (1, "***", false, true)]);
    let (status, missing) = api.call(reqwest::Method::GET, "/api/v1/configs/development/no_such_key/versions", None).await;
    assert_eq!(status, 404, "{missing}");

    // The audit log names the versions.
    let audit = api.get("/api/v1/audit-logs?action=configuration.set").await;
    let details: Vec<&str> = audit["items"].as_array().unwrap().iter().map(|entry| entry["details"].as_str().unwrap()).collect();
    assert!(details.iter().any(|details| details.ends_with("versions=db_password@2")), "{details:?}");

    // On disk, no deployment record (rollouts included) holds the secret, sealed or in clear.
    remove_releases_of(&node.data_dir().join("agent"));
    node.kill();
    let store = davit_coordinator::store::open_backend(davit_coordinator::store::BackendKind::Redb, &node.data_dir().join("store"))
        .expect("open the node's store");
    let deployments = store
        .scan(davit_coordinator::store::Table::Deployments, davit_coordinator::store::full_range(), usize::MAX, false)
        .expect("read the deployments");
    assert_eq!(deployments.len(), 3);
    for (_, record) in &deployments {
        let record = String::from_utf8_lossy(record);
        for secret in [FIRST_SECRET, SECOND_SECRET, "davit-sealed"] {
            assert!(!record.contains(secret), "a stored deployment holds {secret:?}: {record}");
        }
        assert!(record.contains("\"configuration\":[") && record.contains("\"rollout\":{"), "{record}");
    }
    // The history holds the secret's versions sealed (never in clear).
    let history = store
        .scan(davit_coordinator::store::Table::ConfigVersions, davit_coordinator::store::full_range(), usize::MAX, false)
        .expect("read the history");
    let history: Vec<String> = history.iter().map(|(_, record)| String::from_utf8_lossy(record).into_owned()).collect();
    assert_eq!(history.iter().filter(|record| record.contains("davit-sealed")).count(), 2, "{history:#?}");
    assert!(!history.iter().any(|record| record.contains(FIRST_SECRET) || record.contains(SECOND_SECRET)), "{history:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_strategy_rolls_a_built_service_out_to_four_hosts_in_two_regions() {
    let test = "rollouts";
    if !docker_ready(test) {
        return;
    }
    let node = SingleNode::start_with(test, &["--no-agent"]).await;
    let api = api_for(&node);
    let Service { git_server, first_commit, agents, pipeline_id, port, service } = Service::start(&api, &[node.grpc_addr()]).await;

    // The first release: nothing to replace yet.
    let first = deploy(&api, pipeline_id, &first_commit, "blue-green").await;
    let ended = wait_for_end(&api, first, Duration::from_secs(240)).await;
    assert_eq!(ended["status"], "success", "{ended:#}\n{:#?}", events(&api, first).await);
    assert_eq!(host_answers(port).await, vec!["200 v1"; 4]);

    let clients = Clients::start(port);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut live = "v1".to_string();
    for (version, strategy) in [("v2", "rolling"), ("v3", "blue-green"), ("v4", "canary")] {
        let commit = git_server.commit_files(&[("www/index.html", Some(&format!("{version}\n")))], version);
        clients.reset();
        let deployment_id = deploy(&api, pipeline_id, &commit, strategy).await;
        let ended = wait_for_end(&api, deployment_id, Duration::from_secs(240)).await;
        assert_eq!(ended["status"], "success", "{strategy}: {ended:#}\n{:#?}", events(&api, deployment_id).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = clients.take();
        assert!(seen.failures.is_empty(), "{strategy}: {} failed requests, first {:?}", seen.failures.len(), seen.failures.first());
        assert_eq!(host_answers(port).await, vec![format!("200 {version}"); 4], "{strategy}: every host ends on {version}");
        for (host, answers) in &seen.answers {
            assert!(answers.keys().all(|body| *body == live || body == version), "{strategy}: {host} answered {answers:?}");
        }
        // Every host switched to the new release exactly once.
        for agent in &agents[1..] {
            assert_eq!(switches_to(agent, &service, &format!("d{deployment_id}")), 1, "{strategy}: host {}", agent.name);
        }
        let kinds: Vec<String> =
            events(&api, deployment_id).await.iter().map(|event| event["kind"].as_str().unwrap().to_string()).collect();
        assert_eq!(kinds.iter().filter(|kind| *kind == "host_healthy").count(), 4, "{strategy}: {kinds:?}");
        if strategy == "rolling" {
            // Region waves: both eu hosts switch before either us host.
            let order: Vec<String> = events(&api, deployment_id)
                .await
                .iter()
                .filter(|event| event["kind"] == "host_switched")
                .map(|event| event["region"].as_str().unwrap_or_default().to_string())
                .collect();
            assert_eq!(order, ["eu", "eu", "us", "us"], "{strategy}");
        }
        // Region waves, for every strategy: no us host gets traffic before both eu hosts serve
        // the new release entirely.
        let weights: Vec<(String, u64)> = events(&api, deployment_id)
            .await
            .iter()
            .filter(|event| event["kind"] == "weight_changed")
            .map(|event| (event["region"].as_str().unwrap_or_default().to_string(), event["weight"].as_u64().unwrap_or_default()))
            .collect();
        let us_begins = weights.iter().position(|(region, _)| region == "us").expect("the us wave");
        assert_eq!(
            weights[..us_begins].iter().filter(|(region, weight)| region == "eu" && *weight == 100).count(),
            2,
            "{strategy}: {weights:?}"
        );
        assert!(weights[us_begins..].iter().all(|(region, _)| region == "us"), "{strategy}: {weights:?}");
        live = version.to_string();
    }

    // A version that answers 500, by canary: rolled back at its first step.
    let broken = git_server.commit_files(&[("www/index.html", None)], "v5 answers 500");
    clients.reset();
    let deployment_id = deploy(&api, pipeline_id, &broken, "canary").await;
    let ended = wait_for_end(&api, deployment_id, Duration::from_secs(240)).await;
    let progress = events(&api, deployment_id).await;
    assert_eq!(ended["status"], "rolled_back", "{ended:#}\n{progress:#?}");
    let steps: Vec<&Value> = progress.iter().filter(|event| event["kind"] == "canary_step").collect();
    assert_eq!(steps.len(), 1, "the broken canary got past its first step: {progress:#?}");
    assert!(progress.iter().any(|event| event["kind"] == "analysis_verdict" && event["message"].as_str().unwrap().contains("fail")));
    let verdict_at = progress.iter().find(|event| event["kind"] == "analysis_verdict").unwrap()["at"].as_i64().unwrap();
    let ended_at = progress.last().unwrap()["at"].as_i64().unwrap();
    assert!(ended_at - verdict_at < 60_000, "traffic took {} ms to return to stable", ended_at - verdict_at);
    assert_eq!(host_answers(port).await, vec![format!("200 {live}"); 4], "all traffic is back on the stable release");
    let seen = clients.take();
    assert!(seen.failures.iter().all(|failure| failure.contains("500 broken")), "only the canary's own 500s: {:?}", seen.failures);

    // A version failing its health check, by blue-green: it never receives traffic.
    let unhealthy = git_server.commit_files(&[("www/index.html", Some("v6\n")), ("www/health", None)], "v6 fails its health check");
    clients.reset();
    let deployment_id = deploy(&api, pipeline_id, &unhealthy, "blue-green").await;
    let ended = wait_for_end(&api, deployment_id, Duration::from_secs(240)).await;
    assert_eq!(ended["status"], "rolled_back", "{ended:#}\n{:#?}", events(&api, deployment_id).await);
    let seen = clients.take();
    assert!(seen.failures.is_empty(), "{:?}", seen.failures.first());
    for (host, answers) in &seen.answers {
        assert!(!answers.contains_key("v6"), "{host} served the unhealthy release: {answers:?}");
    }
    assert_eq!(host_answers(port).await, vec![format!("200 {live}"); 4]);

    // A rollback through the API deploys the last good release again, as a new deployment.
    let (status, rollback) = api.call(reqwest::Method::POST, &format!("/api/v1/deployments/{deployment_id}/rollback"), None).await;
    assert_eq!(status, 201, "{rollback}");
    let rollback_id = rollback["deployment_id"].as_u64().unwrap();
    assert_eq!(rollback["rollback_of"], deployment_id);
    let ended = wait_for_end(&api, rollback_id, Duration::from_secs(240)).await;
    assert_eq!(ended["status"], "success", "{ended:#}\n{:#?}", events(&api, rollback_id).await);
    clients.stop().await;
    Service { git_server, first_commit, agents, pipeline_id, port, service }.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_survives_the_leader_being_killed_and_no_host_is_switched_twice() {
    let test = "rollout_failover";
    if !docker_ready(test) {
        return;
    }
    // The repository is served on loopback, which `davit serve` refuses unless the config allows it.
    let mut options = support::ClusterOptions::new(davit_coordinator::store::BackendKind::Redb);
    options.outbound_allow_ranges = vec!["127.0.0.0/8".into()];
    let mut cluster = support::TestCluster::start(test, options).await;
    let leader = cluster.wait_for_agreed_leader(&[1, 2, 3], Duration::from_secs(30)).await;
    let api = Api { client: cluster.client.clone(), base: cluster.node(leader).base_url(), token: cluster.token().to_string() };
    // Agents know every coordinator, followers first.
    let mut coordinators: Vec<String> =
        [1, 2, 3].into_iter().filter(|node| *node != leader).map(|node| cluster.node(node).grpc_addr()).collect();
    coordinators.push(cluster.node(leader).grpc_addr());
    let Service { git_server, first_commit, agents, pipeline_id, port, service } = Service::start(&api, &coordinators).await;
    let first = deploy(&api, pipeline_id, &first_commit, "blue-green").await;
    let ended = wait_for_end(&api, first, Duration::from_secs(240)).await;
    assert_eq!(ended["status"], "success", "{ended:#}\n{:#?}", events(&api, first).await);

    let clients = Clients::start(port);
    let commit = git_server.commit_files(&[("www/index.html", Some("v2\n"))], "v2");
    let deployment_id = deploy(&api, pipeline_id, &commit, "rolling").await;
    // Kill the leader once the rollout is under way: one host switched, three to go.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let switched = events(&api, deployment_id).await.iter().filter(|event| event["kind"] == "host_switched").count();
        if switched >= 1 {
            assert!(switched < 4, "the rollout ended before the leader could be killed");
            break;
        }
        assert!(Instant::now() < deadline, "the rollout never switched a host: {:#?}", events(&api, deployment_id).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.kill_node(leader);
    eprintln!("{test}: killed the leader, node {leader}, mid-rollout");
    let survivor = [1, 2, 3].into_iter().find(|node| *node != leader).unwrap();
    let api = Api { client: cluster.client.clone(), base: cluster.node(survivor).base_url(), token: api.token.clone() };
    let ended = wait_for_end(&api, deployment_id, Duration::from_secs(240)).await;
    assert_eq!(ended["status"], "success", "{ended:#}\n{:#?}", events(&api, deployment_id).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(host_answers(port).await, vec!["200 v2"; 4], "every host ends on the new version");
    for agent in &agents[1..] {
        assert_eq!(switches_to(agent, &service, &format!("d{deployment_id}")), 1, "host {} was switched more than once", agent.name);
    }
    let seen = clients.take();
    assert!(seen.failures.is_empty(), "{} failed requests during the failover, first {:?}", seen.failures.len(), seen.failures.first());
    clients.stop().await;
    Service { git_server, first_commit, agents, pipeline_id, port, service }.stop();
}

/// A GitHub `pull_request` delivery for pull request `number` of the connected repository,
/// signed with `secret` (the fixture's payload with the number, action and head changed).
fn pull_request_delivery(number: u64, action: &str, head: &str, secret: &str, delivery: &str) -> (Vec<u8>, Vec<(&'static str, String)>) {
    use hmac::{KeyInit, Mac};
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/webhooks/github-pull_request-opened.json");
    let mut payload: Value = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    payload["action"] = json!(action);
    payload["number"] = json!(number);
    payload["pull_request"]["number"] = json!(number);
    payload["pull_request"]["head"]["sha"] = json!(head);
    payload["pull_request"]["base"]["ref"] = json!("main");
    payload["pull_request"]["state"] = json!(if action == "closed" { "closed" } else { "open" });
    let body = serde_json::to_vec(&payload).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&body);
    let signature: String = mac.finalize().into_bytes().iter().map(|byte| format!("{byte:02x}")).collect();
    let headers = vec![
        ("x-github-event", "pull_request".to_string()),
        ("x-github-delivery", delivery.to_string()),
        ("x-hub-signature-256", format!("sha256={signature}")),
        ("content-type", "application/json".to_string()),
    ];
    (body, headers)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_requests_preview_is_deployed_and_retired_from_its_hosts_when_it_closes() {
    let test = "preview";
    if !docker_ready(test) {
        return;
    }
    // `davit up`'s embedded agent serves development and every preview.
    let node = SingleNode::start_with(test, &["--agent-executor", "docker"]).await;
    let api = api_for(&node);
    let (git_server, commit) = GitServer::start_with(
        "preview-service",
        &[("Dockerfile", DOCKERFILE), ("www/index.html", "preview\n"), ("www/health", "ok\n"), ("www/cgi-bin/index.cgi", FAILING_CGI)],
    );
    // The provider's merge ref of pull request 7, which its checks and preview are built from.
    git_server::git(&git_server.bare(), &["update-ref", "refs/pull/7/merge", &commit]);
    let secret = "preview-hook-secret";
    let connect = json!({"repo_url": git_server.url(), "scm_type": "github", "branch": "main", "webhook_secret": secret});
    let repo_id = api.post("/api/v1/repos/connect", connect).await["repo_id"].as_u64().unwrap();
    let (public_port, base) = (git_server::free_port(), 21_000 + (std::process::id() % 20_000) as u16);
    let pipeline = api
        .post(
            "/api/v1/pipelines",
            json!({
                "name": "previewed", "repo_id": repo_id, "branch": "main", "deploy_strategy": "blue-green", "environment": "development",
                "build": {"dockerfile": "Dockerfile", "preview_environments": true, "trigger_events": ["pull_request"]},
                "deploy": {"public_port": public_port, "preview_port_base": base, "container_port": 8080, "health_path": "/health",
                           "health_interval_ms": 200, "keep_old_seconds": 1}
            }),
        )
        .await;
    let pipeline_id = pipeline["pipeline_id"].as_u64().unwrap();
    let deliver = |body: Vec<u8>, headers: Vec<(&'static str, String)>| {
        let mut request = api.client.post(format!("{}/api/v1/repos/{repo_id}/webhook", api.base)).body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.send()
    };

    // Opened: its preview is built and released on the preview host, on base + 7.
    let (body, headers) = pull_request_delivery(7, "opened", &commit, secret, "preview-opened");
    let reply = deliver(body, headers).await.unwrap();
    let (status, accepted) = (reply.status().as_u16(), reply.text().await.unwrap());
    assert_eq!(status, 202, "{accepted}");
    let deployments = api.get(&format!("/api/v1/deployments?pipeline_id={pipeline_id}")).await;
    let deployment = deployments["items"].as_array().unwrap().iter().find(|item| item["environment"] == "pr-7").cloned();
    let deployment_id =
        deployment.unwrap_or_else(|| panic!("a deployment into pr-7: {deployments:#}\nthe webhook's answer: {accepted}"))["deployment_id"]
            .as_u64()
            .unwrap();
    let ended = wait_for_end(&api, deployment_id, Duration::from_secs(240)).await;
    let state_dir = node.data_dir().join("agent");
    let answer = |port: u16| async move {
        match reqwest::get(format!("http://127.0.0.1:{port}/")).await {
            Ok(response) => format!("{} {}", response.status().as_u16(), response.text().await.unwrap_or_default().trim()),
            Err(error) => format!("error: {error}"),
        }
    };
    let served = answer(base + 7).await;
    if ended["status"] != "success" || served != "200 preview" {
        remove_releases_of(&state_dir);
    }
    assert_eq!(ended["status"], "success", "{ended:#}\n{:#?}\n{}", events(&api, deployment_id).await, node.log_tail(40));
    assert_eq!(served, "200 preview", "pull request 7's preview answers on port {base} + 7");
    let service = format!("p{pipeline_id}-pr-7");
    let containers = || {
        let listed = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=davit.service={service}")])
            .output()
            .expect("docker ps");
        String::from_utf8_lossy(&listed.stdout).split_whitespace().count()
    };
    assert_eq!(containers(), 1, "one release container runs the preview");

    // Closed: the preview environment goes, and so does what runs on its host.
    let (body, headers) = pull_request_delivery(7, "closed", &commit, secret, "preview-closed");
    let reply = deliver(body, headers).await.unwrap();
    assert_eq!(reply.status().as_u16(), 202, "{}", reply.text().await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    while (containers() > 0 || !answer(base + 7).await.starts_with("error")) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (left, after) = (containers(), answer(base + 7).await);
    remove_releases_of(&state_dir);
    assert_eq!(left, 0, "the preview's release containers are removed\n{:#?}", events(&api, deployment_id).await);
    assert!(after.starts_with("error"), "nothing answers on the preview's port any more: {after}");
    std::net::TcpListener::bind(("127.0.0.1", base + 7)).expect("the preview's port is free again");
    let retired: Vec<Value> = events(&api, deployment_id).await.into_iter().filter(|event| event["kind"] == "service_retired").collect();
    assert_eq!(retired.len(), 1, "the host reports the service retired: {retired:#?}");
    assert!(retired[0]["message"].as_str().unwrap().contains("retired"), "{retired:#?}");
    let environments = api.get("/api/v1/environments").await;
    assert!(!environments.to_string().contains("\"pr-7\""), "the preview environment is gone: {environments:#}");
}
