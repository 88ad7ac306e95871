//! Fused GNN-to-MLP distillation losses (KD, GLNN, FF-G2M, KRD, NOSMOG similarity).
//!
//! Each loss takes `(N, C)` logits and returns its value with, on request, the gradient with
//! respect to the student logits, computed in the same pass. Edge losses gather the rows of
//! each edge inside the kernel: nothing of size `E x C` is ever allocated (the extra memory is
//! `O(N x C)` for per-node softmaxes and gradient accumulators, `O(E)` for grouping the edges
//! by endpoint, and for the HFD gradient a bounded chunk of per-edge rows, see
//! `HFD_CHUNK_BYTES`). The edge loops prefetch the rows of the edges ahead and run compiled
//! for AVX2 where the CPU has it (the same operations, so the same results).
//!
//! Determinism: every per-node value is accumulated by one thread in a fixed order, and loss
//! totals are summed in f64 over fixed blocks of nodes or edges, so results do not depend on
//! the thread count.

use crate::error::{try_filled, Error, Result};
use crate::graph::{check_edge_index, group_by, Elem, Real, ROW_CHUNK};
use crate::parallel::{install, simd, Simd, SyncPtr};
use crate::{rng, Float};
use rayon::prelude::*;

/// How a per-row loss is reduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// Sum over rows divided by the number of rows (`F.kl_div(..., reduction="batchmean")`).
    BatchMean,
    /// Sum over rows.
    Sum,
    /// Sum divided by the number of elements `N x C` (`reduction="mean"`).
    Mean,
    /// One value per row.
    None,
}

impl Reduction {
    pub fn parse(op: &'static str, s: &str) -> Result<Self> {
        match s {
            "batchmean" => Ok(Reduction::BatchMean),
            "sum" => Ok(Reduction::Sum),
            "mean" => Ok(Reduction::Mean),
            "none" => Ok(Reduction::None),
            _ => Err(Error::arg(
                op,
                "reduction",
                format!("{s:?}"),
                "one of 'batchmean', 'sum', 'mean', 'none'",
            )),
        }
    }
}

/// A loss value (one, or one per row for [`Reduction::None`]) and the gradient with respect to
/// the student logits (empty unless asked for), scaled for an upstream gradient of 1.
pub type LossGrad<T> = (Vec<f64>, Vec<T>);

fn check_logits(op: &'static str, arg: &'static str, len: usize, shape: &[usize]) -> Result<(usize, usize)> {
    if shape.len() != 2 || shape[1] == 0 {
        return Err(Error::shape(op, arg, shape, "(N, C) with C >= 1"));
    }
    crate::error::check_numel(op, arg, len, shape)?;
    Ok((shape[0], shape[1]))
}

fn check_pair(
    op: &'static str,
    s_len: usize,
    s_shape: &[usize],
    t_len: usize,
    t_shape: &[usize],
) -> Result<(usize, usize)> {
    let nc = check_logits(op, "student_logits", s_len, s_shape)?;
    check_logits(op, "teacher_logits", t_len, t_shape)?;
    if t_shape != s_shape {
        return Err(Error::shape(
            op,
            "teacher_logits",
            t_shape,
            format!("the student's shape {}", crate::error::fmt_shape(s_shape)),
        ));
    }
    Ok(nc)
}

/// Writes `log softmax(scale * z)` into `out`.
#[inline]
fn log_softmax<T: Elem>(z: &[T], scale: T::A, out: &mut [T::A]) {
    for (o, &v) in out.iter_mut().zip(z) {
        *o = v.up() * scale;
    }
    let m = lane_max(out);
    let s = lane_sum2(out, out, |a, _| (a - m).exp());
    let lse = m + s.ln();
    for o in out.iter_mut() {
        *o -= lse;
    }
}

/// The row `i` (of `c` elements) of a buffer written by disjoint threads.
///
/// # Safety
/// Row `i` must be in bounds, and no other thread may access it while the slice lives.
#[inline(always)]
unsafe fn row_mut<'a, T>(p: SyncPtr<T>, i: usize, c: usize) -> &'a mut [T] {
    unsafe { std::slice::from_raw_parts_mut(p.0.add(i * c), c) }
}

/// Runs `f(first_row, rows)` over fixed blocks of `ROW_CHUNK` rows in parallel and sums the
/// returned f64 values in block order.
fn blocks(n: usize, f: impl Fn(usize, usize) -> f64 + Sync) -> f64 {
    let nb = n.div_ceil(ROW_CHUNK);
    let parts: Vec<f64> = install(|| {
        (0..nb).into_par_iter().map(|b| f(b * ROW_CHUNK, ROW_CHUNK.min(n - b * ROW_CHUNK))).collect()
    });
    parts.iter().sum()
}

/// Hinton's KD: per row `KL(softmax(t/T) || softmax(s/T))`, times `T^2` when `t2_scale`.
#[allow(clippy::too_many_arguments)]
pub fn kd_loss<T: Elem>(
    s: &[T],
    s_shape: &[usize],
    t: &[T],
    t_shape: &[usize],
    temperature: f64,
    t2_scale: bool,
    reduction: Reduction,
    want_grad: bool,
) -> Result<LossGrad<T>> {
    const OP: &str = "kd_loss";
    let (n, c) = check_pair(OP, s.len(), s_shape, t.len(), t_shape)?;
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(Error::arg(OP, "temperature", temperature, "a finite number > 0"));
    }
    let factor = if t2_scale { temperature * temperature } else { 1.0 };
    let red = match reduction {
        Reduction::BatchMean => 1.0 / n.max(1) as f64,
        Reduction::Mean => 1.0 / (n * c).max(1) as f64,
        Reduction::Sum | Reduction::None => 1.0,
    };
    let mut rows: Vec<f64> = try_filled(OP, n, 0.0)?;
    let mut grad: Vec<T> = if want_grad { try_filled(OP, n * c, T::from_f64(0.0))? } else { vec![] };
    let (pr, pg) = (SyncPtr(rows.as_mut_ptr()), SyncPtr(grad.as_mut_ptr()));
    let inv_t = T::A::of(1.0 / temperature);
    let gscale = T::A::of(factor * red / temperature);
    blocks(n, |lo, len| {
        let (mut lp, mut lq) = (vec![T::A::ZERO; c], vec![T::A::ZERO; c]);
        for i in lo..lo + len {
            log_softmax(&t[i * c..i * c + c], inv_t, &mut lp);
            log_softmax(&s[i * c..i * c + c], inv_t, &mut lq);
            let mut kl = T::A::ZERO;
            for (&a, &b) in lp.iter().zip(&lq) {
                kl += a.exp() * (a - b);
            }
            // SAFETY: row i belongs to this block alone.
            unsafe { pr.write(i, kl.f64() * factor) };
            if want_grad {
                // SAFETY: as above.
                let g = unsafe { row_mut(pg, i, c) };
                for ((o, &a), &b) in g.iter_mut().zip(&lp).zip(&lq) {
                    *o = T::down((b.exp() - a.exp()) * gscale);
                }
            }
        }
        0.0
    });
    let loss = match reduction {
        Reduction::None => rows,
        _ => vec![rows.iter().sum::<f64>() * red],
    };
    Ok((loss, grad))
}

/// Cross-entropy of the student logits over the rows where `mask` is true, averaged over them
/// (`F.cross_entropy(s[mask], labels[mask])`). Labels of other rows are ignored.
pub fn ce_loss<T: Elem>(
    s: &[T],
    s_shape: &[usize],
    labels: &[i64],
    mask: &[bool],
    want_grad: bool,
) -> Result<LossGrad<T>> {
    const OP: &str = "ce_loss";
    let (n, c) = check_logits(OP, "student_logits", s.len(), s_shape)?;
    if labels.len() != n {
        return Err(Error::shape(OP, "labels", &[labels.len()], format!("({n},) (one per node)")));
    }
    if mask.len() != n {
        return Err(Error::shape(OP, "labelled_mask", &[mask.len()], format!("({n},) (one per node)")));
    }
    let count = mask.iter().filter(|&&m| m).count();
    if count == 0 {
        return Err(Error::arg(OP, "labelled_mask", "no labelled node", "at least one True entry"));
    }
    if let Some(i) = (0..n).find(|&i| mask[i] && !(0..c as i64).contains(&labels[i])) {
        return Err(Error::arg(
            OP,
            "labels",
            format!("{} at node {i}", labels[i]),
            format!("a class in [0, {c})"),
        ));
    }
    let mut grad: Vec<T> = if want_grad { try_filled(OP, n * c, T::from_f64(0.0))? } else { vec![] };
    let pg = SyncPtr(grad.as_mut_ptr());
    let inv = T::A::of(1.0 / count as f64);
    let total = blocks(n, |lo, len| {
        let mut lq = vec![T::A::ZERO; c];
        let mut acc = 0.0f64;
        for i in (lo..lo + len).filter(|&i| mask[i]) {
            log_softmax(&s[i * c..i * c + c], T::A::ONE, &mut lq);
            let y = labels[i] as usize;
            acc -= lq[y].f64();
            if want_grad {
                // SAFETY: row i belongs to this block alone.
                let g = unsafe { row_mut(pg, i, c) };
                for (k, (o, &b)) in g.iter_mut().zip(&lq).enumerate() {
                    let onehot = if k == y { T::A::ONE } else { T::A::ZERO };
                    *o = T::down((b.exp() - onehot) * inv);
                }
            }
        }
        acc
    });
    Ok((vec![total / count as f64], grad))
}

/// What one block of LFD rows reads: per node `log q_s`, `p_t` and the teacher's negative
/// entropy, and the out-edges by source.
struct Lfd<'a, T: Elem> {
    lq: &'a [T::A],
    pt: &'a [T::A],
    negh: &'a [T::A],
    ptr: &'a [usize],
    nbr: &'a [i64],
    c: usize,
    inv: T::A,
    grad: Option<SyncPtr<T>>,
}

impl<T: Elem> Simd for (&Lfd<'_, T>, usize, usize) {
    type Out = f64;
    /// The loss of the out-edges (and self-loop) of rows `lo..lo + len`, and their gradient rows.
    #[inline(always)]
    fn run(self) -> f64 {
        let (k, lo, len) = self;
        let c = k.c;
        let mut acc = 0.0f64;
        let mut gsum = vec![T::A::ZERO; c];
        for i in lo..lo + len {
            let qi = row(k.lq, i, c);
            let nb = &k.nbr[k.ptr[i]..k.ptr[i + 1]];
            let mut li = T::A::ZERO;
            gsum.fill(T::A::ZERO);
            for (slot, &j) in (k.ptr[i]..).zip(nb.iter().chain(std::iter::once(&(i as i64)))) {
                if let Some(&f) = k.nbr.get(slot + AHEAD) {
                    prefetch_row(k.pt, f as usize, c);
                }
                let j = j as usize;
                let pj = row(k.pt, j, c);
                for (g, &p) in gsum.iter_mut().zip(pj) {
                    *g += p;
                }
                li += k.negh[j] - lane_sum2(pj, qi, |p, q| p * q);
            }
            acc += li.f64();
            if let Some(pg) = k.grad {
                let cnt = T::A::of((nb.len() + 1) as f64);
                // SAFETY: row i belongs to this block alone.
                let g = unsafe { row_mut(pg, i, c) };
                for ((o, &q), &p) in g.iter_mut().zip(qi).zip(gsum.iter()) {
                    *o = T::down((cnt * q.exp() - p) * k.inv);
                }
            }
        }
        acc
    }
}

/// FF-G2M's low-frequency distillation: the mean over the edges `(i, j)` of `edge_index`
/// plus one self-loop per node of `KL(softmax(t[j]) || softmax(s[i]))` (`i` = source).
///
/// `KL = -H(p_t[j]) - <p_t[j], log q_s[i]>` needs per node only `log q_s`, `p_t` and the
/// teacher's negative entropy, so each edge costs one dot product of length `C`.
pub fn lfd_loss<T: Elem>(
    s: &[T],
    s_shape: &[usize],
    t: &[T],
    t_shape: &[usize],
    edge_index: &[i64],
    ei_shape: &[usize],
    want_grad: bool,
) -> Result<LossGrad<T>> {
    const OP: &str = "lfd_loss";
    let (n, c) = check_pair(OP, s.len(), s_shape, t.len(), t_shape)?;
    let e = check_edge_index(OP, edge_index, ei_shape, n)?;
    let (src, dst) = edge_index.split_at(e);
    let (ptr, nbr) = group_by(src, dst, n);
    let mut lq: Vec<T::A> = try_filled(OP, n * c, T::A::ZERO)?;
    let mut pt: Vec<T::A> = try_filled(OP, n * c, T::A::ZERO)?;
    let mut negh: Vec<T::A> = try_filled(OP, n, T::A::ZERO)?;
    install(|| {
        lq.par_chunks_mut(c)
            .zip(pt.par_chunks_mut(c))
            .zip(negh.par_iter_mut())
            .enumerate()
            .with_min_len(ROW_CHUNK)
            .for_each(|(i, ((q, p), h))| {
                log_softmax(&s[i * c..i * c + c], T::A::ONE, q);
                log_softmax(&t[i * c..i * c + c], T::A::ONE, p);
                let mut acc = T::A::ZERO;
                for v in p.iter_mut() {
                    let lp = *v;
                    *v = lp.exp();
                    acc += *v * lp;
                }
                *h = acc;
            })
    });
    let total_edges = (e + n).max(1);
    let mut grad: Vec<T> = if want_grad { try_filled(OP, n * c, T::from_f64(0.0))? } else { vec![] };
    let ctx = Lfd {
        lq: &lq,
        pt: &pt,
        negh: &negh,
        ptr: &ptr,
        nbr: &nbr,
        c,
        inv: T::A::of(1.0 / total_edges as f64),
        grad: want_grad.then_some(SyncPtr(grad.as_mut_ptr())),
    };
    let total = blocks(n, |lo, len| simd((&ctx, lo, len)));
    Ok((vec![total / total_edges as f64], grad))
}

/// Lanes of the explicit reductions below: sums and maxima kept in `LANES` independent
/// accumulators (combined in a fixed order at the end) vectorize, where one running sum cannot
/// (float addition is not reassociated by the compiler).
const LANES: usize = 8;

/// The maximum of `x` (NaN entries are skipped: they still reach the result through the sums).
#[inline(always)]
fn lane_max<A: Real>(x: &[A]) -> A {
    let mut m = [A::of(f64::NEG_INFINITY); LANES];
    let mut ch = x.chunks_exact(LANES);
    for c in &mut ch {
        for l in 0..LANES {
            if c[l] > m[l] {
                m[l] = c[l];
            }
        }
    }
    let mut r = A::of(f64::NEG_INFINITY);
    for &v in m.iter().chain(ch.remainder()) {
        if v > r {
            r = v;
        }
    }
    r
}

/// `sum_k f(x[k], y[k])` in `LANES` accumulators, combined in a fixed order.
#[inline(always)]
fn lane_sum2<A: Real>(x: &[A], y: &[A], f: impl Fn(A, A) -> A) -> A {
    let mut acc = [A::ZERO; LANES];
    let (mut cx, mut cy) = (x.chunks_exact(LANES), y[..x.len()].chunks_exact(LANES));
    for (a, b) in (&mut cx).zip(&mut cy) {
        for l in 0..LANES {
            acc[l] += f(a[l], b[l]);
        }
    }
    let mut r = A::ZERO;
    for v in acc {
        r += v;
    }
    for (&a, &b) in cx.remainder().iter().zip(cy.remainder()) {
        r += f(a, b);
    }
    r
}

/// Scratch rows of one HFD edge evaluation.
struct HfdScratch<T: Elem> {
    da: Vec<T::A>,
    db: Vec<T::A>,
    ea: Vec<T::A>,
    eb: Vec<T::A>,
}

impl<T: Elem> HfdScratch<T> {
    fn new(c: usize) -> Self {
        let z = T::A::ZERO;
        HfdScratch { da: vec![z; c], db: vec![z; c], ea: vec![z; c], eb: vec![z; c] }
    }

    /// KL(softmax(|t_i - t_j| / tau) || softmax(|s_i - s_j| / tau)) of one edge; with `g`,
    /// writes its gradient with respect to `s_i` times `scale` there, `(Q - P) sgn(s_i - s_j)
    /// scale` (the gradient with respect to `s_j` is its negative). Every loop is elementwise or
    /// a lane reduction, so the whole evaluation vectorizes.
    #[inline(always)]
    fn edge(
        &mut self,
        si: &[T],
        sj: &[T],
        ti: &[T],
        tj: &[T],
        inv_tau: T::A,
        g: Option<(&mut [T::A], T::A)>,
    ) -> T::A {
        let c = si.len();
        let (da, db) = (&mut self.da[..c], &mut self.db[..c]);
        let (ea, eb) = (&mut self.ea[..c], &mut self.eb[..c]);
        for ((((a, b), (&x, &y)), &u), &v) in
            da.iter_mut().zip(db.iter_mut()).zip(ti.iter().zip(&tj[..c])).zip(si).zip(&sj[..c])
        {
            *a = (x.up() - y.up()).abs() * inv_tau;
            *b = (u.up() - v.up()).abs() * inv_tau;
        }
        let (ma, mb) = (lane_max(da), lane_max(db));
        for (((x, y), &a), &b) in ea.iter_mut().zip(eb.iter_mut()).zip(da.iter()).zip(db.iter()) {
            *x = (a - ma).exp();
            *y = (b - mb).exp();
        }
        let sa = lane_sum2(ea, ea, |x, _| x);
        let sb = lane_sum2(eb, eb, |x, _| x);
        // sum_k ea_k (da_k - db_k), as two lane sums over the same pairs
        let cross = lane_sum2(ea, da, |x, a| x * a) - lane_sum2(ea, db, |x, b| x * b);
        let (ia, ib) = (T::A::ONE / sa, T::A::ONE / sb);
        let kl = cross * ia - (ma + sa.ln()) + (mb + sb.ln());
        if let Some((g, scale)) = g {
            for ((((o, &x), &y), &u), &v) in
                g[..c].iter_mut().zip(ea.iter()).zip(eb.iter()).zip(si).zip(&sj[..c])
            {
                *o = (y * ib - x * ia) * (u.up() - v.up()).sign() * scale;
            }
        }
        kl
    }
}

/// The HFD edges without self-loops, numbered by source (in input order within a source), with
/// the same edges listed by target, and the inputs every pass reads.
struct Hfd<'a, T: Elem> {
    s: &'a [T],
    t: &'a [T],
    c: usize,
    /// Edges `optr[i]..optr[i + 1]` leave node `i`; `dst[e]` is the target of edge `e`.
    optr: &'a [usize],
    dst: &'a [usize],
    /// Edges `iptr[j]..iptr[j + 1]` of `inc` enter node `j`, ascending.
    iptr: &'a [usize],
    inc: &'a [usize],
    inv_tau: T::A,
    scale: T::A,
}

/// The gradient pass takes the edges in chunks and keeps their per-edge gradient rows (each
/// edge's row is computed once and added to both endpoints): at most this many bytes, and at
/// most an eighth of an `E x C` tensor, so the pass stays far below the memory of one.
const HFD_CHUNK_BYTES: usize = 8 << 20;
/// Edges per parallel work item of the per-edge passes.
const EDGE_BLOCK: usize = 512;

/// The loss of the out-edges of rows `lo..lo + len` (no gradient).
impl<T: Elem> Simd for (&Hfd<'_, T>, usize, usize) {
    type Out = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        let (k, lo, len) = self;
        let (s, t, c) = (k.s, k.t, k.c);
        let mut sc = HfdScratch::<T>::new(c);
        let mut acc = 0.0f64;
        for i in lo..lo + len {
            for (slot, &j) in (k.optr[i]..).zip(&k.dst[k.optr[i]..k.optr[i + 1]]) {
                if let Some(&f) = k.dst.get(slot + AHEAD) {
                    prefetch_row(s, f, c);
                    prefetch_row(t, f, c);
                }
                acc += sc.edge(row(s, i, c), row(s, j, c), row(t, i, c), row(t, j, c), k.inv_tau, None).f64();
            }
        }
        acc
    }
}

/// Edges `lo..lo + len`: the loss, and every edge's gradient row into `rows` (edge `e` at row
/// `e - first`).
struct HfdEdges<'a, 'b, T: Elem> {
    k: &'a Hfd<'b, T>,
    lo: usize,
    len: usize,
    first: usize,
    rows: SyncPtr<T::A>,
}

impl<T: Elem> Simd for HfdEdges<'_, '_, T> {
    type Out = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        let k = self.k;
        let (s, t, c) = (k.s, k.t, k.c);
        let mut sc = HfdScratch::<T>::new(c);
        let mut acc = 0.0f64;
        // the source of edge lo, then advanced along the edges (they are numbered by source)
        let mut i = k.optr.partition_point(|&p| p <= self.lo) - 1;
        for e in self.lo..self.lo + self.len {
            if let Some(&f) = k.dst.get(e + AHEAD) {
                prefetch_row(s, f, c);
                prefetch_row(t, f, c);
            }
            while k.optr[i + 1] <= e {
                i += 1;
            }
            let j = k.dst[e];
            // SAFETY: row e - first belongs to this block of edges alone.
            let g = unsafe { row_mut(self.rows, e - self.first, c) };
            let kl = sc.edge(
                row(s, i, c),
                row(s, j, c),
                row(t, i, c),
                row(t, j, c),
                k.inv_tau,
                Some((g, k.scale)),
            );
            acc += kl.f64();
        }
        acc
    }
}

/// Nodes `lo..lo + len`: adds the gradient rows of the chunk's edges `first..last` to each
/// node's accumulator, out-edges (+) then in-edges (-), in edge order.
struct HfdScatter<'a, 'b, T: Elem> {
    k: &'a Hfd<'b, T>,
    lo: usize,
    len: usize,
    first: usize,
    last: usize,
    rows: &'a [T::A],
    acc: SyncPtr<T::A>,
    /// Per node, the first entry of its in-edges not yet added (they arrive in edge order).
    cursor: SyncPtr<usize>,
}

impl<T: Elem> Simd for HfdScatter<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let (k, c) = (self.k, self.k.c);
        for i in self.lo..self.lo + self.len {
            // SAFETY: row i belongs to this block of nodes alone.
            let a = unsafe { row_mut(self.acc, i, c) };
            let (o0, o1) = (k.optr[i].max(self.first), k.optr[i + 1].min(self.last));
            for e in o0..o1.max(o0) {
                for (x, &d) in a.iter_mut().zip(row(self.rows, e - self.first, c)) {
                    *x += d;
                }
            }
            // SAFETY: entry i belongs to this block of nodes alone.
            let mut p = unsafe { *self.cursor.0.add(i) };
            while p < k.iptr[i + 1] && k.inc[p] < self.last {
                for (x, &d) in a.iter_mut().zip(row(self.rows, k.inc[p] - self.first, c)) {
                    *x -= d;
                }
                p += 1;
            }
            // SAFETY: as above.
            unsafe { self.cursor.write(i, p) };
        }
    }
}

/// FF-G2M's high-frequency distillation: the mean over the edges `(i, j)` of `edge_index` with
/// `i != j` of `KL(softmax(|t[i] - t[j]| / tau) || softmax(|s[i] - s[j]| / tau))`; 0 when no
/// such edge exists. The gradient of `|x|` at 0 is taken as 0 (as torch's).
///
/// With the gradient, each edge is evaluated once: the edges are taken in fixed chunks whose
/// per-edge gradient rows (see [`HFD_CHUNK_BYTES`]) are then added to both endpoints, each
/// node's rows in edge order, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)]
pub fn hfd_loss<T: Elem>(
    s: &[T],
    s_shape: &[usize],
    t: &[T],
    t_shape: &[usize],
    edge_index: &[i64],
    ei_shape: &[usize],
    tau: f64,
    want_grad: bool,
) -> Result<LossGrad<T>> {
    const OP: &str = "hfd_loss";
    let (n, c) = check_pair(OP, s.len(), s_shape, t.len(), t_shape)?;
    if !(tau.is_finite() && tau > 0.0) {
        return Err(Error::arg(OP, "tau", tau, "a finite number > 0"));
    }
    let e = check_edge_index(OP, edge_index, ei_shape, n)?;
    let (src_in, dst_in) = edge_index.split_at(e);
    let mut grad: Vec<T> = if want_grad { try_filled(OP, n * c, T::from_f64(0.0))? } else { vec![] };
    // the edges without self-loops, by source
    let mut optr: Vec<usize> = try_filled(OP, n + 1, 0)?;
    for (&a, &b) in src_in.iter().zip(dst_in) {
        if a != b {
            optr[a as usize + 1] += 1;
        }
    }
    for i in 0..n {
        optr[i + 1] += optr[i];
    }
    let count = optr[n];
    if count == 0 {
        return Ok((vec![0.0], grad));
    }
    let mut dst: Vec<usize> = try_filled(OP, count, 0)?;
    let mut pos = optr.clone();
    for (&a, &b) in src_in.iter().zip(dst_in) {
        if a != b {
            dst[pos[a as usize]] = b as usize;
            pos[a as usize] += 1;
        }
    }
    let (mut iptr, mut inc) = (vec![], vec![]);
    if want_grad {
        iptr = try_filled(OP, n + 1, 0)?;
        for &j in &dst {
            iptr[j + 1] += 1;
        }
        for i in 0..n {
            iptr[i + 1] += iptr[i];
        }
        inc = try_filled(OP, count, 0)?;
        let mut pos = iptr.clone();
        for (eid, &j) in dst.iter().enumerate() {
            inc[pos[j]] = eid;
            pos[j] += 1;
        }
    }
    let k = Hfd {
        s,
        t,
        c,
        optr: &optr,
        dst: &dst,
        iptr: &iptr,
        inc: &inc,
        inv_tau: T::A::of(1.0 / tau),
        scale: T::A::of(1.0 / (tau * count as f64)),
    };
    if !want_grad {
        let total = blocks(n, |lo, len| simd((&k, lo, len)));
        return Ok((vec![total / count as f64], grad));
    }
    let row_bytes = c * std::mem::size_of::<T::A>();
    let chunk = (HFD_CHUNK_BYTES.min(count.saturating_mul(row_bytes) / 8) / row_bytes)
        .clamp(EDGE_BLOCK, count.max(EDGE_BLOCK));
    let mut rows: Vec<T::A> = try_filled(OP, chunk.min(count) * c, T::A::ZERO)?;
    let mut acc: Vec<T::A> = try_filled(OP, n * c, T::A::ZERO)?;
    let pacc = SyncPtr(acc.as_mut_ptr());
    let mut cursor: Vec<usize> = try_filled(OP, n, 0)?;
    cursor.copy_from_slice(&iptr[..n]);
    let pcur = SyncPtr(cursor.as_mut_ptr());
    let mut total = 0.0f64;
    for first in (0..count).step_by(chunk) {
        let last = (first + chunk).min(count);
        let prows = SyncPtr(rows.as_mut_ptr());
        let parts: Vec<f64> = install(|| {
            (first..last)
                .step_by(EDGE_BLOCK)
                .collect::<Vec<_>>()
                .into_par_iter()
                .map(|lo| simd(HfdEdges { k: &k, lo, len: EDGE_BLOCK.min(last - lo), first, rows: prows }))
                .collect()
        });
        total += parts.iter().sum::<f64>();
        let rows = &rows;
        blocks(n, |lo, len| {
            simd(HfdScatter { k: &k, lo, len, first, last, rows, acc: pacc, cursor: pcur });
            0.0
        });
    }
    install(|| {
        grad.par_chunks_mut(ROW_CHUNK * c).zip(acc.par_chunks(ROW_CHUNK * c)).for_each(|(g, a)| {
            for (o, &v) in g.iter_mut().zip(a) {
                *o = T::down(v);
            }
        })
    });
    Ok((vec![total / count as f64], grad))
}

#[inline(always)]
fn row<T>(x: &[T], i: usize, c: usize) -> &[T] {
    &x[i * c..i * c + c]
}

/// Edges ahead whose gathered rows are prefetched: the edge loops read rows at random nodes,
/// and the hardware prefetcher cannot guess them.
const AHEAD: usize = 4;

/// Asks the CPU to bring row `i` of `x` into the cache (a hint: no effect on results; rows out
/// of range are ignored).
#[inline(always)]
fn prefetch_row<T>(x: &[T], i: usize, c: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(r) = x.get(i * c..i * c + c) {
        let bytes = std::mem::size_of_val(r);
        let p = r.as_ptr() as *const i8;
        for off in (0..bytes).step_by(64) {
            // SAFETY: the address lies inside `r`; a prefetch never faults or changes memory.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (x, i, c);
}

/// The Philox stream of [`krd_edge_sampling`].
const KRD_STREAM: u32 = 0x4b52_4400;

/// KRD's reliability-guided edge sampling: edge `e = (i, j)` is kept with probability
/// `1 - shift[j]^power`, `shift` the teacher's entropy shift under noise scaled to [0, 1]
/// (values outside are clamped), decided by the counter-based random word of `e` under `seed`.
pub fn krd_edge_sampling<T: Float>(
    edge_index: &[i64],
    ei_shape: &[usize],
    shift: &[T],
    power: f64,
    seed: u64,
) -> Result<Vec<bool>> {
    const OP: &str = "krd_edge_sampling";
    let n = shift.len();
    let e = check_edge_index(OP, edge_index, ei_shape, n)?;
    if !(power.is_finite() && power > 0.0) {
        return Err(Error::arg(OP, "power", power, "a finite number > 0"));
    }
    if shift.iter().any(|v| v.is_nan()) {
        return Err(Error::NonFinite { op: OP, arg: "entropy_shift" });
    }
    let dst = &edge_index[e..];
    let keep: Vec<f64> = shift.iter().map(|v| 1.0 - v.to_f64().clamp(0.0, 1.0).powf(power)).collect();
    let mut out: Vec<bool> = try_filled(OP, e, false)?;
    const CH: usize = 1 << 14;
    install(|| {
        out.par_chunks_mut(CH).enumerate().for_each(|(b, o)| {
            let start = (b * CH) as u64;
            rng::for_each_word(seed, KRD_STREAM, start, start + o.len() as u64, |i, w| {
                let u = (w >> 8) as f64 * (1.0 / 16_777_216.0);
                o[(i - start) as usize] = u < keep[dst[i as usize] as usize];
            });
        })
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsm(z: &[f64]) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        z.iter().map(|v| v - l).collect()
    }

    fn kl(p_logits: &[f64], q_logits: &[f64]) -> f64 {
        let (lp, lq) = (lsm(p_logits), lsm(q_logits));
        lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum()
    }

    fn data(n: usize, c: usize, seed: u64) -> Vec<f64> {
        (0..n * c).map(|k| (rng::uniform(seed, 1, k as u64) as f64) * 4.0 - 2.0).collect()
    }

    /// Checks an analytic gradient against central differences of `f`.
    fn check_grad(f: &dyn Fn(&[f64]) -> f64, x: &[f64], g: &[f64]) {
        let h = 1e-6;
        for k in 0..x.len() {
            let (mut a, mut b) = (x.to_vec(), x.to_vec());
            a[k] += h;
            b[k] -= h;
            let num = (f(&a) - f(&b)) / (2.0 * h);
            assert!((num - g[k]).abs() < 1e-6, "element {k}: numeric {num} analytic {}", g[k]);
        }
    }

    #[test]
    fn kd_matches_the_formula_and_its_gradient() {
        let (n, c) = (5, 4);
        let (s, t) = (data(n, c, 1), data(n, c, 2));
        let sh = [n, c];
        for (temp, t2, red) in
            [(1.0, false, Reduction::BatchMean), (2.5, true, Reduction::Sum), (0.7, false, Reduction::Mean)]
        {
            let f = |x: &[f64]| kd_loss(x, &sh, &t, &sh, temp, t2, red, false).unwrap().0[0];
            let (loss, g) = kd_loss(&s, &sh, &t, &sh, temp, t2, red, true).unwrap();
            let sc: Vec<f64> = s.iter().map(|v| v / temp).collect();
            let tc: Vec<f64> = t.iter().map(|v| v / temp).collect();
            let mut want: f64 = (0..n).map(|i| kl(&tc[i * c..i * c + c], &sc[i * c..i * c + c])).sum();
            want *= if t2 { temp * temp } else { 1.0 };
            want /= match red {
                Reduction::BatchMean => n as f64,
                Reduction::Mean => (n * c) as f64,
                _ => 1.0,
            };
            assert!((loss[0] - want).abs() < 1e-12);
            check_grad(&f, &s, &g);
        }
        let (rows, _) = kd_loss(&s, &sh, &t, &sh, 1.0, false, Reduction::None, false).unwrap();
        assert_eq!(rows.len(), n);
        assert!(kd_loss(&s, &sh, &t, &sh, 0.0, false, Reduction::Sum, false).is_err());
        assert!(kd_loss(&s, &sh, &t, &[c, n], 1.0, false, Reduction::Sum, false).is_err());
    }

    #[test]
    fn ce_matches_the_formula() {
        let (n, c) = (6, 3);
        let s = data(n, c, 3);
        let labels = [0i64, 2, -1, 1, 5, 0];
        let mask = [true, true, false, true, false, true];
        let (loss, g) = ce_loss(&s, &[n, c], &labels, &mask, true).unwrap();
        let want: f64 =
            [0usize, 1, 3, 5].iter().map(|&i| -lsm(&s[i * c..i * c + c])[labels[i] as usize]).sum::<f64>()
                / 4.0;
        assert!((loss[0] - want).abs() < 1e-12);
        check_grad(&|x: &[f64]| ce_loss(x, &[n, c], &labels, &mask, false).unwrap().0[0], &s, &g);
        let bad = [true, true, false, true, true, true];
        assert_eq!(
            ce_loss(&s, &[n, c], &labels, &bad, false).unwrap_err().to_string(),
            "ce_loss: labels (5 at node 4) must be a class in [0, 3)"
        );
        assert!(ce_loss(&s, &[n, c], &labels, &[false; 6], false).is_err());
    }

    fn edges() -> (Vec<i64>, Vec<usize>) {
        let src = [0i64, 1, 1, 2, 3, 3, 4, 0, 2];
        let dst = [1i64, 0, 2, 1, 3, 0, 2, 1, 4];
        let mut v = src.to_vec();
        v.extend_from_slice(&dst);
        (v, vec![2, src.len()])
    }

    #[test]
    fn lfd_and_hfd_match_the_formulas() {
        let (n, c) = (5, 4);
        let (s, t) = (data(n, c, 4), data(n, c, 5));
        let sh = [n, c];
        let (ei, es) = edges();
        let e = es[1];
        let row = |x: &[f64], i: i64| x[i as usize * c..i as usize * c + c].to_vec();
        // LFD: the given edges plus one loop per node
        let mut want = 0.0;
        for k in 0..e {
            want += kl(&row(&t, ei[e + k]), &row(&s, ei[k]));
        }
        for i in 0..n as i64 {
            want += kl(&row(&t, i), &row(&s, i));
        }
        want /= (e + n) as f64;
        let (loss, g) = lfd_loss(&s, &sh, &t, &sh, &ei, &es, true).unwrap();
        assert!((loss[0] - want).abs() < 1e-12);
        check_grad(&|x: &[f64]| lfd_loss(x, &sh, &t, &sh, &ei, &es, false).unwrap().0[0], &s, &g);
        // HFD: the given edges without loops (edge 3 -> 3 is skipped)
        let tau = 1.3;
        let mut want = 0.0;
        let mut m = 0;
        for k in 0..e {
            let (i, j) = (ei[k], ei[e + k]);
            if i == j {
                continue;
            }
            let a: Vec<f64> = row(&t, i).iter().zip(row(&t, j)).map(|(x, y)| (x - y).abs() / tau).collect();
            let b: Vec<f64> = row(&s, i).iter().zip(row(&s, j)).map(|(x, y)| (x - y).abs() / tau).collect();
            want += kl(&a, &b);
            m += 1;
        }
        want /= m as f64;
        let (loss, g) = hfd_loss(&s, &sh, &t, &sh, &ei, &es, tau, true).unwrap();
        assert!((loss[0] - want).abs() < 1e-12);
        check_grad(&|x: &[f64]| hfd_loss(x, &sh, &t, &sh, &ei, &es, tau, false).unwrap().0[0], &s, &g);
        // only loops: 0
        let (loss, g) = hfd_loss(&s, &sh, &t, &sh, &[2, 2], &[2, 1], tau, true).unwrap();
        assert_eq!(loss[0], 0.0);
        assert!(g.iter().all(|&v| v == 0.0));
        assert!(hfd_loss(&s, &sh, &t, &sh, &ei, &es, 0.0, false).is_err());
        assert!(lfd_loss(&s, &sh, &t, &sh, &[0, 5], &[2, 1], false).is_err());
    }

    #[test]
    fn hfd_gradient_over_many_chunks() {
        // c = 2048 in f64 gives chunks of 512 edges: 1300 edges span three, with ragged ends
        let (n, c, e) = (40usize, 2048usize, 1300usize);
        let (s, t) = (data(n, c, 8), data(n, c, 9));
        let mut ei: Vec<i64> = (0..e).map(|k| (rng::word(2, 2, k as u64) % n as u32) as i64).collect();
        ei.extend((0..e).map(|k| (rng::word(2, 3, k as u64) % n as u32) as i64));
        let (sh, es, tau) = ([n, c], [2, e], 0.7);
        let (loss, g) = hfd_loss(&s, &sh, &t, &sh, &ei, &es, tau, true).unwrap();
        let m = (0..e).filter(|&k| ei[k] != ei[e + k]).count();
        let softmax = |z: Vec<f64>| -> Vec<f64> {
            let l = lsm(&z);
            l.iter().map(|v| v.exp()).collect()
        };
        let (mut want, mut wg) = (0.0, vec![0.0; n * c]);
        for k in 0..e {
            let (i, j) = (ei[k] as usize, ei[e + k] as usize);
            if i == j {
                continue;
            }
            let (si, sj) = (&s[i * c..i * c + c], &s[j * c..j * c + c]);
            let (ti, tj) = (&t[i * c..i * c + c], &t[j * c..j * c + c]);
            let a: Vec<f64> = ti.iter().zip(tj).map(|(x, y)| (x - y).abs() / tau).collect();
            let b: Vec<f64> = si.iter().zip(sj).map(|(x, y)| (x - y).abs() / tau).collect();
            want += kl(&a, &b);
            let (p, q) = (softmax(a), softmax(b));
            for r in 0..c {
                let d = (q[r] - p[r]) * (si[r] - sj[r]).signum() / (tau * m as f64);
                wg[i * c + r] += d;
                wg[j * c + r] -= d;
            }
        }
        assert!((loss[0] - want / m as f64).abs() < 1e-12);
        let (no_grad, _) = hfd_loss(&s, &sh, &t, &sh, &ei, &es, tau, false).unwrap();
        assert!((no_grad[0] - loss[0]).abs() < 1e-12);
        for (x, y) in g.iter().zip(&wg) {
            assert!((x - y).abs() < 1e-12 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }

    #[test]
    fn results_do_not_depend_on_threads() {
        let (n, c) = (700, 9);
        let (s, t) = (data(n, c, 6), data(n, c, 7));
        let e = 5000usize;
        let mut ei: Vec<i64> = (0..e).map(|k| (rng::word(1, 2, k as u64) % n as u32) as i64).collect();
        ei.extend((0..e).map(|k| (rng::word(1, 3, k as u64) % n as u32) as i64));
        let es = [2, e];
        let sh = [n, c];
        let run = || {
            (
                hfd_loss(&s, &sh, &t, &sh, &ei, &es, 1.2, true).unwrap(),
                lfd_loss(&s, &sh, &t, &sh, &ei, &es, true).unwrap(),
                kd_loss(&s, &sh, &t, &sh, 2.0, true, Reduction::BatchMean, true).unwrap(),
            )
        };
        let many = run();
        crate::parallel::set_num_threads(1);
        let one = run();
        crate::parallel::set_num_threads(0);
        assert_eq!(many, one);
    }

    #[test]
    fn krd_sampling_is_seeded_and_follows_the_probabilities() {
        let n = 4;
        let e = 40_000usize;
        let mut ei: Vec<i64> = vec![0; e];
        ei.extend((0..e).map(|k| (k % n) as i64));
        let shift = [0.0f32, 1.0, 0.5, 2.0];
        let a = krd_edge_sampling(&ei, &[2, e], &shift, 1.0, 9).unwrap();
        let b = krd_edge_sampling(&ei, &[2, e], &shift, 1.0, 9).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, krd_edge_sampling(&ei, &[2, e], &shift, 1.0, 10).unwrap());
        let rate = |d: usize| {
            let kept = (0..e).filter(|&k| k % n == d && a[k]).count();
            kept as f64 / (e / n) as f64
        };
        assert_eq!(rate(0), 1.0);
        assert_eq!(rate(1), 0.0);
        assert_eq!(rate(3), 0.0);
        assert!((rate(2) - 0.5).abs() < 0.03);
        assert!(krd_edge_sampling(&ei, &[2, e], &[f32::NAN; 4], 1.0, 0).is_err());
        assert!(krd_edge_sampling(&ei, &[2, e], &shift, 0.0, 0).is_err());
    }
}
