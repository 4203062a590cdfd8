//! SIP messages for the clustered registrar and proxy (see `docs/sip.md`): parsed without
//! copying, checked against size caps, framed on streams, written back with few edits.
#![forbid(unsafe_code)]

pub mod build;
mod framing;
mod limits;
mod message;
mod syntax;
pub mod uri;

pub use framing::{frame, Frame};
pub use limits::Limits;
pub use message::{
    split_list, unfold, Header, HeaderKind, Message, ParseError, StartLine, Transport,
};
pub use uri::{NameAddr, SipUri, Via};
