//! The REST API end to end against a real `davit up` process: for every endpoint, the success
//! case with the seed's own request bodies, a validation failure (400 naming the field), 401
//! without or with a bad credential, 403 for a role that may not do it, and 404. Each test owns
//! one node (tests run in parallel threads, each on its own loopback address).

#[allow(dead_code)]
mod single_node;

use std::collections::BTreeSet;

use hmac::{KeyInit, Mac};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;
use single_node::{ADMIN_USERNAME, SingleNode, expect_field_error, expect_status};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/webhooks");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{name}")).unwrap_or_else(|error| panic!("read the fixture {FIXTURES}/{name}: {error}"))
}

fn hmac_sha256_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    mac.finalize().into_bytes().iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Every item of a list endpoint, following `next_cursor` with pages of `limit`; checks that
/// every page but the last is full and that no item comes twice.
async fn walk(node: &SingleNode, path: &str, token: &str, limit: usize, id_field: &str) -> Vec<Value> {
    let mut items: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    let separator = if path.contains('?') { '&' } else { '?' };
    for _ in 0..1000 {
        let url = match &cursor {
            Some(cursor) => format!("{path}{separator}limit={limit}&cursor={cursor}"),
            None => format!("{path}{separator}limit={limit}"),
        };
        let reply = node.get(&url, token).await;
        expect_status(&reply, 200, &format!("GET {url}"));
        let page = reply.json["items"].as_array().expect("items").clone();
        assert!(page.len() <= limit, "GET {url} returned {} items for limit {limit}", page.len());
        items.extend(page.iter().cloned());
        match reply.json["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(page.len(), limit, "GET {url}: a page with a next_cursor must be full");
                cursor = Some(next.to_string());
            }
            None => {
                assert!(reply.json["next_cursor"].is_null(), "GET {url}: next_cursor is neither a string nor null");
                let ids: BTreeSet<u64> = items.iter().map(|item| item[id_field].as_u64().expect("an id")).collect();
                assert_eq!(ids.len(), items.len(), "GET {path}: an item came twice while paging");
                return items;
            }
        }
    }
    panic!("GET {path}: paging did not end");
}

fn ids(items: &[Value], field: &str) -> BTreeSet<u64> {
    items.iter().map(|item| item[field].as_u64().expect("an id")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_users_tokens_and_lockout() {
    let node = SingleNode::start("api-auth").await;
    let admin = node.admin_token.clone();

    // The seed's login body, for a user that exists.
    let created = node
        .post(
            "/api/v1/users",
            &admin,
            &json!({"username": "john_doe", "email": "john@example.com", "password": "your_password", "role": "developer"}),
        )
        .await;
    expect_status(&created, 201, "create john_doe");
    let john_id = created.json["user_id"].as_u64().expect("user_id");
    assert_eq!(created.json["role"], "developer");
    assert!(
        created.json.get("password").is_none() && created.json.get("password_hash").is_none(),
        "the password leaks: {}",
        created.text()
    );
    let login =
        node.call(Method::POST, "/api/v1/auth/login", None, Some(&json!({"username": "john_doe", "password": "your_password"}))).await;
    expect_status(&login, 200, "the seed's login");
    let john = login.json["token"].as_str().expect("token").to_string();
    assert_eq!(john.split('.').count(), 3, "the token is a JWT: {john}");
    assert_eq!(login.json["expires_in"], 3600);

    // Login failures.
    let wrong =
        node.call(Method::POST, "/api/v1/auth/login", None, Some(&json!({"username": "john_doe", "password": "wrong_password"}))).await;
    expect_status(&wrong, 401, "wrong password");
    assert_eq!(wrong.error_code(), Some("unauthorized"));
    let unknown =
        node.call(Method::POST, "/api/v1/auth/login", None, Some(&json!({"username": "nobody", "password": "your_password"}))).await;
    expect_status(&unknown, 401, "unknown user");
    let empty = node.call(Method::POST, "/api/v1/auth/login", None, Some(&json!({"username": "", "password": "x"}))).await;
    expect_field_error(&empty, "username", "empty username");
    let missing = node.call(Method::POST, "/api/v1/auth/login", None, Some(&json!({"username": "john_doe"}))).await;
    expect_status(&missing, 400, "login without a password");
    let typed = node.call(Method::POST, "/api/v1/auth/login", None, Some(&json!({"username": 5, "password": "x"}))).await;
    expect_field_error(&typed, "username", "a number as username");

    // auth/me with every kind of credential.
    let me = node.get("/api/v1/auth/me", &john).await;
    expect_status(&me, 200, "me");
    assert_eq!(me.json["username"], "john_doe");
    assert_eq!(me.json["user_id"], john_id);
    expect_status(&node.call(Method::GET, "/api/v1/auth/me", None, None).await, 401, "me without a token");
    expect_status(&node.get("/api/v1/auth/me", "not-a-jwt").await, 401, "me with garbage");
    expect_status(&node.get("/api/v1/auth/me", "davit_not-a-real-token").await, 401, "me with an unknown API token");
    let basic = node.send(node.client.get(node.url("/api/v1/auth/me")).header("authorization", "Basic am9objpwdw==")).await;
    expect_status(&basic, 401, "me with Basic auth");
    assert_eq!(basic.error_code(), Some("unauthorized"));

    // Logout ends that login token, and only that one: another login of the same user still works.
    let second = node.login("john_doe", "your_password").await;
    expect_status(&node.call(Method::POST, "/api/v1/auth/logout", Some(&second), None).await, 204, "logout");
    let after = node.get("/api/v1/auth/me", &second).await;
    expect_status(&after, 401, "a logged-out token");
    assert!(after.text().contains("logout"), "the refusal says why: {}", after.text());
    expect_status(&node.call(Method::POST, "/api/v1/auth/logout", Some(&second), None).await, 401, "logging out twice");
    expect_status(&node.get("/api/v1/auth/me", &john).await, 200, "the other login of john_doe");
    expect_status(&node.call(Method::POST, "/api/v1/auth/logout", None, None).await, 401, "logout without a token");
    // The dashboard's logout revokes its session's token as well; the form must carry the CSRF token.
    let third = node.login("john_doe", "your_password").await;
    let cookie = format!("davit_session={third}");
    let forged =
        node.client.post(node.url("/logout")).header("cookie", &cookie).header("content-type", "application/x-www-form-urlencoded");
    expect_status(&node.send(forged.body("csrf=wrong")).await, 403, "a dashboard logout without the page's CSRF token");
    expect_status(&node.get("/api/v1/auth/me", &third).await, 200, "a refused logout leaves the session");
    let csrf = davit_coordinator::dashboard::session::csrf_token(&third);
    let form = node.client.post(node.url("/logout")).header("cookie", &cookie).header("content-type", "application/x-www-form-urlencoded");
    let dashboard_logout = node.send(form.body(format!("csrf={csrf}"))).await;
    // It redirects to the login page (which the client follows).
    assert!([200, 303].contains(&dashboard_logout.status), "the dashboard logout: {}", dashboard_logout.text());
    expect_status(&node.get("/api/v1/auth/me", &third).await, 401, "the dashboard session's token after its logout");

    let (viewer_id, viewer) = node.create_user("vera_viewer", "viewer-password", "viewer").await;
    let (other_id, other_dev) = node.create_user("dev_two", "developer-two", "developer").await;

    // Users: list.
    let users = node.get("/api/v1/users", &admin).await;
    expect_status(&users, 200, "list users");
    let names: Vec<&str> = users.json["items"].as_array().unwrap().iter().filter_map(|user| user["username"].as_str()).collect();
    assert!(names.contains(&"john_doe") && names.contains(&ADMIN_USERNAME), "{names:?}");
    expect_status(&node.get("/api/v1/users", &john).await, 403, "a developer lists users");
    expect_status(&node.get("/api/v1/users", &viewer).await, 403, "a viewer lists users");
    expect_status(&node.call(Method::GET, "/api/v1/users", None, None).await, 401, "list users without a token");
    expect_field_error(&node.get("/api/v1/users?limit=0", &admin).await, "limit", "limit 0");
    expect_field_error(&node.get("/api/v1/users?limit=abc", &admin).await, "limit", "limit abc");

    // Users: create, validation.
    let base = json!({"username": "new_user", "email": "new@example.com", "password": "long-enough", "role": "viewer"});
    let with = |field: &str, value: Value| {
        let mut body = base.clone();
        body[field] = value;
        body
    };
    for (field, value) in [
        ("email", json!("not-an-email")),
        ("password", json!("short")),
        ("username", json!("john doe")),
        ("role", json!("superuser")),
        ("username", json!(12)),
    ] {
        expect_field_error(
            &node.post("/api/v1/users", &admin, &with(field, value.clone())).await,
            field,
            &format!("user with {field} = {value}"),
        );
    }
    expect_status(&node.post("/api/v1/users", &admin, &with("nickname", json!("x"))).await, 400, "an unknown field");
    expect_status(&node.post("/api/v1/users", &admin, &with("username", json!("john_doe"))).await, 409, "a taken username");
    expect_status(&node.post("/api/v1/users", &john, &base).await, 403, "a developer creates a user");
    expect_status(&node.post("/api/v1/users", &viewer, &base).await, 403, "a viewer creates a user");
    expect_status(&node.call(Method::POST, "/api/v1/users", None, Some(&base)).await, 401, "create a user without a token");

    // Users: get, in every id form.
    for path in [format!("/api/v1/users/{john_id}"), format!("/api/v1/users/user{john_id}")] {
        let reply = node.get(&path, &admin).await;
        expect_status(&reply, 200, &path);
        assert_eq!(reply.json["username"], "john_doe");
    }
    expect_status(&node.get(&format!("/api/v1/users/{john_id}"), &john).await, 200, "a user reads themself");
    expect_status(&node.get(&format!("/api/v1/users/{other_id}"), &john).await, 403, "a developer reads another user");
    expect_status(&node.get("/api/v1/users/999999", &admin).await, 404, "an unknown user");
    expect_field_error(&node.get("/api/v1/users/abc", &admin).await, "id", "a malformed user id");
    expect_status(&node.call(Method::GET, &format!("/api/v1/users/{john_id}"), None, None).await, 401, "get a user without a token");

    // Users: update.
    let updated = node.put(&format!("/api/v1/users/{john_id}"), &john, &json!({"email": "john.doe@example.com"})).await;
    expect_status(&updated, 200, "a user changes their email");
    assert_eq!(updated.json["email"], "john.doe@example.com");
    expect_status(
        &node.put(&format!("/api/v1/users/{john_id}"), &john, &json!({"role": "admin"})).await,
        403,
        "a developer promotes themself",
    );
    expect_status(
        &node.put(&format!("/api/v1/users/{other_id}"), &john, &json!({"email": "x@example.com"})).await,
        403,
        "a developer edits another user",
    );
    let promoted = node.put(&format!("/api/v1/users/{viewer_id}"), &admin, &json!({"role": "developer"})).await;
    expect_status(&promoted, 200, "an admin changes a role");
    assert_eq!(promoted.json["role"], "developer");
    let me = node.get("/api/v1/auth/me", &admin).await;
    let admin_id = me.json["user_id"].as_u64().unwrap();
    expect_status(
        &node.put(&format!("/api/v1/users/{admin_id}"), &admin, &json!({"role": "viewer"})).await,
        403,
        "an admin demotes themself",
    );
    expect_field_error(
        &node.put(&format!("/api/v1/users/{john_id}"), &admin, &json!({"email": "bad email@x"})).await,
        "email",
        "bad email",
    );
    expect_status(&node.put("/api/v1/users/999999", &admin, &json!({"email": "z@example.com"})).await, 404, "update an unknown user");
    expect_status(
        &node.call(Method::PUT, &format!("/api/v1/users/{john_id}"), None, Some(&json!({}))).await,
        401,
        "update without a token",
    );
    // The viewer who became a developer now acts as one.
    let vera = node.login("vera_viewer", "viewer-password").await;
    expect_status(&node.get(&format!("/api/v1/users/{viewer_id}"), &vera).await, 200, "vera reads herself");

    // Users: delete.
    let (doomed_id, doomed) = node.create_user("short_lived", "short-lived-pw", "developer").await;
    expect_status(&node.delete(&format!("/api/v1/users/{doomed_id}"), &john).await, 403, "a developer deletes a user");
    expect_status(&node.delete(&format!("/api/v1/users/{admin_id}"), &admin).await, 403, "an admin deletes themself");
    expect_status(&node.delete(&format!("/api/v1/users/{doomed_id}"), &admin).await, 204, "an admin deletes a user");
    expect_status(&node.delete(&format!("/api/v1/users/{doomed_id}"), &admin).await, 404, "delete it again");
    expect_status(&node.get("/api/v1/auth/me", &doomed).await, 401, "a deleted user's token");
    expect_status(&node.call(Method::DELETE, &format!("/api/v1/users/{other_id}"), None, None).await, 401, "delete without a token");

    // API tokens.
    let created = node.post("/api/v1/tokens", &john, &json!({"name": "ci-token", "expires_in_days": 30})).await;
    expect_status(&created, 201, "create an API token");
    let api_token = created.json["token"].as_str().expect("token").to_string();
    let token_id = created.json["token_id"].as_u64().expect("token_id");
    assert!(api_token.starts_with("davit_"), "{api_token}");
    assert!(created.json["expires_at"].is_string(), "{}", created.text());
    let me = node.get("/api/v1/auth/me", &api_token).await;
    expect_status(&me, 200, "me with the API token");
    assert_eq!(me.json["username"], "john_doe");
    let listed = node.get("/api/v1/tokens", &john).await;
    expect_status(&listed, 200, "list own tokens");
    assert!(ids(listed.json["items"].as_array().unwrap(), "token_id").contains(&token_id));
    assert!(listed.json["items"].to_string().find("davit_").is_none(), "the list shows a token's secret: {}", listed.text());
    let others = node.get("/api/v1/tokens", &other_dev).await;
    assert!(!ids(others.json["items"].as_array().unwrap(), "token_id").contains(&token_id), "another developer sees john's token");
    assert!(ids(node.get("/api/v1/tokens", &admin).await.json["items"].as_array().unwrap(), "token_id").contains(&token_id));
    expect_field_error(&node.post("/api/v1/tokens", &john, &json!({"name": ""})).await, "name", "an empty token name");
    expect_field_error(&node.post("/api/v1/tokens", &john, &json!({"name": "x", "expires_in_days": 0})).await, "expires_in_days", "0 days");
    expect_status(&node.call(Method::POST, "/api/v1/tokens", None, Some(&json!({"name": "x"}))).await, 401, "create a token without auth");
    expect_status(&node.call(Method::GET, "/api/v1/tokens", None, None).await, 401, "list tokens without auth");
    expect_status(&node.delete(&format!("/api/v1/tokens/{token_id}"), &other_dev).await, 403, "revoke another user's token");
    expect_status(&node.delete("/api/v1/tokens/999999", &john).await, 404, "revoke an unknown token");
    expect_field_error(&node.delete("/api/v1/tokens/abc", &john).await, "id", "a malformed token id");
    expect_status(&node.delete(&format!("/api/v1/tokens/{token_id}"), &john).await, 204, "revoke own token");
    expect_status(&node.get("/api/v1/auth/me", &api_token).await, 401, "a revoked token");
    expect_status(&node.delete(&format!("/api/v1/tokens/{token_id}"), &john).await, 404, "revoke it again");

    // Lockout: ten failures for one account, then even the right password gets 429 for a while.
    node.create_user("locked_out", "the-right-password", "viewer").await;
    for attempt in 1..=10 {
        let reply =
            node.call(Method::POST, "/api/v1/auth/login", None, Some(&json!({"username": "locked_out", "password": "guess"}))).await;
        expect_status(&reply, 401, &format!("failed login {attempt}"));
    }
    let locked = node
        .call(Method::POST, "/api/v1/auth/login", None, Some(&json!({"username": "locked_out", "password": "the-right-password"})))
        .await;
    expect_status(&locked, 429, "the eleventh login");
    assert_eq!(locked.error_code(), Some("too_many_failed_logins"));
    let retry_after: u64 = locked
        .headers
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("429 without a numeric Retry-After: {:?}", locked.headers));
    assert!((1..=900).contains(&retry_after), "Retry-After {retry_after}");
    // Only that account is locked.
    node.login("john_doe", "your_password").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repositories_and_signed_webhooks() {
    let node = SingleNode::start("api-repos").await;
    let (_, developer) = node.create_user("dev", "developer-pw", "developer").await;
    let (_, viewer) = node.create_user("viewer", "viewer-pw-1", "viewer").await;

    // Connect with the seed's body.
    let seed = json!({"repo_url": "https://github.com/org/repo", "branch": "main", "scm_type": "github", "webhook_secret": "secret_key"});
    let connected = node.post("/api/v1/repos/connect", &developer, &seed).await;
    expect_status(&connected, 201, "connect the seed's repository");
    let repo_id = connected.json["repo_id"].as_u64().expect("repo_id");
    assert_eq!(connected.json["repo_url"], "https://github.com/org/repo");
    assert_eq!(connected.json["name"], "repo");
    assert_eq!(connected.json["branch"], "main");
    assert_eq!(connected.json["scm_type"], "github");
    assert_eq!(connected.json["webhook_secret"], "***", "the secret is masked");
    assert!(!connected.text().contains("secret_key"));
    expect_status(&node.post("/api/v1/repos/connect", &developer, &seed).await, 409, "the same URL twice");
    expect_status(&node.post("/api/v1/repos/connect", &viewer, &seed).await, 403, "a viewer connects");
    expect_status(&node.call(Method::POST, "/api/v1/repos/connect", None, Some(&seed)).await, 401, "connect without a token");
    for (field, value) in [
        ("repo_url", json!("not a url")),
        ("repo_url", json!("ftp://example.com/org/repo")),
        ("scm_type", json!("svn")),
        ("branch", json!("bad..branch")),
        ("webhook_secret", json!("x".repeat(101))),
        ("name", json!("   ")),
    ] {
        let mut body = seed.clone();
        body["repo_url"] = json!("https://github.com/org/other");
        body[field] = value.clone();
        expect_field_error(&node.post("/api/v1/repos/connect", &developer, &body).await, field, &format!("connect with {field} = {value}"));
    }
    expect_status(
        &node.post("/api/v1/repos/connect", &developer, &json!({"branch": "main", "scm_type": "github"})).await,
        400,
        "no repo_url",
    );

    // List, get.
    let listed = node.get("/api/v1/repos", &viewer).await;
    expect_status(&listed, 200, "a viewer lists repositories");
    assert!(ids(listed.json["items"].as_array().unwrap(), "repo_id").contains(&repo_id));
    assert!(!listed.text().contains("secret_key"));
    expect_status(&node.call(Method::GET, "/api/v1/repos", None, None).await, 401, "list without a token");
    for path in [format!("/api/v1/repos/{repo_id}"), format!("/api/v1/repos/repo{repo_id}")] {
        let reply = node.get(&path, &viewer).await;
        expect_status(&reply, 200, &path);
        assert_eq!(reply.json["repo_id"], repo_id);
    }
    expect_status(&node.get("/api/v1/repos/999999", &viewer).await, 404, "an unknown repository");
    expect_field_error(&node.get("/api/v1/repos/abc", &viewer).await, "id", "a malformed repository id");
    expect_status(&node.call(Method::GET, &format!("/api/v1/repos/{repo_id}"), None, None).await, 401, "get without a token");

    // Update.
    let updated = node.put(&format!("/api/v1/repos/{repo_id}"), &developer, &json!({"branch": "develop", "name": "the-repo"})).await;
    expect_status(&updated, 200, "update a repository");
    assert_eq!(updated.json["branch"], "develop");
    assert_eq!(updated.json["name"], "the-repo");
    assert_eq!(updated.json["webhook_secret"], "***", "the secret survives an update");
    expect_field_error(
        &node.put(&format!("/api/v1/repos/{repo_id}"), &developer, &json!({"branch": "-x"})).await,
        "branch",
        "a bad branch",
    );
    expect_status(&node.put("/api/v1/repos/999999", &developer, &json!({"branch": "main"})).await, 404, "update an unknown repository");
    expect_status(&node.put(&format!("/api/v1/repos/{repo_id}"), &viewer, &json!({"branch": "main"})).await, 403, "a viewer updates");
    expect_status(
        &node.call(Method::PUT, &format!("/api/v1/repos/{repo_id}"), None, Some(&json!({}))).await,
        401,
        "update without a token",
    );

    // Delete.
    expect_status(&node.delete(&format!("/api/v1/repos/{repo_id}"), &viewer).await, 403, "a viewer deletes");
    expect_status(&node.call(Method::DELETE, &format!("/api/v1/repos/{repo_id}"), None, None).await, 401, "delete without a token");
    expect_status(&node.delete(&format!("/api/v1/repos/{repo_id}"), &developer).await, 204, "delete");
    expect_status(&node.delete(&format!("/api/v1/repos/{repo_id}"), &developer).await, 404, "delete again");
    expect_status(&node.get(&format!("/api/v1/repos/{repo_id}"), &developer).await, 404, "get a deleted repository");

    // GitHub webhook, signed over the fixture's exact bytes, for the repository the payload names.
    let github_body = fixture("github-push.json");
    let payload: Value = serde_json::from_slice(&github_body).expect("the fixture is JSON");
    let github_url = payload["repository"]["html_url"].as_str().expect("repository.html_url").to_string();
    let github_secret = "gh-webhook-secret-42";
    let connected = node
        .post("/api/v1/repos/connect", &developer, &json!({"repo_url": github_url, "scm_type": "github", "webhook_secret": github_secret}))
        .await;
    expect_status(&connected, 201, "connect the fixture's GitHub repository");
    let github_repo = connected.json["repo_id"].as_u64().unwrap();
    let deliver = |body: Vec<u8>, headers: Vec<(&'static str, String)>| {
        let mut request = node.client.post(node.url("/api/v1/repos/webhook")).header("content-type", "application/json").body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        node.send(request)
    };
    let github_headers = |signature: String| {
        vec![
            ("x-github-event", "push".to_string()),
            ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_string()),
            ("x-hub-signature-256", signature),
        ]
    };
    let good = format!("sha256={}", hmac_sha256_hex(github_secret, &github_body));
    let accepted = deliver(github_body.clone(), github_headers(good.clone())).await;
    expect_status(&accepted, 202, "a correctly signed GitHub push");
    assert_eq!(accepted.json["repo_id"], github_repo);
    assert_eq!(accepted.json["event"], "push");
    assert_eq!(accepted.json["delivery"], "72d3162e-cc78-11e3-81ab-4c9367dc0958");
    let wrong = format!("sha256={}", hmac_sha256_hex("not-the-secret", &github_body));
    expect_status(&deliver(github_body.clone(), github_headers(wrong)).await, 401, "signed with another secret");
    let mut altered = github_body.clone();
    altered.insert(altered.len() - 2, b' ');
    expect_status(&deliver(altered, github_headers(good.clone())).await, 401, "a body changed after signing");
    expect_status(&deliver(github_body.clone(), vec![("x-github-event", "push".into())]).await, 401, "no signature");
    expect_status(&deliver(github_body.clone(), github_headers("sha1=abc".into())).await, 401, "a malformed signature");
    expect_status(&deliver(b"this is not json".to_vec(), github_headers(good.clone())).await, 400, "a body that is not JSON");
    expect_status(&deliver(b"[1, 2]".to_vec(), github_headers(good.clone())).await, 400, "a body that is not an object");
    let bitbucket = fixture("bitbucket-repo-push.json");
    expect_status(
        &deliver(
            bitbucket.clone(),
            vec![("x-event-key", "repo:push".into()), ("x-hub-signature", format!("sha256={}", hmac_sha256_hex("x", &bitbucket)))],
        )
        .await,
        404,
        "a payload for a repository nobody connected",
    );

    // GitLab: the token header is the secret itself.
    let gitlab_body = fixture("gitlab-push.json");
    let payload: Value = serde_json::from_slice(&gitlab_body).expect("the fixture is JSON");
    let gitlab_url = payload["project"]["web_url"].as_str().expect("project.web_url").to_string();
    let connected = node
        .post(
            "/api/v1/repos/connect",
            &developer,
            &json!({"repo_url": gitlab_url, "scm_type": "gitlab", "webhook_secret": "gl-hook-token"}),
        )
        .await;
    expect_status(&connected, 201, "connect the fixture's GitLab project");
    let gitlab_repo = connected.json["repo_id"].as_u64().unwrap();
    let accepted =
        deliver(gitlab_body.clone(), vec![("x-gitlab-event", "Push Hook".into()), ("x-gitlab-token", "gl-hook-token".into())]).await;
    expect_status(&accepted, 202, "a GitLab push with the right token");
    assert_eq!(accepted.json["repo_id"], gitlab_repo);
    assert_eq!(accepted.json["event"], "Push Hook");
    expect_status(
        &deliver(gitlab_body.clone(), vec![("x-gitlab-event", "Push Hook".into()), ("x-gitlab-token", "gl-hook-tokeN".into())]).await,
        401,
        "a GitLab push with a wrong token",
    );
    expect_status(&deliver(gitlab_body, vec![("x-gitlab-event", "Push Hook".into())]).await, 401, "a GitLab push without a token");

    // Removing the secret makes the repository refuse every delivery.
    let cleared = node.put(&format!("/api/v1/repos/{github_repo}"), &developer, &json!({"webhook_secret": ""})).await;
    expect_status(&cleared, 200, "remove the webhook secret");
    assert!(cleared.json["webhook_secret"].is_null(), "{}", cleared.text());
    expect_status(&deliver(github_body, github_headers(good)).await, 401, "a repository without a secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelines_deployments_logs_and_metrics() {
    let node = SingleNode::start("api-pipelines").await;
    let admin = node.admin_token.clone();
    let (developer_id, developer) = node.create_user("dev", "developer-pw", "developer").await;
    let (_, viewer) = node.create_user("viewer", "viewer-pw-1", "viewer").await;
    let repo = node
        .post(
            "/api/v1/repos/connect",
            &developer,
            &json!({"repo_url": "https://github.com/org/repo", "branch": "main", "scm_type": "github", "webhook_secret": "secret_key"}),
        )
        .await;
    let repo_id = repo.json["repo_id"].as_u64().expect("repo_id");

    // Pipelines: create with the seed's body, the repository id in the seed's "repo1" form.
    let seed = json!({"name": "production-pipeline", "repo_id": format!("repo{repo_id}"), "branch": "main", "build_command": "mvn clean package", "deploy_strategy": "blue-green"});
    let created = node.post("/api/v1/pipelines", &developer, &seed).await;
    expect_status(&created, 201, "create the seed's pipeline");
    let pipeline_id = created.json["pipeline_id"].as_u64().expect("pipeline_id");
    assert_eq!(created.json["repo_id"], repo_id);
    assert_eq!(created.json["deploy_strategy"], "blue-green");
    assert_eq!(created.json["build_command"], "mvn clean package");
    assert_eq!(created.json["environment"], "development", "the seed's default environment");
    assert_eq!(created.json["is_active"], true);
    let numeric = node
        .post(
            "/api/v1/pipelines",
            &developer,
            &json!({"name": "staging-pipeline", "repo_id": repo_id, "deploy_strategy": "canary", "environment": "staging"}),
        )
        .await;
    expect_status(&numeric, 201, "a pipeline with a numeric repo_id");
    let staging_pipeline = numeric.json["pipeline_id"].as_u64().unwrap();
    expect_status(&node.post("/api/v1/pipelines", &developer, &seed).await, 409, "the same name twice in a repository");
    expect_status(&node.post("/api/v1/pipelines", &viewer, &seed).await, 403, "a viewer creates a pipeline");
    expect_status(&node.call(Method::POST, "/api/v1/pipelines", None, Some(&seed)).await, 401, "create without a token");
    let mut unknown_repo = seed.clone();
    unknown_repo["repo_id"] = json!(999_999);
    expect_status(&node.post("/api/v1/pipelines", &developer, &unknown_repo).await, 404, "an unknown repository");
    for (field, value) in [
        ("deploy_strategy", json!("big-bang")),
        ("repo_id", json!("abc")),
        ("repo_id", json!(0)),
        ("environment", json!("Prod!")),
        ("name", json!("")),
        ("branch", json!("a b")),
        ("build_command", json!("x".repeat(10_001))),
    ] {
        let mut body = seed.clone();
        body["name"] = json!("another");
        body[field] = value.clone();
        expect_field_error(&node.post("/api/v1/pipelines", &developer, &body).await, field, &format!("pipeline with {field} = {value}"));
    }
    expect_status(&node.post("/api/v1/pipelines", &developer, &json!({"name": "x", "repo_id": repo_id})).await, 400, "no deploy_strategy");

    // List, get, update.
    let listed = node.get(&format!("/api/v1/pipelines?repo_id=repo{repo_id}"), &viewer).await;
    expect_status(&listed, 200, "list a repository's pipelines");
    assert_eq!(ids(listed.json["items"].as_array().unwrap(), "pipeline_id"), BTreeSet::from([pipeline_id, staging_pipeline]));
    expect_field_error(&node.get("/api/v1/pipelines?repo_id=x", &viewer).await, "repo_id", "a malformed repo_id filter");
    expect_status(&node.call(Method::GET, "/api/v1/pipelines", None, None).await, 401, "list without a token");
    let got = node.get(&format!("/api/v1/pipelines/pipeline{pipeline_id}"), &viewer).await;
    expect_status(&got, 200, "get in the seed's id form");
    assert_eq!(got.json["name"], "production-pipeline");
    expect_status(&node.get("/api/v1/pipelines/999999", &viewer).await, 404, "an unknown pipeline");
    expect_field_error(&node.get("/api/v1/pipelines/0", &viewer).await, "pipelineId", "pipeline id 0");
    let updated = node
        .put(
            &format!("/api/v1/pipelines/{pipeline_id}"),
            &developer,
            &json!({"build_command": "mvn -B clean package", "deploy_strategy": "rolling"}),
        )
        .await;
    expect_status(&updated, 200, "update a pipeline");
    assert_eq!(updated.json["build_command"], "mvn -B clean package");
    assert_eq!(updated.json["deploy_strategy"], "rolling");
    expect_field_error(
        &node.put(&format!("/api/v1/pipelines/{pipeline_id}"), &developer, &json!({"deploy_strategy": "yolo"})).await,
        "deploy_strategy",
        "a bad strategy",
    );
    expect_status(&node.put("/api/v1/pipelines/999999", &developer, &json!({"is_active": true})).await, 404, "update an unknown pipeline");
    expect_status(
        &node.put(&format!("/api/v1/pipelines/{pipeline_id}"), &viewer, &json!({"is_active": true})).await,
        403,
        "a viewer updates",
    );
    expect_status(
        &node.call(Method::PUT, &format!("/api/v1/pipelines/{pipeline_id}"), None, Some(&json!({}))).await,
        401,
        "update without a token",
    );

    // Deployments: the seed's body.
    let seed_deployment = json!({"pipeline_id": format!("pipeline{pipeline_id}"), "commit_hash": "abc123def", "environment": "staging", "config_overrides": {"env": "staging", "db_host": "staging-db.example.com"}});
    let created = node.post("/api/v1/deployments", &developer, &seed_deployment).await;
    expect_status(&created, 201, "trigger the seed's deployment");
    let staging_id = created.json["deployment_id"].as_u64().expect("deployment_id");
    assert_eq!(created.json["status"], "pending");
    assert_eq!(created.json["environment"], "staging");
    assert_eq!(created.json["commit_hash"], "abc123def");
    assert_eq!(created.json["pipeline_id"], pipeline_id);
    assert_eq!(created.json["triggered_by"], developer_id);
    assert_eq!(created.json["config_overrides"], json!({"env": "staging", "db_host": "staging-db.example.com"}));
    let mut production = seed_deployment.clone();
    production["environment"] = json!("production");
    expect_status(&node.post("/api/v1/deployments", &developer, &production).await, 403, "a developer deploys to production");
    production["pipeline_id"] = json!(pipeline_id);
    let created = node.post("/api/v1/deployments", &admin, &production).await;
    expect_status(&created, 201, "an admin deploys to production");
    let production_id = created.json["deployment_id"].as_u64().unwrap();
    expect_status(&node.post("/api/v1/deployments", &viewer, &seed_deployment).await, 403, "a viewer deploys");
    expect_status(&node.call(Method::POST, "/api/v1/deployments", None, Some(&seed_deployment)).await, 401, "deploy without a token");
    let mut unknown = seed_deployment.clone();
    unknown["pipeline_id"] = json!("pipeline999999");
    expect_status(&node.post("/api/v1/deployments", &developer, &unknown).await, 404, "deploy an unknown pipeline");
    for (field, value, expected_field) in [
        ("commit_hash", json!("xyz"), "commit_hash"),
        ("environment", json!("STAGING"), "environment"),
        ("pipeline_id", json!(-1), "pipeline_id"),
        ("config_overrides", json!({"nested": {"a": 1}}), "config_overrides.nested"),
    ] {
        let mut body = seed_deployment.clone();
        body[field] = value.clone();
        expect_field_error(
            &node.post("/api/v1/deployments", &developer, &body).await,
            expected_field,
            &format!("deploy with {field} = {value}"),
        );
    }

    // List and get.
    let listed = node.get(&format!("/api/v1/deployments?pipeline_id={pipeline_id}&status=pending"), &viewer).await;
    expect_status(&listed, 200, "list pending deployments of a pipeline");
    assert_eq!(ids(listed.json["items"].as_array().unwrap(), "deployment_id"), BTreeSet::from([staging_id, production_id]));
    let listed = node.get("/api/v1/deployments?environment=production", &viewer).await;
    assert_eq!(ids(listed.json["items"].as_array().unwrap(), "deployment_id"), BTreeSet::from([production_id]));
    expect_field_error(&node.get("/api/v1/deployments?status=bogus", &viewer).await, "status", "a bad status filter");
    expect_status(&node.call(Method::GET, "/api/v1/deployments", None, None).await, 401, "list without a token");
    expect_status(&node.get(&format!("/api/v1/deployments/{staging_id}"), &viewer).await, 200, "get a deployment");
    expect_status(&node.get("/api/v1/deployments/999999", &viewer).await, 404, "an unknown deployment");
    expect_field_error(&node.get("/api/v1/deployments/x", &viewer).await, "id", "a malformed deployment id");

    // Cancel and roll back.
    expect_status(&node.post(&format!("/api/v1/deployments/{staging_id}/cancel"), &viewer, &json!({})).await, 403, "a viewer cancels");
    expect_status(
        &node.post(&format!("/api/v1/deployments/{production_id}/cancel"), &developer, &json!({})).await,
        403,
        "a developer cancels production",
    );
    let cancelled = node.post(&format!("/api/v1/deployments/{staging_id}/cancel"), &developer, &json!({})).await;
    expect_status(&cancelled, 200, "a developer cancels staging");
    assert_eq!(cancelled.json["status"], "failed");
    assert!(cancelled.json["status_reason"].as_str().is_some_and(|reason| reason.contains("cancelled by dev")), "{}", cancelled.text());
    expect_status(&node.post(&format!("/api/v1/deployments/{staging_id}/cancel"), &developer, &json!({})).await, 409, "cancel twice");
    expect_status(&node.post("/api/v1/deployments/999999/cancel", &developer, &json!({})).await, 404, "cancel an unknown deployment");
    expect_status(
        &node.call(Method::POST, &format!("/api/v1/deployments/{staging_id}/cancel"), None, None).await,
        401,
        "cancel without a token",
    );
    let rollback = node.post(&format!("/api/v1/deployments/{staging_id}/rollback"), &developer, &json!({})).await;
    expect_status(&rollback, 409, "roll back with nothing before it");
    assert_eq!(rollback.error_code(), Some("nothing_to_roll_back_to"));
    expect_status(&node.post(&format!("/api/v1/deployments/{staging_id}/rollback"), &viewer, &json!({})).await, 403, "a viewer rolls back");
    expect_status(
        &node.post(&format!("/api/v1/deployments/{production_id}/rollback"), &developer, &json!({})).await,
        403,
        "a developer rolls back production",
    );
    expect_status(&node.post("/api/v1/deployments/999999/rollback", &admin, &json!({})).await, 404, "roll back an unknown deployment");
    expect_status(
        &node.call(Method::POST, &format!("/api/v1/deployments/{staging_id}/rollback"), None, None).await,
        401,
        "roll back without a token",
    );

    // Logs of one deployment: the coordinator wrote its creation and cancellation.
    let logs = node.get(&format!("/api/v1/logs/{staging_id}"), &viewer).await;
    expect_status(&logs, 200, "a deployment's logs");
    let lines = logs.json["lines"].as_array().expect("lines").clone();
    assert!(lines.iter().any(|line| line["level"] == "INFO" && line["message"].as_str().unwrap().contains("created by dev")), "{lines:?}");
    assert!(lines.iter().any(|line| line["level"] == "WARNING" && line["message"].as_str().unwrap().contains("cancelled")), "{lines:?}");
    let warnings = node.get(&format!("/api/v1/logs/{staging_id}?log_level=WARNING"), &viewer).await;
    expect_status(&warnings, 200, "warning lines only");
    assert!(warnings.json["lines"].as_array().unwrap().iter().all(|line| line["level"] == "WARNING"), "{}", warnings.text());
    let limited = node.get(&format!("/api/v1/logs/{staging_id}?limit=1"), &viewer).await;
    assert_eq!(limited.json["lines"].as_array().unwrap().len(), 1);
    assert_eq!(limited.json["truncated"], true);
    expect_field_error(&node.get(&format!("/api/v1/logs/{staging_id}?log_level=FATAL"), &viewer).await, "log_level", "an unknown level");
    expect_field_error(&node.get(&format!("/api/v1/logs/{staging_id}?limit=0"), &viewer).await, "limit", "limit 0");
    expect_field_error(&node.get("/api/v1/logs/abc", &viewer).await, "deploymentId", "a malformed deployment id");
    expect_status(&node.get("/api/v1/logs/999999", &viewer).await, 404, "logs of an unknown deployment");
    expect_status(&node.call(Method::GET, &format!("/api/v1/logs/{staging_id}"), None, None).await, 401, "logs without a token");

    // Log search: the seed's query (a week of 2024, so nothing from this run) and a live one.
    let seed_search = format!(
        "/api/v1/logs/search?pipeline_id=pipeline{pipeline_id}&log_level=ERROR&start_time=2024-11-01T00:00:00Z&end_time=2024-11-07T23:59:59Z"
    );
    let found = node.get(&seed_search, &viewer).await;
    expect_status(&found, 200, "the seed's log search");
    assert_eq!(found.json["matches"], json!([]));
    let found = node.get(&format!("/api/v1/logs/search?pipeline_id={pipeline_id}&log_level=INFO&q=CREATED%20BY"), &viewer).await;
    expect_status(&found, 200, "search by text");
    let matches = found.json["matches"].as_array().unwrap();
    assert!(matches.iter().any(|m| m["deployment_id"] == staging_id && m["pipeline_id"] == pipeline_id), "{}", found.text());
    // Across all runs, newest first, a page at a time: the pages, read one after the other with
    // their cursors, are the whole answer in the same order.
    let all = node.get("/api/v1/logs/search?q=deployment&limit=10000", &viewer).await;
    expect_status(&all, 200, "every line saying created");
    let all = all.json["matches"].as_array().unwrap().clone();
    assert!(all.len() >= 3 && all.iter().any(|m| m["deployment_id"] != all[0]["deployment_id"]), "{all:?}");
    let ids: Vec<u64> = all.iter().map(|m| m["deployment_id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|pair| pair[0] >= pair[1]), "newest deployments first: {ids:?}");
    let (mut paged, mut cursor) = (Vec::new(), String::new());
    loop {
        let page = node.get(&format!("/api/v1/logs/search?q=deployment&limit=2&cursor={cursor}"), &viewer).await;
        expect_status(&page, 200, "a page of a search");
        paged.extend(page.json["matches"].as_array().unwrap().iter().cloned());
        match page.json["next_cursor"].as_str() {
            Some(next) => {
                assert_eq!(page.json["truncated"], true);
                cursor = next.to_string();
            }
            None => break,
        }
    }
    assert_eq!(paged, all, "pages follow each other without gaps or repeats");
    expect_field_error(&node.get("/api/v1/logs/search?cursor=7", &viewer).await, "cursor", "a malformed cursor");
    let backwards = node.get("/api/v1/logs/search?start_time=2024-11-07T00:00:00Z&end_time=2024-11-01T00:00:00Z", &viewer).await;
    expect_status(&backwards, 200, "a range that ends before it starts");
    assert_eq!(backwards.json["matches"], json!([]));
    expect_field_error(&node.get("/api/v1/logs/search?start_time=yesterday", &viewer).await, "start_time", "a bad start_time");
    expect_field_error(&node.get("/api/v1/logs/search?log_level=error", &viewer).await, "log_level", "a lower-case level");
    expect_field_error(&node.get("/api/v1/logs/search?pipeline_id=p", &viewer).await, "pipeline_id", "a malformed pipeline_id");
    expect_status(&node.call(Method::GET, &seed_search, None, None).await, 401, "search without a token");

    // Monitoring.
    let metrics = node.get("/api/v1/monitoring/metrics", &viewer).await;
    expect_status(&metrics, 200, "metrics");
    assert_eq!(metrics.json["deployments_total"], 2);
    assert_eq!(metrics.json["deployments_by_environment"], json!({"production": 1, "staging": 1}));
    assert_eq!(metrics.json["deployments_by_status"], json!({"failed": 1, "pending": 1}));
    assert_eq!(metrics.json["coordinator"]["node_id"], 1);
    let metrics = node.get(&format!("/api/v1/monitoring/metrics?pipeline_id=pipeline{staging_pipeline}"), &viewer).await;
    assert_eq!(metrics.json["deployments_total"], 0);
    expect_field_error(&node.get("/api/v1/monitoring/metrics?pipeline_id=abc", &viewer).await, "pipeline_id", "bad pipeline_id");
    expect_status(&node.call(Method::GET, "/api/v1/monitoring/metrics", None, None).await, 401, "metrics without a token");

    // Deleting the pipeline takes its deployments with it.
    expect_status(&node.delete(&format!("/api/v1/pipelines/{pipeline_id}"), &viewer).await, 403, "a viewer deletes a pipeline");
    expect_status(&node.call(Method::DELETE, &format!("/api/v1/pipelines/{pipeline_id}"), None, None).await, 401, "delete without a token");
    expect_status(&node.delete(&format!("/api/v1/pipelines/{pipeline_id}"), &developer).await, 204, "delete a pipeline");
    expect_status(&node.delete(&format!("/api/v1/pipelines/{pipeline_id}"), &developer).await, 404, "delete it again");
    expect_status(&node.get(&format!("/api/v1/pipelines/{pipeline_id}"), &viewer).await, 404, "get a deleted pipeline");
    expect_status(&node.get(&format!("/api/v1/deployments/{staging_id}"), &viewer).await, 404, "a deleted pipeline's deployment");
}

fn multipart(fields: &[(&str, &[u8])], boundary: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        if *name == "artifact" {
            body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"app.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                    .as_bytes(),
            );
        } else {
            body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes());
        }
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_upload_download_and_delete() {
    use sha2::Digest;
    let node = SingleNode::start("api-artifacts").await;
    let (_, developer) = node.create_user("dev", "developer-pw", "developer").await;
    let (_, viewer) = node.create_user("viewer", "viewer-pw-1", "viewer").await;
    let repo =
        node.post("/api/v1/repos/connect", &developer, &json!({"repo_url": "https://github.com/org/repo", "scm_type": "github"})).await;
    let repo_id = repo.json["repo_id"].as_u64().unwrap();
    let pipeline =
        node.post("/api/v1/pipelines", &developer, &json!({"name": "build", "repo_id": repo_id, "deploy_strategy": "rolling"})).await;
    let pipeline_id = pipeline.json["pipeline_id"].as_u64().unwrap();

    // The seed's JSON body: the artifact is the text content.
    let seed = json!({"pipeline_id": format!("pipeline{pipeline_id}"), "artifact": "binary_file", "version": "v1.0.0"});
    let uploaded = node.post("/api/v1/artifacts/upload", &developer, &seed).await;
    expect_status(&uploaded, 201, "upload the seed's JSON artifact");
    let json_artifact = uploaded.json["artifact_id"].as_u64().expect("artifact_id");
    assert_eq!(uploaded.json["size_bytes"], 11);
    assert_eq!(uploaded.json["version"], "v1.0.0");
    assert_eq!(uploaded.json["pipeline_id"], pipeline_id);
    let digest: String = Sha256::digest(b"binary_file").iter().map(|byte| format!("{byte:02x}")).collect();
    assert_eq!(uploaded.json["digest"], digest);

    // Multipart with binary content.
    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let boundary = "davit-test-boundary-7MA4YWxk";
    let pipeline_text = pipeline_id.to_string();
    let body = multipart(&[("pipeline_id", pipeline_text.as_bytes()), ("version", b"v2.0.0"), ("artifact", &binary)], boundary);
    let request = node
        .client
        .post(node.url("/api/v1/artifacts/upload"))
        .bearer_auth(&developer)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body);
    let uploaded = node.send(request).await;
    expect_status(&uploaded, 201, "a multipart upload");
    let multipart_artifact = uploaded.json["artifact_id"].as_u64().unwrap();
    assert_eq!(uploaded.json["size_bytes"], 70_000);

    // The raw body with ?pipeline_id=&version=.
    let raw = b"#!/bin/sh\necho hello\n".to_vec();
    let request = node
        .client
        .post(node.url(&format!("/api/v1/artifacts/upload?pipeline_id=pipeline{pipeline_id}&version=v3.0.0")))
        .bearer_auth(&developer)
        .header("content-type", "application/octet-stream")
        .body(raw.clone());
    let uploaded = node.send(request).await;
    expect_status(&uploaded, 201, "a raw upload");
    let raw_artifact = uploaded.json["artifact_id"].as_u64().unwrap();

    // Base64 in JSON, for binary content without multipart.
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode([0u8, 159, 146, 150]);
    let uploaded = node
        .post(
            "/api/v1/artifacts/upload",
            &developer,
            &json!({"pipeline_id": pipeline_id, "artifact": encoded, "version": "v4", "artifact_encoding": "base64"}),
        )
        .await;
    expect_status(&uploaded, 201, "a base64 JSON upload");
    assert_eq!(uploaded.json["size_bytes"], 4);

    // Download: the exact bytes, with their digest.
    for (artifact_id, expected) in
        [(json_artifact, b"binary_file".to_vec()), (multipart_artifact, binary.clone()), (raw_artifact, raw.clone())]
    {
        let downloaded = node.get(&format!("/api/v1/artifacts/{artifact_id}"), &viewer).await;
        expect_status(&downloaded, 200, "download");
        assert_eq!(downloaded.bytes, expected, "artifact {artifact_id} came back different");
        let digest: String = Sha256::digest(&expected).iter().map(|byte| format!("{byte:02x}")).collect();
        assert_eq!(downloaded.headers.get("x-davit-digest").and_then(|v| v.to_str().ok()), Some(format!("sha256:{digest}").as_str()));
        assert_eq!(downloaded.headers.get("content-type").and_then(|v| v.to_str().ok()), Some("application/octet-stream"));
    }
    expect_status(&node.get("/api/v1/artifacts/999999", &viewer).await, 404, "download an unknown artifact");
    expect_field_error(&node.get("/api/v1/artifacts/-1", &viewer).await, "artifactId", "a malformed artifact id");
    expect_status(&node.call(Method::GET, &format!("/api/v1/artifacts/{raw_artifact}"), None, None).await, 401, "download without a token");

    // Metadata.
    let metadata = node.get(&format!("/api/v1/artifacts/{multipart_artifact}/metadata"), &viewer).await;
    expect_status(&metadata, 200, "metadata");
    assert_eq!(metadata.json["version"], "v2.0.0");
    assert_eq!(metadata.json["size_in_mb"], 0.07);
    expect_status(&node.get("/api/v1/artifacts/999999/metadata", &viewer).await, 404, "metadata of an unknown artifact");
    expect_status(
        &node.call(Method::GET, &format!("/api/v1/artifacts/{raw_artifact}/metadata"), None, None).await,
        401,
        "metadata without a token",
    );

    // List and page.
    let all = walk(&node, &format!("/api/v1/artifacts?pipeline_id={pipeline_id}"), &viewer, 3, "artifact_id").await;
    assert_eq!(all.len(), 4);
    expect_field_error(&node.get("/api/v1/artifacts?limit=0", &viewer).await, "limit", "limit 0");
    expect_field_error(&node.get("/api/v1/artifacts?cursor=abc", &viewer).await, "cursor", "a bad cursor");
    expect_field_error(&node.get("/api/v1/artifacts?pipeline_id=", &viewer).await, "pipeline_id", "an empty pipeline_id");
    expect_status(&node.call(Method::GET, "/api/v1/artifacts", None, None).await, 401, "list without a token");

    // Upload failures.
    for (body, field) in [
        (json!({"pipeline_id": pipeline_id, "artifact": "x"}), None),
        (json!({"pipeline_id": pipeline_id, "artifact": "x", "version": "v".repeat(51)}), Some("version")),
        (json!({"pipeline_id": pipeline_id, "artifact": "x", "version": "  "}), Some("version")),
        (json!({"pipeline_id": "zero", "artifact": "x", "version": "v1"}), Some("pipeline_id")),
        (json!({"pipeline_id": pipeline_id, "artifact": "%%%", "version": "v1", "artifact_encoding": "base64"}), Some("artifact")),
        (json!({"pipeline_id": pipeline_id, "artifact": "x", "version": "v1", "artifact_encoding": "rot13"}), Some("artifact_encoding")),
    ] {
        let reply = node.post("/api/v1/artifacts/upload", &developer, &body).await;
        match field {
            Some(field) => expect_field_error(&reply, field, &format!("upload {body}")),
            None => expect_status(&reply, 400, &format!("upload {body}")),
        }
    }
    let no_query = node
        .client
        .post(node.url("/api/v1/artifacts/upload"))
        .bearer_auth(&developer)
        .header("content-type", "application/octet-stream")
        .body("x");
    expect_field_error(&node.send(no_query).await, "pipeline_id", "a raw upload without pipeline_id");
    let body =
        multipart(&[("pipeline_id", pipeline_text.as_bytes()), ("version", b"v9"), ("artifact", b"x"), ("colour", b"red")], boundary);
    let request = node
        .client
        .post(node.url("/api/v1/artifacts/upload"))
        .bearer_auth(&developer)
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body);
    expect_field_error(&node.send(request).await, "colour", "an unknown multipart field");
    let mut unknown = seed.clone();
    unknown["pipeline_id"] = json!(999_999);
    expect_status(&node.post("/api/v1/artifacts/upload", &developer, &unknown).await, 404, "upload to an unknown pipeline");
    expect_status(&node.post("/api/v1/artifacts/upload", &viewer, &seed).await, 403, "a viewer uploads");
    expect_status(&node.call(Method::POST, "/api/v1/artifacts/upload", None, Some(&seed)).await, 401, "upload without a token");

    // Delete.
    expect_status(&node.delete(&format!("/api/v1/artifacts/{json_artifact}"), &viewer).await, 403, "a viewer deletes");
    expect_status(
        &node.call(Method::DELETE, &format!("/api/v1/artifacts/{json_artifact}"), None, None).await,
        401,
        "delete without a token",
    );
    expect_status(&node.delete(&format!("/api/v1/artifacts/{json_artifact}"), &developer).await, 204, "delete an artifact");
    expect_status(&node.delete(&format!("/api/v1/artifacts/{json_artifact}"), &developer).await, 404, "delete it again");
    expect_status(&node.get(&format!("/api/v1/artifacts/{json_artifact}"), &viewer).await, 404, "download a deleted artifact");
    expect_status(&node.get(&format!("/api/v1/artifacts/{json_artifact}/metadata"), &viewer).await, 404, "metadata of a deleted artifact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_audit_log_and_cluster() {
    let node = SingleNode::start("api-configs").await;
    let admin = node.admin_token.clone();
    let (_, developer) = node.create_user("dev", "developer-pw", "developer").await;
    let (_, viewer) = node.create_user("viewer", "viewer-pw-1", "viewer").await;

    // The seed's body: both keys name secrets, so an admin has to write them.
    let seed = json!({"db_password": "new_password", "api_key": "12345"});
    expect_status(&node.post("/api/v1/configs/staging", &developer, &seed).await, 403, "a developer sets secrets");
    let written = node.post("/api/v1/configs/staging", &admin, &seed).await;
    expect_status(&written, 200, "an admin sets the seed's configuration");
    assert_eq!(written.json["written"], 2);
    let secret_keys: BTreeSet<&str> = written.json["secret_keys"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(secret_keys, BTreeSet::from(["api_key", "db_password"]));
    let plain =
        node.post("/api/v1/configs/staging", &developer, &json!({"db_host": "staging-db.example.com", "replicas": 3, "debug": true})).await;
    expect_status(&plain, 200, "a developer sets plain variables");
    let read = node.get("/api/v1/configs/staging", &viewer).await;
    expect_status(&read, 200, "a viewer reads the configuration");
    let variables = &read.json["variables"];
    for key in ["db_password", "api_key"] {
        assert_eq!(variables[key]["value"], "***", "{key} is masked");
        assert_eq!(variables[key]["secret"], true);
    }
    assert_eq!(variables["db_host"]["value"], "staging-db.example.com");
    assert_eq!(variables["replicas"]["value"], "3");
    assert_eq!(variables["debug"]["value"], "true");
    assert_eq!(variables["db_host"]["scope"], "environment");
    assert!(!read.text().contains("new_password") && !read.text().contains("12345"), "a secret in clear: {}", read.text());
    expect_status(
        &node.post("/api/v1/configs/staging", &developer, &json!({"feature": {"value": "x", "secret": true}})).await,
        403,
        "a developer marks a value secret",
    );
    expect_status(&node.post("/api/v1/configs/staging", &viewer, &json!({"a": "b"})).await, 403, "a viewer writes");
    expect_status(&node.call(Method::POST, "/api/v1/configs/staging", None, Some(&seed)).await, 401, "write without a token");
    expect_status(&node.call(Method::GET, "/api/v1/configs/staging", None, None).await, 401, "read without a token");
    expect_field_error(&node.post("/api/v1/configs/Bad_Env", &admin, &json!({"a": "b"})).await, "environment", "a bad environment");
    expect_field_error(&node.get("/api/v1/configs/Bad_Env", &admin).await, "environment", "read a bad environment");
    expect_status(&node.post("/api/v1/configs/staging", &admin, &json!({})).await, 400, "no variables");
    expect_status(&node.post("/api/v1/configs/staging", &admin, &json!(["a"])).await, 400, "an array");
    expect_field_error(&node.post("/api/v1/configs/staging", &admin, &json!({"list": [1]})).await, "list", "a nested value");
    expect_field_error(
        &node.post("/api/v1/configs/staging", &admin, &json!({"x": {"value": "1", "secret": "yes"}})).await,
        "x.secret",
        "secret that is not a boolean",
    );
    expect_field_error(&node.post("/api/v1/configs/staging", &admin, &json!({"ключ": "v"})).await, "ключ", "a non-ASCII key");
    expect_status(&node.get("/api/v1/configs/staging?pipeline_id=999999", &viewer).await, 404, "an unknown pipeline's configuration");

    // Versions: every set is a new one; listed newest first, secrets masked.
    let again = node.post("/api/v1/configs/staging", &developer, &json!({"db_host": "db-2.example.com"})).await;
    expect_status(&again, 200, "set a key again");
    assert_eq!(again.json["versions"], json!({"db_host": 2}));
    let history = node.get("/api/v1/configs/staging/db_host/versions", &viewer).await;
    expect_status(&history, 200, "a viewer lists a key's versions");
    assert_eq!(history.json["current_version"], 2);
    let listed: Vec<(u64, &str, bool)> = history.json["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|version| (version["version"].as_u64().unwrap(), version["value"].as_str().unwrap(), version["current"].as_bool().unwrap()))
        .collect();
    assert_eq!(listed, [(2, "db-2.example.com", true), (1, "staging-db.example.com", false)]);
    let secret = node.get("/api/v1/configs/staging/db_password/versions", &viewer).await;
    expect_status(&secret, 200, "a secret's versions");
    assert_eq!((&secret.json["versions"][0]["value"], &secret.json["versions"][0]["secret"]), (&json!("***"), &json!(true)));
    assert!(!secret.text().contains("new_password") && !secret.text().contains("davit-sealed"), "{}", secret.text());
    expect_status(&node.get("/api/v1/configs/staging/no_such_key/versions", &viewer).await, 404, "an unknown key's versions");
    expect_field_error(
        &node.get("/api/v1/configs/Bad_Env/db_host/versions", &viewer).await,
        "environment",
        "versions in a bad environment",
    );
    expect_status(&node.call(Method::GET, "/api/v1/configs/staging/db_host/versions", None, None).await, 401, "versions without a token");

    // Pipeline-scoped values override the environment's.
    let repo =
        node.post("/api/v1/repos/connect", &developer, &json!({"repo_url": "https://github.com/org/repo", "scm_type": "github"})).await;
    let pipeline = node
        .post("/api/v1/pipelines", &developer, &json!({"name": "app", "repo_id": repo.json["repo_id"], "deploy_strategy": "canary"}))
        .await;
    let pipeline_id = pipeline.json["pipeline_id"].as_u64().unwrap();
    expect_status(
        &node.post(&format!("/api/v1/configs/staging?pipeline_id=pipeline{pipeline_id}"), &developer, &json!({"db_host": "app-db"})).await,
        200,
        "a pipeline's own value",
    );
    let scoped = node.get(&format!("/api/v1/configs/staging?pipeline_id={pipeline_id}"), &viewer).await;
    assert_eq!(scoped.json["variables"]["db_host"], json!({"value": "app-db", "secret": false, "scope": "pipeline", "version": 1}));
    assert_eq!(scoped.json["variables"]["replicas"]["scope"], "environment");

    // Delete.
    expect_status(&node.delete("/api/v1/configs/staging/db_host", &viewer).await, 403, "a viewer deletes");
    expect_status(&node.call(Method::DELETE, "/api/v1/configs/staging/db_host", None, None).await, 401, "delete without a token");
    expect_status(&node.delete("/api/v1/configs/staging/db_host", &developer).await, 204, "a developer deletes a plain value");
    expect_status(&node.delete("/api/v1/configs/staging/db_password", &developer).await, 403, "a developer deletes a secret");
    expect_status(&node.delete("/api/v1/configs/staging/db_password", &admin).await, 204, "an admin deletes a secret");
    expect_status(&node.delete("/api/v1/configs/staging/db_password", &admin).await, 404, "delete it again");
    expect_field_error(&node.delete("/api/v1/configs/BAD/x", &admin).await, "environment", "delete in a bad environment");
    let read = node.get("/api/v1/configs/staging", &viewer).await;
    assert!(read.json["variables"].get("db_host").is_none() && read.json["variables"].get("db_password").is_none(), "{}", read.text());
    // No deployment referenced them, so their history went with them.
    expect_status(&node.get("/api/v1/configs/staging/db_password/versions", &viewer).await, 404, "a deleted key's versions");

    // The audit log: admins only, paged, and never a secret in clear.
    let audit = node.get("/api/v1/audit-logs", &admin).await;
    expect_status(&audit, 200, "read the audit log");
    let actions: BTreeSet<&str> = audit.json["items"].as_array().unwrap().iter().filter_map(|entry| entry["action"].as_str()).collect();
    for action in ["user.create", "auth.login", "configuration.set", "configuration.delete"] {
        assert!(actions.contains(action), "no {action} in {actions:?}");
    }
    let everything = walk(&node, "/api/v1/audit-logs", &admin, 7, "audit_id").await;
    assert!(everything.len() > 10, "{}", everything.len());
    let text = serde_json::to_string(&everything).unwrap();
    assert!(!text.contains("new_password") && !text.contains("\"12345\""), "a secret in the audit log");
    let filtered = node.get("/api/v1/audit-logs?action=configuration.", &admin).await;
    assert!(
        filtered.json["items"].as_array().unwrap().iter().all(|entry| entry["action"].as_str().unwrap().starts_with("configuration.")),
        "{}",
        filtered.text()
    );
    expect_field_error(&node.get("/api/v1/audit-logs?user_id=abc", &admin).await, "user_id", "a bad user_id");
    expect_field_error(&node.get("/api/v1/audit-logs?limit=501", &admin).await, "limit", "limit 501");
    expect_status(&node.get("/api/v1/audit-logs", &developer).await, 403, "a developer reads the audit log");
    expect_status(&node.call(Method::GET, "/api/v1/audit-logs", None, None).await, 401, "audit log without a token");
    let verified = node.get("/api/v1/audit-logs/verify", &admin).await;
    expect_status(&verified, 200, "verify the audit chain");
    assert_eq!(verified.json["ok"], true, "{}", verified.text());
    assert!(verified.json["entries_checked"].as_u64().unwrap() >= everything.len() as u64);
    expect_status(&node.get("/api/v1/audit-logs/verify", &developer).await, 403, "a developer verifies");
    expect_status(&node.call(Method::GET, "/api/v1/audit-logs/verify", None, None).await, 401, "verify without a token");

    // Cluster status for anyone signed in; operations for admins.
    let status = node.get("/api/v1/cluster/status", &viewer).await;
    expect_status(&status, 200, "cluster status");
    assert_eq!(status.json["node_id"], 1);
    assert_eq!(status.json["state"], "Leader");
    assert_eq!(status.json["voters"], json!([1]));
    expect_status(&node.call(Method::GET, "/api/v1/cluster/status", None, None).await, 401, "status without a token");
    let snapshot = node.post("/api/v1/cluster/snapshot", &admin, &json!({})).await;
    expect_status(&snapshot, 200, "snapshot");
    assert!(snapshot.json["snapshot_index"].as_u64().is_some(), "{}", snapshot.text());
    expect_status(&node.post("/api/v1/cluster/snapshot", &developer, &json!({})).await, 403, "a developer snapshots");
    expect_status(&node.call(Method::POST, "/api/v1/cluster/snapshot", None, None).await, 401, "snapshot without a token");
    expect_status(&node.post("/api/v1/cluster/bogus", &admin, &json!({})).await, 404, "an unknown cluster operation");
    expect_field_error(&node.post("/api/v1/cluster/add", &admin, &json!({})).await, "node_id", "add without a node_id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_unknown_routes_and_pagination() {
    let node = SingleNode::start("api-bodies").await;
    let admin = node.admin_token.clone();
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(1_200_000));
    let endpoints = [
        (Method::POST, "/api/v1/auth/login"),
        (Method::POST, "/api/v1/users"),
        (Method::PUT, "/api/v1/users/1"),
        (Method::POST, "/api/v1/tokens"),
        (Method::POST, "/api/v1/repos/connect"),
        (Method::PUT, "/api/v1/repos/1"),
        (Method::POST, "/api/v1/repos/webhook"),
        (Method::POST, "/api/v1/pipelines"),
        (Method::PUT, "/api/v1/pipelines/1"),
        (Method::POST, "/api/v1/deployments"),
        (Method::POST, "/api/v1/configs/staging"),
        (Method::POST, "/api/v1/artifacts/upload"),
        (Method::POST, "/api/v1/cluster/add"),
    ];
    for (method, path) in endpoints {
        for (what, body, allowed) in [
            ("not JSON", "{\"name\": oops".to_string(), &[400][..]),
            ("wrong shape", "[1, 2, 3]".to_string(), &[400, 404][..]),
            ("a string", "\"hello\"".to_string(), &[400, 404][..]),
            ("empty", String::new(), &[400, 404][..]),
            ("over 1 MiB", big.clone(), &[413, 400][..]),
        ] {
            // Webhook deliveries may be up to 25 MiB (GitHub's limit); beyond that, 413.
            if path == "/api/v1/repos/webhook" && what == "over 1 MiB" {
                let huge = format!("{{\"name\": \"{}\"}}", "x".repeat(26 * 1024 * 1024));
                let reply = node.send(node.client.post(node.url(path)).header("content-type", "application/json").body(huge)).await;
                assert_eq!(reply.status, 413, "a webhook body over 25 MiB: {}", reply.text().chars().take(300).collect::<String>());
                continue;
            }
            let request = node
                .client
                .request(method.clone(), node.url(path))
                .bearer_auth(&admin)
                .header("content-type", "application/json")
                .body(body);
            let reply = node.send(request).await;
            assert!(
                allowed.contains(&reply.status),
                "{method} {path} with a body that is {what}: got {} (allowed {allowed:?}) {}",
                reply.status,
                reply.text().chars().take(300).collect::<String>()
            );
            assert!(reply.error_code().is_some(), "{method} {path} with {what}: not the error shape: {}", reply.text());
        }
    }
    // A body of the right shape with a value of the wrong type names the field.
    let reply = node.post("/api/v1/repos/connect", &admin, &json!({"repo_url": 42, "scm_type": "github"})).await;
    expect_field_error(&reply, "repo_url", "a number as repo_url");

    // Unknown routes and methods are JSON errors too.
    let reply = node.get("/api/v1/no-such-thing", &admin).await;
    expect_status(&reply, 404, "an unknown route");
    assert_eq!(reply.error_code(), Some("not_found"));
    let reply = node.call(Method::PATCH, "/api/v1/repos", Some(&admin), None).await;
    expect_status(&reply, 405, "an unsupported method");
    assert_eq!(reply.error_code(), Some("method_not_allowed"));

    // Paging through more repositories than one page holds.
    let mut created = BTreeSet::new();
    for index in 0..7 {
        let reply = node
            .post(
                "/api/v1/repos/connect",
                &admin,
                &json!({"repo_url": format!("https://git.example.com/org/service-{index}"), "scm_type": "gitlab"}),
            )
            .await;
        expect_status(&reply, 201, "connect");
        created.insert(reply.json["repo_id"].as_u64().unwrap());
    }
    let first = node.get("/api/v1/repos?limit=3", &admin).await;
    assert_eq!(first.json["items"].as_array().unwrap().len(), 3);
    assert!(first.json["next_cursor"].is_string(), "{}", first.text());
    for limit in [1, 3, 7, 500] {
        let all = walk(&node, "/api/v1/repos", &admin, limit, "repo_id").await;
        assert_eq!(ids(&all, "repo_id"), created, "paging with limit {limit}");
    }
    let last = node.get("/api/v1/repos?limit=7", &admin).await;
    assert!(last.json["next_cursor"].is_null(), "one exact page has no next page: {}", last.text());
    expect_field_error(&node.get("/api/v1/repos?cursor=abc", &admin).await, "cursor", "a cursor that is not one");
    expect_field_error(&node.get("/api/v1/repos?limit=501", &admin).await, "limit", "limit 501");
    expect_field_error(&node.get("/api/v1/repos?limit=-1", &admin).await, "limit", "limit -1");
    expect_field_error(&node.get("/api/v1/repos?limit=2&pipelineid=3", &admin).await, "pipelineid", "an unknown query parameter");
    expect_field_error(&node.get("/api/v1/auth/me?verbose=1", &admin).await, "verbose", "a query parameter where none is taken");
    let users = walk(&node, "/api/v1/users", &admin, 1, "user_id").await;
    assert_eq!(users.len(), 1);
}

/// Set up a repository and a pipeline as `developer`; returns the pipeline id.
async fn pipeline_for(node: &SingleNode, developer: &str, name: &str) -> u64 {
    let repo = node
        .post("/api/v1/repos/connect", developer, &json!({"repo_url": format!("https://github.com/org/{name}"), "scm_type": "github"}))
        .await;
    expect_status(&repo, 201, "connect a repository");
    let pipeline = node
        .post("/api/v1/pipelines", developer, &json!({"name": name, "repo_id": repo.json["repo_id"], "deploy_strategy": "rolling"}))
        .await;
    expect_status(&pipeline, 201, "create a pipeline");
    pipeline.json["pipeline_id"].as_u64().expect("pipeline_id")
}

fn header<'a>(reply: &'a single_node::Reply, name: &str) -> Option<&'a str> {
    reply.headers.get(name).and_then(|value| value.to_str().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_downloads_raw_ranges_and_etags() {
    use sha2::Digest;
    let node = SingleNode::start("api-artifact-ranges").await;
    let (_, developer) = node.create_user("dev", "developer-pw", "developer").await;
    let (_, viewer) = node.create_user("viewer", "viewer-pw-1", "viewer").await;
    let pipeline_id = pipeline_for(&node, &developer, "ranges").await;

    // Bytes that do not compress to nothing, over several download chunks.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let content: Vec<u8> = (0..300_000)
        .map(|index| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if index % 3 == 0 { b'a' } else { (state >> 56) as u8 }
        })
        .collect();
    let request = node
        .client
        .post(node.url(&format!("/api/v1/artifacts/upload?pipeline_id={pipeline_id}&version=v1.2.3")))
        .bearer_auth(&developer)
        .header("content-type", "application/octet-stream")
        .body(content.clone());
    let uploaded = node.send(request).await;
    expect_status(&uploaded, 201, "upload");
    let artifact_id = uploaded.json["artifact_id"].as_u64().unwrap();
    let digest: String = Sha256::digest(&content).iter().map(|byte| format!("{byte:02x}")).collect();
    let etag = format!("\"sha256:{digest}\"");
    let path = format!("/api/v1/artifacts/{artifact_id}");
    let raw_path = format!("{path}?raw=true");

    // The default form: the artifact's own bytes, streamed.
    let whole = node.get(&path, &viewer).await;
    expect_status(&whole, 200, "download");
    assert!(whole.bytes == content, "the download differs from the upload");
    assert_eq!(header(&whole, "etag"), Some(etag.as_str()));
    assert_eq!(header(&whole, "x-davit-digest"), Some(format!("sha256:{digest}").as_str()));
    assert_eq!(header(&whole, "content-length"), Some("300000"));
    assert_eq!(header(&whole, "content-type"), Some("application/octet-stream"));
    assert_eq!(header(&whole, "accept-ranges"), Some("none"));
    // A range on the decompressed form is ignored (documented): the whole body.
    let ranged = node.send(node.client.get(node.url(&path)).bearer_auth(&viewer).header("range", "bytes=0-9")).await;
    expect_status(&ranged, 200, "a range on the decompressed form");
    assert_eq!(ranged.bytes.len(), content.len());

    // raw=true: the stored zstd bytes, which decompress to the content.
    let stored = node.get(&raw_path, &viewer).await;
    expect_status(&stored, 200, "raw download");
    assert_eq!(header(&stored, "content-type"), Some("application/zstd"));
    assert_eq!(header(&stored, "accept-ranges"), Some("bytes"));
    assert_eq!(header(&stored, "etag"), Some(etag.as_str()));
    assert_eq!(header(&stored, "x-davit-digest"), Some(format!("sha256:{digest}").as_str()));
    assert_eq!(header(&stored, "content-length"), Some(stored.bytes.len().to_string().as_str()));
    assert!(header(&stored, "content-disposition").is_some_and(|value| value.contains(".zst")), "{:?}", stored.headers);
    assert!(zstd::decode_all(stored.bytes.as_slice()).unwrap() == content, "the stored bytes do not decompress to the content");
    let stored = stored.bytes;
    let total = stored.len();
    assert!(total > 1000, "{total}");

    let get_range = |range: String| {
        let request = node.client.get(node.url(&raw_path)).bearer_auth(&viewer).header("range", range);
        node.send(request)
    };
    for (range, first, last) in [
        ("bytes=0-99".to_string(), 0, 99),
        (format!("bytes=100-{}", total - 1), 100, total - 1),
        ("bytes=500-".to_string(), 500, total - 1),
        ("bytes=-50".to_string(), total - 50, total - 1),
        (format!("bytes=-{}", total + 10), 0, total - 1),
        ("bytes=10-99999999999".to_string(), 10, total - 1),
        ("bytes=7-7".to_string(), 7, 7),
    ] {
        let reply = get_range(range.clone()).await;
        expect_status(&reply, 206, &range);
        assert_eq!(header(&reply, "content-range"), Some(format!("bytes {first}-{last}/{total}").as_str()), "{range}");
        assert_eq!(header(&reply, "content-length"), Some((last - first + 1).to_string().as_str()), "{range}");
        assert_eq!(header(&reply, "content-type"), Some("application/zstd"));
        assert!(reply.bytes == stored[first..=last], "{range}: wrong bytes");
        assert_eq!(header(&reply, "etag"), Some(etag.as_str()));
    }
    // A download resumed in pieces is the whole.
    let mut pieces = Vec::new();
    for start in (0..total).step_by(total / 3 + 1) {
        let reply = get_range(format!("bytes={start}-{}", (start + total / 3).min(total - 1))).await;
        expect_status(&reply, 206, "a piece");
        pieces.extend_from_slice(&reply.bytes);
    }
    assert!(pieces == stored, "the pieces do not make the whole");
    for range in [format!("bytes={total}-"), format!("bytes={}-{}", total + 5, total + 10), "bytes=-0".to_string()] {
        let reply = get_range(range.clone()).await;
        expect_status(&reply, 416, &range);
        assert_eq!(header(&reply, "content-range"), Some(format!("bytes */{total}").as_str()), "{range}");
        assert_eq!(reply.error_code(), Some("range_not_satisfiable"));
    }
    // Not one well-formed byte range: ignored.
    for range in ["bytes=5-2", "bytes=0-1,5-6", "items=0-5", "bytes=x-5", "bytes=-"] {
        let reply = get_range(range.to_string()).await;
        expect_status(&reply, 200, range);
        assert!(reply.bytes == stored, "{range}");
    }
    // If-Range with another validator: the whole representation.
    let request = node.client.get(node.url(&raw_path)).bearer_auth(&viewer).header("range", "bytes=0-9").header("if-range", "\"sha256:0\"");
    expect_status(&node.send(request).await, 200, "If-Range that does not match");
    let request = node.client.get(node.url(&raw_path)).bearer_auth(&viewer).header("range", "bytes=0-9").header("if-range", &etag);
    expect_status(&node.send(request).await, 206, "If-Range that matches");

    // If-None-Match on both forms.
    for (target, if_none_match, expected) in [
        (&path, etag.clone(), 304),
        (&raw_path, etag.clone(), 304),
        (&path, format!("W/{etag}"), 304),
        (&path, format!("\"other\", {etag}"), 304),
        (&path, "*".to_string(), 304),
        (&path, "\"sha256:0000\"".to_string(), 200),
    ] {
        let request = node.client.get(node.url(target)).bearer_auth(&viewer).header("if-none-match", &if_none_match);
        let reply = node.send(request).await;
        expect_status(&reply, expected, &format!("{target} with If-None-Match {if_none_match}"));
        assert_eq!(header(&reply, "etag"), Some(etag.as_str()));
        if expected == 304 {
            assert!(reply.bytes.is_empty());
        }
    }

    expect_field_error(&node.get(&format!("{path}?raw=yes"), &viewer).await, "raw", "raw that is not a boolean");
    expect_field_error(&node.get(&format!("{path}?rw=true"), &viewer).await, "rw", "an unknown parameter");
    expect_status(&node.get("/api/v1/artifacts/999999?raw=true", &viewer).await, 404, "raw download of an unknown artifact");
    expect_status(&node.call(Method::GET, &raw_path, None, None).await, 401, "raw download without a token");
    let raw_false = node.get(&format!("{path}?raw=false"), &viewer).await;
    expect_status(&raw_false, 200, "raw=false");
    assert!(raw_false.bytes == content);
}

/// One Server-Sent Event.
#[derive(Debug, Default, Clone)]
struct SseEvent {
    event: Option<String>,
    id: Option<String>,
    data: String,
}

/// Read events from an SSE response until `stop` returns true for one, or the stream ends;
/// panics if nothing comes for 20 s.
async fn read_events(
    response: &mut reqwest::Response,
    buffer: &mut String,
    mut stop: impl FnMut(&SseEvent) -> bool,
) -> (Vec<SseEvent>, bool) {
    let mut events = Vec::new();
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let mut event = SseEvent::default();
            let mut has_field = false;
            for line in block.lines() {
                let (field, value) = line.split_once(':').map(|(f, v)| (f, v.strip_prefix(' ').unwrap_or(v))).unwrap_or((line, ""));
                match field {
                    "event" => event.event = Some(value.to_string()),
                    "id" => event.id = Some(value.to_string()),
                    "data" => {
                        if !event.data.is_empty() {
                            event.data.push('\n');
                        }
                        event.data.push_str(value);
                    }
                    _ => continue,
                }
                has_field = true;
            }
            if has_field && (event.event.is_some() || !event.data.is_empty()) {
                let done = stop(&event);
                events.push(event);
                if done {
                    return (events, false);
                }
            }
        }
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(20), response.chunk())
            .await
            .expect("an event within 20 s")
            .expect("read the stream");
        match chunk {
            Some(bytes) => buffer.push_str(&String::from_utf8_lossy(&bytes)),
            None => return (events, true),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_logs_raw_and_followed() {
    let node = SingleNode::start("api-log-follow").await;
    let (_, developer) = node.create_user("dev", "developer-pw", "developer").await;
    let (_, viewer) = node.create_user("viewer", "viewer-pw-1", "viewer").await;
    let pipeline_id = pipeline_for(&node, &developer, "follow").await;
    let created = node
        .post("/api/v1/deployments", &developer, &json!({"pipeline_id": pipeline_id, "commit_hash": "abc123def", "environment": "staging"}))
        .await;
    expect_status(&created, 201, "create a deployment");
    let deployment_id = created.json["deployment_id"].as_u64().unwrap();
    let logs_path = format!("/api/v1/logs/{deployment_id}");

    // Raw: the messages of the JSON form, one per line, byte for byte.
    let as_json = node.get(&logs_path, &viewer).await;
    expect_status(&as_json, 200, "JSON logs");
    let expected_raw: String =
        as_json.json["lines"].as_array().unwrap().iter().map(|line| format!("{}\n", line["message"].as_str().unwrap())).collect();
    assert!(expected_raw.contains("created by dev"), "{expected_raw}");
    let raw = node.get(&format!("{logs_path}?format=raw"), &viewer).await;
    expect_status(&raw, 200, "raw logs");
    assert_eq!(header(&raw, "content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(raw.text(), expected_raw);
    let raw_job = node.get(&format!("{logs_path}?format=raw&job_id=0&limit=1"), &viewer).await;
    expect_status(&raw_job, 200, "raw logs of job 0 (limit does not apply)");
    assert_eq!(raw_job.text(), expected_raw);
    for query in ["format=raw&job_id=999", "format=raw&step=0", "format=raw&log_level=ERROR"] {
        let reply = node.get(&format!("{logs_path}?{query}"), &viewer).await;
        expect_status(&reply, 200, query);
        assert_eq!(reply.text(), "", "{query}");
    }
    let by_step = node.get(&format!("{logs_path}?step=0"), &viewer).await;
    expect_status(&by_step, 200, "JSON with a step filter");
    assert_eq!(by_step.json["lines"], json!([]), "the coordinator's lines have no step");
    let json_explicit = node.get(&format!("{logs_path}?format=json"), &viewer).await;
    assert_eq!(json_explicit.json, as_json.json);
    expect_field_error(&node.get(&format!("{logs_path}?format=html"), &viewer).await, "format", "an unknown format");
    expect_field_error(&node.get(&format!("{logs_path}?follow=maybe"), &viewer).await, "follow", "follow that is not a boolean");
    expect_field_error(&node.get(&format!("{logs_path}?step=-1"), &viewer).await, "step", "a negative step");
    expect_status(&node.get("/api/v1/logs/999999?format=raw", &viewer).await, 404, "raw logs of an unknown deployment");
    expect_status(&node.call(Method::GET, &format!("{logs_path}?format=raw"), None, None).await, 401, "raw logs without a token");
    // An id the stream never sent is ignored (the client gets every line), as a new EventSource would.
    let bad_cursor = node.client.get(node.url(logs_path.as_str())).bearer_auth(&viewer).header("last-event-id", "yesterday");
    let ignored = node.send(bad_cursor).await;
    expect_status(&ignored, 200, "a malformed Last-Event-ID");
    assert_eq!(ignored.json, as_json.json);

    // Follow: what is stored first, then lines as they come, then `end` once it is cancelled.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let follow = |filter: &str, last_event_id: Option<&str>| {
        let mut request =
            client.get(node.url(&format!("{logs_path}?follow=true{filter}"))).bearer_auth(&viewer).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        request.send()
    };
    let mut stream = follow("", None).await.expect("open the stream");
    assert_eq!(stream.status().as_u16(), 200);
    assert_eq!(stream.headers().get("content-type").and_then(|value| value.to_str().ok()), Some("text/event-stream"));
    let mut warnings = follow("&log_level=WARNING", None).await.expect("open a filtered stream");
    let mut buffer = String::new();
    let (first, ended) = read_events(&mut stream, &mut buffer, |event| event.data.contains("created by dev")).await;
    assert!(!ended, "the stream ended before the deployment did: {first:?}");
    let created_line = first.last().unwrap().clone();
    let created_id = created_line.id.clone().expect("line events have an id");
    let line: Value = serde_json::from_str(&created_line.data).unwrap();
    assert_eq!((line["level"].as_str(), line["job_id"].as_u64()), (Some("INFO"), Some(0)));
    assert!(created_id.starts_with("0:1:"), "{created_id}");

    let cancelled = node.post(&format!("/api/v1/deployments/{deployment_id}/cancel"), &developer, &json!({})).await;
    expect_status(&cancelled, 200, "cancel");
    let (rest, ended) = read_events(&mut stream, &mut buffer, |event| event.event.as_deref() == Some("end")).await;
    assert!(!ended, "the stream closed without `end`: {rest:?}");
    let end = rest.last().unwrap();
    let end_data: Value = serde_json::from_str(&end.data).unwrap();
    assert_eq!(end_data["status"], "failed", "{end_data}");
    assert_eq!(end_data["deployment_id"], deployment_id);
    let lines: Vec<&SseEvent> = rest.iter().filter(|event| event.event.is_none()).collect();
    let cancel_line = lines.iter().find(|event| event.data.contains("cancelled by dev")).expect("the cancellation line before `end`");
    let last_id = lines.last().unwrap().id.clone().unwrap();
    // After `end`, the server closes the stream.
    let (after, ended) = read_events(&mut stream, &mut buffer, |_| false).await;
    assert!(ended && after.is_empty(), "{after:?}");

    // The filtered stream saw only the warning, then `end`.
    let mut filtered_buffer = String::new();
    let (filtered, _) = read_events(&mut warnings, &mut filtered_buffer, |event| event.event.as_deref() == Some("end")).await;
    let filtered_lines: Vec<Value> =
        filtered.iter().filter(|event| event.event.is_none()).map(|event| serde_json::from_str(&event.data).unwrap()).collect();
    assert!(!filtered_lines.is_empty() && filtered_lines.iter().all(|line| line["level"] == "WARNING"), "{filtered:?}");
    assert_eq!(filtered.last().unwrap().event.as_deref(), Some("end"));

    // Resuming after the first line replays only what came after it; after the last, nothing.
    let mut resumed = follow("", Some(&created_id)).await.expect("resume");
    let mut resumed_buffer = String::new();
    let (replayed, _) = read_events(&mut resumed, &mut resumed_buffer, |event| event.event.as_deref() == Some("end")).await;
    let replayed_lines: Vec<&SseEvent> = replayed.iter().filter(|event| event.event.is_none()).collect();
    assert!(replayed_lines.iter().all(|event| !event.data.contains("created by dev")), "{replayed:?}");
    assert!(replayed_lines.iter().any(|event| event.data == cancel_line.data), "{replayed:?}");
    let mut resumed = follow("", Some(&last_id)).await.expect("resume at the end");
    let mut resumed_buffer = String::new();
    let (replayed, _) = read_events(&mut resumed, &mut resumed_buffer, |event| event.event.as_deref() == Some("end")).await;
    assert_eq!(replayed.len(), 1, "only `end`: {replayed:?}");
    assert_eq!(replayed[0].event.as_deref(), Some("end"));
}
