use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use causeway_common::time::unix_ms_now;
use serde::Serialize;

use crate::catalogue::{lookup, Severity};

/// How many events the table keeps for `xstatus alarms` and the API.
const EVENT_HISTORY: usize = 1000;

/// One raised alarm. `subject` says which instance (a peer address, a field); one alarm type
/// may be raised for several subjects at once.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ActiveAlarm {
    pub id: u32,
    pub uuid: &'static str,
    pub severity: Severity,
    pub title: &'static str,
    pub detail: &'static str,
    pub action: &'static str,
    pub subject: String,
    /// What is wrong for this subject, in words.
    pub reason: String,
    pub raised_at_ms: u64,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum AlarmEventKind {
    #[serde(rename = "Alarm Raised")]
    Raised,
    #[serde(rename = "Alarm Lowered")]
    Lowered,
}

#[derive(Clone, Debug, Serialize)]
pub struct AlarmEvent {
    pub event: AlarmEventKind,
    pub id: u32,
    pub uuid: &'static str,
    pub severity: Severity,
    pub subject: String,
    pub reason: String,
    pub at_ms: u64,
}

#[derive(Default)]
struct Inner {
    active: BTreeMap<(u32, String), ActiveAlarm>,
    events: VecDeque<AlarmEvent>,
}

/// The alarms raised on this node. Raising an alarm already raised for the same subject, or
/// lowering one that is not raised, does nothing: callers state what should be true and the
/// table logs only the changes.
#[derive(Default)]
pub struct AlarmTable {
    inner: Mutex<Inner>,
}

impl AlarmTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises alarm `id` for `subject`. Returns true when it was not raised before.
    ///
    /// Panics on an ID missing from the catalogue: that is a programming error, not data.
    pub fn raise(&self, id: u32, subject: &str, reason: &str) -> bool {
        let kind = lookup(id).unwrap_or_else(|| panic!("alarm {id} is not in the catalogue"));
        let mut inner = self.lock();
        let key = (id, subject.to_string());
        if let Some(existing) = inner.active.get_mut(&key) {
            // Keep the reason current without a new event: the alarm itself did not change.
            existing.reason = reason.to_string();
            return false;
        }
        let now = unix_ms_now();
        inner.active.insert(
            key,
            ActiveAlarm {
                id,
                uuid: kind.uuid,
                severity: kind.severity,
                title: kind.title,
                detail: kind.detail,
                action: kind.action,
                subject: subject.to_string(),
                reason: reason.to_string(),
                raised_at_ms: now,
            },
        );
        tracing::warn!(
            target: "alarm",
            event = "Alarm Raised",
            id = id,
            UUID = kind.uuid,
            severity = kind.severity.as_str(),
            subject = subject,
            reason = reason,
            "{}",
            kind.detail
        );
        Self::push_event(
            &mut inner,
            AlarmEvent {
                event: AlarmEventKind::Raised,
                id,
                uuid: kind.uuid,
                severity: kind.severity,
                subject: subject.to_string(),
                reason: reason.to_string(),
                at_ms: now,
            },
        );
        true
    }

    /// Lowers alarm `id` for `subject`. Returns true when it was raised.
    pub fn lower(&self, id: u32, subject: &str) -> bool {
        let mut inner = self.lock();
        let Some(alarm) = inner.active.remove(&(id, subject.to_string())) else {
            return false;
        };
        tracing::info!(
            target: "alarm",
            event = "Alarm Lowered",
            id = id,
            UUID = alarm.uuid,
            severity = alarm.severity.as_str(),
            subject = subject,
            "{}",
            alarm.detail
        );
        Self::push_event(
            &mut inner,
            AlarmEvent {
                event: AlarmEventKind::Lowered,
                id,
                uuid: alarm.uuid,
                severity: alarm.severity,
                subject: alarm.subject,
                reason: alarm.reason,
                at_ms: unix_ms_now(),
            },
        );
        true
    }

    /// Makes the raised alarms whose IDs are in `managed` exactly `wanted`: raises what is
    /// missing, lowers what is no longer wanted, leaves everything else alone.
    pub fn reconcile(&self, managed: &[u32], wanted: &[(u32, String, String)]) {
        let stale: Vec<(u32, String)> = self
            .lock()
            .active
            .keys()
            .filter(|(id, subject)| {
                managed.contains(id) && !wanted.iter().any(|(w, s, _)| w == id && s == subject)
            })
            .cloned()
            .collect();
        for (id, subject) in stale {
            self.lower(id, &subject);
        }
        for (id, subject, reason) in wanted {
            self.raise(*id, subject, reason);
        }
    }

    pub fn active(&self) -> Vec<ActiveAlarm> {
        self.lock().active.values().cloned().collect()
    }

    pub fn is_raised(&self, id: u32, subject: &str) -> bool {
        self.lock().active.contains_key(&(id, subject.to_string()))
    }

    pub fn events(&self) -> Vec<AlarmEvent> {
        self.lock().events.iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (every update is one insert
        // or remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_event(inner: &mut Inner, event: AlarmEvent) {
        if inner.events.len() == EVENT_HISTORY {
            inner.events.pop_front();
        }
        inner.events.push_back(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raise_and_lower_are_idempotent_and_evented() {
        let t = AlarmTable::new();
        assert!(t.raise(20004, "127.0.0.2", "connection lost"));
        assert!(!t.raise(20004, "127.0.0.2", "still lost"));
        assert!(t.raise(20004, "127.0.0.3", "connection lost"));
        assert_eq!(t.active().len(), 2);
        assert_eq!(t.active()[0].reason, "still lost");
        assert!(t.lower(20004, "127.0.0.2"));
        assert!(!t.lower(20004, "127.0.0.2"));
        let kinds: Vec<_> = t.events().iter().map(|e| e.event).collect();
        assert_eq!(
            kinds,
            [
                AlarmEventKind::Raised,
                AlarmEventKind::Raised,
                AlarmEventKind::Lowered
            ]
        );
    }

    #[test]
    fn reconcile_touches_only_managed_ids() {
        let t = AlarmTable::new();
        t.raise(20007, "", "restart");
        t.raise(20004, "a", "x");
        t.reconcile(&[20004, 20021], &[(20021, "b".into(), "refused".into())]);
        assert!(t.is_raised(20007, ""));
        assert!(!t.is_raised(20004, "a"));
        assert!(t.is_raised(20021, "b"));
    }
}
