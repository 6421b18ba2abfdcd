//! The autoencoder's JSON config (`VaeConfig::from_json`): an error or a validated config whose
//! derived sizes compute without overflow.
#![no_main]

use fape_kernels::pipeline::vae::VaeConfig;

fape_fuzz::capped_allocator!();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(config) = VaeConfig::from_json("fuzz.json", &text) {
        let side = 2 * config.downscale();
        let _ = (config.encode_flops(side, side), config.decode_flops(side, side));
    }
});
