// fape-cuda-emu: the cuBLAS stand-in (libcublas.so.13) and the GEMM core it shares with cuBLASLt.
// Exported, the functions on the crate's call paths (cudarc's CudaBlas::new / drop, its Gemm trait
// for bf16 and result::gemm_strided_batched_ex):
//   cublasCreate_v2, cublasDestroy_v2, cublasSetStream_v2, cublasGemmEx, cublasGemmStridedBatchedEx
// Calls compute at once on the CPU (streams run in order, synchronously), f64 accumulation, one
// rounding to f32 and then to the output type. The pointer mode is always host (alpha, beta are
// host values): cublasSetPointerMode is not on the call paths.
#include <algorithm>
#include <vector>

#include "mathlib.h"

struct cublasContext {
    void* stream = nullptr;  // the calls run at once, or at a graph's replay when it is capturing
};
using cublasHandle_t = cublasContext*;

namespace {

// cublasOperation_t (CUBLAS_OP_C is CUBLAS_OP_T on real types)
enum : int { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };

// cublasComputeType_t values the GEMM core computes with.
enum : int32_t {
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_32F_FAST_16F = 74,
    CUBLAS_COMPUTE_32F_FAST_16BF = 75,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
};

// Bytes from a stored matrix's first element to just past its last one.
size_t span_bytes(const emu::Matrix& x)
{
    if (x.rows == 0 || x.cols == 0) return 0;
    return size_t((x.cols - 1) * x.ld + x.rows) * emu::element_size(x.type);
}

// The first element of matrix `b` of the batch.
const char* matrix_at(const emu::Matrix& x, int64_t b)
{
    return static_cast<const char*>(x.ptr) + b * x.stride * int64_t(emu::element_size(x.type));
}

// Whether every matrix of `x` lies in one device allocation; reports the first that does not.
bool matrix_in_memory(const emu::Gemm& g, const char* name, const emu::Matrix& x)
{
    const size_t bytes = span_bytes(x);
    for (int64_t b = 0; b < g.batch; ++b) {
        const char* p = matrix_at(x, b);
        if (bytes != 0 && !emu::device_range(p, bytes)) {
            const std::string what = g.batch > 1 ? std::string(name) + " (matrix " + std::to_string(b) + ")" : name;
            return emu::in_device_memory(g.fn, what.c_str(), p, bytes);
        }
    }
    return true;
}

// initcheck: whether the columns of matrix `b` of `x` (rows elements each, ld apart) were written;
// reports the first column that was not.
bool columns_written(const std::string& what, const emu::Matrix& x, int64_t b)
{
    if (!emu::initcheck_on()) return true;
    const size_t size = emu::element_size(x.type);
    const char* p = matrix_at(x, b);
    for (int64_t c = 0; c < x.cols; ++c)
        if (!emu::check_read(p + c * x.ld * int64_t(size), size_t(x.rows) * size, what.c_str())) return false;
    return true;
}

// cublasGemmAlgo_t: CUBLAS_GEMM_DEFAULT, ALGO0..23, DEFAULT_TENSOR_OP, ALGO0..15_TENSOR_OP. All
// run the same core here.
bool valid_algo(int algo) { return algo == -1 || (algo >= 0 && algo <= 23) || (algo >= 99 && algo <= 115); }

bool valid_op(int op) { return op == CUBLAS_OP_N || op == CUBLAS_OP_T || op == CUBLAS_OP_C; }

// cublasGemmStridedBatchedEx (cublasGemmEx is batch 1): C = alpha op(A) op(B) + beta C per matrix.
// Refused like cuBLAS: a null handle (NOT_INITIALIZED); an operation other than N/T/C, negative
// m, n, k or batch count, lda < max(1, rows of stored A) (m, or k when transposed), ldb likewise,
// ldc < max(1, m), null alpha or beta, an unknown compute type or algorithm (INVALID_VALUE); a
// type combination cuBLAS does not compute, or the emulator does not (NOT_SUPPORTED).
cublasStatus_t gemm_ex(const char* fn, cublasHandle_t handle, int transa, int transb, int m, int n, int k,
                       const void* alpha, const void* A, int32_t a_type, int lda, long long stride_a, const void* B,
                       int32_t b_type, int ldb, long long stride_b, const void* beta, void* C, int32_t c_type, int ldc,
                       long long stride_c, int batch, int32_t compute, int algo)
{
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!valid_op(transa) || !valid_op(transb) || m < 0 || n < 0 || k < 0 || batch < 0)
        return CUBLAS_STATUS_INVALID_VALUE;
    const bool ta = transa != CUBLAS_OP_N, tb = transb != CUBLAS_OP_N;
    if (lda < std::max(1, ta ? k : m) || ldb < std::max(1, tb ? n : k) || ldc < std::max(1, m))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (alpha == nullptr || beta == nullptr || !emu::known_compute_type(compute) || !valid_algo(algo))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (!emu::gemm_types_supported(compute, a_type, b_type, c_type)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (m == 0 || n == 0 || batch == 0) return CUBLAS_STATUS_SUCCESS;
    // The 32F compute types scale with host f32 alpha and beta.
    const emu::Matrix a{A, a_type, ta ? k : m, ta ? m : k, lda, stride_a};
    const emu::Matrix b{B, b_type, tb ? n : k, tb ? k : n, ldb, stride_b};
    const emu::Matrix c{C, c_type, m, n, ldc, stride_c};
    const emu::Gemm g{fn, ta, tb, m, n, k, batch, *static_cast<const float*>(alpha), *static_cast<const float*>(beta),
                      a, b, c, c, nullptr, 0};
    if (emu::capturing(handle->stream))
        return emu::capture(handle->stream, [g] { return emu::gemm(g) == emu::GemmResult::Ok; })
                   ? CUBLAS_STATUS_SUCCESS
                   : CUBLAS_STATUS_INVALID_VALUE;
    switch (emu::gemm(g)) {
    case emu::GemmResult::Ok: return CUBLAS_STATUS_SUCCESS;
    case emu::GemmResult::OutOfRange: return CUBLAS_STATUS_INVALID_VALUE;
    default: return CUBLAS_STATUS_EXECUTION_FAILED;
    }
}

}  // namespace

namespace emu {

bool known_compute_type(int32_t compute) { return compute >= 64 && compute <= 79 && compute != 76; }

bool gemm_types_supported(int32_t compute, int32_t a, int32_t b, int32_t c)
{
    switch (compute) {
    case CUBLAS_COMPUTE_32F:
    case CUBLAS_COMPUTE_32F_PEDANTIC:
        return a == b && element_size(a) != 0 && (c == a || c == CUDA_R_32F);
    case CUBLAS_COMPUTE_32F_FAST_16F:
    case CUBLAS_COMPUTE_32F_FAST_16BF:
    case CUBLAS_COMPUTE_32F_FAST_TF32:
        return a == CUDA_R_32F && b == CUDA_R_32F && c == CUDA_R_32F;
    default:
        return false;  // 16F, 64F, 32I and the emulated-arithmetic types: not emulated
    }
}

GemmResult gemm(const Gemm& g)
{
    const size_t bias_bytes = g.bias ? size_t(g.m) * element_size(g.bias_type) : 0;
    if (!matrix_in_memory(g, "A", g.a) || !matrix_in_memory(g, "B", g.b) ||
        (g.beta != 0 && !matrix_in_memory(g, "C", g.c)) || !matrix_in_memory(g, "D", g.d) ||
        !in_device_memory(g.fn, "bias", g.bias, bias_bytes)) {
        take_reports();
        return GemmResult::OutOfRange;
    }
    const std::string fn = g.fn;
    const std::string what_a = fn + " A", what_b = fn + " B", what_c = fn + " C";
    bool written = bias_bytes == 0 || check_read(g.bias, bias_bytes, (fn + " bias").c_str());
    const int64_t m = g.m, n = g.n, k = g.k;
    const size_t c_size = element_size(g.c.type), d_size = element_size(g.d.type);
    // op(A) packed column-major m x k, op(B) column-major k x n: the inner loop runs down a column.
    std::vector<double> a(static_cast<size_t>(m * k)), b(static_cast<size_t>(k * n)), acc(static_cast<size_t>(m));
    for (int64_t batch = 0; batch < g.batch; ++batch) {
        written = written && columns_written(what_a, g.a, batch);
        written = written && columns_written(what_b, g.b, batch);
        const void* pa = matrix_at(g.a, batch);
        const void* pb = matrix_at(g.b, batch);
        for (int64_t p = 0; p < k; ++p)
            for (int64_t i = 0; i < m; ++i)
                a[p * m + i] = load(g.a.type, pa, g.trans_a ? p + i * g.a.ld : i + p * g.a.ld);
        for (int64_t j = 0; j < n; ++j)
            for (int64_t p = 0; p < k; ++p)
                b[j * k + p] = load(g.b.type, pb, g.trans_b ? j + p * g.b.ld : p + j * g.b.ld);
        const char* pc = matrix_at(g.c, batch);
        char* pd = const_cast<char*>(matrix_at(g.d, batch));  // D is the output operand
        for (int64_t j = 0; j < n; ++j) {
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t p = 0; p < k; ++p) {
                const double bv = b[j * k + p];
                const double* col = &a[p * m];
                for (int64_t i = 0; i < m; ++i) acc[i] += col[i] * bv;
            }
            const char* c_col = pc + j * g.c.ld * int64_t(c_size);
            char* d_col = pd + j * g.d.ld * int64_t(d_size);
            if (g.beta != 0) written = written && check_read(c_col, size_t(m) * c_size, what_c.c_str());
            for (int64_t i = 0; i < m; ++i) {
                double v = g.alpha * acc[i];
                if (g.beta != 0) v += g.beta * load(g.c.type, c_col, i);
                if (g.bias) v += load(g.bias_type, g.bias, i);
                store(g.d.type, d_col, i, v);
            }
            mark_written(d_col, size_t(m) * d_size);
        }
    }
    if (!written) {
        take_reports();
        return GemmResult::Unwritten;
    }
    return GemmResult::Ok;
}

}  // namespace emu

// A handle; INVALID_VALUE when `handle` is null.
EMU_EXPORT cublasStatus_t cublasCreate_v2(cublasHandle_t* handle)
{
    if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = new cublasContext();
    return CUBLAS_STATUS_SUCCESS;
}

// NOT_INITIALIZED for a null handle.
EMU_EXPORT cublasStatus_t cublasDestroy_v2(cublasHandle_t handle)
{
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}

// Stores the stream (calls run at once, or are captured when it is capturing); NOT_INITIALIZED
// for a null handle.
EMU_EXPORT cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, void* stream)
{
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}

EMU_EXPORT cublasStatus_t cublasGemmEx(cublasHandle_t handle, int transa, int transb, int m, int n, int k,
                                       const void* alpha, const void* A, int32_t a_type, int lda, const void* B,
                                       int32_t b_type, int ldb, const void* beta, void* C, int32_t c_type, int ldc,
                                       int32_t compute, int algo)
{
    return gemm_ex("cublasGemmEx", handle, transa, transb, m, n, k, alpha, A, a_type, lda, 0, B, b_type, ldb, 0, beta,
                   C, c_type, ldc, 0, 1, compute, algo);
}

EMU_EXPORT cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t handle, int transa, int transb, int m, int n,
                                                     int k, const void* alpha, const void* A, int32_t a_type, int lda,
                                                     long long stride_a, const void* B, int32_t b_type, int ldb,
                                                     long long stride_b, const void* beta, void* C, int32_t c_type,
                                                     int ldc, long long stride_c, int batch, int32_t compute, int algo)
{
    return gemm_ex("cublasGemmStridedBatchedEx", handle, transa, transb, m, n, k, alpha, A, a_type, lda, stride_a, B,
                   b_type, ldb, stride_b, beta, C, c_type, ldc, stride_c, batch, compute, algo);
}
