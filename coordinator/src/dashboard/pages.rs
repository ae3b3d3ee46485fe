//! The markup of each dashboard page: fixed structure (headings, labelled filters, empty
//! tables with their captions, buttons the caller may use) that `dashboard.js` fills from the
//! REST API. Values from requests are escaped with `html::escape`.

use super::html::{bare_page, escape};

const STATUS_OPTIONS: &str = "<option value=\"\">All statuses</option><option value=\"success\">Success</option>\
     <option value=\"failure\">Failure</option><option value=\"pending\">Pending</option>\
     <option value=\"running\">Running</option><option value=\"cancelled\">Cancelled</option>\
     <option value=\"rolled_back\">Rolled back</option>";

/// The login form; `error` is shown above it after a failed attempt.
pub fn login(next: Option<&str>, username: &str, error: Option<&str>) -> String {
    let error = error.map(|message| format!("<p class=\"notice error\" role=\"alert\">{}</p>", escape(message))).unwrap_or_default();
    let next = next.map(|next| format!("<input type=\"hidden\" name=\"next\" value=\"{}\">", escape(next))).unwrap_or_default();
    bare_page(
        "Log in",
        &format!(
            "<form class=\"login card\" method=\"post\" action=\"/login\">\
             <h1>Davit</h1><p>Log in to see pipelines, runs and deployments.</p>{error}{next}\
             <label for=\"username\">Username</label>\
             <input id=\"username\" name=\"username\" autocomplete=\"username\" required value=\"{username}\">\
             <label for=\"password\">Password</label>\
             <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required>\
             <button type=\"submit\" class=\"primary\">Log in</button></form>",
            username = escape(username),
        ),
    )
}

pub fn pipelines() -> String {
    format!(
        "<form class=\"filters\" role=\"search\" aria-label=\"Filter pipelines\">\
         <div><label for=\"filter-text\">Search</label><input id=\"filter-text\" type=\"search\" placeholder=\"pipeline, branch or commit\"></div>\
         <div><label for=\"filter-status\">Status</label><select id=\"filter-status\">{STATUS_OPTIONS}</select></div></form>\
         <div class=\"table-wrap\"><table id=\"pipelines\" class=\"responsive\"><caption>Latest run of each pipeline per branch</caption>\
         <thead><tr><th scope=\"col\">Pipeline</th><th scope=\"col\">Branch</th><th scope=\"col\">Status</th><th scope=\"col\">Run</th>\
         <th scope=\"col\">Commit</th><th scope=\"col\">Environment</th><th scope=\"col\">Started</th><th scope=\"col\">Duration</th></tr></thead>\
         <tbody></tbody></table></div><p class=\"empty\" id=\"pipelines-empty\" hidden>No runs match.</p>"
    )
}

pub fn run(deployment_id: u64) -> String {
    format!(
        "<p><a href=\"/deployments/{deployment_id}\">Deployment progress of this run</a></p>\
         <section aria-labelledby=\"summary-heading\"><h2 id=\"summary-heading\">Summary</h2><dl id=\"summary\" class=\"summary\"></dl></section>\
         <section aria-labelledby=\"jobs-heading\"><h2 id=\"jobs-heading\">Jobs and steps</h2><div id=\"jobs\"></div></section>\
         <section aria-labelledby=\"log-heading\"><h2 id=\"log-heading\">Log</h2>\
         <form class=\"filters\" role=\"search\" aria-label=\"Search the log\">\
         <div><label for=\"log-search\">Search the log</label><input id=\"log-search\" type=\"search\"></div>\
         <div><label for=\"log-level\">Level</label><select id=\"log-level\"><option value=\"\">All levels</option>\
         <option value=\"ERROR\">Errors</option><option value=\"WARNING\">Warnings</option><option value=\"INFO\">Info</option>\
         <option value=\"DEBUG\">Debug</option></select></div>\
         <div><a class=\"button\" id=\"log-download\" href=\"/api/v1/logs/{deployment_id}?format=raw\" download=\"run-{deployment_id}.log\">Download raw log</a></div></form>\
         <p id=\"log-count\" class=\"muted\"></p>\
         <ol id=\"log\" class=\"log\" aria-label=\"Log lines\"></ol></section>\
         <section aria-labelledby=\"artifacts-heading\"><h2 id=\"artifacts-heading\">Artifacts</h2>\
         <div class=\"table-wrap\"><table id=\"run-artifacts\" class=\"responsive\"><caption>Artifacts this run produced</caption>\
         <thead><tr><th scope=\"col\">Artifact</th><th scope=\"col\">Digest</th><th scope=\"col\">Size</th><th scope=\"col\">Created</th><th scope=\"col\">Download</th></tr></thead>\
         <tbody></tbody></table></div></section>"
    )
}

/// Which of the deployment page's buttons the caller may use (the API's own rules).
pub struct DeploymentActions {
    pub approve: bool,
    pub cancel: bool,
    pub rollback: bool,
}

pub fn deployment(deployment_id: u64, actions: &DeploymentActions) -> String {
    let mut buttons = String::new();
    if actions.approve {
        buttons.push_str("<button type=\"button\" class=\"primary\" id=\"action-approve\" data-action=\"approve\" hidden>Approve</button>");
    }
    if actions.cancel {
        buttons.push_str("<button type=\"button\" class=\"danger\" id=\"action-cancel\" data-action=\"cancel\" hidden>Cancel</button>");
    }
    if actions.rollback {
        buttons.push_str("<button type=\"button\" id=\"action-rollback\" data-action=\"rollback\" hidden>Roll back</button>");
    }
    format!(
        "<p><a href=\"/runs/{deployment_id}\">Build, log and artifacts of this run</a></p>\
         <div class=\"actions\" id=\"actions\">{buttons}</div><p id=\"action-result\" role=\"status\"></p>\
         <section aria-labelledby=\"summary-heading\"><h2 id=\"summary-heading\">Summary</h2><dl id=\"summary\" class=\"summary\"></dl></section>\
         <section aria-labelledby=\"rollout-heading\"><h2 id=\"rollout-heading\">Rollout</h2><dl id=\"rollout\" class=\"summary\"></dl>\
         <div id=\"regions\"></div></section>\
         <section aria-labelledby=\"events-heading\"><h2 id=\"events-heading\">Events</h2><ol id=\"events\" class=\"events\"></ol></section>"
    )
}

pub fn environments() -> String {
    "<p class=\"muted\">What runs where: the last successful release of each pipeline in each environment, by region.</p>\
     <div class=\"table-wrap\"><table id=\"matrix\" class=\"matrix responsive\"><caption>Versions by pipeline and environment</caption>\
     <thead></thead><tbody></tbody></table></div>\
     <h2>Environments</h2><div class=\"table-wrap\"><table id=\"environment-settings\" class=\"responsive\"><caption>Protection of each environment</caption>\
     <thead><tr><th scope=\"col\">Environment</th><th scope=\"col\">Promotes from</th><th scope=\"col\">Approvals</th><th scope=\"col\">Branches</th><th scope=\"col\">Updated</th></tr></thead>\
     <tbody></tbody></table></div>"
        .to_string()
}

pub fn delivery() -> String {
    "<form class=\"filters\" id=\"delivery-filters\" aria-label=\"Choose the range\">\
     <div><label for=\"delivery-range\">Range</label><select id=\"delivery-range\"><option value=\"7\">Last 7 days</option>\
     <option value=\"30\" selected>Last 30 days</option><option value=\"90\">Last 90 days</option><option value=\"365\">Last year</option></select></div>\
     <div><label for=\"delivery-pipeline\">Pipeline</label><select id=\"delivery-pipeline\"><option value=\"\">All pipelines</option></select></div>\
     <div><label for=\"delivery-environment\">Environment</label><select id=\"delivery-environment\"><option value=\"production\">production</option></select></div></form>\
     <p id=\"delivery-source\" class=\"muted\"></p>\
     <div class=\"tiles\" id=\"delivery-summary\"></div>\
     <div class=\"charts\">\
     <figure><figcaption>Deployments: successful in blue, failed or rolled back in red</figcaption><div class=\"chart\" id=\"chart-deployments\"></div></figure>\
     <figure><figcaption>Lead time from commit to production, median</figcaption><div class=\"chart\" id=\"chart-lead-time\"></div></figure>\
     <figure><figcaption>Change failure rate (%)</figcaption><div class=\"chart\" id=\"chart-failure-rate\"></div></figure>\
     <figure><figcaption>Time to restore, mean</figcaption><div class=\"chart\" id=\"chart-restore\"></div></figure></div>"
        .to_string()
}

pub fn agents() -> String {
    "<form class=\"filters\" role=\"search\" aria-label=\"Filter agents\"><div><label for=\"agent-filter\">Search</label>\
     <input id=\"agent-filter\" type=\"search\" placeholder=\"name or label\"></div></form>\
     <div class=\"table-wrap\"><table id=\"agents\" class=\"responsive\"><caption>Registered agents</caption>\
     <thead><tr><th scope=\"col\">Agent</th><th scope=\"col\">State</th><th scope=\"col\">Labels</th><th scope=\"col\">Running jobs</th>\
     <th scope=\"col\">Capacity</th><th scope=\"col\">Executors</th><th scope=\"col\">Version</th><th scope=\"col\">Connected</th></tr></thead>\
     <tbody></tbody></table></div>"
        .to_string()
}

pub fn cluster() -> String {
    "<dl id=\"cluster-summary\" class=\"summary\"></dl>\
     <div class=\"table-wrap\"><table id=\"cluster-nodes\" class=\"responsive\"><caption>Coordinators</caption>\
     <thead><tr><th scope=\"col\">Node</th><th scope=\"col\">Region</th><th scope=\"col\">Role</th><th scope=\"col\">HTTP</th>\
     <th scope=\"col\">Acknowledged index</th><th scope=\"col\">Replication lag</th><th scope=\"col\">Health</th></tr></thead>\
     <tbody></tbody></table></div>"
        .to_string()
}

pub fn artifacts() -> String {
    "<form class=\"filters\" role=\"search\" aria-label=\"Filter artifacts\"><div><label for=\"artifact-filter\">Search</label>\
     <input id=\"artifact-filter\" type=\"search\" placeholder=\"pipeline, version or digest\"></div></form>\
     <div class=\"table-wrap\"><table id=\"artifacts\" class=\"responsive\"><caption>Stored artifacts, newest first</caption>\
     <thead><tr><th scope=\"col\">Artifact</th><th scope=\"col\">Pipeline</th><th scope=\"col\">Version</th><th scope=\"col\">Run</th>\
     <th scope=\"col\">Digest</th><th scope=\"col\">Size</th><th scope=\"col\">Created</th><th scope=\"col\">Download</th></tr></thead>\
     <tbody></tbody></table></div>"
        .to_string()
}

pub fn configuration() -> String {
    "<form class=\"filters\" aria-label=\"Choose the environment\"><div><label for=\"config-environment\">Environment</label>\
     <select id=\"config-environment\"></select></div></form>\
     <p class=\"muted\">Secret values are never shown: the API answers them as ***.</p>\
     <div class=\"table-wrap\"><table id=\"config\" class=\"responsive\"><caption>Variables of the environment</caption>\
     <thead><tr><th scope=\"col\">Key</th><th scope=\"col\">Value</th><th scope=\"col\">Kind</th><th scope=\"col\">Scope</th></tr></thead>\
     <tbody></tbody></table></div>"
        .to_string()
}

pub fn audit() -> String {
    "<form class=\"filters\" role=\"search\" aria-label=\"Filter the audit log\"><div><label for=\"audit-filter\">Search</label>\
     <input id=\"audit-filter\" type=\"search\" placeholder=\"action or details\"></div></form>\
     <p id=\"audit-verify\" class=\"muted\"></p>\
     <div class=\"table-wrap\"><table id=\"audit\" class=\"responsive\"><caption>Audit entries, newest first</caption>\
     <thead><tr><th scope=\"col\">Entry</th><th scope=\"col\">Time</th><th scope=\"col\">User</th><th scope=\"col\">Action</th>\
     <th scope=\"col\">Details</th><th scope=\"col\">Source</th></tr></thead><tbody></tbody></table></div>"
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_viewer_gets_no_action_buttons() {
        let none = deployment(3, &DeploymentActions { approve: false, cancel: false, rollback: false });
        assert!(!none.contains("<button"), "{none}");
        let all = deployment(3, &DeploymentActions { approve: true, cancel: true, rollback: true });
        for id in ["action-approve", "action-cancel", "action-rollback"] {
            assert!(all.contains(id), "{id}");
        }
    }

    #[test]
    fn the_login_form_escapes_what_it_echoes() {
        let html = login(Some("/runs/1\"><script>"), "<img>", Some("wrong <b>"));
        assert!(html.contains("value=\"/runs/1&quot;&gt;&lt;script&gt;\""));
        assert!(html.contains("value=\"&lt;img&gt;\""));
        assert!(html.contains("wrong &lt;b&gt;"));
        assert!(html.contains("<label for=\"username\">") && html.contains("<label for=\"password\">"));
    }
}
