//! A fast, deterministic hasher for the small keys of path search (not DoS-resistant: keys come
//! from the caller's own equation).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A fast multiplicative hasher for small keys (index sets, symbols).
#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::Hash;

    fn h<T: Hash>(v: T) -> u64 {
        let mut s = FxHasher::default();
        v.hash(&mut s);
        s.finish()
    }

    #[test]
    fn deterministic_and_spread() {
        assert_eq!(h([1u32, 2, 3].as_slice()), h([1u32, 2, 3].as_slice()));
        assert_ne!(h([1u32, 2, 3].as_slice()), h([1u32, 3, 2].as_slice()));
        assert_ne!(h('a'), h('b'));
        // Byte input is read in 8-byte words, the tail zero-padded.
        let mut a = FxHasher::default();
        a.write(&[1, 2, 3]);
        let mut b = FxHasher::default();
        b.write_u64(u64::from_le_bytes([1, 2, 3, 0, 0, 0, 0, 0]));
        assert_eq!(a.finish(), b.finish());
        let mut m: FastMap<char, u32> = FastMap::default();
        for (i, c) in "abcxyz".chars().enumerate() {
            m.insert(c, i as u32);
        }
        assert_eq!(m[&'x'], 3);
    }
}
