//! The exit statuses of every `davit` command, in one place, so that scripts can rely on them:
//! 0 done; 1 the API refused or failed the request (its status, message and code are printed),
//! or anything else went wrong; 2 usage (clap's own errors, a bad value, no login); 3 a followed
//! deployment failed; 4 it was rolled back; 5 the server could not be reached.

/// Exit statuses (see the module documentation).
pub mod exit_status {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const DEPLOYMENT_FAILED: i32 = 3;
    pub const DEPLOYMENT_ROLLED_BACK: i32 = 4;
    pub const UNREACHABLE: i32 = 5;
}

/// The text of `--help` about exit statuses.
pub const EXIT_STATUS_HELP: &str = "Exit status: 0 done; 1 the API refused or failed the request (or another error); \
2 usage error or not logged in (run `davit login`); 3 a followed deployment failed; 4 it was rolled back; \
5 the server could not be reached.";

/// Failures with an exit status of their own; anything else exits 1.
#[derive(Debug, thiserror::Error)]
pub enum CliFailure {
    /// A value the command cannot use, or no credentials: nothing was sent.
    #[error("{0}")]
    Usage(String),
    /// No connection to the server (refused, no route, name not found, timed out).
    #[error("cannot reach {server}: {reason}; check the URL (--url, DAVIT_URL or `davit login --url`) and that a node runs there")]
    Unreachable { server: String, reason: String },
}

/// The exit status for an error returned by a command.
pub fn exit_status_of(error: &anyhow::Error) -> i32 {
    match error.chain().find_map(|cause| cause.downcast_ref::<CliFailure>()) {
        Some(CliFailure::Usage(_)) => exit_status::USAGE,
        Some(CliFailure::Unreachable { .. }) => exit_status::UNREACHABLE,
        None => exit_status::ERROR,
    }
}

/// A failed `send()`: unreachable when no connection was made (or it timed out), else the error.
pub fn send_failure(server: &str, error: reqwest::Error) -> anyhow::Error {
    if error.is_connect() || error.is_timeout() {
        // reqwest's own text says only "error sending request"; the cause says why.
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            reason = cause.to_string();
            source = cause.source();
        }
        return CliFailure::Unreachable { server: server.to_string(), reason }.into();
    }
    anyhow::Error::new(error).context(format!("cannot reach {server}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn failures_map_to_their_exit_statuses_through_context() {
        let usage: anyhow::Error = CliFailure::Usage("no".into()).into();
        assert_eq!(exit_status_of(&usage), exit_status::USAGE);
        let unreachable: anyhow::Result<()> = Err(CliFailure::Unreachable { server: "http://a".into(), reason: "refused".into() }.into());
        let wrapped = unreachable.context("listing pipelines").unwrap_err();
        assert_eq!(exit_status_of(&wrapped), exit_status::UNREACHABLE);
        assert_eq!(exit_status_of(&anyhow::anyhow!("404 Not Found: pipeline 9 not found")), exit_status::ERROR);
    }
}
