//! Bindings of model merging (`spruce_core::merge`).
//!
//! The merge configuration crosses as a dict of plain values (strings for the choices), checked
//! here and turned into `spruce_core::merge::Spec`; the tensors cross as zero-copy arrays that
//! must all share one element type.

use crate::{contiguous, float_arr, py_err, shape_of, values, Arr, ToNumpy};
use half::{bf16, f16};
use numpy::{PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use spruce_core::merge as mg;
use spruce_core::merge::{Combine, Cut, Divisor, Elem, Inputs, RankRule, Rescale, Sparsify, Spec, Votes};
use spruce_core::Error;

const OP: &str = "merge";

fn arg_err(arg: &'static str, value: impl ToString, expected: impl ToString) -> PyErr {
    py_err(Error::arg(OP, arg, value, expected))
}

fn item<'py, V: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, key: &'static str) -> PyResult<V> {
    match d.get_item(key)? {
        Some(v) => v.extract::<V>().map_err(|_| arg_err(key, v.to_string(), "a value of the right type")),
        None => Err(arg_err(key, "missing", "present in the merge specification")),
    }
}

fn choice(d: &Bound<'_, PyDict>, key: &'static str) -> PyResult<String> {
    item::<String>(d, key)
}

/// Reads the specification dict (see `spruce._ops.merge`).
fn parse_spec(d: &Bound<'_, PyDict>) -> PyResult<Spec> {
    let combine = match choice(d, "combine")?.as_str() {
        "sum" => Combine::Sum { normalize: item(d, "normalize")? },
        "linear" => Combine::Linear { normalize: item(d, "normalize")? },
        "consensus" => Combine::Consensus {
            votes: match choice(d, "votes")?.as_str() {
                "sum" => Votes::Sum,
                "count" => Votes::Count,
                other => return Err(arg_err("votes", other, "'sum' or 'count'")),
            },
            weighted: item(d, "weighted")?,
            zero_positive: item(d, "zero_positive")?,
            divisor: match choice(d, "divisor")?.as_str() {
                "none" => Divisor::One,
                "count" => Divisor::Count,
                "weight" => Divisor::Weight,
                other => return Err(arg_err("divisor", other, "'none', 'count' or 'weight'")),
            },
        },
        "fisher" => Combine::Fisher { floor: item(d, "fisher_floor")? },
        "slerp" => Combine::Slerp { t: item(d, "t")? },
        "transfer" => Combine::Transfer,
        "pcb" => Combine::Pcb,
        other => {
            return Err(arg_err(
                "combine",
                other,
                "one of 'sum', 'linear', 'consensus', 'fisher', 'slerp', 'transfer', 'pcb'",
            ))
        }
    };
    let sparsify = match choice(d, "sparsify")?.as_str() {
        "none" => Sparsify::None,
        "magnitude" => Sparsify::Magnitude,
        "random_exact" => Sparsify::RandomExact,
        "bernoulli" => Sparsify::Bernoulli,
        "outliers" => Sparsify::Outliers { gamma: item(d, "gamma")? },
        "rank" => Sparsify::Rank {
            epsilon: item(d, "epsilon")?,
            rule: match choice(d, "rank_rule")?.as_str() {
                "paper" => RankRule::Paper,
                "minmax" => RankRule::MinMax,
                other => return Err(arg_err("rank_rule", other, "'paper' or 'minmax'")),
            },
        },
        other => {
            return Err(arg_err(
                "sparsify",
                other,
                "one of 'none', 'magnitude', 'random_exact', 'bernoulli', 'outliers', 'rank'",
            ))
        }
    };
    let rescale = match choice(d, "rescale")?.as_str() {
        "none" => Rescale::None,
        "inverse" => Rescale::Inverse,
        "l1" => Rescale::L1,
        other => return Err(arg_err("rescale", other, "'none', 'inverse' or 'l1'")),
    };
    Ok(Spec {
        combine,
        sparsify,
        rescale,
        weights: item(d, "weights")?,
        densities: item(d, "densities")?,
        scale: item(d, "scale")?,
        seed: item(d, "seed")?,
    })
}

/// Typed views of arrays that must all have the element type `Self`.
trait Typed: Elem + ToNumpy {
    fn view<'a>(a: &'a Arr<'_>, arg: &'static str) -> PyResult<Option<&'a [Self]>>;
    /// The elements of a writable array of the NumPy element type.
    fn cast_mut(s: &mut [Self::Np]) -> &mut [Self];
}

macro_rules! typed {
    ($t:ty, $variant:ident) => {
        impl Typed for $t {
            fn view<'a>(a: &'a Arr<'_>, arg: &'static str) -> PyResult<Option<&'a [Self]>> {
                match a {
                    Arr::$variant(x) => contiguous(x, OP, arg).map(Some),
                    _ => Ok(None),
                }
            }
            fn cast_mut(s: &mut [Self]) -> &mut [Self] {
                s
            }
        }
    };
}
typed!(f32, F32);
typed!(f64, F64);
typed!(f16, F16);

impl Typed for bf16 {
    fn view<'a>(a: &'a Arr<'_>, arg: &'static str) -> PyResult<Option<&'a [Self]>> {
        match a {
            Arr::BF16(x) => {
                let bits: &[u16] = contiguous(x, OP, arg)?;
                Ok(Some(half::slice::HalfBitsSliceExt::reinterpret_cast(bits)))
            }
            _ => Ok(None),
        }
    }
    fn cast_mut(s: &mut [u16]) -> &mut [Self] {
        half::slice::HalfBitsSliceExt::reinterpret_cast_mut(s)
    }
}

fn dtype_name(a: &Arr<'_>) -> &'static str {
    match a {
        Arr::F32(_) => "float32",
        Arr::F64(_) => "float64",
        Arr::F16(_) => "float16",
        Arr::BF16(_) => "bfloat16",
    }
}

fn same_type<'a, T: Typed>(a: &'a Arr<'_>, arg: &'static str, first: &Arr<'_>) -> PyResult<&'a [T]> {
    T::view(a, arg)?.ok_or_else(|| {
        py_err(Error::DType {
            op: OP,
            arg,
            dtype: dtype_name(a).into(),
            expected: format!("{} like the first model", dtype_name(first)),
        })
    })
}

/// The arguments of one merge call, borrowed from Python.
struct Args<'py> {
    base: Option<Arr<'py>>,
    models: Vec<Arr<'py>>,
    fisher: Vec<Bound<'py, PyAny>>,
    masks: Vec<PyReadonlyArrayDyn<'py, bool>>,
    cuts: Vec<Cut>,
    shape: Vec<usize>,
    spec: Spec,
}

fn parse_args<'py>(
    base: Option<&Bound<'py, PyAny>>,
    models: &Bound<'py, PyList>,
    fisher: &Bound<'py, PyList>,
    masks: &Bound<'py, PyList>,
    cuts: Vec<(u64, i64)>,
    spec: &Bound<'py, PyDict>,
) -> PyResult<Args<'py>> {
    let models: Vec<Arr<'py>> =
        models.iter().map(|o| float_arr(&o, OP, "models")).collect::<PyResult<_>>()?;
    let first = models.first().ok_or_else(|| arg_err("models", 0, "at least one model"))?;
    let shape = shape_of(first);
    for m in &models {
        if shape_of(m) != shape {
            return Err(py_err(Error::shape(
                OP,
                "models",
                &shape_of(m),
                format!("the first model's shape {}", spruce_core::error::fmt_shape(&shape)),
            )));
        }
    }
    let base = base.map(|b| float_arr(b, OP, "base")).transpose()?;
    if let Some(b) = &base {
        if shape_of(b) != shape {
            return Err(py_err(Error::shape(
                OP,
                "base",
                &shape_of(b),
                format!("the models' shape {}", spruce_core::error::fmt_shape(&shape)),
            )));
        }
    }
    let masks: Vec<PyReadonlyArrayDyn<'py, bool>> = masks
        .iter()
        .map(|o| o.extract().map_err(|_| arg_err("masks", o.to_string(), "bool arrays")))
        .collect::<PyResult<_>>()?;
    for m in &masks {
        if m.shape() != shape.as_slice() {
            return Err(py_err(Error::shape(
                OP,
                "masks",
                m.shape(),
                format!("the models' shape {}", spruce_core::error::fmt_shape(&shape)),
            )));
        }
    }
    let cuts = cuts
        .into_iter()
        .map(|(key, end)| Cut { key, end: if end < 0 { usize::MAX } else { end as usize } })
        .collect();
    Ok(Args { base, models, fisher: fisher.iter().collect(), masks, cuts, shape, spec: parse_spec(spec)? })
}

/// Runs `f` on the typed inputs of `args` (element type `T`).
fn with_inputs<'py, T, R>(
    py: Python<'py>,
    args: &Args<'py>,
    f: impl FnOnce(&Inputs<'_, T>, &Spec) -> R + Send,
) -> PyResult<R>
where
    T: Typed,
    T::A: numpy::Element,
    R: Send,
{
    let first = &args.models[0];
    let models: Vec<&[T]> =
        args.models.iter().map(|m| same_type::<T>(m, "models", first)).collect::<PyResult<_>>()?;
    let base = args.base.as_ref().map(|b| same_type::<T>(b, "base", first)).transpose()?;
    let fisher_arrs: Vec<PyReadonlyArrayDyn<'py, T::A>> = args
        .fisher
        .iter()
        .map(|o| {
            o.extract().map_err(|_| {
                py_err(Error::DType {
                    op: OP,
                    arg: "fisher",
                    dtype: o.getattr("dtype").map(|d| d.to_string()).unwrap_or_default(),
                    expected: format!(
                        "{} (the accumulator type of {})",
                        if T::WIDE { "float64" } else { "float32" },
                        T::NAME
                    ),
                })
            })
        })
        .collect::<PyResult<_>>()?;
    for a in &fisher_arrs {
        if a.shape() != args.shape.as_slice() {
            return Err(py_err(Error::shape(
                OP,
                "fisher",
                a.shape(),
                format!("the models' shape {}", spruce_core::error::fmt_shape(&args.shape)),
            )));
        }
    }
    let fisher: Vec<&[T::A]> =
        fisher_arrs.iter().map(|a| contiguous(a, OP, "fisher")).collect::<PyResult<_>>()?;
    let masks: Vec<&[bool]> =
        args.masks.iter().map(|m| contiguous(m, OP, "masks")).collect::<PyResult<_>>()?;
    let (spec, shape) = (&args.spec, &args.shape[..]);
    let inputs = Inputs { base, models, fisher, masks, cuts: args.cuts.clone(), shape };
    Ok(py.detach(|| f(&inputs, spec)))
}

/// Dispatches on the element type of an array (the first model).
macro_rules! dispatch {
    ($first:expr, $t:ident => $body:expr) => {
        match $first {
            Arr::F32(_) => {
                type $t = f32;
                $body
            }
            Arr::F64(_) => {
                type $t = f64;
                $body
            }
            Arr::F16(_) => {
                type $t = f16;
                $body
            }
            Arr::BF16(_) => {
                type $t = bf16;
                $body
            }
        }
    };
}

/// Merges one tensor (see `spruce.merge.merge_tensors`).
#[pyfunction]
#[pyo3(signature = (base, models, fisher, masks, cuts, spec))]
fn merge<'py>(
    py: Python<'py>,
    base: Option<&Bound<'py, PyAny>>,
    models: &Bound<'py, PyList>,
    fisher: &Bound<'py, PyList>,
    masks: &Bound<'py, PyList>,
    cuts: Vec<(u64, i64)>,
    spec: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = parse_args(base, models, fisher, masks, cuts, spec)?;
    dispatch!(&args.models[0], T => {
        let out = with_inputs::<T, _>(py, &args, mg::merge)?.map_err(py_err)?;
        values(py, out, &args.shape)
    })
}

/// Merges one tensor into `out`: a writable C-contiguous array of the models' element type
/// (bfloat16 as its `uint16` bits) and element count that shares no memory with the inputs.
#[pyfunction]
#[pyo3(signature = (out, base, models, fisher, masks, cuts, spec))]
#[allow(clippy::too_many_arguments)]
fn merge_into<'py>(
    py: Python<'py>,
    out: &Bound<'py, PyAny>,
    base: Option<&Bound<'py, PyAny>>,
    models: &Bound<'py, PyList>,
    fisher: &Bound<'py, PyList>,
    masks: &Bound<'py, PyList>,
    cuts: Vec<(u64, i64)>,
    spec: &Bound<'py, PyDict>,
) -> PyResult<()> {
    let args = parse_args(base, models, fisher, masks, cuts, spec)?;
    dispatch!(&args.models[0], T => {
        // Extracted after the inputs: NumPy's borrow tracking refuses an `out` that overlaps one.
        let mut arr: PyReadwriteArrayDyn<'py, <T as ToNumpy>::Np> = out.extract().map_err(|_| {
            py_err(Error::DType {
                op: OP,
                arg: "out",
                dtype: out.getattr("dtype").map(|d| d.to_string()).unwrap_or_else(|_| out.get_type().to_string()),
                expected: format!(
                    "a writable array of the models' element type ({}) sharing no memory with them",
                    dtype_name(&args.models[0])
                ),
            })
        })?;
        let shape = arr.shape().to_vec();
        let dst = arr
            .as_slice_mut()
            .map_err(|_| py_err(Error::shape(OP, "out", &shape, "a C-contiguous writable buffer")))?;
        let dst = T::cast_mut(dst);
        with_inputs::<T, _>(py, &args, |inp, spec| mg::merge_into(inp, spec, dst))?.map_err(py_err)
    })
}

/// The merge as coefficients of shape `(n_models, *shape)` in the accumulator type.
#[pyfunction]
#[pyo3(signature = (base, models, fisher, masks, cuts, spec))]
fn merge_coefficients<'py>(
    py: Python<'py>,
    base: Option<&Bound<'py, PyAny>>,
    models: &Bound<'py, PyList>,
    fisher: &Bound<'py, PyList>,
    masks: &Bound<'py, PyList>,
    cuts: Vec<(u64, i64)>,
    spec: &Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    let args = parse_args(base, models, fisher, masks, cuts, spec)?;
    let mut shape = vec![args.models.len()];
    shape.extend(&args.shape);
    dispatch!(&args.models[0], T => {
        let out = with_inputs::<T, _>(py, &args, mg::merge_coefficients)?.map_err(py_err)?;
        values(py, out, &shape)
    })
}

/// Model-wide magnitude trimming: one `(key, end)` cut per tensor (`end` -1: every tie).
#[pyfunction]
fn merge_model_cuts<'py>(
    py: Python<'py>,
    bases: &Bound<'py, PyList>,
    models: &Bound<'py, PyList>,
    density: f64,
) -> PyResult<Vec<(u64, i64)>> {
    let models: Vec<Arr<'py>> =
        models.iter().map(|o| float_arr(&o, OP, "models")).collect::<PyResult<_>>()?;
    let bases: Vec<Arr<'py>> = bases.iter().map(|o| float_arr(&o, OP, "base")).collect::<PyResult<_>>()?;
    let first = match models.first() {
        Some(f) => f,
        None => return Ok(vec![]),
    };
    let cuts = dispatch!(first, T => {
        let ms: Vec<&[T]> = models.iter().map(|m| same_type::<T>(m, "models", first)).collect::<PyResult<_>>()?;
        let bs: Vec<&[T]> = bases.iter().map(|b| same_type::<T>(b, "base", first)).collect::<PyResult<_>>()?;
        py.detach(|| mg::model_magnitude_cuts(&bs, &ms, density)).map_err(py_err)?
    });
    Ok(cuts.into_iter().map(|c| (c.key, if c.end == usize::MAX { -1 } else { c.end as i64 })).collect())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(merge_into, m)?)?;
    m.add_function(wrap_pyfunction!(merge_coefficients, m)?)?;
    m.add_function(wrap_pyfunction!(merge_model_cuts, m)?)?;
    Ok(())
}
