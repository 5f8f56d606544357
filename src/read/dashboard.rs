//! The live dashboard: one HTML page, its script, its style sheet and its icon, compiled into the
//! binary and served by the query service. The page draws what the JSON API returns (every
//! 2 s); it has no data of its own and no build step. Every response carries
//! `Content-Security-Policy: default-src 'self'` (set for all responses in `http.rs`), so
//! the page can run only this script and load only this style sheet, from this origin.

use crate::http::Response;

const PAGE_HTML: &str = include_str!("dashboard/index.html");
const SCRIPT_JS: &str = include_str!("dashboard/dashboard.js");
const STYLE_CSS: &str = include_str!("dashboard/dashboard.css");
/// Linked from the page, so that browsers do not ask for `/favicon.ico` (a 404 each visit).
const ICON_SVG: &str = include_str!("dashboard/favicon.svg");

/// The asset at `path`, if it is one of the dashboard's: `/` and `/dashboard` are the page.
pub fn asset(path: &str) -> Option<(&'static str, Response)> {
    let (route, content_type, body) = match path {
        "/" | "/dashboard" => ("/dashboard", "text/html; charset=utf-8", PAGE_HTML),
        "/dashboard.js" => ("/dashboard.js", "text/javascript; charset=utf-8", SCRIPT_JS),
        "/dashboard.css" => ("/dashboard.css", "text/css; charset=utf-8", STYLE_CSS),
        "/favicon.svg" => ("/favicon.svg", "image/svg+xml", ICON_SVG),
        _ => return None,
    };
    Some((route, Response::asset(content_type, body)))
}
