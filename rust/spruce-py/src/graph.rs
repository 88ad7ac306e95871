//! Bindings of graph ops and distillation losses (`spruce_core::graph`, `spruce_core::distill`).

use crate::{bools, contiguous, float_arr, py_err, shape_of, shaped, Arr};
use half::{bf16, f16};
use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use spruce_core::distill::{self, Reduction};
use spruce_core::graph::{self, Norm, Reduce, SelfLoops};
use spruce_core::Error;

type I64Arr<'py> = Bound<'py, PyArrayDyn<i64>>;

fn dtype_name(a: &Arr<'_>) -> &'static str {
    match a {
        Arr::F32(_) => "float32",
        Arr::F64(_) => "float64",
        Arr::F16(_) => "float16",
        Arr::BF16(_) => "bfloat16",
    }
}

/// Runs `$body` with `$x`, `$y` bound to the typed slices of two arrays of one dtype.
macro_rules! with_two {
    ($a:expr, $b:expr, $op:expr, $an:expr, $bn:expr, |$x:ident, $y:ident| $body:expr) => {
        match (&$a, &$b) {
            (Arr::F32(p), Arr::F32(q)) => {
                let $x: &[f32] = contiguous(p, $op, $an)?;
                let $y: &[f32] = contiguous(q, $op, $bn)?;
                $body
            }
            (Arr::F64(p), Arr::F64(q)) => {
                let $x: &[f64] = contiguous(p, $op, $an)?;
                let $y: &[f64] = contiguous(q, $op, $bn)?;
                $body
            }
            (Arr::F16(p), Arr::F16(q)) => {
                let $x: &[f16] = contiguous(p, $op, $an)?;
                let $y: &[f16] = contiguous(q, $op, $bn)?;
                $body
            }
            (Arr::BF16(p), Arr::BF16(q)) => {
                let $x: &[bf16] = half::slice::HalfBitsSliceExt::reinterpret_cast(contiguous(p, $op, $an)?);
                let $y: &[bf16] = half::slice::HalfBitsSliceExt::reinterpret_cast(contiguous(q, $op, $bn)?);
                $body
            }
            _ => Err(py_err(Error::DType {
                op: $op,
                arg: $bn,
                dtype: dtype_name(&$b).into(),
                expected: format!("the dtype of {} ({})", $an, dtype_name(&$a)),
            })),
        }
    };
}

/// Runs `$body` with `$x` bound to the typed slice of one array (bf16 reinterpreted in place).
macro_rules! with_one {
    ($a:expr, $op:expr, $an:expr, |$x:ident| $body:expr) => {
        crate::with_slice!($a, $op, $an, $x => $body)
    };
}

fn ints<'a>(a: &'a PyReadonlyArrayDyn<'_, i64>, op: &'static str, arg: &'static str) -> PyResult<&'a [i64]> {
    contiguous(a, op, arg)
}

fn size(op: &'static str, arg: &'static str, v: i64) -> PyResult<usize> {
    usize::try_from(v).map_err(|_| py_err(Error::arg(op, arg, v, ">= 0")))
}

fn matrix(op: &'static str, arg: &'static str, shape: &[usize]) -> PyResult<(usize, usize)> {
    if shape.len() != 2 {
        return Err(py_err(Error::shape(op, arg, shape, "a 2-D array")));
    }
    Ok((shape[0], shape[1]))
}

fn i64s<'py>(py: Python<'py>, v: Vec<i64>) -> PyResult<I64Arr<'py>> {
    let n = v.len();
    shaped(py, v, &[n])
}

type StructureOut<'py> = (
    I64Arr<'py>,
    I64Arr<'py>,
    I64Arr<'py>,
    Bound<'py, PyArrayDyn<bool>>,
    I64Arr<'py>,
    I64Arr<'py>,
    I64Arr<'py>,
    I64Arr<'py>,
);

/// `(indptr, indices, edge_slot, fill, t_indptr, t_indices, t_perm, t_inv)` of an edge list.
#[pyfunction]
fn graph_structure<'py>(
    py: Python<'py>,
    edge_index: PyReadonlyArrayDyn<'py, i64>,
    num_nodes: i64,
    self_loops: &str,
) -> PyResult<StructureOut<'py>> {
    const OP: &str = "from_edge_index";
    let n = size(OP, "num_nodes", num_nodes)?;
    let loops = SelfLoops::parse(OP, self_loops).map_err(py_err)?;
    let shape = edge_index.shape().to_vec();
    let ei = ints(&edge_index, OP, "edge_index")?;
    let g = py.detach(|| graph::build(ei, &shape, n, loops)).map_err(py_err)?;
    let nf = g.fill.len();
    Ok((
        i64s(py, g.indptr)?,
        i64s(py, g.indices)?,
        i64s(py, g.edge_slot)?,
        bools(py, g.fill, &[nf])?,
        i64s(py, g.t_indptr)?,
        i64s(py, g.t_indices)?,
        i64s(py, g.t_perm)?,
        i64s(py, g.t_inv)?,
    ))
}

#[pyfunction]
fn graph_norm<'py>(
    py: Python<'py>,
    values: &Bound<'py, PyAny>,
    indptr: PyReadonlyArrayDyn<'py, i64>,
    indices: PyReadonlyArrayDyn<'py, i64>,
    normalization: &str,
) -> PyResult<Bound<'py, PyAny>> {
    const OP: &str = "graph_norm";
    let norm = Norm::parse(OP, normalization).map_err(py_err)?;
    let a = float_arr(values, OP, "values")?;
    let shape = shape_of(&a);
    let (ip, ix) = (ints(&indptr, OP, "indptr")?, ints(&indices, OP, "indices")?);
    let n = ip.len().saturating_sub(1);
    with_one!(a, OP, "values", |v| {
        let out = py.detach(|| graph::normalize(ip, ix, v, n, norm)).map_err(py_err)?;
        crate::values(py, out, &shape)
    })
}

#[pyfunction]
fn spmm<'py>(
    py: Python<'py>,
    indptr: PyReadonlyArrayDyn<'py, i64>,
    indices: PyReadonlyArrayDyn<'py, i64>,
    values: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    const OP: &str = "spmm";
    let (av, ax) = (float_arr(values, OP, "values")?, float_arr(x, OP, "x")?);
    let (cols, f) = matrix(OP, "x", &shape_of(&ax))?;
    let (ip, ix) = (ints(&indptr, OP, "indptr")?, ints(&indices, OP, "indices")?);
    let rows = ip.len().saturating_sub(1);
    with_two!(ax, av, OP, "x", "values", |xs, vs| {
        let out = py.detach(|| graph::spmm(ip, ix, vs, xs, cols, f)).map_err(py_err)?;
        crate::values(py, out, &[rows, f])
    })
}

#[pyfunction]
fn spmm_grad_values<'py>(
    py: Python<'py>,
    indptr: PyReadonlyArrayDyn<'py, i64>,
    indices: PyReadonlyArrayDyn<'py, i64>,
    x: &Bound<'py, PyAny>,
    grad_out: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    const OP: &str = "spmm_grad_values";
    let (ax, ag) = (float_arr(x, OP, "x")?, float_arr(grad_out, OP, "grad_out")?);
    let (cols, f) = matrix(OP, "x", &shape_of(&ax))?;
    let (ip, ix) = (ints(&indptr, OP, "indptr")?, ints(&indices, OP, "indices")?);
    let nnz = ix.len();
    with_two!(ax, ag, OP, "x", "grad_out", |xs, gs| {
        let out = py.detach(|| graph::spmm_grad_values(ip, ix, xs, gs, cols, f)).map_err(py_err)?;
        crate::values(py, out, &[nnz])
    })
}

type ReduceOut<'py> = (Bound<'py, PyAny>, I64Arr<'py>);

#[pyfunction]
fn segment_reduce<'py>(
    py: Python<'py>,
    src: &Bound<'py, PyAny>,
    indptr: PyReadonlyArrayDyn<'py, i64>,
    reduce: &str,
) -> PyResult<ReduceOut<'py>> {
    const OP: &str = "segment_reduce";
    let r = Reduce::parse(OP, reduce).map_err(py_err)?;
    let a = float_arr(src, OP, "src")?;
    let (n, f) = matrix(OP, "src", &shape_of(&a))?;
    let ip = ints(&indptr, OP, "indptr")?;
    let segs = ip.len().saturating_sub(1);
    with_one!(a, OP, "src", |s| {
        let (out, arg) = py.detach(|| graph::segment_reduce(s, n, f, ip, r)).map_err(py_err)?;
        let arg_shape = if r.selects() { vec![segs, f] } else { vec![0] };
        Ok((crate::values(py, out, &[segs, f])?, shaped(py, arg, &arg_shape)?))
    })
}

#[pyfunction]
fn scatter_reduce<'py>(
    py: Python<'py>,
    src: &Bound<'py, PyAny>,
    index: PyReadonlyArrayDyn<'py, i64>,
    dim_size: i64,
    reduce: &str,
) -> PyResult<ReduceOut<'py>> {
    const OP: &str = "scatter_reduce";
    let r = Reduce::parse(OP, reduce).map_err(py_err)?;
    let d = size(OP, "dim_size", dim_size)?;
    let a = float_arr(src, OP, "src")?;
    let (n, f) = matrix(OP, "src", &shape_of(&a))?;
    let ix = ints(&index, OP, "index")?;
    with_one!(a, OP, "src", |s| {
        let (out, arg) = py.detach(|| graph::scatter_reduce(s, n, f, ix, d, r)).map_err(py_err)?;
        let arg_shape = if r.selects() { vec![d, f] } else { vec![0] };
        Ok((crate::values(py, out, &[d, f])?, shaped(py, arg, &arg_shape)?))
    })
}

type LossOut<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>);

/// The loss (shape `()` or `(N,)`) and the gradient (`(N, C)`, or `(0,)` when not asked for).
fn loss_out<'py, T: crate::ToNumpy>(
    py: Python<'py>,
    loss: Vec<f64>,
    per_row: bool,
    grad: Vec<T>,
    shape: &[usize],
) -> PyResult<LossOut<'py>> {
    let n = loss.len();
    let l: Vec<T> = loss.into_iter().map(T::from_f64).collect();
    let lshape: Vec<usize> = if per_row { vec![n] } else { vec![] };
    let gshape: Vec<usize> = if grad.is_empty() { vec![0] } else { shape.to_vec() };
    Ok((crate::values(py, l, &lshape)?, crate::values(py, grad, &gshape)?))
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn kd_loss<'py>(
    py: Python<'py>,
    student_logits: &Bound<'py, PyAny>,
    teacher_logits: &Bound<'py, PyAny>,
    temperature: f64,
    t2_scale: bool,
    reduction: &str,
    need_grad: bool,
) -> PyResult<LossOut<'py>> {
    const OP: &str = "kd_loss";
    let red = Reduction::parse(OP, reduction).map_err(py_err)?;
    let (a, b) =
        (float_arr(student_logits, OP, "student_logits")?, float_arr(teacher_logits, OP, "teacher_logits")?);
    let (sa, sb) = (shape_of(&a), shape_of(&b));
    with_two!(a, b, OP, "student_logits", "teacher_logits", |s, t| {
        let (l, g) = py
            .detach(|| distill::kd_loss(s, &sa, t, &sb, temperature, t2_scale, red, need_grad))
            .map_err(py_err)?;
        loss_out(py, l, red == Reduction::None, g, &sa)
    })
}

#[pyfunction]
fn ce_loss<'py>(
    py: Python<'py>,
    student_logits: &Bound<'py, PyAny>,
    labels: PyReadonlyArrayDyn<'py, i64>,
    labelled_mask: PyReadonlyArrayDyn<'py, bool>,
    need_grad: bool,
) -> PyResult<LossOut<'py>> {
    const OP: &str = "ce_loss";
    let a = float_arr(student_logits, OP, "student_logits")?;
    let sa = shape_of(&a);
    let y = ints(&labels, OP, "labels")?;
    let m = contiguous(&labelled_mask, OP, "labelled_mask")?;
    with_one!(a, OP, "student_logits", |s| {
        let (l, g) = py.detach(|| distill::ce_loss(s, &sa, y, m, need_grad)).map_err(py_err)?;
        loss_out(py, l, false, g, &sa)
    })
}

#[pyfunction]
fn lfd_loss<'py>(
    py: Python<'py>,
    student_logits: &Bound<'py, PyAny>,
    teacher_logits: &Bound<'py, PyAny>,
    edge_index: PyReadonlyArrayDyn<'py, i64>,
    need_grad: bool,
) -> PyResult<LossOut<'py>> {
    const OP: &str = "lfd_loss";
    let (a, b) =
        (float_arr(student_logits, OP, "student_logits")?, float_arr(teacher_logits, OP, "teacher_logits")?);
    let (sa, sb) = (shape_of(&a), shape_of(&b));
    let es = edge_index.shape().to_vec();
    let ei = ints(&edge_index, OP, "edge_index")?;
    with_two!(a, b, OP, "student_logits", "teacher_logits", |s, t| {
        let (l, g) = py.detach(|| distill::lfd_loss(s, &sa, t, &sb, ei, &es, need_grad)).map_err(py_err)?;
        loss_out(py, l, false, g, &sa)
    })
}

#[pyfunction]
fn hfd_loss<'py>(
    py: Python<'py>,
    student_logits: &Bound<'py, PyAny>,
    teacher_logits: &Bound<'py, PyAny>,
    edge_index: PyReadonlyArrayDyn<'py, i64>,
    tau: f64,
    need_grad: bool,
) -> PyResult<LossOut<'py>> {
    const OP: &str = "hfd_loss";
    let (a, b) =
        (float_arr(student_logits, OP, "student_logits")?, float_arr(teacher_logits, OP, "teacher_logits")?);
    let (sa, sb) = (shape_of(&a), shape_of(&b));
    let es = edge_index.shape().to_vec();
    let ei = ints(&edge_index, OP, "edge_index")?;
    with_two!(a, b, OP, "student_logits", "teacher_logits", |s, t| {
        let (l, g) =
            py.detach(|| distill::hfd_loss(s, &sa, t, &sb, ei, &es, tau, need_grad)).map_err(py_err)?;
        loss_out(py, l, false, g, &sa)
    })
}

#[pyfunction]
fn krd_edge_sampling<'py>(
    py: Python<'py>,
    edge_index: PyReadonlyArrayDyn<'py, i64>,
    entropy_shift: &Bound<'py, PyAny>,
    power: f64,
    seed: u64,
) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
    const OP: &str = "krd_edge_sampling";
    let a = float_arr(entropy_shift, OP, "entropy_shift")?;
    let es = edge_index.shape().to_vec();
    let ei = ints(&edge_index, OP, "edge_index")?;
    with_one!(a, OP, "entropy_shift", |h| {
        let keep = py.detach(|| distill::krd_edge_sampling(ei, &es, h, power, seed)).map_err(py_err)?;
        let n = keep.len();
        bools(py, keep, &[n])
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(graph_structure, m)?)?;
    m.add_function(wrap_pyfunction!(graph_norm, m)?)?;
    m.add_function(wrap_pyfunction!(spmm, m)?)?;
    m.add_function(wrap_pyfunction!(spmm_grad_values, m)?)?;
    m.add_function(wrap_pyfunction!(segment_reduce, m)?)?;
    m.add_function(wrap_pyfunction!(scatter_reduce, m)?)?;
    m.add_function(wrap_pyfunction!(kd_loss, m)?)?;
    m.add_function(wrap_pyfunction!(ce_loss, m)?)?;
    m.add_function(wrap_pyfunction!(lfd_loss, m)?)?;
    m.add_function(wrap_pyfunction!(hfd_loss, m)?)?;
    m.add_function(wrap_pyfunction!(krd_edge_sampling, m)?)?;
    Ok(())
}
