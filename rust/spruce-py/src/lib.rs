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
use pyo3::types::{PyDict, PyType};
use spruce_core::{parallel, Error, Float};

mod graph;
mod masks;
mod merge;
mod prune;
mod structured;
mod tn;
use std::sync::Once;

/// Raises the `spruce.errors` class that matches a core error.
pub(crate) fn py_err(e: Error) -> PyErr {
    let class = match &e {
        Error::InvalidArgument { .. } => "ArgumentError",
        Error::Shape { .. } => "ShapeError",
        Error::NonFinite { .. } => "NonFiniteError",
        Error::DType { .. } => "DTypeError",
        Error::OutOfMemory { .. } => "OutOfMemoryError",
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
pub(crate) enum Arr<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F64(PyReadonlyArrayDyn<'py, f64>),
    F16(PyReadonlyArrayDyn<'py, f16>),
    /// bfloat16 bits in a `uint16` view (NumPy has no bfloat16).
    BF16(PyReadonlyArrayDyn<'py, u16>),
}

pub(crate) fn float_arr<'py>(
    ob: &Bound<'py, PyAny>,
    op: &'static str,
    arg: &'static str,
) -> PyResult<Arr<'py>> {
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

pub(crate) fn shape_of(a: &Arr<'_>) -> Vec<usize> {
    match a {
        Arr::F32(x) => x.shape().to_vec(),
        Arr::F64(x) => x.shape().to_vec(),
        Arr::F16(x) => x.shape().to_vec(),
        Arr::BF16(x) => x.shape().to_vec(),
    }
}

pub(crate) fn contiguous<'a, T: numpy::Element>(
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
#[macro_export]
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

pub(crate) fn shaped<'py, T: numpy::Element>(
    py: Python<'py>,
    v: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    PyArray1::from_vec(py, v).reshape(shape.to_vec())
}

/// A value vector in its NumPy element type (bfloat16 as its uint16 bits).
pub(crate) trait ToNumpy: Float {
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

pub(crate) fn values<'py, T: ToNumpy>(
    py: Python<'py>,
    v: Vec<T>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(shaped(py, T::into_np(v), shape)?.into_any())
}

pub(crate) fn bools<'py>(
    py: Python<'py>,
    v: Vec<bool>,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<bool>>> {
    shaped(py, v, shape)
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
    // One `register` per capability module.
    masks::register(m)?;
    merge::register(m)?;
    prune::register(m)?;
    structured::register(m)?;
    graph::register(m)?;
    tn::register(m)?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(build_info, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
