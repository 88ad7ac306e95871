//! Exhaustive search: the cheapest pairwise path under the cost model, proven optimal.
//!
//! The cost of contracting two intermediates depends only on which inputs each holds (an
//! intermediate of two or more inputs keeps the indices still needed by the output or by inputs
//! outside it; an input keeps all of its own until its first step, which sums away those found
//! nowhere else and pays for them), so the best
//! cost of every subset of inputs follows from its best split: a dynamic program over all
//! 3^n (subset, split) pairs, outer products included. Among the optimal paths the one
//! returned is the first in depth-first order over pairs of single-assignment ids (ascending),
//! which is the path a plain depth-first enumeration with strict improvement reports.
//!
//! With a memory limit every intermediate except the result must fit. Up to 10 operands a
//! depth-first search (with memoized states and the best fitting tree as the initial bound)
//! also considers ending at any state with one step joining what is left, which is what a path
//! must do when no pair fits; beyond 10 operands the best fitting tree is returned (or the
//! caller falls back to greedy).

use super::big::Big;
use super::cost::Net;
use super::{Deadline, Fail};
use std::collections::HashMap;

/// Most operands the exhaustive search takes (3^20 split pairs).
pub(crate) const MAX_OPERANDS: usize = 20;

struct Tables<'a, const W: usize> {
    net: &'a Net,
    words: usize,
    /// Indices of each subset's intermediate, `words` u64 per subset.
    legs: Vec<u64>,
}

impl<const W: usize> Tables<'_, W> {
    fn legs(&self, s: usize) -> &[u64] {
        &self.legs[s * self.words..(s + 1) * self.words]
    }

    fn bits_size(&self, bits: impl Iterator<Item = u64>) -> Result<Big<W>, Fail> {
        let sizes = &self.net.sizes;
        let dims = bits.enumerate().flat_map(|(w, mut word)| {
            std::iter::from_fn(move || {
                (word != 0).then(|| {
                    let b = word.trailing_zeros() as usize;
                    word &= word - 1;
                    sizes[w * 64 + b]
                })
            })
        });
        Ok(Big::product(dims)?)
    }

    /// Cost of joining the intermediates of `a` and `b` (disjoint) into that of `a | b`.
    fn step(&self, a: usize, b: usize) -> Result<Big<W>, Fail> {
        let (la, lb, ls) = (self.legs(a), self.legs(b), self.legs(a | b));
        let removed = (0..self.words).any(|w| (la[w] | lb[w]) & !ls[w] != 0);
        let size = self.bits_size((0..self.words).map(|w| la[w] | lb[w]))?;
        Ok(size.mul_u64(1 + removed as u64).ck()?)
    }
}

fn lowbit(s: usize) -> usize {
    s & s.wrapping_neg()
}

/// Best split table: `best[s]` (None: no fitting tree), `split[s]` the part holding s's low bit.
struct Dp<const W: usize> {
    best: Vec<Option<Big<W>>>,
    split: Vec<usize>,
}

pub(crate) fn optimal<const W: usize>(
    net: &Net,
    limit: Option<Big<W>>,
    deadline: &Deadline,
) -> Result<Vec<Vec<u32>>, Fail> {
    let n = net.sets.len();
    let full = (1usize << n) - 1;
    let words = net.sizes.len().div_ceil(64).max(1);
    let mut union = vec![0u64; (full + 1) * words];
    for s in 1..=full {
        let j = lowbit(s).trailing_zeros() as usize;
        let prev = s & (s - 1);
        for w in 0..words {
            union[s * words + w] = union[prev * words + w];
        }
        for &i in &net.sets[j] {
            union[s * words + i as usize / 64] |= 1 << (i % 64);
        }
    }
    let mut outb = vec![0u64; words];
    for (i, &o) in net.out.iter().enumerate() {
        if o {
            outb[i / 64] |= 1 << (i % 64);
        }
    }
    let mut legs = vec![0u64; (full + 1) * words];
    for s in 1..=full {
        let c = full ^ s;
        for w in 0..words {
            legs[s * words + w] = union[s * words + w] & (outb[w] | union[c * words + w]);
        }
    }
    drop(union);
    // An input keeps every index until its first step: one found on no other operand and not
    // in the output is summed away there (and counted in that step's cost), not beforehand.
    for (j, set) in net.sets.iter().enumerate() {
        let l = &mut legs[(1 << j) * words..((1 << j) + 1) * words];
        for &i in set {
            l[i as usize / 64] |= 1 << (i % 64);
        }
    }
    let t = Tables::<W> { net, words, legs };
    let fits = |s: usize| -> Result<bool, Fail> {
        Ok(match limit {
            Some(l) if s != full && s.count_ones() > 1 => t.bits_size(t.legs(s).iter().copied())? <= l,
            _ => true,
        })
    };

    let mut dp = Dp::<W> { best: vec![None; full + 1], split: vec![0; full + 1] };
    for j in 0..n {
        dp.best[1 << j] = Some(Big::ZERO);
    }
    for s in 1..=full {
        if s.count_ones() < 2 {
            continue;
        }
        if s & 0xfff == 0 && deadline.expired() {
            return Err(Fail::Timeout);
        }
        if !fits(s)? {
            continue;
        }
        let low = lowbit(s);
        let rest = s ^ low;
        let mut cur: Option<Big<W>> = None;
        let mut arg = 0;
        let mut sub = rest;
        loop {
            sub = sub.wrapping_sub(1) & rest;
            let a = low | sub;
            let b = s ^ a;
            if let (Some(ca), Some(cb)) = (dp.best[a], dp.best[b]) {
                let base = ca.add(cb).ck()?;
                if cur.is_none_or(|c| base < c) {
                    let total = base.add(t.step(a, b)?).ck()?;
                    if cur.is_none_or(|c| total < c) {
                        cur = Some(total);
                        arg = a;
                    }
                }
            }
            if sub == 0 {
                break;
            }
        }
        dp.best[s] = cur;
        dp.split[s] = arg;
    }

    let tree = dp.best[full];
    if limit.is_none() {
        let Some(cstar) = tree else { return Err(Fail::Limit) };
        return descend(&t, &dp, n, cstar, deadline);
    }
    // Memory-limited: a depth-first search over fitting pairwise steps, where any state may
    // also end with one step joining what is left; seeded with the best fitting tree.
    if n > MAX_LIMITED {
        return match tree {
            Some(_) => Ok(postorder(&dp, n, &[full])),
            None => Err(Fail::Limit),
        };
    }
    let mut search = Limited {
        t: &t,
        full,
        limit,
        best: tree,
        best_path: tree.map(|_| postorder(&dp, n, &[full])),
        memo: HashMap::new(),
        deadline,
        ticks: 0,
    };
    let blocks: Vec<(usize, u32)> = (0..n).map(|j| (1usize << j, j as u32)).collect();
    search.dfs(&blocks, Big::ZERO, n as u32, &mut vec![])?;
    search.best_path.ok_or(Fail::Limit)
}

/// Most operands for the exhaustive memory-limited search.
const MAX_LIMITED: usize = 10;

struct Limited<'a, 'b, const W: usize> {
    t: &'a Tables<'b, W>,
    full: usize,
    limit: Option<Big<W>>,
    best: Option<Big<W>>,
    best_path: Option<Vec<Vec<u32>>>,
    memo: HashMap<Vec<usize>, Big<W>>,
    deadline: &'a Deadline,
    ticks: u64,
}

impl<const W: usize> Limited<'_, '_, W> {
    fn dfs(
        &mut self,
        blocks: &[(usize, u32)],
        g: Big<W>,
        next: u32,
        path: &mut Vec<Vec<u32>>,
    ) -> Result<(), Fail> {
        self.ticks += 1;
        if self.ticks & 0x3ff == 0 && self.deadline.expired() {
            return Err(Fail::Timeout);
        }
        if blocks.len() == 1 {
            if self.best.is_none_or(|b| g < b) {
                self.best = Some(g);
                self.best_path = Some(path.clone());
            }
            return Ok(());
        }
        if self.best.is_some_and(|b| g >= b) {
            return Ok(());
        }
        let mut key: Vec<usize> = blocks.iter().map(|b| b.0).collect();
        key.sort_unstable();
        if self.memo.get(&key).is_some_and(|&m| m <= g) {
            return Ok(());
        }
        self.memo.insert(key, g);
        // End here: one step over every remaining intermediate.
        let words = self.t.words;
        let mut uni = vec![0u64; words];
        for &(m, _) in blocks {
            for (w, u) in uni.iter_mut().enumerate() {
                *u |= self.t.legs(m)[w];
            }
        }
        let inner = (0..words).any(|w| uni[w] & !self.t.legs(self.full)[w] != 0);
        let k = blocks.len() as u64;
        let end = g.add(self.t.bits_size(uni.iter().copied())?.mul_u64(k - 1 + inner as u64).ck()?).ck()?;
        if self.best.is_none_or(|b| end < b) {
            self.best = Some(end);
            let mut p = path.clone();
            let mut ids: Vec<u32> = blocks.iter().map(|b| b.1).collect();
            ids.sort_unstable();
            p.push(ids);
            self.best_path = Some(p);
        }
        for a in 0..blocks.len() {
            for b in a + 1..blocks.len() {
                let (ma, mb) = (blocks[a].0, blocks[b].0);
                let m = ma | mb;
                if m != self.full {
                    if let Some(l) = self.limit {
                        if self.t.bits_size(self.t.legs(m).iter().copied())? > l {
                            continue;
                        }
                    }
                }
                let ng = g.add(self.t.step(ma, mb)?).ck()?;
                if self.best.is_some_and(|bst| ng >= bst) {
                    continue;
                }
                let mut nb: Vec<(usize, u32)> =
                    blocks.iter().enumerate().filter(|&(i, _)| i != a && i != b).map(|(_, x)| *x).collect();
                nb.push((m, next));
                path.push(vec![blocks[a].1, blocks[b].1]);
                self.dfs(&nb, ng, next + 1, path)?;
                path.pop();
            }
        }
        Ok(())
    }
}

/// The single-assignment path of the trees of `blocks`, each in post-order.
fn postorder<const W: usize>(dp: &Dp<W>, n: usize, blocks: &[usize]) -> Vec<Vec<u32>> {
    fn emit<const W: usize>(dp: &Dp<W>, s: usize, next: &mut u32, path: &mut Vec<Vec<u32>>) -> u32 {
        if s.count_ones() == 1 {
            return s.trailing_zeros();
        }
        let a = emit(dp, dp.split[s], next, path);
        let b = emit(dp, s ^ dp.split[s], next, path);
        path.push(vec![a.min(b), a.max(b)]);
        *next += 1;
        *next - 1
    }
    let mut next = n as u32;
    let mut path = vec![];
    for &b in blocks {
        emit(dp, b, &mut next, &mut path);
    }
    path
}

/// The least cost of joining `blocks` (subsets of inputs, each already built) into one.
fn combine<const W: usize>(t: &Tables<'_, W>, blocks: &[usize]) -> Result<Big<W>, Fail> {
    let k = blocks.len();
    let fullk = (1usize << k) - 1;
    let mut uni = vec![0usize; fullk + 1];
    let mut cost: Vec<Option<Big<W>>> = vec![None; fullk + 1];
    for s in 1..=fullk {
        uni[s] = uni[s & (s - 1)] | blocks[lowbit(s).trailing_zeros() as usize];
        if s.count_ones() == 1 {
            cost[s] = Some(Big::ZERO);
            continue;
        }
        let low = lowbit(s);
        let rest = s ^ low;
        let mut sub = rest;
        let mut cur: Option<Big<W>> = None;
        loop {
            sub = sub.wrapping_sub(1) & rest;
            let a = low | sub;
            let b = s ^ a;
            if let (Some(ca), Some(cb)) = (cost[a], cost[b]) {
                let base = ca.add(cb).ck()?;
                if cur.is_none_or(|c| base < c) {
                    let v = base.add(t.step(uni[a], uni[b])?).ck()?;
                    if cur.is_none_or(|c| v < c) {
                        cur = Some(v);
                    }
                }
            }
            if sub == 0 {
                break;
            }
        }
        cost[s] = cur;
    }
    cost[fullk].ok_or(Fail::Limit)
}

/// The first optimal path in depth-first order over ascending id pairs.
fn descend<const W: usize>(
    t: &Tables<'_, W>,
    dp: &Dp<W>,
    n: usize,
    cstar: Big<W>,
    deadline: &Deadline,
) -> Result<Vec<Vec<u32>>, Fail> {
    let mut blocks: Vec<(usize, u32)> = (0..n).map(|j| (1usize << j, j as u32)).collect();
    let mut next = n as u32;
    let mut built = Big::<W>::ZERO;
    let mut path = Vec::with_capacity(n.saturating_sub(1));
    let best = |s: usize| dp.best[s].unwrap_or(Big::ZERO);
    while blocks.len() > 1 {
        if deadline.expired() {
            return Err(Fail::Timeout);
        }
        let mut chosen = None;
        'pairs: for a in 0..blocks.len() {
            for b in a + 1..blocks.len() {
                let (ma, mb) = (blocks[a].0, blocks[b].0);
                let Some(bm) = dp.best[ma | mb] else { continue };
                let step = t.step(ma, mb)?;
                if best(ma).add(best(mb)).add(step).ck()? != bm {
                    continue;
                }
                let merged_built = built.sub(best(ma)).sub(best(mb)).add(bm);
                let mut rest: Vec<usize> =
                    blocks.iter().enumerate().filter(|&(i, _)| i != a && i != b).map(|(_, x)| x.0).collect();
                rest.push(ma | mb);
                let total = if rest.len() == 1 { merged_built } else { merged_built.add(combine(t, &rest)?) };
                if total.ck()? == cstar {
                    chosen = Some((a, b, bm));
                    break 'pairs;
                }
            }
        }
        let Some((a, b, bm)) = chosen else { return Err(Fail::Limit) };
        let (ma, ia) = blocks[a];
        let (mb, ib) = blocks[b];
        built = built.sub(best(ma)).sub(best(mb)).add(bm);
        path.push(vec![ia, ib]);
        blocks.remove(b);
        blocks.remove(a);
        blocks.push((ma | mb, next));
        next += 1;
    }
    Ok(path)
}
