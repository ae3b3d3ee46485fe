//! `davit logs <id> [-f] [--level L]`: a run's log lines from `GET /api/v1/logs/{id}` (JSON),
//! or followed over Server-Sent Events (`follow=true`), resuming with `Last-Event-ID` when a
//! response window ends, until the server's `end` event; the exit status then says how the run
//! ended, as with `deploy --follow`.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::progress::{ExitStatus, SseParser};
use super::{ApiClient, Connection, print_json};
use crate::log_segments::{LogLevel, LogLine};

#[derive(Args)]
pub struct LogsArgs {
    /// The run's (deployment's) id.
    deployment_id: u64,
    /// Keep printing new lines until the run ends; the exit status says how it ended.
    #[arg(short, long)]
    follow: bool,
    /// Only lines at this level: DEBUG, INFO, WARNING or ERROR.
    #[arg(long, value_parser = parse_level)]
    level: Option<LogLevel>,
    /// Only this job's lines (0: the coordinator's own lines).
    #[arg(long)]
    job: Option<u64>,
    /// At most this many lines (without --follow; the server allows up to 10000).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    limit: u64,
    #[command(flatten)]
    connection: Connection,
}

fn parse_level(text: &str) -> Result<LogLevel, String> {
    text.parse()
}

/// The level as the API spells it (`ERROR`).
fn level_name(level: LogLevel) -> String {
    serde_json::to_value(level).ok().and_then(|value| value.as_str().map(str::to_string)).unwrap_or_default()
}

pub async fn logs(args: LogsArgs, json: bool) -> anyhow::Result<()> {
    let client = ApiClient::connect(&args.connection).await?;
    let mut query = Vec::new();
    if let Some(level) = args.level {
        query.push(format!("log_level={}", level_name(level)));
    }
    if let Some(job) = args.job {
        query.push(format!("job_id={job}"));
    }
    if args.follow {
        query.push("follow=true".into());
        let end = follow(&client, args.deployment_id, &query.join("&"), json).await?;
        if !json {
            eprintln!("Deployment {} {}.", args.deployment_id, end.describe());
        }
        std::io::stdout().flush()?;
        if end != ExitStatus::Succeeded {
            std::process::exit(end as i32);
        }
        return Ok(());
    }
    query.push(format!("limit={}", args.limit));
    let answer = client.get(&format!("/api/v1/logs/{}?{}", args.deployment_id, query.join("&"))).await?;
    if json {
        return print_json(&answer);
    }
    let lines: Vec<LogLine> =
        serde_json::from_value(answer["lines"].clone()).context("the server's log lines are not in the expected shape")?;
    let mut stdout = std::io::stdout().lock();
    for line in &lines {
        writeln!(stdout, "{}", line_text(line))?;
    }
    if answer["truncated"].as_bool() == Some(true) {
        eprintln!(
            "(only the first {} lines; the whole log: GET /api/v1/logs/{}?format=raw, or `davit logs {} -f`)",
            lines.len(),
            args.deployment_id,
            args.deployment_id
        );
    }
    Ok(())
}

/// `12:04:05.123  ERROR    job 3  message`.
pub fn line_text(line: &LogLine) -> String {
    let time = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(line.timestamp.max(0) as u64)).to_string();
    let clock = time.get(11..23).unwrap_or(&time);
    let source = if line.job_id == 0 { "davit".to_string() } else { format!("job {}", line.job_id) };
    format!("{clock}  {:<7}  {source:<6}  {}", level_name(line.level), line.message)
}

/// Print the lines as they come until the server sends `end`; how the run ended.
async fn follow(client: &ApiClient, deployment_id: u64, query: &str, json: bool) -> anyhow::Result<ExitStatus> {
    let mut last_event_id: Option<String> = None;
    loop {
        let mut request = client
            .request(reqwest::Method::GET, &format!("/api/v1/logs/{deployment_id}?{query}"))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = &last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let mut response = client.send(request).await?;
        if !response.status().is_success() {
            client.check(response).await?;
            anyhow::bail!("the server refused to stream the log");
        }
        let mut parser = SseParser::default();
        let mut received = 0usize;
        while let Some(bytes) = response.chunk().await.with_context(|| format!("the log stream from {} broke", client.base))? {
            for message in parser.push(&bytes) {
                match message.event.as_str() {
                    "end" => {
                        let end: serde_json::Value = serde_json::from_str(&message.data).unwrap_or_default();
                        let status = end["status"].as_str().unwrap_or("failed");
                        return Ok(ExitStatus::from_name(status).unwrap_or(ExitStatus::Failed));
                    }
                    "stream_error" => anyhow::bail!("the server could not read the log: {}", message.data),
                    _ => {}
                }
                if message.id.is_some() {
                    last_event_id = message.id.clone();
                }
                received += 1;
                let mut stdout = std::io::stdout().lock();
                if json {
                    writeln!(stdout, "{}", message.data)?;
                } else {
                    let line: LogLine = serde_json::from_str(&message.data)
                        .with_context(|| format!("the server sent an event that is not a log line: {}", message.data))?;
                    writeln!(stdout, "{}", line_text(&line))?;
                }
                stdout.flush()?;
            }
        }
        // The response window ended: reconnect after the last line received.
        if received == 0 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_time_level_source_and_message() {
        let line = LogLine { timestamp: 1_700_000_000_123, level: LogLevel::Error, job_id: 3, message: "boom".into(), step: None };
        assert_eq!(line_text(&line), "22:13:20.123  ERROR    job 3   boom");
        let line = LogLine { job_id: 0, level: LogLevel::Info, ..line };
        assert_eq!(line_text(&line), "22:13:20.123  INFO     davit   boom");
        assert_eq!(parse_level("error").unwrap(), LogLevel::Error);
        assert!(parse_level("loud").unwrap_err().contains("INFO, WARNING, ERROR, DEBUG"));
    }
}
