//! Webhook deliveries start runs, end to end against a real `davit up` process: every fixture
//! in `tests/fixtures/webhooks/`, sent with the headers its provider sends and a correct
//! signature, creates the deployments it should (or none); a wrong or missing signature gets 401
//! and creates none; a replayed delivery id is acknowledged and runs nothing again.

#[allow(dead_code)]
mod single_node;

use std::time::{Duration, Instant};

use hmac::{KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use single_node::{SingleNode, expect_status};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/webhooks");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap_or_else(|error| panic!("read the fixture {FIXTURES}/{name}: {error}"))
}

fn sha256_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|byte| format!("{byte:02x}")).collect();
    format!("sha256={hex}")
}

struct Hooks<'a> {
    node: &'a SingleNode,
    token: String,
    /// How long each delivery took to answer.
    latencies: std::sync::Mutex<Vec<Duration>>,
}

impl Hooks<'_> {
    /// Connect a repository with a webhook secret; returns its id.
    async fn connect(&self, url: &str, scm_type: &str, branch: &str, secret: &str) -> u64 {
        let body = json!({"repo_url": url, "scm_type": scm_type, "branch": branch, "webhook_secret": secret});
        let reply = self.node.post("/api/v1/repos/connect", &self.token, &body).await;
        expect_status(&reply, 201, &format!("connect {url}"));
        reply.json["repo_id"].as_u64().unwrap()
    }

    async fn pipeline(&self, repo_id: u64, name: &str, branch: Option<&str>, build: Value) -> u64 {
        let mut body = json!({"name": name, "repo_id": repo_id, "build_command": "make", "deploy_strategy": "rolling", "environment": "staging", "build": build});
        if let Some(branch) = branch {
            body["branch"] = json!(branch);
        }
        let reply = self.node.post("/api/v1/pipelines", &self.token, &body).await;
        expect_status(&reply, 201, &format!("create pipeline {name}"));
        reply.json["pipeline_id"].as_u64().unwrap()
    }

    async fn deliver(&self, path: &str, body: &[u8], headers: &[(&str, String)]) -> single_node::Reply {
        let mut request = self.node.client.post(self.node.url(path)).header("content-type", "application/json").body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let started = Instant::now();
        let reply = self.node.send(request).await;
        self.latencies.lock().unwrap().push(started.elapsed());
        reply
    }

    async fn deployment_count(&self) -> usize {
        let reply = self.node.get("/api/v1/deployments?limit=500", &self.token).await;
        expect_status(&reply, 200, "list deployments");
        reply.json["items"].as_array().unwrap().len()
    }

    async fn deployment(&self, deployment_id: u64) -> Value {
        let reply = self.node.get(&format!("/api/v1/deployments/{deployment_id}"), &self.token).await;
        expect_status(&reply, 200, "get a deployment");
        reply.json
    }

    /// The single deployment a delivery created, checked against its pipeline and commit.
    async fn single_run(&self, reply: &single_node::Reply, pipeline_id: u64, commit: &str, what: &str) -> Value {
        expect_status(reply, 202, what);
        assert_eq!(reply.json["duplicate"], false, "{what}: {}", reply.text());
        let deployments: Vec<u64> = reply.json["deployments"].as_array().unwrap().iter().map(|id| id.as_u64().unwrap()).collect();
        assert_eq!(deployments.len(), 1, "{what}: one run: {}", reply.text());
        let deployment = self.deployment(deployments[0]).await;
        assert_eq!(deployment["pipeline_id"], pipeline_id, "{what}: {deployment}");
        assert_eq!(deployment["commit_hash"], commit, "{what}: {deployment}");
        assert_eq!(deployment["status"], "pending", "{what}: {deployment}");
        assert_eq!(deployment["scm"]["source"], "webhook", "{what}: {deployment}");
        let changes = reply.json["changes"].as_array().unwrap();
        assert!(changes.iter().any(|change| change["deployments"] == json!([deployments[0]])), "{what}: {}", reply.text());
        deployment
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_starts_the_runs_it_should() {
    let node = SingleNode::start("webhook-runs").await;
    let hooks = Hooks { node: &node, token: node.admin_token.clone(), latencies: Default::default() };

    // GitHub: the fixtures' repository, with a pipeline for its branch, one for tags and one for
    // release branches (which none of the fixtures touch).
    let github_secret = "gh-secret-7";
    let github = hooks.connect("https://github.com/Codertocat/Hello-World", "github", "master", github_secret).await;
    let github_main = hooks.pipeline(github, "main", None, json!({})).await;
    let github_tags = hooks.pipeline(github, "tags", Some("**"), json!({"trigger_events": ["tag"]})).await;
    hooks.pipeline(github, "releases", Some("release/*"), json!({})).await;
    let github_headers = |event: &str, delivery: &str, body: &[u8]| {
        vec![
            ("x-github-event", event.to_string()),
            ("x-github-delivery", delivery.to_string()),
            ("x-hub-signature-256", sha256_signature(github_secret, body)),
            ("user-agent", "GitHub-Hookshot/044aadd".to_string()),
        ]
    };

    // A push with a wrong or missing signature is refused and runs nothing.
    let push = fixture("github-push.json");
    let mut wrong = github_headers("push", "d-wrong", &push);
    wrong[2].1 = sha256_signature("not-the-secret", &push);
    expect_status(&hooks.deliver("/api/v1/repos/webhook", &push, &wrong).await, 401, "a wrongly signed push");
    let unsigned: Vec<(&str, String)> =
        github_headers("push", "d-unsigned", &push).into_iter().filter(|(name, _)| !name.starts_with("x-hub")).collect();
    expect_status(&hooks.deliver("/api/v1/repos/webhook", &push, &unsigned).await, 401, "an unsigned push");
    assert_eq!(hooks.deployment_count().await, 0, "refused deliveries run nothing");

    // The push to master runs the master pipeline on the pushed commit.
    let reply = hooks.deliver("/api/v1/repos/webhook", &push, &github_headers("push", "gh-push-1", &push)).await;
    let run = hooks.single_run(&reply, github_main, "6113728f27ae82c7b1a177c8d03f9e96e0adf246", "the GitHub push").await;
    assert_eq!(run["scm"]["event"], "push");
    assert_eq!(run["scm"]["git_ref"], "refs/heads/master");
    assert_eq!(run["scm"]["delivery"], "gh-push-1");
    assert_eq!(run["environment"], "staging");
    let change = &reply.json["changes"][0];
    assert!(change["reason"].as_str().unwrap().contains("does not run on push events"), "the tags pipeline says why: {change}");

    // The same delivery again: acknowledged, nothing new.
    let replay = hooks.deliver("/api/v1/repos/webhook", &push, &github_headers("push", "gh-push-1", &push)).await;
    expect_status(&replay, 202, "a replayed delivery");
    assert_eq!(replay.json["duplicate"], true, "{}", replay.text());
    assert_eq!(replay.json["deployments"], json!([]));
    assert_eq!(hooks.deployment_count().await, 1);
    // Another delivery of the same commit (GitHub's "redeliver" keeps the id; this is a second
    // hook) runs nothing either: the commit is already the branch's known head.
    let again = hooks.deliver("/api/v1/repos/webhook", &push, &github_headers("push", "gh-push-2", &push)).await;
    expect_status(&again, 202, "the same commit by another delivery");
    assert_eq!((again.json["duplicate"].clone(), again.json["deployments"].clone()), (json!(false), json!([])));
    assert!(again.json["changes"][0]["reason"].as_str().unwrap().contains("seen before"), "{}", again.text());

    // A tag push (the push fixture moved to a tag) runs only the pipeline that asks for tags.
    let mut tag_payload: Value = serde_json::from_slice(&push).unwrap();
    tag_payload["ref"] = json!("refs/tags/v1.0");
    let tag = serde_json::to_vec(&tag_payload).unwrap();
    let reply = hooks.deliver("/api/v1/repos/webhook", &tag, &github_headers("push", "gh-tag-1", &tag)).await;
    let run = hooks.single_run(&reply, github_tags, "6113728f27ae82c7b1a177c8d03f9e96e0adf246", "a GitHub tag push").await;
    assert_eq!((run["scm"]["event"].clone(), run["scm"]["git_ref"].clone()), (json!("tag"), json!("refs/tags/v1.0")));

    // The tag deletion runs nothing.
    let deletion = fixture("github-push-tag-deleted.json");
    let reply = hooks.deliver("/api/v1/repos/webhook", &deletion, &github_headers("push", "gh-delete-1", &deletion)).await;
    expect_status(&reply, 202, "a tag deletion");
    assert_eq!(reply.json["deployments"], json!([]));
    assert_eq!(reply.json["changes"][0]["kind"], "ignored");
    assert_eq!(hooks.deployment_count().await, 2);

    // The pull request opened: a run of the target branch's pipeline on GitHub's merge ref.
    let opened = fixture("github-pull_request-opened.json");
    let reply = hooks.deliver("/api/v1/repos/webhook", &opened, &github_headers("pull_request", "gh-pr-1", &opened)).await;
    let run = hooks.single_run(&reply, github_main, "ec26c3e57ca3a959ca5aad62de7213c562f8c821", "a pull request opened").await;
    assert_eq!(run["scm"]["event"], "pull_request");
    assert_eq!(run["scm"]["git_ref"], "refs/pull/2/merge");
    assert_eq!(run["scm"]["pull_request"], 2);

    // The synchronize fixture carries the same head commit as the opened one, which has run; on
    // a second repository (reached by id: the payload names the first) it runs on the merge ref.
    let mirror_secret = "mirror-secret";
    let mirror = hooks.connect("https://git.example.com/mirror/hello-world", "github", "master", mirror_secret).await;
    let mirror_main = hooks.pipeline(mirror, "main", None, json!({"preview_environments": true})).await;
    let synchronize = fixture("github-pull_request-synchronize.json");
    let mut headers = github_headers("pull_request", "gh-sync-1", &synchronize);
    headers[2].1 = sha256_signature(mirror_secret, &synchronize);
    let by_id = format!("/api/v1/repos/{mirror}/webhook");
    let reply = hooks.deliver(&by_id, &synchronize, &headers).await;
    let run = hooks.single_run(&reply, mirror_main, "ec26c3e57ca3a959ca5aad62de7213c562f8c821", "a pull request synchronized").await;
    assert_eq!(run["scm"]["git_ref"], "refs/pull/2/merge");
    assert_eq!(run["environment"], "pr-2", "the mirror's pipeline deploys previews");
    let mut unsigned = headers.clone();
    unsigned.retain(|(name, _)| *name != "x-hub-signature-256");
    expect_status(&hooks.deliver(&by_id, &synchronize, &unsigned).await, 401, "an unsigned delivery by id");
    expect_status(&hooks.deliver("/api/v1/repos/999999/webhook", &synchronize, &headers).await, 404, "an unknown repository id");

    // GitLab: the push (delivery id in Idempotency-Key) and the merge request (another project).
    let gitlab_push = fixture("gitlab-push.json");
    let diaspora = hooks.connect("http://example.com/mike/diaspora", "gitlab", "master", "gl-token").await;
    let diaspora_main = hooks.pipeline(diaspora, "main", None, json!({})).await;
    let headers = vec![
        ("x-gitlab-event", "Push Hook".to_string()),
        ("x-gitlab-token", "gl-token".to_string()),
        ("idempotency-key", "gl-push-1".to_string()),
        ("x-gitlab-event-uuid", "gl-event-1".to_string()),
    ];
    let reply = hooks.deliver("/api/v1/repos/webhook", &gitlab_push, &headers).await;
    let run = hooks.single_run(&reply, diaspora_main, "da1560886d4f094c3e6c9ef40349f7d38b5d27d7", "the GitLab push").await;
    assert_eq!(run["scm"]["delivery"], "gl-push-1", "Idempotency-Key is GitLab's delivery id");
    let replay = hooks.deliver("/api/v1/repos/webhook", &gitlab_push, &headers).await;
    assert_eq!((replay.status, replay.json["duplicate"].clone()), (202, json!(true)), "{}", replay.text());
    let mut wrong = headers.clone();
    wrong[1].1 = "gl-tokeN".into();
    expect_status(&hooks.deliver("/api/v1/repos/webhook", &gitlab_push, &wrong).await, 401, "a GitLab push with a wrong token");

    let merge_request = fixture("gitlab-merge_request.json");
    let gitlab_test = hooks.connect("http://example.com/gitlabhq/gitlab-test", "gitlab", "master", "gl-token-2").await;
    let gitlab_test_main = hooks.pipeline(gitlab_test, "main", None, json!({})).await;
    let headers = vec![
        ("x-gitlab-event", "Merge Request Hook".to_string()),
        ("x-gitlab-token", "gl-token-2".to_string()),
        ("x-gitlab-event-uuid", "gl-mr-1".to_string()),
    ];
    let reply = hooks.deliver("/api/v1/repos/webhook", &merge_request, &headers).await;
    let run = hooks.single_run(&reply, gitlab_test_main, "da1560886d4f094c3e6c9ef40349f7d38b5d27d7", "the GitLab merge request").await;
    assert_eq!(run["scm"]["git_ref"], "refs/merge-requests/1/merge");

    // Bitbucket: the push, and the pull request (no merge ref: it runs on the head commit).
    let bitbucket_push = fixture("bitbucket-repo-push.json");
    let public_test = hooks.connect("https://bitbucket.org/martinherren1984/publictestrepo", "bitbucket", "main", "bb-secret").await;
    let public_test_main = hooks.pipeline(public_test, "main", None, json!({})).await;
    let headers = |event: &str, delivery: &str, secret: &str, body: &[u8]| {
        vec![
            ("x-event-key", event.to_string()),
            ("x-request-uuid", delivery.to_string()),
            ("x-hub-signature", sha256_signature(secret, body)),
        ]
    };
    let reply =
        hooks.deliver("/api/v1/repos/webhook", &bitbucket_push, &headers("repo:push", "bb-push-1", "bb-secret", &bitbucket_push)).await;
    let run = hooks.single_run(&reply, public_test_main, "c14c1bb05dfb1fdcdf06b31485fff61b0ea44277", "the Bitbucket push").await;
    assert_eq!(run["scm"]["git_ref"], "refs/heads/main");
    let wrong = headers("repo:push", "bb-push-2", "not-the-secret", &bitbucket_push);
    expect_status(&hooks.deliver("/api/v1/repos/webhook", &bitbucket_push, &wrong).await, 401, "a wrongly signed Bitbucket push");

    let bitbucket_pull = fixture("bitbucket-pullrequest-created.json");
    let collect = hooks.connect("https://bitbucket.org/6543/collect-webhooks", "bitbucket", "niam", "bb-secret-2").await;
    let collect_main = hooks.pipeline(collect, "main", None, json!({})).await;
    let pull_headers = headers("pullrequest:created", "bb-pr-1", "bb-secret-2", &bitbucket_pull);
    let reply = hooks.deliver("/api/v1/repos/webhook", &bitbucket_pull, &pull_headers).await;
    let head = reply.json["changes"][0]["commit"].as_str().expect("the pull request's head").to_string();
    let run = hooks.single_run(&reply, collect_main, &head, "the Bitbucket pull request").await;
    assert_eq!(run["scm"]["git_ref"], "refs/heads/wen-emos", "no merge ref on Bitbucket: the source branch");
    assert_eq!(run["scm"]["pull_request"], 2);
    let replay = hooks.deliver("/api/v1/repos/webhook", &bitbucket_pull, &pull_headers).await;
    assert_eq!((replay.status, replay.json["duplicate"].clone()), (202, json!(true)), "{}", replay.text());

    // A plain git server sends no webhooks: such a repository is polled, and a delivery to it is
    // refused with what to do. A token is kept (sealed) but no commit status is ever sent for it.
    let plain = hooks.connect("https://git.example.com/team/tool.git", "git", "main", "unused").await;
    let shown = hooks.node.get(&format!("/api/v1/repos/{plain}"), &hooks.token).await;
    assert!(shown.json["polled_every_seconds"].as_u64().is_some(), "a plain git repository is polled: {}", shown.text());
    let reply = hooks.deliver(&format!("/api/v1/repos/{plain}/webhook"), &push, &github_headers("push", "git-1", &push)).await;
    expect_status(&reply, 409, "a webhook to a plain git repository");
    assert!(reply.text().contains("polls it with git ls-remote"), "{}", reply.text());
    let with_token = json!({"repo_url": "https://git.example.com/team/other.git", "scm_type": "git", "access_token": "t0ken"});
    let reply = hooks.node.post("/api/v1/repos/connect", &hooks.token, &with_token).await;
    expect_status(&reply, 201, "a plain git repository with an access token");
    assert_eq!((reply.json["access_token"].clone(), reply.json["webhook_events"].clone()), (json!("***"), json!([])), "{}", reply.text());

    // Every run above, and nothing else.
    assert_eq!(hooks.deployment_count().await, 8);

    // Providers give up after about 10 s and expect an answer at once: each delivery is one Raft
    // write. The median is checked against 100 ms (not every delivery: the test machine is shared).
    let mut latencies = hooks.latencies.lock().unwrap().clone();
    latencies.sort();
    let median = latencies[latencies.len() / 2];
    eprintln!("webhook deliveries answered in {latencies:?}");
    assert!(median < Duration::from_millis(100), "the median delivery took {median:?}: {latencies:?}");
}
