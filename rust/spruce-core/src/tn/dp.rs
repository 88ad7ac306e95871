//! Dynamic programming over connected subgraphs (Pfeifer, Haegeman and Verstraete, Phys. Rev. E
//! 90, 033315, 2014): exact among paths without outer products.
//!
//! Indices found on a single operand and not in the output are summed first (a one-operand
//! step). Each connected component of the remaining network is solved by building, for
//! n = 2, 3, ..., the cheapest way to form every connected set of n operands from two disjoint
//! smaller sets that share a summed index; a set's cost is the sum over its steps of the number
//! of elements of the step's index space. A cost cap (starting at the size of the component's
//! output, multiplied by its smallest index size until a solution appears) discards expensive
//! partial results early. Components are then joined by outer products, smallest first.
//! Candidates are visited in a fixed order (sets in the order they were first formed, earlier
//! passes first), and only a strictly cheaper candidate replaces a set's entry, so the path is
//! deterministic.

use super::big::Big;
use super::cost::Net;
use super::{Deadline, Fail};
use std::collections::HashMap;

/// A contraction tree: leaves are input positions.
#[derive(Clone, Copy, Debug)]
enum Node {
    Leaf(usize),
    /// Sum the single-operand indices of an input on its own.
    Reduce(usize),
    Pair(u32, u32),
}

struct Level<const W: usize> {
    sets: Vec<u64>,
    legs: Vec<u64>,
    cost: Vec<Big<W>>,
    tree: Vec<u32>,
    pos: HashMap<u64, usize>,
}

impl<const W: usize> Level<W> {
    fn new() -> Self {
        Level { sets: vec![], legs: vec![], cost: vec![], tree: vec![], pos: HashMap::new() }
    }
}

fn size_of<const W: usize>(net: &Net, bits: &[u64]) -> Result<Big<W>, Fail> {
    let mut dims = Vec::with_capacity(16);
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let b = word.trailing_zeros() as usize;
            word &= word - 1;
            dims.push(net.sizes[w * 64 + b]);
        }
    }
    Ok(Big::product(dims)?)
}

pub(crate) fn dp<const W: usize>(
    net: &Net,
    limit: Option<Big<W>>,
    deadline: &Deadline,
) -> Result<Vec<Vec<usize>>, Fail> {
    let nidx = net.sizes.len();
    let words = nidx.div_ceil(64).max(1);
    let mut count = vec![0usize; nidx];
    for s in &net.sets {
        for &i in s {
            count[i as usize] += 1;
        }
    }
    let single = |i: u32| count[i as usize] == 1 && !net.out[i as usize];
    let mut arena: Vec<Node> = vec![];
    let mut done: Vec<u32> = vec![];
    let mut parsed: Vec<Vec<u64>> = vec![];
    let mut parsed_tree: Vec<u32> = vec![];
    for (j, s) in net.sets.iter().enumerate() {
        let reduced: Vec<u32> = s.iter().copied().filter(|&i| !single(i)).collect();
        if reduced.is_empty() && !s.is_empty() {
            arena.push(Node::Reduce(j));
            done.push(arena.len() as u32 - 1);
        } else {
            let mut bits = vec![0u64; words];
            for &i in &reduced {
                bits[i as usize / 64] |= 1 << (i % 64);
            }
            parsed.push(bits);
            arena.push(if reduced.len() != s.len() { Node::Reduce(j) } else { Node::Leaf(j) });
            parsed_tree.push(arena.len() as u32 - 1);
        }
    }
    let mut outb = vec![0u64; words];
    for (i, &o) in net.out.iter().enumerate() {
        if o {
            outb[i / 64] |= 1 << (i % 64);
        }
    }
    let mut results: Vec<(u32, Big<W>)> = done.iter().map(|&t| (t, Big::one())).collect();

    // Connected components (edges: shared summed indices), in order of their first operand.
    let np = parsed.len();
    let summed = |a: &[u64], b: &[u64]| (0..words).any(|w| a[w] & b[w] & !outb[w] != 0);
    let mut seen = vec![false; np];
    let mut components: Vec<Vec<usize>> = vec![];
    for start in 0..np {
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut comp = vec![start];
        let mut stack = vec![start];
        while let Some(j) = stack.pop() {
            for k in 0..np {
                if !seen[k] && summed(&parsed[j], &parsed[k]) {
                    seen[k] = true;
                    comp.push(k);
                    stack.push(k);
                }
            }
        }
        comp.sort_unstable();
        components.push(comp);
    }

    let all: Vec<u32> = (0..nidx as u32).collect();
    let naive =
        Big::<W>::product(all.iter().map(|&i| net.sizes[i as usize]))?.mul_u64(net.sets.len() as u64).ck()?;
    let mut ticks = 0u64;
    for comp in &components {
        let len = comp.len();
        if len > 64 {
            return Err(Fail::TooMany(len));
        }
        let inputs: Vec<&[u64]> = comp.iter().map(|&j| parsed[j].as_slice()).collect();
        let gmask: u64 = if len == 64 { u64::MAX } else { (1u64 << len) - 1 };
        let mut x: Vec<Level<W>> = (0..=len).map(|_| Level::new()).collect();
        for (b, &j) in comp.iter().enumerate() {
            let l = &mut x[1];
            l.pos.insert(1 << b, l.sets.len());
            l.sets.push(1 << b);
            l.legs.extend_from_slice(&parsed[j]);
            l.cost.push(Big::ZERO);
            l.tree.push(parsed_tree[j]);
        }
        let mut inds = vec![0u64; words];
        for s in &inputs {
            for w in 0..words {
                inds[w] |= s[w];
            }
        }
        let out_inds: Vec<u64> = (0..words).map(|w| inds[w] & outb[w]).collect();
        let mut cap = size_of::<W>(net, &out_inds)?;
        let mut smallest = u64::MAX;
        for (w, &word) in inds.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let b = word.trailing_zeros() as usize;
                word &= word - 1;
                smallest = smallest.min(net.sizes[w * 64 + b]);
            }
        }
        let incr = if smallest == u64::MAX { 2 } else { smallest.max(2) };
        let mut shared = vec![0u64; words];
        let mut uni = vec![0u64; words];
        let mut legs = vec![0u64; words];
        while x[len].sets.is_empty() {
            for n in 2..=len {
                let (lower, upper) = x.split_at_mut(n);
                let xn = &mut upper[0];
                for m in 1..=n / 2 {
                    let (a, b) = (&lower[m], &lower[n - m]);
                    for i1 in 0..a.sets.len() {
                        let s1 = a.sets[i1];
                        let l1 = &a.legs[i1 * words..(i1 + 1) * words];
                        let c1 = a.cost[i1];
                        for i2 in 0..b.sets.len() {
                            let s2 = b.sets[i2];
                            if s1 & s2 != 0 || (m == n - m && s1 >= s2) {
                                continue;
                            }
                            ticks += 1;
                            if ticks & 0xffff == 0 && deadline.expired() {
                                return Err(Fail::Timeout);
                            }
                            let l2 = &b.legs[i2 * words..(i2 + 1) * words];
                            let mut any = false;
                            for w in 0..words {
                                shared[w] = l1[w] & l2[w] & !outb[w];
                                any |= shared[w] != 0;
                            }
                            if !any {
                                continue;
                            }
                            let base = c1.add(b.cost[i2]).ck()?;
                            if base > cap {
                                continue;
                            }
                            for w in 0..words {
                                uni[w] = l1[w] | l2[w];
                            }
                            let cost = base.add(size_of::<W>(net, &uni)?).ck()?;
                            if cost > cap {
                                continue;
                            }
                            let s = s1 | s2;
                            let existing = xn.pos.get(&s).copied();
                            if let Some(p) = existing {
                                if cost >= xn.cost[p] {
                                    continue;
                                }
                            }
                            // Indices still needed by the component's other operands.
                            let mut rem = vec![0u64; words];
                            let mut others = gmask & !s;
                            while others != 0 {
                                let k = others.trailing_zeros() as usize;
                                others &= others - 1;
                                for w in 0..words {
                                    rem[w] |= inputs[k][w];
                                }
                            }
                            for w in 0..words {
                                legs[w] = uni[w] & !(shared[w] & !rem[w]);
                            }
                            if let Some(l) = limit {
                                if size_of::<W>(net, &legs)? > l {
                                    continue;
                                }
                            }
                            arena.push(Node::Pair(a.tree[i1], b.tree[i2]));
                            let t = arena.len() as u32 - 1;
                            match existing {
                                Some(p) => {
                                    xn.legs[p * words..(p + 1) * words].copy_from_slice(&legs);
                                    xn.cost[p] = cost;
                                    xn.tree[p] = t;
                                }
                                None => {
                                    xn.pos.insert(s, xn.sets.len());
                                    xn.sets.push(s);
                                    xn.legs.extend_from_slice(&legs);
                                    xn.cost.push(cost);
                                    xn.tree.push(t);
                                }
                            }
                        }
                    }
                }
            }
            if cap > naive && x[len].sets.is_empty() {
                return Err(Fail::Limit);
            }
            cap = cap.mul_u64(incr).ck()?;
        }
        let last = &x[len];
        let size = size_of::<W>(net, &last.legs[0..words])?;
        results.push((last.tree[0], size));
    }
    // Smallest results first (stable), joined left to right.
    results.sort_by_key(|a| a.1);
    let mut iter = results.into_iter();
    let Some((mut tree, _)) = iter.next() else { return Ok(vec![]) };
    for (t, _) in iter {
        arena.push(Node::Pair(tree, t));
        tree = arena.len() as u32 - 1;
    }
    Ok(to_linear(&arena, tree))
}

/// Linearizes a tree: steps in the order a stack of pending nodes yields them, built from the
/// last step backwards, positions counted among the inputs not yet consumed.
fn to_linear(arena: &[Node], root: u32) -> Vec<Vec<usize>> {
    if let Node::Leaf(_) = arena[root as usize] {
        return vec![];
    }
    let mut pending = vec![root];
    let mut leaves: Vec<usize> = vec![];
    let mut steps: std::collections::VecDeque<Vec<usize>> = Default::default();
    while let Some(node) = pending.pop() {
        let mut step = vec![];
        let children: Vec<u32> = match arena[node as usize] {
            Node::Leaf(_) => vec![],
            Node::Reduce(j) => {
                let p = leaves.partition_point(|&q| q < j);
                step.push(p);
                leaves.insert(p, j);
                vec![]
            }
            Node::Pair(a, b) => vec![a, b],
        };
        let mut ints: Vec<usize> = children
            .iter()
            .filter_map(|&c| match arena[c as usize] {
                Node::Leaf(j) => Some(j),
                _ => None,
            })
            .collect();
        ints.sort_unstable();
        for j in ints {
            let p = leaves.partition_point(|&q| q < j);
            step.push(p);
            leaves.insert(p, j);
        }
        for &c in &children {
            if !matches!(arena[c as usize], Node::Leaf(_)) {
                step.push(leaves.len() + pending.len());
                pending.push(c);
            }
        }
        steps.push_front(step);
    }
    steps.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linearization_matches_the_documented_example() {
        // ((1,2),(0,(4,5,3))) with a ternary node written as nested pairs is not expressible;
        // check the binary case ((1,2),(0,(4,5))) and a reduction.
        let arena = vec![
            Node::Leaf(0),
            Node::Leaf(1),
            Node::Leaf(2),
            Node::Leaf(4),
            Node::Leaf(5),
            Node::Pair(1, 2),
            Node::Pair(3, 4),
            Node::Pair(0, 6),
            Node::Pair(5, 7),
        ];
        assert_eq!(to_linear(&arena, 8), vec![vec![1, 2], vec![1, 2], vec![0, 2], vec![0, 1]]);
        let arena = vec![Node::Reduce(0), Node::Leaf(1), Node::Pair(0, 1)];
        assert_eq!(to_linear(&arena, 2), vec![vec![0], vec![0, 1]]);
    }
}
