//! Frames on a cluster link: a `u32` big-endian length, then a postcard-encoded [`Message`].

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::hello::RefuseField;
use crate::settings::IpVersion;
use causeway_pki::TlsMode;

/// Bumped on any incompatible change to [`Message`].
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame before the hello is accepted.
pub const MAX_FRAME_BEFORE_HELLO: usize = 16 * 1024;
/// Largest frame on an established link.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// First field of the first variant, so any future layout can still be read this far.
    pub protocol_version: u16,
    pub software_version: String,
    pub cluster_name: String,
    /// The sender's peer number (1-based).
    pub peer_index: u16,
    pub system_name: String,
    pub peers: Vec<String>,
    pub configuration_primary: u16,
    pub ip_version: IpVersion,
    pub tls_mode: TlsMode,
    pub wall_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    /// The sender will not talk to us, and says why. `from_index` is 0 when the sender has no
    /// place in our view of the list.
    Refuse {
        from_index: u16,
        field: RefuseField,
        reason: String,
    },
    Ping {
        seq: u64,
        wall_ms: u64,
    },
    Pong {
        seq: u64,
        wall_ms: u64,
    },
    /// Payload for a service riding on the mesh (replication, registrations…).
    App {
        channel: u16,
        payload: Bytes,
    },
    /// The sender is shutting down on purpose.
    Goodbye {
        reason: String,
    },
}

impl Message {
    pub fn encode(&self) -> Bytes {
        // Encoding our own types into a Vec cannot fail.
        Bytes::from(postcard::to_allocvec(self).unwrap_or_default())
    }

    pub fn decode(frame: &[u8]) -> Result<Message, String> {
        postcard::from_bytes(frame).map_err(|e| {
            // A hello from another protocol version may not decode whole; its version can.
            match postcard::take_from_bytes::<(u32, u16)>(frame) {
                Ok(((0, v), _)) if v != PROTOCOL_VERSION => {
                    format!("protocol version differs: this system speaks {PROTOCOL_VERSION}, the peer {v}")
                }
                _ => format!("malformed frame ({e})"),
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame; `Ok(None)` at a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Bytes>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut buf = BytesMut::zeroed(len);
    r.read_exact(&mut buf).await?;
    Ok(Some(buf.freeze()))
}

pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> std::io::Result<()> {
    let len =
        u32::try_from(frame.len()).map_err(|_| std::io::Error::other("frame larger than 4 GiB"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(frame).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversize_is_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").await.unwrap();
        write_frame(&mut buf, &[7u8; 100]).await.unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r, 1000).await.unwrap().unwrap(),
            &b"hello"[..]
        );
        assert!(matches!(
            read_frame(&mut r, 50).await,
            Err(FrameError::TooLarge { len: 100, max: 50 })
        ));
        let mut empty: &[u8] = &[];
        assert!(read_frame(&mut empty, 10).await.unwrap().is_none());
        let mut truncated: &[u8] = &[0, 0, 0, 9, 1, 2];
        assert!(matches!(
            read_frame(&mut truncated, 10).await,
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn a_future_protocol_version_is_named() {
        // Variant 0 (Hello), protocol version 7, then a layout this version does not know.
        let frame = [0u8, 7, 0xff, 0xff, 0xff];
        let err = Message::decode(&frame).unwrap_err();
        assert_eq!(
            err,
            "protocol version differs: this system speaks 1, the peer 7"
        );
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn messages_round_trip(seq in any::<u64>(), wall in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            for m in [Message::Ping { seq, wall_ms: wall }, Message::App { channel: 3, payload: Bytes::from(payload.clone()) }] {
                prop_assert_eq!(Message::decode(&m.encode()).unwrap(), m);
            }
        }
    }
}
