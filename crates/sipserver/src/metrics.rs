//! Counters for `/metrics` and `xstatus`.

use std::sync::atomic::{AtomicU64, Ordering};

use causeway_cluster::metrics::counter;
use prometheus_client::encoding::DescriptorEncoder;

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

    /// Writes the counters into a scrape of `/metrics`.
    pub fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let counters = [
            (
                "causeway_sip_messages_received",
                "SIP messages received",
                &self.received,
            ),
            (
                "causeway_sip_messages_sent",
                "SIP messages sent",
                &self.sent,
            ),
            (
                "causeway_sip_malformed",
                "SIP messages refused as malformed",
                &self.malformed,
            ),
            (
                "causeway_sip_dropped",
                "SIP messages dropped because the core was behind",
                &self.dropped,
            ),
            (
                "causeway_sip_rate_limited",
                "SIP messages dropped by the per-source rate limit",
                &self.rate_limited,
            ),
            (
                "causeway_sip_refused_connections",
                "SIP connections refused by the connection caps",
                &self.refused_connections,
            ),
            (
                "causeway_sip_requests",
                "SIP requests handled",
                &self.requests,
            ),
            (
                "causeway_sip_registrations",
                "REGISTER requests accepted",
                &self.registrations,
            ),
            (
                "causeway_sip_calls_admitted",
                "calls admitted",
                &self.calls_admitted,
            ),
            (
                "causeway_sip_calls_refused",
                "calls refused by the call or bandwidth limit",
                &self.calls_refused,
            ),
        ];
        for (name, help, c) in counters {
            counter(enc, name, help, &[(vec![], c.load(Ordering::Relaxed))])?;
        }
        let by_class: Vec<_> = self
            .responses
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    vec![("class", format!("{}xx", i + 1))],
                    c.load(Ordering::Relaxed),
                )
            })
            .collect();
        counter(
            enc,
            "causeway_sip_responses",
            "SIP responses sent or forwarded, by class",
            &by_class,
        )
    }
}
