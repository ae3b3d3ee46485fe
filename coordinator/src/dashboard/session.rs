//! The dashboard's session: a login token kept in an `HttpOnly`, `SameSite=Strict` cookie
//! (`Secure` when the node serves TLS), and the CSRF token derived from it. It owns only the
//! cookie's format and the CSRF check; who the token belongs to is decided by
//! `api::extract::authenticate_token`, exactly as for a bearer token.
//!
//! CSRF: a request authenticated by the cookie that changes something (any method but GET,
//! HEAD, OPTIONS) must carry `X-CSRF-Token: <csrf_token(session)>`. The value is the SHA-256 of
//! the session token under its own context, so it is unguessable without the cookie, which
//! scripts of other sites cannot read; pages carry it in `<meta name="csrf-token">` and the
//! logout form in a hidden field. `SameSite=Strict` already keeps browsers from sending the
//! cookie with other sites' requests; the header is the second, independent defence.

use axum::http::HeaderMap;
use axum::http::header::COOKIE;

use crate::api_error::ApiError;

/// Name of the cookie holding the session's login token.
pub const SESSION_COOKIE: &str = "davit_session";

/// The header a cookie-authenticated write must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The session token from the request's `Cookie` headers, if there is one.
pub fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, value)| *name == SESSION_COOKIE && !value.is_empty())
        .map(|(_, value)| value.trim_matches('"').to_string())
}

/// The CSRF token of a session: hex SHA-256 of the session token under a context of its own.
pub fn csrf_token(session: &str) -> String {
    crate::auth::token_hash(&format!("davit-dashboard-csrf\0{session}"))
}

/// Whether `presented` is the session's CSRF token (compared in constant time).
pub fn csrf_matches(session: &str, presented: &str) -> bool {
    use subtle::ConstantTimeEq;
    let expected = csrf_token(session);
    expected.len() == presented.len() && bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

/// 403 unless the request carries the session's CSRF token in [`CSRF_HEADER`].
pub fn check_csrf_header(headers: &HeaderMap, session: &str) -> Result<(), ApiError> {
    let presented = headers.get(CSRF_HEADER).and_then(|value| value.to_str().ok()).unwrap_or_default();
    if csrf_matches(session, presented) {
        Ok(())
    } else {
        Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "csrf_token_missing",
            "a request authenticated by the dashboard's session cookie that changes something must send the page's CSRF token \
             (<meta name=\"csrf-token\">) in the X-CSRF-Token header; scripts and tools should send `Authorization: Bearer <token>` instead",
        ))
    }
}

/// The `Set-Cookie` value that starts a session holding `token` for `max_age_seconds`.
pub fn session_cookie(token: &str, max_age_seconds: i64, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={token}; Path=/; Max-Age={max_age_seconds}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends the session.
pub fn cleared_cookie(secure: bool) -> String {
    session_cookie("", 0, secure)
}

/// Where to go after logging in: only a path of this site (`/runs/3`), never another origin
/// (`//evil.example`, `https://...`, `/\evil`), else the pipelines page.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(path)
            if path.starts_with('/')
                && !path.starts_with("//")
                && !path.contains('\\')
                && !path.chars().any(|c| c.is_control() || c.is_whitespace()) =>
        {
            path.to_string()
        }
        _ => "/".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_token_is_read_from_any_cookie_header() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, "theme=dark; davit_session=abc.def.ghi".parse().unwrap());
        assert_eq!(session_token(&headers).as_deref(), Some("abc.def.ghi"));
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, "a=1".parse().unwrap());
        headers.append(COOKIE, "davit_session=tok".parse().unwrap());
        assert_eq!(session_token(&headers).as_deref(), Some("tok"));
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, "davit_session=; other_davit_session=x".parse().unwrap());
        assert_eq!(session_token(&headers), None);
    }

    #[test]
    fn csrf_tokens_belong_to_their_session() {
        let token = csrf_token("session-a");
        assert_eq!(token.len(), 64);
        assert!(csrf_matches("session-a", &token));
        assert!(!csrf_matches("session-b", &token));
        assert!(!csrf_matches("session-a", ""));
        assert!(!csrf_matches("session-a", &token[..63]));
        let mut headers = HeaderMap::new();
        assert_eq!(check_csrf_header(&headers, "session-a").unwrap_err().status, axum::http::StatusCode::FORBIDDEN);
        headers.insert(CSRF_HEADER, token.parse().unwrap());
        assert!(check_csrf_header(&headers, "session-a").is_ok());
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_under_tls() {
        assert_eq!(session_cookie("t", 3600, false), "davit_session=t; Path=/; Max-Age=3600; HttpOnly; SameSite=Strict");
        assert!(session_cookie("t", 3600, true).ends_with("; Secure"));
        assert!(cleared_cookie(false).starts_with("davit_session=; Path=/; Max-Age=0;"));
    }

    #[test]
    fn only_local_paths_are_followed_after_login() {
        assert_eq!(safe_next(Some("/runs/3?x=1")), "/runs/3?x=1");
        for bad in ["//evil.example", "https://evil.example", "/\\evil.example", "runs/3", "/a b", "/a\nb"] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }
}
