//! Python binding of devvm: the module `devvm`. The binding only converts; the pipeline
//! lives in `devvm-core`.

use pyo3::prelude::*;

/// The `devvm` Python module.
#[pymodule]
fn devvm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
