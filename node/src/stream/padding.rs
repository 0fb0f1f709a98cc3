//! Padding every write on the wire to a few size buckets.
//!
//! Whitespace between top-level elements is legal XML and ignored by the
//! receiver, so a unit (stanza, nonza, header) is followed by spaces until
//! its length is one of the level's buckets, or a multiple of the largest
//! one. Each padded unit is written on its own, so each TLS record carries
//! exactly one bucket's worth of plaintext (or a full 16 KiB record).
//!
//! The level is a trade between what an observer of the encrypted stream
//! learns from sizes and the bytes (and, over Tor, the latency) it costs:
//!
//! | level | buckets | an observer tells apart | overhead at most |
//! | --- | --- | --- | --- |
//! | `light` | 256 B, 512 B, 1, 2, 4, 8, 16 KiB | 7 size classes | 2× |
//! | `standard` (default) | 256 B, 1, 4, 16 KiB | 4 size classes | 4× |
//! | `strong` | 4, 16 KiB | 2 size classes (acks look like messages) | 16× |

use serde::{Deserialize, Serialize};

/// The largest bucket: TLS's maximum record plaintext, so bigger units become
/// a run of full records.
pub const MAX_BUCKET: usize = 16384;

/// How finely units are padded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    /// Powers of two from 256 B: half the bytes of `standard` at worst,
    /// more size classes.
    Light,
    /// 256 B, 1 KiB, 4 KiB, 16 KiB.
    #[default]
    Standard,
    /// 4 KiB and 16 KiB only: a one-line message, an ack and a receipt
    /// look the same.
    Strong,
}

impl Padding {
    /// Every level, lightest first.
    pub const ALL: [Padding; 3] = [Padding::Light, Padding::Standard, Padding::Strong];

    /// The bucket sizes, smallest first; the last is [`MAX_BUCKET`].
    pub fn buckets(self) -> &'static [usize] {
        match self {
            Padding::Light => &[256, 512, 1024, 2048, 4096, 8192, MAX_BUCKET],
            Padding::Standard => &[256, 1024, 4096, MAX_BUCKET],
            Padding::Strong => &[4096, MAX_BUCKET],
        }
    }

    /// The name used in settings and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Padding::Light => "light",
            Padding::Standard => "standard",
            Padding::Strong => "strong",
        }
    }

    /// The padded length for a unit of `len` bytes.
    pub fn padded_len(self, len: usize) -> usize {
        for &b in self.buckets() {
            if len <= b {
                return b;
            }
        }
        len.div_ceil(MAX_BUCKET) * MAX_BUCKET
    }

    /// Pads `unit` in place with spaces.
    pub fn pad(self, unit: &mut Vec<u8>) {
        let target = self.padded_len(unit.len());
        unit.resize(target, b' ');
    }
}

impl std::str::FromStr for Padding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Padding::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("padding `{s}` is not one of light, standard, strong"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets() {
        let s = Padding::Standard;
        assert_eq!(s.padded_len(0), 256);
        assert_eq!(s.padded_len(256), 256);
        assert_eq!(s.padded_len(257), 1024);
        assert_eq!(s.padded_len(16384), 16384);
        assert_eq!(s.padded_len(16385), 32768);
        assert_eq!(Padding::Light.padded_len(1500), 2048);
        assert_eq!(Padding::Light.padded_len(300), 512);
        assert_eq!(Padding::Strong.padded_len(20), 4096);
        assert_eq!(Padding::Strong.padded_len(5000), 16384);
    }

    #[test]
    fn names_round_trip_and_default_is_standard() {
        for p in Padding::ALL {
            assert_eq!(p.name().parse::<Padding>(), Ok(p));
        }
        assert!("none".parse::<Padding>().is_err());
        assert_eq!(Padding::default(), Padding::Standard);
    }

    proptest! {
        #[test]
        fn padded_is_a_bucket_and_keeps_the_content(
            data in proptest::collection::vec(any::<u8>(), 0..40000),
            level in 0..3usize,
        ) {
            let p = Padding::ALL[level];
            let mut v = data.clone();
            p.pad(&mut v);
            prop_assert!(p.buckets().contains(&v.len()) || v.len() % MAX_BUCKET == 0);
            prop_assert!(v.len() >= data.len());
            // Never more than the level's worst case (or one 16 KiB record).
            let worst = match p { Padding::Light => 2, Padding::Standard => 4, Padding::Strong => 16 };
            prop_assert!(v.len() <= (data.len() * worst).max(p.buckets()[0]) || v.len() - data.len() < MAX_BUCKET);
            prop_assert_eq!(&v[..data.len()], data.as_slice());
            prop_assert!(v[data.len()..].iter().all(|b| *b == b' '));
        }
    }
}
