//! Butterfly products (torch_butterfly's twiddle layout) and the fast Walsh–Hadamard transform.
//!
//! # Layout and semantics
//!
//! A twiddle of shape `(nstacks, nblocks, log_n, n / 2, 2, 2)` holds, for every stack, `nblocks`
//! butterfly blocks of `log_n` factors. Factor `idx` of a block pairs the positions
//! `(pos, pos + s)`, `s = 2^idx` (increasing stride) or `2^(log_n - 1 - idx)` (decreasing), with
//! pair `i` at `low = i % s`, `pos = 2 (i - low) + low`:
//! `y[pos] = t[i,0,0] x[pos] + t[i,0,1] x[pos+s]`, `y[pos+s] = t[i,1,0] x[pos] + t[i,1,1] x[pos+s]`.
//! Successive blocks alternate direction. The input (`in_size` wide) is zero-padded or truncated
//! to `n`, the output truncated to `out_size`; with `transpose` the transposed product is applied
//! (factors in reverse order, each 2x2 transposed).
//!
//! # Kernel
//!
//! A tile of `R` rows is transposed into an `n x R` buffer (rows innermost, one or two SIMD
//! vectors), every factor of every block is applied to it in cache, and it is written once: one
//! pass over memory for all `nblocks * log_n` factors. Half types are widened to f32 on load and
//! rounded on store; arithmetic is f32 (f64 for float64). The backward recomputes the factor
//! inputs of a tile (all of them, or every K-th with recomputation when they would not fit in
//! 48 MiB) and sweeps the factors in reverse; twiddle gradients are summed per tile in a fixed
//! order, per chunk of tiles into a private buffer, and the chunks are reduced in order: no
//! atomics, and the result does not depend on the thread count.

use crate::dtype::{bf16, f16, Float};
use crate::error::{check_numel, fmt_shape, try_zeroed, Error, Result, Zeroable};
use crate::parallel::install;
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Mul, Sub};

/// The arithmetic type of a kernel (f32, or f64 for float64 inputs).
pub trait Acc:
    Copy + Send + Sync + 'static + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + AddAssign
{
    const ZERO: Self;
    /// `self * a + b`, fused when `FMA` (only requested where the CPU has FMA).
    fn madd<const FMA: bool>(self, a: Self, b: Self) -> Self;
    fn from_f64(v: f64) -> Self;
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn madd<const FMA: bool>(self, a: Self, b: Self) -> Self {
        if FMA {
            self.mul_add(a, b)
        } else {
            self * a + b
        }
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Acc for f64 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn madd<const FMA: bool>(self, a: Self, b: Self) -> Self {
        if FMA {
            self.mul_add(a, b)
        } else {
            self * a + b
        }
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// An element type the structured kernels read and write: its arithmetic type and conversions.
pub trait Elem: Float + Zeroable {
    type A: Acc;
    fn load(self) -> Self::A;
    fn store(a: Self::A) -> Self;
}

impl Elem for f32 {
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        a
    }
}

impl Elem for f64 {
    type A = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(a: f64) -> Self {
        a
    }
}

impl Elem for f16 {
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        f16::from_f32(a)
    }
}

impl Elem for bf16 {
    type A = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        bf16::from_f32(a)
    }
}

// ---------------------------------------------------------------------------------------------
// The shape of a butterfly product.

/// A validated butterfly product: twiddle `(nstacks, nblocks, log_n, n/2, 2, 2)`, input
/// `(batch, x_stacks, in_size)` with `x_stacks` 1 (broadcast to every stack) or `nstacks`,
/// output `(batch, nstacks, out_size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ButterflySpec {
    pub batch: usize,
    pub nstacks: usize,
    pub x_stacks: usize,
    pub in_size: usize,
    pub nblocks: usize,
    pub log_n: usize,
    pub out_size: usize,
    pub increasing_stride: bool,
    pub transpose: bool,
}

const OP: &str = "butterfly_multiply";

impl ButterflySpec {
    /// Checks the shapes; `output_size` defaults to `n`.
    pub fn new(
        twiddle_shape: &[usize],
        x_shape: &[usize],
        increasing_stride: bool,
        output_size: Option<usize>,
        transpose: bool,
    ) -> Result<Self> {
        let bad_tw = || {
            Error::shape(
                OP,
                "twiddle",
                twiddle_shape,
                "(nstacks, nblocks, log2(n), n / 2, 2, 2) with n a power of two",
            )
        };
        let &[nstacks, nblocks, log_n, half, a, b] = twiddle_shape else {
            return Err(bad_tw());
        };
        if a != 2 || b != 2 || log_n >= usize::BITS as usize - 1 || half != (1usize << log_n) / 2 {
            return Err(bad_tw());
        }
        if nstacks == 0 {
            return Err(Error::shape(OP, "twiddle", twiddle_shape, "at least one stack (nstacks >= 1)"));
        }
        let &[batch, x_stacks, in_size] = x_shape else {
            return Err(Error::shape(OP, "x", x_shape, "(batch, nstacks, in_size)"));
        };
        if x_stacks != 1 && x_stacks != nstacks {
            return Err(Error::shape(
                OP,
                "x",
                x_shape,
                format!(
                    "(batch, {nstacks}, in_size) or (batch, 1, in_size) for a twiddle of {nstacks} stacks"
                ),
            ));
        }
        let n = 1usize << log_n;
        let out_size = output_size.unwrap_or(n);
        if out_size > n {
            return Err(Error::arg(OP, "output_size", out_size, format!("<= n ({n})")));
        }
        Ok(ButterflySpec {
            batch,
            nstacks,
            x_stacks,
            in_size,
            nblocks,
            log_n,
            out_size,
            increasing_stride,
            transpose,
        })
    }

    pub fn n(&self) -> usize {
        1 << self.log_n
    }

    /// `(batch, nstacks, out_size)`.
    pub fn out_shape(&self) -> [usize; 3] {
        [self.batch, self.nstacks, self.out_size]
    }

    fn twiddle_len(&self) -> usize {
        self.nstacks * self.nblocks * self.log_n * (self.n() / 2) * 4
    }

    fn x_len(&self) -> usize {
        self.batch * self.x_stacks * self.in_size
    }

    fn out_len(&self) -> usize {
        self.batch * self.nstacks * self.out_size
    }

    /// The factors in the order they are applied: `(stride, block * log_n + idx, transposed)`.
    fn steps(&self) -> Vec<Step> {
        let l = self.log_n;
        let mut steps = Vec::with_capacity(self.nblocks * l);
        for block in 0..self.nblocks {
            let inc = self.increasing_stride ^ (block % 2 == 1);
            for idx in 0..l {
                let stride = if inc { 1 << idx } else { 1 << (l - 1 - idx) };
                steps.push(Step { stride, src: block * l + idx, transposed: false });
            }
        }
        if self.transpose {
            steps.reverse();
            for s in &mut steps {
                s.transposed = true;
            }
        }
        steps
    }
}

#[derive(Clone, Copy, Debug)]
struct Step {
    stride: usize,
    /// Position of the factor in its stack's twiddle: `block * log_n + idx`.
    src: usize,
    /// Apply the transposed 2x2 matrices.
    transposed: bool,
}

/// The twiddles of every stack in application order, widened, transposed where the step says:
/// entry `(s * steps + l) * (n/2) + i`.
fn prepare<T: Elem>(twiddle: &[T], spec: &ButterflySpec, steps: &[Step]) -> Vec<[T::A; 4]> {
    let h = spec.n() / 2;
    let per_stack = spec.nblocks * spec.log_n;
    let mut out = Vec::with_capacity(spec.nstacks * steps.len() * h);
    for s in 0..spec.nstacks {
        for st in steps {
            let base = (s * per_stack + st.src) * h * 4;
            for i in 0..h {
                let t = &twiddle[base + 4 * i..base + 4 * i + 4];
                let (a, b, c, d) = (t[0].load(), t[1].load(), t[2].load(), t[3].load());
                out.push(if st.transposed { [a, c, b, d] } else { [a, b, c, d] });
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tile passes. `buf` is `n` positions of `R` lanes (one lane per row of the tile).

#[inline(always)]
fn step_fwd<A: Acc, const R: usize, const FMA: bool>(buf: &mut [[A; R]], tw: &[[A; 4]], s: usize) {
    for (blk, t) in buf.chunks_exact_mut(2 * s).zip(tw.chunks_exact(s)) {
        let (lo, hi) = blk.split_at_mut(s);
        for ((u, v), m) in lo.iter_mut().zip(hi.iter_mut()).zip(t) {
            for r in 0..R {
                let (a, b) = (u[r], v[r]);
                u[r] = m[0].madd::<FMA>(a, m[1] * b);
                v[r] = m[2].madd::<FMA>(a, m[3] * b);
            }
        }
    }
}

/// Two Hadamard factors at once (strides `s` and `2s`): one read and write of the buffer.
#[inline(always)]
fn hadamard_pair<A: Acc, const R: usize>(buf: &mut [[A; R]], s: usize) {
    for blk in buf.chunks_exact_mut(4 * s) {
        let (a, rest) = blk.split_at_mut(s);
        let (b, rest) = rest.split_at_mut(s);
        let (c, d) = rest.split_at_mut(s);
        for (((p, q), u), v) in a.iter_mut().zip(b.iter_mut()).zip(c.iter_mut()).zip(d.iter_mut()) {
            for r in 0..R {
                let (x0, x1, x2, x3) = (p[r], q[r], u[r], v[r]);
                let (y0, y1, y2, y3) = (x0 + x1, x0 - x1, x2 + x3, x2 - x3);
                p[r] = y0 + y2;
                q[r] = y1 + y3;
                u[r] = y0 - y2;
                v[r] = y1 - y3;
            }
        }
    }
}

#[inline(always)]
fn hadamard_one<A: Acc, const R: usize>(buf: &mut [[A; R]], s: usize) {
    for blk in buf.chunks_exact_mut(2 * s) {
        let (lo, hi) = blk.split_at_mut(s);
        for (u, v) in lo.iter_mut().zip(hi.iter_mut()) {
            for r in 0..R {
                let (a, b) = (u[r], v[r]);
                u[r] = a + b;
                v[r] = a - b;
            }
        }
    }
}

/// Sum of the lanes in a fixed pairwise order (vectorizes; the same on every run).
#[inline(always)]
fn hsum<A: Acc, const R: usize>(mut v: [A; R]) -> A {
    let mut w = R;
    while w > 1 {
        w /= 2;
        for r in 0..w {
            v[r] += v[r + w];
        }
    }
    v[0]
}

/// Backward through one factor: `act` is its input, `g` the gradient of its output (replaced by
/// the gradient of its input), `dtw` receives the 2x2 gradients (in the step's own orientation).
#[inline(always)]
fn step_back<A: Acc, const R: usize, const FMA: bool>(
    act: &[[A; R]],
    g: &mut [[A; R]],
    tw: &[[A; 4]],
    dtw: &mut [[A; 4]],
    s: usize,
) {
    for (((ab, gb), t), dt) in act
        .chunks_exact(2 * s)
        .zip(g.chunks_exact_mut(2 * s))
        .zip(tw.chunks_exact(s))
        .zip(dtw.chunks_exact_mut(s))
    {
        let (alo, ahi) = ab.split_at(s);
        let (glo, ghi) = gb.split_at_mut(s);
        for ((((u, v), gp), gq), (m, d)) in
            alo.iter().zip(ahi).zip(glo.iter_mut()).zip(ghi.iter_mut()).zip(t.iter().zip(dt.iter_mut()))
        {
            let (mut d0, mut d1, mut d2, mut d3) = ([A::ZERO; R], [A::ZERO; R], [A::ZERO; R], [A::ZERO; R]);
            for r in 0..R {
                let (a, b, p, q) = (u[r], v[r], gp[r], gq[r]);
                d0[r] = p * a;
                d1[r] = p * b;
                d2[r] = q * a;
                d3[r] = q * b;
                gp[r] = m[0].madd::<FMA>(p, m[2] * q);
                gq[r] = m[1].madd::<FMA>(p, m[3] * q);
            }
            d[0] += hsum(d0);
            d[1] += hsum(d1);
            d[2] += hsum(d2);
            d[3] += hsum(d3);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading and storing tiles.

/// Loads rows `0..rows` of a tile (row `r` starts at `src[r * row_stride..]`, `len` values) into
/// the lanes of `buf`, zero beyond `len` and for lanes past `rows`.
#[inline(always)]
fn load_tile<T: Elem, const R: usize>(
    buf: &mut [[T::A; R]],
    src: &[T],
    rows: usize,
    row_stride: usize,
    len: usize,
) {
    let len = len.min(buf.len());
    for r in 0..R {
        if r < rows {
            let row = &src[r * row_stride..r * row_stride + len];
            for (b, &v) in buf.iter_mut().zip(row) {
                b[r] = v.load();
            }
            for b in &mut buf[len..] {
                b[r] = T::A::ZERO;
            }
        } else {
            for b in buf.iter_mut() {
                b[r] = T::A::ZERO;
            }
        }
    }
}

/// Stores the first `len` positions of lanes `0..rows`, scaled by `scale` when given.
#[inline(always)]
fn store_tile<T: Elem, const R: usize>(
    buf: &[[T::A; R]],
    dst: &mut [T],
    rows: usize,
    row_stride: usize,
    len: usize,
    scale: Option<T::A>,
) {
    for r in 0..rows {
        let row = &mut dst[r * row_stride..r * row_stride + len];
        match scale {
            Some(c) => row.iter_mut().zip(buf).for_each(|(o, b)| *o = T::store(b[r] * c)),
            None => row.iter_mut().zip(buf).for_each(|(o, b)| *o = T::store(b[r])),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-tile kernels, compiled twice on x86-64: baseline and AVX2+FMA (chosen at run time).

struct FwdCtx<'a, T: Elem> {
    spec: &'a ButterflySpec,
    steps: &'a [Step],
    tw: &'a [[T::A; 4]],
}

#[inline(always)]
fn fwd_tile<T: Elem, const R: usize, const FMA: bool>(
    ctx: &FwdCtx<'_, T>,
    x: &[T],
    y: &mut [T],
    rows: usize,
    buf: &mut [[T::A; R]],
) {
    let sp = ctx.spec;
    let (h, nst) = (sp.n() / 2, ctx.steps.len());
    for s in 0..sp.nstacks {
        let sx = if sp.x_stacks == 1 { 0 } else { s };
        load_tile::<T, R>(buf, &x[sx * sp.in_size..], rows, sp.x_stacks * sp.in_size, sp.in_size);
        for (l, st) in ctx.steps.iter().enumerate() {
            let base = (s * nst + l) * h;
            step_fwd::<T::A, R, FMA>(buf, &ctx.tw[base..base + h], st.stride);
        }
        store_tile::<T, R>(buf, &mut y[s * sp.out_size..], rows, sp.nstacks * sp.out_size, sp.out_size, None);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwd_tile_fma<T: Elem, const R: usize>(
    ctx: &FwdCtx<'_, T>,
    x: &[T],
    y: &mut [T],
    rows: usize,
    buf: &mut [[T::A; R]],
) {
    fwd_tile::<T, R, true>(ctx, x, y, rows, buf)
}

fn fwd_tile_best<T: Elem, const R: usize>(
    ctx: &FwdCtx<'_, T>,
    x: &[T],
    y: &mut [T],
    rows: usize,
    buf: &mut [[T::A; R]],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::parallel::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
        return unsafe { fwd_tile_fma::<T, R>(ctx, x, y, rows, buf) };
    }
    fwd_tile::<T, R, false>(ctx, x, y, rows, buf)
}

fn check_lens<T>(spec: &ButterflySpec, twiddle: &[T], x: &[T]) -> Result<()> {
    let n = spec.n();
    let tw_shape = [spec.nstacks, spec.nblocks, spec.log_n, n / 2, 2, 2];
    check_numel(OP, "twiddle", twiddle.len(), &tw_shape)?;
    check_numel(OP, "x", x.len(), &[spec.batch, spec.x_stacks, spec.in_size])
}

fn forward_impl<T: Elem, const R: usize>(twiddle: &[T], x: &[T], spec: &ButterflySpec) -> Result<Vec<T>> {
    check_lens(spec, twiddle, x)?;
    let mut y = try_zeroed(OP, spec.out_len())?;
    if y.is_empty() {
        return Ok(y);
    }
    let steps = spec.steps();
    let tw = prepare(twiddle, spec, &steps);
    let ctx = FwdCtx::<T> { spec, steps: &steps, tw: &tw };
    let (n, xrow, yrow) = (spec.n(), spec.x_stacks * spec.in_size, spec.nstacks * spec.out_size);
    install(|| {
        y.par_chunks_mut(R * yrow).enumerate().for_each_init(
            || vec![[T::A::ZERO; R]; n],
            |buf, (t, yt)| {
                let rows = yt.len() / yrow;
                let x0 = t * R * xrow;
                fwd_tile_best::<T, R>(&ctx, &x[x0..x0 + rows * xrow], yt, rows, buf);
            },
        )
    });
    Ok(y)
}

/// `y[b, s] = B_s · pad(x[b, s or 0])`, truncated to `out_size`, for every stack `s` (with
/// `transpose`, `B_sᵀ`). Returns `(batch, nstacks, out_size)` values, row-major.
pub fn butterfly_multiply<T: Elem>(twiddle: &[T], x: &[T], spec: &ButterflySpec) -> Result<Vec<T>> {
    if T::WIDE {
        forward_impl::<T, 8>(twiddle, x, spec)
    } else {
        forward_impl::<T, 16>(twiddle, x, spec)
    }
}

// ---------------------------------------------------------------------------------------------
// Backward.

/// Most bytes the stored factor inputs of one tile may take before checkpointing kicks in.
const ACT_BUDGET: usize = 48 << 20;
/// Most bytes all the per-chunk twiddle-gradient buffers may take together.
const PARTIAL_BUDGET: usize = 64 << 20;
const MAX_CHUNKS: usize = 64;

struct BackCtx<'a, T: Elem> {
    spec: &'a ButterflySpec,
    steps: &'a [Step],
    tw: &'a [[T::A; 4]],
    /// Steps between stored inputs (1: every input is stored).
    every: usize,
}

struct BackScratch<A, const R: usize> {
    /// Stored inputs of every `every`-th step.
    ck: Vec<[A; R]>,
    /// Inputs of the steps of one segment after its first (recomputed).
    seg: Vec<[A; R]>,
    g: Vec<[A; R]>,
    gx: Vec<[A; R]>,
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn back_tile<T: Elem, const R: usize, const FMA: bool>(
    ctx: &BackCtx<'_, T>,
    x: &[T],
    gy: &[T],
    gx_out: &mut [T],
    rows: usize,
    sc: &mut BackScratch<T::A, R>,
    dtw: &mut [[T::A; 4]],
) {
    let sp = ctx.spec;
    let (n, h, nst, k) = (sp.n(), sp.n() / 2, ctx.steps.len(), ctx.every);
    let xrow = sp.x_stacks * sp.in_size;
    let yrow = sp.nstacks * sp.out_size;
    let m = sp.in_size.min(n);
    if sp.x_stacks == 1 {
        sc.gx.iter_mut().for_each(|v| *v = [T::A::ZERO; R]);
    }
    for s in 0..sp.nstacks {
        let sx = if sp.x_stacks == 1 { 0 } else { s };
        let twb = |l: usize| (s * nst + l) * h;
        // Forward, keeping the input of every k-th step: ck[c] = input of step c * k.
        let nck = nst.div_ceil(k).max(1);
        load_tile::<T, R>(&mut sc.ck[..n], &x[sx * sp.in_size..], rows, xrow, sp.in_size);
        for c in 1..nck {
            let (prev, cur) = sc.ck.split_at_mut(c * n);
            let cur = &mut cur[..n];
            cur.copy_from_slice(&prev[(c - 1) * n..]);
            for l in (c - 1) * k..c * k {
                step_fwd::<T::A, R, FMA>(cur, &ctx.tw[twb(l)..twb(l) + h], ctx.steps[l].stride);
            }
        }
        // The output gradient of this stack.
        load_tile::<T, R>(&mut sc.g, &gy[s * sp.out_size..], rows, yrow, sp.out_size);
        // Backward, segment by segment.
        for c in (0..nck).rev() {
            let start = c * k;
            let end = ((c + 1) * k).min(nst);
            // seg[j] = input of step start + 1 + j
            for l in start..end.saturating_sub(1) {
                let j = l - start;
                let (before, after) = sc.seg.split_at_mut(j * n);
                let input: &[[T::A; R]] =
                    if j == 0 { &sc.ck[c * n..(c + 1) * n] } else { &before[(j - 1) * n..] };
                let out = &mut after[..n];
                out.copy_from_slice(&input[..n]);
                step_fwd::<T::A, R, FMA>(out, &ctx.tw[twb(l)..twb(l) + h], ctx.steps[l].stride);
            }
            for l in (start..end).rev() {
                let j = l - start;
                let act: &[[T::A; R]] =
                    if j == 0 { &sc.ck[c * n..(c + 1) * n] } else { &sc.seg[(j - 1) * n..j * n] };
                let b = twb(l);
                step_back::<T::A, R, FMA>(
                    act,
                    &mut sc.g,
                    &ctx.tw[b..b + h],
                    &mut dtw[b..b + h],
                    ctx.steps[l].stride,
                );
            }
        }
        if sp.x_stacks == 1 {
            for (a, g) in sc.gx.iter_mut().zip(&sc.g) {
                for r in 0..R {
                    a[r] += g[r];
                }
            }
        } else {
            store_rows::<T, R>(&sc.g, &mut gx_out[s * sp.in_size..], rows, xrow, m, sp.in_size);
        }
    }
    if sp.x_stacks == 1 {
        store_rows::<T, R>(&sc.gx, gx_out, rows, xrow, m, sp.in_size);
    }
}

/// Stores lanes `0..rows` into rows of `width`: the first `m` from `buf`, the rest zero.
#[inline(always)]
fn store_rows<T: Elem, const R: usize>(
    buf: &[[T::A; R]],
    dst: &mut [T],
    rows: usize,
    row_stride: usize,
    m: usize,
    width: usize,
) {
    store_tile::<T, R>(buf, dst, rows, row_stride, m, None);
    let zero = T::store(T::A::ZERO);
    for r in 0..rows {
        dst[r * row_stride + m..r * row_stride + width].fill(zero);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn back_tile_fma<T: Elem, const R: usize>(
    ctx: &BackCtx<'_, T>,
    x: &[T],
    gy: &[T],
    gx_out: &mut [T],
    rows: usize,
    sc: &mut BackScratch<T::A, R>,
    dtw: &mut [[T::A; 4]],
) {
    back_tile::<T, R, true>(ctx, x, gy, gx_out, rows, sc, dtw)
}

#[allow(clippy::too_many_arguments)]
fn back_tile_best<T: Elem, const R: usize>(
    ctx: &BackCtx<'_, T>,
    x: &[T],
    gy: &[T],
    gx_out: &mut [T],
    rows: usize,
    sc: &mut BackScratch<T::A, R>,
    dtw: &mut [[T::A; 4]],
) {
    #[cfg(target_arch = "x86_64")]
    if crate::parallel::has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
        return unsafe { back_tile_fma::<T, R>(ctx, x, gy, gx_out, rows, sc, dtw) };
    }
    back_tile::<T, R, false>(ctx, x, gy, gx_out, rows, sc, dtw)
}

pub(super) fn backward_impl<T: Elem, const R: usize>(
    twiddle: &[T],
    x: &[T],
    grad: &[T],
    spec: &ButterflySpec,
    force_every: Option<usize>,
) -> Result<(Vec<T>, Vec<T>)> {
    check_lens(spec, twiddle, x)?;
    check_numel(OP, "grad", grad.len(), &spec.out_shape())?;
    let mut gx = try_zeroed(OP, spec.x_len())?;
    let tw_len = spec.twiddle_len();
    let mut gtw = try_zeroed(OP, tw_len)?;
    if spec.batch == 0 || tw_len == 0 && spec.x_len() == 0 {
        return Ok((gtw, gx));
    }
    let steps = spec.steps();
    let tw = prepare(twiddle, spec, &steps);
    let (n, nst) = (spec.n(), steps.len());
    let lane_bytes = R * std::mem::size_of::<T::A>();
    let every = match force_every {
        Some(k) => k.max(1),
        None if nst * n * lane_bytes <= ACT_BUDGET => 1,
        None => (nst as f64).sqrt().ceil() as usize,
    };
    let nck = nst.div_ceil(every).max(1);
    let ctx = BackCtx::<T> { spec, steps: &steps, tw: &tw, every };
    // Chunks of tiles, each with its own twiddle-gradient buffer: fixed by the shapes alone.
    let ntiles = spec.batch.div_ceil(R);
    let entry = (tw.len() * 4 * std::mem::size_of::<T::A>()).max(1);
    let nchunks = ntiles.min(MAX_CHUNKS).min((PARTIAL_BUDGET / entry).max(1));
    let per_chunk = ntiles.div_ceil(nchunks);
    let nchunks = ntiles.div_ceil(per_chunk);
    let xrow = spec.x_stacks * spec.in_size;
    let yrow = spec.nstacks * spec.out_size;
    let partials: Vec<Vec<[T::A; 4]>> = install(|| {
        let chunk_rows = per_chunk * R;
        let mut parts: Vec<Vec<[T::A; 4]>> = (0..nchunks).map(|_| Vec::new()).collect();
        let gx_chunks: Vec<&mut [T]> = if xrow == 0 {
            (0..nchunks).map(|_| <&mut [T]>::default()).collect()
        } else {
            gx.chunks_mut(chunk_rows * xrow).collect()
        };
        parts.par_iter_mut().zip(gx_chunks).enumerate().for_each(|(c, (part, gxc))| {
            *part = vec![[T::A::ZERO; 4]; tw.len()];
            let mut sc = BackScratch::<T::A, R> {
                ck: vec![[T::A::ZERO; R]; nck * n],
                seg: vec![[T::A::ZERO; R]; every.saturating_sub(1).max(1) * n],
                g: vec![[T::A::ZERO; R]; n],
                gx: if spec.x_stacks == 1 { vec![[T::A::ZERO; R]; n] } else { Vec::new() },
            };
            let row0 = c * chunk_rows;
            let row1 = (row0 + chunk_rows).min(spec.batch);
            let mut gxc = gxc;
            let mut r = row0;
            while r < row1 {
                let rows = R.min(row1 - r);
                let (gxt, rest) = std::mem::take(&mut gxc).split_at_mut(rows * xrow);
                back_tile_best::<T, R>(
                    &ctx,
                    &x[r * xrow..(r + rows) * xrow],
                    &grad[r * yrow..(r + rows) * yrow],
                    gxt,
                    rows,
                    &mut sc,
                    part,
                );
                gxc = rest;
                r += rows;
            }
        });
        parts
    });
    // Reduce the chunks in order, then write in the twiddle's layout.
    let h = n / 2;
    let per_stack = spec.nblocks * spec.log_n;
    if gtw.is_empty() {
        return Ok((gtw, gx));
    }
    install(|| {
        gtw.par_chunks_mut(h * 4).enumerate().for_each(|(f, out)| {
            let (s, src) = (f / per_stack.max(1), f % per_stack.max(1));
            let Some(l) = steps.iter().position(|st| st.src == src) else { return };
            let base = (s * nst + l) * h;
            let transposed = steps[l].transposed;
            for i in 0..h {
                let mut acc = [T::A::ZERO; 4];
                for p in &partials {
                    let d = p[base + i];
                    for j in 0..4 {
                        acc[j] += d[j];
                    }
                }
                let acc = if transposed { [acc[0], acc[2], acc[1], acc[3]] } else { acc };
                for j in 0..4 {
                    out[4 * i + j] = T::store(acc[j]);
                }
            }
        })
    });
    Ok((gtw, gx))
}

/// Gradients of [`butterfly_multiply`] with respect to the twiddle and `x`, given the gradient
/// of its output (`(batch, nstacks, out_size)`). Returns `(grad_twiddle, grad_x)` in the shapes
/// of the twiddle and `x`. Deterministic: no atomics, independent of the thread count.
pub fn butterfly_multiply_backward<T: Elem>(
    twiddle: &[T],
    x: &[T],
    grad: &[T],
    spec: &ButterflySpec,
) -> Result<(Vec<T>, Vec<T>)> {
    if T::WIDE {
        backward_impl::<T, 8>(twiddle, x, grad, spec, None)
    } else {
        backward_impl::<T, 16>(twiddle, x, grad, spec, None)
    }
}

// ---------------------------------------------------------------------------------------------
// Walsh–Hadamard.

#[inline(always)]
fn fwht_tile<T: Elem, const R: usize>(
    x: &[T],
    y: &mut [T],
    rows: usize,
    n: usize,
    scale: Option<T::A>,
    buf: &mut [[T::A; R]],
) {
    load_tile::<T, R>(buf, x, rows, n, n);
    let mut s = 1;
    while 2 * s < n {
        hadamard_pair::<T::A, R>(buf, s);
        s *= 4;
    }
    if s < n {
        hadamard_one::<T::A, R>(buf, s);
    }
    store_tile::<T, R>(buf, y, rows, n, n, scale);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fwht_tile_avx2<T: Elem, const R: usize>(
    x: &[T],
    y: &mut [T],
    rows: usize,
    n: usize,
    scale: Option<T::A>,
    buf: &mut [[T::A; R]],
) {
    fwht_tile::<T, R>(x, y, rows, n, scale, buf)
}

fn fwht_impl<T: Elem, const R: usize>(x: &[T], shape: &[usize], normalized: bool) -> Result<Vec<T>> {
    const FOP: &str = "fwht";
    let Some((&n, lead)) = shape.split_last() else {
        return Err(Error::shape(FOP, "x", shape, "at least one dimension"));
    };
    if !n.is_power_of_two() {
        return Err(Error::Shape {
            op: FOP,
            arg: "x",
            shape: fmt_shape(shape),
            expected: format!("a power-of-two size along the last dimension, got {n} (pad it with zeros)"),
        });
    }
    check_numel(FOP, "x", x.len(), shape)?;
    let rows_total: usize = lead.iter().product();
    let mut y = try_zeroed(FOP, rows_total * n)?;
    if y.is_empty() {
        return Ok(y);
    }
    let scale = normalized.then(|| T::A::from_f64(1.0 / (n as f64).sqrt()));
    let fma = crate::parallel::has_avx2_fma();
    install(|| {
        y.par_chunks_mut(R * n).enumerate().for_each_init(
            || vec![[T::A::ZERO; R]; n],
            |buf, (t, yt)| {
                let rows = yt.len() / n;
                let xt = &x[t * R * n..t * R * n + rows * n];
                #[cfg(target_arch = "x86_64")]
                if fma {
                    // SAFETY: the CPU supports AVX2 and FMA (checked once before the loop).
                    return unsafe { fwht_tile_avx2::<T, R>(xt, yt, rows, n, scale, buf) };
                }
                let _ = fma;
                fwht_tile::<T, R>(xt, yt, rows, n, scale, buf)
            },
        )
    });
    Ok(y)
}

/// The Walsh–Hadamard transform (Sylvester order, `H_{2n} = [[H, H], [H, -H]]`) of every slice
/// along the last dimension, whose size must be a power of two; scaled by `1/sqrt(n)` when
/// `normalized` (then orthonormal and its own inverse).
pub fn fwht<T: Elem>(x: &[T], shape: &[usize], normalized: bool) -> Result<Vec<T>> {
    if T::WIDE {
        fwht_impl::<T, 8>(x, shape, normalized)
    } else {
        fwht_impl::<T, 16>(x, shape, normalized)
    }
}
