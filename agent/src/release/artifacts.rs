//! Release artifacts on the deploy host: fetched by digest (from the coordinator, or any other
//! [`ArtifactSource`]), verified against the SHA-256 of the uncompressed stream before they get
//! their final name, and cached by digest, so that a retried or repeated Start fetches nothing.
//! A file in the cache has always been verified.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::sync::watch;

use super::ReleaseError;
use crate::client::Coordinator;
use crate::packing::Verifier;

/// The compressed bytes (`.tar.zst`) of an artifact, in pieces of any size.
pub type ArtifactStream = BoxStream<'static, Result<Vec<u8>, String>>;

/// Where artifacts come from by digest. The agent fetches from its coordinator; tests may read
/// files. Whatever the source, the digest is verified by [`cached_artifact`].
pub trait ArtifactSource: Send + Sync {
    fn fetch<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Result<ArtifactStream, ReleaseError>>;
}

/// The coordinator the agent is connected to, with `FetchArtifact`.
pub struct CoordinatorArtifacts {
    pub coordinator: watch::Receiver<Option<Coordinator>>,
}

/// How long a fetch waits for a session with a coordinator to exist.
const COORDINATOR_WAIT: Duration = Duration::from_secs(30);

impl ArtifactSource for CoordinatorArtifacts {
    fn fetch<'a>(&'a self, digest: &'a str) -> BoxFuture<'a, Result<ArtifactStream, ReleaseError>> {
        Box::pin(async move {
            let mut watcher = self.coordinator.clone();
            let coordinator = tokio::time::timeout(COORDINATOR_WAIT, watcher.wait_for(Option::is_some))
                .await
                .ok()
                .and_then(|found| found.ok().and_then(|current| current.clone()))
                .ok_or_else(|| {
                    ReleaseError::Infrastructure(format!(
                        "no coordinator connected within {} s to fetch artifact sha256:{digest} from",
                        COORDINATOR_WAIT.as_secs()
                    ))
                })?;
            let request = coordinator.authorize(davit_proto::agent::FetchArtifactRequest { digest: digest.to_string() });
            let stream = coordinator.client().fetch_artifact(request).await.map_err(|status| {
                let message = format!("coordinator {} refused to send artifact sha256:{digest}: {}", coordinator.address, status.message());
                if status.code() == tonic::Code::NotFound { ReleaseError::Job(message) } else { ReleaseError::Infrastructure(message) }
            })?;
            let chunks = stream.into_inner().map(|piece| piece.map(|data| data.data).map_err(|status| status.message().to_string()));
            Ok(chunks.boxed())
        })
    }
}

/// Lower-case hex SHA-256, as artifacts are named.
pub fn check_digest(digest: &str) -> Result<(), ReleaseError> {
    if digest.len() == 64 && digest.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
        Ok(())
    } else {
        Err(ReleaseError::Job(format!(
            "artifact digest {digest:?} must be 64 lower-case hex digits (the SHA-256 of the uncompressed artifact)"
        )))
    }
}

/// The verified `.tar.zst` of `digest` in `cache_dir`, fetched from `source` when not cached.
pub async fn cached_artifact(cache_dir: &Path, digest: &str, source: &dyn ArtifactSource) -> Result<PathBuf, ReleaseError> {
    check_digest(digest)?;
    let path = cache_dir.join(format!("{digest}.tar.zst"));
    if path.is_file() {
        return Ok(path);
    }
    let disk =
        |error: std::io::Error| ReleaseError::Infrastructure(format!("cannot write the artifact cache {}: {error}", cache_dir.display()));
    std::fs::create_dir_all(cache_dir).map_err(disk)?;
    let partial = cache_dir.join(format!("{digest}.tar.zst.partial-{:08x}", rand::random::<u32>()));
    let mut stream = source.fetch(digest).await?;
    // Writing and verifying (decompression and SHA-256) are blocking work: a thread of their own.
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
    let partial_for_writer = partial.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<(String, u64), String> {
        let mut file = std::fs::File::create(&partial_for_writer)
            .map_err(|error| format!("cannot create {}: {error}", partial_for_writer.display()))?;
        let mut verifier = Verifier::new();
        for piece in receiver {
            file.write_all(&piece).map_err(|error| format!("cannot write {}: {error}", partial_for_writer.display()))?;
            verifier.update(&piece).map_err(|error| error.0)?;
        }
        file.sync_all().map_err(|error| format!("cannot write {}: {error}", partial_for_writer.display()))?;
        verifier.finish().map_err(|error| error.0)
    });
    let mut fetch_error = None;
    while let Some(piece) = stream.next().await {
        match piece {
            Ok(piece) => {
                if sender.send(piece).is_err() {
                    break;
                }
            }
            Err(error) => {
                fetch_error = Some(error);
                break;
            }
        }
    }
    drop(sender);
    let verified = writer.await.map_err(|error| ReleaseError::Infrastructure(format!("verifying the artifact panicked: {error}")))?;
    let failed = |error: ReleaseError| {
        let _ = std::fs::remove_file(&partial);
        Err(error)
    };
    if let Some(error) = fetch_error {
        return failed(ReleaseError::Infrastructure(format!("fetching artifact sha256:{digest} broke off: {error}")));
    }
    match verified {
        Ok((actual, _)) if actual == digest => {}
        Ok((actual, bytes)) => {
            return failed(ReleaseError::Job(format!(
                "artifact sha256:{digest} is corrupt: its {bytes} uncompressed bytes have SHA-256 {actual}; rebuild it, or check the \
                 coordinator's blob store"
            )));
        }
        Err(error) => return failed(ReleaseError::Job(format!("artifact sha256:{digest} is corrupt: {error}"))),
    }
    std::fs::rename(&partial, &path).map_err(disk)?;
    Ok(path)
}

/// Decompress the cached `.tar.zst` of an image into `tar_path` (what `docker load` reads) and
/// return the image id its `manifest.json` names (`sha256:<hex>`).
pub fn unpack_image_archive(archive: &Path, tar_path: &Path) -> Result<String, ReleaseError> {
    let job = |what: String| ReleaseError::Job(format!("the image artifact {} {what}", archive.display()));
    let input = std::fs::File::open(archive).map_err(|error| job(format!("cannot be opened: {error}")))?;
    let mut decoder = zstd::stream::read::Decoder::new(input).map_err(|error| job(format!("cannot be decompressed: {error}")))?;
    let mut output = std::fs::File::create(tar_path)
        .map_err(|error| ReleaseError::Infrastructure(format!("cannot write {}: {error}", tar_path.display())))?;
    std::io::copy(&mut decoder, &mut output).map_err(|error| job(format!("cannot be decompressed: {error}")))?;
    drop(output);
    let mut tar = tar::Archive::new(std::fs::File::open(tar_path).map_err(|error| job(format!("cannot be read back: {error}")))?);
    let entries = tar.entries().map_err(|error| job(format!("is not a tar archive (a `docker save` export): {error}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|error| job(format!("is not a valid tar archive: {error}")))?;
        let is_manifest = entry.path().is_ok_and(|path| path == Path::new("manifest.json"));
        if !is_manifest {
            continue;
        }
        let manifest: Vec<serde_json::Value> =
            serde_json::from_reader(&mut entry).map_err(|error| job(format!("has an unreadable manifest.json: {error}")))?;
        let config = manifest
            .first()
            .and_then(|image| image.get("Config"))
            .and_then(|config| config.as_str())
            .ok_or_else(|| job("has a manifest.json without an image (Config)".to_string()))?;
        // `<hex>.json` (older engines) or `blobs/sha256/<hex>` (OCI layout).
        let hex = config.rsplit('/').next().unwrap_or(config).trim_end_matches(".json");
        return Ok(format!("sha256:{hex}"));
    }
    Err(job("has no manifest.json: it is not a `docker save` export; build the release with a Dockerfile".to_string()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use davit_proto::agent::agent_service_server::{AgentService, AgentServiceServer};
    use davit_proto::agent::*;
    use futures::Stream;
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

    /// A coordinator that only serves `FetchArtifact`, over a real gRPC connection, from
    /// stored `.tar.zst` bytes by digest; it insists on the agent's credential.
    #[derive(Clone, Default)]
    struct BlobStore {
        blobs: Arc<HashMap<String, Vec<u8>>>,
        fetches: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl AgentService for BlobStore {
        async fn register(&self, _: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        type SessionStream = Answers<CoordinatorMessage>;
        async fn session(&self, _: Request<Streaming<AgentMessage>>) -> Result<Response<Self::SessionStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        type ShipLogsStream = Answers<LogAck>;
        async fn ship_logs(&self, _: Request<Streaming<LogChunk>>) -> Result<Response<Self::ShipLogsStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn has_artifact(&self, _: Request<HasArtifactRequest>) -> Result<Response<HasArtifactResponse>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn upload_artifact(&self, _: Request<Streaming<ArtifactUpload>>) -> Result<Response<ArtifactRecorded>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        async fn record_artifact(&self, _: Request<ArtifactMeta>) -> Result<Response<ArtifactRecorded>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
        type FetchArtifactStream = Answers<ArtifactData>;
        async fn fetch_artifact(&self, request: Request<FetchArtifactRequest>) -> Result<Response<Self::FetchArtifactStream>, Status> {
            let authorized = request.metadata().get("authorization").is_some_and(|value| value == "Bearer agent-credential");
            if !authorized {
                return Err(Status::unauthenticated("no agent credential"));
            }
            self.fetches.fetch_add(1, Ordering::SeqCst);
            let digest = request.into_inner().digest;
            let bytes = self
                .blobs
                .get(&digest)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("no stored artifact has digest sha256:{digest}")))?;
            let pieces: Vec<Result<ArtifactData, Status>> =
                bytes.chunks(1000).map(|piece| Ok(ArtifactData { data: piece.to_vec() })).collect();
            Ok(Response::new(Box::pin(futures::stream::iter(pieces))))
        }
    }

    #[tokio::test]
    async fn artifacts_come_from_the_coordinator_verified_and_are_fetched_once() {
        let workspace = tempfile::tempdir().unwrap();
        std::fs::write(workspace.path().join("app.sh"), "echo release\n".repeat(500)).unwrap();
        let packed = crate::packing::pack(workspace.path(), &["app.sh".to_string()], &workspace.path().join("out.tar.zst")).unwrap();
        let good = std::fs::read(&packed.path).unwrap();
        // Bytes that are valid zstd but not what the digest names.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("app.sh"), "something else\n").unwrap();
        let wrong = crate::packing::pack(other.path(), &["app.sh".to_string()], &other.path().join("out.tar.zst")).unwrap();
        let mislabelled = "b".repeat(64);
        let store = BlobStore {
            blobs: Arc::new(HashMap::from([
                (packed.digest.clone(), good.clone()),
                (mislabelled.clone(), std::fs::read(&wrong.path).unwrap()),
            ])),
            fetches: Arc::default(),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        tokio::spawn(tonic::transport::Server::builder().add_service(AgentServiceServer::new(store.clone())).serve(address));
        let coordinator = loop {
            if let Ok(coordinator) = crate::client::connect(&address.to_string(), None, "agent-credential").await {
                break coordinator;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (_sender, watcher) = watch::channel(Some(coordinator));
        let source = CoordinatorArtifacts { coordinator: watcher };
        let cache = tempfile::tempdir().unwrap();

        let path = cached_artifact(cache.path(), &packed.digest, &source).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), good);
        cached_artifact(cache.path(), &packed.digest, &source).await.unwrap();
        assert_eq!(store.fetches.load(Ordering::SeqCst), 1, "a cached artifact is not fetched again");

        let missing = cached_artifact(cache.path(), &"c".repeat(64), &source).await.unwrap_err();
        assert!(matches!(&missing, ReleaseError::Job(message) if message.contains("no stored artifact")), "{missing:?}");
        let corrupt = cached_artifact(cache.path(), &mislabelled, &source).await.unwrap_err();
        assert!(matches!(&corrupt, ReleaseError::Job(message) if message.contains("is corrupt")), "{corrupt:?}");
        let invalid = cached_artifact(cache.path(), "../../etc/passwd", &source).await.unwrap_err();
        assert!(matches!(&invalid, ReleaseError::Job(message) if message.contains("64 lower-case hex digits")), "{invalid:?}");
        let left: Vec<String> =
            std::fs::read_dir(cache.path()).unwrap().flatten().map(|entry| entry.file_name().to_string_lossy().into()).collect();
        assert_eq!(left, vec![format!("{}.tar.zst", packed.digest)], "only verified artifacts stay");
    }
}
