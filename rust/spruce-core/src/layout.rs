//! Views of an N-D row-major tensor as `(outer, len, inner)` around one dimension.

use crate::error::{fmt_shape, Error, Result};

/// A row-major tensor seen around dimension `dim`: slice `(o, i)` holds the `len` elements at
/// `o * len * inner + j * inner + i` for `j` in `0..len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub outer: usize,
    pub len: usize,
    pub inner: usize,
}

impl Layout {
    /// The layout of the whole tensor as one slice (`dim = None`).
    pub fn flat(shape: &[usize]) -> Self {
        Layout { outer: 1, len: shape.iter().product(), inner: 1 }
    }

    /// The layout around `dim` (negative counts from the end, as in torch); `None` is the whole
    /// tensor as one slice.
    pub fn new(op: &'static str, shape: &[usize], dim: Option<i64>) -> Result<Self> {
        match dim {
            None => Ok(Self::flat(shape)),
            Some(d) => {
                let d = normalize_dim(op, shape, d)?;
                Ok(Layout {
                    outer: shape[..d].iter().product(),
                    len: shape[d],
                    inner: shape[d + 1..].iter().product(),
                })
            }
        }
    }

    /// Number of slices.
    pub fn slices(&self) -> usize {
        self.outer * self.inner
    }

    /// Flat offset of element `j` of slice `s` (slices numbered `o * inner + i`).
    #[inline(always)]
    pub fn offset(&self, s: usize, j: usize) -> usize {
        let (o, i) = (s / self.inner, s % self.inner);
        (o * self.len + j) * self.inner + i
    }
}

/// Normalizes a possibly negative `dim` against `shape` (a 0-D tensor accepts 0 and -1, as torch).
pub fn normalize_dim(op: &'static str, shape: &[usize], dim: i64) -> Result<usize> {
    let nd = shape.len().max(1) as i64;
    if dim < -nd || dim >= nd {
        return Err(Error::arg(
            op,
            "dim",
            dim,
            format!("in [{}, {}] for a tensor of shape {}", -nd, nd - 1, fmt_shape(shape)),
        ));
    }
    if shape.is_empty() {
        return Err(Error::shape(op, "input", shape, "at least one dimension when dim is given"));
    }
    Ok(if dim < 0 { (dim + nd) as usize } else { dim as usize })
}

/// The shape with `dim` removed (the shape of a per-slice reduction).
pub fn reduced_shape(shape: &[usize], dim: Option<usize>) -> Vec<usize> {
    match dim {
        None => vec![],
        Some(d) => shape.iter().enumerate().filter(|&(i, _)| i != d).map(|(_, &s)| s).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        let l = Layout::new("t", &[2, 3, 4], Some(1)).unwrap();
        assert_eq!(l, Layout { outer: 2, len: 3, inner: 4 });
        assert_eq!(l.offset(5, 2), (3 + 2) * 4 + 1); // o = 1, i = 1
        assert_eq!(Layout::new("t", &[2, 3, 4], Some(-1)).unwrap(), Layout { outer: 6, len: 4, inner: 1 });
        assert_eq!(Layout::new("t", &[2, 3, 4], None).unwrap(), Layout { outer: 1, len: 24, inner: 1 });
        let e = Layout::new("topk_mask", &[2, 3], Some(2)).unwrap_err();
        assert_eq!(e.to_string(), "topk_mask: dim (2) must be in [-2, 1] for a tensor of shape (2, 3)");
        assert_eq!(reduced_shape(&[2, 3, 4], Some(1)), vec![2, 4]);
    }
}
