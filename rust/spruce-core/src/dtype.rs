//! Element types and their order-preserving integer keys.
//!
//! Selection ranks floats through integer keys: `key(a) < key(b)` iff `a < b`, with `-0.0` and
//! `+0.0` mapped to one key. Types that fit in `f32` (f32, f16, bf16) use 32-bit keys; `f64` uses
//! 64-bit keys. Half types are widened element by element, never by a whole-tensor copy.

pub use half::{bf16, f16};

/// Order key of an `f32` (32 significant bits, held in a `u64`). NaN must be filtered first.
#[inline(always)]
pub fn key32(v: f32) -> u64 {
    let mut b = v.to_bits();
    if b == 0x8000_0000 {
        b = 0; // -0.0 ranks equal to +0.0
    }
    (if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 }) as u64
}

/// Order key of an `f64`. NaN must be filtered first.
#[inline(always)]
pub fn key64(v: f64) -> u64 {
    let mut b = v.to_bits();
    if b == 0x8000_0000_0000_0000 {
        b = 0;
    }
    if b & 0x8000_0000_0000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000_0000_0000
    }
}

/// A floating-point element spruce reads in place.
pub trait Float: Copy + Send + Sync + PartialOrd + 'static {
    /// torch's name of the dtype, for messages.
    const NAME: &'static str;
    /// True when the type needs 64-bit keys (f64).
    const WIDE: bool;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn is_nan(self) -> bool;
    /// Wraps a slice of this type as [`Scores`].
    fn scores(s: &[Self]) -> Scores<'_>;
    /// The key in this type's natural width.
    #[inline(always)]
    fn key(self) -> u64 {
        if Self::WIDE {
            key64(self.to_f64())
        } else {
            key32(self.to_f32())
        }
    }
    /// The key in the width `wide` asks for (every type fits a 64-bit key exactly).
    #[inline(always)]
    fn key_as(self, wide: bool) -> u64 {
        if wide {
            key64(self.to_f64())
        } else {
            key32(self.to_f32())
        }
    }
}

macro_rules! impl_float {
    ($t:ty, $name:expr, $wide:expr, |$s:ident| $to32:expr, $to64:expr, $from64:expr, $variant:ident) => {
        impl Float for $t {
            const NAME: &'static str = $name;
            const WIDE: bool = $wide;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                let $s = self;
                $to32
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                let $s = self;
                $to64
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                $from64(v)
            }
            #[inline(always)]
            fn is_nan(self) -> bool {
                let $s = self;
                $s != $s
            }
            fn scores(s: &[Self]) -> Scores<'_> {
                Scores::$variant(s)
            }
        }
    };
}

impl_float!(f32, "float32", false, |s| s, s as f64, |v: f64| v as f32, F32);
impl_float!(f64, "float64", true, |s| s as f32, s, |v: f64| v, F64);
impl_float!(f16, "float16", false, |s| s.to_f32(), s.to_f64(), |v| f16::from_f32(f32_odd(v)), F16);
impl_float!(bf16, "bfloat16", false, |s| s.to_f32(), s.to_f64(), |v| bf16::from_f32(f32_odd(v)), BF16);

/// `v` rounded to f32 *to odd*: truncated, with the last bit set when anything was cut. A second
/// rounding of that to nearest-even into a format with at least two fewer significand bits (f16,
/// bf16) equals one correct rounding of `v`, which `half`'s own `from_f64` (it drops the low 32
/// bits of the f64 significand) does not give.
#[inline]
pub fn f32_odd(v: f64) -> f32 {
    let t = v as f32;
    if !t.is_finite() || t as f64 == v {
        return t;
    }
    let mut bits = t.to_bits();
    if (t as f64).abs() > v.abs() {
        bits -= 1; // one step toward zero: the truncation
    }
    f32::from_bits(bits | 1)
}

/// A borrowed tensor of any supported float type (for ops over several tensors at once).
#[derive(Clone, Copy, Debug)]
pub enum Scores<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

/// Runs `$body` with `$x` bound to the typed slice inside a [`Scores`].
#[macro_export]
macro_rules! with_scores {
    ($s:expr, $x:ident => $body:expr) => {
        match $s {
            $crate::Scores::F32($x) => $body,
            $crate::Scores::F64($x) => $body,
            $crate::Scores::F16($x) => $body,
            $crate::Scores::BF16($x) => $body,
        }
    };
}

impl Scores<'_> {
    pub fn len(&self) -> usize {
        with_scores!(self, s => s.len())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// True for float64, whose values need 64-bit keys.
    pub fn is_wide(&self) -> bool {
        matches!(self, Scores::F64(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_preserve_order_and_merge_signed_zero() {
        let vals = [f32::NEG_INFINITY, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, f32::INFINITY];
        for w in vals.windows(2) {
            assert!(key32(w[0]) <= key32(w[1]), "{} {}", w[0], w[1]);
        }
        assert_eq!(key32(-0.0), key32(0.0));
        assert!(key32(-1e-30) < key32(0.0));
        let vals64 = [f64::NEG_INFINITY, -3.5, -0.0, 0.0, 1e-300, f64::INFINITY];
        for w in vals64.windows(2) {
            assert!(key64(w[0]) <= key64(w[1]));
        }
        assert_eq!(key64(-0.0), key64(0.0));
    }

    #[test]
    fn half_types_widen_exactly() {
        let h = f16::from_f32(1.5);
        assert_eq!(h.key(), key32(1.5));
        let b = bf16::from_f32(-2.25);
        assert_eq!(b.key(), key32(-2.25));
        assert_eq!(b.key_as(true), key64(-2.25));
        assert!(f16::NAN.is_nan());
        assert!(!bf16::from_f32(3.0).is_nan());
    }

    #[test]
    fn f64_rounds_once_to_half_types() {
        // just above the midpoint of two neighbours: must round up, not to the even one below
        let v = 1.0 + 2f64.powi(-11) + 2f64.powi(-40);
        assert_eq!(<f16 as Float>::from_f64(v).to_f64(), 1.0 + 2f64.powi(-10));
        let v = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(<bf16 as Float>::from_f64(v).to_f64(), 1.0 + 2f64.powi(-7));
        // exact midpoints still round to even; exact values, signs, overflow and NaN pass through
        assert_eq!(<f16 as Float>::from_f64(1.0 + 2f64.powi(-11)).to_f64(), 1.0);
        assert_eq!(<bf16 as Float>::from_f64(-(1.0 + 3.0 * 2f64.powi(-8))).to_f64(), -(1.0 + 2f64.powi(-6)));
        assert_eq!(<f16 as Float>::from_f64(-0.375).to_f64(), -0.375);
        assert_eq!(<f16 as Float>::from_f64(1e6).to_f64(), f64::INFINITY);
        assert_eq!(<bf16 as Float>::from_f64(1e300).to_f64(), f64::INFINITY);
        assert!(<f16 as Float>::from_f64(f64::NAN).is_nan());
        // below the smallest f16 subnormal's half: zero; just above: the subnormal
        assert_eq!(<f16 as Float>::from_f64(2f64.powi(-25)).to_f64(), 0.0);
        assert_eq!(<f16 as Float>::from_f64(2f64.powi(-25) * (1.0 + 1e-12)).to_f64(), 2f64.powi(-24));
    }
}
