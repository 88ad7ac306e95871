//! Bindings of tensor networks (`spruce_core::tn`).

use crate::py_err;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyList, PyTuple};
use spruce_core::tn::{self, MemoryLimit, Optimize, PathOptions};
use spruce_core::Error;

const OPTIMIZERS: &str = "'auto', 'optimal', 'dp', 'greedy', 'random-greedy' or 'hyper'";

/// Finds a contraction path; returns a dict of plain Python values (see `spruce.contract_path`;
/// the steps: `contract_path_steps`).
#[pyfunction]
#[pyo3(signature = (eq, shapes, optimize="auto", path=None, memory_limit=None, max_input=false,
    time_limit=None, trials=32, first_trial=0, seed=0, temperature=1.0, nbranch=8, subtree_size=8))]
#[allow(clippy::too_many_arguments)]
fn contract_path<'py>(
    py: Python<'py>,
    eq: &str,
    shapes: Vec<Vec<usize>>,
    optimize: &str,
    path: Option<Vec<Vec<usize>>>,
    memory_limit: Option<u128>,
    max_input: bool,
    time_limit: Option<f64>,
    trials: u64,
    first_trial: u64,
    seed: u64,
    temperature: f64,
    nbranch: usize,
    subtree_size: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let optimize = match (path, optimize) {
        (Some(p), _) => Optimize::Path(p),
        (None, "auto") => Optimize::Auto,
        (None, "optimal") => Optimize::Optimal,
        (None, "dp") => Optimize::Dp,
        (None, "greedy") => Optimize::Greedy,
        (None, "random-greedy") => Optimize::RandomGreedy { trials, first_trial, seed, temperature, nbranch },
        (None, "hyper") => Optimize::Hyper { trials, seed, temperature, nbranch, subtree_size },
        (None, other) => {
            return Err(py_err(Error::arg("contract_path", "optimize", format!("{other:?}"), OPTIMIZERS)))
        }
    };
    let memory_limit = match (max_input, memory_limit) {
        (true, _) => MemoryLimit::MaxInput,
        (false, Some(l)) => MemoryLimit::Elements(l),
        (false, None) => MemoryLimit::Unlimited,
    };
    let opts = PathOptions { optimize, memory_limit, time_limit };
    let eq = eq.to_string();
    let info = py.detach(|| tn::contract_path(&eq, &shapes, &opts)).map_err(py_err)?;

    let int_type = py.get_type::<PyInt>();
    let int = |_: Python<'py>, digits: &str| int_type.call1((digits,));
    let d = PyDict::new(py);
    let path = PyList::empty(py);
    for p in &info.path {
        path.append(PyTuple::new(py, p)?)?;
    }
    d.set_item("path", path)?;
    d.set_item("input_subscripts", &info.input_subscripts)?;
    d.set_item("output_subscript", &info.output_subscript)?;
    // The index sizes as a string of symbols and a list of sizes (the Python layer builds the
    // dict on first use).
    d.set_item("symbols", info.size_dict.iter().map(|(c, _)| *c).collect::<String>())?;
    d.set_item("sizes", info.size_dict.iter().map(|(_, s)| *s).collect::<Vec<_>>())?;
    d.set_item("opt_cost", int(py, &info.opt_cost)?)?;
    d.set_item("naive_cost", int(py, &info.naive_cost)?)?;
    d.set_item("largest_intermediate", int(py, &info.largest_intermediate)?)?;
    d.set_item("optimizer", &info.optimizer)?;
    d.set_item("best_trial", info.best_trial)?;
    Ok(d)
}

/// Reports a path step by step, as columns: positions, einsum, removed, cost and size
/// (decimal strings, turned into ints by the Python layer when read), scale.
#[pyfunction]
fn contract_path_steps<'py>(
    py: Python<'py>,
    eq: &str,
    shapes: Vec<Vec<usize>>,
    path: Vec<Vec<usize>>,
) -> PyResult<Bound<'py, PyDict>> {
    let eq = eq.to_string();
    let steps = py.detach(|| tn::path_steps(&eq, &shapes, &path)).map_err(py_err)?;
    let positions = PyList::empty(py);
    for s in &steps {
        positions.append(PyTuple::new(py, &s.positions)?)?;
    }
    let d = PyDict::new(py);
    d.set_item("positions", positions)?;
    d.set_item("einsum", steps.iter().map(|s| s.einsum.as_str()).collect::<Vec<_>>())?;
    d.set_item("removed", steps.iter().map(|s| s.removed.as_str()).collect::<Vec<_>>())?;
    d.set_item("cost", steps.iter().map(|s| s.cost.as_str()).collect::<Vec<_>>())?;
    d.set_item("scale", steps.iter().map(|s| s.scale).collect::<Vec<_>>())?;
    d.set_item("size", steps.iter().map(|s| s.size.as_str()).collect::<Vec<_>>())?;
    Ok(d)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(contract_path, m)?)?;
    m.add_function(wrap_pyfunction!(contract_path_steps, m)?)?;
    Ok(())
}
