//! Python binding of devvm: the module `devvm`. The binding only converts; the pipeline
//! lives in `devvm-core`.

use pyo3::prelude::*;

/// The native part of the `devvm` Python package (`devvm._devvm`).
#[pymodule]
fn _devvm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
