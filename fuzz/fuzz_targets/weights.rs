//! The weights loader on a model folder made from the input: a shard index JSON and up to three
//! shards, separated by `fape_kernels::testing::FILE_SEPARATOR` (an empty part writes no file;
//! see `fape_kernels::testing::load_model_input`). Opens the folder, then reads every tensor it
//! lists.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use fape_kernels::testing::load_model_input;

fape_fuzz::capped_allocator!();

/// This process's model folder, `fape-fuzz-weights-<pid>` in `/dev/shm` where there is one (every
/// input writes its files: memory is faster than a disk), else in the temporary folder.
fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let dir = if shm.is_dir() { shm } else { std::env::temp_dir() };
        dir.join(format!("fape-fuzz-weights-{}", std::process::id()))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = load_model_input(root(), data);
});
