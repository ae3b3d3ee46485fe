//! The configs shipped in `cluster-configs/` work as shipped: copied as they are into an empty
//! directory, each node started with `davit serve --config`, the cluster elects a leader, the
//! first admin logs in, and a write through one node is read back from every other.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn http_addresses(config_dir: &Path) -> Vec<(PathBuf, String)> {
    let mut configs: Vec<PathBuf> = std::fs::read_dir(config_dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    configs.sort();
    configs
        .into_iter()
        .map(|path| {
            let config: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let http = config["http_addr"].as_str().unwrap().to_string();
            (path, http)
        })
        .collect()
}

async fn run_shipped_cluster(name: &str) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-configs").join(name);
    let directory = tempfile::Builder::new().prefix(&format!("davit-shipped-{name}-")).tempdir().unwrap();
    for (config, _) in http_addresses(&source) {
        std::fs::copy(&config, directory.path().join(config.file_name().unwrap())).unwrap();
    }
    let nodes = http_addresses(directory.path());
    let mut children = Nodes(Vec::new());
    for (config, _) in &nodes {
        let log = std::fs::File::create(config.with_extension("log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_davit"))
            .args(["serve", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start davit");
        children.0.push(child);
    }
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let logs = || {
        nodes
            .iter()
            .map(|(config, _)| std::fs::read_to_string(config.with_extension("log")).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Every node ready (knows the leader), and the leader has written the admin's credentials.
    let credentials_file = directory.path().join("data");
    let token = loop {
        assert!(Instant::now() < deadline, "the shipped {name} cluster did not come up within 60 s; logs:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut all_ready = true;
        for (_, http) in &nodes {
            let ready = client.get(format!("http://{http}/readyz")).send().await.map(|r| r.status().is_success()).unwrap_or(false);
            all_ready &= ready;
        }
        if !all_ready {
            continue;
        }
        let credentials = std::fs::read_dir(&credentials_file).unwrap().flatten().find_map(|entry| {
            let text = std::fs::read_to_string(entry.path().join("initial-admin.json")).ok()?;
            serde_json::from_str::<serde_json::Value>(&text).ok()
        });
        let Some(credentials) = credentials else { continue };
        let login = client.post(format!("http://{}/api/v1/auth/login", nodes[0].1)).json(&credentials).send().await.unwrap();
        if login.status().is_success() {
            break login.json::<serde_json::Value>().await.unwrap()["token"].as_str().unwrap().to_string();
        }
    };
    let last = &nodes.last().unwrap().1;
    let written = client
        .post(format!("http://{last}/api/v1/configs/staging"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "region": "shipped" }))
        .send()
        .await
        .unwrap();
    assert!(written.status().is_success(), "write through the last node: {}", written.text().await.unwrap());
    for (_, http) in &nodes {
        let read: serde_json::Value =
            client.get(format!("http://{http}/api/v1/configs/staging")).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
        assert_eq!(read["variables"]["region"]["value"], "shipped", "node at {http}: {read}");
    }
    let status: serde_json::Value =
        client.get(format!("http://{}/api/v1/cluster/status", nodes[0].1)).bearer_auth(&token).send().await.unwrap().json().await.unwrap();
    assert_eq!(status["voters"].as_array().unwrap().len(), nodes.len(), "{status}");
    drop(children);
}

// Both clusters use fixed ports on 127.0.0.1 (7710-7731 and 7810-7851), so they run one after
// the other in one test rather than in parallel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shipped_local_3_and_regions_5_configs_work_as_shipped() {
    run_shipped_cluster("local-3").await;
    run_shipped_cluster("regions-5").await;
}
