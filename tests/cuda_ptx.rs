//! The warp-level and PTX semantics the kernels rely on (`tests/cuda_ptx/semantics.cu`), and
//! CUDA graphs captured from a stream,
//! against the CUDA programming guide and the PTX ISA, on whatever CUDA device is present: the
//! CPU emulator (tools/cuda-emu) in CI, a GPU under tools/device, where the same test shows the
//! emulator agrees with the hardware. Skips without a CUDA device (fails under FAPE_TEST_CUDA=1).
#![cfg(feature = "cuda")]

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use fape_kernels::backend::cuda::CudaDevice;
use fape_kernels::testing::device_or_skip;
use fape_kernels::{Device, DeviceKind};
use half::{bf16, f16};
use rand::Rng;

const SOURCE: (&str, &str) = ("semantics.cu", include_str!("cuda_ptx/semantics.cu"));

fn device(test: &str) -> Option<CudaDevice> {
    match device_or_skip(test, DeviceKind::Cuda)? {
        Device::Cuda(d) => Some(d),
        other => panic!("{test}: opening CUDA gave {other:?}"),
    }
}

/// Runs one block of 32 threads of kernel `name` with the arguments given, and waits for it.
macro_rules! run {
    ($d:expr, $name:expr, $($arg:expr),* $(,)?) => {{
        let function = $d.module(SOURCE.0, SOURCE.1).expect("compile").load_function($name).expect("kernel");
        let mut launch = $d.stream().launch_builder(&function);
        $(launch.arg($arg);)*
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the arguments are the kernel's, in order, with buffers of the lengths its
        // comment in semantics.cu gives; one block of 32 threads as every kernel there expects.
        unsafe { launch.launch(cfg) }.expect("launch");
        $d.stream().synchronize().expect("kernel");
    }};
}

fn upload<T: cudarc::driver::DeviceRepr>(d: &CudaDevice, host: &[T]) -> CudaSlice<T> {
    d.stream().clone_htod(host).expect("upload")
}

fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(d: &CudaDevice, dev: &CudaSlice<T>) -> Vec<T> {
    d.stream().clone_dtoh(dev).expect("download")
}

fn assert_lanes<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], expected: &[T]) {
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(g, e, "{what}: index {i} (lane {}, item {}): got {g:?}, expected {e:?}", i % 32, i / 32);
    }
}

#[test]
fn shuffles_at_width_16_and_votes() {
    let Some(d) = device("shuffles_at_width_16_and_votes") else { return };
    let mut out = upload(&d, &[-7i32; 8 * 32]);
    run!(d, "warp_ops", &mut out);
    let got = download(&d, &out);
    let mut expected = Vec::new();
    // width 16: each lane's segment is [base, base + 15].
    let segment = |l: i32| (l & !15, (l & !15) + 15);
    let shfl = |f: &dyn Fn(i32) -> i32| (0..32).map(f).collect::<Vec<_>>();
    expected.extend(shfl(&|l| (segment(l).0 + (((l * 7) % 32) & 15)) * 10));
    expected.extend(shfl(&|l| if l - 3 >= segment(l).0 { (l - 3) * 10 } else { l * 10 }));
    expected.extend(shfl(&|l| if l + 5 <= segment(l).1 { (l + 5) * 10 } else { l * 10 }));
    // Butterfly at width 16: a later segment is refused (own value), an earlier one is read.
    expected.extend(shfl(&|l| if (l ^ 17) <= segment(l).1 { (l ^ 17) * 10 } else { l * 10 }));
    expected.extend(shfl(&|l| (l ^ 17) * 10));
    let ballot = (0..32).filter(|l| l % 3 == 0).fold(0u32, |b, l| b | (1 << l)) as i32;
    expected.extend([ballot; 32]);
    expected.extend([1; 32]);
    expected.extend([0; 32]);
    assert_lanes("warp_ops", &got, &expected);
}

#[test]
fn ldmatrix_plain_and_transposed() {
    let Some(d) = device("ldmatrix_plain_and_transposed") else { return };
    let tile: Vec<u16> = (0..256u16).map(|i| i * 3 + 1).collect();
    let input = upload(&d, &tile);
    let mut out = upload(&d, &[0u32; 32 * 8]);
    run!(d, "ldmatrix_ops", &input, &mut out);
    let got = download(&d, &out);
    // Quadrant m of the 16x16 tile: rows (m & 1) * 8.., columns (m >> 1) * 8..
    let at = |m: usize, r: usize, c: usize| u32::from(tile[((m & 1) * 8 + r) * 16 + (m >> 1) * 8 + c]);
    let mut expected = vec![0u32; 32 * 8];
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for m in 0..4 {
            expected[lane * 8 + m] = at(m, g, 2 * t) | at(m, g, 2 * t + 1) << 16;
            expected[lane * 8 + 4 + m] = at(m, 2 * t, g) | at(m, 2 * t + 1, g) << 16;
        }
    }
    assert_lanes("ldmatrix_ops", &got, &expected);
}

#[test]
fn mma_m16n8k16_fragments_bf16_and_f16() {
    let Some(d) = device("mma_m16n8k16_fragments_bf16_and_f16") else { return };
    let mut rng = fape_kernels::testing::rng(0x5EED);
    // Small integers and halves: exact in bf16 and f16, and every sum exact in f32.
    let mut value = || f32::from(rng.random_range(-8i8..8)) * 0.5;
    let a: Vec<Vec<f32>> = (0..16).map(|_| (0..16).map(|_| value()).collect()).collect();
    let b: Vec<Vec<f32>> = (0..16).map(|_| (0..8).map(|_| value()).collect()).collect();
    let c: Vec<Vec<f32>> = (0..16).map(|_| (0..8).map(|_| value()).collect()).collect();
    for half in [false, true] {
        let bits = |x: f32| if half { f16::from_f32(x).to_bits() } else { bf16::from_f32(x).to_bits() };
        let pair = |lo: f32, hi: f32| u32::from(bits(lo)) | u32::from(bits(hi)) << 16;
        let (mut fa, mut fb, mut fc) = (vec![], vec![], vec![]);
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for i in 0..4 {
                let (row, col) = (g + 8 * (i & 1), 2 * t + 8 * (i >> 1));
                fa.push(pair(a[row][col], a[row][col + 1]));
                fc.push(c[g + 8 * (i >> 1)][2 * t + (i & 1)]);
            }
            for i in 0..2 {
                fb.push(pair(b[2 * t + 8 * i][g], b[2 * t + 8 * i + 1][g]));
            }
        }
        let (fa, fb, fc) = (upload(&d, &fa), upload(&d, &fb), upload(&d, &fc));
        let mut out = upload(&d, &[f32::NAN; 32 * 4]);
        let flag = i32::from(half);
        run!(d, "mma_ops", &fa, &fb, &fc, &mut out, &flag);
        let got = download(&d, &out);
        let mut expected = vec![];
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for i in 0..4 {
                let (row, col) = (g + 8 * (i >> 1), 2 * t + (i & 1));
                expected.push(c[row][col] + (0..16).map(|k| a[row][k] * b[k][col]).sum::<f32>());
            }
        }
        assert_lanes(if half { "mma f16" } else { "mma bf16" }, &got, &expected);
    }
}

#[test]
fn cvt_packs_the_first_operand_high_and_rounds_to_nearest_even() {
    let Some(d) = device("cvt_packs_the_first_operand_high_and_rounds_to_nearest_even") else { return };
    let mut rng = fape_kernels::testing::rng(0xC47);
    // Ties of bf16 and f16 both ways, f16 overflow and subnormals, signed zero, then random.
    let mut x = vec![
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        7e4,
        -1e-6,
        -0.0,
        3e-8,
    ];
    x.extend((x.len()..64).map(|_| rng.random_range(-100.0f32..100.0)));
    let input = upload(&d, &x);
    let mut out = upload(&d, &[0u32; 64]);
    run!(d, "cvt_ops", &input, &mut out);
    let got = download(&d, &out);
    let mut expected = vec![];
    for lane in 0..32 {
        let (hi, lo) = (x[2 * lane], x[2 * lane + 1]);
        expected.push(u32::from(bf16::from_f32(hi).to_bits()) << 16 | u32::from(bf16::from_f32(lo).to_bits()));
        expected.push(u32::from(f16::from_f32(hi).to_bits()) << 16 | u32::from(f16::from_f32(lo).to_bits()));
    }
    assert_lanes("cvt_ops", &got, &expected);
}

#[test]
fn cp_async_groups_land_by_wait_group_with_zero_fill() {
    let Some(d) = device("cp_async_groups_land_by_wait_group_with_zero_fill") else { return };
    let src: Vec<i32> = (100..148).collect();
    let input = upload(&d, &src);
    let mut out = upload(&d, &[0i32; 24]);
    run!(d, "cp_async_ops", &input, &mut out);
    let got = download(&d, &out);
    // After wait_group 1, group 0 has landed; group 1 may have (a GPU) or not (the emulator
    // lands a group only when a wait retires it, so that a missing wait shows).
    assert_lanes("after wait_group 1, group 0", &got[..4], &src[..4]);
    if d.info().contains("emulated (CPU)") {
        assert_lanes("after wait_group 1, group 1 (emulator)", &got[4..12], &[-1; 8]);
    }
    let mut all = src[..8].to_vec();
    all.extend([0; 4]);
    assert_lanes("after wait_group 0", &got[12..], &all);
}

#[test]
fn a_captured_graph_replays_its_launches_with_the_arguments_of_capture() {
    let test = "a_captured_graph_replays_its_launches_with_the_arguments_of_capture";
    let Some(d) = device(test) else { return };
    let function = d.module(SOURCE.0, SOURCE.1).expect("compile").load_function("scale_add").expect("kernel");
    let stream = d.stream();
    let n = 45i32;
    let mut x = upload(&d, &vec![1.0f32; n as usize]);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    stream
        .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .expect("capture");
    for (a, b) in [(2.0f32, 1.0f32), (3.0, -2.0)] {
        let mut launch = stream.launch_builder(&function);
        launch.arg(&mut x).arg(&a).arg(&b).arg(&n);
        // SAFETY: scale_add(float* x, float a, float b, int n) with x holding n floats.
        unsafe { launch.launch(cfg) }.expect("captured launch");
    }
    let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).expect("end").expect("graph");
    // Nothing ran while capturing; each replay runs both launches with the captured a and b
    // (the locals they were read from are gone): x -> (x * 2 + 1) * 3 - 2.
    assert_lanes("after capture", &download(&d, &x), &vec![1.0; n as usize]);
    graph.launch().expect("replay");
    graph.launch().expect("replay");
    stream.synchronize().expect("sync");
    assert_lanes("after two replays", &download(&d, &x), &vec![(7.0f32 * 2.0 + 1.0) * 3.0 - 2.0; n as usize]);
}
