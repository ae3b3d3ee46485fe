//! What every benchmark needs: real server processes that die with the benchmark, a single
//! Davit node with an admin token, a description of the machine, percentiles, and the
//! generated block each benchmark owns in `benches/RESULTS.md`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a server may take to start and answer.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The release binaries the benchmarks drive, built with
/// `cargo build --release -p davit-coordinator -p davit-agent`.
pub const DEFAULT_DAVIT_BINARY: &str = "/var/cache/davit-target/release/davit";
pub const DEFAULT_AGENT_BINARY: &str = "/var/cache/davit-target/release/davit-agent";

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// One server process. Dropping it kills it, so no process outlives its benchmark, whatever
/// path the benchmark leaves by.
pub struct ServerProcess {
    pub name: String,
    pub child: Child,
    pub log_path: PathBuf,
}

impl ServerProcess {
    pub fn spawn(name: String, mut command: Command, log_path: PathBuf) -> anyhow::Result<Self> {
        let log = std::fs::File::create(&log_path)?;
        command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = command.spawn().with_context(|| format!("cannot start {name} ({command:?})"))?;
        Ok(Self { name, child, log_path })
    }

    /// Fail with the end of the process's log if it has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited with {status}; the end of its log:\n{}", self.name, log_tail(&self.log_path));
        }
        Ok(())
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// CPU seconds (user + system) the process has used so far.
    pub fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(&self.pid())
    }

    /// Resident set size in bytes (`VmRSS` of /proc/<pid>/status).
    pub fn rss_bytes(&self) -> Option<u64> {
        process_rss_bytes(&self.pid())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(3000);
    let start = (start..text.len()).find(|index| text.is_char_boundary(*index)).unwrap_or(text.len());
    text[start..].to_string()
}

/// `count` distinct free ports on 127.0.0.1, held open together so none is handed out twice.
pub fn free_addresses(count: usize) -> anyhow::Result<Vec<String>> {
    let listeners = (0..count).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<Result<Vec<_>, _>>()?;
    listeners.iter().map(|listener| Ok(listener.local_addr()?.to_string())).collect()
}

/// CPU seconds a process has used, from /proc/<pid>/stat (utime + stime, in clock ticks).
pub fn process_cpu_seconds(pid: &str) -> f64 {
    stat_ticks(pid, 2)
}

/// The sum of `count` clock-tick fields of /proc/<pid>/stat from utime on (utime, stime,
/// cutime, cstime), in seconds; 0 if the process is gone.
fn stat_ticks(pid: &str, count: usize) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may contain spaces; the fields after its ')' are fixed.
    let Some((_, fields)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    // utime is field 14 of the line, the 12th after the name; stime, cutime, cstime follow.
    let ticks: f64 = fields.split_whitespace().skip(11).take(count).filter_map(|value| value.parse::<f64>().ok()).sum();
    ticks / clock_ticks_per_second()
}

/// Resident set size of a process in bytes, from `VmRSS` in /proc/<pid>/status.
pub fn process_rss_bytes(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8_lossy(&output.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Unlabelled samples of a Prometheus text exposition (labelled series are skipped).
pub fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.contains('{'))
        .filter_map(|line| {
            let (name, value) = line.split_once(' ')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Run a benchmark until it ends or the process is interrupted (Ctrl-C, SIGTERM). Returning
/// drops `work`, and with it every process it started ([`ServerProcess`] kills on drop).
pub async fn run_until_interrupted(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => bail!("interrupted; the processes started so far have been stopped"),
        _ = terminate.recv() => bail!("terminated; the processes started so far have been stopped"),
    }
}

/// An HTTP client for 127.0.0.1 only: a proxy from the environment must not be asked.
pub fn local_http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build()?)
}

// ---------------------------------------------------------------------------------------------
// A single Davit node
// ---------------------------------------------------------------------------------------------

/// A single-node Davit cluster (`davit serve`) in its own temporary directory, logged in as
/// the first admin. Dropping it kills the process before the directory is deleted.
pub struct DavitNode {
    pub process: ServerProcess,
    pub http_addr: String,
    pub grpc_addr: String,
    /// The admin's bearer token.
    pub token: String,
    pub http: reqwest::Client,
    pub directory: tempfile::TempDir,
}

impl DavitNode {
    /// Start `binary serve` with a generated config; `extra_config` is appended to it (TOML
    /// tables such as `[agents]`). The node's data lives in `<directory>/node`, its blobs in
    /// `<directory>/blobs`.
    pub async fn start(binary: &Path, extra_config: &str) -> anyhow::Result<Self> {
        if !binary.is_file() {
            bail!("davit binary {} not found; build it with `cargo build --release -p davit-coordinator`", binary.display());
        }
        let directory = tempfile::Builder::new().prefix("davit-bench-").tempdir()?;
        let addresses = free_addresses(2)?;
        let (http_addr, grpc_addr) = (addresses[0].clone(), addresses[1].clone());
        let config = format!(
            "node_id = 1\nregion = \"local\"\nhttp_addr = \"{http_addr}\"\ngrpc_addr = \"{grpc_addr}\"\ndata_dir = \"node\"\n\n\
             [blob_store]\nkind = \"dir\"\npath = \"blobs\"\n\n{extra_config}\n"
        );
        let config_path = directory.path().join("davit.toml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(binary);
        command.arg("serve").arg("--config").arg(&config_path);
        let mut process = ServerProcess::spawn("davit".into(), command, directory.path().join("davit.log"))?;

        let http = local_http_client()?;
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            process.check_running()?;
            match http.get(format!("http://{http_addr}/readyz")).send().await {
                Ok(response) if response.status().is_success() => break,
                _ if Instant::now() > deadline => {
                    bail!(
                        "davit was not ready within {} s; the end of its log:\n{}",
                        STARTUP_TIMEOUT.as_secs(),
                        log_tail(&process.log_path)
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let credentials_path = directory.path().join("node/initial-admin.json");
        let credentials: serde_json::Value = loop {
            if let Ok(text) = std::fs::read_to_string(&credentials_path)
                && let Ok(value) = serde_json::from_str(&text)
            {
                break value;
            }
            if Instant::now() > deadline {
                bail!("davit wrote no initial-admin.json within {} s", STARTUP_TIMEOUT.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let login: serde_json::Value = http
            .post(format!("http://{http_addr}/api/v1/auth/login"))
            .json(&serde_json::json!({ "username": credentials["username"], "password": credentials["password"] }))
            .send()
            .await?
            .error_for_status()
            .context("login with the initial admin's credentials failed")?
            .json()
            .await?;
        let token = login["token"].as_str().context("the login answer has no token")?.to_string();
        Ok(Self { process, http_addr, grpc_addr, token, http, directory })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr)
    }

    /// POST a JSON body as the admin; the answer's JSON, or an error with the body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let response = self.http.post(self.url(path)).bearer_auth(&self.token).json(body).send().await?;
        json_or_error(response, "POST", path).await
    }

    /// GET as the admin; the answer's JSON, or an error with the body.
    pub async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let response = self.http.get(self.url(path)).bearer_auth(&self.token).send().await?;
        json_or_error(response, "GET", path).await
    }

    /// A fresh agent registration token (`drt_...`); many agents may register with it.
    pub async fn registration_token(&self) -> anyhow::Result<String> {
        let created = self.post("/api/v1/agents/registration-tokens", &serde_json::json!({ "description": "benchmark" })).await?;
        Ok(created["token"].as_str().context("the registration token answer has no token")?.to_string())
    }

    /// Prometheus samples from `/metrics` (unlabelled series).
    pub async fn metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        Ok(parse_prometheus(&self.http.get(self.url("/metrics")).send().await?.text().await?))
    }
}

async fn json_or_error(response: reqwest::Response, method: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("{method} {path} answered {status}: {text}");
    }
    Ok(if text.is_empty() { serde_json::Value::Null } else { serde_json::from_str(&text)? })
}

// ---------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------

pub fn milliseconds(duration: Duration) -> String {
    let ms = duration.as_secs_f64() * 1000.0;
    if ms < 10.0 { format!("{ms:.2}") } else { format!("{ms:.1}") }
}

/// The `quantile` (0..=1) of already sorted samples, nearest rank.
pub fn percentile(sorted: &[Duration], quantile: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((quantile * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub fn megabytes_per_second(bytes: u64, duration: Duration) -> f64 {
    bytes as f64 / 1e6 / duration.as_secs_f64().max(1e-9)
}

// ---------------------------------------------------------------------------------------------
// The machine
// ---------------------------------------------------------------------------------------------

pub struct Machine {
    pub date: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub memory: String,
    pub kernel: String,
    pub disk: String,
    pub fsync_p50: Duration,
    pub fsync_p99: Duration,
    /// The 1-minute load average when the run began: a busy machine skews every figure.
    pub load_average: String,
}

impl Machine {
    pub fn describe() -> anyhow::Result<Self> {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| {
                line.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, model)| model.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|kib| kib.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let load_average =
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("unknown").to_string();

        // Data directories live under the temporary directory, so that is the disk to
        // describe and to time.
        let probe_directory = tempfile::Builder::new().prefix("davit-bench-probe-").tempdir()?;
        let mount = command_output("findmnt", &["-n", "-o", "SOURCE,FSTYPE", "--target", &probe_directory.path().to_string_lossy()]);
        let device = mount.split_whitespace().next().unwrap_or("").trim_start_matches("/dev/").to_string();
        let rotational = std::fs::read_to_string(format!("/sys/block/{device}/queue/rotational")).ok().map(|text| text.trim() == "1");
        let disk = format!(
            "{} under {} ({}{})",
            if mount.is_empty() { "unknown device".to_string() } else { mount.clone() },
            std::env::temp_dir().display(),
            match rotational {
                Some(true) => "the kernel reports it rotational",
                Some(false) => "the kernel reports it non-rotational",
                None => "rotational: unknown",
            },
            if device.starts_with("vd") { ", virtio" } else { "" }
        );
        let (fsync_p50, fsync_p99) = fsync_probe(probe_directory.path())?;
        Ok(Self {
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu_model,
            memory,
            kernel,
            disk,
            fsync_p50,
            fsync_p99,
            load_average,
        })
    }

    pub fn render(&self) -> String {
        format!(
            "- CPU: {} cores (nproc), {}\n- Memory: {}\n- Kernel: Linux {}\n- Disk: {}; one 4 KiB append + fdatasync takes p50 {} ms, p99 {} ms\n- Load average (1 min) when the run began: {}\n",
            self.cpus,
            self.cpu_model,
            self.memory,
            self.kernel,
            self.disk,
            milliseconds(self.fsync_p50),
            milliseconds(self.fsync_p99),
            self.load_average
        )
    }
}

/// Standard output of a command, trimmed; empty if it cannot run.
pub fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Time 200 appends of 4 KiB each followed by fdatasync: the floor under any durable write.
fn fsync_probe(directory: &Path) -> anyhow::Result<(Duration, Duration)> {
    let mut file = std::fs::File::create(directory.join("fsync-probe"))?;
    let block = vec![0x5a_u8; 4096];
    let mut durations = Vec::with_capacity(200);
    for _ in 0..200 {
        let started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        durations.push(started.elapsed());
    }
    durations.sort_unstable();
    Ok((percentile(&durations, 0.50), percentile(&durations, 0.99)))
}

/// Which Davit source the binaries were built from, as far as the workspace's git can tell.
pub fn davit_source() -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Command::new("git")
        .arg("-C")
        .arg(&workspace)
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// This process's arguments, quoted for a shell where needed.
pub fn quoted_arguments() -> String {
    std::env::args()
        .skip(1)
        .map(|argument| {
            if argument.chars().all(|c| c.is_ascii_alphanumeric() || "-_=.,/:".contains(c)) {
                argument
            } else {
                format!("'{}'", argument.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// RESULTS.md
// ---------------------------------------------------------------------------------------------

/// The part of RESULTS.md one benchmark owns: a `## heading` and, under it, a block between
/// two markers that the benchmark rewrites; text outside the markers is kept.
pub struct ResultsSection {
    /// The benchmark's binary name, used in the markers.
    pub benchmark: &'static str,
    /// The section's heading line, such as `## Replicated writes`.
    pub heading: &'static str,
}

impl ResultsSection {
    fn begin(&self) -> String {
        format!("<!-- {}:begin (generated by `{} --results-file`) -->", self.benchmark, self.benchmark)
    }

    fn end(&self) -> String {
        format!("<!-- {}:end -->", self.benchmark)
    }

    /// Replace this benchmark's generated block in `path` (creating the file or the section
    /// if needed), keeping every other line.
    pub fn write(&self, path: &Path, generated: &str) -> anyhow::Result<()> {
        let (begin_marker, end_marker) = (self.begin(), self.end());
        let block = format!("{begin_marker}\n{}\n{end_marker}", generated.trim_end());
        let existing = std::fs::read_to_string(path).unwrap_or_default();
        let updated = match (existing.find(&begin_marker), existing.find(&end_marker)) {
            (Some(begin), Some(end)) if begin < end => {
                format!("{}{block}{}", &existing[..begin], &existing[end + end_marker.len()..])
            }
            _ if existing.contains(self.heading) => {
                // The section exists without a generated block: put the block at its start.
                let heading = existing.find(self.heading).expect("checked above");
                let after_heading = existing[heading..].find('\n').map_or(existing.len(), |offset| heading + offset + 1);
                format!("{}\n{block}\n{}", &existing[..after_heading], &existing[after_heading..])
            }
            _ => {
                let mut text = if existing.trim().is_empty() {
                    "# Benchmark results\n\nEach section is one benchmark under `benches/`; its generated block is rewritten by the benchmark itself.\n".to_string()
                } else {
                    existing
                };
                let _ = write!(text, "\n{}\n\n{block}\n", self.heading);
                text
            }
        };
        std::fs::write(path, updated).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote the {:?} section of {}", self.heading, path.display());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// How busy the machine was
// ---------------------------------------------------------------------------------------------

/// CPU seconds (user + system) a process has used so far, plus those of the children it has
/// waited for (cutime + cstime): an agent's git and shell processes count towards the agent.
pub fn process_tree_cpu_seconds(pid: &str) -> f64 {
    stat_ticks(pid, 4)
}

/// CPU seconds the whole machine has spent busy and in all, so far (the `cpu` line of
/// /proc/stat, summed over every core; idle and iowait count as not busy).
pub fn machine_cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|line| line.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let values: Vec<f64> = line.split_whitespace().skip(1).filter_map(|value| value.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: f64 = values.iter().take(8).sum();
    let idle = values.get(3).copied().unwrap_or(0.0) + values.get(4).copied().unwrap_or(0.0);
    ((total - idle) / clock_ticks_per_second(), total / clock_ticks_per_second())
}

/// The 1-minute load average now.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().next().unwrap_or("unknown").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_are_read_from_proc() {
        let started = Instant::now();
        let mut spin = 0u64;
        while started.elapsed() < Duration::from_millis(300) {
            spin = spin.wrapping_add(std::hint::black_box(1));
        }
        let own = process_cpu_seconds("self");
        assert!(own >= 0.1, "this process used {own} CPU seconds after spinning ({spin})");
        assert!(process_tree_cpu_seconds("self") >= own);
        assert_eq!(process_cpu_seconds("no-such-process"), 0.0);
    }
}
