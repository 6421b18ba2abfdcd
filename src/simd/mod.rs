//! SIMD for the CPU backends, chosen at run time: AVX-512F or AVX2+FMA on x86-64 when the CPU
//! has them, else portable code (8-lane arrays the compiler vectorises for the build's baseline).
//! The binary stays portable: nothing here needs `-C target-cpu`.
//!
//! A kernel is written once, generic over [`Simd`], as a [`SimdKernel`]; [`Isa::run`] runs it
//! inside a function compiled for the chosen instruction set (`#[target_feature]`), where the
//! generic code is inlined and the intrinsics become plain instructions. A value of an x86
//! [`Simd`] type exists only after run-time detection of its features, which is what makes its
//! safe methods sound.
//!
//! `FAPE_CPU_ISA=avx512|avx2|portable` caps the level [`Isa::detect`] picks (to time or test a
//! lower one); any other value is ignored.

#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

/// The environment variable that caps [`Isa::detect`].
pub(crate) const ISA_ENV: &str = "FAPE_CPU_ISA";

/// One instruction-set level of f32 vectors, proven present by the value's existence.
///
/// `V` holds [`Simd::LANES`] f32 values. Slices passed to `load` and `store` must hold at least
/// `LANES` elements (the first `LANES` are used); shorter ones panic.
pub(crate) trait Simd: Copy + Send + Sync {
    /// A vector of `LANES` f32.
    type V: Copy;
    /// f32 lanes per vector.
    const LANES: usize;
    /// Every lane `x`.
    fn splat(self, x: f32) -> Self::V;
    /// The first `LANES` elements of `s`.
    fn load(self, s: &[f32]) -> Self::V;
    /// Writes `v` to the first `LANES` elements of `s`.
    fn store(self, s: &mut [f32], v: Self::V);
    /// `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a - b`.
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b`.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a / b`.
    fn div(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c`, fused where the level has FMA.
    fn mul_add(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Per lane `if a > b { a } else { b }`: `b` when either is NaN (x86's `max`).
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// Per lane `if a < b { a } else { b }`: `b` when either is NaN (x86's `min`).
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    /// `2^n` for lanes holding whole numbers in `[-127, 127]`; `-127` gives 0.
    fn pow2(self, n: Self::V) -> Self::V;
}

/// A computation generic over the SIMD level, run by [`Isa::run`].
pub(crate) trait SimdKernel {
    /// What the kernel returns.
    type Output;
    /// Runs the kernel with the vectors of `simd`. Implementations should be
    /// `#[inline(always)]` so that they compile for the caller's instruction set.
    fn run<S: Simd>(self, simd: S) -> Self::Output;
}

/// A SIMD level of the CPU backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F: 16 lanes, 32 registers.
    Avx512,
    /// AVX2 with FMA: 8 lanes, 16 registers.
    Avx2,
    /// Portable code for the build's baseline (SSE2 on x86-64): 8-lane arrays, no FMA.
    Portable,
}

impl Isa {
    /// Every level, best first.
    pub(crate) const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// The level's name (as `FAPE_CPU_ISA` spells it).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Whether this CPU runs the level.
    pub(crate) fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::Avx512::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::Avx2::detect().is_some(),
            Isa::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// This level when the CPU runs it, else the best level below it that it runs: the level
    /// [`Isa::run`] uses.
    pub(crate) fn resolved(self) -> Isa {
        let at = Isa::ALL.iter().position(|&i| i == self).unwrap_or(0);
        Isa::ALL[at..].iter().copied().find(|i| i.is_available()).unwrap_or(Isa::Portable)
    }

    /// f32 lanes per vector at this level.
    pub(crate) fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 | Isa::Portable => 8,
        }
    }

    /// The best level this CPU runs, capped by `FAPE_CPU_ISA` when it names a level (read once
    /// per process).
    pub(crate) fn detect() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let cap = std::env::var(ISA_ENV).ok().and_then(|v| Isa::ALL.into_iter().find(|i| i.name() == v));
            cap.unwrap_or(Isa::Avx512).resolved()
        })
    }

    /// Runs `kernel` at [`Isa::resolved`]: this level, or the best one below it this CPU runs.
    pub(crate) fn run<K: SimdKernel>(self, kernel: K) -> K::Output {
        #[cfg(target_arch = "x86_64")]
        match self.resolved() {
            Isa::Avx512 => {
                if let Some(simd) = x86::Avx512::detect() {
                    return simd.vectorize(kernel);
                }
            }
            Isa::Avx2 => {
                if let Some(simd) = x86::Avx2::detect() {
                    return simd.vectorize(kernel);
                }
            }
            Isa::Portable => {}
        }
        kernel.run(Portable)
    }
}

/// The portable level: 8-lane arrays with plain arithmetic.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Portable;

impl Portable {
    fn map(a: [f32; 8], f: impl Fn(f32) -> f32) -> [f32; 8] {
        a.map(f)
    }

    fn zip(a: [f32; 8], b: [f32; 8], f: impl Fn(f32, f32) -> f32) -> [f32; 8] {
        std::array::from_fn(|i| f(a[i], b[i]))
    }
}

impl Simd for Portable {
    type V = [f32; 8];
    const LANES: usize = 8;

    #[inline(always)]
    fn splat(self, x: f32) -> [f32; 8] {
        [x; 8]
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> [f32; 8] {
        let mut v = [0.0; 8];
        v.copy_from_slice(&s[..8]);
        v
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: [f32; 8]) {
        s[..8].copy_from_slice(&v);
    }
    #[inline(always)]
    fn add(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        Self::zip(a, b, |x, y| x + y)
    }
    #[inline(always)]
    fn sub(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        Self::zip(a, b, |x, y| x - y)
    }
    #[inline(always)]
    fn mul(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        Self::zip(a, b, |x, y| x * y)
    }
    #[inline(always)]
    fn div(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        Self::zip(a, b, |x, y| x / y)
    }
    #[inline(always)]
    fn mul_add(self, a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn max(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        Self::zip(a, b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    fn min(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        Self::zip(a, b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    fn pow2(self, n: [f32; 8]) -> [f32; 8] {
        Self::map(n, |n| f32::from_bits(((n as i32 + 127) << 23) as u32))
    }
}

/// `e^x` per lane, within about 2 ulp for `x` in `[-87.6, 88]`: 0 below (and for -inf), NaN for
/// NaN. Cephes' `expf`: `x = n ln2 + r`, a degree-6 polynomial in `r`, times `2^n`.
#[inline(always)]
pub(crate) fn exp<S: Simd>(s: S, x: S::V) -> S::V {
    // max/min return their second operand for NaN, so NaN passes through the clamps.
    let x = s.min(s.splat(88.0), s.max(s.splat(-88.0), x));
    // Round to nearest: adding and subtracting 1.5 * 2^23 drops the fraction.
    let magic = s.splat(12_582_912.0);
    let n = s.sub(s.mul_add(x, s.splat(std::f32::consts::LOG2_E), magic), magic);
    let r = s.mul_add(n, s.splat(-0.693_359_4), x);
    let r = s.mul_add(n, s.splat(2.121_944_4e-4), r);
    let mut p = s.splat(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = s.mul_add(p, r, s.splat(c));
    }
    let y = s.add(s.mul_add(s.mul(p, r), r, r), s.splat(1.0));
    s.mul(y, s.pow2(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp` over a slice at one level, `LANES` at a time (the length a multiple of 16).
    struct ExpAll<'a>(&'a mut [f32]);

    impl SimdKernel for ExpAll<'_> {
        type Output = ();
        #[inline(always)]
        fn run<S: Simd>(self, s: S) {
            for chunk in self.0.chunks_exact_mut(S::LANES) {
                let v = exp(s, s.load(chunk));
                s.store(chunk, v);
            }
        }
    }

    #[test]
    fn exp_matches_f64_on_every_level_with_nan_and_limits() {
        let mut xs: Vec<f32> = (0..4000).map(|i| -90.0 + i as f32 * 0.0447).collect();
        xs.extend([0.0, -0.0, f32::NEG_INFINITY, f32::NAN, 1e-8, -1e-8, -87.0, 88.0, 100.0, -1e30]);
        xs.resize(xs.len().next_multiple_of(16), 0.5);
        for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
            let mut got = xs.clone();
            isa.run(ExpAll(&mut got));
            for (&x, &y) in xs.iter().zip(&got) {
                let what = format!("{}: exp({x}) = {y}", isa.name());
                if x.is_nan() {
                    assert!(y.is_nan(), "{what}");
                } else if x < -87.7 {
                    assert_eq!(y, 0.0, "{what}");
                } else if x <= 88.0 {
                    let want = f64::from(x).exp();
                    if want < f64::from(f32::MIN_POSITIVE) {
                        // Below the normal range: a subnormal or zero.
                        assert!((0.0..=f32::MIN_POSITIVE).contains(&y), "{what}");
                    } else {
                        assert!((f64::from(y) - want).abs() <= want * 3e-7, "{what}, want {want}");
                    }
                } else {
                    assert!(y.is_finite() && y > 1e38, "{what}");
                }
            }
        }
    }

    #[test]
    fn detect_picks_an_available_level_and_run_falls_back() {
        assert!(Isa::detect().is_available());
        assert!(Isa::Portable.is_available());
        for isa in Isa::ALL {
            let resolved = isa.resolved();
            assert!(
                resolved.is_available()
                    && Isa::ALL.iter().position(|&i| i == resolved) >= Isa::ALL.iter().position(|&i| i == isa)
            );
        }
        for isa in Isa::ALL {
            // Every level runs, on its own instructions or the best one below it.
            let mut one = vec![0.0f32; 16];
            isa.run(ExpAll(&mut one));
            assert_eq!(one, vec![1.0; 16], "{}", isa.name());
        }
    }
}
