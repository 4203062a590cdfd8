//! Writes: group commit on this node, the forward of a subordinate's write to the primary,
//! and waiting for a majority (`docs/replication.md`, "Writes and acknowledgement").

use super::*;

/// A write made on a subordinate, for the primary (EX-2).
#[derive(Debug, Serialize, Deserialize)]
pub struct ForwardRequest {
    pub stream: StreamId,
    pub changes: Vec<Change>,
}

/// The primary's answer: the seq its change landed at, once a majority holds it.
pub type ForwardAnswer = Result<u64, WriteError>;

pub fn forward_endpoint() -> Endpoint<ForwardRequest, ForwardAnswer> {
    Endpoint::new("replication/forward")
}

/// The engine's RPC frames ride on its own link, wrapped in `Message::Rpc`.
pub(super) struct RpcOverLink(pub(super) Arc<dyn PeerLink>);

impl PeerSend for RpcOverLink {
    fn send_to(&self, peer: usize, _channel: u16, payload: Bytes) -> Result<(), SendError> {
        let frame = Message::Rpc {
            frame: payload.to_vec(),
        };
        if self.0.send(peer, frame.encode()) {
            Ok(())
        } else {
            Err(SendError::NotConnected(peer))
        }
    }
}

/// A write waiting for the next group commit.
pub(super) struct PendingWrite {
    pub(super) id: StreamId,
    pub(super) changes: Vec<Change>,
    pub(super) origin: Origin,
    pub(super) done: oneshot::Sender<Result<Header, WriteError>>,
}

/// Writes in hand from which a commit waits for its interval: fewer are a writer or two
/// writing one after the other, which a wait would only slow down (PostgreSQL's
/// `commit_siblings` plays the same part).
const COMMIT_SIBLINGS: usize = 4;

/// One write in hand, until dropped.
struct InHand<'a>(&'a AtomicUsize);

impl<'a> InHand<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        InHand(count)
    }
}

impl Drop for InHand<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Writes of one stream waiting for a majority, by position.
pub(super) type MajorityWaiters = BTreeMap<(u64, u64), Vec<oneshot::Sender<()>>>;

impl Engine {
    /// Writes changes to a stream this node owns, or, for the configuration on a
    /// subordinate, forwards them to the primary (EX-2). Answers once a majority holds the
    /// change, or after `ack_timeout` with how many do.
    pub async fn write(
        self: &Arc<Self>,
        stream: &StreamId,
        changes: Vec<Change>,
    ) -> Result<WriteOutcome, WriteError> {
        let primary = self.primary();
        if !is_config(stream) || primary == self.settings.self_index {
            return self.write_local(stream, changes, Origin::Local).await;
        }
        self.observer
            .validate(stream, &changes)
            .map_err(WriteError::Invalid)?;
        if !self.link.active_peers().contains(&primary) {
            return Err(WriteError::PrimaryUnreachable(primary));
        }
        // The primary waits up to ack_timeout for its majority; allow for that and the trip.
        let wait = self.settings.ack_timeout + Duration::from_secs(2);
        let request = ForwardRequest {
            stream: stream.clone(),
            changes,
        };
        let seq = match self
            .rpc
            .call(&forward_endpoint(), primary, &request, wait)
            .await
        {
            Ok(answer) => answer?,
            Err(CallError::Send { .. }) => return Err(WriteError::PrimaryUnreachable(primary)),
            Err(CallError::Timeout { .. }) => return Err(WriteError::NoAnswer(primary, wait)),
            Err(other) => return Err(WriteError::Invalid(other.to_string())),
        };
        // The primary answered after its majority; the change reaches this peer by push.
        let generation = self.header(stream).generation;
        let (confirmed, peers) = self.wait_majority(stream, generation, seq).await;
        Ok(WriteOutcome {
            generation,
            seq,
            confirmed,
            peers,
        })
    }

    pub(super) async fn write_local(
        &self,
        id: &StreamId,
        changes: Vec<Change>,
        origin: Origin,
    ) -> Result<WriteOutcome, WriteError> {
        self.observer
            .validate(id, &changes)
            .map_err(WriteError::Invalid)?;
        if is_config(id) {
            self.wait_for_digests().await;
        }
        let _in_hand = InHand::enter(&self.writes_in_hand);
        let (done, mut result) = oneshot::channel();
        self.pending_lock().push(PendingWrite {
            id: id.clone(),
            changes,
            origin,
            done,
        });
        // Group commit: whoever holds the committer lock commits every write queued so
        // far (one store transaction, one push per stream). Under load (a group of several)
        // it keeps the lock until that group is saved, so the writers that arrive
        // meanwhile make one next group, not many small ones each with its own pushes;
        // a lone write lets the next one start while it is being saved.
        let answer = match result.try_recv() {
            Ok(answer) => answer,
            Err(_) => {
                let mut committer = self.committer.lock().await;
                match result.try_recv() {
                    // An earlier committer took this write and has saved it.
                    Ok(answer) => answer,
                    Err(_) => {
                        // Let writers that are ready now join this commit.
                        tokio::task::yield_now().await;
                        // Under load, commits start at most every `commit_interval`: every
                        // commit costs a store transaction, an fsync and a push to every
                        // peer, whatever its size (docs/replication.md, "Group commit").
                        if !self.settings.commit_interval.is_zero()
                            && self.writes_in_hand.load(Ordering::Relaxed) >= COMMIT_SIBLINGS
                        {
                            if let Some(last) = *committer {
                                tokio::time::sleep_until(last + self.settings.commit_interval)
                                    .await;
                            }
                        }
                        *committer = Some(Instant::now());
                        if self.commit_pending() <= 1 {
                            drop(committer);
                        }
                        (&mut result)
                            .await
                            .map_err(|_| WriteError::Store("the engine stopped".into()))?
                    }
                }
            }
        };
        let header = answer?;
        let (confirmed, peers) = self.wait_majority(id, header.generation, header.seq).await;
        Ok(WriteOutcome {
            generation: header.generation,
            seq: header.seq,
            confirmed,
            peers,
        })
    }

    pub(super) fn pending_lock(&self) -> MutexGuard<'_, Vec<PendingWrite>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits every queued write: applied in queue order, persisted in one transaction,
    /// pushed as one frame per stream, then each writer told where its change landed.
    /// Returns how many writes it took.
    pub(super) fn commit_pending(&self) -> usize {
        let batch = std::mem::take(&mut *self.pending_lock());
        if batch.is_empty() {
            return 0;
        }
        let taken = batch.len();
        let active = self.link.active_peers();
        let keyring = self.keyring();
        let mut st = self.lock();
        let node_id = st.node_id;
        let me = self.settings.self_index;
        let mut ops = Vec::new();
        // Per stream: the position the batch continues from, where it ends, its records.
        type Batch = ((u64, u64), Header, Vec<Record>);
        let mut pushes: BTreeMap<StreamId, Batch> = BTreeMap::new();
        let mut results = Vec::with_capacity(batch.len());
        for w in batch {
            if is_config(&w.id) {
                if st.primary != me {
                    let e = WriteError::NotPrimary(st.primary);
                    results.push((w, Err(e)));
                    continue;
                }
                if st.takeover.is_some() || st.fetching.contains_key(&w.id) {
                    results.push((w, Err(WriteError::TakingOver(me))));
                    continue;
                }
            }
            let stream = st
                .streams
                .entry(w.id.clone())
                .or_insert_with(|| Stream::new(w.id.clone()));
            let prev = stream.header.position();
            let records: Vec<Record> = w
                .changes
                .iter()
                .enumerate()
                .map(|(i, c)| Record {
                    key: c.key.clone(),
                    value: c.value.clone(),
                    seq: prev.1 + 1 + i as u64,
                })
                .collect();
            let applied = stream.apply(&records);
            stream.header.owner = node_id;
            stream.header.seq = prev.1 + records.len() as u64;
            let header = stream.header;
            ops.extend(stream.store_ops(&records, false, keyring.as_deref()));
            let push = pushes
                .entry(w.id.clone())
                .or_insert_with(|| (prev, header, Vec::new()));
            push.1 = header;
            push.2.extend(records);
            results.push((w, Ok((header, applied))));
        }
        // Pushed and answered once saved, in commit order: pushes of one stream leave in
        // seq order.
        let saved = self.save_then(&st, ops, move |engine, saved| {
            if *saved == Saved::Ok {
                for (id, (prev, header, records)) in pushes {
                    let push = Message::Push {
                        stream: id,
                        prev,
                        header,
                        records,
                    }
                    .encode();
                    for p in &active {
                        engine.link.send(*p, push.clone());
                    }
                    engine
                        .counters
                        .pushes_sent
                        .fetch_add(active.len() as u64, Ordering::Relaxed);
                }
            }
            for (w, result) in results {
                let answer = match (result, saved) {
                    (Ok((header, applied)), Saved::Ok) => {
                        if !applied.is_empty() {
                            engine.observer.applied(&w.id, &applied, w.origin);
                        }
                        Ok(header)
                    }
                    (Ok(_), Saved::Failed(e)) => Err(WriteError::Store(e.clone())),
                    (Ok(_), Saved::Skipped) => Err(WriteError::Store(
                        "an earlier save failed, so this one was not made".into(),
                    )),
                    (Err(e), _) => Err(e),
                };
                let _ = w.done.send(answer);
            }
        });
        drop(st);
        saved.finish();
        taken
    }

    /// A primary that just started may have lost writes the peers hold (a store restored
    /// from a backup): before its first write it hears every reachable peer's digest, which
    /// starts that fetch, and waits for the fetch. Bounded by a few heartbeats.
    pub(super) async fn wait_for_digests(&self) {
        let deadline = Instant::now() + self.settings.heartbeat * 5;
        let mut progress = self.progress.subscribe();
        loop {
            let active = self.link.active_peers();
            let ready = {
                let st = self.lock();
                active.iter().all(|p| st.peers[p - 1].last_digest.is_some())
                    && !st.fetching.contains_key(&config_stream())
            };
            if ready {
                return;
            }
            tokio::select! {
                _ = progress.changed() => {}
                _ = tokio::time::sleep(self.settings.heartbeat / 4) => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Waits until a majority (this node included) holds `(generation, seq)` of `id`, or
    /// `ack_timeout`. Returns how many do, of how many.
    /// How many peers (this one included) hold `id` at `position` or later.
    pub(super) fn confirmed(&self, st: &State, id: &StreamId, position: (u64, u64)) -> usize {
        1 + st
            .peers
            .iter()
            .filter(|p| p.acked.get(id).is_some_and(|a| *a >= position))
            .count()
    }

    /// Wakes the writes of `id` that a majority now holds.
    pub(super) fn wake_majority(&self, st: &mut State, id: &StreamId) {
        let need = self.settings.peer_count / 2;
        let Some(waiters) = st.majority_waiters.get_mut(id) else {
            return;
        };
        // The position held by at least `need` other peers: the need-th highest ack.
        let mut acks: Vec<(u64, u64)> = st
            .peers
            .iter()
            .map(|p| p.acked.get(id).copied().unwrap_or_default())
            .collect();
        acks.sort_unstable_by(|a, b| b.cmp(a));
        let Some(held) = need.checked_sub(1).and_then(|i| acks.get(i)).copied() else {
            return;
        };
        while let Some(entry) = waiters.first_entry() {
            if *entry.key() > held {
                break;
            }
            for tx in entry.remove() {
                let _ = tx.send(());
            }
        }
        if waiters.is_empty() {
            st.majority_waiters.remove(id);
        }
    }

    pub(super) async fn wait_majority(
        &self,
        id: &StreamId,
        generation: u64,
        seq: u64,
    ) -> (usize, usize) {
        let peers = self.settings.peer_count;
        let deadline = Instant::now() + self.settings.ack_timeout;
        let position = (generation, seq);
        let woken = {
            let mut st = self.lock();
            let confirmed = self.confirmed(&st, id, position);
            if confirmed > peers / 2 {
                return (confirmed, peers);
            }
            let (tx, rx) = oneshot::channel();
            st.majority_waiters
                .entry(id.clone())
                .or_default()
                .entry(position)
                .or_default()
                .push(tx);
            rx
        };
        let _ = tokio::time::timeout_at(deadline, woken).await;
        let confirmed = self.confirmed(&self.lock(), id, position);
        (confirmed, peers)
    }
}
