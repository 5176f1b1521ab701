//! The name of every object and image: a hex fs-verity sha256 digest.

use std::fmt;
use std::str::FromStr;

use crate::error::StoreError;

/// An fs-verity sha256 digest (4 KiB blocks, no salt): the name of an object or image.
///
/// This is the value the kernel reports through `FS_IOC_MEASURE_VERITY` and the one
/// overlayfs checks with `verity=require`, so one name serves dedup and kernel
/// verification. Its text form is 64 lowercase hex digits; nothing else parses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 lowercase hex digits; anything else is an [`StoreError::InvalidDigest`].
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        let invalid = |reason: &'static str| StoreError::InvalidDigest {
            text: text.to_owned(),
            reason,
        };
        if text.len() != 64 {
            return Err(invalid("a digest is exactly 64 hex digits"));
        }
        if !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid("a digest has only lowercase hex digits 0-9 a-f"));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| invalid("not hex"))?;
        Ok(Self(bytes))
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The fan-out directory of this object: its first two hex digits.
    pub fn fanout(&self) -> String {
        hex::encode(&self.0[..1])
    }

    /// The object's file name inside its fan-out directory: the other 62 hex digits.
    pub fn object_file_name(&self) -> String {
        hex::encode(&self.0[1..])
    }

    /// The object's path relative to `objects/`, e.g. `ab/cdef…` (composefs convention).
    pub fn object_rel_path(&self) -> String {
        format!("{}/{}", self.fanout(), self.object_file_name())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_64_lowercase_hex() {
        let good = "ab".repeat(32);
        let d = Digest::parse(&good).expect("test fixture");
        assert_eq!(d.to_hex(), good);
        assert_eq!(d.fanout(), "ab");
        assert_eq!(d.object_file_name().len(), 62);
        assert_eq!(d.object_rel_path(), format!("ab/{}", "ab".repeat(31)));
        for bad in [
            "",
            &"AB".repeat(32),
            &"ab".repeat(31),
            &"ab".repeat(33),
            &format!("{}zz", "ab".repeat(31)),
            &format!("../{}", "a".repeat(61)),
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad:?} must not parse");
        }
    }
}
