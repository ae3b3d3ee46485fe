//! `davit pipelines`, `runs`, `run`, `deploy`, `rollback` and `approve`: pipelines and their
//! runs (deployments) over `/api/v1/pipelines` and `/api/v1/deployments`. A pipeline is named
//! by its id or its name; the name is looked up in the pipeline list here, the server only
//! knows ids.

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};

use super::failure::CliFailure;
use super::{ApiClient, Connection, compact_duration, or_dash, print_json, print_table, progress, relative_time};

#[derive(Args)]
pub struct RunsArgs {
    /// Only this pipeline's runs (its id or name).
    #[arg(long)]
    pipeline: Option<String>,
    /// Only runs in this state.
    #[arg(long, value_parser = ["pending", "in_progress", "success", "failed", "rolled_back"])]
    status: Option<String>,
    /// Only runs in this environment.
    #[arg(long, visible_alias = "env")]
    environment: Option<String>,
    /// How many of the newest runs to show.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    limit: u64,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
pub struct RunArgs {
    /// The pipeline: its id or its name.
    pipeline: String,
    #[command(flatten)]
    revision: Revision,
    /// Follow the run until it ends; the exit status says how it ended.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
pub struct DeployArgs {
    /// The pipeline: its id or its name.
    #[arg(value_name = "PIPELINE", required_unless_present = "pipeline_flag")]
    pipeline: Option<String>,
    /// The pipeline, as a flag (the same as the argument).
    #[arg(long = "pipeline", id = "pipeline_flag", value_name = "PIPELINE", conflicts_with = "pipeline")]
    pipeline_flag: Option<String>,
    #[command(flatten)]
    revision: Revision,
    /// Defaults to the pipeline's environment.
    #[arg(long, visible_alias = "env")]
    environment: Option<String>,
    /// A configuration value for this deployment only, over the environment's (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_override)]
    overrides: Vec<(String, String)>,
    /// Follow the deployment's progress until it ends: each event as a line and, on a
    /// terminal, a progress bar per region; the exit status says how it ended.
    #[arg(long)]
    follow: bool,
    #[command(flatten)]
    connection: Connection,
}

/// What to deploy: a branch's current head, a commit, or (neither) the pipeline's branch.
#[derive(Args)]
struct Revision {
    /// Deploy this branch's current head [default: the pipeline's branch].
    #[arg(long, conflicts_with = "commit")]
    branch: Option<String>,
    /// Deploy this commit.
    #[arg(long)]
    commit: Option<String>,
}

/// `--set KEY=VALUE`: a non-empty key (at most 100 characters, as the API allows) and any value.
fn parse_override(text: &str) -> Result<(String, String), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(format!("{text:?} is not KEY=VALUE; write e.g. --set replicas=3"));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("{text:?} has no key before '='; write e.g. --set replicas=3"));
    }
    if key.chars().count() > 100 {
        return Err("a key must be at most 100 characters".into());
    }
    Ok((key.to_string(), value.to_string()))
}

/// The pipeline named by `name_or_id`: `GET /api/v1/pipelines/{id}` for a number, else the
/// one pipeline with that name in the list. An unknown name says which names exist.
pub async fn find_pipeline(client: &ApiClient, name_or_id: &str) -> anyhow::Result<Value> {
    if let Ok(pipeline_id) = name_or_id.parse::<u64>() {
        return client.get(&format!("/api/v1/pipelines/{pipeline_id}")).await;
    }
    let pipelines = client.get_all("/api/v1/pipelines").await?;
    let mut matching = pipelines.iter().filter(|pipeline| pipeline["name"].as_str() == Some(name_or_id));
    match (matching.next(), matching.next()) {
        (Some(pipeline), None) => Ok(pipeline.clone()),
        (Some(_), Some(_)) => {
            let ids: Vec<String> = pipelines
                .iter()
                .filter(|pipeline| pipeline["name"].as_str() == Some(name_or_id))
                .map(|pipeline| pipeline["pipeline_id"].to_string())
                .collect();
            anyhow::bail!("several pipelines are named {name_or_id:?} (ids {}); name one by its id", ids.join(", "))
        }
        (None, _) => {
            let mut names: Vec<&str> = pipelines.iter().filter_map(|pipeline| pipeline["name"].as_str()).collect();
            names.sort_unstable();
            let known = if names.is_empty() {
                "there are no pipelines yet".to_string()
            } else {
                format!("the pipelines are: {}", names.join(", "))
            };
            anyhow::bail!("no pipeline is named {name_or_id:?}; {known} (see `davit pipelines`)")
        }
    }
}

async fn pipeline_id(client: &ApiClient, name_or_id: &str) -> anyhow::Result<u64> {
    find_pipeline(client, name_or_id).await?["pipeline_id"].as_u64().context("the server's pipeline has no pipeline_id")
}

pub async fn pipelines(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let pipelines = client.get_all("/api/v1/pipelines").await?;
    if json {
        return print_json(&json!({ "items": pipelines, "next_cursor": null }));
    }
    if pipelines.is_empty() {
        println!("No pipelines yet. Connect a repository (POST /api/v1/repos/connect) and create one (POST /api/v1/pipelines).");
        return Ok(());
    }
    let rows = pipelines
        .iter()
        .map(|pipeline| {
            vec![
                pipeline["pipeline_id"].to_string(),
                text(&pipeline["name"]),
                pipeline["repo_id"].to_string(),
                text(&pipeline["branch"]),
                text(&pipeline["environment"]),
                text(&pipeline["deploy_strategy"]),
                if pipeline["is_active"].as_bool() == Some(false) { "no".into() } else { "yes".into() },
            ]
        })
        .collect();
    print_table(&["ID", "NAME", "REPO", "BRANCH", "ENVIRONMENT", "STRATEGY", "ACTIVE"], rows, 0);
    Ok(())
}

pub async fn runs(args: RunsArgs, json: bool) -> anyhow::Result<()> {
    let client = ApiClient::connect(&args.connection).await?;
    let mut query = Vec::new();
    if let Some(pipeline) = &args.pipeline {
        query.push(format!("pipeline_id={}", pipeline_id(&client, pipeline).await?));
    }
    if let Some(status) = &args.status {
        query.push(format!("status={status}"));
    }
    if let Some(environment) = &args.environment {
        query.push(format!("environment={}", query_value(environment)));
    }
    let path = if query.is_empty() { "/api/v1/deployments".to_string() } else { format!("/api/v1/deployments?{}", query.join("&")) };
    let mut runs = client.get_all(&path).await?;
    // The API lists oldest first: keep the newest `limit`, still oldest first.
    let keep_from = runs.len().saturating_sub(args.limit as usize);
    runs.drain(..keep_from);
    if json {
        return print_json(&json!({ "items": runs, "next_cursor": null }));
    }
    if runs.is_empty() {
        println!("No runs match.");
        return Ok(());
    }
    let rows = runs
        .iter()
        .map(|run| {
            let commit = run["commit_hash"].as_str().unwrap_or_default();
            vec![
                run["deployment_id"].to_string(),
                run["pipeline_id"].to_string(),
                commit.get(..12).unwrap_or(commit).to_string(),
                text(&run["branch"]),
                text(&run["environment"]),
                text(&run["status"]),
                run["created_at"].as_str().map(relative_time).unwrap_or_else(|| "-".into()),
                run_duration(run),
            ]
        })
        .collect();
    print_table(&["ID", "PIPELINE", "COMMIT", "BRANCH", "ENVIRONMENT", "STATUS", "CREATED", "DURATION"], rows, 0);
    Ok(())
}

pub async fn run(args: RunArgs, json: bool) -> anyhow::Result<()> {
    let client = ApiClient::connect(&args.connection).await?;
    let pipeline = find_pipeline(&client, &args.pipeline).await?;
    create(&client, &pipeline, args.revision, None, Vec::new(), args.follow, json).await
}

pub async fn deploy(args: DeployArgs, json: bool) -> anyhow::Result<()> {
    let client = ApiClient::connect(&args.connection).await?;
    let name_or_id = args.pipeline.or(args.pipeline_flag).context("name the pipeline")?;
    let pipeline = find_pipeline(&client, &name_or_id).await?;
    create(&client, &pipeline, args.revision, args.environment, args.overrides, args.follow, json).await
}

/// `POST /api/v1/deployments`, then follow it or say how to.
async fn create(
    client: &ApiClient,
    pipeline: &Value,
    revision: Revision,
    environment: Option<String>,
    overrides: Vec<(String, String)>,
    follow: bool,
    json: bool,
) -> anyhow::Result<()> {
    let pipeline_id = pipeline["pipeline_id"].as_u64().context("the server's pipeline has no pipeline_id")?;
    let mut body = json!({ "pipeline_id": pipeline_id });
    match (revision.branch, revision.commit) {
        (_, Some(commit)) => body["commit_hash"] = commit.into(),
        (Some(branch), None) => body["branch"] = branch.into(),
        (None, None) => match pipeline["branch"].as_str().filter(|branch| !branch.is_empty()) {
            Some(branch) => body["branch"] = branch.into(),
            None => {
                return Err(
                    CliFailure::Usage(format!("pipeline {pipeline_id} names no branch: give --branch BRANCH or --commit COMMIT")).into()
                );
            }
        },
    }
    if let Some(environment) = environment {
        body["environment"] = environment.into();
    }
    if !overrides.is_empty() {
        body["config_overrides"] = Value::Object(overrides.into_iter().map(|(key, value)| (key, Value::String(value))).collect());
    }
    let deployment = client.post("/api/v1/deployments", body).await?;
    if follow {
        return follow_deployment(client, &deployment, "created", json).await;
    }
    if json {
        return print_json(&deployment);
    }
    println!(
        "Deployment {} of commit {} to {} created ({}).",
        deployment["deployment_id"],
        deployment["commit_hash"].as_str().unwrap_or("?"),
        deployment["environment"].as_str().unwrap_or("?"),
        deployment["status"].as_str().unwrap_or("?")
    );
    println!(
        "Follow it with `davit deployments events {} --follow` (or `davit deploy ... --follow`); its log: `davit logs {} -f`; its jobs: `davit jobs {}`.",
        deployment["deployment_id"], deployment["deployment_id"], deployment["deployment_id"]
    );
    Ok(())
}

/// Show a deployment's events until it ends and exit with how it ended.
async fn follow_deployment(client: &ApiClient, deployment: &Value, what: &str, json: bool) -> anyhow::Result<()> {
    let deployment_id = deployment["deployment_id"].as_u64().context("the server's answer has no deployment_id")?;
    let output = progress::Output::choose(json);
    if output != progress::Output::JsonLines {
        println!(
            "Deployment {deployment_id} of commit {} to {} {what}; following its progress.",
            deployment["commit_hash"].as_str().unwrap_or("?"),
            deployment["environment"].as_str().unwrap_or("?")
        );
    }
    let end = progress::show_events(client, deployment_id, true, output).await?.context("the event stream ended early")?;
    progress::finish(deployment_id, end, output)
}

pub async fn rollback(client: &ApiClient, deployment_id: u64, follow: bool, json: bool) -> anyhow::Result<()> {
    let rollback = client.post(&format!("/api/v1/deployments/{deployment_id}/rollback"), json!({})).await?;
    if follow {
        return follow_deployment(client, &rollback, &format!("(the rollback of deployment {deployment_id}) created"), json).await;
    }
    if json {
        return print_json(&rollback);
    }
    println!(
        "Deployment {} rolls deployment {deployment_id} back to commit {} in {} ({}).",
        rollback["deployment_id"],
        rollback["commit_hash"].as_str().unwrap_or("?"),
        rollback["environment"].as_str().unwrap_or("?"),
        rollback["status"].as_str().unwrap_or("?")
    );
    println!("Follow it with `davit deployments events {} --follow`.", rollback["deployment_id"]);
    Ok(())
}

pub async fn approve(client: &ApiClient, deployment_id: u64, json: bool) -> anyhow::Result<()> {
    let deployment = client.post(&format!("/api/v1/deployments/{deployment_id}/approve"), json!({})).await?;
    if json {
        return print_json(&deployment);
    }
    let approvals = deployment["approvals"].as_array().map(Vec::len).unwrap_or(0);
    let required = deployment["required_approvals"].as_u64().map(|required| format!(" of {required}")).unwrap_or_default();
    println!(
        "Approved deployment {deployment_id} to {} ({approvals}{required} approvals; status {}).",
        deployment["environment"].as_str().unwrap_or("?"),
        deployment["status"].as_str().unwrap_or("?")
    );
    Ok(())
}

/// A JSON string field, `-` when absent or empty.
pub fn text(value: &Value) -> String {
    or_dash(value.as_str().map(str::to_string).unwrap_or_default())
}

/// Start to end, or how long a run has been going.
fn run_duration(run: &Value) -> String {
    let time = |field: &str| run[field].as_str().and_then(|at| humantime::parse_rfc3339(at).ok());
    match (time("start_time"), time("end_time")) {
        (Some(start), Some(end)) => end.duration_since(start).map(compact_duration).unwrap_or_else(|_| "-".into()),
        (Some(start), None) => std::time::SystemTime::now()
            .duration_since(start)
            .map(|elapsed| format!("{} so far", compact_duration(std::time::Duration::from_secs(elapsed.as_secs()))))
            .unwrap_or_else(|_| "-".into()),
        _ => "-".into(),
    }
}

/// A query parameter value, percent-encoded.
pub fn query_value(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_key_value_pairs_with_a_key() {
        assert_eq!(parse_override("replicas=3"), Ok(("replicas".into(), "3".into())));
        assert_eq!(parse_override("url=http://x/?a=b"), Ok(("url".into(), "http://x/?a=b".into())));
        assert_eq!(parse_override("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_override("replicas").unwrap_err().contains("--set replicas=3"));
        assert!(parse_override("=3").unwrap_err().contains("no key"));
        assert!(parse_override(&format!("{}=1", "k".repeat(101))).is_err());
    }
}
