//! Pieces every Causeway crate shares: wall-clock formatting and the seed-shaped log output.
#![forbid(unsafe_code)]

pub mod error;
pub mod fsio;
pub mod logging;
pub mod slots;
pub mod time;

/// The software version every peer announces in its hello; peers with another version are
/// refused (EX-11).
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");
