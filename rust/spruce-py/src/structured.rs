//! Bindings of structured matrices (`spruce_core::structured`).

use crate::{contiguous, float_arr, py_err, shape_of, values, with_slice, Arr};
use half::{bf16, f16};
use pyo3::prelude::*;
use spruce_core::structured::{self, ButterflySpec};
use spruce_core::Error;

fn dtype_name(a: &Arr<'_>) -> &'static str {
    match a {
        Arr::F32(_) => "float32",
        Arr::F64(_) => "float64",
        Arr::F16(_) => "float16",
        Arr::BF16(_) => "bfloat16",
    }
}

fn mismatch(op: &'static str, arg: &'static str, got: &Arr<'_>, want: &Arr<'_>, want_arg: &str) -> PyErr {
    py_err(Error::DType {
        op,
        arg,
        dtype: dtype_name(got).into(),
        expected: format!("the dtype of {want_arg} ({})", dtype_name(want)),
    })
}

/// Runs `$body` with typed slices of arrays that must share one dtype (bf16 reinterpreted).
macro_rules! same_dtype {
    ($op:expr, [$(($arr:expr, $name:expr, $s:ident)),+], $body:expr) => {
        same_dtype!(@arm $op, F32, f32, [$(($arr, $name, $s)),+], $body,
            same_dtype!(@arm $op, F64, f64, [$(($arr, $name, $s)),+], $body,
                same_dtype!(@arm $op, F16, f16, [$(($arr, $name, $s)),+], $body,
                    same_dtype!(@bf16 $op, [$(($arr, $name, $s)),+], $body, None))))
    };
    (@arm $op:expr, $var:ident, $t:ty, [$(($arr:expr, $name:expr, $s:ident)),+], $body:expr, $else:expr) => {
        if let ($(Arr::$var($s),)+) = ($(&$arr,)+) {
            $(let $s: &[$t] = contiguous($s, $op, $name)?;)+
            Some($body)
        } else {
            $else
        }
    };
    (@bf16 $op:expr, [$(($arr:expr, $name:expr, $s:ident)),+], $body:expr, $else:expr) => {
        if let ($(Arr::BF16($s),)+) = ($(&$arr,)+) {
            $(let $s: &[bf16] = half::slice::HalfBitsSliceExt::reinterpret_cast(contiguous($s, $op, $name)?);)+
            Some($body)
        } else {
            $else
        }
    };
}

#[pyfunction]
#[pyo3(signature = (twiddle, x, increasing_stride=true, output_size=None, transpose=false))]
fn butterfly_multiply<'py>(
    py: Python<'py>,
    twiddle: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    increasing_stride: bool,
    output_size: Option<usize>,
    transpose: bool,
) -> PyResult<Bound<'py, PyAny>> {
    const OP: &str = "butterfly_multiply";
    let t = float_arr(twiddle, OP, "twiddle")?;
    let a = float_arr(x, OP, "x")?;
    let spec = ButterflySpec::new(&shape_of(&t), &shape_of(&a), increasing_stride, output_size, transpose)
        .map_err(py_err)?;
    let out = spec.out_shape();
    let r = same_dtype!(OP, [(t, "twiddle", ts), (a, "x", xs)], {
        let y = py.detach(|| structured::butterfly_multiply(ts, xs, &spec)).map_err(py_err)?;
        values(py, y, &out)
    });
    r.unwrap_or_else(|| Err(mismatch(OP, "twiddle", &t, &a, "x")))
}

type Pair<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>);

#[pyfunction]
#[pyo3(signature = (twiddle, x, grad, increasing_stride=true, output_size=None, transpose=false))]
fn butterfly_multiply_backward<'py>(
    py: Python<'py>,
    twiddle: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    grad: &Bound<'py, PyAny>,
    increasing_stride: bool,
    output_size: Option<usize>,
    transpose: bool,
) -> PyResult<Pair<'py>> {
    const OP: &str = "butterfly_multiply_backward";
    let t = float_arr(twiddle, OP, "twiddle")?;
    let a = float_arr(x, OP, "x")?;
    let g = float_arr(grad, OP, "grad")?;
    let (tshape, xshape) = (shape_of(&t), shape_of(&a));
    let spec =
        ButterflySpec::new(&tshape, &xshape, increasing_stride, output_size, transpose).map_err(py_err)?;
    let gshape = shape_of(&g);
    if gshape != spec.out_shape() {
        return Err(py_err(Error::shape(
            OP,
            "grad",
            &gshape,
            format!("the output's shape {}", spruce_core::error::fmt_shape(&spec.out_shape())),
        )));
    }
    let r = same_dtype!(OP, [(t, "twiddle", ts), (a, "x", xs), (g, "grad", gs)], {
        let (gt, gx) =
            py.detach(|| structured::butterfly_multiply_backward(ts, xs, gs, &spec)).map_err(py_err)?;
        Ok((values(py, gt, &tshape)?, values(py, gx, &xshape)?))
    });
    r.unwrap_or_else(|| {
        if dtype_name(&t) != dtype_name(&a) {
            Err(mismatch(OP, "twiddle", &t, &a, "x"))
        } else {
            Err(mismatch(OP, "grad", &g, &a, "x"))
        }
    })
}

#[pyfunction]
#[pyo3(signature = (x, normalized=false))]
fn fwht<'py>(py: Python<'py>, x: &Bound<'py, PyAny>, normalized: bool) -> PyResult<Bound<'py, PyAny>> {
    let a = float_arr(x, "fwht", "x")?;
    let shape = shape_of(&a);
    with_slice!(a, "fwht", "x", s => {
        let y = py.detach(|| structured::fwht(s, &shape, normalized)).map_err(py_err)?;
        values(py, y, &shape)
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(butterfly_multiply, m)?)?;
    m.add_function(wrap_pyfunction!(butterfly_multiply_backward, m)?)?;
    m.add_function(wrap_pyfunction!(fwht, m)?)?;
    Ok(())
}
