//! TEMPORARY (helper's device check; deleted after the run).
#![cfg(feature = "cuda")]
use cudarc::driver::{sys::CUevent_flags, LaunchConfig, PushKernelArg};
use fape_kernels::backend::cuda::{CudaDevice, KERNEL_SOURCES};
use fape_kernels::lora_moe::{gaussian_taps, reference, token_lowpass};
use fape_kernels::testing::{compare, rng, uniform};
use fape_kernels::{Device, View};

fn cuda(poison: bool) -> CudaDevice {
    CudaDevice::open(0).expect("open cuda").poisoned(poison)
}

const SHAPES: &[(usize, usize, usize, usize, f64)] = &[
    (1, 1, 1, 1, 1.0),
    (1, 1, 1, 129, 20.0),
    (2, 5, 3, 9, 2.0),
    (3, 100, 70, 31, 5.0),
    (2, 257, 129, 129, 30.0),
    (1, 64, 32, 65, 10.0),
    (1, 63, 33, 63, 10.0),
    (4, 1000, 96, 201, 40.0),
    (2, 3, 1000, 129, 8.0),
    (5, 130, 31, 127, 25.0),
    (2, 4096, 17, 3, 0.7),
    (1, 20, 40, 513, 100.0),
];

#[test]
fn gpu_lowpass_matches_reference() {
    let d = cuda(false);
    println!("info: {}", d.info());
    println!("probe: {:?}", CudaDevice::probe());
    for poison in [false, true] {
        let dev = Device::Cuda(d.clone().poisoned(poison));
        for (i, &(b, t, c, taps, sigma)) in SHAPES.iter().enumerate() {
            let x = uniform(&mut rng(i as u64), b * t * c, -1.0, 1.0);
            let shape = [b, t, c];
            let view = View::new("t", "x", &x, &shape).unwrap();
            let want = reference::token_lowpass(view, taps, sigma).unwrap();
            let got = token_lowpass(&dev, view, taps, sigma).unwrap();
            let cmp = compare(&got.data, &want.data);
            let max_abs = got
                .data
                .iter()
                .zip(&want.data)
                .map(|(&g, &e)| (g as f64 - e).abs())
                .fold(0.0f64, f64::max);
            println!("poison={poison} [{b},{t},{c}] taps={taps}: rel_l2={:.3e} max_abs={max_abs:.3e}", cmp.rel_l2);
            assert!(cmp.nan_mismatch.is_none(), "NaN (unwritten element) at {:?}", cmp.nan_mismatch);
            assert!(cmp.rel_l2 < 1e-6 && max_abs < 1e-5, "mismatch {cmp:?}");
        }
    }
}

#[test]
fn gpu_lowpass_big_batch_grid_stride() {
    let dev = Device::Cuda(cuda(true));
    let (b, t, c) = (70_000usize, 3usize, 2usize);
    let x = uniform(&mut rng(7), b * t * c, -1.0, 1.0);
    let shape = [b, t, c];
    let view = View::new("t", "x", &x, &shape).unwrap();
    let want = reference::token_lowpass(view, 5, 1.0).unwrap();
    let got = token_lowpass(&dev, view, 5, 1.0).unwrap();
    let cmp = compare(&got.data, &want.data);
    println!("big batch: {cmp:?}");
    assert!(cmp.nan_mismatch.is_none() && cmp.rel_l2 < 1e-6);
}

#[test]
fn gpu_lowpass_kernel_timing() {
    let d = cuda(false);
    let (_, src) = KERNEL_SOURCES[0];
    let old = include_str!("../.devbin/old_lora_moe.cu");
    let variant = |r: usize, g: usize| {
        src.replace("constexpr int ROWS_PER_THREAD = 8;", &format!("constexpr int ROWS_PER_THREAD = {r};"))
            .replace("constexpr int ROW_GROUPS = 8;", &format!("constexpr int ROW_GROUPS = {g};"))
    };
    let variants: Vec<(String, String, usize, usize)> = vec![
        ("old r8g8".into(), old.to_string(), 8, 8),
        ("new r8g8".into(), variant(8, 8), 8, 8),
        ("new r16g4".into(), variant(16, 4), 16, 4),
        ("new r16g8".into(), variant(16, 8), 16, 8),
        ("new r8g4".into(), variant(8, 4), 8, 4),
    ];
    let s = d.stream();
    for &(b, t, c) in &[(4usize, 4096usize, 1024usize), (16, 1024, 3072), (8, 256, 320)] {
        let n = b * t * c;
        let xh = uniform(&mut rng(1), n, -1.0, 1.0);
        let x = s.clone_htod(&xh).unwrap();
        let shape = [b, t, c];
        for taps in [9usize, 31, 65, 129] {
            let sigma = taps as f64 / 6.0;
            let want = token_lowpass(&Device::Cpu, View::new("t", "x", &xh, &shape).unwrap(), taps, sigma).unwrap().data;
            let h: Vec<f32> = gaussian_taps(taps, sigma).unwrap().iter().map(|&v| v as f32).collect();
            let hd = s.clone_htod(&h).unwrap();
            let mut line = format!("[{b},{t},{c}] taps={taps:3}:");
            for (name, vsrc, r, g) in &variants {
                let module = d.module(&format!("{name}.cu"), vsrc).unwrap();
                let f = module.load_function("token_lowpass_f32").unwrap();
                let mut out = s.alloc_zeros::<f32>(n).unwrap();
                let blocks = c.div_ceil(32) * t.div_ceil(r * g);
                let cfg = LaunchConfig { grid_dim: (blocks as u32, b as u32, 1), block_dim: (32, *g as u32, 1), shared_mem_bytes: 0 };
                let (bi, ti, ci, ki) = (b as i32, t as i32, c as i32, taps as i32);
                let launch = |out: &mut cudarc::driver::CudaSlice<f32>| {
                    let mut l = s.launch_builder(&f);
                    l.arg(&x).arg(&hd).arg(out).arg(&bi).arg(&ti).arg(&ci).arg(&ki);
                    unsafe { l.launch(cfg) }.unwrap();
                };
                for _ in 0..3 { launch(&mut out); }
                let reps = 20;
                let e0 = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
                for _ in 0..reps { launch(&mut out); }
                let e1 = s.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
                e1.synchronize().unwrap();
                let ms = e0.elapsed_ms(&e1).unwrap() / reps as f32;
                let got = s.clone_dtoh(&out).unwrap();
                let err = got.iter().zip(&want).map(|(&a, &b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(err < 1e-5, "{name}: max err {err}");
                let gbs = 2.0 * n as f64 * 4.0 / (ms as f64 * 1e-3) / 1e9;
                line += &format!("  {name} {ms:.3}ms {gbs:.0}GB/s");
            }
            println!("{line}");
        }
    }
}
