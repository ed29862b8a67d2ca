//! The backends this build has, gathered into a [`Registry`]: the one place that knows
//! every backend module (each registers itself; see [`crate::registry`]).

use crate::registry::Registry;

impl Registry {
    /// Every backend this build has: the reference (`memory`) backends, `none` for
    /// bootstrap, and each real backend whose cargo feature is on.
    pub fn builtin() -> Self {
        let mut r = Self::empty();
        crate::memory_config::register(&mut r);
        crate::backends::register(&mut r);
        r
    }
}
