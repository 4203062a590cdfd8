//! Log lines in the seed's shape:
//!
//! ```text
//! 2020-07-21T20:16:50.321+00:00 expc01 replication: UTCTime="2020-07-21 20:16:50,321" Module="developer.replication" Level="INFO" Detail="Starting synchronisation"
//! ```
//!
//! The tracing target is the `Module`, the message is the `Detail`, and every other field
//! becomes `Key="value"` with its name capitalised and `_` turned into `-` (`src_ip` →
//! `Src-ip`, as the seed writes it). `--log-format json` writes one JSON object a line.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// The seed's `Key="value"` lines.
    #[default]
    Kv,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kv" => Ok(Self::Kv),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format '{other}': use 'kv' or 'json'")),
        }
    }
}

/// Writes every event as one line to `out`.
pub struct SeedLayer {
    host: String,
    format: LogFormat,
    out: Mutex<Box<dyn Write + Send>>,
}

impl SeedLayer {
    pub fn new(host: impl Into<String>, format: LogFormat, out: Box<dyn Write + Send>) -> Self {
        Self {
            host: host.into(),
            format,
            out: Mutex::new(out),
        }
    }
}

/// The filter when `CAUSEWAY_LOG` is not set. openraft's own lines are off: it logs every
/// vote at INFO and every unconfirmed renewal round at ERROR (about 50 lines a second while
/// a voter is down: measured in the HA benchmark), for conditions the `consensus` lines
/// already say once ("Lease holder changed", "Lease acquired"). `CAUSEWAY_LOG=info,openraft=info`
/// brings them back.
pub const DEFAULT_FILTER: &str = "info,openraft=off";

/// Installs the global subscriber writing to stderr. The filter comes from `CAUSEWAY_LOG`
/// (tracing's env-filter syntax), [`DEFAULT_FILTER`] by default.
pub fn init(host: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("CAUSEWAY_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let layer = SeedLayer::new(host, format, Box::new(std::io::stderr()));
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init();
}

#[derive(Default)]
struct Fields {
    detail: Option<String>,
    pairs: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" | "detail" => self.detail = Some(value),
            name => self.pairs.push((seed_key(name), value)),
        }
    }
}

/// `src_ip` → `Src-ip`, `peer` → `Peer`.
pub fn seed_key(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, ch) in name.chars().enumerate() {
        match ch {
            '_' => out.push('-'),
            c if i == 0 => out.extend(c.to_uppercase()),
            c => out.push(c),
        }
    }
    out
}

/// Quotes a value for a `Key="value"` pair: backslash, quote and control characters escaped
/// so one event is always one line.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for ch in value.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARN",
        Level::INFO => "INFO",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "TRACE",
    }
}

impl SeedLayer {
    /// Formats one event; public so tests can check the shape without a subscriber.
    pub fn format_line(
        &self,
        unix_ms: u64,
        module: &str,
        level: &Level,
        fields: &[(String, String)],
        detail: Option<&str>,
    ) -> String {
        match self.format {
            LogFormat::Kv => {
                let process = module.rsplit('.').next().unwrap_or(module);
                let mut line = format!(
                    "{} {} {}: UTCTime={} Module={} Level={}",
                    crate::time::iso8601(unix_ms),
                    self.host,
                    process,
                    quote(&crate::time::utc_time(unix_ms)),
                    quote(module),
                    quote(level_name(level)),
                );
                if let Some(detail) = detail {
                    let _ = write!(line, " Detail={}", quote(detail));
                }
                for (k, v) in fields {
                    let _ = write!(line, " {k}={}", quote(v));
                }
                line
            }
            LogFormat::Json => {
                let mut obj = serde_json::Map::new();
                obj.insert("time".into(), crate::time::iso8601(unix_ms).into());
                obj.insert("host".into(), self.host.clone().into());
                obj.insert("module".into(), module.into());
                obj.insert("level".into(), level_name(level).into());
                if let Some(detail) = detail {
                    obj.insert("detail".into(), detail.into());
                }
                for (k, v) in fields {
                    obj.insert(k.clone(), v.clone().into());
                }
                serde_json::Value::Object(obj).to_string()
            }
        }
    }
}

impl<S: Subscriber> Layer<S> for SeedLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let line = self.format_line(
            crate::time::unix_ms_now(),
            meta.target(),
            meta.level(),
            &fields.pairs,
            fields.detail.as_deref(),
        );
        if let Ok(mut out) = self.out.lock() {
            // A log sink that fails has nowhere to report it; dropping the line is all we can do.
            let _ = writeln!(out, "{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_seed() {
        assert_eq!(seed_key("src_ip"), "Src-ip");
        assert_eq!(seed_key("peer"), "Peer");
        assert_eq!(seed_key("queue_time_ms"), "Queue-time-ms");
    }

    #[test]
    fn line_has_the_seed_shape_and_stays_one_line() {
        let layer = SeedLayer::new("peer1", LogFormat::Kv, Box::new(std::io::sink()));
        let line = layer.format_line(
            1_595_362_610_321,
            "developer.replication",
            &Level::INFO,
            &[("Peer".into(), "127.0.0.2".into())],
            Some("Starting \"sync\"\nnext"),
        );
        assert_eq!(
            line,
            "2020-07-21T20:16:50.321+00:00 peer1 replication: UTCTime=\"2020-07-21 20:16:50,321\" \
             Module=\"developer.replication\" Level=\"INFO\" Detail=\"Starting \\\"sync\\\"\\nnext\" Peer=\"127.0.0.2\""
        );
    }

    #[test]
    fn json_lines_parse() {
        let layer = SeedLayer::new("peer1", LogFormat::Json, Box::new(std::io::sink()));
        let line = layer.format_line(
            0,
            "alarm",
            &Level::WARN,
            &[("Id".into(), "20004".into())],
            Some("x"),
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["Id"], "20004");
        assert_eq!(v["level"], "WARN");
    }
}
