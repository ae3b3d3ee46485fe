//! A service's traffic switch: a small HTTP/1 reverse proxy that owns the service's public port
//! and sends each request to one release, chosen by weight with smooth weighted round robin
//! (so that 10 % is every tenth request, not 10 % on average). It counts every answer per
//! release, and knows how many requests each release has in flight so that a release is stopped
//! only once it has none. It never buffers a body and never retries a request that has one.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Bytes, Incoming};
use hyper::{HeaderMap, Request, Response, StatusCode, Uri, header};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::traffic_stats::TrafficStatsStore;
use crate::job_spec::TrafficStats;
use crate::log_shipping::now_millis;

pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// How long the switch waits for a release to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle keep-alive connections to releases are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers that describe one connection, not the request: never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"];

struct Backend {
    release: String,
    port: u16,
    weight: i64,
    /// Smooth weighted round robin's running score.
    current: i64,
}

struct Shared {
    service: String,
    backends: Mutex<Vec<Backend>>,
    /// Requests in flight per release, kept after a release leaves the routing so that
    /// stopping it can wait for them.
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    stats: Mutex<TrafficStatsStore>,
    client: Client<HttpConnector, ProxyBody>,
}

/// A running switch; dropping it (or `close`) stops accepting connections.
pub struct TrafficSwitch {
    shared: Arc<Shared>,
    address: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for TrafficSwitch {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TrafficSwitch {
    /// Bind `address` and start serving (answering 503 until routing is set).
    pub async fn bind(service: &str, address: SocketAddr) -> Result<TrafficSwitch, String> {
        let listener = TcpListener::bind(address).await.map_err(|error| {
            format!(
                "the traffic switch of service {service} cannot listen on {address}: {error}; free the port, or choose another \
                 public_port or the agent's service_address"
            )
        })?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE_TIMEOUT).build(connector);
        let shared = Arc::new(Shared {
            service: service.to_string(),
            backends: Mutex::new(Vec::new()),
            in_flight: Mutex::new(HashMap::new()),
            stats: Mutex::new(TrafficStatsStore::default()),
            client,
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), shutdown.clone()));
        Ok(TrafficSwitch { shared, address, shutdown })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Route by `weights` (release -> percent) to the releases in `ports` (release -> host
    /// port on 127.0.0.1); a weighted release without a port takes nothing.
    pub fn set_routing(&self, weights: &BTreeMap<String, u8>, ports: &HashMap<String, u16>) {
        let backends = weights
            .iter()
            .filter(|(_, weight)| **weight > 0)
            .filter_map(|(release, weight)| {
                ports.get(release).map(|port| Backend { release: release.clone(), port: *port, weight: i64::from(*weight), current: 0 })
            })
            .collect();
        *self.shared.backends.lock().expect("backends lock") = backends;
    }

    /// Requests to `release` whose answers have not been fully sent yet.
    pub fn in_flight(&self, release: &str) -> usize {
        self.shared.in_flight.lock().expect("in-flight lock").get(release).map_or(0, |count| count.load(Ordering::SeqCst))
    }

    /// Wait until `release` has no request in flight, at most `bound`; false when it still had.
    pub async fn drain(&self, release: &str, bound: Duration) -> bool {
        let deadline = Instant::now() + bound;
        while self.in_flight(release) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Counters since `since_ms` for `release` and for every other release.
    pub fn stats(&self, release: &str, since_ms: i64) -> TrafficStats {
        let stats = self.shared.stats.lock().expect("stats lock");
        TrafficStats { release: stats.counts(since_ms, |name| name == release), others: stats.counts(since_ms, |name| name != release) }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(service = %shared.service, %error, "the traffic switch could not accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (stream, peer) = stream;
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| handle(shared.clone(), peer, request));
            let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = &mut connection => {}
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
                }
            }
        });
    }
}

/// Decrements a release's in-flight count when the answer's body is done or dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    /// The next release by smooth weighted round robin, skipping `exclude`, with the request
    /// already counted in flight: counted under the routing lock, so that once a release is out
    /// of the routing, its in-flight count covers every request that was sent its way.
    fn pick(&self, exclude: Option<&str>) -> Option<(String, u16, InFlight)> {
        let mut backends = self.backends.lock().expect("backends lock");
        let eligible = |backend: &Backend| exclude != Some(backend.release.as_str());
        let total: i64 = backends.iter().filter(|backend| eligible(backend)).map(|backend| backend.weight).sum();
        if total == 0 {
            return None;
        }
        for backend in backends.iter_mut().filter(|backend| eligible(backend)) {
            backend.current += backend.weight;
        }
        let chosen = backends.iter_mut().filter(|backend| eligible(backend)).max_by_key(|backend| backend.current)?;
        chosen.current -= total;
        let counter = self.in_flight.lock().expect("in-flight lock").entry(chosen.release.clone()).or_default().clone();
        counter.fetch_add(1, Ordering::SeqCst);
        Some((chosen.release.clone(), chosen.port, InFlight(counter)))
    }

    fn record(&self, release: &str, started: Instant, server_error: bool) {
        let micros = started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        self.stats.lock().expect("stats lock").record(release, now_millis(), micros, server_error);
    }
}

fn plain(status: StatusCode, text: String) -> Response<ProxyBody> {
    let mut response = Response::new(Full::new(Bytes::from(text + "\n")).map_err(|never| match never {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(',').map(|name| name.trim().to_ascii_lowercase()))
        .collect();
    for name in HOP_BY_HOP.iter().map(|name| name.to_string()).chain(named) {
        headers.remove(name.as_str());
    }
}

fn outgoing(template: &Request<()>, port: u16, body: ProxyBody) -> Request<ProxyBody> {
    let path = template.uri().path_and_query().map_or("/", |path| path.as_str());
    let uri: Uri = format!("http://127.0.0.1:{port}{path}").parse().unwrap_or_else(|_| Uri::from_static("http://127.0.0.1/"));
    let mut request = Request::new(body);
    *request.method_mut() = template.method().clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = template.headers().clone();
    request
}

async fn handle(shared: Arc<Shared>, peer: SocketAddr, request: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let Some((mut release, mut port, mut in_flight)) = shared.pick(None) else {
        return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, format!("no release of service {} takes traffic on this host", shared.service)));
    };
    let (parts, body) = request.into_parts();
    let without_body = body.is_end_stream();
    let mut template = Request::new(());
    *template.method_mut() = parts.method;
    *template.uri_mut() = parts.uri;
    *template.headers_mut() = parts.headers;
    strip_hop_by_hop(template.headers_mut());
    // What the release sees of the client: the address the switch took the connection from.
    if let Ok(value) = peer.ip().to_string().parse() {
        template.headers_mut().append("x-forwarded-for", value);
    }
    let mut body = Some(if without_body { Empty::new().map_err(|never| match never {}).boxed() } else { body.boxed() });
    let mut retried = false;
    loop {
        let sent = shared
            .client
            .request(outgoing(&template, port, body.take().unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed())))
            .await;
        match sent {
            Ok(response) => {
                shared.record(&release, started, response.status().is_server_error());
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // The in-flight count drops when the body has been sent or dropped.
                let body = body.map_frame(move |frame| {
                    let _keep = &in_flight;
                    frame
                });
                return Ok(Response::from_parts(parts, body.boxed()));
            }
            Err(error) => {
                shared.record(&release, started, true);
                let refused = error.is_connect();
                if refused
                    && without_body
                    && !retried
                    && let Some((other, other_port, other_in_flight)) = shared.pick(Some(&release))
                {
                    retried = true;
                    (release, port, in_flight) = (other, other_port, other_in_flight);
                    continue;
                }
                tracing::debug!(service = %shared.service, %release, %error, "a release did not answer");
                return Ok(plain(
                    StatusCode::BAD_GATEWAY,
                    format!("release {release} of service {} did not answer: {error}", shared.service),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_with(weights: &[(&str, i64)]) -> Shared {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(index, (release, weight))| Backend { release: release.to_string(), port: index as u16, weight: *weight, current: 0 })
            .collect();
        Shared {
            service: "test".into(),
            backends: Mutex::new(backends),
            in_flight: Mutex::new(HashMap::new()),
            stats: Mutex::new(TrafficStatsStore::default()),
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    #[tokio::test]
    async fn smooth_round_robin_gives_exactly_the_weights_and_spreads_them() {
        let shared = shared_with(&[("stable", 90), ("canary", 10)]);
        let picks: Vec<String> = (0..100).map(|_| shared.pick(None).unwrap().0).collect();
        assert_eq!(shared.in_flight.lock().unwrap()["canary"].load(Ordering::SeqCst), 0, "dropped picks are no longer in flight");
        assert_eq!(picks.iter().filter(|release| *release == "canary").count(), 10);
        // Never two canary requests in a row at 10 %.
        assert!(picks.windows(2).all(|pair| !(pair[0] == "canary" && pair[1] == "canary")));
        assert_eq!(shared.pick(Some("stable")).unwrap().0, "canary");
        assert!(shared_with(&[]).pick(None).is_none());
    }

    /// A release that answers every request with 200 `ok` and closes the connection.
    async fn tiny_release() -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0; 1024];
                    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => request.extend_from_slice(&buffer[..read]),
                        }
                    }
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn a_refused_bodyless_request_is_retried_once_elsewhere_and_counted_against_the_refusing_release() {
        let live = tiny_release().await;
        let dead = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let public = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let switch = TrafficSwitch::bind("test", public).await.unwrap();
        let weights = BTreeMap::from([("live".to_string(), 50), ("dead".to_string(), 50)]);
        switch.set_routing(&weights, &HashMap::from([("live".to_string(), live), ("dead".to_string(), dead)]));
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let url: Uri = format!("http://{public}/").parse().unwrap();
        for _ in 0..10 {
            let response = client.get(url.clone()).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "ok");
        }
        let stats = switch.stats("dead", 0);
        assert_eq!((stats.release.requests, stats.release.server_errors), (5, 5));
        assert_eq!((stats.others.requests, stats.others.server_errors), (10, 0));
        // A request with a body is never sent twice: the refusal is the client's 502.
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let request = Request::post(url.clone()).body(Full::new(Bytes::from_static(b"payload"))).unwrap();
            statuses.push(client.request(request).await.unwrap().status().as_u16());
        }
        statuses.sort();
        assert_eq!(statuses, vec![200, 502]);
        assert_eq!(switch.in_flight("live") + switch.in_flight("dead"), 0);
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", "close, x-private".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-request-id", "7".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().map(|name| name.as_str()).collect::<Vec<_>>(), vec!["x-request-id"]);
    }
}
