//! Pruning kernels: Wanda scores and masks, exact score thresholds over many tensors (global
//! magnitude / Wanda without materializing the scores), in-place threshold pruning, the OWL
//! outlier count, and the batched two-sample Kolmogorov–Smirnov test of KS-Lottery.
//!
//! Scores. The score of weight `w_ij` of a `(rows, cols)` matrix is `|w_ij| * sqrt(s_j)` where `s`
//! is a per-column statistic (Wanda's running mean of squared activation norms, float32) or
//! `|w_ij|` when there is none (magnitude). It is computed in float32 for float32, float16 and
//! bfloat16 weights (`f32(|w|) * sqrtf(s_j)`: the value torch's type promotion gives) and in
//! float64 for float64 weights (`|w| * f64(sqrtf(s_j))`). A weight stored transposed (`(cols,
//! rows)`, as Hugging Face's `Conv1D`) is scored in place with the statistic indexed by row.
//!
//! Selection reuses the crate's exact machinery ([`crate::select`], [`crate::mask`]): ranking by
//! `(score, position)` ascending, exact counts, NaN rejected, results independent of threads.

use crate::dtype::{key32, key64, Float, Scores};
use crate::error::{check_fraction, check_numel, fmt_shape, try_zeroed, Error, Result};
use crate::parallel::install;
use crate::select::{make_items, prune_count, row_select, select_threshold, Item, KeySource, RowScratch};
use crate::with_scores;
use rayon::prelude::*;

/// Positions per parallel work item of the element-wise passes.
const CHUNK: usize = 1 << 16;

fn nan_err(op: &'static str, arg: &'static str) -> Error {
    Error::NonFinite { op, arg }
}

/// Checks a per-column statistic (finite, `>= 0`) and returns its square roots in float32.
pub fn sqrt_stat(op: &'static str, stat: &[f32], expected: usize) -> Result<Vec<f32>> {
    if stat.len() != expected {
        return Err(Error::shape(
            op,
            "stat",
            &[stat.len()],
            format!("({expected},): one value per input column"),
        ));
    }
    if let Some(bad) = stat.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
        return Err(Error::arg(
            op,
            "stat",
            format!("an entry {bad}"),
            "finite and >= 0 (a mean of squared norms)",
        ));
    }
    Ok(stat.iter().map(|v| v.sqrt()).collect())
}

/// The score of one element as a float64 value (exact: a float32 score widens exactly).
#[inline(always)]
fn score_f64<T: Float>(x: T, s: f32) -> f64 {
    if T::WIDE {
        x.to_f64().abs() * s as f64
    } else {
        (x.to_f32().abs() * s) as f64
    }
}

/// The order key of one element's score in the width `wide` asks for.
#[inline(always)]
fn score_key<T: Float>(x: T, s: f32, wide: bool) -> u64 {
    if T::WIDE {
        key64(x.to_f64().abs() * s as f64)
    } else {
        let v = x.to_f32().abs() * s;
        if wide {
            key64(v as f64)
        } else {
            key32(v)
        }
    }
}

/// The value a key stands for (inverse of `key32` / `key64`; `-0.0` comes back as `+0.0`).
fn key_value(key: u64, wide: bool) -> f64 {
    if wide {
        let b = if key & (1 << 63) != 0 { key & !(1u64 << 63) } else { !key };
        f64::from_bits(b)
    } else {
        let k = key as u32;
        let b = if k & 0x8000_0000 != 0 { k & 0x7fff_ffff } else { !k };
        f32::from_bits(b) as f64
    }
}

/// One weight tensor seen as a `(rows, cols)` matrix with an optional per-column statistic.
#[derive(Clone, Debug)]
pub struct ScoreSeg<'a> {
    pub w: Scores<'a>,
    /// Length of a stored row (the last dimension of the buffer).
    pub cols: usize,
    /// `sqrt(stat)`, one per input column.
    pub scale: Option<Vec<f32>>,
    /// The buffer is stored `(in, out)`: the statistic is indexed by the stored row.
    pub transposed: bool,
}

impl<'a> ScoreSeg<'a> {
    /// Validates a segment of `shape` (>= 1-D; treated as `(prod(shape[:-1]), shape[-1])`).
    pub fn new(
        op: &'static str,
        w: Scores<'a>,
        shape: &[usize],
        stat: Option<&[f32]>,
        transposed: bool,
    ) -> Result<Self> {
        check_numel(op, "weight", w.len(), shape)?;
        if shape.is_empty() {
            return Err(Error::shape(op, "weight", shape, "at least one dimension"));
        }
        let cols = shape[shape.len() - 1];
        let rows = w.len().checked_div(cols).unwrap_or(0);
        let scale = match stat {
            None => None,
            Some(s) => {
                if shape.len() != 2 {
                    return Err(Error::shape(op, "weight", shape, "a 2-D matrix when a statistic is given"));
                }
                Some(sqrt_stat(op, s, if transposed { rows } else { cols })?)
            }
        };
        Ok(ScoreSeg { w, cols, scale, transposed })
    }

    fn len(&self) -> usize {
        self.w.len()
    }

    /// Calls `f(position, key)` for the elements `start..end`; returns whether a NaN score was seen.
    #[inline]
    fn visit_keys<F: FnMut(usize, u64)>(&self, start: usize, end: usize, wide: bool, mut f: F) -> bool {
        with_scores!(&self.w, w => {
            let mut nan = false;
            match &self.scale {
                None => {
                    for (i, &x) in w[start..end].iter().enumerate() {
                        if x.is_nan() {
                            nan = true;
                        } else {
                            f(start + i, score_key(x, 1.0, wide));
                        }
                    }
                }
                Some(sc) => {
                    for_each_scale(start, end, self.cols, sc, self.transposed, |p, s| {
                        let x = w[p];
                        if score_f64(x, s).is_nan() {
                            nan = true;
                        } else {
                            f(p, score_key(x, s, wide));
                        }
                    });
                }
            }
            nan
        })
    }
}

/// Calls `f(position, scale)` for the positions `start..end` of a `(rows, cols)` buffer whose
/// scale is indexed by column (or by row when `transposed`).
#[inline(always)]
fn for_each_scale(
    start: usize,
    end: usize,
    cols: usize,
    scale: &[f32],
    transposed: bool,
    mut f: impl FnMut(usize, f32),
) {
    let mut p = start;
    while p < end {
        let row = p / cols;
        let col = p % cols;
        let stop = end.min((row + 1) * cols);
        if transposed {
            let s = scale[row];
            (p..stop).for_each(|q| f(q, s));
        } else {
            (p..stop).zip(&scale[col..col + (stop - p)]).for_each(|(q, &s)| f(q, s));
        }
        p = stop;
    }
}

/// Several score segments as one key sequence for the radix select.
struct SegSource<'s, 'a> {
    segs: &'s [ScoreSeg<'a>],
    wide: bool,
    items: Vec<Item>,
}

impl KeySource for SegSource<'_, '_> {
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
    fn visit<F: FnMut(usize, u64)>(&self, it: &Item, f: F) -> bool {
        self.segs[it.seg].visit_keys(it.start, it.end, self.wide, f)
    }
}

/// An exact global threshold: every score below `value` is pruned, and the first `ties` scores
/// equal to it (in segment order, then flat position). `value = -inf` prunes nothing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Threshold {
    pub value: f64,
    pub ties: u64,
}

/// The threshold that prunes exactly `floor(sparsity * total)` of the scores of all segments
/// together. Never materializes the scores: the extra memory is the radix select's histograms.
pub fn score_threshold(segs: &[ScoreSeg<'_>], sparsity: f64) -> Result<Threshold> {
    const OP: &str = "score_threshold";
    check_fraction(OP, "sparsity", sparsity)?;
    let total: u64 = segs.iter().map(|s| s.len() as u64).sum();
    let k = ((sparsity * total as f64).floor() as u64).min(total);
    let wide = segs.iter().any(|s| s.w.is_wide());
    let src = SegSource { segs, wide, items: make_items(segs.iter().map(|s| s.len())) };
    install(|| {
        if k == 0 {
            let nan = src.items.par_iter().any(|it| src.visit(it, |_, _| {}));
            return if nan {
                Err(nan_err(OP, "weight"))
            } else {
                Ok(Threshold { value: f64::NEG_INFINITY, ties: 0 })
            };
        }
        let t = select_threshold(&src, k).map_err(|_| nan_err(OP, "weight"))?;
        Ok(Threshold { value: key_value(t.key, wide), ties: k - t.below })
    })
}

/// Pass 1 of applying a threshold to one segment: checks for NaN and returns, per chunk of
/// `CHUNK` positions, how many scores equal the threshold before it (the tie ranks), and the
/// ties this segment consumes.
fn tie_ranks(op: &'static str, seg: &ScoreSeg<'_>, thr: Threshold) -> Result<(Vec<u64>, u64)> {
    let n = seg.len();
    let counts: Vec<(bool, u64)> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut eq = 0u64;
            let nan =
                visit_values(seg, c * CHUNK, ((c + 1) * CHUNK).min(n), |_, v| eq += (v == thr.value) as u64);
            (nan, eq)
        })
        .collect();
    if counts.iter().any(|c| c.0) {
        return Err(nan_err(op, "weight"));
    }
    let mut before = Vec::with_capacity(counts.len());
    let mut acc = 0u64;
    for c in &counts {
        before.push(acc);
        acc += c.1;
    }
    Ok((before, acc.min(thr.ties)))
}

/// Whether a score is pruned, given how many equal scores came before it (updated here).
#[inline(always)]
fn pruned(v: f64, thr: Threshold, seen: &mut u64) -> bool {
    if v == thr.value {
        *seen += 1;
        *seen <= thr.ties
    } else {
        v < thr.value
    }
}

/// Calls `f(position, score)` for `start..end` (scores as float64); returns whether NaN was seen.
#[inline]
fn visit_values<F: FnMut(usize, f64)>(seg: &ScoreSeg<'_>, start: usize, end: usize, mut f: F) -> bool {
    with_scores!(&seg.w, w => {
        let mut nan = false;
        match &seg.scale {
            None => {
                for (i, &x) in w[start..end].iter().enumerate() {
                    let v = score_f64(x, 1.0);
                    nan |= v.is_nan();
                    f(start + i, v);
                }
            }
            Some(sc) => for_each_scale(start, end, seg.cols, sc, seg.transposed, |p, s| {
                let v = score_f64(w[p], s);
                nan |= v.is_nan();
                f(p, v);
            }),
        }
        nan
    })
}

/// The keep-mask of one segment under a global threshold, and the ties it consumed (subtract
/// them from `thr.ties` before the next segment).
pub fn threshold_mask(seg: &ScoreSeg<'_>, thr: Threshold) -> Result<(Vec<bool>, u64)> {
    const OP: &str = "threshold_mask";
    let mut out: Vec<bool> = try_zeroed(OP, seg.len())?;
    let used = install(|| -> Result<u64> {
        let (before, used) = tie_ranks(OP, seg, thr)?;
        out.par_chunks_mut(CHUNK).zip(before.par_iter()).enumerate().for_each(|(c, (o, &r0))| {
            let mut seen = r0;
            let a = c * CHUNK;
            visit_values(seg, a, a + o.len(), |p, v| o[p - a] = !pruned(v, thr, &mut seen));
        });
        Ok(used)
    })?;
    Ok((out, used))
}

/// Zeroes, in place, the entries of `w` (of `shape`) that a global threshold prunes. Returns
/// `(pruned, ties used)`. Nothing is written when a score is NaN.
pub fn threshold_prune_<T: Float>(
    w: &mut [T],
    shape: &[usize],
    stat: Option<&[f32]>,
    transposed: bool,
    thr: Threshold,
) -> Result<(u64, u64)> {
    const OP: &str = "threshold_prune_";
    let (before, used, scale, cols) = {
        let seg = ScoreSeg::new(OP, T::scores(w), shape, stat, transposed)?;
        let (before, used) = install(|| tie_ranks(OP, &seg, thr))?;
        (before, used, seg.scale, seg.cols)
    };
    let zero = T::from_f64(0.0);
    let count = install(|| {
        w.par_chunks_mut(CHUNK)
            .zip(before.par_iter())
            .enumerate()
            .map(|(c, (chunk, &r0))| {
                let a = c * CHUNK;
                let len = chunk.len();
                let mut seen = r0;
                let mut k = 0u64;
                let mut apply = |i: usize, s: f32| {
                    if pruned(score_f64(chunk[i], s), thr, &mut seen) {
                        chunk[i] = zero;
                        k += 1;
                    }
                };
                match &scale {
                    None => (0..len).for_each(|i| apply(i, 1.0)),
                    Some(sc) => for_each_scale(a, a + len, cols, sc, transposed, |p, s| apply(p - a, s)),
                }
                k
            })
            .sum::<u64>()
    });
    Ok((count, used))
}

/// Per-row scores: `(rows, cols)` of `|w| * sqrt(stat_j)`, in float32 (float64 for float64).
pub enum OwnedScores {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

fn check_matrix(op: &'static str, len: usize, shape: &[usize]) -> Result<(usize, usize)> {
    check_numel(op, "weight", len, shape)?;
    if shape.len() != 2 {
        return Err(Error::shape(op, "weight", shape, "a 2-D (out_features, in_features) matrix"));
    }
    Ok((shape[0], shape[1]))
}

fn fill_scores<T: Float, S: Copy + Send>(
    w: &[T],
    cols: usize,
    scale: &Option<Vec<f32>>,
    out: &mut [S],
    conv: impl Fn(f64) -> S + Sync,
) {
    if cols == 0 {
        return;
    }
    out.par_chunks_mut(cols).zip(w.par_chunks(cols)).for_each(|(o, r)| match scale {
        None => o.iter_mut().zip(r).for_each(|(o, &x)| *o = conv(score_f64(x, 1.0))),
        Some(sc) => o.iter_mut().zip(r).zip(sc).for_each(|((o, &x), &s)| *o = conv(score_f64(x, s))),
    });
}

/// Wanda scores `|W_ij| * sqrt(stat_j)` of a `(out, in)` weight (`stat = None`: `|W|`).
pub fn wanda_scores<T: Float>(w: &[T], shape: &[usize], stat: Option<&[f32]>) -> Result<OwnedScores> {
    const OP: &str = "wanda_scores";
    let (_, cols) = check_matrix(OP, w.len(), shape)?;
    let scale = stat.map(|s| sqrt_stat(OP, s, cols)).transpose()?;
    install(|| {
        if T::WIDE {
            let mut out: Vec<f64> = try_zeroed(OP, w.len())?;
            fill_scores(w, cols, &scale, &mut out, |v| v);
            Ok(OwnedScores::F64(out))
        } else {
            let mut out: Vec<f32> = try_zeroed(OP, w.len())?;
            fill_scores(w, cols, &scale, &mut out, |v| v as f32);
            Ok(OwnedScores::F32(out))
        }
    })
}

/// Wanda's mask of a `(out, in)` weight: inside every output row, exactly
/// `floor(sparsity * in)` lowest scores pruned (`n = m = 0`), or the `n` largest scores of
/// every `m` consecutive inputs kept (N:M; `sparsity` is then ignored). Scores as in
/// [`wanda_scores`]; the unstructured path never materializes them (one row of scratch per
/// thread).
pub fn wanda_mask<T: Float>(
    w: &[T],
    shape: &[usize],
    stat: Option<&[f32]>,
    sparsity: f64,
    n: i64,
    m: i64,
) -> Result<Vec<bool>> {
    const OP: &str = "wanda_mask";
    let (_, cols) = check_matrix(OP, w.len(), shape)?;
    let scale = stat.map(|s| sqrt_stat(OP, s, cols)).transpose()?;
    if n != 0 || m != 0 {
        let scores = wanda_scores(w, shape, stat)?;
        return match scores {
            OwnedScores::F32(s) => crate::mask::nm_mask(&s, shape, -1, n, m),
            OwnedScores::F64(s) => crate::mask::nm_mask(&s, shape, -1, n, m),
        }
        .map_err(|e| match e {
            Error::NonFinite { .. } => nan_err(OP, "weight"),
            Error::Shape { expected, .. } => {
                Error::Shape { op: OP, arg: "weight", shape: fmt_shape(shape), expected }
            }
            Error::InvalidArgument { arg, value, expected, .. } => {
                Error::InvalidArgument { op: OP, arg, value, expected }
            }
            other => other,
        });
    }
    check_fraction(OP, "sparsity", sparsity)?;
    let k = prune_count(sparsity, cols);
    let mut out: Vec<bool> = try_zeroed(OP, w.len())?;
    if cols == 0 || w.is_empty() {
        return Ok(out);
    }
    install(|| {
        out.par_chunks_mut(cols).zip(w.par_chunks(cols)).try_for_each_init(
            || (RowScratch::default(), Vec::<f32>::new(), Vec::<f64>::new()),
            |(s, b32, b64), (o, r)| {
                let res = if T::WIDE {
                    b64.clear();
                    match &scale {
                        None => b64.extend(r.iter().map(|&x| score_f64(x, 1.0))),
                        Some(sc) => b64.extend(r.iter().zip(sc).map(|(&x, &c)| score_f64(x, c))),
                    }
                    row_select(b64, k, Some(o), s)
                } else {
                    b32.clear();
                    match &scale {
                        None => b32.extend(r.iter().map(|&x| x.to_f32().abs())),
                        Some(sc) => b32.extend(r.iter().zip(sc).map(|(&x, &c)| x.to_f32().abs() * c)),
                    }
                    row_select(b32, k, Some(o), s)
                };
                res.map(|_| ()).map_err(|_| nan_err(OP, "weight"))
            },
        )
    })?;
    Ok(out)
}

/// OWL's outlier count over a group of layers: the number of scores strictly greater than
/// `m * mean(score)` (mean over all elements of all segments, accumulated in float64), and the
/// number of elements.
pub fn outlier_count(segs: &[ScoreSeg<'_>], m: f64) -> Result<(u64, u64)> {
    const OP: &str = "outlier_count";
    if !m.is_finite() || m < 0.0 {
        return Err(Error::arg(OP, "m", m, "a finite number >= 0"));
    }
    let items = make_items(segs.iter().map(|s| s.len()));
    let total: u64 = segs.iter().map(|s| s.len() as u64).sum();
    if total == 0 {
        return Ok((0, 0));
    }
    install(|| {
        // Per-item sums in a fixed order: the mean does not depend on the thread count.
        let sums: Vec<(f64, bool)> = items
            .par_iter()
            .map(|it| {
                let mut acc = 0.0f64;
                let nan = visit_values(&segs[it.seg], it.start, it.end, |_, v| acc += v);
                (acc, nan)
            })
            .collect();
        if sums.iter().any(|s| s.1) {
            return Err(nan_err(OP, "weight"));
        }
        let mean = sums.iter().map(|s| s.0).sum::<f64>() / total as f64;
        let thr = m * mean;
        let count: u64 = items
            .par_iter()
            .map(|it| {
                let mut c = 0u64;
                visit_values(&segs[it.seg], it.start, it.end, |_, v| c += (v > thr) as u64);
                c
            })
            .sum();
        Ok((count, total))
    })
}

// ---------------------------------------------------------------------------------------------
// The two-sample Kolmogorov–Smirnov test.

/// How the p-value of the two-sample KS test is computed (as `scipy.stats.ks_2samp`'s `method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KsMethod {
    /// Exact when both samples have at most 10000 values, else asymptotic.
    Auto,
    /// The exact distribution (falls back to asymptotic when it cannot be computed).
    Exact,
    /// The distribution of the one-sample statistic at `n = round(n1 n2 / (n1 + n2))`.
    Asymp,
}

impl KsMethod {
    pub fn parse(op: &'static str, s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(KsMethod::Auto),
            "exact" => Ok(KsMethod::Exact),
            "asymp" => Ok(KsMethod::Asymp),
            _ => Err(Error::arg(op, "method", format!("{s:?}"), "\"auto\", \"exact\" or \"asymp\"")),
        }
    }
}

const MAX_AUTO_N: usize = 10_000;

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The two-sided KS statistic of two sorted key sequences (equal keys are equal values), as
/// scipy computes it: the largest of `max(cdf1 - cdf2)` and `max(cdf2 - cdf1)` over all data
/// points, each difference `i / n1 - j / n2` in float64.
pub fn ks_statistic_sorted(a: &[u64], b: &[u64]) -> f64 {
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j) = (0usize, 0usize);
    let (mut max_d, mut min_d) = (f64::NEG_INFINITY, f64::INFINITY);
    while i < a.len() || j < b.len() {
        let v = match (a.get(i), b.get(j)) {
            (Some(&x), Some(&y)) => x.min(y),
            (Some(&x), None) => x,
            (None, Some(&y)) => y,
            (None, None) => break,
        };
        while i < a.len() && a[i] == v {
            i += 1;
        }
        while j < b.len() && b[j] == v {
            j += 1;
        }
        // scipy evaluates the difference at every data point; equal points give equal values.
        let d = i as f64 / n1 - j as f64 / n2;
        max_d = max_d.max(d);
        min_d = min_d.min(d);
    }
    let min_s = (-min_d).clamp(0.0, 1.0);
    if min_s > max_d {
        min_s
    } else {
        max_d
    }
}

/// `P(D_{n,n} >= h / n)` for two samples of equal size `n` (the alternating sum in Horner form).
pub fn prob_outside_square(n: u64, h: u64) -> f64 {
    let mut p = 0.0f64;
    let mut k = (n / h) as i64;
    let (n, h) = (n as i64, h as i64);
    while k >= 0 {
        let mut p1 = 1.0f64;
        for j in 0..h {
            p1 = (n - k * h - j) as f64 * p1 / (n + k * h + j + 1) as f64;
        }
        p = p1 * (1.0 - p);
        k -= 1;
    }
    2.0 * p
}

/// The proportion of monotone lattice paths from `(0, 0)` to `(m, n)` that leave the band
/// `|x/m - y/n| < h / lcm(m, n)`: the exact two-sided p-value for unequal sizes. Computed as the
/// probability that a uniformly random path has left the band (Viehmann's recursion), column by
/// column over the band only.
pub fn prob_outside_band(m: u64, n: u64, g: u64, h: u64) -> f64 {
    let (m, n) = if m < n { (n, m) } else { (m, n) };
    let (mg, ng) = (m / g, n / g);
    let (mg_f, h_f) = (mg as f64, h as f64);
    // Column 0: y in the band has not left (0), everything else has (1).
    let mut minj = 0usize;
    let mut maxj = ((h_f / mg_f).ceil() as usize).min(n as usize + 1);
    let mut prev = vec![1.0f64; n as usize + 1];
    let mut cur = vec![1.0f64; n as usize + 1];
    prev[minj..maxj].iter_mut().for_each(|v| *v = 0.0);
    let (mut pmin, mut pmax) = (minj, maxj);
    for i in 1..=m {
        let lo = (((ng * i) as f64 - h_f) / mg_f).floor() + 1.0;
        minj = if lo < 0.0 { 0 } else { (lo as usize).min(n as usize) };
        maxj = ((((ng * i) as f64 + h_f) / mg_f).ceil() as usize).min(n as usize + 1);
        if maxj <= minj {
            return 1.0;
        }
        let mut val = if minj == 0 { 0.0 } else { 1.0 };
        let fi = i as f64;
        for j in minj..maxj {
            let left = if j >= pmin && j < pmax { prev[j] } else { 1.0 };
            val = (left * fi + val * j as f64) / (fi + j as f64);
            cur[j] = val;
        }
        // Reset the previous band to "left" (1) outside the new band, then swap.
        for v in &mut prev[pmin..pmax] {
            *v = 1.0;
        }
        std::mem::swap(&mut prev, &mut cur);
        (pmin, pmax) = (minj, maxj);
    }
    let last = n as usize;
    if last >= pmin && last < pmax {
        prev[last]
    } else {
        1.0
    }
}

/// The exact two-sided p-value, as scipy's attempt: `(success, rounded statistic, p)`.
fn exact_2samp(n1: u64, n2: u64, g: u64, d: f64) -> (bool, f64, f64) {
    let lcm = (n1 / g) * n2;
    let h = (d * lcm as f64).round_ties_even();
    let d = h / lcm as f64;
    if h == 0.0 {
        return (true, d, 1.0);
    }
    let h = h as u64;
    let p = if n1 == n2 { prob_outside_square(n1, h) } else { prob_outside_band(n1, n2, g, h) };
    if !(0.0..=1.0).contains(&p) {
        return (false, d, p);
    }
    (true, d, p)
}

/// Statistic and p-value of the two-sided two-sample test for sample sizes `n1`, `n2` and the
/// raw statistic `d`, following `scipy.stats.ks_2samp` (method selection, rounding of the
/// statistic to a multiple of `1 / lcm` on the exact path, fallback to asymptotic).
pub fn ks_2samp_pvalue(n1: u64, n2: u64, d: f64, method: KsMethod) -> (f64, f64) {
    let g = gcd(n1, n2);
    let (n1g, n2g) = (n1 / g, n2 / g);
    let mut exact = match method {
        KsMethod::Auto => n1.max(n2) as usize <= MAX_AUTO_N,
        KsMethod::Exact => (n1g as f64) < i32::MAX as f64 / n2g as f64,
        KsMethod::Asymp => false,
    };
    let mut d = d;
    let mut p = f64::NEG_INFINITY;
    if exact {
        let (ok, dd, pp) = exact_2samp(n1, n2, g, d);
        d = dd;
        p = pp;
        exact = ok;
    }
    if !exact {
        let (big, small) = if n1 >= n2 { (n1 as f64, n2 as f64) } else { (n2 as f64, n1 as f64) };
        let en = big * small / (big + small);
        p = kolmogn_sf(en.round_ties_even() as u64, d);
    }
    (d, p.clamp(0.0, 1.0))
}

/// Batched two-sample KS test: row `r` of `a` (`rows x n1`) against row `r` of `b`
/// (`rows x n2`). Returns the statistics and p-values (float64), equal to
/// `scipy.stats.ks_2samp(a[r], b[r], method=...)`.
pub fn ks_2samp<A: Float, B: Float>(
    a: &[A],
    n1: usize,
    b: &[B],
    n2: usize,
    rows: usize,
    method: KsMethod,
) -> Result<(Vec<f64>, Vec<f64>)> {
    const OP: &str = "ks_2samp";
    check_numel(OP, "before", a.len(), &[rows, n1])?;
    check_numel(OP, "after", b.len(), &[rows, n2])?;
    if rows > 0 && (n1 == 0 || n2 == 0) {
        return Err(Error::shape(
            OP,
            if n1 == 0 { "before" } else { "after" },
            &[rows, n1.min(n2)],
            "non-empty samples",
        ));
    }
    let wide = A::WIDE || B::WIDE;
    let res: Vec<(f64, f64)> = install(|| {
        (0..rows)
            .into_par_iter()
            .map_init(
                || (Vec::<u64>::new(), Vec::<u64>::new()),
                |(ka, kb), r| {
                    let ra = &a[r * n1..(r + 1) * n1];
                    let rb = &b[r * n2..(r + 1) * n2];
                    if ra.iter().any(|x| x.is_nan()) {
                        return Err(nan_err(OP, "before"));
                    }
                    if rb.iter().any(|x| x.is_nan()) {
                        return Err(nan_err(OP, "after"));
                    }
                    ka.clear();
                    ka.extend(ra.iter().map(|x| x.key_as(wide)));
                    kb.clear();
                    kb.extend(rb.iter().map(|x| x.key_as(wide)));
                    ka.sort_unstable();
                    kb.sort_unstable();
                    let d = ks_statistic_sorted(ka, kb);
                    Ok(ks_2samp_pvalue(n1 as u64, n2 as u64, d, method))
                },
            )
            .collect::<Result<Vec<_>>>()
    })?;
    Ok(res.into_iter().unzip())
}

// ---------------------------------------------------------------------------------------------
// The one-sample two-sided KS distribution (Simard & L'Ecuyer's choice of algorithms, with the
// thresholds scipy's `kstwo` uses), needed by the asymptotic two-sample p-value.

const EP128: f64 = 3.402_823_669_209_385e38; // 2^128
const EM128: f64 = 2.938_735_877_055_719e-39; // 2^-128
const MINLOG: f64 = -7.083_964_185_322_641e2;

/// `log(n! / n^n)` by Stirling's series with `n log n` removed up front.
fn log_nfact_div_npow(n: f64) -> f64 {
    const C: [f64; 8] = [
        -2.955_065_359_477_124e-2,
        6.410_256_410_256_41e-3,
        -1.917_526_917_526_917_5e-3,
        8.417_508_417_508_417e-4,
        -5.952_380_952_380_952e-4,
        7.936_507_936_507_937e-4,
        -2.777_777_777_777_778e-3,
        8.333_333_333_333_333e-2,
    ];
    let rn = 1.0 / n;
    let x = rn / n;
    let poly = C.iter().fold(0.0, |acc, &c| acc * x + c);
    n.ln() / 2.0 - n + (2.0 * std::f64::consts::PI).ln() / 2.0 + rn * poly
}

/// `x * 2^e` without overflow of the power itself.
fn ldexp(mut x: f64, mut e: i64) -> f64 {
    while e > 512 {
        x *= 2f64.powi(512);
        e -= 512;
    }
    while e < -512 {
        x *= 2f64.powi(-512);
        e += 512;
    }
    x * 2f64.powi(e as i32)
}

fn matmul(a: &[f64], b: &[f64], m: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * m];
    for i in 0..m {
        for k in 0..m {
            let aik = a[i * m + k];
            if aik == 0.0 {
                continue;
            }
            for j in 0..m {
                c[i * m + j] += aik * b[k * m + j];
            }
        }
    }
    c
}

/// `P(D_n <= d)` by Durbin's matrix (Marsaglia, Tsang and Wang's scaling).
fn kolmogn_dmtw(n: u64, d: f64) -> f64 {
    if d >= 1.0 {
        return 1.0;
    }
    let nd = n as f64 * d;
    if nd <= 0.5 {
        return 0.0;
    }
    let k = nd.ceil() as usize;
    let h = k as f64 - nd;
    let m = 2 * k - 1;
    let mut hm = vec![0.0f64; m * m];
    let mut v: Vec<f64> = (1..=m).map(|j| 1.0 - h.powi(j as i32)).collect();
    let mut w = vec![0.0f64; m];
    let mut fac = 1.0f64;
    for j in 1..=m {
        w[j - 1] = fac;
        fac /= j as f64;
        v[j - 1] *= fac;
    }
    let tt = (2.0 * h - 1.0).max(0.0).powi(m as i32) - 2.0 * h.powi(m as i32);
    v[m - 1] = (1.0 + tt) * fac;
    for i in 1..m {
        for r in (i - 1)..m {
            hm[r * m + i] = w[r - (i - 1)];
        }
    }
    for r in 0..m {
        hm[r * m] = v[r];
    }
    for c in 0..m {
        hm[(m - 1) * m + c] = v[m - 1 - c];
    }
    let mut pw = vec![0.0f64; m * m];
    for i in 0..m {
        pw[i * m + i] = 1.0;
    }
    let (mut nn, mut expnt, mut hexp) = (n, 0i64, 0i64);
    while nn > 0 {
        if nn % 2 == 1 {
            pw = matmul(&pw, &hm, m);
            expnt += hexp;
        }
        hm = matmul(&hm, &hm, m);
        hexp *= 2;
        if hm[(k - 1) * m + k - 1].abs() > EP128 {
            hm.iter_mut().for_each(|x| *x /= EP128);
            hexp += 128;
        }
        nn /= 2;
    }
    let mut p = pw[(k - 1) * m + k - 1];
    for i in 1..=n {
        p = i as f64 * p / n as f64;
        if p.abs() < EM128 {
            p *= EP128;
            expnt -= 128;
        }
    }
    if expnt != 0 {
        p = ldexp(p, expnt);
    }
    p.clamp(0.0, 1.0)
}

fn pomeranz_j1j2(i: i64, n: i64, ll: i64, ceilf: i64, roundf: i64) -> (i64, i64) {
    let (j1, j2) = if i == 0 {
        (-ll - ceilf - 1, ll + ceilf - 1)
    } else {
        let (d, r) = ((i + 1) / 2, (i + 1) % 2);
        if r == 0 {
            if d == n + 1 {
                (n - ll - ceilf - 1, n + ll + ceilf - 1)
            } else {
                (d - 1 - ll - roundf - 1, d + ll - 1 + ceilf - 1)
            }
        } else {
            (d - 1 - ll - 1, d + ll + roundf - 1)
        }
    };
    ((j1 + 2).max(0), j2.min(n))
}

/// `P(D_n <= x)` by Pomeranz's recursion.
fn kolmogn_pomeranz(n: u64, x: f64) -> f64 {
    let nn = n as i64;
    let t = n as f64 * x;
    let ll = t.floor() as i64;
    let f = t - ll as f64;
    let g = f.min(1.0 - f);
    let ceilf = (f > 0.0) as i64;
    let roundf = (f > 0.5) as i64;
    let npw = (2 * (ll + 1)) as usize;
    let (mut gp, mut tgp, mut omp) = (vec![1.0f64; npw], vec![1.0f64; npw], vec![1.0f64; npw]);
    let (a, b, c) = (g / n as f64, 2.0 * g / n as f64, (1.0 - 2.0 * g) / n as f64);
    for mm in 1..npw {
        gp[mm] = gp[mm - 1] * a / mm as f64;
        tgp[mm] = tgp[mm - 1] * b / mm as f64;
        omp[mm] = omp[mm - 1] * c / mm as f64;
    }
    let mut v0 = vec![0.0f64; npw];
    let mut v1 = vec![0.0f64; npw];
    v1[0] = 1.0;
    let (mut v0s, mut v1s) = (0i64, 0i64);
    let mut expnt = 0i64;
    let (mut j1, _) = pomeranz_j1j2(0, nn, ll, ceilf, roundf);
    for i in 1..(2 * nn + 2) {
        let k1 = j1;
        std::mem::swap(&mut v0, &mut v1);
        std::mem::swap(&mut v0s, &mut v1s);
        v1.iter_mut().for_each(|v| *v = 0.0);
        let (nj1, j2) = pomeranz_j1j2(i, nn, ll, ceilf, roundf);
        j1 = nj1;
        let pw = if i == 1 || i == 2 * nn + 1 {
            &gp
        } else if i % 2 == 1 {
            &tgp
        } else {
            &omp
        };
        let ln2 = j2 - k1 + 1;
        if ln2 > 0 {
            let ln2 = ln2 as usize;
            let base = (k1 - v0s) as usize;
            let src = &v0[base.min(npw)..(base + ln2).min(npw)];
            let pws = &pw[..ln2.min(npw)];
            let cs = (j1 - k1) as usize;
            let cl = (j2 - j1 + 1).max(0) as usize;
            for (o, slot) in v1.iter_mut().enumerate().take(cl) {
                // the full convolution of src and pws at index cs + o
                let idx = cs + o;
                let mut acc = 0.0;
                for (q, &sv) in src.iter().enumerate().take(idx + 1) {
                    if let Some(&pv) = pws.get(idx - q) {
                        acc += sv * pv;
                    }
                }
                *slot = acc;
            }
            let mx = v1.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if 0.0 < mx && mx < EM128 {
                v1.iter_mut().for_each(|v| *v *= EP128);
                expnt -= 128;
            }
            v1s = v0s + j1 - k1;
        }
    }
    let mut ans = v1[(nn - v1s) as usize];
    for mm in 1..=n {
        if ans.abs() > EP128 {
            ans *= EM128;
            expnt += 128;
        }
        ans *= mm as f64;
    }
    if expnt != 0 {
        ans = ldexp(ans, expnt);
    }
    ans.clamp(0.0, 1.0)
}

/// `P(D_n <= x)` by the Pelz–Good expansion.
fn kolmogn_pelz_good(n: u64, x: f64) -> f64 {
    use std::f64::consts::PI;
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let z = (n as f64).sqrt() * x;
    let (z2, z3, z4, z6) = (z * z, z.powi(3), z.powi(4), z.powi(6));
    let (pi2, pi4, pi6) = (PI * PI, PI.powi(4), PI.powi(6));
    let qlog = -pi2 / 8.0 / z2;
    if qlog < -708.0 {
        return 0.0;
    }
    let q = qlog.exp();
    let (k1a, k1b) = (-z2, pi2 / 4.0);
    let k2a = 6.0 * z6 + 2.0 * z4;
    let k2b = (2.0 * z4 - 5.0 * z2) * pi2 / 4.0;
    let k2c = pi4 * (1.0 - 2.0 * z2) / 16.0;
    let k3d = pi6 * (5.0 - 30.0 * z2) / 64.0;
    let k3c = pi4 * (-60.0 * z2 + 212.0 * z4) / 16.0;
    let k3b = pi2 * (135.0 * z4 - 96.0 * z6) / 4.0;
    let k3a = -30.0 * z6 - 90.0 * z.powi(8);
    let mut kk = [0.0f64; 4];
    let maxk = (16.0 * z / PI).ceil() as i64;
    for k in (1..=maxk).rev() {
        let m = (2 * k - 1) as f64;
        let (m2, m4, m6) = (m * m, m.powi(4), m.powi(6));
        let qp = q.powf(8.0 * k as f64);
        let c = [1.0, k1a + k1b * m2, k2a + k2b * m2 + k2c * m4, k3a + k3b * m2 + k3c * m4 + k3d * m6];
        for (a, cc) in kk.iter_mut().zip(c) {
            *a = *a * qp + cc;
        }
    }
    let s2p = (2.0 * PI).sqrt();
    let den = [z, 6.0 * z4, 72.0 * z.powi(7), 6480.0 * z.powi(10)];
    for (a, d) in kk.iter_mut().zip(den) {
        *a = *a * q * s2p / d;
    }
    let q2 = (-pi2 / 2.0 / z2).exp();
    let s3z = 3f64.sqrt() * z;
    let (mut k2x, mut k3x) = (0.0, 0.0);
    for k in (1..=maxk).rev() {
        let kf = k as f64;
        let ks = kf * kf;
        let qp = q2.powf(ks);
        k2x += ks * qp;
        k3x += (s3z + PI * kf) * (s3z - PI * kf) * ks * qp;
    }
    kk[2] += k2x * pi2 * s2p / (-36.0 * z3);
    kk[3] += k3x * pi2 * s2p / (216.0 * z6);
    let nf = n as f64;
    for (i, a) in kk.iter_mut().enumerate() {
        *a /= nf.powf(i as f64 / 2.0);
    }
    kk.iter().sum()
}

/// `P(D+_n >= x)`: the one-sided (Smirnov) survival function, by the Birnbaum–Tingey sum with
/// terms in log space, or the exact or asymptotic special cases.
pub fn smirnov_sf(n: u64, x: f64) -> f64 {
    if !(0.0..=1.0).contains(&x) || n == 0 {
        return f64::NAN;
    }
    if n == 1 {
        return 1.0 - x;
    }
    if x == 0.0 {
        return 1.0;
    }
    if x == 1.0 {
        return 0.0;
    }
    let nf = n as f64;
    // floor(n x) and its remainder, exactly (two-product).
    let p = nf * x;
    let e = nf.mul_add(x, -p);
    let mut fl = p.floor();
    let mut alpha = (p - fl) + e;
    if alpha < 0.0 {
        fl -= 1.0;
        alpha += 1.0;
    }
    if alpha >= 1.0 {
        fl += 1.0;
        alpha = 0.0;
    }
    let nxfl = fl as u64;
    if nxfl == 0 || (nxfl == 1 && alpha == 0.0) {
        let cdf = x * (1.0 + x).powf(nf - 1.0);
        return (1.0 - cdf).clamp(0.0, 1.0);
    }
    if -2.0 * nf * x * x < MINLOG {
        return 0.0;
    }
    if nxfl >= n - 1 {
        return (1.0 - x).powf(nf).clamp(0.0, 1.0);
    }
    if n > 1_000_000 {
        let logp = -(6.0 * nf * x + 1.0).powi(2) / 18.0 / nf;
        return logp.exp().clamp(0.0, 1.0);
    }
    let mut n1mxfl = n as i64 - nxfl as i64 - if alpha == 0.0 { 0 } else { 1 };
    let mut n1mxceil = n as i64 - nxfl as i64;
    if alpha == 0.0 {
        n1mxfl -= 1;
        n1mxceil += 1;
    }
    let n_upper = n as i64 - n1mxceil + 1;
    let use_upper = (n_upper <= 1 && x < 0.5) || (n >= 10 && n_upper <= 3 && x <= 0.5 / nf.sqrt());
    // Term A_v = C(n, v) (x + v/n)^(v-1) (1 - x - v/n)^(n-v), with its sign.
    let term = |v: i64, logc: f64| -> f64 {
        let vf = v as f64;
        let a = x + vf / nf;
        let b = (nf - vf) / nf - x;
        let mut lg = logc + (vf - 1.0) * a.abs().ln();
        let mut sign = if a < 0.0 && (v - 1) % 2 != 0 { -1.0 } else { 1.0 };
        if n as i64 - v > 0 {
            if b == 0.0 {
                return 0.0;
            }
            lg += (nf - vf) * b.abs().ln();
            if b < 0.0 && (n as i64 - v) % 2 != 0 {
                sign = -sign;
            }
        }
        sign * lg.exp()
    };
    let ln_ratio = |v: i64| ((n as i64 - v) as f64 / (v + 1) as f64).ln();
    let mut sum = 0.0f64;
    let mut comp = 0.0f64; // Kahan compensation
    let mut add = |t: f64, sum: &mut f64| {
        let y = t - comp;
        let s = *sum + y;
        comp = (s - *sum) - y;
        *sum = s;
    };
    if use_upper {
        // cdf = x * sum_{v = n}^{n1mxceil} A_v; log C(n, v) = log C(n, n - v).
        let mut logc = 0.0f64;
        let mut v = n as i64;
        let mut r = 0i64; // C(n, r) with r = n - v
        while v >= n1mxceil {
            let t = term(v, logc);
            add(t, &mut sum);
            logc += ln_ratio(r);
            r += 1;
            v -= 1;
        }
        let cdf = x * sum;
        (1.0 - cdf).clamp(0.0, 1.0)
    } else {
        let terms = n1mxfl + 1;
        let mut logc = 0.0f64;
        let vmid = n as i64 / 2;
        for v in 0..terms {
            let t = term(v, logc);
            add(t, &mut sum);
            if t != 0.0 {
                if 4.0 * (terms - v) as f64 * t.abs() < f64::EPSILON * sum && v != terms - 1 {
                    break;
                }
            } else if v > vmid {
                break;
            }
            logc += ln_ratio(v);
        }
        (x * sum).clamp(0.0, 1.0)
    }
}

/// `P(D_n >= x)`: the survival function of the two-sided one-sample KS statistic (scipy's
/// `kstwo.sf(x, n)`).
pub fn kolmogn_sf(n: u64, x: f64) -> f64 {
    if n == 0 || x.is_nan() {
        return f64::NAN;
    }
    if x >= 1.0 {
        return 0.0;
    }
    if x <= 0.0 {
        return 1.0;
    }
    let nf = n as f64;
    let t = nf * x;
    let clip = |p: f64| p.clamp(0.0, 1.0);
    if t <= 1.0 {
        if t <= 0.5 {
            return 1.0;
        }
        let cdf = if n <= 140 {
            (1..=n).fold(1.0f64, |acc, i| acc * (i as f64 * (1.0 / nf) * (2.0 * t - 1.0)))
        } else {
            (log_nfact_div_npow(nf) + nf * (2.0 * t - 1.0).ln()).exp()
        };
        return clip(1.0 - cdf);
    }
    if t >= nf - 1.0 {
        return clip(2.0 * (1.0 - x).powf(nf));
    }
    if x >= 0.5 {
        return clip(2.0 * smirnov_sf(n, x));
    }
    let nx2 = t * x;
    if n <= 140 {
        if nx2 <= 0.754693 {
            return clip(1.0 - kolmogn_dmtw(n, x));
        }
        if nx2 <= 4.0 {
            return clip(1.0 - kolmogn_pomeranz(n, x));
        }
        return clip(2.0 * smirnov_sf(n, x));
    }
    if nx2 >= 370.0 {
        return 0.0;
    }
    if nx2 >= 2.2 {
        return clip(2.0 * smirnov_sf(n, x));
    }
    let cdf =
        if n <= 100_000 && nf * x.powf(1.5) <= 1.4 { kolmogn_dmtw(n, x) } else { kolmogn_pelz_good(n, x) };
    clip(1.0 - clip(cdf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n).map(|_| lcg(&mut s)).collect()
    }

    /// The plain reference: sort (score, position) pairs.
    fn reference_prune(scores: &[f64], k: usize) -> Vec<bool> {
        let mut order: Vec<(f64, usize)> = scores.iter().copied().zip(0..).collect();
        order.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
        let mut keep = vec![true; scores.len()];
        for &(_, i) in &order[..k] {
            keep[i] = false;
        }
        keep
    }

    #[test]
    fn wanda_mask_matches_sorting_each_row() {
        let (rows, cols) = (7, 33);
        let w = data(rows * cols, 1);
        let stat: Vec<f32> = data(cols, 2).iter().map(|v| v.abs() * 3.0).collect();
        let m = wanda_mask(&w, &[rows, cols], Some(&stat), 0.5, 0, 0).unwrap();
        for r in 0..rows {
            let sc: Vec<f64> = (0..cols).map(|j| (w[r * cols + j].abs() * stat[j].sqrt()) as f64).collect();
            assert_eq!(&m[r * cols..(r + 1) * cols], reference_prune(&sc, cols / 2).as_slice());
        }
        let (s, _) = match wanda_scores(&w, &[rows, cols], Some(&stat)).unwrap() {
            OwnedScores::F32(s) => (s, 0),
            OwnedScores::F64(_) => unreachable!(),
        };
        assert_eq!(s[5], w[5].abs() * stat[5].sqrt());
        // N:M keeps the n largest scores of every m.
        let nm = wanda_mask(&w[..rows * 32], &[rows, 32], Some(&stat[..32]), 0.0, 2, 4).unwrap();
        assert!(nm.chunks(4).all(|g| g.iter().filter(|&&b| b).count() == 2));
        assert!(wanda_mask(&w, &[rows, cols], Some(&stat), 0.0, 2, 4).is_err());
        assert!(wanda_mask(&w, &[rows, cols], Some(&stat[..3]), 0.5, 0, 0).is_err());
        let neg = vec![-1.0f32; cols];
        assert!(wanda_mask(&w, &[rows, cols], Some(&neg), 0.5, 0, 0).is_err());
    }

    #[test]
    fn global_threshold_is_exact_across_segments_and_layouts() {
        let a = data(20 * 30, 3);
        let b: Vec<f64> = data(10 * 4, 4).iter().map(|&x| x as f64).collect();
        let c: Vec<half::bf16> = data(5 * 8, 5).iter().map(|&x| half::bf16::from_f32(x)).collect();
        let sa: Vec<f32> = data(30, 6).iter().map(|v| v.abs()).collect();
        // `c` is stored transposed: (in = 5, out = 8), its statistic indexed by stored row.
        let sc: Vec<f32> = data(5, 7).iter().map(|v| v.abs()).collect();
        let segs = vec![
            ScoreSeg::new("t", Scores::F32(&a), &[20, 30], Some(&sa), false).unwrap(),
            ScoreSeg::new("t", Scores::F64(&b), &[10, 4], None, false).unwrap(),
            ScoreSeg::new("t", Scores::BF16(&c), &[5, 8], Some(&sc), true).unwrap(),
        ];
        let mut all = vec![];
        all.extend((0..a.len()).map(|p| (a[p].abs() * sa[p % 30].sqrt()) as f64));
        all.extend(b.iter().map(|x| x.abs()));
        all.extend((0..c.len()).map(|p| (c[p].to_f32().abs() * sc[p / 8].sqrt()) as f64));
        for s in [0.0, 0.3, 0.5, 1.0] {
            let thr = score_threshold(&segs, s).unwrap();
            let mut got = vec![];
            let mut t = thr;
            for seg in &segs {
                let (m, used) = threshold_mask(seg, t).unwrap();
                t.ties -= used;
                got.extend(m);
            }
            assert_eq!(got, reference_prune(&all, (s * all.len() as f64).floor() as usize), "sparsity {s}");
        }
    }

    #[test]
    fn in_place_prune_with_ties() {
        let mut w: Vec<f32> = (0..40).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
        let orig = w.clone();
        let seg = [ScoreSeg::new("t", Scores::F32(&orig), &[4, 10], None, false).unwrap()];
        let thr = score_threshold(&seg, 0.45).unwrap();
        let (pruned, used) = threshold_prune_(&mut w, &[4, 10], None, false, thr).unwrap();
        assert_eq!(pruned, 18);
        assert_eq!(used, thr.ties);
        let sc: Vec<f64> = orig.iter().map(|x| x.abs() as f64).collect();
        let want = reference_prune(&sc, 18);
        for i in 0..40 {
            assert_eq!(w[i], if want[i] { orig[i] } else { 0.0 });
        }
        let mut bad = vec![1.0f32, f32::NAN];
        assert!(threshold_prune_(&mut bad, &[2], None, false, thr).is_err());
        assert_eq!(bad[0], 1.0, "nothing written when the input holds NaN");
    }

    #[test]
    fn outliers() {
        let w = [1.0f32, 1.0, 1.0, 10.0];
        let seg = [ScoreSeg::new("t", Scores::F32(&w), &[4], None, false).unwrap()];
        assert_eq!(outlier_count(&seg, 2.0).unwrap(), (1, 4)); // mean 3.25
        assert_eq!(outlier_count(&seg, 0.0).unwrap(), (4, 4));
    }

    #[test]
    fn ks_statistic_and_exact_pvalues() {
        // scipy.stats.ks_2samp([1, 2, 3], [4, 5, 6]) -> statistic 1, pvalue 0.1
        let k = |v: &[f32]| v.iter().map(|x| x.key()).collect::<Vec<u64>>();
        let d = ks_statistic_sorted(&k(&[1.0, 2.0, 3.0]), &k(&[4.0, 5.0, 6.0]));
        assert_eq!(d, 1.0);
        let (d, p) = ks_2samp_pvalue(3, 3, d, KsMethod::Auto);
        assert_eq!(d, 1.0);
        assert!((p - 0.1).abs() < 1e-15);
        // scipy.stats.ks_2samp([1, 2, 2, 3], [2, 3, 4]): statistic 5/12, pvalue 0.8857142857142858
        let d = ks_statistic_sorted(&k(&[1.0, 2.0, 2.0, 3.0]), &k(&[2.0, 3.0, 4.0]));
        let (d, p) = ks_2samp_pvalue(4, 3, d, KsMethod::Auto);
        assert!((d - 5.0 / 12.0).abs() < 1e-15);
        assert!((p - 0.885_714_285_714_285_8).abs() < 1e-12, "{p}");
        // The band recursion agrees with the square formula when the sizes are equal.
        for (n, h) in [(10u64, 3u64), (50, 7), (200, 30)] {
            let a = prob_outside_square(n, h);
            let b = prob_outside_band(n, n, n, h);
            assert!((a - b).abs() < 1e-12, "{n} {h}: {a} {b}");
        }
        let (s, p) = ks_2samp(
            &[1.0f32, 2.0, 3.0, 1.0, 2.0, 3.0],
            3,
            &[4.0f64, 5.0, 6.0, 1.0, 2.0, 3.0],
            3,
            2,
            KsMethod::Auto,
        )
        .unwrap();
        assert_eq!(s, vec![1.0, 0.0]);
        assert_eq!(p[1], 1.0);
        assert!(ks_2samp(&[f32::NAN], 1, &[1.0f32], 1, 1, KsMethod::Auto).is_err());
        assert!(KsMethod::parse("t", "fast").is_err());
    }

    #[test]
    fn kolmogorov_distribution_regimes() {
        // Values of scipy.stats.kstwo.sf(x, n), one or more per algorithm and regime.
        let cases = [
            (10u64, 0.274, 0.3715203845434957),
            (10, 0.1, 0.99963712),
            (10, 0.6, 0.0005681672000000003),
            (50, 0.015, 1.0),
            (50, 0.3, 0.00017353260202718738),
            (100, 0.05, 0.9532159710635725),
            (100, 0.12, 0.1033037490181987),
            (100, 0.2, 0.0005551927327988775),
            (1000, 0.03, 0.3226902143914636),
            (1000, 0.05, 0.013012074781090332),
            (1000, 0.08, 5.154189384789824e-06),
            (6144, 0.01, 0.5671581233531284),
            (6144, 0.03, 3.0803848809819005e-05),
            (200_000, 0.002, 0.39995085369038097),
            (200_000, 0.004, 0.003314212822560255),
        ];
        for (n, x, want) in cases {
            let got = kolmogn_sf(n, x);
            assert!((got - want).abs() <= 1e-9 * want.max(1e-300) + 1e-15, "n={n} x={x}: {got} vs {want}");
        }
        assert_eq!(kolmogn_sf(10, 0.01), 1.0);
        assert_eq!(kolmogn_sf(10, 1.0), 0.0);
        // scipy.special.smirnov(n, x)
        for (n, x, want) in [
            (5u64, 0.5, 0.056),
            (100, 0.1, 0.1265906584562817),
            (1000, 0.05, 0.006506037390545166),
            (2_000_000, 0.001, 0.018303432023617325),
            (20, 0.9, 1.0003433227539019e-20),
        ] {
            let got = smirnov_sf(n, x);
            assert!((got - want).abs() <= 1e-9 * want, "smirnov n={n} x={x}: {got} vs {want}");
        }
    }
}
