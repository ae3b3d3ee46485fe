//! The dashboard in a real headless Chromium (Debian's `chromium` driven through its
//! `chromedriver` with fantoccini) against a real `davit up` whose embedded shell agent builds
//! from a repository served by `git daemon`: logging in, a run's log growing live, an approval
//! given from the deployment page and followed to the end, what a viewer sees and may do, an
//! accessibility check of every page run in the browser, and PNG screenshots of every page at
//! desktop and phone width under `$CARGO_TARGET_DIR/screenshots/`. Without Chromium the browser
//! test is skipped, and fails when `DAVIT_TEST_REQUIRE_PEERS=1`. The session cookie and CSRF
//! rules are also checked over plain HTTP.

#[allow(dead_code)]
mod fleet;
#[allow(dead_code)]
mod git_server;
#[allow(dead_code)]
mod single_node;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, Locator};
use git_server::GitServer;
use serde_json::{Value, json};
use single_node::{SingleNode, expect_status};

/// Prints numbered lines slowly, then a warning and an error line, and leaves an artifact.
const SLOW_BUILD: &str = "#!/bin/sh\ni=1\nwhile [ $i -le 24 ]; do echo \"progress line $i\"; sleep 0.5; i=$((i+1)); done\n\
echo 'WARNING: the cache was cold'\necho 'ERROR: an example error line'\nmkdir -p dist && echo built > dist/app.txt\necho done\n";

fn peers_required() -> bool {
    std::env::var("DAVIT_TEST_REQUIRE_PEERS").is_ok_and(|value| value == "1")
}

/// Debian's Chromium and its chromedriver (`CHROMIUM`, `CHROMEDRIVER` override the paths).
fn chromium(test: &str) -> Option<(PathBuf, PathBuf)> {
    let browser = PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    let driver = PathBuf::from(std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".into()));
    if browser.exists() && driver.exists() {
        return Some((browser, driver));
    }
    let missing = if browser.exists() { driver } else { browser };
    if peers_required() {
        panic!("{test}: {} is missing and DAVIT_TEST_REQUIRE_PEERS=1 (apt-get install chromium chromium-driver)", missing.display());
    }
    eprintln!(
        "{test}: skipped, {} is missing (apt-get install chromium chromium-driver; DAVIT_TEST_REQUIRE_PEERS=1 makes this a failure)",
        missing.display()
    );
    None
}

/// Where screenshots go: `$CARGO_TARGET_DIR/screenshots/` (the binary lives in `<target>/debug/`).
fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_BIN_EXE_davit")).parent().and_then(Path::parent).expect("target dir").to_path_buf());
    let dir = target.join("screenshots");
    std::fs::create_dir_all(&dir).expect("create the screenshot directory");
    dir
}

/// A chromedriver process and one browser session through it; both end on drop.
struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(browser: &Path, driver: &Path) -> Browser {
        let port = git_server::free_port();
        let profile = tempfile::Builder::new().prefix("davit-chromium-").tempdir().expect("profile dir");
        let mut child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "chromedriver exited at start");
            assert!(Instant::now() < deadline, "chromedriver did not listen on port {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage",
                         "--hide-scrollbars", "--window-size=1280,900", format!("--user-data-dir={}", profile.path().display())],
            }
        });
        let capabilities = capabilities.as_object().unwrap().clone();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = Client::with_capabilities_and_connector(&format!("http://127.0.0.1:{port}"), &capabilities, connector)
            .await
            .unwrap_or_else(|error| panic!("start a Chromium session through chromedriver: {error}"));
        Browser { driver: child, client: Some(client), _profile: profile }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the session is open")
    }

    async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Run `script` (a function body that returns a value) in the page.
async fn js(client: &Client, script: &str) -> Value {
    client.execute(script, vec![]).await.unwrap_or_else(|error| panic!("script failed: {error}\n{script}"))
}

/// Wait until `condition` (a JavaScript expression) is true in the page.
async fn wait_until(client: &Client, condition: &str, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if js(client, &format!("return Boolean({condition});")).await == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let text = js(client, "return document.body ? document.body.innerText.slice(0, 3000) : '';").await;
            panic!("timed out waiting for {what} ({condition}); the page says:\n{}", text.as_str().unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// PNG screenshots of the whole current page, desktop (1280 px) and phone (375 px) wide.
async fn screenshots(client: &Client, name: &str) {
    for (suffix, width) in [("desktop", 1280u32), ("narrow", 375u32)] {
        client.set_window_size(width, 900).await.expect("resize");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The window's height includes what is not page (outer - inner), so add it.
        let height = js(client, "return Math.ceil(document.documentElement.scrollHeight + window.outerHeight - window.innerHeight);")
            .await
            .as_u64()
            .unwrap_or(900);
        client.set_window_size(width, height.clamp(600, 6000) as u32).await.expect("resize");
        js(
            client,
            "document.activeElement && document.activeElement.blur && document.activeElement.blur(); window.scrollTo(0, 0); return null;",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let inner = js(client, "return window.innerWidth;").await.as_u64().unwrap_or(0);
        assert!(inner <= u64::from(width), "{name}: the viewport is {inner} px wide, wanted {width}");
        if width == 375 {
            // Nothing may force a horizontal scroll on a phone but the tables' own scrolling boxes.
            let overflow = js(client, "return document.documentElement.scrollWidth - window.innerWidth;").await.as_i64().unwrap_or(0);
            assert!(overflow <= 1, "{name}: the page is {overflow} px wider than a 375 px screen");
        }
        let png = client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
        std::fs::write(screenshot_dir().join(format!("{name}-{suffix}.png")), png).expect("save the screenshot");
    }
    client.set_window_size(1280, 900).await.expect("resize");
}

/// The accessibility check, run by the page's own JavaScript: every form control has a label,
/// every image an alt text, every button and link a name, and every piece of visible text a
/// contrast of at least 4.5:1 against its background (WCAG 2 relative luminance, computed
/// from the computed styles, translucent backgrounds composed over their ancestors).
const ACCESSIBILITY_CHECK: &str = r#"
const problems = [];
const describe = (node) => node.tagName.toLowerCase() + (node.id ? '#' + node.id : '') + (node.className && typeof node.className === 'string' ? '.' + node.className.split(' ').join('.') : '') + ' "' + (node.textContent || '').trim().slice(0, 40) + '"';
const visible = (node) => node.getClientRects().length > 0 && getComputedStyle(node).visibility !== 'hidden';
function accessibleName(node) {
  const labelledBy = node.getAttribute('aria-labelledby');
  if (labelledBy) return labelledBy.split(' ').map((id) => (document.getElementById(id) || {}).textContent || '').join(' ').trim();
  return (node.getAttribute('aria-label') || node.textContent || node.getAttribute('title') || node.value || '').trim();
}
for (const control of document.querySelectorAll('input:not([type=hidden]), select, textarea, meter')) {
  const label = (control.id && document.querySelector('label[for="' + CSS.escape(control.id) + '"]')) || control.closest('label');
  const named = label ? label.textContent.trim() : (control.getAttribute('aria-label') || control.getAttribute('aria-labelledby'));
  if (!named) problems.push('form control without a label: ' + describe(control));
}
for (const image of document.querySelectorAll('img')) if (!image.hasAttribute('alt')) problems.push('image without alt: ' + image.src);
for (const graphic of document.querySelectorAll('svg')) {
  if (graphic.getAttribute('aria-hidden') !== 'true' && !graphic.getAttribute('aria-label') && !graphic.querySelector(':scope > title')) problems.push('svg without a text alternative');
}
for (const button of document.querySelectorAll('button, [role=button], input[type=submit]')) if (visible(button) && !accessibleName(button)) problems.push('button without a name: ' + describe(button));
for (const link of document.querySelectorAll('a[href]')) if (visible(link) && !accessibleName(link)) problems.push('link without a name: ' + link.href);
function rgba(text) {
  const parts = (text.match(/[\d.]+/g) || ['0', '0', '0', '0']).map(Number);
  return [parts[0], parts[1], parts[2], parts.length > 3 ? parts[3] : 1];
}
function over(top, bottom) {
  const alpha = top[3] + bottom[3] * (1 - top[3]);
  if (alpha === 0) return [0, 0, 0, 0];
  return [0, 1, 2].map((i) => (top[i] * top[3] + bottom[i] * bottom[3] * (1 - top[3])) / alpha).concat([alpha]);
}
function backgroundOf(node) {
  const layers = [];
  for (let at = node; at && at.nodeType === 1; at = at.parentElement) {
    const colour = rgba(getComputedStyle(at).backgroundColor);
    if (colour[3] > 0) layers.push(colour);
    if (colour[3] >= 1) break;
  }
  let result = [255, 255, 255, 1];
  for (const layer of layers.reverse()) result = over(layer, result);
  return result;
}
function luminance(colour) {
  const [r, g, b] = colour.slice(0, 3).map((value) => {
    const channel = value / 255;
    return channel <= 0.03928 ? channel / 12.92 : Math.pow((channel + 0.055) / 1.055, 2.4);
  });
  return 0.2126 * r + 0.7152 * g + 0.0722 * b;
}
let checked = 0;
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
const seen = new Set();
for (let text = walker.nextNode(); text; text = walker.nextNode()) {
  const node = text.parentElement;
  if (!text.textContent.trim() || !node || seen.has(node) || !visible(node)) continue;
  if (node.closest('[hidden], script, style, title, option, .skip') || node.closest('button:disabled')) continue;
  seen.add(node);
  const style = getComputedStyle(node);
  const isSvg = node instanceof SVGElement;
  const background = backgroundOf(isSvg ? node.closest('svg').parentElement : node);
  const foreground = over(rgba(isSvg ? style.fill : style.color), background);
  const [light, dark] = [luminance(foreground), luminance(background)].sort((a, b) => b - a);
  const ratio = (light + 0.05) / (dark + 0.05);
  checked++;
  if (ratio < 4.5) problems.push('contrast ' + ratio.toFixed(2) + ':1 for ' + describe(node) + ' (' + style.color + ' on ' + background.map((v) => Math.round(v)).join(',') + ')');
}
return { problems, checked };
"#;

async fn check_accessibility(client: &Client, page: &str) {
    let result = js(client, ACCESSIBILITY_CHECK).await;
    let problems: Vec<&str> = result["problems"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(problems.is_empty(), "{page}: accessibility problems:\n{}", problems.join("\n"));
    assert!(result["checked"].as_u64().unwrap_or(0) > 3, "{page}: the contrast check found almost no text: {result}");
}

async fn log_in(client: &Client, node: &SingleNode, username: &str, password: &str) {
    client.goto(&node.url("/")).await.expect("open the dashboard");
    wait_until(client, "location.pathname === '/login'", "the redirect to the login form", Duration::from_secs(10)).await;
    client.find(Locator::Id("username")).await.unwrap().send_keys(username).await.unwrap();
    client.find(Locator::Id("password")).await.unwrap().send_keys(password).await.unwrap();
    client.find(Locator::Css("form.login button[type=submit]")).await.unwrap().click().await.unwrap();
    wait_until(
        client,
        "location.pathname === '/' && document.querySelector('#pipelines')",
        "the pipelines page after logging in",
        Duration::from_secs(15),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let test = "the_dashboard_in_a_real_browser";
    let Some((browser_path, driver_path)) = chromium(test) else { return };
    let (git_server, commit) = GitServer::start_with(
        "web",
        &[("slow.sh", SLOW_BUILD), ("quick.sh", "#!/bin/sh\nmkdir -p dist && echo app > dist/app.txt\necho built quickly\n")],
    );
    let node = SingleNode::start_with("dashboard", &["--agent-executor", "shell"]).await;
    let admin = node.admin_token.clone();
    let (_, developer) = node.create_user("dana", "dana-password-1", "developer").await;
    node.create_user("vic", "vic-password-1", "viewer").await;

    let repo = node
        .post(
            "/api/v1/repos/connect",
            &admin,
            &json!({"repo_url": git_server.url(), "branch": "main", "scm_type": "git", "poll_interval_seconds": 0}),
        )
        .await;
    expect_status(&repo, 201, "connect the repository");
    let repo_id = repo.json["repo_id"].as_u64().unwrap();
    let pipeline = |name: &str, command: &str, environment: &str, extra: Value| {
        let mut body = json!({"name": name, "repo_id": repo_id, "branch": "main", "build_command": command, "deploy_strategy": "rolling",
            "environment": environment, "build": {"artifacts": ["dist"]}});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body
    };
    let slow = node.post("/api/v1/pipelines", &admin, &pipeline("slow-web", "sh slow.sh", "development", json!({}))).await;
    expect_status(&slow, 201, "create the slow pipeline");
    let slow_id = slow.json["pipeline_id"].as_u64().unwrap();
    // Deployments of this one roll out to hosts, so the environment's approval applies.
    let app =
        node.post("/api/v1/pipelines", &admin, &pipeline("app", "sh quick.sh", "staging", json!({"deploy": {"public_port": 18081}}))).await;
    expect_status(&app, 201, "create the app pipeline");
    let app_id = app.json["pipeline_id"].as_u64().unwrap();
    expect_status(&node.put("/api/v1/environments/staging", &admin, &json!({"required_approvals": 1})).await, 200, "protect staging");
    expect_status(
        &node.post("/api/v1/configs/development", &admin, &json!({"LOG_LEVEL": "info", "db_password": "hunter2-secret"})).await,
        200,
        "configure",
    );

    let chrome = Browser::start(&browser_path, &driver_path).await;
    let client = chrome.client();

    // The login form, and the pipelines page behind it.
    client.goto(&node.url("/login")).await.unwrap();
    check_accessibility(client, "login").await;
    screenshots(client, "login").await;
    log_in(client, &node, "admin", &node.admin_password).await;
    let cookies = client.get_all_cookies().await.unwrap();
    let session = cookies.iter().find(|cookie| cookie.name() == "davit_session").expect("the session cookie");
    assert_eq!(session.http_only(), Some(true), "the session cookie is HttpOnly");
    assert_eq!(js(client, "return document.cookie.includes('davit_session');").await, json!(false), "scripts cannot read the session");

    // A run whose log grows while the page is open: lines appear without a reload.
    let run = node
        .post(
            "/api/v1/deployments",
            &admin,
            &json!({"pipeline_id": slow_id.to_string(), "commit_hash": commit, "environment": "development"}),
        )
        .await;
    expect_status(&run, 201, "start the slow run");
    let run_id = run.json["deployment_id"].as_u64().unwrap();
    client.goto(&node.url(&format!("/runs/{run_id}"))).await.unwrap();
    js(client, "window.__sameDocument = true; return null;").await;
    wait_until(
        client,
        "document.querySelectorAll('#log li').length > 0 && /progress line/.test(document.querySelector('#log').innerText)",
        "the first log lines",
        Duration::from_secs(90),
    )
    .await;
    let first = js(client, "return document.querySelectorAll('#log li').length;").await.as_u64().unwrap();
    let run_state = node.get(&format!("/api/v1/deployments/{run_id}"), &admin).await;
    assert_eq!(run_state.json["status"], "in_progress", "the run was still building when its first lines showed: {}", run_state.text());
    wait_until(client, &format!("document.querySelectorAll('#log li').length > {first}"), "more log lines, live", Duration::from_secs(30))
        .await;
    assert_eq!(js(client, "return window.__sameDocument === true;").await, json!(true), "the page was not reloaded");
    wait_until(
        client,
        "/ERROR: an example error line/.test(document.querySelector('#log').innerText)",
        "the end of the log",
        Duration::from_secs(60),
    )
    .await;
    wait_until(
        client,
        "document.querySelector('#summary .badge') && document.querySelector('#summary .badge').textContent === 'Success'",
        "the run's success",
        Duration::from_secs(60),
    )
    .await;
    // Levels are coloured: the error line's level is red, the warning's yellow.
    let colours = js(
        client,
        "return [getComputedStyle(document.querySelector('#log li.level-error .level')).color, getComputedStyle(document.querySelector('#log li.level-warning .level')).color];",
    )
    .await;
    assert_eq!(colours, json!(["rgb(255, 138, 128)", "rgb(255, 213, 79)"]), "level colours");
    // Steps with durations, and the artifact the build left.
    wait_until(client, "document.querySelectorAll('#jobs table.steps tbody tr').length >= 2", "the job's steps", Duration::from_secs(10))
        .await;
    let steps =
        js(client, "return Array.from(document.querySelectorAll('#jobs table.steps tbody tr')).map((tr) => tr.children[3].textContent);")
            .await;
    assert!(
        steps.as_array().unwrap().iter().any(|duration| duration.as_str().is_some_and(|text| text.ends_with(" s") || text.contains("min"))),
        "{steps}"
    );
    wait_until(
        client,
        "/files · /.test(document.querySelector('#run-artifacts tbody').innerText)",
        "the run's artifact",
        Duration::from_secs(20),
    )
    .await;
    // Searching within the log shows only matching lines, marked.
    client.find(Locator::Id("log-search")).await.unwrap().send_keys("line 2").await.unwrap();
    wait_until(client, "document.querySelectorAll('#log li:not([hidden])').length === 6", "lines 2 and 20-24 only", Duration::from_secs(5))
        .await;
    assert!(js(client, "return document.querySelectorAll('#log mark').length;").await.as_u64().unwrap() >= 6);
    // The raw log downloads as text.
    let raw = js(client, "return fetch(document.getElementById('log-download').href).then((r) => r.text());").await;
    assert!(raw.as_str().unwrap().contains("progress line 24\n"), "raw log: {raw}");
    check_accessibility(client, "run").await;
    client.find(Locator::Id("log-search")).await.unwrap().clear().await.unwrap();
    js(client, "document.getElementById('log-search').dispatchEvent(new Event('input')); return null;").await;
    screenshots(client, "run").await;

    // A deployment to staging that needs an approval: the developer deploys, the admin approves
    // on the page, and the page follows it to its end.
    let waiting = node
        .post(
            "/api/v1/deployments",
            &developer,
            &json!({"pipeline_id": app_id.to_string(), "commit_hash": commit, "environment": "staging"}),
        )
        .await;
    expect_status(&waiting, 201, "deploy to staging");
    let waiting_id = waiting.json["deployment_id"].as_u64().unwrap();
    client.goto(&node.url(&format!("/deployments/{waiting_id}"))).await.unwrap();
    wait_until(
        client,
        "document.querySelector('#events [data-kind=approval_required]')",
        "the approval_required event",
        Duration::from_secs(90),
    )
    .await;
    wait_until(
        client,
        "document.getElementById('action-approve').getClientRects().length > 0",
        "the approve button",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        js(client, "return document.getElementById('action-rollback').getClientRects().length;").await,
        json!(0),
        "no rollback before the end"
    );
    check_accessibility(client, "deployment (waiting for approval)").await;
    screenshots(client, "deployment-waiting").await;
    // The viewer's turn comes below; first the viewer's page for the same deployment.
    let viewer_browser = Browser::start(&browser_path, &driver_path).await;
    let viewer = viewer_browser.client();
    log_in(viewer, &node, "vic", "vic-password-1").await;
    viewer.goto(&node.url(&format!("/deployments/{waiting_id}"))).await.unwrap();
    wait_until(
        viewer,
        "document.querySelector('#events [data-kind=approval_required]')",
        "the viewer's event list",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(js(viewer, "return document.querySelectorAll('main button').length;").await, json!(0), "a viewer sees no action buttons");
    // The API refuses the viewer anyway: with the page's cookie and CSRF token, and with a token.
    let refused = js(
        viewer,
        &format!(
            "return fetch('/api/v1/deployments/{waiting_id}/approve', {{method: 'POST', headers: {{'x-csrf-token': document.querySelector('meta[name=csrf-token]').content, 'content-type': 'application/json'}}, body: '{{}}'}}).then(async (r) => [r.status, await r.json()]);"
        ),
    )
    .await;
    assert_eq!(refused[0], 403, "viewer approving through the API: {refused}");
    assert!(refused[1]["error"]["message"].as_str().unwrap().contains("needs the developer role"), "{refused}");
    let viewer_token = node.login("vic", "vic-password-1").await;
    for action in ["approve", "cancel", "rollback"] {
        let reply = node.post(&format!("/api/v1/deployments/{waiting_id}/{action}"), &viewer_token, &json!({})).await;
        assert_eq!(reply.status, 403, "viewer {action}: {}", reply.text());
    }
    // The audit page is for admins only.
    viewer.goto(&node.url("/audit")).await.unwrap();
    assert!(js(viewer, "return document.body.innerText;").await.as_str().unwrap().contains("needs the admin role"));
    viewer_browser.close().await;

    client.find(Locator::Id("action-approve")).await.unwrap().click().await.unwrap();
    wait_until(client, "document.querySelector('#events [data-kind=approved]')", "the approved event", Duration::from_secs(30)).await;
    wait_until(
        client,
        "document.querySelector('#events [data-kind=failed], #events [data-kind=succeeded], #events [data-kind=rolled_back]')",
        "the deployment's end",
        Duration::from_secs(60),
    )
    .await;
    let ended = node.wait_for_status(waiting_id, &["success", "failed", "rolled_back"]).await;
    let kinds = js(client, "return Array.from(document.querySelectorAll('#events li')).map((li) => li.dataset.kind);").await;
    let expected_end = match ended["status"].as_str().unwrap() {
        "success" => "succeeded",
        other => other,
    };
    assert_eq!(kinds, json!(["queued", "approval_required", "approved", expected_end]), "every event once, in order");
    assert_eq!(ended["approvals"][0]["username"], "admin");
    wait_until(
        client,
        "document.getElementById('action-approve').getClientRects().length === 0 && document.getElementById('action-cancel').getClientRects().length === 0",
        "approve and cancel gone from an ended deployment",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        js(client, "return document.getElementById('action-rollback').getClientRects().length;").await.as_u64().unwrap() > 0,
        "an ended deployment can be rolled back"
    );
    check_accessibility(client, "deployment (ended)").await;
    screenshots(client, "deployment").await;

    // The pipelines page: the latest run per branch, filtered by text and status.
    client.goto(&node.url("/")).await.unwrap();
    wait_until(client, "document.querySelectorAll('#pipelines tbody tr').length === 2", "both pipelines", Duration::from_secs(15)).await;
    client.find(Locator::Id("filter-text")).await.unwrap().send_keys("slow").await.unwrap();
    wait_until(client, "document.querySelectorAll('#pipelines tbody tr').length === 1 && document.querySelector('#pipelines tbody tr').dataset.pipeline === 'slow-web'", "the text filter", Duration::from_secs(5)).await;
    client.find(Locator::Id("filter-text")).await.unwrap().clear().await.unwrap();
    js(client, "const s = document.getElementById('filter-status'); s.value = 'success'; s.dispatchEvent(new Event('change')); document.getElementById('filter-text').dispatchEvent(new Event('input')); return null;").await;
    wait_until(client, "document.querySelectorAll('#pipelines tbody tr').length === 1 && document.querySelector('#pipelines tbody tr').dataset.status === 'success'", "the status filter", Duration::from_secs(5)).await;
    js(client, "const s = document.getElementById('filter-status'); s.value = ''; s.dispatchEvent(new Event('change')); return null;")
        .await;
    wait_until(client, "document.querySelectorAll('#pipelines tbody tr').length === 2", "the filters cleared", Duration::from_secs(5))
        .await;
    check_accessibility(client, "pipelines").await;
    screenshots(client, "pipelines").await;

    // Every other page renders, passes the accessibility check, and is photographed.
    let pages: [(&str, &str, &str); 7] = [
        ("/environments", "environments", "/commit/.test(document.querySelector('#matrix tbody').innerText)"),
        (
            "/delivery",
            "delivery",
            "document.querySelectorAll('.chart svg').length === 4 && document.querySelectorAll('#delivery-summary .tile').length === 5",
        ),
        ("/agents", "agents", "document.querySelector('#agents tbody tr[data-state=online]')"),
        ("/cluster", "cluster", "document.querySelector('#cluster-nodes .status-leader')"),
        ("/artifacts", "artifacts", "/slow-web/.test(document.querySelector('#artifacts tbody').innerText)"),
        ("/config", "config", "/LOG_LEVEL/.test(document.querySelector('#config tbody').innerText)"),
        (
            "/audit",
            "audit",
            "document.querySelectorAll('#audit tbody tr').length > 5 && /verified/.test(document.getElementById('audit-verify').textContent)",
        ),
    ];
    for (path, name, ready) in pages {
        client.goto(&node.url(path)).await.unwrap();
        wait_until(client, ready, name, Duration::from_secs(20)).await;
        check_accessibility(client, name).await;
        screenshots(client, name).await;
    }
    // The delivery metrics of development, where the runs went.
    client.goto(&node.url("/delivery")).await.unwrap();
    wait_until(
        client,
        "document.querySelectorAll('#delivery-environment option').length === 4",
        "the environments to choose from",
        Duration::from_secs(10),
    )
    .await;
    js(client, "const s = document.getElementById('delivery-environment'); s.value = 'development'; s.dispatchEvent(new Event('change')); return null;").await;
    wait_until(client, "document.querySelector('#delivery-summary .tile strong').textContent === '1' && Array.from(document.querySelectorAll('#chart-deployments rect.bar')).some((bar) => Number(bar.getAttribute('height')) > 0)", "one development deployment charted", Duration::from_secs(10)).await;
    screenshots(client, "delivery-development").await;

    // Secrets stay masked on the configuration page.
    client.goto(&node.url("/config")).await.unwrap();
    wait_until(
        client,
        "/db_password/.test(document.querySelector('#config tbody').innerText)",
        "the secret's row",
        Duration::from_secs(10),
    )
    .await;
    let text = js(client, "return document.body.innerText;").await;
    assert!(!text.as_str().unwrap().contains("hunter2"), "a secret value reached the page");
    assert!(text.as_str().unwrap().contains("***"));

    // Logging out ends the session: pages send the browser back to the login form.
    client.find(Locator::Css("form.logout button")).await.unwrap().click().await.unwrap();
    wait_until(client, "location.pathname === '/login'", "the login form after logging out", Duration::from_secs(10)).await;
    client.goto(&node.url("/agents")).await.unwrap();
    wait_until(
        client,
        "location.pathname === '/login' && location.search === '?next=%2Fagents'",
        "the login form for a page",
        Duration::from_secs(10),
    )
    .await;
    chrome.close().await;
    eprintln!("screenshots saved under {}", screenshot_dir().display());
}

/// A rolling deployment to two deploy agents (real `davit-agent` processes with Docker) in two
/// regions, approved on its page (staging is protected) and followed there to its end: each
/// region's hosts, their traffic weight and health, the batch, and the events as they come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_followed_per_region_and_host() {
    let test = "dashboard_rollout";
    let Some((browser_path, driver_path)) = chromium(test) else { return };
    if !fleet::docker_ready(test) {
        return;
    }
    let (git_server, commit) = GitServer::start_with("site", &[("www/index.html", "v1\n"), ("www/health", "ok\n")]);
    let node = SingleNode::start_with("dashboard-rollout", &["--agent-executor", "shell"]).await;
    let api = fleet::api_for(&node);
    let token = api.registration_token().await;
    let coordinators = [node.grpc_addr()];
    let mut hosts = vec![
        fleet::AgentProcess::register_deploy("eu-1", &coordinators, &token, "eu", "staging", "127.0.42.1"),
        fleet::AgentProcess::register_deploy("us-1", &coordinators, &token, "us", "staging", "127.0.42.2"),
    ];
    for host in &mut hosts {
        host.start();
    }
    api.wait_for_agents(3).await;
    let repo = node
        .post("/api/v1/repos/connect", &node.admin_token, &json!({"repo_url": git_server.url(), "branch": "main", "scm_type": "git"}))
        .await;
    expect_status(&repo, 201, "connect");
    let port = git_server::free_port();
    let pipeline = node
        .post(
            "/api/v1/pipelines",
            &node.admin_token,
            &json!({"name": "site", "repo_id": repo.json["repo_id"], "branch": "main", "build_command": "true", "deploy_strategy": "rolling",
                "environment": "staging", "build": {"artifacts": ["www"]},
                "deploy": {"public_port": port, "container_port": 8080, "artifact": "files", "run_image": "davit/build-base:latest",
                    "start_command": "httpd -f -p 8080 -h www", "health_path": "/health", "health_interval_ms": 200, "healthy_threshold": 2,
                    "batch_size": 1, "keep_old_seconds": 1, "regions": ["eu", "us"]}}),
        )
        .await;
    expect_status(&pipeline, 201, "create the pipeline");
    let pipeline_id = pipeline.json["pipeline_id"].as_u64().unwrap();
    // Staging is protected: the rollout waits for an approval, given on the page.
    expect_status(&node.put("/api/v1/environments/staging", &node.admin_token, &json!({"required_approvals": 1})).await, 200, "protect");

    let chrome = Browser::start(&browser_path, &driver_path).await;
    let client = chrome.client();
    log_in(client, &node, "admin", &node.admin_password).await;
    let deployment = node
        .post(
            "/api/v1/deployments",
            &node.admin_token,
            &json!({"pipeline_id": pipeline_id.to_string(), "commit_hash": commit, "environment": "staging"}),
        )
        .await;
    expect_status(&deployment, 201, "deploy to staging");
    let deployment_id = deployment.json["deployment_id"].as_u64().unwrap();
    client.goto(&node.url(&format!("/deployments/{deployment_id}"))).await.unwrap();
    wait_until(
        client,
        "document.getElementById('action-approve').getClientRects().length > 0",
        "the approve button",
        Duration::from_secs(120),
    )
    .await;
    client.find(Locator::Id("action-approve")).await.unwrap().click().await.unwrap();
    wait_until(
        client,
        "document.querySelector('#regions [data-region=eu] [data-host=eu-1]')",
        "host eu-1 under region eu",
        Duration::from_secs(120),
    )
    .await;
    wait_until(
        client,
        "document.querySelector('#events [data-kind=succeeded], #events [data-kind=failed], #events [data-kind=rolled_back]')",
        "the rollout's end",
        Duration::from_secs(180),
    )
    .await;
    let ended = node.wait_for_status(deployment_id, &["success", "failed", "rolled_back"]).await;
    assert_eq!(ended["status"], "success", "{ended:#}");
    wait_until(
        client,
        "Array.from(document.querySelectorAll('#regions tr[data-host]')).map((tr) => tr.innerText).join('|').split('100 %').length === 3",
        "both hosts at 100 %",
        Duration::from_secs(10),
    )
    .await;
    let regions =
        js(client, "return Array.from(document.querySelectorAll('#regions [data-region]')).map((section) => section.dataset.region);")
            .await;
    assert_eq!(regions, json!(["eu", "us"]));
    let kinds = js(client, "return Array.from(document.querySelectorAll('#events li')).map((li) => li.dataset.kind);").await;
    let kinds: Vec<&str> = kinds.as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert_eq!(kinds.iter().filter(|kind| **kind == "host_switched").count(), 2, "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"succeeded"), "{kinds:?}");
    assert_eq!(kinds[..3], ["queued", "approval_required", "approved"], "approved on the page before it rolled out");
    let batch = js(client, "return document.getElementById('rollout').innerText;").await;
    assert!(batch.as_str().unwrap().contains("2 of 2 hosts switched"), "{batch}");
    check_accessibility(client, "deployment (rollout)").await;
    screenshots(client, "deployment-rollout").await;
    // The environment matrix shows what runs in each region, on which hosts.
    client.goto(&node.url("/environments")).await.unwrap();
    wait_until(
        client,
        "document.querySelector('#matrix [data-region=eu]') && /eu \\(eu-1\\)/.test(document.querySelector('#matrix [data-region=eu]').innerText) && document.querySelector('#matrix [data-region=us]')",
        "regions eu and us in the matrix",
        Duration::from_secs(20),
    )
    .await;
    assert!(js(client, "return document.querySelector('#matrix [data-region=us]').innerText;").await.as_str().unwrap().contains("sha256:"));
    screenshots(client, "environments-rollout").await;
    chrome.close().await;

    for host in &mut hosts {
        host.kill();
    }
    for host in &hosts {
        fleet::remove_releases_of(&host.state_dir);
    }
}

/// An `application/x-www-form-urlencoded` body, as a browser posts a form.
fn form(fields: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new()).extend_pairs(fields).finish()
}

/// The session cookie's attributes, the CSRF header the API demands of cookie-authenticated
/// writes, and login CSRF, over plain HTTP (no browser needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookies_and_csrf_tokens() {
    let node = SingleNode::start("dashboard-session").await;
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).no_proxy().build().unwrap();

    // Pages need a session: the login form comes first, and comes back to the page.
    let page = client.get(node.url("/runs/1")).send().await.unwrap();
    assert_eq!(page.status(), 303);
    assert_eq!(page.headers()["location"], "/login?next=%2Fruns%2F1");

    // A wrong password shows the form again with the API's message.
    let wrong = client
        .post(node.url("/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("username", "admin"), ("password", "nope")]))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.text().await.unwrap().contains("wrong username or password"));
    // A login form posted from another site is refused (login CSRF).
    let foreign = client
        .post(node.url("/login"))
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("username", "admin"), ("password", node.admin_password.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);

    let login = client
        .post(node.url("/login"))
        .header("origin", node.base_url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("username", "admin"), ("password", node.admin_password.as_str()), ("next", "//evil.example/")]))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303);
    assert_eq!(login.headers()["location"], "/", "an off-site next is not followed");
    let set_cookie = login.headers()["set-cookie"].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=3600"] {
        assert!(set_cookie.contains(attribute), "{attribute} missing from {set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "no Secure flag without TLS (the browser would drop it on http)");
    let cookie = set_cookie.split(';').next().unwrap().to_string();

    // The page carries the CSRF token; the API takes the cookie for reads.
    let page = client.get(node.url("/")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
    let html = page.text().await.unwrap();
    let csrf = html.split("name=\"csrf-token\" content=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    assert_eq!(csrf.len(), 64);
    let me = client.get(node.url("/api/v1/auth/me")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(me.status(), 200);

    // A write with the cookie alone is refused; with the page's token it goes through.
    let body = json!({"description": "no csrf"});
    let refused = client.post(node.url("/api/v1/agents/registration-tokens")).header("cookie", &cookie).json(&body).send().await.unwrap();
    assert_eq!(refused.status(), 403);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "csrf_token_missing", "{error}");
    let wrong = client
        .post(node.url("/api/v1/agents/registration-tokens"))
        .header("cookie", &cookie)
        .header("x-csrf-token", "0".repeat(64))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    let accepted = client
        .post(node.url("/api/v1/agents/registration-tokens"))
        .header("cookie", &cookie)
        .header("x-csrf-token", &csrf)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 201, "{}", accepted.text().await.unwrap());
    // Bearer tokens need no CSRF token (no browser sends them by itself).
    let bearer = node.post("/api/v1/agents/registration-tokens", &node.admin_token, &body).await;
    assert_eq!(bearer.status, 201);

    // Logging out needs the token too, and clears the cookie.
    let refused = client
        .post(node.url("/logout"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("csrf", "x")]))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let logout = client
        .post(node.url("/logout"))
        .header("cookie", &cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("csrf", csrf.as_str())]))
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 303);
    assert!(logout.headers()["set-cookie"].to_str().unwrap().starts_with("davit_session=; Path=/; Max-Age=0"));

    // The static files are served with their types; an unknown page is still the API's JSON 404.
    let script = client.get(node.url("/assets/dashboard.js")).send().await.unwrap();
    assert_eq!(script.headers()["content-type"], "text/javascript; charset=utf-8");
    let missing = client.get(node.url("/no-such-page")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
}
