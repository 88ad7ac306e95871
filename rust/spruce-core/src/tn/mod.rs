//! Tensor networks: contraction-path optimization.
//!
//! [`contract_path`] takes an einsum equation and the operands' shapes and returns a path in the
//! linear format (each step lists positions in the current operand list; those operands are
//! removed and their contraction appended) together with its cost under the standard model:
//! a step over index set `I` with `k` operands costs `prod(size(I)) * (max(1, k - 1) + [an
//! index is summed away])`, the path's cost is the sum over steps, and the naive cost is that
//! of one step over all operands. Costs are exact integers of any size (returned as decimal
//! strings).
//!
//! Optimizers: `optimal` (exhaustive, proven optimal over pairwise paths, outer products
//! included), `dp` (exact among paths without outer products), `greedy`, `random-greedy`
//! (seeded trials, the first one plain greedy), `hyper` (greedy trials with varied settings,
//! each tree improved by exact subtree reconfiguration; see [`hyper`]) and `auto` (optimal up to
//! 8 operands, the better of dp and greedy up to 12, greedy beyond). Every optimizer honours a
//! memory limit on intermediates; where no pairwise path fits, the path ends by contracting what
//! is left in one step. A time limit bounds `optimal`, `dp` (both fall back to greedy),
//! `random-greedy` (which stops starting trials) and `hyper` (trials stop after 70% of it,
//! reconfiguration at the deadline).
//!
//! Exact integers are fixed-width ([`big::Big`]); each stage (the search, the totals of the
//! path, the naive cost, the step report) starts at the narrowest width its numbers are likely
//! to fit and retries wider when they do not, so a huge naive cost never slows the search.
//! [`contract_path`] returns the path and its totals; [`path_steps`] reports a path step by
//! step (einsum equations, costs), on request.

mod big;
mod cost;
mod dp;
mod greedy;
mod hash;
mod hyper;
mod optimal;
mod parse;

pub use parse::{parse, Network};

use crate::{parallel, Error, Result};
use big::{Big, Overflow};
use cost::{naive_cost, report, ssa_to_linear, totals, Net, Totals};
use rayon::prelude::*;
use std::time::{Duration, Instant};

const OP: &str = "contract_path";

/// The largest intermediate a path may create.
#[derive(Clone, Debug, PartialEq)]
pub enum MemoryLimit {
    Unlimited,
    /// At most this many elements.
    Elements(u128),
    /// The largest operand (or the result, if larger).
    MaxInput,
}

/// How to find the path.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimize {
    Auto,
    Optimal,
    Dp,
    Greedy,
    /// Trials `first_trial .. first_trial + trials`; trial 0 is plain greedy, trial `t > 0` a
    /// randomized greedy seeded by `(seed, t)`. The cheapest wins (ties: smaller largest
    /// intermediate, then the earlier trial).
    RandomGreedy {
        trials: u64,
        first_trial: u64,
        seed: u64,
        temperature: f64,
        nbranch: usize,
    },
    /// Trials `0 .. trials` of greedy searches with varied settings, each reconfigured with
    /// subtrees of at most `subtree_size` parts (3 to 12); see the `hyper` module.
    Hyper {
        trials: u64,
        seed: u64,
        temperature: f64,
        nbranch: usize,
        subtree_size: usize,
    },
    /// A path given by the caller (validated and costed).
    Path(Vec<Vec<usize>>),
}

/// Options of [`contract_path`].
#[derive(Clone, Debug, PartialEq)]
pub struct PathOptions {
    pub optimize: Optimize,
    pub memory_limit: MemoryLimit,
    /// Seconds; `None` for no bound.
    pub time_limit: Option<f64>,
}

/// One step of a path.
#[derive(Clone, Debug, PartialEq)]
pub struct PathStep {
    /// Positions in the current operand list, as in the path.
    pub positions: Vec<usize>,
    /// The step as an einsum equation (operands in descending position order).
    pub einsum: String,
    /// Indices summed away by this step.
    pub removed: String,
    /// Cost of the step (decimal).
    pub cost: String,
    /// Number of distinct indices the step touches.
    pub scale: usize,
    /// Elements of the step's result (decimal).
    pub size: String,
}

/// A path and what it costs (its steps: [`path_steps`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PathInfo {
    pub path: Vec<Vec<usize>>,
    pub input_subscripts: String,
    pub output_subscript: String,
    /// Each index's symbol and size, in order of first appearance.
    pub size_dict: Vec<(char, u64)>,
    pub opt_cost: String,
    pub naive_cost: String,
    pub largest_intermediate: String,
    /// The optimizer that produced the path (with the reason when it fell back).
    pub optimizer: String,
    /// For random-greedy and hyper: the winning trial.
    pub best_trial: Option<u64>,
}

/// Why a search stopped without a path.
#[derive(Debug)]
pub(crate) enum Fail {
    /// A value outgrew the integer width: retry wider.
    Overflow,
    Timeout,
    /// No pairwise path fits the memory limit.
    Limit,
    /// A component is too large for the search.
    TooMany(usize),
    Error(Error),
}

impl From<Overflow> for Fail {
    fn from(_: Overflow) -> Self {
        Fail::Overflow
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Error(e)
    }
}

/// A wall-clock bound checked by the searches.
pub(crate) struct Deadline(Option<Instant>);

impl Deadline {
    pub fn expired(&self) -> bool {
        self.0.is_some_and(|d| Instant::now() >= d)
    }
}

/// One random-greedy trial: its path and totals, or `None` when the time limit skipped it.
type TrialResult<const W: usize> = std::result::Result<Option<(Vec<Vec<usize>>, Totals<W>)>, Fail>;

/// Evaluates `$body`, an expression generic over the integer width `$w` (limbs), at widths
/// from `$start` up (2, 4, ..., 64) while it fails with [`Fail::Overflow`].
macro_rules! widen {
    ($start:expr, $w:ident => $body:expr) => {{
        let start: usize = $start;
        let mut r = Err(Fail::Overflow);
        if start <= 2 {
            const $w: usize = 2;
            r = $body;
        }
        if start <= 4 && matches!(r, Err(Fail::Overflow)) {
            const $w: usize = 4;
            r = $body;
        }
        if start <= 8 && matches!(r, Err(Fail::Overflow)) {
            const $w: usize = 8;
            r = $body;
        }
        if start <= 16 && matches!(r, Err(Fail::Overflow)) {
            const $w: usize = 16;
            r = $body;
        }
        if start <= 32 && matches!(r, Err(Fail::Overflow)) {
            const $w: usize = 32;
            r = $body;
        }
        if matches!(r, Err(Fail::Overflow)) {
            const $w: usize = 64;
            r = $body;
        }
        r
    }};
}

/// The narrowest width (limbs) whose range holds `bits`-bit magnitudes.
fn width_for(bits: u64) -> usize {
    [2usize, 4, 8, 16, 32].into_iter().find(|&w| bits < 64 * w as u64 - 8).unwrap_or(64)
}

/// Maps a stage's failure to the caller's error.
fn fail_to_error(f: Fail, eq: &str, optimize: &Optimize) -> Error {
    match f {
        Fail::Error(e) => e,
        Fail::Overflow => Error::arg(OP, "operands", eq, "a network whose sizes and costs stay below 2^4000"),
        other => Error::arg(
            OP,
            "optimize",
            format!("{optimize:?}"),
            format!("a search that completes ({other:?})"),
        ),
    }
}

enum Found {
    Ssa(Vec<Vec<u32>>),
    Linear(Vec<Vec<usize>>),
}

/// Finds a contraction path for `eq` over operands of the given shapes.
pub fn contract_path(eq: &str, shapes: &[Vec<usize>], opts: &PathOptions) -> Result<PathInfo> {
    if shapes.is_empty() {
        return Err(Error::arg(OP, "operands", 0, "at least one operand"));
    }
    let network = parse(eq, shapes)?;
    let net = Net::new(&network);
    let limit = match opts.memory_limit {
        MemoryLimit::Unlimited => None,
        MemoryLimit::Elements(0) => {
            return Err(Error::arg(OP, "memory_limit", 0, "a positive number of elements"))
        }
        MemoryLimit::Elements(l) => Some(l),
        MemoryLimit::MaxInput => {
            network.terms.iter().chain([&network.output]).map(|t| network.term_elements(t)).max()
        }
    };
    let deadline = match opts.time_limit {
        None => Deadline(None),
        Some(t) if t.is_finite() && t >= 0.0 => {
            Deadline(Instant::now().checked_add(Duration::from_secs_f64(t)))
        }
        Some(t) => return Err(Error::arg(OP, "time_limit", t, "a finite number of seconds >= 0")),
    };
    if let Optimize::RandomGreedy { trials, temperature, nbranch, .. } = &opts.optimize {
        if *trials == 0 {
            return Err(Error::arg(OP, "trials", 0, "at least 1"));
        }
        if !(temperature.is_finite() && *temperature >= 0.0) {
            return Err(Error::arg(OP, "temperature", temperature, "a finite number >= 0"));
        }
        if *nbranch == 0 {
            return Err(Error::arg(OP, "nbranch", 0, "at least 1"));
        }
    }
    if let Optimize::Hyper { trials, temperature, nbranch, subtree_size, .. } = &opts.optimize {
        if *trials == 0 {
            return Err(Error::arg(OP, "trials", 0, "at least 1"));
        }
        if !(temperature.is_finite() && *temperature >= 0.0) {
            return Err(Error::arg(OP, "temperature", temperature, "a finite number >= 0"));
        }
        if *nbranch == 0 {
            return Err(Error::arg(OP, "nbranch", 0, "at least 1"));
        }
        let (lo, hi) = hyper::SUBTREE_SIZES;
        if !(lo..=hi).contains(subtree_size) {
            return Err(Error::arg(OP, "subtree_size", subtree_size, format!("in [{lo}, {hi}]")));
        }
    }
    let err = |f: Fail| fail_to_error(f, eq, &opts.optimize);
    let space_bits = net.space_bits();
    // Searches mostly fit 128 bits on small networks; larger ones start at 256.
    let (path, optimizer, best_trial, width) =
        widen!(if space_bits <= 120 { 2 } else { 4 }, W => search::<W>(&net, limit, opts, &deadline).map(|(p, o, t)| (p, o, t, W)))
            .map_err(err)?;
    let (opt_cost, largest_intermediate) =
        widen!(width, W => totals::<W>(&net, &path).map(|t| (t.opt_cost.to_dec(), t.largest.to_dec())))
            .map_err(err)?;
    // Every index at once: at most `space_bits` bits times a factor below 2^64.
    let naive_cost =
        widen!(width_for(space_bits + 64), W => naive_cost::<W>(&net).map(|c| c.to_dec())).map_err(err)?;
    Ok(PathInfo {
        path,
        input_subscripts: network.input_subscripts(),
        output_subscript: network.output_subscript(),
        size_dict: network.symbols.iter().copied().zip(network.sizes.iter().copied()).collect(),
        opt_cost,
        naive_cost,
        largest_intermediate,
        optimizer,
        best_trial,
    })
}

/// Reports a linear path over `eq` step by step: the step's einsum equation (operands in
/// descending position order), the indices it sums away, its exact cost and result size.
pub fn path_steps(eq: &str, shapes: &[Vec<usize>], path: &[Vec<usize>]) -> Result<Vec<PathStep>> {
    if shapes.is_empty() {
        return Err(Error::arg(OP, "operands", 0, "at least one operand"));
    }
    let network = parse(eq, shapes)?;
    let net = Net::new(&network);
    let start = if net.space_bits() <= 120 { 2 } else { 4 };
    widen!(start, W => report::<W>(&network, &net, path).map(|steps| {
        steps
            .into_iter()
            .map(|s| PathStep {
                positions: s.positions,
                einsum: s.einsum,
                removed: s.removed,
                cost: s.cost.to_dec(),
                scale: s.scale,
                size: s.size.to_dec(),
            })
            .collect()
    }))
    .map_err(|f| fail_to_error(f, eq, &Optimize::Path(path.to_vec())))
}

fn greedy_path<const W: usize>(net: &Net, limit: Option<Big<W>>) -> std::result::Result<Found, Fail> {
    match greedy::greedy::<W>(net, limit, None) {
        Ok(p) => Ok(Found::Ssa(p)),
        Err(Fail::Limit) => Ok(Found::Linear(vec![(0..net.sets.len()).collect()])),
        Err(e) => Err(e),
    }
}

fn linear(n: usize, f: Found) -> Vec<Vec<usize>> {
    match f {
        Found::Ssa(p) => ssa_to_linear(n, &p),
        Found::Linear(p) => p,
    }
}

/// The path `opts` asks for, the optimizer's name and (random-greedy) the winning trial.
type Searched = (Vec<Vec<usize>>, String, Option<u64>);

fn search<const W: usize>(
    net: &Net,
    limit: Option<u128>,
    opts: &PathOptions,
    deadline: &Deadline,
) -> std::result::Result<Searched, Fail> {
    let n = net.sets.len();
    // A limit beyond this width never binds while every size fits it.
    let limit_b: Option<Big<W>> = limit.and_then(|l| Some(Big::from_u128(l)).filter(|b| b.fits()));
    let mut best_trial = None;
    let (path, name): (Vec<Vec<usize>>, String) = match &opts.optimize {
        Optimize::Path(p) => (p.clone(), "custom".into()),
        _ if n <= 2 => (vec![(0..n).collect()], "trivial".into()),
        Optimize::Greedy => (linear(n, greedy_path(net, limit_b)?), "greedy".into()),
        Optimize::Optimal => {
            if n > optimal::MAX_OPERANDS {
                return Err(Error::arg(
                    OP,
                    "optimize",
                    format!("'optimal' with {n} operands"),
                    format!(
                        "at most {} operands (the search grows as 3^n); use 'dp' or 'greedy'",
                        optimal::MAX_OPERANDS
                    ),
                )
                .into());
            }
            run_optimal(net, limit_b, deadline)?
        }
        Optimize::Dp => run_dp(net, limit, limit_b, deadline)?,
        Optimize::Auto => {
            if n <= 8 {
                run_optimal(net, limit_b, deadline)?
            } else if n <= 12 {
                let g = linear(n, greedy_path(net, limit_b)?);
                match dp::dp::<W>(net, limit_b, deadline) {
                    Ok(d) => {
                        let cd = totals::<W>(net, &d)?.opt_cost;
                        let cg = totals::<W>(net, &g)?.opt_cost;
                        if cd <= cg {
                            (d, "dp".into())
                        } else {
                            (g, "greedy".into())
                        }
                    }
                    Err(Fail::Overflow) => return Err(Fail::Overflow),
                    Err(Fail::Error(e)) => return Err(Fail::Error(e)),
                    Err(_) => (g, "greedy".into()),
                }
            } else {
                (linear(n, greedy_path(net, limit_b)?), "greedy".into())
            }
        }
        Optimize::RandomGreedy { trials, first_trial, seed, temperature, nbranch } => {
            let (first, count) = (*first_trial, *trials);
            let results: Vec<TrialResult<W>> = parallel::install(|| {
                (first..first.saturating_add(count))
                    .into_par_iter()
                    .map(|t| {
                        if t != first && deadline.expired() {
                            return Ok(None);
                        }
                        let thermal = (t != 0).then(|| greedy::Thermal {
                            rng: greedy::Rng::new(*seed, t),
                            temperature: *temperature,
                            nbranch: *nbranch,
                            costmod: 1.0,
                        });
                        let found = match greedy::greedy::<W>(net, limit_b, thermal) {
                            Ok(p) => Found::Ssa(p),
                            Err(Fail::Limit) => Found::Linear(vec![(0..n).collect()]),
                            Err(e) => return Err(e),
                        };
                        let p = linear(n, found);
                        let e = totals::<W>(net, &p)?;
                        Ok(Some((p, e)))
                    })
                    .collect()
            });
            let mut best: Option<(u64, Vec<Vec<usize>>, Totals<W>)> = None;
            for (t, r) in (first..).zip(results) {
                if let Some((p, e)) = r? {
                    let better = best
                        .as_ref()
                        .is_none_or(|(_, _, b)| (e.opt_cost, e.largest) < (b.opt_cost, b.largest));
                    if better {
                        best = Some((t, p, e));
                    }
                }
            }
            let Some((t, p, _)) = best else { return Err(Fail::Timeout) };
            best_trial = Some(t);
            (p, "random-greedy".into())
        }
        Optimize::Hyper { trials, seed, temperature, nbranch, subtree_size } => {
            let settings = hyper::Settings {
                trials: *trials,
                seed: *seed,
                temperature: *temperature,
                nbranch: *nbranch,
                subtree_size: *subtree_size,
            };
            let (ssa, t) = hyper::hyper::<W>(net, limit_b, &settings, deadline)?;
            best_trial = Some(t);
            (ssa_to_linear(n, &ssa), "hyper".into())
        }
    };
    Ok((path, name, best_trial))
}

fn run_optimal<const W: usize>(
    net: &Net,
    limit_b: Option<Big<W>>,
    deadline: &Deadline,
) -> std::result::Result<(Vec<Vec<usize>>, String), Fail> {
    let n = net.sets.len();
    match optimal::optimal::<W>(net, limit_b, deadline) {
        Ok(p) => Ok((ssa_to_linear(n, &p), "optimal".into())),
        Err(Fail::Timeout) => {
            Ok((linear(n, greedy_path(net, limit_b)?), "greedy (optimal: time limit reached)".into()))
        }
        Err(Fail::Limit) => Ok((
            linear(n, greedy_path(net, limit_b)?),
            "greedy (optimal: no exhaustive result within memory_limit)".into(),
        )),
        Err(e) => Err(e),
    }
}

fn run_dp<const W: usize>(
    net: &Net,
    limit: Option<u128>,
    limit_b: Option<Big<W>>,
    deadline: &Deadline,
) -> std::result::Result<(Vec<Vec<usize>>, String), Fail> {
    let n = net.sets.len();
    match dp::dp::<W>(net, limit_b, deadline) {
        Ok(p) => Ok((p, "dp".into())),
        Err(Fail::Timeout) => Ok((linear(n, greedy_path(net, limit_b)?), "greedy (dp: time limit reached)".into())),
        Err(Fail::Limit) => Err(Error::arg(
            OP,
            "memory_limit",
            limit.map(|l| l.to_string()).unwrap_or_default(),
            "large enough for a path without outer products ('dp' found none; 'greedy' and 'optimal' end with one multi-operand step instead)",
        )
        .into()),
        Err(Fail::TooMany(len)) => Err(Error::arg(
            OP,
            "optimize",
            format!("'dp' on a connected component of {len} operands"),
            "components of at most 64 operands; use 'greedy'",
        )
        .into()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests;
