/*
 * Compiled CPU kernels for products of Givens rotations (kama-nn).
 *
 * The batch x (N, d), row-major, is cut into tiles of T consecutive rows. Each tile is transposed into a
 * feature-major buffer (d x T, the T batch columns of one feature contiguous), then the rotations run in
 * sequence over the buffer: rotation r mixes feature rows i_r and j_r, T lanes at a time (SIMD across the
 * batch). Tiles are independent: threads take contiguous ranges of tiles.
 *
 * Rotations arrive in product order (G_1 ... G_k) with c_r = cos t_r, s_r = sin t_r; M x applies them from
 * r = k-1 down to 0, M^T x from r = 0 up with s negated. Each applied rotation is
 *     v_i <- c v_i - s v_j,     v_j <- s v_i + c v_j.
 * Backward walks them in reverse from the saved output: the angle gradient sum_b (g_j v_i - g_i v_j) is
 * accumulated (in double) per thread, then the inverse rotation recovers the input and rotates the gradient.
 *
 * No torch headers: the bindings take torch.Tensor objects and check their dtype, device, contiguity and size
 * against the call before reading their memory. Every index is checked against d before any data is touched
 * (a Python error, never an out-of-bounds access).
 */
#define _GNU_SOURCE /* dlfcn.h's RTLD_NOLOAD (use_openmp) */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KAMA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KAMA_CLONES
#endif

struct kama_blocks;

typedef struct {
    const void *x;        /* (N, d) input, row-major */
    void *y;              /* (N, d) output */
    const void *gy;       /* backward: (N, d) gradient of the output */
    void *gx;             /* backward: (N, d) gradient of the input */
    double *gacc;         /* backward: (nthreads, k) angle-gradient accumulators */
    const int32_t *ij;    /* (k, 2) pairs (i, j), in product order */
    const void *cs;       /* (k, 2) cos and sin of the angles, interleaved */
    const void *scale;    /* forward: optional (d,) factors applied to the output coordinates, or NULL */
    /* fused KamaLinear (lin_*): x (N, in_f), out (N, out_f), y = saved rotated state (N, d), bias, scale */
    const void *bias;
    int64_t in_f, out_f;
    double *lacc;         /* lin backward: (nthreads, k + min(in_f, out_f) + out_f) accumulators */
    int64_t n, d, k;
    int transpose;        /* 0: apply r = k-1 .. 0 (M x); 1: r = 0 .. k-1 with s negated (M^T x) */
    double sgn;           /* sign applied to s (-1 for the transpose) */
    int64_t tile;         /* T */
    const struct kama_blocks *blocks; /* register-blocked plans: their groups (the pairs' first rotations: the tail) */
    int prefetch;         /* rotations ahead to prefetch (-1: the built-in rule) */
    int wide;             /* 1: the 512-bit loops (kama_wide_ok), 0: the portable ones */
    int64_t t_begin, t_end; /* tile range of this worker */
    int thread_id;
    int status;
} job_t;

/* ---------------------------------------------------------------------------------------------------- */
/* Tile buffers: reused across calls. A fresh multi-100-KiB buffer per call is served by mmap and costs a */
/* page fault per 4 KiB on first touch, taken under the address-space lock: threads then stop scaling.    */
/* ---------------------------------------------------------------------------------------------------- */

#define POOL_MAX 128
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static void *pool_buf[POOL_MAX];
static size_t pool_len[POOL_MAX];
static int pool_n = 0;

static void *buf_get(size_t bytes) {
    void *p = NULL;
    pthread_mutex_lock(&pool_lock);
    for (int i = pool_n - 1; i >= 0; --i) {
        if (pool_len[i] >= bytes) {
            p = pool_buf[i];
            pool_buf[i] = pool_buf[pool_n - 1];
            pool_len[i] = pool_len[pool_n - 1];
            --pool_n;
            break;
        }
    }
    pthread_mutex_unlock(&pool_lock);
    if (!p) p = aligned_alloc(64, (bytes + 63) / 64 * 64);
    return p;
}

static void buf_put(void *p, size_t bytes) {
    if (!p) return;
    pthread_mutex_lock(&pool_lock);
    if (pool_n < POOL_MAX) {
        pool_buf[pool_n] = p;
        pool_len[pool_n] = (bytes + 63) / 64 * 64;
        ++pool_n;
        p = NULL;
    }
    pthread_mutex_unlock(&pool_lock);
    free(p);
}

/* ---------------------------------------------------------------------------------------------------- */
/* cos / sin of the angles, and the tile transposes                                                     */
/* ---------------------------------------------------------------------------------------------------- */

/* cos and sin of a block of angles, in double precision, branch-free so that the compiler vectorizes it (the
 * libm calls cost ~20 ns each: 1.6 ms for the 35k angles of a d = 1024 product). x = n pi/2 + r with
 * n = round(2x / pi) (by adding and subtracting 1.5 * 2^52) and r reduced by a three-part (Cody-Waite) pi/2 whose first two parts have trailing zero
 * bits, so n * part is exact for |n| < 2^20; |r| <= pi/4, where the Taylor series to r^17 (sin) and r^18
 * (cos) are exact to double rounding (next terms < 1e-19). The quadrant n mod 4 swaps and negates. Blocks
 * holding an angle with |x| >= 1e5 (or a NaN / infinity) use libm for every element. */
#define SINCOS_BLOCK 256
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-associative-math") /* the build's -fassociative-math would fold the reduction */
#endif
KAMA_CLONES static void sincos_block(const double *x, double *c, double *s, int64_t m) {
#if defined(__clang__)
#pragma clang fp reassociate(off)
#endif
    int ok = 1;
    for (int64_t r = 0; r < m; ++r) ok &= fabs(x[r]) < 1e5;
    if (!ok) {
        for (int64_t r = 0; r < m; ++r) { c[r] = cos(x[r]); s[r] = sin(x[r]); }
        return;
    }
    const double two_over_pi = 0.63661977236758134308;
    const double p1 = 1.57079632673412561417e+00, p2 = 6.07710050630396597660e-11,
                 p3 = 2.02226624879595063154e-21;
    for (int64_t i = 0; i < m; ++i) {
        double n = (x[i] * two_over_pi + 6755399441055744.0) - 6755399441055744.0; /* round to nearest: 1.5 2^52 */
        double r = ((x[i] - n * p1) - n * p2) - n * p3;
        double z = r * r;
        double sp = r + r * z * (-1.0 / 6 + z * (1.0 / 120 + z * (-1.0 / 5040 + z * (1.0 / 362880 + z * (
            -1.0 / 39916800 + z * (1.0 / 6227020800.0 + z * (-1.0 / 1307674368000.0 + z * (
            1.0 / 355687428096000.0)))))))); /* 3!, 5!, ..., 17! */
        double cp = 1.0 + z * (-0.5 + z * (1.0 / 24 + z * (-1.0 / 720 + z * (1.0 / 40320 + z * (
            -1.0 / 3628800 + z * (1.0 / 479001600 + z * (-1.0 / 87178291200.0 + z * (
            1.0 / 20922789888000.0 + z * (-1.0 / 6402373705728000.0))))))))); /* 2!, ..., 18! */
        int64_t q = (int64_t)n & 3;
        double sv = (q & 1) ? cp : sp, cv = (q & 1) ? sp : cp;
        s[i] = (q & 2) ? -sv : sv;
        c[i] = ((q + 1) & 2) ? -cv : cv;
    }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

/* Tile transposes between the row-major batch (rows n0 .. n0 + rows of x, d features each) and a tile buffer
 * stored feature-major, buf[f * T + t]. One row at a time, every store into the tile would land on a different
 * cache line, T floats apart; so they run over 8 x 8 blocks: on CPUs with AVX each block is transposed in
 * registers (unpack / shuffle / lane permute), else through a small array, and every cache line of the tile
 * and of the batch is written whole while it is in L1. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define KAMA_HAVE_AVX_TRANSPOSE 1
/* dst[c * ds + r] = src[r * ss + c] for an 8 x 8 block of floats */
__attribute__((target("avx"))) static inline void tr8x8_avx(const float *src, int64_t ss, float *dst, int64_t ds) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + ss), r2 = _mm256_loadu_ps(src + 2 * ss),
           r3 = _mm256_loadu_ps(src + 3 * ss), r4 = _mm256_loadu_ps(src + 4 * ss), r5 = _mm256_loadu_ps(src + 5 * ss),
           r6 = _mm256_loadu_ps(src + 6 * ss), r7 = _mm256_loadu_ps(src + 7 * ss);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
           t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
           t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)), s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
           s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)), s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)),
           s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0)), s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2)),
           s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0)), s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(dst + ds, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(dst + 2 * ds, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(dst + 3 * ds, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(dst + 4 * ds, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(dst + 5 * ds, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(dst + 6 * ds, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(dst + 7 * ds, _mm256_permute2f128_ps(s3, s7, 0x31));
}
static int have_avx(void) {
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("avx") ? 1 : 0;
    return cached;
}
#else
#define KAMA_HAVE_AVX_TRANSPOSE 0
#endif

#define DEFINE_BLOCK(TYPE, SUFFIX)                                                                          \
    /* dst[c * ds + r] = src[r * ss + c] for an 8 x 8 block */                                              \
    static inline void tr8x8_##SUFFIX(const TYPE *restrict src, int64_t ss, TYPE *restrict dst, int64_t ds) { \
        TYPE blk[8][8];                                                                                     \
        for (int r = 0; r < 8; ++r)                                                                         \
            for (int c = 0; c < 8; ++c) blk[c][r] = src[r * ss + c];                                        \
        for (int c = 0; c < 8; ++c)                                                                         \
            for (int r = 0; r < 8; ++r) dst[c * ds + r] = blk[c][r];                                        \
    }
DEFINE_BLOCK(float, f32)
DEFINE_BLOCK(double, f64)

static inline void tr8x8_fast_f32(const float *src, int64_t ss, float *dst, int64_t ds, int avx) {
#if KAMA_HAVE_AVX_TRANSPOSE
    if (avx) { tr8x8_avx(src, ss, dst, ds); return; }
#endif
    (void)avx;
    tr8x8_f32(src, ss, dst, ds);
}
static inline void tr8x8_fast_f64(const double *src, int64_t ss, double *dst, int64_t ds, int avx) {
    (void)avx;
    tr8x8_f64(src, ss, dst, ds);
}
static inline int use_avx(void) {
#if KAMA_HAVE_AVX_TRANSPOSE
    return have_avx();
#else
    return 0;
#endif
}

/* Features per strip of the tile transposes: each batch row is read (written) 128 features, 8 cache  */
/* lines, at a time. On a Zen 5 (the transposes alone, float32, batch 1024, d = 1024 and 4096, 32-64  */
/* columns) loads took 0.64-0.90x the time of 16-feature strips and stores 0.68-0.82x that of batch   */
/* rows outer; 64-feature strips made the stores 2x slower.                                          */
#define IO_STRIP 128
#define DEFINE_IO(TYPE, SUFFIX)                                                                             \
    /* buf[f * T + t] = x[(n0 + t) * ld + f] for f < cols, t < rows; rows rows .. T - 1 of those features  \
     * are zeroed (features cols .. d - 1 are the caller's). */                                            \
    static void load_cols_##SUFFIX(TYPE *restrict buf, const TYPE *restrict x, int64_t n0, int64_t rows,   \
                                   int64_t cols, int64_t ld, int64_t T) {                                  \
        const int avx = use_avx();                                                                         \
        /* features outer, IO_STRIP at a time, batch rows inner: the strip's tile rows are complete in L1  \
         * before the next strip (batch rows outer wrote each tile line in parts, evicted between them:    \
         * 1.7-2.3x slower at T = 32 .. 128 on the Intel Xeon) */                                          \
        const int64_t t8 = T >= 8 ? rows - rows % 8 : 0, c8 = cols - cols % 8;                             \
        for (int64_t s0 = 0; s0 < c8; s0 += IO_STRIP) {                                                    \
            const int64_t s1 = s0 + IO_STRIP < c8 ? s0 + IO_STRIP : c8;                                    \
            for (int64_t t0 = 0; t0 < t8; t0 += 8)                                                         \
                for (int64_t f0 = s0; f0 < s1; f0 += 8)                                                    \
                    tr8x8_fast_##SUFFIX(x + (n0 + t0) * ld + f0, ld, buf + f0 * T + t0, T, avx);           \
        }                                                                                                  \
        for (int64_t f0 = c8; f0 < cols; ++f0)                                                             \
            for (int64_t t = 0; t < t8; ++t) buf[f0 * T + t] = x[(n0 + t) * ld + f0];                      \
        for (int64_t t = t8; t < rows; ++t) {                                                              \
            const TYPE *src = x + (n0 + t) * ld;                                                           \
            for (int64_t f = 0; f < cols; ++f) buf[f * T + t] = src[f];                                    \
        }                                                                                                  \
        if (rows < T)                                                                                      \
            for (int64_t f = 0; f < cols; ++f)                                                             \
                for (int64_t t = rows; t < T; ++t) buf[f * T + t] = 0;                                     \
    }                                                                                                      \
    /* y[(n0 + t) * ld + f] = buf[f * T + t] (* scale[f]) (+ bias[f]) for f < cols, t < rows, in the       \
     * strips of load_cols */                                                                              \
    static void store_cols_##SUFFIX(TYPE *restrict y, const TYPE *restrict buf, int64_t n0, int64_t rows,  \
                                    int64_t cols, int64_t ld, int64_t T, const TYPE *restrict scale,       \
                                    const TYPE *restrict bias) {                                           \
        const int avx = use_avx();                                                                         \
        const int64_t t8 = T >= 8 ? rows - rows % 8 : 0, c8 = cols - cols % 8;                             \
        for (int64_t s0 = 0; s0 < c8; s0 += IO_STRIP) {                                                    \
            const int64_t s1 = s0 + IO_STRIP < c8 ? s0 + IO_STRIP : c8;                                    \
            for (int64_t t0 = 0; t0 < t8; t0 += 8)                                                         \
                for (int64_t f0 = s0; f0 < s1; f0 += 8) {                                                  \
                    TYPE *dst = y + (n0 + t0) * ld + f0;                                                   \
                    tr8x8_fast_##SUFFIX(buf + f0 * T + t0, T, dst, ld, avx);                               \
                    if (scale)                                                                             \
                        for (int64_t t = 0; t < 8; ++t)                                                    \
                            for (int64_t f = 0; f < 8; ++f) dst[t * ld + f] *= scale[f0 + f];              \
                    if (bias)                                                                              \
                        for (int64_t t = 0; t < 8; ++t)                                                    \
                            for (int64_t f = 0; f < 8; ++f) dst[t * ld + f] += bias[f0 + f];               \
                }                                                                                          \
        }                                                                                                  \
        for (int64_t t = 0; t < t8; ++t)                                                                   \
            for (int64_t f0 = c8; f0 < cols; ++f0) {                                                       \
                TYPE v = buf[f0 * T + t];                                                                  \
                if (scale) v *= scale[f0];                                                                 \
                y[(n0 + t) * ld + f0] = bias ? v + bias[f0] : v;                                           \
            }                                                                                              \
        for (int64_t t = t8; t < rows; ++t) {                                                              \
            TYPE *dst = y + (n0 + t) * ld;                                                                 \
            for (int64_t f = 0; f < cols; ++f) {                                                           \
                TYPE v = buf[f * T + t];                                                                   \
                if (scale) v *= scale[f];                                                                  \
                dst[f] = bias ? v + bias[f] : v;                                                           \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
    static void load_##SUFFIX(TYPE *restrict buf, const TYPE *restrict x, int64_t n0, int64_t rows,        \
                              int64_t d, int64_t T) {                                                      \
        load_cols_##SUFFIX(buf, x, n0, rows, d, d, T);                                                     \
    }                                                                                                      \
    static void store_##SUFFIX(TYPE *restrict y, const TYPE *restrict buf, int64_t n0, int64_t rows,       \
                               int64_t d, int64_t T, const TYPE *restrict scale) {                         \
        store_cols_##SUFFIX(y, buf, n0, rows, d, d, T, scale, NULL);                                       \
    }

DEFINE_IO(float, f32)
DEFINE_IO(double, f64)

/* ---------------------------------------------------------------------------------------------------- */
/* The rotation loops, specialised for a compile-time tile width                                         */
/* ---------------------------------------------------------------------------------------------------- */

/* pf > 0: prefetch the rows of the rotation pf ahead (tiles larger than the L2: their rows come from L3, at */
/* random, which the hardware prefetchers cannot predict).                                                 */
#define PREFETCH_ROWS(BASE, IDX, T, TYPE)                                                                   \
    do {                                                                                                    \
        const char *p_ = (const char *)((BASE) + (int64_t)(IDX) * (T));                                     \
        for (int o_ = 0; o_ < (int)((T) * sizeof(TYPE)); o_ += 64) __builtin_prefetch(p_ + o_, 1, 3);       \
    } while (0)

/* The start of rotation q of a walk over a (d, T) tile: its product index r (reversed for the transpose), the
 * rows pf rotations ahead prefetched, its rows' pointers and its cos / sin (s signed for the transpose). */
#define FWD_ROTATION_ROWS(TYPE, T)                                                                          \
    const int64_t r = transpose ? q : k - 1 - q;                                                            \
    if (pf && q + pf < k) {                                                                                 \
        const int64_t rp = transpose ? r + pf : r - pf;                                                     \
        PREFETCH_ROWS(buf, ij[2 * rp], T, TYPE);                                                            \
        PREFETCH_ROWS(buf, ij[2 * rp + 1], T, TYPE);                                                        \
    }                                                                                                       \
    TYPE *restrict a = buf + (int64_t)ij[2 * r] * T;                                                        \
    TYPE *restrict b = buf + (int64_t)ij[2 * r + 1] * T;                                                    \
    const TYPE c = cs[2 * r], s = sgn * cs[2 * r + 1];
/* the same for the backward's two tiles (saved output vb_, gradient gb_), walked from the last rotation */
#define BWD_ROTATION_ROWS(TYPE, T)                                                                          \
    const int64_t r = transpose ? q : k - 1 - q;                                                            \
    if (pf && q - pf >= 0) {                                                                                \
        const int64_t rp = transpose ? r - pf : r + pf;                                                     \
        PREFETCH_ROWS(vb_, ij[2 * rp], T, TYPE);                                                            \
        PREFETCH_ROWS(vb_, ij[2 * rp + 1], T, TYPE);                                                        \
        PREFETCH_ROWS(gb_, ij[2 * rp], T, TYPE);                                                            \
        PREFETCH_ROWS(gb_, ij[2 * rp + 1], T, TYPE);                                                        \
    }                                                                                                       \
    const int64_t i_ = ij[2 * r], j_ = ij[2 * r + 1];                                                       \
    TYPE *restrict va = vb_ + i_ * T;                                                                       \
    TYPE *restrict vb = vb_ + j_ * T;                                                                       \
    TYPE *restrict ga = gb_ + i_ * T;                                                                       \
    TYPE *restrict gb = gb_ + j_ * T;                                                                       \
    const TYPE c = cs[2 * r], s = sgn * cs[2 * r + 1];

typedef float nvec_f32 __attribute__((vector_size(32), aligned(4), may_alias));
typedef double nvec_f64 __attribute__((vector_size(32), aligned(8), may_alias));
#define NVEC_f32 8
#define NVEC_f64 4
/* lane sums by halving (a shuffle tree: log2(lanes) adds instead of a serial chain per rotation) */
static inline float nvec_sum_f32(nvec_f32 v) {
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6);
    return v[0];
}
static inline double nvec_sum_f64(nvec_f64 v) {
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2);
    return v[0];
}

#define DEFINE_KERNELS(TYPE, SUFFIX, T)                                                                     \
    KAMA_CLONES static void fwd_##SUFFIX##_##T(TYPE *restrict buf, const int32_t *restrict ij,              \
                                               const TYPE *restrict cs, int64_t k, int transpose, TYPE sgn, \
                                               int pf) {                                                    \
        for (int64_t q = 0; q < k; ++q) {                                                                   \
            FWD_ROTATION_ROWS(TYPE, T)                                                                      \
            /* whole 32-byte vectors written out: GCC does not trust restrict on these block-scope pointers   \
             * and would check for overlap at every rotation (3x slower at T = 16, 32) */                     \
            int t = 0;                                                                                      \
            for (; t + NVEC_##SUFFIX <= T; t += NVEC_##SUFFIX) {                                            \
                const nvec_##SUFFIX va = *(const nvec_##SUFFIX *)(a + t), vb = *(const nvec_##SUFFIX *)(b + t); \
                *(nvec_##SUFFIX *)(a + t) = c * va - s * vb;                                                \
                *(nvec_##SUFFIX *)(b + t) = s * va + c * vb;                                                \
            }                                                                                               \
            for (; t < T; ++t) {                                                                            \
                const TYPE va = a[t], vb = b[t];                                                            \
                a[t] = c * va - s * vb;                                                                     \
                b[t] = s * va + c * vb;                                                                     \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    KAMA_CLONES static void bwd_##SUFFIX##_##T(TYPE *restrict vb_, TYPE *restrict gb_,                      \
                                               const int32_t *restrict ij, const TYPE *restrict cs,         \
                                               int64_t k, int transpose, TYPE sgn, double *restrict gacc,   \
                                               int pf) {                                                    \
        for (int64_t q = k - 1; q >= 0; --q) {                                                              \
            BWD_ROTATION_ROWS(TYPE, T)                                                                      \
            TYPE acc = 0;                                                                                   \
            for (int t = 0; t < T; ++t) {                                                                   \
                const TYPE a1 = va[t], b1 = vb[t], a2 = ga[t], b2 = gb[t];                                  \
                acc += b2 * a1 - a2 * b1;                                                                   \
                va[t] = c * a1 + s * b1;                                                                    \
                vb[t] = c * b1 - s * a1;                                                                    \
                ga[t] = c * a2 + s * b2;                                                                    \
                gb[t] = c * b2 - s * a2;                                                                    \
            }                                                                                               \
            gacc[r] += (double)acc;                                                                         \
        }                                                                                                   \
    }

#define DEFINE_ALL_T(TYPE, SUFFIX)                                                                          \
    DEFINE_KERNELS(TYPE, SUFFIX, 1)                                                                         \
    DEFINE_KERNELS(TYPE, SUFFIX, 2)                                                                         \
    DEFINE_KERNELS(TYPE, SUFFIX, 4)                                                                         \
    DEFINE_KERNELS(TYPE, SUFFIX, 8)                                                                         \
    DEFINE_KERNELS(TYPE, SUFFIX, 16)                                                                        \
    DEFINE_KERNELS(TYPE, SUFFIX, 32)                                                                        \
    DEFINE_KERNELS(TYPE, SUFFIX, 64)                                                                        \
    DEFINE_KERNELS(TYPE, SUFFIX, 128)

DEFINE_ALL_T(float, f32)
DEFINE_ALL_T(double, f64)

/* The backward with its vectors written out (tiles of at least 256 features: MIN_TUNED_DIM in kama.ops.tuning). */
/* RL-size tiles keep bwd_*: their angle gradients sum in the vectorizer's order, the same bits as before.    */
#define DEFINE_VEC_BWD(ATTR, PFX, VT, LANES, TYPE, SUFFIX, T)                                               \
    ATTR static void PFX##bwd_##SUFFIX##_##T(TYPE *restrict vb_, TYPE *restrict gb_,                       \
                                              const int32_t *restrict ij, const TYPE *restrict cs,          \
                                              int64_t k, int transpose, TYPE sgn, double *restrict gacc,    \
                                              int pf) {                                                     \
        typedef VT##_##SUFFIX wv;                                                                           \
        for (int64_t q = k - 1; q >= 0; --q) {                                                              \
            BWD_ROTATION_ROWS(TYPE, T)                                                                      \
            wv acc = {0};                                                                                   \
            for (int t = 0; t < T; t += LANES##_##SUFFIX) {                                                  \
                const wv a1 = *(const wv *)(va + t), b1 = *(const wv *)(vb + t);                            \
                const wv a2 = *(const wv *)(ga + t), b2 = *(const wv *)(gb + t);                            \
                acc += b2 * a1 - a2 * b1;                                                                   \
                *(wv *)(va + t) = c * a1 + s * b1;                                                          \
                *(wv *)(vb + t) = c * b1 - s * a1;                                                          \
                *(wv *)(ga + t) = c * a2 + s * b2;                                                          \
                *(wv *)(gb + t) = c * b2 - s * a2;                                                          \
            }                                                                                               \
            gacc[r] += (double)VT##_sum_##SUFFIX(acc);                                                      \
        }                                                                                                   \
    }
DEFINE_VEC_BWD(KAMA_CLONES, n, nvec, NVEC, float, f32, 8)
DEFINE_VEC_BWD(KAMA_CLONES, n, nvec, NVEC, float, f32, 16)
DEFINE_VEC_BWD(KAMA_CLONES, n, nvec, NVEC, float, f32, 32)
DEFINE_VEC_BWD(KAMA_CLONES, n, nvec, NVEC, float, f32, 64)
DEFINE_VEC_BWD(KAMA_CLONES, n, nvec, NVEC, float, f32, 128)
DEFINE_VEC_BWD(KAMA_CLONES, n, nvec, NVEC, double, f64, 8)
DEFINE_VEC_BWD(KAMA_CLONES, n, nvec, NVEC, double, f64, 16)
DEFINE_VEC_BWD(KAMA_CLONES, n, nvec, NVEC, double, f64, 32)
DEFINE_VEC_BWD(KAMA_CLONES, n, nvec, NVEC, double, f64, 64)
DEFINE_VEC_BWD(KAMA_CLONES, n, nvec, NVEC, double, f64, 128)
#define MIN_VEC_BWD_DIM 256

/* ---------------------------------------------------------------------------------------------------- */
/* 512-bit loops (AVX-512 cores, tiles of at least 16 columns and 256 features; chosen by kama.ops.tuning). */
/* The same arithmetic on 64-byte vectors written out (GCC's vectorizer keeps to 256 bits on x86-64-v4):   */
/* cores with two 512-bit FMA pipes (Intel Xeon) do twice the rotation-vectors per cycle while a tile's    */
/* rows are in L1 / L2, and the blocked groups, whose memory traffic is a third of the walk's, gain most.   */
/* The forward's outputs are bitwise those of the portable loops (element-wise, same contraction); the     */
/* backward's angle gradients sum their lanes in another order. RL-size tiles (< 256 features) never use   */
/* them, so training results do not depend on the SIMD level.                                               */
/* ---------------------------------------------------------------------------------------------------- */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KAMA_HAVE_WIDE 1
#define KAMA_WIDE __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi2")))
static int have_avx512(void) {
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") ? 1 : 0;
    return cached;
}
typedef float wvec_f32 __attribute__((vector_size(64), aligned(4), may_alias));
typedef double wvec_f64 __attribute__((vector_size(64), aligned(8), may_alias));
KAMA_WIDE static inline float wvec_sum_f32(wvec_f32 v) { return _mm512_reduce_add_ps((__m512)v); }
KAMA_WIDE static inline wvec_f32 wvec_bcast_f32(float x) { return (wvec_f32)_mm512_set1_ps(x); }
KAMA_WIDE static inline wvec_f64 wvec_bcast_f64(double x) { return (wvec_f64)_mm512_set1_pd(x); }
KAMA_WIDE static inline double wvec_sum_f64(wvec_f64 v) { return _mm512_reduce_add_pd((__m512d)v); }
#define WLANES_f32 16
#define WLANES_f64 8

#define DEFINE_WIDE_KERNELS(TYPE, SUFFIX, T)                                                                \
    KAMA_WIDE static void wfwd_##SUFFIX##_##T(TYPE *restrict buf, const int32_t *restrict ij,               \
                                              const TYPE *restrict cs, int64_t k, int transpose, TYPE sgn,  \
                                              int pf) {                                                     \
        for (int64_t q = 0; q < k; ++q) {                                                                   \
            FWD_ROTATION_ROWS(TYPE, T)                                                                      \
            for (int t = 0; t < T; t += WLANES_##SUFFIX) {                                                  \
                const wvec_##SUFFIX va = *(const wvec_##SUFFIX *)(a + t), vb = *(const wvec_##SUFFIX *)(b + t); \
                *(wvec_##SUFFIX *)(a + t) = c * va - s * vb;                                                \
                *(wvec_##SUFFIX *)(b + t) = s * va + c * vb;                                                \
            }                                                                                               \
        }                                                                                                   \
    }
DEFINE_WIDE_KERNELS(float, f32, 16)
DEFINE_WIDE_KERNELS(float, f32, 32)
DEFINE_WIDE_KERNELS(float, f32, 64)
DEFINE_WIDE_KERNELS(float, f32, 128)
DEFINE_WIDE_KERNELS(double, f64, 16)
DEFINE_WIDE_KERNELS(double, f64, 32)
DEFINE_WIDE_KERNELS(double, f64, 64)
DEFINE_WIDE_KERNELS(double, f64, 128)
DEFINE_VEC_BWD(KAMA_WIDE, w, wvec, WLANES, float, f32, 16)
DEFINE_VEC_BWD(KAMA_WIDE, w, wvec, WLANES, float, f32, 32)
DEFINE_VEC_BWD(KAMA_WIDE, w, wvec, WLANES, float, f32, 64)
DEFINE_VEC_BWD(KAMA_WIDE, w, wvec, WLANES, float, f32, 128)
DEFINE_VEC_BWD(KAMA_WIDE, w, wvec, WLANES, double, f64, 16)
DEFINE_VEC_BWD(KAMA_WIDE, w, wvec, WLANES, double, f64, 32)
DEFINE_VEC_BWD(KAMA_WIDE, w, wvec, WLANES, double, f64, 64)
DEFINE_VEC_BWD(KAMA_WIDE, w, wvec, WLANES, double, f64, 128)
/* the wide loops where the caller asked for them and the core has them; else the portable ones */
#define DISPATCH_WIDE(WIDE, PREFIX, SUFFIX, T, ...)                                                         \
    if ((WIDE) && (T) >= 16 && have_avx512()) {                                                             \
        switch (T) {                                                                                        \
            case 16: w##PREFIX##_##SUFFIX##_16(__VA_ARGS__); break;                                         \
            case 32: w##PREFIX##_##SUFFIX##_32(__VA_ARGS__); break;                                         \
            case 64: w##PREFIX##_##SUFFIX##_64(__VA_ARGS__); break;                                         \
            default: w##PREFIX##_##SUFFIX##_128(__VA_ARGS__); break;                                        \
        }                                                                                                   \
    } else DISPATCH_T(PREFIX, SUFFIX, T, __VA_ARGS__)
#define DISPATCH_WIDE_BWD(SUFFIX, T, ...)                                                                   \
    switch (T) {                                                                                            \
        case 16: wbwd_##SUFFIX##_16(__VA_ARGS__); break;                                                    \
        case 32: wbwd_##SUFFIX##_32(__VA_ARGS__); break;                                                    \
        case 64: wbwd_##SUFFIX##_64(__VA_ARGS__); break;                                                    \
        default: wbwd_##SUFFIX##_128(__VA_ARGS__); break;                                                   \
    }
#else
#define KAMA_HAVE_WIDE 0
static int have_avx512(void) { return 0; }
#define DISPATCH_WIDE(WIDE, PREFIX, SUFFIX, T, ...) DISPATCH_T(PREFIX, SUFFIX, T, __VA_ARGS__)
#define DISPATCH_WIDE_BWD(SUFFIX, T, ...)
#endif
/* the backward: 512-bit or written-out 256-bit loops for tiles of MIN_VEC_BWD_DIM features or more, else bwd_* */
#define DISPATCH_BWD(WIDE, D, SUFFIX, T, ...)                                                               \
    if ((D) >= MIN_VEC_BWD_DIM && (T) >= 8) {                                                               \
        if ((WIDE) && (T) >= 16 && have_avx512()) {                                                         \
            DISPATCH_WIDE_BWD(SUFFIX, T, __VA_ARGS__)                                                       \
        } else {                                                                                            \
            switch (T) {                                                                                    \
                case 8: nbwd_##SUFFIX##_8(__VA_ARGS__); break;                                              \
                case 16: nbwd_##SUFFIX##_16(__VA_ARGS__); break;                                            \
                case 32: nbwd_##SUFFIX##_32(__VA_ARGS__); break;                                            \
                case 64: nbwd_##SUFFIX##_64(__VA_ARGS__); break;                                            \
                default: nbwd_##SUFFIX##_128(__VA_ARGS__); break;                                           \
            }                                                                                               \
        }                                                                                                   \
    } else DISPATCH_T(bwd, SUFFIX, T, __VA_ARGS__)

#define VALID_TILE(T) ((T) == 1 || (T) == 2 || (T) == 4 || (T) == 8 || (T) == 16 || (T) == 32 || (T) == 64 || (T) == 128)

#define DISPATCH_T(PREFIX, SUFFIX, T, ...)                                                                  \
    switch (T) {                                                                                            \
        case 1: PREFIX##_##SUFFIX##_1(__VA_ARGS__); break;                                                  \
        case 2: PREFIX##_##SUFFIX##_2(__VA_ARGS__); break;                                                  \
        case 4: PREFIX##_##SUFFIX##_4(__VA_ARGS__); break;                                                  \
        case 8: PREFIX##_##SUFFIX##_8(__VA_ARGS__); break;                                                  \
        case 16: PREFIX##_##SUFFIX##_16(__VA_ARGS__); break;                                                \
        case 32: PREFIX##_##SUFFIX##_32(__VA_ARGS__); break;                                                \
        case 64: PREFIX##_##SUFFIX##_64(__VA_ARGS__); break;                                                \
        default: PREFIX##_##SUFFIX##_128(__VA_ARGS__); break;                                               \
    }

/* ---------------------------------------------------------------------------------------------------- */
/* The row walk: small batches (batch 1: a policy step, one query) rotate each row in place, with no tile */
/* and no transposes. A walk over one row moves no SIMD work, so its cost is memory operations: the (i, j) */
/* come as one 64-bit load of the plan's (k, 2) int32 pairs and (c, s) as one load of interleaved          */
/* coefficients, 6 loads and stores per rotation (about 2.4 cycles on the EPYC of docs/cpu-kernel.md). The */
/* loop is unrolled by 4, which keeps its speed independent of where its code falls in a 64-byte line.     */
/* ---------------------------------------------------------------------------------------------------- */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) &&                                     \
    defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#include <emmintrin.h>
#define KAMA_PACKED_LOADS 1
#else
#define KAMA_PACKED_LOADS 0
#endif

static inline void row_pair(const int32_t *restrict ij, int64_t r, int64_t *i, int64_t *j) {
#if KAMA_PACKED_LOADS
    uint64_t w;
    memcpy(&w, ij + 2 * r, sizeof w);
    *i = (int64_t)(uint32_t)w;
    *j = (int64_t)(uint32_t)(w >> 32);
#else
    *i = ij[2 * r];
    *j = ij[2 * r + 1];
#endif
}

static inline void row_coef_f32(const float *restrict cs, int64_t r, float *c, float *s) {
#if KAMA_PACKED_LOADS
    const __m128 v = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(cs + 2 * r)));
    *c = _mm_cvtss_f32(v);
    *s = _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1));
#else
    *c = cs[2 * r];
    *s = cs[2 * r + 1];
#endif
}

static inline void row_coef_f64(const double *restrict cs, int64_t r, double *c, double *s) {
#if KAMA_PACKED_LOADS
    const __m128d v = _mm_loadu_pd(cs + 2 * r);
    *c = _mm_cvtsd_f64(v);
    *s = _mm_cvtsd_f64(_mm_unpackhi_pd(v, v));
#else
    *c = cs[2 * r];
    *s = cs[2 * r + 1];
#endif
}

/* rotation R of the plan on the row v (SIGN: + for M x, - for M^T x) */
#define ROW_ROTATE(TYPE, SUFFIX, SIGN, R)                                                                   \
    do {                                                                                                    \
        int64_t i_, j_;                                                                                     \
        TYPE c_, s_;                                                                                        \
        row_pair(ij, (R), &i_, &j_);                                                                        \
        row_coef_##SUFFIX(cs, (R), &c_, &s_);                                                               \
        s_ = SIGN s_;                                                                                       \
        const TYPE va_ = v[i_], vb_ = v[j_];                                                                \
        v[i_] = c_ * va_ - s_ * vb_;                                                                        \
        v[j_] = s_ * va_ + c_ * vb_;                                                                        \
    } while (0)

#define DEFINE_ROWS(TYPE, SUFFIX)                                                                           \
    KAMA_CLONES static void row_walk_##SUFFIX(TYPE *restrict v, const int32_t *restrict ij,                 \
                                              const TYPE *restrict cs, int64_t k, int transpose) {          \
        int64_t r;                                                                                          \
        if (transpose) {                                                                                    \
            for (r = 0; r + 4 <= k; r += 4) {                                                               \
                ROW_ROTATE(TYPE, SUFFIX, -, r);                                                             \
                ROW_ROTATE(TYPE, SUFFIX, -, r + 1);                                                         \
                ROW_ROTATE(TYPE, SUFFIX, -, r + 2);                                                         \
                ROW_ROTATE(TYPE, SUFFIX, -, r + 3);                                                         \
            }                                                                                               \
            for (; r < k; ++r) ROW_ROTATE(TYPE, SUFFIX, -, r);                                              \
        } else {                                                                                            \
            for (r = k - 1; r >= 3; r -= 4) {                                                               \
                ROW_ROTATE(TYPE, SUFFIX, +, r);                                                             \
                ROW_ROTATE(TYPE, SUFFIX, +, r - 1);                                                         \
                ROW_ROTATE(TYPE, SUFFIX, +, r - 2);                                                         \
                ROW_ROTATE(TYPE, SUFFIX, +, r - 3);                                                         \
            }                                                                                               \
            for (; r >= 0; --r) ROW_ROTATE(TYPE, SUFFIX, +, r);                                             \
        }                                                                                                   \
    }

DEFINE_ROWS(float, f32)
DEFINE_ROWS(double, f64)

/* ---------------------------------------------------------------------------------------------------- */
/* Workers                                                                                              */
/* ---------------------------------------------------------------------------------------------------- */

/* Rotations ahead whose rows the walk prefetches. A call may set it (job.prefetch >= 0, chosen by the Python  */
/* side's tuning, kama.ops.tuning); by default 0 while the tile buffers fit the L2 (the hardware keeps up),    */
/* else 2: rows of larger tiles come from the L3 in an order the hardware prefetchers cannot predict.          */
#define PREFETCH_MIN_BYTES (768 * 1024)
#define PREFETCH_ROTATIONS 2
#define prefetch_distance(TILE_BYTES) \
    (j->prefetch >= 0 ? j->prefetch : ((size_t)(TILE_BYTES) > PREFETCH_MIN_BYTES ? PREFETCH_ROTATIONS : 0))

#define DEFINE_WORKERS(TYPE, SUFFIX)                                                                        \
    static void *fwd_worker_##SUFFIX(void *arg) {                                                           \
        job_t *j = (job_t *)arg;                                                                            \
        const int64_t T = j->tile, d = j->d;                                                                \
        const size_t bytes = (size_t)(d * T * (int64_t)sizeof(TYPE));                                       \
        TYPE *buf = (TYPE *)buf_get(bytes);                                                                 \
        if (!buf) { j->status = -1; return NULL; }                                                          \
        for (int64_t tile = j->t_begin; tile < j->t_end; ++tile) {                                          \
            const int64_t n0 = tile * T, rows = (j->n - n0) < T ? (j->n - n0) : T;                          \
            load_##SUFFIX(buf, (const TYPE *)j->x, n0, rows, d, T);                                         \
            DISPATCH_WIDE(j->wide, fwd, SUFFIX, T, buf, j->ij, (const TYPE *)j->cs, j->k, j->transpose,     \
                          (TYPE)j->sgn, prefetch_distance(bytes))                                           \
            store_##SUFFIX((TYPE *)j->y, buf, n0, rows, d, T, (const TYPE *)j->scale);                      \
        }                                                                                                   \
        buf_put(buf, bytes);                                                                                \
        return NULL;                                                                                        \
    }                                                                                                       \
    static void *bwd_worker_##SUFFIX(void *arg) {                                                           \
        job_t *j = (job_t *)arg;                                                                            \
        const int64_t T = j->tile, d = j->d;                                                                \
        const size_t bytes = (size_t)(d * T * (int64_t)sizeof(TYPE));                                       \
        TYPE *vb = (TYPE *)buf_get(bytes);                                                                  \
        TYPE *gb = (TYPE *)buf_get(bytes);                                                                  \
        if (!vb || !gb) { buf_put(vb, bytes); buf_put(gb, bytes); j->status = -1; return NULL; }            \
        double *acc = j->gacc + (int64_t)j->thread_id * j->k;                                               \
        for (int64_t tile = j->t_begin; tile < j->t_end; ++tile) {                                          \
            const int64_t n0 = tile * T, rows = (j->n - n0) < T ? (j->n - n0) : T;                          \
            load_##SUFFIX(vb, (const TYPE *)j->y, n0, rows, d, T);                                          \
            load_##SUFFIX(gb, (const TYPE *)j->gy, n0, rows, d, T);                                         \
            DISPATCH_BWD(j->wide, d, SUFFIX, T, vb, gb, j->ij, (const TYPE *)j->cs, j->k, j->transpose,     \
                         (TYPE)j->sgn, acc, prefetch_distance(2 * bytes))                                   \
            store_##SUFFIX((TYPE *)j->gx, gb, n0, rows, d, T, NULL);                                        \
        }                                                                                                   \
        buf_put(vb, bytes);                                                                                 \
        buf_put(gb, bytes);                                                                                 \
        return NULL;                                                                                        \
    }

DEFINE_WORKERS(float, f32)
DEFINE_WORKERS(double, f64)

/* ---------------------------------------------------------------------------------------------------- */
/* Register-blocked plans (kama.ops.blocked_pairs). In application order the plan is a sequence of groups:  */
/* each acts on BLOCK = 8 coordinates (its slots s0..s7, drawn from a random permutation per phase) with    */
/* GROUP_ROTS = 12 rotations in three butterfly rounds, (s0 s1)(s2 s3)(s4 s5)(s6 s7), (s0 s2)(s1 s3)(s4 s6)  */
/* (s5 s7), (s0 s4)(s1 s5)(s2 s6)(s3 s7); any rotations after the last full group form a tail that the      */
/* generic walk applies. A group loads its 8 rows of a tile column chunk into vector registers once, rotates */
/* them 12 times there and stores them once: 16 memory operations per 12 rotations and vector width, where  */
/* the generic walk needs 4 per rotation (2 loads, 2 stores). Group g's q-th rotation is the plan's          */
/* rotation r = k - 1 - 12 g - q (product order).                                                           */
/* ---------------------------------------------------------------------------------------------------- */

#define BLOCK 8
#define GROUP_ROTS 12

typedef struct kama_blocks {
    int32_t *slots;  /* (groups, 8) coordinates of every group, application order */
    int64_t groups, k, d;
} kama_blocks_t;

#define BLK_ROT(X, Y, C, S) do { const __typeof__(X) x_ = (X); (X) = (C) * x_ - (S) * (Y); (Y) = (S) * x_ + (C) * (Y); } while (0)
#define BLK_UNROT(X, Y, GX, GY, C, S, ACC)                                                                  \
    do {                                                                                                    \
        const __typeof__(X) a1_ = (X), b1_ = (Y), a2_ = (GX), b2_ = (GY);                                   \
        (ACC) += b2_ * a1_ - a2_ * b1_;                                                                     \
        (X) = (C) * a1_ + (S) * b1_;                                                                        \
        (Y) = (C) * b1_ - (S) * a1_;                                                                        \
        (GX) = (C) * a2_ + (S) * b2_;                                                                       \
        (GY) = (C) * b2_ - (S) * a2_;                                                                       \
    } while (0)

/* the 12 butterfly rotations of a group, unrolled (the registers are named at compile time) */
#define BLK_FWD_ALL(C, S) BLK_ROT(v[0], v[1], C(0), S(0)); BLK_ROT(v[2], v[3], C(1), S(1));                         \
    BLK_ROT(v[4], v[5], C(2), S(2)); BLK_ROT(v[6], v[7], C(3), S(3)); BLK_ROT(v[0], v[2], C(4), S(4));              \
    BLK_ROT(v[1], v[3], C(5), S(5)); BLK_ROT(v[4], v[6], C(6), S(6)); BLK_ROT(v[5], v[7], C(7), S(7));              \
    BLK_ROT(v[0], v[4], C(8), S(8)); BLK_ROT(v[1], v[5], C(9), S(9)); BLK_ROT(v[2], v[6], C(10), S(10));            \
    BLK_ROT(v[3], v[7], C(11), S(11));
#define BLK_FWD_REV(C, S) BLK_ROT(v[3], v[7], C(11), S(11)); BLK_ROT(v[2], v[6], C(10), S(10));                     \
    BLK_ROT(v[1], v[5], C(9), S(9)); BLK_ROT(v[0], v[4], C(8), S(8)); BLK_ROT(v[5], v[7], C(7), S(7));              \
    BLK_ROT(v[4], v[6], C(6), S(6)); BLK_ROT(v[1], v[3], C(5), S(5)); BLK_ROT(v[0], v[2], C(4), S(4));              \
    BLK_ROT(v[6], v[7], C(3), S(3)); BLK_ROT(v[4], v[5], C(2), S(2)); BLK_ROT(v[2], v[3], C(1), S(1));              \
    BLK_ROT(v[0], v[1], C(0), S(0));
#define BLK_BWD_ALL(C, S) BLK_UNROT(v[0], v[1], w[0], w[1], C(0), S(0), acc[0]);                                    \
    BLK_UNROT(v[2], v[3], w[2], w[3], C(1), S(1), acc[1]); BLK_UNROT(v[4], v[5], w[4], w[5], C(2), S(2), acc[2]);   \
    BLK_UNROT(v[6], v[7], w[6], w[7], C(3), S(3), acc[3]); BLK_UNROT(v[0], v[2], w[0], w[2], C(4), S(4), acc[4]);   \
    BLK_UNROT(v[1], v[3], w[1], w[3], C(5), S(5), acc[5]); BLK_UNROT(v[4], v[6], w[4], w[6], C(6), S(6), acc[6]);   \
    BLK_UNROT(v[5], v[7], w[5], w[7], C(7), S(7), acc[7]); BLK_UNROT(v[0], v[4], w[0], w[4], C(8), S(8), acc[8]);   \
    BLK_UNROT(v[1], v[5], w[1], w[5], C(9), S(9), acc[9]);                                                          \
    BLK_UNROT(v[2], v[6], w[2], w[6], C(10), S(10), acc[10]);                                                       \
    BLK_UNROT(v[3], v[7], w[3], w[7], C(11), S(11), acc[11]);
#define BLK_BWD_REV(C, S) BLK_UNROT(v[3], v[7], w[3], w[7], C(11), S(11), acc[11]);                                 \
    BLK_UNROT(v[2], v[6], w[2], w[6], C(10), S(10), acc[10]);                                                       \
    BLK_UNROT(v[1], v[5], w[1], w[5], C(9), S(9), acc[9]); BLK_UNROT(v[0], v[4], w[0], w[4], C(8), S(8), acc[8]);   \
    BLK_UNROT(v[5], v[7], w[5], w[7], C(7), S(7), acc[7]); BLK_UNROT(v[4], v[6], w[4], w[6], C(6), S(6), acc[6]);   \
    BLK_UNROT(v[1], v[3], w[1], w[3], C(5), S(5), acc[5]); BLK_UNROT(v[0], v[2], w[0], w[2], C(4), S(4), acc[4]);   \
    BLK_UNROT(v[6], v[7], w[6], w[7], C(3), S(3), acc[3]); BLK_UNROT(v[4], v[5], w[4], w[5], C(2), S(2), acc[2]);   \
    BLK_UNROT(v[2], v[3], w[2], w[3], C(1), S(1), acc[1]); BLK_UNROT(v[0], v[1], w[0], w[1], C(0), S(0), acc[0]);

/* a group's coefficients: from the arrays c[], s[] (BLK_CA, BLK_SA: the 512-bit forward, which broadcasts them once
 * per group), or read at their use from the plan's cos / sin (BLK_CP, BLK_SP: cb points at the group's first
 * rotation r0; s negated for the transpose), with cb made opaque at every chunk (BLK_OPAQUE) so that the compiler
 * cannot hoist 24 broadcasts out of the chunk loop: 16 ymm registers (AVX2) cannot hold them beside a group's 8
 * rows, the 512-bit backward's 16 rows and 12 accumulators fill 28 of the 32, and each broadcast is then one load
 * (a copy of the group's coefficients into stack arrays, once per tile and group, cost the 256-bit forward 20-30 %
 * at 16-32 columns on a Zen 3) */
#define BLK_CA(Q) c[Q]
#define BLK_SA(Q) s[Q]
#define BLK_CP(Q) cb[-2 * (Q)]
#define BLK_SP(Q) (transpose ? -cb[1 - 2 * (Q)] : cb[1 - 2 * (Q)])
#define BLK_OPAQUE(P) __asm__("" : "+r"(P))
#define DEFINE_BLOCKED(TYPE, SUFFIX, VW)                                                                    \
    /* the groups of b on the (d, T) feature-major tile, T a multiple of VW, in 256-bit vectors: each chunk's  */ \
    /* 8 rows are loaded straight into registers (a memcpy into an array went through the stack, in halves on */ \
    /* AVX2-tuned builds, and stalled on store forwarding)                                                     */ \
    static inline __attribute__((always_inline)) void blk_fwd_t_##SUFFIX(                                           \
        TYPE *restrict buf, const int64_t T, const kama_blocks_t *b, const TYPE *restrict cs, const int transpose) { \
        for (int64_t gi = 0; gi < b->groups; ++gi) {                                                        \
            const int64_t g = transpose ? b->groups - 1 - gi : gi, r0 = b->k - 1 - GROUP_ROTS * g;          \
            const int32_t *sl = b->slots + BLOCK * g;                                                       \
            const TYPE *cb = cs + 2 * r0;                                                                   \
            TYPE *p[BLOCK];                                                                                 \
            for (int u = 0; u < BLOCK; ++u) p[u] = buf + (int64_t)sl[u] * T;                                \
            BLK_FWD_CHUNKS(nvec_##SUFFIX, 0, T, VW, BLK_CP, BLK_SP, BLK_OPAQUE(cb))                                 \
        }                                                                                                   \
    }                                                                                                       \
    /* the tile widths with T and the transpose constants (the chunk loop unrolled, no branch inside it) */  \
    KAMA_CLONES static void blk_fwd_##SUFFIX(TYPE *restrict buf, int64_t T, const kama_blocks_t *b,         \
                                             const TYPE *restrict cs, int transpose) {                      \
        switch (T * 2 + (transpose != 0)) {                                                                 \
            case 32: blk_fwd_t_##SUFFIX(buf, 16, b, cs, 0); break;                                          \
            case 33: blk_fwd_t_##SUFFIX(buf, 16, b, cs, 1); break;                                          \
            case 64: blk_fwd_t_##SUFFIX(buf, 32, b, cs, 0); break;                                          \
            case 65: blk_fwd_t_##SUFFIX(buf, 32, b, cs, 1); break;                                          \
            case 128: blk_fwd_t_##SUFFIX(buf, 64, b, cs, 0); break;                                         \
            case 129: blk_fwd_t_##SUFFIX(buf, 64, b, cs, 1); break;                                         \
            case 256: blk_fwd_t_##SUFFIX(buf, 128, b, cs, 0); break;                                        \
            case 257: blk_fwd_t_##SUFFIX(buf, 128, b, cs, 1); break;                                        \
            default: blk_fwd_t_##SUFFIX(buf, T, b, cs, transpose); break;                                   \
        }                                                                                                   \
    }                                                                                                       \
    /* one row (a batch of one): the groups on scalars, 16 memory operations per 12 rotations where the     */ \
    /* generic row walk makes 48; every rotation the same operation on the same values as in row_walk        */ \
    static inline __attribute__((always_inline)) void blk_row_t_##SUFFIX(                                    \
        TYPE *restrict row, const kama_blocks_t *b, const TYPE *restrict cs, const int transpose) {         \
        for (int64_t gi = 0; gi < b->groups; ++gi) {                                                        \
            const int64_t g = transpose ? b->groups - 1 - gi : gi, r0 = b->k - 1 - GROUP_ROTS * g;          \
            const int32_t *sl = b->slots + BLOCK * g;                                                       \
            const TYPE *cb = cs + 2 * r0;                                                                   \
            TYPE v[BLOCK];                                                                                  \
            for (int u = 0; u < BLOCK; ++u) v[u] = row[sl[u]];                                              \
            if (!transpose) { BLK_FWD_ALL(BLK_CP, BLK_SP) }                                                 \
            else { BLK_FWD_REV(BLK_CP, BLK_SP) }                                                            \
            for (int u = 0; u < BLOCK; ++u) row[sl[u]] = v[u];                                              \
        }                                                                                                   \
    }                                                                                                       \
    /* (the transpose a constant: a runtime sign per coefficient spilled the AVX2 clone's registers)          */ \
    KAMA_CLONES static void blk_row_##SUFFIX(TYPE *restrict row, const kama_blocks_t *b,                     \
                                             const TYPE *restrict cs, int transpose) {                      \
        if (transpose) blk_row_t_##SUFFIX(row, b, cs, 1);                                                   \
        else blk_row_t_##SUFFIX(row, b, cs, 0);                                                             \
    }                                                                                                       \
    /* backward over the groups from the saved output (vb) and its gradient (gb); gacc per product rotation */ \
    /* (lane sums in double, in lane order)                                                                 */ \
    /* (T and the transpose are not made constants: the compiler then orders the angle gradients' sums       */ \
    /* differently)                                                                                          */ \
    KAMA_CLONES static void blk_bwd_##SUFFIX(TYPE *restrict vb, TYPE *restrict gb, int64_t T,               \
                                             const kama_blocks_t *b, const TYPE *restrict cs, int transpose, \
                                             double *restrict gacc) {                                       \
        const ptrdiff_t go = gb - vb; /* one buffer, the gradient tile after the output's: one row pointer */ \
        for (int64_t gi = 0; gi < b->groups; ++gi) {                                                        \
            const int64_t g = transpose ? gi : b->groups - 1 - gi, r0 = b->k - 1 - GROUP_ROTS * g;          \
            const int32_t *sl = b->slots + BLOCK * g;                                                       \
            const TYPE *cb = cs + 2 * r0;                                                                   \
            TYPE *pv[BLOCK];                                                                                \
            for (int u = 0; u < BLOCK; ++u) pv[u] = vb + (int64_t)sl[u] * T;                                \
            double h[GROUP_ROTS];                                                                           \
            BLK_BWD_HALVES(nvec_##SUFFIX, nvec_dsum_##SUFFIX, 0, T, VW, BLK_CP, BLK_SP, BLK_OPAQUE(cb))             \
            for (int q = 0; q < GROUP_ROTS; ++q) gacc[r0 - q] += h[q];                                      \
        }                                                                                                   \
    }                                                                                                       \
    static void *blk_fwd_worker_##SUFFIX(void *arg) {                                                       \
        job_t *j = (job_t *)arg;                                                                            \
        const int64_t T = j->tile, d = j->d, m = j->blocks->k - GROUP_ROTS * j->blocks->groups;              \
        const size_t bytes = (size_t)(d * T * (int64_t)sizeof(TYPE));                                       \
        TYPE *buf = (TYPE *)buf_get(bytes);                                                                 \
        if (!buf) { j->status = -1; return NULL; }                                                          \
        for (int64_t tile = j->t_begin; tile < j->t_end; ++tile) {                                          \
            const int64_t n0 = tile * T, rows = (j->n - n0) < T ? (j->n - n0) : T;                          \
            load_##SUFFIX(buf, (const TYPE *)j->x, n0, rows, d, T);                                         \
            if (j->transpose)                                                                               \
                DISPATCH_T(fwd, SUFFIX, T, buf, j->ij, (const TYPE *)j->cs, m, 1, (TYPE)j->sgn, 0)          \
            (BLK_WIDE(j) ? wblk_fwd_##SUFFIX : blk_fwd_##SUFFIX)(buf, T, j->blocks, (const TYPE *)j->cs,     \
                                                                 j->transpose);                             \
            if (!j->transpose)                                                                              \
                DISPATCH_T(fwd, SUFFIX, T, buf, j->ij, (const TYPE *)j->cs, m, 0, (TYPE)j->sgn, 0)          \
            store_##SUFFIX((TYPE *)j->y, buf, n0, rows, d, T, (const TYPE *)j->scale);                      \
        }                                                                                                   \
        buf_put(buf, bytes);                                                                                \
        return NULL;                                                                                        \
    }                                                                                                       \
    static void *blk_bwd_worker_##SUFFIX(void *arg) {                                                       \
        job_t *j = (job_t *)arg;                                                                            \
        const int64_t T = j->tile, d = j->d, m = j->blocks->k - GROUP_ROTS * j->blocks->groups;              \
        const size_t bytes = (size_t)(d * T * (int64_t)sizeof(TYPE));                                       \
        TYPE *vb = (TYPE *)buf_get(2 * bytes); /* the output tile, then the gradient's (blk_bwd) */         \
        if (!vb) { j->status = -1; return NULL; }                                                           \
        TYPE *gb = vb + d * T;                                                                              \
        double *acc = j->gacc + (int64_t)j->thread_id * j->k;                                               \
        for (int64_t tile = j->t_begin; tile < j->t_end; ++tile) {                                          \
            const int64_t n0 = tile * T, rows = (j->n - n0) < T ? (j->n - n0) : T;                          \
            load_##SUFFIX(vb, (const TYPE *)j->y, n0, rows, d, T);                                          \
            load_##SUFFIX(gb, (const TYPE *)j->gy, n0, rows, d, T);                                         \
            if (!j->transpose)                                                                              \
                DISPATCH_T(bwd, SUFFIX, T, vb, gb, j->ij, (const TYPE *)j->cs, m, 0, (TYPE)j->sgn, acc, 0)  \
            (BLK_WIDE(j) ? wblk_bwd_##SUFFIX : blk_bwd_##SUFFIX)(vb, gb, T, j->blocks, (const TYPE *)j->cs,  \
                                                                 j->transpose, acc);                        \
            if (j->transpose)                                                                               \
                DISPATCH_T(bwd, SUFFIX, T, vb, gb, j->ij, (const TYPE *)j->cs, m, 1, (TYPE)j->sgn, acc, 0)  \
            store_##SUFFIX((TYPE *)j->gx, gb, n0, rows, d, T, NULL);                                        \
        }                                                                                                   \
        buf_put(vb, 2 * bytes);                                                                             \
        return NULL;                                                                                        \
    }

/* the lanes of a 256-bit vector summed in double, in lane order (the portable blocked backward's angle sums) */
static inline double nvec_dsum_f32(nvec_f32 v) {
    double h = 0;
    for (int l = 0; l < 8; ++l) h += (double)v[l];
    return h;
}
static inline double nvec_dsum_f64(nvec_f64 v) {
    double h = 0;
    for (int l = 0; l < 4; ++l) h += v[l];
    return h;
}
/* the column chunks [FROM, TO) of a group in vectors of type VT (STEP columns): forward over the rows p[], and
 * backward over pv[] / pg[] with the lane sums of the angle-gradient accumulators stored (=) or added (+=) in h */
#define BLK_FWD_CHUNKS(VT, FROM, TO, STEP, C, S, BAR)                                                       \
    for (int64_t t = (FROM); t < (TO); t += (STEP)) {                                                       \
        VT v[BLOCK];                                                                                        \
        BAR;                                                                                                \
        for (int u = 0; u < BLOCK; ++u) v[u] = *(const VT *)(p[u] + t);                                     \
        if (!transpose) { BLK_FWD_ALL(C, S) }                                                           \
        else { BLK_FWD_REV(C, S) }                                                                      \
        for (int u = 0; u < BLOCK; ++u) *(VT *)(p[u] + t) = v[u];                                           \
    }
#define BLK_BWD_CHUNKS(VT, SUM, FROM, TO, STEP, ASSIGN, C, S, BAR)                                          \
    {                                                                                                       \
        VT acc[GROUP_ROTS];                                                                                 \
        memset(acc, 0, sizeof acc);                                                                         \
        for (int64_t t = (FROM); t < (TO); t += (STEP)) {                                                   \
            VT v[BLOCK], w[BLOCK];                                                                          \
            BAR;                                                                                            \
            for (int u = 0; u < BLOCK; ++u) {                                                               \
                v[u] = *(const VT *)(pv[u] + t);                                                            \
                w[u] = *(const VT *)(pv[u] + go + t);                                                       \
            }                                                                                               \
            if (!transpose) { BLK_BWD_REV(C, S) }                                                       \
            else { BLK_BWD_ALL(C, S) }                                                                  \
            for (int u = 0; u < BLOCK; ++u) {                                                               \
                *(VT *)(pv[u] + t) = v[u];                                                                  \
                *(VT *)(pv[u] + go + t) = w[u];                                                             \
            }                                                                                               \
        }                                                                                                   \
        for (int q = 0; q < GROUP_ROTS; ++q) h[q] ASSIGN SUM(acc[q]);                                       \
    }
/* BLK_BWD_CHUNKS for 16 vector registers (AVX2): a group's 8 + 8 rows and 12 accumulators do not fit them, and  */
/* left to the compiler about a hundred spills per chunk took the store port. The rounds that mix the two halves  */
/* of the group (s0..s3, s4..s7) come first in the backward's order (last when transposed); there each rotation's */
/* high row and its gradient go back to the tile at once, the low half runs its other two rounds in registers and */
/* is stored, and the high half is read again for its own two rounds. Every rotation is the same operation on    */
/* the same values as in BLK_BWD_CHUNKS, in an order that only exchanges rotations on disjoint rows.            */
#define BLK_LD(VT, U) do { v[U] = *(const VT *)(pv[U] + t); w[U] = *(const VT *)(pv[U] + go + t); } while (0)
#define BLK_ST(VT, U) do { *(VT *)(pv[U] + t) = v[U]; *(VT *)(pv[U] + go + t) = w[U]; } while (0)
#define BLK_UNROT_Q(U, V, Q, C, S) BLK_UNROT(v[U], v[V], w[U], w[V], C(Q), S(Q), acc[Q])
#define BLK_BWD_HALVES(VT, SUM, FROM, TO, STEP, C, S, BAR)                                                  \
    {                                                                                                       \
        VT acc[GROUP_ROTS];                                                                                 \
        memset(acc, 0, sizeof acc);                                                                         \
        for (int64_t t = (FROM); t < (TO); t += (STEP)) {                                                   \
            VT v[BLOCK], w[BLOCK];                                                                          \
            BAR;                                                                                            \
            if (!transpose) {                                                                               \
                for (int u = 3; u >= 0; --u) {                                                              \
                    BLK_LD(VT, u); BLK_LD(VT, u + 4);                                                       \
                    BLK_UNROT_Q(u, u + 4, 8 + u, C, S);                                                     \
                    BLK_ST(VT, u + 4);                                                                      \
                }                                                                                           \
                BLK_UNROT_Q(1, 3, 5, C, S); BLK_UNROT_Q(0, 2, 4, C, S);                                     \
                BLK_UNROT_Q(2, 3, 1, C, S); BLK_UNROT_Q(0, 1, 0, C, S);                                     \
                for (int u = 0; u < 4; ++u) BLK_ST(VT, u);                                                  \
                for (int u = 4; u < 8; ++u) BLK_LD(VT, u);                                                  \
                BLK_UNROT_Q(5, 7, 7, C, S); BLK_UNROT_Q(4, 6, 6, C, S);                                     \
                BLK_UNROT_Q(6, 7, 3, C, S); BLK_UNROT_Q(4, 5, 2, C, S);                                     \
                for (int u = 4; u < 8; ++u) BLK_ST(VT, u);                                                  \
            } else {                                                                                        \
                for (int u = 4; u < 8; ++u) BLK_LD(VT, u);                                                  \
                BLK_UNROT_Q(4, 5, 2, C, S); BLK_UNROT_Q(6, 7, 3, C, S);                                     \
                BLK_UNROT_Q(4, 6, 6, C, S); BLK_UNROT_Q(5, 7, 7, C, S);                                     \
                for (int u = 4; u < 8; ++u) BLK_ST(VT, u);                                                  \
                for (int u = 0; u < 4; ++u) BLK_LD(VT, u);                                                  \
                BLK_UNROT_Q(0, 1, 0, C, S); BLK_UNROT_Q(2, 3, 1, C, S);                                     \
                BLK_UNROT_Q(0, 2, 4, C, S); BLK_UNROT_Q(1, 3, 5, C, S);                                     \
                for (int u = 0; u < 4; ++u) {                                                               \
                    BLK_LD(VT, u + 4);                                                                      \
                    BLK_UNROT_Q(u, u + 4, 8 + u, C, S);                                                     \
                    BLK_ST(VT, u); BLK_ST(VT, u + 4);                                                       \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        for (int q = 0; q < GROUP_ROTS; ++q) h[q] = SUM(acc[q]);                                            \
    }
/* the groups with 512-bit vectors (a 256-bit chunk for a tile of 8 mod 16 float32 columns): as blk_fwd / blk_bwd */
#if KAMA_HAVE_WIDE
#define DEFINE_WIDE_BLOCKED(TYPE, SUFFIX, HW)                                                               \
    typedef nvec_##SUFFIX hvec_##SUFFIX;                                                                    \
    KAMA_WIDE static inline __attribute__((always_inline)) void wblk_fwd_t_##SUFFIX(                       \
        TYPE *restrict buf, const int64_t T, const kama_blocks_t *b, const TYPE *restrict cs, const int transpose) { \
        const TYPE sgn = transpose ? (TYPE)-1 : (TYPE)1;                                                    \
        const int64_t TW = T - T % WLANES_##SUFFIX;                                                         \
        for (int64_t gi = 0; gi < b->groups; ++gi) {                                                        \
            const int64_t g = transpose ? b->groups - 1 - gi : gi, r0 = b->k - 1 - GROUP_ROTS * g;          \
            const int32_t *sl = b->slots + BLOCK * g;                                                       \
            TYPE *p[BLOCK];                                                                                 \
            for (int u = 0; u < BLOCK; ++u) p[u] = buf + (int64_t)sl[u] * T;                                \
            if (TW) { /* the group's coefficients broadcast once, straight from the plan (the forward's sines */ \
                      /* unscaled: a multiply and a register broadcast each would take the FMA ports)         */ \
                wvec_##SUFFIX c[GROUP_ROTS], s[GROUP_ROTS];                                                 \
                for (int q = 0; q < GROUP_ROTS; ++q) {                                                      \
                    c[q] = wvec_bcast_##SUFFIX(cs[2 * (r0 - q)]);                                           \
                    s[q] = transpose ? -wvec_bcast_##SUFFIX(cs[2 * (r0 - q) + 1])                           \
                                     : wvec_bcast_##SUFFIX(cs[2 * (r0 - q) + 1]);                           \
                }                                                                                           \
                BLK_FWD_CHUNKS(wvec_##SUFFIX, 0, TW, WLANES_##SUFFIX, BLK_CA, BLK_SA, (void)0)                      \
            }                                                                                               \
            TYPE c[GROUP_ROTS], s[GROUP_ROTS];                                                              \
            if (TW < T)                                                                                     \
                for (int q = 0; q < GROUP_ROTS; ++q) { c[q] = cs[2 * (r0 - q)]; s[q] = sgn * cs[2 * (r0 - q) + 1]; } \
            BLK_FWD_CHUNKS(hvec_##SUFFIX, TW, T, HW, BLK_CA, BLK_SA, (void)0)                                       \
        }                                                                                                   \
    }                                                                                                       \
    /* the common widths with T a constant (the chunk loop unrolled) */                                     \
    KAMA_WIDE static void wblk_fwd_##SUFFIX(TYPE *restrict buf, int64_t T, const kama_blocks_t *b,          \
                                            const TYPE *restrict cs, int transpose) {                       \
        switch (T * 2 + (transpose != 0)) { /* the transpose a constant too: its branches leave the loops */  \
            case 64: wblk_fwd_t_##SUFFIX(buf, 32, b, cs, 0); break;                                         \
            case 65: wblk_fwd_t_##SUFFIX(buf, 32, b, cs, 1); break;                                         \
            case 128: wblk_fwd_t_##SUFFIX(buf, 64, b, cs, 0); break;                                        \
            case 129: wblk_fwd_t_##SUFFIX(buf, 64, b, cs, 1); break;                                        \
            case 256: wblk_fwd_t_##SUFFIX(buf, 128, b, cs, 0); break;                                       \
            case 257: wblk_fwd_t_##SUFFIX(buf, 128, b, cs, 1); break;                                       \
            default: wblk_fwd_t_##SUFFIX(buf, T, b, cs, transpose); break;                                  \
        }                                                                                                   \
    }                                                                                                       \
    KAMA_WIDE static inline __attribute__((always_inline)) void wblk_bwd_t_##SUFFIX(                       \
        TYPE *restrict vb, TYPE *restrict gb, const int64_t T, const kama_blocks_t *b, const TYPE *restrict cs, \
        const int transpose, double *restrict gacc) {                                                       \
        const int64_t TW = T - T % WLANES_##SUFFIX;                                                         \
        const ptrdiff_t go = gb - vb; /* one buffer: as blk_bwd */                                          \
        for (int64_t gi = 0; gi < b->groups; ++gi) {                                                        \
            const int64_t g = transpose ? gi : b->groups - 1 - gi, r0 = b->k - 1 - GROUP_ROTS * g;          \
            const int32_t *sl = b->slots + BLOCK * g;                                                       \
            const TYPE *cb = cs + 2 * r0;                                                                   \
            TYPE *pv[BLOCK];                                                                                \
            for (int u = 0; u < BLOCK; ++u) pv[u] = vb + (int64_t)sl[u] * T;                                \
            TYPE h[GROUP_ROTS];                                                                             \
            BLK_BWD_CHUNKS(wvec_##SUFFIX, wvec_sum_##SUFFIX, 0, TW, WLANES_##SUFFIX, =, BLK_CP, BLK_SP,             \
                           BLK_OPAQUE(cb))                                                                          \
            if (TW < T)                                                                                             \
                BLK_BWD_CHUNKS(hvec_##SUFFIX, hvec_sum_##SUFFIX, TW, T, HW, +=, BLK_CP, BLK_SP, BLK_OPAQUE(cb))     \
            for (int q = 0; q < GROUP_ROTS; ++q) gacc[r0 - q] += (double)h[q];                              \
        }                                                                                                   \
    }                                                                                                       \
    KAMA_WIDE static void wblk_bwd_##SUFFIX(TYPE *restrict vb, TYPE *restrict gb, int64_t T,                \
                                            const kama_blocks_t *b, const TYPE *restrict cs, int transpose, \
                                            double *restrict gacc) {                                        \
        switch (T * 2 + (transpose != 0)) {                                                                 \
            case 64: wblk_bwd_t_##SUFFIX(vb, gb, 32, b, cs, 0, gacc); break;                                \
            case 65: wblk_bwd_t_##SUFFIX(vb, gb, 32, b, cs, 1, gacc); break;                                \
            case 128: wblk_bwd_t_##SUFFIX(vb, gb, 64, b, cs, 0, gacc); break;                               \
            case 129: wblk_bwd_t_##SUFFIX(vb, gb, 64, b, cs, 1, gacc); break;                               \
            case 256: wblk_bwd_t_##SUFFIX(vb, gb, 128, b, cs, 0, gacc); break;                              \
            case 257: wblk_bwd_t_##SUFFIX(vb, gb, 128, b, cs, 1, gacc); break;                              \
            default: wblk_bwd_t_##SUFFIX(vb, gb, T, b, cs, transpose, gacc); break;                         \
        }                                                                                                   \
    }
#define hvec_sum_f32 nvec_sum_f32
#define hvec_sum_f64 nvec_sum_f64
DEFINE_WIDE_BLOCKED(float, f32, 8)
DEFINE_WIDE_BLOCKED(double, f64, 4)
#define BLK_WIDE(J) ((J)->wide && have_avx512())
#else
#define BLK_WIDE(J) 0
#define wblk_fwd_f32 blk_fwd_f32
#define wblk_fwd_f64 blk_fwd_f64
#define wblk_bwd_f32 blk_bwd_f32
#define wblk_bwd_f64 blk_bwd_f64
#endif
DEFINE_BLOCKED(float, f32, 8)
DEFINE_BLOCKED(double, f64, 4)

/* Every row of x walked alone into y (forward's tile 1), then scaled: the plan's k rotations, or for a blocked plan b
 * its groups on scalars and the tail (the plan's first m rotations) last, first when transposed. */
#define DEFINE_ROW_CALLS(TYPE, SUFFIX)                                                                      \
    static void rows_##SUFFIX(const TYPE *x, TYPE *y, int64_t n, int64_t d, const int32_t *ij,              \
                              const TYPE *cs, int64_t k, const kama_blocks_t *b, int transpose,             \
                              const TYPE *scale) {                                                          \
        const int64_t m = b ? b->k - GROUP_ROTS * b->groups : k;                                            \
        for (int64_t row = 0; row < n; ++row) {                                                             \
            TYPE *v = y + row * d;                                                                          \
            if (v != x + row * d) memcpy(v, x + row * d, (size_t)d * sizeof(TYPE));                         \
            if (b && !transpose) blk_row_##SUFFIX(v, b, cs, 0);                                             \
            row_walk_##SUFFIX(v, ij, cs, m, transpose);                                                     \
            if (b && transpose) blk_row_##SUFFIX(v, b, cs, 1);                                              \
            if (scale)                                                                                      \
                for (int64_t f = 0; f < d; ++f) v[f] *= scale[f];                                           \
        }                                                                                                   \
    }
DEFINE_ROW_CALLS(float, f32)
DEFINE_ROW_CALLS(double, f64)

/* rows_* of either dtype, without the GIL */
static void rows_any(int is_double, const void *x, void *y, int64_t n, int64_t d, const int32_t *ij, const void *cs,
                     int64_t k, const kama_blocks_t *b, int transpose, const void *scale) {
    Py_BEGIN_ALLOW_THREADS
    if (is_double)
        rows_f64((const double *)x, (double *)y, n, d, ij, (const double *)cs, k, b, transpose, (const double *)scale);
    else
        rows_f32((const float *)x, (float *)y, n, d, ij, (const float *)cs, k, b, transpose, (const float *)scale);
    Py_END_ALLOW_THREADS
}

/* ---------------------------------------------------------------------------------------------------- */
/* Fused KamaLinear: pad / scale the input, rotate, keep and scale the outputs, add the bias, in one pass   */
/* per tile (and the matching backward), so that small layers (RL policies) pay one call instead of ~10     */
/* tensor operations. n = d = max(in_f, out_f); narrowing layers (out_f <= in_f, so in_f == d) scale the    */
/* kept outputs, widening layers (out_f > in_f, so out_f == d) scale the input columns.                     */
/* ---------------------------------------------------------------------------------------------------- */

#define DEFINE_LINEAR(TYPE, SUFFIX)                                                                         \
    static void *lin_fwd_worker_##SUFFIX(void *arg) {                                                       \
        job_t *j = (job_t *)arg;                                                                            \
        const int64_t T = j->tile, d = j->d, in_f = j->in_f, out_f = j->out_f;                              \
        const int widen = out_f > in_f;                                                                     \
        const TYPE *x = (const TYPE *)j->x, *sc = (const TYPE *)j->scale, *bias = (const TYPE *)j->bias;    \
        TYPE *out = (TYPE *)j->gx, *ysave = (TYPE *)j->y;                                                   \
        const size_t bytes = (size_t)(d * T * (int64_t)sizeof(TYPE));                                       \
        TYPE *buf = (TYPE *)buf_get(bytes);                                                                 \
        if (!buf) { j->status = -1; return NULL; }                                                          \
        for (int64_t tile = j->t_begin; tile < j->t_end; ++tile) {                                          \
            const int64_t n0 = tile * T, rows = (j->n - n0) < T ? (j->n - n0) : T;                          \
            load_cols_##SUFFIX(buf, x, n0, rows, in_f, in_f, T);                                            \
            if (in_f < d) memset(buf + in_f * T, 0, (size_t)((d - in_f) * T) * sizeof(TYPE));               \
            if (widen)                                                                                      \
                for (int64_t f = 0; f < in_f; ++f)                                                          \
                    for (int64_t t = 0; t < T; ++t) buf[f * T + t] *= sc[f];                                \
            DISPATCH_T(fwd, SUFFIX, T, buf, j->ij, (const TYPE *)j->cs, j->k, 0,                            \
                       (TYPE)1, prefetch_distance(bytes))                                                   \
            if (ysave) store_cols_##SUFFIX(ysave, buf, n0, rows, d, d, T, NULL, NULL);                      \
            store_cols_##SUFFIX(out, buf, n0, rows, out_f, out_f, T, widen ? NULL : sc, bias);              \
        }                                                                                                   \
        buf_put(buf, bytes);                                                                                \
        return NULL;                                                                                        \
    }                                                                                                       \
    static void *lin_bwd_worker_##SUFFIX(void *arg) {                                                       \
        job_t *j = (job_t *)arg;                                                                            \
        const int64_t T = j->tile, d = j->d, in_f = j->in_f, out_f = j->out_f, k = j->k;                    \
        const int widen = out_f > in_f;                                                                     \
        const int64_t m = widen ? in_f : out_f;                                                             \
        const TYPE *g = (const TYPE *)j->gy, *ysave = (const TYPE *)j->y, *x = (const TYPE *)j->x;          \
        const TYPE *sc = (const TYPE *)j->scale;                                                            \
        TYPE *gx = (TYPE *)j->gx;                                                                           \
        double *acc = j->lacc + (int64_t)j->thread_id * (k + m + out_f);                                    \
        double *gs = acc + k, *gbias = acc + k + m;                                                         \
        const size_t bytes = (size_t)(d * T * (int64_t)sizeof(TYPE));                                       \
        TYPE *vb = (TYPE *)buf_get(bytes);                                                                  \
        TYPE *gb = (TYPE *)buf_get(bytes);                                                                  \
        if (!vb || !gb) { buf_put(vb, bytes); buf_put(gb, bytes); j->status = -1; return NULL; }            \
        for (int64_t tile = j->t_begin; tile < j->t_end; ++tile) {                                          \
            const int64_t n0 = tile * T, rows = (j->n - n0) < T ? (j->n - n0) : T;                          \
            load_##SUFFIX(vb, ysave, n0, rows, d, T);                                                       \
            for (int64_t t = 0; t < rows; ++t) { /* bias and (narrowing) scale gradients, row-major */      \
                const TYPE *gr = g + (n0 + t) * out_f, *yr = ysave + (n0 + t) * d;                          \
                for (int64_t f = 0; f < out_f; ++f) {                                                       \
                    gbias[f] += (double)gr[f];                                                              \
                    if (!widen) gs[f] += (double)gr[f] * (double)yr[f];                                     \
                }                                                                                           \
            }                                                                                               \
            load_cols_##SUFFIX(gb, g, n0, rows, out_f, out_f, T);                                           \
            if (out_f < d) memset(gb + out_f * T, 0, (size_t)((d - out_f) * T) * sizeof(TYPE));             \
            if (!widen)                                                                                     \
                for (int64_t f = 0; f < out_f; ++f)                                                         \
                    for (int64_t t = 0; t < T; ++t) gb[f * T + t] *= sc[f];                                 \
            DISPATCH_T(bwd, SUFFIX, T, vb, gb, j->ij, (const TYPE *)j->cs, k, 0,                            \
                       (TYPE)1, acc, prefetch_distance(2 * bytes))                                          \
            if (widen) /* scale gradient: sum_t g_in[t, f] x[t, f], column by column (x's lines stay in L1) */ \
                for (int64_t f = 0; f < in_f; ++f) {                                                        \
                    double sacc = 0;                                                                        \
                    for (int64_t t = 0; t < rows; ++t)                                                      \
                        sacc += (double)gb[f * T + t] * (double)x[(n0 + t) * in_f + f];                     \
                    gs[f] += sacc;                                                                          \
                }                                                                                           \
            store_cols_##SUFFIX(gx, gb, n0, rows, in_f, in_f, T, widen ? sc : NULL, NULL);                  \
        }                                                                                                   \
        buf_put(vb, bytes);                                                                                 \
        buf_put(gb, bytes);                                                                                 \
        return NULL;                                                                                        \
    }                                                                                                       \
    /* cs[2 r] = cos(angles[r]), cs[2 r + 1] = sin(angles[r]): the (k, 2) layout every C path reads */       \
    static void lin_coef_##SUFFIX(const TYPE *angles, TYPE *cs, int64_t k) {                                \
        for (int64_t r0 = 0; r0 < k; r0 += SINCOS_BLOCK) {                                                  \
            int64_t m = k - r0 < SINCOS_BLOCK ? k - r0 : SINCOS_BLOCK;                                      \
            double a[SINCOS_BLOCK], cd[SINCOS_BLOCK], sd[SINCOS_BLOCK];                                     \
            for (int64_t r = 0; r < m; ++r) a[r] = (double)angles[r0 + r];                                  \
            sincos_block(a, cd, sd, m);                                                                     \
            for (int64_t r = 0; r < m; ++r) {                                                               \
                cs[2 * (r0 + r)] = (TYPE)cd[r];                                                             \
                cs[2 * (r0 + r) + 1] = (TYPE)sd[r];                                                         \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    static void lin_reduce_##SUFFIX(const double *lacc, int nthr, int64_t width, int64_t k, int64_t m,      \
                                    int64_t out_f, TYPE *ga, TYPE *gs, TYPE *gbias) {                       \
        for (int64_t q = 0; q < width; ++q) {                                                               \
            double v = 0;                                                                                   \
            for (int t = 0; t < nthr; ++t) v += lacc[(int64_t)t * width + q];                               \
            if (q < k) ga[q] = (TYPE)v;                                                                     \
            else if (q < k + m) gs[q - k] = (TYPE)v;                                                        \
            else if (gbias) gbias[q - k - m] = (TYPE)v;                                                     \
        }                                                                                                   \
    }

DEFINE_LINEAR(float, f32)
DEFINE_LINEAR(double, f64)

/* Threads: torch's own OpenMP team when the Python side hands us its GOMP_parallel (no second pool whose  */
/* threads would compete with torch's spinning OpenMP workers for the same cores), else pthreads.          */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_int_fn)(void);
static gomp_parallel_fn gomp_parallel = NULL;
static omp_int_fn omp_thread_num = NULL, omp_num_threads = NULL;

typedef struct {
    void *(*worker)(void *);
    job_t *jobs;
    int njobs;
} omp_ctx_t;

static void omp_trampoline(void *arg) {
    omp_ctx_t *ctx = (omp_ctx_t *)arg;
    const int tid = omp_thread_num(), nthr = omp_num_threads();
    for (int j = tid; j < ctx->njobs; j += nthr) ctx->worker(&ctx->jobs[j]); /* the team may be smaller */
}

static int run_jobs(void *(*worker)(void *), job_t *proto, int nthreads) {
    const int64_t tiles = (proto->n + proto->tile - 1) / proto->tile;
    if (nthreads > tiles) nthreads = (int)tiles;
    if (nthreads < 1) nthreads = 1;
    job_t jobs[64];
    pthread_t th[64];
    int started[64];
    if (nthreads > 64) nthreads = 64;
    for (int t = 0; t < nthreads; ++t) {
        jobs[t] = *proto;
        jobs[t].thread_id = t;
        jobs[t].t_begin = tiles * t / nthreads;
        jobs[t].t_end = tiles * (t + 1) / nthreads;
        jobs[t].status = 0;
        started[t] = 0;
    }
    if (nthreads > 1 && gomp_parallel) {
        omp_ctx_t ctx = {worker, jobs, nthreads};
        gomp_parallel(omp_trampoline, &ctx, (unsigned)nthreads, 0);
    } else {
        for (int t = 1; t < nthreads; ++t) started[t] = pthread_create(&th[t], NULL, worker, &jobs[t]) == 0;
        worker(&jobs[0]);
        for (int t = 1; t < nthreads; ++t) {
            if (started[t]) pthread_join(th[t], NULL);
            else worker(&jobs[t]); /* could not start a thread: do its share here */
        }
    }
    for (int t = 0; t < nthreads; ++t)
        if (jobs[t].status) return jobs[t].status;
    return 0;
}

/* Nonzero if a pair of the (k, 2) array leaves [0, d) or has i == j, as reductions that vectorize: the largest
 * index and the smallest i ^ j (zero exactly when i == j). Once per plan (make_pairs). */
KAMA_CLONES static int check_pairs(const int32_t *restrict ij, int64_t k, int64_t d) {
    const uint32_t ud = d > 0x7fffffffLL ? 0x80000000u : (uint32_t)d;
    uint32_t most = 0, least_xor = 0xffffffffu;
    for (int64_t r = 0; r < k; ++r) {
        const uint32_t a = (uint32_t)ij[2 * r], b = (uint32_t)ij[2 * r + 1];
        const uint32_t x = a ^ b, m = a > b ? a : b;
        least_xor = least_xor < x ? least_xor : x;
        most = most > m ? most : m;
    }
    return k > 0 && (least_xor == 0 || most >= ud);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Python bindings. Every buffer arrives as a torch.Tensor object; its dtype, device (CPU), contiguity and  */
/* number of elements are checked against what the call will touch before any data is read or written, and */
/* its address is read from the object here: Python passes no raw address, and a wrong size is a Python    */
/* error, never an out-of-bounds access.                                                                    */
/*   make_pairs(pairs, d)                      pairs (k, 2) int32 -> a capsule of validated pairs            */
/*   forward(x, y, pairs, cs, n, d, tile, nthreads, transpose[, scale, prefetch, wide])                     */
/*   backward(y, gy, gx, gacc, pairs, cs, n, d, tile, nthreads, transpose[, prefetch, wide])                 */
/*   forward_blocked / backward_blocked: the same with the blocks capsule after pairs, [scale,] wide        */
/*   linear_forward(x, out, ysave, pairs, angles, scale, bias, n, in_f, out_f, tile, nthreads)              */
/*   linear_backward(g, ysave, x, gx, ga, gs, gbias, pairs, angles, scale, n, in_f, out_f, tile, nthreads)   */
/*   cos_sin(angles, cs); same_bytes(a, b); use_openmp(library_path)                                        */
/* cs: (k, 2) cos / sin (cos_sin's layout), in product order. tile = 1 (one row at a time) selects the row   */
/* walk. gacc (nthreads, k) float64 receives d L / d(applied angle) in product order; the caller negates it   */
/* for the transpose. Optional tensors (scale, ysave, bias, gbias) may be None.                              */
/* ---------------------------------------------------------------------------------------------------- */

static PyObject *torch_tensor_type, *dtype_f32, *dtype_f64, *dtype_i32, *dtype_i64;
static PyObject *s_dtype, *s_is_cpu, *s_is_contiguous, *s_numel, *s_nbytes, *s_data_ptr;

static int torch_refs(void) {
    if (torch_tensor_type) return 0;
    PyObject *torch = PyImport_ImportModule("torch");
    if (!torch) return -1;
    torch_tensor_type = PyObject_GetAttrString(torch, "Tensor");
    dtype_f32 = PyObject_GetAttrString(torch, "float32");
    dtype_f64 = PyObject_GetAttrString(torch, "float64");
    dtype_i32 = PyObject_GetAttrString(torch, "int32");
    dtype_i64 = PyObject_GetAttrString(torch, "int64");
    Py_DECREF(torch);
    s_dtype = PyUnicode_InternFromString("dtype");
    s_is_cpu = PyUnicode_InternFromString("is_cpu");
    s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
    s_numel = PyUnicode_InternFromString("numel");
    s_nbytes = PyUnicode_InternFromString("nbytes");
    s_data_ptr = PyUnicode_InternFromString("data_ptr");
    if (!torch_tensor_type || !dtype_f32 || !dtype_f64 || !dtype_i32 || !dtype_i64 || !s_dtype || !s_is_cpu || !s_is_contiguous
        || !s_numel || !s_nbytes || !s_data_ptr) {
        Py_CLEAR(torch_tensor_type);
        return -1;
    }
    return 0;
}

static const char *dtype_name(PyObject *dtype) {
    return dtype == dtype_f32 ? "torch.float32" : dtype == dtype_f64 ? "torch.float64"
        : dtype == dtype_i32 ? "torch.int32" : "torch.int64";
}

/* The memory of argument `name`: a contiguous CPU tensor of `dtype` with exactly `numel` elements (NULL with a
 * Python error otherwise). `t` may be None when `optional`: then *mem = NULL. Returns 0 on success. */
static int tensor_mem(PyObject *t, const char *name, PyObject *dtype, long long numel, int optional, void **mem) {
    *mem = NULL;
    if (optional && t == Py_None) return 0;
    if (torch_refs()) return -1;
    /* a C-level subtype check: torch.Tensor's metaclass answers isinstance() in Python, which costs ~1 us */
    if (!PyObject_TypeCheck(t, (PyTypeObject *)torch_tensor_type)) {
        PyErr_Format(PyExc_TypeError, "%s must be a torch.Tensor, got %s", name, Py_TYPE(t)->tp_name);
        return -1;
    }
    PyObject *v = PyObject_GetAttr(t, s_dtype);
    if (!v) return -1;
    int ok = v == dtype;
    Py_DECREF(v);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s", name, dtype_name(dtype));
        return -1;
    }
    v = PyObject_GetAttr(t, s_is_cpu);
    if (!v) return -1;
    ok = v == Py_True;
    Py_DECREF(v);
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s must be a CPU tensor", name);
        return -1;
    }
    v = PyObject_CallMethodNoArgs(t, s_is_contiguous);
    if (!v) return -1;
    ok = v == Py_True;
    Py_DECREF(v);
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s must be contiguous", name);
        return -1;
    }
    v = PyObject_GetAttr(t, s_nbytes);  /* a getter: cheaper than numel() */
    if (!v) return -1;
    long long got = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (got == -1 && PyErr_Occurred()) return -1;
    const long long esz = dtype == dtype_f64 || dtype == dtype_i64 ? 8 : 4;
    if (got != numel * esz) {
        PyErr_Format(PyExc_ValueError, "%s has %lld elements, the call needs %lld", name, got / esz, numel);
        return -1;
    }
    v = PyObject_CallMethodNoArgs(t, s_data_ptr);
    if (!v) return -1;
    *mem = PyLong_AsVoidPtr(v);
    Py_DECREF(v);
    if (PyErr_Occurred()) return -1;
    if (!*mem && numel > 0) {
        PyErr_Format(PyExc_ValueError, "%s has no storage", name);
        return -1;
    }
    return 0;
}

/* The float dtype of `x` (float32 or float64), or NULL with a TypeError. */
static PyObject *float_dtype(PyObject *x, const char *name) {
    if (torch_refs()) return NULL;
    PyObject *v = PyObject_GetAttr(x, s_dtype);
    if (!v) return NULL;
    Py_DECREF(v);  /* torch keeps the dtype objects alive */
    if (v == dtype_f32 || v == dtype_f64) return v;
    PyErr_Format(PyExc_TypeError, "%s must have dtype torch.float32 or torch.float64", name);
    return NULL;
}

/* Validated pairs: make_pairs(pairs, d) checks a (k, 2) int32 tensor once and copies it into memory that only
 * this module can reach, so the kernels need no per-call check (at k = 35k the check is ~1.7 us of a ~30 us
 * batch-1 forward) and never see an index outside [0, d). */
typedef struct {
    int32_t *ij;
    int64_t k, d;
} kama_pairs_t;

#define PAIRS_CAPSULE "kama._cgivens.pairs"

static void pairs_free(PyObject *capsule) {
    kama_pairs_t *p = (kama_pairs_t *)PyCapsule_GetPointer(capsule, PAIRS_CAPSULE);
    if (p) {
        free(p->ij);
        free(p);
    }
}

static PyObject *py_make_pairs(PyObject *self, PyObject *args) {
    PyObject *t;
    long long d;
    if (!PyArg_ParseTuple(args, "OL", &t, &d)) return NULL;
    if (d < 1) {
        PyErr_Format(PyExc_ValueError, "invalid sizes: d=%lld", d);
        return NULL;
    }
    if (torch_refs()) return NULL;
    PyObject *v = PyObject_TypeCheck(t, (PyTypeObject *)torch_tensor_type) ? PyObject_CallMethodNoArgs(t, s_numel)
                                                                             : NULL;
    if (!v) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "pairs must be a torch.Tensor");
        return NULL;
    }
    long long numel = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (numel < 0 || numel % 2) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "pairs has %lld elements, not 2 per rotation", numel);
        return NULL;
    }
    const long long k = numel / 2;
    void *ij;
    if (tensor_mem(t, "pairs", dtype_i32, numel, 0, &ij)) return NULL;
    if (check_pairs((const int32_t *)ij, k, d)) {
        PyErr_Format(PyExc_ValueError, "pairs must lie in [0, %lld) with i != j", d);
        return NULL;
    }
    kama_pairs_t *p = (kama_pairs_t *)malloc(sizeof *p);
    int32_t *copy = (int32_t *)malloc((size_t)(2 * (k > 0 ? k : 1)) * sizeof(int32_t));
    if (!p || !copy) {
        free(p);
        free(copy);
        return PyErr_NoMemory();
    }
    if (k > 0) memcpy(copy, (const int32_t *)ij, (size_t)(2 * k) * sizeof(int32_t));
    p->ij = copy;
    p->k = k;
    p->d = d;
    PyObject *capsule = PyCapsule_New(p, PAIRS_CAPSULE, pairs_free);
    if (!capsule) {
        free(copy);
        free(p);
    }
    return capsule;
}

/* The validated pairs of a make_pairs capsule (made for dimension d), or NULL with a Python error set. */
static const kama_pairs_t *get_pairs(PyObject *capsule, long long d) {
    if (!PyCapsule_IsValid(capsule, PAIRS_CAPSULE)) {
        PyErr_SetString(PyExc_TypeError, "pairs must be a capsule from _cgivens.make_pairs");
        return NULL;
    }
    const kama_pairs_t *p = (const kama_pairs_t *)PyCapsule_GetPointer(capsule, PAIRS_CAPSULE);
    if (!p) return NULL;
    if (p->d != d) {
        PyErr_Format(PyExc_ValueError, "pairs were made for d=%lld, not d=%lld", (long long)p->d, d);
        return NULL;
    }
    return p;
}

/* The validated pairs for a call of these sizes, or NULL with a Python ValueError / TypeError set. */
static const kama_pairs_t *check_args(long long n, long long d, long long tile, int nthreads, PyObject *pairs) {
    if (n < 0 || d < 1 || !VALID_TILE(tile) || nthreads < 1) {
        PyErr_Format(PyExc_ValueError, "invalid sizes: n=%lld d=%lld tile=%lld nthreads=%d", n, d, tile, nthreads);
        return NULL;
    }
    return get_pairs(pairs, d);
}

static PyObject *py_forward(PyObject *self, PyObject *args) {
    PyObject *tx, *ty, *pairs, *tcs, *tscale = Py_None;
    long long n, d, tile;
    int nthreads, transpose, prefetch = -1, wide = 0;
    if (!PyArg_ParseTuple(args, "OOOOLLLip|Oip", &tx, &ty, &pairs, &tcs, &n, &d, &tile, &nthreads, &transpose,
                          &tscale, &prefetch, &wide))
        return NULL;
    const kama_pairs_t *p = check_args(n, d, tile, nthreads, pairs);
    PyObject *dt = p ? float_dtype(tx, "x") : NULL;
    if (!dt) return NULL;
    void *x, *y, *cs, *scale;
    if (tensor_mem(tx, "x", dt, n * d, 0, &x) || tensor_mem(ty, "y", dt, n * d, 0, &y)
        || tensor_mem(tcs, "cs", dt, 2 * p->k, 0, &cs) || tensor_mem(tscale, "scale", dt, d, 1, &scale))
        return NULL;
    const int is_double = dt == dtype_f64;
    const int32_t *ij = p->ij;
    const int64_t k = p->k;
    if (n == 0) Py_RETURN_NONE;
    if (tile == 1) {
        rows_any(is_double, x, y, n, d, ij, cs, k, NULL, transpose, scale);
        Py_RETURN_NONE;
    }
    job_t proto = {.x = x, .y = y, .ij = ij, .cs = cs, .scale = scale, .n = n, .d = d, .k = k,
                   .transpose = transpose, .sgn = transpose ? -1.0 : 1.0, .tile = tile, .prefetch = prefetch,
                   .wide = wide};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_jobs(is_double ? fwd_worker_f64 : fwd_worker_f32, &proto, nthreads);
    Py_END_ALLOW_THREADS
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_backward(PyObject *self, PyObject *args) {
    PyObject *ty, *tgy, *tgx, *tgacc, *pairs, *tcs;
    long long n, d, tile;
    int nthreads, transpose, prefetch = -1, wide = 0;
    if (!PyArg_ParseTuple(args, "OOOOOOLLLip|ip", &ty, &tgy, &tgx, &tgacc, &pairs, &tcs, &n, &d, &tile, &nthreads,
                          &transpose, &prefetch, &wide))
        return NULL;
    const kama_pairs_t *p = check_args(n, d, tile, nthreads, pairs);
    PyObject *dt = p ? float_dtype(ty, "y") : NULL;
    if (!dt) return NULL;
    void *y, *gy, *gx, *gacc, *cs;
    if (tensor_mem(ty, "y", dt, n * d, 0, &y) || tensor_mem(tgy, "gy", dt, n * d, 0, &gy)
        || tensor_mem(tgx, "gx", dt, n * d, 0, &gx) || tensor_mem(tgacc, "gacc", dtype_f64, nthreads * p->k, 0, &gacc)
        || tensor_mem(tcs, "cs", dt, 2 * p->k, 0, &cs))
        return NULL;
    if (n == 0) Py_RETURN_NONE;
    /* the worker reads the saved output through j->y */
    job_t proto = {.y = y, .gy = gy, .gx = gx, .gacc = (double *)gacc, .ij = p->ij, .cs = cs, .n = n, .d = d,
                   .k = p->k, .transpose = transpose, .sgn = transpose ? -1.0 : 1.0, .tile = tile,
                   .prefetch = prefetch, .wide = wide};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_jobs(dt == dtype_f64 ? bwd_worker_f64 : bwd_worker_f32, &proto, nthreads);
    Py_END_ALLOW_THREADS
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Register-blocked groups: make_blocks(slots, d, k) checks a (groups, 8) int32 tensor of each group's slots
 * (8 distinct coordinates in [0, d)) for a plan of k >= 12 groups rotations and keeps a copy; a capsule. */
#define BLOCKS_CAPSULE "kama._cgivens.blocks"

static void blocks_free(PyObject *capsule) {
    kama_blocks_t *b = (kama_blocks_t *)PyCapsule_GetPointer(capsule, BLOCKS_CAPSULE);
    if (b) {
        free(b->slots);
        free(b);
    }
}

static PyObject *py_make_blocks(PyObject *self, PyObject *args) {
    PyObject *t;
    long long d, k;
    if (!PyArg_ParseTuple(args, "OLL", &t, &d, &k)) return NULL;
    if (torch_refs()) return NULL;
    PyObject *v = PyObject_TypeCheck(t, (PyTypeObject *)torch_tensor_type) ? PyObject_CallMethodNoArgs(t, s_numel)
                                                                             : NULL;
    if (!v) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "slots must be a torch.Tensor");
        return NULL;
    }
    long long numel = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (numel < 0 || numel % BLOCK || d < BLOCK || k < numel / BLOCK * GROUP_ROTS) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "invalid sizes: %lld slots, d=%lld, k=%lld", numel, d, k);
        return NULL;
    }
    void *mem;
    if (tensor_mem(t, "slots", dtype_i32, numel, 0, &mem)) return NULL;
    const int32_t *sl = (const int32_t *)mem;
    const int64_t groups = numel / BLOCK;
    for (int64_t g = 0; g < groups; ++g)
        for (int u = 0; u < BLOCK; ++u) {
            const int32_t a = sl[BLOCK * g + u];
            int bad = a < 0 || a >= d;
            for (int w = 0; w < u && !bad; ++w) bad = sl[BLOCK * g + w] == a;
            if (bad) {
                PyErr_Format(PyExc_ValueError, "slots of group %lld must be 8 distinct coordinates in [0, %lld)",
                             (long long)g, d);
                return NULL;
            }
        }
    kama_blocks_t *b = (kama_blocks_t *)malloc(sizeof *b);
    int32_t *copy = (int32_t *)malloc((size_t)(numel > 0 ? numel : 1) * sizeof(int32_t));
    if (!b || !copy) {
        free(b);
        free(copy);
        return PyErr_NoMemory();
    }
    if (numel) memcpy(copy, sl, (size_t)numel * sizeof(int32_t));
    b->slots = copy;
    b->groups = groups;
    b->k = k;
    b->d = d;
    PyObject *capsule = PyCapsule_New(b, BLOCKS_CAPSULE, blocks_free);
    if (!capsule) {
        free(copy);
        free(b);
    }
    return capsule;
}

/* The groups of a make_blocks capsule made for the pairs p, or NULL with a Python error set. */
static const kama_blocks_t *get_blocks(PyObject *capsule, const kama_pairs_t *p) {
    if (!PyCapsule_IsValid(capsule, BLOCKS_CAPSULE)) {
        PyErr_SetString(PyExc_TypeError, "blocks must be a capsule from _cgivens.make_blocks");
        return NULL;
    }
    const kama_blocks_t *b = (const kama_blocks_t *)PyCapsule_GetPointer(capsule, BLOCKS_CAPSULE);
    if (!b) return NULL;
    if (b->k != p->k || b->d != p->d) {
        PyErr_Format(PyExc_ValueError, "blocks were made for k=%lld, d=%lld, not the pairs' k=%lld, d=%lld",
                     (long long)b->k, (long long)b->d, (long long)p->k, (long long)p->d);
        return NULL;
    }
    return b;
}

/* forward_blocked(x, y, pairs, blocks, cs, n, d, tile, nthreads, transpose[, scale, wide]): as forward, for a plan with
 * register-blocked groups; tile a multiple of the vector width (8 float32, 4 float64), or 1: row by row. */
static PyObject *py_forward_blocked(PyObject *self, PyObject *args) {
    PyObject *tx, *ty, *pairs, *blocks, *tcs, *tscale = Py_None;
    long long n, d, tile;
    int nthreads, transpose, wide = 0;
    if (!PyArg_ParseTuple(args, "OOOOOLLLip|Op", &tx, &ty, &pairs, &blocks, &tcs, &n, &d, &tile, &nthreads,
                          &transpose, &tscale, &wide))
        return NULL;
    const kama_pairs_t *p = check_args(n, d, tile, nthreads, pairs);
    const kama_blocks_t *b = p ? get_blocks(blocks, p) : NULL;
    PyObject *dt = b ? float_dtype(tx, "x") : NULL;
    if (!dt) return NULL;
    const int is_double = dt == dtype_f64;
    if (tile != 1 && tile % (is_double ? 4 : 8)) {
        PyErr_Format(PyExc_ValueError, "invalid sizes: tile=%lld is not 1 or a multiple of the vector width", tile);
        return NULL;
    }
    void *x, *y, *cs, *scale;
    if (tensor_mem(tx, "x", dt, n * d, 0, &x) || tensor_mem(ty, "y", dt, n * d, 0, &y)
        || tensor_mem(tcs, "cs", dt, 2 * p->k, 0, &cs) || tensor_mem(tscale, "scale", dt, d, 1, &scale))
        return NULL;
    if (n == 0) Py_RETURN_NONE;
    if (tile == 1) { /* row by row on one thread, as forward's row walk */
        rows_any(is_double, x, y, n, d, p->ij, cs, p->k, b, transpose, scale);
        Py_RETURN_NONE;
    }
    job_t proto = {.x = x, .y = y, .ij = p->ij, .cs = cs, .scale = scale, .n = n, .d = d, .k = p->k,
                   .transpose = transpose, .sgn = transpose ? -1.0 : 1.0, .tile = tile, .blocks = b, .wide = wide};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_jobs(is_double ? blk_fwd_worker_f64 : blk_fwd_worker_f32, &proto, nthreads);
    Py_END_ALLOW_THREADS
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* backward_blocked(y, gy, gx, gacc, pairs, blocks, cs, n, d, tile, nthreads, transpose[, wide]): as backward. */
static PyObject *py_backward_blocked(PyObject *self, PyObject *args) {
    PyObject *ty, *tgy, *tgx, *tgacc, *pairs, *blocks, *tcs;
    long long n, d, tile;
    int nthreads, transpose, wide = 0;
    if (!PyArg_ParseTuple(args, "OOOOOOOLLLip|p", &ty, &tgy, &tgx, &tgacc, &pairs, &blocks, &tcs, &n, &d, &tile,
                          &nthreads, &transpose, &wide))
        return NULL;
    const kama_pairs_t *p = check_args(n, d, tile, nthreads, pairs);
    const kama_blocks_t *b = p ? get_blocks(blocks, p) : NULL;
    PyObject *dt = b ? float_dtype(ty, "y") : NULL;
    if (!dt) return NULL;
    const int is_double = dt == dtype_f64;
    if (tile % (is_double ? 4 : 8)) {
        PyErr_Format(PyExc_ValueError, "invalid sizes: tile=%lld is not a multiple of the vector width", tile);
        return NULL;
    }
    void *y, *gy, *gx, *gacc, *cs;
    if (tensor_mem(ty, "y", dt, n * d, 0, &y) || tensor_mem(tgy, "gy", dt, n * d, 0, &gy)
        || tensor_mem(tgx, "gx", dt, n * d, 0, &gx) || tensor_mem(tgacc, "gacc", dtype_f64, nthreads * p->k, 0, &gacc)
        || tensor_mem(tcs, "cs", dt, 2 * p->k, 0, &cs))
        return NULL;
    if (n == 0) Py_RETURN_NONE;
    job_t proto = {.y = y, .gy = gy, .gx = gx, .gacc = (double *)gacc, .ij = p->ij, .cs = cs, .n = n, .d = d,
                   .k = p->k, .transpose = transpose, .sgn = transpose ? -1.0 : 1.0, .tile = tile, .blocks = b,
                   .wide = wide};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_jobs(is_double ? blk_bwd_worker_f64 : blk_bwd_worker_f32, &proto, nthreads);
    Py_END_ALLOW_THREADS
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Sizes and pairs of a fused-layer call; sets *d = max(in_f, out_f). The pairs, or NULL with an error set. */
static const kama_pairs_t *lin_check(long long n, long long in_f, long long out_f, long long tile, int nthreads,
                                     PyObject *pairs, long long *d) {
    if (in_f < 1 || out_f < 1) {
        PyErr_Format(PyExc_ValueError, "invalid sizes: in_f=%lld out_f=%lld", in_f, out_f);
        return NULL;
    }
    *d = in_f > out_f ? in_f : out_f;
    return check_args(n, *d, tile, nthreads, pairs);
}

/* cos and sin of the k angles, interleaved, in a pooled buffer of *bytes bytes (NULL if out of memory). */
static char *lin_coefficients(const void *angles, long long k, int is_double, size_t *bytes) {
    const size_t esz = is_double ? sizeof(double) : sizeof(float);
    *bytes = (size_t)(2 * (k > 0 ? k : 1)) * esz;
    char *coef = (char *)buf_get(*bytes);
    if (!coef) return NULL;
    if (is_double) lin_coef_f64((const double *)angles, (double *)coef, k);
    else lin_coef_f32((const float *)angles, (float *)coef, k);
    return coef;
}

/* ysave (n, max(in_f, out_f)) may be None (no gradient needed), bias may be None. */
static PyObject *py_linear_forward(PyObject *self, PyObject *args) {
    PyObject *tx, *tout, *tys, *pairs, *tang, *tscale, *tbias;
    long long n, in_f, out_f, tile;
    int nthreads;
    if (!PyArg_ParseTuple(args, "OOOOOOOLLLLi", &tx, &tout, &tys, &pairs, &tang, &tscale, &tbias, &n, &in_f, &out_f,
                          &tile, &nthreads))
        return NULL;
    long long d;
    const kama_pairs_t *p = lin_check(n, in_f, out_f, tile, nthreads, pairs, &d);
    PyObject *dt = p ? float_dtype(tx, "x") : NULL;
    if (!dt) return NULL;
    const long long m = in_f < out_f ? in_f : out_f;
    void *x, *out, *ysave, *angles, *scale, *bias;
    if (tensor_mem(tx, "x", dt, n * in_f, 0, &x) || tensor_mem(tout, "out", dt, n * out_f, 0, &out)
        || tensor_mem(tys, "ysave", dt, n * d, 1, &ysave) || tensor_mem(tang, "angles", dt, p->k, 0, &angles)
        || tensor_mem(tscale, "scale", dt, m, 0, &scale) || tensor_mem(tbias, "bias", dt, out_f, 1, &bias))
        return NULL;
    const int is_double = dt == dtype_f64;
    if (n == 0) Py_RETURN_NONE;
    size_t cbytes;
    char *coef = lin_coefficients(angles, p->k, is_double, &cbytes);
    if (!coef) return PyErr_NoMemory();
    job_t proto = {.x = x, .gx = out, .y = ysave, .ij = p->ij, .cs = coef, .scale = scale, .bias = bias, .n = n,
                   .d = d, .k = p->k, .in_f = in_f, .out_f = out_f, .tile = tile, .prefetch = -1};
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_jobs(is_double ? lin_fwd_worker_f64 : lin_fwd_worker_f32, &proto, nthreads);
    Py_END_ALLOW_THREADS
    buf_put(coef, cbytes);
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* gx (n, in_f), ga (k,), gs (min(in_f, out_f),), gbias (out_f,) or None. */
static PyObject *py_linear_backward(PyObject *self, PyObject *args) {
    PyObject *tg, *tys, *tx, *tgx, *tga, *tgs, *tgb, *pairs, *tang, *tscale;
    long long n, in_f, out_f, tile;
    int nthreads;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOLLLLi", &tg, &tys, &tx, &tgx, &tga, &tgs, &tgb, &pairs, &tang, &tscale,
                          &n, &in_f, &out_f, &tile, &nthreads))
        return NULL;
    long long d;
    const kama_pairs_t *p = lin_check(n, in_f, out_f, tile, nthreads, pairs, &d);
    PyObject *dt = p ? float_dtype(tg, "g") : NULL;
    if (!dt) return NULL;
    const int64_t k = p->k;
    const long long m = in_f < out_f ? in_f : out_f;
    void *g, *ysave, *x, *gx, *ga, *gs, *gbias, *angles, *scale;
    if (tensor_mem(tg, "g", dt, n * out_f, 0, &g) || tensor_mem(tys, "ysave", dt, n * d, 0, &ysave)
        || tensor_mem(tx, "x", dt, n * in_f, 0, &x) || tensor_mem(tgx, "gx", dt, n * in_f, 0, &gx)
        || tensor_mem(tga, "ga", dt, k, 0, &ga) || tensor_mem(tgs, "gs", dt, m, 0, &gs)
        || tensor_mem(tgb, "gbias", dt, out_f, 1, &gbias) || tensor_mem(tang, "angles", dt, k, 0, &angles)
        || tensor_mem(tscale, "scale", dt, m, 0, &scale))
        return NULL;
    const int is_double = dt == dtype_f64;
    const int64_t tiles = (n + tile - 1) / tile;
    int nthr = nthreads > 64 ? 64 : nthreads;
    if (nthr > tiles) nthr = tiles > 0 ? (int)tiles : 1;
    const int64_t width = k + m + out_f;
    const size_t abytes = (size_t)(nthr * width) * sizeof(double);
    size_t cbytes;
    double *lacc = (double *)buf_get(abytes);
    char *coef = lin_coefficients(angles, k, is_double, &cbytes);
    if (!lacc || !coef) { buf_put(lacc, abytes); buf_put(coef, cbytes); return PyErr_NoMemory(); }
    memset(lacc, 0, abytes);
    job_t proto = {.gy = g, .y = ysave, .x = x, .gx = gx, .lacc = lacc, .ij = p->ij, .cs = coef, .scale = scale,
                   .n = n, .d = d, .k = k, .in_f = in_f, .out_f = out_f, .tile = tile, .prefetch = -1};
    int status = 0;
    if (n > 0) {
        Py_BEGIN_ALLOW_THREADS
        status = run_jobs(is_double ? lin_bwd_worker_f64 : lin_bwd_worker_f32, &proto, nthr);
        Py_END_ALLOW_THREADS
    }
    if (!status) {
        if (is_double) lin_reduce_f64(lacc, nthr, width, k, m, out_f, (double *)ga, (double *)gs, (double *)gbias);
        else lin_reduce_f32(lacc, nthr, width, k, m, out_f, (float *)ga, (float *)gs, (float *)gbias);
    }
    buf_put(lacc, abytes);
    buf_put(coef, cbytes);
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* cos_sin(angles, cs): the coefficients every C path uses (one libm, bit-identical paths), as the (k, 2) tensor
 * cs[r] = (cos angles[r], sin angles[r]). */
static PyObject *py_cos_sin(PyObject *self, PyObject *args) {
    PyObject *tang, *tcs;
    if (!PyArg_ParseTuple(args, "OO", &tang, &tcs)) return NULL;
    PyObject *dt = float_dtype(tang, "angles");
    if (!dt) return NULL;
    PyObject *v = PyObject_CallMethodNoArgs(tang, s_numel);
    if (!v) return NULL;
    long long k = PyLong_AsLongLong(v);
    Py_DECREF(v);
    void *angles, *cs;
    if (tensor_mem(tang, "angles", dt, k, 0, &angles) || tensor_mem(tcs, "cs", dt, 2 * k, 0, &cs)) return NULL;
    if (dt == dtype_f64) lin_coef_f64((const double *)angles, (double *)cs, k);
    else lin_coef_f32((const float *)angles, (float *)cs, k);
    Py_RETURN_NONE;
}

/* same_bytes(a, b): whether two tensors of one dtype (float32, float64, int32 or int64) and size hold the same bytes
 * (the caches' value checks: a tenth of torch.equal's cost). Equal bytes imply equal values, so a hit is never
 * wrong; another dtype or size is simply not the same. */
static PyObject *py_same_bytes(PyObject *self, PyObject *args) {
    PyObject *ta, *tb;
    if (!PyArg_ParseTuple(args, "OO", &ta, &tb)) return NULL;
    if (torch_refs()) return NULL;
    if (!PyObject_TypeCheck(ta, (PyTypeObject *)torch_tensor_type)) {
        PyErr_SetString(PyExc_TypeError, "a must be a torch.Tensor");
        return NULL;
    }
    PyObject *dt = PyObject_GetAttr(ta, s_dtype);
    if (!dt) return NULL;
    Py_DECREF(dt);  /* torch keeps the dtype objects alive */
    size_t esz;
    if (dt == dtype_f32 || dt == dtype_i32) esz = 4;
    else if (dt == dtype_f64 || dt == dtype_i64) esz = 8;
    else {
        PyErr_SetString(PyExc_TypeError, "a must have dtype torch.float32, float64, int32 or int64");
        return NULL;
    }
    PyObject *v = PyObject_CallMethodNoArgs(ta, s_numel);
    if (!v) return NULL;
    long long numel = PyLong_AsLongLong(v);
    Py_DECREF(v);
    void *a, *b;
    if (tensor_mem(ta, "a", dt, numel, 0, &a)) return NULL;
    if (tensor_mem(tb, "b", dt, numel, 0, &b)) {  /* another dtype, size or layout: not the same bytes */
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    const size_t nbytes = (size_t)numel * esz;
    if (nbytes == 0 || a == b || memcmp(a, b, nbytes) == 0) Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

#if defined(__linux__)
#include <dlfcn.h>
#endif

/* use_openmp(path): run threads on the OpenMP runtime already loaded from `path` (torch's libgomp), so that they
 * never compete with torch's spinning workers; use_openmp(None): pthreads. Returns whether OpenMP is in use. */
static PyObject *py_use_openmp(PyObject *self, PyObject *args) {
    const char *path = NULL;
    if (!PyArg_ParseTuple(args, "z", &path)) return NULL;
    gomp_parallel = NULL;
    omp_thread_num = omp_num_threads = NULL;
#if defined(__linux__)
    if (path) {
        void *lib = dlopen(path, RTLD_NOLOAD | RTLD_LAZY);
        if (lib) {
            gomp_parallel_fn par = (gomp_parallel_fn)dlsym(lib, "GOMP_parallel");
            omp_int_fn num = (omp_int_fn)dlsym(lib, "omp_get_thread_num");
            omp_int_fn tot = (omp_int_fn)dlsym(lib, "omp_get_num_threads");
            if (par && num && tot) {
                gomp_parallel = par;
                omp_thread_num = num;
                omp_num_threads = tot;
            }
        }
    }
#endif
    return PyBool_FromLong(gomp_parallel != NULL);
}

static PyMethodDef methods[] = {
    {"use_openmp", py_use_openmp, METH_VARARGS,
     "Run threads on the OpenMP runtime loaded from this path (None: pthreads); whether OpenMP is in use."},
    {"make_pairs", py_make_pairs, METH_VARARGS, "Validate a (k, 2) int32 pairs tensor for dimension d; a capsule."},
    {"forward", py_forward, METH_VARARGS, "Apply rotations in application order to a row-major batch."},
    {"make_blocks", py_make_blocks, METH_VARARGS, "Validate a (groups, 8) int32 slots tensor; a capsule."},
    {"forward_blocked", py_forward_blocked, METH_VARARGS, "forward for register-blocked plans."},
    {"backward_blocked", py_backward_blocked, METH_VARARGS, "backward for register-blocked plans."},
    {"backward", py_backward, METH_VARARGS, "Backward from the saved output (see _cgivens.c)."},
    {"cos_sin", py_cos_sin, METH_VARARGS, "cos and sin of k angles (float or double), as (k, 2)."},
    {"same_bytes", py_same_bytes, METH_VARARGS, "Whether two buffers of nbytes bytes are identical."},
    {"linear_forward", py_linear_forward, METH_VARARGS, "Fused KamaLinear forward (see _cgivens.c)."},
    {"linear_backward", py_linear_backward, METH_VARARGS, "Fused KamaLinear backward (see _cgivens.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cgivens", "Compiled Givens kernels.", -1, methods};

/* Bumped whenever a kernel's speed may change: tuned settings measured for another version are remeasured. */
#define KERNEL_VERSION 7

PyMODINIT_FUNC PyInit__cgivens(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "KERNEL_VERSION", KERNEL_VERSION)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
