//! Byte strings written as bytes, in one copy, rather than as a sequence of `u8`, one call
//! and one capacity check per byte: that was a quarter of the CPU a push of registrations
//! cost to encode. postcard writes both alike (a varint length, then the bytes), so rows
//! and frames written either way read the same, and peers of either build understand each
//! other; JSON writes both as an array of numbers.

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;

struct ByteBuf;

impl<'de> Visitor<'de> for ByteBuf {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("bytes")
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        // At most what the length claims, and never more than 64 KiB ahead of the bytes.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(65_536));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(out)
    }
}

/// `#[serde(with = "bytes")]` for a `Vec<u8>`.
pub mod bytes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(ByteBuf)
    }
}

/// `#[serde(with = "option_bytes")]` for an `Option<Vec<u8>>`.
pub mod option_bytes {
    use super::*;

    struct Bytes<'a>(&'a [u8]);

    impl serde::Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_some(&Bytes(v)),
            None => s.serialize_none(),
        }
    }

    struct OptionalBytes;

    impl<'de> Visitor<'de> for OptionalBytes {
        type Value = Option<Vec<u8>>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes or nothing")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            super::bytes::deserialize(d).map(Some)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        d.deserialize_option(OptionalBytes)
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    /// As the records were written before: a sequence of `u8`.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Before {
        key: String,
        value: Option<Vec<u8>>,
        frame: Vec<u8>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Now {
        key: String,
        #[serde(with = "super::option_bytes")]
        value: Option<Vec<u8>>,
        #[serde(with = "super::bytes")]
        frame: Vec<u8>,
    }

    #[test]
    fn postcard_and_json_write_bytes_as_they_wrote_a_sequence_and_read_either() {
        let big: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        for (value, frame) in [
            (Some(big.clone()), vec![]),
            (None, big.clone()),
            (Some(vec![]), vec![1]),
        ] {
            let before = Before {
                key: "k".into(),
                value: value.clone(),
                frame: frame.clone(),
            };
            let now = Now {
                key: "k".into(),
                value,
                frame,
            };
            let old = postcard::to_stdvec(&before).unwrap();
            assert_eq!(
                postcard::to_stdvec(&now).unwrap(),
                old,
                "the same bytes on the wire"
            );
            assert_eq!(postcard::from_bytes::<Now>(&old).unwrap(), now);
            let json = serde_json::to_string(&before).unwrap();
            assert_eq!(serde_json::to_string(&now).unwrap(), json);
            assert_eq!(serde_json::from_str::<Now>(&json).unwrap(), now);
        }
    }
}
