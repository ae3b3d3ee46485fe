//! Secrets at rest on a real three-node cluster: configuration secrets and webhook secrets are
//! written through one node and read through the others, a snapshot is taken, the nodes are
//! killed, and then every byte on disk (each node's data directory with its store, Raft log and
//! snapshots, the shared blob directory, configs and logs) is searched for the clear values, raw
//! and base64-encoded; zstd blobs are searched decompressed too. The API must only ever show
//! them masked. The same writes check that every node answers reads identically.

#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use davit_coordinator::store::BackendKind;
use serde_json::{Value, json};
use support::{ClusterOptions, TestCluster, wait_until};

const ALL_THREE: [u64; 3] = [1, 2, 3];

struct Client<'a> {
    cluster: &'a TestCluster,
    token: String,
}

impl Client<'_> {
    async fn request(&self, node_id: u64, method: reqwest::Method, path: &str, body: Option<&Value>) -> (u16, Value, String) {
        let mut request = self.cluster.client.request(method.clone(), self.cluster.url(node_id, path)).bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap_or_else(|error| panic!("{method} {path} via node {node_id}: {error}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null), text)
    }

    /// A write through `node_id` that must get `expected`; returns the body.
    async fn write(&self, node_id: u64, method: reqwest::Method, path: &str, body: &Value, expected: u16) -> Value {
        let (status, json, text) = self.request(node_id, method.clone(), path, Some(body)).await;
        assert_eq!(status, expected, "{method} {path} via node {node_id}: {text}");
        json
    }

    /// A read through `node_id` that must succeed; returns the body and its text.
    async fn read(&self, node_id: u64, path: &str) -> (Value, String) {
        let (status, json, text) = self.request(node_id, reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path} via node {node_id}: {text}");
        (json, text)
    }
}

/// The byte strings that would give a secret away: the value itself, its lower-case hex, and
/// its base64 (standard and URL-safe) at each of the three alignments it could have inside a
/// longer encoded message, less the edge characters that depend on the neighbouring bytes.
fn giveaways(secret: &str) -> Vec<(String, Vec<u8>)> {
    let mut patterns = vec![
        ("clear".to_string(), secret.as_bytes().to_vec()),
        ("hex".to_string(), secret.bytes().map(|byte| format!("{byte:02x}")).collect::<String>().into_bytes()),
    ];
    for (name, engine) in [("base64", base64::engine::general_purpose::STANDARD), ("base64url", base64::engine::general_purpose::URL_SAFE)]
    {
        for offset in 0..3 {
            let mut input = vec![0u8; offset];
            input.extend_from_slice(secret.as_bytes());
            let encoded = engine.encode(&input);
            let encoded = encoded.trim_end_matches('=');
            let skip = [0, 2, 3][offset];
            patterns.push((format!("{name} at offset {offset}"), encoded.as_bytes()[skip..encoded.len() - 2].to_vec()));
        }
    }
    patterns
}

fn files_under(root: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(root).unwrap_or_else(|error| panic!("list {}: {error}", root.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            files_under(&path, found);
        } else {
            found.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// Every (file, value, encoding) under `root` where one of `values` shows; zstd-compressed
/// blobs count with their decompressed bytes.
fn search(root: &Path, values: &[String]) -> (Vec<String>, usize) {
    let mut files = Vec::new();
    files_under(root, &mut files);
    let patterns: Vec<(String, String, Vec<u8>)> = values
        .iter()
        .flat_map(|value| giveaways(value).into_iter().map(move |(encoding, bytes)| (value.clone(), encoding, bytes)))
        .collect();
    let mut hits = Vec::new();
    for file in &files {
        let mut contents = std::fs::read(file).unwrap_or_else(|error| panic!("read {}: {error}", file.display()));
        if file.extension().is_some_and(|extension| extension == "zst")
            && let Ok(decompressed) = zstd::decode_all(contents.as_slice())
        {
            contents.extend_from_slice(&decompressed);
        }
        for (value, encoding, bytes) in &patterns {
            if contains(&contents, bytes) {
                hits.push(format!("{value} ({encoding}) in {}", file.display()));
            }
        }
    }
    (hits, files.len())
}

async fn admin_token(cluster: &TestCluster) -> String {
    let credentials: Value = wait_until("the first admin's credentials file", Duration::from_secs(30), || async {
        ALL_THREE
            .iter()
            .find_map(|node_id| std::fs::read_to_string(cluster.node(*node_id).data_dir().join("initial-admin.json")).ok())
            .and_then(|text| serde_json::from_str(&text).ok())
            .ok_or_else(|| "not written yet".to_string())
    })
    .await;
    let response = cluster.client.post(cluster.url(1, "/api/v1/auth/login")).json(&credentials).send().await.expect("log in");
    assert!(response.status().is_success(), "log in as the first admin: {}", response.status());
    response.json::<Value>().await.expect("login JSON")["token"].as_str().expect("token").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_are_never_on_disk_in_clear_and_every_node_reads_the_same() {
    let mut cluster = TestCluster::start("secrets-at-rest", ClusterOptions::new(BackendKind::Redb)).await;
    let client = Client { token: admin_token(&cluster).await, cluster: &cluster };
    let unique = format!("{:016x}", rand::random::<u64>());
    let db_password = format!("s3cr3t-VALUE-{unique}-db-password");
    let api_key = format!("s3cr3t-VALUE-{unique}-api-key");
    let marked = format!("s3cr3t-VALUE-{unique}-marked-secret");
    let pipeline_secret = format!("s3cr3t-VALUE-{unique}-pipeline-token");
    let webhook_secret = format!("s3cr3t-VALUE-{unique}-webhook");
    let rotated_webhook_secret = format!("s3cr3t-VALUE-{unique}-webhook-rotated");
    let access_token = format!("s3cr3t-VALUE-{unique}-access-token");
    let secrets = vec![
        access_token.clone(),
        db_password.clone(),
        api_key.clone(),
        marked.clone(),
        pipeline_secret.clone(),
        webhook_secret.clone(),
        rotated_webhook_secret.clone(),
    ];
    // A plain value written the same way: it must be found, or the search proves nothing.
    let plain = format!("plain-VALUE-{unique}-db-host");

    // Writes spread over the nodes; each is read back through the others below.
    use reqwest::Method;
    let repo = client
        .write(
            2,
            Method::POST,
            "/api/v1/repos/connect",
            &json!({"repo_url": "https://github.com/org/repo", "branch": "main", "scm_type": "github", "webhook_secret": webhook_secret, "access_token": access_token}),
            201,
        )
        .await;
    let repo_id = repo["repo_id"].as_u64().expect("repo_id");
    let pipeline = client
        .write(
            3,
            Method::POST,
            "/api/v1/pipelines",
            &json!({"name": "production-pipeline", "repo_id": format!("repo{repo_id}"), "branch": "main", "build_command": "mvn clean package", "deploy_strategy": "blue-green"}),
            201,
        )
        .await;
    let pipeline_id = pipeline["pipeline_id"].as_u64().expect("pipeline_id");
    let deployment = client
        .write(
            1,
            Method::POST,
            "/api/v1/deployments",
            &json!({"pipeline_id": format!("pipeline{pipeline_id}"), "commit_hash": "abc123def", "environment": "staging", "config_overrides": {"env": "staging", "db_host": "staging-db.example.com"}}),
            201,
        )
        .await;
    let deployment_id = deployment["deployment_id"].as_u64().expect("deployment_id");
    let written = client
        .write(
            2,
            Method::POST,
            "/api/v1/configs/staging",
            &json!({"db_password": db_password, "api_key": api_key, "feature_flag": {"value": marked, "secret": true}, "db_host": plain}),
            200,
        )
        .await;
    assert_eq!(written["secret_keys"].as_array().map(Vec::len), Some(3), "{written}");
    client
        .write(
            3,
            Method::POST,
            &format!("/api/v1/configs/staging?pipeline_id={pipeline_id}"),
            &json!({"deploy_token": pipeline_secret}),
            200,
        )
        .await;
    // Rotating the webhook secret and moving the repository re-seals it (and the access token).
    client
        .write(
            1,
            Method::PUT,
            &format!("/api/v1/repos/{repo_id}"),
            &json!({"webhook_secret": rotated_webhook_secret, "repo_url": "https://github.com/org/repo-moved"}),
            200,
        )
        .await;

    // Every node answers every read identically, and never with a secret.
    let paths = [
        format!("/api/v1/repos/{repo_id}"),
        "/api/v1/repos".to_string(),
        format!("/api/v1/pipelines/{pipeline_id}"),
        "/api/v1/pipelines".to_string(),
        format!("/api/v1/deployments/{deployment_id}"),
        "/api/v1/deployments".to_string(),
        "/api/v1/configs/staging".to_string(),
        format!("/api/v1/configs/staging?pipeline_id={pipeline_id}"),
        "/api/v1/audit-logs?limit=500".to_string(),
    ];
    for path in &paths {
        let mut answers = Vec::new();
        for node_id in ALL_THREE {
            let (json, text) = client.read(node_id, path).await;
            for secret in &secrets {
                assert!(!text.contains(secret.as_str()), "GET {path} via node {node_id} shows a secret in clear: {text}");
            }
            answers.push((node_id, json));
        }
        for (node_id, json) in &answers[1..] {
            assert_eq!(json, &answers[0].1, "GET {path}: node {node_id} and node {} disagree", answers[0].0);
        }
    }
    let (repo_view, _) = client.read(3, &format!("/api/v1/repos/{repo_id}")).await;
    assert_eq!(repo_view["webhook_secret"], "***");
    assert_eq!(repo_view["access_token"], "***");
    assert_eq!(repo_view["repo_url"], "https://github.com/org/repo-moved");
    let (pipeline_view, _) = client.read(1, &format!("/api/v1/pipelines/{pipeline_id}")).await;
    assert_eq!(pipeline_view["name"], "production-pipeline");
    assert_eq!(pipeline_view["repo_id"], repo_id);
    let (deployment_view, _) = client.read(2, &format!("/api/v1/deployments/{deployment_id}")).await;
    assert_eq!(deployment_view["config_overrides"], json!({"env": "staging", "db_host": "staging-db.example.com"}));
    let (configs, _) = client.read(1, &format!("/api/v1/configs/staging?pipeline_id={pipeline_id}")).await;
    for key in ["db_password", "api_key", "feature_flag", "deploy_token"] {
        assert_eq!(configs["variables"][key]["value"], "***", "{key} must be masked: {configs}");
        assert_eq!(configs["variables"][key]["secret"], true, "{key}");
    }
    assert_eq!(configs["variables"]["db_host"]["value"], plain.as_str());

    // Snapshot, and let every node catch up with the log, so the search covers snapshots, the
    // compacted log and every applied store.
    let snapshot = cluster.admin(2, "snapshot", json!({})).await.expect("snapshot");
    assert!(snapshot["snapshot_index"].as_u64().is_some(), "{snapshot}");
    let leader = cluster.wait_for_agreed_leader(&ALL_THREE, Duration::from_secs(20)).await;
    let target = cluster.status(leader).await.expect("leader status").last_log_index.unwrap_or(0);
    for node_id in ALL_THREE {
        cluster.wait_for_applied(node_id, target, Duration::from_secs(30)).await;
    }
    drop(client);
    for node_id in ALL_THREE {
        cluster.kill_node(node_id);
    }

    // Everything the cluster wrote sits under one directory: node-N/{data,node.toml,node.log},
    // the shared blobs/ and master.key.
    let root = cluster.node(1).data_dir().parent().and_then(Path::parent).expect("the cluster directory").to_path_buf();
    assert!(root.join("blobs").is_dir() && root.join("node-3").join("data").is_dir(), "unexpected layout under {}", root.display());
    let (plain_hits, _) = search(&root, std::slice::from_ref(&plain));
    assert!(
        plain_hits.iter().any(|hit| hit.contains("/data/")),
        "the plain control value is in no data directory, so the search cannot see stored values: {plain_hits:?}"
    );
    let (hits, files) = search(&root, &secrets);
    assert!(files > 10, "only {files} files under {}", root.display());
    assert!(hits.is_empty(), "secrets on disk:\n{}", hits.join("\n"));
}

#[test]
fn the_search_finds_a_secret_inside_any_base64_message() {
    let secret = "s3cr3t-VALUE-0123456789abcdef";
    for prefix in 0..7 {
        for suffix in 0..4 {
            let mut message = vec![b'{'; prefix];
            message.extend_from_slice(secret.as_bytes());
            message.extend(std::iter::repeat_n(b'}', suffix));
            for engine in [base64::engine::general_purpose::STANDARD, base64::engine::general_purpose::URL_SAFE] {
                let encoded = engine.encode(&message);
                assert!(
                    giveaways(secret).iter().any(|(_, pattern)| contains(encoded.as_bytes(), pattern)),
                    "missed the secret in {encoded} (prefix {prefix}, suffix {suffix})"
                );
            }
        }
    }
}
