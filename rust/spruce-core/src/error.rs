//! The typed error vocabulary of spruce. The binding crate maps each variant one-to-one to a
//! Python exception class (see `spruce.errors`).

/// Every way a spruce kernel can refuse its input.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// An argument has a value outside its domain, e.g. `nm_mask: n (5) must be <= m (4)`.
    #[error("{op}: {arg} ({value}) must be {expected}")]
    InvalidArgument { op: &'static str, arg: &'static str, value: String, expected: String },
    /// A tensor has a shape the operation cannot take.
    #[error("{op}: {arg} has shape {shape}, expected {expected}")]
    Shape { op: &'static str, arg: &'static str, shape: String, expected: String },
    /// A tensor holds NaN where values must be ordered or finite.
    #[error("{op}: {arg} contains NaN; NaN cannot be ranked (replace it first, e.g. with torch.nan_to_num)")]
    NonFinite { op: &'static str, arg: &'static str },
    /// An output could not be allocated.
    #[error("{op}: cannot allocate {bytes} bytes for the result")]
    OutOfMemory { op: &'static str, bytes: u128 },
    /// A tensor's element type is not supported by the operation.
    #[error("{op}: {arg} has dtype {dtype}, expected {expected}")]
    DType { op: &'static str, arg: &'static str, dtype: String, expected: String },
}

/// The result type of every fallible kernel.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn arg(op: &'static str, arg: &'static str, value: impl ToString, expected: impl ToString) -> Self {
        Error::InvalidArgument { op, arg, value: value.to_string(), expected: expected.to_string() }
    }

    /// Shorthand for [`Error::Shape`].
    pub fn shape(op: &'static str, arg: &'static str, shape: &[usize], expected: impl ToString) -> Self {
        Error::Shape { op, arg, shape: fmt_shape(shape), expected: expected.to_string() }
    }
}

/// Formats a shape the way torch prints it: `(4, 8)`, `(3,)`, `()`.
pub fn fmt_shape(shape: &[usize]) -> String {
    match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => {
            let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    }
}

/// Element types whose all-zero bit pattern is a valid value (false, 0, 0.0).
///
/// # Safety
/// Implementors must accept the all-zero bit pattern as a valid value.
pub unsafe trait Zeroable: Copy {}
// SAFETY: all-zero bits are `false`, `0` and `+0.0` respectively.
unsafe impl Zeroable for bool {}
unsafe impl Zeroable for u8 {}
unsafe impl Zeroable for i64 {}
unsafe impl Zeroable for u64 {}
unsafe impl Zeroable for f32 {}
unsafe impl Zeroable for f64 {}
// SAFETY: all-zero bits are +0.0 in both half-precision formats.
unsafe impl Zeroable for half::f16 {}
unsafe impl Zeroable for half::bf16 {}

/// A vector of `n` copies of `v`, or [`Error::OutOfMemory`] instead of aborting.
pub(crate) fn try_filled<T: Clone>(op: &'static str, n: usize, v: T) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n)
        .map_err(|_| Error::OutOfMemory { op, bytes: n as u128 * std::mem::size_of::<T>() as u128 })?;
    out.resize(n, v);
    Ok(out)
}

/// A zero-filled vector of `n` elements, or [`Error::OutOfMemory`] instead of aborting.
///
/// Uses a zeroed allocation (calloc), so untouched pages cost nothing and no serial fill runs.
pub fn try_zeroed<T: Zeroable>(op: &'static str, n: usize) -> Result<Vec<T>> {
    let oom = || Error::OutOfMemory { op, bytes: n as u128 * std::mem::size_of::<T>() as u128 };
    if n == 0 || std::mem::size_of::<T>() == 0 {
        return Ok(vec![]);
    }
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| oom())?;
    // SAFETY: `layout` has non-zero size (checked above).
    let p = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if p.is_null() {
        return Err(oom());
    }
    // SAFETY: `p` was allocated by the global allocator with the layout of `[T; n]`, and every
    // element is a valid `T` because all-zero bits are valid for `T: Zeroable`.
    Ok(unsafe { Vec::from_raw_parts(p, n, n) })
}

/// Checks that a buffer holds exactly the elements its shape promises.
pub fn check_numel(op: &'static str, arg: &'static str, len: usize, shape: &[usize]) -> Result<()> {
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if numel == Some(len) {
        Ok(())
    } else {
        Err(Error::shape(op, arg, shape, format!("{len} elements in the buffer")))
    }
}

/// Checks that a fraction (sparsity, density) is a finite number in [0, 1].
pub fn check_fraction(op: &'static str, arg: &'static str, value: f64) -> Result<()> {
    if value.is_finite() && (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::arg(op, arg, value, "a number in [0, 1]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_argument_value_and_expectation() {
        let e = Error::arg("nm_mask", "n", 5, "<= m (4)");
        assert_eq!(e.to_string(), "nm_mask: n (5) must be <= m (4)");
        let e = Error::shape("nm_mask", "scores", &[3, 5], "a size divisible by m (4) along dim 1");
        assert_eq!(
            e.to_string(),
            "nm_mask: scores has shape (3, 5), expected a size divisible by m (4) along dim 1"
        );
        assert_eq!(fmt_shape(&[7]), "(7,)");
        assert_eq!(fmt_shape(&[]), "()");
    }

    #[test]
    fn zeroed_allocations_fail_cleanly() {
        let v: Vec<bool> = try_zeroed("t", 1000).unwrap();
        assert!(v.iter().all(|&b| !b));
        let e = try_zeroed::<u64>("t", usize::MAX / 4).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory { op: "t", .. }));
        assert!(try_zeroed::<f32>("t", 0).unwrap().is_empty());
    }

    #[test]
    fn fractions() {
        assert!(check_fraction("op", "sparsity", 0.0).is_ok());
        assert!(check_fraction("op", "sparsity", 1.0).is_ok());
        assert!(check_fraction("op", "sparsity", -0.1).is_err());
        assert!(check_fraction("op", "sparsity", 1.5).is_err());
        assert!(check_fraction("op", "sparsity", f64::NAN).is_err());
    }
}
