//! The CPU GEMM of this crate: the `gemm` crate (the one candle's CPU matmul uses), which picks
//! AVX-512, AVX2+FMA or portable micro-kernels at run time, called straight on row-major slices
//! with explicit strides: no tensor copies, no transposed copies of the weights, the destination
//! written in place (optionally accumulating into what it holds), threads from rayon's pool.

use crate::error::Result;
use crate::tensor::{expect_nonempty, expect_shape, Tensor, View};

/// The op name of [`linear`]'s errors.
const OP: &str = "linear";

/// `c [m,n] = a [m,k] · b[n,k]^T`, or `c += a · b^T` when `accumulate`: all row-major and
/// contiguous, `b` in the `[out, in]` layout of a linear layer's weight.
///
/// # Panics
/// When a slice's length is not its shape's (`m*k`, `n*k`, `m*n`): callers pass validated
/// extents, so a mismatch is a bug here, never bad user input.
pub(crate) fn matmul_nt(c: &mut [f32], accumulate: bool, a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
    assert!(
        a.len() == m * k && b.len() == n * k && c.len() == m * n,
        "matmul_nt: lengths a {} b {} c {} for m {m} k {k} n {n}",
        a.len(),
        b.len(),
        c.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let stride = |x: usize| x as isize; // slice lengths fit isize
                                        // SAFETY: the lengths were checked above, so every element the strides reach lies inside
                                        // its slice: `a` at `i*k + p` (row stride k, column stride 1), `b^T` at `j*k + p` (row
                                        // stride 1, column stride k), `c` at `i*n + j`; `c` is a unique borrow and does not alias
                                        // `a` or `b`. `read_dst` is true only when `c` holds values to accumulate into.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            stride(n),
            accumulate,
            a.as_ptr(),
            1,
            stride(k),
            b.as_ptr(),
            stride(k),
            1,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A linear layer on the CPU with this crate's GEMM: `y = x W^T + bias` for `x` `[..., k]`
/// (any leading dims), `weight` `[n, k]` and optional `bias` `[n]`; returns `y` `[..., n]`.
/// This is the base product of the CPU LoRA-MoE, and its benchmark's `base-gemm` baseline.
///
/// # Errors
/// [`crate::FapeError::Shape`] naming `x`, `weight` or `bias` when `x` has no dims or is empty,
/// `weight` is not `[n, k]` with `x`'s last extent, or `bias` is not `[n]`.
pub fn linear(x: View<'_, f32>, weight: View<'_, f32>, bias: Option<View<'_, f32>>) -> Result<Tensor<f32>> {
    expect_nonempty(OP, "x", &x)?;
    let Some((&k, lead)) = x.shape().split_last() else {
        return Err(crate::FapeError::Shape { op: OP, tensor: "x", expected: "[..., k]".into(), actual: vec![] });
    };
    expect_shape(OP, "weight", &weight, &format!("[n,{k}]"), &[None, Some(k)])?;
    let n = weight.shape()[0];
    let mut y = match bias {
        Some(b) => {
            expect_shape(OP, "bias", &b, &format!("[{n}]"), &[Some(n)])?;
            b.data().repeat(x.data().len() / k)
        }
        None => vec![0.0; x.data().len() / k * n],
    };
    matmul_nt(&mut y, bias.is_some(), x.data(), weight.data(), x.data().len() / k, k, n);
    Ok(Tensor { data: y, shape: lead.iter().copied().chain([n]).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, rng, uniform};

    /// `a b^T (+ c)` in f64.
    fn expected(a: &[f32], b: &[f32], c: Option<&[f32]>, m: usize, k: usize, n: usize) -> Vec<f64> {
        (0..m * n)
            .map(|ij| {
                let (i, j) = (ij / n, ij % n);
                let dot: f64 = (0..k).map(|p| f64::from(a[i * k + p]) * f64::from(b[j * k + p])).sum();
                dot + c.map_or(0.0, |c| f64::from(c[ij]))
            })
            .collect()
    }

    #[test]
    fn matmul_nt_matches_f64_at_awkward_shapes_with_and_without_accumulation() {
        for (m, k, n) in [(1, 1, 1), (7, 33, 5), (65, 130, 17), (3, 1, 40)] {
            let mut g = rng((m * 1000 + k * 10 + n) as u64);
            let (a, b) = (uniform(&mut g, m * k, -1.0, 1.0), uniform(&mut g, n * k, -1.0, 1.0));
            let c0 = uniform(&mut g, m * n, -1.0, 1.0);
            let mut c = c0.clone();
            matmul_nt(&mut c, false, &a, &b, m, k, n);
            assert_close(&format!("{m}x{k}x{n}"), &c, &expected(&a, &b, None, m, k, n), 1e-6);
            let mut c = c0.clone();
            matmul_nt(&mut c, true, &a, &b, m, k, n);
            assert_close(&format!("{m}x{k}x{n} +="), &c, &expected(&a, &b, Some(&c0), m, k, n), 1e-6);
        }
    }

    #[test]
    fn linear_adds_the_bias_and_checks_shapes() {
        let (x, w, b) = ([1.0f32, 2.0, 3.0, 4.0], [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0], [10.0f32, 20.0, 30.0]);
        let x = View::new(OP, "x", &x, &[2, 1, 2]).expect("layout");
        let w = View::new(OP, "weight", &w, &[3, 2]).expect("layout");
        let y = linear(x, w, Some(View::new(OP, "bias", &b, &[3]).expect("layout"))).expect("valid");
        assert_eq!(y.shape, [2, 1, 3]);
        assert_eq!(y.data, [11.0, 22.0, 33.0, 13.0, 24.0, 37.0]);
        assert_eq!(linear(x, w, None).expect("valid").data, [1.0, 2.0, 3.0, 3.0, 4.0, 7.0]);
        let short = View::new(OP, "bias", &b[..2], &[2]).expect("layout");
        let err = linear(x, w, Some(short));
        assert!(matches!(err, Err(crate::FapeError::Shape { tensor: "bias", .. })), "{err:?}");
        let err = linear(x, View::new(OP, "weight", &b, &[1, 3]).expect("layout"), None);
        assert!(matches!(err, Err(crate::FapeError::Shape { tensor: "weight", .. })), "{err:?}");
    }
}
