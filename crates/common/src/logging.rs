//! Log lines in the seed's shape:
//!
//! ```text
//! 2020-07-21T20:16:50.321+00:00 expc01 replication: UTCTime="2020-07-21 20:16:50,321" Module="developer.replication" Level="INFO" Detail="Starting synchronisation"
//! ```
//!
//! The tracing target is the `Module`, the message is the `Detail`, and every other field
//! becomes `Key="value"` with its name capitalised and `_` turned into `-` (`src_ip` →
//! `Src-ip`, as the seed writes it). `--log-format json` writes one JSON object a line.
//!
//! Every line written to stderr also goes to the [`tap`]: the last [`TAP_LINES`] lines kept
//! in memory and each new one broadcast, for `GET /api/v1/syslog` and `causeway syslog
//! follow`. Memory is bounded (a ring, a bounded channel, lines cut at [`TAP_MAX_LINE`]
//! bytes) and a slow follower never holds logging up: it skips what it missed and is told
//! how many lines that was.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

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

/// Writes every event as one line to `out` (and to a [`Tap`], when given one).
pub struct SeedLayer {
    host: String,
    format: LogFormat,
    out: Mutex<Box<dyn Write + Send>>,
    tap: Option<&'static Tap>,
}

impl SeedLayer {
    pub fn new(host: impl Into<String>, format: LogFormat, out: Box<dyn Write + Send>) -> Self {
        Self {
            host: host.into(),
            format,
            out: Mutex::new(out),
            tap: None,
        }
    }

    /// Also hands every line to `tap`.
    pub fn with_tap(mut self, tap: &'static Tap) -> Self {
        self.tap = Some(tap);
        self
    }
}

/// Lines the tap keeps for `syslog?lines=N` (the most a follower can ask for).
pub const TAP_LINES: usize = 1000;
/// New lines a follower may be behind before it skips ahead (and is told how many it lost).
pub const TAP_BACKLOG: usize = 1024;
/// Longer lines are cut (at a character boundary) in the tap, not on stderr.
pub const TAP_MAX_LINE: usize = 8 * 1024;

/// The recent log lines and a broadcast of new ones. Pushing never waits for a follower.
pub struct Tap {
    /// The last `keep` lines. Lines are pushed and broadcast under this lock, and a
    /// follower snapshots and subscribes under it: no line is missed or shown twice.
    ring: Mutex<VecDeque<Arc<str>>>,
    keep: usize,
    tx: tokio::sync::broadcast::Sender<Arc<str>>,
    /// True once the node stops: every follower ends (an open follow must not hold up the
    /// shutdown of the server that streams it).
    closing: tokio::sync::watch::Sender<bool>,
}

/// What a [`Follower`] gets next.
#[derive(Debug, PartialEq, Eq)]
pub enum Followed {
    Line(Arc<str>),
    /// The follower fell this many lines behind; they are gone, it goes on with newer ones.
    Missed(u64),
    /// The node is stopping ([`Tap::close_followers`]).
    Closed,
}

/// New lines from a [`Tap`], from the moment it was made.
pub struct Follower {
    rx: tokio::sync::broadcast::Receiver<Arc<str>>,
    closing: tokio::sync::watch::Receiver<bool>,
}

impl Follower {
    /// Waits for the next line.
    pub async fn next(&mut self) -> Followed {
        use tokio::sync::broadcast::error::RecvError;
        if *self.closing.borrow() {
            return Followed::Closed;
        }
        tokio::select! {
            next = self.rx.recv() => match next {
                Ok(line) => Followed::Line(line),
                Err(RecvError::Lagged(n)) => Followed::Missed(n),
                Err(RecvError::Closed) => Followed::Closed,
            },
            _ = self.closing.wait_for(|closing| *closing) => Followed::Closed,
        }
    }

    /// The next line if one is waiting.
    pub fn try_next(&mut self) -> Option<Followed> {
        use tokio::sync::broadcast::error::TryRecvError;
        if *self.closing.borrow() {
            return Some(Followed::Closed);
        }
        match self.rx.try_recv() {
            Ok(line) => Some(Followed::Line(line)),
            Err(TryRecvError::Lagged(n)) => Some(Followed::Missed(n)),
            Err(TryRecvError::Closed) => Some(Followed::Closed),
            Err(TryRecvError::Empty) => None,
        }
    }
}

impl Tap {
    /// A tap keeping the last `keep` lines, with followers at most `backlog` lines behind.
    pub fn new(keep: usize, backlog: usize) -> Self {
        let (tx, _) = tokio::sync::broadcast::channel(backlog.max(1));
        Self {
            ring: Mutex::new(VecDeque::with_capacity(keep.min(TAP_LINES))),
            keep,
            tx,
            closing: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Ends every follower, now and later (the node is stopping).
    pub fn close_followers(&self) {
        self.closing.send_replace(true);
    }

    pub fn push(&self, line: &str) {
        let line: Arc<str> = if line.len() > TAP_MAX_LINE {
            let mut end = TAP_MAX_LINE;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &line[..end]).into()
        } else {
            line.into()
        };
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if self.keep > 0 {
            if ring.len() >= self.keep {
                ring.pop_front();
            }
            ring.push_back(line.clone());
        }
        // No follower is not an error; a full channel drops its oldest line, never waits.
        let _ = self.tx.send(line);
    }

    /// The last `n` lines (at most the ones kept), oldest first.
    pub fn recent(&self, n: usize) -> Vec<Arc<str>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter()
            .skip(ring.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// The last `n` lines and a follower of every line after them.
    pub fn follow(&self, n: usize) -> (Vec<Arc<str>>, Follower) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let recent = ring
            .iter()
            .skip(ring.len().saturating_sub(n))
            .cloned()
            .collect();
        let rx = self.tx.subscribe();
        drop(ring);
        (
            recent,
            Follower {
                rx,
                closing: self.closing.subscribe(),
            },
        )
    }

    /// Followers now listening.
    pub fn followers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// The process's tap, fed by the subscriber [`init`] installs.
pub fn tap() -> &'static Tap {
    static TAP: OnceLock<Tap> = OnceLock::new();
    TAP.get_or_init(|| Tap::new(TAP_LINES, TAP_BACKLOG))
}

/// The filter when `CAUSEWAY_LOG` is not set. openraft's own lines are off: it logs every
/// vote at INFO and every unconfirmed renewal round at ERROR (about 50 lines a second while
/// a voter is down: measured in the HA benchmark), for conditions the `consensus` lines
/// already say once ("Lease holder changed", "Lease acquired"). `CAUSEWAY_LOG=info,openraft=info`
/// brings them back.
pub const DEFAULT_FILTER: &str = "info,openraft=off";

/// Installs the global subscriber writing to stderr and to [`tap`]. The filter comes from `CAUSEWAY_LOG`
/// (tracing's env-filter syntax), [`DEFAULT_FILTER`] by default.
pub fn init(host: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("CAUSEWAY_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let layer = SeedLayer::new(host, format, Box::new(std::io::stderr())).with_tap(tap());
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
        if let Some(tap) = self.tap {
            tap.push(&line);
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

    fn texts(lines: &[Arc<str>]) -> Vec<&str> {
        lines.iter().map(|l| &**l).collect()
    }

    #[test]
    fn the_tap_keeps_the_last_lines_only() {
        let tap = Tap::new(3, 8);
        assert!(tap.recent(10).is_empty());
        for i in 0..5 {
            tap.push(&format!("line {i}"));
        }
        assert_eq!(texts(&tap.recent(10)), ["line 2", "line 3", "line 4"]);
        assert_eq!(texts(&tap.recent(2)), ["line 3", "line 4"]);
        assert!(tap.recent(0).is_empty());
    }

    #[test]
    fn a_follower_gets_every_line_after_its_snapshot_once() {
        let tap = Tap::new(10, 8);
        tap.push("before 1");
        tap.push("before 2");
        let (recent, mut f) = tap.follow(1);
        assert_eq!(texts(&recent), ["before 2"]);
        assert_eq!(f.try_next(), None);
        tap.push("after");
        assert_eq!(f.try_next(), Some(Followed::Line("after".into())));
        assert_eq!(f.try_next(), None);
        assert_eq!(tap.followers(), 1);
        drop(f);
        assert_eq!(tap.followers(), 0);
        // Nobody following is no error.
        tap.push("unheard");
    }

    #[test]
    fn a_slow_follower_skips_and_is_told_how_many_it_missed() {
        let tap = Tap::new(4, 4);
        let (_, mut f) = tap.follow(0);
        for i in 0..10 {
            tap.push(&format!("line {i}"));
        }
        assert_eq!(f.try_next(), Some(Followed::Missed(6)));
        assert_eq!(f.try_next(), Some(Followed::Line("line 6".into())));
        tap.push("line 10");
        let rest: Vec<_> = std::iter::from_fn(|| f.try_next()).collect();
        assert_eq!(rest.len(), 4);
        assert_eq!(rest[3], Followed::Line("line 10".into()));
    }

    #[tokio::test]
    async fn a_follower_waits_for_the_next_line() {
        let tap: &'static Tap = Box::leak(Box::new(Tap::new(4, 4)));
        let (_, mut f) = tap.follow(0);
        let waiting = tokio::spawn(async move { f.next().await });
        tokio::task::yield_now().await;
        tap.push("late");
        assert_eq!(waiting.await.unwrap(), Followed::Line("late".into()));
    }

    #[test]
    fn long_lines_are_cut_in_the_tap_at_a_character_boundary() {
        let tap = Tap::new(2, 2);
        let long = "é".repeat(TAP_MAX_LINE);
        tap.push(&long);
        let kept = &tap.recent(1)[0];
        assert!(kept.len() <= TAP_MAX_LINE + '…'.len_utf8());
        assert!(kept.ends_with('…'));
    }

    #[test]
    fn the_layer_feeds_the_tap_with_the_lines_it_writes() {
        let tap: &'static Tap = Box::leak(Box::new(Tap::new(10, 10)));
        let layer = SeedLayer::new("peer1", LogFormat::Kv, Box::new(std::io::sink())).with_tap(tap);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(target: "management.node", peer = "127.0.0.2", "Tapped");
        });
        let lines = tap.recent(10);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].contains(" peer1 node: UTCTime=")
                && lines[0].ends_with("Module=\"management.node\" Level=\"INFO\" Detail=\"Tapped\" Peer=\"127.0.0.2\""),
            "{}",
            lines[0]
        );
    }
}
