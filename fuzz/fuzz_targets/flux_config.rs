//! The executor's JSON config (`FluxConfig::from_json`): an error or a validated config whose
//! derived sizes compute without overflow.
#![no_main]

use fape_kernels::pipeline::flux::{FluxConfig, MAX_PARAMETERS};

fape_fuzz::capped_allocator!();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(config) = FluxConfig::from_json("fuzz.json", &text) {
        assert!(config.parameter_count() <= MAX_PARAMETERS);
        let _ = (config.mlp_dim(), config.latent_channels());
    }
});
