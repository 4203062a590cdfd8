//! The alarm catalogue (OP-1) and the table of alarms raised on this node.
//!
//! IDs, UUIDs and texts are stable: operators and monitoring match on them. The 20xxx IDs
//! and the three UUIDs the seed shows are Expressway's; Causeway's own start at 21000.
#![forbid(unsafe_code)]

mod catalogue;
mod table;

pub use catalogue::{lookup, register, AlarmType, Severity, CATALOGUE};
pub use table::{ActiveAlarm, AlarmEvent, AlarmEventKind, AlarmTable};
