//! `davit deploy --follow` and `davit deployments events`: a deployment's progress events read
//! from `GET /api/v1/deployments/{id}/events`, followed over Server-Sent Events (reconnecting
//! with `Last-Event-ID` when a response window ends) and shown as lines, JSON lines, or on a
//! terminal as lines above a progress bar per region. The exit status says how the deployment
//! ended ([`ExitStatus`]), so scripts can rely on it. Nothing here decides anything about the
//! deployment; it only reads.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context;

use super::ApiClient;
use crate::state::records::{DeploymentEvent, event_kind};

/// How a followed deployment ended, as the process's exit status (the values of
/// [`super::failure::exit_status`]: 1, 2 and 5 are the command's own failures, so the
/// deployment's outcomes are 3 and 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Succeeded = 0,
    Failed = super::failure::exit_status::DEPLOYMENT_FAILED as isize,
    RolledBack = super::failure::exit_status::DEPLOYMENT_ROLLED_BACK as isize,
}

impl ExitStatus {
    /// The end a terminal event kind or a deployment status names, if it names one.
    pub(super) fn from_name(name: &str) -> Option<Self> {
        match name {
            event_kind::SUCCEEDED | "success" => Some(ExitStatus::Succeeded),
            event_kind::FAILED => Some(ExitStatus::Failed),
            event_kind::ROLLED_BACK => Some(ExitStatus::RolledBack),
            _ => None,
        }
    }

    pub(super) fn describe(self) -> &'static str {
        match self {
            ExitStatus::Succeeded => "succeeded",
            ExitStatus::Failed => "failed",
            ExitStatus::RolledBack => "was rolled back",
        }
    }
}

/// The text of `--help` about exit statuses.
pub const EXIT_STATUS_HELP: &str = "Exit status with --follow: 0 the deployment succeeded; 3 it failed; 4 it was rolled back; \
1 it could not be followed (login refused, API error); 2 usage error or not logged in; 5 the server could not be reached.";

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One JSON object per line (the API's event).
    JsonLines,
    /// One line per event.
    Lines,
    /// Lines above a per-region progress block redrawn in place (a terminal).
    Terminal,
}

impl Output {
    pub fn choose(json: bool) -> Self {
        if json {
            Output::JsonLines
        } else if std::io::stdout().is_terminal() {
            Output::Terminal
        } else {
            Output::Lines
        }
    }
}

/// Print the deployment's events, following them until it ends when `follow`; returns how it
/// ended (`None` without `follow` when it has not ended yet).
pub(super) async fn show_events(
    client: &ApiClient,
    deployment_id: u64,
    follow: bool,
    output: Output,
) -> anyhow::Result<Option<ExitStatus>> {
    let mut printer = Printer::new(output);
    if !follow {
        let mut cursor = String::new();
        loop {
            let page = client.get(&format!("/api/v1/deployments/{deployment_id}/events?limit=500&cursor={cursor}")).await?;
            let events: Vec<DeploymentEvent> =
                serde_json::from_value(page["items"].clone()).context("the server's events are not in the expected shape")?;
            for event in &events {
                printer.print(event)?;
            }
            match page["next_cursor"].as_str() {
                Some(next) => cursor = next.to_string(),
                None => break,
            }
        }
        return deployment_end(client, deployment_id).await;
    }
    let mut last_seq = 0u64;
    loop {
        let mut request = client
            .http
            .get(format!("{}/api/v1/deployments/{deployment_id}/events", client.base))
            .bearer_auth(&client.token)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if last_seq > 0 {
            request = request.header("Last-Event-ID", last_seq.to_string());
        }
        let mut response = client.send(request).await?;
        if !response.status().is_success() {
            client.check(response).await?;
            anyhow::bail!("the server refused to stream the events");
        }
        let mut parser = SseParser::default();
        let mut received = 0usize;
        let mut ended = None;
        while let Some(bytes) = response.chunk().await.with_context(|| format!("the event stream from {} broke", client.base))? {
            for message in parser.push(&bytes) {
                if message.event == "stream_error" {
                    anyhow::bail!("the server could not read the events: {}", message.data);
                }
                let event: DeploymentEvent = serde_json::from_str(&message.data)
                    .with_context(|| format!("the server sent an event that is not a deployment event: {}", message.data))?;
                last_seq = event.seq;
                received += 1;
                printer.print(&event)?;
                ended = ended.or(ExitStatus::from_name(&event.kind));
            }
        }
        if let Some(end) = ended {
            return Ok(Some(end));
        }
        // The response window ended, or the deployment ended without a last event the stream
        // recognizes (one from before events were recorded): the deployment itself says which.
        if received == 0
            && let Some(end) = deployment_end(client, deployment_id).await?
        {
            return Ok(Some(end));
        }
        if received == 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// How the deployment ended, from its record; `None` while it runs.
async fn deployment_end(client: &ApiClient, deployment_id: u64) -> anyhow::Result<Option<ExitStatus>> {
    let deployment = client.get(&format!("/api/v1/deployments/{deployment_id}")).await?;
    Ok(deployment["status"].as_str().and_then(ExitStatus::from_name))
}

/// Print the end of a followed deployment and exit with its status (0 returns normally).
pub fn finish(deployment_id: u64, end: ExitStatus, output: Output) -> anyhow::Result<()> {
    if output != Output::JsonLines {
        println!("Deployment {deployment_id} {}.", end.describe());
    }
    std::io::stdout().flush()?;
    if end != ExitStatus::Succeeded {
        std::process::exit(end as i32);
    }
    Ok(())
}

/// Prints events in the chosen [`Output`], keeping the per-region view for the terminal form.
struct Printer {
    output: Output,
    view: ProgressView,
    /// Lines of the progress block currently on screen below the last event line.
    drawn_lines: usize,
}

impl Printer {
    fn new(output: Output) -> Self {
        Printer { output, view: ProgressView::default(), drawn_lines: 0 }
    }

    fn print(&mut self, event: &DeploymentEvent) -> anyhow::Result<()> {
        self.print_to(&mut std::io::stdout().lock(), event)
    }

    fn print_to(&mut self, stdout: &mut impl Write, event: &DeploymentEvent) -> anyhow::Result<()> {
        match self.output {
            Output::JsonLines => writeln!(stdout, "{}", serde_json::to_string(event)?)?,
            Output::Lines => writeln!(stdout, "{}", event_line(event))?,
            Output::Terminal => {
                self.view.apply(event);
                if self.drawn_lines > 0 {
                    // Up over the old block, then clear to the end of the screen.
                    write!(stdout, "\x1b[{}A\x1b[J", self.drawn_lines)?;
                }
                writeln!(stdout, "{}", event_line(event))?;
                let block = self.view.render();
                for line in &block {
                    writeln!(stdout, "{line}")?;
                }
                self.drawn_lines = block.len();
            }
        }
        stdout.flush()?;
        Ok(())
    }
}

/// `18:04:05  host_switched     eu-west host 7  100%  message`.
pub fn event_line(event: &DeploymentEvent) -> String {
    let time = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(event.at.max(0) as u64)).to_string();
    let clock = time.get(11..19).unwrap_or(&time);
    let mut line = format!("{clock}  {:<17}", event.kind);
    if let Some(region) = &event.region {
        line.push_str(&format!(" {region}"));
    }
    if let Some(host) = event.host {
        line.push_str(&format!(" host {host}"));
    }
    if let Some(weight) = event.weight {
        line.push_str(&format!(" {weight}%"));
    }
    if !event.message.is_empty() {
        line.push_str(&format!("  {}", event.message));
    }
    line.trim_end().to_string()
}

/// What the events so far say about each region: the hosts seen, those switched to the new
/// release, the canary weight and the last analysis verdict. The total is the hosts seen so
/// far, since events name hosts as the rollout reaches them.
#[derive(Debug, Default)]
pub struct ProgressView {
    regions: BTreeMap<String, RegionProgress>,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct RegionProgress {
    hosts: BTreeSet<u64>,
    switched: BTreeSet<u64>,
    weight: Option<u8>,
    verdict: Option<String>,
    rolling_back: bool,
}

/// Width of a region's bar, in characters.
const BAR_WIDTH: usize = 20;

impl ProgressView {
    pub fn apply(&mut self, event: &DeploymentEvent) {
        if event.region.is_none() && event.host.is_none() {
            return;
        }
        let region = self.regions.entry(event.region.clone().unwrap_or_else(|| "-".into())).or_default();
        if let Some(host) = event.host {
            region.hosts.insert(host);
        }
        match event.kind.as_str() {
            event_kind::HOST_SWITCHED => {
                region.switched.extend(event.host);
            }
            event_kind::WEIGHT_CHANGED | event_kind::CANARY_STEP => region.weight = event.weight.or(region.weight),
            event_kind::ANALYSIS_VERDICT => region.verdict = Some(event.message.clone()),
            event_kind::ROLLBACK_STARTED => region.rolling_back = true,
            _ => {}
        }
    }

    /// One line per region: `eu-west  [##########----------] 2/4 hosts switched  canary 10%  verdict: ...`.
    pub fn render(&self) -> Vec<String> {
        let width = self.regions.keys().map(|name| name.chars().count()).max().unwrap_or(0);
        self.regions
            .iter()
            .map(|(name, region)| {
                let total = region.hosts.len();
                let done = region.switched.len().min(total);
                let filled = (done * BAR_WIDTH).checked_div(total).unwrap_or(0);
                let mut line =
                    format!("{name:<width$}  [{}{}] {done}/{total} hosts switched", "#".repeat(filled), "-".repeat(BAR_WIDTH - filled));
                if let Some(weight) = region.weight {
                    line.push_str(&format!("  canary {weight}%"));
                }
                if let Some(verdict) = &region.verdict {
                    line.push_str(&format!("  verdict: {verdict}"));
                }
                if region.rolling_back {
                    line.push_str("  ROLLING BACK");
                }
                line
            })
            .collect()
    }
}

/// One Server-Sent Event as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// Splits a `text/event-stream` body, arriving in arbitrary chunks, into events (the parts of
/// the format the server uses: `id`, `event`, `data` lines, comments, blank-line separators).
#[derive(Debug, Default)]
pub struct SseParser {
    pending: Vec<u8>,
    id: Option<String>,
    event: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    /// The events completed by `bytes`.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseMessage> {
        self.pending.extend_from_slice(bytes);
        let mut messages = Vec::new();
        while let Some(end) = self.pending.iter().position(|&byte| byte == b'\n') {
            let mut line: Vec<u8> = self.pending.drain(..=end).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                let event = self.event.take().unwrap_or_else(|| "message".into());
                if !self.data.is_empty() {
                    messages.push(SseMessage { id: self.id.clone(), event, data: self.data.join("\n") });
                }
                self.data.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line.as_ref(), ""),
            };
            match field {
                "id" => self.id = Some(value.to_string()),
                "event" => self.event = Some(value.to_string()),
                "data" => self.data.push(value.to_string()),
                _ => {}
            }
        }
        messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, kind: &str, host: Option<u64>, region: Option<&str>, weight: Option<u8>, message: &str) -> DeploymentEvent {
        DeploymentEvent {
            deployment_id: 9,
            seq,
            at: 1_764_180_245_000,
            kind: kind.into(),
            host,
            region: region.map(str::to_string),
            weight,
            message: message.into(),
        }
    }

    #[test]
    fn events_split_across_chunks_and_comments_are_skipped() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"retry: 1000\n\n: keep-alive\n\nid: 1\nevent: que").is_empty());
        let messages = parser.push(b"ued\ndata: {\"a\":1}\n\nid: 2\r\nevent: failed\r\ndata: x\r\ndata: y\r\n\r\n");
        assert_eq!(
            messages,
            vec![
                SseMessage { id: Some("1".into()), event: "queued".into(), data: "{\"a\":1}".into() },
                SseMessage { id: Some("2".into()), event: "failed".into(), data: "x\ny".into() },
            ]
        );
        assert_eq!(parser.push(b"data: plain\n\n")[0].event, "message");
    }

    #[test]
    fn regions_show_switched_hosts_weights_and_verdicts() {
        let mut view = ProgressView::default();
        for event in [
            event(1, event_kind::QUEUED, None, None, None, "queued"),
            event(2, event_kind::HOST_STARTED, Some(1), Some("eu"), None, ""),
            event(3, event_kind::HOST_STARTED, Some(2), Some("eu"), None, ""),
            event(4, event_kind::HOST_SWITCHED, Some(1), Some("eu"), Some(100), ""),
            event(5, event_kind::CANARY_STEP, None, Some("us-east"), Some(10), ""),
            event(6, event_kind::HOST_STARTED, Some(3), Some("us-east"), None, ""),
            event(7, event_kind::ANALYSIS_VERDICT, None, Some("us-east"), None, "fail: 5xx 12%"),
            event(8, event_kind::ROLLBACK_STARTED, None, Some("us-east"), None, ""),
        ] {
            view.apply(&event);
        }
        assert_eq!(
            view.render(),
            vec![
                "eu       [##########----------] 1/2 hosts switched".to_string(),
                "us-east  [--------------------] 0/1 hosts switched  canary 10%  verdict: fail: 5xx 12%  ROLLING BACK".to_string(),
            ]
        );
    }

    #[test]
    fn a_terminal_gets_each_event_above_a_redrawn_block_and_a_pipe_one_line_per_event() {
        let events = [
            event(1, event_kind::HOST_STARTED, Some(1), Some("eu"), None, "up"),
            event(2, event_kind::HOST_SWITCHED, Some(1), Some("eu"), Some(100), "switched"),
        ];
        let mut terminal = Printer::new(Output::Terminal);
        let mut screen = Vec::new();
        for event in &events {
            terminal.print_to(&mut screen, event).unwrap();
        }
        assert_eq!(
            String::from_utf8(screen).unwrap(),
            "18:04:05  host_started      eu host 1  up\n\
             eu  [--------------------] 0/1 hosts switched\n\
             \x1b[1A\x1b[J\
             18:04:05  host_switched     eu host 1 100%  switched\n\
             eu  [####################] 1/1 hosts switched\n"
        );
        let mut lines = Printer::new(Output::Lines);
        let mut json = Printer::new(Output::JsonLines);
        let (mut piped, mut json_lines) = (Vec::new(), Vec::new());
        for event in &events {
            lines.print_to(&mut piped, event).unwrap();
            json.print_to(&mut json_lines, event).unwrap();
        }
        assert_eq!(String::from_utf8(piped).unwrap().lines().count(), 2);
        let parsed: Vec<DeploymentEvent> =
            String::from_utf8(json_lines).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(parsed, events);
    }

    #[test]
    fn event_lines_and_exit_statuses() {
        let line = event_line(&event(4, event_kind::WEIGHT_CHANGED, Some(7), Some("eu"), Some(50), "half"));
        assert_eq!(line, "18:04:05  weight_changed    eu host 7 50%  half");
        assert_eq!(event_line(&event(1, event_kind::QUEUED, None, None, None, "")), "18:04:05  queued");
        assert_eq!(ExitStatus::from_name("succeeded"), Some(ExitStatus::Succeeded));
        assert_eq!(ExitStatus::from_name("success"), Some(ExitStatus::Succeeded));
        assert_eq!(ExitStatus::from_name("failed"), Some(ExitStatus::Failed));
        assert_eq!(ExitStatus::from_name("rolled_back"), Some(ExitStatus::RolledBack));
        assert_eq!(ExitStatus::from_name("in_progress"), None);
        assert_eq!(ExitStatus::RolledBack as i32, 4);
    }
}
