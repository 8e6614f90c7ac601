//! `/portal/`: the admin portal, a static single-page app compiled into the binary. It calls
//! the REST API with the bearer token the user logs in with; nothing is loaded from
//! elsewhere, so it works with no network. Every response carries a strict
//! Content-Security-Policy (scripts and styles from these files only, no inline code).

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse};

/// Scripts, styles and API calls from this origin only; no inline code, no plugins, no
/// framing. `blob:` images/downloads are the portal's own CSV exports.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; font-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The portal's files: (name, content type, body).
const FILES: &[(&str, &str, &str)] = &[
    ("index.html", "text/html; charset=utf-8", include_str!("../../portal/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("../../portal/app.js")),
    ("chart.js", "text/javascript; charset=utf-8", include_str!("../../portal/chart.js")),
    ("portal.css", "text/css; charset=utf-8", include_str!("../../portal/portal.css")),
    ("favicon.svg", "image/svg+xml", include_str!("../../portal/favicon.svg")),
];

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/portal", web::get().to(redirect))
        .route("/portal/", web::get().to(index))
        .route("/portal/{file}", web::get().to(file));
}

async fn redirect() -> HttpResponse {
    HttpResponse::MovedPermanently().insert_header((header::LOCATION, "/portal/")).finish()
}

async fn index(req: HttpRequest) -> HttpResponse {
    serve(&req, "index.html")
}

async fn file(req: HttpRequest, name: web::Path<String>) -> HttpResponse {
    serve(&req, &name)
}

fn serve(req: &HttpRequest, name: &str) -> HttpResponse {
    let Some((_, content_type, body)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        return with_headers(HttpResponse::NotFound()).content_type("text/plain").body("not found\n");
    };
    // The files change only with the binary: its version and the body's length make a
    // cheap validator, so reloads cost a 304.
    let etag = format!("\"{}-{}-{:x}\"", env!("CARGO_PKG_VERSION"), body.len(), fnv(body.as_bytes()));
    let fresh = req.headers().get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(etag.as_str());
    let mut resp = with_headers(if fresh { HttpResponse::NotModified() } else { HttpResponse::Ok() });
    resp.insert_header((header::ETAG, etag)).insert_header((header::CACHE_CONTROL, "no-cache"));
    if fresh {
        resp.finish()
    } else {
        resp.content_type(*content_type).body(*body)
    }
}

fn with_headers(mut resp: actix_web::HttpResponseBuilder) -> actix_web::HttpResponseBuilder {
    resp.insert_header((header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"));
    resp
}

/// FNV-1a: a fingerprint of a file for its ETag (not a security property).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{test as web_test, App};

    #[actix_web::test]
    async fn files_are_served_with_a_strict_policy_and_unknown_ones_are_not() {
        let app = web_test::init_service(App::new().configure(configure)).await;
        for (path, ty) in [("/portal/", "text/html"), ("/portal/app.js", "text/javascript")] {
            let resp =
                web_test::call_service(&app, web_test::TestRequest::get().uri(path).to_request()).await;
            assert_eq!(resp.status(), 200, "{path}");
            assert!(resp.headers().get(header::CONTENT_TYPE).unwrap().to_str().unwrap().starts_with(ty));
            let csp = resp.headers().get(header::CONTENT_SECURITY_POLICY).unwrap().to_str().unwrap();
            assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
            let etag = resp.headers().get(header::ETAG).unwrap().clone();
            let again = web_test::TestRequest::get().uri(path).insert_header((header::IF_NONE_MATCH, etag));
            assert_eq!(web_test::call_service(&app, again.to_request()).await.status(), 304);
        }
        let resp = web_test::call_service(
            &app,
            web_test::TestRequest::get().uri("/portal/../Cargo.toml").to_request(),
        )
        .await;
        assert_eq!(resp.status(), 404);
        let resp =
            web_test::call_service(&app, web_test::TestRequest::get().uri("/portal").to_request()).await;
        assert_eq!(resp.headers().get(header::LOCATION).unwrap(), "/portal/");
    }

    #[test]
    fn index_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere() {
        let html = FILES[0].2;
        assert!(!html.contains("<script>") && !html.contains("style=") && !html.contains("<style"));
        for (name, _, body) in FILES {
            // The SVG namespace is a name, not a place anything is loaded from.
            let body = body.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "{name} refers to another origin"
            );
        }
    }
}
