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
use super::Fail;
use crate::rng;
use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// A fast multiplicative hasher for index sets (interning is on the hot path).
#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(v as u64);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

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

#[derive(Clone, Debug)]
struct Cand<const W: usize> {
    score: Score<W>,
    id_hi: u32,
    id_lo: u32,
    seq: u64,
    k_lo: u32,
    k_hi: u32,
    k12: Vec<u32>,
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
        self.score
            .cmp(&o.score)
            .then(self.id_hi.cmp(&o.id_hi))
            .then(self.id_lo.cmp(&o.id_lo))
            .then(self.seq.cmp(&o.seq))
    }
}

struct Greedy<'a, const W: usize> {
    net: &'a Net,
    out: Vec<bool>,
    keys: Vec<Vec<u32>>,
    key_map: FastMap<Vec<u32>, u32>,
    key_ssa: Vec<Option<u32>>,
    fp: Vec<Big<W>>,
    dim_keys: Vec<Vec<u32>>,
    limit: Option<Big<W>>,
    thermal: Option<Thermal>,
    heap: BinaryHeap<Reverse<Cand<W>>>,
    seq: u64,
}

impl<const W: usize> Greedy<'_, W> {
    fn intern(&mut self, set: Vec<u32>) -> Result<u32, Fail> {
        if let Some(&k) = self.key_map.get(&set) {
            return Ok(k);
        }
        let k = self.keys.len() as u32;
        self.fp.push(self.net.size::<W>(&set)?);
        self.key_map.insert(set.clone(), k);
        self.keys.push(set);
        self.key_ssa.push(None);
        Ok(k)
    }

    fn candidate(&mut self, k1: u32, k2: u32) -> Result<Option<Cand<W>>, Fail> {
        let (a, b) = (&self.keys[k1 as usize], &self.keys[k2 as usize]);
        let mut k12 = Vec::with_capacity(a.len() + b.len());
        let (mut i, mut j) = (0, 0);
        let keep = |d: u32, both: bool| -> bool {
            let du = d as usize;
            self.out[du] || self.dim_keys[du].len() >= if both { 3 } else { 2 }
        };
        while i < a.len() || j < b.len() {
            let (d, both) = if j >= b.len() || (i < a.len() && a[i] < b[j]) {
                i += 1;
                (a[i - 1], false)
            } else if i >= a.len() || b[j] < a[i] {
                j += 1;
                (b[j - 1], false)
            } else {
                i += 1;
                j += 1;
                (a[i - 1], true)
            };
            if keep(d, both) {
                k12.push(d);
            }
        }
        let size12 = self.net.size::<W>(&k12)?;
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
        self.seq += 1;
        Ok(Some(Cand { score, id_hi, id_lo, seq: self.seq, k_lo, k_hi, k12 }))
    }

    fn ssa(&self, k: u32) -> u32 {
        self.key_ssa[k as usize].unwrap_or(u32::MAX)
    }

    fn push(&mut self, k1: u32, k2s: &[u32]) -> Result<(), Fail> {
        let mut best: Option<Cand<W>> = None;
        for &k2 in k2s {
            if let Some(c) = self.candidate(k1, k2)? {
                if self.thermal.is_some() {
                    self.heap.push(Reverse(c));
                } else if best.as_ref().is_none_or(|b| c < *b) {
                    best = Some(c);
                }
            }
        }
        if let Some(c) = best {
            self.heap.push(Reverse(c));
        }
        Ok(())
    }

    fn valid(&self, c: &Cand<W>) -> bool {
        self.key_ssa[c.k_lo as usize].is_some() && self.key_ssa[c.k_hi as usize].is_some()
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
        let cmin = choices[0].score.f64();
        let temp = th.temperature * cmin.abs().max(1.0);
        let weights: Vec<f64> = choices
            .iter()
            .map(|c| {
                let v = c.score.f64();
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
    let mut g = Greedy::<W> {
        net,
        out,
        keys: vec![],
        key_map: FastMap::default(),
        key_ssa: vec![],
        fp: vec![],
        dim_keys: vec![vec![]; nidx],
        limit,
        thermal,
        heap: BinaryHeap::new(),
        seq: 0,
    };
    let mut next = n as u32;
    let mut path: Vec<Vec<u32>> = Vec::with_capacity(2 * n);
    let mut order: Vec<u32> = vec![];
    for (id, s) in net.sets.iter().enumerate() {
        let k = g.intern(s.clone())?;
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
        for &d in &g.keys[k as usize] {
            if !g.out[d as usize] {
                g.dim_keys[d as usize].push(k);
            }
        }
    }
    for d in 0..nidx {
        if g.dim_keys[d].len() < 2 {
            continue;
        }
        let mut ks = g.dim_keys[d].clone();
        ks.sort_unstable_by_key(|&k| g.ssa(k));
        for i in 0..ks.len() - 1 {
            g.push(ks[i], &ks[i + 1..])?;
        }
    }

    while !g.heap.is_empty() {
        let Some(c) = g.choose() else { continue };
        let (k1, k2) = (c.k_lo, c.k_hi);
        let s1 = g.key_ssa[k1 as usize].take().unwrap_or(u32::MAX);
        let s2 = g.key_ssa[k2 as usize].take().unwrap_or(u32::MAX);
        for k in [k1, k2] {
            for idx in 0..g.keys[k as usize].len() {
                let d = g.keys[k as usize][idx] as usize;
                if !g.out[d] {
                    if let Some(p) = g.dim_keys[d].iter().position(|&x| x == k) {
                        g.dim_keys[d].swap_remove(p);
                    }
                }
            }
        }
        path.push(vec![s1, s2]);
        let k12 = g.intern(c.k12)?;
        if let Some(prev) = g.key_ssa[k12 as usize] {
            path.push(vec![prev, next]);
            next += 1;
        } else {
            for idx in 0..g.keys[k12 as usize].len() {
                let d = g.keys[k12 as usize][idx] as usize;
                if !g.out[d] {
                    g.dim_keys[d].push(k12);
                }
            }
        }
        g.key_ssa[k12 as usize] = Some(next);
        next += 1;
        let mut k2s: Vec<u32> = vec![];
        for &d in &g.keys[k12 as usize] {
            for &k in &g.dim_keys[d as usize] {
                if k != k12 && !k2s.contains(&k) {
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
            let set = and_out(&g.keys[k], &g.out);
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
