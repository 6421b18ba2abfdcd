// Kernels that pin down the warp-level and PTX semantics kernels/*.cu rely on, checked by
// tests/cuda_ptx.rs against the CUDA programming guide and the PTX ISA on whatever CUDA device
// runs them: the CPU emulator in CI, a GPU under tools/device (where they show the emulator
// agrees with the hardware). One block of 32 threads each.

// out[k * 32 + lane]: shuffles at width 16 and votes.
extern "C" __global__ void warp_ops(int* out)
{
    const int lane = threadIdx.x;
    out[0 * 32 + lane] = __shfl_sync(0xffffffffu, lane * 10, (lane * 7) % 32, 16);
    out[1 * 32 + lane] = __shfl_up_sync(0xffffffffu, lane * 10, 3, 16);
    out[2 * 32 + lane] = __shfl_down_sync(0xffffffffu, lane * 10, 5, 16);
    out[3 * 32 + lane] = __shfl_xor_sync(0xffffffffu, lane * 10, 17, 16);
    out[4 * 32 + lane] = __shfl_xor_sync(0xffffffffu, lane * 10, 17);
    out[5 * 32 + lane] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
    out[6 * 32 + lane] = __any_sync(0xffffffffu, lane == 31);
    out[7 * 32 + lane] = __all_sync(0xffffffffu, lane < 31);
}

// in: a 16x16 matrix of 16-bit patterns (row-major); out[lane * 8 + k]: register k of lane
// after ldmatrix .x4 (k < 4) and .x4.trans (k >= 4) of the four 8x8 quadrants, lanes 8m..8m+7
// addressing rows 0..7 of quadrant m = (top-left, bottom-left, top-right, bottom-right).
extern "C" __global__ void ldmatrix_ops(const unsigned short* in, unsigned* out)
{
    __shared__ __align__(16) unsigned short tile[16 * 16];
    const int lane = threadIdx.x;
    for (int i = lane; i < 256; i += 32) tile[i] = in[i];
    __syncwarp();
    const int m = lane / 8, r = lane % 8;
    const unsigned short* row = tile + ((m & 1) * 8 + r) * 16 + (m >> 1) * 8;
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    unsigned p[4], t[4];
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(p[0]), "=r"(p[1]), "=r"(p[2]), "=r"(p[3])
                 : "r"(a));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(t[0]), "=r"(t[1]), "=r"(t[2]), "=r"(t[3])
                 : "r"(a));
    for (int k = 0; k < 4; ++k) {
        out[lane * 8 + k] = p[k];
        out[lane * 8 + 4 + k] = t[k];
    }
}

// a: [32][4] A-fragment registers, b: [32][2], c: [32][4] floats per lane (as the fragments
// of mma.m16n8k16 lay them out); d: [32][4] the result. `half` picks f16 inputs, else bf16.
extern "C" __global__ void mma_ops(const unsigned* a, const unsigned* b, const float* c, float* d_out, int half)
{
    const int lane = threadIdx.x;
    float d[4] = {c[lane * 4], c[lane * 4 + 1], c[lane * 4 + 2], c[lane * 4 + 3]};
    const unsigned a0 = a[lane * 4], a1 = a[lane * 4 + 1], a2 = a[lane * 4 + 2], a3 = a[lane * 4 + 3];
    const unsigned b0 = b[lane * 2], b1 = b[lane * 2 + 1];
    if (half)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    for (int k = 0; k < 4; ++k) d_out[lane * 4 + k] = d[k];
}

// out[lane * 2 + 0/1]: cvt.rn.bf16x2.f32 and cvt.rn.f16x2.f32 of (x[2 lane], x[2 lane + 1]).
extern "C" __global__ void cvt_ops(const float* x, unsigned* out)
{
    const int lane = threadIdx.x;
    unsigned r, h;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x[2 * lane]), "f"(x[2 * lane + 1]));
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(h) : "f"(x[2 * lane]), "f"(x[2 * lane + 1]));
    out[lane * 2] = r;
    out[lane * 2 + 1] = h;
}

// src: 48 ints. Lane 0 copies src[0..4) in group 0, src[4..8) and 16 zero-filled bytes in
// group 1; out[0..12) is the shared tile after `wait_group 1`, out[12..24) after `wait_group 0`.
extern "C" __global__ void cp_async_ops(const int* src, int* out)
{
    __shared__ __align__(16) int tile[12];
    if (threadIdx.x != 0) return;
    for (int i = 0; i < 12; ++i) tile[i] = -1;
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(tile));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(16) : "memory");
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s + 16), "l"(src + 4), "r"(16) : "memory");
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s + 32), "l"(src + 8), "r"(0) : "memory");
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    for (int i = 0; i < 12; ++i) out[i] = tile[i];
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    for (int i = 0; i < 12; ++i) out[12 + i] = tile[i];
}

// x[i] = x[i] * a + b for i < n (one block of 32 threads, grid-stride): a graph's replays.
extern "C" __global__ void scale_add(float* x, float a, float b, int n)
{
    for (int i = threadIdx.x; i < n; i += 32) x[i] = x[i] * a + b;
}
