//! Examples and end-to-end tests for corokit live beside this crate.
