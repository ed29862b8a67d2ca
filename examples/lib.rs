//! Support crate for the examples; the programs are under `[[example]]`.
