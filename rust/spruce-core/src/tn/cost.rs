//! The cost model: what a linear path costs, step by step.
//!
//! A step contracts the operands at the listed positions (removed from the current list, the
//! result appended). Its indices are the union of theirs; it keeps those still needed by the
//! output or by another operand; its cost is
//! `prod(sizes of its indices) * (max(1, terms - 1) + [some index is summed away])`. The path's
//! cost is the sum over steps; the naive cost is
//! that of contracting every operand in one step.

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

#[derive(Clone, Debug)]
pub(crate) struct Eval<const W: usize> {
    pub steps: Vec<StepEval<W>>,
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

/// Evaluates a linear path; checks that it is valid and leaves one operand.
pub(crate) fn evaluate<const W: usize>(
    network: &Network,
    net: &Net,
    path: &[Vec<usize>],
) -> Result<Eval<W>, Fail> {
    let mut terms: Vec<Vec<u32>> = network.terms.clone();
    let mut sets: Vec<Vec<u32>> = net.sets.clone();
    let nidx = net.sizes.len();
    let mut counts = vec![0u32; nidx];
    for s in &sets {
        for &i in s {
            counts[i as usize] += 1;
        }
    }
    let mut involved = vec![0u32; nidx];
    let mut stamp = vec![0usize; nidx];
    let mut steps = Vec::with_capacity(path.len());
    let mut opt_cost = Big::<W>::ZERO;
    let mut largest = Big::<W>::one();
    for (cnum, step) in path.iter().enumerate() {
        if step.is_empty() {
            return Err(
                Error::arg(OP, "path", format!("step {cnum} ()"), "a non-empty tuple of positions").into()
            );
        }
        let mut desc = step.clone();
        desc.sort_unstable_by(|a, b| b.cmp(a));
        for w in desc.windows(2) {
            if w[0] == w[1] {
                return Err(
                    Error::arg(OP, "path", format!("step {cnum} {step:?}"), "distinct positions").into()
                );
            }
        }
        if desc[0] >= sets.len() {
            return Err(Error::arg(
                OP,
                "path",
                format!("step {cnum} {step:?}"),
                format!("positions below the {} operands left", sets.len()),
            )
            .into());
        }
        let mut tmp_terms = Vec::with_capacity(desc.len());
        let mut tmp_sets = Vec::with_capacity(desc.len());
        for &p in &desc {
            tmp_terms.push(terms.remove(p));
            tmp_sets.push(sets.remove(p));
        }
        let mut contract: Vec<u32> = tmp_sets.iter().flatten().copied().collect();
        contract.sort_unstable();
        contract.dedup();
        for s in &tmp_sets {
            for &i in s {
                involved[i as usize] += 1;
            }
        }
        let keep = |i: u32| net.out[i as usize] || counts[i as usize] > involved[i as usize];
        let new_set: Vec<u32> = contract.iter().copied().filter(|&i| keep(i)).collect();
        let mut removed: Vec<char> =
            contract.iter().filter(|&&i| !keep(i)).map(|&i| network.symbols[i as usize]).collect();
        removed.sort_unstable();
        let last = cnum + 1 == path.len();
        let result: Vec<u32> = if last {
            network.output.clone()
        } else {
            let mut seen = vec![];
            for t in &tmp_terms {
                for &i in t {
                    if keep(i) && stamp[i as usize] != cnum + 1 {
                        stamp[i as usize] = cnum + 1;
                        seen.push(i);
                    }
                }
            }
            seen
        };
        for s in &tmp_sets {
            for &i in s {
                involved[i as usize] -= 1;
                counts[i as usize] -= 1;
            }
        }
        for &i in &new_set {
            counts[i as usize] += 1;
        }
        let k = desc.len() as u64;
        let factor = k.saturating_sub(1).max(1) + (!removed.is_empty()) as u64;
        let cost = net.size::<W>(&contract)?.mul_u64(factor).ck()?;
        let size = net.size::<W>(&new_set)?;
        opt_cost = opt_cost.add(cost).ck()?;
        if size > largest {
            largest = size;
        }
        let ins: Vec<String> = tmp_terms.iter().map(|t| network.term_str(t)).collect();
        let einsum = format!("{}->{}", ins.join(","), network.term_str(&result));
        steps.push(StepEval {
            positions: step.clone(),
            einsum,
            removed: removed.into_iter().collect(),
            cost,
            scale: contract.len(),
            size,
        });
        terms.push(result);
        sets.push(new_set);
    }
    if sets.len() > 1 {
        return Err(Error::arg(
            OP,
            "path",
            format!("{} steps", path.len()),
            format!("a path that contracts all operands into one ({} left)", sets.len()),
        )
        .into());
    }
    Ok(Eval { steps, opt_cost, largest })
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
        let e = evaluate::<2>(&network, &net, &[vec![1, 2], vec![0, 1]]).ok().unwrap();
        assert_eq!(e.opt_cost.to_dec(), "56");
        assert_eq!(e.steps[0].einsum, "kl,jk->lj");
        assert_eq!(e.steps[1].einsum, "lj,ij->il");
        assert_eq!(e.largest.to_dec(), "4");
        assert!(evaluate::<2>(&network, &net, &[vec![0, 1]]).is_err());
        assert!(evaluate::<2>(&network, &net, &[vec![0, 3]]).is_err());
    }

    #[test]
    fn ssa_conversion() {
        assert_eq!(
            ssa_to_linear(4, &[vec![0, 3], vec![2, 4], vec![1, 5]]),
            vec![vec![0, 3], vec![1, 2], vec![0, 1]]
        );
    }
}
