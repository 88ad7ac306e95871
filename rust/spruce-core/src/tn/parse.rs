//! Einsum equations: parsing, ellipsis expansion and broadcasting, as NumPy defines them.

use super::hash::FastMap;
use crate::{Error, Result};

const OP: &str = "contract_path";

/// A parsed contraction: every index is a small integer with a symbol and a size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Network {
    /// The indices of each operand as written (a repeated index appears twice).
    pub terms: Vec<Vec<u32>>,
    /// The indices of the result, in order.
    pub output: Vec<u32>,
    /// The size of each index (the largest over operands: size-1 axes broadcast).
    pub sizes: Vec<u64>,
    /// The symbol of each index (ellipsis axes get fresh symbols).
    pub symbols: Vec<char>,
}

impl Network {
    /// The operand subscripts, comma-separated (ellipses expanded).
    pub fn input_subscripts(&self) -> String {
        let terms: Vec<String> = self.terms.iter().map(|t| self.term_str(t)).collect();
        terms.join(",")
    }

    /// The result subscript.
    pub fn output_subscript(&self) -> String {
        self.term_str(&self.output)
    }

    pub(crate) fn term_str(&self, t: &[u32]) -> String {
        t.iter().map(|&i| self.symbols[i as usize]).collect()
    }

    /// The number of elements of an operand, counting a repeated index once per occurrence
    /// (the convention of `memory_limit="max_input"`).
    pub fn term_elements(&self, t: &[u32]) -> u128 {
        t.iter().fold(1u128, |a, &i| a.saturating_mul(self.sizes[i as usize] as u128))
    }
}

/// The symbol number `i`: the 52 ASCII letters, then code points from 192 on (surrogates skipped).
pub(crate) fn symbol(i: usize) -> char {
    const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    if i < 52 {
        return LETTERS[i] as char;
    }
    let code = if i >= 55296 { i + 2048 } else { i + 140 };
    char::from_u32(code as u32).unwrap_or('\u{FFFD}')
}

fn is_reserved(c: char) -> bool {
    matches!(c, ',' | '-' | '>' | '.')
}

/// Parses `eq` for operands of the given shapes.
pub fn parse(eq: &str, shapes: &[Vec<usize>]) -> Result<Network> {
    let eq: String = eq.chars().filter(|c| !c.is_whitespace()).collect();
    if eq.contains('-') || eq.contains('>') {
        let bad = eq.matches('-').count() > 1 || eq.matches('>').count() > 1 || eq.matches("->").count() != 1;
        if bad {
            return Err(Error::arg(OP, "eq", format!("{eq:?}"), "an equation with at most one '->'"));
        }
    }
    let (lhs, rhs) = match eq.split_once("->") {
        Some((l, r)) => (l.to_string(), Some(r.to_string())),
        None => (eq.clone(), None),
    };
    let mut subs: Vec<String> = lhs.split(',').map(str::to_string).collect();
    if subs.len() != shapes.len() {
        return Err(Error::arg(
            OP,
            "operands",
            shapes.len(),
            format!("as many as the equation's terms ({} in {eq:?})", subs.len()),
        ));
    }
    let mut out_ellipsis = String::new();
    let has_ellipsis = eq.contains('.');
    if has_ellipsis {
        let used: FastMap<char, ()> = eq.chars().filter(|&c| !is_reserved(c)).map(|c| (c, ())).collect();
        let max_nd = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut fresh: Vec<char> = Vec::with_capacity(max_nd);
        let mut i = 0;
        while fresh.len() < max_nd {
            let s = symbol(i);
            i += 1;
            if !used.contains_key(&s) {
                fresh.push(s);
            }
        }
        let mut longest = 0usize;
        for (num, sub) in subs.iter_mut().enumerate() {
            if !sub.contains('.') {
                continue;
            }
            if sub.matches('.').count() != 3 || sub.matches("...").count() != 1 {
                return Err(Error::arg(OP, "eq", format!("{eq:?}"), "at most one '...' per term"));
            }
            let named = sub.chars().count() - 3;
            let nd = shapes[num].len();
            let count = if nd == 0 { 0 } else { nd.max(1) as isize - named as isize };
            if count < 0 {
                return Err(Error::shape(
                    OP,
                    "operands",
                    &shapes[num],
                    format!("at least {named} dimensions for term {num} ({sub:?})"),
                ));
            }
            let count = count as usize;
            longest = longest.max(count);
            let rep: String = fresh[fresh.len() - count..].iter().collect();
            *sub = sub.replace("...", &rep);
        }
        out_ellipsis = fresh[fresh.len() - longest..].iter().collect();
    }
    for sub in &subs {
        if let Some(c) = sub.chars().find(|&c| is_reserved(c)) {
            return Err(Error::arg(OP, "eq", format!("{eq:?}"), format!("no stray {c:?} in a term")));
        }
    }
    // How often each symbol occurs over all terms.
    let mut occurs: FastMap<char, u32> = FastMap::default();
    for sub in &subs {
        for c in sub.chars() {
            *occurs.entry(c).or_insert(0) += 1;
        }
    }
    let output: String = match &rhs {
        Some(r) => {
            if r.contains('.') && (r.matches('.').count() != 3 || r.matches("...").count() != 1) {
                return Err(Error::arg(OP, "eq", format!("{eq:?}"), "at most one '...' in the output"));
            }
            r.replace("...", &out_ellipsis)
        }
        None => {
            let mut once: Vec<char> = occurs
                .iter()
                .filter(|&(c, &k)| k == 1 && !out_ellipsis.contains(*c))
                .map(|(&c, _)| c)
                .collect();
            once.sort_unstable();
            let mut o = out_ellipsis.clone();
            o.extend(once);
            o
        }
    };
    let mut in_output: FastMap<char, u32> = FastMap::default();
    for c in output.chars() {
        *in_output.entry(c).or_insert(0) += 1;
    }
    for c in output.chars() {
        if is_reserved(c) {
            return Err(Error::arg(OP, "eq", format!("{eq:?}"), format!("no stray {c:?} in the output")));
        }
        if in_output[&c] != 1 {
            return Err(Error::arg(OP, "eq", format!("{eq:?}"), format!("output index {c:?} at most once")));
        }
        if !occurs.contains_key(&c) {
            return Err(Error::arg(OP, "eq", format!("{eq:?}"), format!("output index {c:?} in some input")));
        }
    }

    let mut symbols: Vec<char> = Vec::with_capacity(occurs.len());
    let mut sizes: Vec<u64> = Vec::with_capacity(occurs.len());
    let mut id_of: FastMap<char, u32> = FastMap::with_capacity_and_hasher(occurs.len(), Default::default());
    let mut terms = Vec::with_capacity(subs.len());
    for (num, sub) in subs.iter().enumerate() {
        let shape = &shapes[num];
        let n = sub.chars().count();
        if shape.len() != n {
            return Err(Error::shape(
                OP,
                "operands",
                shape,
                format!("{n} dimensions for term {num} ({sub:?})"),
            ));
        }
        let mut term = Vec::with_capacity(n);
        for (c, &d) in sub.chars().zip(shape) {
            let d = d as u64;
            let id = match id_of.get(&c) {
                Some(&id) => {
                    let s = &mut sizes[id as usize];
                    if *s == 1 {
                        *s = d;
                    } else if d != 1 && d != *s {
                        return Err(Error::shape(
                            OP,
                            "operands",
                            shape,
                            format!("size {} (or 1) for index {c:?} of term {num}, as elsewhere", *s),
                        ));
                    }
                    id
                }
                None => {
                    let id = symbols.len() as u32;
                    symbols.push(c);
                    sizes.push(d);
                    id_of.insert(c, id);
                    id
                }
            };
            term.push(id);
        }
        terms.push(term);
    }
    let output = output.chars().map(|c| id_of[&c]).collect();
    Ok(Network { terms, output, sizes, symbols })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(eq: &str, shapes: &[&[usize]]) -> Result<Network> {
        parse(eq, &shapes.iter().map(|s| s.to_vec()).collect::<Vec<_>>())
    }

    #[test]
    fn implicit_output_ellipsis_and_broadcast() {
        let n = p("ij,jk", &[&[2, 3], &[3, 4]]).unwrap();
        assert_eq!(n.input_subscripts(), "ij,jk");
        assert_eq!(n.output_subscript(), "ik");
        let n = p("ba,ac", &[&[2, 3], &[3, 4]]).unwrap();
        assert_eq!(n.output_subscript(), "bc");
        let n = p("ii", &[&[3, 3]]).unwrap();
        assert_eq!(n.output_subscript(), "");
        let n = p("...a,...a->...", &[&[4, 4], &[3, 4, 4]]).unwrap();
        assert_eq!(n.input_subscripts(), "da,cda");
        assert_eq!(n.output_subscript(), "cd");
        let n = p("...a,...a", &[&[4, 4], &[3, 4, 4]]).unwrap();
        assert_eq!(n.output_subscript(), "cd");
        let n = p("ab,b", &[&[1, 3], &[3]]).unwrap();
        assert_eq!(n.sizes, vec![1, 3]);
        let n = p("ab,ab->ab", &[&[1, 3], &[5, 3]]).unwrap();
        assert_eq!(n.sizes, vec![5, 3]);
        let n = p("a...,b", &[&[2], &[3]]).unwrap();
        assert_eq!(n.input_subscripts(), "a,b");
        assert_eq!(symbol(52), 'À');
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(p("ij,jk", &[&[2, 3]]).unwrap_err().to_string().contains("operands"));
        assert!(p("ij,jk->i->k", &[&[2, 3], &[3, 4]]).is_err());
        assert!(p("ij,jk->ii", &[&[2, 3], &[3, 4]]).is_err());
        assert!(p("ij,jk->z", &[&[2, 3], &[3, 4]]).is_err());
        assert!(p("ij,jk", &[&[2, 3], &[4, 4]]).unwrap_err().to_string().contains("index 'j'"));
        assert!(p("ij,jk", &[&[2, 3, 1], &[3, 4]]).is_err());
        assert!(p("....a", &[&[2, 3]]).is_err());
        assert!(p("ab...,c", &[&[2], &[3]]).is_err());
    }
}
