/* Micro-benchmarks of the CPU walk's inner loop (benchmarks/bench_kernel_bounds.py compiles and runs this).
 * A (d, T) float tile in feature-major layout, T batch columns per row; one "rotation-vector" is one rotation
 * applied to 8 consecutive columns (one 256-bit vector). Each variant prints nanoseconds per rotation-vector;
 * with the clock estimate (a chain of dependent integer adds, one cycle each) they become cycles. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef T
#define T 64
#endif
/* the 512-bit variants run on AVX-512 cores only (elsewhere the compiler emulates them with 256-bit halves) */
#if defined(__AVX512F__) && T >= 16
#define WIDE 1
#else
#define WIDE 0
#endif
typedef float vf __attribute__((vector_size(32), aligned(4)));
/* 512-bit vectors (the kernel's wide loops): dereferenced, not memcpy'd, which GCC would split at 256 bits */
typedef float vw __attribute__((vector_size(64), aligned(4), may_alias));

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* the production loop: 2 loads, 2 stores, 2 mul + 2 fma per rotation-vector, rows at random; the vectors written
 * out as in the kernel (a loop over floats would test the two rows for overlap at every rotation) */
typedef float vn __attribute__((vector_size(32), aligned(4), may_alias));
#define ROTATE_ROWS(a, b, c, s)                                                                             \
    for (int t = 0; t < T; t += 8) {                                                                        \
        const vn va = *(const vn *)((a) + t), vb = *(const vn *)((b) + t);                                  \
        *(vn *)((a) + t) = (c) * va - (s) * vb; *(vn *)((b) + t) = (s) * va + (c) * vb;                     \
    }
__attribute__((noinline)) void walk(float *restrict buf, const int32_t *restrict ij, const float *restrict cs, int64_t k) {
    for (int64_t r = k - 1; r >= 0; --r) {
        float *a = buf + (int64_t)ij[2 * r] * T, *b = buf + (int64_t)ij[2 * r + 1] * T;
        const float c = cs[2 * r], s = cs[2 * r + 1];
        ROTATE_ROWS(a, b, c, s)
    }
}
/* loads only: both rows read and summed into one accumulator per vector of the row (T / 8 independent add
 * chains, so that the adds' latency does not bound it), nothing stored */
__attribute__((noinline)) float loads(const float *restrict buf, const int32_t *restrict ij, int64_t k) {
    vf acc[T / 8];
    memset(acc, 0, sizeof acc);
    for (int64_t r = k - 1; r >= 0; --r) {
        const float *a = buf + (int64_t)ij[2 * r] * T, *b = buf + (int64_t)ij[2 * r + 1] * T;
        for (int t = 0; t < T; t += 8) acc[t / 8] += *(const vn *)(a + t) + *(const vn *)(b + t);
    }
    float s = 0; for (int u = 0; u < T / 8; ++u) for (int l = 0; l < 8; ++l) s += acc[u][l]; return s;
}
/* stores only: both rows written, nothing read */
__attribute__((noinline)) void stores(float *restrict buf, const int32_t *restrict ij, const float *restrict cs, int64_t k) {
    for (int64_t r = k - 1; r >= 0; --r) {
        float *a = buf + (int64_t)ij[2 * r] * T, *b = buf + (int64_t)ij[2 * r + 1] * T;
        vf c = {cs[2 * r], cs[2 * r], cs[2 * r], cs[2 * r], cs[2 * r], cs[2 * r], cs[2 * r], cs[2 * r]};
        for (int t = 0; t < T; t += 8) { *(vn *)(a + t) = c; *(vn *)(b + t) = c; }
    }
}
/* FP only: the rotation's arithmetic on 8 register-resident vector pairs (independent chains), no memory */
__attribute__((noinline)) float fp_only(const float *restrict cs, int64_t k) {
    vf x[8], y[8];
    for (int u = 0; u < 8; ++u) for (int l = 0; l < 8; ++l) { x[u][l] = 1.0f + u + l; y[u][l] = 0.5f * u - l; }
    for (int64_t r = 0; r < k; ++r) {
        const float c = cs[2 * r], s = cs[2 * r + 1];
        for (int u = 0; u < 8; ++u) { vf t = x[u]; x[u] = c * t - s * y[u]; y[u] = s * t + c * y[u]; }
    }
    float z = 0; for (int u = 0; u < 8; ++u) z += x[u][0] + y[u][7]; return z;
}
/* the walk on disjoint row pairs in a fixed cycle: no rotation reads a row that an earlier one just stored */
__attribute__((noinline)) void nodep(float *restrict buf, const float *restrict cs, int64_t k, int64_t d) {
    for (int64_t r = 0; r < k; ++r) {
        const int64_t i = (2 * r) % d, j = (2 * r + 1) % d;
        float *a = buf + i * T, *b = buf + j * T;
        const float c = cs[2 * r], s = cs[2 * r + 1];
        ROTATE_ROWS(a, b, c, s)
    }
}
/* register-blocked groups: 8 rows loaded once, 12 butterfly rotations in registers, stored once. Every variant
 * dereferences its vectors: a memcpy into a vector array goes through the stack on some tunings (split in 128-bit
 * halves and stalled on store forwarding; 14 ns per rotation-vector for `loads` on a Zen 3) */
#define ROT(x, y, c, s) { vf t_ = x; x = c * t_ - s * y; y = s * t_ + c * y; }
__attribute__((noinline)) void blocked(float *restrict buf, const int32_t *restrict slots, const float *restrict cs, int64_t groups) {
    for (int64_t g = 0; g < groups; ++g) {
        const int32_t *sl = slots + 8 * g; const float *q = cs + 24 * g;
        float *p[8]; for (int u = 0; u < 8; ++u) p[u] = buf + (int64_t)sl[u] * T;
        for (int t = 0; t < T; t += 8) {
            vf v[8]; for (int u = 0; u < 8; ++u) v[u] = *(const vn *)(p[u] + t);
            ROT(v[0], v[1], q[0], q[1]) ROT(v[2], v[3], q[2], q[3]) ROT(v[4], v[5], q[4], q[5]) ROT(v[6], v[7], q[6], q[7])
            ROT(v[0], v[2], q[8], q[9]) ROT(v[1], v[3], q[10], q[11]) ROT(v[4], v[6], q[12], q[13]) ROT(v[5], v[7], q[14], q[15])
            ROT(v[0], v[4], q[16], q[17]) ROT(v[1], v[5], q[18], q[19]) ROT(v[2], v[6], q[20], q[21]) ROT(v[3], v[7], q[22], q[23])
            for (int u = 0; u < 8; ++u) *(vn *)(p[u] + t) = v[u];
        }
    }
}
/* the walk and the blocked groups with 512-bit vectors (16 columns per operation; T >= 16) */
__attribute__((noinline)) void walk512(float *restrict buf, const int32_t *restrict ij, const float *restrict cs, int64_t k) {
    for (int64_t r = k - 1; r >= 0; --r) {
        float *restrict a = buf + (int64_t)ij[2 * r] * T, *restrict b = buf + (int64_t)ij[2 * r + 1] * T;
        const float c = cs[2 * r], s = cs[2 * r + 1];
        for (int t = 0; t + 16 <= T; t += 16) {
            const vw va = *(const vw *)(a + t), vb = *(const vw *)(b + t);
            *(vw *)(a + t) = c * va - s * vb; *(vw *)(b + t) = s * va + c * vb;
        }
    }
}
#define ROTW(x, y, c, s) { vw t_ = x; x = c * t_ - s * y; y = s * t_ + c * y; }
__attribute__((noinline)) void blocked512(float *restrict buf, const int32_t *restrict slots, const float *restrict cs, int64_t groups) {
    for (int64_t g = 0; g < groups; ++g) {
        const int32_t *sl = slots + 8 * g; const float *q = cs + 24 * g;
        float *p[8]; for (int u = 0; u < 8; ++u) p[u] = buf + (int64_t)sl[u] * T;
        for (int t = 0; t + 16 <= T; t += 16) {
            vw v[8]; for (int u = 0; u < 8; ++u) v[u] = *(const vw *)(p[u] + t);
            ROTW(v[0], v[1], q[0], q[1]) ROTW(v[2], v[3], q[2], q[3]) ROTW(v[4], v[5], q[4], q[5]) ROTW(v[6], v[7], q[6], q[7])
            ROTW(v[0], v[2], q[8], q[9]) ROTW(v[1], v[3], q[10], q[11]) ROTW(v[4], v[6], q[12], q[13]) ROTW(v[5], v[7], q[14], q[15])
            ROTW(v[0], v[4], q[16], q[17]) ROTW(v[1], v[5], q[18], q[19]) ROTW(v[2], v[6], q[20], q[21]) ROTW(v[3], v[7], q[22], q[23])
            for (int u = 0; u < 8; ++u) *(vw *)(p[u] + t) = v[u];
        }
    }
}
/* the arithmetic only with 512-bit vectors (16 columns per operation): the FP pipes' bound of the wide loops at
 * the clock the core keeps while running them (some cores lower it under 512-bit FMAs) */
__attribute__((noinline)) float fp_only512(const float *restrict cs, int64_t k) {
    vw x[8], y[8];
    for (int u = 0; u < 8; ++u) for (int l = 0; l < 16; ++l) { x[u][l] = 1.0f + u + l; y[u][l] = 0.5f * u - l; }
    for (int64_t r = 0; r < k; ++r) {
        const float c = cs[2 * r], s = cs[2 * r + 1];
        for (int u = 0; u < 8; ++u) { vw t = x[u]; x[u] = c * t - s * y[u]; y[u] = s * t + c * y[u]; }
    }
    float z = 0; for (int u = 0; u < 8; ++u) z += x[u][0] + y[u][15]; return z;
}
/* 16-coordinate groups with 512-bit vectors: 16 rows of one 16-column chunk in registers, 32 rotations (four
 * butterfly rounds), 32 memory operations per 32 rotations (the 8-coordinate groups: 16 per 12) */
#define ROUNDS16 \
    ROTW(v[0], v[1], q[0], q[1]) ROTW(v[2], v[3], q[2], q[3]) ROTW(v[4], v[5], q[4], q[5]) ROTW(v[6], v[7], q[6], q[7]) ROTW(v[8], v[9], q[8], q[9]) ROTW(v[10], v[11], q[10], q[11]) ROTW(v[12], v[13], q[12], q[13]) ROTW(v[14], v[15], q[14], q[15]) \
    ROTW(v[0], v[2], q[16], q[17]) ROTW(v[1], v[3], q[18], q[19]) ROTW(v[4], v[6], q[20], q[21]) ROTW(v[5], v[7], q[22], q[23]) ROTW(v[8], v[10], q[24], q[25]) ROTW(v[9], v[11], q[26], q[27]) ROTW(v[12], v[14], q[28], q[29]) ROTW(v[13], v[15], q[30], q[31]) \
    ROTW(v[0], v[4], q[32], q[33]) ROTW(v[1], v[5], q[34], q[35]) ROTW(v[2], v[6], q[36], q[37]) ROTW(v[3], v[7], q[38], q[39]) ROTW(v[8], v[12], q[40], q[41]) ROTW(v[9], v[13], q[42], q[43]) ROTW(v[10], v[14], q[44], q[45]) ROTW(v[11], v[15], q[46], q[47]) \
    ROTW(v[0], v[8], q[48], q[49]) ROTW(v[1], v[9], q[50], q[51]) ROTW(v[2], v[10], q[52], q[53]) ROTW(v[3], v[11], q[54], q[55]) ROTW(v[4], v[12], q[56], q[57]) ROTW(v[5], v[13], q[58], q[59]) ROTW(v[6], v[14], q[60], q[61]) ROTW(v[7], v[15], q[62], q[63])
__attribute__((noinline)) void blocked16(float *restrict buf, const int32_t *restrict slots, const float *restrict cs, int64_t groups) {
    for (int64_t g = 0; g < groups; ++g) {
        const int32_t *sl = slots + 16 * g;
        float *p[16]; for (int u = 0; u < 16; ++u) p[u] = buf + (int64_t)sl[u] * T;
        for (int t = 0; t + 16 <= T; t += 16) {
            const float *q = cs + 64 * g;
            vw v[16]; for (int u = 0; u < 16; ++u) v[u] = *(const vw *)(p[u] + t);
            ROUNDS16
            for (int u = 0; u < 16; ++u) *(vw *)(p[u] + t) = v[u];
        }
    }
}
/* the register-blocked backward with 512-bit vectors (the kernel's wide blocked backward): per 16-column chunk a
 * group's 8 rows of the saved output (v) and 8 of its gradient (w, a second d x T tile after the first) are loaded
 * once, rotated back 12 times with the angle gradients summed in 12 vector accumulators, and stored once; the
 * accumulators' lanes are added up once per group. Per rotation-vector: 32 / 12 memory operations, 10 multiplies
 * or FMAs and an add (the forward: 16 / 12 and 4). `bwd512_mem` keeps its loads and stores only (the values pass
 * through an empty asm, so that the compiler keeps them) and `bwd512_fp` its arithmetic only, on registers. */
#if WIDE
#include <immintrin.h>
#define SUM512(v) _mm512_reduce_add_ps((__m512)(v))
#define KEEP(v) __asm__("" : "+v"(v))
#else /* compiled but not run without AVX-512 (main checks WIDE), where no register holds a 512-bit vector */
static float sum512(vw v) { float h = 0; for (int l = 0; l < 16; ++l) h += v[l]; return h; }
#define SUM512(v) sum512(v)
#define KEEP(v) __asm__("" : "+m"(v))
#endif
#define UNROTW(x, y, gx, gy, c, s, a) { const vw a1 = x, b1 = y, a2 = gx, b2 = gy; a += b2 * a1 - a2 * b1; \
    x = c * a1 + s * b1; y = c * b1 - s * a1; gx = c * a2 + s * b2; gy = c * b2 - s * a2; }
#define BWD_ROUNDS                                                                                          \
    UNROTW(v[3], v[7], w[3], w[7], q[22], q[23], acc[11]) UNROTW(v[2], v[6], w[2], w[6], q[20], q[21], acc[10])    \
    UNROTW(v[1], v[5], w[1], w[5], q[18], q[19], acc[9]) UNROTW(v[0], v[4], w[0], w[4], q[16], q[17], acc[8])      \
    UNROTW(v[5], v[7], w[5], w[7], q[14], q[15], acc[7]) UNROTW(v[4], v[6], w[4], w[6], q[12], q[13], acc[6])      \
    UNROTW(v[1], v[3], w[1], w[3], q[10], q[11], acc[5]) UNROTW(v[0], v[2], w[0], w[2], q[8], q[9], acc[4])        \
    UNROTW(v[6], v[7], w[6], w[7], q[6], q[7], acc[3]) UNROTW(v[4], v[5], w[4], w[5], q[4], q[5], acc[2])          \
    UNROTW(v[2], v[3], w[2], w[3], q[2], q[3], acc[1]) UNROTW(v[0], v[1], w[0], w[1], q[0], q[1], acc[0])
__attribute__((noinline)) void bwd512(float *restrict buf, const int32_t *restrict slots, const float *restrict cs,
                                      int64_t groups, int64_t d, double *restrict gacc) {
    const int64_t go = d * T;
    for (int64_t g = groups - 1; g >= 0; --g) {
        const int32_t *sl = slots + 8 * g; const float *q = cs + 24 * g;
        float *p[8]; for (int u = 0; u < 8; ++u) p[u] = buf + (int64_t)sl[u] * T;
        vw acc[12]; memset(acc, 0, sizeof acc);
        for (int t = 0; t + 16 <= T; t += 16) {
            vw v[8], w[8];
            for (int u = 0; u < 8; ++u) { v[u] = *(const vw *)(p[u] + t); w[u] = *(const vw *)(p[u] + go + t); }
            BWD_ROUNDS
            for (int u = 0; u < 8; ++u) { *(vw *)(p[u] + t) = v[u]; *(vw *)(p[u] + go + t) = w[u]; }
        }
        for (int r = 0; r < 12; ++r) gacc[12 * g + r] += (double)SUM512(acc[r]);
    }
}
__attribute__((noinline)) void bwd512_mem(float *restrict buf, const int32_t *restrict slots, int64_t groups, int64_t d) {
    const int64_t go = d * T;
    for (int64_t g = groups - 1; g >= 0; --g) {
        const int32_t *sl = slots + 8 * g;
        float *p[8]; for (int u = 0; u < 8; ++u) p[u] = buf + (int64_t)sl[u] * T;
        for (int t = 0; t + 16 <= T; t += 16) {
            vw v[8], w[8];
            for (int u = 0; u < 8; ++u) { v[u] = *(const vw *)(p[u] + t); w[u] = *(const vw *)(p[u] + go + t); }
            for (int u = 0; u < 8; ++u) { KEEP(v[u]); KEEP(w[u]); }
            for (int u = 0; u < 8; ++u) { *(vw *)(p[u] + t) = v[u]; *(vw *)(p[u] + go + t) = w[u]; }
        }
    }
}
__attribute__((noinline)) float bwd512_fp(const float *restrict cs, int64_t groups) {
    vw v[8], w[8], acc[12];
    memset(acc, 0, sizeof acc);
    for (int u = 0; u < 8; ++u) for (int l = 0; l < 16; ++l) { v[u][l] = 1.0f + u + l; w[u][l] = 0.5f * u - l; }
    for (int64_t g = groups - 1; g >= 0; --g) {
        const float *q = cs + 24 * g;
        for (int t = 0; t + 16 <= T; t += 16) { BWD_ROUNDS }
    }
    float z = 0; for (int u = 0; u < 8; ++u) z += v[u][0] + w[u][15]; for (int r = 0; r < 12; ++r) z += acc[r][3]; return z;
}
__attribute__((noinline)) uint64_t clock_chain(uint64_t n) {
    uint64_t x = 1;
    for (uint64_t i = 0; i < n; ++i) __asm__ volatile("add $1, %0" : "+r"(x));
    return x;
}

int main(int argc, char **argv) {
    const int64_t d = argc > 1 ? atoi(argv[1]) : 1024, reps = argc > 2 ? atoi(argv[2]) : 5;
    int64_t groups = (int64_t)ceil(5.0 * d * log((double)d)) / 12, k = 12 * groups;
    float *buf = aligned_alloc(64, (size_t)(2 * d * T) * sizeof(float)); /* two tiles: the backward's; the other variants use the first */
    for (int64_t i = 0; i < 2 * d * T; ++i) buf[i] = (float)rand() / RAND_MAX - 0.5f;
    double *gacc = calloc((size_t)k, sizeof(double));
    const int64_t groups16 = k / 32;
    int32_t *ij = malloc((size_t)k * 8), *slots = malloc((size_t)groups * 32), *perm = malloc((size_t)d * 4);
    int32_t *slots16 = malloc((size_t)groups16 * 64);
    float *cs = malloc((size_t)k * 8);
    for (int64_t r = 0; r < k; ++r) {
        int i = rand() % d, j = rand() % (d - 1); if (j >= i) ++j;
        ij[2 * r] = i; ij[2 * r + 1] = j; double th = 6.283 * rand() / RAND_MAX; cs[2 * r] = cos(th); cs[2 * r + 1] = sin(th);
    }
    for (int64_t g = 0; g < groups; ++g) {
        if (g % (d / 8) == 0) {
            for (int i = 0; i < d; ++i) perm[i] = i;
            for (int i = d - 1; i > 0; --i) { int j = rand() % (i + 1), t = perm[i]; perm[i] = perm[j]; perm[j] = t; }
        }
        for (int u = 0; u < 8; ++u) slots[8 * g + u] = perm[8 * (g % (d / 8)) + u];
    }
    for (int64_t g = 0; g < groups16; ++g) {
        if (g % (d / 16) == 0) {
            for (int i = 0; i < d; ++i) perm[i] = i;
            for (int i = d - 1; i > 0; --i) { int j = rand() % (i + 1), t = perm[i]; perm[i] = perm[j]; perm[j] = t; }
        }
        for (int u = 0; u < 16; ++u) slots16[16 * g + u] = perm[16 * (g % (d / 16)) + u];
    }
    const double rv = (double)k * (T / 8);  /* rotation-vectors per pass */
    double best[14] = {1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9};
    volatile float sink = 0;
    for (int rep = 0; rep < reps; ++rep) {
        double t0 = now(); walk(buf, ij, cs, k);
        double t1 = now(); sink += loads(buf, ij, k);
        double t2 = now(); stores(buf, ij, cs, k);
        double t3 = now(); sink += fp_only(cs, k * (T / 8) / 8);
        double t4 = now(); nodep(buf, cs, k, d);
        double t5 = now(); blocked(buf, slots, cs, groups);
        double t6 = now(); clock_chain(100000000);
        double t7 = now();
        if (WIDE) walk512(buf, ij, cs, k);
        double t8 = now();
        if (WIDE) blocked512(buf, slots, cs, groups);
        double t9 = now();
        if (WIDE) blocked16(buf, slots16, cs, groups16);
        double t10 = now();
        if (WIDE) sink += fp_only512(cs, k * (T / 8) / 16);
        double t11 = now();
        if (WIDE) bwd512(buf, slots, cs, groups, d, gacc);
        double t12 = now();
        if (WIDE) bwd512_mem(buf, slots, groups, d);
        double t13 = now();
        if (WIDE) sink += bwd512_fp(cs, groups);
        double t14 = now();
        double dt[14] = {t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7, t9 - t8,
                         (t10 - t9) * k / (32.0 * groups16), t11 - t10, t12 - t11, t13 - t12, t14 - t13};
        for (int v = 0; v < 14; ++v) best[v] = dt[v] < best[v] ? dt[v] : best[v];
    }
    const double ghz = 100000000 / best[6] * 1e-9;
    const char *names[13] = {"walk", "loads", "stores", "fp_only", "nodep", "blocked", "walk512", "blocked512",
                             "blocked16", "fp_only512", "bwd512", "bwd512_mem", "bwd512_fp"};
    const int slot[13] = {0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13};
    printf("{\"d\": %ld, \"T\": %d, \"tile_kib\": %.0f, \"ghz\": %.3f", d, T, d * T * 4 / 1024.0, ghz);
    for (int v = 0; v < 13; ++v) printf(", \"%s_ns\": %.4f", names[v], WIDE || v < 6 ? best[slot[v]] / rv * 1e9 : 0.0);
    printf("}\n");
    sink += (float)gacc[0];
    return (int)(sink == 12345.0f);
}
