//! Bindings of graph ops and distillation losses (`spruce_core::graph`, `spruce_core::distill`).

use pyo3::prelude::*;

pub(crate) fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
