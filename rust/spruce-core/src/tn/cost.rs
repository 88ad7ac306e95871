//! The cost model: what a linear path costs, step by step.
//!
//! A step contracts the operands at the listed positions (removed from the current list, the
//! result appended). Its indices are the union of theirs; it keeps those still needed by the
//! output or by another operand; its cost is
//! `prod(sizes of its indices) * (max(1, terms - 1) + [some index is summed away])`. The path's
//! cost is the sum over steps; the naive cost is
//! that of contracting every operand in one step.
//!
//! [`Replay`] walks a path once and is shared by [`totals`] (the exact sums a search needs,
//! no strings) and [`report`] (the per-step einsum equations, built only on request).

use super::big::Big;
use super::parse::Network;
use super::Fail;
use crate::Error;

const OP: &str = "contract_path";

/// A network reduced to what path search needs: each operand's distinct indices.
#[derive(Clone, Debug)]
pub(crate) struct Net {
    /// Distinct index ids of each operand, ascending.
    pub sets: Vec<Vec<u32>>,
    /// Whether each index is in the output.
    pub out: Vec<bool>,
    pub sizes: Vec<u64>,
}

impl Net {
    pub fn new(n: &Network) -> Self {
        let sets = n
            .terms
            .iter()
            .map(|t| {
                let mut s = t.clone();
                s.sort_unstable();
                s.dedup();
                s
            })
            .collect();
        let mut out = vec![false; n.sizes.len()];
        for &o in &n.output {
            out[o as usize] = true;
        }
        Net { sets, out, sizes: n.sizes.clone() }
    }

    pub fn size<const W: usize>(&self, set: &[u32]) -> Result<Big<W>, Fail> {
        Ok(Big::product(set.iter().map(|&i| self.sizes[i as usize]))?)
    }

    /// Bits needed by the product of every index size (an upper bound on any set's size).
    pub fn space_bits(&self) -> u64 {
        self.sizes.iter().map(|&s| 64 - s.max(1).leading_zeros() as u64).sum()
    }
}

/// One evaluated step.
#[derive(Clone, Debug)]
pub(crate) struct StepEval<const W: usize> {
    pub positions: Vec<usize>,
    pub einsum: String,
    pub removed: String,
    pub cost: Big<W>,
    pub scale: usize,
    pub size: Big<W>,
}

/// The exact totals of a path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Totals<const W: usize> {
    pub opt_cost: Big<W>,
    pub largest: Big<W>,
}

/// The naive cost: every operand in one step.
pub(crate) fn naive_cost<const W: usize>(net: &Net) -> Result<Big<W>, Fail> {
    let mut all: Vec<u32> = net.sets.iter().flatten().copied().collect();
    let total: usize = all.len();
    all.sort_unstable();
    all.dedup();
    let inner = total > all.len();
    let factor = (net.sets.len().saturating_sub(1)).max(1) as u64 + inner as u64;
    Ok(net.size::<W>(&all)?.mul_u64(factor).ck()?)
}

/// The indices of operand `id` of a [`Replay`].
fn set_of<'s>(net: &'s Net, made: &'s [Vec<u32>], id: u32) -> &'s [u32] {
    match (id as usize).checked_sub(net.sets.len()) {
        None => &net.sets[id as usize],
        Some(k) => &made[k],
    }
}

/// Walks a linear path step by step, validating it. Operands are named by single-assignment
/// ids (inputs `0..n`, each step's result the next id), so a step moves ids, not index sets.
pub(crate) struct Replay<'a> {
    net: &'a Net,
    /// Distinct indices of each step's result (id `n + step`; inputs are `net.sets`).
    made: Vec<Vec<u32>>,
    /// The current operand list.
    live: Vec<u32>,
    /// How many live operands hold each index.
    counts: Vec<u32>,
    /// How many operands of the current step hold each index.
    involved: Vec<u32>,
    /// `step + 1` where an index is in the current step's union (`seen`) or kept (`kept`).
    seen: Vec<u32>,
    kept: Vec<u32>,
    step: u32,
    desc: Vec<usize>,
    /// The current step's operands (ids, in descending position order), the union of their
    /// indices and the indices summed away.
    pub ops: Vec<u32>,
    pub contract: Vec<u32>,
    pub removed: Vec<u32>,
}

impl<'a> Replay<'a> {
    pub fn new(net: &'a Net) -> Self {
        let nidx = net.sizes.len();
        let mut counts = vec![0u32; nidx];
        for s in &net.sets {
            for &i in s {
                counts[i as usize] += 1;
            }
        }
        let n = net.sets.len();
        Replay {
            net,
            made: Vec::with_capacity(n),
            live: (0..n as u32).collect(),
            counts,
            involved: vec![0; nidx],
            seen: vec![0; nidx],
            kept: vec![0; nidx],
            step: 0,
            desc: vec![],
            ops: vec![],
            contract: vec![],
            removed: vec![],
        }
    }

    /// The indices of the newest operand (the last step's result).
    pub fn result(&self) -> &[u32] {
        self.made.last().map_or(&[], |s| s.as_slice())
    }

    /// Whether index `i` survived the last step (meaningful for the indices of its operands).
    pub fn kept(&self, i: u32) -> bool {
        self.kept[i as usize] == self.step
    }

    /// Performs step number `cnum` (its positions in the current list).
    pub fn step(&mut self, cnum: usize, step: &[usize]) -> Result<(), Fail> {
        if step.is_empty() {
            return Err(
                Error::arg(OP, "path", format!("step {cnum} ()"), "a non-empty tuple of positions").into()
            );
        }
        self.desc.clear();
        self.desc.extend_from_slice(step);
        self.desc.sort_unstable_by(|a, b| b.cmp(a));
        if self.desc.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::arg(OP, "path", format!("step {cnum} {step:?}"), "distinct positions").into());
        }
        if self.desc[0] >= self.live.len() {
            return Err(Error::arg(
                OP,
                "path",
                format!("step {cnum} {step:?}"),
                format!("positions below the {} operands left", self.live.len()),
            )
            .into());
        }
        self.step += 1;
        let tag = self.step;
        self.ops.clear();
        for &p in &self.desc {
            self.ops.push(self.live.remove(p));
        }
        self.contract.clear();
        for &id in &self.ops {
            for &i in set_of(self.net, &self.made, id) {
                let iu = i as usize;
                self.involved[iu] += 1;
                if self.seen[iu] != tag {
                    self.seen[iu] = tag;
                    self.contract.push(i);
                }
            }
        }
        self.removed.clear();
        let mut new_set = Vec::with_capacity(self.contract.len());
        for &i in &self.contract {
            let iu = i as usize;
            if self.net.out[iu] || self.counts[iu] > self.involved[iu] {
                self.kept[iu] = tag;
                new_set.push(i);
            } else {
                self.removed.push(i);
            }
        }
        for &id in &self.ops {
            for &i in set_of(self.net, &self.made, id) {
                self.involved[i as usize] -= 1;
                self.counts[i as usize] -= 1;
            }
        }
        for &i in &new_set {
            self.counts[i as usize] += 1;
        }
        self.live.push((self.net.sets.len() + self.made.len()) as u32);
        self.made.push(new_set);
        Ok(())
    }

    /// The last step's cost and result size.
    pub fn cost_and_size<const W: usize>(&self) -> Result<(Big<W>, Big<W>), Fail> {
        let k = self.ops.len() as u64;
        let factor = k.saturating_sub(1).max(1) + (!self.removed.is_empty()) as u64;
        let cost = self.net.size::<W>(&self.contract)?.mul_u64(factor).ck()?;
        Ok((cost, self.net.size::<W>(self.result())?))
    }

    /// Checks that the path left one operand.
    pub fn finish(&self, steps: usize) -> Result<(), Fail> {
        if self.live.len() > 1 {
            return Err(Error::arg(
                OP,
                "path",
                format!("{steps} steps"),
                format!("a path that contracts all operands into one ({} left)", self.live.len()),
            )
            .into());
        }
        Ok(())
    }
}

/// The exact cost and largest intermediate of a linear path; checks that it is valid and
/// leaves one operand.
pub(crate) fn totals<const W: usize>(net: &Net, path: &[Vec<usize>]) -> Result<Totals<W>, Fail> {
    let mut r = Replay::new(net);
    let mut opt_cost = Big::<W>::ZERO;
    let mut largest = Big::<W>::one();
    for (cnum, step) in path.iter().enumerate() {
        r.step(cnum, step)?;
        let (cost, size) = r.cost_and_size::<W>()?;
        opt_cost = opt_cost.add(cost).ck()?;
        if size > largest {
            largest = size;
        }
    }
    r.finish(path.len())?;
    Ok(Totals { opt_cost, largest })
}

/// Every step of a linear path as an einsum equation with its cost (operands in descending
/// position order; a result lists its indices in order of first appearance, the last one the
/// output).
pub(crate) fn report<const W: usize>(
    network: &Network,
    net: &Net,
    path: &[Vec<usize>],
) -> Result<Vec<StepEval<W>>, Fail> {
    let mut r = Replay::new(net);
    let mut terms: Vec<Vec<u32>> = network.terms.clone();
    let mut order = vec![0usize; net.sizes.len()];
    let mut steps = Vec::with_capacity(path.len());
    for (cnum, step) in path.iter().enumerate() {
        r.step(cnum, step)?;
        let (cost, size) = r.cost_and_size::<W>()?;
        let result: Vec<u32> = if cnum + 1 == path.len() {
            network.output.clone()
        } else {
            let mut seen = vec![];
            for &id in &r.ops {
                for &i in &terms[id as usize] {
                    if r.kept(i) && order[i as usize] != cnum + 1 {
                        order[i as usize] = cnum + 1;
                        seen.push(i);
                    }
                }
            }
            seen
        };
        let ins: Vec<String> = r.ops.iter().map(|&id| network.term_str(&terms[id as usize])).collect();
        let einsum = format!("{}->{}", ins.join(","), network.term_str(&result));
        let mut removed: Vec<char> = r.removed.iter().map(|&i| network.symbols[i as usize]).collect();
        removed.sort_unstable();
        steps.push(StepEval {
            positions: step.clone(),
            einsum,
            removed: removed.into_iter().collect(),
            cost,
            scale: r.contract.len(),
            size,
        });
        terms.push(result);
    }
    r.finish(path.len())?;
    Ok(steps)
}

/// Converts a path of single-assignment ids (inputs 0..n, each result the next id) into the
/// linear format (positions in the current list).
pub(crate) fn ssa_to_linear(n: usize, ssa: &[Vec<u32>]) -> Vec<Vec<usize>> {
    let mut live: Vec<u32> = (0..n as u32).collect();
    let mut path = Vec::with_capacity(ssa.len());
    for (next, step) in (n as u32..).zip(ssa) {
        let mut pos: Vec<usize> = step.iter().map(|s| live.partition_point(|x| x < s)).collect();
        pos.sort_unstable();
        for &p in pos.iter().rev() {
            live.remove(p);
        }
        live.push(next);
        path.push(pos);
    }
    path
}

#[cfg(test)]
mod tests {
    use super::super::parse::parse;
    use super::*;

    #[test]
    fn golden_chain_costs() {
        let network = parse("ij,jk,kl->il", &[vec![2, 2], vec![2, 5], vec![5, 2]]).unwrap();
        let net = Net::new(&network);
        assert_eq!(naive_cost::<2>(&net).ok().unwrap().to_dec(), "120");
        let path = [vec![1, 2], vec![0, 1]];
        let t = totals::<2>(&net, &path).ok().unwrap();
        assert_eq!(t.opt_cost.to_dec(), "56");
        assert_eq!(t.largest.to_dec(), "4");
        let e = report::<2>(&network, &net, &path).ok().unwrap();
        assert_eq!(e[0].einsum, "kl,jk->lj");
        assert_eq!(e[1].einsum, "lj,ij->il");
        assert_eq!(
            (e[0].cost.to_dec(), e[0].size.to_dec(), e[0].removed.as_str()),
            ("40".into(), "4".into(), "k")
        );
        assert_eq!(e.iter().map(|s| s.cost).fold(Big::ZERO, Big::add), t.opt_cost);
        assert!(totals::<2>(&net, &[vec![0, 1]]).is_err());
        assert!(totals::<2>(&net, &[vec![0, 3]]).is_err());
        assert!(report::<2>(&network, &net, &[vec![0, 3]]).is_err());
    }

    #[test]
    fn replay_tracks_ids_counts_and_validation() {
        // Repeated index, an index on three operands and a Hadamard pair.
        let network = parse("iij,jk,jk,kl->l", &[vec![2, 2, 3], vec![3, 4], vec![3, 4], vec![4, 5]]).unwrap();
        let net = Net::new(&network);
        let mut r = Replay::new(&net);
        assert_eq!(r.live, vec![0, 1, 2, 3]);
        r.step(0, &[1, 2]).ok().unwrap();
        assert_eq!(r.ops, vec![2, 1]);
        assert!(r.removed.is_empty());
        // j (on operand 0) and k (on operand 3) survive
        let mut res = r.result().to_vec();
        res.sort_unstable();
        assert_eq!(res, vec![1, 2]);
        assert!(r.kept(1) && r.kept(2));
        let (c, s) = r.cost_and_size::<2>().ok().unwrap();
        assert_eq!((c.to_dec(), s.to_dec()), ("12".to_string(), "12".to_string()));
        r.step(1, &[0, 2]).ok().unwrap();
        assert_eq!(r.ops, vec![4, 0]);
        let mut gone = r.removed.clone();
        gone.sort_unstable();
        assert_eq!(gone, vec![0, 1]);
        assert!(r.finish(2).is_err());
        for bad in [&[][..], &[0, 0], &[0, 5]] {
            assert!(r.step(2, bad).is_err());
        }
        r.step(2, &[0, 1]).ok().unwrap();
        assert_eq!(r.live, vec![6]);
        assert!(r.finish(3).is_ok());
        assert_eq!(r.result(), &[3]);
    }

    #[test]
    fn ssa_conversion() {
        assert_eq!(
            ssa_to_linear(4, &[vec![0, 3], vec![2, 4], vec![1, 5]]),
            vec![vec![0, 3], vec![1, 2], vec![0, 1]]
        );
    }
}
