//! Documentation-only types: the exact shape of the strings and objects the handlers accept, as
//! OpenAPI schemas, so that the published document and the validation in the handlers say the
//! same thing (schemathesis checks both directions: what the schema allows must not get a 400,
//! what it forbids must not get a 2xx). They are never deserialized; each pattern mirrors one
//! validator in the handlers, which stays the authority.
//!
//! Patterns are written for both readers of the document: ECMA-262 (JSON Schema) and Python's
//! `re` (schemathesis). So they spell out the control and whitespace characters Rust means
//! instead of `\s`, which each engine reads differently, and they end in `$(?!\n)`, because a
//! Python `$` also matches before a final newline.

use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, SchemaType, Type};
use utoipa::openapi::{KnownFormat, RefOr};
use utoipa::{PartialSchema, ToSchema};

/// Unicode category Cc, what `char::is_control` rejects.
macro_rules! control {
    () => {
        r"\x00-\x1f\x7f-\x9f"
    };
}

/// Rust's `char::is_whitespace` (Unicode White_Space) less the characters `control!` covers.
macro_rules! whitespace {
    () => {
        r" \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
    };
}

/// Every Unicode White_Space character, control ones included: what `str::trim` removes.
macro_rules! all_whitespace {
    () => {
        r"\t\n\x0b\x0c\r\x85 \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
    };
}

/// End of input: JSON Schema's `$`; the lookahead keeps Python from matching before a final `\n`.
macro_rules! end {
    () => {
        r"$(?!\n)"
    };
}

/// A visible character that is not whitespace.
macro_rules! solid {
    () => {
        concat!("[^", control!(), whitespace!(), "]")
    };
}

/// Workspace-relative paths (`pipelines::validate_workspace_path`): no absolute paths, no `..`.
pub const WORKSPACE_PATH_PATTERN: &str = concat!(r"^(\.|[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*/?)", end!());
/// The same, or empty.
pub const OPTIONAL_WORKSPACE_PATH_PATTERN: &str = concat!(r"^(\.|[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_-][A-Za-z0-9_.-]*)*/?)?", end!());
/// Docker image references (`pipelines::validate_image`).
pub const IMAGE_PATTERN: &str = concat!(r"^[a-z0-9][A-Za-z0-9._/:@-]*", end!());
/// Ids in the seed's forms: `12`, `"12"`, `"repo12"`. Mirrors `extract::parse_id`.
pub const ID_PATTERN: &str = concat!(r"^[A-Za-z_]*0*[1-9][0-9]{0,18}", end!());
/// A point in time as the monitoring API takes it (`delivery::parse_instant`): Unix
/// milliseconds (up to 13 digits), or an RFC 3339 time. February stops at the 28th in the
/// pattern so that every date it allows exists in every year; the parser also takes leap days.
pub const TIME_OR_MILLIS_PATTERN: &str = concat!(
    r"^([0-9]{1,13}|[0-9]{4}-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)|02-(0[1-9]|1[0-9]|2[0-8]))[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9]))",
    end!()
);
/// `next_cursor` of a log search (`logs::SearchCursor`), or empty for the first page.
pub const SEARCH_CURSOR_PATTERN: &str = concat!(r"^([0-9]{1,19}\.[0-9]{1,19}\.[0-9]{1,19}\.[0-9]{1,19})?", end!());
/// `next_cursor` values: the last id of a page, or empty for the first page.
pub const CURSOR_PATTERN: &str = concat!(r"^[0-9]{0,19}", end!());
/// Environment names (`pipelines::validate_environment`).
pub const ENVIRONMENT_PATTERN: &str = concat!(r"^[a-z0-9_-]{1,20}", end!());
/// Usernames (`users::validate_username`).
pub const USERNAME_PATTERN: &str = concat!(r"^[A-Za-z0-9_.-]{1,50}", end!());
/// Names and labels (`extract::validate_label`): no control characters, not only whitespace.
pub const LABEL_PATTERN: &str = concat!("^[^", control!(), "]*", solid!(), "[^", control!(), "]*", end!());
/// Exactly one `@` with something on each side, no whitespace or control characters.
pub const EMAIL_PATTERN: &str = concat!("^[^@", control!(), whitespace!(), "]+@[^@", control!(), whitespace!(), "]+", end!());
/// A git commit id (`deployments::validate_commit`).
pub const COMMIT_PATTERN: &str = concat!(r"^[0-9a-fA-F]{4,40}", end!());
/// Git branch names (`repos::validate_branch`): no whitespace, control characters or any of
/// `~^:?*[\`, no `..`, not starting with `-` or `/`.
pub const BRANCH_PATTERN: &str = concat!(
    r"^(?:[^.\-/",
    control!(),
    whitespace!(),
    r"~^:?*\[\\]|\.(?!\.))(?:[^.",
    control!(),
    whitespace!(),
    r"~^:?*\[\\]|\.(?!\.))*",
    end!()
);
/// Pipeline branch patterns (`repos::validate_branch_pattern`): a branch name in which `*` is
/// also allowed.
pub const BRANCH_PATTERN_GLOB: &str = concat!(
    r"^(?:[^.\-/",
    control!(),
    whitespace!(),
    r"~^:?\[\\]|\.(?!\.))(?:[^.",
    control!(),
    whitespace!(),
    r"~^:?\[\\]|\.(?!\.))*",
    end!()
);
/// Repository URLs (`repos::validate_repo_url`): `https`, `http`, `ssh` or `git` with a host
/// and a path, `file://` with a path, or scp-like `user@host:path`.
pub const REPO_URL_PATTERN: &str = concat!(
    r"^(?:(?:https?|ssh|git)://[^/",
    control!(),
    whitespace!(),
    "]+|file://[^/",
    control!(),
    whitespace!(),
    "]*)/",
    solid!(),
    "*[^/",
    control!(),
    whitespace!(),
    "]",
    solid!(),
    "*",
    end!(),
    r"|^(?!.*://)[^:",
    control!(),
    whitespace!(),
    "]*@[^:",
    control!(),
    whitespace!(),
    "]*:[^/",
    control!(),
    whitespace!(),
    "]",
    solid!(),
    "*",
    end!()
);
/// A provider's API base URL (`repos::validate_api_url`): `http(s)://host[/path]` without a query
/// or fragment, or empty for the provider's default.
pub const API_URL_PATTERN: &str =
    concat!(r"^(?:https?://[^/?#", control!(), whitespace!(), "]+(?:/[^?#", control!(), whitespace!(), "]*)?)?", end!());
/// A provider access token (`repos::validate_access_token`): no whitespace or control characters.
pub const ACCESS_TOKEN_PATTERN: &str = concat!("^", solid!(), "*", end!());
/// Standard base64 with padding and canonical trailing bits, whitespace around it allowed.
pub const BASE64_PATTERN: &str = concat!(
    "^[",
    all_whitespace!(),
    "]*(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?[",
    all_whitespace!(),
    "]*",
    end!()
);
/// Configuration keys: printable ASCII, so that the state machine's limit of 100 bytes and the
/// schema's 100 characters are the same thing.
pub const KEY_PATTERN: &str = concat!(r"^[\x20-\x7e]*", end!());

/// The largest integer id the document promises to take as a JSON number (2^53 - 1, exact in
/// every JSON parser). Larger ones are accepted and simply not found.
pub const MAX_JSON_ID: u64 = 9_007_199_254_740_991;

fn string(pattern: Option<&str>, min_length: Option<usize>, max_length: Option<usize>, description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(pattern)
        .min_length(min_length)
        .max_length(max_length)
        .description(Some(description))
}

/// Declare a string schema type: `string_schema!(Name, pattern, min, max, "description")`.
macro_rules! string_schema {
    ($name:ident, $pattern:expr, $min:expr, $max:expr, $description:literal) => {
        #[doc = $description]
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                string($pattern, $min, $max, $description).into()
            }
        }

        impl ToSchema for $name {}
    };
}

/// An id: `12`, or the seed's form with a prefix such as `repo12`.
pub struct IdText;

impl PartialSchema for IdText {
    fn schema() -> RefOr<Schema> {
        // The example names the first of each resource, which is what a fresh node creates first.
        string(Some(ID_PATTERN), None, None, "An id: `12`, or the seed's form with a prefix such as `repo12`.").examples(["1"]).into()
    }
}

impl ToSchema for IdText {}
string_schema!(Cursor, Some(CURSOR_PATTERN), None, None, "`next_cursor` of the previous page.");
string_schema!(
    SearchCursor,
    Some(SEARCH_CURSOR_PATTERN),
    None,
    None,
    "`next_cursor` of the previous page of a log search (`<deployment>.<job>.<sequence>.<line>`), or empty for the first."
);
string_schema!(
    TimeOrMillis,
    Some(TIME_OR_MILLIS_PATTERN),
    None,
    None,
    "Unix milliseconds (`1730419200000`) or an RFC 3339 time (`2024-11-01T00:00:00Z`)."
);
string_schema!(
    EnvironmentName,
    Some(ENVIRONMENT_PATTERN),
    Some(1),
    Some(20),
    "An environment: 1 to 20 lower-case letters, digits, '-' or '_' (like `staging`)."
);
string_schema!(Username, Some(USERNAME_PATTERN), Some(1), Some(50), "1 to 50 letters, digits, '_', '.' or '-'.");
string_schema!(Email, Some(EMAIL_PATTERN), Some(3), Some(100), "An email address such as name@example.com, at most 100 characters.");
string_schema!(Password, None, Some(8), Some(1024), "8 to 1024 characters.");
string_schema!(Name, Some(LABEL_PATTERN), Some(1), Some(100), "1 to 100 characters, not only whitespace, no control characters.");
string_schema!(Version, Some(LABEL_PATTERN), Some(1), Some(50), "1 to 50 characters, not only whitespace, no control characters.");
string_schema!(Branch, Some(BRANCH_PATTERN), Some(1), Some(50), "A git branch name of at most 50 characters.");
string_schema!(
    BranchPattern,
    Some(BRANCH_PATTERN_GLOB),
    Some(1),
    Some(50),
    "A git branch name or pattern of at most 50 characters: `*` matches within a path segment, `**` across (`release/*`)."
);
string_schema!(
    RepoUrl,
    Some(REPO_URL_PATTERN),
    Some(1),
    Some(255),
    "A repository URL such as https://github.com/org/repo or git@github.com:org/repo.git."
);
string_schema!(CommitHash, Some(COMMIT_PATTERN), Some(4), Some(40), "A git commit id: 4 to 40 hexadecimal characters.");
string_schema!(WebhookSecret, None, None, Some(100), "At most 100 characters; shown as `***` once set.");
string_schema!(
    ApiUrl,
    Some(API_URL_PATTERN),
    None,
    Some(255),
    "The provider's API base URL, such as https://ghe.example.com/api/v3 or https://gitlab.example.com/api/v4; empty for the provider's public API."
);
string_schema!(
    AccessToken,
    Some(ACCESS_TOKEN_PATTERN),
    None,
    Some(2000),
    "A provider access token (no whitespace, at most 2000 characters); sealed before it is stored and shown as `***` once set."
);
string_schema!(BuildCommand, None, None, Some(10_000), "At most 10000 characters.");
string_schema!(
    WorkspacePath,
    Some(WORKSPACE_PATH_PATTERN),
    Some(1),
    Some(1000),
    "A path inside the repository: `.`, or segments of letters, digits, '_', '-', '.' separated by '/', none starting with '.'."
);
string_schema!(
    OptionalWorkspacePath,
    Some(OPTIONAL_WORKSPACE_PATH_PATTERN),
    None,
    Some(1000),
    "A path inside the repository (as for artifacts), or empty to clear the setting."
);
string_schema!(
    ImageReference,
    Some(IMAGE_PATTERN),
    Some(1),
    Some(255),
    "A Docker image reference such as `alpine:3.20` or `registry.local/team/app@sha256:...`."
);

/// `agent_labels` of a pipeline: up to 20 labels an agent must carry.
pub struct AgentLabels;

impl PartialSchema for AgentLabels {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("Labels an agent must carry, such as {\"region\": \"eu-west\"}; keys 1 to 63, values 1 to 255 characters."))
            .max_properties(Some(20))
            .property_names(Some(key_names(63, Some(LABEL_PATTERN))))
            .additional_properties(Some(string(Some(LABEL_PATTERN), Some(1), Some(255), "A label value.")))
            .into()
    }
}

impl ToSchema for AgentLabels {}

/// The role names of `Role`.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum RoleName {
    Viewer,
    Developer,
    Admin,
}

/// The SCM names of `ScmType`.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum ScmTypeName {
    Github,
    Gitlab,
    Bitbucket,
    Git,
}

/// The event names of `TriggerEvent`.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum TriggerEventName {
    Push,
    Tag,
    PullRequest,
}

/// The strategy names of `DeployStrategy`.
#[derive(serde::Serialize, ToSchema)]
#[allow(dead_code)]
pub enum DeployStrategyName {
    #[serde(rename = "blue-green")]
    BlueGreen,
    #[serde(rename = "canary")]
    Canary,
    #[serde(rename = "rolling")]
    Rolling,
}

/// The status names of `DeploymentStatus`.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum DeploymentStatusName {
    Pending,
    InProgress,
    Success,
    Failed,
    RolledBack,
}

/// Log levels as the API spells them.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
#[allow(dead_code)]
pub enum LogLevelName {
    Info,
    Warning,
    Error,
    Debug,
}

/// The cluster operations of `POST /api/v1/cluster/{operation}`.
#[derive(serde::Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
pub enum ClusterOperationName {
    Add,
    Promote,
    Remove,
    TransferLeader,
    Snapshot,
}

fn scalar(max_length: Option<usize>) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(SchemaType::from_iter([Type::String, Type::Number, Type::Boolean])).max_length(max_length)
}

fn key_names(max_length: usize, pattern: Option<&str>) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).min_length(Some(1)).max_length(Some(max_length)).pattern(pattern)
}

/// The body of `POST /configs/{environment}`: the seed's flat object of variables, each a
/// scalar or `{"value": scalar, "secret": bool}`.
pub struct ConfigVariables;

impl PartialSchema for ConfigVariables {
    fn schema() -> RefOr<Schema> {
        let marked = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("value", scalar(Some(65_536)))
            .required("value")
            .property("secret", ObjectBuilder::new().schema_type(Type::Boolean))
            .additional_properties(Some(AdditionalProperties::FreeForm(false)));
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "Variables by key (1 to 100 printable ASCII characters): a string (at most 64 KiB), number or boolean, \
                 or {\"value\": ..., \"secret\": true}. Keys naming a password, secret, token, key or credential are secrets.",
            ))
            .min_properties(Some(1))
            .max_properties(Some(500))
            .property_names(Some(key_names(100, Some(KEY_PATTERN))))
            .additional_properties(Some(Schema::from(OneOfBuilder::new().item(scalar(Some(65_536))).item(marked))))
            .into()
    }
}

impl ToSchema for ConfigVariables {}

/// `config_overrides` of a deployment: up to 200 scalars by key.
pub struct ConfigOverrides;

impl PartialSchema for ConfigOverrides {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("Configuration values for this deployment only, over the environment's."))
            .max_properties(Some(200))
            .property_names(Some(key_names(100, None)))
            .additional_properties(Some(scalar(None)))
            .into()
    }
}

impl ToSchema for ConfigOverrides {}

/// The JSON body of `POST /artifacts/upload`: text content, or base64 with
/// `"artifact_encoding": "base64"`.
pub struct JsonUploadBody;

impl PartialSchema for JsonUploadBody {
    fn schema() -> RefOr<Schema> {
        let common = |artifact: ObjectBuilder, encoding: ObjectBuilder, encoding_required: bool| {
            let mut object = ObjectBuilder::new()
                .schema_type(Type::Object)
                .property("pipeline_id", <super::extract::FlexibleId as PartialSchema>::schema())
                .property("artifact", artifact)
                .property("version", Version::schema())
                .property("artifact_encoding", encoding)
                .required("pipeline_id")
                .required("artifact")
                .required("version")
                .additional_properties(Some(AdditionalProperties::FreeForm(false)));
            if encoding_required {
                object = object.required("artifact_encoding");
            }
            object
        };
        let text_encoding = ObjectBuilder::new().schema_type(SchemaType::from_iter([Type::String, Type::Null])).enum_values(Some([
            serde_json::json!("text"),
            serde_json::json!("utf-8"),
            serde_json::Value::Null,
        ]));
        let text = common(
            ObjectBuilder::new().schema_type(Type::String).description(Some("The artifact's content as text.")),
            text_encoding,
            false,
        );
        let base64 = common(
            ObjectBuilder::new().schema_type(Type::String).pattern(Some(BASE64_PATTERN)).description(Some("The content, base64-encoded.")),
            ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["base64"])),
            true,
        );
        OneOfBuilder::new().item(text).item(base64).into()
    }
}

impl ToSchema for JsonUploadBody {}

/// The multipart form of `POST /artifacts/upload`.
pub struct MultipartUpload;

impl PartialSchema for MultipartUpload {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("pipeline_id", IdText::schema())
            .property("version", Version::schema())
            .property(
                "artifact",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::Custom("binary".into())))
                    .content_media_type("application/octet-stream"),
            )
            .required("pipeline_id")
            .required("version")
            .required("artifact")
            .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            .into()
    }
}

impl ToSchema for MultipartUpload {}

/// An RFC 3339 time, as the log search takes it.
pub struct DateTime;

impl PartialSchema for DateTime {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
            .description(Some("An RFC 3339 time such as 2024-11-01T00:00:00Z."))
            .into()
    }
}

impl ToSchema for DateTime {}

/// A percentage of traffic, 1 to 100 (a canary step).
pub struct TrafficPercent;

impl PartialSchema for TrafficPercent {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
            .minimum(Some(1))
            .maximum(Some(100))
            .description(Some("Percent of traffic, 1 to 100."))
            .into()
    }
}

impl ToSchema for TrafficPercent {}

/// A repository's polling interval (`repos::validate_poll_interval`): 0, or 10 to 86400 seconds.
pub struct PollInterval;

impl PartialSchema for PollInterval {
    fn schema() -> RefOr<Schema> {
        let never = ObjectBuilder::new().schema_type(Type::Integer).enum_values(Some([0]));
        let seconds = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(crate::scm::polling::MIN_POLL_INTERVAL_SECONDS))
            .maximum(Some(crate::scm::polling::MAX_POLL_INTERVAL_SECONDS));
        OneOfBuilder::new()
            .item(never)
            .item(seconds)
            .description(Some("Seconds between polls with git ls-remote, 10 to 86400; 0 never polls."))
            .into()
    }
}

impl ToSchema for PollInterval {}
