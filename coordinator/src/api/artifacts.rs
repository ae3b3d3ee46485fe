//! Artifacts: content-addressed by the SHA-256 of their bytes, kept zstd-compressed in the blob
//! store under `artifacts/sha256/<digest>.zst`, recorded (metadata only) through Raft. The same
//! bytes uploaded twice are stored once.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::extract::{Caller, Page, Paged, Path, Query, page_of, parse_id, validate_label};
use super::pipelines::load_pipeline;
use super::schema;
use super::users::{applied_id, timestamp};
use crate::api_error::ApiError;
use crate::state::Command;
use crate::state::apply::{hex, load_id};
use crate::state::records::{Artifact, Role};
use crate::store::Table;

/// Largest artifact accepted through the REST API.
pub const UPLOAD_LIMIT: usize = 512 * 1024 * 1024;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(upload_artifact))
        .layer(DefaultBodyLimit::max(UPLOAD_LIMIT))
        .routes(routes!(list_artifacts))
        .routes(routes!(download_artifact, delete_artifact))
        .routes(routes!(artifact_metadata))
}

pub fn blob_key(digest: &str) -> String {
    format!("artifacts/sha256/{}/{digest}.zst", &digest[..2])
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ArtifactView {
    pub artifact_id: u64,
    pub pipeline_id: u64,
    pub version: String,
    pub artifact_path: String,
    /// SHA-256 of the bytes, hex.
    pub digest: String,
    pub size_bytes: u64,
    /// The seed's `size_in_mb`, two decimals.
    pub size_in_mb: f64,
    pub created_at: String,
    pub updated_at: String,
    /// The commit built, when a build produced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_hash: Option<String>,
    /// The deployment (run) that produced it, when a build did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<u64>,
    /// `files` (workspace paths) or `image` (a `docker save`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl From<Artifact> for ArtifactView {
    fn from(artifact: Artifact) -> Self {
        Self {
            artifact_id: artifact.artifact_id,
            pipeline_id: artifact.pipeline_id,
            version: artifact.version,
            artifact_path: artifact.artifact_path,
            digest: artifact.digest,
            size_bytes: artifact.size_bytes,
            size_in_mb: (artifact.size_bytes as f64 / 1_048_576.0 * 100.0).round() / 100.0,
            created_at: timestamp(artifact.created_at),
            updated_at: timestamp(artifact.updated_at),
            commit_hash: artifact.commit_hash,
            deployment_id: artifact.deployment_id,
            kind: artifact.kind,
        }
    }
}

fn load_artifact(state: &AppState, artifact_id: u64) -> Result<Artifact, ApiError> {
    load_id(&state.node.state(), Table::Artifacts, artifact_id)?
        .ok_or_else(|| ApiError::not_found(format!("artifact {artifact_id} not found")))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ArtifactFilter {
    #[param(value_type = Option<schema::IdText>)]
    pub pipeline_id: Option<String>,
    /// Items per page, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(value_type = Option<schema::Cursor>)]
    pub cursor: Option<String>,
}

/// List all stored artifacts.
#[utoipa::path(get, path = "/api/v1/artifacts", tag = "artifacts", params(ArtifactFilter), security(("bearer" = [])),
    responses((status = 200, body = Paged<ArtifactView>), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody)))]
async fn list_artifacts(
    State(state): State<AppState>,
    _caller: Caller,
    Query(filter): Query<ArtifactFilter>,
) -> Result<Json<Paged<ArtifactView>>, ApiError> {
    let pipeline_id = filter.pipeline_id.as_deref().map(|id| parse_id("pipeline_id", id)).transpose()?;
    state.node.read_barrier().await?;
    let page = Page { limit: filter.limit, cursor: filter.cursor };
    let page =
        page_of::<Artifact>(&state.node, Table::Artifacts, &page, |artifact| pipeline_id.is_none_or(|id| artifact.pipeline_id == id))?;
    Ok(Json(Paged { items: page.items.into_iter().map(ArtifactView::from).collect(), next_cursor: page.next_cursor }))
}

/// The three ways to send an artifact: multipart form, raw body with query parameters, or the
/// seed's JSON body (`artifact` is the content; `artifact_encoding: "base64"` for binary).
struct Upload {
    pipeline_id: u64,
    version: String,
    bytes: Vec<u8>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// For a raw (non-JSON, non-multipart) body.
    #[param(value_type = Option<schema::IdText>)]
    pub pipeline_id: Option<String>,
    /// For a raw (non-JSON, non-multipart) body.
    #[param(value_type = Option<schema::Version>)]
    pub version: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonUpload {
    #[schema(example = "pipeline123")]
    pub pipeline_id: super::extract::FlexibleId,
    /// The artifact's content (text, or base64 with `artifact_encoding`).
    #[schema(example = "binary_file")]
    pub artifact: String,
    #[schema(example = "v1.0.0")]
    pub version: String,
    /// `base64` when `artifact` is base64-encoded binary.
    pub artifact_encoding: Option<String>,
}

async fn read_upload(headers: &HeaderMap, query: UploadQuery, request: Request) -> Result<Upload, ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(request, &()).await.map_err(|e| ApiError::bad_request(e.body_text()))?;
        let (mut pipeline_id, mut version, mut bytes) = (None, None, None);
        while let Some(field) = multipart.next_field().await.map_err(|e| ApiError::bad_request(format!("multipart body: {e}")))? {
            let name = field.name().unwrap_or_default().to_string();
            let data = field.bytes().await.map_err(|e| ApiError::bad_request(format!("multipart field {name}: {e}")))?;
            match name.as_str() {
                "pipeline_id" => pipeline_id = Some(String::from_utf8_lossy(&data).to_string()),
                "version" => version = Some(String::from_utf8_lossy(&data).to_string()),
                "artifact" | "file" => bytes = Some(data.to_vec()),
                other => return Err(ApiError::invalid_field(other, "multipart fields are pipeline_id, version and artifact")),
            }
        }
        Ok(Upload {
            pipeline_id: parse_id(
                "pipeline_id",
                &pipeline_id.ok_or_else(|| ApiError::invalid_field("pipeline_id", "pipeline_id is required"))?,
            )?,
            version: version.ok_or_else(|| ApiError::invalid_field("version", "version is required"))?,
            bytes: bytes.ok_or_else(|| ApiError::invalid_field("artifact", "the artifact file field is required"))?,
        })
    } else if content_type.starts_with("application/json") {
        let super::extract::JsonBody(body) = super::extract::JsonBody::<JsonUpload>::from_request(request, &()).await?;
        let bytes = match body.artifact_encoding.as_deref() {
            None | Some("utf-8") | Some("text") => body.artifact.into_bytes(),
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(body.artifact.trim())
                .map_err(|e| ApiError::invalid_field("artifact", format!("artifact is not valid base64: {e}")))?,
            Some(other) => {
                return Err(ApiError::invalid_field("artifact_encoding", format!("artifact_encoding {other:?} must be base64 or text")));
            }
        };
        Ok(Upload { pipeline_id: body.pipeline_id.id("pipeline_id")?, version: body.version, bytes })
    } else {
        let pipeline_id = query.pipeline_id.ok_or_else(|| {
            ApiError::invalid_field("pipeline_id", "a raw upload needs ?pipeline_id=&version= (or send multipart or JSON)")
        })?;
        let version = query.version.ok_or_else(|| ApiError::invalid_field("version", "a raw upload needs ?version="))?;
        let bytes = axum::body::to_bytes(request.into_body(), UPLOAD_LIMIT).await.map_err(|_| {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("artifacts are limited to {} MiB", UPLOAD_LIMIT >> 20))
        })?;
        Ok(Upload { pipeline_id: parse_id("pipeline_id", &pipeline_id)?, version, bytes: bytes.to_vec() })
    }
}

/// Upload a new artifact (developer): JSON `{"pipeline_id","artifact","version"}` (the seed's
/// form; `"artifact_encoding": "base64"` for binary), a multipart form (`pipeline_id`, `version`,
/// `artifact` file), or the raw bytes as any other content type (`application/octet-stream`)
/// with `?pipeline_id=&version=`. The raw form is described here rather than in `requestBody`:
/// OpenAPI cannot make the two query parameters required for that one content type only.
#[utoipa::path(post, path = "/api/v1/artifacts/upload", tag = "artifacts",
    request_body(content(
        (schema::JsonUploadBody = "application/json"),
        (schema::MultipartUpload = "multipart/form-data")
    )),
    security(("bearer" = [])),
    responses((status = 201, body = ArtifactView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody), (status = 413, body = crate::api_error::ErrorBody)))]
async fn upload_artifact(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Query(query): Query<UploadQuery>,
    request: Request,
) -> Result<(StatusCode, Json<ArtifactView>), ApiError> {
    caller.require(Role::Developer, "uploading an artifact")?;
    let upload = read_upload(&headers, query, request).await?;
    validate_label("version", &upload.version, 50)?;
    state.node.read_barrier().await?;
    load_pipeline(&state, upload.pipeline_id)?;
    let size_bytes = upload.bytes.len() as u64;
    let (digest, compressed) = tokio::task::spawn_blocking(move || {
        let digest = hex(&Sha256::digest(&upload.bytes));
        let compressed = zstd::encode_all(upload.bytes.as_slice(), 3).expect("zstd compression of memory does not fail");
        (digest, compressed)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let key = blob_key(&digest);
    let blob_error = |e: crate::blob_store::BlobError| ApiError::internal(e.to_string());
    // Content-addressed: the same bytes are already there, durable, under the same key.
    let mut not_written = Some(compressed);
    if !state.blobs.exists(&key).await.map_err(blob_error)? {
        state.blobs.put(&key, not_written.take().expect("not written yet")).await.map_err(blob_error)?;
    }
    let command = Command::RecordArtifact {
        pipeline_id: upload.pipeline_id,
        version: upload.version,
        artifact_path: key.clone(),
        digest,
        size_bytes,
        produced_by: None,
    };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    let artifact_id = applied_id(outcome)?.expect("record returns the id");
    // Retention may have collected the blob found above before this record landed (no record
    // referred to it for its grace period); the record protects it now, so put it back.
    if let Some(compressed) = not_written
        && !state.blobs.exists(&key).await.map_err(blob_error)?
    {
        state.blobs.put(&key, compressed).await.map_err(blob_error)?;
    }
    Ok((StatusCode::CREATED, Json(load_artifact(&state, artifact_id)?.into())))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DownloadQuery {
    /// `true`: the bytes as stored, zstd-compressed (`application/zstd`; a `.tar.zst` for what
    /// a build packed), with `Range` support. Default: the artifact's own bytes.
    pub raw: Option<bool>,
}

/// Bytes sent per chunk of a decompressed download.
const DOWNLOAD_CHUNK_BYTES: usize = 64 * 1024;

/// An artifact's `ETag`: the digest of its bytes. Strong: an artifact id always names the same
/// bytes, and its blob is content-addressed.
fn entity_tag(digest: &str) -> String {
    format!("\"sha256:{digest}\"")
}

/// Whether an `If-None-Match` value matches `etag` (weak comparison, RFC 9110 section 13.1.2).
fn none_match(header: &str, etag: &str) -> bool {
    header.split(',').map(str::trim).any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

/// What a `Range` header asks of a representation of `total_len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// No range, or one this server ignores (malformed, several ranges): send everything.
    Whole,
    /// Bytes `first..=last`.
    Part { first: u64, last: u64 },
    /// A well-formed range that selects nothing: 416.
    Unsatisfiable,
}

/// The single byte range of a `Range` header (RFC 9110 section 14.1.2): `bytes=first-last`,
/// `bytes=first-` or `bytes=-suffix_length`. A header that is not one well-formed byte range is
/// ignored, as the RFC allows, and so is a request for several ranges.
pub fn byte_range(header: Option<&str>, total_len: u64) -> ByteRange {
    // Digits only; a number too large for u64 is as good as u64::MAX here.
    let number = |text: &str| -> Option<u64> {
        (!text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit())).then(|| text.parse().unwrap_or(u64::MAX))
    };
    let Some((unit, spec)) = header.and_then(|header| header.trim().split_once('=')) else { return ByteRange::Whole };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return ByteRange::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return ByteRange::Whole };
    match (number(first.trim()), last.trim()) {
        (Some(first), "") if first < total_len => ByteRange::Part { first, last: total_len - 1 },
        (Some(_), "") => ByteRange::Unsatisfiable,
        (Some(first), last) => match number(last) {
            Some(last) if last < first => ByteRange::Whole,
            Some(_) if first >= total_len => ByteRange::Unsatisfiable,
            Some(last) => ByteRange::Part { first, last: last.min(total_len - 1) },
            None => ByteRange::Whole,
        },
        (None, _) if !first.trim().is_empty() => ByteRange::Whole,
        (None, suffix) => match number(suffix) {
            Some(0) => ByteRange::Unsatisfiable,
            Some(_) if total_len == 0 => ByteRange::Unsatisfiable,
            Some(length) => ByteRange::Part { first: total_len.saturating_sub(length), last: total_len - 1 },
            None => ByteRange::Whole,
        },
    }
}

fn missing_bytes(artifact: &Artifact) -> ApiError {
    ApiError::internal(format!("artifact {} is recorded but its bytes are missing from the blob store", artifact.artifact_id))
}

/// Download a specific artifact. Default: its own bytes (`application/octet-stream`),
/// decompressed as they are sent and checked against the digest (a damaged blob aborts the
/// transfer rather than end it cleanly); `Range` is not supported on this form
/// (`Accept-Ranges: none`). With `raw=true`: the stored zstd-compressed bytes
/// (`application/zstd`) with single-range `Range` requests (206, or 416 when unsatisfiable).
/// Both carry `ETag` (`"sha256:<digest>"`, honoured in `If-None-Match`) and `X-Davit-Digest`
/// (`sha256:<digest>` of the artifact's own bytes).
#[utoipa::path(get, path = "/api/v1/artifacts/{artifactId}", tag = "artifacts",
    params(("artifactId" = schema::IdText, Path, description = "artifact id"), DownloadQuery,
        ("Range" = Option<String>, Header, description = "With `raw=true`: one byte range, `bytes=first-last`, `bytes=first-` or `bytes=-length`. Ignored otherwise, and when it is not one well-formed byte range."),
        ("If-None-Match" = Option<String>, Header, description = "ETags from earlier downloads: 304 when one matches.")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The artifact's bytes, or with `raw=true` the stored zstd-compressed bytes.",
            content((Vec<u8> = "application/octet-stream"), (Vec<u8> = "application/zstd")),
            headers(("ETag" = String, description = "\"sha256:<digest>\""), ("X-Davit-Digest" = String, description = "sha256:<digest> of the artifact's own bytes"))),
        (status = 206, description = "One byte range of the stored bytes (`raw=true`).", content_type = "application/zstd", body = Vec<u8>,
            headers(("Content-Range" = String, description = "bytes first-last/total"), ("ETag" = String), ("X-Davit-Digest" = String))),
        (status = 304, description = "`If-None-Match` matched.", headers(("ETag" = String), ("X-Davit-Digest" = String))),
        (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody),
        (status = 416, description = "The range starts past the end (`raw=true`).", body = crate::api_error::ErrorBody,
            headers(("Content-Range" = String, description = "bytes */total"))),
    ))]
async fn download_artifact(
    State(state): State<AppState>,
    _caller: Caller,
    headers: HeaderMap,
    Path(artifact_id): Path<String>,
    Query(query): Query<DownloadQuery>,
) -> Result<Response, ApiError> {
    let artifact_id = parse_id("artifactId", &artifact_id)?;
    state.node.read_barrier().await?;
    let artifact = load_artifact(&state, artifact_id)?;
    let etag = entity_tag(&artifact.digest);
    let raw = query.raw.unwrap_or(false);
    let not_modified =
        headers.get(header::IF_NONE_MATCH).and_then(|value| value.to_str().ok()).is_some_and(|value| none_match(value, &etag));
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else if raw {
        stored_bytes(&state, &artifact, &headers, &etag).await?
    } else {
        decompressed_bytes(&state, &artifact).await?
    };
    let success = response.status().is_success();
    let response_headers = response.headers_mut();
    response_headers.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex digests are valid header values"));
    if let Ok(value) = HeaderValue::from_str(&format!("sha256:{}", artifact.digest)) {
        response_headers.insert("x-davit-digest", value);
    }
    response_headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static(if raw { "bytes" } else { "none" }));
    if success {
        let version: String = artifact.version.chars().filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c)).collect();
        let extension = match (raw, artifact.kind.is_some()) {
            (false, _) => "",
            // What a build produced is a tar archive; uploaded bytes are whatever was uploaded.
            (true, true) => ".tar.zst",
            (true, false) => ".zst",
        };
        if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"artifact-{artifact_id}-{version}{extension}\"")) {
            response_headers.insert(header::CONTENT_DISPOSITION, value);
        }
    }
    Ok(response)
}

/// `raw=true`: the stored bytes, whole or one range, streamed from the blob store.
async fn stored_bytes(state: &AppState, artifact: &Artifact, headers: &HeaderMap, etag: &str) -> Result<Response, ApiError> {
    use tokio::io::AsyncReadExt;
    let blob_error = |e: crate::blob_store::BlobError| ApiError::internal(e.to_string());
    let blob = state.blobs.open(&artifact.artifact_path, 0).await.map_err(blob_error)?.ok_or_else(|| missing_bytes(artifact))?;
    let total_len = blob.total_len;
    // `If-Range` with another validator asks for the whole (changed) representation.
    let if_range_matches = headers.get(header::IF_RANGE).is_none_or(|value| value.to_str().ok() == Some(etag));
    let range = if if_range_matches {
        byte_range(headers.get(header::RANGE).and_then(|value| value.to_str().ok()), total_len)
    } else {
        ByteRange::Whole
    };
    let (status, reader, length) = match range {
        ByteRange::Whole => (StatusCode::OK, blob.reader, total_len),
        ByteRange::Part { first, last } => {
            let reader = if first == 0 {
                blob.reader
            } else {
                drop(blob);
                state.blobs.open(&artifact.artifact_path, first).await.map_err(blob_error)?.ok_or_else(|| missing_bytes(artifact))?.reader
            };
            (StatusCode::PARTIAL_CONTENT, reader, last - first + 1)
        }
        ByteRange::Unsatisfiable => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the range starts past the end: the stored artifact has {total_len} bytes"),
            )
            .into_response();
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{total_len}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            return Ok(response);
        }
    };
    let mut response = Body::from_stream(tokio_util::io::ReaderStream::new(reader.take(length))).into_response();
    *response.status_mut() = status;
    let response_headers = response.headers_mut();
    response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/zstd"));
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if let ByteRange::Part { first, last } = range
        && let Ok(value) = HeaderValue::from_str(&format!("bytes {first}-{last}/{total_len}"))
    {
        response_headers.insert(header::CONTENT_RANGE, value);
    }
    Ok(response)
}

/// The default form: the blob is decompressed on a blocking thread as it is sent.
async fn decompressed_bytes(state: &AppState, artifact: &Artifact) -> Result<Response, ApiError> {
    let blob = state
        .blobs
        .open(&artifact.artifact_path, 0)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| missing_bytes(artifact))?;
    let (sender, receiver) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    let compressed = tokio_util::io::SyncIoBridge::new(blob.reader);
    let (artifact_id, expected_digest) = (artifact.artifact_id, artifact.digest.clone());
    tokio::task::spawn_blocking(move || {
        if let Err(message) = send_decompressed(compressed, &expected_digest, &sender) {
            tracing::error!(artifact_id, %message, "artifact download aborted");
            let _ =
                sender.blocking_send(Err(std::io::Error::other(format!("artifact {artifact_id} is damaged in the blob store: {message}"))));
        }
    });
    let mut response = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(receiver)).into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    // A body that comes out shorter or longer than recorded breaks the transfer visibly.
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(artifact.size_bytes));
    Ok(response)
}

/// Decompress `compressed` into `sender` chunk by chunk, hashing as it goes. The last chunk is
/// held back until the digest is checked: a damaged blob then ends in an error, never in a
/// complete-looking body. Returns early (fine) when the client has gone.
fn send_decompressed(
    compressed: impl std::io::Read,
    expected_digest: &str,
    sender: &tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<(), String> {
    use std::io::Read;
    let mut decoder = zstd::stream::read::Decoder::new(compressed).map_err(|e| format!("not zstd: {e}"))?;
    let mut hasher = Sha256::new();
    let mut held: Option<Bytes> = None;
    loop {
        let mut chunk = Vec::with_capacity(DOWNLOAD_CHUNK_BYTES);
        let read =
            (&mut decoder).take(DOWNLOAD_CHUNK_BYTES as u64).read_to_end(&mut chunk).map_err(|e| format!("cannot decompress: {e}"))?;
        if read == 0 {
            break;
        }
        hasher.update(&chunk);
        if let Some(previous) = held.replace(Bytes::from(chunk))
            && sender.blocking_send(Ok(previous)).is_err()
        {
            return Ok(());
        }
    }
    if hex(&hasher.finalize()) != expected_digest {
        return Err("digest mismatch".into());
    }
    if let Some(last) = held {
        let _ = sender.blocking_send(Ok(last));
    }
    Ok(())
}

/// An artifact's metadata.
#[utoipa::path(get, path = "/api/v1/artifacts/{artifactId}/metadata", tag = "artifacts", params(("artifactId" = schema::IdText, Path, description = "artifact id")),
    security(("bearer" = [])),
    responses((status = 200, body = ArtifactView), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn artifact_metadata(
    State(state): State<AppState>,
    _caller: Caller,
    Path(artifact_id): Path<String>,
) -> Result<Json<ArtifactView>, ApiError> {
    let artifact_id = parse_id("artifactId", &artifact_id)?;
    state.node.read_barrier().await?;
    Ok(Json(load_artifact(&state, artifact_id)?.into()))
}

/// Delete an old artifact (developer). Its bytes are collected once no artifact refers to them.
#[utoipa::path(delete, path = "/api/v1/artifacts/{artifactId}", tag = "artifacts", params(("artifactId" = schema::IdText, Path, description = "artifact id")),
    security(("bearer" = [])),
    responses((status = 204), (status = 400, body = crate::api_error::ErrorBody), (status = 401, body = crate::api_error::ErrorBody),
        (status = 403, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn delete_artifact(State(state): State<AppState>, caller: Caller, Path(artifact_id): Path<String>) -> Result<StatusCode, ApiError> {
    caller.require(Role::Developer, "deleting an artifact")?;
    let artifact_id = parse_id("artifactId", &artifact_id)?;
    state.node.read_barrier().await?;
    load_artifact(&state, artifact_id)?;
    let (outcome, _) = super::propose(&state.node, &caller.requester(), Command::DeleteArtifact { artifact_id }).await?;
    applied_id(outcome)?;
    // The bytes stay until blob garbage collection finds no artifact referring to them for a
    // grace period: deleting them here could race an upload of the same content that found the
    // blob present and is about to record it.
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_byte_ranges() {
        use ByteRange::{Part, Unsatisfiable, Whole};
        let cases: &[(Option<&str>, u64, ByteRange)] = &[
            (None, 100, Whole),
            (Some("bytes=0-9"), 100, Part { first: 0, last: 9 }),
            (Some("bytes=90-"), 100, Part { first: 90, last: 99 }),
            (Some("bytes=90-1000"), 100, Part { first: 90, last: 99 }),
            (Some("bytes=0-99999999999999999999999"), 100, Part { first: 0, last: 99 }),
            (Some("bytes=-10"), 100, Part { first: 90, last: 99 }),
            (Some("bytes=-1000"), 100, Part { first: 0, last: 99 }),
            (Some("Bytes = 5-5"), 100, Part { first: 5, last: 5 }),
            (Some("bytes=100-"), 100, Unsatisfiable),
            (Some("bytes=100-200"), 100, Unsatisfiable),
            (Some("bytes=99999999999999999999999-"), 100, Unsatisfiable),
            (Some("bytes=-0"), 100, Unsatisfiable),
            (Some("bytes=-5"), 0, Unsatisfiable),
            (Some("bytes=0-"), 0, Unsatisfiable),
            (Some("bytes=9-5"), 100, Whole),
            (Some("bytes=0-1,5-6"), 100, Whole),
            (Some("items=0-5"), 100, Whole),
            (Some("bytes=a-5"), 100, Whole),
            (Some("bytes=5-b"), 100, Whole),
            (Some("bytes=-"), 100, Whole),
            (Some("bytes=5"), 100, Whole),
            (Some("bytes=+1-5"), 100, Whole),
            (Some(""), 100, Whole),
        ];
        for (header, total_len, expected) in cases {
            assert_eq!(byte_range(*header, *total_len), *expected, "{header:?} of {total_len}");
        }
    }

    #[test]
    fn if_none_match_compares_weakly() {
        let etag = entity_tag("abc");
        assert_eq!(etag, "\"sha256:abc\"");
        for matching in ["\"sha256:abc\"", "W/\"sha256:abc\"", "*", "\"x\", \"sha256:abc\"", " \"x\" ,W/\"sha256:abc\" "] {
            assert!(none_match(matching, &etag), "{matching}");
        }
        for other in ["\"sha256:abd\"", "sha256:abc", "", "\"x\""] {
            assert!(!none_match(other, &etag), "{other}");
        }
    }
}
