//! Replication messages (see `docs/replication.md`), postcard-encoded, one per mesh frame.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::stream::{Header, NodeId, Record, StreamId};

/// The mesh channel replication travels on.
pub const CHANNEL: u16 = 1;
/// Records per `Records` reply: keeps every frame far below the mesh's 4 MiB cap.
pub const RECORDS_PER_FRAME: usize = 2048;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub key: String,
    #[serde(with = "crate::bytes_serde::option_bytes")]
    pub value: Option<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Every heartbeat: who I think the primary is, and where each of my streams stands.
    Digest {
        node_id: NodeId,
        primary: u16,
        epoch: u64,
        headers: Vec<(StreamId, Header)>,
    },
    /// The owner's new changes; `prev` is the position they continue from.
    Push {
        stream: StreamId,
        prev: (u64, u64),
        header: Header,
        records: Vec<Record>,
    },
    Fetch {
        stream: StreamId,
        generation: u64,
        after_seq: u64,
        /// Replace my copy whatever it holds (ForceConfigUpdate).
        snapshot: bool,
    },
    /// A reply to `Fetch`, maybe one of several: `records` cover `(after_seq, upto]`;
    /// `header` is where the sender's stream stands.
    Records {
        stream: StreamId,
        header: Header,
        replace: bool,
        after_seq: u64,
        upto: u64,
        records: Vec<Record>,
    },
    Ack {
        stream: StreamId,
        generation: u64,
        seq: u64,
    },
    /// A frame of the engine's typed requests (`causeway_mesh::rpc`), carried on the
    /// replication channel: a subordinate's write forwarded to the primary (EX-2).
    Rpc {
        #[serde(with = "crate::bytes_serde::bytes")]
        frame: Vec<u8>,
    },
    SetPrimary {
        primary: u16,
        epoch: u64,
    },
}

impl Message {
    pub fn encode(&self) -> Bytes {
        Bytes::from(postcard::to_stdvec(self).unwrap_or_default())
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Message::Digest { .. } => "digest",
            Message::Push { .. } => "push",
            Message::Fetch { .. } => "fetch",
            Message::Records { .. } => "records",
            Message::Ack { .. } => "ack",
            Message::Rpc { .. } => "request",
            Message::SetPrimary { .. } => "set primary",
        }
    }
}
