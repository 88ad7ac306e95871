//! Hyper-optimizing search: seeded greedy trials with varied settings, each tree improved by
//! subtree reconfiguration.
//!
//! Trial `t` runs two greedy searches: random-greedy's trial `t` (plain greedy for `t = 0`, the
//! caller's temperature and branching otherwise, the same random stream), and, for `t > 0`, a
//! greedy whose temperature, branching and cost weighting (`size(result) - costmod * (size(a) +
//! size(b))`) are drawn from `(seed, t)`. The cheaper of the two trees is then reconfigured:
//! nodes are visited most expensive first; each node's subtree is grown to at most
//! `subtree_size` parts (expanding the part with the largest intermediate first) and, where the
//! exhaustive search ([`super::optimal`]) finds a strictly cheaper way to contract those parts,
//! replaced; a node is tried again when something within its reach changed, until no node can
//! be improved. The best tree over all trials (ties: the smaller largest intermediate, then the
//! earlier trial) is then reconfigured with subtrees grown at random (seeded), sweep after sweep
//! until one improves nothing; with a time limit, the budget left is spent on sweeps with
//! larger subtrees (up to 12 parts).
//!
//! Costs are exact ([`Big`]) under the model of [`super::cost`]: a node over index union `I`
//! with `k` children costs `prod(size(I)) * (max(1, k - 1) + [an index is summed away])`, and a
//! tree's cost does not depend on the order its nodes are contracted in. A reconfiguration is
//! accepted only when it lowers the exact cost and every new intermediate fits the memory limit,
//! so it never makes a tree worse or invalid. Without a time limit the result is a pure function
//! of the network, `seed`, `trials`, the settings and the memory limit, on any thread count: it
//! costs no more than plain greedy nor than random-greedy with the same seed, trials,
//! temperature and branching. With a time limit, trials stop starting after 70% of it and
//! reconfiguration stops at the deadline, so the result depends on the machine's speed.

use super::big::Big;
use super::cost::Net;
use super::greedy::{self, Rng, Thermal};
use super::{optimal, Deadline, Fail};
use crate::parallel;
use rayon::prelude::*;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::Instant;

/// Settings of [`hyper`].
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub trials: u64,
    pub seed: u64,
    /// Random-greedy's temperature and branching for the first greedy of each trial.
    pub temperature: f64,
    pub nbranch: usize,
    /// Most parts of a reconfigured subtree (the exhaustive search grows as 3^parts).
    pub subtree_size: usize,
}

/// Smallest and largest accepted `subtree_size`.
pub(crate) const SUBTREE_SIZES: (usize, usize) = (3, 12);

/// Trials run in parallel per batch (the time limit is checked between trials).
const BATCH: u64 = 16;

/// A contraction tree with each node's indices and cost.
#[derive(Clone, Debug)]
pub(crate) struct Tree<const W: usize> {
    n: usize,
    /// Children of each node (empty for the leaves `0..n`).
    children: Vec<Vec<u32>>,
    /// Parent of each node (`u32::MAX` for the root).
    parent: Vec<u32>,
    /// Each node's intermediate: (index, number of leaves below holding it), by index.
    legs: Vec<Vec<(u32, u32)>>,
    /// Each node's step cost (zero for leaves).
    cost: Vec<Big<W>>,
    root: u32,
    total: Big<W>,
}

/// What every tree of one network shares.
pub(crate) struct Ctx<'a, const W: usize> {
    net: &'a Net,
    /// Number of operands holding each index.
    count: Vec<u32>,
    limit: Option<Big<W>>,
}

impl<'a, const W: usize> Ctx<'a, W> {
    pub fn new(net: &'a Net, limit: Option<Big<W>>) -> Self {
        let mut count = vec![0u32; net.sizes.len()];
        for s in &net.sets {
            for &i in s {
                count[i as usize] += 1;
            }
        }
        Ctx { net, count, limit }
    }

    /// The intermediate of joining `parts`, and the step's cost.
    fn join(&self, parts: &[&[(u32, u32)]]) -> Result<(Vec<(u32, u32)>, Big<W>), Fail> {
        let mut all: Vec<(u32, u32)> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        all.sort_unstable_by_key(|x| x.0);
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(all.len());
        for (i, c) in all {
            match merged.last_mut() {
                Some(last) if last.0 == i => last.1 += c,
                _ => merged.push((i, c)),
            }
        }
        let union = self.net.size::<W>(&merged.iter().map(|x| x.0).collect::<Vec<_>>())?;
        let before = merged.len();
        merged.retain(|&(i, c)| self.net.out[i as usize] || c < self.count[i as usize]);
        let removed = merged.len() < before;
        let k = parts.len() as u64;
        let cost = union.mul_u64(k.saturating_sub(1).max(1) + removed as u64).ck()?;
        Ok((merged, cost))
    }

    fn size(&self, legs: &[(u32, u32)]) -> Result<Big<W>, Fail> {
        Ok(Big::product(legs.iter().map(|x| self.net.sizes[x.0 as usize]))?)
    }

    /// The tree of a path of single-assignment ids.
    pub fn tree(&self, ssa: &[Vec<u32>]) -> Result<Tree<W>, Fail> {
        let n = self.net.sets.len();
        let mut t = Tree {
            n,
            children: vec![vec![]; n],
            parent: vec![u32::MAX; n],
            legs: self.net.sets.iter().map(|s| s.iter().map(|&i| (i, 1)).collect()).collect(),
            cost: vec![Big::ZERO; n],
            root: n.saturating_sub(1) as u32,
            total: Big::ZERO,
        };
        for step in ssa {
            let parts: Vec<&[(u32, u32)]> = step.iter().map(|&c| t.legs[c as usize].as_slice()).collect();
            let (legs, cost) = self.join(&parts)?;
            t.total = t.total.add(cost).ck()?;
            let v = t.children.len() as u32;
            for &c in step {
                t.parent[c as usize] = v;
            }
            t.parent.push(u32::MAX);
            t.children.push(step.clone());
            t.legs.push(legs);
            t.cost.push(cost);
            t.root = t.children.len() as u32 - 1;
        }
        Ok(t)
    }

    /// Cost and largest intermediate of a tree (the sort key of trees).
    fn key(&self, t: &Tree<W>) -> Result<(Big<W>, Big<W>), Fail> {
        let mut largest = Big::one();
        for v in t.n..t.children.len() {
            let s = self.size(&t.legs[v])?;
            if s > largest {
                largest = s;
            }
        }
        Ok((t.total, largest))
    }

    /// Tries to replace the subtree below `r` (grown to at most `size` parts) by a cheaper one;
    /// returns the nodes that changed. `rng` picks the part to expand at random.
    fn improve(
        &self,
        t: &mut Tree<W>,
        r: u32,
        size: usize,
        rng: Option<&mut Rng>,
        deadline: &Deadline,
    ) -> Result<Vec<u32>, Fail> {
        let binary = |v: u32| t.children[v as usize].len() == 2;
        if !binary(r) {
            return Ok(vec![]);
        }
        let mut parts: Vec<u32> = t.children[r as usize].clone();
        let mut inner = vec![r];
        let mut rng = rng;
        while parts.len() < size {
            let open: Vec<usize> = (0..parts.len()).filter(|&p| binary(parts[p])).collect();
            if open.is_empty() {
                break;
            }
            let pick = match rng.as_deref_mut() {
                Some(g) => open[((g.uniform() * open.len() as f64) as usize).min(open.len() - 1)],
                None => {
                    let mut best = open[0];
                    for &p in &open[1..] {
                        let (a, b) = (parts[p] as usize, parts[best] as usize);
                        if (t.legs[a].len(), t.cost[a], Reverse(a)) > (t.legs[b].len(), t.cost[b], Reverse(b))
                        {
                            best = p;
                        }
                    }
                    best
                }
            };
            let v = parts.swap_remove(pick);
            inner.push(v);
            parts.extend_from_slice(&t.children[v as usize]);
        }
        if parts.len() < 3 {
            return Ok(vec![]);
        }
        parts.sort_unstable();
        let mut old = Big::<W>::ZERO;
        for &v in &inner {
            old = old.add(t.cost[v as usize]).ck()?;
        }
        // The parts as a network of their own: indices renumbered, the output that of `r`.
        let mut local: HashMap<u32, u32> = HashMap::new();
        let mut sizes = vec![];
        let mut sets = Vec::with_capacity(parts.len());
        for &p in &parts {
            let mut s = Vec::with_capacity(t.legs[p as usize].len());
            for &(i, _) in &t.legs[p as usize] {
                let id = *local.entry(i).or_insert_with(|| {
                    sizes.push(self.net.sizes[i as usize]);
                    sizes.len() as u32 - 1
                });
                s.push(id);
            }
            s.sort_unstable();
            sets.push(s);
        }
        let mut out = vec![false; sizes.len()];
        for &(i, _) in &t.legs[r as usize] {
            out[local[&i] as usize] = true;
        }
        let sub = Net { sets, out, sizes };
        // Most subtrees cost far less than 2^120: search them with two-limb integers.
        let narrow = match self.limit {
            None => Some(None),
            Some(l) if l.0[2..].iter().all(|&x| x == 0) => Some(Some(Big::<2>([l.0[0], l.0[1]]))),
            Some(_) => None,
        };
        let found = match narrow {
            Some(l) if W > 2 => match optimal::optimal::<2>(&sub, l.filter(|b| b.fits()), deadline) {
                Err(Fail::Overflow) => optimal::optimal::<W>(&sub, self.limit, deadline),
                other => other,
            },
            _ => optimal::optimal::<W>(&sub, self.limit, deadline),
        };
        let ssa = match found {
            Ok(p) => p,
            Err(Fail::Limit) => return Ok(vec![]),
            Err(e) => return Err(e),
        };
        if ssa.len() != parts.len() - 1 || ssa.iter().any(|s| s.len() != 2) {
            return Ok(vec![]);
        }
        // Evaluate the new subtree exactly before touching the tree.
        let m = parts.len();
        let mut legs: Vec<Vec<(u32, u32)>> = parts.iter().map(|&p| t.legs[p as usize].clone()).collect();
        let mut new = Big::<W>::ZERO;
        let mut steps = Vec::with_capacity(m - 1);
        for (j, s) in ssa.iter().enumerate() {
            let (l, c) = self.join(&[&legs[s[0] as usize], &legs[s[1] as usize]])?;
            if j + 2 < m {
                if let Some(lim) = self.limit {
                    if self.size(&l)? > lim {
                        return Ok(vec![]);
                    }
                }
            }
            new = new.add(c).ck()?;
            legs.push(l);
            steps.push(c);
        }
        if new >= old {
            return Ok(vec![]);
        }
        // Node ids: the parts, then the old inner nodes reused (the last step keeps `r`).
        let mut ids: Vec<u32> = parts.clone();
        let mut reuse: Vec<u32> = inner[1..].to_vec();
        reuse.sort_unstable();
        ids.extend(reuse.iter().copied());
        ids.push(r);
        for (j, s) in ssa.iter().enumerate() {
            let v = ids[m + j] as usize;
            t.children[v] = vec![ids[s[0] as usize], ids[s[1] as usize]];
            for c in [s[0], s[1]] {
                t.parent[ids[c as usize] as usize] = v as u32;
            }
            t.legs[v] = std::mem::take(&mut legs[m + j]);
            t.cost[v] = steps[j];
        }
        t.total = t.total.sub(old).add(new).ck()?;
        Ok(ids[m..].to_vec())
    }

    /// Reconfigures the tree. Without `random`: one sweep, most expensive node first, that
    /// retries a node only when something within its reach changed, so it ends when no
    /// subtree grown the deterministic way can be improved. With `random`: sweeps growing
    /// subtrees at random from `(seed, sweep)`, repeated until one improves nothing.
    pub fn reconfigure(
        &self,
        t: &mut Tree<W>,
        size: usize,
        random: Option<u64>,
        deadline: &Deadline,
    ) -> Result<(), Fail> {
        match random {
            None => {
                self.sweep(t, size, None, deadline)?;
            }
            Some(seed) => {
                for pass in 0u64.. {
                    let mut rng = Rng::new(seed, pass);
                    if !self.sweep(t, size, Some(&mut rng), deadline)? || deadline.expired() {
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// One sweep; true if it improved the tree.
    fn sweep(
        &self,
        t: &mut Tree<W>,
        size: usize,
        mut rng: Option<&mut Rng>,
        deadline: &Deadline,
    ) -> Result<bool, Fail> {
        let mut heap: BinaryHeap<(Big<W>, u32)> =
            (t.n..t.children.len()).map(|v| (t.cost[v], v as u32)).collect();
        let mut queued = vec![true; t.children.len()];
        let mut improved = false;
        while let Some((c, v)) = heap.pop() {
            if !queued[v as usize] || t.cost[v as usize] != c {
                continue;
            }
            queued[v as usize] = false;
            if deadline.expired() {
                break;
            }
            let mut changed = match self.improve(t, v, size, rng.as_deref_mut(), deadline) {
                Ok(c) => c,
                Err(Fail::Timeout) => break,
                Err(e) => return Err(e),
            };
            if changed.is_empty() {
                continue;
            }
            improved = true;
            // Ancestors whose subtrees may reach the changed nodes get another try.
            let mut a = t.parent[v as usize];
            for _ in 1..size {
                if a == u32::MAX {
                    break;
                }
                changed.push(a);
                a = t.parent[a as usize];
            }
            for u in changed {
                queued[u as usize] = true;
                heap.push((t.cost[u as usize], u));
            }
        }
        Ok(improved)
    }

    /// A single-assignment path of a tree (children before parents, smaller ids first).
    pub fn ssa(&self, t: &Tree<W>) -> Vec<Vec<u32>> {
        let mut id = vec![u32::MAX; t.children.len()];
        for (j, slot) in id.iter_mut().enumerate().take(t.n) {
            *slot = j as u32;
        }
        let mut next = t.n as u32;
        let mut path = Vec::with_capacity(t.children.len() - t.n);
        let mut stack: Vec<(u32, bool)> = vec![(t.root, false)];
        while let Some((v, expanded)) = stack.pop() {
            let ch = &t.children[v as usize];
            if ch.is_empty() {
                continue;
            }
            if expanded {
                let mut step: Vec<u32> = ch.iter().map(|&c| id[c as usize]).collect();
                step.sort_unstable();
                path.push(step);
                id[v as usize] = next;
                next += 1;
            } else {
                stack.push((v, true));
                for &c in ch.iter().rev() {
                    stack.push((c, false));
                }
            }
        }
        path
    }
}

/// The greedy settings of trial `t > 0`, drawn from `(seed, t)`: temperature (log-uniform in
/// [0.001, 1]), branching (2 to 8) and cost weighting (uniform in [0, 2]).
fn drawn(seed: u64, t: u64) -> Thermal {
    let mut r = Rng::new(seed ^ 0x6879_7065_725f_7472, t);
    let temperature = 10f64.powf(-3.0 + 3.0 * r.uniform());
    let nbranch = 2 + ((r.uniform() * 7.0) as usize).min(6);
    let costmod = 2.0 * r.uniform();
    Thermal { rng: Rng::new(seed ^ 0x6879_7065_725f_6772, t), temperature, nbranch, costmod }
}

/// One greedy search as a tree (one step joining everything where no pair fits the limit).
fn greedy_tree<const W: usize>(ctx: &Ctx<W>, thermal: Option<Thermal>) -> Result<Tree<W>, Fail> {
    let n = ctx.net.sets.len();
    let ssa = match greedy::greedy::<W>(ctx.net, ctx.limit, thermal) {
        Ok(p) => p,
        Err(Fail::Limit) => vec![(0..n as u32).collect()],
        Err(e) => return Err(e),
    };
    ctx.tree(&ssa)
}

type Best<const W: usize> = ((Big<W>, Big<W>), u64, Tree<W>);

/// Runs the search; returns a single-assignment path and the winning trial.
pub(crate) fn hyper<const W: usize>(
    net: &Net,
    limit: Option<Big<W>>,
    s: &Settings,
    deadline: &Deadline,
) -> Result<(Vec<Vec<u32>>, u64), Fail> {
    let ctx = Ctx::<W>::new(net, limit);
    // Trials stop starting after 70% of the time limit; the rest refines the best tree.
    let trial_deadline = Deadline(deadline.0.map(|d| {
        let now = Instant::now();
        now + d.saturating_duration_since(now).mul_f64(0.7)
    }));
    let trial = |t: u64| -> Result<Option<Best<W>>, Fail> {
        if t != 0 && trial_deadline.expired() {
            return Ok(None);
        }
        let plain = (t != 0).then(|| Thermal {
            rng: Rng::new(s.seed, t),
            temperature: s.temperature,
            nbranch: s.nbranch,
            costmod: 1.0,
        });
        let mut tree = greedy_tree(&ctx, plain)?;
        if t != 0 {
            let other = greedy_tree(&ctx, Some(drawn(s.seed, t)))?;
            if ctx.key(&other)? < ctx.key(&tree)? {
                tree = other;
            }
        }
        ctx.reconfigure(&mut tree, s.subtree_size, None, &trial_deadline)?;
        Ok(Some((ctx.key(&tree)?, t, tree)))
    };
    let mut best: Option<Best<W>> = None;
    let mut start = 0u64;
    while start < s.trials {
        if start != 0 && trial_deadline.expired() {
            break;
        }
        let end = start.saturating_add(BATCH).min(s.trials);
        let results: Vec<Result<Option<Best<W>>, Fail>> =
            parallel::install(|| (start..end).into_par_iter().map(trial).collect());
        for r in results {
            if let Some(b) = r? {
                if best.as_ref().is_none_or(|x| (b.0, b.1) < (x.0, x.1)) {
                    best = Some(b);
                }
            }
        }
        start = end;
    }
    let Some((_, t, mut tree)) = best else { return Err(Fail::Timeout) };
    // Refine the winner with subtrees grown at random; with a time limit, then with larger
    // subtrees until the budget is spent.
    let refine = s.seed ^ 0x6879_7065_725f_7266;
    ctx.reconfigure(&mut tree, s.subtree_size, Some(refine), deadline)?;
    if deadline.0.is_some() {
        for size in s.subtree_size + 1..=SUBTREE_SIZES.1 {
            if deadline.expired() {
                break;
            }
            ctx.reconfigure(&mut tree, size, Some(refine ^ size as u64), deadline)?;
        }
    }
    Ok((ctx.ssa(&tree), t))
}

#[cfg(test)]
mod tests {
    use super::super::cost::{report, ssa_to_linear, totals};
    use super::super::parse::parse;
    use super::*;

    /// A random 3-regular-ish network on `n` operands (each edge of size `bond`).
    fn ring_network(n: usize, bond: usize, seed: u64) -> (String, Vec<Vec<usize>>) {
        let mut r = Rng::new(seed, 0);
        let mut terms: Vec<Vec<usize>> = vec![vec![]; n];
        let mut id = 0;
        for i in 0..n {
            terms[i].push(id);
            terms[(i + 1) % n].push(id);
            id += 1;
        }
        for i in 0..n / 2 {
            let j = (r.uniform() * n as f64) as usize % n;
            if j != i && j != (i + 1) % n && (j + 1) % n != i {
                terms[i].push(id);
                terms[j].push(id);
                id += 1;
            }
        }
        let eq = terms
            .iter()
            .map(|t| t.iter().map(|&i| super::super::parse::symbol(i)).collect::<String>())
            .collect::<Vec<_>>()
            .join(",");
        (format!("{eq}->"), terms.iter().map(|t| vec![bond; t.len()]).collect())
    }

    #[test]
    fn reconfiguration_never_increases_cost_and_keeps_a_valid_path() {
        for seed in 0..4 {
            let (eq, shapes) = ring_network(40, 2, seed);
            let network = parse(&eq, &shapes).unwrap();
            let net = Net::new(&network);
            let ctx = Ctx::<2>::new(&net, None);
            let mut tree = greedy_tree(&ctx, Some(drawn(seed, 1))).ok().unwrap();
            let before = tree.total;
            let e0 = totals::<2>(&net, &ssa_to_linear(40, &ctx.ssa(&tree))).ok().unwrap();
            assert_eq!(e0.opt_cost, before);
            for size in [3, 6, 9] {
                let prev = tree.total;
                ctx.reconfigure(&mut tree, size, Some(seed), &Deadline(None)).ok().unwrap();
                assert!(tree.total <= prev);
                let e = totals::<2>(&net, &ssa_to_linear(40, &ctx.ssa(&tree))).ok().unwrap();
                assert_eq!(e.opt_cost, tree.total, "tree cost is exact");
            }
            assert!(tree.total < before, "seed {seed}: reconfiguration improved nothing");
        }
    }

    #[test]
    fn seeded_deterministic_and_no_worse_than_random_greedy() {
        use super::super::{contract_path, MemoryLimit, Optimize, PathInfo, PathOptions};
        let (eq, shapes) = ring_network(60, 3, 11);
        let run = |optimize: Optimize| {
            let opts = PathOptions { optimize, memory_limit: MemoryLimit::Unlimited, time_limit: None };
            contract_path(&eq, &shapes, &opts).unwrap()
        };
        let hyper = |seed: u64| {
            run(Optimize::Hyper { trials: 6, seed, temperature: 1.0, nbranch: 8, subtree_size: 6 })
        };
        let (a, b, c) = (hyper(1), hyper(1), hyper(2));
        assert_eq!(a.path, b.path);
        assert_eq!(a.best_trial, b.best_trial);
        assert_ne!(a.path, c.path);
        let rg =
            run(Optimize::RandomGreedy { trials: 6, first_trial: 0, seed: 1, temperature: 1.0, nbranch: 8 });
        let cost = |i: &PathInfo| i.opt_cost.parse::<u128>().unwrap();
        assert!(cost(&a) <= cost(&rg));
        assert!(cost(&a) < cost(&run(Optimize::Greedy)));
    }

    #[test]
    fn reconfiguration_respects_the_memory_limit() {
        let (eq, shapes) = ring_network(30, 2, 7);
        let network = parse(&eq, &shapes).unwrap();
        let net = Net::new(&network);
        let limit = Big::<2>::from_u64(1 << 6);
        let ctx = Ctx::<2>::new(&net, Some(limit));
        let mut tree = greedy_tree(&ctx, None).ok().unwrap();
        ctx.reconfigure(&mut tree, 8, None, &Deadline(None)).ok().unwrap();
        let p = ssa_to_linear(30, &ctx.ssa(&tree));
        let steps = report::<2>(&network, &net, &p).ok().unwrap();
        for st in &steps[..steps.len() - 1] {
            assert!(st.size <= limit);
        }
    }
}
