//! `davit login` and `davit logout`: exchange a username and password for a token at
//! `POST /api/v1/auth/login` and keep it in the user's config directory ([`credentials`]).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::credentials::{self, SavedLogin};
use super::failure::CliFailure;

#[derive(Args)]
pub struct LoginArgs {
    /// The server's URL [default: the saved login's, else http://127.0.0.1:7700].
    #[arg(long, visible_alias = "server", env = "DAVIT_URL")]
    url: Option<String>,
    /// Asked for on the terminal when not given.
    #[arg(long, env = "DAVIT_USERNAME")]
    username: Option<String>,
    /// Read the password from the first line of standard input instead of asking for it.
    #[arg(long)]
    password_stdin: bool,
    /// CA certificate to trust for an https:// server (remembered with the login).
    #[arg(long, env = "DAVIT_CA_FILE")]
    ca_file: Option<PathBuf>,
}

pub async fn login(args: LoginArgs) -> anyhow::Result<()> {
    let path = credentials::credentials_path()?;
    // A damaged file is replaced by this login rather than in its way.
    let saved = credentials::load(&path).unwrap_or(None);
    let server_env = std::env::var("DAVIT_SERVER").ok().filter(|server| !server.is_empty());
    let url = credentials::choose_server(args.url.as_deref(), server_env.as_deref(), saved.as_ref());
    reqwest::Url::parse(&url)
        .ok()
        .filter(|parsed| matches!(parsed.scheme(), "http" | "https"))
        .ok_or_else(|| CliFailure::Usage(format!("--url {url:?} must be a URL like http://127.0.0.1:7700")))?;
    let username = match args.username.filter(|username| !username.is_empty()) {
        Some(username) => username,
        None => credentials::prompt("Username: ", true)?,
    };
    let password = if args.password_stdin {
        credentials::read_stdin_line()?
    } else {
        match std::env::var("DAVIT_PASSWORD").ok().filter(|password| !password.is_empty()) {
            Some(password) => password,
            None => credentials::prompt(&format!("Password for {username} at {url}: "), false)?,
        }
    };
    if username.is_empty() || password.is_empty() {
        return Err(CliFailure::Usage("the username and the password must not be empty".into()).into());
    }
    let ca_file = args.ca_file.map(|file| std::fs::canonicalize(&file).unwrap_or(file));
    let http = super::http_client(ca_file.as_deref())?;
    let answer = super::log_in(&http, &url, &username, &password).await.context(format!("logging in to {url} as {username}"))?;
    let token = answer["token"].as_str().context("the login answer has no token")?.to_string();
    let expires_at = answer["expires_in"].as_u64().map(|seconds| {
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + std::time::Duration::from_secs(seconds)).to_string()
    });
    let login = SavedLogin { url: url.clone(), token, username: username.clone(), expires_at: expires_at.clone(), ca_file };
    credentials::save(&path, &login)?;
    let until = expires_at.map(|at| format!(" until {at}")).unwrap_or_default();
    println!("Logged in to {url} as {username}{until}; the token is saved in {} (mode 0600).", path.display());
    Ok(())
}

/// Revoke the saved login token at its server (when it answers), then forget it here.
pub async fn logout() -> anyhow::Result<()> {
    let path = credentials::credentials_path()?;
    let saved = credentials::load(&path).unwrap_or(None);
    let revoked = match &saved {
        Some(login) => {
            let http = super::http_client(login.ca_file.as_deref())?;
            super::log_out(&http, &login.url, &login.token).await
        }
        None => Ok(()),
    };
    if credentials::remove(&path)? {
        match saved {
            Some(login) => {
                println!("Logged out of {} ({}): removed {}.", login.url, login.username, path.display());
                match (revoked, login.expires_at) {
                    (Ok(()), _) => println!("The server no longer accepts the token."),
                    // An expired token, or a server that cannot be reached: the copy is all that is left.
                    (Err(error), Some(expires_at)) => {
                        println!("The server could not revoke the token ({error:#}); a copy taken before works until {expires_at}.")
                    }
                    (Err(error), None) => println!("The server could not revoke the token ({error:#})."),
                }
            }
            None => println!("Removed {}.", path.display()),
        }
    } else {
        println!("Not logged in (no {}).", path.display());
    }
    Ok(())
}
