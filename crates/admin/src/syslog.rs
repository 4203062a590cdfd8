//! `GET /api/v1/syslog`: the node's recent log lines, and with `follow` the lines as they
//! are written (a streamed body), for `causeway syslog follow`.
//!
//! `?lines=N` (default [`DEFAULT_LINES`], at most [`TAP_LINES`]) gives the last N lines,
//! text/plain, one a line. `&follow=true` keeps the body open (chunked) and sends each new
//! line as it is written, until the client goes away or the node stops (it closes the
//! tap's followers: the graceful shutdown waits for open responses, so a follow must end
//! then). A
//! follower that falls more than [`causeway_common::logging::TAP_BACKLOG`] lines behind
//! gets one line saying how many it missed and goes on with newer ones: logging never
//! waits for a reader.
//!
//! The lines come from the process's log tap ([`causeway_common::logging::tap`]), so the
//! route needs no state. Over HTTPS it sits behind the API's authentication like every
//! other `/api/v1` route.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::Query;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use causeway_common::logging::{tap, Followed, Follower, TAP_LINES};
use serde::Deserialize;

/// Lines sent when `lines` is not given.
pub const DEFAULT_LINES: usize = 20;

/// Bytes of lines gathered into one chunk of a followed body.
const CHUNK: usize = 64 * 1024;

pub fn router() -> axum::Router {
    axum::Router::new().route("/api/v1/syslog", get(syslog))
}

#[derive(Deserialize)]
struct Params {
    lines: Option<usize>,
    #[serde(default)]
    follow: bool,
}

async fn syslog(Query(params): Query<Params>) -> Response {
    let n = params.lines.unwrap_or(DEFAULT_LINES).min(TAP_LINES);
    let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !params.follow {
        return (text, join(&tap().recent(n))).into_response();
    }
    let (recent, follower) = tap().follow(n);
    let first = join(&recent);
    let state = Stream {
        first: (!first.is_empty()).then_some(first),
        follower,
    };
    let body = futures_util::stream::unfold(state, |mut s| async move {
        let chunk = s.next_chunk().await?;
        Some((Ok::<_, Infallible>(Bytes::from(chunk)), s))
    });
    (
        text,
        [(header::CACHE_CONTROL, "no-store")],
        Body::from_stream(body),
    )
        .into_response()
}

/// Each line followed by a newline.
fn join(lines: &[Arc<str>]) -> String {
    let mut out = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for line in lines {
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn missed(n: u64) -> String {
    format!("causeway: {n} log lines skipped: this follower fell behind\n")
}

struct Stream {
    first: Option<String>,
    follower: Follower,
}

impl Stream {
    /// The next piece of the body: the lines waiting (at least one), or `None` at the end.
    async fn next_chunk(&mut self) -> Option<String> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        let mut out = piece(self.follower.next().await)?;
        // Whatever else is already waiting goes in the same chunk.
        while out.len() < CHUNK {
            match self.follower.try_next() {
                None => break,
                Some(next) => match piece(next) {
                    Some(more) => out.push_str(&more),
                    None => break,
                },
            }
        }
        Some(out)
    }
}

fn piece(next: Followed) -> Option<String> {
    match next {
        Followed::Line(line) => Some(format!("{line}\n")),
        Followed::Missed(n) => Some(missed(n)),
        Followed::Closed => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::BodyDataStream;
    use futures_util::StreamExt as _;
    use std::time::Duration;
    use tower::ServiceExt as _;

    /// The tap is the process's: one test at a time uses it.
    static TAP_IN_USE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    async fn get(uri: &str) -> Response {
        router()
            .oneshot(axum::http::Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    async fn next_chunk(body: &mut BodyDataStream) -> String {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("a chunk within 5 s")
            .expect("the body goes on")
            .expect("no body error");
        String::from_utf8(chunk.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn lines_gives_the_last_lines_as_text() {
        let _tap = TAP_IN_USE.lock().await;
        for i in 0..5 {
            tap().push(&format!("syslog-test recent {i}"));
        }
        let r = get("/api/v1/syslog?lines=2").await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        assert_eq!(&body[..], b"syslog-test recent 3\nsyslog-test recent 4\n");
        // A huge N is capped, not an error; a word is refused.
        let r = get("/api/v1/syslog?lines=999999999").await;
        assert_eq!(r.status(), 200);
        let body = axum::body::to_bytes(r.into_body(), 1 << 24).await.unwrap();
        assert!(body.iter().filter(|&&b| b == b'\n').count() <= TAP_LINES);
        assert_eq!(get("/api/v1/syslog?lines=many").await.status(), 400);
    }

    #[tokio::test]
    async fn follow_streams_new_lines_and_lets_go_when_dropped() {
        let _tap = TAP_IN_USE.lock().await;
        tap().push("syslog-test before follow");
        let before = tap().followers();
        let r = get("/api/v1/syslog?lines=1&follow=true").await;
        assert_eq!(r.status(), 200);
        assert_eq!(tap().followers(), before + 1);
        let mut body = r.into_body().into_data_stream();
        assert_eq!(next_chunk(&mut body).await, "syslog-test before follow\n");
        tap().push("syslog-test while following");
        assert_eq!(next_chunk(&mut body).await, "syslog-test while following\n");
        // A follower that fell behind is told so, then goes on.
        for i in 0..causeway_common::logging::TAP_BACKLOG + 10 {
            tap().push(&format!("syslog-test flood {i}"));
        }
        let got = next_chunk(&mut body).await;
        assert!(
            got.starts_with(
                "causeway: 10 log lines skipped: this follower fell behind\nsyslog-test flood 10\n"
            ),
            "{}",
            &got[..200.min(got.len())]
        );
        drop(body);
        assert_eq!(tap().followers(), before);
    }
}
