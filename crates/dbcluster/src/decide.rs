//! The one decision of a cycle (docs/dbcluster.md, section 1): what is observed in, one
//! action out. Pure: no I/O, no clock (ages come in as numbers), so every rule has a unit
//! test and a property test runs it over arbitrary observations.

use std::net::SocketAddr;

use causeway_consensus::Holder;

/// What runs on this node, as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pg {
    /// No postgres runs.
    Down,
    /// It runs and does not answer SQL yet (starting, crash recovery), for this long.
    Starting { for_ms: u64 },
    Standby {
        position: u64,
        /// The peer whose address `primary_conninfo` names; `None`: no upstream (sealed).
        following: Option<usize>,
        streaming: bool,
        /// How long it has been following its upstream without streaming.
        not_streaming_ms: u64,
    },
    Primary {
        /// `synchronous_standby_names` as it runs.
        sync_names: String,
        /// Physical slots it has.
        slots: Vec<String>,
    },
}

/// Which data directory runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instance {
    None,
    Local,
    Cluster,
}

/// The master this node should follow: the ready master of the highest generation that
/// another node reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub peer: usize,
    pub generation: u64,
    pub address: SocketAddr,
    /// It has checkpointed since its promotion: `pg_rewind` reads its timeline from the
    /// control file, which shows the new one only after that checkpoint.
    pub checkpointed: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub me: usize,
    pub member: bool,
    pub lease: Holder,
    pub instance: Instance,
    pub pg: Pg,
    /// The generation this node last promoted at (the store).
    pub promoted_at: Option<u64>,
    pub sealed_at: u64,
    pub upstream: Option<Upstream>,
    /// Times in a row the cluster's postgres exited before it answered (a data directory
    /// it cannot start from).
    pub start_failures: u32,
    /// `synchronous_standby_names` and slot names the master should run with.
    pub wanted_sync_names: String,
    pub wanted_slots: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    None {
        why: &'static str,
    },
    /// Stop postgres at once (SIGQUIT, SIGKILL of its group after 200 ms).
    Fence {
        why: &'static str,
    },
    /// Stop the cluster's instance and run the node's own database (not a member).
    UseLocal,
    /// Stop the node's own database (a member runs the cluster's).
    StopLocal,
    /// Start the cluster's instance as a standby (following `upstream` when known).
    StartStandby {
        upstream: Option<Upstream>,
    },
    /// Point `primary_conninfo` at `upstream` and reload.
    Follow {
        upstream: Upstream,
    },
    /// Seal a quorum of standbys at `generation`, then promote (section 3).
    Promote {
        generation: u64,
    },
    /// The master's synchronous set and slots are not as wanted.
    Configure,
    /// Stop, `pg_rewind` from `upstream`, follow it (a base backup when that fails).
    Rewind {
        upstream: Upstream,
        why: &'static str,
    },
    /// Give up the lease: held but this node cannot become a master now.
    Resign {
        why: &'static str,
    },
}

/// How long a standby may follow its master without streaming before it is rewound (its
/// history diverged, or the WAL it needs is gone).
pub const REWIND_AFTER_MS: u64 = 10_000;
/// How long postgres may run without answering before a lease holder gives the lease up.
pub const UNRESPONSIVE_MS: u64 = 5_000;
/// Failed starts in a row after which a standby's data is copied afresh from the master.
pub const START_FAILURES_BEFORE_COPY: u32 = 3;

pub fn decide(o: &Observed) -> Action {
    use Action::*;
    let mine = match o.lease {
        Holder::Me { generation } => Some(generation),
        _ => None,
    };
    // Rule 1: a writable postgres without the lease it was promoted at is stopped first.
    if let Pg::Primary { .. } = o.pg {
        if o.instance == Instance::Cluster && (mine.is_none() || mine != o.promoted_at) {
            return Fence {
                why: "master without the lease it was promoted at",
            };
        }
    }
    if !o.member {
        return match o.instance {
            Instance::Cluster => UseLocal,
            Instance::None => UseLocal,
            Instance::Local => None {
                why: "not a member: the node's own database runs",
            },
        };
    }
    if o.instance == Instance::Local {
        return StopLocal;
    }
    // A former master must rewind before it follows anyone newer.
    let needs_rewind = |u: &Upstream| o.promoted_at.is_some_and(|p| p < u.generation);
    match (mine, &o.pg) {
        (Some(_), Pg::Primary { sync_names, slots }) => {
            let mut wanted = o.wanted_slots.clone();
            wanted.sort();
            let mut have = slots.clone();
            have.sort();
            if *sync_names != o.wanted_sync_names || wanted.iter().any(|s| !have.contains(s)) {
                Configure
            } else {
                None { why: "master" }
            }
        }
        (Some(g), Pg::Standby { .. }) => Promote { generation: g },
        (Some(_), Pg::Down) => StartStandby {
            upstream: Option::None,
        },
        (Some(_), Pg::Starting { for_ms }) if *for_ms > UNRESPONSIVE_MS => Resign {
            why: "postgres does not answer",
        },
        (Some(_), Pg::Starting { .. }) => None {
            why: "lease held; postgres is starting",
        },
        (Option::None, Pg::Primary { .. }) => unreachable_fence(),
        (Option::None, Pg::Down) => match o.upstream {
            Some(u) if o.start_failures >= START_FAILURES_BEFORE_COPY => Rewind {
                upstream: u,
                why: "PostgreSQL does not start from its data",
            },
            Some(u) if needs_rewind(&u) => Rewind {
                upstream: u,
                why: "this node was master at an older generation",
            },
            u => StartStandby {
                upstream: u.filter(|u| u.generation >= o.sealed_at),
            },
        },
        (Option::None, Pg::Starting { .. }) => None {
            why: "postgres is starting",
        },
        (
            Option::None,
            Pg::Standby {
                following,
                streaming,
                not_streaming_ms,
                ..
            },
        ) => match o.upstream {
            Some(u) if u.peer != o.me && u.generation >= o.sealed_at => {
                if needs_rewind(&u) {
                    Rewind {
                        upstream: u,
                        why: "this node was master at an older generation",
                    }
                } else if *following != Some(u.peer) {
                    Follow { upstream: u }
                } else if !streaming && *not_streaming_ms > REWIND_AFTER_MS {
                    Rewind {
                        upstream: u,
                        why: "not streaming from the master",
                    }
                } else {
                    None { why: "standby" }
                }
            }
            _ => None {
                why: "standby; no master to follow",
            },
        },
    }
}

// Rule 1 returned already for a primary without the lease.
fn unreachable_fence() -> Action {
    Action::Fence {
        why: "master without the lease",
    }
}

/// Whether this node may stand for the lease (section 3): a member running as a standby
/// (or a master at its lease), not a former master that has not rewound, and at least as
/// far as every other standby that reported recently (a tie goes to the lower peer).
pub fn eligible(o: &Observed, others: &[(usize, u64)]) -> bool {
    if !o.member || o.instance != Instance::Cluster {
        return false;
    }
    match &o.pg {
        Pg::Primary { .. } => o.lease.is_me(),
        Pg::Standby { position, .. } => {
            if o.upstream
                .is_some_and(|u| o.promoted_at.is_some_and(|p| p < u.generation))
            {
                return false;
            }
            others
                .iter()
                .all(|&(peer, pos)| pos < *position || (pos == *position && o.me < peer))
        }
        _ => false,
    }
}

trait IsMe {
    fn is_me(&self) -> bool;
}

impl IsMe for Holder {
    fn is_me(&self) -> bool {
        matches!(self, Holder::Me { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(k: usize) -> SocketAddr {
        format!("127.0.0.{k}:5432").parse().unwrap()
    }

    fn standby(following: Option<usize>) -> Pg {
        Pg::Standby {
            position: 100,
            following,
            streaming: following.is_some(),
            not_streaming_ms: 0,
        }
    }

    fn base() -> Observed {
        Observed {
            me: 2,
            member: true,
            lease: Holder::Peer {
                peer: 1,
                generation: 3,
            },
            instance: Instance::Cluster,
            pg: standby(Some(1)),
            promoted_at: None,
            sealed_at: 0,
            upstream: Some(Upstream {
                peer: 1,
                generation: 3,
                address: addr(1),
                checkpointed: true,
            }),
            start_failures: 0,
            wanted_sync_names: String::new(),
            wanted_slots: vec![],
        }
    }

    #[test]
    fn a_master_that_lost_its_lease_is_fenced() {
        let mut o = base();
        o.pg = Pg::Primary {
            sync_names: String::new(),
            slots: vec![],
        };
        o.promoted_at = Some(2);
        assert!(matches!(decide(&o), Action::Fence { .. }));
        o.lease = Holder::Nobody;
        assert!(matches!(decide(&o), Action::Fence { .. }));
        // Holding a newer lease than the one it promoted at is not enough either.
        o.lease = Holder::Me { generation: 4 };
        assert!(matches!(decide(&o), Action::Fence { .. }));
        o.lease = Holder::Me { generation: 2 };
        assert_eq!(decide(&o), Action::None { why: "master" });
    }

    #[test]
    fn the_holder_promotes_a_standby_and_starts_a_stopped_one() {
        let mut o = base();
        o.lease = Holder::Me { generation: 5 };
        assert_eq!(decide(&o), Action::Promote { generation: 5 });
        o.pg = Pg::Down;
        assert!(matches!(
            decide(&o),
            Action::StartStandby { upstream: None }
        ));
        o.pg = Pg::Starting { for_ms: 6_000 };
        assert!(matches!(decide(&o), Action::Resign { .. }));
    }

    #[test]
    fn a_master_configures_its_synchronous_set() {
        let mut o = base();
        o.lease = Holder::Me { generation: 5 };
        o.promoted_at = Some(5);
        o.pg = Pg::Primary {
            sync_names: String::new(),
            slots: vec![],
        };
        o.wanted_sync_names = "ANY 1 (\"causeway_peer1\")".into();
        assert_eq!(decide(&o), Action::Configure);
        o.pg = Pg::Primary {
            sync_names: o.wanted_sync_names.clone(),
            slots: vec![],
        };
        o.wanted_slots = vec!["causeway_peer1".into()];
        assert_eq!(decide(&o), Action::Configure);
    }

    #[test]
    fn a_standby_follows_the_newest_master_and_never_an_older_one_than_it_sealed_for() {
        let mut o = base();
        o.pg = standby(Some(3));
        assert!(matches!(decide(&o), Action::Follow { upstream } if upstream.peer == 1));
        o.sealed_at = 4;
        assert!(matches!(decide(&o), Action::None { .. }));
        o.pg = Pg::Down;
        assert_eq!(decide(&o), Action::StartStandby { upstream: None });
    }

    #[test]
    fn a_former_master_rewinds_before_following() {
        let mut o = base();
        o.promoted_at = Some(2);
        o.pg = Pg::Down;
        assert!(matches!(decide(&o), Action::Rewind { .. }));
        o.pg = standby(None);
        assert!(matches!(decide(&o), Action::Rewind { .. }));
        assert!(!eligible(&o, &[]));
    }

    #[test]
    fn a_data_directory_postgres_cannot_start_from_is_copied_afresh() {
        let mut o = base();
        o.pg = Pg::Down;
        o.start_failures = START_FAILURES_BEFORE_COPY;
        assert!(matches!(decide(&o), Action::Rewind { why, .. } if why.contains("does not start")));
        o.start_failures = 1;
        assert!(matches!(decide(&o), Action::StartStandby { .. }));
    }

    #[test]
    fn a_standby_that_cannot_stream_is_rewound() {
        let mut o = base();
        o.pg = Pg::Standby {
            position: 1,
            following: Some(1),
            streaming: false,
            not_streaming_ms: REWIND_AFTER_MS + 1,
        };
        assert!(matches!(decide(&o), Action::Rewind { .. }));
    }

    #[test]
    fn a_node_outside_the_cluster_runs_its_own_database() {
        let mut o = base();
        o.member = false;
        assert_eq!(decide(&o), Action::UseLocal);
        o.instance = Instance::Local;
        assert!(matches!(decide(&o), Action::None { .. }));
        o.member = true;
        assert_eq!(decide(&o), Action::StopLocal);
    }

    #[test]
    fn only_the_most_advanced_standby_is_eligible() {
        let o = base();
        assert!(eligible(&o, &[(3, 99)]));
        assert!(!eligible(&o, &[(3, 101)]));
        assert!(eligible(&o, &[(3, 100)]), "a tie goes to the lower peer");
        assert!(!eligible(&o, &[(1, 100)]));
    }

    fn holder() -> impl Strategy<Value = Holder> {
        prop_oneof![
            (1u64..6).prop_map(|generation| Holder::Me { generation }),
            (1usize..4, 1u64..6).prop_map(|(peer, generation)| Holder::Peer { peer, generation }),
            Just(Holder::Nobody),
        ]
    }

    fn pg() -> impl Strategy<Value = Pg> {
        prop_oneof![
            Just(Pg::Down),
            (0u64..10_000).prop_map(|for_ms| Pg::Starting { for_ms }),
            (
                0u64..1000,
                proptest::option::of(1usize..4),
                any::<bool>(),
                0u64..20_000
            )
                .prop_map(|(position, following, streaming, not_streaming_ms)| {
                    Pg::Standby {
                        position,
                        following,
                        streaming,
                        not_streaming_ms,
                    }
                }),
            Just(Pg::Primary {
                sync_names: String::new(),
                slots: vec![]
            }),
        ]
    }

    proptest! {
        /// Never a promotion without the lease, never a writable postgres left running
        /// without the lease it was promoted at, never a follow of an older master than
        /// the seal allows.
        #[test]
        fn decisions_keep_the_safety_rules(
            lease in holder(),
            pg in pg(),
            member in any::<bool>(),
            promoted_at in proptest::option::of(1u64..6),
            sealed_at in 0u64..6,
            upstream in proptest::option::of((1usize..4, 1u64..6)),
            instance in prop_oneof![Just(Instance::None), Just(Instance::Local), Just(Instance::Cluster)],
        ) {
            let o = Observed {
                me: 2, member, lease, instance, pg: pg.clone(), promoted_at, sealed_at,
                upstream: upstream.map(|(peer, generation)| Upstream { peer, generation, address: addr(peer), checkpointed: true }),
                start_failures: 0,
                wanted_sync_names: String::new(), wanted_slots: vec![],
            };
            match decide(&o) {
                Action::Promote { generation } => prop_assert_eq!(lease, Holder::Me { generation }),
                Action::Follow { upstream } => prop_assert!(upstream.generation >= sealed_at && upstream.peer != 2),
                Action::StartStandby { upstream: Some(u) } => prop_assert!(u.generation >= sealed_at),
                _ => {}
            }
            if matches!(pg, Pg::Primary { .. }) && instance == Instance::Cluster
                && lease != (Holder::Me { generation: promoted_at.unwrap_or(0) }) {
                let fenced = matches!(decide(&o), Action::Fence { .. });
                prop_assert!(fenced, "a primary without its lease must be fenced");
            }
        }
    }
}
