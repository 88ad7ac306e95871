//! Mask construction: N:M, structured (whole slices or groups), random; bitmask packing; CSR.

use crate::dtype::Float;
use crate::error::{check_fraction, check_numel, fmt_shape, try_zeroed, Error, Result};
use crate::layout::{normalize_dim, Layout};
use crate::parallel::install;
use crate::rng;
use crate::select::{make_items, map_slices_mask, prune_masks, row_select, Item, KeySource, RowScratch};
use rayon::prelude::*;

/// Marks, inside one group of `m` values, the `drop` smallest by (value, index) as pruned.
/// Compares values directly (`-0.0 == 0.0` as in the keys); NaN is checked by the caller.
#[inline(always)]
fn nm_group<V: PartialOrd + Copy>(vals: &[V], drop: usize, out: &mut [bool]) {
    for (i, o) in out.iter_mut().enumerate() {
        let vi = vals[i];
        // rank of i = #{j : (v_j, j) < (v_i, i)}
        let mut rank = 0usize;
        for (j, &vj) in vals.iter().enumerate() {
            rank += ((vj < vi) | ((vj == vi) & (j < i))) as usize;
        }
        *o = rank >= drop;
    }
}

fn nm_groups<T: Float, V: PartialOrd + Copy + Default, const M: usize>(
    row: &[T],
    drop: usize,
    out: &mut [bool],
    conv: impl Fn(T) -> V,
) -> bool {
    // Batches of G groups, transposed so that every comparison runs across G groups at once
    // (vectorizable); the leftover groups one by one.
    const G: usize = 16;
    let mut nan = false;
    let mut batches = row.chunks_exact(M * G);
    let mut obatches = out.chunks_exact_mut(M * G);
    for (b, ob) in (&mut batches).zip(&mut obatches) {
        let mut v = [[V::default(); G]; M];
        for g in 0..G {
            for k in 0..M {
                let x = b[g * M + k];
                nan |= x.is_nan();
                v[k][g] = conv(x);
            }
        }
        let mut rank = [[0u8; G]; M];
        for i in 0..M {
            for j in 0..M {
                if j == i {
                    continue;
                }
                let (vi, vj) = (&v[i], &v[j]);
                let before = j < i;
                for g in 0..G {
                    rank[i][g] += ((vj[g] < vi[g]) | ((vj[g] == vi[g]) & before)) as u8;
                }
            }
        }
        for g in 0..G {
            for k in 0..M {
                ob[g * M + k] = rank[k][g] as usize >= drop;
            }
        }
    }
    let mut vals = [V::default(); M];
    for (g, o) in batches.remainder().chunks_exact(M).zip(obatches.into_remainder().chunks_exact_mut(M)) {
        for (v, &x) in vals.iter_mut().zip(g) {
            nan |= x.is_nan();
            *v = conv(x);
        }
        nm_group(&vals, drop, o);
    }
    nan
}

/// N:M over a run of whole groups with a compile-time group size.
fn nm_row<T: Float, const M: usize>(row: &[T], drop: usize, out: &mut [bool]) -> bool {
    if T::WIDE {
        nm_groups::<T, f64, M>(row, drop, out, |x| x.to_f64())
    } else {
        nm_groups::<T, f32, M>(row, drop, out, |x| x.to_f32())
    }
}

fn nm_row_any<T: Float>(row: &[T], m: usize, drop: usize, out: &mut [bool], s: &mut RowScratch) -> bool {
    if m <= 32 {
        let mut vals = vec![0.0f64; m];
        let mut nan = false;
        for (g, o) in row.chunks_exact(m).zip(out.chunks_exact_mut(m)) {
            for (v, &x) in vals.iter_mut().zip(g) {
                nan |= x.is_nan();
                *v = x.to_f64();
            }
            nm_group(&vals, drop, o);
        }
        nan
    } else {
        row.chunks_exact(m)
            .zip(out.chunks_exact_mut(m))
            .any(|(g, o)| row_select(g, drop, Some(o), s).is_err())
    }
}

/// Keeps the `n` largest of every `m` consecutive entries along `dim` (ties: the higher index is
/// kept). The length along `dim` must be divisible by `m`.
pub fn nm_mask<T: Float>(data: &[T], shape: &[usize], dim: i64, n: i64, m: i64) -> Result<Vec<bool>> {
    const OP: &str = "nm_mask";
    check_numel(OP, "scores", data.len(), shape)?;
    if m < 1 {
        return Err(Error::arg(OP, "m", m, ">= 1"));
    }
    if n < 0 || n > m {
        return Err(Error::arg(OP, "n", n, format!("in [0, m] = [0, {m}]")));
    }
    let lay = Layout::new(OP, shape, Some(dim))?;
    let (m, n) = (m as usize, n as usize);
    if lay.len % m != 0 {
        let d = normalize_dim(OP, shape, dim)?;
        return Err(Error::shape(OP, "scores", shape, format!("a size divisible by m ({m}) along dim {d}")));
    }
    let drop = m - n;
    let nan_err = || Error::NonFinite { op: OP, arg: "scores" };
    install(|| {
        if lay.inner == 1 && !data.is_empty() {
            // Groups never straddle rows: treat the buffer as one run of groups. Zeroed
            // (calloc); every group writes all of its entries.
            let mut out = try_zeroed(OP, data.len())?;
            let run = m * (4096 / m).max(1);
            let nan = out
                .par_chunks_mut(run)
                .zip(data.par_chunks(run))
                .map_init(RowScratch::default, |s, (o, d)| match m {
                    2 => nm_row::<T, 2>(d, drop, o),
                    4 => nm_row::<T, 4>(d, drop, o),
                    8 => nm_row::<T, 8>(d, drop, o),
                    16 => nm_row::<T, 16>(d, drop, o),
                    _ => nm_row_any(d, m, drop, o, s),
                })
                .reduce(|| false, |a, b| a | b);
            if nan {
                return Err(nan_err());
            }
            Ok(out)
        } else {
            map_slices_mask(OP, data, lay, |row, o, s| {
                if nm_row_any(row, m, drop, o, s) {
                    Err(nan_err())
                } else {
                    Ok(())
                }
            })
        }
    })
}

/// The norm used to rank slices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Norm {
    L1,
    L2,
    Inf,
}

impl Norm {
    /// Parses `1`, `2` or `inf`.
    pub fn from_p(op: &'static str, p: f64) -> Result<Self> {
        match p {
            1.0 => Ok(Norm::L1),
            2.0 => Ok(Norm::L2),
            p if p == f64::INFINITY => Ok(Norm::Inf),
            _ => Err(Error::arg(op, "norm", p, "1, 2 or inf")),
        }
    }
}

/// Per-slice norms along `dim` (reduced over every other dimension) in float64: L1 sums |x|,
/// L2 sums x² (the squared norm, which ranks identically), Inf takes max |x|.
pub fn slice_norms<T: Float>(op: &'static str, data: &[T], lay: Layout, norm: Norm) -> Result<Vec<f64>> {
    let combine = move |a: f64, b: f64| if norm == Norm::Inf { a.max(b) } else { a + b };
    let acc = move |x: f64| match norm {
        Norm::L1 | Norm::Inf => x.abs(),
        Norm::L2 => x * x,
    };
    let block = lay.len * lay.inner;
    if block == 0 {
        return Ok(vec![0.0; lay.len]);
    }
    let (norms, nan) = data
        .par_chunks(block)
        .fold(
            || (vec![0.0f64; lay.len], false),
            |(mut v, mut nan), b| {
                for (j, acc_j) in v.iter_mut().enumerate() {
                    let mut a = *acc_j;
                    for &x in &b[j * lay.inner..(j + 1) * lay.inner] {
                        nan |= x.is_nan();
                        a = combine(a, acc(x.to_f64()));
                    }
                    *acc_j = a;
                }
                (v, nan)
            },
        )
        .reduce_with(|(mut a, na), (b, nb)| {
            a.iter_mut().zip(&b).for_each(|(x, &y)| *x = combine(*x, y));
            (a, na | nb)
        })
        .unwrap_or_else(|| (vec![0.0; lay.len], false));
    if nan {
        return Err(Error::NonFinite { op, arg: "scores" });
    }
    Ok(norms)
}

/// Keeps or prunes whole slices along `dim`, in groups of `group_size` consecutive slices,
/// ranked by the group's L1/L2/L-inf norm over all its elements: exactly
/// `floor(sparsity * groups)` groups pruned, ties pruning the lower group index.
pub fn structured_mask<T: Float>(
    data: &[T],
    shape: &[usize],
    dim: i64,
    sparsity: f64,
    group_size: i64,
    norm: f64,
) -> Result<Vec<bool>> {
    const OP: &str = "structured_mask";
    check_numel(OP, "scores", data.len(), shape)?;
    check_fraction(OP, "sparsity", sparsity)?;
    let norm = Norm::from_p(OP, norm)?;
    if group_size < 1 {
        return Err(Error::arg(OP, "group_size", group_size, ">= 1"));
    }
    let lay = Layout::new(OP, shape, Some(dim))?;
    let gs = group_size as usize;
    if lay.len % gs != 0 {
        let d = normalize_dim(OP, shape, dim)?;
        return Err(Error::shape(
            OP,
            "scores",
            shape,
            format!("a size divisible by group_size ({gs}) along dim {d}"),
        ));
    }
    install(|| {
        let norms = slice_norms(OP, data, lay, norm)?;
        let groups: Vec<f64> =
            norms
                .chunks(gs.max(1))
                .map(|g| {
                    if norm == Norm::Inf {
                        g.iter().fold(0.0, |a: f64, &b| a.max(b))
                    } else {
                        g.iter().sum()
                    }
                })
                .collect();
        let k = crate::select::prune_count(sparsity, groups.len());
        let mut keep = vec![true; groups.len()];
        if !groups.is_empty() {
            row_select(&groups, k, Some(&mut keep), &mut RowScratch::default())
                .map_err(|_| Error::NonFinite { op: OP, arg: "scores" })?;
        }
        let mut out = try_zeroed(OP, data.len())?; // every block is filled below
        let block = lay.len * lay.inner;
        if block > 0 {
            out.par_chunks_mut(block).for_each(|b| {
                for (j, run) in b.chunks_mut(lay.inner).enumerate() {
                    run.fill(keep[j / gs]);
                }
            });
        }
        Ok(out)
    })
}

/// The keys of a random mask: element `i`'s Philox word under `seed`.
struct RandomSource {
    seed: u64,
    items: Vec<Item>,
}

impl KeySource for RandomSource {
    fn bits(&self) -> u32 {
        32
    }
    fn items(&self) -> &[Item] {
        &self.items
    }
    #[inline]
    fn visit<F: FnMut(usize, u64)>(&self, it: &Item, mut f: F) -> bool {
        rng::for_each_word(self.seed, 0, it.start as u64, it.end as u64, |i, w| f(i as usize, w as u64));
        false
    }
}

/// The number kept by a random mask: `round(density * n)`, ties to even (Python's `round`).
pub fn keep_count(density: f64, n: usize) -> usize {
    ((density * n as f64).round_ties_even() as usize).min(n)
}

/// A mask of `numel` entries keeping exactly `round(density * numel)`: the entries with the
/// largest counter-based random words under `seed` (ties by index), so the mask depends only on
/// `(numel, density, seed)`, never on threads or chunking.
pub fn random_mask(numel: usize, density: f64, seed: u64) -> Result<Vec<bool>> {
    const OP: &str = "random_mask";
    check_fraction(OP, "density", density)?;
    let keep = keep_count(density, numel);
    let mut out = try_zeroed(OP, numel)?; // prune_masks writes every element
    let items = make_items(std::iter::once(numel));
    let src = RandomSource { seed, items };
    install(|| prune_masks(&src, (numel - keep) as u64, &mut [&mut out[..]]))
        .map_err(|_| Error::NonFinite { op: OP, arg: "keys" })?;
    Ok(out)
}

/// Rows and columns of the bit-packing view of a shape: the last dimension is the row.
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape.split_last() {
        None => (1, 1),
        Some((&c, rest)) => (rest.iter().product(), c),
    }
}

/// The bytes of a bool slice (each 0 or 1).
#[inline]
fn as_bytes(b: &[bool]) -> &[u8] {
    // SAFETY: bool has size and alignment 1 and holds 0 or 1, a valid u8.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<u8>(), b.len()) }
}

/// Eight 0/1 bytes as one byte, byte `i` into bit `i`: one multiply moves byte `i` (bit `8i`)
/// to bit `56 + i`; every other partial product lands below bit 56 at distinct positions (no
/// carry) or above bit 63.
#[inline(always)]
fn pack8(bits: &[u8]) -> u8 {
    let x = u64::from_le_bytes(bits.try_into().expect("8 bytes"));
    (x.wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8
}

/// Bit `i` of `b` as byte `i` (0 or 1): replicate `b` into every byte, keep bit `i` of byte
/// `i`, then turn each nonzero byte into 1 (adding 0x7f carries into bit 7, never across bytes).
#[inline(always)]
fn spread8(b: u8) -> [u8; 8] {
    let x = (b as u64).wrapping_mul(0x0101_0101_0101_0101) & 0x8040_2010_0804_0201;
    (((x + 0x7f7f_7f7f_7f7f_7f7f) & 0x8080_8080_8080_8080) >> 7).to_le_bytes()
}

/// Packs a bool mask into bits per row of the last dimension: `ceil(cols / 8)` bytes per row,
/// little bit order (equal to `numpy.packbits(mask, axis=-1, bitorder="little")`).
pub fn pack_mask(mask: &[bool], shape: &[usize]) -> Result<(Vec<u8>, Vec<usize>)> {
    check_numel("pack_mask", "mask", mask.len(), shape)?;
    let (rows, cols) = rows_cols(shape);
    let bpr = cols.div_ceil(8);
    let mut out = try_zeroed("pack_mask", rows * bpr)?;
    if bpr > 0 {
        install(|| {
            out.par_chunks_mut(bpr).enumerate().for_each(|(r, o)| {
                let row = as_bytes(&mask[r * cols..(r + 1) * cols]);
                let mut eights = row.chunks_exact(8);
                for (byte, bits) in o.iter_mut().zip(&mut eights) {
                    *byte = pack8(bits);
                }
                if let Some(last) = o.get_mut(cols / 8) {
                    let tail = eights.remainder();
                    *last = tail.iter().enumerate().fold(0u8, |a, (i, &b)| a | (b << i));
                }
            })
        });
    }
    let mut out_shape = shape.to_vec();
    match out_shape.last_mut() {
        Some(c) => *c = bpr,
        None => out_shape.push(bpr),
    }
    Ok((out, out_shape))
}

/// Inverts [`pack_mask`]: `shape` is the mask's shape; `packed` must be its packed shape.
/// Padding bits of the last byte of each row are ignored.
pub fn unpack_mask(packed: &[u8], packed_shape: &[usize], shape: &[usize]) -> Result<Vec<bool>> {
    const OP: &str = "unpack_mask";
    check_numel(OP, "packed", packed.len(), packed_shape)?;
    let (rows, cols) = rows_cols(shape);
    let bpr = cols.div_ceil(8);
    let mut want = shape.to_vec();
    match want.last_mut() {
        Some(c) => *c = bpr,
        None => want.push(bpr),
    }
    if packed_shape != want.as_slice() {
        return Err(Error::shape(
            OP,
            "packed",
            packed_shape,
            format!("{} for a mask of shape {}", fmt_shape(&want), fmt_shape(shape)),
        ));
    }
    let mut out: Vec<bool> = try_zeroed(OP, rows * cols)?;
    if cols > 0 {
        install(|| {
            out.par_chunks_mut(cols).enumerate().for_each(|(r, o)| {
                let bytes = &packed[r * bpr..(r + 1) * bpr];
                // SAFETY: only 0 and 1 (valid bools) are written through the byte view.
                let ob = unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr().cast::<u8>(), o.len()) };
                let mut eights = ob.chunks_exact_mut(8);
                for (dst, &b) in (&mut eights).zip(bytes) {
                    dst.copy_from_slice(&spread8(b));
                }
                let tail = eights.into_remainder();
                if let Some(&b) = bytes.get(cols / 8) {
                    for (i, v) in tail.iter_mut().enumerate() {
                        *v = (b >> i) & 1;
                    }
                }
            })
        });
    }
    Ok(out)
}

/// The kept entries of a 2-D `(rows, cols)` weight as CSR: row pointers (`rows + 1`), column
/// indices and values, in row-major order.
pub fn mask_to_csr<T: Float>(
    weight: &[T],
    mask: &[bool],
    shape: &[usize],
) -> Result<(Vec<i64>, Vec<i64>, Vec<T>)> {
    const OP: &str = "mask_to_csr";
    if shape.len() != 2 {
        return Err(Error::shape(OP, "weight", shape, "a 2-D (rows, cols) matrix"));
    }
    check_numel(OP, "weight", weight.len(), shape)?;
    check_numel(OP, "mask", mask.len(), shape)?;
    let (rows, cols) = (shape[0], shape[1]);
    let counts: Vec<usize> = if cols == 0 {
        vec![0; rows]
    } else {
        install(|| mask.par_chunks(cols).map(|r| r.iter().filter(|&&b| b).count()).collect())
    };
    let mut crow = Vec::with_capacity(rows + 1);
    crow.push(0i64);
    let mut acc = 0i64;
    for c in &counts {
        acc += *c as i64;
        crow.push(acc);
    }
    let nnz = acc as usize;
    let mut col = Vec::with_capacity(nnz);
    let mut val = Vec::with_capacity(nnz);
    for (i, (&w, &m)) in weight.iter().zip(mask).enumerate() {
        if m {
            col.push((i % cols) as i64);
            val.push(w);
        }
    }
    Ok((crow, col, val))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nm_batched_equals_group_by_group() {
        // few distinct values (many ties), lengths with and without leftover groups
        let mut state = 12345u64;
        for m in [2usize, 4, 8, 16] {
            for groups in [1usize, 15, 16, 17, 40] {
                let row: Vec<f32> = (0..m * groups)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                        ((state >> 60) as f32) - 8.0
                    })
                    .collect();
                for drop in 0..=m {
                    let mut got = vec![false; row.len()];
                    match m {
                        2 => nm_row::<f32, 2>(&row, drop, &mut got),
                        4 => nm_row::<f32, 4>(&row, drop, &mut got),
                        8 => nm_row::<f32, 8>(&row, drop, &mut got),
                        _ => nm_row::<f32, 16>(&row, drop, &mut got),
                    };
                    let mut want = vec![false; row.len()];
                    for (g, o) in row.chunks_exact(m).zip(want.chunks_exact_mut(m)) {
                        nm_group(g, drop, o);
                    }
                    assert_eq!(got, want, "m {m} groups {groups} drop {drop}");
                }
            }
        }
    }

    #[test]
    fn two_four_keeps_two_largest_and_breaks_ties_upward() {
        let x = [1.0f32, 4.0, 3.0, 2.0, 5.0, 5.0, 5.0, 5.0, -1.0, 0.0, -0.0, 7.0];
        let m = nm_mask(&x, &[12], -1, 2, 4).unwrap();
        assert_eq!(m, [false, true, true, false, false, false, true, true, false, false, true, true]);
        // -0.0 (index 10) ties with 0.0 (index 9): the higher index is kept.
        let big: Vec<f32> = (0..40).map(|i| ((i * 7919) % 13) as f32).collect();
        let m8 = nm_mask(&big, &[40], -1, 3, 40).unwrap();
        assert_eq!(m8.iter().filter(|&&b| b).count(), 3);
        assert!(nm_mask(&x, &[12], -1, 5, 4)
            .unwrap_err()
            .to_string()
            .contains("n (5) must be in [0, m] = [0, 4]"));
        assert!(nm_mask(&x, &[12], -1, 2, 5).is_err());
    }

    #[test]
    fn nm_along_rows_of_columns() {
        let x: Vec<f32> = (0..8).map(|i| i as f32).collect(); // shape (4, 2), groups along dim 0
        let m = nm_mask(&x, &[4, 2], 0, 1, 2).unwrap();
        assert_eq!(m, [false, false, true, true, false, false, true, true]);
    }

    #[test]
    fn structured_prunes_lowest_norm_groups() {
        // 4 rows of 2: norms 1, 3, 2, 0 -> prune half = rows 3 and 0
        let x = [1.0f32, 0.0, 3.0, 0.0, 0.0, -2.0, 0.0, 0.0];
        let m = structured_mask(&x, &[4, 2], 0, 0.5, 1, 2.0).unwrap();
        assert_eq!(m, [false, false, true, true, true, true, false, false]);
        let g = structured_mask(&x, &[4, 2], 0, 0.5, 2, 1.0).unwrap();
        assert_eq!(g, [true, true, true, true, false, false, false, false]);
        let c = structured_mask(&x, &[4, 2], 1, 0.5, 1, f64::INFINITY).unwrap();
        assert_eq!(c, [true, false, true, false, true, false, true, false]);
        assert!(structured_mask(&x, &[4, 2], 0, 0.5, 3, 2.0).is_err());
        assert!(structured_mask(&x, &[4, 2], 0, 0.5, 1, 3.0).is_err());
    }

    #[test]
    fn random_mask_is_exact_and_chunk_free() {
        for &(n, d) in &[(0usize, 0.5), (1, 0.5), (10, 0.25), (200_001, 0.3)] {
            let m = random_mask(n, d, 42).unwrap();
            assert_eq!(m.iter().filter(|&&b| b).count(), keep_count(d, n));
        }
        crate::parallel::set_num_threads(1);
        let a = random_mask(300_000, 0.5, 7).unwrap();
        crate::parallel::set_num_threads(2);
        let b = random_mask(300_000, 0.5, 7).unwrap();
        crate::parallel::set_num_threads(0);
        assert_eq!(a, b);
        assert_ne!(a, random_mask(300_000, 0.5, 8).unwrap());
        assert_eq!(keep_count(0.5, 5), 2); // round half to even, as Python
    }

    #[test]
    fn pack8_is_exact_for_every_byte() {
        for v in 0u32..256 {
            let bits: Vec<u8> = (0..8).map(|i| ((v >> i) & 1) as u8).collect();
            assert_eq!(pack8(&bits) as u32, v);
            assert_eq!(spread8(v as u8).to_vec(), bits);
        }
    }

    #[test]
    fn pack_round_trip() {
        let m: Vec<bool> = (0..3 * 11).map(|i| i % 3 == 0).collect();
        let (p, s) = pack_mask(&m, &[3, 11]).unwrap();
        assert_eq!(s, vec![3, 2]);
        assert_eq!(p[0], 0b0100_1001);
        assert_eq!(unpack_mask(&p, &s, &[3, 11]).unwrap(), m);
        assert!(unpack_mask(&p, &[3, 3], &[3, 11]).is_err());
    }

    #[test]
    fn csr() {
        let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let m = [true, false, true, false, false, true];
        let (crow, col, val) = mask_to_csr(&w, &m, &[2, 3]).unwrap();
        assert_eq!(crow, vec![0, 2, 3]);
        assert_eq!(col, vec![0, 2, 2]);
        assert_eq!(val, vec![1.0, 3.0, 6.0]);
    }
}
