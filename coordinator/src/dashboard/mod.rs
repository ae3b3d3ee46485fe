//! The web dashboard, served by every coordinator at `/`: server-rendered pages (the frame,
//! the structure, and what the caller's role allows, such as the approve button) filled and
//! kept live by one plain script (`assets/dashboard.js`) that reads the REST API with the
//! session cookie, follows the Server-Sent Events streams and polls the rest. It never reads
//! or writes state by itself beyond what a page needs to decide its buttons; every action goes
//! through the same `/api/v1` handlers, role checks and audit as any other client.
//! Flow: `browser -> GET /runs/7 -> dashboard::run_page (cookie -> Caller) -> HTML ->
//! dashboard.js -> /api/v1/... with the cookie (+ X-CSRF-Token on writes)`.

pub mod html;
pub mod pages;
pub mod session;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::api::AppState;
use crate::api::extract::{Caller, ClientAddress, Path, authenticate_token};
use crate::state::records::Role;

const SCRIPT: &str = include_str!("assets/dashboard.js");
const STYLES: &str = include_str!("assets/dashboard.css");

/// Headers on every page: no framing, no inline scripts or styles, nothing from elsewhere.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(pipelines_page))
        .route("/login", get(login_form).post(login_submit))
        .route("/logout", axum::routing::post(logout))
        .route("/runs/{id}", get(run_page))
        .route("/deployments/{id}", get(deployment_page))
        .route("/environments", get(environments_page))
        .route("/delivery", get(delivery_page))
        .route("/agents", get(agents_page))
        .route("/cluster", get(cluster_page))
        .route("/artifacts", get(artifacts_page))
        .route("/config", get(config_page))
        .route("/audit", get(audit_page))
        .route("/assets/dashboard.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/assets/dashboard.css", get(|| async { asset("text/css; charset=utf-8", STYLES) }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")], body).into_response()
}

fn html_response(status: StatusCode, body: String) -> Response {
    let mut response = (status, [(CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    let headers = response.headers_mut();
    headers.insert("content-security-policy", HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn redirect(to: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(location) = HeaderValue::from_str(to) {
        response.headers_mut().insert(LOCATION, location);
    }
    response
}

/// The logged-in caller of a page and their session, or the redirect to the login form (which
/// comes back here afterwards).
struct PageCaller {
    caller: Caller,
    csrf_token: String,
}

/// The way to the login form, coming back to the page asked for.
struct LoginNeeded(String);

impl IntoResponse for LoginNeeded {
    fn into_response(self) -> Response {
        redirect(&format!("/login?next={}", url::form_urlencoded::byte_serialize(self.0.as_bytes()).collect::<String>()))
    }
}

fn page_caller(state: &AppState, headers: &HeaderMap, uri: &Uri, source: Option<String>) -> Result<PageCaller, LoginNeeded> {
    let back = uri.path_and_query().map(|path| path.as_str()).unwrap_or("/");
    let login = || LoginNeeded(back.to_string());
    let session = session::session_token(headers).ok_or_else(login)?;
    let caller = authenticate_token(&state.node, &session, source).map_err(|_| login())?;
    Ok(PageCaller { csrf_token: session::csrf_token(&session), caller })
}

/// Render a page for a logged-in caller who has at least `needed`; others get a 403 page
/// that says which role it takes.
fn render(page_caller: &PageCaller, needed: Role, title: &str, page: &str, current: &str, data: &[(&str, String)], body: &str) -> Response {
    let viewer =
        html::Viewer { username: &page_caller.caller.username, role: page_caller.caller.role, csrf_token: &page_caller.csrf_token };
    if page_caller.caller.role < needed {
        let message = format!(
            "<p class=\"notice error\">This page needs the {} role; you are logged in as {} ({}). Ask an admin for access.</p>",
            crate::api::extract::role_name(needed),
            html::escape(&page_caller.caller.username),
            crate::api::extract::role_name(page_caller.caller.role)
        );
        return html_response(StatusCode::FORBIDDEN, html::page(title, "forbidden", current, &viewer, &[], &message));
    }
    html_response(StatusCode::OK, html::page(title, page, current, &viewer, data, body))
}

macro_rules! simple_page {
    ($name:ident, $needed:expr, $title:expr, $page:expr, $path:expr, $body:expr) => {
        async fn $name(State(state): State<AppState>, headers: HeaderMap, uri: Uri, source: ClientAddress) -> Response {
            match page_caller(&state, &headers, &uri, source.0) {
                Ok(page_caller) => render(&page_caller, $needed, $title, $page, $path, &[], &$body),
                Err(login) => login.into_response(),
            }
        }
    };
}

simple_page!(pipelines_page, Role::Viewer, "Pipelines", "pipelines", "/", pages::pipelines());
simple_page!(environments_page, Role::Viewer, "Environments", "environments", "/environments", pages::environments());
simple_page!(delivery_page, Role::Viewer, "Delivery metrics", "delivery", "/delivery", pages::delivery());
simple_page!(agents_page, Role::Viewer, "Agents", "agents", "/agents", pages::agents());
simple_page!(cluster_page, Role::Viewer, "Cluster", "cluster", "/cluster", pages::cluster());
simple_page!(artifacts_page, Role::Viewer, "Artifacts", "artifacts", "/artifacts", pages::artifacts());
simple_page!(config_page, Role::Viewer, "Configuration", "config", "/config", pages::configuration());
simple_page!(audit_page, Role::Admin, "Audit log", "audit", "/audit", pages::audit());

/// The deployment a page is about, after a read barrier (so a link followed right after a
/// create finds it), or the 404 page.
async fn page_deployment(state: &AppState, id: &str) -> Result<crate::state::records::Deployment, Response> {
    let not_found = || {
        html_response(
            StatusCode::NOT_FOUND,
            html::bare_page(
                "Not found",
                &format!("<h1>Not found</h1><p>There is no run {}. <a href=\"/\">Back to the pipelines</a></p>", html::escape(id)),
            ),
        )
    };
    let deployment_id = crate::api::extract::parse_id("id", id).map_err(|_| not_found())?;
    if let Err(error) = state.node.read_barrier().await {
        return Err(crate::api_error::ApiError::from(error).into_response());
    }
    match crate::state::apply::load_id(&state.node.state(), crate::store::Table::Deployments, deployment_id) {
        Ok(Some(deployment)) => Ok(deployment),
        Ok(None) => Err(not_found()),
        Err(error) => Err(crate::api_error::ApiError::from(error).into_response()),
    }
}

async fn run_page(State(state): State<AppState>, headers: HeaderMap, uri: Uri, source: ClientAddress, Path(id): Path<String>) -> Response {
    let page_caller = match page_caller(&state, &headers, &uri, source.0) {
        Ok(page_caller) => page_caller,
        Err(login) => return login.into_response(),
    };
    let deployment = match page_deployment(&state, &id).await {
        Ok(deployment) => deployment,
        Err(response) => return response,
    };
    let deployment_id = deployment.deployment_id;
    let data = [("deployment-id", deployment_id.to_string()), ("pipeline-id", deployment.pipeline_id.to_string())];
    render(&page_caller, Role::Viewer, &format!("Run {deployment_id}"), "run", "/", &data, &pages::run(deployment_id))
}

async fn deployment_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    source: ClientAddress,
    Path(id): Path<String>,
) -> Response {
    let page_caller = match page_caller(&state, &headers, &uri, source.0) {
        Ok(page_caller) => page_caller,
        Err(login) => return login.into_response(),
    };
    let deployment = match page_deployment(&state, &id).await {
        Ok(deployment) => deployment,
        Err(response) => return response,
    };
    let role = page_caller.caller.role;
    // The same rules as the API's handlers: approving takes a developer, cancelling and rolling
    // back the environment's role. A button the caller may not use is not rendered at all.
    let actions = pages::DeploymentActions {
        approve: role >= Role::Developer,
        cancel: role >= crate::api::deployments::environment_role(&deployment.environment),
        rollback: role >= crate::api::deployments::environment_role(&deployment.environment),
    };
    let deployment_id = deployment.deployment_id;
    let data = [("deployment-id", deployment_id.to_string()), ("environment", deployment.environment.clone())];
    render(
        &page_caller,
        Role::Viewer,
        &format!("Deployment {deployment_id}"),
        "deployment",
        "/",
        &data,
        &pages::deployment(deployment_id, &actions),
    )
}

async fn login_form(State(state): State<AppState>, headers: HeaderMap, uri: Uri) -> Response {
    let next = query_value(&uri, "next");
    // Someone already logged in goes straight on.
    if let Some(session) = session::session_token(&headers)
        && authenticate_token(&state.node, &session, None).is_ok()
    {
        return redirect(&session::safe_next(next.as_deref()));
    }
    html_response(StatusCode::OK, pages::login(next.as_deref(), "", None))
}

fn query_value(uri: &Uri, name: &str) -> Option<String> {
    url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// Whether a form post comes from this site: browsers send `Origin` with every POST, and a
/// login form posted from another site (login CSRF) names that site.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get("origin").and_then(|value| value.to_str().ok()) else {
        return true;
    };
    let host = headers.get("host").and_then(|value| value.to_str().ok()).unwrap_or_default();
    let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or_default();
    !host.is_empty() && origin_host == host
}

async fn login_submit(State(state): State<AppState>, headers: HeaderMap, source: ClientAddress, body: Bytes) -> Response {
    let mut username = String::new();
    let mut password = String::new();
    let mut next = None;
    for (key, value) in url::form_urlencoded::parse(&body) {
        match key.as_ref() {
            "username" => username = value.into_owned(),
            "password" => password = value.into_owned(),
            "next" => next = Some(value.into_owned()),
            _ => {}
        }
    }
    if !same_origin(&headers) {
        return html_response(
            StatusCode::FORBIDDEN,
            pages::login(next.as_deref(), &username, Some("This form was posted from another site.")),
        );
    }
    let request = crate::api::users::LoginRequest { username: username.clone(), password };
    match crate::api::users::log_in(&state, source.0, &request).await {
        Ok(token) => {
            let secure = state.node.config.tls.is_some();
            let mut response = redirect(&session::safe_next(next.as_deref()));
            if let Ok(cookie) = HeaderValue::from_str(&session::session_cookie(&token, crate::auth::TOKEN_LIFETIME_SECONDS, secure)) {
                response.headers_mut().insert(SET_COOKIE, cookie);
            }
            response
        }
        Err(error) => {
            let status = if error.status.is_client_error() { error.status } else { StatusCode::SERVICE_UNAVAILABLE };
            html_response(status, pages::login(next.as_deref(), &username, Some(&error.message)))
        }
    }
}

/// End the session: its login token is revoked on every node (a copy of the cookie taken
/// before no longer works), and the cookie is cleared.
async fn logout(State(state): State<AppState>, source: crate::api::extract::ClientAddress, headers: HeaderMap, body: Bytes) -> Response {
    let presented = url::form_urlencoded::parse(&body).find(|(key, _)| key == "csrf").map(|(_, value)| value.into_owned());
    if let Some(session) = session::session_token(&headers) {
        if !session::csrf_matches(&session, presented.as_deref().unwrap_or_default()) {
            return crate::api_error::ApiError::forbidden("log out with the page's Log out button (the form carries its CSRF token)")
                .into_response();
        }
        // A session that no longer authenticates (expired, or revoked already) has nothing to revoke.
        if let Ok(caller) = crate::api::extract::authenticate_token(&state.node, &session, source.0)
            && let Err(error) = crate::api::users::revoke_login_token(&state, &caller, &session).await
        {
            return error.into_response();
        }
    }
    let mut response = redirect("/login");
    if let Ok(cookie) = HeaderValue::from_str(&session::cleared_cookie(state.node.config.tls.is_some())) {
        response.headers_mut().insert(SET_COOKIE, cookie);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_same_origin_posts_are_taken() {
        let mut headers = HeaderMap::new();
        headers.insert("host", "127.0.0.1:7700".parse().unwrap());
        assert!(same_origin(&headers), "no Origin header: a non-browser client");
        headers.insert("origin", "http://127.0.0.1:7700".parse().unwrap());
        assert!(same_origin(&headers));
        headers.insert("origin", "https://evil.example".parse().unwrap());
        assert!(!same_origin(&headers));
        headers.insert("origin", "null".parse().unwrap());
        assert!(!same_origin(&headers));
    }
}
