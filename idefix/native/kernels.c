/* idefix's native kernels for x86-64 CPUs with AVX-512 (idefix.native loads them): decode's quantized and
   bf16-weight matrix-vector products, RMSNorm, which PyTorch runs as several ops (~14 us a call at decode's sizes),
   two pieces of the vision tower (attention over full tiles, fc1's bias with the tanh GELU), decode attention, and
   the decode stack that runs every decoder layer of a step in one call (the last three at the end of the file).

   The products:

   y[i, n] = sum_k x[i, k] * w[n, k] for a few rows x (fp32), with the weight held in 32-weight blocks as GGML
   defines them, dequantized in registers exactly as GGML does:
   - int8 blocks (Q8_0, Q5_0, Q8_K; Q5_1 and Q5_K with an offset): int8 q[n, k], a fp32 scale d[n, k / 32] and
     maybe an offset m; w = q * d (+ m), GGML's dequantization exactly (q * d is exact, the sum rounded once).
   - 4-bit (Q4_0, Q4_1, Q4_K): nibbles, a scale d and offset m per block; w = q * d + m, which is GGML's
     dequantization exactly for all three (q * d is exact in fp32, and both round the sum once). d and m are
     fp16 where that holds them exactly (Q4_0 and Q4_1 store fp16; Q4_K's d * sub-block scale needs fp32): 20
     bytes a block instead of 24, and decode streams the weights.
   Q8_0 keeps the activations in fp32, so the only difference from dequantize-then-matmul is the order of the
   additions. Converting nibbles to fp32 costs more instructions per weight than the memory system does
   (measured: no faster than torch's int4 kernel), so the 4-bit kernel does what llama.cpp does: it rounds each
   32-block of x to int8 with a scale of its own and multiplies bytes with AVX-512 VNNI (64 products per
   instruction), so the result is W times the rounded x: that rounding is the only error beyond the order of
   additions, far below the 4-bit weights' own (tests/unit/test_quant.py holds it to that).
   A weight row is read once for all the rows of x (up to MAX_ROWS per pass); output rows are shared between
   the OpenMP threads of the runtime PyTorch already loaded (libgomp.so.1 is matched by name), so both use one
   thread pool.

   Built by setup.py when a compiler is there; without it, or on a CPU without AVX-512, idefix uses its PyTorch
   kernels. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32
#define MAX_ROWS 8 /* 4 read the weights 4 times at decode x16: 8 took x16 from 319-365 to 378-413 tok/s (256M) */
#define BF16_MAX_ROWS 16 /* rows of x per pass over a bf16 weight, in groups of 8 (see idefix_bf16_matmul) */
/* Software prefetch distance in weight bytes. Decode's weights are many small matrices (0.3-2 MB), each read once
   per step from memory, and the hardware prefetchers ramp up too slowly on them: prefetching 4 KB ahead took
   SmolVLM-256M's Q8_0 shapes from 12-15 to 17-23 GB/s (2 threads, runs/ microbenchmark; 2-8 KB all did about as
   well). */
#define PREFETCH 4096

#define Q4_PAIR 64 /* the 4-bit layout interleaves two blocks: k is padded to a multiple of 64 (zero blocks) */
#define GROUP 16  /* blocks whose scales are read as one vector */

int idefix_q8_0_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

int idefix_q4_supported(void) {
    return idefix_q8_0_supported() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
}

/* The first `left` of 16 lanes (none when left <= 0). */
static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
}

/* Per-block values [at, at + 16) (fewer where `mask` says), fp16 or fp32, as fp32. */
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) static inline __m512 load_blocks(
    const void *p, int64_t at, __mmask16 mask, const int half) {
    if (half) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + at));
    return _mm512_maskz_loadu_ps(mask, (const float *)p + at);
}

/* One int8 weight row against `rows` rows of x: w = q * d, or q * d + m where `offsets` (a constant at each call). */
__attribute__((target("avx512f,avx512bw"), always_inline)) static inline void q8_0_row(
    const float *x, int64_t k, const int8_t *q, const float *d, const float *m, float *out, const int rows,
    const int offsets) {
    __m512 acc[2 * MAX_ROWS];
    for (int i = 0; i < 2 * rows; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < k / BLOCK; b++) {
        /* past this row: the next rows follow in memory (a prefetch beyond the matrix is harmless) */
        _mm_prefetch((const char *)(q + b * BLOCK + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(d + b + PREFETCH / BLOCK), _MM_HINT_T0);
        const __m512 scale = _mm512_set1_ps(d[b]);
        const __m128i lo = _mm_loadu_si128((const __m128i *)(q + b * BLOCK));
        const __m128i hi = _mm_loadu_si128((const __m128i *)(q + b * BLOCK + 16));
        __m512 w0, w1;
        if (offsets) {
            const __m512 offset = _mm512_set1_ps(m[b]);
            w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), scale, offset);
            w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), scale, offset);
        } else {
            w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), scale);
            w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), scale);
        }
        for (int i = 0; i < rows; i++) {
            const float *xb = x + i * k + b * BLOCK;
            acc[2 * i] = _mm512_fmadd_ps(_mm512_loadu_ps(xb), w0, acc[2 * i]);
            acc[2 * i + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), w1, acc[2 * i + 1]);
        }
    }
    for (int i = 0; i < rows; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * i], acc[2 * i + 1]));
}

/* x rounded for the 4-bit kernel: per row of x and 32-block, int8 values, their scale and their sum (scaled). */
typedef struct {
    int8_t *x8;   /* [rows, kp] */
    float *scale; /* [rows, kp / 32] */
    float *sum;   /* [rows, kp / 32] */
} QuantizedX;

/* One 4-bit weight row (kp / 2 bytes: per pair of blocks, 32 bytes holding the first block's 32 weights in their
   low nibbles and the second's in their high ones) against `rows` rows of quantized x. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) static inline void q4_row(
    const QuantizedX *x, int64_t kp, const uint8_t *q, const void *d, const void *m, float *out, const int rows,
    const int half) {
    const int64_t blocks = kp / BLOCK;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    /* lanes 0-7 of a VNNI product hold the pair's first block, lanes 8-15 its second: their scales' places */
    const __m512i pair_lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[MAX_ROWS], offsets[MAX_ROWS];
    for (int i = 0; i < rows; i++) acc[i] = offsets[i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < blocks; g += GROUP) {
        const int in_group = blocks - g < GROUP ? (int)(blocks - g) : GROUP;
        const __mmask16 mask = tail_mask(in_group);
        const int64_t ahead = (g + PREFETCH / 16) * (half ? 2 : 4);
        _mm_prefetch((const char *)d + ahead, _MM_HINT_T0);
        _mm_prefetch((const char *)m + ahead, _MM_HINT_T0);
        const __m512 dv = load_blocks(d, g, mask, half), mv = load_blocks(m, g, mask, half);
        __m512 scales[MAX_ROWS];
        for (int i = 0; i < rows; i++) {
            const int64_t at = i * blocks + g;
            scales[i] = _mm512_mul_ps(dv, _mm512_maskz_loadu_ps(mask, x->scale + at));
            offsets[i] = _mm512_fmadd_ps(mv, _mm512_maskz_loadu_ps(mask, x->sum + at), offsets[i]);
        }
        for (int p = 0; p < in_group / 2; p++) {
            const uint8_t *qp = q + (g + 2 * p) * (BLOCK / 2);
            _mm_prefetch((const char *)(qp + PREFETCH), _MM_HINT_T0);
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)qp);
            const __m256i lo = _mm256_and_si256(bytes, nibble);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
            const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            const __m512i lanes = _mm512_add_epi32(pair_lanes, _mm512_set1_epi32(2 * p));
            for (int i = 0; i < rows; i++) {
                const __m512i xv = _mm512_loadu_si512((const void *)(x->x8 + i * kp + (g + 2 * p) * BLOCK));
                const __m512i dots = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
                const __m512 scale = _mm512_permutexvar_ps(lanes, scales[i]);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), scale, acc[i]);
            }
        }
    }
    for (int i = 0; i < rows; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i], offsets[i]));
}

/* Rows of x, MAX_ROWS at a time, against all n weight rows, shared between the threads; ROW(r, rows, out, flag)
   computes one weight row for `rows`, with `flag` a kernel's variant. Both are constants at each call, so each
   (rows, flag) compiles to its own loop with its accumulators in registers. */
#define FOR_ROWS_WITH(flag, rows_x, n, threads, xs, ROW)                                            \
    for (int64_t i0 = 0; i0 < (rows_x); i0 += MAX_ROWS) {                                           \
        const int pass_rows = (rows_x) - i0 < MAX_ROWS ? (int)((rows_x) - i0) : MAX_ROWS;            \
        const int64_t xs = i0;                                                                      \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                           \
        for (int64_t r = 0; r < (n); r++) {                                                         \
            float out[MAX_ROWS];                                                                    \
            switch (pass_rows) {                                                                    \
                case 1: ROW(r, 1, out, flag); break;                                                \
                case 2: ROW(r, 2, out, flag); break;                                                \
                case 3: ROW(r, 3, out, flag); break;                                                \
                case 4: ROW(r, 4, out, flag); break;                                                \
                case 5: ROW(r, 5, out, flag); break;                                                \
                case 6: ROW(r, 6, out, flag); break;                                                \
                case 7: ROW(r, 7, out, flag); break;                                                \
                default: ROW(r, 8, out, flag); break;                                               \
            }                                                                                       \
            for (int i = 0; i < pass_rows; i++) y[(i0 + i) * (n) + r] = out[i];                     \
        }                                                                                           \
    }
/* FOR_ROWS_WITH for the variant `flag` (a run-time condition) picks, 1 or 0 */
#define FOR_ROWS(flag, rows_x, n, threads, xs, ROW)                    \
    if (flag) {                                                        \
        FOR_ROWS_WITH(1, rows_x, n, threads, xs, ROW)                  \
    } else {                                                           \
        FOR_ROWS_WITH(0, rows_x, n, threads, xs, ROW)                  \
    }

/* x [rows_x, k], q [n, k], d (and m, unless NULL) [n, k / 32], y [rows_x, n], all contiguous; k a multiple of 32. */
__attribute__((target("avx512f,avx512bw"))) void idefix_q8_0_matmul(
    const float *x, int64_t rows_x, int64_t k, const int8_t *q, const float *d, const float *m, int64_t n, float *y,
    int threads) {
#define Q8_0_ROW(r, rows, out, offsets) \
    q8_0_row(x + first * k, k, q + (r) * k, d + (r) * (k / BLOCK), m ? m + (r) * (k / BLOCK) : 0, out, rows, offsets)
    FOR_ROWS(m != 0, rows_x, n, threads, first, Q8_0_ROW)
#undef Q8_0_ROW
}

/* One bf16 weight row against up to 4 rows of x (fp32), two accumulators each (8 chains of multiply-adds in
   flight): a bf16 value is the upper half of its fp32 one, so each weight widens exactly with a shift and the
   products are fp32's. Few rows are bound by memory, and this reads the weight once. */
__attribute__((target("avx512f,avx512bw"), always_inline)) static inline void bf16_row(
    const float *x, int64_t k, const uint16_t *w, float *out, const int rows) {
    __m512 acc[2 * 4];
    for (int i = 0; i < 2 * rows; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += BLOCK) {
        _mm_prefetch((const char *)(w + j) + PREFETCH, _MM_HINT_T0);
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + j)));
        const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + j + 16)));
        const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)), w1 = _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16));
        for (int i = 0; i < rows; i++) {
            const float *xb = x + i * k + j;
            acc[2 * i] = _mm512_fmadd_ps(_mm512_loadu_ps(xb), w0, acc[2 * i]);
            acc[2 * i + 1] = _mm512_fmadd_ps(_mm512_loadu_ps(xb + 16), w1, acc[2 * i + 1]);
        }
    }
    for (int i = 0; i < rows; i++) out[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[2 * i], acc[2 * i + 1]));
}

/* Two bf16 weight rows (w, w + k) against up to 8 rows of x: each load of x feeds two multiply-adds. With more
   rows the products, not the weights' bytes, set the pace, and one x load per multiply-add held the one-row kernel
   to ~150 GFLOP/s. (Widening the pair into an fp32 buffer once for all 16 rows of a pass was slower: the
   weights' reads no longer overlap the products.) out: [2][8]. */
__attribute__((target("avx512f,avx512bw"), always_inline)) static inline void bf16_pair(
    const float *x, int64_t k, const uint16_t *w, float *out, const int rows) {
    __m512 a[8], b[8];
    for (int i = 0; i < rows; i++) a[i] = b[i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += BLOCK) {
        _mm_prefetch((const char *)(w + j) + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + k + j) + PREFETCH, _MM_HINT_T0);
        __m512 wv[4];
        for (int h = 0; h < 4; h++) {
            const uint16_t *src = w + (h / 2) * k + j + (h % 2) * 16;
            wv[h] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
        }
        for (int i = 0; i < rows; i++) {
            __m512 x0 = _mm512_loadu_ps(x + i * k + j), x1 = _mm512_loadu_ps(x + i * k + j + 16);
            __asm__("" : "+v"(x0), "+v"(x1)); /* one load of x for both weight rows: GCC would fold one into each
                                                 multiply-add, and loads held 16 rows to ~155 GFLOP/s (now ~175) */
            a[i] = _mm512_fmadd_ps(x1, wv[1], _mm512_fmadd_ps(x0, wv[0], a[i]));
            b[i] = _mm512_fmadd_ps(x1, wv[3], _mm512_fmadd_ps(x0, wv[2], b[i]));
        }
    }
    for (int i = 0; i < rows; i++) {
        out[i] = _mm512_reduce_add_ps(a[i]);
        out[8 + i] = _mm512_reduce_add_ps(b[i]);
    }
}

/* x [rows_x, k] fp32, w [n, k] bf16, y [rows_x, n] fp32, all contiguous; k a multiple of 32. Up to 4 rows of x:
   one pass, one weight row at a time. More: BF16_MAX_ROWS rows a pass, two weight rows at a time, each pair read
   from memory for the first 8 rows and from L1 for the next. */
__attribute__((target("avx512f,avx512bw"))) void idefix_bf16_matmul(
    const float *x, int64_t rows_x, int64_t k, const uint16_t *w, int64_t n, float *y, int threads) {
    if (rows_x <= 4 || n < 2) {
        for (int64_t i0 = 0; i0 < rows_x; i0 += 4) {
            const int rows = rows_x - i0 < 4 ? (int)(rows_x - i0) : 4;
#pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t r = 0; r < n; r++) {
                float out[4];
                switch (rows) {
                case 1: bf16_row(x + i0 * k, k, w + r * k, out, 1); break;
                case 2: bf16_row(x + i0 * k, k, w + r * k, out, 2); break;
                case 3: bf16_row(x + i0 * k, k, w + r * k, out, 3); break;
                default: bf16_row(x + i0 * k, k, w + r * k, out, 4); break;
                }
                for (int i = 0; i < rows; i++) y[(i0 + i) * n + r] = out[i];
            }
        }
        return;
    }
    for (int64_t i0 = 0; i0 < rows_x; i0 += BF16_MAX_ROWS) {
        const int64_t pass = rows_x - i0 < BF16_MAX_ROWS ? rows_x - i0 : BF16_MAX_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t p = 0; p < (n + 1) / 2; p++) {
            const int64_t r = 2 * p < n - 1 ? 2 * p : n - 2; /* an odd n: the last pair overlaps the one before */
            for (int64_t g = i0; g < i0 + pass; g += 8) {
                const int rows = i0 + pass - g < 8 ? (int)(i0 + pass - g) : 8;
                float out[16];
                switch (rows) {
#define BF16_CASE(c) case c: bf16_pair(x + g * k, k, w + r * k, out, c); break;
                    BF16_CASE(1) BF16_CASE(2) BF16_CASE(3) BF16_CASE(4) BF16_CASE(5) BF16_CASE(6) BF16_CASE(7)
                    default: bf16_pair(x + g * k, k, w + r * k, out, 8); break;
#undef BF16_CASE
                }
                for (int i = 0; i < rows; i++) {
                    y[(g + i) * n + r] = out[i];
                    y[(g + i) * n + r + 1] = out[8 + i];
                }
            }
        }
    }
}

/* x [rows_x, k] fp32, q [n, kp / 2], d and m [n, kp / 32] (fp16 if `half`, else fp32) with kp = k rounded up to
   64, y [rows_x, n]. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void idefix_q4_matmul(
    const float *x, int64_t rows_x, int64_t k, const uint8_t *q, const void *d, const void *m, int64_t n,
    float *y, int threads, int half) {
    const int64_t kp = (k + Q4_PAIR - 1) / Q4_PAIR * Q4_PAIR, blocks = kp / BLOCK;
    int8_t *x8 = aligned_alloc(64, rows_x * kp);
    float *stats = malloc(2 * rows_x * blocks * sizeof(float));
    if (!x8 || !stats) { free(x8); free(stats); for (int64_t i = 0; i < rows_x * n; i++) y[i] = NAN; return; }
    for (int64_t i = 0; i < rows_x; i++) {
        for (int64_t b = 0; b < blocks; b++) {
            float *scale = stats + i * blocks + b, *sum = stats + (rows_x + i) * blocks + b;
            int8_t *out = x8 + i * kp + b * BLOCK;
            if (b * BLOCK >= k) { memset(out, 0, BLOCK); *scale = *sum = 0; continue; }
            const __m512 v0 = _mm512_loadu_ps(x + i * k + b * BLOCK), v1 = _mm512_loadu_ps(x + i * k + b * BLOCK + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const __m512 inv = _mm512_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
            const __m512i r0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), r1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
            _mm_storeu_si128((__m128i *)out, _mm512_cvtepi32_epi8(r0));
            _mm_storeu_si128((__m128i *)(out + 16), _mm512_cvtepi32_epi8(r1));
            *scale = amax / 127.0f;
            /* the sum of the rounded block, so that the offsets see the same x as the nibbles: the result is
               exactly W times the rounded x (exact sums would leave the offsets' share of the error uncancelled) */
            *sum = *scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(r0, r1));
        }
    }
#define Q4_ROW(r, rows, out, half)                                                                         \
    do {                                                                                                    \
        const QuantizedX xq = {x8 + first * kp, stats + first * blocks, stats + (rows_x + first) * blocks}; \
        const int64_t row_at = (r) * blocks * ((half) ? 2 : 4);                                             \
        q4_row(&xq, kp, q + (r) * (kp / 2), (const char *)d + row_at, (const char *)m + row_at, out, rows, half); \
    } while (0)
    FOR_ROWS(half, rows_x, n, threads, first, Q4_ROW)
#undef Q4_ROW
    free(x8);
    free(stats);
}

/* RMSNorm over rows of n: y = w * (x * 1 / sqrt(mean(x^2) + eps)), fp32, in the reference's order of products. */
__attribute__((target("avx512f"))) void idefix_rms_norm(
    const float *x, int64_t rows, int64_t n, const float *w, float eps, float *y, int threads) {
#pragma omp parallel for schedule(static) num_threads(rows >= 64 ? threads : 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 mask = tail_mask(n - j);
            const __m512 v = _mm512_maskz_loadu_ps(mask, xr + j);
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 mask = tail_mask(n - j);
            const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xr + j), inv);
            _mm512_mask_storeu_ps(yr + j, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, w + j), v));
        }
    }
}

/* ---------------------------------------------------------------------------------------------- attention

   The vision tower's attention, fp32 and unmasked (every patch of a full tile): for each sequence b and head h,
   out[i] = sum_j softmax_j(scale * q[i] . k[j]) v[j]. PyTorch's CPU flash kernel reaches about half of a plain
   matmul's rate on SigLIP's shapes (1024 patches, head_dim 64), which made attention a fifth of a tile's time.
   One task is one (sequence, head). K is copied transposed, V row by row, both cut into blocks of ATT_KEYS keys
   that fit L1, and the queries go through ATT_QUERIES rows at a time, so that each block comes from L2 once for
   all of them (with 4 rows a pass, L2's bandwidth set the pace). For each query block: the full score rows, an
   exact softmax (max, exp, sum: the rows are short enough that no running rescale is needed), then the product
   with V. The register blocks are 4 rows x 64 keys or 4 rows x head_dim: 16 to 20 accumulators. */

#define ATT_ROWS 4     /* query rows of a register block */
#define ATT_KEYS 64    /* keys of a K or V block */
#define ATT_QUERIES 32 /* query rows per pass over K and V */

/* e^x in fp32, Cephes' expf polynomial: within 2 ulp; 0 below -103, and e^88 (finite) for anything above 88. */
__attribute__((target("avx512f"), always_inline)) static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-103.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* s[r][j] = qs[r] . k_j for the ATT_QUERIES rows of qs ([ATT_QUERIES][d], already scaled) and all keys [0, tp),
   and each row's maximum over the keys [0, t) into top[r]; kt: K by key block, [tp / ATT_KEYS][d][ATT_KEYS]. */
__attribute__((target("avx512f"))) static void att_scores(const float *qs, const float *kt, int64_t d,
                                                          int64_t tp, int64_t t, float *s, float *top) {
    __m512 m[ATT_QUERIES];
    for (int r = 0; r < ATT_QUERIES; r++) m[r] = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < tp; j += ATT_KEYS) {
        const float *block = kt + j * d;
        for (int r0 = 0; r0 < ATT_QUERIES; r0 += ATT_ROWS) {
            __m512 acc[ATT_ROWS][ATT_KEYS / 16];
            for (int r = 0; r < ATT_ROWS; r++)
                for (int c = 0; c < ATT_KEYS / 16; c++) acc[r][c] = _mm512_setzero_ps();
            for (int64_t e = 0; e < d; e++) {
                __m512 kv[ATT_KEYS / 16];
                for (int c = 0; c < ATT_KEYS / 16; c++) kv[c] = _mm512_load_ps(block + e * ATT_KEYS + 16 * c);
                for (int r = 0; r < ATT_ROWS; r++) {
                    const __m512 qb = _mm512_set1_ps(qs[(r0 + r) * d + e]);
                    for (int c = 0; c < ATT_KEYS / 16; c++) acc[r][c] = _mm512_fmadd_ps(qb, kv[c], acc[r][c]);
                }
            }
            for (int r = 0; r < ATT_ROWS; r++)
                for (int c = 0; c < ATT_KEYS / 16; c++) {
                    _mm512_store_ps(s + (r0 + r) * tp + j + 16 * c, acc[r][c]);
                    m[r0 + r] = _mm512_mask_max_ps(m[r0 + r], tail_mask(t - j - 16 * c), m[r0 + r], acc[r][c]);
                }
        }
    }
    for (int r = 0; r < ATT_QUERIES; r++) top[r] = _mm512_reduce_max_ps(m[r]);
}

/* row[j] = e^(row[j] - top) for j < t, in place; returns their sum (softmax's denominator). */
__attribute__((target("avx512f"))) static float exp_row(float *row, int64_t t, float top) {
    const __m512 shift = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < t; j += 16) {
        const __mmask16 mask = tail_mask(t - j);
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + j), shift));
        _mm512_mask_storeu_ps(row + j, mask, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
    }
    return _mm512_reduce_add_ps(sum);
}

/* o[r] = sum_j p[r][j] v_j for the ATT_QUERIES rows of p [ATT_QUERIES][tp] and keys [0, t); vc: V's rows, dv =
   16 * nv floats apart (zero-padded); o: [ATT_QUERIES][dv]. nv is a constant at each call, so the
   accumulators stay in registers. */
__attribute__((target("avx512f"), always_inline)) static inline void att_values(
    const float *p, int64_t tp, const float *vc, int64_t t, float *o, const int nv) {
    const int64_t dv = 16 * nv;
    for (int64_t j0 = 0; j0 < t; j0 += ATT_KEYS) {
        const int64_t j1 = j0 + ATT_KEYS < t ? j0 + ATT_KEYS : t;
        for (int r0 = 0; r0 < ATT_QUERIES; r0 += ATT_ROWS) {
            __m512 acc[ATT_ROWS][5];
            for (int r = 0; r < ATT_ROWS; r++)
                for (int c = 0; c < nv; c++)
                    acc[r][c] = j0 ? _mm512_load_ps(o + (r0 + r) * dv + 16 * c) : _mm512_setzero_ps();
            for (int64_t j = j0; j < j1; j++) {
                __m512 vv[5];
                for (int c = 0; c < nv; c++) vv[c] = _mm512_load_ps(vc + j * dv + 16 * c);
                for (int r = 0; r < ATT_ROWS; r++) {
                    const __m512 pb = _mm512_set1_ps(p[(r0 + r) * tp + j]);
                    for (int c = 0; c < nv; c++) acc[r][c] = _mm512_fmadd_ps(pb, vv[c], acc[r][c]);
                }
            }
            for (int r = 0; r < ATT_ROWS; r++)
                for (int c = 0; c < nv; c++) _mm512_store_ps(o + (r0 + r) * dv + 16 * c, acc[r][c]);
        }
    }
}

/* q, k, v: [batch, t, heads, d] with token rows `stride` floats apart (e.g. views of projections' outputs);
   out: [batch, t, heads * d] rows `out_stride` apart; 1 <= d <= 80. Returns 0, or -1 when a buffer cannot be
   allocated (out is then incomplete). */
__attribute__((target("avx512f"))) int idefix_attention(const float *q, const float *k, const float *v,
                                                        float *out, int64_t batch, int64_t t, int64_t heads,
                                                        int64_t d, int64_t stride, int64_t out_stride,
                                                        float scale, int threads) {
    const int64_t tp = (t + ATT_KEYS - 1) / ATT_KEYS * ATT_KEYS;
    const int nv = (int)((d + 15) / 16);
    const int64_t dv = 16 * nv;
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t task = 0; task < batch * heads; task++) {
        const int64_t b = task / heads, h = task % heads;
        const float *qb = q + b * t * stride + h * d, *kb = k + b * t * stride + h * d, *vb = v + b * t * stride + h * d;
        /* kt [d * tp], vc [t * dv], s [ATT_QUERIES * tp], o [ATT_QUERIES * dv], qs [ATT_QUERIES * d]: whole lines */
        const size_t floats = (size_t)(d * tp + t * dv + ATT_QUERIES * (tp + dv + d) + 15) / 16 * 16;
        float *kt = aligned_alloc(64, floats * sizeof(float));
        if (!kt) { failed = 1; continue; }
        float *vc = kt + d * tp, *s = vc + t * dv, *o = s + ATT_QUERIES * tp, *qs = o + ATT_QUERIES * dv;
        for (int64_t j0 = 0; j0 < tp; j0 += ATT_KEYS)
            for (int64_t j = j0; j < j0 + ATT_KEYS; j++)
                for (int64_t e = 0; e < d; e++) kt[(j0 * d + e * ATT_KEYS) + j - j0] = j < t ? kb[j * stride + e] : 0.0f;
        for (int64_t j = 0; j < t; j++) {
            memcpy(vc + j * dv, vb + j * stride, d * sizeof(float));
            memset(vc + j * dv + d, 0, (dv - d) * sizeof(float));
        }
        for (int64_t i0 = 0; i0 < t; i0 += ATT_QUERIES) {
            const int rows = t - i0 < ATT_QUERIES ? (int)(t - i0) : ATT_QUERIES;
            for (int r = 0; r < ATT_QUERIES; r++) { /* a short last block repeats its last row */
                const float *row = qb + (i0 + (r < rows ? r : rows - 1)) * stride;
                for (int64_t e = 0; e < d; e++) qs[r * d + e] = row[e] * scale;
            }
            float tops[ATT_QUERIES], sums[ATT_QUERIES];
            att_scores(qs, kt, d, tp, t, s, tops);
            for (int r = 0; r < ATT_QUERIES; r++) sums[r] = exp_row(s + r * tp, t, tops[r]);
            switch (nv) {
            case 1: att_values(s, tp, vc, t, o, 1); break;
            case 2: att_values(s, tp, vc, t, o, 2); break;
            case 3: att_values(s, tp, vc, t, o, 3); break;
            case 4: att_values(s, tp, vc, t, o, 4); break;
            default: att_values(s, tp, vc, t, o, 5); break;
            }
            for (int r = 0; r < rows; r++) {
                const __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
                float *dst = out + (b * t + i0 + r) * out_stride + h * d;
                for (int c = 0; c < nv; c++)
                    _mm512_mask_storeu_ps(dst + 16 * c, tail_mask(d - 16 * c), _mm512_mul_ps(_mm512_load_ps(o + r * dv + 16 * c), inv));
            }
        }
        free(kt);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------- GELU

   The vision MLP's bias and activation in one pass over fc1's product, in place: x = gelu(x + bias) with the
   tanh approximation, written as z * sigmoid(2u) = z / (1 + e^(-2u)), u = sqrt(2 / pi) (z + 0.044715 z^3), which
   equals 0.5 z (1 + tanh(u)) and stays exact in the tails. PyTorch does the bias (a copy before the product) and
   the activation (another pass) separately, over an output too large for the caches. */
__attribute__((target("avx512f"))) void idefix_bias_gelu_tanh(float *x, int64_t rows, int64_t n, const float *bias,
                                                              int threads) {
#pragma omp parallel for schedule(static) num_threads(rows >= 64 ? threads : 1)
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * n;
        for (int64_t j = 0; j < n; j += 16) {
            const __mmask16 mask = tail_mask(n - j);
            const __m512 z = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, xr + j), _mm512_maskz_loadu_ps(mask, bias + j));
            const __m512 z3 = _mm512_mul_ps(_mm512_mul_ps(z, z), z);
            const __m512 u = _mm512_mul_ps(_mm512_fmadd_ps(z3, _mm512_set1_ps(0.044715f), z),
                                           _mm512_set1_ps(-1.5957691216057308f)); /* -2 sqrt(2 / pi) */
            /* 1 / (1 + e): a 14-bit reciprocal and one Newton step (a division would cost more than the rest) */
            const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(u));
            const __m512 r14 = _mm512_rcp14_ps(den);
            const __m512 inv = _mm512_mul_ps(r14, _mm512_fnmadd_ps(den, r14, _mm512_set1_ps(2.0f)));
            const __m512 g = _mm512_mul_ps(z, inv);
            _mm512_mask_storeu_ps(xr + j, mask, g);
        }
    }
}

/* ---------------------------------------------------------------------------------------------- decode attention

   One query row per sequence against its slot's first ctx cached keys, for the decode steps whose rows fill a
   range of slots and share one context length (batch 1 among them); PyTorch's sdpa costs ~29 us a layer there for
   a few thousand multiply-adds. Grouped-query: query head h reads kv head h / (heads / kv_heads). Exact softmax.
   Keys go 16 at a time: their 16 dot products are summed across lanes together (`sum16`, ~3 instructions a key
   instead of a full reduction each), and V is read once, row by row. After an image prompt (~1200 positions on
   SmolVLM) attention is a quarter of a decode step, so this matters there.
   q: [batch, heads, d] with rows q_stride floats apart and heads side by side; k_pool, v_pool: [slots, kv_heads,
   max_len, d] contiguous, row b in slot first_slot + b; out: [batch, heads, d] contiguous. Returns 0, or -1 when a
   buffer cannot be allocated. */

/* The lane sums of v[0..15] as one vector: lane i = the sum of v[i]'s 16 lanes. */
__attribute__((target("avx512f"), always_inline)) static inline __m512 sum16(const __m512 v[16]) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: (a0 + a2, b0 + b2, a1 + a3, b1 + b3) of v[2i], v[2i + 1] */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: that lane's sums of v[4i], ..., v[4i + 3] */
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* then the four 128-bit lanes of each u[i] summed into lane block i */
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}

__attribute__((target("avx512f"))) int idefix_decode_attention(
    const float *q, int64_t q_stride, const float *k_pool, const float *v_pool, int64_t first_slot, int64_t batch,
    int64_t heads, int64_t kv_heads, int64_t max_len, int64_t ctx, int64_t d, float scale, float *out, int threads) {
    const int64_t group = heads / kv_heads;
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(batch * heads * ctx * d >= (1 << 16) ? threads : 1)
    for (int64_t task = 0; task < batch * heads; task++) {
        const int64_t b = task / heads, h = task % heads;
        const float *qr = q + b * q_stride + h * d;
        const int64_t base = ((first_slot + b) * kv_heads + h / group) * max_len * d;
        const float *keys = k_pool + base, *values = v_pool + base;
        float *scores = malloc((size_t)(ctx + 15) / 16 * 16 * sizeof(float));
        if (!scores) { failed = 1; continue; }
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t j0 = 0; j0 < ctx; j0 += 16) {
            __m512 dots[16];
            for (int i = 0; i < 16; i++) {
                const float *key = keys + (j0 + i < ctx ? j0 + i : j0) * d; /* past ctx: a repeat, masked below */
                __m512 dot = _mm512_setzero_ps();
                for (int64_t e = 0; e < d; e += 16) {
                    const __mmask16 m = tail_mask(d - e);
                    dot = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qr + e), _mm512_maskz_loadu_ps(m, key + e), dot);
                }
                dots[i] = dot;
            }
            const __m512 block = _mm512_mul_ps(sum16(dots), _mm512_set1_ps(scale));
            const __mmask16 live = tail_mask(ctx - j0);
            _mm512_storeu_ps(scores + j0, block);
            top = _mm512_mask_max_ps(top, live, top, block);
        }
        const float inv = 1.0f / exp_row(scores, ctx, _mm512_reduce_max_ps(top));
        /* o = sum_j p_j v_j in one pass over V: up to 5 vectors of d, two sets of accumulators (even and odd keys) */
        const int nv = (int)((d + 15) / 16);
        __m512 acc[2][5];
        for (int c = 0; c < 5; c++) acc[0][c] = acc[1][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < ctx; j++) {
            const __m512 p = _mm512_set1_ps(scores[j]);
            for (int c = 0; c < nv && c < 5; c++)
                acc[j & 1][c] = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(tail_mask(d - 16 * c), values + j * d + 16 * c), acc[j & 1][c]);
        }
        float *o = out + (b * heads + h) * d;
        for (int c = 0; c < nv && c < 5; c++)
            _mm512_mask_storeu_ps(o + 16 * c, tail_mask(d - 16 * c), _mm512_mul_ps(_mm512_add_ps(acc[0][c], acc[1][c]), _mm512_set1_ps(inv)));
        for (int64_t e = 80; e < d; e += 16) { /* head_dim past 80 (not in this family): the same, a vector at a time */
            const __mmask16 m = tail_mask(d - e);
            __m512 rest = _mm512_setzero_ps();
            for (int64_t j = 0; j < ctx; j++) rest = _mm512_fmadd_ps(_mm512_set1_ps(scores[j]), _mm512_maskz_loadu_ps(m, values + j * d + e), rest);
            _mm512_mask_storeu_ps(o + e, m, _mm512_mul_ps(rest, _mm512_set1_ps(inv)));
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------- decode stack

   A weight as the product kernels above read it, so that one entry point serves them all and the decode stack
   below can hold a layer's four products whatever their kind. */
enum { LINEAR_BF16 = 1, LINEAR_Q8_0 = 2, LINEAR_Q4 = 3 };

typedef struct {
    int64_t kind;
    const void *q;        /* bf16 w [n, k]; int8 q [n, k]; 4-bit q [n, kp / 2] */
    const void *d, *m;    /* per-block scales and offsets (m may be NULL for int8); unused for bf16 */
    int64_t n, k, half;   /* half: the 4-bit kind's d and m are fp16 */
} Linear;

/* y [rows, w->n] = x [rows, w->k] @ W^T. */
void idefix_linear(const Linear *w, const float *x, int64_t rows, float *y, int threads) {
    switch (w->kind) {
    case LINEAR_BF16: idefix_bf16_matmul(x, rows, w->k, w->q, w->n, y, threads); break;
    case LINEAR_Q8_0: idefix_q8_0_matmul(x, rows, w->k, w->q, w->d, w->m, w->n, y, threads); break;
    default: idefix_q4_matmul(x, rows, w->k, w->q, w->d, w->m, w->n, y, threads, (int)w->half); break;
    }
}

/* One Llama decoder layer's weights as the decode stack runs them: RMSNorm weights, the merged q/k/v and gate/up
   products. */
typedef struct {
    const float *input_norm, *post_norm;
    Linear qkv, o, gate_up, down;
} DecodeLayer;

/* Rows of (a, b) -> a + b, over n floats each, into a. */
__attribute__((target("avx512f"))) static void add_into(float *a, const float *b, int64_t n) {
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = tail_mask(n - j);
        _mm512_mask_storeu_ps(a + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j)));
    }
}

/* x * cos + roll(x, d / 2) * signed_sin for one head of d floats (d even) in place: the Python path's rotary,
   rounding for rounding (two products and a sum). */
static void rotate_head(float *x, const float *cos, const float *ssin, int64_t d, float *tmp) {
    const int64_t half = d / 2;
    for (int64_t e = 0; e < half; e++) tmp[e] = x[e] * cos[e] + x[e + half] * ssin[e];
    for (int64_t e = half; e < d; e++) tmp[e] = x[e] * cos[e] + x[e - half] * ssin[e];
    memcpy(x, tmp, d * sizeof(float));
}

/* act[r] = silu(gate[r]) * up[r], gate and up side by side in gu's rows [rows, 2 * inter]. */
__attribute__((target("avx512f"))) static void silu_mul(const float *gu, int64_t rows, int64_t inter, float *act,
                                                        int threads) {
#pragma omp parallel for schedule(static) num_threads(rows >= 16 ? threads : 1)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gu + r * 2 * inter, *u = g + inter;
        for (int64_t j = 0; j < inter; j += 16) {
            const __mmask16 m = tail_mask(inter - j);
            const __m512 x = _mm512_maskz_loadu_ps(m, g + j);
            const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x))));
            _mm512_mask_storeu_ps(act + r * inter + j, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + j)));
        }
    }
}

/* The decoder layers of one decode step in one call, for steps whose rows fill slots first_slot .. first_slot +
   rows - 1 and share one context length ctx (the new token at position ctx - 1): per layer x += o(attend(rotary(
   qkv(norm(x))))), then x += down(silu(gate) * up(norm(x))). Through Python that is ~25 calls a layer, and their
   overhead (~7 ms a step for SmolVLM-256M's 30 layers) was as large as the weights' own streaming.
   k_pools, v_pools: each layer's K and V, [slots, kv_heads, max_len, d]; x: [rows, hidden] in place; cos, ssin:
   [rows, d] (Rotary's tables); scratch: rows * (2 hidden + (heads + 2 kv_heads) d + heads d + 3 inter) + d floats,
   the caller's, kept from call to call (a fresh buffer of that size each step came from the OS each time, when
   glibc had just trimmed the heap: 25 -> 37 ms a step at x16). Returns 0, or -1 when the attention cannot allocate
   its buffer (x is then incomplete). */
__attribute__((target("avx512f"))) int idefix_decode_layers(
    const DecodeLayer *layers, float *const *k_pools, float *const *v_pools, int64_t n_layers, float *x,
    int64_t rows, int64_t hidden, int64_t heads, int64_t kv_heads, int64_t d, int64_t inter, const float *cos,
    const float *ssin, int64_t first_slot, int64_t max_len, int64_t ctx, float eps, float *scratch, int threads) {
    const int64_t width = (heads + 2 * kv_heads) * d;
    float *h = scratch;
    float *qkv = h + rows * hidden, *att = qkv + rows * width, *gu = att + rows * heads * d, *act = gu + rows * 2 * inter;
    float *y = act + rows * inter, *tmp = y + rows * hidden;
    const float scale = (float)(1.0 / sqrt((double)d));
    int failed = 0;
    for (int64_t l = 0; l < n_layers && !failed; l++) {
        const DecodeLayer *layer = layers + l;
        idefix_rms_norm(x, rows, hidden, layer->input_norm, eps, h, threads);
        idefix_linear(&layer->qkv, h, rows, qkv, threads);
        for (int64_t r = 0; r < rows; r++) {
            float *row = qkv + r * width;
            for (int64_t j = 0; j < heads + kv_heads; j++) rotate_head(row + j * d, cos + r * d, ssin + r * d, d, tmp);
            for (int64_t j = 0; j < kv_heads; j++) {
                const int64_t at = (((first_slot + r) * kv_heads + j) * max_len + ctx - 1) * d;
                memcpy(k_pools[l] + at, row + (heads + j) * d, d * sizeof(float));
                memcpy(v_pools[l] + at, row + (heads + kv_heads + j) * d, d * sizeof(float));
            }
        }
        failed = idefix_decode_attention(qkv, width, k_pools[l], v_pools[l], first_slot, rows, heads, kv_heads,
                                         max_len, ctx, d, scale, att, threads);
        idefix_linear(&layer->o, att, rows, y, threads);
        add_into(x, y, rows * hidden);
        idefix_rms_norm(x, rows, hidden, layer->post_norm, eps, h, threads);
        idefix_linear(&layer->gate_up, h, rows, gu, threads);
        silu_mul(gu, rows, inter, act, threads);
        idefix_linear(&layer->down, act, rows, y, threads);
        add_into(x, y, rows * hidden);
    }
    return failed ? -1 : 0;
}
