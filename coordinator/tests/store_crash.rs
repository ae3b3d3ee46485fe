//! Crash tests of the storage backends themselves, below Raft: a child process (this same test
//! binary, re-executed) writes numbered batches and prints each number only after `write` (or
//! `sync`) has returned; the parent kills it with SIGKILL at a random moment, reopens the
//! store and checks every printed batch is there and whole. Round after round on the same
//! store, so recovery from one crash is itself crashed into.
//!
//! What is checked against the storage trait's promises (`store/mod.rs`):
//! - the store opens again after every crash;
//! - every acknowledged batch (`Immediate`, or `Deferred` followed by a returned `sync`) is
//!   fully present, including its deletes;
//! - no batch is torn: any batch found at all is found whole, acknowledged or not.
//!
//! SIGKILL ends the process, not the machine: whatever the process had handed to the kernel
//! survives in the page cache. So this finds bugs in the backends' write ordering, atomicity
//! and recovery, but cannot prove that they fsync; a missing fsync only shows after a power
//! cut or a kernel crash.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use davit_coordinator::store::{BackendKind, Durability, Table, WriteBatch, full_range, open_backend};
use rand::Rng;

/// Set in the child: `<store dir>,<backend>,<first sequence number>`.
const CHILD_ENV: &str = "DAVIT_CRASH_CHILD";
/// Crash rounds per backend; `DAVIT_CRASH_ROUNDS` raises it for a longer soak.
const DEFAULT_ROUNDS: usize = 20;
/// Every round must get its first acknowledgement within this time, so the whole test is
/// bounded by the number of rounds times it (plus the child's short life per round).
const ROUND_DEADLINE: Duration = Duration::from_secs(30);
/// The child's longest life before the parent kills it, counted from its first acknowledgement.
const MAX_LIFETIME_MS: u64 = 400;
const LATEST: &[u8] = b"latest";

fn parts_of(sequence: u64) -> u64 {
    1 + sequence % 7
}

fn record_key(sequence: u64, part: u64) -> Vec<u8> {
    format!("seq-{sequence:012}-{part}").into_bytes()
}

fn pending_key(sequence: u64) -> Vec<u8> {
    format!("pending-{sequence:012}").into_bytes()
}

/// A value that can only have come from this batch: its length and bytes depend on both.
fn record_value(sequence: u64, part: u64) -> Vec<u8> {
    let length = 16 + ((sequence * 7919 + part * 104_729) % 700) as usize;
    let seed = format!("{sequence}:{part};");
    seed.bytes().cycle().take(length).collect()
}

/// Odd batches also write the index and meta tables.
fn touches_several_tables(sequence: u64) -> bool {
    sequence % 2 == 1
}

/// Batch `sequence`: its records, a `pending` marker for itself and the delete of the previous
/// batch's marker. Odd batches also touch two more tables, so sled's multi-tree transaction is
/// exercised as well as its single-tree batch.
fn batch_for(sequence: u64) -> WriteBatch {
    let mut batch = WriteBatch::new();
    for part in 0..parts_of(sequence) {
        batch.put(Table::Jobs, record_key(sequence, part), record_value(sequence, part));
    }
    batch.put(Table::Jobs, pending_key(sequence), b"pending".to_vec());
    if sequence > 0 {
        batch.delete(Table::Jobs, pending_key(sequence - 1));
    }
    if touches_several_tables(sequence) {
        batch.put(Table::Indexes, record_key(sequence, 0), sequence.to_be_bytes().to_vec());
        batch.put(Table::RaftMeta, LATEST.to_vec(), sequence.to_be_bytes().to_vec());
    }
    batch
}

/// The child: write batches forever (until killed), printing `ack N` once batch N is durable.
/// Seven of every ten batches are `Immediate`; the rest go in groups of three `Deferred` writes
/// acknowledged together after one `sync`, the way the Raft log store groups its fsyncs.
fn run_child(spec: &str) -> ! {
    let mut fields = spec.rsplitn(3, ',');
    let start: u64 = fields.next().and_then(|s| s.parse().ok()).expect("first sequence number");
    let kind: BackendKind = fields.next().and_then(|s| s.parse().ok()).expect("backend name");
    let dir = PathBuf::from(fields.next().expect("store directory"));
    let store = open_backend(kind, &dir).unwrap_or_else(|error| panic!("the child cannot open the {kind} store: {error}"));
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "opened").and_then(|_| stdout.flush()).expect("stdout");
    let mut sequence = start;
    // A safety net only: the parent kills the child long before this.
    let give_up_at = Instant::now() + Duration::from_secs(60);
    while Instant::now() < give_up_at {
        if sequence % 10 < 7 {
            store.write(batch_for(sequence), Durability::Immediate).expect("immediate write");
            writeln!(stdout, "ack {sequence}").and_then(|_| stdout.flush()).expect("stdout");
            sequence += 1;
        } else {
            let group = sequence..sequence + 3;
            for member in group.clone() {
                store.write(batch_for(member), Durability::Deferred).expect("deferred write");
            }
            store.sync().expect("sync");
            for member in group {
                writeln!(stdout, "ack {member}").expect("stdout");
            }
            stdout.flush().expect("stdout");
            sequence += 3;
        }
    }
    std::process::exit(0);
}

/// What one crashed round left behind, as found by reopening the store.
#[derive(Debug, Default)]
struct Findings {
    /// Acknowledged batches missing or incomplete.
    lost: Vec<u64>,
    /// Batches found partly (acknowledged or not): an atomicity violation.
    torn: Vec<u64>,
    /// `pending` markers of batches older than the last acknowledged one: an acknowledged
    /// delete was undone.
    resurrected: Vec<u64>,
    /// The highest batch number present at all.
    highest_present: Option<u64>,
}

fn parse_sequence(text: &str) -> Option<u64> {
    text.get(..12)?.parse().ok()
}

/// Reopen the store and compare it with every batch acknowledged so far.
fn inspect(kind: BackendKind, dir: &Path, acknowledged: &BTreeSet<u64>) -> Result<Findings, String> {
    let store = open_backend(kind, dir).map_err(|error| format!("the {kind} store does not open after kill -9: {error}"))?;
    let rows = store.scan(Table::Jobs, full_range(), usize::MAX, false).map_err(|error| format!("scan: {error}"))?;
    let mut parts: BTreeMap<u64, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
    let mut pending = Vec::new();
    for (key, value) in rows {
        let key = String::from_utf8(key).map_err(|_| "a key that is not UTF-8".to_string())?;
        if let Some(rest) = key.strip_prefix("seq-") {
            let sequence = parse_sequence(rest).ok_or_else(|| format!("malformed key {key}"))?;
            let part: u64 = rest[13..].parse().map_err(|_| format!("malformed key {key}"))?;
            parts.entry(sequence).or_default().insert(part, value);
        } else if let Some(rest) = key.strip_prefix("pending-") {
            pending.push(parse_sequence(rest).ok_or_else(|| format!("malformed key {key}"))?);
        } else {
            return Err(format!("unexpected key {key}"));
        }
    }
    let whole = |sequence: u64| -> Result<bool, String> {
        let Some(found) = parts.get(&sequence) else {
            return Ok(false);
        };
        let records_whole = (0..parts_of(sequence)).all(|part| found.get(&part) == Some(&record_value(sequence, part)))
            && found.len() as u64 == parts_of(sequence);
        let index_whole = !touches_several_tables(sequence)
            || store.get(Table::Indexes, &record_key(sequence, 0)).map_err(|e| e.to_string())? == Some(sequence.to_be_bytes().to_vec());
        Ok(records_whole && index_whole)
    };
    let mut findings = Findings { highest_present: parts.keys().next_back().copied(), ..Findings::default() };
    for sequence in acknowledged {
        if !whole(*sequence)? {
            findings.lost.push(*sequence);
        }
    }
    for sequence in parts.keys() {
        if !whole(*sequence)? {
            findings.torn.push(*sequence);
        }
    }
    if let Some(highest_acknowledged) = acknowledged.last() {
        findings.resurrected = pending.into_iter().filter(|sequence| sequence < highest_acknowledged).collect();
        let highest_odd = acknowledged.iter().rev().find(|sequence| touches_several_tables(**sequence));
        let latest = store.get(Table::RaftMeta, LATEST).map_err(|e| e.to_string())?;
        let latest = latest.map(|bytes| u64::from_be_bytes(bytes.try_into().expect("8 bytes")));
        if let Some(highest_odd) = highest_odd
            && latest < Some(*highest_odd)
        {
            findings.lost.push(*highest_odd);
        }
    }
    Ok(findings)
}

/// Start the child on the store, let it write for a random time, SIGKILL it, and return the
/// batch numbers it acknowledged.
fn crash_round(test_name: &str, kind: BackendKind, dir: &Path, start: u64, child_log: &Path) -> Result<Vec<u64>, String> {
    let stderr = std::fs::File::create(child_log).map_err(|e| e.to_string())?;
    let mut child = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args(["--exact", test_name, "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, format!("{},{kind},{start}", dir.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .map_err(|e| format!("cannot start the child: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines_sender, lines) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_sender.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + ROUND_DEADLINE;
    let mut acknowledged = Vec::new();
    let mut opened = false;
    // Wait for the child to open the store and acknowledge a first batch, so that the kill
    // lands while it writes rather than while it starts.
    while acknowledged.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(remaining) {
            Ok(line) if line == "opened" => opened = true,
            Ok(line) => acknowledged.extend(line.strip_prefix("ack ").and_then(|n| n.parse::<u64>().ok())),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let log = std::fs::read_to_string(child_log).unwrap_or_default();
                let what = if opened { "acknowledged nothing" } else { "did not open the store" };
                return Err(format!("the child {what} within {ROUND_DEADLINE:?}; its stderr:\n{log}"));
            }
        }
    }
    std::thread::sleep(Duration::from_millis(rand::rng().random_range(0..MAX_LIFETIME_MS)));
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    reader.join().expect("the stdout reader");
    acknowledged.extend(lines.try_iter().filter_map(|line| line.strip_prefix("ack ").and_then(|n| n.parse::<u64>().ok())));
    Ok(acknowledged)
}

#[derive(Debug, Default)]
struct CrashReport {
    kind: Option<BackendKind>,
    rounds: usize,
    acknowledged_batches: usize,
    /// Sum over rounds of the acknowledged batches checked after that round's crash.
    checks: usize,
    lost: BTreeSet<u64>,
    torn: BTreeSet<u64>,
    resurrected: BTreeSet<u64>,
    failures: Vec<String>,
    elapsed: Duration,
}

impl CrashReport {
    fn clean(&self) -> bool {
        self.lost.is_empty() && self.torn.is_empty() && self.resurrected.is_empty() && self.failures.is_empty()
    }

    fn summary(&self) -> String {
        format!(
            "{} kill -9 crash test: {} rounds in {:?}, {} acknowledged batches, {} batch checks after crashes; lost {} {:?}, torn {} {:?}, undone deletes {} {:?}, failures: {:?}",
            self.kind.map(|k| k.to_string()).unwrap_or_default(),
            self.rounds,
            self.elapsed,
            self.acknowledged_batches,
            self.checks,
            self.lost.len(),
            self.lost.iter().take(10).collect::<Vec<_>>(),
            self.torn.len(),
            self.torn.iter().take(10).collect::<Vec<_>>(),
            self.resurrected.len(),
            self.resurrected.iter().take(10).collect::<Vec<_>>(),
            self.failures,
        )
    }
}

fn rounds() -> usize {
    std::env::var("DAVIT_CRASH_ROUNDS").ok().and_then(|value| value.parse().ok()).unwrap_or(DEFAULT_ROUNDS)
}

fn crash_test(kind: BackendKind, test_name: &str) -> CrashReport {
    let started = Instant::now();
    let root = tempfile::Builder::new().prefix(&format!("davit-store-crash-{kind}-")).tempdir().expect("temp dir");
    let store_dir = root.path().join("store");
    let mut acknowledged = BTreeSet::new();
    let mut report = CrashReport { kind: Some(kind), ..CrashReport::default() };
    let mut next_sequence = 0;
    for round in 1..=rounds() {
        let child_log = root.path().join(format!("child-{round}.log"));
        match crash_round(test_name, kind, &store_dir, next_sequence, &child_log) {
            Ok(round_acknowledged) => acknowledged.extend(round_acknowledged),
            Err(error) => {
                report.failures.push(format!("round {round}: {error}"));
                break;
            }
        }
        report.rounds = round;
        match inspect(kind, &store_dir, &acknowledged) {
            Ok(findings) => {
                report.checks += acknowledged.len();
                report.lost.extend(findings.lost);
                report.torn.extend(findings.torn);
                report.resurrected.extend(findings.resurrected);
                // Continue after everything that may be in the store, acknowledged or not, so
                // a rewritten number always carries the same batch.
                next_sequence = acknowledged.last().copied().max(findings.highest_present).map_or(0, |n| n + 1);
            }
            Err(error) => {
                report.failures.push(format!("round {round}: {error}"));
                break;
            }
        }
    }
    report.acknowledged_batches = acknowledged.len();
    report.elapsed = started.elapsed();
    report
}

#[test]
fn redb_keeps_every_acknowledged_write_across_kill_9() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        run_child(&spec);
    }
    let report = crash_test(BackendKind::Redb, "redb_keeps_every_acknowledged_write_across_kill_9");
    println!("{}", report.summary());
    assert!(report.rounds == rounds() && report.acknowledged_batches > 0, "{}", report.summary());
    assert!(report.clean(), "{}", report.summary());
}

#[test]
fn sled_keeps_every_acknowledged_write_across_kill_9() {
    if let Ok(spec) = std::env::var(CHILD_ENV) {
        run_child(&spec);
    }
    let report = crash_test(BackendKind::Sled, "sled_keeps_every_acknowledged_write_across_kill_9");
    println!("{}", report.summary());
    assert!(report.rounds == rounds() && report.acknowledged_batches > 0, "{}", report.summary());
    assert!(report.clean(), "{}", report.summary());
}
