//! Counters for `/metrics` (Prometheus text format) and `xstatus`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub malformed: AtomicU64,
    pub dropped: AtomicU64,
    pub rate_limited: AtomicU64,
    pub refused_connections: AtomicU64,
    pub requests: AtomicU64,
    /// Responses this system sent or forwarded, by class 1xx … 6xx.
    pub responses: [AtomicU64; 6],
    pub registrations: AtomicU64,
    pub calls_admitted: AtomicU64,
    pub calls_refused: AtomicU64,
}

impl Metrics {
    pub fn response(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 6) - 1;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus exposition, with the gauges the caller knows.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        let counters = [
            (
                "causeway_sip_messages_received_total",
                "SIP messages received",
                &self.received,
            ),
            (
                "causeway_sip_messages_sent_total",
                "SIP messages sent",
                &self.sent,
            ),
            (
                "causeway_sip_malformed_total",
                "SIP messages refused as malformed",
                &self.malformed,
            ),
            (
                "causeway_sip_dropped_total",
                "SIP messages dropped because the core was behind",
                &self.dropped,
            ),
            (
                "causeway_sip_rate_limited_total",
                "SIP messages dropped by the per-source rate limit",
                &self.rate_limited,
            ),
            (
                "causeway_sip_refused_connections_total",
                "SIP connections refused by the connection caps",
                &self.refused_connections,
            ),
            (
                "causeway_sip_requests_total",
                "SIP requests handled",
                &self.requests,
            ),
            (
                "causeway_sip_registrations_total",
                "REGISTER requests accepted",
                &self.registrations,
            ),
            (
                "causeway_sip_calls_admitted_total",
                "calls admitted",
                &self.calls_admitted,
            ),
            (
                "causeway_sip_calls_refused_total",
                "calls refused by the call or bandwidth limit",
                &self.calls_refused,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let name = "causeway_sip_responses_total";
        let _ = writeln!(
            out,
            "# HELP {name} SIP responses sent or forwarded, by class\n# TYPE {name} counter"
        );
        for (i, c) in self.responses.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{class=\"{}xx\"}} {}",
                i + 1,
                c.load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}
