//! `artifact-path`: throughput of Davit's whole artifact path — a real `davit-agent` (shell
//! executor) packs a build's output (reproducible tar, SHA-256 of the tar, zstd level 3), asks
//! the coordinator whether the digest is stored, streams it over gRPC to a real `davit` node,
//! which verifies the digest while receiving, stores the blob durably and records it through
//! Raft — beside the shell pipeline it stands in for, `tar | zstd -3 | sha256sum`, on the same
//! generated tree in the same run.
//!
//! The full path is timed by Davit itself: the `artifacts` step of the build job, from the
//! agent's start of packing to the coordinator's answer that the artifact is recorded. The
//! build step before it (`cp -al` of the tree into the workspace, plus a per-run stamp file so
//! that every run has a new digest and really uploads) is not part of the figure. For a
//! breakdown the benchmark also times, in process, packing alone and the receiving side's
//! verification alone.
//!
//! The tree is generated from a seed, so the same `--megabytes` and `--seed` give the same bytes
//! on every machine. Everything lives in a temporary directory removed at the end; the servers
//! are killed on every exit path.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use davit_agent::packing::{self, Verifier};
use davit_benches::harness::{
    DEFAULT_AGENT_BINARY, DEFAULT_DAVIT_BINARY, DavitNode, Machine, ResultsSection, ServerProcess, davit_source, megabytes_per_second,
    quoted_arguments,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const RESULTS: ResultsSection = ResultsSection { benchmark: "artifact-path", heading: "## Artifact path" };

/// The target: Davit's full path at least as fast as the reference pipeline.
const TARGET_RATIO: f64 = 1.0;

#[derive(Parser, Debug)]
#[command(about = "Artifact path throughput: a real agent and node (pack, hash, upload, verify, store) beside `tar | zstd -3 | sha256sum`")]
struct Arguments {
    /// Size of the generated tree's file contents, in megabytes (10^6 bytes).
    #[arg(long, default_value_t = 500)]
    megabytes: u64,
    /// Timed runs of each variant; runs of the variants are interleaved so that noise from other
    /// work on the machine spreads over all of them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seed of the generated contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory in which the temporary tree, node and agent live (default: the system's).
    #[arg(long)]
    scratch: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_DAVIT_BINARY)]
    davit_binary: PathBuf,
    #[arg(long, default_value = DEFAULT_AGENT_BINARY)]
    agent_binary: PathBuf,
    /// Rewrite this benchmark's block in this file (benches/RESULTS.md).
    #[arg(long)]
    results_file: Option<PathBuf>,
}

/// Roughly the share of text in a build output directory; the rest is incompressible
/// (images, already-compressed assets, binaries with high entropy).
const TEXT_SHARE: f64 = 0.55;

const WORDS: &[&str] = &[
    "fn",
    "let",
    "mut",
    "match",
    "self",
    "return",
    "impl",
    "struct",
    "enum",
    "pub",
    "use",
    "const",
    "static",
    "async",
    "await",
    "if",
    "else",
    "for",
    "while",
    "loop",
    "break",
    "continue",
    "where",
    "trait",
    "type",
    "mod",
    "crate",
    "super",
    "deployment",
    "artifact",
    "pipeline",
    "agent",
    "coordinator",
    "lease",
    "snapshot",
    "digest",
    "buffer",
    "stream",
    "request",
    "response",
    "error",
    "result",
    "option",
    "some",
    "none",
    "ok",
    "err",
    "string",
    "vec",
    "map",
    "iter",
    "collect",
    "clone",
    "into",
    "from",
    "new",
    "default",
    "build",
    "deploy",
    "target",
    "release",
    "config",
    "value",
    "key",
    "index",
    "length",
    "count",
    "status",
    "state",
    "event",
    "log",
    "info",
    "warn",
    "debug",
    "trace",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ";",
    ",",
    ".",
    "=",
    "==",
    "=>",
    "->",
    "::",
    "&",
    "*",
    "+",
    "-",
    "<div",
    "class=\"container\">",
    "</div>",
    "<span>",
    "</span>",
    "function",
    "var",
    "const",
    "require(",
    "module.exports",
    "null",
    "true",
    "false",
    "undefined",
    "this",
    "prototype",
    "console.log(",
    "\"",
    "'",
    "#include",
    "<stdio.h>",
    "int",
    "char",
    "void",
];

#[derive(Default)]
struct TreeStats {
    files: u64,
    symlinks: u64,
    text_bytes: u64,
    random_bytes: u64,
}

impl TreeStats {
    fn bytes(&self) -> u64 {
        self.text_bytes + self.random_bytes
    }
}

/// Source-like text: most lines repeat lines seen before (as code repeats its idioms), a few are
/// new. Purely random word salad would compress at half the speed and ratio of real source code,
/// which zstd -3 packs about 7:1.
struct TextGenerator {
    common_lines: Vec<Vec<u8>>,
}

impl TextGenerator {
    fn new(rng: &mut StdRng) -> TextGenerator {
        TextGenerator { common_lines: (0..4096).map(|_| Self::fresh_line(rng)).collect() }
    }

    fn fresh_line(rng: &mut StdRng) -> Vec<u8> {
        let mut line = vec![b' '; 4 * rng.random_range(0..4usize)];
        for position in 0..rng.random_range(2..12) {
            if position > 0 {
                line.push(b' ');
            }
            line.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
            if rng.random_ratio(1, 8) {
                line.extend_from_slice(rng.random::<u16>().to_string().as_bytes());
            }
        }
        line.push(b'\n');
        line
    }

    fn generate(&self, rng: &mut StdRng, size: usize) -> Vec<u8> {
        let mut text = Vec::with_capacity(size + 256);
        while text.len() < size {
            if rng.random_ratio(1, 6) {
                text.extend_from_slice(&Self::fresh_line(rng));
            } else {
                // Skewed towards the first lines, as common idioms are.
                let index = (rng.random::<f64>().powi(3) * self.common_lines.len() as f64) as usize;
                text.extend_from_slice(&self.common_lines[index.min(self.common_lines.len() - 1)]);
            }
        }
        text.truncate(size);
        text
    }
}

/// A build-output-like tree: many small files, some medium, a few large; executables; symlinks.
fn generate_tree(root: &Path, target_bytes: u64, seed: u64) -> anyhow::Result<TreeStats> {
    let mut rng = StdRng::seed_from_u64(seed);
    let text_generator = TextGenerator::new(&mut rng);
    let mut stats = TreeStats::default();
    let subdirectories = ["src", "assets", "lib", "docs/reference"];
    while stats.bytes() < target_bytes {
        let index = stats.files;
        let directory = root.join(format!("module-{:03}", index / 64)).join(subdirectories[rng.random_range(0..subdirectories.len())]);
        fs::create_dir_all(&directory)?;
        let roll = rng.random_range(0..100);
        let size = if roll < 70 {
            rng.random_range(512..64 << 10)
        } else if roll < 96 {
            rng.random_range(64 << 10..2 << 20)
        } else {
            rng.random_range(4 << 20..24 << 20)
        };
        let size = size.min(usize::try_from(target_bytes - stats.bytes())?).max(1);
        let is_text = rng.random_bool(TEXT_SHARE);
        let contents = if is_text {
            stats.text_bytes += size as u64;
            text_generator.generate(&mut rng, size)
        } else {
            stats.random_bytes += size as u64;
            let mut bytes = vec![0; size];
            rng.fill_bytes(&mut bytes);
            bytes
        };
        let name = format!("file-{index:06}.{}", if is_text { "txt" } else { "bin" });
        let path = directory.join(&name);
        fs::write(&path, contents)?;
        if index % 10 == 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        }
        if index % 97 == 0 {
            symlink(&name, directory.join(format!("link-{index:06}")))?;
            stats.symlinks += 1;
        }
        stats.files += 1;
    }
    Ok(stats)
}

/// User plus system CPU seconds used so far by this process (`libc::RUSAGE_SELF`, all threads) or
/// by its waited-for children and their descendants (`libc::RUSAGE_CHILDREN`).
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage only writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut usage);
        usage
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Runs `command` with `sh -c`; returns its duration, the CPU seconds of the whole pipeline and its
/// standard output.
fn time_shell(command: &str) -> anyhow::Result<(Duration, f64, String)> {
    let cpu_before = cpu_seconds(libc::RUSAGE_CHILDREN);
    let start = Instant::now();
    let output = Command::new("sh").arg("-c").arg(command).stdin(Stdio::null()).stderr(Stdio::inherit()).output()?;
    let elapsed = start.elapsed();
    ensure!(output.status.success(), "`{command}` failed: {}", output.status);
    Ok((elapsed, cpu_seconds(libc::RUSAGE_CHILDREN) - cpu_before, String::from_utf8_lossy(&output.stdout).trim().to_string()))
}

/// Quotes a path for `sh`.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

struct Variant {
    name: &'static str,
    runs: Vec<Duration>,
    /// CPU seconds per run where this process can count them (not for the node and agent).
    cpu_seconds: Vec<f64>,
}

impl Variant {
    fn new(name: &'static str) -> Variant {
        Variant { name, runs: Vec::new(), cpu_seconds: Vec::new() }
    }

    fn median(&self) -> Duration {
        let mut sorted = self.runs.clone();
        sorted.sort();
        sorted[sorted.len() / 2]
    }

    fn median_cpu_seconds(&self) -> Option<f64> {
        let mut sorted = self.cpu_seconds.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied()
    }
}

fn run_git(directory: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("git").arg("-C").arg(directory).args(args).output().context("cannot run git")?;
    ensure!(output.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// A real node, a real agent registered with it (shell executor, one job at a time, `file` git
/// URLs allowed), and a pipeline whose build copies the tree into the workspace and declares
/// it as the artifact.
struct DavitSetup {
    node: DavitNode,
    _agent: ServerProcess,
    pipeline_id: u64,
    commit: String,
}

impl DavitSetup {
    async fn start(arguments: &Arguments, scratch: &Path, tree: &Path) -> anyhow::Result<Self> {
        if !arguments.agent_binary.is_file() {
            bail!(
                "davit-agent binary {} not found; build it with `cargo build --release -p davit-agent`",
                arguments.agent_binary.display()
            );
        }
        let node = DavitNode::start(&arguments.davit_binary, "").await?;
        let agent_directory = scratch.join("agent");
        fs::create_dir_all(&agent_directory)?;
        let agent_config = agent_directory.join("agent.toml");
        fs::write(
            &agent_config,
            format!(
                "state_dir = {:?}\ncoordinators = [{:?}]\ncapacity = 1\nexecutor = \"shell\"\ngit_protocols = [\"file\"]\n",
                agent_directory.join("state"),
                node.grpc_addr
            ),
        )?;
        let registration = Command::new(&arguments.agent_binary)
            .arg("--config")
            .arg(&agent_config)
            .args(["register", "--token", &node.registration_token().await?, "--name", "bench-agent", "--pool", "build"])
            .output()
            .context("cannot run davit-agent register")?;
        ensure!(registration.status.success(), "davit-agent register failed: {}", String::from_utf8_lossy(&registration.stderr));
        let mut command = Command::new(&arguments.agent_binary);
        command.arg("--config").arg(&agent_config).arg("run").env("NO_COLOR", "1");
        let mut agent = ServerProcess::spawn("davit-agent".into(), command, agent_directory.join("agent.log"))?;

        let repository = scratch.join("repository");
        fs::create_dir_all(&repository)?;
        run_git(&repository, &["init", "-q", "-b", "main"])?;
        fs::write(repository.join("README"), "the artifact benchmark's repository\n")?;
        run_git(&repository, &["add", "README"])?;
        run_git(&repository, &["-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-q", "-m", "initial"])?;
        let commit = Command::new("git").arg("-C").arg(&repository).args(["rev-parse", "HEAD"]).output()?;
        let commit = String::from_utf8_lossy(&commit.stdout).trim().to_string();
        let repo = node
            .post(
                "/api/v1/repos/connect",
                &serde_json::json!({ "repo_url": format!("file://{}", repository.display()), "branch": "main", "scm_type": "github" }),
            )
            .await?;
        // Hard links: the copy costs no file data, and the agent reads the same page-cached
        // bytes the reference pipeline reads. The stamp makes each run's digest new.
        let build_command = format!("cp -al {} out && date +%s%N > out/run-stamp", shell_quote(tree));
        let pipeline = node
            .post(
                "/api/v1/pipelines",
                &serde_json::json!({
                    "name": "artifact-bench", "repo_id": repo["repo_id"], "branch": "main", "build_command": build_command,
                    "deploy_strategy": "rolling", "build": { "artifacts": ["out"], "timeout_seconds": 900 }
                }),
            )
            .await?;
        let pipeline_id = pipeline["pipeline_id"].as_u64().context("the pipeline answer has no pipeline_id")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            agent.check_running()?;
            let agents = node.get("/api/v1/agents").await?;
            if agents["items"].as_array().is_some_and(|items| items.iter().any(|agent| agent["state"] == "online")) {
                break;
            }
            ensure!(Instant::now() < deadline, "the agent did not come online within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self { node, _agent: agent, pipeline_id, commit })
    }

    /// One build; the duration of its `artifacts` step (pack, hash, upload, verify, store,
    /// record) as Davit recorded it.
    async fn run_once(&self) -> anyhow::Result<Duration> {
        let deployment = self
            .node
            .post(
                "/api/v1/deployments",
                &serde_json::json!({ "pipeline_id": self.pipeline_id.to_string(), "commit_hash": self.commit, "environment": "development" }),
            )
            .await?;
        let deployment_id = deployment["deployment_id"].as_u64().context("the deployment answer has no deployment_id")?;
        let deadline = Instant::now() + Duration::from_secs(900);
        let job = loop {
            let job = self.node.get(&format!("/api/v1/deployments/{deployment_id}/jobs")).await?["items"][0].clone();
            if matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                break job;
            }
            ensure!(Instant::now() < deadline, "deployment {deployment_id} did not finish within 900 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        ensure!(job["status"] == "succeeded", "the build failed: {job:#}");
        let log = self
            .node
            .http
            .get(self.node.url(&format!("/api/v1/logs/{deployment_id}?format=raw")))
            .bearer_auth(&self.node.token)
            .send()
            .await?
            .text()
            .await?;
        ensure!(log.contains("(uploaded, "), "the artifact was not uploaded in this run; its log:\n{log}");
        for line in log.lines().filter(|line| line.contains("hashed ") || line.contains("(uploaded, ")) {
            eprintln!("  agent: {line}");
        }
        let node_log = std::fs::read_to_string(&self.node.process.log_path).unwrap_or_default();
        if let Some(line) = node_log.lines().rev().find(|line| line.contains("artifact uploaded")) {
            eprintln!("  node: {line}");
        }
        let step = job["steps"]
            .as_array()
            .and_then(|steps| steps.iter().find(|step| step["name"] == "artifacts"))
            .with_context(|| format!("the job has no artifacts step: {job:#}"))?;
        let milliseconds = step["duration_ms"].as_u64().with_context(|| format!("the artifacts step has no duration: {step:#}"))?;
        Ok(Duration::from_millis(milliseconds))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let arguments = Arguments::parse();
    ensure!(arguments.runs > 0, "--runs must be at least 1");
    for tool in ["tar", "zstd", "sha256sum", "git", "cp"] {
        if Command::new("sh").arg("-c").arg(format!("command -v {tool}")).stdout(Stdio::null()).status()?.code() != Some(0) {
            bail!("`{tool}` is not installed; on Debian run `apt-get install -y {tool}`");
        }
    }
    let machine = Machine::describe()?;
    eprintln!("{}", machine.render());

    let scratch = match &arguments.scratch {
        Some(directory) => tempfile::tempdir_in(directory),
        None => tempfile::tempdir(),
    }
    .context("cannot create a temporary directory")?;
    let tree = scratch.path().join("tree");
    let started = Instant::now();
    let stats = generate_tree(&tree, arguments.megabytes * 1_000_000, arguments.seed)?;
    let bytes = stats.bytes();
    eprintln!(
        "tree: {} files, {} symlinks, {:.1} MB ({:.1} MB text, {:.1} MB random), generated in {:.1} s",
        stats.files,
        stats.symlinks,
        bytes as f64 / 1e6,
        stats.text_bytes as f64 / 1e6,
        stats.random_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
    );
    let (_, _, zstd_version) = time_shell("zstd --version")?;
    let davit = DavitSetup::start(&arguments, scratch.path(), &tree).await?;

    let quoted_tree = shell_quote(&tree);
    // Untimed: make sure the whole tree is in the page cache for every variant alike.
    time_shell(&format!("tar -cf - -C {quoted_tree} . > /dev/null"))?;
    let references = [
        ("`tar \\| zstd -3 \\| sha256sum` (the reference)", format!("tar -cf - -C {quoted_tree} . | zstd -3 | sha256sum")),
        ("`tar \\| zstd -3 -T0 \\| sha256sum` (zstd on every core)", format!("tar -cf - -C {quoted_tree} . | zstd -3 -T0 | sha256sum")),
    ];
    let mut variants = vec![
        Variant::new(references[0].0),
        Variant::new(references[1].0),
        Variant::new("Davit: pack only (in process, written and fsynced)"),
        Variant::new("**Davit: full path** (agent pack + upload + node verify + store + record)"),
    ];
    let dest = scratch.path().join("artifact.tar.zst");
    let mut packed = None;
    for run in 1..=arguments.runs {
        for (index, (_, command)) in references.iter().enumerate() {
            let (elapsed, cpu, output) = time_shell(command)?;
            ensure!(
                output.len() >= 64 && output[..64].chars().all(|c| c.is_ascii_hexdigit()),
                "unexpected output of `{command}`: {output}"
            );
            variants[index].runs.push(elapsed);
            variants[index].cpu_seconds.push(cpu);
        }
        let cpu_before = cpu_seconds(libc::RUSAGE_SELF);
        let start = Instant::now();
        let artifact = packing::pack(&tree, &[".".to_string()], &dest)?;
        variants[2].runs.push(start.elapsed());
        variants[2].cpu_seconds.push(cpu_seconds(libc::RUSAGE_SELF) - cpu_before);
        if let Some(previous) = &packed {
            ensure!(previous == &artifact, "two packs of the same tree differ: {previous:?} and {artifact:?}");
        }
        packed = Some(artifact);
        variants[3].runs.push(davit.run_once().await?);
        eprintln!(
            "run {run}: {}",
            variants
                .iter()
                .map(|variant| format!("{:.2} s", variant.runs.last().map_or(0.0, Duration::as_secs_f64)))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let packed = packed.context("no run happened")?;

    // The receiving side alone: the pack's output through the Verifier in 1 MiB pieces (the
    // agent's upload message size).
    let compressed = fs::read(&dest)?;
    let start = Instant::now();
    let mut verifier = Verifier::new();
    for piece in compressed.chunks(1 << 20) {
        verifier.update(piece)?;
    }
    let (verified_digest, verified_bytes) = verifier.finish()?;
    let verify_elapsed = start.elapsed();
    ensure!(verified_digest == packed.digest && verified_bytes == packed.uncompressed_bytes, "the Verifier disagrees with pack");

    let mut report = String::new();
    let _ = writeln!(report, "### Run of {}\n", machine.date);
    report.push_str(&machine.render());
    let _ = writeln!(report, "- zstd: {zstd_version}");
    let _ = writeln!(
        report,
        "- Davit: release binaries `{}` and `{}`, workspace at git `{}`",
        arguments.davit_binary.display(),
        arguments.agent_binary.display(),
        davit_source()
    );
    let _ = writeln!(
        report,
        "- Tree: {} files and {} symlinks, {:.1} MB of contents ({:.0} % source-like text, the rest random bytes), generated from seed {}; tar stream {:.1} MB, Davit's `.tar.zst` {:.1} MB",
        stats.files,
        stats.symlinks,
        bytes as f64 / 1e6,
        100.0 * stats.text_bytes as f64 / bytes as f64,
        arguments.seed,
        packed.uncompressed_bytes as f64 / 1e6,
        packed.compressed_bytes as f64 / 1e6
    );
    let _ = writeln!(
        report,
        "- The full path is the build job's `artifacts` step as Davit records it (agent clock, ms): from the start of packing to the node's \
         answer that the artifact is verified, stored (fsynced) and recorded through Raft. Agent and node are separate processes on this machine \
         talking gRPC over 127.0.0.1, so they share its {} cores with each other. Runs of the variants are interleaved; the tree is in the page cache.",
        machine.cpus
    );
    let _ = writeln!(
        report,
        "- Reproduce:\n\n```sh\nexport CARGO_TARGET_DIR=/var/cache/davit-target\ncargo build --release -p davit-coordinator -p davit-agent -p davit-benches\n$CARGO_TARGET_DIR/release/artifact-path {}\n```\n",
        quoted_arguments()
    );
    let _ = writeln!(report, "| variant | MB/s of contents (median of {}) | slowest .. fastest | CPU s (median) |", arguments.runs);
    let _ = writeln!(report, "|---|---:|---:|---:|");
    for variant in &variants {
        let fastest = variant.runs.iter().min().copied().unwrap_or_default();
        let slowest = variant.runs.iter().max().copied().unwrap_or_default();
        let _ = writeln!(
            report,
            "| {} | {:.1} | {:.1} .. {:.1} | {} |",
            variant.name,
            megabytes_per_second(bytes, variant.median()),
            megabytes_per_second(bytes, slowest),
            megabytes_per_second(bytes, fastest),
            variant.median_cpu_seconds().map_or("-".to_string(), |cpu| format!("{cpu:.2}"))
        );
    }
    let _ = writeln!(
        report,
        "| Davit: verification alone (streaming zstd decode + SHA-256, 1 MiB pieces, in process) | {:.1} | | |",
        megabytes_per_second(verified_bytes, verify_elapsed)
    );
    let full_path = megabytes_per_second(bytes, variants[3].median());
    let reference = megabytes_per_second(bytes, variants[0].median());
    let ratio = full_path / reference;
    let _ = writeln!(
        report,
        "\n**Target:** the full path at least {TARGET_RATIO:.1}x the reference's throughput. Davit {full_path:.1} MB/s = {ratio:.2}x \
         `tar | zstd -3 | sha256sum`'s {reference:.1} MB/s: **{}**. (Against zstd on every core: {:.2}x.)",
        if ratio >= TARGET_RATIO { "met" } else { "not met" },
        full_path / megabytes_per_second(bytes, variants[1].median())
    );
    println!("{report}");
    if let Some(path) = &arguments.results_file {
        RESULTS.write(path, &report)?;
    }
    Ok(())
}
