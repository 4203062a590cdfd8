//! The seed's nine states and every transition between them (docs/ha.md, section 5), as
//! data: the decision loop, its tests, the simulation and the process tests all check moves
//! against this one table. A move that is not in it is a bug.

use serde::{Deserialize, Serialize};

/// A pair member's state, named as the seed names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HaState {
    /// Holds the virtual IP; the instance serves. The normal state of a primary.
    PrimaryActive,
    /// In sync, ready to take over ("up but not charged").
    SecondaryActive,
    /// Up, not serving, not in sync: it cannot take over without `--force`.
    SecondaryAlone,
    /// A move away from the holder is under way, or the holder lost its lease and the
    /// outcome is not known yet.
    FailoverInvoked,
    /// The secondary holds the virtual IP and serves the primary's instance.
    FailoverActive,
    /// The primary after a failover: up, not serving, waiting for a failback.
    Terminated,
    /// A move back to the primary is under way.
    FailbackActive,
    /// The primary holds again; the secondary is being realigned.
    FailbackComplete,
    /// Stopped by an operator.
    GracefulShutdown,
}

impl HaState {
    pub const ALL: [HaState; 9] = [
        HaState::PrimaryActive,
        HaState::SecondaryActive,
        HaState::SecondaryAlone,
        HaState::FailoverInvoked,
        HaState::FailoverActive,
        HaState::Terminated,
        HaState::FailbackActive,
        HaState::FailbackComplete,
        HaState::GracefulShutdown,
    ];

    /// The seed's spelling (`gethainfo`, logs, events).
    pub fn seed_name(self) -> &'static str {
        match self {
            HaState::PrimaryActive => "PRIMARY_ACTIVE",
            HaState::SecondaryActive => "SECONDARY_ACTIVE",
            HaState::SecondaryAlone => "SECONDARY_ALONE",
            HaState::FailoverInvoked => "FAILOVER_INVOKED",
            HaState::FailoverActive => "FAILOVER_ACTIVE",
            HaState::Terminated => "TERMINATED",
            HaState::FailbackActive => "FAILBACK_ACTIVE",
            HaState::FailbackComplete => "FAILBACK_COMPLETE",
            HaState::GracefulShutdown => "GRACEFUL_SHUTDOWN",
        }
    }

    /// Whether a member of `side` in this state holds (or is adding) the virtual IP. During
    /// a failback the secondary keeps it until its final flush (row 14).
    pub fn holds_address(self, side: Side) -> bool {
        match self {
            HaState::PrimaryActive | HaState::FailoverActive | HaState::FailbackComplete => true,
            HaState::FailbackActive => side == Side::Secondary,
            _ => false,
        }
    }
}

/// Which side of the pair a member is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Side {
    Primary,
    Secondary,
}

/// What makes a member move (the table's "trigger" column).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Trigger {
    /// Lease held, the virtual IP added, the instance serving.
    Holding,
    /// Started (or restarted) with nothing else known: the last holder was this primary, or
    /// the pair is new.
    Started,
    /// Every instance stream acknowledged up to the holder's position of ≤ 1 s ago.
    InSync,
    /// More than 5 s behind, or a snapshot is needed.
    Behind,
    /// Automatic failover (holder silent for the failover wait and the witness agrees), a
    /// manual `ha failover`, or the holder's handover (switchover, graceful shutdown).
    TakeOver,
    /// The lease was lost, or a switchover away from this holder was accepted.
    LostLease,
    /// The other side holds at a newer generation.
    OtherHolds,
    /// The lease came back to this member and nobody took over.
    Reacquired,
    /// A primary that starts while its secondary serves (or in recovery mode).
    StartedAfterFailover,
    /// `ha failback`, or automatic failback with its conditions met, or the secondary that
    /// holds was lost.
    FailbackRequested,
    /// The secondary has accepted a failback.
    FailbackAccepted,
    /// The secondary flushed, released the address and resigned.
    Released,
    /// The failback did not complete (the primary lost or not in sync within 5 s).
    FailbackFailed,
    /// An operator stopped the node.
    Shutdown,
}

impl Trigger {
    pub const ALL: [Trigger; 14] = [
        Trigger::Holding,
        Trigger::Started,
        Trigger::InSync,
        Trigger::Behind,
        Trigger::TakeOver,
        Trigger::LostLease,
        Trigger::OtherHolds,
        Trigger::Reacquired,
        Trigger::StartedAfterFailover,
        Trigger::FailbackRequested,
        Trigger::FailbackAccepted,
        Trigger::Released,
        Trigger::FailbackFailed,
        Trigger::Shutdown,
    ];
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct Transition {
    /// Its number in docs/ha.md.
    pub number: u8,
    pub side: Side,
    pub from: HaState,
    pub trigger: Trigger,
    pub to: HaState,
}

const fn t(number: u8, side: Side, from: HaState, trigger: Trigger, to: HaState) -> Transition {
    Transition {
        number,
        side,
        from,
        trigger,
        to,
    }
}

use HaState::*;
use Side::*;
use Trigger::*;

/// Every allowed move. "Start" rows (1, 2, 11, 19) are moves from `GracefulShutdown`, the
/// state a stopped member is kept in, and from a member's first state.
pub static TABLE: &[Transition] = &[
    t(1, Primary, GracefulShutdown, Holding, PrimaryActive),
    t(1, Primary, PrimaryActive, Holding, PrimaryActive),
    t(2, Secondary, GracefulShutdown, Started, SecondaryAlone),
    t(3, Secondary, SecondaryAlone, InSync, SecondaryActive),
    t(4, Secondary, SecondaryActive, Behind, SecondaryAlone),
    t(5, Secondary, SecondaryActive, TakeOver, FailoverInvoked),
    t(6, Primary, PrimaryActive, LostLease, FailoverInvoked),
    t(6, Primary, FailbackComplete, LostLease, FailoverInvoked),
    t(6, Secondary, FailoverActive, LostLease, FailoverInvoked),
    t(7, Secondary, FailoverInvoked, Holding, FailoverActive),
    t(8, Secondary, FailoverInvoked, OtherHolds, SecondaryActive),
    t(8, Secondary, FailoverInvoked, Behind, SecondaryAlone),
    t(9, Primary, FailoverInvoked, OtherHolds, Terminated),
    t(10, Primary, FailoverInvoked, Reacquired, PrimaryActive),
    t(
        11,
        Primary,
        GracefulShutdown,
        StartedAfterFailover,
        Terminated,
    ),
    t(12, Primary, Terminated, FailbackRequested, FailbackActive),
    t(
        13,
        Secondary,
        FailoverActive,
        FailbackAccepted,
        FailbackActive,
    ),
    t(14, Secondary, FailbackActive, Released, SecondaryAlone),
    t(15, Primary, FailbackActive, Holding, FailbackComplete),
    t(16, Primary, FailbackComplete, InSync, PrimaryActive),
    t(17, Primary, FailbackActive, FailbackFailed, Terminated),
    t(
        17,
        Secondary,
        FailbackActive,
        FailbackFailed,
        FailoverActive,
    ),
    // 18: any state → GRACEFUL_SHUTDOWN on an operator stop (after a handover when one
    // is possible); listed per state so the table stays exhaustive data.
    t(18, Primary, PrimaryActive, Shutdown, GracefulShutdown),
    t(18, Primary, FailoverInvoked, Shutdown, GracefulShutdown),
    t(18, Primary, Terminated, Shutdown, GracefulShutdown),
    t(18, Primary, FailbackActive, Shutdown, GracefulShutdown),
    t(18, Primary, FailbackComplete, Shutdown, GracefulShutdown),
    t(18, Secondary, SecondaryActive, Shutdown, GracefulShutdown),
    t(18, Secondary, SecondaryAlone, Shutdown, GracefulShutdown),
    t(18, Secondary, FailoverInvoked, Shutdown, GracefulShutdown),
    t(18, Secondary, FailoverActive, Shutdown, GracefulShutdown),
    t(18, Secondary, FailbackActive, Shutdown, GracefulShutdown),
];

/// Where `trigger` takes a member of `side` in state `from`, with the row's number; `None`
/// when the table has no such move.
pub fn next(side: Side, from: HaState, trigger: Trigger) -> Option<(u8, HaState)> {
    TABLE
        .iter()
        .find(|r| r.side == side && r.from == from && r.trigger == trigger)
        .map(|r| (r.number, r.to))
}

/// The states a member of `side` can ever be in.
pub fn states_of(side: Side) -> Vec<HaState> {
    let mut out: Vec<HaState> = TABLE
        .iter()
        .filter(|r| r.side == side)
        .flat_map(|r| [r.from, r.to])
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_seed_names_are_the_seeds() {
        let names: Vec<&str> = HaState::ALL.iter().map(|s| s.seed_name()).collect();
        assert_eq!(
            names,
            [
                "PRIMARY_ACTIVE",
                "SECONDARY_ACTIVE",
                "SECONDARY_ALONE",
                "FAILOVER_INVOKED",
                "FAILOVER_ACTIVE",
                "TERMINATED",
                "FAILBACK_ACTIVE",
                "FAILBACK_COMPLETE",
                "GRACEFUL_SHUTDOWN"
            ]
        );
        for s in HaState::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.seed_name()));
        }
    }

    #[test]
    fn a_failover_and_a_failback_follow_the_seed() {
        // Automatic failover after the primary is lost.
        assert_eq!(
            next(Secondary, SecondaryActive, TakeOver),
            Some((5, FailoverInvoked))
        );
        assert_eq!(
            next(Secondary, FailoverInvoked, Holding),
            Some((7, FailoverActive))
        );
        assert_eq!(
            next(Primary, PrimaryActive, LostLease),
            Some((6, FailoverInvoked))
        );
        assert_eq!(
            next(Primary, FailoverInvoked, OtherHolds),
            Some((9, Terminated))
        );
        // Failback.
        assert_eq!(
            next(Primary, Terminated, FailbackRequested),
            Some((12, FailbackActive))
        );
        assert_eq!(
            next(Secondary, FailoverActive, FailbackAccepted),
            Some((13, FailbackActive))
        );
        assert_eq!(
            next(Secondary, FailbackActive, Released),
            Some((14, SecondaryAlone))
        );
        assert_eq!(
            next(Primary, FailbackActive, Holding),
            Some((15, FailbackComplete))
        );
        assert_eq!(
            next(Primary, FailbackComplete, InSync),
            Some((16, PrimaryActive))
        );
        assert_eq!(
            next(Secondary, SecondaryAlone, InSync),
            Some((3, SecondaryActive))
        );
    }

    #[test]
    fn a_secondary_that_is_not_in_sync_cannot_take_over() {
        assert_eq!(next(Secondary, SecondaryAlone, TakeOver), None);
        assert_eq!(next(Secondary, SecondaryAlone, Holding), None);
    }

    #[test]
    fn every_number_of_the_design_table_is_here() {
        let mut numbers: Vec<u8> = TABLE.iter().map(|r| r.number).collect();
        numbers.dedup();
        numbers.sort();
        numbers.dedup();
        // 19 (restart) is 1, 2 or 11 from GRACEFUL_SHUTDOWN; 20 (unpair) leaves the table.
        assert_eq!(numbers, (1..=18).collect::<Vec<u8>>());
        // One move per (side, state, trigger): the table is a function.
        for (i, a) in TABLE.iter().enumerate() {
            for b in &TABLE[i + 1..] {
                assert!(
                    !(a.side == b.side && a.from == b.from && a.trigger == b.trigger),
                    "rows {} and {} both leave {:?} on {:?}",
                    a.number,
                    b.number,
                    a.from,
                    a.trigger
                );
            }
        }
    }

    #[test]
    fn each_side_keeps_to_its_own_states() {
        let p = states_of(Primary);
        let s = states_of(Secondary);
        assert!(!p.contains(&FailoverActive) && !p.contains(&SecondaryActive));
        assert!(!s.contains(&PrimaryActive) && !s.contains(&Terminated));
        assert!(!s.contains(&FailbackComplete));
    }

    fn state() -> impl Strategy<Value = HaState> {
        proptest::sample::select(HaState::ALL.to_vec())
    }

    fn trigger() -> impl Strategy<Value = Trigger> {
        proptest::sample::select(Trigger::ALL.to_vec())
    }

    proptest! {
        /// Whatever the order of events, a member only takes the address with a held lease
        /// (`Holding`, or `Reacquired` after a lease it had lost), and a lost lease always
        /// takes it away.
        #[test]
        fn the_address_is_taken_only_with_the_lease(
            primary in any::<bool>(),
            start in state(),
            events in proptest::collection::vec(trigger(), 0..40),
        ) {
            let side = if primary { Primary } else { Secondary };
            let mut now = start;
            for e in events {
                if let Some((_, to)) = next(side, now, e) {
                    if to.holds_address(side) && !now.holds_address(side) {
                        prop_assert!(matches!(e, Holding | Reacquired), "took the address on {:?}", e);
                    }
                    if e == LostLease {
                        prop_assert!(!to.holds_address(side));
                    }
                    now = to;
                }
            }
        }
    }
}
