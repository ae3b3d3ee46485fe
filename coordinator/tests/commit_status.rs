//! Commit statuses end to end: a real `davit up` process reports runs to a local HTTP server
//! standing in for GitHub's and GitLab's APIs (their `api_url`), with the repository connected,
//! the pipeline created, the run started and cancelled through the REST API. The outbound address
//! checks (`crate::outbound`, another branch) do not exist on this branch; once wired, this test
//! needs loopback allowed, which `davit up` does.

#[allow(dead_code)]
mod single_node;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use serde_json::{Value, json};
use single_node::{SingleNode, expect_field_error, expect_status};

#[derive(Debug, Clone)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Value,
}

/// Records every request and answers 201 as the providers do.
async fn fake_provider() -> (String, Arc<Mutex<Vec<Received>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let recorder = received.clone();
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let recorder = recorder.clone();
        async move {
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            recorder.lock().unwrap().push(Received { path: uri.path().to_string(), headers, body });
            (StatusCode::CREATED, "{}")
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, received)
}

async fn wait_for(received: &Arc<Mutex<Vec<Received>>>, path: &str, count: usize) -> Vec<Received> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let matching: Vec<Received> = received.lock().unwrap().iter().filter(|r| r.path == path).cloned().collect();
        if matching.len() >= count {
            return matching;
        }
        assert!(Instant::now() < deadline, "{path}: {} of {count} statuses after 30 s: {matching:?}", matching.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn header<'a>(received: &'a Received, name: &str) -> Option<&'a str> {
    received.headers.get(name).and_then(|value| value.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_node_reports_runs_to_github_and_gitlab() {
    let node = SingleNode::start("commit-status").await;
    let (_, developer) = node.create_user("dev", "developer-pw", "developer").await;
    let (provider, received) = fake_provider().await;
    let github_token = "ghp_e2eTOKENvalue0123456789";
    let gitlab_token = "glpat-e2eTOKENvalue0123456789";

    // Bad settings are refused by name.
    for (field, value) in
        [("api_url", json!("ghe.example.com/api/v3")), ("api_url", json!("https://h/api?x=1")), ("access_token", json!("two words"))]
    {
        let body = json!({"repo_url": "https://github.com/org/bad", "scm_type": "github", field: value});
        expect_field_error(&node.post("/api/v1/repos/connect", &developer, &body).await, field, &format!("connect with {field} = {value}"));
    }

    // Connect: the answer keeps the seed's fields and says what to set up on the provider.
    let connected = node
        .post(
            "/api/v1/repos/connect",
            &developer,
            &json!({"repo_url": "git@github.com:octo-org/hello-world.git", "scm_type": "github", "webhook_secret": "hook-secret",
                    "api_url": format!("{provider}/api/v3/"), "access_token": github_token}),
        )
        .await;
    expect_status(&connected, 201, "connect a GitHub repository with a token");
    assert!(!connected.text().contains(github_token), "{}", connected.text());
    assert_eq!(connected.json["access_token"], "***");
    assert_eq!(connected.json["webhook_secret"], "***");
    assert_eq!(connected.json["api_url"], format!("{provider}/api/v3"));
    assert_eq!(connected.json["scm_type"], "github");
    assert_eq!(connected.json["webhook_url"], format!("{}/api/v1/repos/webhook", node.base_url()));
    assert_eq!(connected.json["webhook_events"], json!(["Pushes", "Pull requests"]));
    assert!(connected.json["webhook_instructions"].as_str().unwrap().contains("application/json"));
    let github_repo = connected.json["repo_id"].as_u64().unwrap();
    let gitlab_connected = node
        .post(
            "/api/v1/repos/connect",
            &developer,
            &json!({"repo_url": "https://gitlab.example.com/group/project", "scm_type": "gitlab", "api_url": format!("{provider}/gitlab/api/v4")}),
        )
        .await;
    expect_status(&gitlab_connected, 201, "connect a GitLab repository without a token");
    assert!(gitlab_connected.json["access_token"].is_null());
    let gitlab_repo = gitlab_connected.json["repo_id"].as_u64().unwrap();
    // The token is set later, by update.
    let updated = node.put(&format!("/api/v1/repos/{gitlab_repo}"), &developer, &json!({"access_token": gitlab_token})).await;
    expect_status(&updated, 200, "set a token");
    assert_eq!(updated.json["access_token"], "***");

    let mut runs = Vec::new();
    for (repo_id, name) in [(github_repo, "gh-build"), (gitlab_repo, "gl-build")] {
        let pipeline = node
            .post(
                "/api/v1/pipelines",
                &developer,
                &json!({"name": name, "repo_id": repo_id, "branch": "main", "build_command": "make", "deploy_strategy": "rolling", "environment": "staging"}),
            )
            .await;
        expect_status(&pipeline, 201, "create a pipeline");
        let pipeline_id = pipeline.json["pipeline_id"].as_u64().unwrap();
        let deployment = node
            .post(
                "/api/v1/deployments",
                &developer,
                &json!({"pipeline_id": pipeline_id, "commit_hash": "ec26c3e57ca3a959ca5aad62de7213c562f8c821", "environment": "staging"}),
            )
            .await;
        expect_status(&deployment, 201, "start a run");
        runs.push(deployment.json["deployment_id"].as_u64().unwrap());
    }

    // No agent runs here: both runs stay queued (pending) until they are cancelled (error).
    let github_path = "/api/v3/repos/octo-org/hello-world/statuses/ec26c3e57ca3a959ca5aad62de7213c562f8c821";
    let gitlab_path = "/gitlab/api/v4/projects/group%2Fproject/statuses/ec26c3e57ca3a959ca5aad62de7213c562f8c821";
    wait_for(&received, github_path, 1).await;
    wait_for(&received, gitlab_path, 1).await;
    for deployment_id in &runs {
        expect_status(&node.post(&format!("/api/v1/deployments/{deployment_id}/cancel"), &developer, &json!({})).await, 200, "cancel");
    }
    let github = wait_for(&received, github_path, 2).await;
    let gitlab = wait_for(&received, gitlab_path, 2).await;

    let link = |deployment_id: u64| format!("{}/runs/{deployment_id}", node.base_url());
    assert_eq!(
        github.iter().map(|r| r.body.clone()).collect::<Vec<_>>(),
        [
            json!({"state": "pending", "target_url": link(runs[0]), "description": "Queued: waiting for an agent", "context": "davit/gh-build"}),
            json!({"state": "error", "target_url": link(runs[0]), "description": "Cancelled: cancelled by dev", "context": "davit/gh-build"}),
        ]
    );
    for request in &github {
        assert_eq!(header(request, "authorization"), Some(format!("Bearer {github_token}").as_str()));
        assert_eq!(header(request, "accept"), Some("application/vnd.github+json"));
        assert_eq!(header(request, "x-github-api-version"), Some("2022-11-28"));
    }
    assert_eq!(
        gitlab.iter().map(|r| r.body.clone()).collect::<Vec<_>>(),
        [
            json!({"state": "pending", "target_url": link(runs[1]), "description": "Queued: waiting for an agent", "name": "davit/gl-build"}),
            json!({"state": "canceled", "target_url": link(runs[1]), "description": "Cancelled: cancelled by dev", "name": "davit/gl-build"}),
        ]
    );
    for request in &gitlab {
        assert_eq!(header(request, "private-token"), Some(gitlab_token));
    }

    // The token never shows in a read, in the audit log or in the node's log.
    for path in [format!("/api/v1/repos/{github_repo}"), "/api/v1/repos".to_string(), "/api/v1/audit-logs?limit=500".to_string()] {
        let reply = node.get(&path, &node.admin_token).await;
        expect_status(&reply, 200, &path);
        assert!(!reply.text().contains(github_token) && !reply.text().contains(gitlab_token), "GET {path}: {}", reply.text());
    }
    let log = std::fs::read_to_string(node.log_path()).unwrap_or_default();
    assert!(!log.contains(github_token) && !log.contains(gitlab_token), "the node's log shows a token");

    // Removing the token stops the reports.
    let cleared = node.put(&format!("/api/v1/repos/{github_repo}"), &developer, &json!({"access_token": "", "api_url": ""})).await;
    expect_status(&cleared, 200, "remove the token");
    assert!(cleared.json["access_token"].is_null() && cleared.json["api_url"].is_null(), "{}", cleared.text());
}
