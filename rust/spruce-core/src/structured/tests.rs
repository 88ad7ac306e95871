//! Butterfly and Walsh–Hadamard kernels against a plain factor-by-factor definition.

use super::butterfly::backward_impl;
use super::*;
use crate::dtype::{bf16, f16};
use crate::rng::uniform;
use crate::Error;

fn rand(n: usize, seed: u64) -> Vec<f64> {
    (0..n).map(|i| 2.0 * uniform(seed, 7, i as u64) as f64 - 1.0).collect()
}

/// The definition, one factor at a time, on one vector of length n (f64).
fn apply_ref(tw: &[f64], spec: &ButterflySpec, stack: usize, v: &mut [f64], transpose: bool) {
    let (l, n) = (spec.log_n, spec.n());
    let h = n / 2;
    let mut steps = vec![];
    for block in 0..spec.nblocks {
        let inc = spec.increasing_stride ^ (block % 2 == 1);
        for idx in 0..l {
            let s = if inc { 1 << idx } else { 1 << (l - 1 - idx) };
            steps.push((block, idx, s));
        }
    }
    if transpose {
        steps.reverse();
    }
    for (block, idx, s) in steps {
        let base = ((stack * spec.nblocks + block) * l + idx) * h * 4;
        for i in 0..h {
            let low = i % s;
            let pos = 2 * (i - low) + low;
            let t = &tw[base + 4 * i..base + 4 * i + 4];
            let (a, b, c, d) = if transpose { (t[0], t[2], t[1], t[3]) } else { (t[0], t[1], t[2], t[3]) };
            let (u, w) = (v[pos], v[pos + s]);
            v[pos] = a * u + b * w;
            v[pos + s] = c * u + d * w;
        }
    }
}

fn forward_ref(tw: &[f64], x: &[f64], spec: &ButterflySpec) -> Vec<f64> {
    let n = spec.n();
    let mut out = vec![];
    for b in 0..spec.batch {
        for s in 0..spec.nstacks {
            let sx = if spec.x_stacks == 1 { 0 } else { s };
            let row = &x[(b * spec.x_stacks + sx) * spec.in_size..][..spec.in_size];
            let mut v = vec![0.0; n];
            let m = n.min(spec.in_size);
            v[..m].copy_from_slice(&row[..m]);
            apply_ref(tw, spec, s, &mut v, spec.transpose);
            out.extend_from_slice(&v[..spec.out_size]);
        }
    }
    out
}

fn close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "index {i}: {x} vs {y}");
    }
}

/// `(twiddle shape, x shape, increasing_stride, output_size, transpose)`.
type Case = ([usize; 6], [usize; 3], bool, Option<usize>, bool);

fn specs() -> Vec<Case> {
    vec![
        ([1, 1, 3, 4, 2, 2], [5, 1, 8], true, None, false),
        ([1, 2, 4, 8, 2, 2], [19, 1, 16], false, None, false),
        ([3, 3, 3, 4, 2, 2], [17, 3, 6], true, Some(5), false),
        ([2, 2, 4, 8, 2, 2], [33, 1, 20], false, Some(7), true),
        ([1, 1, 5, 16, 2, 2], [40, 1, 32], true, None, true),
        ([2, 0, 3, 4, 2, 2], [3, 2, 5], true, Some(3), false),
        ([1, 1, 0, 0, 2, 2], [4, 1, 1], true, None, false),
        ([2, 3, 6, 32, 2, 2], [9, 2, 64], true, Some(64), true),
    ]
}

#[test]
fn forward_matches_the_factor_by_factor_definition() {
    for (seed, (tws, xs, inc, out, tr)) in specs().into_iter().enumerate() {
        let spec = ButterflySpec::new(&tws, &xs, inc, out, tr).unwrap();
        let tw = rand(tws.iter().product(), seed as u64);
        let x = rand(xs.iter().product(), 100 + seed as u64);
        let want = forward_ref(&tw, &x, &spec);
        let got = butterfly_multiply(&tw, &x, &spec).unwrap();
        close(&got, &want, 1e-12);
        let tw32: Vec<f32> = tw.iter().map(|&v| v as f32).collect();
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let got32: Vec<f64> =
            butterfly_multiply(&tw32, &x32, &spec).unwrap().iter().map(|&v| v as f64).collect();
        close(&got32, &want, 1e-4);
        let twb: Vec<bf16> = tw.iter().map(|&v| bf16::from_f64(v)).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f64(v)).collect();
        let twb64: Vec<f64> = twb.iter().map(|v| v.to_f64()).collect();
        let xb64: Vec<f64> = xb.iter().map(|v| v.to_f64()).collect();
        let want_b = forward_ref(&twb64, &xb64, &spec);
        let gotb: Vec<f64> =
            butterfly_multiply(&twb, &xb, &spec).unwrap().iter().map(|v| v.to_f64()).collect();
        close(&gotb, &want_b, 1e-2);
        let twh: Vec<f16> = tw.iter().map(|&v| f16::from_f64(v)).collect();
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f64(v)).collect();
        assert_eq!(butterfly_multiply(&twh, &xh, &spec).unwrap().len(), want.len());
    }
}

#[test]
fn hadamard_twiddles_give_sylvester_hadamard() {
    let log_n = 4;
    let n = 1 << log_n;
    for inc in [true, false] {
        let tws = [1, 1, log_n, n / 2, 2, 2];
        let tw: Vec<f64> =
            (0..tws.iter().product::<usize>()).map(|i| if i % 4 == 3 { -1.0 } else { 1.0 }).collect();
        // the rows of the identity
        let x: Vec<f64> = (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
        let spec = ButterflySpec::new(&tws, &[n, 1, n], inc, None, false).unwrap();
        let y = butterfly_multiply(&tw, &x, &spec).unwrap();
        let f = fwht(&x, &[n, n], false).unwrap();
        for i in 0..n {
            for j in 0..n {
                let h = if (i & j).count_ones() % 2 == 0 { 1.0 } else { -1.0 };
                assert_eq!(y[j * n + i], h);
                assert_eq!(f[j * n + i], h);
            }
        }
    }
}

#[test]
fn fwht_all_sizes_and_normalization() {
    for log_n in 0..9 {
        let n = 1usize << log_n;
        let rows = 21;
        let x = rand(rows * n, log_n as u64);
        let y = fwht(&x, &[3, 7, n], true).unwrap();
        for r in 0..rows {
            for i in 0..n {
                let mut s = 0.0;
                for j in 0..n {
                    let h = if (i & j).count_ones() % 2 == 0 { 1.0 } else { -1.0 };
                    s += h * x[r * n + j];
                }
                let want = s / (n as f64).sqrt();
                assert!((y[r * n + i] - want).abs() < 1e-12, "n={n} r={r} i={i}");
            }
        }
        // orthonormal: applying it twice gives the input back
        let z = fwht(&y, &[rows, n], true).unwrap();
        close(&z, &x, 1e-12);
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let y32 = fwht(&x32, &[rows, n], true).unwrap();
        close(&y32.iter().map(|&v| v as f64).collect::<Vec<_>>(), &y, 1e-5);
    }
    assert!(matches!(fwht(&[1.0f32; 6], &[2, 3], false), Err(Error::Shape { .. })));
    assert!(fwht::<f32>(&[], &[0, 8], false).unwrap().is_empty());
}

/// The dense matrix of one stack (columns = images of the basis vectors), n x n.
fn dense(tw: &[f64], spec: &ButterflySpec, stack: usize) -> Vec<f64> {
    let n = spec.n();
    let mut m = vec![0.0; n * n];
    for j in 0..n {
        let mut v = vec![0.0; n];
        v[j] = 1.0;
        apply_ref(tw, spec, stack, &mut v, spec.transpose);
        for i in 0..n {
            m[i * n + j] = v[i];
        }
    }
    m
}

#[test]
fn backward_matches_the_adjoint_and_finite_differences() {
    for (seed, (tws, xs, inc, out, tr)) in specs().into_iter().enumerate() {
        let spec = ButterflySpec::new(&tws, &xs, inc, out, tr).unwrap();
        let tw = rand(tws.iter().product(), 10 + seed as u64);
        let x = rand(xs.iter().product(), 200 + seed as u64);
        let g = rand(spec.out_shape().iter().product(), 300 + seed as u64);
        let (gtw, gx) = butterfly_multiply_backward(&tw, &x, &g, &spec).unwrap();
        // grad_x[b, sx, k] = sum over stacks of (M_s^T g)[k] for k < n
        let n = spec.n();
        let mut want_gx = vec![0.0; x.len()];
        for s in 0..spec.nstacks {
            let m = dense(&tw, &spec, s);
            let sx = if spec.x_stacks == 1 { 0 } else { s };
            for b in 0..spec.batch {
                for k in 0..n.min(spec.in_size) {
                    let mut acc = 0.0;
                    for o in 0..spec.out_size {
                        acc += m[o * n + k] * g[(b * spec.nstacks + s) * spec.out_size + o];
                    }
                    want_gx[(b * spec.x_stacks + sx) * spec.in_size + k] += acc;
                }
            }
        }
        close(&gx, &want_gx, 1e-11);
        // y is affine in every single twiddle entry: a central difference is exact.
        let loss = |t: &[f64]| -> f64 {
            let y = forward_ref(t, &x, &spec);
            y.iter().zip(&g).map(|(a, b)| a * b).sum()
        };
        let mut t = tw.clone();
        for j in 0..tw.len() {
            t[j] = tw[j] + 1.0;
            let up = loss(&t);
            t[j] = tw[j] - 1.0;
            let down = loss(&t);
            t[j] = tw[j];
            let fd = (up - down) / 2.0;
            assert!(
                (gtw[j] - fd).abs() < 1e-9 * (1.0 + fd.abs()),
                "spec {seed} entry {j}: {} vs {fd}",
                gtw[j]
            );
        }
        // checkpointed backward (every 2 or 3 steps) equals the stored one
        for every in [2, 3] {
            let (gtw2, gx2) = backward_impl::<f64, 8>(&tw, &x, &g, &spec, Some(every)).unwrap();
            close(&gtw2, &gtw, 1e-13);
            close(&gx2, &gx, 1e-13);
        }
        // half types run and stay near f32
        let c = |v: &[f64]| v.iter().map(|&a| bf16::from_f64(a)).collect::<Vec<_>>();
        let (gtwb, gxb) = butterfly_multiply_backward(&c(&tw), &c(&x), &c(&g), &spec).unwrap();
        assert_eq!((gtwb.len(), gxb.len()), (gtw.len(), gx.len()));
        let c32 = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<_>>();
        let (gtw32, gx32) = butterfly_multiply_backward(&c32(&tw), &c32(&x), &c32(&g), &spec).unwrap();
        close(&gtw32.iter().map(|&v| v as f64).collect::<Vec<_>>(), &gtw, 1e-4);
        close(&gx32.iter().map(|&v| v as f64).collect::<Vec<_>>(), &gx, 1e-4);
    }
}

#[test]
fn many_chunks_reduce_in_order() {
    // 40 tiles of 8 rows: several chunks, each with its own twiddle-gradient buffer.
    let tws = [1, 1, 3, 4, 2, 2];
    let spec = ButterflySpec::new(&tws, &[320, 1, 8], true, None, false).unwrap();
    let tw = rand(48, 1);
    let x = rand(320 * 8, 2);
    let g = rand(320 * 8, 3);
    let (gtw, _) = butterfly_multiply_backward(&tw, &x, &g, &spec).unwrap();
    let (a, _) =
        butterfly_multiply_backward(&tw, &x[..160 * 8], &g[..160 * 8], &ButterflySpec { batch: 160, ..spec })
            .unwrap();
    let (b, _) =
        butterfly_multiply_backward(&tw, &x[160 * 8..], &g[160 * 8..], &ButterflySpec { batch: 160, ..spec })
            .unwrap();
    let sum: Vec<f64> = a.iter().zip(&b).map(|(p, q)| p + q).collect();
    close(&gtw, &sum, 1e-12);
    let again = butterfly_multiply_backward(&tw, &x, &g, &spec).unwrap().0;
    assert_eq!(again, gtw);
}

#[test]
fn bad_shapes_are_refused_with_named_arguments() {
    let e = ButterflySpec::new(&[1, 1, 3, 3, 2, 2], &[2, 1, 8], true, None, false).unwrap_err();
    assert!(e.to_string().starts_with("butterfly_multiply: twiddle has shape (1, 1, 3, 3, 2, 2)"), "{e}");
    let e = ButterflySpec::new(&[2, 1, 3, 4, 2, 2], &[2, 3, 8], true, None, false).unwrap_err();
    assert!(e.to_string().contains("x has shape (2, 3, 8)"), "{e}");
    let e = ButterflySpec::new(&[1, 1, 3, 4, 2, 2], &[2, 1, 8], true, Some(9), false).unwrap_err();
    assert_eq!(e.to_string(), "butterfly_multiply: output_size (9) must be <= n (8)");
    let e = ButterflySpec::new(&[1, 1, 3, 4, 2, 2], &[2, 8], true, None, false).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x", .. }));
    let spec = ButterflySpec::new(&[1, 1, 3, 4, 2, 2], &[2, 1, 8], true, None, false).unwrap();
    let e = butterfly_multiply(&[0.0f32; 47], &[0.0f32; 16], &spec).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "twiddle", .. }));
    let e = butterfly_multiply_backward(&[0.0f32; 48], &[0.0f32; 16], &[0.0; 15], &spec).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "grad", .. }));
}
