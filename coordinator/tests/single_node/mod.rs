//! One real `davit up` process for the REST tests, on its own loopback address, with a known
//! first admin (`DAVIT_ADMIN_USER` / `DAVIT_ADMIN_PASSWORD`). Tests talk to it only over HTTP.
//! Dropping a `SingleNode` kills the process; a failing test keeps its directory and prints the
//! end of the node's log.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Ports of every single node. Each node has its own address 127.A.B.1 with A in 230..=249, a
/// block the cluster harness (`support`, 127.20-219.x.y) never uses.
const HTTP_PORT: u16 = 7710;
const GRPC_PORT: u16 = 7711;

pub const ADMIN_USERNAME: &str = "admin";

/// What a request got back.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub bytes: Vec<u8>,
    /// The body as JSON, or `Value::Null` when it is not JSON.
    pub json: Value,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The `error.field` of an error body.
    pub fn error_field(&self) -> Option<&str> {
        self.json["error"]["field"].as_str()
    }

    pub fn error_code(&self) -> Option<&str> {
        self.json["error"]["code"].as_str()
    }
}

pub struct SingleNode {
    root: tempfile::TempDir,
    ip: Ipv4Addr,
    child: Option<Child>,
    pub client: reqwest::Client,
    pub admin_password: String,
    /// A login token of the first admin.
    pub admin_token: String,
    name: String,
    /// Further arguments of `davit up`.
    extra_args: Vec<String>,
}

fn allocate_address() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..1000 {
        let value = seed.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919)) % (20 * 250);
        let ip = Ipv4Addr::new(127, 230 + (value / 250) as u8, 1 + (value % 250) as u8, 1);
        if [HTTP_PORT, GRPC_PORT].iter().all(|port| TcpListener::bind(SocketAddrV4::new(ip, *port)).is_ok()) {
            return ip;
        }
    }
    panic!("found no free 127.x.y.1 with ports {HTTP_PORT} and {GRPC_PORT} after 1000 tries");
}

impl SingleNode {
    /// Start `davit up` without its embedded agent (API tests must not run builds) and wait
    /// until the first admin can log in.
    pub async fn start(name: &str) -> SingleNode {
        SingleNode::start_with(name, &["--no-agent"]).await
    }

    /// Start `davit up` with these further arguments.
    pub async fn start_with(name: &str, extra_args: &[&str]) -> SingleNode {
        let root = tempfile::Builder::new().prefix(&format!("davit-{name}-")).tempdir().expect("create the test directory");
        let admin_password = format!("pw-{}-{}", name, std::process::id());
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(2))
            .no_proxy()
            .build()
            .expect("build the HTTP client");
        let mut node = SingleNode {
            root,
            ip: Ipv4Addr::LOCALHOST,
            child: None,
            client,
            admin_password,
            admin_token: String::new(),
            name: name.into(),
            extra_args: extra_args.iter().map(|arg| arg.to_string()).collect(),
        };
        // Another process may take the address between the check and the bind: try a few.
        for attempt in 0.. {
            node.ip = allocate_address();
            node.spawn();
            match node.wait_for_admin_login(Duration::from_secs(60)).await {
                Ok(token) => {
                    node.admin_token = token;
                    return node;
                }
                Err(error) if attempt < 3 && node.exited() => {
                    eprintln!("{name}: davit up exited at start ({error}); trying another address")
                }
                Err(error) => panic!("{name}: davit up did not become usable: {error}\n{}", node.log_tail(60)),
            }
        }
        unreachable!()
    }

    /// Start the process again on the same address and data directory (after `kill`).
    pub async fn restart(&mut self) {
        self.spawn();
        self.admin_token = self
            .wait_for_admin_login(Duration::from_secs(60))
            .await
            .unwrap_or_else(|error| panic!("{}: restarted node is not usable: {error}\n{}", self.name, self.log_tail(60)));
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the node is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("open the node log");
        let child = Command::new(env!("CARGO_BIN_EXE_davit"))
            .arg("up")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--http")
            .arg(self.http_addr())
            .arg("--grpc")
            .arg(format!("{}:{GRPC_PORT}", self.ip))
            .args(&self.extra_args)
            .env("DAVIT_ADMIN_USER", ADMIN_USERNAME)
            .env("DAVIT_ADMIN_PASSWORD", &self.admin_password)
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .env_remove("DAVIT_MASTER_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("clone the log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start davit up");
        self.child = Some(child);
    }

    fn exited(&mut self) -> bool {
        match self.child.as_mut().map(|child| child.try_wait()) {
            Some(Ok(Some(_))) => {
                self.child = None;
                true
            }
            _ => false,
        }
    }

    async fn wait_for_admin_login(&mut self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let body = serde_json::json!({ "username": ADMIN_USERNAME, "password": self.admin_password });
        loop {
            if self.exited() {
                return Err("the process exited".into());
            }
            let last = match self.client.post(self.url("/api/v1/auth/login")).json(&body).send().await {
                Ok(response) if response.status().is_success() => {
                    let json: Value = response.json().await.map_err(|e| e.to_string())?;
                    return json["token"].as_str().map(str::to_string).ok_or_else(|| format!("login answer without a token: {json}"));
                }
                Ok(response) => format!("{} {}", response.status(), response.text().await.unwrap_or_default()),
                Err(error) => error.to_string(),
            };
            if Instant::now() > deadline {
                return Err(format!("timed out; last answer: {last}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn grpc_addr(&self) -> String {
        format!("{}:{GRPC_PORT}", self.ip)
    }

    pub fn http_addr(&self) -> String {
        format!("{}:{HTTP_PORT}", self.ip)
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.http_addr())
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("node.log")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGKILL the process and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Send one request. `body` is sent as JSON; use [`SingleNode::send`] for anything else.
    pub async fn call(&self, method: reqwest::Method, path: &str, token: Option<&str>, body: Option<&Value>) -> Reply {
        let mut request = self.client.request(method, self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        self.send(request).await
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.unwrap_or_else(|error| panic!("{}: request failed: {error}\n{}", self.name, self.log_tail(30)));
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.bytes().await.expect("read the response body").to_vec();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply { status, headers, bytes, json }
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.call(reqwest::Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: &Value) -> Reply {
        self.call(reqwest::Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn put(&self, path: &str, token: &str, body: &Value) -> Reply {
        self.call(reqwest::Method::PUT, path, Some(token), Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Reply {
        self.call(reqwest::Method::DELETE, path, Some(token), None).await
    }

    /// Log in and return the token; panics unless the login succeeds.
    /// Poll a deployment (as the admin, up to 120 s) until its status is one of `done`.
    pub async fn wait_for_status(&self, deployment_id: u64, done: &[&str]) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let reply = self.get(&format!("/api/v1/deployments/{deployment_id}"), &self.admin_token).await;
            if done.contains(&reply.json["status"].as_str().unwrap_or_default()) {
                return reply.json;
            }
            assert!(Instant::now() < deadline, "deployment {deployment_id} stayed {}", reply.text());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn login(&self, username: &str, password: &str) -> String {
        let reply = self
            .call(reqwest::Method::POST, "/api/v1/auth/login", None, Some(&serde_json::json!({"username": username, "password": password})))
            .await;
        assert_eq!(reply.status, 200, "login as {username}: {}", reply.text());
        reply.json["token"].as_str().expect("a token").to_string()
    }

    /// Create a user as the admin and log in as them; returns (user id, token).
    pub async fn create_user(&self, username: &str, password: &str, role: &str) -> (u64, String) {
        let body =
            serde_json::json!({"username": username, "email": format!("{username}@example.com"), "password": password, "role": role});
        let reply = self.post("/api/v1/users", &self.admin_token, &body).await;
        assert_eq!(reply.status, 201, "create user {username}: {}", reply.text());
        let user_id = reply.json["user_id"].as_u64().expect("user_id");
        (user_id, self.login(username, password).await)
    }
}

impl Drop for SingleNode {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            self.root.disable_cleanup(true);
            eprintln!("\n===== {} failed; its directory is kept at {} =====", self.name, self.root.path().display());
            eprintln!("{}", self.log_tail(80));
        }
    }
}

/// Panic with the reply unless its status is `expected`.
#[track_caller]
pub fn expect_status(reply: &Reply, expected: u16, what: &str) {
    assert_eq!(reply.status, expected, "{what}: expected {expected}, got {} {}", reply.status, reply.text());
}

/// Panic unless the reply is a 400 naming `field`, in the API's error shape.
#[track_caller]
pub fn expect_field_error(reply: &Reply, field: &str, what: &str) {
    expect_status(reply, 400, what);
    assert_eq!(reply.error_field(), Some(field), "{what}: the error names the wrong field: {}", reply.text());
    assert!(reply.json["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: no error message: {}", reply.text());
}
