//! The web pages (OP-3), on the HTTPS admin port beside the JSON API they are drawn from.
//!
//! Every page asks the node's own API router in process (`/api/v1/…`, the requests the CLI
//! makes), so a page shows what `xstatus` shows and a change made here goes the way
//! `xconfiguration set` goes, to the configuration primary when this peer is a subordinate.
//! Pages are server-rendered (maud); htmx, vendored, refreshes the live parts. A login form
//! starts a session (cookie); every change carries the session's CSRF token.

mod pages;
mod session;

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt as _;

use crate::https::{AuthState, LoginRefused};
use session::{cookie, same_token, set_cookie, Sessions, LOGIN_COOKIE, SESSION_COOKIE};

/// A page a hosted service adds (the database cluster, HA): its place in the menu, and the
/// API it is drawn from. The status answer's `text_key` holds the seed's text layout,
/// shown as it is; an `events` list, if any, is shown as a table.
#[derive(Clone, Debug)]
pub struct ServicePage {
    /// `/ui/service/<slug>`
    pub slug: &'static str,
    pub title: &'static str,
    /// GET, answered with JSON.
    pub status_api: &'static str,
    pub text_key: &'static str,
}

/// The client's address, put in by the HTTPS layer (the login throttle is per address).
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub IpAddr);

/// Paths the pages own; everything else is the API, with its own authentication.
pub fn is_page_path(path: &str) -> bool {
    path == "/"
        || path == "/login"
        || path == "/logout"
        || path == "/ui"
        || path.starts_with("/ui/")
        || path.starts_with("/assets/")
        || path == "/favicon.ico"
}

pub(crate) struct Web {
    api: Router,
    auth: AuthState,
    sessions: Sessions,
    pages: Vec<ServicePage>,
}

type Shared = Arc<Web>;

pub(crate) fn router(api: Router, auth: AuthState, pages: Vec<ServicePage>) -> Router {
    let web = Arc::new(Web {
        api,
        auth,
        sessions: Sessions::default(),
        pages,
    });
    Router::new()
        .route("/", get(root))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/ui/overview", get(pages::overview))
        .route("/ui/overview/live", get(pages::overview_live))
        .route(
            "/ui/clustering",
            get(pages::clustering).post(pages::save_clustering),
        )
        .route("/ui/alarms", get(pages::alarms))
        .route("/ui/alarms/live", get(pages::alarms_live))
        .route("/ui/registrations", get(pages::registrations))
        .route("/ui/calls", get(pages::calls))
        .route("/ui/zones", get(pages::zones))
        .route("/ui/zones/live", get(pages::zones_live))
        .route(
            "/ui/configuration",
            get(pages::configuration).post(pages::save_configuration),
        )
        .route("/ui/service/{slug}", get(pages::service))
        .route("/ui/service/{slug}/live", get(pages::service_live))
        .route("/assets/{file}", get(asset))
        // Asked for by every browser: answered here, not by the API's password challenge.
        .route("/favicon.ico", get(|| async { StatusCode::NOT_FOUND }))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(web)
}

/// What every page answer carries: no framing by other sites, no caching of status.
async fn security_headers(request: Request<Body>, next: axum::middleware::Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
    }
    response
}

/// A logged-in request: who, and the session's CSRF token for the page's forms.
pub(crate) struct Authed {
    pub user: String,
    pub csrf: String,
    pub ip: Option<IpAddr>,
}

/// Not logged in: a page goes to the login form; a live fragment tells htmx to go there.
pub(crate) struct ToLogin {
    fragment: bool,
}

impl IntoResponse for ToLogin {
    fn into_response(self) -> Response {
        if self.fragment {
            let mut r = StatusCode::UNAUTHORIZED.into_response();
            r.headers_mut()
                .insert("HX-Redirect", header::HeaderValue::from_static("/login"));
            r
        } else {
            Redirect::to("/login").into_response()
        }
    }
}

impl FromRequestParts<Shared> for Authed {
    type Rejection = ToLogin;

    async fn from_request_parts(parts: &mut Parts, web: &Shared) -> Result<Self, ToLogin> {
        let fragment = parts.headers.contains_key("HX-Request");
        let session = cookie(&parts.headers, SESSION_COOKIE)
            .and_then(|t| web.sessions.get(&t))
            .ok_or(ToLogin { fragment })?;
        Ok(Authed {
            user: session.user,
            csrf: session.csrf,
            ip: parts.extensions.get::<ClientIp>().map(|c| c.0),
        })
    }
}

/// The refusal of a change without this session's CSRF token (form field `csrf` or the
/// `X-CSRF-Token` header htmx sends); None when the token is right.
pub(crate) fn csrf_refusal(
    who: &Authed,
    headers: &HeaderMap,
    field: Option<&str>,
) -> Option<Response> {
    let sent = field.map(str::to_string).or_else(|| {
        headers
            .get("X-CSRF-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    match sent {
        Some(t) if same_token(&t, &who.csrf) => None,
        _ => {
            tracing::warn!(target: "management.admin", event = "Change refused", user = %who.user, reason = "missing or wrong CSRF token", "");
            Some(
                (
                    StatusCode::FORBIDDEN,
                    "refused: the form's security token is missing or wrong (reload the page and try again)",
                )
                    .into_response(),
            )
        }
    }
}

impl Web {
    /// One request to the node's own API, as the CLI would make it.
    pub(crate) async fn api(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "causeway");
        let body = match body {
            Some(b) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        let request = request
            .body(body)
            .map_err(|e| format!("building the request for {path}: {e}"))?;
        let response = match self.api.clone().oneshot(request).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 64 * 1024 * 1024)
            .await
            .map_err(|e| format!("reading the answer of {path}: {e}"))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(value)
        } else if let Some(why) = value["error"].as_str() {
            Err(why.to_string())
        } else if status == StatusCode::NOT_FOUND {
            Err("this peer does not run the service that answers this".to_string())
        } else {
            Err(format!("the node answered {status}"))
        }
    }

    pub(crate) fn pages(&self) -> &[ServicePage] {
        &self.pages
    }
}

async fn root(State(web): State<Shared>, headers: HeaderMap) -> Redirect {
    let logged_in = cookie(&headers, SESSION_COOKIE)
        .and_then(|t| web.sessions.get(&t))
        .is_some();
    Redirect::to(if logged_in { "/ui/overview" } else { "/login" })
}

async fn login_page() -> Response {
    let token = session::random_token();
    let mut r = pages::login_form(&token, None).into_response();
    if let Ok(v) = set_cookie(LOGIN_COOKIE, &token, None).parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct LoginForm {
    user: String,
    password: String,
    #[serde(default)]
    login_token: String,
}

async fn login(
    State(web): State<Shared>,
    headers: HeaderMap,
    parts: axum::extract::Extension<ClientIp>,
    Form(form): Form<LoginForm>,
) -> Response {
    let ip = parts.0 .0;
    // The form's token must match the cookie set with it: another site cannot post a login.
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if expected.is_empty() || !same_token(&expected, &form.login_token) {
        return (
            StatusCode::FORBIDDEN,
            pages::login_form(
                &form.login_token,
                Some("the login form expired: reload the page and log in again"),
            ),
        )
            .into_response();
    }
    match web.auth.login(ip, &form.user, &form.password).await {
        Ok(()) => {
            let token = web.sessions.start(&form.user);
            tracing::info!(target: "management.admin", event = "Admin login", user = %form.user, src_ip = %ip, via = "web", "");
            let mut r = Redirect::to("/ui/overview").into_response();
            let h = r.headers_mut();
            for c in [
                set_cookie(SESSION_COOKIE, &token, None),
                set_cookie(LOGIN_COOKIE, "", Some(std::time::Duration::ZERO)),
            ] {
                if let Ok(v) = c.parse() {
                    h.append(header::SET_COOKIE, v);
                }
            }
            r
        }
        Err(LoginRefused(status, why)) => {
            (status, pages::login_form(&form.login_token, Some(why))).into_response()
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: Option<String>,
}

async fn logout(
    State(web): State<Shared>,
    who: Authed,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(r) = csrf_refusal(&who, &headers, form.csrf.as_deref()) {
        return r;
    }
    if let Some(t) = cookie(&headers, SESSION_COOKIE) {
        web.sessions.end(&t);
    }
    tracing::info!(target: "management.admin", event = "Admin logout", user = %who.user, via = "web", "");
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) = set_cookie(SESSION_COOKIE, "", Some(std::time::Duration::ZERO)).parse() {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

const HTMX: &str = include_str!("../../assets/htmx-2.0.11.min.js");
const STYLE: &str = include_str!("../../assets/style.css");
const APP: &str = include_str!("../../assets/app.js");

async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "htmx.min.js" => (HTMX, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE, "text/css; charset=utf-8"),
        "app.js" => (APP, "text/javascript; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            // Built into the binary: the same for as long as this version runs.
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// `?q=…&peer=…&page=…` of the list pages.
#[derive(Deserialize, Default)]
pub(crate) struct ListQuery {
    #[serde(default)]
    pub q: String,
    #[serde(default)]
    pub peer: String,
    #[serde(default)]
    pub page: usize,
}

pub(crate) type ListParams = Query<ListQuery>;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::StatusCode;
    use serde_json::json;

    use super::*;

    const PASSWORD: &str = "correct horse battery";

    /// The pages over a stand-in API that counts the changes it is asked for.
    fn app(dir: &std::path::Path, changes: Arc<AtomicUsize>) -> Router {
        let api = Router::new()
            .route(
                "/api/v1/configuration",
                get(|| async {
                    axum::Json(json!({ "system_name": "t", "items": [{
                        "path": "sip.domains", "value": "a.example", "peer_specific": false,
                        "restart_required": false, "about": "domains" }] }))
                })
                .post(move || {
                    changes.fetch_add(1, Ordering::SeqCst);
                    async {
                        axum::Json(json!({ "path": "sip.domains", "value": "b.example",
                            "revision": 2, "confirmed": [3, 3], "restart_required": false }))
                    }
                }),
            )
            .route(
                "/api/v1/status/cluster",
                get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "") }),
            );
        router(api, AuthState::new(dir.to_path_buf()), Vec::new())
    }

    struct Answer {
        status: StatusCode,
        headers: HeaderMap,
        body: String,
    }

    async fn send(app: &Router, method: &str, path: &str, cookies: &str, form: &str) -> Answer {
        let mut r = Request::builder()
            .method(method)
            .uri(path)
            .header(header::COOKIE, cookies)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if path.ends_with("/live") {
            r = r.header("HX-Request", "true");
        }
        let mut request = r.body(Body::from(form.to_string())).unwrap();
        request
            .extensions_mut()
            .insert(ClientIp("127.0.0.9".parse().unwrap()));
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    fn set_cookies(a: &Answer) -> Vec<String> {
        a.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    fn cookie_value(set: &[String], name: &str) -> String {
        set.iter()
            .find_map(|c| c.strip_prefix(&format!("{name}=")))
            .and_then(|c| c.split(';').next())
            .unwrap()
            .to_string()
    }

    async fn log_in(app: &Router, password: &str) -> Answer {
        let form = send(app, "GET", "/login", "", "").await;
        let token = cookie_value(&set_cookies(&form), LOGIN_COOKIE);
        send(
            app,
            "POST",
            "/login",
            &format!("{LOGIN_COOKIE}={token}"),
            &format!(
                "user=admin&password={}&login_token={token}",
                password.replace(' ', "+")
            ),
        )
        .await
    }

    #[tokio::test]
    async fn every_page_without_a_session_goes_to_the_login_form() {
        let dir = tempfile::tempdir().unwrap();
        let app = app(dir.path(), Arc::default());
        for path in [
            "/ui/overview",
            "/ui/clustering",
            "/ui/alarms",
            "/ui/registrations",
            "/ui/calls",
            "/ui/zones",
            "/ui/configuration",
            "/ui/service/ha",
        ] {
            let a = send(&app, "GET", path, "", "").await;
            assert_eq!(a.status, StatusCode::SEE_OTHER, "{path}");
            assert_eq!(a.headers[header::LOCATION], "/login", "{path}");
        }
        // A live part polled by htmx is told to go to the login form.
        let a = send(&app, "GET", "/ui/overview/live", "", "").await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(a.headers["HX-Redirect"], "/login");
        let a = send(&app, "GET", "/", "causeway_session=made-up", "").await;
        assert_eq!(a.headers[header::LOCATION], "/login");
    }

    #[tokio::test]
    async fn a_login_needs_the_forms_token_and_the_right_password_and_is_throttled() {
        let dir = tempfile::tempdir().unwrap();
        crate::users::set_password(dir.path(), "admin", PASSWORD).unwrap();
        let app = app(dir.path(), Arc::default());
        // Posted from elsewhere: no login cookie matching the form.
        let a = send(
            &app,
            "POST",
            "/login",
            "",
            &format!("user=admin&password={PASSWORD}&login_token=x"),
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN);
        let a = log_in(&app, "wrong password!").await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert!(a.body.contains("wrong user name or password"), "{}", a.body);
        assert!(set_cookies(&a)
            .iter()
            .all(|c| !c.starts_with(SESSION_COOKIE)));
        let a = log_in(&app, PASSWORD).await;
        assert_eq!(a.status, StatusCode::SEE_OTHER);
        let session = set_cookies(&a)
            .into_iter()
            .find(|c| c.starts_with(SESSION_COOKIE))
            .expect("a session cookie");
        for part in ["Secure", "HttpOnly", "SameSite=Strict"] {
            assert!(session.contains(part), "{session}");
        }
        // Four more wrong ones reach the limit; then even the right one waits.
        for _ in 0..4 {
            assert_eq!(
                log_in(&app, "wrong password!").await.status,
                StatusCode::UNAUTHORIZED
            );
        }
        let a = log_in(&app, PASSWORD).await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    }

    #[tokio::test]
    async fn every_change_without_the_sessions_csrf_token_is_refused_before_it_is_made() {
        let dir = tempfile::tempdir().unwrap();
        crate::users::set_password(dir.path(), "admin", PASSWORD).unwrap();
        let changes = Arc::new(AtomicUsize::new(0));
        let app = app(dir.path(), changes.clone());
        let login = log_in(&app, PASSWORD).await;
        let cookie = format!(
            "{SESSION_COOKIE}={}",
            cookie_value(&set_cookies(&login), SESSION_COOKIE)
        );
        let page = send(&app, "GET", "/ui/configuration", &cookie, "").await;
        assert_eq!(page.status, StatusCode::OK);
        let csrf = page
            .body
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("the page's forms carry the token")
            .to_string();
        let change = "path=sip.domains&value=b.example&action=set";
        for (path, form) in [
            ("/ui/configuration", change.to_string()),
            ("/ui/configuration", format!("{change}&csrf=wrong")),
            ("/ui/clustering", "cluster_name=x".to_string()),
            ("/logout", String::new()),
        ] {
            let a = send(&app, "POST", path, &cookie, &form).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{path} {form}");
        }
        assert_eq!(changes.load(Ordering::SeqCst), 0, "nothing reached the API");
        let a = send(
            &app,
            "POST",
            "/ui/configuration",
            &cookie,
            &format!("{change}&csrf={csrf}"),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        assert!(
            a.body.contains("sip.domains set to b.example"),
            "{}",
            a.body
        );
        assert_eq!(changes.load(Ordering::SeqCst), 1);
        // Logging out with the token ends the session.
        let a = send(&app, "POST", "/logout", &cookie, &format!("csrf={csrf}")).await;
        assert_eq!(a.headers[header::LOCATION], "/login");
        let a = send(&app, "GET", "/ui/configuration", &cookie, "").await;
        assert_eq!(a.headers[header::LOCATION], "/login");
    }
}
