//! `fape op`'s safetensors reader on arbitrary bytes: an error or tensors that fit the file.
#![no_main]

use fape_kernels::io::TensorFile;

fape_fuzz::capped_allocator!();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(file) = TensorFile::from_bytes("fuzz.safetensors", data) {
        let _ = file.widened();
    }
});
