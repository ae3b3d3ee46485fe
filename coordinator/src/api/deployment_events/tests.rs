//! The events endpoint and the gRPC watch against a whole coordinator in this process
//! (`server::serve` on loopback ports: REST, gRPC, Raft), with events appended through
//! `Command::RecordDeploymentEvents` and deployments ended through `SetDeploymentStatus`, as the
//! rollout controller and the API do.

use std::collections::VecDeque;
use std::time::Duration;

use davit_proto::api::deployment_service_client::DeploymentServiceClient;
use davit_proto::api::{DeploymentEventMessage, WatchDeploymentRequest};
use serde_json::{Value, json};

use crate::cli::progress::{SseMessage, SseParser};
use crate::node::{Node, Requester};
use crate::server::RunningServer;
use crate::state::Command;
use crate::state::command::NewDeploymentEvent;
use crate::state::records::{DeploymentStatus, event_kind};

struct Coordinator {
    server: RunningServer,
    http: reqwest::Client,
    token: String,
    _dir: tempfile::TempDir,
}

impl Coordinator {
    async fn start() -> Coordinator {
        let dir = tempfile::tempdir().expect("temp dir");
        let config: crate::config::NodeConfig = toml::from_str(&format!(
            "node_id = 1\nhttp_addr = \"127.0.0.1:0\"\ngrpc_addr = \"127.0.0.1:0\"\ndata_dir = {:?}\n\
             [raft]\nheartbeat_interval_ms = 50\nelection_timeout_min_ms = 150\nelection_timeout_max_ms = 300\n",
            dir.path().join("data")
        ))
        .expect("test node configuration");
        let server = crate::server::serve(config).await.expect("start the coordinator");
        let mut credentials = server.admin_credentials.clone();
        let credentials = tokio::time::timeout(Duration::from_secs(30), credentials.wait_for(|created| created.is_some()))
            .await
            .expect("the first admin within 30 s")
            .expect("credentials channel")
            .clone()
            .expect("created");
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().expect("HTTP client");
        let login: Value = http
            .post(format!("http://{}/api/v1/auth/login", server.http_addr))
            .json(&json!({"username": credentials.username, "password": credentials.password}))
            .send()
            .await
            .expect("log in")
            .json()
            .await
            .expect("login JSON");
        let token = login["token"].as_str().expect("a token").to_string();
        Coordinator { server, http, token, _dir: dir }
    }

    fn node(&self) -> &Node {
        &self.server.node
    }

    async fn propose(&self, command: Command) -> Option<u64> {
        let (outcome, _) = self.node().propose(&Requester::system(), command).await.expect("proposed");
        outcome.result.expect("applied").id
    }

    /// A pipeline (its repository has a webhook secret, so nothing polls it) and a deployment
    /// of it; no agent runs its build, so it stays queued until the test ends it.
    async fn new_deployment(&self) -> u64 {
        crate::node::testing::deployments_of_a_new_pipeline(self.node(), 1).await[0]
    }

    async fn record(&self, deployment_id: u64, events: Vec<NewDeploymentEvent>) {
        self.propose(Command::RecordDeploymentEvents { deployment_id, events }).await;
    }

    async fn end(&self, deployment_id: u64, status: DeploymentStatus) {
        self.propose(Command::SetDeploymentStatus { deployment_id, status, reason: Some("ended by the test".into()) }).await;
    }

    fn get(&self, path_and_query: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("http://{}{path_and_query}", self.server.http_addr)).bearer_auth(&self.token)
    }

    async fn json(&self, path_and_query: &str) -> (u16, Value) {
        let response = self.get(path_and_query).send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("a JSON body"))
    }

    async fn stream(&self, request: reqwest::RequestBuilder) -> EventStream {
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), 200);
        let content_type = response.headers().get("content-type").and_then(|value| value.to_str().ok()).unwrap_or_default().to_string();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        EventStream { response, parser: SseParser::default(), received: VecDeque::new() }
    }
}

fn host_event(kind: &str, host: u64, region: &str, weight: Option<u8>) -> NewDeploymentEvent {
    NewDeploymentEvent {
        host: Some(host),
        region: Some(region.into()),
        weight,
        ..NewDeploymentEvent::new(kind, format!("{kind} on {host}"))
    }
}

struct EventStream {
    response: reqwest::Response,
    parser: SseParser,
    received: VecDeque<SseMessage>,
}

impl EventStream {
    /// The next event, or `None` when the server ended the response.
    async fn next(&mut self) -> Option<SseMessage> {
        loop {
            if let Some(message) = self.received.pop_front() {
                return Some(message);
            }
            let chunk =
                tokio::time::timeout(Duration::from_secs(10), self.response.chunk()).await.expect("an event or the end within 10 s");
            match chunk.expect("the stream reads") {
                Some(bytes) => self.received.extend(self.parser.push(&bytes)),
                None => return None,
            }
        }
    }

    /// The next event, parsed, checked to carry its `seq` as `id` and its kind as `event`.
    async fn next_event(&mut self) -> Value {
        let message = self.next().await.expect("another event");
        let data: Value = serde_json::from_str(&message.data).expect("JSON data");
        assert_eq!(message.id, Some(data["seq"].to_string()), "{message:?}");
        assert_eq!(message.event, data["kind"].as_str().unwrap(), "{message:?}");
        data
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_live_in_order_resume_after_last_event_id_and_end_with_the_deployment() {
    let coordinator = Coordinator::start().await;
    let deployment_id = coordinator.new_deployment().await;
    let path = format!("/api/v1/deployments/{deployment_id}/events");

    let mut stream = coordinator.stream(coordinator.get(&format!("{path}?follow=true"))).await;
    let queued = stream.next_event().await;
    assert_eq!((queued["seq"].as_u64(), queued["kind"].as_str()), (Some(1), Some(event_kind::QUEUED)));
    assert_eq!(queued["deployment_id"], deployment_id);
    // Appended while the client listens: they arrive, in order, with their fields.
    coordinator
        .record(
            deployment_id,
            vec![host_event(event_kind::HOST_STARTED, 1, "eu", None), host_event(event_kind::WEIGHT_CHANGED, 1, "eu", Some(10))],
        )
        .await;
    let started = stream.next_event().await;
    assert_eq!((started["seq"].as_u64(), started["kind"].as_str(), started["host"].as_u64()), (Some(2), Some("host_started"), Some(1)));
    let weight = stream.next_event().await;
    assert_eq!((weight["seq"].as_u64(), weight["region"].as_str(), weight["weight"].as_u64()), (Some(3), Some("eu"), Some(10)));
    drop(stream);

    // Recorded while nobody listens; a client that saw up to 3 resumes with exactly 4.
    coordinator.record(deployment_id, vec![host_event(event_kind::HOST_SWITCHED, 1, "eu", Some(100))]).await;
    let resumed = coordinator.get(&path).header("accept", "text/event-stream").header("last-event-id", "3");
    let mut stream = coordinator.stream(resumed).await;
    let switched = stream.next_event().await;
    assert_eq!((switched["seq"].as_u64(), switched["kind"].as_str()), (Some(4), Some("host_switched")));

    // The deployment ends: its last event, then the end of the response.
    coordinator.end(deployment_id, DeploymentStatus::Failed).await;
    let failed = stream.next_event().await;
    assert_eq!((failed["seq"].as_u64(), failed["kind"].as_str()), (Some(5), Some(event_kind::FAILED)));
    assert_eq!(failed["message"], "ended by the test");
    assert!(stream.next().await.is_none(), "the stream ends after the deployment's last event");

    // After the end: `?after=` resumes as the header does, and a follower that has seen
    // everything gets an empty stream that ends at once.
    let mut stream = coordinator.stream(coordinator.get(&format!("{path}?follow=true&after=3"))).await;
    assert_eq!(stream.next_event().await["seq"], 4);
    assert_eq!(stream.next_event().await["seq"], 5);
    assert!(stream.next().await.is_none());
    let mut stream = coordinator.stream(coordinator.get(&format!("{path}?follow=true")).header("last-event-id", "5")).await;
    assert!(stream.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_page_as_json_and_unknown_deployments_are_404() {
    let coordinator = Coordinator::start().await;
    let deployment_id = coordinator.new_deployment().await;
    let events = (1..=6).map(|host| host_event(event_kind::HOST_HEALTHY, host, "us", None)).collect();
    coordinator.record(deployment_id, events).await;
    let path = format!("/api/v1/deployments/{deployment_id}/events");

    let mut seen = Vec::new();
    let mut cursor = String::new();
    for expected_cursor in [Some("3"), Some("6"), None] {
        let (status, page) = coordinator.json(&format!("{path}?limit=3&cursor={cursor}")).await;
        assert_eq!(status, 200, "{page}");
        seen.extend(page["items"].as_array().unwrap().iter().map(|event| event["seq"].as_u64().unwrap()));
        assert_eq!(page["next_cursor"].as_str(), expected_cursor, "{page}");
        cursor = page["next_cursor"].as_str().unwrap_or_default().to_string();
    }
    assert_eq!(seen, (1..=7).collect::<Vec<u64>>(), "queued, then the six recorded, each once");
    let (_, page) = coordinator.json(&format!("{path}?after=5")).await;
    assert_eq!(page["items"].as_array().unwrap().iter().map(|event| event["seq"].as_u64().unwrap()).collect::<Vec<_>>(), vec![6, 7]);
    assert_eq!(page["items"][0]["region"], "us");

    for missing in ["/api/v1/deployments/999/events", "/api/v1/deployments/999/events?follow=true"] {
        let (status, body) = coordinator.json(missing).await;
        assert_eq!(status, 404, "{missing}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
        assert_eq!(body["error"]["message"], "deployment 999 not found");
    }
    let (status, body) = coordinator.json(&format!("{path}?limit=0")).await;
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("limit")));
    let anonymous = coordinator.http.get(format!("http://{}{path}", coordinator.server.http_addr)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_watch_streams_the_same_events_and_ends_with_the_deployment() {
    let coordinator = Coordinator::start().await;
    let deployment_id = coordinator.new_deployment().await;
    let mut client = DeploymentServiceClient::connect(format!("http://{}", coordinator.server.grpc_addr)).await.expect("gRPC connects");
    let request = |deployment_id, after_seq, token: Option<&str>| {
        let mut request = tonic::Request::new(WatchDeploymentRequest { deployment_id, after_seq });
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    };
    let refused = client.watch_deployment(request(deployment_id, 0, None)).await.expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let missing = client.watch_deployment(request(999, 0, Some(&coordinator.token))).await.expect_err("no such deployment");
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing}");

    // After the queued event: only what comes next, live.
    let mut stream = client.watch_deployment(request(deployment_id, 1, Some(&coordinator.token))).await.expect("watch").into_inner();
    coordinator.record(deployment_id, vec![host_event(event_kind::CANARY_STEP, 4, "ap", Some(50))]).await;
    let step = next_message(&mut stream).await.expect("the canary step");
    assert_eq!(
        (step.seq, step.kind.as_str(), step.host, step.region.as_deref(), step.weight),
        (2, "canary_step", Some(4), Some("ap"), Some(50))
    );
    assert_eq!(step.deployment_id, deployment_id);
    coordinator.end(deployment_id, DeploymentStatus::RolledBack).await;
    let ended = next_message(&mut stream).await.expect("the end");
    assert_eq!((ended.seq, ended.kind.as_str(), ended.host), (3, event_kind::ROLLED_BACK, None));
    assert!(next_message(&mut stream).await.is_none(), "the watch ends with the deployment");
}

async fn next_message(stream: &mut tonic::Streaming<DeploymentEventMessage>) -> Option<DeploymentEventMessage> {
    tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("a message within 10 s").expect("the stream reads")
}
