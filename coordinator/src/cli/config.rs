//! `davit config get <env>` and `davit config set <env> key=value...`: an environment's
//! configuration (`/api/v1/configs/{environment}`), environment-wide or for one pipeline.
//! Secrets are masked by the server; the values set here are never printed back.

use anyhow::Context;
use clap::Subcommand;
use serde_json::{Map, Value, json};

use super::deployments::{find_pipeline, query_value};
use super::{ApiClient, Connection, print_json, print_table};

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// The effective variables of an environment (a pipeline's own values over the
    /// environment's with --pipeline) and their current versions; secrets show as ***.
    Get {
        environment: String,
        /// The values this pipeline (id or name) gets.
        #[arg(long)]
        pipeline: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Add or change variables. Keys naming a secret (password, secret, token, key, credential)
    /// are stored as secrets, which needs an admin.
    Set {
        environment: String,
        /// KEY=VALUE, one or more.
        #[arg(required = true, value_name = "KEY=VALUE", value_parser = parse_variable)]
        variables: Vec<(String, String)>,
        /// Store every value given as a secret.
        #[arg(long)]
        secret: bool,
        /// Set the pipeline's (id or name) own values instead of the environment's.
        #[arg(long)]
        pipeline: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
}

fn parse_variable(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => Ok((key.trim().to_string(), value.to_string())),
        Some(_) => Err(format!("{text:?} has no key before '='; write e.g. api_url=https://api.example.com")),
        None => Err(format!("{text:?} is not KEY=VALUE; write e.g. api_url=https://api.example.com")),
    }
}

pub async fn config(command: ConfigCommand, json: bool) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Get { environment, pipeline, connection } => {
            let client = ApiClient::connect(&connection).await?;
            let path = scoped_path(&client, &environment, pipeline.as_deref()).await?;
            let view = client.get(&path).await?;
            if json {
                return print_json(&view);
            }
            let variables = view["variables"].as_object().cloned().unwrap_or_default();
            if variables.is_empty() {
                println!("No variables in {environment}. Set some with `davit config set {environment} KEY=VALUE`.");
                return Ok(());
            }
            let rows = variables
                .iter()
                .map(|(key, value)| {
                    vec![
                        key.clone(),
                        value["value"].as_str().unwrap_or_default().to_string(),
                        if value["secret"].as_bool() == Some(true) { "yes".into() } else { "no".into() },
                        value["scope"].as_str().unwrap_or("-").to_string(),
                        value["version"].as_u64().map(|version| version.to_string()).unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            print_table(&["KEY", "VALUE", "SECRET", "SCOPE", "VERSION"], rows, 0);
            Ok(())
        }
        ConfigCommand::Set { environment, variables, secret, pipeline, connection } => {
            let client = ApiClient::connect(&connection).await?;
            let path = scoped_path(&client, &environment, pipeline.as_deref()).await?;
            let body: Map<String, Value> = variables
                .into_iter()
                .map(|(key, value)| {
                    let value = if secret { json!({ "value": value, "secret": true }) } else { Value::String(value) };
                    (key, value)
                })
                .collect();
            let written = client.post(&path, Value::Object(body)).await?;
            if json {
                return print_json(&written);
            }
            let count = written["written"].as_u64().context("the server's answer has no count")?;
            let secrets: Vec<&str> =
                written["secret_keys"].as_array().map(|keys| keys.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
            let scope = match &pipeline {
                Some(pipeline) => format!("{environment} for pipeline {pipeline}"),
                None => environment.clone(),
            };
            let secrets = if secrets.is_empty() { String::new() } else { format!(" ({} stored as secrets)", secrets.join(", ")) };
            println!("Set {count} variable{} in {scope}{secrets}.", if count == 1 { "" } else { "s" });
            Ok(())
        }
    }
}

/// `/api/v1/configs/{environment}`, with `?pipeline_id=` for a pipeline named by id or name.
async fn scoped_path(client: &ApiClient, environment: &str, pipeline: Option<&str>) -> anyhow::Result<String> {
    let mut path = format!("/api/v1/configs/{}", query_value(environment));
    if let Some(pipeline) = pipeline {
        let pipeline_id = find_pipeline(client, pipeline).await?["pipeline_id"].clone();
        path.push_str(&format!("?pipeline_id={pipeline_id}"));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_key_value_pairs() {
        assert_eq!(parse_variable("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_variable("novalue").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_variable(" =x").unwrap_err().contains("no key"));
    }
}
