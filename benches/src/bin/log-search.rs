//! `log-search`: how long one real `davit serve` node takes to answer the first page of log
//! searches over about 1 GB of stored build logs, beside `grep` over the same text.
//!
//! The logs go in through the real ingest path: `--jobs` simulated agents (the real agent
//! protocol, `sim_agent`) each take one real build job and ship their share of `--megabytes` of
//! realistic build-log lines on `ShipLogs`, every chunk acknowledged once its segment is in the
//! blob store and its metadata committed. The oldest job's log alone holds a rare line
//! (`RARE_TEXT`), so a search for it must go through every newer deployment first. Then each
//! search's first page (`limit=50`) is timed through the REST API, several times, and the same
//! questions asked of the raw text with `grep -m 50` (oldest first, as grep reads) and
//! `tac | grep -m 50` (newest first, as the API answers). The raw text file is deleted at the end,
//! and the node's directory with it.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use davit_benches::harness::{DavitNode, Machine, ResultsSection, davit_source, milliseconds, quoted_arguments};
use davit_benches::sim_agent::{self, AgentSpec, EventKind, OnOffer, PreparedChunk, ShipPlan};
use davit_proto::agent as pb;

const RESULTS: ResultsSection = ResultsSection { benchmark: "log-search", heading: "## Log search" };
/// The issue's target for the first page.
const TARGET: Duration = Duration::from_secs(1);
/// A text only the oldest deployment's log contains (a few times).
const RARE_TEXT: &str = "checksum mismatch in vendored blob 7f3a9c";

#[derive(Parser, Debug)]
#[command(about = "Log search: first-page latency over ~1 GB of stored logs, beside grep over the same text")]
struct Arguments {
    #[arg(long, default_value = davit_benches::harness::DEFAULT_DAVIT_BINARY)]
    davit_binary: PathBuf,
    /// Megabytes of log text to store.
    #[arg(long, default_value_t = 1024)]
    megabytes: u64,
    /// Deployments (one job and one simulated agent each) the text is spread over.
    #[arg(long, default_value_t = 100)]
    jobs: usize,
    /// Timed runs of each search (the median and the slowest are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long)]
    results_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    davit_benches::harness::run_until_interrupted(run(Arguments::parse())).await
}

struct Search {
    name: &'static str,
    query: String,
    grep: Vec<String>,
    /// The API's times, the matches on its first page, and the first match's deployment.
    api: Vec<Duration>,
    matches: usize,
    first_deployment: Option<u64>,
    grep_forward: Duration,
    grep_newest_first: Duration,
}

async fn run(arguments: Arguments) -> anyhow::Result<()> {
    if arguments.jobs == 0 || arguments.megabytes == 0 || arguments.runs == 0 {
        bail!("--jobs, --megabytes and --runs must be at least 1");
    }
    let machine = Machine::describe()?;
    eprintln!("{}", machine.render());
    let chunk_bytes = 512 * 1024;
    // The corpus's lines carry times from when it is built (every deployment ships the same
    // lines), so a time range around that instant holds lines of every deployment.
    let corpus_time = sim_agent::now_millis();
    let corpus = Arc::new(sim_agent::build_log_corpus(32, chunk_bytes, 1));
    // The oldest job's first chunk: corpus lines with the rare line among them, three times.
    let mut rare_chunks = Vec::new();
    {
        let first = &corpus[0];
        let mut lines: Vec<pb::LogLine> = first
            .text
            .lines()
            .enumerate()
            .map(|(index, text)| pb::LogLine {
                timestamp: sim_agent::now_millis() - 1000 + index as i64 / 50,
                level: pb::LogLevel::Info as i32,
                text: text.to_string(),
                step: 0,
            })
            .collect();
        for at in [100, 2000, 4000] {
            let at = at.min(lines.len());
            lines.insert(
                at,
                pb::LogLine {
                    timestamp: lines[at.saturating_sub(1)].timestamp,
                    level: pb::LogLevel::Error as i32,
                    text: format!("error: {RARE_TEXT} (attempt {at})"),
                    step: 0,
                },
            );
        }
        rare_chunks.push(PreparedChunk::new(lines));
    }
    let rare_chunks = Arc::new(rare_chunks);
    let per_job_chunks = (arguments.megabytes * 1_000_000).div_ceil(chunk_bytes as u64 * arguments.jobs as u64).max(1);

    let node = DavitNode::start(&arguments.davit_binary, "[agents]\nlost_after_seconds = 600\n").await?;
    let registration_token = node.registration_token().await?;
    let channel = sim_agent::connect(&node.grpc_addr).await?;
    let spec = AgentSpec { capacity: 1, labels: [("pool".to_string(), "build".to_string())].into(), executors: vec!["shell".to_string()] };
    let (event_sender, mut events) = tokio::sync::mpsc::unbounded_channel();
    let mut sessions = Vec::new();
    for agent in 0..arguments.jobs {
        let registered = sim_agent::register(&channel, &registration_token, &format!("search-agent-{agent}"), &spec.labels).await?;
        sessions.push(sim_agent::open_session(&channel, registered, agent, &spec, OnOffer::Report, event_sender.clone()).await?);
    }
    sim_agent::wait_for_online_agents(&node, arguments.jobs).await?;
    let repo = node
        .post(
            "/api/v1/repos/connect",
            &serde_json::json!({"repo_url": "https://github.com/davit-bench/search", "branch": "main", "scm_type": "github"}),
        )
        .await?;
    let pipeline = node
        .post(
            "/api/v1/pipelines",
            &serde_json::json!({"name": "search", "repo_id": repo["repo_id"], "branch": "main", "build_command": "make", "deploy_strategy": "rolling", "build": {}}),
        )
        .await?;
    let pipeline_id = pipeline["pipeline_id"].as_u64().context("no pipeline id")?;

    // One deployment at a time, so that ids and times grow together (the oldest holds the rare
    // line); the raw text goes to a file in the same order, for grep.
    let raw_path = node.directory.path().join("raw-logs.txt");
    let mut raw = std::io::BufWriter::new(std::fs::File::create(&raw_path)?);
    let ingest_started = Instant::now();
    let mut stored_bytes = 0u64;
    for index in 0..arguments.jobs {
        node.post(
            "/api/v1/deployments",
            &serde_json::json!({"pipeline_id": pipeline_id.to_string(), "commit_hash": format!("{:040x}", index + 1), "environment": "development"}),
        )
        .await?;
        let offer = loop {
            let event = tokio::time::timeout(Duration::from_secs(60), events.recv())
                .await
                .context("no offer within 60 s")?
                .context("sessions ended")?;
            match event.kind {
                EventKind::Offer(offer) => break (event.agent, offer),
                EventKind::Closed(reason) => bail!("a session ended: {reason}"),
                _ => {}
            }
        };
        let (agent, offer) = offer;
        sessions[agent].accept(offer.job_id, offer.attempt);
        let chunks = if index == 0 { rare_chunks.clone() } else { corpus.clone() };
        let count = if index == 0 { 1 } else { per_job_chunks };
        let plan = ShipPlan {
            job_id: offer.job_id,
            attempt: offer.attempt,
            first_chunk: index * 7,
            window: 4,
            stop_sending_at: Instant::now() + Duration::from_secs(3600),
            max_chunks: count,
            ack_timeout: Duration::from_secs(120),
        };
        let shipped = sim_agent::ship_log(&channel, &sessions[agent].registered, &chunks, &plan, |_, _, _, _| {}).await?;
        for sequence in 1..=shipped.acknowledged {
            let chunk = plan.chunk(&chunks, sequence);
            raw.write_all(chunk.text.as_bytes())?;
            stored_bytes += chunk.text_bytes;
        }
        sessions[agent].finish(offer.job_id, offer.attempt, pb::JobOutcome::Succeeded, shipped.acknowledged);
    }
    raw.flush()?;
    drop(raw);
    let ingest_seconds = ingest_started.elapsed().as_secs_f64();
    eprintln!("stored {} MB of log text in {ingest_seconds:.1} s", stored_bytes / 1_000_000);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let rfc3339 = |millis: i64| humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(millis as u64)).to_string();
    let raw_text = raw_path.display().to_string();
    let mut searches = vec![
        Search {
            name: "rare free text (only in the oldest deployment)",
            query: format!("q={}&limit=50", RARE_TEXT.replace(' ', "%20")),
            grep: vec!["-F".into(), "-m".into(), "50".into(), RARE_TEXT.into()],
            api: Vec::new(),
            matches: 0,
            first_deployment: None,
            grep_forward: Duration::ZERO,
            grep_newest_first: Duration::ZERO,
        },
        Search {
            name: "log_level=ERROR",
            query: "log_level=ERROR&limit=50".into(),
            grep: vec!["-m".into(), "50".into(), "^error".into()],
            api: Vec::new(),
            matches: 0,
            first_deployment: None,
            grep_forward: Duration::ZERO,
            grep_newest_first: Duration::ZERO,
        },
        Search {
            name: "time range (the minute the lines carry) + text `Compiling`",
            query: format!("start_time={}&end_time={}&q=Compiling&limit=50", rfc3339(corpus_time - 1_000), rfc3339(corpus_time + 59_000)),
            grep: vec!["-F".into(), "-m".into(), "50".into(), "Compiling".into()],
            api: Vec::new(),
            matches: 0,
            first_deployment: None,
            grep_forward: Duration::ZERO,
            grep_newest_first: Duration::ZERO,
        },
    ];
    for search in &mut searches {
        for _ in 0..arguments.runs {
            let started = Instant::now();
            let page = node.get(&format!("/api/v1/logs/search?{}", search.query)).await?;
            search.api.push(started.elapsed());
            let matches = page["matches"].as_array().context("no matches array")?;
            search.matches = matches.len();
            search.first_deployment = matches.first().and_then(|found| found["deployment_id"].as_u64());
        }
        search.api.sort();
        // grep's output goes to a pipe: GNU grep stops at the first match when it writes to
        // /dev/null, which would not be the search asked for.
        let grep = search.grep.iter().map(|arg| shell_quote(arg)).collect::<Vec<_>>().join(" ");
        let started = Instant::now();
        std::process::Command::new("sh").args(["-c", &format!("grep {grep} {} | wc -l > /dev/null", shell_quote(&raw_text))]).status()?;
        search.grep_forward = started.elapsed();
        let started = Instant::now();
        std::process::Command::new("sh")
            .args(["-c", &format!("tac {} | grep {grep} | wc -l > /dev/null", shell_quote(&raw_text))])
            .status()?;
        search.grep_newest_first = started.elapsed();
        eprintln!(
            "{}: API median {} (max {}), {} matches; grep {}; tac | grep {}",
            search.name,
            milliseconds(search.api[search.api.len() / 2]),
            milliseconds(*search.api.last().unwrap()),
            search.matches,
            milliseconds(search.grep_forward),
            milliseconds(search.grep_newest_first)
        );
    }
    let _ = std::fs::remove_file(&raw_path);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Run of {} UTC\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace('T', " ").trim_end_matches('Z')
    );
    out.push_str(&machine.render());
    let _ = writeln!(
        out,
        "- Davit: `{}`, workspace at git `{}`, one node (`davit serve`, redb, blobs in a directory on the same disk)",
        arguments.davit_binary.display(),
        davit_source()
    );
    let _ = writeln!(
        out,
        "- Data: {} MB of build-log text ({} deployments, one job each, shipped in 512 KiB chunks through `ShipLogs` by simulated agents and acknowledged: stored as zstd JSON-lines segments, each behind its text index, with their metadata in Raft), ingested in {ingest_seconds:.0} s. The rare text is only in the oldest deployment.",
        stored_bytes / 1_000_000,
        arguments.jobs
    );
    let _ = writeln!(
        out,
        "- Reproduce:\n\n```sh\nexport CARGO_TARGET_DIR=/var/cache/davit-target\ncargo build --release -p davit-coordinator -p davit-benches\n$CARGO_TARGET_DIR/release/log-search {}\n```\n",
        quoted_arguments()
    );
    let _ = writeln!(out, "#### Result (first page, `limit=50`; {} runs each)\n", arguments.runs);
    let _ = writeln!(
        out,
        "| search | API median | API slowest | matches on the page | `grep -m 50` (oldest first) | `tac \\| grep -m 50` (newest first) | target < 1 s |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---|");
    for search in &searches {
        let median = search.api[search.api.len() / 2];
        let _ = writeln!(
            out,
            "| {} (`{}`) | {} | {} | {} | {} | {} | {} |",
            search.name,
            search.query,
            milliseconds(median),
            milliseconds(*search.api.last().unwrap()),
            search.matches,
            milliseconds(search.grep_forward),
            milliseconds(search.grep_newest_first),
            if median < TARGET { "met" } else { "missed" }
        );
    }
    let _ = writeln!(
        out,
        "\n`grep` reads the raw text (no JSON, no compression) from the page cache, its output into a pipe; it answers oldest first, `tac | grep` newest first as the API does. The rare text sits at the start of the raw file (the oldest deployment), so `grep -m 50` reads all of it either way (it finds 3 of 50)."
    );
    println!("{out}");
    if let Some(path) = &arguments.results_file {
        RESULTS.write(path, &out)?;
    }
    for session in sessions {
        session.close();
    }
    Ok(())
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}
