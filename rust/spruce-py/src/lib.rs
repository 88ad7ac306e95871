//! `spruce._core`: the only crate that knows Python.
//!
//! Each function borrows its NumPy inputs zero-copy (torch tensors arrive as `Tensor.numpy()`
//! views; bfloat16 as a `uint16` view of the same memory), dispatches on dtype, releases the GIL
//! around the spruce-core kernel, and maps `spruce_core::Error` to the classes of
//! `spruce.errors`. No algorithm lives here.

use half::{bf16, f16};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyType};
use spruce_core::{mask, parallel, select, Error, Float, Scores};
use std::sync::Once;

/// Raises the `spruce.errors` class that matches a core error.
fn py_err(e: Error) -> PyErr {
    let class = match &e {
        Error::InvalidArgument { .. } => "ArgumentError",
        Error::Shape { .. } => "ShapeError",
        Error::NonFinite { .. } => "NonFiniteError",
        Error::DType { .. } => "DTypeError",
    };
    let msg = e.to_string();
    Python::attach(|py| {
        let found = py
            .import("spruce.errors")
            .and_then(|m| m.getattr(class))
            .and_then(|c| c.cast_into::<PyType>().map_err(PyErr::from));
        match found {
            Ok(ty) => PyErr::from_type(ty, msg),
            Err(_) if matches!(e, Error::DType { .. }) => PyTypeError::new_err(msg),
            Err(_) => PyValueError::new_err(msg),
        }
    })
}

/// A borrowed float array of one of the supported dtypes.
enum Arr<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    F16(PyReadonlyArrayDyn<'py, f16>),
    /// bfloat16 bits in a `uint16` view (NumPy has no bfloat16).
    BF16(PyReadonlyArrayDyn<'py, u16>),
}

fn float_arr<'py>(ob: &Bound<'py, PyAny>, op: &'static str, arg: &'static str) -> PyResult<Arr<'py>> {
    if let Ok(a) = ob.extract::<PyReadonlyArrayDyn<'py, f32>>() {
        return Ok(Arr::F32(a));
    }
    if let Ok(a) = ob.extract::<PyReadonlyArrayDyn<'py, f64>>() {
        return Ok(Arr::F64(a));
    }
    if let Ok(a) = ob.extract::<PyReadonlyArrayDyn<'py, f16>>() {
        return Ok(Arr::F16(a));
    }
    if let Ok(a) = ob.extract::<PyReadonlyArrayDyn<'py, u16>>() {
        return Ok(Arr::BF16(a));
    }
    let dtype = ob.getattr("dtype").map(|d| d.to_string()).unwrap_or_else(|_| ob.get_type().to_string());
    Err(py_err(Error::DType { op, arg, dtype, expected: "float32, float64, float16 or bfloat16".into() }))
}

fn shape_of(a: &Arr<'_>) -> Vec<usize> {
    match a {
        Arr::F32(x) => x.shape().to_vec(),
        Arr::F64(x) => x.shape().to_vec(),
        Arr::F16(x) => x.shape().to_vec(),
        Arr::BF16(x) => x.shape().to_vec(),
    }
}

fn contiguous<'a, T: numpy::Element>(
    a: &'a PyReadonlyArrayDyn<'_, T>,
    op: &'static str,
    arg: &'static str,
) -> PyResult<&'a [T]> {
    a.as_slice().map_err(|_| {
        py_err(Error::Shape {
            op,
            arg,
            shape: spruce_core::error::fmt_shape(a.shape()),
            expected: "a C-contiguous buffer".into(),
        })
    })
}

/// Runs `$body` with `$s` bound to the typed slice of `$arr` (bf16 reinterpreted in place).
macro_rules! with_slice {
    ($arr:expr, $op:expr, $arg:expr, $s:ident => $body:expr) => {
        match &$arr {
            Arr::F32(a) => {
                let $s: &[f32] = contiguous(a, $op, $arg)?;
                $body
            }
            Arr::F64(a) => {
                let $s: &[f64] = contiguous(a, $op, $arg)?;
                $body
            }
            Arr::F16(a) => {
                let $s: &[f16] = contiguous(a, $op, $arg)?;
                $body
            }
            Arr::BF16(a) => {
                let bits: &[u16] = contiguous(a, $op, $arg)?;
                let $s: &[bf16] = half::slice::HalfBitsSliceExt::reinterpret_cast(bits);
                $body
            }
        }
    };
}

fn shaped<'py, T: numpy::Element>(
    py: Python<'py>,
    v: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    PyArray1::from_vec(py, v).reshape(shape.to_vec())
}

/// A value vector in its NumPy element type (bfloat16 as its uint16 bits).
trait ToNumpy: Float {
    type Np: numpy::Element;
    fn into_np(v: Vec<Self>) -> Vec<Self::Np>;
}
macro_rules! same_np {
    ($t:ty) => {
        impl ToNumpy for $t {
            type Np = $t;
            fn into_np(v: Vec<Self>) -> Vec<Self> {
                v
            }
        }
    };
}
same_np!(f32);
same_np!(f64);
same_np!(f16);
impl ToNumpy for bf16 {
    type Np = u16;
    fn into_np(v: Vec<Self>) -> Vec<u16> {
        half::vec::HalfFloatVecExt::reinterpret_into(v)
    }
}

fn values<'py, T: ToNumpy>(py: Python<'py>, v: Vec<T>, shape: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    Ok(shaped(py, T::into_np(v), shape)?.into_any())
}

fn bools<'py>(py: Python<'py>, v: Vec<bool>, shape: &[usize]) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
    shaped(py, v, shape)
}

#[pyfunction]
#[pyo3(signature = (scores, sparsity, dim=None))]
fn topk_mask<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    sparsity: f64,
    dim: Option<i64>,
) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
    let a = float_arr(scores, "topk_mask", "scores")?;
    let shape = shape_of(&a);
    let m =
        with_slice!(a, "topk_mask", "scores", s => py.detach(|| select::topk_mask(s, &shape, dim, sparsity)));
    bools(py, m.map_err(py_err)?, &shape)
}

#[pyfunction]
fn global_topk_masks<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyList>,
    sparsity: f64,
) -> PyResult<Vec<Bound<'py, PyArrayDyn<bool>>>> {
    let arrs: Vec<Arr<'py>> =
        scores.iter().map(|o| float_arr(&o, "global_topk_masks", "scores")).collect::<PyResult<_>>()?;
    let mut segs: Vec<Scores<'_>> = Vec::with_capacity(arrs.len());
    for a in &arrs {
        segs.push(with_slice!(a, "global_topk_masks", "scores", s => Float::scores(s)));
    }
    let masks = py.detach(|| select::global_topk_masks(&segs, sparsity)).map_err(py_err)?;
    masks.into_iter().zip(&arrs).map(|(m, a)| bools(py, m, &shape_of(a))).collect()
}

#[pyfunction]
#[pyo3(signature = (scores, n, m, dim=-1))]
fn nm_mask<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    n: i64,
    m: i64,
    dim: i64,
) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
    let a = float_arr(scores, "nm_mask", "scores")?;
    let shape = shape_of(&a);
    let r = with_slice!(a, "nm_mask", "scores", s => py.detach(|| mask::nm_mask(s, &shape, dim, n, m)));
    bools(py, r.map_err(py_err)?, &shape)
}

#[pyfunction]
#[pyo3(signature = (scores, sparsity, dim=0, group_size=1, norm=2.0))]
fn structured_mask<'py>(
    py: Python<'py>,
    scores: &Bound<'py, PyAny>,
    sparsity: f64,
    dim: i64,
    group_size: i64,
    norm: f64,
) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
    let a = float_arr(scores, "structured_mask", "scores")?;
    let shape = shape_of(&a);
    let r = with_slice!(a, "structured_mask", "scores", s => py.detach(|| mask::structured_mask(s, &shape, dim, sparsity, group_size, norm)));
    bools(py, r.map_err(py_err)?, &shape)
}

#[pyfunction]
fn random_mask<'py>(
    py: Python<'py>,
    shape: Vec<usize>,
    density: f64,
    seed: u64,
) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| py_err(Error::shape("random_mask", "shape", &shape, "fewer than 2^64 elements")))?;
    let m = py.detach(|| mask::random_mask(numel, density, seed)).map_err(py_err)?;
    bools(py, m, &shape)
}

#[pyfunction]
#[pyo3(signature = (x, k, dim=None))]
fn kthvalue<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    k: i64,
    dim: Option<i64>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyArrayDyn<i64>>)> {
    let a = float_arr(x, "kthvalue", "input")?;
    let shape = shape_of(&a);
    with_slice!(a, "kthvalue", "input", s => {
        let (v, i, out) = py.detach(|| select::kthvalue(s, &shape, dim, k)).map_err(py_err)?;
        Ok((values(py, v, &out)?, shaped(py, i, &out)?))
    })
}

type QuantileOut<'py> = (Bound<'py, PyAny>, Bound<'py, PyArrayDyn<i64>>, Bound<'py, PyArrayDyn<i64>>);

#[pyfunction]
#[pyo3(signature = (x, q, dim=None))]
fn quantile<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    q: Vec<f64>,
    dim: Option<i64>,
) -> PyResult<QuantileOut<'py>> {
    let a = float_arr(x, "quantile", "input")?;
    let shape = shape_of(&a);
    with_slice!(a, "quantile", "input", s => {
        let (v, lo, hi, red) = py.detach(|| select::quantile(s, &shape, dim, &q)).map_err(py_err)?;
        let mut out = vec![q.len()];
        out.extend(red);
        Ok((values(py, v, &out)?, shaped(py, lo, &out)?, shaped(py, hi, &out)?))
    })
}

#[pyfunction]
fn pack_mask<'py>(
    py: Python<'py>,
    mask: PyReadonlyArrayDyn<'py, bool>,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let shape = mask.shape().to_vec();
    let m = contiguous(&mask, "pack_mask", "mask")?;
    let (p, s) = py.detach(|| mask::pack_mask(m, &shape)).map_err(py_err)?;
    shaped(py, p, &s)
}

#[pyfunction]
fn unpack_mask<'py>(
    py: Python<'py>,
    packed: PyReadonlyArrayDyn<'py, u8>,
    shape: Vec<usize>,
) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
    let pshape = packed.shape().to_vec();
    let p = contiguous(&packed, "unpack_mask", "packed")?;
    let m = py.detach(|| mask::unpack_mask(p, &pshape, &shape)).map_err(py_err)?;
    bools(py, m, &shape)
}

type CsrOut<'py> = (Bound<'py, PyArrayDyn<i64>>, Bound<'py, PyArrayDyn<i64>>, Bound<'py, PyAny>);

#[pyfunction]
fn mask_to_csr<'py>(
    py: Python<'py>,
    weight: &Bound<'py, PyAny>,
    mask: PyReadonlyArrayDyn<'py, bool>,
) -> PyResult<CsrOut<'py>> {
    let a = float_arr(weight, "mask_to_csr", "weight")?;
    let shape = shape_of(&a);
    if mask.shape() != shape.as_slice() {
        return Err(py_err(Error::shape(
            "mask_to_csr",
            "mask",
            mask.shape(),
            format!("the weight's shape {}", spruce_core::error::fmt_shape(&shape)),
        )));
    }
    let m = contiguous(&mask, "mask_to_csr", "mask")?;
    with_slice!(a, "mask_to_csr", "weight", s => {
        let (crow, col, val) = py.detach(|| mask::mask_to_csr(s, m, &shape)).map_err(py_err)?;
        let nnz = col.len();
        Ok((shaped(py, crow, &[shape[0] + 1])?, shaped(py, col, &[nnz])?, values(py, val, &[nnz])?))
    })
}

/// The number of threads spruce's kernels use.
#[pyfunction]
fn num_threads() -> usize {
    parallel::num_threads()
}

/// Sets the number of threads (0 restores the default: `SPRUCE_NUM_THREADS` or all cores).
#[pyfunction]
fn set_num_threads(n: usize) {
    parallel::set_num_threads(n)
}

/// Facts about this build: version, profile, target.
#[pyfunction]
fn build_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("version", env!("CARGO_PKG_VERSION"))?;
    d.set_item("profile", if cfg!(debug_assertions) { "debug" } else { "release" })?;
    d.set_item("target", format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS))?;
    Ok(d)
}

extern "C" fn after_fork_in_child() {
    parallel::mark_forked();
}

static ATFORK: Once = Once::new();

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    ATFORK.call_once(|| {
        // SAFETY: registers a handler that only stores an atomic flag (async-signal-safe).
        unsafe {
            libc::pthread_atfork(None, None, Some(after_fork_in_child));
        }
    });
    m.add_function(wrap_pyfunction!(topk_mask, m)?)?;
    m.add_function(wrap_pyfunction!(global_topk_masks, m)?)?;
    m.add_function(wrap_pyfunction!(nm_mask, m)?)?;
    m.add_function(wrap_pyfunction!(structured_mask, m)?)?;
    m.add_function(wrap_pyfunction!(random_mask, m)?)?;
    m.add_function(wrap_pyfunction!(kthvalue, m)?)?;
    m.add_function(wrap_pyfunction!(quantile, m)?)?;
    m.add_function(wrap_pyfunction!(pack_mask, m)?)?;
    m.add_function(wrap_pyfunction!(unpack_mask, m)?)?;
    m.add_function(wrap_pyfunction!(mask_to_csr, m)?)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
