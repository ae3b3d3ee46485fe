//! Protected environments through the REST API of a real `davit up` (its embedded shell agent
//! builds; a repository served by `git daemon`): production takes only what passed staging,
//! releases that build instead of rebuilding it, and waits for an approval before it rolls out.

#[allow(dead_code)]
mod git_server;
#[allow(dead_code)]
mod single_node;

use std::time::Duration;

use git_server::GitServer;
use serde_json::json;
use single_node::SingleNode;

#[tokio::test(flavor = "multi_thread")]
async fn production_takes_only_what_passed_staging_and_waits_for_an_approval() {
    let (git_server, commit) = GitServer::start_with("app", &[("build.sh", "#!/bin/sh\necho built\n")]);
    let node = SingleNode::start_with("environments", &[]).await;
    let admin = node.admin_token.clone();
    let (_, developer) = node.create_user("dana", "dana-password-1", "developer").await;
    let (_, viewer) = node.create_user("vic", "vic-password-1", "viewer").await;

    // Only an admin protects an environment; a self-promotion is refused with what to do.
    let settings = json!({"promote_from": "staging", "required_approvals": 1, "allowed_branches": ["main"]});
    assert_eq!(node.put("/api/v1/environments/production", &developer, &settings).await.status, 403);
    let refused = node.put("/api/v1/environments/production", &admin, &json!({"promote_from": "production"})).await;
    assert_eq!((refused.status, refused.error_code()), (409, Some("promotes_from_itself")), "{}", refused.text());
    let set = node.put("/api/v1/environments/production", &admin, &settings).await;
    assert_eq!(set.status, 200, "{}", set.text());
    let listed = node.get("/api/v1/environments", &viewer).await;
    let names: Vec<&str> = listed.json["items"].as_array().unwrap().iter().map(|item| item["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["development", "testing", "staging", "production"]);
    assert_eq!(listed.json["items"][3]["promote_from"], "staging");

    let repo =
        node.post("/api/v1/repos/connect", &admin, &json!({"repo_url": git_server.url(), "branch": "main", "scm_type": "git"})).await;
    let pipeline = node
        .post(
            "/api/v1/pipelines",
            &admin,
            &json!({"name": "app", "repo_id": repo.json["repo_id"], "branch": "main", "build_command": "sh build.sh", "deploy_strategy": "rolling", "environment": "staging"}),
        )
        .await;
    let pipeline_id = pipeline.json["pipeline_id"].as_u64().unwrap();
    let to_production = json!({"pipeline_id": pipeline_id.to_string(), "commit_hash": commit, "environment": "production"});

    // Not yet through staging: refused, saying what to do.
    let refused = node.post("/api/v1/deployments", &admin, &to_production).await;
    assert_eq!((refused.status, refused.error_code()), (409, Some("refused_by_environment")), "{}", refused.text());
    let message = refused.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("takes only what succeeded in staging") && message.contains("deploy it to staging first"), "{message}");

    // Through staging (from branch main), then promoted: the staging build is released, nothing rebuilt.
    let staging = node
        .post(
            "/api/v1/deployments",
            &developer,
            &json!({"pipeline_id": pipeline_id.to_string(), "branch": "main", "environment": "staging"}),
        )
        .await;
    assert_eq!(staging.status, 201, "{}", staging.text());
    let staging_id = staging.json["deployment_id"].as_u64().unwrap();
    assert_eq!(node.wait_for_status(staging_id, &["success", "failed"]).await["status"], "success");
    // From now on the pipeline's deployments roll out to hosts (so approvals apply).
    let updated = node.put(&format!("/api/v1/pipelines/{pipeline_id}"), &admin, &json!({"deploy": {"public_port": 18080}})).await;
    assert_eq!(updated.status, 200, "{}", updated.text());
    let promoted = node.post("/api/v1/deployments", &admin, &to_production).await;
    assert_eq!(promoted.status, 201, "{}", promoted.text());
    let promoted_id = promoted.json["deployment_id"].as_u64().unwrap();
    assert_eq!(promoted.json["release_of"], staging_id);
    assert_eq!(promoted.json["branch"], "main");
    assert_eq!(promoted.json["required_approvals"], 1);
    let jobs = node.get(&format!("/api/v1/deployments/{promoted_id}/jobs"), &admin).await;
    assert!(jobs.json["items"].as_array().unwrap().is_empty(), "a promotion builds nothing: {}", jobs.text());

    // It waits for its approval; a viewer may not give it, the admin who deployed may.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = node.get(&format!("/api/v1/deployments/{promoted_id}"), &admin).await;
    assert_eq!(waiting.json["status"], "pending", "{}", waiting.text());
    assert_eq!(node.post(&format!("/api/v1/deployments/{promoted_id}/approve"), &viewer, &json!({})).await.status, 403);
    let approved = node.post(&format!("/api/v1/deployments/{promoted_id}/approve"), &developer, &json!({})).await;
    assert_eq!(approved.status, 200, "{}", approved.text());
    assert_eq!(approved.json["approvals"][0]["username"], "dana");
    let again = node.post(&format!("/api/v1/deployments/{promoted_id}/approve"), &developer, &json!({})).await;
    assert_eq!(again.status, 409, "{}", again.text());
    // Approved, it rolls out: this machine has no deploy agent for production, which it says.
    let ended = node.wait_for_status(promoted_id, &["failed", "success", "rolled_back"]).await;
    assert_eq!(ended["status"], "failed");
    assert!(ended["status_reason"].as_str().unwrap().contains("pool=deploy and environment=production"), "{ended}");
    let events = node.get(&format!("/api/v1/deployments/{promoted_id}/events"), &viewer).await;
    let kinds: Vec<&str> = events.json["items"].as_array().unwrap().iter().map(|event| event["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["queued", "approval_required", "approved", "failed"]);
}
