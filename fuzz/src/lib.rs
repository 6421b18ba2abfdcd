//! What the fuzz targets share: an allocator that makes any single allocation over
//! [`ALLOC_CAP`] a crash.
//!
//! libFuzzer without a sanitizer has no malloc limit (`-malloc_limit_mb` needs a sanitizer's
//! hooks) and its `-rss_limit_mb` misses a huge allocation that is never touched, such as a
//! zeroed `Vec` the kernel maps lazily. Every target installs [`CappedAlloc`] with
//! [`capped_allocator!`], so an allocation sized by a claim in the input, not by its bytes, is
//! found even when it would have succeeded.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;

/// The largest single allocation a target may make: 256 MiB. Every target bounds its input's
/// claims well below it (images to 2^16 pixels, files to what the input holds).
pub const ALLOC_CAP: usize = 256 << 20;

/// The system allocator, aborting (a crash libFuzzer records) on an allocation over
/// [`ALLOC_CAP`].
pub struct CappedAlloc;

fn check(layout: Layout) {
    if layout.size() > ALLOC_CAP {
        // No allocation here: a fixed message and the size written digit by digit.
        let mut digits = [0u8; 20];
        let (mut n, mut at) = (layout.size(), digits.len());
        while n > 0 {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(b"fape-fuzz: allocation of ");
        let _ = err.write_all(&digits[at..]);
        let _ = err.write_all(b" bytes, over the fuzz cap (an allocation sized by a claim in the input)\n");
        std::process::abort();
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds GlobalAlloc's contract;
// `check` only reads the layout and aborts.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(Layout::from_size_align(new_size, layout.align()).unwrap_or(layout));
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Installs [`CappedAlloc`] as the target's global allocator.
#[macro_export]
macro_rules! capped_allocator {
    () => {
        #[global_allocator]
        static ALLOC: $crate::CappedAlloc = $crate::CappedAlloc;
    };
}
