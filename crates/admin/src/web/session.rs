//! Login sessions of the web pages: a random token in a cookie (Secure, HttpOnly,
//! SameSite=Strict), and per session a CSRF token every change must carry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;

pub const SESSION_COOKIE: &str = "causeway_session";
/// The login form's own token (double submit): a page elsewhere cannot log a browser in.
pub const LOGIN_COOKIE: &str = "causeway_login";
/// A session unused this long ends.
const IDLE: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after login, used or not.
const ABSOLUTE: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at most; the least recently used goes first.
const MAX_SESSIONS: usize = 256;

#[derive(Clone, Debug)]
pub struct Session {
    pub user: String,
    pub csrf: String,
    started: Instant,
    last_seen: Instant,
}

#[derive(Default)]
pub struct Sessions {
    by_token: Mutex<HashMap<String, Session>>,
}

/// 32 random bytes, URL-safe base64.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // The system's random source failing is not something to serve pages through.
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system random source failed");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Equal strings, compared in time that does not depend on where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    /// A new session for `user`: its cookie token.
    pub fn start(&self, user: &str) -> String {
        let token = random_token();
        let now = Instant::now();
        let mut map = self.by_token.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| live(s, now));
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last_seen)
                .map(|(t, _)| t.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            token.clone(),
            Session {
                user: user.to_string(),
                csrf: random_token(),
                started: now,
                last_seen: now,
            },
        );
        token
    }

    /// The live session of a cookie token, marked as used.
    pub fn get(&self, token: &str) -> Option<Session> {
        let now = Instant::now();
        let mut map = self.by_token.lock().unwrap_or_else(|e| e.into_inner());
        let session = map.get_mut(token)?;
        if !live(session, now) {
            map.remove(token);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    pub fn end(&self, token: &str) {
        self.by_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }
}

fn live(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last_seen) < IDLE && now.duration_since(s.started) < ABSOLUTE
}

/// The value of cookie `name` in a request's Cookie headers.
pub fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A Set-Cookie value: Secure, HttpOnly, SameSite=Strict, for the whole site.
pub fn set_cookie(name: &str, value: &str, max_age: Option<Duration>) -> String {
    let age = max_age
        .map(|a| format!("; Max-Age={}", a.as_secs()))
        .unwrap_or_default();
    format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict{age}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_session_ends_after_its_idle_time_and_a_logout() {
        let sessions = Sessions::default();
        let token = sessions.start("admin");
        let s = sessions.get(&token).expect("live after login");
        assert_eq!(s.user, "admin");
        assert_ne!(s.csrf, token);
        tokio::time::advance(IDLE - Duration::from_secs(1)).await;
        assert!(sessions.get(&token).is_some(), "used within the idle time");
        tokio::time::advance(IDLE).await;
        assert!(sessions.get(&token).is_none(), "idle too long");
        let token = sessions.start("admin");
        sessions.end(&token);
        assert!(sessions.get(&token).is_none(), "logged out");
        assert!(sessions.get("made-up").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_in_use_still_ends_at_its_absolute_limit() {
        let sessions = Sessions::default();
        let token = sessions.start("admin");
        let step = IDLE / 2;
        let mut elapsed = Duration::ZERO;
        while elapsed + step < ABSOLUTE {
            tokio::time::advance(step).await;
            elapsed += step;
            assert!(sessions.get(&token).is_some());
        }
        tokio::time::advance(step).await;
        assert!(sessions.get(&token).is_none());
    }

    #[test]
    fn cookies_are_found_by_name_and_tokens_compared_whole() {
        let mut h = axum::http::HeaderMap::new();
        h.append(
            axum::http::header::COOKIE,
            "a=1; causeway_session=xyz".parse().unwrap(),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("xyz"));
        assert_eq!(cookie(&h, "b"), None);
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "ab"));
        let c = set_cookie(SESSION_COOKIE, "v", None);
        for part in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(part), "{c}");
        }
    }
}
