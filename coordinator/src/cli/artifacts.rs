//! `davit artifacts ls | pull | push`: `GET /api/v1/artifacts`, `GET /api/v1/artifacts/{id}`
//! (checked against the digest the server announces) and `POST /api/v1/artifacts/upload` with
//! the raw bytes: a file as it is, a directory packed here as a tar whose SHA-256 becomes the
//! artifact's digest, as with what builds upload. The server stores and records it; nothing is
//! stored here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::deployments::{find_pipeline, text};
use super::failure::CliFailure;
use super::{ApiClient, Connection, print_json, print_table, relative_time};
use crate::state::apply::hex;

/// Transfers of artifacts may take long; the other requests keep the client's shorter timeout.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(3600);

#[derive(Subcommand)]
pub enum ArtifactsCommand {
    /// List the artifacts (of one pipeline).
    #[command(visible_alias = "list")]
    Ls {
        /// Only this pipeline's (its id or name).
        #[arg(long)]
        pipeline: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Download an artifact, checking its SHA-256.
    Pull {
        artifact_id: u64,
        /// Where to write it (`-`: standard output) [default: the name the server suggests, here].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The stored zstd-compressed bytes (`.tar.zst` for a build's files) instead of the
        /// artifact's own bytes.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Upload a file, or a directory (packed as a tar), as a version of a pipeline's artifact.
    Push {
        /// The pipeline: its id or its name.
        pipeline: String,
        /// A file, or a directory to pack.
        path: PathBuf,
        /// The artifact's version, e.g. v1.2.0.
        #[arg(long)]
        version: String,
        #[command(flatten)]
        connection: Connection,
    },
}

pub async fn artifacts(command: ArtifactsCommand, json: bool) -> anyhow::Result<()> {
    match command {
        ArtifactsCommand::Ls { pipeline, connection } => {
            let client = ApiClient::connect(&connection).await?;
            let path = match pipeline {
                Some(pipeline) => {
                    let pipeline_id = find_pipeline(&client, &pipeline).await?["pipeline_id"].clone();
                    format!("/api/v1/artifacts?pipeline_id={pipeline_id}")
                }
                None => "/api/v1/artifacts".to_string(),
            };
            let artifacts = client.get_all(&path).await?;
            if json {
                return print_json(&json!({ "items": artifacts, "next_cursor": null }));
            }
            if artifacts.is_empty() {
                println!("No artifacts. Builds upload theirs; `davit artifacts push PIPELINE PATH --version V` uploads one.");
                return Ok(());
            }
            let rows = artifacts
                .iter()
                .map(|artifact| {
                    let digest = artifact["digest"].as_str().unwrap_or_default();
                    vec![
                        artifact["artifact_id"].to_string(),
                        artifact["pipeline_id"].to_string(),
                        text(&artifact["version"]),
                        format!("sha256:{}", digest.get(..12).unwrap_or(digest)),
                        human_size(artifact["size_bytes"].as_u64().unwrap_or(0)),
                        artifact["created_at"].as_str().map(relative_time).unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(&["ID", "PIPELINE", "VERSION", "DIGEST", "SIZE", "CREATED"], rows, 0);
            Ok(())
        }
        ArtifactsCommand::Pull { artifact_id, output, raw, connection } => {
            pull(&ApiClient::connect(&connection).await?, artifact_id, output, raw, json).await
        }
        ArtifactsCommand::Push { pipeline, path, version, connection } => {
            let client = ApiClient::connect(&connection).await?;
            push(&client, &pipeline, &path, &version, json).await
        }
    }
}

async fn pull(client: &ApiClient, artifact_id: u64, output: Option<PathBuf>, raw: bool, json: bool) -> anyhow::Result<()> {
    let path = if raw { format!("/api/v1/artifacts/{artifact_id}?raw=true") } else { format!("/api/v1/artifacts/{artifact_id}") };
    let mut response = client.send(client.request(reqwest::Method::GET, &path).timeout(TRANSFER_TIMEOUT)).await?;
    if !response.status().is_success() {
        client.check(response).await?;
        anyhow::bail!("the server refused the download");
    }
    let announced = response
        .headers()
        .get("x-davit-digest")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("sha256:"))
        .map(str::to_string);
    let to_stdout = output.as_deref() == Some(Path::new("-"));
    let destination = match output {
        Some(output) => output,
        None => PathBuf::from(suggested_name(response.headers()).unwrap_or_else(|| format!("artifact-{artifact_id}"))),
    };
    // Written beside the destination and renamed into place once complete and checked.
    let partial = destination.with_file_name(format!(
        ".{}.partial",
        destination.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_else(|| "artifact".into())
    ));
    let mut sink: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(std::fs::File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?))
    };
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let received: anyhow::Result<()> = async {
        while let Some(chunk) = response.chunk().await.with_context(|| format!("the download of artifact {artifact_id} broke"))? {
            hasher.update(&chunk);
            size += chunk.len() as u64;
            sink.write_all(&chunk).context("cannot write the artifact")?;
        }
        sink.flush().context("cannot write the artifact")?;
        Ok(())
    }
    .await;
    drop(sink);
    let digest = hex(&hasher.finalize());
    let checked = received.and_then(|()| match &announced {
        // `raw` bytes are the compressed form: the announced digest is of the artifact's own bytes.
        Some(announced) if !raw && *announced != digest => {
            anyhow::bail!(
                "artifact {artifact_id} arrived damaged: its bytes hash to sha256:{digest}, the server announced sha256:{announced}"
            )
        }
        _ => Ok(()),
    });
    if let Err(error) = checked {
        if !to_stdout {
            let _ = std::fs::remove_file(&partial);
        }
        return Err(error);
    }
    if to_stdout {
        return Ok(());
    }
    std::fs::rename(&partial, &destination).with_context(|| format!("cannot write {}", destination.display()))?;
    if json {
        return print_json(&json!({
            "artifact_id": artifact_id,
            "path": destination,
            "size_bytes": size,
            "sha256": digest,
            "raw": raw,
        }));
    }
    let checked = if raw { "stored bytes".to_string() } else { format!("sha256:{digest}, checked") };
    println!("Saved artifact {artifact_id} to {} ({}, {checked}).", destination.display(), human_size(size));
    Ok(())
}

/// The file name of a `Content-Disposition: attachment; filename="..."`, without any directory.
fn suggested_name(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let value = headers.get(reqwest::header::CONTENT_DISPOSITION)?.to_str().ok()?;
    let name = value.split(';').map(str::trim).find_map(|part| part.strip_prefix("filename="))?.trim_matches('"');
    let name = Path::new(name).file_name()?.to_string_lossy().into_owned();
    (!name.is_empty() && name != "..").then_some(name)
}

async fn push(client: &ApiClient, pipeline: &str, path: &Path, version: &str, json: bool) -> anyhow::Result<()> {
    let metadata = std::fs::metadata(path).map_err(|error| CliFailure::Usage(format!("cannot read {}: {error}", path.display())))?;
    let pipeline_id = find_pipeline(client, pipeline).await?["pipeline_id"].as_u64().context("the server's pipeline has no pipeline_id")?;
    let (bytes, packed) = if metadata.is_dir() {
        let directory = path.to_path_buf();
        (tokio::task::spawn_blocking(move || pack_directory(&directory)).await??, true)
    } else {
        (std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?, false)
    };
    let limit = crate::api::artifacts::UPLOAD_LIMIT as u64;
    if bytes.len() as u64 > limit {
        return Err(CliFailure::Usage(format!(
            "{} is {} ({}), more than the {} the server accepts",
            path.display(),
            human_size(bytes.len() as u64),
            if packed { "packed as a tar" } else { "a file" },
            human_size(limit)
        ))
        .into());
    }
    let digest = hex(&Sha256::digest(&bytes));
    let size = bytes.len() as u64;
    let query = format!("pipeline_id={pipeline_id}&version={}", super::deployments::query_value(version));
    let request = client
        .request(reqwest::Method::POST, &format!("/api/v1/artifacts/upload?{query}"))
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .timeout(TRANSFER_TIMEOUT)
        .body(bytes);
    let response = client.send(request).await?;
    let artifact = client.check(response).await?;
    if artifact["digest"].as_str() != Some(digest.as_str()) {
        anyhow::bail!(
            "the server recorded artifact {} with digest {}, but the bytes sent hash to sha256:{digest}",
            artifact["artifact_id"],
            artifact["digest"]
        );
    }
    if json {
        return print_json(&artifact);
    }
    let what = if packed { format!("{} (packed as a tar)", path.display()) } else { path.display().to_string() };
    println!(
        "Uploaded {what} as artifact {} of pipeline {pipeline_id}, version {version}: {}, sha256:{digest}.",
        artifact["artifact_id"],
        human_size(size)
    );
    Ok(())
}

/// A directory as a tar of its contents (paths relative to it), in name order, with the
/// metadata that varies between machines (owners, times) left out: the same files give the
/// same bytes, hence the same digest, and the server stores them once.
pub fn pack_directory(directory: &Path) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    builder.follow_symlinks(false);
    append_entries(&mut builder, directory, Path::new(""))?;
    Ok(builder.into_inner()?)
}

/// The entries of `directory/relative` in name order, each directory followed by its contents.
fn append_entries(builder: &mut tar::Builder<Vec<u8>>, directory: &Path, relative: &Path) -> anyhow::Result<()> {
    let here = directory.join(relative);
    let mut entries: Vec<_> =
        std::fs::read_dir(&here).with_context(|| format!("cannot read {}", here.display()))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let name = relative.join(entry.file_name());
        builder.append_path_with_name(entry.path(), &name).with_context(|| format!("cannot pack {}", entry.path().display()))?;
        if entry.file_type()?.is_dir() {
            append_entries(builder, directory, &name)?;
        }
    }
    Ok(())
}

/// 512 B, 1.5 KiB, 12.3 MiB.
fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_short() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(12 * 1024 * 1024 + 300 * 1024), "12.3 MiB");
    }

    #[test]
    fn packing_a_directory_is_reproducible_and_keeps_relative_paths() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("b/c")).unwrap();
        std::fs::write(root.path().join("a.txt"), "alpha").unwrap();
        std::fs::write(root.path().join("b/e.txt"), "epsilon").unwrap();
        std::fs::write(root.path().join("z.txt"), "zeta").unwrap();
        std::fs::write(root.path().join("b/c/d.txt"), "delta").unwrap();
        let first = pack_directory(root.path()).unwrap();
        // Another modification time: the same bytes.
        let file = std::fs::File::options().write(true).open(root.path().join("a.txt")).unwrap();
        file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000)).unwrap();
        assert_eq!(pack_directory(root.path()).unwrap(), first);
        let mut archive = tar::Archive::new(first.as_slice());
        let names: Vec<String> =
            archive.entries().unwrap().map(|entry| entry.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["a.txt", "b", "b/c", "b/c/d.txt", "b/e.txt", "z.txt"]);
    }

    #[test]
    fn suggested_names_never_leave_the_directory() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::CONTENT_DISPOSITION, "attachment; filename=\"artifact-3-v1.tar.zst\"".parse().unwrap());
        assert_eq!(suggested_name(&headers).as_deref(), Some("artifact-3-v1.tar.zst"));
        headers.insert(reqwest::header::CONTENT_DISPOSITION, "attachment; filename=\"../../etc/passwd\"".parse().unwrap());
        assert_eq!(suggested_name(&headers).as_deref(), Some("passwd"));
    }
}
