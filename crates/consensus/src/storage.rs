//! A lease group's Raft log and vote in the node's store (table `consensus`), and its state
//! machine, which holds nothing but the last applied entry and the membership.
//!
//! Keys are `<group key>/vote`, `<group key>/committed`, `<group key>/purged` and
//! `<group key>/log/<index, 8 bytes big-endian>`; values are JSON (openraft's own serde
//! shapes: rare writes, readable in a dump). The group key holds the group's name and a
//! fingerprint of its voters, so a changed peer list starts a fresh group.

// openraft's storage traits fix the error type (`StorageError`, ~200 bytes); the helpers
// here return it too rather than convert at every call. Its own examples allow the same.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use causeway_store::{Op, Store};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState, RaftLogId,
    RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};

use crate::{MemberId, TypeConfig};

pub(crate) const TABLE: &str = "consensus";

type Error = StorageError<MemberId>;

fn io(subject: ErrorSubject<MemberId>, verb: ErrorVerb, e: impl std::fmt::Display) -> Error {
    StorageIOError::new(subject, verb, AnyError::error(e)).into()
}

/// The log and vote of one group.
#[derive(Clone)]
pub(crate) struct LogStore {
    store: Arc<dyn Store>,
    prefix: Vec<u8>,
}

impl LogStore {
    pub(crate) fn new(store: Arc<dyn Store>, group_key: &str) -> Self {
        let mut prefix = group_key.as_bytes().to_vec();
        prefix.push(b'/');
        Self { store, prefix }
    }

    /// Reads every record of the group; the first that does not decode is named.
    pub(crate) fn check(&self) -> Result<(), String> {
        self.read::<Vote<MemberId>>("vote", ErrorSubject::Vote)
            .and_then(|_| self.read::<Option<LogId<MemberId>>>("committed", ErrorSubject::Store))
            .and_then(|_| self.read::<LogId<MemberId>>("purged", ErrorSubject::Logs))
            .and_then(|_| self.entries(0, u64::MAX))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Drops every record of the group (after [`LogStore::check`] failed).
    pub(crate) fn reset(&self) -> Result<(), String> {
        self.store
            .apply(&[Op::DeletePrefix {
                table: TABLE,
                prefix: self.prefix.clone(),
            }])
            .map_err(|e| e.to_string())
    }

    fn key(&self, name: &str) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(name.as_bytes());
        k
    }

    fn log_key(&self, index: u64) -> Vec<u8> {
        let mut k = self.key("log/");
        k.extend_from_slice(&index.to_be_bytes());
        k
    }

    fn read<T: for<'de> Deserialize<'de>>(
        &self,
        name: &str,
        subject: ErrorSubject<MemberId>,
    ) -> Result<Option<T>, Error> {
        let Some(raw) = self
            .store
            .get(TABLE, &self.key(name))
            .map_err(|e| io(subject.clone(), ErrorVerb::Read, e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&raw).map(Some).map_err(|e| {
            io(
                subject,
                ErrorVerb::Read,
                format!("{name} is unreadable: {e}"),
            )
        })
    }

    fn write<T: Serialize>(
        &self,
        name: &str,
        value: &T,
        subject: ErrorSubject<MemberId>,
    ) -> Result<(), Error> {
        let value =
            serde_json::to_vec(value).map_err(|e| io(subject.clone(), ErrorVerb::Write, e))?;
        self.store
            .apply(&[Op::Put {
                table: TABLE,
                key: self.key(name),
                value,
            }])
            .map_err(|e| io(subject, ErrorVerb::Write, e))
    }

    fn entries(&self, from: u64, to_inclusive: u64) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let rows = self
            .store
            .scan(TABLE, &self.key("log/"))
            .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let head = self.key("log/").len();
        let mut out = Vec::new();
        for (k, v) in rows {
            let Some(index) = k.get(head..).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
                continue;
            };
            let index = u64::from_be_bytes(index);
            if index < from || index > to_inclusive {
                continue;
            }
            let entry: Entry<TypeConfig> = serde_json::from_slice(&v).map_err(|e| {
                io(
                    ErrorSubject::Logs,
                    ErrorVerb::Read,
                    format!("log entry {index} is unreadable: {e}"),
                )
            })?;
            out.push(entry);
        }
        Ok(out)
    }

    fn delete_logs(&self, keep: impl Fn(u64) -> bool) -> Result<(), Error> {
        let head = self.key("log/").len();
        let rows = self
            .store
            .scan(TABLE, &self.key("log/"))
            .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Read, e))?;
        let ops: Vec<Op> = rows
            .into_iter()
            .filter(|(k, _)| {
                k.get(head..)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .is_some_and(|b| !keep(u64::from_be_bytes(b)))
            })
            .map(|(key, _)| Op::Delete { table: TABLE, key })
            .collect();
        self.store
            .apply(&ops)
            .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, Error> {
        let from = match range.start_bound() {
            Bound::Included(&x) => x,
            Bound::Excluded(&x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(&x) => x,
            Bound::Excluded(&0) => return Ok(Vec::new()),
            Bound::Excluded(&x) => x - 1,
            Bound::Unbounded => u64::MAX,
        };
        self.entries(from, to)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, Error> {
        let purged: Option<LogId<MemberId>> = self.read("purged", ErrorSubject::Logs)?;
        let last = self
            .entries(0, u64::MAX)?
            .last()
            .map(|e| *e.get_log_id())
            .or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<MemberId>) -> Result<(), Error> {
        self.write("vote", vote, ErrorSubject::Vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<MemberId>>, Error> {
        self.read("vote", ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<MemberId>>) -> Result<(), Error> {
        self.write("committed", &committed, ErrorSubject::Store)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<MemberId>>, Error> {
        Ok(self
            .read::<Option<LogId<MemberId>>>("committed", ErrorSubject::Store)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut ops = Vec::new();
        for entry in entries {
            let index = entry.get_log_id().index;
            let value = serde_json::to_vec(&entry)
                .map_err(|e| io(ErrorSubject::Logs, ErrorVerb::Write, e))?;
            ops.push(Op::Put {
                table: TABLE,
                key: self.log_key(index),
                value,
            });
        }
        // One durable batch: the callback says "flushed" only once it is on disk.
        let result = self
            .store
            .apply(&ops)
            .map_err(|e| std::io::Error::other(e.to_string()));
        let failed = result.as_ref().err().map(|e| e.to_string());
        callback.log_io_completed(result);
        match failed {
            Some(e) => Err(io(ErrorSubject::Logs, ErrorVerb::Write, e)),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<MemberId>) -> Result<(), Error> {
        self.delete_logs(|index| index < log_id.index)
    }

    async fn purge(&mut self, log_id: LogId<MemberId>) -> Result<(), Error> {
        self.write("purged", &log_id, ErrorSubject::Logs)?;
        self.delete_logs(|index| index > log_id.index)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<MemberId>>,
    membership: StoredMembership<MemberId, openraft::EmptyNode>,
}

/// The state machine: what was applied last and the membership. Kept in memory: the log is
/// never purged (snapshots are off: a lease group writes an entry per election only), so a
/// restart re-applies it.
#[derive(Clone, Default)]
pub(crate) struct StateMachine {
    applied: Arc<Mutex<Applied>>,
}

impl StateMachine {
    fn lock(&self) -> std::sync::MutexGuard<'_, Applied> {
        self.applied.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot_of(applied: &Applied) -> Result<Snapshot<TypeConfig>, Error> {
        let data = serde_json::to_vec(applied)
            .map_err(|e| io(ErrorSubject::StateMachine, ErrorVerb::Read, e))?;
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id: applied
                .last_applied
                .map(|l| format!("{}-{}", l.leader_id, l.index))
                .unwrap_or_default(),
        };
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, Error> {
        let applied = self.lock().clone();
        Self::snapshot_of(&applied)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<
        (
            Option<LogId<MemberId>>,
            StoredMembership<MemberId, openraft::EmptyNode>,
        ),
        Error,
    > {
        let a = self.lock();
        Ok((a.last_applied, a.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, Error>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut a = self.lock();
        let mut out = Vec::new();
        for entry in entries {
            a.last_applied = Some(entry.log_id);
            if let EntryPayload::Membership(m) = entry.payload {
                a.membership = StoredMembership::new(Some(entry.log_id), m);
            }
            out.push(());
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, Error> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<MemberId, openraft::EmptyNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), Error> {
        let mut applied: Applied = serde_json::from_slice(snapshot.get_ref()).map_err(|e| {
            io(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                e,
            )
        })?;
        applied.last_applied = meta.last_log_id;
        applied.membership = meta.last_membership.clone();
        *self.lock() = applied;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, Error> {
        let applied = self.lock().clone();
        Self::snapshot_of(&applied).map(Some)
    }
}

/// Drops the records of groups named `name` whose key is not `keep` (a group whose voters
/// changed starts afresh; its old log must not mislead it).
pub(crate) fn drop_other_generations(
    store: &dyn Store,
    name: &str,
    keep: &str,
) -> Result<(), causeway_store::StoreError> {
    let mut prefix = name.as_bytes().to_vec();
    prefix.push(b'@');
    let mut stale: Vec<Vec<u8>> = Vec::new();
    for (k, _) in store.scan(TABLE, &prefix)? {
        // `<name>@<fingerprint>/<record>`: the group key ends at the first '/' after the
        // '@' (a name may hold '/' itself: `ha/1`).
        let fingerprint = k[prefix.len()..]
            .split(|b| *b == b'/')
            .next()
            .unwrap_or_default();
        let group = [prefix.as_slice(), fingerprint].concat();
        if group != keep.as_bytes() && !stale.contains(&group) {
            stale.push(group);
        }
    }
    let ops: Vec<Op> = stale
        .into_iter()
        .map(|mut g| {
            g.push(b'/');
            Op::DeletePrefix {
                table: TABLE,
                prefix: g,
            }
        })
        .collect();
    store.apply(&ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use causeway_store::MemoryStore;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn the_log_and_vote_survive_a_reopen_and_truncate_and_purge_cut_where_asked() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let mut log = LogStore::new(store.clone(), "calls@abc");
        log.save_vote(&Vote::new(3, 2)).await.unwrap();
        let ops: Vec<Op> = (1..=5)
            .map(|i| Op::Put {
                table: TABLE,
                key: log.log_key(i),
                value: serde_json::to_vec(&entry(1, i)).unwrap(),
            })
            .collect();
        store.apply(&ops).unwrap();

        let mut again = LogStore::new(store.clone(), "calls@abc");
        assert_eq!(again.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        let got = again.try_get_log_entries(2..4).await.unwrap();
        assert_eq!(
            got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            [2, 3]
        );
        again.truncate(entry(1, 4).log_id).await.unwrap();
        again.purge(entry(1, 1).log_id).await.unwrap();
        let state = again.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(1));
        let all = again.try_get_log_entries(..).await.unwrap();
        assert_eq!(
            all.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            [2, 3]
        );

        // Another group of the same name with other voters: the old one is dropped.
        drop_other_generations(store.as_ref(), "calls", "calls@def").unwrap();
        assert!(store.scan(TABLE, b"calls@abc/").unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_restart_keeps_its_own_records_when_the_group_name_holds_a_slash() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let mine = LogStore::new(store.clone(), "ha/1@aaaa");
        mine.write("vote", &Vote::new(7, 2), ErrorSubject::Vote)
            .unwrap();
        let old = LogStore::new(store.clone(), "ha/1@bbbb");
        old.write("vote", &Vote::new(3, 2), ErrorSubject::Vote)
            .unwrap();
        let other_pair = LogStore::new(store.clone(), "ha/11@cccc");
        other_pair
            .write("vote", &Vote::new(5, 1), ErrorSubject::Vote)
            .unwrap();
        drop_other_generations(store.as_ref(), "ha/1", "ha/1@aaaa").unwrap();
        let kept: Option<Vote<MemberId>> = mine.read("vote", ErrorSubject::Vote).unwrap();
        assert_eq!(kept, Some(Vote::new(7, 2)), "its own vote was dropped");
        let gone: Option<Vote<MemberId>> = old.read("vote", ErrorSubject::Vote).unwrap();
        assert_eq!(gone, None, "the old generation was kept");
        let untouched: Option<Vote<MemberId>> =
            other_pair.read("vote", ErrorSubject::Vote).unwrap();
        assert_eq!(
            untouched,
            Some(Vote::new(5, 1)),
            "another group's records were dropped"
        );
    }

    #[tokio::test]
    async fn an_unreadable_vote_is_an_error_that_names_it() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let mut log = LogStore::new(store.clone(), "g@1");
        store
            .apply(&[Op::Put {
                table: TABLE,
                key: log.key("vote"),
                value: b"\xff not json".to_vec(),
            }])
            .unwrap();
        let err = log.read_vote().await.unwrap_err();
        assert!(err.to_string().contains("vote is unreadable"), "{err}");
    }
}
