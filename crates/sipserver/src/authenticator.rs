//! The SIP service's authentication part (issue 17): digest nonces and their single use,
//! and the guard that slows and blocks password guessing, with its log lines and alarm
//! 40001. The registrar (REGISTER, 401) and the proxy's policy (407) ask it.

use std::sync::Arc;

use causeway_cluster::Node;
use causeway_common::time::unix_ms_now;
use causeway_sip::{HeaderKind, Message, NameAddr};
use tracing::warn;

use crate::auth::{self, NonceKey, NonceUses};
use crate::guard::{AuthGuard, Gate, GuardSettings};
use crate::service::{SipConfig, LOG};
use crate::transport::Source;

/// The answer to a source blocked for its failed authentications.
pub(crate) const BLOCKED: &str = "Forbidden (too many failed authentications from this address)";

/// What a credentials check came to.
pub(crate) enum Checked {
    Ok(String),
    /// Answer 401/407 with this header line.
    Challenge(String),
    /// The source is blocked: refused unchecked.
    Blocked,
    /// Wrong credentials (counted and logged already).
    Refused(&'static str),
}

pub(crate) struct Authenticator {
    node: Arc<Node>,
    /// Signs this peer's nonces (another peer never accepts them).
    nonce_key: NonceKey,
    /// Which nonce counts were used, so a captured Authorization cannot be replayed.
    nonce_uses: NonceUses,
    /// Failed authentications per source and per user: slowed, blocked, alarmed.
    guard: AuthGuard,
}

impl Authenticator {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        Authenticator {
            node,
            nonce_key: NonceKey::generate(),
            nonce_uses: NonceUses::default(),
            guard: AuthGuard::default(),
        }
    }

    /// The credentials of `req` checked against the configured users, through the guard:
    /// a blocked source is refused unchecked, a slowed one waits first. `proxy`: a proxy's
    /// challenge (407, Proxy-Authorization) rather than a registrar's (401). A failure is
    /// counted and logged here; the caller answers.
    pub(crate) async fn check(
        &self,
        req: &Message,
        method: &str,
        source: &Source,
        proxy: bool,
        config: &SipConfig,
        realm: &str,
    ) -> Checked {
        let ip = source.remote.ip();
        match self.guard.gate(ip, &config.guard) {
            Gate::Blocked => return Checked::Blocked,
            Gate::Slow(delay) => tokio::time::sleep(delay).await,
            Gate::Open => {}
        }
        let checker = auth::Checker {
            users: &config.users,
            realm,
            key: &self.nonce_key,
            uses: &self.nonce_uses,
            proxy,
        };
        let request = auth::request_fingerprint(req, source.remote);
        match auth::check(req, method, request, &checker) {
            auth::Verdict::Ok(user) => {
                self.guard.succeeded(ip);
                Checked::Ok(user)
            }
            auth::Verdict::Challenge(header) => Checked::Challenge(header),
            auth::Verdict::Refused(why) => {
                let user = req
                    .value(if proxy {
                        HeaderKind::From
                    } else {
                        HeaderKind::To
                    })
                    .and_then(|f| NameAddr::parse(&f).ok()?.uri.user)
                    .unwrap_or_default();
                self.failed(source, method, &user, why, &config.guard);
                Checked::Refused(why)
            }
        }
    }

    /// Counts, logs and, past the thresholds, alarms a failed authentication.
    pub(crate) fn failed(
        &self,
        source: &Source,
        method: &str,
        user: &str,
        why: &str,
        settings: &GuardSettings,
    ) {
        let f = self.guard.failed(source.remote.ip(), user, settings);
        warn!(target: LOG, event = "Authentication Failed", src_ip = %source.remote.ip(),
            src_port = source.remote.port(), auth_user = %user, method = %method,
            reason = why, failures_from_source = f.source_failures, "");
        let alarms = self.node.alarms();
        if f.blocked {
            let minutes = settings.block_for.as_secs().div_ceil(60);
            warn!(target: LOG, event = "Authentication Source Blocked", src_ip = %source.remote.ip(),
                failures = f.source_failures, blocked_minutes = minutes, "");
            alarms.raise(
                40001,
                &format!("source {}", source.remote.ip()),
                &format!(
                    "{} failed authentications from {} within {} s: refused for {minutes} min",
                    f.source_failures,
                    source.remote.ip(),
                    settings.window.as_secs()
                ),
            );
        }
        if f.user_alarm {
            alarms.raise(
                40001,
                &format!("user {user}"),
                &format!(
                    "{} failed authentications as {user} within {} s",
                    f.user_failures,
                    settings.window.as_secs()
                ),
            );
        }
    }

    /// Once a second: forgets used nonces that expired, and lowers 40001 for sources whose
    /// block ended and users whose failures stopped.
    pub(crate) fn sweep(&self, settings: &GuardSettings) {
        self.nonce_uses.sweep(unix_ms_now());
        let (unblocked, quiet) = self.guard.sweep(settings);
        for ip in unblocked {
            self.node.alarms().lower(40001, &format!("source {ip}"));
        }
        for user in quiet {
            self.node.alarms().lower(40001, &format!("user {user}"));
        }
    }
}
