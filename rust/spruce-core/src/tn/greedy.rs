//! Greedy path search, plain and randomized.
//!
//! Three stages: operands with identical index sets are multiplied elementwise first; then,
//! repeatedly, the pair of connected operands whose contraction removes the most memory
//! (`size(result) - size(a) - size(b)`, ties broken by the larger, then the smaller single-
//! assignment id) is contracted; what is left (disconnected parts) is joined by outer products,
//! smallest first. An index shared by every operand is treated as an output index. The
//! randomized variant jitters each candidate's score and draws among the best few with
//! Boltzmann weights; each trial is a pure function of `(seed, trial)`.

use super::big::Big;
use super::cost::Net;
use super::hash::{FastMap, FxHasher};
use super::Fail;
use crate::rng;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::hash::Hasher;

const NONE: u32 = u32::MAX;

/// Index sets interned by content: each distinct set gets a dense id, in order of first
/// appearance. The sets live in one arena; a hash table maps a set's hash to the first id
/// with that hash and `chain` links the others, so interning allocates nothing per set.
#[derive(Default)]
pub(crate) struct Interner {
    data: Vec<u32>,
    span: Vec<(usize, usize)>,
    first: FastMap<u64, u32>,
    chain: Vec<u32>,
}

impl Interner {
    pub fn with_capacity(sets: usize, elems: usize) -> Self {
        Interner {
            data: Vec::with_capacity(elems),
            span: Vec::with_capacity(sets),
            first: FastMap::with_capacity_and_hasher(sets, Default::default()),
            chain: Vec::with_capacity(sets),
        }
    }

    /// The set with id `k`.
    #[inline]
    pub fn get(&self, k: u32) -> &[u32] {
        let (start, len) = self.span[k as usize];
        &self.data[start..start + len]
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.span.len()
    }

    /// The id of `set` and whether it is new.
    pub fn intern(&mut self, set: &[u32]) -> (u32, bool) {
        let mut h = FxHasher::default();
        h.write_usize(set.len());
        for &x in set {
            h.write_u32(x);
        }
        let h = h.finish();
        let head = self.first.get(&h).copied().unwrap_or(NONE);
        let mut k = head;
        while k != NONE {
            if self.get(k) == set {
                return (k, false);
            }
            k = self.chain[k as usize];
        }
        let id = self.span.len() as u32;
        self.span.push((self.data.len(), set.len()));
        self.data.extend_from_slice(set);
        self.chain.push(head);
        self.first.insert(h, id);
        (id, true)
    }
}

/// Counter-based random numbers for one trial.
pub(crate) struct Rng {
    seed: u64,
    stream: u32,
    ctr: u64,
}

impl Rng {
    pub fn new(seed: u64, trial: u64) -> Self {
        Rng { seed: seed ^ (trial >> 32).wrapping_mul(0x9E37_79B9_7F4A_7C15), stream: trial as u32, ctr: 0 }
    }

    fn word(&mut self) -> u32 {
        let w = rng::word(self.seed, self.stream, self.ctr);
        self.ctr += 1;
        w
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        let hi = (self.word() >> 5) as u64;
        let lo = (self.word() >> 6) as u64;
        ((hi << 26) | lo) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Normal with mean `mu` and deviation `sigma` (Box-Muller).
    pub fn gauss(&mut self, mu: f64, sigma: f64) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        mu + sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Settings of the randomized variant.
pub(crate) struct Thermal {
    pub rng: Rng,
    pub temperature: f64,
    pub nbranch: usize,
    /// Score `size(result) - costmod * (size(a) + size(b))`; 1 is the plain memory removed.
    pub costmod: f64,
}

#[derive(Clone, Copy, Debug)]
enum Score<const W: usize> {
    Exact(Big<W>),
    Jittered(f64),
}

impl<const W: usize> Score<W> {
    fn cmp(&self, o: &Self) -> Ordering {
        match (self, o) {
            (Score::Exact(a), Score::Exact(b)) => a.cmp(b),
            (Score::Jittered(a), Score::Jittered(b)) => a.total_cmp(b),
            _ => Ordering::Equal,
        }
    }

    fn f64(&self) -> f64 {
        match self {
            Score::Exact(a) => a.to_f64(),
            Score::Jittered(a) => *a,
        }
    }
}

/// A candidate pair without its result set: what candidates of one push are compared by.
#[derive(Clone, Copy, Debug)]
struct Head<const W: usize> {
    score: Score<W>,
    id_hi: u32,
    id_lo: u32,
    k_lo: u32,
    k_hi: u32,
}

impl<const W: usize> Head<W> {
    fn cmp_key(&self, o: &Self) -> Ordering {
        self.score.cmp(&o.score).then(self.id_hi.cmp(&o.id_hi)).then(self.id_lo.cmp(&o.id_lo))
    }
}

/// A queued candidate; `seq` (creation order) breaks the remaining ties. Its result set is
/// `len` entries of the candidate arena from `start`.
#[derive(Clone, Copy, Debug)]
struct Cand<const W: usize> {
    head: Head<W>,
    seq: u64,
    start: usize,
    len: usize,
}

impl<const W: usize> PartialEq for Cand<W> {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl<const W: usize> Eq for Cand<W> {}
impl<const W: usize> PartialOrd for Cand<W> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<const W: usize> Ord for Cand<W> {
    fn cmp(&self, o: &Self) -> Ordering {
        self.head.cmp_key(&o.head).then(self.seq.cmp(&o.seq))
    }
}

struct Greedy<'a, const W: usize> {
    net: &'a Net,
    out: Vec<bool>,
    keys: Interner,
    key_ssa: Vec<Option<u32>>,
    fp: Vec<Big<W>>,
    dim_keys: Vec<Vec<u32>>,
    /// Per index: 255 for an output index, else how many live keys hold it (at most 254);
    /// an index of a pair's result is kept while `need >= 2` (one side) or `>= 3` (both).
    need: Vec<u8>,
    limit: Option<Big<W>>,
    thermal: Option<Thermal>,
    heap: BinaryHeap<Reverse<Cand<W>>>,
    seq: u64,
    /// Result sets of queued candidates.
    arena: Vec<u32>,
    /// Scratch result sets of [`Greedy::push`] (the one being built, the best so far).
    buf: Vec<u32>,
    best_buf: Vec<u32>,
    /// Neighbour collection: `mark[k] == gen` when key `k` is already listed.
    mark: Vec<u32>,
    gen: u32,
}

impl<const W: usize> Greedy<'_, W> {
    fn intern(&mut self, set: &[u32]) -> Result<u32, Fail> {
        let (k, new) = self.keys.intern(set);
        if new {
            self.fp.push(self.net.size::<W>(set)?);
            self.key_ssa.push(None);
            self.mark.push(0);
        }
        Ok(k)
    }

    fn dim_add(&mut self, d: usize, k: u32) {
        self.dim_keys[d].push(k);
        self.need[d] = self.dim_keys[d].len().min(254) as u8;
    }

    fn dim_remove(&mut self, d: usize, k: u32) {
        if let Some(p) = self.dim_keys[d].iter().position(|&x| x == k) {
            self.dim_keys[d].swap_remove(p);
        }
        self.need[d] = self.dim_keys[d].len().min(254) as u8;
    }

    /// Scores contracting keys `k1` and `k2`, leaving the result's indices in `k12`; `None`
    /// when the result exceeds the memory limit. The merge of the two sorted sets is
    /// branch-free, and the result's size is multiplied up as it goes (in u64 chunks, as
    /// [`Big::product`] does).
    fn candidate(&mut self, k1: u32, k2: u32, k12: &mut Vec<u32>) -> Result<Option<Head<W>>, Fail> {
        let (a, b) = (self.keys.get(k1), self.keys.get(k2));
        let (need, sizes) = (&self.need, &self.net.sizes);
        k12.clear();
        k12.resize(a.len() + b.len(), 0);
        let mut len = 0;
        let mut acc = Big::<W>::one();
        let mut chunk = 1u64;
        let mut take = |d: u32, both: bool, len: &mut usize| -> Result<(), Fail> {
            let keep = need[d as usize] >= 2 + both as u8;
            k12[*len] = d;
            *len += keep as usize;
            let m = if keep { sizes[d as usize] } else { 1 };
            match chunk.checked_mul(m) {
                Some(c) => chunk = c,
                None => {
                    acc = acc.mul_u64(chunk).ck()?;
                    chunk = m;
                }
            }
            Ok(())
        };
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            let (x, y) = (a[i], b[j]);
            i += (x <= y) as usize;
            j += (y <= x) as usize;
            take(x.min(y), x == y, &mut len)?;
        }
        for &d in a[i..].iter().chain(&b[j..]) {
            take(d, false, &mut len)?;
        }
        let size12 = acc.mul_u64(chunk).ck()?;
        k12.truncate(len);
        if let Some(l) = self.limit {
            if size12 > l {
                return Ok(None);
            }
        }
        let removed = size12.sub(self.fp[k1 as usize]).sub(self.fp[k2 as usize]).ck()?;
        let (f1, f2) = (self.fp[k1 as usize], self.fp[k2 as usize]);
        let score = match &mut self.thermal {
            None => Score::Exact(removed),
            Some(t) => {
                let base = if t.costmod == 1.0 {
                    removed.to_f64()
                } else {
                    size12.to_f64() - t.costmod * (f1.to_f64() + f2.to_f64())
                };
                Score::Jittered(t.rng.gauss(1.0, 0.01) * base)
            }
        };
        let (s1, s2) = (self.ssa(k1), self.ssa(k2));
        let (k_lo, k_hi, id_lo, id_hi) = if s1 <= s2 { (k1, k2, s1, s2) } else { (k2, k1, s2, s1) };
        Ok(Some(Head { score, id_hi, id_lo, k_lo, k_hi }))
    }

    fn enqueue(&mut self, head: Head<W>, k12: &[u32]) {
        self.seq += 1;
        let (start, len) = (self.arena.len(), k12.len());
        self.arena.extend_from_slice(k12);
        self.heap.push(Reverse(Cand { head, seq: self.seq, start, len }));
    }

    fn ssa(&self, k: u32) -> u32 {
        self.key_ssa[k as usize].unwrap_or(u32::MAX)
    }

    /// Queues the candidates of `k1` with each of `k2s`: all of them when randomized, else
    /// the best one.
    fn push(&mut self, k1: u32, k2s: &[u32]) -> Result<(), Fail> {
        let mut buf = std::mem::take(&mut self.buf);
        let mut best_buf = std::mem::take(&mut self.best_buf);
        let mut best: Option<Head<W>> = None;
        for &k2 in k2s {
            let Some(h) = self.candidate(k1, k2, &mut buf)? else { continue };
            if self.thermal.is_some() {
                self.enqueue(h, &buf);
            } else if best.as_ref().is_none_or(|b| h.cmp_key(b) == Ordering::Less) {
                best = Some(h);
                std::mem::swap(&mut buf, &mut best_buf);
            }
        }
        if let Some(h) = best {
            self.enqueue(h, &best_buf);
        }
        self.buf = buf;
        self.best_buf = best_buf;
        Ok(())
    }

    fn valid(&self, c: &Cand<W>) -> bool {
        self.key_ssa[c.head.k_lo as usize].is_some() && self.key_ssa[c.head.k_hi as usize].is_some()
    }

    fn choose(&mut self) -> Option<Cand<W>> {
        let Some(th) = &self.thermal else {
            let Reverse(c) = self.heap.pop()?;
            return self.valid(&c).then_some(c);
        };
        let nbranch = th.nbranch.max(1);
        let mut choices: Vec<Cand<W>> = Vec::with_capacity(nbranch);
        while choices.len() < nbranch {
            let Some(Reverse(c)) = self.heap.pop() else { break };
            if self.valid(&c) {
                choices.push(c);
            }
        }
        if choices.len() <= 1 {
            return choices.pop();
        }
        let th = self.thermal.as_mut()?;
        let cmin = choices[0].head.score.f64();
        let temp = th.temperature * cmin.abs().max(1.0);
        let weights: Vec<f64> = choices
            .iter()
            .map(|c| {
                let v = c.head.score.f64();
                if temp == 0.0 {
                    (v == cmin) as u8 as f64
                } else {
                    (-(v - cmin) / temp).exp()
                }
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let mut r = th.rng.uniform() * total;
        let mut pick = choices.len() - 1;
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                pick = i;
                break;
            }
            r -= w;
        }
        let chosen = choices.swap_remove(pick);
        for c in choices {
            self.heap.push(Reverse(c));
        }
        Some(chosen)
    }
}

/// Runs one greedy search; returns a path of single-assignment ids (the last step may join
/// several operands when the memory limit forbids every remaining pair).
pub(crate) fn greedy<const W: usize>(
    net: &Net,
    limit: Option<Big<W>>,
    thermal: Option<Thermal>,
) -> Result<Vec<Vec<u32>>, Fail> {
    let n = net.sets.len();
    let nidx = net.sizes.len();
    let mut out = net.out.clone();
    // An index on every operand can only go at the end: treat it as an output index.
    let mut common = vec![0usize; nidx];
    for s in &net.sets {
        for &i in s {
            common[i as usize] += 1;
        }
    }
    for (i, c) in common.iter().enumerate() {
        if *c == n {
            out[i] = true;
        }
    }
    let mut need = vec![0u8; nidx];
    for (d, o) in out.iter().enumerate() {
        if *o {
            need[d] = 255;
        }
    }
    let elems: usize = net.sets.iter().map(Vec::len).sum();
    let mut g = Greedy::<W> {
        net,
        out,
        keys: Interner::with_capacity(2 * n, 4 * elems),
        key_ssa: Vec::with_capacity(2 * n),
        fp: Vec::with_capacity(2 * n),
        dim_keys: vec![vec![]; nidx],
        need,
        limit,
        thermal,
        heap: BinaryHeap::with_capacity(4 * n),
        seq: 0,
        arena: Vec::with_capacity(8 * elems),
        buf: vec![],
        best_buf: vec![],
        mark: Vec::with_capacity(2 * n),
        gen: 0,
    };
    let mut next = n as u32;
    let mut path: Vec<Vec<u32>> = Vec::with_capacity(2 * n);
    let mut order: Vec<u32> = vec![];
    for (id, s) in net.sets.iter().enumerate() {
        let k = g.intern(s)?;
        match g.key_ssa[k as usize] {
            Some(prev) => {
                if let Some(l) = limit {
                    if g.fp[k as usize] > l {
                        return Err(Fail::Limit);
                    }
                }
                path.push(vec![prev, id as u32]);
                g.key_ssa[k as usize] = Some(next);
                next += 1;
            }
            None => {
                g.key_ssa[k as usize] = Some(id as u32);
                order.push(k);
            }
        }
    }
    for &k in &order {
        for idx in 0..g.keys.get(k).len() {
            let d = g.keys.get(k)[idx] as usize;
            if !g.out[d] {
                g.dim_add(d, k);
            }
        }
    }
    let mut ks: Vec<u32> = vec![];
    for d in 0..nidx {
        if g.dim_keys[d].len() < 2 {
            continue;
        }
        ks.clear();
        ks.extend_from_slice(&g.dim_keys[d]);
        ks.sort_unstable_by_key(|&k| g.ssa(k));
        for i in 0..ks.len() - 1 {
            g.push(ks[i], &ks[i + 1..])?;
        }
    }

    let mut k2s: Vec<u32> = vec![];
    let mut set: Vec<u32> = vec![];
    while !g.heap.is_empty() {
        let Some(c) = g.choose() else { continue };
        let (k1, k2) = (c.head.k_lo, c.head.k_hi);
        let s1 = g.key_ssa[k1 as usize].take().unwrap_or(u32::MAX);
        let s2 = g.key_ssa[k2 as usize].take().unwrap_or(u32::MAX);
        for k in [k1, k2] {
            for idx in 0..g.keys.get(k).len() {
                let d = g.keys.get(k)[idx] as usize;
                if !g.out[d] {
                    g.dim_remove(d, k);
                }
            }
        }
        path.push(vec![s1, s2]);
        set.clear();
        set.extend_from_slice(&g.arena[c.start..c.start + c.len]);
        let k12 = g.intern(&set)?;
        if let Some(prev) = g.key_ssa[k12 as usize] {
            path.push(vec![prev, next]);
            next += 1;
        } else {
            for &d in &set {
                if !g.out[d as usize] {
                    g.dim_add(d as usize, k12);
                }
            }
        }
        g.key_ssa[k12 as usize] = Some(next);
        next += 1;
        k2s.clear();
        g.gen += 1;
        g.mark[k12 as usize] = g.gen;
        for &d in &set {
            for &k in &g.dim_keys[d as usize] {
                if g.mark[k as usize] != g.gen {
                    g.mark[k as usize] = g.gen;
                    k2s.push(k);
                }
            }
        }
        if !k2s.is_empty() {
            g.push(k12, &k2s)?;
        }
    }

    if limit.is_some() && g.dim_keys.iter().any(|ks| ks.len() >= 2) {
        // Every remaining pair would exceed the limit: join what is left in one step.
        let mut rest: Vec<u32> = g.key_ssa.iter().flatten().copied().collect();
        rest.sort_unstable();
        path.push(rest);
        return Ok(path);
    }
    // Outer products of what is left, smallest first.
    let and_out =
        |s: &[u32], out: &[bool]| -> Vec<u32> { s.iter().copied().filter(|&d| out[d as usize]).collect() };
    let mut fin: BinaryHeap<Reverse<(Big<W>, u32, Vec<u32>)>> = BinaryHeap::new();
    for (k, s) in g.key_ssa.iter().enumerate() {
        if let Some(id) = s {
            let set = and_out(g.keys.get(k as u32), &g.out);
            fin.push(Reverse((net.size::<W>(&set)?, *id, set)));
        }
    }
    let Some(Reverse((_, mut id1, mut k1))) = fin.pop() else {
        return Ok(path);
    };
    while let Some(Reverse((_, id2, k2))) = fin.pop() {
        let mut k12: Vec<u32> = k1.iter().chain(k2.iter()).copied().collect();
        k12.sort_unstable();
        k12.dedup();
        let k12 = and_out(&k12, &g.out);
        let cost = net.size::<W>(&k12)?;
        if limit.is_some_and(|l| cost > l) && !fin.is_empty() {
            let mut rest: Vec<u32> = vec![id1, id2];
            rest.extend(fin.iter().map(|Reverse((_, id, _))| *id));
            rest.sort_unstable();
            path.push(rest);
            return Ok(path);
        }
        path.push(vec![id1.min(id2), id1.max(id2)]);
        let id12 = next;
        next += 1;
        let new = (cost, id12, k12);
        match fin.peek() {
            Some(Reverse(top)) if (top.0, top.1) < (new.0, new.1) => {
                let Some(Reverse(t)) = fin.pop() else { break };
                fin.push(Reverse(new));
                (id1, k1) = (t.1, t.2);
            }
            _ => (id1, k1) = (new.1, new.2),
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interner_gives_dense_ids_by_content() {
        let mut it = Interner::with_capacity(1, 1);
        assert_eq!(it.intern(&[1, 5, 9]), (0, true));
        assert_eq!(it.intern(&[]), (1, true));
        assert_eq!(it.intern(&[1, 5]), (2, true));
        assert_eq!(it.intern(&[1, 5, 9]), (0, false));
        assert_eq!(it.intern(&[]), (1, false));
        assert_eq!(it.get(2), &[1, 5]);
        assert_eq!(it.get(1), &[] as &[u32]);
        // Many sets, every one found again with its own id (hash chains included).
        let sets: Vec<Vec<u32>> = (0..2000u32).map(|i| (0..=i % 7).map(|j| j * 1000 + i).collect()).collect();
        let ids: Vec<u32> = sets.iter().map(|s| it.intern(s).0).collect();
        assert_eq!(it.len(), 3 + 2000);
        for (s, &id) in sets.iter().zip(&ids) {
            assert_eq!(it.intern(s), (id, false));
            assert_eq!(it.get(id), s.as_slice());
        }
    }
}
