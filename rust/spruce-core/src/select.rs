//! Exact selection: top-k masks per slice, per tensor and across many tensors, k-th values and
//! quantiles. O(n), no sort, no size limit.
//!
//! Two algorithms, one ranking (`(key, index)` ascending, see the crate docs):
//! - short slices (the rows of a weight matrix): one pass builds an 11-bit histogram of the keys,
//!   a second writes the mask for every bucket but the one holding the k-th element and collects
//!   that bucket's `(key, index)` pairs, among which a quickselect finishes exactly;
//! - long slices and many tensors at once: a parallel radix select, 16 key bits per pass, that
//!   keeps only histograms (extra memory O(threads x 2^16), independent of the input size), then
//!   one pass writes the masks, breaking ties at the threshold by global position.

use crate::dtype::{Float, Scores};
use crate::error::{check_fraction, check_numel, try_zeroed, Error, Result};
use crate::layout::{normalize_dim, reduced_shape, Layout};
use crate::parallel::{install, SyncPtr};
use crate::with_scores;
use rayon::prelude::*;

const ROW_BITS: u32 = 11;
const ROW_BINS: usize = 1 << ROW_BITS;
/// Slices at least this long use the parallel radix select when there are few of them.
const BIG_SLICE: usize = 1 << 18;
/// Slices longer than this always use it (its extra memory does not grow with the slice).
const HUGE_SLICE: usize = 1 << 26;
/// Elements per work item of the parallel radix select.
const CHUNK: usize = 1 << 16;
/// Key bits resolved per pass of the parallel radix select.
const DIGIT: u32 = 16;

/// The number of entries pruned for `sparsity` of `n`: `floor(sparsity * n)` computed in f64.
pub fn prune_count(sparsity: f64, n: usize) -> usize {
    ((sparsity * n as f64).floor() as usize).min(n)
}

fn nan_error(op: &'static str, arg: &'static str) -> Error {
    Error::NonFinite { op, arg }
}

/// Reusable per-thread buffers of the short-slice algorithm.
#[derive(Default)]
pub(crate) struct RowScratch {
    hist: Vec<u32>,
    digits: Vec<u16>,
    cand: Vec<(u64, usize)>,
}

/// Selects the `k` smallest elements of `row` by `(key, index)`.
///
/// With `mask`, writes `false` for the selected and `true` for every other element. Returns the
/// `(key, index)` of the k-th smallest (`None` when `k == 0`), or `Err(())` if `row` holds NaN.
/// Requires `k <= row.len() <= u32::MAX`.
pub(crate) fn row_select<T: Float>(
    row: &[T],
    k: usize,
    mut mask: Option<&mut [bool]>,
    s: &mut RowScratch,
) -> std::result::Result<Option<(u64, usize)>, ()> {
    let shift = if T::WIDE { 64 - ROW_BITS } else { 32 - ROW_BITS };
    // Pass 1: the top 11 key bits of every element, staged so later passes are branch-free.
    let mut nan = false;
    s.digits.clear();
    s.digits.extend(row.iter().map(|&x| {
        nan |= x.is_nan();
        (x.key() >> shift) as u16
    }));
    if nan {
        return Err(());
    }
    if k == 0 {
        if let Some(m) = mask {
            m.fill(true);
        }
        return Ok(None);
    }
    s.hist.clear();
    s.hist.resize(ROW_BINS, 0);
    for &d in &s.digits {
        s.hist[d as usize] += 1;
    }
    let (mut below, mut b) = (0usize, 0usize);
    while below + (s.hist[b] as usize) < k {
        below += s.hist[b] as usize;
        b += 1;
    }
    let need = k - below;
    let b = b as u16;
    // Pass 2: everything outside the threshold bucket is decided by its digit alone.
    if let Some(m) = mask.as_deref_mut() {
        for (o, &d) in m.iter_mut().zip(&s.digits) {
            *o = d >= b;
        }
    }
    // Pass 3: exact selection among the threshold bucket's (key, index) pairs.
    s.cand.clear();
    for (i, &d) in s.digits.iter().enumerate() {
        if d == b {
            s.cand.push((row[i].key(), i));
        }
    }
    let (_, pivot, _) = s.cand.select_nth_unstable(need - 1);
    let pivot = *pivot;
    if let Some(m) = mask {
        for &(_, i) in &s.cand[..need] {
            m[i] = false;
        }
    }
    Ok(Some(pivot))
}

// ---------------------------------------------------------------------------------------------
// The parallel radix select over a sequence of segments.

/// A run of positions `start..end` inside segment `seg`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Item {
    pub seg: usize,
    pub start: usize,
    pub end: usize,
}

/// Splits segments of the given lengths into work items of at most `CHUNK` positions.
pub(crate) fn make_items(lens: impl Iterator<Item = usize>) -> Vec<Item> {
    let mut items = vec![];
    for (seg, len) in lens.enumerate() {
        let mut start = 0;
        while start < len {
            let end = (start + CHUNK).min(len);
            items.push(Item { seg, start, end });
            start = end;
        }
    }
    items
}

/// A sequence of keys, visited item by item, in a global order (segment, then position).
pub(crate) trait KeySource: Sync {
    /// Significant key bits (32 or 64).
    fn bits(&self) -> u32;
    fn items(&self) -> &[Item];
    /// Calls `f(position, key)` for every non-NaN element of `item`; returns whether NaN was seen.
    fn visit<F: FnMut(usize, u64)>(&self, item: &Item, f: F) -> bool;
}

/// Borrowed float tensors as one key sequence.
pub(crate) struct ScoresSource<'a> {
    segs: &'a [Scores<'a>],
    wide: bool,
    items: Vec<Item>,
}

impl<'a> ScoresSource<'a> {
    pub fn new(segs: &'a [Scores<'a>]) -> Self {
        let wide = segs.iter().any(|s| s.is_wide());
        ScoresSource { segs, wide, items: make_items(segs.iter().map(|s| s.len())) }
    }
}

impl KeySource for ScoresSource<'_> {
    fn bits(&self) -> u32 {
        if self.wide {
            64
        } else {
            32
        }
    }
    fn items(&self) -> &[Item] {
        &self.items
    }
    #[inline]
    fn visit<F: FnMut(usize, u64)>(&self, it: &Item, mut f: F) -> bool {
        let wide = self.wide;
        with_scores!(&self.segs[it.seg], s => {
            let mut nan = false;
            for (i, &x) in s[it.start..it.end].iter().enumerate() {
                if x.is_nan() {
                    nan = true;
                } else {
                    f(it.start + i, x.key_as(wide));
                }
            }
            nan
        })
    }
}

/// The exact k-th smallest key of a source: `key`, how many keys are strictly below it and how
/// many equal it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Threshold {
    pub key: u64,
    pub below: u64,
    pub equal: u64,
}

fn pieces(items: usize) -> usize {
    (items / (4 * rayon::current_num_threads())).max(1)
}

/// Whether the source holds NaN (one parallel pass).
pub(crate) fn has_nan<S: KeySource>(src: &S) -> bool {
    src.items().par_iter().any(|it| src.visit(it, |_, _| {}))
}

/// Finds the k-th smallest key (`1 <= k <= total`); `Err(())` if the source holds NaN.
pub(crate) fn select_threshold<S: KeySource>(src: &S, k: u64) -> std::result::Result<Threshold, ()> {
    let bits = src.bits();
    let (mut prefix, mut known, mut below, mut rank) = (0u64, 0u32, 0u64, k);
    let items = src.items();
    loop {
        let d = DIGIT.min(bits - known);
        let shift = bits - known - d;
        let pmask = if known == 0 { 0 } else { (u64::MAX >> (64 - known)) << (bits - known) };
        let dmask = (1u64 << d) - 1;
        let bins = 1usize << d;
        let (hist, nan, _) = items
            .par_iter()
            .with_min_len(pieces(items.len()))
            .fold(
                || (vec![0u64; bins], false, Vec::<u32>::new()),
                |(mut h, nan, mut digits), it| {
                    let seen = if known == 0 {
                        src.visit(it, |_, key| h[((key >> shift) & dmask) as usize] += 1)
                    } else {
                        // Later passes count the few keys inside the prefix: their digits are
                        // gathered without branches (every digit is stored, the end advances on a
                        // match), then counted; a branch per key would mispredict.
                        digits.clear();
                        digits.resize(it.end - it.start + 1, 0);
                        let mut end = 0usize;
                        let seen = src.visit(it, |_, key| {
                            digits[end] = ((key >> shift) & dmask) as u32;
                            end += (key & pmask == prefix) as usize;
                        });
                        for &d in &digits[..end] {
                            h[d as usize] += 1;
                        }
                        seen
                    };
                    (h, nan | seen, digits)
                },
            )
            .map(|(h, nan, _)| (h, nan, ()))
            .reduce_with(|(mut a, na, _), (b, nb, _)| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                (a, na | nb, ())
            })
            .unwrap_or_else(|| (vec![0u64; bins], false, ()));
        if nan {
            return Err(());
        }
        let mut b = 0usize;
        while hist[b] < rank {
            rank -= hist[b];
            below += hist[b];
            b += 1;
        }
        prefix |= (b as u64) << shift;
        known += d;
        if known == bits {
            return Ok(Threshold { key: prefix, below, equal: hist[b] });
        }
    }
}

/// Per-item counts of keys equal to `key`, as exclusive prefix sums (global tie ranks).
fn equal_before<S: KeySource>(src: &S, key: u64) -> Vec<u64> {
    let counts: Vec<u64> = src
        .items()
        .par_iter()
        .map(|it| {
            let mut c = 0u64;
            src.visit(it, |_, k| c += (k == key) as u64);
            c
        })
        .collect();
    let mut acc = 0u64;
    counts
        .into_iter()
        .map(|c| {
            let before = acc;
            acc += c;
            before
        })
        .collect()
}

/// Writes keep-masks pruning the `k` smallest keys of `src` (by key, then global position).
/// `outs[seg]` is segment `seg`'s mask; every element is written. `Err(())` if the source holds NaN.
pub(crate) fn prune_masks<S: KeySource>(
    src: &S,
    k: u64,
    outs: &mut [&mut [bool]],
) -> std::result::Result<(), ()> {
    if k == 0 {
        if has_nan(src) {
            return Err(());
        }
        outs.par_iter_mut().for_each(|o| o.fill(true));
        return Ok(());
    }
    let thr = select_threshold(src, k)?;
    let need = k - thr.below;
    let ranks = if need < thr.equal { equal_before(src, thr.key) } else { vec![0; src.items().len()] };
    // Split every output into the disjoint pieces the items cover, in item order.
    let mut chunks: Vec<&mut [bool]> = Vec::with_capacity(src.items().len());
    let mut rest: Vec<Option<&mut [bool]>> = outs.iter_mut().map(|o| Some(&mut **o)).collect();
    for it in src.items() {
        let whole = rest[it.seg].take().unwrap_or_default();
        let (head, tail) = whole.split_at_mut(it.end - it.start);
        chunks.push(head);
        rest[it.seg] = Some(tail);
    }
    let t = thr.key;
    src.items().par_iter().zip(chunks.into_par_iter()).zip(ranks.par_iter()).for_each(|((it, out), &r0)| {
        let mut seen = r0;
        src.visit(it, |i, key| {
            out[i - it.start] = if key == t {
                seen += 1;
                seen > need
            } else {
                key > t
            };
        });
    });
    Ok(())
}

/// The (segment, position) of the k-th smallest element (`1 <= k <= total`).
pub(crate) fn kth_position<S: KeySource>(src: &S, k: u64) -> std::result::Result<(usize, usize), ()> {
    let thr = select_threshold(src, k)?;
    let need = k - thr.below; // 1-based rank among the keys equal to the threshold
    let ranks = equal_before(src, thr.key);
    let items = src.items();
    let j = ranks.partition_point(|&r| r < need) - 1;
    let mut seen = ranks[j];
    let mut found = (items[j].seg, items[j].start);
    src.visit(&items[j], |i, key| {
        if key == thr.key {
            seen += 1;
            if seen == need {
                found = (items[j].seg, i);
            }
        }
    });
    Ok(found)
}

// ---------------------------------------------------------------------------------------------
// Slice drivers.

/// Whether slices of `lay` go through the parallel radix select one at a time.
fn use_big(lay: &Layout) -> bool {
    lay.len > HUGE_SLICE || (lay.len >= BIG_SLICE && lay.slices() < 4 * rayon::current_num_threads())
}

/// Slice `s` of `data` as a contiguous slice: borrowed when `inner == 1`, else gathered into `buf`.
fn slice_of<'a, T: Float>(data: &'a [T], lay: &Layout, s: usize, buf: &'a mut Vec<T>) -> &'a [T] {
    if lay.inner == 1 {
        &data[s * lay.len..(s + 1) * lay.len]
    } else {
        buf.clear();
        buf.extend((0..lay.len).map(|j| data[lay.offset(s, j)]));
        buf
    }
}

/// Builds a keep-mask of the shape of `data`, filling every slice with `f(slice, mask_of_slice)`.
/// Parallel over slices; slices along an inner dimension are gathered and scattered.
pub(crate) fn map_slices_mask<T: Float>(
    op: &'static str,
    data: &[T],
    lay: Layout,
    f: impl Fn(&[T], &mut [bool], &mut RowScratch) -> Result<()> + Sync,
) -> Result<Vec<bool>> {
    // Zeroed (calloc: no serial fill); `f` writes every element of its slice.
    let mut out = try_zeroed(op, data.len())?;
    if data.is_empty() {
        return Ok(out);
    }
    if lay.inner == 1 {
        out.par_chunks_mut(lay.len)
            .zip(data.par_chunks(lay.len))
            .try_for_each_init(RowScratch::default, |s, (m, row)| f(row, m, s))?;
    } else {
        let ptr = SyncPtr(out.as_mut_ptr());
        (0..lay.slices()).into_par_iter().try_for_each_init(
            || (RowScratch::default(), Vec::new(), Vec::new()),
            |(s, buf, m), si| {
                let row = slice_of(data, &lay, si, buf);
                m.clear();
                m.resize(lay.len, true);
                f(row, m, s)?;
                for (j, &v) in m.iter().enumerate() {
                    // SAFETY: slice `si` owns the offsets `lay.offset(si, j)`; no two slices
                    // share one, and each is below `out.len()`.
                    unsafe { ptr.write(lay.offset(si, j), v) };
                }
                Ok(())
            },
        )?;
    }
    Ok(out)
}

/// The mask pruning `k` entries of every slice of `data` along `lay`.
fn slice_prune_masks<T: Float>(
    op: &'static str,
    arg: &'static str,
    data: &[T],
    lay: Layout,
    k: usize,
) -> Result<Vec<bool>> {
    if use_big(&lay) {
        let mut out = try_zeroed(op, data.len())?; // prune_masks writes every element
        let mut buf = Vec::new();
        let mut m = Vec::new();
        for s in 0..lay.slices() {
            let row = slice_of(data, &lay, s, &mut buf);
            let segs = [T::scores(row)];
            let src = ScoresSource::new(&segs);
            if lay.inner == 1 {
                prune_masks(&src, k as u64, &mut [&mut out[s * lay.len..(s + 1) * lay.len]])
                    .map_err(|_| nan_error(op, arg))?;
            } else {
                m.clear();
                m.resize(lay.len, true);
                prune_masks(&src, k as u64, &mut [&mut m[..]]).map_err(|_| nan_error(op, arg))?;
                for (j, &v) in m.iter().enumerate() {
                    out[lay.offset(s, j)] = v;
                }
            }
        }
        Ok(out)
    } else {
        map_slices_mask(op, data, lay, |row, m, s| {
            row_select(row, k, Some(m), s).map(|_| ()).map_err(|_| nan_error(op, arg))
        })
    }
}

/// Keep-mask that prunes exactly `floor(sparsity * n)` entries of every slice along `dim`
/// (`None`: the whole tensor, ranked by row-major flat index).
pub fn topk_mask<T: Float>(
    data: &[T],
    shape: &[usize],
    dim: Option<i64>,
    sparsity: f64,
) -> Result<Vec<bool>> {
    const OP: &str = "topk_mask";
    check_numel(OP, "scores", data.len(), shape)?;
    check_fraction(OP, "sparsity", sparsity)?;
    let lay = Layout::new(OP, shape, dim)?;
    let k = prune_count(sparsity, lay.len);
    install(|| slice_prune_masks(OP, "scores", data, lay, k))
}

/// Keep-masks for several tensors under one threshold: exactly `floor(sparsity * total)`
/// entries pruned overall, ties broken by tensor position then flat index. Never concatenates:
/// extra memory is a few histograms.
pub fn global_topk_masks(segs: &[Scores<'_>], sparsity: f64) -> Result<Vec<Vec<bool>>> {
    const OP: &str = "global_topk_masks";
    check_fraction(OP, "sparsity", sparsity)?;
    let total: u64 = segs.iter().map(|s| s.len() as u64).sum();
    let k = ((sparsity * total as f64).floor() as u64).min(total);
    // Zeroed (calloc); prune_masks writes every element.
    let mut outs: Vec<Vec<bool>> = segs.iter().map(|s| try_zeroed(OP, s.len())).collect::<Result<_>>()?;
    install(|| {
        let src = ScoresSource::new(segs);
        let mut views: Vec<&mut [bool]> = outs.iter_mut().map(|o| &mut o[..]).collect();
        prune_masks(&src, k, &mut views).map_err(|_| nan_error(OP, "scores"))
    })?;
    Ok(outs)
}

/// The order statistics `ks` (1-based) of every slice: for each k, one index per slice.
/// Returns indices laid out `[k][slice]`.
fn slice_order_stats<T: Float>(
    op: &'static str,
    data: &[T],
    lay: Layout,
    ks: &[usize],
) -> Result<Vec<usize>> {
    let slices = lay.slices();
    if use_big(&lay) {
        let mut idx = vec![0usize; ks.len() * slices];
        let mut buf = Vec::new();
        for s in 0..slices {
            let row = slice_of(data, &lay, s, &mut buf);
            let segs = [T::scores(row)];
            let src = ScoresSource::new(&segs);
            for (qi, &k) in ks.iter().enumerate() {
                idx[qi * slices + s] = kth_position(&src, k as u64).map_err(|_| nan_error(op, "input"))?.1;
            }
        }
        Ok(idx)
    } else {
        let per_slice: Vec<Vec<usize>> = (0..slices)
            .into_par_iter()
            .map_init(
                || (RowScratch::default(), Vec::new()),
                |(s, buf), si| {
                    let row = slice_of(data, &lay, si, buf);
                    ks.iter()
                        .map(|&k| match row_select(row, k, None, s) {
                            Ok(Some((_, i))) => Ok(i),
                            _ => Err(nan_error(op, "input")),
                        })
                        .collect::<Result<Vec<usize>>>()
                },
            )
            .collect::<Result<_>>()?;
        let mut idx = vec![0usize; ks.len() * slices];
        for (s, v) in per_slice.into_iter().enumerate() {
            for (qi, i) in v.into_iter().enumerate() {
                idx[qi * slices + s] = i;
            }
        }
        Ok(idx)
    }
}

/// The k-th smallest (1-based, as `torch.kthvalue`) of every slice along `dim` (`None`: of the
/// whole tensor). Returns values, their indices along `dim` (flat indices for `None`) and the
/// output shape. Among equal values the lowest index is the smallest.
pub fn kthvalue<T: Float>(
    data: &[T],
    shape: &[usize],
    dim: Option<i64>,
    k: i64,
) -> Result<(Vec<T>, Vec<i64>, Vec<usize>)> {
    const OP: &str = "kthvalue";
    check_numel(OP, "input", data.len(), shape)?;
    let lay = Layout::new(OP, shape, dim)?;
    if k < 1 || k as u64 > lay.len as u64 {
        return Err(Error::arg(
            OP,
            "k",
            k,
            format!("in [1, {}] (the size of the selected dimension)", lay.len),
        ));
    }
    let out_shape = reduced_shape(shape, dim.map(|d| normalize_dim(OP, shape, d)).transpose()?);
    let idx = install(|| slice_order_stats(OP, data, lay, &[k as usize]))?;
    let values = idx.iter().enumerate().map(|(s, &i)| data[lay.offset(s, i)]).collect();
    Ok((values, idx.into_iter().map(|i| i as i64).collect(), out_shape))
}

/// The positions and weight of quantile `q` of `n` sorted values (torch's "linear" rule):
/// `pos = q (n - 1)`, lower index `floor(pos)`, upper `ceil(pos)`, weight `pos - floor(pos)`.
pub fn quantile_position(q: f64, n: usize) -> (usize, usize, f64) {
    let pos = q * (n - 1) as f64;
    let lo = pos.floor();
    let hi = pos.ceil().min((n - 1) as f64);
    (lo as usize, hi as usize, pos - lo)
}

/// Quantile values with their lower and upper order-statistic indices and the reduced shape.
pub type Quantiles<T> = (Vec<T>, Vec<i64>, Vec<i64>, Vec<usize>);

/// Quantiles `qs` of every slice along `dim` (`None`: the whole tensor) with linear
/// interpolation (torch.quantile's default), interpolated in float64. Returns values laid out
/// `(len(qs), *reduced_shape)`, the lower and upper order-statistic indices of each, and the
/// reduced shape.
pub fn quantile<T: Float>(data: &[T], shape: &[usize], dim: Option<i64>, qs: &[f64]) -> Result<Quantiles<T>> {
    const OP: &str = "quantile";
    check_numel(OP, "input", data.len(), shape)?;
    let lay = Layout::new(OP, shape, dim)?;
    for &q in qs {
        check_fraction(OP, "q", q)?;
    }
    if lay.len == 0 {
        return Err(Error::shape(OP, "input", shape, "a non-empty selected dimension"));
    }
    let out_shape = reduced_shape(shape, dim.map(|d| normalize_dim(OP, shape, d)).transpose()?);
    let mut ks = Vec::with_capacity(2 * qs.len());
    for &q in qs {
        let (lo, hi, _) = quantile_position(q, lay.len);
        ks.push(lo + 1);
        ks.push(hi + 1);
    }
    let idx = install(|| slice_order_stats(OP, data, lay, &ks))?;
    let slices = lay.slices();
    let (mut vals, mut los, mut his) = (vec![], vec![], vec![]);
    for (qi, &q) in qs.iter().enumerate() {
        let w = quantile_position(q, lay.len).2;
        for s in 0..slices {
            let (lo, hi) = (idx[2 * qi * slices + s], idx[(2 * qi + 1) * slices + s]);
            let (a, b) = (data[lay.offset(s, lo)].to_f64(), data[lay.offset(s, hi)].to_f64());
            vals.push(T::from_f64(a + (b - a) * w));
            los.push(lo as i64);
            his.push(hi as i64);
        }
    }
    Ok((vals, los, his, out_shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plainly correct reference: sort (key, index) pairs.
    fn reference_mask(row: &[f32], k: usize) -> Vec<bool> {
        let mut order: Vec<(u64, usize)> = row.iter().enumerate().map(|(i, &x)| (x.key(), i)).collect();
        order.sort();
        let mut m = vec![true; row.len()];
        for &(_, i) in &order[..k] {
            m[i] = false;
        }
        m
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    fn data(n: usize, seed: u64, ties: bool) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                let v = lcg(&mut s);
                if ties {
                    (v * 8.0).round() / 8.0
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn row_select_matches_sorting_with_ties() {
        let mut s = RowScratch::default();
        for &(n, ties) in &[(1usize, false), (7, true), (100, false), (1000, true), (5000, false)] {
            let row = data(n, n as u64, ties);
            for k in [0, 1, n / 3, n / 2, n] {
                let mut m = vec![false; n];
                row_select(&row, k, Some(&mut m), &mut s).unwrap();
                assert_eq!(m, reference_mask(&row, k), "n={n} k={k}");
            }
        }
    }

    #[test]
    fn radix_select_matches_sorting_across_segments() {
        let a = data(70_000, 1, true);
        let b: Vec<f64> = data(1000, 2, true).iter().map(|&x| x as f64).collect();
        let c: Vec<half::bf16> = data(3, 3, false).iter().map(|&x| half::bf16::from_f32(x)).collect();
        let segs = [Scores::F32(&a), Scores::F64(&b), Scores::BF16(&c)];
        let all: Vec<f32> = a
            .iter()
            .copied()
            .chain(b.iter().map(|&x| x as f32))
            .chain(c.iter().map(|x| x.to_f32()))
            .collect();
        for s in [0.0, 0.25, 0.5, 0.999, 1.0] {
            let k = prune_count(s, all.len());
            let got: Vec<bool> = global_topk_masks(&segs, s).unwrap().concat();
            assert_eq!(got, reference_mask(&all, k), "sparsity {s}");
        }
    }

    #[test]
    fn big_and_small_paths_agree_and_thread_count_does_not_matter() {
        let row = data(BIG_SLICE + 17, 9, true);
        let k = row.len() / 2;
        let small = {
            let mut m = vec![false; row.len()];
            row_select(&row, k, Some(&mut m), &mut RowScratch::default()).unwrap();
            m
        };
        crate::parallel::set_num_threads(1);
        let big1 = topk_mask(&row, &[row.len()], None, 0.5).unwrap();
        crate::parallel::set_num_threads(3);
        let big3 = topk_mask(&row, &[row.len()], None, 0.5).unwrap();
        crate::parallel::set_num_threads(0);
        assert_eq!(small, big1);
        assert_eq!(big1, big3);
    }

    #[test]
    fn dims_and_strided_slices() {
        let x = data(4 * 6 * 5, 4, true);
        let m = topk_mask(&x, &[4, 6, 5], Some(1), 0.5).unwrap();
        for o in 0..4 {
            for i in 0..5 {
                let col: Vec<f32> = (0..6).map(|j| x[(o * 6 + j) * 5 + i]).collect();
                let want = reference_mask(&col, 3);
                let got: Vec<bool> = (0..6).map(|j| m[(o * 6 + j) * 5 + i]).collect();
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn kth_and_quantile() {
        let x = data(1001, 5, true);
        let mut sorted = x.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (v, i, shape) = kthvalue(&x, &[1001], None, 500).unwrap();
        assert_eq!(shape, Vec::<usize>::new());
        assert_eq!(v[0], sorted[499]);
        assert_eq!(x[i[0] as usize], v[0]);
        let (q, _, _, _) = quantile(&x, &[1001], None, &[0.0, 0.5, 1.0]).unwrap();
        assert_eq!(q, vec![sorted[0], sorted[500], sorted[1000]]);
        assert!(kthvalue(&x, &[1001], None, 0).is_err());
        assert!(quantile(&x, &[1001], None, &[1.5]).is_err());
    }

    #[test]
    fn nan_is_rejected() {
        let x = [1.0f32, f32::NAN, 2.0];
        assert_eq!(
            topk_mask(&x, &[3], None, 0.5).unwrap_err(),
            Error::NonFinite { op: "topk_mask", arg: "scores" }
        );
        let segs = [Scores::F32(&x)];
        assert!(global_topk_masks(&segs, 0.0).is_err());
    }

    #[test]
    fn empty_inputs() {
        assert_eq!(topk_mask::<f32>(&[], &[0, 3], Some(1), 0.5).unwrap(), Vec::<bool>::new());
        assert_eq!(global_topk_masks(&[], 0.5).unwrap(), Vec::<Vec<bool>>::new());
    }
}
