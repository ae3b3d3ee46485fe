//! `davit-agent`: register this host with a Davit cluster, run jobs, drain.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use davit_agent::config::{AgentConfig, ExecutorChoice, Identity};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "davit-agent", version, about = "Davit's worker: runs builds and releases on this host")]
struct Cli {
    /// Agent config file (TOML); flags override it.
    #[arg(long, global = true, env = "DAVIT_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Where the credential, log spool and workspaces live.
    #[arg(long, global = true, env = "DAVIT_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// A coordinator's gRPC address (host:port); repeat for several.
    #[arg(long = "coordinator", global = true)]
    coordinators: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Exchange a registration token (from `davit agents token create`) for this host's credential.
    Register {
        /// The registration token.
        #[arg(long, env = "DAVIT_REGISTRATION_TOKEN")]
        token: String,
        /// The agent's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// `region` label.
        #[arg(long)]
        region: Option<String>,
        /// Environments this host serves (deploy agents), comma-separated.
        #[arg(long)]
        environment: Option<String>,
        /// `build` or `deploy`.
        #[arg(long, default_value = "build")]
        pool: String,
        /// Further labels, `key=value`; repeat for several.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Run: connect, take jobs, until stopped (SIGTERM/SIGINT drain first).
    Run {
        /// Concurrent jobs.
        #[arg(long)]
        capacity: Option<u32>,
        /// docker, shell, or auto (Docker when it answers, else shell, saying so).
        #[arg(long)]
        executor: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// The address released services' traffic switches listen on (default 0.0.0.0).
        #[arg(long)]
        service_address: Option<std::net::IpAddr>,
    },
    /// Ask the running agent to finish its jobs and take no new ones (it exits when done).
    Drain,
}

fn parse_labels(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(key, value)| (key.trim().to_string(), value.trim().to_string()))
                .filter(|(key, _)| !key.is_empty())
                .ok_or_else(|| anyhow::anyhow!("label {pair:?} must look like key=value"))
        })
        .collect()
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "agent".into())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("davit-agent: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = match &cli.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    if let Some(state_dir) = cli.state_dir {
        config.state_dir = state_dir;
    }
    if !cli.coordinators.is_empty() {
        config.coordinators = cli.coordinators;
    }
    match cli.command {
        Command::Register { token, name, region, environment, pool, labels } => {
            if pool != "build" && pool != "deploy" {
                anyhow::bail!("--pool must be build or deploy");
            }
            let mut labels = parse_labels(&labels)?;
            labels.insert("pool".into(), pool);
            if let Some(region) = region {
                labels.insert("region".into(), region);
            }
            if let Some(environment) = environment {
                labels.insert("environment".into(), environment);
            }
            let name = name.unwrap_or_else(host_name);
            let identity = davit_agent::runtime::register(&config, &token, &name, labels).await?;
            println!(
                "registered as agent {} ({}); credential saved to {}",
                identity.agent_id,
                identity.name,
                config.identity_path().display()
            );
            println!("start it with: davit-agent run --state-dir {}", config.state_dir.display());
            Ok(())
        }
        Command::Run { capacity, executor, region, service_address } => {
            if let Some(service_address) = service_address {
                config.service_address = service_address;
            }
            if let Some(capacity) = capacity {
                config.capacity = capacity;
            }
            if let Some(executor) = executor {
                config.executor = match executor.as_str() {
                    "docker" => ExecutorChoice::Docker,
                    "shell" => ExecutorChoice::Shell,
                    "auto" => ExecutorChoice::Auto,
                    other => anyhow::bail!("--executor {other:?} must be docker, shell or auto"),
                };
            }
            if region.is_some() {
                config.region = region;
            }
            let identity = Identity::load(&config.identity_path())?;
            let runtime = davit_agent::runtime::AgentRuntime::new(config, identity).await?;
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                signal.cancel();
            });
            runtime.run(shutdown).await
        }
        Command::Drain => {
            let path = config.drain_path();
            std::fs::create_dir_all(&config.state_dir)?;
            std::fs::write(&path, b"drain\n")?;
            println!(
                "asked the agent in {} to drain: it finishes its running jobs, takes no new ones, then exits",
                config.state_dir.display()
            );
            Ok(())
        }
    }
}
