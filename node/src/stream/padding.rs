//! Padding every write on the wire to a few size buckets.
//!
//! Whitespace between top-level elements is legal XML and ignored by the
//! receiver, so a unit (stanza, nonza, header) is followed by spaces until
//! its length is one of [`BUCKETS`], or a multiple of the largest one. Each
//! padded unit is written on its own, so each TLS record carries exactly one
//! bucket's worth of plaintext (or a full 16 KiB record).

/// Bucket sizes in bytes. The largest equals TLS's maximum record plaintext,
/// so bigger units become a run of full records.
pub const BUCKETS: [usize; 4] = [256, 1024, 4096, 16384];

/// The padded length for a unit of `len` bytes.
pub fn padded_len(len: usize) -> usize {
    for b in BUCKETS {
        if len <= b {
            return b;
        }
    }
    let big = BUCKETS[BUCKETS.len() - 1];
    len.div_ceil(big) * big
}

/// Pads `unit` in place with spaces.
pub fn pad(unit: &mut Vec<u8>) {
    let target = padded_len(unit.len());
    unit.resize(target, b' ');
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets() {
        assert_eq!(padded_len(0), 256);
        assert_eq!(padded_len(256), 256);
        assert_eq!(padded_len(257), 1024);
        assert_eq!(padded_len(16384), 16384);
        assert_eq!(padded_len(16385), 32768);
    }

    proptest! {
        #[test]
        fn padded_is_a_bucket_and_keeps_the_content(data in proptest::collection::vec(any::<u8>(), 0..40000)) {
            let mut v = data.clone();
            pad(&mut v);
            prop_assert!(BUCKETS.contains(&v.len()) || v.len() % 16384 == 0);
            prop_assert!(v.len() >= data.len());
            prop_assert_eq!(&v[..data.len()], data.as_slice());
            prop_assert!(v[data.len()..].iter().all(|b| *b == b' '));
        }
    }
}
