//! Exact fixed-width integers for contraction costs.
//!
//! Sizes and flop counts of tensor networks quickly pass 2^128 (a greedy path through 500
//! tensors of bond 4 reaches 10^77), and heuristics compare differences of such numbers, so
//! rounding would change which path is chosen. [`Big`] is a two's-complement integer of `W`
//! 64-bit limbs. Values are kept below 2^(64W - 8) in magnitude; [`Big::fits`] reports when a
//! result left that range so the caller can retry with a wider type.

use std::cmp::Ordering;

/// A signed two's-complement integer of `W` little-endian 64-bit limbs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct Big<const W: usize>(pub [u64; W]);

/// Marks a computation whose values outgrew the chosen width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overflow;

impl<const W: usize> Big<W> {
    pub const ZERO: Self = Big([0; W]);

    pub fn from_u64(v: u64) -> Self {
        let mut a = [0u64; W];
        a[0] = v;
        Big(a)
    }

    pub fn from_u128(v: u128) -> Self {
        let mut a = [0u64; W];
        a[0] = v as u64;
        if W > 1 {
            a[1] = (v >> 64) as u64;
        }
        Big(a)
    }

    pub fn one() -> Self {
        Self::from_u64(1)
    }

    pub fn is_neg(&self) -> bool {
        (self.0[W - 1] as i64) < 0
    }

    /// True while the magnitude stays below 2^(64W - 8).
    pub fn fits(&self) -> bool {
        let top = self.0[W - 1];
        let mag = if self.is_neg() { !top } else { top };
        mag >> 56 == 0
    }

    /// `Ok(self)` if it fits, else [`Overflow`].
    pub fn ck(self) -> Result<Self, Overflow> {
        if self.fits() {
            Ok(self)
        } else {
            Err(Overflow)
        }
    }

    #[inline]
    pub fn add(self, o: Self) -> Self {
        let mut r = [0u64; W];
        let mut carry = 0u64;
        for (i, slot) in r.iter_mut().enumerate() {
            let (s1, c1) = self.0[i].overflowing_add(o.0[i]);
            let (s2, c2) = s1.overflowing_add(carry);
            *slot = s2;
            carry = (c1 as u64) + (c2 as u64);
        }
        Big(r)
    }

    #[inline]
    pub fn sub(self, o: Self) -> Self {
        let mut r = [0u64; W];
        let mut borrow = 0u64;
        for (i, slot) in r.iter_mut().enumerate() {
            let (d1, b1) = self.0[i].overflowing_sub(o.0[i]);
            let (d2, b2) = d1.overflowing_sub(borrow);
            *slot = d2;
            borrow = (b1 as u64) + (b2 as u64);
        }
        Big(r)
    }

    /// Multiplies a non-negative value by `m`.
    #[inline]
    pub fn mul_u64(self, m: u64) -> Self {
        let mut r = [0u64; W];
        let mut carry = 0u128;
        for (i, slot) in r.iter_mut().enumerate() {
            let p = self.0[i] as u128 * m as u128 + carry;
            *slot = p as u64;
            carry = p >> 64;
        }
        if carry != 0 || r[W - 1] >> 56 != 0 {
            // Out of range: saturate the top limb so that `fits` reports it.
            r[W - 1] = u64::MAX >> 1;
        }
        Big(r)
    }

    /// The product of `dims` (each a non-negative size), multiplied in u64 chunks.
    pub fn product(dims: impl IntoIterator<Item = u64>) -> Result<Self, Overflow> {
        let mut acc = Self::one();
        let mut chunk = 1u64;
        for d in dims {
            match chunk.checked_mul(d) {
                Some(c) => chunk = c,
                None => {
                    acc = acc.mul_u64(chunk).ck()?;
                    chunk = d;
                }
            }
        }
        acc.mul_u64(chunk).ck()
    }

    fn neg(self) -> Self {
        Self::ZERO.sub(self)
    }

    /// The nearest f64 (used for random jitter and reporting ratios only).
    pub fn to_f64(self) -> f64 {
        if self.is_neg() {
            return -self.neg().to_f64();
        }
        let mut v = 0f64;
        for limb in self.0.iter().rev() {
            v = v * 18_446_744_073_709_551_616.0 + *limb as f64;
        }
        v
    }

    /// The exact decimal digits.
    pub fn to_dec(self) -> String {
        if self.is_neg() {
            return format!("-{}", self.neg().to_dec());
        }
        let mut limbs = self.0;
        let mut parts: Vec<u64> = Vec::new();
        const BASE: u128 = 10_000_000_000_000_000_000;
        loop {
            if limbs.iter().all(|&l| l == 0) {
                break;
            }
            let mut rem = 0u128;
            for l in limbs.iter_mut().rev() {
                let cur = (rem << 64) | *l as u128;
                *l = (cur / BASE) as u64;
                rem = cur % BASE;
            }
            parts.push(rem as u64);
        }
        match parts.split_last() {
            None => "0".to_string(),
            Some((first, rest)) => {
                let mut s = first.to_string();
                for p in rest.iter().rev() {
                    s.push_str(&format!("{p:019}"));
                }
                s
            }
        }
    }
}

impl<const W: usize> PartialOrd for Big<W> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<const W: usize> Ord for Big<W> {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.is_neg(), other.is_neg()) {
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            _ => {}
        }
        for i in (0..W).rev() {
            match self.0[i].cmp(&other.0[i]) {
                Ordering::Equal => continue,
                o => return o,
            }
        }
        Ordering::Equal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_order_and_decimal() {
        type B = Big<4>;
        let a = B::product([1u64 << 40, 1 << 40, 1 << 40, 3]).unwrap();
        assert_eq!(a.to_dec(), (3u128 << 120).to_string());
        let b = a.sub(a.add(B::from_u64(5)));
        assert!(b.is_neg());
        assert_eq!(b.to_dec(), "-5");
        assert!(b < B::ZERO && B::ZERO < a);
        assert_eq!(a.sub(B::from_u64(1)).cmp(&a), Ordering::Less);
        assert_eq!(B::ZERO.to_dec(), "0");
        assert_eq!(B::from_u128(12345678901234567890123).to_dec(), "12345678901234567890123");
        assert!((a.to_f64() - 3.0 * 2f64.powi(120)).abs() < 1e20);
        assert!(Big::<2>::product([u64::MAX, u64::MAX]).is_err());
        assert!(Big::<2>::product([1 << 60, 1 << 59]).is_ok());
    }
}
