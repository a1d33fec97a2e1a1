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
#[cfg(test)]
fn size() -> usize {
    INDEX.len() + SCRIPT.len() + STYLE.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relative luminance of a `#rgb` or `#rrggbb` colour (WCAG 2).
    fn luminance(hex: &str) -> f64 {
        let hex = hex.trim_start_matches('#');
        let hex: String = if hex.len() == 3 {
            hex.chars().flat_map(|c| [c, c]).collect()
        } else {
            hex.to_owned()
        };
        let channel = |i: usize| {
            let c = f64::from(u8::from_str_radix(&hex[i..i + 2], 16).unwrap()) / 255.0;
            if c <= 0.039_28 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * channel(0) + 0.7152 * channel(2) + 0.0722 * channel(4)
    }

    fn contrast(a: &str, b: &str) -> f64 {
        let (a, b) = (luminance(a), luminance(b));
        (a.max(b) + 0.05) / (a.min(b) + 0.05)
    }

    /// A `--name: #colour;` variable of the stylesheet's :root.
    fn colour(name: &str) -> String {
        let start = STYLE
            .find(&format!("--{name}:"))
            .unwrap_or_else(|| panic!("--{name}"));
        STYLE[start..]
            .split(':')
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn every_text_colour_is_readable_on_its_background() {
        // WCAG AA asks 4.5:1 for body text; every pair the console uses clears 6.5:1.
        let pairs = [
            (colour("fg"), colour("bg")),
            (colour("muted"), "#fff".to_owned()),
            (colour("accent"), "#fff".to_owned()),
            (colour("accent"), "#e6eef7".to_owned()),
            (colour("bad"), "#fff".to_owned()),
            (colour("bad"), "#fde8e6".to_owned()),
            (colour("warn"), "#fff4d6".to_owned()),
            (colour("warn"), "#fff".to_owned()),
            (colour("ok"), "#fff".to_owned()),
        ];
        for (text, background) in pairs {
            assert!(
                STYLE.contains(&background),
                "{background} is a background the stylesheet uses"
            );
            let ratio = contrast(&text, &background);
            assert!(ratio >= 6.5, "{text} on {background}: {ratio:.1}:1");
        }
    }

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
