//! The clustered SIP registrar and proxy (SV-1…SV-4; see `docs/sip.md`).
#![forbid(unsafe_code)]

pub mod admission;
mod auth;
mod authenticator;
pub mod catalogue;
mod guard;
pub mod licences;
pub mod location;
pub mod metrics;
mod pacer;
mod proxy;
mod registrar;
mod relay;
mod respond;
mod service;
pub mod status;
pub mod transport;

pub use service::{SipService, SipSettings};
pub use transport::{Caps, Proto};
