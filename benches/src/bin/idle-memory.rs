//! `idle-memory`: resident memory of an idle `davit` node and an idle `davit-agent`, beside the
//! programs they stand in for measured in the same run: a single-member etcd (an idle
//! replicated store) and an idle Buildbot worker connected to its master (an idle build agent),
//! when those are installed.
//!
//! Idle means started, ready, connected and doing nothing: the node is a single-node cluster
//! with its first admin and one connected agent; the agent holds its session to the node and
//! sends heartbeats. Each process's `VmRSS` is sampled once a second over a window after a
//! settling time; the report gives the largest sample, plus the peak (`VmHWM`) since start.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use davit_benches::harness::{
    DEFAULT_AGENT_BINARY, DEFAULT_DAVIT_BINARY, DavitNode, Machine, ResultsSection, ServerProcess, command_output, davit_source,
    free_addresses, local_http_client, quoted_arguments,
};

const RESULTS: ResultsSection = ResultsSection { benchmark: "idle-memory", heading: "## Idle memory" };

/// The targets, in MB (10^6 bytes).
const TARGET_DAVIT_MB: f64 = 40.0;
const TARGET_AGENT_MB: f64 = 15.0;

#[derive(Parser, Debug)]
#[command(about = "Idle resident memory of davit and davit-agent, beside an idle etcd and an idle Buildbot worker")]
struct Arguments {
    #[arg(long, default_value = DEFAULT_DAVIT_BINARY)]
    davit_binary: PathBuf,
    #[arg(long, default_value = DEFAULT_AGENT_BINARY)]
    agent_binary: PathBuf,
    /// The etcd server binary (Debian: `apt-get install etcd-server`); skipped if missing.
    #[arg(long, default_value = "etcd")]
    etcd_binary: PathBuf,
    /// A Python virtual environment with `buildbot` and `buildbot-worker` installed
    /// (`pip install buildbot buildbot-worker`); skipped if missing.
    #[arg(long, default_value = "/var/cache/davit-bench-venv")]
    buildbot_venv: PathBuf,
    /// Seconds to let everything settle after start-up before sampling.
    #[arg(long, default_value_t = 10)]
    settle_seconds: u64,
    /// Seconds of once-a-second samples.
    #[arg(long, default_value_t = 20)]
    sample_seconds: u64,
    /// Rewrite this benchmark's block in this file (benches/RESULTS.md).
    #[arg(long)]
    results_file: Option<PathBuf>,
}

/// Memory figures of one process, in bytes.
#[derive(Default, Clone, Copy)]
struct Memory {
    /// The largest `VmRSS` sample of the window.
    rss_max: u64,
    /// `RssAnon` (heap, stacks) at that sample.
    anonymous: u64,
    /// `RssFile` (mapped binary and libraries) at that sample.
    file_backed: u64,
    /// `VmHWM`: the peak resident size since the process started.
    peak: u64,
}

fn status_field(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status.lines().find_map(|line| line.strip_prefix(field))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Resident memory of `pid` and all its descendants (Buildbot's worker is a twistd process
/// that may fork), summed per field.
fn tree_memory(pid: &str) -> Memory {
    let mut pids = vec![pid.to_string()];
    let mut index = 0;
    while index < pids.len() {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", pids[index])).unwrap_or_default();
        pids.extend(children.split_whitespace().map(str::to_string));
        index += 1;
    }
    let sum = |field: &str| pids.iter().filter_map(|pid| status_field(pid, field)).sum::<u64>();
    Memory { rss_max: sum("VmRSS:"), anonymous: sum("RssAnon:"), file_backed: sum("RssFile:"), peak: sum("VmHWM:") }
}

/// Sample every process once a second for `seconds`; the largest sample of each.
async fn sample(processes: &mut [(&str, &mut ServerProcess)], seconds: u64) -> anyhow::Result<Vec<Memory>> {
    let mut largest = vec![Memory::default(); processes.len()];
    for _ in 0..seconds.max(1) {
        for (index, (_, process)) in processes.iter_mut().enumerate() {
            process.check_running()?;
            let memory = tree_memory(&process.pid());
            if memory.rss_max >= largest[index].rss_max {
                largest[index] = memory;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(largest)
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

/// A registered, running agent (shell executor) connected to `node`.
async fn start_agent(binary: &Path, node: &DavitNode) -> anyhow::Result<ServerProcess> {
    ensure!(binary.is_file(), "davit-agent binary {} not found; build it with `cargo build --release -p davit-agent`", binary.display());
    let directory = node.directory.path().join("agent");
    std::fs::create_dir_all(&directory)?;
    let config = directory.join("agent.toml");
    std::fs::write(
        &config,
        format!("state_dir = {:?}\ncoordinators = [{:?}]\nexecutor = \"shell\"\n", directory.join("state"), node.grpc_addr),
    )?;
    let registration = Command::new(binary)
        .arg("--config")
        .arg(&config)
        .args(["register", "--token", &node.registration_token().await?, "--name", "idle-agent"])
        .output()
        .context("cannot run davit-agent register")?;
    ensure!(registration.status.success(), "davit-agent register failed: {}", String::from_utf8_lossy(&registration.stderr));
    let mut command = Command::new(binary);
    command.arg("--config").arg(&config).arg("run").env("NO_COLOR", "1");
    let mut agent = ServerProcess::spawn("davit-agent".into(), command, directory.join("agent.log"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        agent.check_running()?;
        let agents = node.get("/api/v1/agents").await?;
        if agents["items"].as_array().is_some_and(|items| items.iter().any(|agent| agent["state"] == "online")) {
            return Ok(agent);
        }
        ensure!(Instant::now() < deadline, "the agent did not come online within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A single-member etcd with its defaults, answering on 127.0.0.1.
async fn start_etcd(binary: &Path, directory: &Path) -> anyhow::Result<(ServerProcess, String)> {
    let addresses = free_addresses(2)?;
    let mut command = Command::new(binary);
    command
        .arg("--data-dir")
        .arg(directory.join("etcd"))
        .arg("--listen-client-urls")
        .arg(format!("http://{}", addresses[0]))
        .arg("--advertise-client-urls")
        .arg(format!("http://{}", addresses[0]))
        .arg("--listen-peer-urls")
        .arg(format!("http://{}", addresses[1]));
    let mut process = ServerProcess::spawn("etcd".into(), command, directory.join("etcd.log"))?;
    let http = local_http_client()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        process.check_running()?;
        if let Ok(response) = http.get(format!("http://{}/health", addresses[0])).send().await
            && response.status().is_success()
        {
            break;
        }
        ensure!(Instant::now() < deadline, "etcd was not healthy within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let version = command_output(&binary.to_string_lossy(), &["--version"]).lines().next().unwrap_or("unknown").to_string();
    Ok((process, version))
}

/// A Buildbot master with one worker connected to it; the worker is what is measured.
async fn start_buildbot(venv: &Path, directory: &Path) -> anyhow::Result<(ServerProcess, ServerProcess, String)> {
    let bin = venv.join("bin");
    let addresses = free_addresses(2)?;
    let worker_port = addresses[0].rsplit_once(':').map(|(_, port)| port.to_string()).context("address has a port")?;
    let www_port = addresses[1].rsplit_once(':').map(|(_, port)| port.to_string()).context("address has a port")?;
    let master = directory.join("buildbot-master");
    let worker = directory.join("buildbot-worker");
    let run = |program: &str, args: &[&str]| -> anyhow::Result<()> {
        let output = Command::new(bin.join(program)).args(args).output().with_context(|| format!("cannot run {program}"))?;
        ensure!(output.status.success(), "{program} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        Ok(())
    };
    run("buildbot", &["create-master", "-q", &master.to_string_lossy()])?;
    std::fs::write(
        master.join("master.cfg"),
        format!(
            "from buildbot.plugins import *\n\
             c = BuildmasterConfig = {{}}\n\
             c['workers'] = [worker.Worker('idle-worker', 'pass')]\n\
             c['protocols'] = {{'pb': {{'port': 'tcp:{worker_port}:interface=127.0.0.1'}}}}\n\
             factory = util.BuildFactory([steps.ShellCommand(command=['true'])])\n\
             c['builders'] = [util.BuilderConfig(name='trivial', workernames=['idle-worker'], factory=factory)]\n\
             c['schedulers'] = [schedulers.ForceScheduler(name='force', builderNames=['trivial'])]\n\
             c['www'] = {{'port': 'tcp:{www_port}:interface=127.0.0.1', 'plugins': {{}}}}\n\
             c['db'] = {{'db_url': 'sqlite:///state.sqlite'}}\n\
             c['buildbotNetUsageData'] = None\n\
             c['title'] = 'idle'\nc['buildbotURL'] = 'http://127.0.0.1:{www_port}/'\n"
        ),
    )?;
    run(
        "buildbot-worker",
        &["create-worker", "-q", &worker.to_string_lossy(), &format!("127.0.0.1:{worker_port}"), "idle-worker", "pass"],
    )?;
    let mut command = Command::new(bin.join("buildbot"));
    command.args(["start", "--nodaemon"]).arg(&master);
    let mut master_process = ServerProcess::spawn("buildbot master".into(), command, directory.join("buildbot-master.log"))?;
    let mut command = Command::new(bin.join("buildbot-worker"));
    command.args(["start", "--nodaemon"]).arg(&worker);
    let mut worker_process = ServerProcess::spawn("buildbot worker".into(), command, directory.join("buildbot-worker.log"))?;
    let http = local_http_client()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        master_process.check_running()?;
        worker_process.check_running()?;
        if let Ok(response) = http.get(format!("http://127.0.0.1:{www_port}/api/v2/workers")).send().await
            && let Ok(workers) = response.json::<serde_json::Value>().await
            && workers["workers"].as_array().is_some_and(|items| {
                items.iter().any(|worker| worker["connected_to"].as_array().is_some_and(|masters| !masters.is_empty()))
            })
        {
            break;
        }
        ensure!(Instant::now() < deadline, "the Buildbot worker did not connect within 120 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let version = command_output(&bin.join("buildbot-worker").to_string_lossy(), &["--version"]).replace('\n', "; ");
    Ok((master_process, worker_process, version))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let arguments = Arguments::parse();
    let machine = Machine::describe()?;
    eprintln!("{}", machine.render());
    let mut node = DavitNode::start(&arguments.davit_binary, "").await?;
    let mut agent = start_agent(&arguments.agent_binary, &node).await?;
    let scratch = tempfile::Builder::new().prefix("davit-bench-idle-").tempdir()?;

    let etcd_installed =
        Command::new("sh").arg("-c").arg(format!("command -v {}", arguments.etcd_binary.display())).output()?.status.success();
    let mut etcd = if etcd_installed { Some(start_etcd(&arguments.etcd_binary, scratch.path()).await?) } else { None };
    let mut buildbot = if arguments.buildbot_venv.join("bin/buildbot-worker").is_file() {
        Some(start_buildbot(&arguments.buildbot_venv, scratch.path()).await?)
    } else {
        None
    };
    if etcd.is_none() {
        eprintln!("etcd not found: its reference is skipped (apt-get install -y etcd-server)");
    }
    if buildbot.is_none() {
        eprintln!("no Buildbot in {}: its reference is skipped", arguments.buildbot_venv.display());
    }

    eprintln!("settling for {} s, then sampling for {} s", arguments.settle_seconds, arguments.sample_seconds);
    tokio::time::sleep(Duration::from_secs(arguments.settle_seconds)).await;
    let mut measured: Vec<(&str, &mut ServerProcess)> =
        vec![("davit (single-node cluster, one agent connected)", &mut node.process), ("davit-agent (connected, idle)", &mut agent)];
    if let Some((process, _)) = &mut etcd {
        measured.push(("etcd (single member)", process));
    }
    if let Some((_, worker, _)) = &mut buildbot {
        measured.push(("buildbot-worker (connected, idle)", worker));
    }
    let memories = sample(&mut measured, arguments.sample_seconds).await?;
    let names: Vec<&str> = measured.iter().map(|(name, _)| *name).collect();

    let mut report = String::new();
    let _ = writeln!(report, "### Run of {}\n", machine.date);
    report.push_str(&machine.render());
    let _ = writeln!(
        report,
        "- Davit: release binaries `{}` and `{}`, workspace at git `{}`",
        arguments.davit_binary.display(),
        arguments.agent_binary.display(),
        davit_source()
    );
    if let Some((_, version)) = &etcd {
        let _ = writeln!(report, "- etcd: {version}, defaults");
    }
    if let Some((_, _, version)) = &buildbot {
        let _ = writeln!(report, "- Buildbot: {version} (worker connected to a master with one trivial builder)");
    }
    let _ = writeln!(
        report,
        "- Method: start, wait until ready and connected, settle {} s, then sample `/proc/<pid>/status` once a second for {} s; the largest `VmRSS` sample, \
         split into anonymous (heap, stacks) and file-backed (binary, libraries) pages, and `VmHWM` (peak since start). Child processes are included.",
        arguments.settle_seconds, arguments.sample_seconds
    );
    let _ = writeln!(
        report,
        "- Reproduce:\n\n```sh\nexport CARGO_TARGET_DIR=/var/cache/davit-target\napt-get install -y etcd-server\n\
         python3 -m venv /var/cache/davit-bench-venv && /var/cache/davit-bench-venv/bin/pip install buildbot buildbot-worker buildbot-www\n\
         cargo build --release -p davit-coordinator -p davit-agent -p davit-benches\n$CARGO_TARGET_DIR/release/idle-memory {}\n```\n",
        quoted_arguments()
    );
    let _ = writeln!(report, "| process | RSS MB (largest sample) | anonymous MB | file-backed MB | peak since start MB |");
    let _ = writeln!(report, "|---|---:|---:|---:|---:|");
    for (name, memory) in names.iter().zip(&memories) {
        let _ = writeln!(
            report,
            "| {name} | {} | {} | {} | {} |",
            megabytes(memory.rss_max),
            megabytes(memory.anonymous),
            megabytes(memory.file_backed),
            megabytes(memory.peak)
        );
    }
    let verdict = |bytes: u64, target: f64| if bytes as f64 / 1e6 <= target { "met" } else { "not met" };
    let _ = writeln!(
        report,
        "\n**Targets:** davit ≤ {TARGET_DAVIT_MB:.0} MB: {} MB, **{}**; davit-agent ≤ {TARGET_AGENT_MB:.0} MB: {} MB, **{}**.",
        megabytes(memories[0].rss_max),
        verdict(memories[0].rss_max, TARGET_DAVIT_MB),
        megabytes(memories[1].rss_max),
        verdict(memories[1].rss_max, TARGET_AGENT_MB)
    );
    println!("{report}");
    if let Some(path) = &arguments.results_file {
        RESULTS.write(path, &report)?;
    }
    if memories.iter().any(|memory| memory.rss_max == 0) {
        bail!("a process's memory could not be read");
    }
    Ok(())
}
