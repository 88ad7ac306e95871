use super::*;

fn opts(optimize: Optimize) -> PathOptions {
    PathOptions { optimize, memory_limit: MemoryLimit::Unlimited, time_limit: None }
}

fn path(eq: &str, shapes: &[Vec<usize>], o: Optimize) -> PathInfo {
    contract_path(eq, shapes, &opts(o)).unwrap()
}

/// A small deterministic generator for test networks.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// A random connected network: `n` operands, about `extra` bonds beyond a spanning tree,
/// some output indices, sizes 2..=5.
fn random_network(seed: u64, n: usize, extra: usize, outputs: usize) -> (String, Vec<Vec<usize>>) {
    let mut r = Lcg(seed);
    let mut terms: Vec<Vec<usize>> = vec![vec![]; n];
    let mut sizes = vec![];
    let bond = |a: usize, b: usize, terms: &mut Vec<Vec<usize>>, sizes: &mut Vec<usize>, r: &mut Lcg| {
        let id = sizes.len();
        sizes.push(2 + r.next(4) as usize);
        terms[a].push(id);
        if b != a {
            terms[b].push(id);
        }
    };
    for i in 1..n {
        let j = r.next(i as u64) as usize;
        bond(i, j, &mut terms, &mut sizes, &mut r);
    }
    for _ in 0..extra {
        let (a, b) = (r.next(n as u64) as usize, r.next(n as u64) as usize);
        if a != b {
            bond(a, b, &mut terms, &mut sizes, &mut r);
        }
    }
    let mut out = String::new();
    for _ in 0..outputs {
        let a = r.next(n as u64) as usize;
        let id = sizes.len();
        sizes.push(2 + r.next(3) as usize);
        terms[a].push(id);
        out.push(parse::symbol(id));
    }
    let eq = terms
        .iter()
        .map(|t| t.iter().map(|&i| parse::symbol(i)).collect::<String>())
        .collect::<Vec<_>>()
        .join(",");
    let shapes = terms.iter().map(|t| t.iter().map(|&i| sizes[i]).collect()).collect();
    (format!("{eq}->{out}"), shapes)
}

fn brute_force(eq: &str, shapes: &[Vec<usize>]) -> u128 {
    let network = parse(eq, shapes).unwrap();
    let net = Net::new(&network);
    fn rec(net: &Net, k: usize, prefix: &mut Vec<Vec<usize>>, best: &mut u128) {
        if k == 1 {
            let e = totals::<2>(net, prefix).ok().unwrap();
            *best = (*best).min(e.opt_cost.to_dec().parse().unwrap());
            return;
        }
        for a in 0..k {
            for b in a + 1..k {
                prefix.push(vec![a, b]);
                rec(net, k - 1, prefix, best);
                prefix.pop();
            }
        }
    }
    let mut best = u128::MAX;
    rec(&net, net.sets.len(), &mut vec![], &mut best);
    best
}

#[test]
fn golden_values() {
    let i = path("ij,jk,kl->il", &[vec![2, 2], vec![2, 5], vec![5, 2]], Optimize::Optimal);
    assert_eq!(i.path, vec![vec![1, 2], vec![0, 1]]);
    assert_eq!((i.naive_cost.as_str(), i.opt_cost.as_str()), ("120", "56"));
    let s = vec![vec![10, 10], vec![10, 10], vec![10, 10, 10, 10], vec![10, 10], vec![10, 10]];
    for o in [Optimize::Optimal, Optimize::Dp, Optimize::Greedy, Optimize::Auto] {
        let i = path("ea,fb,abcd,gc,hd->efgh", &s, o);
        assert_eq!((i.naive_cost.as_str(), i.opt_cost.as_str()), ("500000000", "800000"));
        assert_eq!(i.largest_intermediate, "10000");
    }
}

#[test]
fn optimal_is_optimal() {
    for seed in 0..40 {
        let n = 3 + (seed as usize % 4);
        let (eq, shapes) = random_network(seed, n, seed as usize % 3, seed as usize % 2);
        let want = brute_force(&eq, &shapes);
        let got = path(&eq, &shapes, Optimize::Optimal);
        assert_eq!(got.opt_cost, want.to_string(), "{eq}");
        let dp = path(&eq, &shapes, Optimize::Dp);
        assert!(dp.opt_cost.parse::<u128>().unwrap() >= want);
        let g = path(&eq, &shapes, Optimize::Greedy);
        assert!(g.opt_cost.parse::<u128>().unwrap() >= want);
    }
}

#[test]
fn memory_limit_is_honoured() {
    for seed in 0..20 {
        let (eq, shapes) = random_network(100 + seed, 7, 4, 1);
        for o in [Optimize::Optimal, Optimize::Greedy, Optimize::Auto] {
            let free = path(&eq, &shapes, o.clone());
            let lim: u128 = free.largest_intermediate.parse::<u128>().unwrap() / 2 + 1;
            let mut op = opts(o);
            op.memory_limit = MemoryLimit::Elements(lim);
            let p = contract_path(&eq, &shapes, &op).unwrap();
            let steps = path_steps(&eq, &shapes, &p.path).unwrap();
            let k = steps.len();
            for (i, s) in steps.iter().enumerate() {
                if i + 1 < k {
                    assert!(
                        s.size.parse::<u128>().unwrap() <= lim,
                        "{eq} {:?} {} {lim}",
                        p.path,
                        p.optimizer
                    );
                }
            }
        }
    }
}

#[test]
fn random_greedy_is_seeded_and_thread_independent() {
    let (eq, shapes) = random_network(7, 40, 30, 2);
    let rg = |seed| Optimize::RandomGreedy { trials: 16, first_trial: 0, seed, temperature: 1.0, nbranch: 8 };
    crate::parallel::set_num_threads(1);
    let a = path(&eq, &shapes, rg(3));
    crate::parallel::set_num_threads(3);
    let b = path(&eq, &shapes, rg(3));
    crate::parallel::set_num_threads(0);
    assert_eq!(a, b);
    let g = path(&eq, &shapes, Optimize::Greedy);
    assert!(a.opt_cost.parse::<f64>().unwrap() <= g.opt_cost.parse::<f64>().unwrap());
}

#[test]
fn huge_costs_are_exact() {
    // A 60-operand ring of bond 1000 with a dangling output per site: the result alone has
    // 10^180 elements, beyond 128 bits, so the search must widen its integers.
    let n = 60;
    let mut terms = vec![];
    let mut out = String::new();
    for i in 0..n {
        let (a, b, o) = (parse::symbol(i), parse::symbol((i + 1) % n), parse::symbol(n + i));
        terms.push(format!("{a}{b}{o}"));
        out.push(o);
    }
    let eq = format!("{}->{out}", terms.join(","));
    let shapes = vec![vec![1000, 1000, 1000]; n];
    let p = path(&eq, &shapes, Optimize::Greedy);
    assert!(p.naive_cost.len() > 300);
    assert!(p.largest_intermediate.starts_with("1000000") && p.largest_intermediate.len() == 181);
}

#[test]
fn errors() {
    let bad = |eq: &str, shapes: &[Vec<usize>], o: PathOptions| {
        contract_path(eq, shapes, &o).unwrap_err().to_string()
    };
    assert!(bad("ij,jk", &[vec![2, 3]], opts(Optimize::Auto)).contains("operands"));
    assert!(bad("ij,jk", &[vec![2, 3], vec![3, 2]], opts(Optimize::Path(vec![vec![0, 2]]))).contains("path"));
    let mut o = opts(Optimize::Auto);
    o.time_limit = Some(-1.0);
    assert!(bad("ij,jk", &[vec![2, 3], vec![3, 2]], o).contains("time_limit"));
    let mut o = opts(Optimize::Auto);
    o.memory_limit = MemoryLimit::Elements(0);
    assert!(bad("ij,jk", &[vec![2, 3], vec![3, 2]], o).contains("memory_limit"));
    let many = vec![vec![2, 2]; 21];
    let eq: String = (0..21)
        .map(|i| format!("{}{}", parse::symbol(i), parse::symbol(i + 1)))
        .collect::<Vec<_>>()
        .join(",");
    assert!(bad(&eq, &many, opts(Optimize::Optimal)).contains("at most 20"));
}

#[test]
fn time_limit_falls_back_to_greedy() {
    let (eq, shapes) = random_network(11, 18, 20, 0);
    let mut o = opts(Optimize::Optimal);
    o.time_limit = Some(0.0);
    let p = contract_path(&eq, &shapes, &o).unwrap();
    assert!(p.optimizer.starts_with("greedy"));
}

#[test]
fn step_report_matches_totals() {
    for seed in 0..30 {
        let (eq, shapes) =
            random_network(300 + seed, 8 + seed as usize * 3, seed as usize, seed as usize % 3);
        for o in [Optimize::Greedy, Optimize::Auto] {
            let p = path(&eq, &shapes, o);
            let steps = path_steps(&eq, &shapes, &p.path).unwrap();
            assert_eq!(steps.len(), p.path.len());
            let total: u128 = steps.iter().map(|s| s.cost.parse::<u128>().unwrap()).sum();
            assert_eq!(total.to_string(), p.opt_cost, "{eq}");
            let largest = steps.iter().map(|s| s.size.parse::<u128>().unwrap()).max().unwrap().max(1);
            assert_eq!(largest.to_string(), p.largest_intermediate);
            for (s, q) in steps.iter().zip(&p.path) {
                assert_eq!(&s.positions, q);
            }
        }
    }
    let s = [vec![2, 3], vec![3, 4], vec![4, 5]];
    let e = path_steps("ij,jk,kl->il", &s, &[vec![0, 1]]).unwrap_err().to_string();
    assert!(e.contains("path"), "{e}");
    assert!(path_steps("ij,jk,kl->il", &s, &[vec![0, 1], vec![0, 2]])
        .unwrap_err()
        .to_string()
        .contains("path"));
}

#[test]
fn greedy_is_independent_of_the_integer_width() {
    let (eq, shapes) = random_network(77, 60, 40, 2);
    let network = parse(&eq, &shapes).unwrap();
    let net = Net::new(&network);
    let p2 = greedy::greedy::<2>(&net, None, None).ok().unwrap();
    assert_eq!(p2, greedy::greedy::<4>(&net, None, None).ok().unwrap());
    assert_eq!(p2, greedy::greedy::<8>(&net, None, None).ok().unwrap());
    let t2 = totals::<2>(&net, &ssa_to_linear(net.sets.len(), &p2)).ok().unwrap();
    let t8 = totals::<8>(&net, &ssa_to_linear(net.sets.len(), &p2)).ok().unwrap();
    assert_eq!((t2.opt_cost.to_dec(), t2.largest.to_dec()), (t8.opt_cost.to_dec(), t8.largest.to_dec()));
}

#[test]
fn widths_are_chosen_per_stage() {
    assert_eq!((width_for(0), width_for(119), width_for(120), width_for(248)), (2, 2, 4, 8));
    assert_eq!((width_for(4000), width_for(5000)), (64, 64));
    // A ring of 40 bond-10^6 tensors: the naive cost (10^240) needs far more bits than the
    // search, which still finds the path opt_einsum's model prices exactly.
    let n = 40;
    let terms: Vec<String> =
        (0..n).map(|i| format!("{}{}", parse::symbol(i), parse::symbol((i + 1) % n))).collect();
    let p = path(&format!("{}->", terms.join(",")), &vec![vec![1_000_000, 1_000_000]; n], Optimize::Greedy);
    assert_eq!(p.naive_cost, format!("{}{}", 40, "0".repeat(240)));
    assert!(p.opt_cost.len() < 40);
}

#[test]
fn optimal_sums_dangling_indices_at_the_first_step() {
    // `i` (size 10) is on A alone and not in the output: it is summed away in A's first step,
    // whose cost counts it. Best: (B, C) over {a, b} = 4 elements, x2 for the summed `b` -> 8;
    // then A with `a` over {i, a} = 20, x2 -> 40; total 48. Joining A first costs 80 at once
    // (over {i, a, b}); a model that drops `i` from A beforehand sees every path at 12.
    let shapes = [vec![10, 2], vec![2, 2], vec![2]];
    let p = path("ia,ab,b->", &shapes, Optimize::Optimal);
    assert_eq!(p.opt_cost, "48");
    assert_eq!(p.path, vec![vec![1, 2], vec![0, 1]]);
    assert_eq!(brute_force("ia,ab,b->", &shapes), 48);
    // dp (as opt_einsum's) sums `i` on its own first: 40, then (B, C) 8, then a,a-> 2 x2 = 4.
    assert_eq!(path("ia,ab,b->", &shapes, Optimize::Dp).opt_cost, "52");
}

#[test]
fn optimal_is_optimal_with_dangling_and_repeated_indices() {
    let mut r = Lcg(99);
    for seed in 0..60 {
        let n = 3 + (seed as usize % 4);
        let (eq, shapes) = random_network(500 + seed, n, seed as usize % 3, seed as usize % 2);
        let (lhs, out) = eq.split_once("->").unwrap();
        let mut terms: Vec<String> = lhs.split(',').map(str::to_string).collect();
        let mut shapes = shapes;
        // Dangling indices (on one operand, not in the output), some repeated on it.
        for k in 0..1 + r.next(3) as usize {
            let t = r.next(n as u64) as usize;
            let (c, d) = (parse::symbol(45 + k), 2 + r.next(4) as usize);
            let reps = 1 + (r.next(4) == 0) as usize;
            for _ in 0..reps {
                terms[t].push(c);
                shapes[t].push(d);
            }
        }
        let eq = format!("{}->{out}", terms.join(","));
        let want = brute_force(&eq, &shapes);
        assert_eq!(path(&eq, &shapes, Optimize::Optimal).opt_cost, want.to_string(), "{eq}");
        // (dp may beat it: summing a dangling index in a one-operand step is not pairwise.)
        for o in [Optimize::Greedy, Optimize::Auto] {
            assert!(path(&eq, &shapes, o).opt_cost.parse::<u128>().unwrap() >= want, "{eq}");
        }
        let mut o = opts(Optimize::Optimal);
        o.memory_limit = MemoryLimit::Elements(1 << 40);
        assert_eq!(contract_path(&eq, &shapes, &o).unwrap().opt_cost, want.to_string(), "{eq}");
    }
}
