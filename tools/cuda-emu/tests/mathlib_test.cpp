// Checks the cuBLAS, cuBLASLt and cuFFT stand-ins (src/cublas.cpp, cublaslt.cpp, cufft.cpp) against
// naive f64 loops written here, on seeded random inputs of awkward sizes, and checks the calls the
// real libraries refuse. Prints each failure (index, got, expected, tolerance); exits 1 on any.
// Built from the repository root with memory.cpp and the three stand-ins:
//   g++ -std=c++17 -O2 -I tools/cuda-emu/include tools/cuda-emu/src/memory.cpp
//     tools/cuda-emu/src/cublas.cpp tools/cuda-emu/src/cublaslt.cpp tools/cuda-emu/src/cufft.cpp
//     tools/cuda-emu/tests/mathlib_test.cpp -o /tmp/mathlib_test && /tmp/mathlib_test
// Under FAPE_CUDA_EMU_SANITIZER=initcheck it also checks that never-written operands are reported.
#include <chrono>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../src/emu.h"

// The exported functions, as the real libraries declare them (enums as int, handles as void*).
extern "C" {
int cublasCreate_v2(void** handle);
int cublasDestroy_v2(void* handle);
int cublasSetStream_v2(void* handle, void* stream);
int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A,
                 int a_type, int lda, const void* B, int b_type, int ldb, const void* beta, void* C, int c_type,
                 int ldc, int compute, int algo);
int cublasGemmStridedBatchedEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha,
                               const void* A, int a_type, int lda, long long stride_a, const void* B, int b_type,
                               int ldb, long long stride_b, const void* beta, void* C, int c_type, int ldc,
                               long long stride_c, int batch, int compute, int algo);
int cublasLtCreate(void** handle);
int cublasLtDestroy(void* handle);
int cublasLtMatrixLayoutCreate(void** layout, int type, uint64_t rows, uint64_t cols, int64_t ld);
int cublasLtMatrixLayoutDestroy(void* layout);
int cublasLtMatmulDescCreate(void** desc, int compute, int scale);
int cublasLtMatmulDescSetAttribute(void* desc, int attr, const void* buf, size_t size);
int cublasLtMatmulDescDestroy(void* desc);
int cublasLtMatmulPreferenceCreate(void** pref);
int cublasLtMatmulPreferenceSetAttribute(void* pref, int attr, const void* buf, size_t size);
int cublasLtMatmulPreferenceDestroy(void* pref);
struct HeuristicResult {
    uint64_t algo[8];
    size_t workspace_size;
    int state;
    float waves;
    int reserved[4];
};
int cublasLtMatmulAlgoGetHeuristic(void* handle, void* desc, void* A, void* B, void* C, void* D, void* pref,
                                   int requested, HeuristicResult* results, int* count);
int cublasLtMatmul(void* handle, void* desc, const void* alpha, const void* a, void* A, const void* b, void* B,
                   const void* beta, const void* c, void* C, void* d, void* D, const void* algo, void* workspace,
                   size_t workspace_size, void* stream);
int cufftPlanMany(int* plan, int rank, int* n, int* inembed, int istride, int idist, int* onembed, int ostride,
                  int odist, int type, int batch);
int cufftSetStream(int plan, void* stream);
int cufftDestroy(int plan);
int cufftExecR2C(int plan, float* idata, float* odata);
int cufftExecC2R(int plan, float* idata, float* odata);
}

// The driver's stream capture (driver.cpp) is not part of this build: no stream is capturing,
// so every call computes at once.
bool emu::capturing(void*) { return false; }
bool emu::capture(void*, std::function<bool()>) { return false; }

namespace {

// Status codes and enum values (cuBLAS 13, cuFFT 12).
constexpr int OK = 0, BLAS_NOT_INITIALIZED = 1, BLAS_INVALID = 7, BLAS_EXEC_FAILED = 13, BLAS_NOT_SUPPORTED = 15;
constexpr int FFT_INVALID_PLAN = 1, FFT_INVALID_TYPE = 3, FFT_INVALID_VALUE = 4, FFT_EXEC_FAILED = 6,
              FFT_INVALID_SIZE = 8;
constexpr int OP_N = 0, OP_T = 1, R_32F = 0, R_16F = 2, R_16BF = 14, COMPUTE_32F = 68, GEMM_DEFAULT = -1;
constexpr int DESC_TRANSA = 3, DESC_TRANSB = 4, DESC_EPILOGUE = 7, DESC_BIAS_POINTER = 8, DESC_BIAS_TYPE = 26;
constexpr int PREF_MAX_WORKSPACE = 1, PREF_ALIGN_A = 5, EPILOGUE_BIAS = 4;
constexpr int R2C = 0x2a, C2R = 0x2c;

int g_checks = 0, g_failures = 0;
std::mt19937_64 g_rng(20240611);

void failure(const std::string& what)
{
    std::printf("FAIL %s\n", what.c_str());
    ++g_failures;
}

void expect_status(const std::string& what, int got, int want)
{
    ++g_checks;
    if (got != want) failure(what + ": status " + std::to_string(got) + ", expected " + std::to_string(want));
}

void expect(const std::string& what, bool ok)
{
    ++g_checks;
    if (!ok) failure(what);
}

// got[i] against want[i] within atol + rtol |want[i]| (NaN never passes); prints the first few misses.
void compare(const std::string& what, const std::vector<double>& got, const std::vector<double>& want, double atol,
             double rtol)
{
    ++g_checks;
    int misses = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double tol = atol + rtol * std::fabs(want[i]);
        if (got[i] == want[i] || std::fabs(got[i] - want[i]) <= tol) continue;
        if (++misses <= 5)
            std::printf("FAIL %s: index %zu: got %.9g, expected %.9g, tolerance %.3g\n", what.c_str(), i, got[i],
                        want[i], tol);
    }
    if (misses > 0) {
        std::printf("FAIL %s: %d of %zu elements off\n", what.c_str(), misses, want.size());
        ++g_failures;
    }
}

void* device(size_t bytes) { return emu::device_alloc(bytes); }

// A host-to-device copy as the driver does it: bytes copied and marked written.
void upload(void* dst, const void* src, size_t bytes)
{
    std::memcpy(dst, src, bytes);
    emu::mark_written(dst, bytes);
}

double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(g_rng); }

// Element types, encoded and decoded here independently of the stand-ins.
double bf16_value(uint16_t h)
{
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

double f16_value(uint16_t h)
{
    const int exponent = (h >> 10) & 31, mantissa = h & 1023;
    const double sign = (h & 0x8000) ? -1 : 1;
    if (exponent == 31) return mantissa ? NAN : sign * INFINITY;
    if (exponent == 0) return sign * std::ldexp(mantissa, -24);
    return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

size_t type_size(int type) { return type == R_32F ? 4 : 2; }

double value(int type, const void* p, size_t i)
{
    if (type == R_32F) return static_cast<const float*>(p)[i];
    const uint16_t h = static_cast<const uint16_t*>(p)[i];
    return type == R_16BF ? bf16_value(h) : f16_value(h);
}

// Fills `count` elements of `type` at host p with random values in +-[0.25, 4), exact in the type
// (f16 and bf16 as random bit patterns), returning them as doubles.
std::vector<double> random_elements(int type, void* p, size_t count)
{
    std::vector<double> v(count);
    for (size_t i = 0; i < count; ++i) {
        const uint32_t r = uint32_t(g_rng());
        if (type == R_32F) {
            static_cast<float*>(p)[i] = float(uniform(0.25, 4) * (r & 1 ? -1 : 1));
        } else if (type == R_16BF) {
            static_cast<uint16_t*>(p)[i] = uint16_t(((r & 1) << 15) | ((125 + (r >> 1) % 4) << 7) | ((r >> 8) & 127));
        } else {
            static_cast<uint16_t*>(p)[i] = uint16_t(((r & 1) << 15) | ((13 + (r >> 1) % 4) << 10) | ((r >> 8) & 1023));
        }
        v[i] = value(type, p, i);
    }
    return v;
}

// Relative tolerance of one rounding to `type` after f32 accumulation.
double type_rtol(int type) { return type == R_32F ? 2e-6 : type == R_16BF ? 1.0 / 128 : 1.0 / 512; }

// ---------------------------------------------------------------------------------------------
// cuBLAS: C = alpha op(A) op(B) + beta C, column-major, strided batches, against a naive loop.

struct BlasCase {
    int ta, tb, m, n, k, lda, ldb, ldc, batch;
    long long stride_a, stride_b, stride_c;
    int type;
    float alpha, beta;
};

void check_gemm(void* handle, const BlasCase& c)
{
    const std::string name = "cublasGemm" + std::string(c.batch > 1 ? "StridedBatchedEx" : "Ex") +
                             " type " + std::to_string(c.type) + " op " + "NT"[c.ta] + "NT"[c.tb] + " " +
                             std::to_string(c.m) + "x" + std::to_string(c.n) + "x" + std::to_string(c.k) +
                             " beta " + std::to_string(int(c.beta));
    const size_t size = type_size(c.type);
    const int a_cols = c.ta ? c.m : c.k, b_cols = c.tb ? c.k : c.n;
    const size_t a_len = size_t(c.stride_a * (c.batch - 1) + c.lda * a_cols);
    const size_t b_len = size_t(c.stride_b * (c.batch - 1) + c.ldb * b_cols);
    const size_t c_len = size_t(c.stride_c * (c.batch - 1) + c.ldc * c.n);
    std::vector<char> ha(a_len * size), hb(b_len * size), hc(c_len * size);
    const std::vector<double> a = random_elements(c.type, ha.data(), a_len);
    const std::vector<double> b = random_elements(c.type, hb.data(), b_len);
    std::vector<double> c0 = random_elements(c.type, hc.data(), c_len);
    void *da = device(ha.size()), *db = device(hb.size()), *dc = device(hc.size());
    upload(da, ha.data(), ha.size());
    upload(db, hb.data(), hb.size());
    if (c.beta != 0) upload(dc, hc.data(), hc.size());  // else C stays poisoned (NaN): it must not be read
    const int status = c.batch > 1
        ? cublasGemmStridedBatchedEx(handle, c.ta, c.tb, c.m, c.n, c.k, &c.alpha, da, c.type, c.lda, c.stride_a, db,
                                     c.type, c.ldb, c.stride_b, &c.beta, dc, c.type, c.ldc, c.stride_c, c.batch,
                                     COMPUTE_32F, GEMM_DEFAULT)
        : cublasGemmEx(handle, c.ta, c.tb, c.m, c.n, c.k, &c.alpha, da, c.type, c.lda, db, c.type, c.ldb, &c.beta, dc,
                       c.type, c.ldc, COMPUTE_32F, GEMM_DEFAULT);
    expect_status(name, status, OK);
    std::vector<double> got, want;
    bool padding_untouched = true;
    for (int bt = 0; bt < c.batch; ++bt)
        for (int j = 0; j < c.n; ++j)
            for (int i = 0; i < c.ldc; ++i) {
                const size_t at = size_t(bt * c.stride_c + j * c.ldc + i);
                if (i >= c.m) {  // padding rows: as uploaded, or still poisoned
                    const double v = value(c.type, dc, at);
                    padding_untouched &= c.beta != 0 ? v == c0[at] : std::isnan(v);
                    continue;
                }
                double sum = 0;
                for (int p = 0; p < c.k; ++p) {
                    const double av = a[size_t(bt * c.stride_a + (c.ta ? i * c.lda + p : p * c.lda + i))];
                    const double bv = b[size_t(bt * c.stride_b + (c.tb ? p * c.ldb + j : j * c.ldb + p))];
                    sum += av * bv;
                }
                want.push_back(c.alpha * sum + (c.beta != 0 ? c.beta * c0[at] : 0));
                got.push_back(value(c.type, dc, at));
            }
    compare(name, got, want, 1e-5 * c.k, type_rtol(c.type));
    expect(name + ": padding rows of C untouched", padding_untouched);
    for (void* p : {da, db, dc}) emu::device_free(p);
}

// Output rounding to nearest even: C [4 x 1] = A [4 x 2] . [1, 1]^T with sums exactly halfway
// between two values of the output type (1 + u/2 -> 1, 1 + 3u/2 -> 1 + 2u, u the spacing at 1),
// plus, for f16, a subnormal and an overflow to infinity.
void check_rounding(void* handle, int type)
{
    const double u = type == R_16BF ? 1.0 / 128 : 1.0 / 1024;
    const bool f16 = type == R_16F;
    const double sums[4][2] = {{1, u / 2}, {1, 3 * u / 2}, {-1, -u / 2}, {f16 ? 65504.0 : 1.0, f16 ? 32.0 : 0.0}};
    const double want[4] = {1, 1 + 2 * u, -1, f16 ? INFINITY : 1};  // 65536 rounds to infinity
    auto encode = [&](double v) {  // exact for these values
        const float f = float(v);
        uint32_t bits;
        std::memcpy(&bits, &f, 4);
        if (type == R_16BF) return uint16_t(bits >> 16);
        const int exponent = int((bits >> 23) & 255) - 127;
        const uint16_t sign = uint16_t((bits >> 16) & 0x8000);
        if (exponent < -14) return uint16_t(sign | uint16_t(std::ldexp(std::fabs(v), 24)));
        return uint16_t(sign | uint16_t((exponent + 15) << 10) | uint16_t((bits >> 13) & 1023));
    };
    uint16_t ha[8], hb[2] = {encode(1), encode(1)};
    for (int i = 0; i < 4; ++i)
        for (int p = 0; p < 2; ++p) ha[p * 4 + i] = encode(sums[i][p]);
    void *da = device(16), *db = device(4), *dc = device(8);
    upload(da, ha, 16);
    upload(db, hb, 4);
    const float one = 1, zero = 0;
    expect_status("rounding GEMM", cublasGemmEx(handle, OP_N, OP_N, 4, 1, 2, &one, da, type, 4, db, type, 2, &zero, dc,
                                                type, 4, COMPUTE_32F, GEMM_DEFAULT), OK);
    std::vector<double> got(4), expected(want, want + 4);
    for (size_t i = 0; i < 4; ++i) got[i] = value(type, dc, i);
    compare("round to nearest even, type " + std::to_string(type), got, expected, 0, 0);
    if (type == R_16F) {  // 2^-20 (a subnormal f16) times 1 + 0: exact
        const uint16_t tiny[2] = {encode(std::ldexp(1, -20)), 0};
        upload(da, tiny, 4);
        cublasGemmEx(handle, OP_N, OP_N, 1, 1, 2, &one, da, type, 1, db, type, 2, &zero, dc, type, 1, COMPUTE_32F,
                     GEMM_DEFAULT);
        compare("f16 subnormal output", {value(type, dc, 0)}, {std::ldexp(1, -20)}, 0, 0);
    }
    for (void* p : {da, db, dc}) emu::device_free(p);
}

void test_cublas()
{
    void* handle = nullptr;
    expect_status("cublasCreate_v2", cublasCreate_v2(&handle), OK);
    expect_status("cublasSetStream_v2", cublasSetStream_v2(handle, nullptr), OK);
    // f32 (SGEMM through cublasGemmEx), every transpose combination, ld > rows, beta 0 and 1.
    for (int ta = 0; ta < 2; ++ta)
        for (int tb = 0; tb < 2; ++tb)
            for (float beta : {0.0f, 1.0f}) {
                const int m = 13, n = 7, k = 19;
                check_gemm(handle, {ta, tb, m, n, k, (ta ? k : m) + 3, (tb ? n : k) + 2, m + 5, 1, 0, 0, 0, R_32F,
                                    0.75f, beta});
            }
    // Strided batches of bf16 and f16 with gaps between matrices, each transpose combination.
    for (int type : {R_16BF, R_16F, R_32F})
        for (int ta = 0; ta < 2; ++ta)
            for (int tb = 0; tb < 2; ++tb)
                for (float beta : {0.0f, 1.0f}) {
                    const int m = 11, n = 5, k = 9, lda = (ta ? k : m) + 1, ldb = (tb ? n : k) + 3, ldc = m + 2;
                    check_gemm(handle, {ta, tb, m, n, k, lda, ldb, ldc, 3, lda * (ta ? m : k) + 7,
                                        ldb * (tb ? k : n) + 5, ldc * n + 3, type, 1.25f, beta});
                }

    check_rounding(handle, R_16BF);
    check_rounding(handle, R_16F);

    // What cuBLAS refuses.
    const float one = 1, zero = 0;
    float* buf = static_cast<float*>(device(64 * 64 * 4));
    std::vector<float> ones(64 * 64, 1.0f);
    upload(buf, ones.data(), ones.size() * 4);
    auto gemm = [&](void* h, int m, int lda, int a_type, int compute, const void* A) {
        return cublasGemmEx(h, OP_N, OP_N, m, 4, 4, &one, A, a_type, lda, buf, R_32F, 4, &zero, buf + 2048, R_32F,
                            64, compute, GEMM_DEFAULT);
    };
    expect_status("cublasGemmEx lda < m", gemm(handle, 8, 7, R_32F, COMPUTE_32F, buf), BLAS_INVALID);
    expect_status("cublasGemmEx null handle", gemm(nullptr, 8, 8, R_32F, COMPUTE_32F, buf), BLAS_NOT_INITIALIZED);
    expect_status("cublasGemmEx A bf16, B f32", gemm(handle, 8, 8, R_16BF, COMPUTE_32F, buf), BLAS_NOT_SUPPORTED);
    expect_status("cublasGemmEx unknown compute type", gemm(handle, 8, 8, R_32F, 1234, buf), BLAS_INVALID);
    std::printf("(a memcheck report follows: A past the end of its allocation)\n");
    expect_status("cublasGemmEx A outside device memory", gemm(handle, 8, 8, R_32F, COMPUTE_32F, buf + 64 * 64 - 16),
                  BLAS_INVALID);
    // A 8 x 4 with lda 9 spans 3 * 9 + 8 = 35 floats: it fits exactly, and not one float less.
    expect_status("cublasGemmEx A fitting its allocation exactly",
                  gemm(handle, 8, 9, R_32F, COMPUTE_32F, buf + 64 * 64 - 35), OK);
    std::printf("(a memcheck report follows: A one float past the end of its allocation)\n");
    expect_status("cublasGemmEx A one float past its allocation",
                  gemm(handle, 8, 9, R_32F, COMPUTE_32F, buf + 64 * 64 - 34), BLAS_INVALID);
    if (emu::initcheck_on()) {
        void* unwritten = device(64 * 4);
        std::printf("(an initcheck report follows: A never written)\n");
        expect_status("cublasGemmEx A never written (initcheck)",
                      gemm(handle, 8, 8, R_32F, COMPUTE_32F, unwritten), BLAS_EXEC_FAILED);
        emu::device_free(unwritten);
    }
    emu::device_free(buf);
    expect_status("cublasDestroy_v2", cublasDestroy_v2(handle), OK);
    expect_status("cublasDestroy_v2 null", cublasDestroy_v2(nullptr), BLAS_NOT_INITIALIZED);
}

// ---------------------------------------------------------------------------------------------
// cuBLASLt: the crate's bf16 GEMM y [m, n] = a [m, k] . w [n, k]^T + bias [n] (+ beta y), row-major,
// i.e. column-major D [n, m] = op(A = w) op(B = a) with TRANSA = T, TRANSB = N.

struct Lt {
    void* handle;
    void *a_layout, *b_layout, *c_layout, *desc;
};

// A preference with `workspace` bytes allowed and the alignment promise `align_b` for B (0: the
// 256-byte default).
void* preference(uint64_t workspace, uint32_t align_b)
{
    void* pref = nullptr;
    expect_status("cublasLtMatmulPreferenceCreate", cublasLtMatmulPreferenceCreate(&pref), OK);
    expect_status("set MAX_WORKSPACE_BYTES",
                  cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE, &workspace, sizeof workspace), OK);
    if (align_b != 0)
        expect_status("set MIN_ALIGNMENT_B_BYTES",
                      cublasLtMatmulPreferenceSetAttribute(pref, PREF_ALIGN_A + 1, &align_b, sizeof align_b), OK);
    return pref;
}

void test_cublaslt()
{
    const int m = 9, n = 13, k = 21, lda = k + 3, ldw = k + 5;
    Lt lt{};
    expect_status("cublasLtCreate", cublasLtCreate(&lt.handle), OK);
    expect_status("layout A", cublasLtMatrixLayoutCreate(&lt.a_layout, R_16BF, k, n, ldw), OK);
    expect_status("layout B", cublasLtMatrixLayoutCreate(&lt.b_layout, R_16BF, k, m, lda), OK);
    expect_status("layout C", cublasLtMatrixLayoutCreate(&lt.c_layout, R_16BF, n, m, n), OK);
    expect_status("cublasLtMatmulDescCreate", cublasLtMatmulDescCreate(&lt.desc, COMPUTE_32F, R_32F), OK);
    const int32_t trans = 1, no_trans = 0, bf16 = R_16BF;
    const uint32_t epilogue = EPILOGUE_BIAS;
    expect_status("set TRANSA", cublasLtMatmulDescSetAttribute(lt.desc, DESC_TRANSA, &trans, 4), OK);
    expect_status("set TRANSB", cublasLtMatmulDescSetAttribute(lt.desc, DESC_TRANSB, &no_trans, 4), OK);
    const int64_t wide = 1;
    expect_status("set TRANSA with size 8", cublasLtMatmulDescSetAttribute(lt.desc, DESC_TRANSA, &wide, 8),
                  BLAS_INVALID);
    expect_status("set EPILOGUE", cublasLtMatmulDescSetAttribute(lt.desc, DESC_EPILOGUE, &epilogue, 4), OK);

    // Host data; `a` gets one spare leading element so a 2-byte misaligned view can be passed.
    std::vector<uint16_t> ha(static_cast<size_t>(m * lda + 1)), hw(static_cast<size_t>(n * ldw));
    std::vector<uint16_t> hbias(static_cast<size_t>(n)), hy(static_cast<size_t>(m * n));
    const std::vector<double> a = random_elements(R_16BF, ha.data(), ha.size());
    const std::vector<double> w = random_elements(R_16BF, hw.data(), hw.size());
    const std::vector<double> bias = random_elements(R_16BF, hbias.data(), hbias.size());
    const std::vector<double> y0 = random_elements(R_16BF, hy.data(), hy.size());
    auto* da = static_cast<uint16_t*>(device(ha.size() * 2));
    auto* dw = static_cast<uint16_t*>(device(hw.size() * 2));
    auto* dbias = static_cast<uint16_t*>(device(hbias.size() * 2));
    auto* dy = static_cast<uint16_t*>(device(hy.size() * 2));
    const size_t workspace_bytes = 4 << 20;
    void* workspace = device(workspace_bytes);
    upload(da, ha.data(), ha.size() * 2);
    upload(dw, hw.data(), hw.size() * 2);
    upload(dbias, hbias.data(), hbias.size() * 2);
    const uint64_t bias_ptr = reinterpret_cast<uintptr_t>(dbias);
    expect_status("set BIAS_POINTER", cublasLtMatmulDescSetAttribute(lt.desc, DESC_BIAS_POINTER, &bias_ptr, 8), OK);
    expect_status("set BIAS_DATA_TYPE", cublasLtMatmulDescSetAttribute(lt.desc, DESC_BIAS_TYPE, &bf16, 4), OK);

    // y = a[offset ..] w^T + bias + beta y0 against the loop; a_offset shifts a by elements.
    auto run = [&](void* pref, int a_offset, float beta, int want_status, const std::string& name) {
        HeuristicResult result{};
        int count = 0;
        expect_status(name + ": heuristic",
                      cublasLtMatmulAlgoGetHeuristic(lt.handle, lt.desc, lt.a_layout, lt.b_layout, lt.c_layout,
                                                     lt.c_layout, pref, 1, &result, &count),
                      OK);
        expect(name + ": one algorithm with state 0 and a workspace within MAX_WORKSPACE_BYTES",
               count == 1 && result.state == 0 && result.workspace_size <= workspace_bytes);
        if (beta != 0) upload(dy, hy.data(), hy.size() * 2);
        else std::memset(dy, 0xFF, hy.size() * 2);  // NaN: C must not be read
        const float alpha = 1;
        const int status = cublasLtMatmul(lt.handle, lt.desc, &alpha, dw, lt.a_layout, da + a_offset, lt.b_layout,
                                          &beta, dy, lt.c_layout, dy, lt.c_layout, result.algo, workspace,
                                          workspace_bytes, nullptr);
        expect_status(name, status, want_status);
        if (status != OK) return;
        std::vector<double> got, want;
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < n; ++j) {
                double sum = 0;
                for (int p = 0; p < k; ++p) sum += a[size_t(a_offset + i * lda + p)] * w[size_t(j * ldw + p)];
                want.push_back(sum + bias[size_t(j)] + beta * y0[size_t(i * n + j)]);
                got.push_back(bf16_value(dy[i * n + j]));
            }
        compare(name, got, want, 1e-5 * k, type_rtol(R_16BF));
    };
    void* pref = preference(workspace_bytes, 0);
    run(pref, 0, 0.0f, OK, "cublasLtMatmul bf16 TN + bias, beta 0");
    run(pref, 0, 1.0f, OK, "cublasLtMatmul bf16 TN + bias, beta 1");
    std::printf("(a memcheck report follows: B 2 bytes off the promised 256-byte alignment)\n");
    run(pref, 1, 0.0f, BLAS_INVALID, "cublasLtMatmul B misaligned under the default 256-byte promise");
    void* pref2 = preference(workspace_bytes, 2);
    run(pref2, 1, 0.0f, OK, "cublasLtMatmul B misaligned, promise 2 bytes");

    // A workspace smaller than the algorithm asks for, a null handle, shapes that do not chain,
    // ld < rows: refused.
    HeuristicResult result{};
    int count = 0;
    cublasLtMatmulAlgoGetHeuristic(lt.handle, lt.desc, lt.a_layout, lt.b_layout, lt.c_layout, lt.c_layout, pref, 1,
                                   &result, &count);
    const float alpha = 1, beta = 0;
    expect("the algorithm asks for a workspace", result.workspace_size > 0);
    expect_status("cublasLtMatmul workspace smaller than the algorithm's",
                  cublasLtMatmul(lt.handle, lt.desc, &alpha, dw, lt.a_layout, da, lt.b_layout, &beta, dy, lt.c_layout,
                                 dy, lt.c_layout, result.algo, workspace, result.workspace_size - 1, nullptr),
                  BLAS_INVALID);
    expect_status("heuristic null handle",
                  cublasLtMatmulAlgoGetHeuristic(nullptr, lt.desc, lt.a_layout, lt.b_layout, lt.c_layout, lt.c_layout,
                                                 pref, 1, &result, &count),
                  BLAS_NOT_INITIALIZED);
    void *wrong = nullptr, *short_ld = nullptr;
    cublasLtMatrixLayoutCreate(&wrong, R_16BF, k + 1, m, lda);
    cublasLtMatrixLayoutCreate(&short_ld, R_16BF, k, m, k - 1);
    expect_status("heuristic B rows != k",
                  cublasLtMatmulAlgoGetHeuristic(lt.handle, lt.desc, lt.a_layout, wrong, lt.c_layout, lt.c_layout,
                                                 pref, 1, &result, &count),
                  BLAS_INVALID);
    expect_status("heuristic B ld < rows",
                  cublasLtMatmulAlgoGetHeuristic(lt.handle, lt.desc, lt.a_layout, short_ld, lt.c_layout, lt.c_layout,
                                                 pref, 1, &result, &count),
                  BLAS_INVALID);
    void* no_workspace = preference(0, 0);
    cublasLtMatmulAlgoGetHeuristic(lt.handle, lt.desc, lt.a_layout, lt.b_layout, lt.c_layout, lt.c_layout,
                                   no_workspace, 1, &result, &count);
    expect("MAX_WORKSPACE_BYTES 0: an algorithm without workspace", count == 1 && result.workspace_size == 0);

    for (void* p : {pref, pref2, no_workspace}) cublasLtMatmulPreferenceDestroy(p);
    for (void* l : {lt.a_layout, lt.b_layout, lt.c_layout, wrong, short_ld}) cublasLtMatrixLayoutDestroy(l);
    cublasLtMatmulDescDestroy(lt.desc);
    expect_status("cublasLtDestroy", cublasLtDestroy(lt.handle), OK);
    for (void* p : {static_cast<void*>(da), static_cast<void*>(dw), static_cast<void*>(dbias),
                    static_cast<void*>(dy), workspace})
        emu::device_free(p);
}

// ---------------------------------------------------------------------------------------------
// cuFFT: batched R2C / C2R against a naive DFT.

// The half spectrum (last extent n_last/2 + 1) of the real row-major array x with extents n.
std::vector<std::complex<double>> naive_r2c(const std::vector<int>& n, const double* x)
{
    const int rank = int(n.size()), half = n.back() / 2 + 1;
    int total = 1, bins = half;
    for (int d = 0; d < rank; ++d) total *= n[d];
    for (int d = 0; d < rank - 1; ++d) bins *= n[d];
    std::vector<std::complex<double>> out(static_cast<size_t>(bins));
    for (int f = 0; f < bins; ++f) {
        int fi[3], rest = f;
        for (int d = rank - 1; d >= 0; --d) {
            const int extent = d == rank - 1 ? half : n[d];
            fi[d] = rest % extent;
            rest /= extent;
        }
        std::complex<double> sum = 0;
        for (int t = 0; t < total; ++t) {
            double phase = 0;
            for (int d = rank - 1, r = t; d >= 0; --d) {
                phase += double(fi[d]) * (r % n[d]) / n[d];
                r /= n[d];
            }
            sum += x[t] * std::polar(1.0, -2 * M_PI * phase);
        }
        out[size_t(f)] = sum;
    }
    return out;
}

std::string dims_name(const std::vector<int>& n, int batch)
{
    std::string s;
    for (int v : n) s += (s.empty() ? "" : "x") + std::to_string(v);
    return s + " batch " + std::to_string(batch);
}

// R2C of random x against the naive DFT, Parseval, then C2R(R2C(x)) = N x and the poisoned spectrum.
void check_fft(const std::vector<int>& n, int batch, bool naive)
{
    const std::string name = dims_name(n, batch);
    int total = 1;
    for (int v : n) total *= v;
    const int bins = total / n.back() * (n.back() / 2 + 1);
    std::vector<float> hx(size_t(total * batch));
    std::vector<double> x(hx.size());
    for (size_t i = 0; i < hx.size(); ++i) x[i] = hx[i] = float(uniform(-1, 1));
    auto* dx = static_cast<float*>(device(hx.size() * 4));
    auto* spec = static_cast<float*>(device(size_t(bins * batch) * 8));
    auto* back = static_cast<float*>(device(hx.size() * 4));
    upload(dx, hx.data(), hx.size() * 4);
    std::vector<int> dims = n;
    int r2c = 0, c2r = 0;
    expect_status("cufftPlanMany R2C " + name,
                  cufftPlanMany(&r2c, int(n.size()), dims.data(), nullptr, 1, total, nullptr, 1, bins, R2C, batch), OK);
    expect_status("cufftPlanMany C2R " + name,
                  cufftPlanMany(&c2r, int(n.size()), dims.data(), nullptr, 1, bins, nullptr, 1, total, C2R, batch), OK);
    expect_status("cufftSetStream", cufftSetStream(r2c, nullptr), OK);
    const auto start = std::chrono::steady_clock::now();
    expect_status("cufftExecR2C " + name, cufftExecR2C(r2c, dx, spec), OK);
    const double tol = 2e-6 * total;
    if (naive) {
        std::vector<double> got, want;
        for (int b = 0; b < batch; ++b) {
            const auto X = naive_r2c(n, &x[size_t(b * total)]);
            for (int f = 0; f < bins; ++f) {
                want.push_back(X[size_t(f)].real());
                want.push_back(X[size_t(f)].imag());
                got.push_back(spec[2 * (b * bins + f)]);
                got.push_back(spec[2 * (b * bins + f) + 1]);
            }
        }
        compare("cufftExecR2C " + name + " against the naive DFT", got, want, tol, 1e-6);
    }
    // Parseval: sum over the full spectrum |X|^2 = N sum |x|^2; the half counts its mirrored bins twice.
    const int last = n.back(), half = last / 2 + 1;
    std::vector<double> energy_spec(static_cast<size_t>(batch)), energy_x(static_cast<size_t>(batch));
    for (int b = 0; b < batch; ++b) {
        for (int f = 0; f < bins; ++f) {
            const int kl = f % half;
            const double weight = (kl == 0 || 2 * kl == last) ? 1 : 2;
            const double re = spec[2 * (b * bins + f)], im = spec[2 * (b * bins + f) + 1];
            energy_spec[size_t(b)] += weight * (re * re + im * im);
        }
        for (int t = 0; t < total; ++t) {
            const double v = x[size_t(b * total + t)];
            energy_x[size_t(b)] += double(total) * v * v;
        }
    }
    compare("Parseval " + name, energy_spec, energy_x, 0, 1e-5);
    expect_status("cufftExecC2R " + name, cufftExecC2R(c2r, spec, back), OK);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::vector<double> got(hx.size()), want(hx.size());
    for (size_t i = 0; i < hx.size(); ++i) {
        got[i] = back[i];
        want[i] = total * x[i];
    }
    compare("C2R(R2C(x)) = N x " + name, got, want, tol, 1e-6);
    bool poisoned = true;
    for (size_t i = 0; i < size_t(bins * batch) * 8; ++i) poisoned &= reinterpret_cast<uint8_t*>(spec)[i] == 0xFF;
    expect("C2R input poisoned afterwards " + name, poisoned);
    if (total >= 1 << 16) std::printf("R2C + C2R %s: %.1f ms\n", name.c_str(), ms);
    cufftDestroy(r2c);
    cufftDestroy(c2r);
    for (void* p : {static_cast<void*>(dx), static_cast<void*>(spec), static_cast<void*>(back)}) emu::device_free(p);
}

// An advanced layout: 1-D R2C of n = 20, input every other float with transforms 43 floats apart,
// output every third complex, transforms 35 complex apart; the gaps of the output stay untouched.
void check_fft_advanced()
{
    const int n = 20, half = 11, batch = 3, istride = 2, idist = 2 * n + 3, ostride = 3, odist = 3 * half + 2;
    std::vector<float> hx(size_t(idist * batch));
    for (float& v : hx) v = float(uniform(-1, 1));
    auto* dx = static_cast<float*>(device(hx.size() * 4));
    auto* spec = static_cast<float*>(device(size_t(odist * batch) * 8));
    upload(dx, hx.data(), hx.size() * 4);
    int plan = 0, dims[1] = {n}, inembed[1] = {n * istride}, onembed[1] = {half * ostride};
    expect_status("cufftPlanMany advanced",
                  cufftPlanMany(&plan, 1, dims, inembed, istride, idist, onembed, ostride, odist, R2C, batch), OK);
    expect_status("cufftExecR2C advanced", cufftExecR2C(plan, dx, spec), OK);
    std::vector<double> got, want;
    bool gaps_untouched = true;
    for (int b = 0; b < batch; ++b) {
        std::vector<double> x(n);
        for (int t = 0; t < n; ++t) x[size_t(t)] = hx[size_t(b * idist + t * istride)];
        const auto X = naive_r2c({n}, x.data());
        for (int f = 0; f < half; ++f) {
            want.push_back(X[size_t(f)].real());
            want.push_back(X[size_t(f)].imag());
            got.push_back(spec[2 * (b * odist + f * ostride)]);
            got.push_back(spec[2 * (b * odist + f * ostride) + 1]);
        }
        for (int f = 0; f < odist; ++f)
            if (f % ostride != 0 || f / ostride >= half) gaps_untouched &= std::isnan(spec[2 * (b * odist + f)]);
    }
    compare("cufftExecR2C advanced layout against the naive DFT", got, want, 4e-5, 1e-6);
    expect("advanced layout: output gaps untouched", gaps_untouched);
    cufftDestroy(plan);
    emu::device_free(dx);
    emu::device_free(spec);
}

void test_cufft()
{
    check_fft({64}, 3, true);
    check_fft({45}, 3, true);
    check_fft({16, 32}, 2, true);
    check_fft({12, 10}, 2, true);
    check_fft({9, 16}, 2, true);
    check_fft({4, 6, 8}, 2, true);
    check_fft({512, 512}, 1, false);
    check_fft({1, 7}, 1, true);
    check_fft_advanced();

    // What cuFFT refuses.
    int n[4] = {8, 8, 8, 8}, plan = 0, bad = 0;
    auto* buf = static_cast<float*>(device(4096));
    std::vector<float> zeros(1024, 0.0f);
    upload(buf, zeros.data(), 4096);
    expect_status("cufftPlanMany", cufftPlanMany(&plan, 1, n, nullptr, 1, 8, nullptr, 1, 5, R2C, 2), OK);
    expect_status("cufftExecC2R on an R2C plan", cufftExecC2R(plan, buf, buf + 512), FFT_INVALID_PLAN);
    expect_status("cufftExecR2C idata not 8-byte aligned", cufftExecR2C(plan, buf + 1, buf + 512), FFT_INVALID_VALUE);
    expect_status("cufftExecR2C odata not 8-byte aligned", cufftExecR2C(plan, buf, buf + 513), FFT_INVALID_VALUE);
    std::printf("(a memcheck report follows: odata past the end of its allocation)\n");
    expect_status("cufftExecR2C odata outside device memory", cufftExecR2C(plan, buf, buf + 1020), FFT_INVALID_VALUE);
    // 2 x 5 complex (80 bytes) fit exactly at the end, and not 8 bytes later.
    expect_status("cufftExecR2C odata fitting its allocation exactly", cufftExecR2C(plan, buf, buf + 1004), OK);
    std::printf("(a memcheck report follows: odata one complex past the end of its allocation)\n");
    expect_status("cufftExecR2C odata one complex past its allocation", cufftExecR2C(plan, buf, buf + 1006),
                  FFT_INVALID_VALUE);
    if (emu::initcheck_on()) {
        auto* unwritten = static_cast<float*>(device(64));
        std::printf("(an initcheck report follows: idata never written)\n");
        expect_status("cufftExecR2C idata never written (initcheck)", cufftExecR2C(plan, unwritten, buf + 512),
                      FFT_EXEC_FAILED);
        emu::device_free(unwritten);
    }
    expect_status("cufftDestroy", cufftDestroy(plan), OK);
    expect_status("cufftExecR2C on a destroyed plan", cufftExecR2C(plan, buf, buf + 512), FFT_INVALID_PLAN);
    expect_status("cufftDestroy twice", cufftDestroy(plan), FFT_INVALID_PLAN);
    expect_status("cufftPlanMany rank 4", cufftPlanMany(&bad, 4, n, nullptr, 1, 1, nullptr, 1, 1, R2C, 1),
                  FFT_INVALID_SIZE);
    expect_status("cufftPlanMany batch 0", cufftPlanMany(&bad, 1, n, nullptr, 1, 1, nullptr, 1, 1, R2C, 0),
                  FFT_INVALID_SIZE);
    expect_status("cufftPlanMany unknown type", cufftPlanMany(&bad, 1, n, nullptr, 1, 1, nullptr, 1, 1, 7, 1),
                  FFT_INVALID_TYPE);
    emu::device_free(buf);
}

}  // namespace

int main()
{
    std::setvbuf(stdout, nullptr, _IONBF, 0);  // in order with the reports on stderr
    std::printf("mathlib_test (sanitizer: %s)\n", emu::sanitizer_name(emu::sanitizer()));
    test_cublas();
    test_cublaslt();
    test_cufft();
    std::printf("mathlib_test: %d checks, %d failed\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
