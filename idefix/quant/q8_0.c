/* Q8_0 matrix-vector products for decode on x86-64 CPUs with AVX-512 (idefix.quant.native loads this).

   y[i, n] = sum_k x[i, k] * w[n, k] for a few rows x (fp32), with the weight held as Q8_0: int8 q[n, k] and one
   fp32 scale d[n, k / 32] per block of 32, w = q * d exactly as GGML dequantizes it. The activations stay fp32,
   so the only difference from dequantize-then-matmul is the order of the additions. A weight row is read once
   for all the rows of x (up to MAX_ROWS per pass); output rows are shared between the OpenMP threads of the
   runtime PyTorch already loaded (libgomp.so.1 is matched by name), so both use one thread pool.

   Built by setup.py when a compiler is there; without it, or on a CPU without AVX-512, idefix uses its PyTorch
   kernels. */

#include <immintrin.h>
#include <stdint.h>

#define BLOCK 32
#define MAX_ROWS 4
/* Software prefetch distance in weight bytes. Decode's weights are many small matrices (0.3-2 MB), each read once
   per step from memory, and the hardware prefetchers ramp up too slowly on them: prefetching 4 KB ahead took
   SmolVLM-256M's shapes from 12-15 to 17-23 GB/s (2 threads, runs/ microbenchmark; 2-8 KB all did about as well). */
#define PREFETCH 4096

int idefix_q8_0_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

__attribute__((target("avx512f,avx512bw"), always_inline)) static inline void row_dot(
    const float *x, int64_t k, const int8_t *q, const float *d, float *out, const int rows) {
    __m512 acc[2 * MAX_ROWS];
    for (int i = 0; i < 2 * rows; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < k / BLOCK; b++) {
        /* past this row: the next rows follow in memory (a prefetch beyond the matrix is harmless) */
        _mm_prefetch((const char *)(q + b * BLOCK + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(d + b + PREFETCH / BLOCK), _MM_HINT_T0);
        const __m512 scale = _mm512_set1_ps(d[b]);
        const __m128i lo = _mm_loadu_si128((const __m128i *)(q + b * BLOCK));
        const __m128i hi = _mm_loadu_si128((const __m128i *)(q + b * BLOCK + 16));
        const __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), scale);
        const __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), scale);
        for (int i = 0; i < rows; i++) {
            const float *xb = x + i * k + b * BLOCK;
            acc[2 * i] = _mm512_fmadd_ps(_mm512_loadu_ps(xb), w0, acc[2 * i]);
            acc[2 * i + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), w1, acc[2 * i + 1]);
        }
    }
    for (int i = 0; i < rows; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * i], acc[2 * i + 1]));
}

/* x [m, k], q [n, k], d [n, k / 32], y [m, n], all contiguous; k a multiple of 32. */
__attribute__((target("avx512f,avx512bw"))) void idefix_q8_0_matmul(
    const float *x, int64_t m, int64_t k, const int8_t *q, const float *d, int64_t n, float *y, int threads) {
    for (int64_t i0 = 0; i0 < m; i0 += MAX_ROWS) {
        const int rows = m - i0 < MAX_ROWS ? (int)(m - i0) : MAX_ROWS;
        const float *xs = x + i0 * k;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t r = 0; r < n; r++) {
            float out[MAX_ROWS];
            const int8_t *qr = q + r * k;
            const float *dr = d + r * (k / BLOCK);
            /* constant row counts, so that each call unrolls with its accumulators in registers */
            switch (rows) {
                case 1: row_dot(xs, k, qr, dr, out, 1); break;
                case 2: row_dot(xs, k, qr, dr, out, 2); break;
                case 3: row_dot(xs, k, qr, dr, out, 3); break;
                default: row_dot(xs, k, qr, dr, out, 4); break;
            }
            for (int i = 0; i < rows; i++) y[(i0 + i) * n + r] = out[i];
        }
    }
}
