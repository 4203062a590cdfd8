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

/// The account a request was authenticated as (the API's Basic login), for the logs.
#[derive(Clone, Debug)]
pub struct AdminUser(pub String);

/// Paths the pages own; everything else is the API, with its own authentication.
pub fn is_page_path(path: &str) -> bool {
    path == "/"
        || path == "/login"
        || path == "/logout"
        || path == "/ui"
        || path.starts_with("/ui/")
        || path.starts_with("/assets/")
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
        .route(
            "/ui/configuration",
            get(pages::configuration).post(pages::save_configuration),
        )
        .route("/ui/service/{slug}", get(pages::service))
        .route("/ui/service/{slug}/live", get(pages::service_live))
        .route("/assets/{file}", get(asset))
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

/// Refuses a change without this session's CSRF token (form field `csrf` or the
/// `X-CSRF-Token` header htmx sends).
pub(crate) fn check_csrf(
    who: &Authed,
    headers: &HeaderMap,
    field: Option<&str>,
) -> Result<(), Response> {
    let sent = field.map(str::to_string).or_else(|| {
        headers
            .get("X-CSRF-Token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    });
    match sent {
        Some(t) if same_token(&t, &who.csrf) => Ok(()),
        _ => {
            tracing::warn!(target: "management.admin", event = "Change refused", user = %who.user, reason = "missing or wrong CSRF token", "");
            Err((
                StatusCode::FORBIDDEN,
                "refused: the form's security token is missing or wrong (reload the page and try again)",
            )
                .into_response())
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
    if let Err(r) = check_csrf(&who, &headers, form.csrf.as_deref()) {
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
