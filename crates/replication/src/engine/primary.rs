//! The configuration stream's policy: its writer is the configuration primary, not the
//! peer that owns the stream as for every other stream; changing the primary and taking
//! over (EX-7), and a subordinate's ForceConfigUpdate (EX-13).

use super::*;

/// The configuration stream: owned by the configuration primary.
pub fn config_stream() -> StreamId {
    StreamId::new("config", "cluster")
}

pub(super) fn is_config(id: &StreamId) -> bool {
    id.namespace == "config"
}

pub(super) struct Takeover {
    pub(super) epoch: u64,
    pub(super) started: Instant,
}

impl Engine {
    pub(super) fn adopt_primary(&self, st: &mut State, primary: usize, epoch: u64, from: usize) {
        if epoch < st.epoch || (epoch == st.epoch && primary <= st.primary) {
            return;
        }
        let old = st.primary;
        st.primary = primary;
        st.epoch = epoch;
        if let Err(e) = self.store.apply(&[
            put_meta("epoch", epoch),
            put_meta("primary", primary as u64),
        ]) {
            st.store_error = Some(e.to_string());
        }
        info!(target: LOG, event = "Configuration primary changed", old_primary = old,
            new_primary = primary, epoch = epoch, told_by = from,
            "Configuration primary changed");
        st.takeover = (primary == self.settings.self_index).then(|| Takeover {
            epoch,
            started: Instant::now(),
        });
        st.primary_lost_since = None;
        self.observer.primary_changed(primary, epoch);
    }

    /// A new primary first takes the newest configuration any reachable peer holds, then
    /// starts its generation (EX-7).
    pub(super) fn drive_takeover(&self, st: &mut State, active: &[usize]) -> Option<saver::Ticket> {
        let Some(t) = &st.takeover else { return None };
        let (epoch, started) = (t.epoch, t.started);
        let id = config_stream();
        if st.fetching.contains_key(&id) {
            return None;
        }
        let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
        // Every reachable peer must follow this epoch (so it takes no more pushes from the
        // old primary) and have said so in a digest, which also carries its newest header.
        let heard_all = active.iter().all(|p| st.peers[p - 1].epoch >= epoch);
        if !heard_all && started.elapsed() < self.settings.heartbeat * 10 {
            return None;
        }
        let newest = active
            .iter()
            .filter_map(|p| st.peers[p - 1].headers.get(&id).map(|h| (*p, *h)))
            .filter(|(_, h)| h.position() > mine.position())
            .max_by_key(|(_, h)| h.position());
        if let Some((p, _)) = newest {
            self.start_fetch(st, p, &id, mine, false);
            return None;
        }
        let stream = st
            .streams
            .entry(id.clone())
            .or_insert_with(|| Stream::new(id.clone()));
        let prev = stream.header.position();
        stream.header.owner = st.node_id;
        stream.header.generation = epoch.max(stream.header.generation);
        let header = stream.header;
        let ops = stream.store_ops(&[], false, self.keyring().as_deref());
        st.takeover = None;
        info!(target: LOG, event = "Configuration primary takeover completed", epoch = epoch,
            revision = header.seq, "This peer is now the configuration primary");
        let push = Message::Push {
            stream: id,
            prev,
            header,
            records: Vec::new(),
        };
        let active = active.to_vec();
        Some(self.save_then(st, ops, move |engine, saved| {
            if *saved == Saved::Ok {
                for p in &active {
                    engine.send(*p, &push);
                }
            }
        }))
    }

    /// EX-13: discard this subordinate's copy of the configuration and take the primary's.
    pub async fn force_config_update(&self) -> Result<Header, Refusal> {
        let id = config_stream();
        {
            let mut st = self.lock();
            let primary = st.primary;
            if primary == self.settings.self_index {
                return Err(Refusal::conflict("this peer is the configuration primary: ForceConfigUpdate runs on a subordinate"));
            }
            if !self.link.active_peers().contains(&primary) {
                return Err(Refusal::unavailable(format!(
                    "the configuration primary (Peer {primary}) is unreachable: run this again when it is back"
                )));
            }
            let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
            self.start_fetch(&mut st, primary, &id, mine, true);
        }
        let deadline = Instant::now() + self.settings.ack_timeout;
        let mut progress = self.progress.subscribe();
        loop {
            {
                let st = self.lock();
                if !st.fetching.contains_key(&id) {
                    let h = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
                    return match st.conflicts.get(&id) {
                        None => Ok(h),
                        Some(c) => Err(Refusal::conflict(c.clone())),
                    };
                }
            }
            tokio::select! {
                _ = progress.changed() => {}
                _ = tokio::time::sleep(self.settings.heartbeat) => {}
                _ = tokio::time::sleep_until(deadline) => return Err(Refusal::timeout("the primary did not send its configuration in time; run this again")),
            }
        }
    }

    /// EX-7: make `primary` the configuration primary on every reachable peer. Returns the
    /// new epoch once the new primary has taken over, or says why it has not yet.
    pub async fn set_primary(self: &Arc<Self>, primary: usize) -> Result<u64, Refusal> {
        if primary == 0 || primary > self.settings.peer_count {
            return Err(Refusal::invalid(format!(
                "there is no Peer {primary}: the peer list has {} peers",
                self.settings.peer_count
            )));
        }
        let active = self.link.active_peers();
        let epoch = {
            let mut st = self.lock();
            let known = st.peers.iter().map(|p| p.epoch).max().unwrap_or(0);
            let gen = st
                .streams
                .get(&config_stream())
                .map(|s| s.header.generation)
                .unwrap_or(0);
            let epoch = st.epoch.max(known).max(gen) + 1;
            self.adopt_primary(&mut st, primary, epoch, self.settings.self_index);
            epoch
        };
        let msg = Message::SetPrimary {
            primary: primary as u16,
            epoch,
        };
        for p in &active {
            self.send(*p, &msg);
        }
        if primary != self.settings.self_index && !active.contains(&primary) {
            return Err(Refusal::unavailable(format!(
                "every reachable peer now follows Peer {primary}, which is unreachable: it takes over when it is back"
            )));
        }
        let deadline = Instant::now() + self.settings.ack_timeout;
        let mut progress = self.progress.subscribe();
        loop {
            let done = {
                let st = self.lock();
                if primary == self.settings.self_index {
                    st.takeover.is_none()
                } else {
                    st.peers[primary - 1]
                        .headers
                        .get(&config_stream())
                        .is_some_and(|h| h.generation >= epoch)
                        || st.peers[primary - 1].epoch > epoch
                }
            };
            if done {
                return Ok(epoch);
            }
            tokio::select! {
                _ = progress.changed() => {}
                _ = tokio::time::sleep(self.settings.heartbeat) => {}
                _ = tokio::time::sleep_until(deadline) => return Err(Refusal::timeout(format!("Peer {primary} has not finished taking over yet; check `causeway xstatus cluster`"))),
            }
        }
    }
}
