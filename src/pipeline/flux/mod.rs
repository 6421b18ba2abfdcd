//! The FLUX-shaped executor (work in progress).

mod config;

pub use config::{FluxConfig, TIMESTEP_FEATURES};
