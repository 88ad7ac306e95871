//! Graphs: CSR construction and normalization, SpMM, segment and scatter reductions.
//!
//! Layout. A graph over `n` nodes is stored by *target*: row `i` of the CSR lists the sources
//! `j` of the edges `j -> i`, where an edge list is PyG's `edge_index` of shape `(2, E)`
//! (`edge_index[0]` = source, `edge_index[1]` = target). [`spmm`] then computes
//! `out[i] = sum_j w_ji x[j]`, PyG's "source to target" message passing, and the degree of
//! [`normalize`] is taken on the target index, as PyG's `gcn_norm` does.
//!
//! Every kernel is deterministic: each output element is reduced by one thread, in a fixed order,
//! so results never depend on the thread count (no float atomics).

use crate::dtype::{bf16, f16, Float};
use crate::error::{try_filled, Error, Result};
use crate::parallel::{install, SyncPtr};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub, SubAssign};

/// Rows per parallel work item of the row-wise kernels.
pub(crate) const ROW_CHUNK: usize = 64;

/// The arithmetic type kernels accumulate in (f32 or f64).
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn of(v: f64) -> Self;
    fn f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn abs(self) -> Self;
    fn nan(self) -> bool;
    /// `max` that propagates NaN from either side.
    #[inline(always)]
    fn max_nan(self, o: Self) -> Self {
        if self.nan() || o > self {
            o
        } else {
            self
        }
    }
    /// The sign, with `sign(0) = 0` (the derivative torch gives `abs` at 0).
    #[inline(always)]
    fn sign(self) -> Self {
        if self > Self::ZERO {
            Self::ONE
        } else if self < Self::ZERO {
            -Self::ONE
        } else {
            Self::ZERO
        }
    }
}

/// `e^x` in f32 by range reduction and a degree-6 polynomial (relative error below 2e-7 on
/// the normal range; `exp(x) = 0` below -104, `inf` above 88.7, NaN stays NaN). Branch-free, so
/// loops of it vectorize, unlike calls into libm.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let xc = x.clamp(-104.0, 88.8);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n as two factors so that n down to -150 (subnormal results) and up to 128 both work
    let n = n as i32;
    let h = n >> 1;
    let a = f32::from_bits(((h + 127) as u32) << 23);
    let b = f32::from_bits(((n - h + 127) as u32) << 23);
    let out = y * a * b;
    if x.is_nan() {
        x
    } else if x > 88.8 {
        f32::INFINITY
    } else {
        out
    }
}

macro_rules! impl_real {
    ($t:ty, $exp:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn of(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn nan(self) -> bool {
                self.is_nan()
            }
        }
    };
}
impl_real!(f32, exp_f32);
impl_real!(f64, f64::exp);

/// A tensor element with the type it is accumulated in: f32 for f32, f16 and bf16; f64 for f64.
pub trait Elem: Float {
    type A: Real;
    fn up(self) -> Self::A;
    fn down(a: Self::A) -> Self;
}

impl Elem for f32 {
    type A = f32;
    #[inline(always)]
    fn up(self) -> f32 {
        self
    }
    #[inline(always)]
    fn down(a: f32) -> f32 {
        a
    }
}
impl Elem for f64 {
    type A = f64;
    #[inline(always)]
    fn up(self) -> f64 {
        self
    }
    #[inline(always)]
    fn down(a: f64) -> f64 {
        a
    }
}
impl Elem for f16 {
    type A = f32;
    #[inline(always)]
    fn up(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn down(a: f32) -> f16 {
        f16::from_f32(a)
    }
}
impl Elem for bf16 {
    type A = f32;
    #[inline(always)]
    fn up(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn down(a: f32) -> bf16 {
        bf16::from_f32(a)
    }
}

/// Self-loop handling of [`build`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfLoops {
    /// One loop of weight 1 per node, added to any loop already present (PyG `add_self_loops`).
    Add,
    /// A loop of weight 1 on the nodes that have none; existing loops keep their weight
    /// (PyG `add_remaining_self_loops`, as `gcn_norm` uses).
    Remaining,
    /// The edges as given.
    None,
}

impl SelfLoops {
    pub fn parse(op: &'static str, s: &str) -> Result<Self> {
        match s {
            "add" => Ok(SelfLoops::Add),
            "remaining" => Ok(SelfLoops::Remaining),
            "none" => Ok(SelfLoops::None),
            _ => Err(Error::arg(op, "self_loops", format!("{s:?}"), "one of 'add', 'remaining', 'none'")),
        }
    }
}

/// Edge-weight normalization of [`normalize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// `w_ji / sqrt(d_i d_j)`, `d` = weighted in-degree, `0^-1/2 = 0` (PyG `gcn_norm`).
    Sym,
    /// `w_ji / d_i`: the mean over the in-neighbours (random walk).
    Rw,
    /// The weights as given.
    None,
}

impl Norm {
    pub fn parse(op: &'static str, s: &str) -> Result<Self> {
        match s {
            "sym" => Ok(Norm::Sym),
            "rw" => Ok(Norm::Rw),
            "none" => Ok(Norm::None),
            _ => Err(Error::arg(op, "normalization", format!("{s:?}"), "one of 'sym', 'rw', 'none'")),
        }
    }
}

/// The reduction of [`segment_reduce`] and [`scatter_reduce`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Mean,
    Max,
    Min,
}

impl Reduce {
    pub fn parse(op: &'static str, s: &str) -> Result<Self> {
        match s {
            "sum" => Ok(Reduce::Sum),
            "mean" => Ok(Reduce::Mean),
            "max" | "amax" => Ok(Reduce::Max),
            "min" | "amin" => Ok(Reduce::Min),
            _ => Err(Error::arg(op, "reduce", format!("{s:?}"), "one of 'sum', 'mean', 'max', 'min'")),
        }
    }
    /// Whether the reduction selects one element (and reports its position).
    pub fn selects(self) -> bool {
        matches!(self, Reduce::Max | Reduce::Min)
    }
}

/// Checks a `(2, E)` edge list against `num_nodes`; returns `E`.
pub fn check_edge_index(
    op: &'static str,
    edge_index: &[i64],
    shape: &[usize],
    num_nodes: usize,
) -> Result<usize> {
    if shape.len() != 2 || shape[0] != 2 {
        return Err(Error::shape(op, "edge_index", shape, "(2, E)"));
    }
    crate::error::check_numel(op, "edge_index", edge_index.len(), shape)?;
    let n = num_nodes as i64;
    let bad = install(|| edge_index.par_iter().position_first(|&v| v < 0 || v >= n));
    if let Some(p) = bad {
        let (row, col) = (p / shape[1], p % shape[1]);
        return Err(Error::arg(
            op,
            "edge_index",
            format!("{} at [{row}, {col}]", edge_index[p]),
            format!("a node index in [0, {num_nodes})"),
        ));
    }
    Ok(shape[1])
}

/// Checks a CSR `(indptr, indices)` of `rows` rows whose column indices lie in `[0, cols)`.
pub fn check_csr(op: &'static str, indptr: &[i64], indices: &[i64], rows: usize, cols: usize) -> Result<()> {
    if indptr.len() != rows + 1 {
        return Err(Error::shape(op, "indptr", &[indptr.len()], format!("({},) (rows + 1)", rows + 1)));
    }
    if indptr[0] != 0 {
        return Err(Error::arg(op, "indptr[0]", indptr[0], "0"));
    }
    if let Some(w) = indptr.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::arg(
            op,
            "indptr",
            format!("{} then {} at position {}", indptr[w], indptr[w + 1], w + 1),
            "non-decreasing",
        ));
    }
    if indptr[rows] != indices.len() as i64 {
        return Err(Error::arg(
            op,
            "indptr[-1]",
            indptr[rows],
            format!("the number of indices ({})", indices.len()),
        ));
    }
    let c = cols as i64;
    if let Some(p) = install(|| indices.par_iter().position_first(|&v| v < 0 || v >= c)) {
        return Err(Error::arg(
            op,
            "indices",
            format!("{} at position {p}", indices[p]),
            format!("in [0, {cols})"),
        ));
    }
    Ok(())
}

/// Groups `others` by `keys` (both of length `E`, keys in `[0, n)`), stably: returns the
/// offsets (`n + 1`) and, per group, the `others` in their original order. O(E + n).
pub(crate) fn group_by(keys: &[i64], others: &[i64], n: usize) -> (Vec<usize>, Vec<i64>) {
    let mut ptr = vec![0usize; n + 1];
    for &k in keys {
        ptr[k as usize + 1] += 1;
    }
    for i in 0..n {
        ptr[i + 1] += ptr[i];
    }
    let mut pos = ptr.clone();
    let mut out = vec![0i64; keys.len()];
    for (&k, &o) in keys.iter().zip(others) {
        let p = &mut pos[k as usize];
        out[*p] = o;
        *p += 1;
    }
    (ptr, out)
}

/// The structure of a graph in CSR by target, with its transpose (CSR by source).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Structure {
    /// Row offsets (`n + 1`): row `i` holds the in-edges of node `i`.
    pub indptr: Vec<i64>,
    /// Source node of each slot, ascending within a row (duplicates coalesced).
    pub indices: Vec<i64>,
    /// The slot each input edge was coalesced into (`E`).
    pub edge_slot: Vec<i64>,
    /// True on the self-loop slots that receive the fill weight 1.
    pub fill: Vec<bool>,
    /// The transpose: row offsets by source node.
    pub t_indptr: Vec<i64>,
    /// The transpose: target node of each transposed slot.
    pub t_indices: Vec<i64>,
    /// The slot of the forward CSR each transposed slot reads (`values[t_perm]` are the
    /// transposed values).
    pub t_perm: Vec<i64>,
    /// The inverse of `t_perm`.
    pub t_inv: Vec<i64>,
}

/// Builds the coalesced CSR-by-target of an edge list, with self-loops as asked.
///
/// Duplicate edges share one slot (their weights are summed by the caller through
/// `edge_slot`); column indices are sorted within each row. O(E log(max degree)), parallel over
/// rows.
pub fn build(edge_index: &[i64], shape: &[usize], num_nodes: usize, loops: SelfLoops) -> Result<Structure> {
    const OP: &str = "from_edge_index";
    if num_nodes as u64 > i64::MAX as u64 / 2 {
        return Err(Error::arg(OP, "num_nodes", num_nodes, "< 2^62"));
    }
    let e = check_edge_index(OP, edge_index, shape, num_nodes)?;
    let n = num_nodes;
    let (src, dst) = edge_index.split_at(e);
    // Counting sort by target (stable: edge ids ascend within a row).
    let mut start = vec![0usize; n + 1];
    for &d in dst {
        start[d as usize + 1] += 1;
    }
    for i in 0..n {
        start[i + 1] += start[i];
    }
    let mut pairs: Vec<(i64, i64)> = try_filled(OP, e, (0, 0))?;
    {
        let mut pos = start.clone();
        for (id, (&s, &d)) in src.iter().zip(dst).enumerate() {
            let p = &mut pos[d as usize];
            pairs[*p] = (s, id as i64);
            *p += 1;
        }
    }
    // Per row: sort by source, count distinct sources plus an inserted loop.
    let mut rows: Vec<&mut [(i64, i64)]> = Vec::with_capacity(n);
    {
        let mut rest = pairs.as_mut_slice();
        for i in 0..n {
            let (head, tail) = rest.split_at_mut(start[i + 1] - start[i]);
            rows.push(head);
            rest = tail;
        }
    }
    let counts: Vec<usize> = install(|| {
        rows.par_iter_mut()
            .enumerate()
            .map(|(i, row)| {
                row.sort_unstable();
                let mut distinct = 0usize;
                let mut has_loop = false;
                let mut prev = -1i64;
                for &(s, _) in row.iter() {
                    if s != prev {
                        distinct += 1;
                        prev = s;
                    }
                    has_loop |= s == i as i64;
                }
                distinct + usize::from(loops != SelfLoops::None && !has_loop)
            })
            .collect()
    });
    let mut indptr: Vec<i64> = Vec::with_capacity(n + 1);
    indptr.push(0);
    let mut acc = 0i64;
    for &c in &counts {
        acc += c as i64;
        indptr.push(acc);
    }
    let nnz = acc as usize;
    let mut indices: Vec<i64> = try_filled(OP, nnz, 0)?;
    let mut fill: Vec<bool> = try_filled(OP, nnz, false)?;
    let mut edge_slot: Vec<i64> = try_filled(OP, e, 0)?;
    let (pi, pf, ps) =
        (SyncPtr(indices.as_mut_ptr()), SyncPtr(fill.as_mut_ptr()), SyncPtr(edge_slot.as_mut_ptr()));
    let indptr_ref = &indptr;
    install(|| {
        rows.par_iter().enumerate().for_each(|(i, row)| {
            let me = i as i64;
            let mut k = indptr_ref[i] as usize;
            let mut last: Option<i64> = None;
            let mut need_loop = loops != SelfLoops::None && !row.iter().any(|&(s, _)| s == me);
            let emit = |s: i64, is_fill: bool, k: &mut usize| {
                // SAFETY: slots indptr[i]..indptr[i + 1] belong to row i alone.
                unsafe {
                    pi.write(*k, s);
                    pf.write(*k, is_fill);
                }
                *k += 1;
            };
            for &(s, id) in row.iter() {
                if need_loop && s > me {
                    emit(me, true, &mut k);
                    need_loop = false;
                }
                if last != Some(s) {
                    emit(s, loops == SelfLoops::Add && s == me, &mut k);
                    last = Some(s);
                }
                // SAFETY: every edge id occurs in exactly one row, once.
                unsafe { ps.write(id as usize, k as i64 - 1) };
            }
            if need_loop {
                emit(me, true, &mut k);
            }
        })
    });
    drop(rows);
    let (t_indptr, t_indices, t_perm, t_inv) = transpose(&indptr, &indices, n)?;
    Ok(Structure { indptr, indices, edge_slot, fill, t_indptr, t_indices, t_perm, t_inv })
}

type Transposed = (Vec<i64>, Vec<i64>, Vec<i64>, Vec<i64>);

/// The transpose of a CSR with `cols` columns: `(t_indptr, t_indices, t_perm, t_inv)`.
pub fn transpose(indptr: &[i64], indices: &[i64], cols: usize) -> Result<Transposed> {
    const OP: &str = "transpose";
    let nnz = indices.len();
    let mut t_indptr = vec![0i64; cols + 1];
    for &c in indices {
        t_indptr[c as usize + 1] += 1;
    }
    for i in 0..cols {
        t_indptr[i + 1] += t_indptr[i];
    }
    let mut pos = t_indptr.clone();
    let mut t_indices: Vec<i64> = try_filled(OP, nnz, 0)?;
    let mut t_perm: Vec<i64> = try_filled(OP, nnz, 0)?;
    let mut t_inv: Vec<i64> = try_filled(OP, nnz, 0)?;
    for r in 0..indptr.len().saturating_sub(1) {
        for k in indptr[r] as usize..indptr[r + 1] as usize {
            let p = &mut pos[indices[k] as usize];
            t_indices[*p as usize] = r as i64;
            t_perm[*p as usize] = k as i64;
            t_inv[k] = *p;
            *p += 1;
        }
    }
    Ok((t_indptr, t_indices, t_perm, t_inv))
}

/// Normalizes the values of a square CSR-by-target of `n` nodes (see [`Norm`]). Degrees are
/// weighted row sums accumulated in f64; a node of degree 0 gets factor 0 (never inf), a
/// negative degree gives NaN under `Sym` (as `deg.pow(-0.5)` does).
pub fn normalize<T: Elem>(
    indptr: &[i64],
    indices: &[i64],
    values: &[T],
    n: usize,
    norm: Norm,
) -> Result<Vec<T>> {
    const OP: &str = "graph_norm";
    check_csr(OP, indptr, indices, n, n)?;
    if values.len() != indices.len() {
        return Err(Error::shape(
            OP,
            "values",
            &[values.len()],
            format!("({},) (one per edge)", indices.len()),
        ));
    }
    let deg: Vec<f64> = install(|| {
        (0..n)
            .into_par_iter()
            .map(|r| values[indptr[r] as usize..indptr[r + 1] as usize].iter().map(|v| v.to_f64()).sum())
            .collect()
    });
    let mut out: Vec<T> = try_filled(OP, values.len(), T::from_f64(0.0))?;
    let rows_of = |r: usize| indptr[r] as usize..indptr[r + 1] as usize;
    let po = SyncPtr(out.as_mut_ptr());
    match norm {
        Norm::None => out.copy_from_slice(values),
        Norm::Sym => {
            let a: Vec<f64> = deg.iter().map(|&d| if d == 0.0 { 0.0 } else { d.powf(-0.5) }).collect();
            install(|| {
                (0..n).into_par_iter().for_each(|r| {
                    for k in rows_of(r) {
                        let v = a[r] * values[k].to_f64() * a[indices[k] as usize];
                        // SAFETY: slot k belongs to row r alone.
                        unsafe { po.write(k, T::from_f64(v)) };
                    }
                })
            });
        }
        Norm::Rw => install(|| {
            (0..n).into_par_iter().for_each(|r| {
                let inv = if deg[r] == 0.0 { 0.0 } else { 1.0 / deg[r] };
                for k in rows_of(r) {
                    // SAFETY: slot k belongs to row r alone.
                    unsafe { po.write(k, T::from_f64(values[k].to_f64() * inv)) };
                }
            })
        }),
    }
    Ok(out)
}

/// Features [`spmm`] accumulates at once (in registers).
const FBLOCK: usize = 64;

/// How many edges ahead [`spmm`] prefetches the gathered rows.
const PREFETCH: usize = 8;

/// Bytes of gathered input rows processed per edge chunk (about half of a 32 KiB L1 data cache).
const EDGE_BYTES: usize = 16 * 1024;

/// Hints the cache to load row `indices[k]` of `x` (rows of `f` elements); no-op past the end.
#[inline(always)]
fn prefetch_rows<T>(x: &[T], indices: &[i64], k: usize, nnz: usize, f: usize, row_bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if k < nnz {
            let base = x.as_ptr().wrapping_add(indices[k] as usize * f) as *const i8;
            let mut off = 0;
            while off < row_bytes {
                // SAFETY: a prefetch is only a hint: it never faults and has no visible effect;
                // the address lies inside `x` since the indices were validated.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        base.wrapping_add(off),
                    )
                };
                off += 64;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, indices, k, nnz, f, row_bytes);
    }
}

/// `out = A x`: `A` a CSR of `rows = indptr.len() - 1` rows over `cols` columns, `x` a
/// row-major `(cols, f)` matrix. Each output row is accumulated by one thread in slot order.
pub fn spmm<T: Elem>(
    indptr: &[i64],
    indices: &[i64],
    values: &[T],
    x: &[T],
    cols: usize,
    f: usize,
) -> Result<Vec<T>> {
    const OP: &str = "spmm";
    let rows = indptr.len().saturating_sub(1);
    check_csr(OP, indptr, indices, rows, cols)?;
    if values.len() != indices.len() {
        return Err(Error::shape(
            OP,
            "values",
            &[values.len()],
            format!("({},) (one per edge)", indices.len()),
        ));
    }
    if x.len() != cols * f {
        return Err(Error::shape(OP, "x", &[x.len()], format!("{cols} x {f} elements")));
    }
    let mut out: Vec<T> = try_filled(OP, rows * f, T::from_f64(0.0))?;
    if rows == 0 || f == 0 {
        return Ok(out);
    }
    let nnz = indices.len();
    let row_bytes = f * std::mem::size_of::<T>();
    install(|| {
        out.par_chunks_mut(ROW_CHUNK * f).enumerate().for_each(|(ci, chunk)| {
            let mut acc = vec![T::A::ZERO; f];
            for (li, orow) in chunk.chunks_mut(f).enumerate() {
                let r = ci * ROW_CHUNK + li;
                let (lo, hi) = (indptr[r] as usize, indptr[r + 1] as usize);
                let xrow = |k: usize| {
                    let c = indices[k] as usize;
                    &x[c * f..c * f + f]
                };
                // Features in blocks of FBLOCK held in registers across the row's edges, the
                // edges in chunks of about EDGE_BYTES of gathered inputs (which stay in L1 between
                // blocks); two edges per step; during the first block the rows a few edges ahead
                // are prefetched. Chunks have an even number of edges, so the additions happen
                // in the same order whatever the chunking.
                acc.fill(T::A::ZERO);
                let chunk = ((EDGE_BYTES / row_bytes.max(1)) & !1).max(2);
                let mut e0 = lo;
                while e0 < hi {
                    let e1 = hi.min(e0 + chunk);
                    let mut j0 = 0;
                    while j0 < f {
                        let width = FBLOCK.min(f - j0);
                        let mut blk = [T::A::ZERO; FBLOCK];
                        let blk = &mut blk[..width];
                        blk.copy_from_slice(&acc[j0..j0 + width]);
                        let first = j0 == 0;
                        let mut k = e0;
                        while k + 1 < e1 {
                            if first {
                                prefetch_rows(x, indices, k + PREFETCH, nnz, f, row_bytes);
                                prefetch_rows(x, indices, k + PREFETCH + 1, nnz, f, row_bytes);
                            }
                            let (w0, w1) = (values[k].up(), values[k + 1].up());
                            let (u, v) = (&xrow(k)[j0..j0 + width], &xrow(k + 1)[j0..j0 + width]);
                            for ((a, &p), &q) in blk.iter_mut().zip(u).zip(v) {
                                *a += w0 * p.up() + w1 * q.up();
                            }
                            k += 2;
                        }
                        if k < e1 {
                            let w = values[k].up();
                            for (a, &p) in blk.iter_mut().zip(&xrow(k)[j0..j0 + width]) {
                                *a += w * p.up();
                            }
                        }
                        acc[j0..j0 + width].copy_from_slice(blk);
                        j0 += width;
                    }
                    e0 = e1;
                }
                for (o, &a) in orow.iter_mut().zip(&acc) {
                    *o = T::down(a);
                }
            }
        })
    });
    Ok(out)
}

/// The gradient of `spmm`'s values: `g_k = <grad_out[row(k)], x[indices[k]]>` per slot.
pub fn spmm_grad_values<T: Elem>(
    indptr: &[i64],
    indices: &[i64],
    x: &[T],
    grad_out: &[T],
    cols: usize,
    f: usize,
) -> Result<Vec<T>> {
    const OP: &str = "spmm_grad_values";
    let rows = indptr.len().saturating_sub(1);
    check_csr(OP, indptr, indices, rows, cols)?;
    if x.len() != cols * f {
        return Err(Error::shape(OP, "x", &[x.len()], format!("{cols} x {f} elements")));
    }
    if grad_out.len() != rows * f {
        return Err(Error::shape(OP, "grad_out", &[grad_out.len()], format!("{rows} x {f} elements")));
    }
    let mut out: Vec<T> = try_filled(OP, indices.len(), T::from_f64(0.0))?;
    let po = SyncPtr(out.as_mut_ptr());
    install(|| {
        (0..rows).into_par_iter().with_min_len(ROW_CHUNK).for_each(|r| {
            let g = &grad_out[r * f..r * f + f];
            let lo = indptr[r] as usize;
            for (k, &c) in indices[lo..indptr[r + 1] as usize].iter().enumerate().map(|(d, c)| (lo + d, c)) {
                let c = c as usize;
                let mut s = T::A::ZERO;
                for (&a, &b) in g.iter().zip(&x[c * f..c * f + f]) {
                    s += a.up() * b.up();
                }
                // SAFETY: slot k belongs to row r alone.
                unsafe { po.write(k, T::down(s)) };
            }
        })
    });
    Ok(out)
}

/// Reduces the rows of `src` (`(n, f)`, row-major) in segments; `order` lists the rows of each
/// segment (or `None`: rows `ptr[s]..ptr[s + 1]` themselves). Returns the `(segments, f)`
/// result and, for max/min, the source row of each selected element (`-1` in empty segments).
/// Empty segments give 0.
fn reduce_segments<T: Elem>(
    op: &'static str,
    src: &[T],
    f: usize,
    ptr: &[usize],
    order: Option<&[i64]>,
    reduce: Reduce,
) -> Result<(Vec<T>, Vec<i64>)> {
    let segs = ptr.len() - 1;
    let mut out: Vec<T> = try_filled(op, segs * f, T::from_f64(0.0))?;
    let mut arg: Vec<i64> = if reduce.selects() { try_filled(op, segs * f, -1)? } else { vec![] };
    if segs == 0 || f == 0 {
        return Ok((out, arg));
    }
    let row_of = |p: usize| -> usize {
        match order {
            Some(o) => o[p] as usize,
            None => p,
        }
    };
    let pa = SyncPtr(arg.as_mut_ptr());
    install(|| {
        out.par_chunks_mut(f).enumerate().with_min_len(ROW_CHUNK).for_each(|(s, orow)| {
            let (lo, hi) = (ptr[s], ptr[s + 1]);
            if lo == hi {
                return;
            }
            match reduce {
                Reduce::Sum | Reduce::Mean => {
                    let mut acc = vec![T::A::ZERO; f];
                    for p in lo..hi {
                        let r = row_of(p);
                        for (a, &v) in acc.iter_mut().zip(&src[r * f..r * f + f]) {
                            *a += v.up();
                        }
                    }
                    let count = T::A::of((hi - lo) as f64);
                    for (o, &a) in orow.iter_mut().zip(&acc) {
                        *o = T::down(if reduce == Reduce::Mean { a / count } else { a });
                    }
                }
                Reduce::Max | Reduce::Min => {
                    let first = row_of(lo);
                    let mut best: Vec<T::A> = src[first * f..first * f + f].iter().map(|v| v.up()).collect();
                    let mut who = vec![first as i64; f];
                    for p in lo + 1..hi {
                        let r = row_of(p);
                        for ((b, w), &v) in best.iter_mut().zip(who.iter_mut()).zip(&src[r * f..r * f + f]) {
                            let v = v.up();
                            let better = if reduce == Reduce::Max { v > *b } else { v < *b };
                            // NaN wins and stays (torch's amax/amin propagate NaN).
                            if !b.nan() && (better || v.nan()) {
                                *b = v;
                                *w = r as i64;
                            }
                        }
                    }
                    for (j, (o, &b)) in orow.iter_mut().zip(&best).enumerate() {
                        *o = T::down(b);
                        // SAFETY: row s of `arg` belongs to this work item alone.
                        unsafe { pa.write(s * f + j, who[j]) };
                    }
                }
            }
        })
    });
    Ok((out, arg))
}

/// Segment reduction along dim 0 of `src` (`(n, f)`): segment `s` is rows
/// `indptr[s]..indptr[s + 1]`; `indptr[0] = 0`, non-decreasing, `indptr[-1] = n`.
pub fn segment_reduce<T: Elem>(
    src: &[T],
    n: usize,
    f: usize,
    indptr: &[i64],
    reduce: Reduce,
) -> Result<(Vec<T>, Vec<i64>)> {
    const OP: &str = "segment_reduce";
    crate::error::check_numel(OP, "src", src.len(), &[n, f])?;
    if indptr.is_empty() {
        return Err(Error::shape(OP, "indptr", &[0], "at least one offset"));
    }
    if indptr[0] != 0 {
        return Err(Error::arg(OP, "indptr[0]", indptr[0], "0"));
    }
    if let Some(w) = indptr.windows(2).position(|w| w[1] < w[0]) {
        return Err(Error::arg(
            OP,
            "indptr",
            format!("{} then {} at position {}", indptr[w], indptr[w + 1], w + 1),
            "non-decreasing",
        ));
    }
    let last = indptr[indptr.len() - 1];
    if last != n as i64 {
        return Err(Error::arg(OP, "indptr[-1]", last, format!("the number of rows of src ({n})")));
    }
    let ptr: Vec<usize> = indptr.iter().map(|&v| v as usize).collect();
    reduce_segments(OP, src, f, &ptr, None, reduce)
}

/// Scatter reduction along dim 0: `out[index[r]] = reduce(src[r] ...)`, `out` of `dim_size`
/// rows; every index must lie in `[0, dim_size)`. Elements are reduced in row order.
pub fn scatter_reduce<T: Elem>(
    src: &[T],
    n: usize,
    f: usize,
    index: &[i64],
    dim_size: usize,
    reduce: Reduce,
) -> Result<(Vec<T>, Vec<i64>)> {
    const OP: &str = "scatter_reduce";
    crate::error::check_numel(OP, "src", src.len(), &[n, f])?;
    if index.len() != n {
        return Err(Error::shape(OP, "index", &[index.len()], format!("({n},) (one per row of src)")));
    }
    let d = dim_size as i64;
    if let Some(p) = install(|| index.par_iter().position_first(|&v| v < 0 || v >= d)) {
        return Err(Error::arg(
            OP,
            "index",
            format!("{} at position {p}", index[p]),
            format!("in [0, dim_size) = [0, {dim_size})"),
        ));
    }
    let rows: Vec<i64> = (0..n as i64).collect();
    let (ptr, order) = group_by(index, &rows, dim_size);
    reduce_segments(OP, src, f, &ptr, Some(&order), reduce)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ei(src: &[i64], dst: &[i64]) -> (Vec<i64>, Vec<usize>) {
        let mut v = src.to_vec();
        v.extend_from_slice(dst);
        (v, vec![2, src.len()])
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp_f32(x) as f64) - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "{worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert!(((exp_f32(-95.0) as f64) / (-95.0f64).exp() - 1.0).abs() < 1e-3);
    }

    #[test]
    fn build_coalesces_sorts_and_adds_loops() {
        // edges 0->1 (twice), 2->1, 1->0, 1->1 (an existing loop)
        let (e, s) = ei(&[0, 2, 0, 1, 1], &[1, 1, 1, 0, 1]);
        let g = build(&e, &s, 3, SelfLoops::None).unwrap();
        assert_eq!(g.indptr, vec![0, 1, 4, 4]);
        assert_eq!(g.indices, vec![1, 0, 1, 2]);
        assert_eq!(g.edge_slot, vec![1, 3, 1, 0, 2]);
        assert!(g.fill.iter().all(|&f| !f));
        let g = build(&e, &s, 3, SelfLoops::Remaining).unwrap();
        assert_eq!(g.indptr, vec![0, 2, 5, 6]);
        assert_eq!(g.indices, vec![0, 1, 0, 1, 2, 2]);
        assert_eq!(g.fill, vec![true, false, false, false, false, true]);
        let g = build(&e, &s, 3, SelfLoops::Add).unwrap();
        assert_eq!(g.indices, vec![0, 1, 0, 1, 2, 2]);
        assert_eq!(g.fill, vec![true, false, false, true, false, true]);
        // the transpose lists, per source, its targets and the forward slots
        assert_eq!(g.t_indptr, vec![0, 2, 4, 6]);
        assert_eq!(g.t_indices, vec![0, 1, 0, 1, 1, 2]);
        assert_eq!(g.t_perm, vec![0, 2, 1, 3, 4, 5]);
        for (p, &k) in g.t_perm.iter().enumerate() {
            assert_eq!(g.t_inv[k as usize], p as i64);
        }
    }

    #[test]
    fn build_rejects_bad_input() {
        let (e, s) = ei(&[0, 3], &[1, 0]);
        let err = build(&e, &s, 3, SelfLoops::None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "from_edge_index: edge_index (3 at [0, 1]) must be a node index in [0, 3)"
        );
        assert!(build(&[0, 1, 2], &[3, 1], 3, SelfLoops::None).is_err());
        assert!(build(&[0, 1], &[1, 2], 3, SelfLoops::None).is_err());
        assert!(SelfLoops::parse("x", "both").is_err());
        assert!(Norm::parse("x", "left").is_err());
    }

    #[test]
    fn sym_normalization_matches_the_formula() {
        let (e, s) = ei(&[0, 1, 1, 2], &[1, 0, 2, 1]);
        let g = build(&e, &s, 3, SelfLoops::Add).unwrap();
        let w: Vec<f64> = g.fill.iter().map(|_| 1.0).collect();
        let v = normalize(&g.indptr, &g.indices, &w, 3, Norm::Sym).unwrap();
        let deg = [2.0f64, 3.0, 2.0];
        let mut k = 0;
        for r in 0..3 {
            for kk in g.indptr[r]..g.indptr[r + 1] {
                let c = g.indices[kk as usize] as usize;
                assert!((v[k] - 1.0 / (deg[r] * deg[c]).sqrt()).abs() < 1e-15);
                k += 1;
            }
        }
        let v = normalize(&g.indptr, &g.indices, &w, 3, Norm::Rw).unwrap();
        assert!((v[0] - 0.5).abs() < 1e-15 && (v[2] - 1.0 / 3.0).abs() < 1e-15);
        // an isolated node without loops: factor 0, never inf
        let (e, s) = ei(&[0], &[1]);
        let g = build(&e, &s, 3, SelfLoops::None).unwrap();
        let v = normalize(&g.indptr, &g.indices, &[2.0f32], 3, Norm::Sym).unwrap();
        assert_eq!(v, vec![0.0]);
    }

    #[test]
    fn spmm_equals_dense_and_is_thread_independent() {
        let n = 300usize;
        let f = 7usize;
        let mut src = vec![];
        let mut dst = vec![];
        for i in 0..n as u64 {
            for t in 0..(i % 11) {
                src.push(((i * 7919 + t * 104729) % n as u64) as i64);
                dst.push(i as i64);
            }
        }
        let (e, s) = ei(&src, &dst);
        let g = build(&e, &s, n, SelfLoops::Add).unwrap();
        let w: Vec<f64> = (0..g.indices.len()).map(|k| ((k * 37 % 101) as f64) / 50.0 - 1.0).collect();
        let x: Vec<f64> = (0..n * f).map(|k| ((k * 13 % 97) as f64) / 40.0 - 1.2).collect();
        let out = spmm(&g.indptr, &g.indices, &w, &x, n, f).unwrap();
        let mut dense = vec![0.0f64; n * n];
        for r in 0..n {
            for k in g.indptr[r] as usize..g.indptr[r + 1] as usize {
                dense[r * n + g.indices[k] as usize] += w[k];
            }
        }
        for r in 0..n {
            for j in 0..f {
                let want: f64 = (0..n).map(|c| dense[r * n + c] * x[c * f + j]).sum();
                assert!((out[r * f + j] - want).abs() < 1e-12);
            }
        }
        crate::parallel::set_num_threads(1);
        let one = spmm(&g.indptr, &g.indices, &w, &x, n, f).unwrap();
        crate::parallel::set_num_threads(0);
        assert_eq!(one, out);
        // the transposed product through (t_indptr, t_indices, values[t_perm])
        let wt: Vec<f64> = g.t_perm.iter().map(|&k| w[k as usize]).collect();
        let back = spmm(&g.t_indptr, &g.t_indices, &wt, &x, n, f).unwrap();
        for c in 0..n {
            let want: f64 = (0..n).map(|r| dense[r * n + c] * x[r * f]).sum();
            assert!((back[c * f] - want).abs() < 1e-12);
        }
        let gv = spmm_grad_values(&g.indptr, &g.indices, &x, &out, n, f).unwrap();
        let r0 = 5usize;
        let k0 = g.indptr[r0] as usize;
        let c0 = g.indices[k0] as usize;
        let want: f64 = (0..f).map(|j| out[r0 * f + j] * x[c0 * f + j]).sum();
        assert!((gv[k0] - want).abs() < 1e-12);
        assert!(spmm(&g.indptr, &g.indices, &w, &x[1..], n, f).is_err());
        assert!(spmm(&[0, 2], &[0, 5], &[1.0f32, 1.0], &[1.0; 3], 3, 1).is_err());
    }

    #[test]
    fn segment_and_scatter_reductions() {
        let src = [1.0f32, 5.0, 3.0, -2.0, 4.0, 4.0, 0.5, 7.0];
        let (o, a) = segment_reduce(&src, 4, 2, &[0, 3, 3, 4], Reduce::Max).unwrap();
        assert_eq!(o, vec![4.0, 5.0, 0.0, 0.0, 0.5, 7.0]);
        assert_eq!(a, vec![2, 0, -1, -1, 3, 3]);
        let (o, _) = segment_reduce(&src, 4, 2, &[0, 3, 3, 4], Reduce::Mean).unwrap();
        assert_eq!(o, vec![8.0 / 3.0, 7.0 / 3.0, 0.0, 0.0, 0.5, 7.0]);
        let (o, a) = scatter_reduce(&src, 4, 2, &[1, 0, 1, 1], 3, Reduce::Min).unwrap();
        assert_eq!(o, vec![3.0, -2.0, 0.5, 4.0, 0.0, 0.0]);
        assert_eq!(a, vec![1, 1, 3, 2, -1, -1]);
        let (o, _) = scatter_reduce(&src, 4, 2, &[1, 0, 1, 1], 3, Reduce::Sum).unwrap();
        assert_eq!(o, vec![3.0, -2.0, 5.5, 16.0, 0.0, 0.0]);
        let e = scatter_reduce(&src, 4, 2, &[1, 0, 3, 1], 3, Reduce::Sum).unwrap_err();
        assert_eq!(
            e.to_string(),
            "scatter_reduce: index (3 at position 2) must be in [0, dim_size) = [0, 3)"
        );
        assert!(segment_reduce(&src, 4, 2, &[0, 3, 2, 4], Reduce::Sum).is_err());
        assert!(segment_reduce(&src, 4, 2, &[0, 3], Reduce::Sum).is_err());
        let nan = [1.0f64, f64::NAN, 3.0];
        let (o, a) = segment_reduce(&nan, 3, 1, &[0, 3], Reduce::Max).unwrap();
        assert!(o[0].is_nan() && a[0] == 1);
    }
}
