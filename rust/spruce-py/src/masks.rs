//! Bindings of selection and masks (`spruce_core::select`, `spruce_core::mask`).

use crate::{bools, contiguous, float_arr, py_err, shape_of, shaped, values, with_slice, Arr};
use half::{bf16, f16};
use numpy::{PyArrayDyn, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyList;
use spruce_core::{mask, select, Error, Float, Scores};

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

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
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
    Ok(())
}
