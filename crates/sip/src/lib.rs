//! SIP messages for the clustered registrar and proxy (see `docs/sip.md`): parsed without
//! copying, checked against size caps, framed on streams.
#![forbid(unsafe_code)]

mod framing;
mod limits;
mod message;

pub use framing::{frame, Frame};
pub use limits::Limits;
pub use message::{
    split_list, unfold, Header, HeaderKind, Message, ParseError, StartLine, Transport,
};
