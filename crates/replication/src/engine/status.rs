//! What the engine reports: `xstatus cluster`'s replication part, its alarms, the
//! synchronisation log lines, and its counters for `/metrics`.

use super::*;

/// What the engine has done since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Store transactions committed (each one fsync).
    pub commits: AtomicU64,
    /// Time spent committing them, in microseconds.
    pub commit_micros: AtomicU64,
    /// Push frames sent, one per peer.
    pub pushes_sent: AtomicU64,
    /// Push frames received.
    pub pushes_received: AtomicU64,
}

/// `xstatus cluster`'s replication part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicationStatus {
    pub node_id: String,
    pub primary: usize,
    pub epoch: u64,
    /// `Active`, or what is wrong and with which peers (EX-5).
    pub database_status: String,
    pub revision: u64,
    pub generation: u64,
    pub digest: String,
    pub records: usize,
    pub peers: Vec<PeerReplication>,
    pub last_check_unix_ms: Option<u64>,
    pub next_check_unix_ms: Option<u64>,
    pub last_synchronisation_unix_ms: Option<u64>,
    pub rejected_messages: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerReplication {
    pub index: usize,
    pub revision: Option<u64>,
    pub generation: Option<u64>,
    pub digest: Option<String>,
    pub primary: Option<usize>,
    /// `In sync`, `Behind by N`, `Ahead by N`, `Differs`, `No digest`.
    pub state: String,
    pub last_digest_unix_ms: Option<u64>,
}

pub(super) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Engine {
    /// Whether reachable Peer `p` has named another configuration primary (or epoch) than
    /// this peer's for five heartbeats: the condition of alarm 20017, which also keeps
    /// `Cluster database status` from reading `Active`.
    fn disagrees_on_primary(&self, st: &State, p: usize) -> bool {
        st.peers[p - 1]
            .mismatch_since
            .is_some_and(|t| t.elapsed() >= self.settings.heartbeat * 5)
    }

    /// The seed's periodic synchronisation lines: what this peer's configuration is doing.
    pub(super) fn report_sync(&self, st: &State, active: &[usize]) {
        let id = config_stream();
        let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
        let me = self.settings.self_index;
        info!(target: LOG, "Starting synchronisation");
        info!(target: LOG, configuration_master_index = st.primary - 1, local_peer_index = me - 1,
            revision = mine.seq, digest = %mine.short_hash(), "Cluster configuration");
        let behind = |p: &usize| {
            let ps = &st.peers[p - 1];
            let acked = ps.acked.get(&id).copied().unwrap_or_default();
            let seen = ps
                .headers
                .get(&id)
                .map(|h| h.position())
                .unwrap_or_default();
            acked.max(seen) < mine.position()
        };
        let outcome = if st.primary == me {
            let lagging: Vec<String> = active
                .iter()
                .filter(|p| behind(p))
                .map(|p| format!("Peer {p}"))
                .collect();
            if lagging.is_empty() {
                Ok("This peer is the cluster master, local configuration has already been replicated to the other peers".to_string())
            } else {
                Ok(format!(
                    "This peer is the cluster master, bringing {} up to date",
                    lagging.join(", ")
                ))
            }
        } else if !active.contains(&st.primary) {
            Err(format!(
                "This peer is not the cluster master, and the cluster master (Peer {}) is unreachable",
                st.primary
            ))
        } else if let Some(why) = st.conflicts.get(&id) {
            Err(format!("This peer is not the cluster master, and {why}"))
        } else {
            let theirs = st.peers[st.primary - 1]
                .headers
                .get(&id)
                .map(|h| h.position())
                .unwrap_or_default();
            if theirs <= mine.position() {
                Ok("This peer is not the cluster master, local configuration is already up to date".to_string())
            } else {
                Ok(format!(
                    "This peer is not the cluster master, fetching the configuration from Peer {}",
                    st.primary
                ))
            }
        };
        match outcome {
            Ok(detail) => {
                info!(target: LOG, "{detail}");
                info!(target: LOG, "Synchronisation completed successfully");
            }
            Err(detail) => {
                warn!(target: LOG, "{detail}");
                warn!(target: LOG, "Synchronisation failed");
            }
        }
    }

    /// `(id, subject, reason)` of the replication alarms this node's state calls for.
    pub fn alarms(&self, settled: bool) -> Vec<(u32, String, String)> {
        let active = self.link.active_peers();
        let st = self.lock();
        let mut out = Vec::new();
        let grace = self.settings.heartbeat * 15;
        if let Some(e) = &st.store_error {
            out.push((20009, "store".to_string(), e.clone()));
        }
        for (id, why) in &st.conflicts {
            out.push((20011, id.to_string(), why.clone()));
        }
        if settled && st.primary != self.settings.self_index {
            if let Some(since) = st.primary_lost_since {
                if since.elapsed() >= grace {
                    out.push((
                        20016,
                        format!("Peer {}", st.primary),
                        format!(
                            "the configuration primary (Peer {}) is unreachable",
                            st.primary
                        ),
                    ));
                }
            }
        }
        for p in &active {
            let ps = &st.peers[p - 1];
            let quiet = match (ps.last_digest, ps.active_since) {
                (Some(t), _) => t.elapsed() >= grace,
                (None, Some(since)) => since.elapsed() >= grace,
                (None, None) => false,
            };
            if quiet {
                out.push((
                    20006,
                    format!("Peer {p}"),
                    format!("no replication digest from Peer {p} for {grace:?}"),
                ));
            }
            if self.disagrees_on_primary(&st, *p) {
                out.push((
                    20017,
                    format!("Peer {p}"),
                    format!(
                        "Peer {p} says the configuration primary is Peer {}, this peer says Peer {}: run `causeway xcommand SetPrimary <peer>` to settle it",
                        ps.primary, st.primary
                    ),
                ));
            }
        }
        out
    }

    pub fn counters(&self) -> &EngineCounters {
        &self.counters
    }

    pub fn status(&self) -> ReplicationStatus {
        let active = self.link.active_peers();
        let st = self.lock();
        let id = config_stream();
        let mine = st.streams.get(&id).map(|s| s.header).unwrap_or_default();
        let records = st.streams.get(&id).map(|s| s.live_len()).unwrap_or(0);
        let mut problems: Vec<String> = Vec::new();
        let mut peers = Vec::new();
        for (i, p) in st.peers.iter().enumerate() {
            let index = i + 1;
            if index == self.settings.self_index {
                continue;
            }
            let h = p.headers.get(&id).copied();
            let reachable = active.contains(&index);
            // An ack is newer than the last digest: a peer that acked the latest push is in
            // sync though its digest still shows the revision before.
            let acked = p.acked.get(&id).copied().unwrap_or_default();
            let state = match (reachable, p.last_digest.is_some(), h) {
                (false, _, _) => "Unreachable".to_string(),
                (true, false, _) => "No digest".to_string(),
                (true, true, h) => {
                    let h = h.unwrap_or_default();
                    if h.position() == mine.position() && h.hash != mine.hash {
                        "Differs".to_string()
                    } else if h.position() == mine.position() || acked == mine.position() {
                        "In sync".to_string()
                    } else if h.generation != mine.generation {
                        format!(
                            "Generation {} (this peer: {})",
                            h.generation, mine.generation
                        )
                    } else if h.seq < mine.seq {
                        format!("Behind by {}", mine.seq - h.seq)
                    } else {
                        format!("Ahead by {}", h.seq - mine.seq)
                    }
                }
            };
            if state != "In sync" {
                problems.push(format!("Peer {index}: {state}"));
            }
            // Peers that disagree on the primary are not one database, whatever the digests
            // say (20017).
            if reachable && self.disagrees_on_primary(&st, index) {
                problems.push(if p.primary != st.primary {
                    format!(
                        "Peer {index}: names Peer {} as the configuration primary (this peer: Peer {})",
                        p.primary, st.primary
                    )
                } else {
                    format!(
                        "Peer {index}: names Peer {} as the configuration primary at epoch {} (this peer: epoch {})",
                        p.primary, p.epoch, st.epoch
                    )
                });
            }
            peers.push(PeerReplication {
                index,
                revision: h.map(|h| h.seq),
                generation: h.map(|h| h.generation),
                digest: h.map(|h| h.short_hash()),
                primary: p.last_digest.map(|_| p.primary),
                state,
                last_digest_unix_ms: p.last_digest_wall.map(unix_ms),
            });
        }
        for why in st.conflicts.values() {
            problems.push(why.clone());
        }
        let database_status = if problems.is_empty() {
            "Active".to_string()
        } else {
            format!("Not synchronised ({})", problems.join("; "))
        };
        let last_check = st.last_check.map(unix_ms);
        ReplicationStatus {
            node_id: format!("{:016x}", st.node_id),
            primary: st.primary,
            epoch: st.epoch,
            database_status,
            revision: mine.seq,
            generation: mine.generation,
            digest: mine.short_hash(),
            records,
            peers,
            last_check_unix_ms: last_check,
            next_check_unix_ms: last_check.map(|t| t + self.settings.heartbeat.as_millis() as u64),
            last_synchronisation_unix_ms: st.last_sync.map(unix_ms),
            rejected_messages: st.rejected,
        }
    }
}
