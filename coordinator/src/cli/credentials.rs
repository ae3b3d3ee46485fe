//! `davit login` / `davit logout`: the saved login (`credentials.json`: URL, token, username,
//! expiry) in the user's config directory, written with mode 0600 in a 0700 directory, and the
//! rule that picks the server and token of every API command (flags, then environment, then
//! this file). This module never sends a saved token to any server but the one it was issued by.

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::failure::CliFailure;

/// Where `davit up` listens by default, used when nothing else names a server.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7700";

/// What `davit login` saves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLogin {
    /// The server the token was issued by, without a trailing slash.
    pub url: String,
    pub token: String,
    pub username: String,
    /// RFC 3339; absent for a token without a known expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The CA certificate given at login, used again for this server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// `$DAVIT_CONFIG_DIR/credentials.json`, else `$XDG_CONFIG_HOME/davit/credentials.json`, else
/// `~/.config/davit/credentials.json`.
pub fn credentials_path() -> anyhow::Result<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty()).map(PathBuf::from);
    let directory = match (non_empty("DAVIT_CONFIG_DIR"), non_empty("XDG_CONFIG_HOME"), non_empty("HOME")) {
        (Some(directory), _, _) => directory,
        (None, Some(config_home), _) => config_home.join("davit"),
        (None, None, Some(home)) => home.join(".config").join("davit"),
        (None, None, None) => {
            return Err(CliFailure::Usage("cannot tell where to keep the login: set DAVIT_CONFIG_DIR or HOME".into()).into());
        }
    };
    Ok(directory.join("credentials.json"))
}

/// The saved login, if there is one.
pub fn load(path: &Path) -> anyhow::Result<Option<SavedLogin>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let login = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a davit login; remove it or run `davit login` again", path.display()))?;
            Ok(Some(login))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Write the login: the directory is made 0700 if it does not exist, the file is written under
/// another name with mode 0600 and renamed into place, so a reader never sees half a file and
/// the token is never readable by others, not even for a moment.
pub fn save(path: &Path, login: &SavedLogin) -> anyhow::Result<()> {
    let directory = path.parent().context("the credentials path has no directory")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(directory)
        .with_context(|| format!("cannot create {}", directory.display()))?;
    let temporary = directory.join(format!(".credentials.json.{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("cannot create {}", temporary.display()))?;
    let written = file
        .write_all(&serde_json::to_vec_pretty(login)?)
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(error).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Remove the saved login; false when there was none.
pub fn remove(path: &Path) -> anyhow::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// A server URL as compared and stored: no trailing slash.
pub fn normalize_url(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

/// Which server a command talks to: `--server`/`--url` or `DAVIT_URL` (`flag`), else the older
/// `DAVIT_SERVER` (`server_env`), else the saved login's, else [`DEFAULT_SERVER`].
pub fn choose_server(flag: Option<&str>, server_env: Option<&str>, saved: Option<&SavedLogin>) -> String {
    let chosen = flag.or(server_env).map(str::to_string).or_else(|| saved.map(|login| login.url.clone()));
    normalize_url(chosen.as_deref().unwrap_or(DEFAULT_SERVER))
}

/// The saved token for `server`, or the reason there is none usable (a usage failure that says
/// to run `davit login`). `now` is for the expiry check.
pub fn saved_token_for<'a>(
    server: &str,
    saved: Option<&'a SavedLogin>,
    path: &Path,
    now: std::time::SystemTime,
) -> Result<&'a SavedLogin, CliFailure> {
    let Some(login) = saved else {
        return Err(CliFailure::Usage(format!(
            "not logged in: run `davit login --url {server}` (or give --token or DAVIT_TOKEN); no login is saved in {}",
            path.display()
        )));
    };
    if normalize_url(&login.url) != server {
        return Err(CliFailure::Usage(format!(
            "you are logged in to {} (as {}), not {server}: run `davit login --url {server}`, or give --token for it",
            login.url, login.username
        )));
    }
    let expired = login.expires_at.as_deref().and_then(|at| humantime::parse_rfc3339(at).ok()).is_some_and(|at| at <= now);
    if expired {
        return Err(CliFailure::Usage(format!(
            "your login to {server} as {} expired at {}: run `davit login --url {server}` again",
            login.username,
            login.expires_at.as_deref().unwrap_or("?")
        )));
    }
    Ok(login)
}

/// Ask on the terminal (stderr) for a line; `echo` false hides what is typed.
pub fn prompt(question: &str, echo: bool) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(CliFailure::Usage(format!(
            "{} is needed and standard input is not a terminal: give --username, and the password with --password-stdin",
            question.trim_end_matches([':', ' '])
        ))
        .into());
    }
    eprint!("{question}");
    std::io::stderr().flush()?;
    // With echo off, ECHONL still shows the newline typed.
    let hidden = if echo { None } else { EchoOff::new() };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    drop(hidden);
    read.context("cannot read from the terminal")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// The first line of standard input (`--password-stdin`), without its line ending.
pub fn read_stdin_line() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("cannot read the password from standard input")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// Terminal echo switched off while it lives (termios), restored when dropped.
struct EchoOff {
    saved: libc::termios,
}

impl EchoOff {
    fn new() -> Option<Self> {
        // SAFETY: tcgetattr/tcsetattr only read and write the termios struct given, for fd 0.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return None;
            }
            let mut quiet = saved;
            quiet.c_lflag &= !libc::ECHO;
            quiet.c_lflag |= libc::ECHONL;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &quiet) != 0 {
                return None;
            }
            Some(EchoOff { saved })
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the attributes read in `new` on the same descriptor.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::{Duration, SystemTime};

    fn login(url: &str, expires_at: Option<&str>) -> SavedLogin {
        SavedLogin { url: url.into(), token: "t".into(), username: "ada".into(), expires_at: expires_at.map(str::to_string), ca_file: None }
    }

    #[test]
    fn the_server_is_the_flag_then_the_environment_then_the_saved_login() {
        let saved = login("https://davit.example.com", None);
        assert_eq!(choose_server(Some("http://a:1/"), Some("http://b:2"), Some(&saved)), "http://a:1");
        assert_eq!(choose_server(None, Some("http://b:2"), Some(&saved)), "http://b:2");
        assert_eq!(choose_server(None, None, Some(&saved)), "https://davit.example.com");
        assert_eq!(choose_server(None, None, None), DEFAULT_SERVER);
    }

    #[test]
    fn a_saved_token_is_used_only_for_its_own_server_and_while_valid() {
        let path = Path::new("/x/credentials.json");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let none = saved_token_for("http://a:1", None, path, now).unwrap_err().to_string();
        assert!(none.contains("run `davit login --url http://a:1`") && none.contains("/x/credentials.json"), "{none}");
        let other = login("http://b:2/", None);
        let refused = saved_token_for("http://a:1", Some(&other), path, now).unwrap_err().to_string();
        assert!(refused.contains("logged in to http://b:2/") && refused.contains("davit login --url http://a:1"), "{refused}");
        let expired = login("http://a:1", Some("2020-01-01T00:00:00Z"));
        assert!(saved_token_for("http://a:1", Some(&expired), path, now).unwrap_err().to_string().contains("expired"));
        let valid = login("http://a:1/", Some("2030-01-01T00:00:00Z"));
        assert_eq!(saved_token_for("http://a:1", Some(&valid), path, now).unwrap().token, "t");
    }

    #[test]
    fn saved_logins_are_private_and_round_trip() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("new-dir").join("credentials.json");
        assert_eq!(load(&path).unwrap(), None);
        let saved = login("http://a:1", Some("2030-01-01T00:00:00Z"));
        save(&path, &saved).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(load(&path).unwrap(), Some(saved.clone()));
        // Saving again replaces the file and keeps its mode.
        save(&path, &SavedLogin { token: "u".into(), ..saved }).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().token, "u");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(remove(&path).unwrap());
        assert!(!remove(&path).unwrap());
        std::fs::write(&path, "not json").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("davit login"));
    }
}
