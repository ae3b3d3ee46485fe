//! HTML building for the dashboard's pages: escaping and the page frame (head, navigation,
//! logout form). Every value that comes from a request or the state passes through
//! [`escape`]; the page bodies in `pages.rs` hold only fixed markup and escaped values.

use std::fmt::Write;

use crate::state::records::Role;

/// Text escaped for HTML element content and double-quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// The pages of the navigation bar: (path, label, the role that may read it).
pub const NAVIGATION: &[(&str, &str, Role)] = &[
    ("/", "Pipelines", Role::Viewer),
    ("/environments", "Environments", Role::Viewer),
    ("/delivery", "Delivery", Role::Viewer),
    ("/agents", "Agents", Role::Viewer),
    ("/cluster", "Cluster", Role::Viewer),
    ("/artifacts", "Artifacts", Role::Viewer),
    ("/config", "Configuration", Role::Viewer),
    ("/audit", "Audit log", Role::Admin),
];

/// Who is looking at a page, as the frame shows it.
pub struct Viewer<'a> {
    pub username: &'a str,
    pub role: Role,
    pub csrf_token: &'a str,
}

/// A whole page: `page` names it for the script (`data-page`), `data` are further `data-*`
/// attributes of `<main>` (names are fixed by the caller; values are escaped here), `body` is
/// markup already escaped.
pub fn page(title: &str, page: &str, current: &str, viewer: &Viewer<'_>, data: &[(&str, String)], body: &str) -> String {
    let mut html = String::with_capacity(body.len() + 2048);
    let role = crate::api::extract::role_name(viewer.role);
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta name=\"csrf-token\" content=\"{csrf}\"><title>{title} · Davit</title>\
         <link rel=\"stylesheet\" href=\"/assets/dashboard.css\"></head>\n<body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a>\
         <header class=\"top\"><a class=\"brand\" href=\"/\">Davit</a><nav aria-label=\"Main\"><ul>",
        csrf = escape(viewer.csrf_token),
        title = escape(title),
    );
    for (path, label, needed) in NAVIGATION {
        if viewer.role >= *needed {
            let current_attribute = if *path == current { " aria-current=\"page\"" } else { "" };
            let _ = write!(html, "<li><a href=\"{path}\"{current_attribute}>{label}</a></li>");
        }
    }
    let _ = write!(
        html,
        "</ul></nav><form class=\"logout\" method=\"post\" action=\"/logout\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <span class=\"who\">{user} <span class=\"role\">{role}</span></span>\
         <button type=\"submit\">Log out</button></form></header>\n\
         <main id=\"main\" data-page=\"{page}\" data-role=\"{role}\"",
        csrf = escape(viewer.csrf_token),
        user = escape(viewer.username),
        page = escape(page),
    );
    for (name, value) in data {
        let _ = write!(html, " data-{name}=\"{}\"", escape(value));
    }
    let _ = write!(
        html,
        "><h1>{title}</h1>\n{body}\n<p class=\"live\" role=\"status\" aria-live=\"polite\" id=\"live-status\"></p></main>\n\
         <script src=\"/assets/dashboard.js\"></script></body></html>\n",
        title = escape(title),
    );
    html
}

/// A page for someone not logged in (the login form).
pub fn bare_page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title} · Davit</title>\
         <link rel=\"stylesheet\" href=\"/assets/dashboard.css\"></head>\n<body class=\"bare\">\
         <main id=\"main\">{body}</main></body></html>\n",
        title = escape(title),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_that_could_open_markup_is_escaped() {
        assert_eq!(escape("<script>alert('x') & \"y\"</script>"), "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;");
        assert_eq!(escape("plain ü"), "plain ü");
    }

    #[test]
    fn the_frame_escapes_its_values_and_shows_only_allowed_pages() {
        let viewer = Viewer { username: "<b>vic</b>", role: Role::Viewer, csrf_token: "\"t\"" };
        let html = page("Run <1>", "run", "/", &viewer, &[("deployment-id", "7\"".into())], "<p>body</p>");
        assert!(html.contains("&lt;b&gt;vic&lt;/b&gt;"));
        assert!(html.contains("<title>Run &lt;1&gt; · Davit</title>"));
        assert!(html.contains("data-deployment-id=\"7&quot;\""));
        assert!(html.contains("content=\"&quot;t&quot;\""));
        assert!(!html.contains("/audit"), "a viewer is not shown the audit log");
        let admin = Viewer { username: "admin", role: Role::Admin, csrf_token: "t" };
        let html = page("Pipelines", "pipelines", "/", &admin, &[], "");
        assert!(html.contains("href=\"/audit\""));
        assert!(html.contains("<a href=\"/\" aria-current=\"page\">Pipelines</a>"));
    }
}
