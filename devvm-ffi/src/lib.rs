//! C ABI of devvm. Every function is `extern "C"`, never unwinds across the boundary,
//! and checks its pointer arguments.

use std::ffi::c_char;

/// The library version as a static NUL-terminated string; never free it.
#[unsafe(no_mangle)]
pub extern "C" fn devvm_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_is_nul_terminated() {
        // SAFETY: devvm_version returns a static NUL-terminated string.
        let v = unsafe { std::ffi::CStr::from_ptr(super::devvm_version()) };
        assert_eq!(v.to_str().ok(), Some(env!("CARGO_PKG_VERSION")));
    }
}
