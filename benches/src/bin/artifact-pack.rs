//! `artifact-pack`: throughput of the agent's artifact packing (`davit_agent::packing::pack`: a
//! reproducible tar, its SHA-256, zstd level 3, written and fsynced) beside the shell pipeline it
//! stands in for, `tar | zstd -3 | sha256sum`, on the same generated tree in the same run.
//!
//! The tree is generated from a seed, so the same `--megabytes` and `--seed` give the same bytes on
//! every machine. Everything lives in a temporary directory that is removed at the end.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use davit_agent::packing::{self, Verifier};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

#[derive(Parser, Debug)]
#[command(about = "Artifact packing throughput: davit_agent::packing::pack beside `tar | zstd -3 | sha256sum` on one generated tree")]
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
    /// Directory in which the temporary tree and outputs are made (default: the system's).
    #[arg(long)]
    scratch: Option<PathBuf>,
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
    name: String,
    runs: Vec<Duration>,
    cpu_seconds: Vec<f64>,
}

impl Variant {
    fn new(name: &str) -> Variant {
        Variant { name: name.to_string(), runs: Vec::new(), cpu_seconds: Vec::new() }
    }

    fn median(&self) -> Duration {
        let mut sorted = self.runs.clone();
        sorted.sort();
        sorted[sorted.len() / 2]
    }

    fn median_cpu_seconds(&self) -> f64 {
        let mut sorted = self.cpu_seconds.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }
}

fn megabytes_per_second(bytes: u64, duration: Duration) -> f64 {
    bytes as f64 / 1e6 / duration.as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let arguments = Arguments::parse();
    ensure!(arguments.runs > 0, "--runs must be at least 1");
    for tool in ["tar", "zstd", "sha256sum"] {
        if Command::new("sh").arg("-c").arg(format!("command -v {tool}")).stdout(Stdio::null()).status()?.code() != Some(0) {
            bail!("`{tool}` is not installed; on Debian run `apt-get install -y {tool}`");
        }
    }

    let scratch = match &arguments.scratch {
        Some(directory) => tempfile::tempdir_in(directory),
        None => tempfile::tempdir(),
    }
    .context("cannot create a temporary directory")?;
    let tree = scratch.path().join("tree");
    let started = Instant::now();
    let stats = generate_tree(&tree, arguments.megabytes * 1_000_000, arguments.seed)?;
    let bytes = stats.bytes();
    println!(
        "tree: {} files, {} symlinks, {:.1} MB ({:.1} MB text, {:.1} MB random), generated in {:.1} s under {}",
        stats.files,
        stats.symlinks,
        bytes as f64 / 1e6,
        stats.text_bytes as f64 / 1e6,
        stats.random_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        tree.display()
    );
    let cores = std::thread::available_parallelism().map(|count| count.get()).unwrap_or(1);
    let (_, _, zstd_version) = time_shell("zstd --version")?;
    println!("machine: {cores} cores available; {zstd_version}");

    let quoted_tree = shell_quote(&tree);
    // Untimed: make sure the whole tree is in the page cache for every variant alike.
    time_shell(&format!("tar -cf - -C {quoted_tree} . > /dev/null"))?;
    let (_, _, reference_compressed) = time_shell(&format!("tar -cf - -C {quoted_tree} . | zstd -3 -T0 | wc -c"))?;

    let reference_commands = [
        ("tar | zstd -3 -T0 | sha256sum", format!("tar -cf - -C {quoted_tree} . | zstd -3 -T0 | sha256sum")),
        ("tar | zstd -3 | sha256sum (one zstd thread)", format!("tar -cf - -C {quoted_tree} . | zstd -3 | sha256sum")),
    ];
    let mut variants: Vec<Variant> =
        reference_commands.iter().map(|(name, _)| Variant::new(name)).chain([Variant::new("davit_agent::packing::pack")]).collect();

    let dest = scratch.path().join("artifact.tar.zst");
    let mut packed = None;
    for run in 1..=arguments.runs {
        for (index, (_, command)) in reference_commands.iter().enumerate() {
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
        let elapsed = start.elapsed();
        variants[reference_commands.len()].runs.push(elapsed);
        variants[reference_commands.len()].cpu_seconds.push(cpu_seconds(libc::RUSAGE_SELF) - cpu_before);
        if let Some(previous) = &packed {
            ensure!(previous == &artifact, "two packs of the same tree differ: {previous:?} and {artifact:?}");
        }
        packed = Some(artifact);
        println!(
            "run {run}: {}",
            variants
                .iter()
                .map(|variant| format!(
                    "{} {:.2} s ({:.2} CPU s)",
                    variant.name,
                    variant.runs.last().map_or(0.0, Duration::as_secs_f64),
                    variant.cpu_seconds.last().copied().unwrap_or(0.0)
                ))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    let packed = packed.context("no run happened")?;

    // The receiving side: stream the artifact through the Verifier in 64 KiB pieces.
    let compressed = fs::read(&dest)?;
    let start = Instant::now();
    let mut verifier = Verifier::new();
    for piece in compressed.chunks(64 << 10) {
        verifier.update(piece)?;
    }
    let (verified_digest, verified_bytes) = verifier.finish()?;
    let verify_elapsed = start.elapsed();
    ensure!(verified_digest == packed.digest && verified_bytes == packed.uncompressed_bytes, "the Verifier disagrees with pack");

    println!();
    println!(
        "throughput over {:.1} MB of file contents, median of {} runs (slowest .. fastest), and median CPU seconds (user + system):",
        bytes as f64 / 1e6,
        arguments.runs
    );
    for variant in &variants {
        let fastest = variant.runs.iter().min().copied().unwrap_or_default();
        let slowest = variant.runs.iter().max().copied().unwrap_or_default();
        println!(
            "  {:<46} {:>7.1} MB/s   ({:.1} .. {:.1} MB/s)   {:.2} CPU s",
            variant.name,
            megabytes_per_second(bytes, variant.median()),
            megabytes_per_second(bytes, slowest),
            megabytes_per_second(bytes, fastest),
            variant.median_cpu_seconds()
        );
    }
    let davit = megabytes_per_second(bytes, variants[2].median());
    println!(
        "  ratio davit / (zstd -T0 pipeline): {:.2}; davit / (one-thread zstd pipeline): {:.2}",
        davit / megabytes_per_second(bytes, variants[0].median()),
        davit / megabytes_per_second(bytes, variants[1].median())
    );
    println!(
        "  compressed: davit {:.1} MB (tar {:.1} MB, digest {}), zstd -3 -T0 of GNU tar {:.1} MB",
        packed.compressed_bytes as f64 / 1e6,
        packed.uncompressed_bytes as f64 / 1e6,
        &packed.digest[..16],
        reference_compressed.parse::<f64>().unwrap_or(0.0) / 1e6
    );
    println!(
        "  Verifier (streaming zstd decode + SHA-256, 64 KiB pieces): {:.1} MB/s of tar",
        megabytes_per_second(verified_bytes, verify_elapsed)
    );
    println!("note: davit also writes its output to disk and fsyncs it; the pipelines only hash theirs.");
    Ok(())
}
