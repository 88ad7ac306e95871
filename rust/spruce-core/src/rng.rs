//! Counter-based randomness (Philox4x32-10, Salmon et al. 2011): the value for element `i` is a
//! pure function of `(seed, stream, i)`, so masks are identical for any thread count, chunking or
//! device.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

/// One Philox4x32 block with 10 rounds.
#[inline(always)]
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (ctr, key);
    for r in 0..10 {
        if r > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The 32-bit random word of element `i` in stream `stream` under `seed`. Block `i / 4` gives
/// the words of four consecutive elements.
#[inline(always)]
pub fn word(seed: u64, stream: u32, i: u64) -> u32 {
    let b = i >> 2;
    philox4x32_10([b as u32, (b >> 32) as u32, stream, 0], [seed as u32, (seed >> 32) as u32])
        [(i & 3) as usize]
}

/// Calls `f(i, word(seed, stream, i))` for `i` in `start..end`, one Philox block per 4 elements.
#[inline]
pub fn for_each_word(seed: u64, stream: u32, start: u64, end: u64, mut f: impl FnMut(u64, u32)) {
    let key = [seed as u32, (seed >> 32) as u32];
    let mut i = start;
    while i < end {
        let b = i >> 2;
        let block = philox4x32_10([b as u32, (b >> 32) as u32, stream, 0], key);
        let stop = ((b + 1) << 2).min(end);
        while i < stop {
            f(i, block[(i & 3) as usize]);
            i += 1;
        }
    }
}

/// A uniform float in [0, 1) from element `i`'s word (24 random bits, exact in f32).
#[inline(always)]
pub fn uniform(seed: u64, stream: u32, i: u64) -> f32 {
    (word(seed, stream, i) >> 8) as f32 * (1.0 / 16_777_216.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answers_from_random123() {
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn words_do_not_depend_on_chunking() {
        let mut all = vec![];
        for_each_word(7, 0, 0, 37, |_, w| all.push(w));
        let mut pieces = vec![];
        for (a, b) in [(0, 5), (5, 6), (6, 37)] {
            for_each_word(7, 0, a, b, |_, w| pieces.push(w));
        }
        assert_eq!(all, pieces);
        for (i, w) in all.iter().enumerate() {
            assert_eq!(*w, word(7, 0, i as u64));
        }
        assert!(uniform(1, 0, 3) < 1.0);
    }
}
