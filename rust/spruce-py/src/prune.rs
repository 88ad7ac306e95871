//! Bindings of pruning (`spruce_core::prune`).

use crate::{bools, contiguous, float_arr, py_err, shape_of, shaped, with_slice, Arr};
use half::{bf16, f16};
use numpy::{PyArrayDyn, PyReadonlyArray1, PyReadwriteArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyList;
use spruce_core::prune::{self, KsMethod, OwnedScores, ScoreSeg, Threshold};
use spruce_core::{Error, Float, Scores};

fn stat_slice<'a>(
    stat: &'a Option<PyReadonlyArray1<'_, f32>>,
    op: &'static str,
) -> PyResult<Option<&'a [f32]>> {
    match stat {
        None => Ok(None),
        Some(s) => s
            .as_slice()
            .map(Some)
            .map_err(|_| py_err(Error::shape(op, "stat", s.shape(), "a C-contiguous float32 vector"))),
    }
}

#[pyfunction]
#[pyo3(signature = (weight, stat=None))]
fn wanda_scores<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    stat: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<Bound<'py, PyAny>> {
    const OP: &str = "wanda_scores";
    let a = float_arr(weight, OP, "weight")?;
    let shape = shape_of(&a);
    let st = stat_slice(&stat, OP)?;
    let r = with_slice!(a, OP, "weight", w => py.detach(|| prune::wanda_scores(w, &shape, st)));
    match r.map_err(py_err)? {
        OwnedScores::F32(v) => Ok(shaped(py, v, &shape)?.into_any()),
        OwnedScores::F64(v) => Ok(shaped(py, v, &shape)?.into_any()),
    }
}

#[pyfunction]
#[pyo3(signature = (weight, stat, sparsity, n=0, m=0))]
fn wanda_mask<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    stat: Option<PyReadonlyArray1<'py, f32>>,
    sparsity: f64,
    n: i64,
    m: i64,
) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
    const OP: &str = "wanda_mask";
    let a = float_arr(weight, OP, "weight")?;
    let shape = shape_of(&a);
    let st = stat_slice(&stat, OP)?;
    let r = with_slice!(a, OP, "weight", w => py.detach(|| prune::wanda_mask(w, &shape, st, sparsity, n, m)));
    bools(py, r.map_err(py_err)?, &shape)
}

/// Borrowed weights, statistics and layouts of several tensors, as score segments.
struct Segs<'py> {
    arrs: Vec<Arr<'py>>,
    stats: Vec<Option<PyReadonlyArray1<'py, f32>>>,
    transposed: Vec<bool>,
}

impl<'py> Segs<'py> {
    fn new(
        op: &'static str,
        weights: &Bound<'py, PyList>,
        stats: Vec<Option<PyReadonlyArray1<'py, f32>>>,
        transposed: Vec<bool>,
    ) -> PyResult<Self> {
        let arrs: Vec<Arr<'py>> =
            weights.iter().map(|o| float_arr(&o, op, "weights")).collect::<PyResult<_>>()?;
        for (arg, len) in [("stats", stats.len()), ("transposed", transposed.len())] {
            if len != arrs.len() {
                return Err(py_err(Error::arg(
                    op,
                    arg,
                    format!("a list of {len}"),
                    format!("one entry per weight ({})", arrs.len()),
                )));
            }
        }
        Ok(Segs { arrs, stats, transposed })
    }

    fn segs(&self, op: &'static str) -> PyResult<Vec<ScoreSeg<'_>>> {
        let mut out = Vec::with_capacity(self.arrs.len());
        for ((a, st), &tr) in self.arrs.iter().zip(&self.stats).zip(&self.transposed) {
            let shape = shape_of(a);
            let w: Scores<'_> = with_slice!(a, op, "weights", s => Float::scores(s));
            let st = stat_slice(st, op)?;
            out.push(ScoreSeg::new(op, w, &shape, st, tr).map_err(py_err)?);
        }
        Ok(out)
    }
}

#[pyfunction]
fn score_threshold<'py>(
    py: Python<'py>,
    weights: &Bound<'py, PyList>,
    stats: Vec<Option<PyReadonlyArray1<'py, f32>>>,
    transposed: Vec<bool>,
    sparsity: f64,
) -> PyResult<(f64, u64)> {
    const OP: &str = "score_threshold";
    let segs = Segs::new(OP, weights, stats, transposed)?;
    let s = segs.segs(OP)?;
    let t = py.detach(|| prune::score_threshold(&s, sparsity)).map_err(py_err)?;
    Ok((t.value, t.ties))
}

#[pyfunction]
#[pyo3(signature = (weight, stat, transposed, value, ties))]
fn threshold_mask<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    stat: Option<PyReadonlyArray1<'py, f32>>,
    transposed: bool,
    value: f64,
    ties: u64,
) -> PyResult<(Bound<'py, PyArrayDyn<bool>>, u64)> {
    const OP: &str = "threshold_mask";
    let a = float_arr(weight, OP, "weight")?;
    let shape = shape_of(&a);
    let st = stat_slice(&stat, OP)?;
    let w: Scores<'_> = with_slice!(a, OP, "weight", s => Float::scores(s));
    let seg = ScoreSeg::new(OP, w, &shape, st, transposed).map_err(py_err)?;
    let (m, used) = py.detach(|| prune::threshold_mask(&seg, Threshold { value, ties })).map_err(py_err)?;
    Ok((bools(py, m, &shape)?, used))
}

/// A writable float array of one of the supported dtypes.
enum ArrMut<'py> {
    F32(PyReadwriteArrayDyn<'py, f32>),
    F64(PyReadwriteArrayDyn<'py, f64>),
    F16(PyReadwriteArrayDyn<'py, f16>),
    BF16(PyReadwriteArrayDyn<'py, u16>),
}

fn writable_arr<'py>(ob: &Bound<'py, PyAny>, op: &'static str, arg: &'static str) -> PyResult<ArrMut<'py>> {
    if let Ok(a) = ob.extract::<PyReadwriteArrayDyn<'py, f32>>() {
        return Ok(ArrMut::F32(a));
    }
    if let Ok(a) = ob.extract::<PyReadwriteArrayDyn<'py, f64>>() {
        return Ok(ArrMut::F64(a));
    }
    if let Ok(a) = ob.extract::<PyReadwriteArrayDyn<'py, f16>>() {
        return Ok(ArrMut::F16(a));
    }
    if let Ok(a) = ob.extract::<PyReadwriteArrayDyn<'py, u16>>() {
        return Ok(ArrMut::BF16(a));
    }
    let dtype = ob.getattr("dtype").map(|d| d.to_string()).unwrap_or_else(|_| ob.get_type().to_string());
    Err(py_err(Error::DType {
        op,
        arg,
        dtype,
        expected: "a writable float32, float64, float16 or bfloat16 array".into(),
    }))
}

fn slice_mut<'a, T: numpy::Element>(
    a: &'a mut PyReadwriteArrayDyn<'_, T>,
    op: &'static str,
    arg: &'static str,
) -> PyResult<&'a mut [T]> {
    let shape = a.shape().to_vec();
    a.as_slice_mut().map_err(|_| py_err(Error::shape(op, arg, &shape, "a C-contiguous writable buffer")))
}

#[pyfunction]
#[pyo3(signature = (weight, stat, transposed, value, ties))]
fn threshold_prune_<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    stat: Option<PyReadonlyArray1<'py, f32>>,
    transposed: bool,
    value: f64,
    ties: u64,
) -> PyResult<(u64, u64)> {
    const OP: &str = "threshold_prune_";
    let mut a = writable_arr(weight, OP, "weight")?;
    let st = stat_slice(&stat, OP)?;
    let thr = Threshold { value, ties };
    let r = match &mut a {
        ArrMut::F32(x) => {
            let shape = x.shape().to_vec();
            let w = slice_mut(x, OP, "weight")?;
            py.detach(|| prune::threshold_prune_(w, &shape, st, transposed, thr))
        }
        ArrMut::F64(x) => {
            let shape = x.shape().to_vec();
            let w = slice_mut(x, OP, "weight")?;
            py.detach(|| prune::threshold_prune_(w, &shape, st, transposed, thr))
        }
        ArrMut::F16(x) => {
            let shape = x.shape().to_vec();
            let w = slice_mut(x, OP, "weight")?;
            py.detach(|| prune::threshold_prune_(w, &shape, st, transposed, thr))
        }
        ArrMut::BF16(x) => {
            let shape = x.shape().to_vec();
            let bits = slice_mut(x, OP, "weight")?;
            let w: &mut [bf16] = half::slice::HalfBitsSliceExt::reinterpret_cast_mut(bits);
            py.detach(|| prune::threshold_prune_(w, &shape, st, transposed, thr))
        }
    };
    r.map_err(py_err)
}

#[pyfunction]
fn outlier_count<'py>(
    py: Python<'py>,
    weights: &Bound<'py, PyList>,
    stats: Vec<Option<PyReadonlyArray1<'py, f32>>>,
    transposed: Vec<bool>,
    m: f64,
) -> PyResult<(u64, u64)> {
    const OP: &str = "outlier_count";
    let segs = Segs::new(OP, weights, stats, transposed)?;
    let s = segs.segs(OP)?;
    py.detach(|| prune::outlier_count(&s, m)).map_err(py_err)
}

type KsOut<'py> = (Bound<'py, PyArrayDyn<f64>>, Bound<'py, PyArrayDyn<f64>>);

#[pyfunction]
#[pyo3(signature = (before, after, method="auto"))]
fn ks_2samp<'py>(
    py: Python<'py>,
    before: &Bound<'py, PyAny>,
    after: &Bound<'py, PyAny>,
    method: &str,
) -> PyResult<KsOut<'py>> {
    const OP: &str = "ks_2samp";
    let method = KsMethod::parse(OP, method).map_err(py_err)?;
    let a = float_arr(before, OP, "before")?;
    let b = float_arr(after, OP, "after")?;
    let (sa, sb) = (shape_of(&a), shape_of(&b));
    if sa.len() != 2 {
        return Err(py_err(Error::shape(OP, "before", &sa, "a 2-D (rows, samples) array")));
    }
    if sb.len() != 2 || sb[0] != sa[0] {
        return Err(py_err(Error::shape(OP, "after", &sb, format!("a 2-D ({}, samples) array", sa[0]))));
    }
    let (rows, n1, n2) = (sa[0], sa[1], sb[1]);
    let r = with_slice!(a, OP, "before", x => {
        with_slice!(b, OP, "after", y => py.detach(|| prune::ks_2samp(x, n1, y, n2, rows, method)))
    });
    let (stat, p) = r.map_err(py_err)?;
    Ok((shaped(py, stat, &[rows])?, shaped(py, p, &[rows])?))
}

#[pyfunction]
fn kstwo_sf(n: u64, x: f64) -> f64 {
    prune::kolmogn_sf(n, x)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(wanda_scores, m)?)?;
    m.add_function(wrap_pyfunction!(wanda_mask, m)?)?;
    m.add_function(wrap_pyfunction!(score_threshold, m)?)?;
    m.add_function(wrap_pyfunction!(threshold_mask, m)?)?;
    m.add_function(wrap_pyfunction!(threshold_prune_, m)?)?;
    m.add_function(wrap_pyfunction!(outlier_count, m)?)?;
    m.add_function(wrap_pyfunction!(ks_2samp, m)?)?;
    m.add_function(wrap_pyfunction!(kstwo_sf, m)?)?;
    Ok(())
}
