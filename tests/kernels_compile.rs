//! Every kernel source compiles with NVRTC for the architectures we ship for, and (where
//! `ptxas` is on PATH) assembles without register spills.
//!
//! Needs no GPU: only libnvrtc (and `ptxas` for the assembly checks). Where they are missing
//! the tests print `SKIP: <reason>` and pass, unless `FAPE_NO_SKIP=1` (as in CI), where a skip
//! is a failure.
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::process::Command;

use fape_kernels::backend::cuda::{compile_ptx, compile_ptx_with_log, KERNEL_SOURCES};
use fape_kernels::FapeError;

const ARCHS: &[&str] = &["sm_80", "sm_90a"];

/// Prints `SKIP kernels_compile: reason`, or panics under `FAPE_NO_SKIP=1` (as in CI).
fn skip(reason: &str) {
    fape_kernels::testing::skip("kernels_compile", reason);
}

/// Compiles a trivial kernel to find out whether NVRTC is usable; the reason when not.
fn nvrtc_missing() -> Option<String> {
    match compile_ptx("probe.cu", "extern \"C\" __global__ void probe() {}", "sm_80") {
        Ok(_) => None,
        Err(FapeError::BackendUnavailable { reason, .. }) => Some(reason),
        Err(other) => panic!("NVRTC is present but cannot compile an empty kernel: {other}"),
    }
}

fn find_ptxas() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("ptxas")).find(|p| p.is_file())
}

/// Per-kernel `ptxas -v` statistics.
#[derive(Debug, Default)]
struct KernelStats {
    name: String,
    registers: Option<u32>,
    spill_stores: u32,
    spill_loads: u32,
    stack: u32,
    shared: String,
}

/// Parses the `ptxas info` lines of `ptxas -v`.
fn parse_ptxas(log: &str) -> Vec<KernelStats> {
    let mut kernels: Vec<KernelStats> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("?").to_string();
            kernels.push(KernelStats { name, ..Default::default() });
        } else if let Some(k) = kernels.last_mut() {
            if let Some(rest) = line.split("bytes stack frame,").nth(1) {
                k.stack = first_number(line.split("ptxas info").nth(1).unwrap_or(line));
                k.spill_stores = first_number(rest);
                k.spill_loads = rest.split("spill stores,").nth(1).map(first_number).unwrap_or(0);
            } else if let Some(rest) = line.split("Used ").nth(1) {
                k.registers = Some(first_number(rest));
                k.shared = line.split("registers,").nth(1).unwrap_or("").trim().to_string();
            }
        }
    }
    kernels
}

fn first_number(s: &str) -> u32 {
    s.split(|c: char| !c.is_ascii_digit()).find(|t| !t.is_empty()).and_then(|t| t.parse().ok()).unwrap_or(0)
}

fn ptxas(ptxas: &Path, ptx: &str, arch: &str, file: &str) -> Vec<KernelStats> {
    let dir = std::env::temp_dir().join(format!("fape-kernels-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let stem = format!("{}-{arch}", file.trim_end_matches(".cu"));
    let input = dir.join(format!("{stem}.ptx"));
    let output = dir.join(format!("{stem}.cubin"));
    std::fs::write(&input, ptx.trim_end_matches('\0')).expect("write ptx");
    let result = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg("-warn-spills")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .output()
        .expect("run ptxas");
    let log = format!("{}{}", String::from_utf8_lossy(&result.stdout), String::from_utf8_lossy(&result.stderr));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(result.status.success(), "ptxas failed on {file} for {arch}:\n{log}");
    assert!(!log.to_lowercase().contains("warning"), "ptxas warned on {file} for {arch}:\n{log}");
    let stats = parse_ptxas(&log);
    assert!(!stats.is_empty(), "no entry functions found in ptxas output for {file}/{arch}:\n{log}");
    stats
}

#[test]
fn every_kernel_compiles_and_assembles_without_spills() {
    if let Some(reason) = nvrtc_missing() {
        return skip(&reason);
    }
    let mut ptxs = Vec::new();
    for &(file, source) in KERNEL_SOURCES {
        for &arch in ARCHS {
            let (ptx, log) = compile_ptx_with_log(file, source, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(log.is_empty(), "NVRTC warned on {file} for {arch}:\n{log}");
            let text = ptx.to_src();
            assert!(text.contains(".entry"), "{file}/{arch}: PTX has no kernel");
            println!("{file} {arch}: {} bytes of PTX", text.len());
            ptxs.push((file, arch, text));
        }
    }

    let Some(ptxas_path) = find_ptxas() else {
        return skip("ptxas is not on PATH; PTX not assembled");
    };
    let mut failures = Vec::new();
    for (file, arch, text) in &ptxs {
        for k in ptxas(&ptxas_path, text, arch, file) {
            println!(
                "{file} {arch} {}: {} registers, {} bytes stack, {} spill stores, {} spill loads, {}",
                k.name,
                k.registers.map_or("?".to_string(), |r| r.to_string()),
                k.stack,
                k.spill_stores,
                k.spill_loads,
                k.shared
            );
            if k.spill_stores != 0 || k.spill_loads != 0 {
                failures.push(format!(
                    "{file} {arch} {}: spills ({} stores, {} loads)",
                    k.name, k.spill_stores, k.spill_loads
                ));
            }
            if k.registers.is_none() {
                failures.push(format!("{file} {arch} {}: no register count in ptxas output", k.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn broken_source_reports_nvrtc_log() {
    if let Some(reason) = nvrtc_missing() {
        return skip(&reason);
    }
    let source = "extern \"C\" __global__ void broken(float* out) { out[0] = undeclared_name; }";
    match compile_ptx("broken.cu", source, "sm_80") {
        Err(FapeError::Nvrtc { kernel, arch, log, .. }) => {
            assert_eq!(kernel, "broken.cu");
            assert_eq!(arch, "sm_80");
            assert!(log.contains("undeclared_name"), "log lacks the offending name:\n{log}");
            assert!(log.contains("broken.cu"), "log lacks the file name:\n{log}");
            assert!(log.contains("error"), "log lacks an error:\n{log}");
        }
        Err(other) => panic!("expected FapeError::Nvrtc, got {other}"),
        Ok(_) => panic!("a broken source compiled"),
    }
}

#[test]
fn unknown_arch_is_an_nvrtc_error() {
    if let Some(reason) = nvrtc_missing() {
        return skip(&reason);
    }
    match compile_ptx("probe.cu", "extern \"C\" __global__ void probe() {}", "sm_1") {
        Err(FapeError::Nvrtc { arch, .. }) => assert_eq!(arch, "sm_1"),
        other => panic!("expected FapeError::Nvrtc, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn warnings_show_in_the_success_log() {
    if let Some(reason) = nvrtc_missing() {
        return skip(&reason);
    }
    let source = "extern \"C\" __global__ void warns(float* out) { int unused_variable = 1; out[0] = 1.0f; }";
    let (_, log) = compile_ptx_with_log("warns.cu", source, "sm_80").unwrap_or_else(|e| panic!("{e}"));
    assert!(log.contains("unused_variable"), "expected a warning in the log, got:\n{log}");
}

/// The parser on real `ptxas -v` output (CUDA 13.0) of a kernel forced to spill.
#[test]
fn ptxas_parser_reads_registers_and_spills() {
    let log = "\
ptxas info    : Overriding maximum register limit 256 for 'spilly' with  24 of maxrregcount option
ptxas warning : Registers are spilled to local memory in function 'spilly', 1036 bytes spill stores, 1316 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'spilly' for 'sm_80'
ptxas info    : Function properties for spilly
    864 bytes stack frame, 1036 bytes spill stores, 1316 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 864 bytes cumulative stack size, 372 bytes cmem[0]
ptxas info    : Compiling entry function 'clean' for 'sm_80'
ptxas info    : Function properties for clean
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 34 registers, used 1 barriers, 16512 bytes smem, 392 bytes cmem[0]
ptxas info    : Compile time = 33.618 ms";
    let stats = parse_ptxas(log);
    assert_eq!(stats.len(), 2);
    assert_eq!(stats[0].name, "spilly");
    assert_eq!(stats[0].registers, Some(24));
    assert_eq!((stats[0].stack, stats[0].spill_stores, stats[0].spill_loads), (864, 1036, 1316));
    assert_eq!(stats[1].name, "clean");
    assert_eq!(stats[1].registers, Some(34));
    assert_eq!((stats[1].stack, stats[1].spill_stores, stats[1].spill_loads), (0, 0, 0));
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// The attention flash kernels run on tensor cores: their PTX has mma.sync m16n8k16, ldmatrix
/// (plain and .trans) and cp.async for sm_80 and sm_90a, and where `cuobjdump` is on PATH
/// (wheels `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm`), the SASS ptxas makes of each has HMMA and LDSM. Without
/// cuobjdump only the PTX is checked (a printed note, not a skip).
#[test]
fn attention_flash_kernels_use_tensor_cores() {
    if let Some(reason) = nvrtc_missing() {
        return skip(&reason);
    }
    let (file, source) =
        KERNEL_SOURCES.iter().copied().find(|(f, _)| *f == "attention.cu").expect("attention.cu listed");
    let flash: Vec<String> =
        ["bf16", "f16"].iter().flat_map(|t| [64, 128].map(|d| format!("attention_flash_{t}_d{d}"))).collect();
    // cuobjdump -sass runs nvdisasm.
    let tools = find_ptxas().zip(find_tool("cuobjdump")).filter(|_| find_tool("nvdisasm").is_some());
    if tools.is_none() {
        println!(
            "NOTE attention_flash_kernels_use_tensor_cores: ptxas, cuobjdump or nvdisasm not on PATH; PTX checked only"
        );
    }
    for &arch in ARCHS {
        let ptx = compile_ptx(file, source, arch).unwrap_or_else(|e| panic!("{e}")).to_src();
        for needle in [
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
            "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
            "cp.async.cg.shared.global",
        ] {
            assert!(ptx.contains(needle), "{file}/{arch}: PTX lacks `{needle}`");
        }
        let Some((ptxas, cuobjdump)) = &tools else { continue };
        let dir = std::env::temp_dir().join(format!("fape-kernels-sass-{}-{arch}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (input, cubin) = (dir.join("attention.ptx"), dir.join("attention.cubin"));
        std::fs::write(&input, ptx.trim_end_matches('\0')).expect("write ptx");
        let status = Command::new(ptxas).arg(format!("-arch={arch}")).arg(&input).arg("-o").arg(&cubin).status();
        assert!(status.expect("run ptxas").success(), "ptxas failed on {file} for {arch}");
        for kernel in &flash {
            let out =
                Command::new(cuobjdump).arg("-sass").arg("-fun").arg(kernel).arg(&cubin).output().expect("cuobjdump");
            let sass = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "cuobjdump failed on {kernel}/{arch}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let count = |op: &str| sass.lines().filter(|l| l.contains(op)).count();
            let (hmma, ldsm) = (count("HMMA"), count("LDSM"));
            println!("{kernel} {arch}: {hmma} HMMA, {ldsm} LDSM in the SASS");
            assert!(hmma > 0 && ldsm > 0, "{kernel}/{arch}: SASS has {hmma} HMMA and {ldsm} LDSM");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
