//! The operator console: one page and its script and style, embedded in the
//! binary (no CDN, no outside request: it works on an air-gapped management
//! network). It reads the same JSON API and event stream as any client, with the
//! same token; serving the page itself needs none, as it holds no data.

use axum::{
    extract::Path,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};

const INDEX: &str = include_str!("../../../console/index.html");
const SCRIPT: &str = include_str!("../../../console/console.js");
const STYLE: &str = include_str!("../../../console/console.css");

/// Only this origin, no inline script or style, no framing.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the console.
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

/// `GET /console/{file}`: its script and style.
pub async fn asset_file(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "console.js" => asset("text/javascript; charset=utf-8", SCRIPT),
        "console.css" => asset("text/css; charset=utf-8", STYLE),
        _ => (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    }
}

/// The bytes the console costs a browser (page, script, style).
pub fn size() -> usize {
    INDEX.len() + SCRIPT.len() + STYLE.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_is_small_and_asks_for_nothing_outside() {
        assert!(size() < 200 * 1024, "{} bytes", size());
        for text in [INDEX, SCRIPT, STYLE] {
            assert!(
                !text.contains("http://") && !text.contains("https://"),
                "no outside request"
            );
        }
        assert!(INDEX.contains("/console/console.js") && INDEX.contains("/console/console.css"));
        assert!(
            !INDEX.contains("<script>"),
            "no inline script (the policy forbids it)"
        );
    }
}
