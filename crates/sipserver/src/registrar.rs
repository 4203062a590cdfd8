//! The registrar (SV-1, RFC 3261 §10.3): bindings written into this peer's replicated
//! stream, answered once the cluster holds them.

use std::sync::atomic::Ordering;

use causeway_common::time::unix_ms_now;
use causeway_replication::Change;
use causeway_sip::{HeaderKind, Message, NameAddr, SipUri};
use tracing::{debug, warn};

use crate::authenticator::{Checked, BLOCKED};
use crate::location::{binding_key, Binding, NAMESPACE};
use crate::service::{SipService, LOG};
use crate::transport::{Proto, Source};

/// One Contact of a REGISTER, read.
struct Wanted {
    uri: String,
    params: String,
    expires: u32,
    q: u16,
    instance: Option<String>,
    reg_id: Option<u32>,
}

fn quality(q: Option<&str>) -> Option<u16> {
    let q: f32 = q?.parse().ok()?;
    (0.0..=1.0)
        .contains(&q)
        .then(|| (q * 1000.0).round() as u16)
}

impl SipService {
    /// The policy's check of a request other than REGISTER from outside the cluster: true
    /// when it may go on; otherwise it has been answered (407 challenge, or 403).
    pub(crate) async fn authenticate_request(
        &self,
        req: &Message,
        method: &str,
        source: &Source,
    ) -> bool {
        match self
            .auth
            .check(req, method, source, true, &self.config(), &self.realm())
            .await
        {
            Checked::Ok(_) => true,
            Checked::Challenge(header) => {
                self.respond(req, source, 407, "Proxy Authentication Required", &[header]);
                false
            }
            Checked::Blocked => {
                self.respond(req, source, 403, BLOCKED, &[]);
                false
            }
            Checked::Refused(why) => {
                self.respond(req, source, 403, &format!("Forbidden ({why})"), &[]);
                false
            }
        }
    }

    pub(crate) async fn register(&self, req: &Message, source: &Source) {
        let reply = |status: u16, reason: &str, extra: &[String]| {
            self.respond(req, source, status, reason, extra);
        };
        let Some(to) = req.value(HeaderKind::To) else {
            return reply(400, "Bad Request (no To)", &[]);
        };
        let to = match NameAddr::parse(&to) {
            Ok(t) => t,
            Err(e) => return reply(400, &format!("Bad Request (To: {e})"), &[]),
        };
        if to.uri.user.is_none() {
            return reply(400, "Bad Request (To has no user part)", &[]);
        }
        if !self.is_local_domain(&to.uri.host) {
            return reply(404, "Not Found (domain not served here)", &[]);
        }
        let user = to.uri.user.clone().unwrap_or_default();
        let aor = self.canonical_aor(&to.uri);
        let config = self.config();
        if !config.users.is_empty() {
            match self
                .auth
                .check(req, "REGISTER", source, false, &config, &self.realm())
                .await
            {
                Checked::Ok(name) if name == user => {}
                Checked::Ok(name) => {
                    self.auth.failed(
                        source,
                        "REGISTER",
                        &name,
                        "credentials for another user",
                        &config.guard,
                    );
                    return reply(403, "Forbidden (credentials are for another user)", &[]);
                }
                Checked::Challenge(header) => return reply(401, "Unauthorized", &[header]),
                Checked::Blocked => return reply(403, BLOCKED, &[]),
                Checked::Refused(why) => return reply(403, &format!("Forbidden ({why})"), &[]),
            }
        }
        let call_id = req.call_id().unwrap_or_default();
        let cseq = match req.cseq() {
            Ok((n, _)) => n,
            Err(e) => return reply(400, &format!("Bad Request ({e})"), &[]),
        };
        let header_expires = match req.expires() {
            Ok(e) => e,
            Err(e) => return reply(400, &format!("Bad Request ({e})"), &[]),
        };
        let contacts = req.values(HeaderKind::Contact);
        let now = unix_ms_now();
        let mut wanted = Vec::new();
        let mut remove_all = false;
        for c in &contacts {
            if c.trim() == "*" {
                if contacts.len() != 1 || header_expires != Some(0) {
                    return reply(
                        400,
                        "Bad Request ('*' needs Expires: 0 and no other Contact)",
                        &[],
                    );
                }
                remove_all = true;
                continue;
            }
            let na = match NameAddr::parse(c) {
                Ok(na) => na,
                Err(e) => return reply(400, &format!("Bad Request (Contact: {e})"), &[]),
            };
            let expires = match na.param("expires").flatten() {
                Some(e) => match e.parse::<u32>() {
                    Ok(e) => e,
                    Err(_) => {
                        return reply(400, "Bad Request (Contact expires is not a number)", &[])
                    }
                },
                None => header_expires.unwrap_or(self.settings.default_expires),
            };
            if expires > 0 && expires < self.settings.min_expires {
                return reply(
                    423,
                    "Interval Too Brief",
                    &[format!("Min-Expires: {}", self.settings.min_expires)],
                );
            }
            let instance = na.param("+sip.instance").flatten().map(str::to_string);
            let reg_id = na.param("reg-id").flatten().and_then(|r| r.parse().ok());
            let params: Vec<String> = na
                .params
                .iter()
                .filter(|(n, _)| !n.eq_ignore_ascii_case("expires"))
                .map(|(n, v)| match v {
                    Some(v) => format!(";{n}={v}"),
                    None => format!(";{n}"),
                })
                .collect();
            wanted.push(Wanted {
                uri: na.uri.to_string(),
                params: params.concat(),
                expires: expires.min(self.settings.max_expires),
                q: quality(na.param("q").flatten()).unwrap_or(1000),
                instance,
                reg_id,
            });
        }
        // Call-ID/CSeq ordering (§10.3 step 7): the same Call-ID must not go backwards. An
        // equal CSeq is this request again (a UDP retransmission): answered, not refused.
        let mut changes = Vec::new();
        let path = req.values(HeaderKind::Path);
        let removal = |old: &Binding| Binding {
            removed: true,
            registered_at_ms: now.max(old.registered_at_ms + 1),
            owner: self.self_index,
            call_id: call_id.clone(),
            cseq,
            ..old.clone()
        };
        if remove_all {
            let current = self.location.lookup(&aor, now);
            for old in &current {
                if old.call_id == call_id && cseq < old.cseq {
                    return reply(500, "Server Internal Error (CSeq out of order)", &[]);
                }
            }
            for old in &current {
                changes.push(self.binding_change(&removal(old)));
            }
        }
        let adds = wanted.iter().any(|w| w.expires > 0);
        if adds && !self.licences.registration_free(&aor, &self.location, now) {
            return reply(
                503,
                "Service Unavailable (no registration licence free in the cluster)",
                &["Retry-After: 60".to_string()],
            );
        }
        for w in &wanted {
            let key = binding_key(&aor, w.instance.as_deref(), w.reg_id, &w.uri);
            let old = self.location.newest_of(&aor, &key).filter(|b| b.live(now));
            if let Some(old) = &old {
                if old.call_id == call_id && cseq < old.cseq {
                    return reply(500, "Server Internal Error (CSeq out of order)", &[]);
                }
            }
            if w.expires == 0 {
                if let Some(old) = &old {
                    changes.push(self.binding_change(&removal(old)));
                }
                continue;
            }
            let saved_already = old.as_ref().is_some_and(|o| {
                o.call_id == call_id
                    && o.cseq == cseq
                    && o.owner == self.self_index
                    && o.uri == w.uri
                    && o.params == w.params
            });
            if saved_already {
                // This REGISTER again, saved here already (a UDP retransmission whose answer
                // was lost): answered again, as a server transaction would, not saved again.
                // Under load a lost answer would otherwise cost another cluster-wide write.
                continue;
            }
            let binding = Binding {
                aor: aor.clone(),
                uri: w.uri.clone(),
                params: w.params.clone(),
                expires_at_ms: now + u64::from(w.expires) * 1000,
                registered_at_ms: now.max(old.as_ref().map_or(0, |o| o.registered_at_ms + 1)),
                call_id: call_id.clone(),
                cseq,
                path: path.clone(),
                instance: w.instance.clone(),
                reg_id: w.reg_id,
                q: w.q,
                owner: self.self_index,
                proto: source.proto,
                received: source.remote,
                conn: source.conn.filter(|_| source.proto != Proto::Udp),
                removed: false,
            };
            changes.push(self.binding_change(&binding));
        }
        if !changes.is_empty() {
            let stream = self.own_stream(NAMESPACE);
            let n = changes.len();
            match self.node.replication().write(&stream, changes).await {
                Ok(outcome) => {
                    if !outcome.majority() {
                        warn!(target: LOG, aor = %aor, confirmed = outcome.confirmed, peers = outcome.peers,
                            "Registration held by fewer than a majority of peers");
                    }
                }
                Err(e) => {
                    warn!(target: LOG, aor = %aor, reason = %e, "Registration could not be saved");
                    return reply(
                        500,
                        "Server Internal Error (registration not saved)",
                        &["Retry-After: 5".to_string()],
                    );
                }
            }
            // Debug level: at thousands per second an info line each would cost more than
            // the registration itself.
            debug!(target: LOG, event = "Registration Accepted", aor = %aor, contacts = n,
                src = %source.remote, transport = source.proto.name(), "");
        }
        self.metrics.registrations.fetch_add(1, Ordering::Relaxed);
        // 200 OK with every current binding and what remains of its time (§10.3 step 8).
        let now = unix_ms_now();
        let mut extra: Vec<String> = self
            .location
            .lookup(&aor, now)
            .iter()
            .map(|b| {
                let left = b.expires_at_ms.saturating_sub(now).div_ceil(1000);
                format!("Contact: <{}>{};expires={left}", b.uri, b.params)
            })
            .collect();
        if !path.is_empty() {
            extra.push(format!("Path: {}", path.join(", ")));
        }
        extra.push(format!("Date: {}", httpdate(now)));
        // RFC 5626 §6: a registration that set up a flow (instance and reg-id) is told the
        // registrar takes part in outbound.
        if wanted
            .iter()
            .any(|w| w.instance.is_some() && w.reg_id.is_some())
        {
            extra.push("Require: outbound".to_string());
        }
        reply(200, "OK", &extra);
    }

    fn binding_change(&self, b: &Binding) -> Change {
        Change {
            key: b.key(),
            value: Some(b.encode()),
        }
    }

    /// The AOR as it is looked up: one spelling for every name of the cluster's domain, so
    /// `alice@127.0.0.1` and `alice@lab.example` are the same user.
    pub(crate) fn canonical_aor(&self, uri: &SipUri) -> String {
        let host = uri.host.to_ascii_lowercase();
        let config = self.config();
        let domains = &config.domains;
        let domain = if domains.contains(&host) {
            host
        } else {
            self.home_domain(&config)
        };
        match &uri.user {
            Some(u) => format!("sip:{u}@{}", domain.to_ascii_lowercase()),
            None => format!("sip:{}", domain.to_ascii_lowercase()),
        }
    }

    pub(crate) fn realm(&self) -> String {
        self.home_domain(&self.config())
    }

    /// The name every local spelling of the domain maps to: the first configured domain,
    /// else the cluster name (or this peer's address).
    fn home_domain(&self, config: &crate::service::SipConfig) -> String {
        config
            .domains
            .first()
            .cloned()
            .or_else(|| self.settings.local_names.first().cloned())
            .unwrap_or_else(|| self.settings.listen.to_string())
    }
}

/// RFC 7231 IMF-fixdate, for the Date header.
fn httpdate(unix_ms: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = unix_ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_imf_fixdate() {
        assert_eq!(super::httpdate(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            super::httpdate(1_795_000_000_000),
            "Wed, 18 Nov 2026 11:06:40 GMT"
        );
    }
}
