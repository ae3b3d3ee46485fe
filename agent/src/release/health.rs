//! Health checks of a started release: an HTTP GET of a path (2xx or 3xx is healthy) or a TCP
//! connect, repeated every interval until enough successes or failures in a row, or the
//! deadline, give a verdict. It reports what the probes saw so that a user can tell a wrong
//! path from a crashing process.

use std::time::{Duration, Instant};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::job_spec::{HealthCheck, HealthReport};

/// How many of the last probe results the report repeats.
const REPORTED_PROBES: usize = 5;

/// Probe `127.0.0.1:<port>` as `check` says until a verdict.
pub async fn check(port: u16, check: &HealthCheck) -> HealthReport {
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http();
    let started = Instant::now();
    let deadline = Duration::from_millis(check.deadline_ms.max(1));
    let interval = Duration::from_millis(check.interval_ms.max(10));
    let timeout = Duration::from_millis(check.timeout_ms.max(1));
    let (healthy_threshold, unhealthy_threshold) = (check.healthy_threshold.max(1), check.unhealthy_threshold.max(1));
    let (mut successes, mut failures, mut probes) = (0u32, 0u32, 0u32);
    let mut seen: Vec<String> = Vec::new();
    let report = |healthy: bool, verdict: String, seen: &[String]| {
        let last = &seen[seen.len().saturating_sub(REPORTED_PROBES)..];
        HealthReport { healthy, detail: format!("{verdict}; last probes: {}", last.join(", ")) }
    };
    loop {
        let probe_started = Instant::now();
        let result = probe(&client, port, check.http_path.as_deref(), timeout).await;
        probes += 1;
        match result {
            Ok(what) => {
                successes += 1;
                failures = 0;
                seen.push(what);
            }
            Err(what) => {
                failures += 1;
                successes = 0;
                seen.push(what);
            }
        }
        if successes >= healthy_threshold {
            return report(true, format!("healthy after {probes} probes ({successes} successes in a row)"), &seen);
        }
        if failures >= unhealthy_threshold {
            return report(false, format!("unhealthy: {failures} failed probes in a row"), &seen);
        }
        let next = probe_started + interval;
        if next.duration_since(started) >= deadline {
            return report(
                false,
                format!("unhealthy: no verdict within the deadline of {} ms ({probes} probes)", deadline.as_millis()),
                &seen,
            );
        }
        tokio::time::sleep_until(next.into()).await;
    }
}

/// One probe: Ok or Err with what it saw.
async fn probe(
    client: &Client<HttpConnector, Empty<Bytes>>,
    port: u16,
    http_path: Option<&str>,
    timeout: Duration,
) -> Result<String, String> {
    let Some(path) = http_path else {
        return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(("127.0.0.1", port))).await {
            Ok(Ok(_)) => Ok("TCP connect ok".to_string()),
            Ok(Err(error)) => Err(format!("TCP connect failed: {error}")),
            Err(_) => Err(format!("TCP connect timed out after {} ms", timeout.as_millis())),
        };
    };
    let path = if path.starts_with('/') { path.to_string() } else { format!("/{path}") };
    let uri: hyper::Uri =
        format!("http://127.0.0.1:{port}{path}").parse().map_err(|error| format!("health path {path:?} is not valid: {error}"))?;
    match tokio::time::timeout(timeout, client.get(uri)).await {
        Ok(Ok(response)) => {
            let status = response.status();
            if status.is_success() || status.is_redirection() {
                Ok(format!("GET {path} {}", status.as_u16()))
            } else {
                Err(format!("GET {path} {}", status.as_u16()))
            }
        }
        Ok(Err(error)) => Err(format!("GET {path} failed: {}", error_chain(&error))),
        Err(_) => Err(format!("GET {path} timed out after {} ms", timeout.as_millis())),
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(http_path: Option<&str>) -> HealthCheck {
        HealthCheck {
            http_path: http_path.map(str::to_string),
            interval_ms: 20,
            timeout_ms: 200,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            deadline_ms: 2_000,
        }
    }

    #[tokio::test]
    async fn tcp_checks_see_a_listening_port_and_a_closed_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let report = check(port, &settings(None)).await;
        assert!(report.healthy, "{}", report.detail);
        drop(listener);
        let report = check(port, &settings(None)).await;
        assert!(!report.healthy);
        assert!(report.detail.contains("3 failed probes in a row"), "{}", report.detail);
    }
}
