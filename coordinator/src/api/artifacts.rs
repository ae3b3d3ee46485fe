//! Artifacts: content-addressed by the SHA-256 of their bytes, kept zstd-compressed in the blob
//! store under `artifacts/sha256/<digest>.zst`, recorded (metadata only) through Raft. The same
//! bytes uploaded twice are stored once.

use axum::Json;
use axum::body::Body;
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
    // Content-addressed: the same bytes are already there, durable, under the same key.
    if !state.blobs.exists(&key).await.map_err(|e| ApiError::internal(e.to_string()))? {
        state.blobs.put(&key, compressed).await.map_err(|e| ApiError::internal(e.to_string()))?;
    }
    let command =
        Command::RecordArtifact { pipeline_id: upload.pipeline_id, version: upload.version, artifact_path: key, digest, size_bytes, produced_by: None };
    let (outcome, _) = super::propose(&state.node, &caller.requester(), command).await?;
    let artifact_id = applied_id(outcome)?.expect("record returns the id");
    Ok((StatusCode::CREATED, Json(load_artifact(&state, artifact_id)?.into())))
}

/// Download a specific artifact's bytes (its digest is in `X-Davit-Digest`).
#[utoipa::path(get, path = "/api/v1/artifacts/{artifactId}", tag = "artifacts", params(("artifactId" = schema::IdText, Path, description = "artifact id")),
    security(("bearer" = [])),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 400, body = crate::api_error::ErrorBody),
        (status = 401, body = crate::api_error::ErrorBody), (status = 404, body = crate::api_error::ErrorBody)))]
async fn download_artifact(State(state): State<AppState>, _caller: Caller, Path(artifact_id): Path<String>) -> Result<Response, ApiError> {
    let artifact_id = parse_id("artifactId", &artifact_id)?;
    state.node.read_barrier().await?;
    let artifact = load_artifact(&state, artifact_id)?;
    let compressed =
        state.blobs.get(&artifact.artifact_path).await.map_err(|e| ApiError::internal(e.to_string()))?.ok_or_else(|| {
            ApiError::internal(format!("artifact {artifact_id} is recorded but its bytes are missing from the blob store"))
        })?;
    let expected_digest = artifact.digest.clone();
    let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let bytes = zstd::decode_all(compressed.as_slice()).map_err(|e| e.to_string())?;
        // Verify on the way out, so a corrupted blob is an error and never silently served.
        if hex(&Sha256::digest(&bytes)) != expected_digest {
            return Err("digest mismatch".into());
        }
        Ok(bytes)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::internal(format!("artifact {artifact_id} is damaged in the blob store: {e}")))?;
    let mut response = Body::from(bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(value) = HeaderValue::from_str(&artifact.digest) {
        headers.insert("x-davit-digest", value);
    }
    let file_name: String = artifact.version.chars().filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c)).collect();
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"artifact-{artifact_id}-{file_name}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
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
