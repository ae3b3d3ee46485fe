//! The audit log's hash chain against someone with write access to a stopped node's store:
//! an edited entry and a removed last entry are both reported by `davit audit verify
//! --data-dir`, which exits non-zero and names the entry; an untouched store verifies clean.

#[allow(dead_code)]
mod single_node;

use std::path::Path;
use std::process::Command;

use davit_coordinator::state::codec::{decode, encode, id_key, key_id};
use davit_coordinator::state::records::AuditLog;
use davit_coordinator::store::{BackendKind, Durability, Table, WriteBatch, full_range, open_backend};
use serde_json::json;
use single_node::{SingleNode, expect_status};

/// `davit audit verify --data-dir DIR`: (exit code, standard output and error).
fn verify(data_dir: &Path) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_davit"))
        .args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("run davit audit verify");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

/// A node with some history: users, a repository, a pipeline, a deployment and configuration.
async fn node_with_history(name: &str) -> SingleNode {
    let node = SingleNode::start(name).await;
    let admin = node.admin_token.clone();
    let (_, developer) = node.create_user("dev", "developer-pw", "developer").await;
    let repo = node
        .post(
            "/api/v1/repos/connect",
            &developer,
            &json!({"repo_url": "https://github.com/org/repo", "scm_type": "github", "webhook_secret": "secret_key"}),
        )
        .await;
    expect_status(&repo, 201, "connect");
    let pipeline = node
        .post(
            "/api/v1/pipelines",
            &developer,
            &json!({"name": "production-pipeline", "repo_id": repo.json["repo_id"], "deploy_strategy": "blue-green"}),
        )
        .await;
    expect_status(&pipeline, 201, "create a pipeline");
    let deployment = node
        .post(
            "/api/v1/deployments",
            &developer,
            &json!({"pipeline_id": pipeline.json["pipeline_id"], "commit_hash": "abc123def", "environment": "staging"}),
        )
        .await;
    expect_status(&deployment, 201, "deploy");
    expect_status(
        &node.post("/api/v1/configs/staging", &admin, &json!({"db_password": "new_password", "api_key": "12345"})).await,
        200,
        "configs",
    );
    let verified = node.get("/api/v1/audit-logs/verify", &admin).await;
    expect_status(&verified, 200, "verify through the API");
    assert_eq!(verified.json["ok"], true, "{}", verified.text());
    node
}

fn audit_entries(data_dir: &Path) -> Vec<AuditLog> {
    let backend = open_backend(BackendKind::Redb, &data_dir.join("store")).expect("open the stopped node's store");
    backend
        .scan(Table::AuditLogs, full_range(), usize::MAX, false)
        .expect("scan the audit log")
        .into_iter()
        .map(|(key, bytes)| {
            let entry: AuditLog = decode(Table::AuditLogs, &bytes).expect("decode an audit entry");
            assert_eq!(key_id(&key), Some(entry.audit_id), "an entry under another id's key");
            entry
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_audit_entry_is_detected_and_named() {
    let mut node = node_with_history("audit-edit").await;
    node.kill();
    let data_dir = node.data_dir();

    let (code, output) = verify(&data_dir);
    assert_eq!(code, 0, "an untouched store must verify: {output}");
    assert!(output.contains("intact"), "{output}");

    let entries = audit_entries(&data_dir);
    assert!(entries.len() >= 8, "too little history to tamper with: {} entries", entries.len());
    let mut victim = entries.iter().find(|entry| entry.action == "pipeline.create").expect("a pipeline.create entry").clone();
    assert!(victim.audit_id < entries.last().unwrap().audit_id, "pick an entry with successors");
    victim.details = format!("{} (nothing to see here)", victim.details);
    {
        let backend = open_backend(BackendKind::Redb, &data_dir.join("store")).expect("open the store");
        let mut batch = WriteBatch::new();
        batch.put(Table::AuditLogs, id_key(victim.audit_id).to_vec(), encode(&victim));
        backend.write(batch, Durability::Immediate).expect("write the edited entry");
    }

    let (code, output) = verify(&data_dir);
    assert_ne!(code, 0, "an edited entry must fail verification: {output}");
    assert!(output.contains(&format!("entry {}", victim.audit_id)), "the report must name entry {}: {output}", victim.audit_id);
    assert!(output.contains("TAMPERED"), "{output}");

    // The running node reports the same through the API.
    node.restart().await;
    let verified = node.get("/api/v1/audit-logs/verify", &node.admin_token).await;
    expect_status(&verified, 200, "verify after the edit");
    assert_eq!(verified.json["ok"], false, "{}", verified.text());
    assert_eq!(verified.json["first_bad_entry"], victim.audit_id, "{}", verified.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_last_audit_entry_is_detected_and_named() {
    let mut node = node_with_history("audit-truncate").await;
    node.kill();
    let data_dir = node.data_dir();
    let entries = audit_entries(&data_dir);
    let last = entries.last().expect("entries").audit_id;
    {
        let backend = open_backend(BackendKind::Redb, &data_dir.join("store")).expect("open the store");
        let mut batch = WriteBatch::new();
        batch.delete(Table::AuditLogs, id_key(last).to_vec());
        backend.write(batch, Durability::Immediate).expect("delete the last entry");
    }
    assert_eq!(audit_entries(&data_dir).len(), entries.len() - 1);

    let (code, output) = verify(&data_dir);
    assert_ne!(code, 0, "a removed last entry must fail verification: {output}");
    assert!(output.contains(&format!("entry {last}")), "the report must name entry {last}: {output}");
}
