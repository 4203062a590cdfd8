//! What comes from the peers: digests, pushes, fetches and their answers, saved as they
//! arrive (`docs/replication.md`, "Messages").

use super::*;

/// What a batch of pushes saves and answers once, after one store transaction.
#[derive(Default)]
pub(super) struct Deferred {
    pub(super) ops: Vec<Op>,
    pub(super) acks: Vec<(usize, Message)>,
    pub(super) applied: Vec<(StreamId, Vec<Applied>, usize)>,
}

impl Engine {
    /// Handles one frame from peer `from`. Malformed frames are dropped and logged.
    pub fn handle(self: &Arc<Self>, from: usize, payload: &[u8]) {
        let mut deferred = Deferred::default();
        self.handle_one(from, payload, &mut deferred);
        self.save_deferred(deferred);
    }

    /// Handles frames that arrived together: the pushes among them are saved in one store
    /// transaction (one fsync) and acknowledged after it, so a receiver keeps up with a
    /// primary that commits in groups.
    pub fn handle_batch(self: &Arc<Self>, frames: &[(usize, Bytes)]) {
        let mut deferred = Deferred::default();
        for (from, payload) in frames {
            self.handle_one(*from, payload, &mut deferred);
        }
        self.save_deferred(deferred);
    }

    /// Queues the pushes' saves; they are acknowledged and reported once saved.
    fn save_deferred(&self, deferred: Deferred) {
        if deferred.ops.is_empty() {
            return;
        }
        let Deferred { ops, acks, applied } = deferred;
        let saved = self.save_then(&self.lock(), ops, move |engine, saved| {
            if *saved != Saved::Ok {
                return;
            }
            for (to, ack) in &acks {
                engine.send(*to, ack);
            }
            for (id, applied, from) in &applied {
                engine.observer.applied(id, applied, Origin::Peer(*from));
            }
        });
        saved.finish();
    }

    pub(super) fn handle_one(self: &Arc<Self>, from: usize, payload: &[u8], defer: &mut Deferred) {
        if from == 0 || from > self.settings.peer_count || from == self.settings.self_index {
            return;
        }
        let msg = match Message::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                self.reject(from, "a malformed replication message", &e.to_string());
                return;
            }
        };
        match msg {
            Message::Digest {
                node_id,
                primary,
                epoch,
                headers,
            } => self.on_digest(from, node_id, primary as usize, epoch, headers),
            Message::Push {
                stream,
                prev,
                header,
                records,
            } => {
                self.counters
                    .pushes_received
                    .fetch_add(1, Ordering::Relaxed);
                self.on_push(from, stream, prev, header, records, defer)
            }
            Message::Fetch {
                stream,
                generation,
                after_seq,
                snapshot,
            } => self.on_fetch(from, stream, generation, after_seq, snapshot),
            Message::Records {
                stream,
                header,
                replace,
                after_seq,
                upto,
                records,
            } => self.on_records(from, stream, header, replace, after_seq, upto, records),
            Message::Ack {
                stream,
                generation,
                seq,
            } => {
                let mut st = self.lock();
                let acked = st.peers[from - 1].acked.entry(stream.clone()).or_default();
                *acked = (*acked).max((generation, seq));
                self.wake_majority(&mut st, &stream);
                drop(st);
                self.progress.send_modify(|n| *n += 1);
            }
            Message::Rpc { frame } => self.rpc.handle(from, &frame),
            Message::SetPrimary { primary, epoch } => {
                if primary == 0 || primary as usize > self.settings.peer_count {
                    self.reject(from, "set primary", &format!("there is no Peer {primary}"));
                    return;
                }
                let mut st = self.lock();
                self.adopt_primary(&mut st, primary as usize, epoch, from);
            }
        }
    }

    pub(super) fn reject(&self, from: usize, what: &str, reason: &str) {
        self.lock().rejected += 1;
        warn!(target: LOG, event = "Replication message rejected", peer = from, message = what,
            reason = reason, "Replication message rejected");
    }

    pub(super) fn on_digest(
        &self,
        from: usize,
        node_id: NodeId,
        primary: usize,
        epoch: u64,
        headers: Vec<(StreamId, Header)>,
    ) {
        let mut st = self.lock();
        {
            let p = &mut st.peers[from - 1];
            p.node_id = Some(node_id);
            p.primary = primary;
            p.epoch = epoch;
            p.last_digest = Some(Instant::now());
            p.last_digest_wall = Some(SystemTime::now());
            for (id, h) in &headers {
                let a = p.acked.entry(id.clone()).or_default();
                *a = (*a).max(h.position());
            }
            p.headers = headers.into_iter().collect();
        }
        let waiting: Vec<StreamId> = st.majority_waiters.keys().cloned().collect();
        for id in waiting {
            self.wake_majority(&mut st, &id);
        }
        // A newer epoch, or the same epoch naming a higher peer (two SetPrimary commands at
        // once), wins. Epoch 0 is the peers' own files: a disagreement there is 20017 until
        // an operator settles it.
        if (1..=self.settings.peer_count).contains(&primary)
            && (epoch > st.epoch || (epoch == st.epoch && epoch > 0 && primary > st.primary))
        {
            self.adopt_primary(&mut st, primary, epoch, from);
        }
        let differs = primary != st.primary || epoch != st.epoch;
        let p = &mut st.peers[from - 1];
        p.mismatch_since = if differs {
            p.mismatch_since.or(Some(Instant::now()))
        } else {
            None
        };
        let heads: Vec<(StreamId, Header)> = st.peers[from - 1]
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (id, theirs) in heads {
            let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
            let from_owner = if is_config(&id) {
                from == st.primary
            } else {
                Some(theirs.owner) == st.peers[from - 1].node_id
            };
            if is_config(&id)
                && from_owner
                && theirs.position() == mine.position()
                && mine.position() != (0, 0)
            {
                if theirs.hash != mine.hash {
                    if !st.conflicts.contains_key(&id) {
                        warn!(target: LOG, stream = %id, peer = from, revision = mine.seq,
                            "Configuration differs from the primary's at the same revision: run `causeway xcommand ForceConfigUpdate` on this peer");
                    }
                    st.conflicts.insert(
                        id.clone(),
                        format!(
                            "{id} differs from Peer {from}'s at revision {} (digest {} here, {} there): run `causeway xcommand ForceConfigUpdate`",
                            mine.seq,
                            mine.short_hash(),
                            theirs.short_hash()
                        ),
                    );
                } else {
                    st.conflicts.remove(&id);
                }
            }
            if st.fetching.contains_key(&id) {
                continue;
            }
            // Another peer's own stream: its owner is the authority. A writer that started
            // over (a peer that lost its store: a new node id), went back (restored from a
            // backup: a lower position than this copy), or holds other records at the same
            // position, is taken whole. Nothing to run: these streams are the peer's own
            // state (its alarms, registrations, licences), which it rewrites from what it
            // holds now.
            if !is_config(&id) && from_owner && mine.owner != 0 {
                let why = if theirs.owner != mine.owner {
                    Some("it started over with a new store")
                } else if theirs.position() < mine.position() {
                    Some("its copy went back (a restore, or a store that lost writes)")
                } else if theirs.position() == mine.position() && theirs.hash != mine.hash {
                    Some("its copy differs at the same revision")
                } else {
                    None
                };
                if let Some(why) = why {
                    info!(target: LOG, peer = from, stream = %id, revision = theirs.seq, reason = why,
                        "Taking the owner's copy of a stream");
                    st.conflicts.remove(&id);
                    self.start_fetch(&mut st, from, &id, mine, true);
                    continue;
                }
            }
            if theirs.position() <= mine.position() {
                continue;
            }
            // Who may bring this stream up to date: its owner (the primary, for the
            // configuration) or, when this node is the primary and has lost what it wrote
            // (an empty store, or one restored from a backup), a peer holding more of this
            // node's own writes. Taking over from another primary is `drive_takeover`'s.
            let eligible = if is_config(&id) {
                from == st.primary
                    || (st.primary == self.settings.self_index
                        && (mine.position() == (0, 0)
                            || (theirs.owner == st.node_id
                                && theirs.generation == mine.generation)))
            } else {
                from_owner
            };
            if eligible {
                self.start_fetch(&mut st, from, &id, mine, false);
            }
        }
        // A stream of its own the owner no longer has at all (restored from a backup taken
        // before it existed, or purged: then under a new node id, so known by its name,
        // `<namespace>/peerN`): its copy, empty, is taken whole too.
        let own_name = format!("peer{from}");
        let gone: Vec<(StreamId, Header)> = st
            .streams
            .iter()
            .filter(|(id, s)| {
                !is_config(id)
                    && s.header.owner != 0
                    && (s.header.owner == node_id || id.name == own_name)
                    && !st.peers[from - 1].headers.contains_key(*id)
                    && !st.fetching.contains_key(*id)
            })
            .map(|(id, s)| (id.clone(), s.header))
            .collect();
        for (id, mine) in gone {
            info!(target: LOG, peer = from, stream = %id, reason = "its owner no longer has it",
                "Taking the owner's copy of a stream");
            st.conflicts.remove(&id);
            self.start_fetch(&mut st, from, &id, mine, true);
        }
        drop(st);
        self.progress.send_modify(|n| *n += 1);
    }

    pub(super) fn start_fetch(
        &self,
        st: &mut State,
        from: usize,
        id: &StreamId,
        mine: Header,
        snapshot: bool,
    ) {
        info!(target: LOG, peer = from, stream = %id, revision = mine.seq, "Starting synchronisation");
        st.fetching.insert(
            id.clone(),
            Fetching {
                from,
                since: Instant::now(),
            },
        );
        self.send(
            from,
            &Message::Fetch {
                stream: id.clone(),
                generation: mine.generation,
                after_seq: mine.seq,
                snapshot,
            },
        );
    }

    pub(super) fn on_push(
        &self,
        from: usize,
        id: StreamId,
        prev: (u64, u64),
        header: Header,
        records: Vec<Record>,
        defer: &mut Deferred,
    ) {
        let mut st = self.lock();
        let sender_ok = if is_config(&id) {
            from == st.primary
        } else {
            true
        };
        let id_ok = st.peers[from - 1].node_id.is_none_or(|n| n == header.owner);
        let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
        if !sender_ok || !id_ok {
            drop(st);
            return self.reject(
                from,
                "push",
                &format!(
                    "Peer {from} is not the owner of {id} (the configuration primary is Peer {})",
                    self.primary()
                ),
            );
        }
        if header.generation < mine.generation {
            drop(st);
            return self.reject(
                from,
                "push",
                &format!(
                    "{id} generation {} is older than this peer's generation {}",
                    header.generation, mine.generation
                ),
            );
        }
        if prev != mine.position() {
            if header.position() > mine.position() && !st.fetching.contains_key(&id) {
                self.start_fetch(&mut st, from, &id, mine, false);
            }
            return;
        }
        let stream = st
            .streams
            .entry(id.clone())
            .or_insert_with(|| Stream::new(id.clone()));
        let applied = stream.apply(&records);
        stream.header.owner = header.owner;
        stream.header.generation = header.generation;
        stream.header.seq = header.seq;
        let hash_ok = stream.header.hash == header.hash;
        let ops = stream.store_ops(&records, false, self.keyring().as_deref());
        let ack = Message::Ack {
            stream: id.clone(),
            generation: header.generation,
            seq: header.seq,
        };
        // Saved, acknowledged and reported with the rest of the frames that came with it.
        defer.ops.extend(ops);
        self.note_hash(&mut st, &id, from, hash_ok, true);
        defer.acks.push((from, ack));
        if !applied.is_empty() {
            defer.applied.push((id, applied, from));
        }
    }

    /// After records from `from` (the stream's owner, or the primary) are applied: whether
    /// this copy now hashes as theirs. Another peer's own stream that does not is taken
    /// whole from it (`may_refetch`), or, if a whole copy does not hash as it either,
    /// alarmed (20011).
    pub(super) fn note_hash(
        &self,
        st: &mut State,
        id: &StreamId,
        from: usize,
        hash_ok: bool,
        may_refetch: bool,
    ) {
        if hash_ok {
            st.conflicts.remove(id);
        } else if !is_config(id) {
            if may_refetch {
                let mine = st.streams.get(id).map(|s| s.header).unwrap_or_default();
                info!(target: LOG, peer = from, stream = %id, revision = mine.seq,
                    "Taking the owner's copy of a stream: this copy differs from it");
                self.start_fetch(st, from, id, mine, true);
            } else {
                warn!(target: LOG, stream = %id, peer = from,
                    "A whole copy of a stream differs from its owner's");
                st.conflicts.insert(
                    id.clone(),
                    format!("{id} differs from Peer {from}'s own copy even after taking it whole: restart Peer {from}, which rewrites its own streams"),
                );
            }
        } else {
            let seq = st.streams.get(id).map(|s| s.header.seq).unwrap_or(0);
            warn!(target: LOG, stream = %id, peer = from, revision = seq,
                "Configuration differs from the primary's: run `causeway xcommand ForceConfigUpdate` on this peer");
            st.conflicts.insert(
                id.clone(),
                format!("{id} differs from Peer {from}'s at revision {seq}: run `causeway xcommand ForceConfigUpdate`"),
            );
        }
    }

    pub(super) fn on_fetch(
        &self,
        from: usize,
        id: StreamId,
        generation: u64,
        after_seq: u64,
        snapshot: bool,
    ) {
        let st = self.lock();
        let empty = Stream::new(id.clone());
        let s = st.streams.get(&id).unwrap_or(&empty);
        let header = s.header;
        let range = !snapshot && generation == header.generation && after_seq <= header.seq;
        let (records, after) = if range {
            (s.since(after_seq), after_seq)
        } else {
            (s.snapshot(), 0)
        };
        // Answered once what it carries is saved here.
        let sent = self.after_saves(&st, move |engine| {
            engine.send_records(from, id, header, !range, after, records)
        });
        drop(st);
        sent.finish();
    }

    /// A fetch's answer: `records` after `after` up to `header`, in frames of a bounded size.
    fn send_records(
        &self,
        to: usize,
        id: StreamId,
        header: Header,
        mut replace: bool,
        mut after: u64,
        records: Vec<Record>,
    ) {
        let mut chunks = records.chunks(RECORDS_PER_FRAME).peekable();
        if chunks.peek().is_none() {
            return self.send(
                to,
                &Message::Records {
                    stream: id,
                    header,
                    replace,
                    after_seq: after,
                    upto: header.seq,
                    records: Vec::new(),
                },
            );
        }
        while let Some(chunk) = chunks.next() {
            let upto = if chunks.peek().is_none() {
                header.seq
            } else {
                chunk.last().map(|r| r.seq).unwrap_or(header.seq)
            };
            self.send(
                to,
                &Message::Records {
                    stream: id.clone(),
                    header,
                    replace,
                    after_seq: after,
                    upto,
                    records: chunk.to_vec(),
                },
            );
            replace = false;
            after = upto;
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_records(
        &self,
        from: usize,
        id: StreamId,
        header: Header,
        replace: bool,
        after_seq: u64,
        upto: u64,
        records: Vec<Record>,
    ) {
        let mut st = self.lock();
        if st.fetching.get(&id).map(|f| f.from) != Some(from) {
            drop(st);
            return self.reject(
                from,
                "records",
                &format!("{id} was not asked of Peer {from}"),
            );
        }
        let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
        if header.generation < mine.generation && !replace {
            st.fetching.remove(&id);
            drop(st);
            return self.reject(
                from,
                "records",
                &format!(
                    "{id} generation {} is older than this peer's {}",
                    header.generation, mine.generation
                ),
            );
        }
        if !replace && mine.position() != (header.generation, after_seq) {
            // A stale answer (the stream moved meanwhile): the next digest asks again.
            st.fetching.remove(&id);
            return;
        }
        let stream = st
            .streams
            .entry(id.clone())
            .or_insert_with(|| Stream::new(id.clone()));
        let applied = if replace {
            let before: BTreeMap<String, Vec<u8>> = stream
                .entries()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect();
            stream.clear();
            stream.apply(&records);
            let mut diff: Vec<Applied> = Vec::new();
            for (k, old) in &before {
                let new = stream.get(k).map(<[u8]>::to_vec);
                if new.as_ref() != Some(old) {
                    diff.push(Applied {
                        key: k.clone(),
                        old: Some(old.clone()),
                        new,
                    });
                }
            }
            for (k, v) in stream.entries() {
                if !before.contains_key(k) {
                    diff.push(Applied {
                        key: k.to_string(),
                        old: None,
                        new: Some(v.to_vec()),
                    });
                }
            }
            diff
        } else {
            stream.apply(&records)
        };
        stream.header.owner = header.owner;
        stream.header.generation = header.generation;
        stream.header.seq = upto;
        let done = upto == header.seq;
        let hash_ok = stream.header.hash == header.hash;
        let ops = stream.store_ops(&records, replace, self.keyring().as_deref());
        let records = records.len();
        let saved = self.save_then(&st, ops, move |engine, saved| {
            let mut st = engine.lock();
            if *saved != Saved::Ok {
                // Asked again by the next digest, from what the store holds.
                st.fetching.remove(&id);
                return;
            }
            if done {
                st.fetching.remove(&id);
                st.last_sync = Some(SystemTime::now());
                // Only the owner's copy is the reference for "differs" (20011).
                let from_owner = !is_config(&id) || from == st.primary;
                if from_owner {
                    engine.note_hash(&mut st, &id, from, hash_ok, !replace);
                }
                info!(target: LOG, peer = from, stream = %id, revision = upto,
                    records = records, "Synchronisation completed successfully");
            }
            let owner_peer = if is_config(&id) { st.primary } else { from };
            drop(st);
            if done && owner_peer != engine.settings.self_index {
                engine.send(
                    owner_peer,
                    &Message::Ack {
                        stream: id.clone(),
                        generation: header.generation,
                        seq: upto,
                    },
                );
            }
            if !applied.is_empty() {
                engine.observer.applied(&id, &applied, Origin::Peer(from));
            }
        });
        drop(st);
        saved.finish();
    }

    /// Goes back to what the store holds. Batches queued before are not saved after it
    /// (they would leave gaps on disk): their changes are fetched again.
    pub(super) fn reload(&self, st: &mut State) {
        if let Ok(streams) = Stream::load_all(self.store.as_ref(), self.keyring().as_deref()) {
            st.streams = streams.into_iter().map(|s| (s.id.clone(), s)).collect();
            st.diverged = false;
            st.save_epoch += 1;
        }
    }

    /// Notes how a save ended; true when saved.
    pub(super) fn settle(&self, st: &mut State, saved: &Saved) -> bool {
        match saved {
            Saved::Ok => {
                st.store_error = None;
                true
            }
            Saved::Failed(e) => {
                warn!(target: LOG, reason = %e, "Saving replicated changes failed");
                st.store_error = Some(e.clone());
                // Memory now holds changes the store does not: go back to what the store
                // holds, so digests show what is really saved and it is fetched again. If
                // the store cannot even be read, the next heartbeat tries again.
                st.diverged = true;
                self.reload(st);
                false
            }
            Saved::Skipped => false,
        }
    }
}
