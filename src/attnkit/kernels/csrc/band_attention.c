/* Exact band attention on the CPU in float32, forward and backward. Query i attends to the keys j
 * with lo <= i - j <= hi, positions aligned bottom-right (i = row + nk - nq).
 *
 * Work is split into strips of query rows of one KV head (all of its `groups` query heads), and a
 * strip into blocks of ROWS rows. A block needs only the keys its rows reach (hi - lo + ROWS of
 * them), so the work follows the band, not nq x nk. A strip first copies its keys transposed,
 * (D, keys), so that LANES keys form one vector (a strip of fewer than FEW_ROWS queries, a decoding
 * step, reads the key rows directly instead). Per block, the forward pass computes
 *   S = q K^T scale log2 e   (register blocks of ROWS x COLS scores),
 *   pairs outside the band -> -inf, per row m = max S, P = 2^(S - m), l = sum P,
 *   O = P V (register blocks of ROWS rows x COLS columns), out = O / l, lse = (m + log2 l) ln 2,
 * and the backward pass (FlashAttention's) recomputes P = 2^(S - lse log2 e), then
 *   dP = dO V^T, dS = P (dP - delta) with delta = rowsum(dO * out) - dlse,
 *   dV += P^T dO, dK += scale dS^T Q, dQ = scale dS K.
 * The scores of a block live in per-thread buffers; nothing of size nq x nk is ever stored. Backward
 * strips are at least hi - lo rows long, so the key ranges of even strips do not overlap, nor those
 * of odd strips: the backward pass runs even strips, then odd strips, each adding into dK and dV
 * without races and in a fixed order (deterministic, whatever the thread count). A row with no key
 * gets out 0, lse -inf and no gradient; NaN or infinite inputs give NaN, as in the reference.
 * A score modification (see "Score modifications" below: soft-capping, ALiBi, a bias by distance)
 * is applied to the scaled scores before the mask, in a pass of its own over each row of a block;
 * its parameter gradients are summed per (query head, strip), so they too are deterministic.
 * Vectors are GNU C vector extensions as wide as the instruction set the file is compiled for, and the
 * register blocks (ROWS rows x two vectors of accumulators) fit its register file; see "Vector
 * width" below. Threads take strips from an atomic counter.
 */
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Vector width: LANES floats per vector, the width of the machine's registers, so that no operation
 * is split in two and no accumulator spills. A register block holds ROWS x 2 vectors of
 * accumulators, plus 2 vectors of the other operand and one broadcast:
 *   AVX-512 (32 zmm): 16 lanes, 8 rows  -> 16 + 3 registers;
 *   AVX2 + FMA (16 ymm): 8 lanes, 6 rows -> 12 + 3 (8 rows would need 19 and spill);
 *   AArch64 NEON (32 q registers): 4 lanes, 8 rows;
 *   anything else (SSE2's 16 xmm, or scalar code where there are no vectors): 4 lanes, 6 rows. */
#if defined(__AVX512F__)
#define LANES 16
#define ROWS 8
#define ISA_PATH "avx512 (16-float vectors, 8x32 register blocks)"
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
#define ROWS 6
#define ISA_PATH "avx2 (8-float vectors, 6x16 register blocks)"
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define LANES 4
#define ROWS 8
#define ISA_PATH "neon (4-float vectors, 8x8 register blocks)"
#else
#define LANES 4
#define ROWS 6
#define ISA_PATH "generic (4-float vectors, 6x8 register blocks)"
#endif

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));
typedef float vf_unaligned __attribute__((vector_size(LANES * 4), aligned(4)));
typedef int32_t vi_unaligned __attribute__((vector_size(LANES * 4), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(LANES * 4)));

enum {
    COLS = 2 * LANES, FEW_ROWS = 4,                          /* tile width; decoding-sized strips */
    SHORT_STRIP = 192, LONG_STRIP = 768, MAX_THREADS = 256,  /* strips and threads */
    SMALL_WORK = 1 << 15                                     /* scores below which one thread runs */
};
enum { MOD_NONE = 0, MOD_SOFTCAP = 1, MOD_ALIBI = 2, MOD_DISTANCE = 3 }; /* score modifications */
static const float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;
static const int32_t LANE_INDEX[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

/* Which of the paths above this build took (for attnkit info). */
const char *band_attention_isa(void) { return ISA_PATH; }

static inline vf load(const float *p) { return *(const vf_unaligned *)p; }
static inline void store(float *p, vf x) { *(vf_unaligned *)p = x; }
static inline vf splat(float x) { return x - (vf){0}; } /* x - 0 keeps -0 and NaN as they are */
static inline vf pick(vi keep, vf yes, vf no) { return (vf)(((vi)yes & keep) | ((vi)no & ~keep)); }
/* a > b ? a : b lane by lane (b where either is NaN): one instruction where there is one. */
#if defined(__AVX512F__)
static inline vf vmax(vf a, vf b) { return (vf)_mm512_max_ps((__m512)a, (__m512)b); }
#elif LANES == 8 /* AVX2 with FMA: the 8-float path (AVX2 without FMA takes 4-float vectors) */
static inline vf vmax(vf a, vf b) { return (vf)_mm256_max_ps((__m256)a, (__m256)b); }
#else
static inline vf vmax(vf a, vf b) { return pick((vi)(a > b), a, b); }
#endif
static inline float largest_lane(vf x) {
    float m = x[0];
    for (int i = 1; i < LANES; i++) m = x[i] > m ? x[i] : m;
    return m;
}
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* 2^x for x <= 0: x = n + f with f in [-1/2, 1/2], 2^f by a degree-6 polynomial fitted for the
 * least relative error on that interval (2e-9, under float32's rounding: evaluated in float32 it is
 * within 1.1e-7 of 2^f, about as the degree-7 Taylor series was), 2^n added to the exponent bits. The sum
 * x + 1.5 * 2^23 holds n in its low mantissa bits, so shifting its bits left by 23 gives n << 23
 * (mod 2^32) directly. x under -126 (x = -inf) gives 0, and so does NaN: callers check rows for NaN
 * themselves (see exp2_row). */
static inline vf exp2_nonpositive(vf x) {
    const vi normal = (vi)(x >= splat(-126.0f));
    x = vmax(x, splat(-126.0f));
    const vf round_magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    const vf shifted = x + round_magic;
    const vf f = x - (shifted - round_magic);
    vf p = splat(1.5353362031500717e-04f);
    p = p * f + 1.3398874650617845e-03f;
    p = p * f + 9.618437359119738e-03f;
    p = p * f + 5.5503324705355676e-02f;
    p = p * f + 2.4022647913600698e-01f;
    p = p * f + 6.931472028553374e-01f;
    p = p * f + 1.0f;
    return (vf)(((vu)p + ((vu)shifted << 23)) & (vu)normal);
}

/* ---------------------------------------------------------------------------------------------
 * Register-blocked products. Row-major matrices with leading dimensions ld_*; n_cols keys. */

#define ZERO2(r) vf acc##r##a = {0}, acc##r##b = {0};
#define ZERO1(r) vf acc##r##a = {0};
#define ROW(r) const float *a##r = (r) < rows ? a + (r) * ld_a : zeros;
#define FMA2(r) { vf x = splat(a##r[c]); acc##r##a += x * b0; acc##r##b += x * b1; }
#define FMA1(r) { acc##r##a += splat(a##r[c]) * b0; }
#define STORE2(r) { vf x0 = acc##r##a, x1 = acc##r##b;                                                           \
    if (band) {                                                                                                \
        x0 *= band->by, x1 *= band->by;                                                                        \
        if (!inside) x0 = in_band(x0, col, band->first[r], band->last[r]),                                     \
                     x1 = in_band(x1, col + LANES, band->first[r], band->last[r]);                             \
        band->top[r] = vmax(x1, vmax(x0, band->top[r]));                                                       \
    }                                                                                                          \
    store(s + (r) * ld_s + col, x0); store(s + (r) * ld_s + col + LANES, x1); }
#define STORE1(r) { vf x0 = acc##r##a;                                                                          \
    if (band) {                                                                                                \
        x0 = in_band(x0 * band->by, col, band->first[r], band->last[r]);                                       \
        band->top[r] = vmax(x0, band->top[r]);                                                                 \
    }                                                                                                          \
    store(s + (r) * ld_s + col, x0); }
#if ROWS == 8
#define EACH_ROW(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7)
#else
#define EACH_ROW(M) M(0) M(1) M(2) M(3) M(4) M(5)
#endif

/* x with -inf in the lanes outside columns [first, last] (x covers columns j .. j + LANES - 1): the
 * lane-by-lane mask only where the vector reaches past an edge of the band. */
static inline vf in_band(vf x, int64_t j, int64_t first, int64_t last) {
    if (j >= first && j + LANES - 1 <= last) return x;
    const vi column = *(const vi_unaligned *)LANE_INDEX + (int32_t)j;
    return pick((column >= (int32_t)first) & (column <= (int32_t)last), x, splat(-INFINITY));
}

/* How the forward pass finishes a block's scores while they are still in registers: times `by`,
 * -inf outside each row's columns [first[r], last[r]], and each row's running maximum in top[r]
 * (NaN scores leave it alone: exp2_row finds them). Columns [inner_first, inner_last] are inside
 * every row's band. */
typedef struct {
    vf by, top[ROWS];
    int64_t first[ROWS], last[ROWS], inner_first, inner_last;
} RowBand;

/* s[r][col] = sum_c a[r][c] b_t[c][col] for ROWS rows (the first `rows` of a (., ld_a), then rows
 * of `zeros`) and n_cols columns rounded up to LANES (b_t (d, ld_b) must be readable that far),
 * finished as `band` says when it is not NULL (one pass over the scores fewer than a separate one).
 * Not inlined: inside the caller's loops GCC ran out of general registers and reloaded the row
 * pointers from the stack on every step of the inner loop. */
__attribute__((noinline)) static void rows_times_columns(const float *a, int64_t ld_a, int64_t rows, const float *zeros, const float *b_t,
                               int64_t ld_b, int64_t d, int64_t n_cols, float *s, int64_t ld_s, RowBand *band) {
    EACH_ROW(ROW)
    int64_t col = 0;
    for (; col + LANES < n_cols; col += COLS) { /* more than LANES columns left: a tile of COLS */
        const int inside = band != NULL && col >= band->inner_first && col + COLS - 1 <= band->inner_last;
        EACH_ROW(ZERO2)
        for (int64_t c = 0; c < d; c++) {
            vf b0 = load(b_t + c * ld_b + col), b1 = load(b_t + c * ld_b + col + LANES);
            EACH_ROW(FMA2)
        }
        EACH_ROW(STORE2)
    }
    for (; col < n_cols; col += LANES) {
        EACH_ROW(ZERO1)
        for (int64_t c = 0; c < d; c++) {
            vf b0 = load(b_t + c * ld_b + col);
            EACH_ROW(FMA1)
        }
        EACH_ROW(STORE1)
    }
}

/* s[r][j] = a[r] . b[j] for the first `rows` rows and j < n_cols, from the rows themselves: for
 * strips of fewer than FEW_ROWS queries (decoding), where a transposed copy of the keys would cost
 * more than the scores. */
static void dot_rows(const float *a, int64_t rows, const float *b, int64_t d, int64_t n_cols, float *s, int64_t ld_s) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t j = 0; j < n_cols; j++) {
            vf acc = {0};
            for (int64_t c = 0; c < d; c += LANES) acc += load(a + r * d + c) * load(b + j * d + c);
            float dot = 0.0f;
            for (int i = 0; i < LANES; i++) dot += acc[i];
            s[r * ld_s + j] = dot;
        }
}

/* The block's scores: from the strip's transposed copy (b_t, first column of the block) or, when
 * the strip has none (b_t NULL), from the rows b of the keys. */
static void block_scores(const float *a, int64_t rows, const float *zeros, const float *b_t, int64_t ld_b,
                         const float *b, int64_t d, int64_t n_cols, float *s, int64_t ld_s) {
    if (b_t == NULL)
        dot_rows(a, rows, b, d, n_cols, s, ld_s);
    else
        rows_times_columns(a, d, rows, zeros, b_t, ld_b, d, n_cols, s, ld_s, NULL);
}

#define WEIGHT2(r) { vf x = splat(p[(r) * ld_p + j]); acc##r##a += x * m0; acc##r##b += x * m1; }
#define WEIGHT1(r) { acc##r##a += splat(p[(r) * ld_p + j]) * m0; }
#define OUT2(r) { store(o + (r) * ld_o, acc##r##a); store(o + (r) * ld_o + LANES, acc##r##b); }
#define OUT1(r) { store(o + (r) * ld_o, acc##r##a); }

/* o (ROWS, d) = p (ROWS, n_cols) m (n_cols, d), d a multiple of LANES: register blocks of ROWS rows
 * x COLS columns, so each row of m is read once per ROWS rows. Blocks of fewer than FEW_ROWS real
 * rows (decoding) compute only those, one row at a time. */
static void weights_times_matrix(const float *p, int64_t ld_p, int64_t rows, const float *m, int64_t d,
                                 int64_t n_cols, float *o) {
    const int64_t ld_o = d;
    if (rows < FEW_ROWS) {
        for (int64_t r = 0; r < rows; r++)
            for (int64_t c = 0; c < d; c += LANES) {
                vf acc = {0};
                for (int64_t j = 0; j < n_cols; j++) acc += splat(p[r * ld_p + j]) * load(m + j * d + c);
                store(o + r * ld_o + c, acc);
            }
        return;
    }
    int64_t c = 0;
    for (; c + COLS <= d; c += COLS, o += COLS) {
        EACH_ROW(ZERO2)
        for (int64_t j = 0; j < n_cols; j++) {
            vf m0 = load(m + j * d + c), m1 = load(m + j * d + c + LANES);
            EACH_ROW(WEIGHT2)
        }
        EACH_ROW(OUT2)
    }
    for (; c < d; c += LANES, o += LANES) {
        EACH_ROW(ZERO1)
        for (int64_t j = 0; j < n_cols; j++) {
            vf m0 = load(m + j * d + c);
            EACH_ROW(WEIGHT1)
        }
        EACH_ROW(OUT1)
    }
}

/* dst[j][:] += sum_r p[r][j] rows[r][:] for j < n_cols: ROWS rows (ROWS, d) of which `rows` are real. */
static void add_transposed_product(const float *p, int64_t ld_p, const float *rows_m, int64_t rows, int64_t d,
                                   int64_t n_cols, float *dst) {
    int64_t j = 0;
    for (; j + 4 <= n_cols; j += 4) {
        for (int64_t c = 0; c < d; c += LANES) {
            float *out = dst + j * d + c;
            vf a = load(out), b = load(out + d), e = load(out + 2 * d), f = load(out + 3 * d);
            for (int64_t r = 0; r < rows; r++) {
                vf row = load(rows_m + r * d + c);
                const float *w = p + r * ld_p + j;
                a += splat(w[0]) * row; b += splat(w[1]) * row; e += splat(w[2]) * row; f += splat(w[3]) * row;
            }
            store(out, a); store(out + d, b); store(out + 2 * d, e); store(out + 3 * d, f);
        }
    }
    for (; j < n_cols; j++)
        for (int64_t c = 0; c < d; c += LANES) {
            vf a = load(dst + j * d + c);
            for (int64_t r = 0; r < rows; r++) a += splat(p[r * ld_p + j]) * load(rows_m + r * d + c);
            store(dst + j * d + c, a);
        }
}

/* ---------------------------------------------------------------------------------------------
 * Jobs, strips and per-thread scratch. */

typedef struct {
    const float *q, *k, *v;       /* (bh, nq, d), (bh / groups, nk, d), (bh / groups, nk, d) */
    float *out, *lse;             /* forward results (bh, nq, d), (bh, nq); read by the backward pass */
    const float *d_out, *delta;   /* backward: (bh, nq, d), (bh, nq) */
    float *d_q, *d_k, *d_v;       /* backward results; d_k and d_v start at zero */
    int64_t bh, nq, nk, d, lo, hi, groups, strip_rows, strips, reach;
    float scale;
    int backward, parity;         /* backward: strips with index % 2 == parity (parity -1: all) */
    int64_t next;                 /* the next strip to take, atomically */
    int mod;                      /* MOD_NONE, MOD_SOFTCAP, MOD_ALIBI, MOD_DISTANCE */
    float cap;                    /* soft-cap */
    const float *bias;            /* slopes (heads) or table (heads, bias_cols) */
    int64_t heads, bias_cols;     /* query heads per batch entry (head h = row % heads); table width */
    float *d_bias;                /* backward: (bh, strips, 1 or bias_cols) parameter gradient shares */
} Job;

typedef struct {
    float *keys_t, *values_t;     /* (d, ld_t): the strip's keys (and values) transposed */
    float *s, *ds, *slope;        /* (ROWS, ld_s); slope: a soft-cap's derivative (backward) */
    float *zeros, *o;             /* (d), (ROWS, d) */
    int64_t ld_t, ld_s;
} Scratch;

static float *grab(size_t floats) { return aligned_alloc(64, round_up((int64_t)(floats * sizeof(float)), 64)); }

static int scratch_init(Scratch *w, const Job *job) {
    w->ld_t = min64(job->strip_rows + job->reach, job->nk + ROWS) + COLS; /* >= a strip's keys + COLS */
    w->ld_s = round_up(min64(job->reach, job->nk) + COLS, LANES);
    const int copies = job->nq >= FEW_ROWS; /* with fewer queries no strip is transposed */
    w->keys_t = copies ? grab(job->d * w->ld_t) : NULL;
    w->values_t = copies && job->backward ? grab(job->d * w->ld_t) : NULL;
    w->s = grab(ROWS * w->ld_s);
    w->ds = job->backward ? grab(ROWS * w->ld_s) : NULL;
    w->slope = job->backward && job->mod == MOD_SOFTCAP ? grab(ROWS * w->ld_s) : NULL;
    w->zeros = grab(job->d);
    w->o = grab(job->d * ROWS);
    if (w->zeros) memset(w->zeros, 0, (size_t)job->d * sizeof(float));
    return (w->keys_t || !copies) && w->s && w->zeros && w->o && (!job->backward || ((w->values_t || !copies) && w->ds))
           && (w->slope || !job->backward || job->mod != MOD_SOFTCAP);
}

static void scratch_free(Scratch *w) {
    free(w->keys_t); free(w->values_t); free(w->s); free(w->ds); free(w->slope); free(w->zeros); free(w->o);
}

#if defined(__AVX2__)
/* dst[c * ld + i] = src[i * d + c] for an 8 x 8 block: eight rows in, eight columns out, in registers. */
static inline void transpose8x8(const float *src, int64_t d, float *dst, int64_t ld) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + d), r2 = _mm256_loadu_ps(src + 2 * d),
           r3 = _mm256_loadu_ps(src + 3 * d), r4 = _mm256_loadu_ps(src + 4 * d), r5 = _mm256_loadu_ps(src + 5 * d),
           r6 = _mm256_loadu_ps(src + 6 * d), r7 = _mm256_loadu_ps(src + 7 * d);
    __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
           t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
           t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
           s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
           s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
           s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(dst, _mm256_permute2f128_ps(s0, s4, 0x20));
    _mm256_storeu_ps(dst + ld, _mm256_permute2f128_ps(s1, s5, 0x20));
    _mm256_storeu_ps(dst + 2 * ld, _mm256_permute2f128_ps(s2, s6, 0x20));
    _mm256_storeu_ps(dst + 3 * ld, _mm256_permute2f128_ps(s3, s7, 0x20));
    _mm256_storeu_ps(dst + 4 * ld, _mm256_permute2f128_ps(s0, s4, 0x31));
    _mm256_storeu_ps(dst + 5 * ld, _mm256_permute2f128_ps(s1, s5, 0x31));
    _mm256_storeu_ps(dst + 6 * ld, _mm256_permute2f128_ps(s2, s6, 0x31));
    _mm256_storeu_ps(dst + 7 * ld, _mm256_permute2f128_ps(s3, s7, 0x31));
}
#endif

/* dst (d, ld) = src rows [first, first + n) transposed, zero-padded by up to COLS columns. With AVX2,
 * blocks of 8 x 8 in registers (d is a multiple of 16); the scalar loop does the rest. */
static void transpose_rows(const float *src, int64_t first, int64_t n, int64_t d, float *dst, int64_t ld) {
    int64_t done = 0;
#if defined(__AVX2__)
    for (; done + 8 <= n; done += 8)
        for (int64_t c = 0; c < d; c += 8) transpose8x8(src + (first + done) * d + c, d, dst + c * ld + done, ld);
#endif
    for (int64_t j0 = done; j0 < n; j0 += 64) {
        int64_t j1 = min64(j0 + 64, n);
        for (int64_t c = 0; c < d; c++)
            for (int64_t j = j0; j < j1; j++) dst[c * ld + j] = src[(first + j) * d + c];
    }
    const int64_t padded = min64(ld, n + COLS); /* tiles read at most COLS - 1 columns past n */
    for (int64_t c = 0; c < d; c++) memset(dst + c * ld + n, 0, (size_t)(padded - n) * sizeof(float));
}

/* The block columns [first, last] hold the band's keys for the query at position pos. */
static void block_row_keys(const Job *job, int64_t pos, int64_t key0, int64_t n_cols, int64_t *first, int64_t *last) {
    *first = max64(pos - job->hi - key0, 0);
    *last = min64(pos - job->lo - key0, n_cols - 1);
}

/* s[j, j + LANES) *= by, then -inf outside columns [first, last]. Returns the new values. */
static inline vf masked_scores(float *s, int64_t j, vf by, int64_t first, int64_t last) {
    const vf x = in_band(load(s + j) * by, j, first, last);
    store(s + j, x);
    return x;
}

/* In place over the padded row: s *= factor, then -inf outside columns [first, last] (the scale comes
 * first, so a zero factor never meets -inf). Returns the row's max over its scores that are not NaN:
 * -inf when nothing is inside (exp2_row finds NaN scores). Two vectors per step, each with its own
 * running max: one chain of maxima would make the loop wait on its latency. */
static float scale_and_mask_row(float *s, int64_t n_cols, float factor, int64_t first, int64_t last) {
    const vf by = splat(factor);
    const int64_t padded = round_up(n_cols, LANES);
    vf high0 = splat(-INFINITY), high1 = high0;
    int64_t j = 0;
    for (; j + 2 * LANES <= padded; j += 2 * LANES) {
        high0 = vmax(masked_scores(s, j, by, first, last), high0);
        high1 = vmax(masked_scores(s, j + LANES, by, first, last), high1);
    }
    if (j < padded) high0 = vmax(masked_scores(s, j, by, first, last), high0);
    return largest_lane(vmax(high1, high0));
}

/* In place p = 2^(s - shift) over the padded row; returns sum p, or NaN when a score is NaN (a NaN or
 * infinite input: the row's output becomes NaN, as softmax's would). A NaN or +inf shift (a row with
 * an infinite score, or such an LSE) makes the whole row NaN. Two running sums, for the same reason
 * as the two maxima above. NaN scores are found by summing s - shift, which is never +inf here (the
 * shift is at least the row's largest score, or the scores are -inf): the sum is NaN exactly when a
 * score is. */
static float exp2_row(float *s, int64_t n_cols, float shift) {
    const int64_t padded = round_up(n_cols, LANES);
    if (!(shift < INFINITY)) {
        for (int64_t j = 0; j < padded; j++) s[j] = NAN;
        return NAN;
    }
    vf total0 = {0}, total1 = {0}, check = {0}, by = splat(shift);
    int64_t j = 0;
    for (; j + 2 * LANES <= padded; j += 2 * LANES) {
        const vf x0 = load(s + j) - by, x1 = load(s + j + LANES) - by;
        const vf p0 = exp2_nonpositive(x0), p1 = exp2_nonpositive(x1);
        store(s + j, p0);
        store(s + j + LANES, p1);
        total0 += p0;
        total1 += p1;
        check += x0 + x1;
    }
    if (j < padded) {
        const vf x0 = load(s + j) - by, p0 = exp2_nonpositive(x0);
        store(s + j, p0);
        total0 += p0;
        check += x0;
    }
    total0 += total1;
    float sum = 0.0f, checked = 0.0f;
    for (int i = 0; i < LANES; i++) sum += total0[i], checked += check[i];
    return checked == checked ? sum : NAN;
}

/* ---------------------------------------------------------------------------------------------
 * Score modifications, on the scaled score x = q . k * scale of query position i, key j, head h:
 *   MOD_SOFTCAP: cap * tanh(x / cap);  MOD_ALIBI: x + bias[h] * (j - i);
 *   MOD_DISTANCE: x + bias[h * bias_cols + min(|i - j|, bias_cols - 1)]. */

/* tanh lane by lane: an odd Taylor polynomial to x^13 below |x| = 0.4 (the next term is under
 * 2e-9 there), (1 - t) / (1 + t) with t = e^(-2|x|) above (t's relative error 1.1e-7 becomes at
 * most 2e-7 of the result); the sign is put back, and NaN stays NaN. */
static inline vf tanh_lanes(vf x) {
    const vu sign = (vu)x & (vu)splat(-0.0f);
    const vf a = (vf)((vu)x & ~sign), a2 = a * a;
    const vf t = exp2_nonpositive(a * splat(-2.0f * LOG2E));
    const vf far = (splat(1.0f) - t) / (splat(1.0f) + t);
    vf near = splat(21844.0f / 6081075.0f);
    near = near * a2 - 1382.0f / 155925.0f;
    near = near * a2 + 62.0f / 2835.0f;
    near = near * a2 - 17.0f / 315.0f;
    near = near * a2 + 2.0f / 15.0f;
    near = near * a2 - 1.0f / 3.0f;
    near = (near * a2 + 1.0f) * a;
    const vf magnitude = pick((vi)(a < splat(0.4f)), near, pick((vi)(a == a), far, a));
    return (vf)((vu)magnitude | sign);
}

/* In place over the padded row of raw products s (q . k) of the query at position pos, head row
 * `head`, keys key0 + column: s = mod(s * scale) * log2 e, then -inf outside columns [first,
 * last]. With `slope` (backward, soft-cap) it also stores d mod / d x there. Returns the row's max
 * over its scores that are not NaN, as scale_and_mask_row does. */
static float modify_row(const Job *job, float *s, int64_t n_cols, int64_t head, int64_t pos, int64_t key0,
                        int64_t first, int64_t last, float *slope) {
    const int64_t padded = round_up(n_cols, LANES), h = head % job->heads;
    const vf scale = splat(job->scale), base2 = splat(LOG2E);
    vf high = splat(-INFINITY);
    if (job->mod == MOD_SOFTCAP) {
        const vf cap = splat(job->cap), inverse = splat(1.0f / job->cap);
        for (int64_t j = 0; j < padded; j += LANES) {
            const vf t = tanh_lanes(load(s + j) * scale * inverse);
            if (slope) store(slope + j, splat(1.0f) - t * t);
            const vf x = in_band(t * cap * base2, j, first, last);
            store(s + j, x);
            high = vmax(x, high);
        }
        return largest_lane(high);
    }
    if (job->mod == MOD_ALIBI) {
        /* j - i of the lanes, counted up LANES at a time (exact: integers far below 2^24) */
        const vf rate = splat(job->bias[h]), step = splat((float)LANES);
        vf offset = __builtin_convertvector(*(const vi_unaligned *)LANE_INDEX, vf) + (float)(key0 - pos);
        for (int64_t j = 0; j < padded; j += LANES, offset += step) {
            const vf x = in_band((load(s + j) * scale + rate * offset) * base2, j, first, last);
            store(s + j, x);
            high = vmax(x, high);
        }
        return largest_lane(high);
    }
    const float *table = job->bias + h * job->bias_cols;
    const int64_t widest = job->bias_cols - 1;
    for (int64_t j = 0; j < padded; j++) {
        const int64_t distance = pos - key0 - j;
        s[j] = (s[j] * job->scale + table[min64(distance < 0 ? -distance : distance, widest)]) * LOG2E;
    }
    for (int64_t j = 0; j < padded; j += LANES) high = vmax(masked_scores(s, j, splat(1.0f), first, last), high);
    return largest_lane(high);
}

/* The parameter gradient of one row: dmod (the gradient of the modified scores, zero outside the
 * band) added into grad (alibi: one float, the slope's; distance: the table row's bias_cols). */
static void add_bias_grad(const Job *job, const float *dmod, int64_t n_cols, int64_t pos, int64_t key0, float *grad) {
    if (job->mod == MOD_ALIBI) {
        float total = 0.0f;
        for (int64_t j = 0; j < n_cols; j++) total += dmod[j] * (float)(key0 + j - pos);
        grad[0] += total;
        return;
    }
    const int64_t widest = job->bias_cols - 1;
    for (int64_t j = 0; j < n_cols; j++) {
        const int64_t distance = pos - key0 - j;
        grad[min64(distance < 0 ? -distance : distance, widest)] += dmod[j];
    }
}

/* ---------------------------------------------------------------------------------------------
 * One block of ROWS query rows of one query head; keys [key0, key0 + n_cols) are strip columns
 * [col0, col0 + n_cols) of the transposed copies (col0 -1: the strip has none). */

static void forward_block(const Job *job, const Scratch *w, int64_t head, int64_t row0, int64_t rows,
                          int64_t key0, int64_t col0, int64_t n_cols) {
    const int64_t d = job->d, pos0 = job->nk - job->nq + row0;
    float *out = job->out + (head * job->nq + row0) * d, *lse = job->lse + head * job->nq + row0;
    const float *q = job->q + (head * job->nq + row0) * d;
    RowBand band = {.by = splat(job->scale * LOG2E), .inner_first = 0, .inner_last = INT64_MAX};
    for (int64_t r = 0; r < ROWS; r++) {
        band.first[r] = 1, band.last[r] = 0; /* padding rows: no key */
        if (r < rows) block_row_keys(job, pos0 + r, key0, n_cols, &band.first[r], &band.last[r]);
        band.inner_first = max64(band.inner_first, band.first[r]);
        band.inner_last = min64(band.inner_last, band.last[r]);
        band.top[r] = splat(-INFINITY);
    }
    float high[ROWS], sum[ROWS];
    if (job->mod != MOD_NONE) { /* raw products, then each row modified, masked and its maximum */
        block_scores(q, rows, w->zeros, col0 < 0 ? NULL : w->keys_t + col0, w->ld_t,
                     job->k + ((head / job->groups) * job->nk + key0) * d, d, n_cols, w->s, w->ld_s);
        for (int64_t r = 0; r < ROWS; r++)
            high[r] = modify_row(job, w->s + r * w->ld_s, n_cols, head, pos0 + r, key0, band.first[r], band.last[r], NULL);
    } else if (col0 >= 0) { /* the scores scaled, masked and their row maxima in one pass */
        rows_times_columns(q, d, rows, w->zeros, w->keys_t + col0, w->ld_t, d, n_cols, w->s, w->ld_s, &band);
        for (int64_t r = 0; r < ROWS; r++) high[r] = largest_lane(band.top[r]);
    } else {
        dot_rows(q, rows, job->k + ((head / job->groups) * job->nk + key0) * d, d, n_cols, w->s, w->ld_s);
        for (int64_t r = 0; r < ROWS; r++)
            high[r] = scale_and_mask_row(w->s + r * w->ld_s, n_cols, job->scale * LOG2E, band.first[r], band.last[r]);
    }
    for (int64_t r = 0; r < ROWS; r++) {
        if (high[r] == -INFINITY) high[r] = 0.0f; /* no key: every p is 2^-inf = 0 */
        sum[r] = exp2_row(w->s + r * w->ld_s, n_cols, high[r]);
    }
    weights_times_matrix(w->s, w->ld_s, rows, job->v + ((head / job->groups) * job->nk + key0) * d, d, n_cols, w->o);
    for (int64_t r = 0; r < rows; r++) {
        if (sum[r] == 0.0f) {
            memset(out + r * d, 0, (size_t)d * sizeof(float));
            lse[r] = -INFINITY;
            continue;
        }
        float inverse = 1.0f / sum[r];
        for (int64_t c = 0; c < d; c++) out[r * d + c] = w->o[r * d + c] * inverse;
        lse[r] = (high[r] + log2f(sum[r])) * LN2;
    }
}

static void backward_block(const Job *job, const Scratch *w, int64_t head, int64_t row0, int64_t rows,
                           int64_t key0, int64_t col0, int64_t n_cols) {
    const int64_t d = job->d, nq = job->nq, pos0 = job->nk - nq + row0, kv = head / job->groups;
    const float *q = job->q + head * nq * d, *d_out = job->d_out + head * nq * d;
    const float *lse = job->lse + head * nq + row0, *delta = job->delta + head * nq + row0;
    const float *keys = job->k + (kv * job->nk + key0) * d, *values = job->v + (kv * job->nk + key0) * d;
    block_scores(q + row0 * d, rows, w->zeros, col0 < 0 ? NULL : w->keys_t + col0, w->ld_t, keys, d, n_cols,
                 w->s, w->ld_s);
    block_scores(d_out + row0 * d, rows, w->zeros, col0 < 0 ? NULL : w->values_t + col0, w->ld_t, values, d,
                 n_cols, w->ds, w->ld_s);
    for (int64_t r = 0; r < ROWS; r++) {
        float *p = w->s + r * w->ld_s, *ds = w->ds + r * w->ld_s;
        int64_t first = 1, last = 0;
        if (r < rows && lse[r] != -INFINITY) block_row_keys(job, pos0 + r, key0, n_cols, &first, &last);
        float *slope = w->slope ? w->slope + r * w->ld_s : NULL;
        if (job->mod != MOD_NONE)
            modify_row(job, p, n_cols, head, pos0 + r, key0, first, last, slope);
        else
            scale_and_mask_row(p, n_cols, job->scale * LOG2E, first, last);
        exp2_row(p, n_cols, first <= last ? lse[r] * LOG2E : 0.0f);
        vf row_delta = splat(r < rows ? delta[r] : 0.0f), scale = splat(job->scale);
        if (job->mod == MOD_NONE) {
            for (int64_t j = 0; j < round_up(n_cols, LANES); j += LANES)
                store(ds + j, load(p + j) * (load(ds + j) - row_delta) * scale);
            continue;
        }
        /* dS of the modified scores, its parameter gradient, then through the modification. */
        for (int64_t j = 0; j < round_up(n_cols, LANES); j += LANES) store(ds + j, load(p + j) * (load(ds + j) - row_delta));
        if (job->d_bias && first <= last) {
            const int64_t width = job->mod == MOD_ALIBI ? 1 : job->bias_cols;
            add_bias_grad(job, ds, n_cols, pos0 + r, key0, job->d_bias + (head * job->strips + row0 / job->strip_rows) * width);
        }
        for (int64_t j = 0; j < round_up(n_cols, LANES); j += LANES)
            store(ds + j, load(ds + j) * (slope ? load(slope + j) : splat(1.0f)) * scale);
    }
    /* dV += P^T dO, dK += dS^T Q (dS carries the scale), dQ = dS K. */
    add_transposed_product(w->s, w->ld_s, d_out + row0 * d, rows, d, n_cols, job->d_v + (kv * job->nk + key0) * d);
    add_transposed_product(w->ds, w->ld_s, q + row0 * d, rows, d, n_cols, job->d_k + (kv * job->nk + key0) * d);
    weights_times_matrix(w->ds, w->ld_s, rows, keys, d, n_cols, w->o);
    memcpy(job->d_q + (head * nq + row0) * d, w->o, (size_t)(rows * d) * sizeof(float));
}

/* Strip `index` of one KV head: rows [row0, row1) of each of its query heads. */
static void run_strip(const Job *job, const Scratch *w, int64_t index) {
    const int64_t kv = index / job->strips, strip = index % job->strips, nk = job->nk, d = job->d;
    const int64_t row0 = strip * job->strip_rows, row1 = min64(row0 + job->strip_rows, job->nq);
    const int64_t offset = nk - job->nq;
    const int64_t first_key = max64(row0 + offset - job->hi, 0), last_key = min64(row1 - 1 + offset - job->lo, nk - 1);
    const int64_t n_keys = last_key - first_key + 1;
    for (int64_t head = kv * job->groups; head < (kv + 1) * job->groups; head++) {
        if (n_keys <= 0) { /* no row of this strip sees a key */
            if (job->backward) {
                memset(job->d_q + (head * job->nq + row0) * d, 0, (size_t)((row1 - row0) * d) * sizeof(float));
            } else {
                memset(job->out + (head * job->nq + row0) * d, 0, (size_t)((row1 - row0) * d) * sizeof(float));
                for (int64_t r = row0; r < row1; r++) job->lse[head * job->nq + r] = -INFINITY;
            }
        }
    }
    if (n_keys <= 0) return;
    const int transposed = row1 - row0 >= FEW_ROWS; /* else blocks read the key rows themselves */
    if (transposed) transpose_rows(job->k + kv * nk * d, first_key, n_keys, d, w->keys_t, w->ld_t);
    if (transposed && job->backward) transpose_rows(job->v + kv * nk * d, first_key, n_keys, d, w->values_t, w->ld_t);
    for (int64_t head = kv * job->groups; head < (kv + 1) * job->groups; head++)
        for (int64_t r0 = row0; r0 < row1; r0 += ROWS) {
            const int64_t rows = min64(ROWS, row1 - r0), pos0 = r0 + offset;
            const int64_t key0 = max64(pos0 - job->hi, first_key), key1 = min64(pos0 + rows - 1 - job->lo, last_key);
            if (key0 > key1) {
                if (job->backward) {
                    memset(job->d_q + (head * job->nq + r0) * d, 0, (size_t)(rows * d) * sizeof(float));
                } else {
                    memset(job->out + (head * job->nq + r0) * d, 0, (size_t)(rows * d) * sizeof(float));
                    for (int64_t r = 0; r < rows; r++) job->lse[head * job->nq + r0 + r] = -INFINITY;
                }
                continue;
            }
            const int64_t col0 = transposed ? key0 - first_key : -1;
            if (job->backward)
                backward_block(job, w, head, r0, rows, key0, col0, key1 - key0 + 1);
            else
                forward_block(job, w, head, r0, rows, key0, col0, key1 - key0 + 1);
        }
}

static void *worker(void *arg) {
    Job *job = arg;
    Scratch w = {0};
#if defined(__SSE__)
    /* Subnormal products (a weight near 2^-126, as far keys under ALiBi get, times a value) take
     * microcode assists that slowed the whole kernel by half: flush them to zero. They are below
     * 2^-126 of a row's largest weight (1), far under float32's rounding of the sums. */
    const unsigned int control = _mm_getcsr();
    _mm_setcsr(control | 0x8040); /* flush-to-zero and denormals-are-zero */
#endif
    if (scratch_init(&w, job)) {
        const int64_t total = job->bh / job->groups * job->strips;
        for (int64_t i; (i = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < total;)
            if (job->parity < 0 || (i % job->strips) % 2 == job->parity) run_strip(job, &w, i);
    }
    scratch_free(&w);
#if defined(__SSE__)
    _mm_setcsr(control); /* the calling thread runs a worker too: give it its own mode back */
#endif
    return NULL;
}

/* Runs the job on `threads` threads, this one included. A thread that cannot start or allocate
 * its scratch takes no strip; the others take them all. Returns 0, or 2 when no thread could. */
static int run_threads(Job *job, int threads) {
    pthread_t ids[MAX_THREADS];
    int started = 0;
    job->next = 0;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    for (int t = 1; t < threads; t++)
        if (pthread_create(&ids[started], NULL, worker, job) == 0) started++;
    worker(job);
    for (int t = 0; t < started; t++) pthread_join(ids[t], NULL);
    return job->next >= job->bh / job->groups * job->strips ? 0 : 2;
}

/* Forward strips: LONG_STRIP rows keep the transposed key copies few (a strip copies its rows' keys
 * and hi - lo more); shorter ones, down to SHORT_STRIP, give every thread several strips. Backward
 * strips are as short as allowed, at least hi - lo rows (the parity rounds rely on it), and do not
 * depend on the thread count, so neither do the gradients (the order of the dK, dV sums). */
static int check_and_plan(Job *job, int threads) {
    if (job->d <= 0 || job->d % 16 != 0 || job->groups < 1 || job->bh % job->groups) return 1;
    if (job->mod != MOD_NONE && (job->heads < 1 || job->bh % job->heads || (job->mod >= MOD_ALIBI && job->bias == NULL)
                                 || (job->mod == MOD_DISTANCE && job->bias_cols < 1))) return 1;
    if (job->nq <= 0 || job->bh <= 0) { /* nothing to compute: no strips */
        job->strip_rows = ROWS, job->strips = 0;
        return 0;
    }
    if (job->lo > job->hi) job->lo = job->hi + job->nk + job->nq + 1; /* empty band: no key anywhere */
    job->reach = max64(min64(job->hi - job->lo + ROWS, job->nk + ROWS), 0);
    const int64_t kv_heads = job->bh / job->groups;
    int64_t rows = max64(SHORT_STRIP, min64(job->hi - job->lo, job->nq));
    if (!job->backward) {
        rows = LONG_STRIP;
        while (rows / 2 >= SHORT_STRIP && kv_heads * ((job->nq + rows - 1) / rows) < 4 * (int64_t)threads) rows /= 2;
    }
    job->strip_rows = round_up(min64(rows, job->nq), ROWS);
    job->strips = (job->nq + job->strip_rows - 1) / job->strip_rows;
    return 0;
}

/* Below this many scores a call takes about as long as starting a thread: run it on this one. */
static int threads_for(const Job *job, int threads) {
    return job->bh * job->nq * min64(job->reach, job->nk) < SMALL_WORK ? 1 : threads;
}

/* Forward: fills out and lse. Returns 0; 1 when d is not a positive multiple of 16 or bh is not a
 * multiple of groups (or of heads, with a score modification); 2 when scratch memory could not be
 * allocated. mod, cap, bias, heads, bias_cols: the score modification (MOD_NONE: none; see "Score
 * modifications"). */
int band_attention_forward(const float *q, const float *k, const float *v, float *out, float *lse,
                           int64_t bh, int64_t nq, int64_t nk, int64_t d, int64_t lo, int64_t hi,
                           int64_t groups, float scale, int threads,
                           int mod, float cap, const float *bias, int64_t heads, int64_t bias_cols) {
    Job job = {q, k, v, out, lse, NULL, NULL, NULL, NULL, NULL, bh, nq, nk, d, lo, hi, groups,
               0, 0, 0, scale, 0, -1, 0, mod, cap, bias, heads, bias_cols, NULL};
    int status = check_and_plan(&job, threads);
    return status ? status : run_threads(&job, threads_for(&job, threads));
}

/* Backward: d_k and d_v must be zero on entry; delta = rowsum(d_out * out) - d_lse. With an ALiBi
 * or distance modification, d_bias (bh, band_attention_backward_strips(...), 1 or bias_cols), zero
 * on entry, receives each (head row, strip)'s share of the parameter gradient (NULL: none wanted). */
int band_attention_backward(const float *q, const float *k, const float *v, const float *out_lse,
                            const float *d_out, const float *delta, float *d_q, float *d_k, float *d_v,
                            int64_t bh, int64_t nq, int64_t nk, int64_t d, int64_t lo, int64_t hi,
                            int64_t groups, float scale, int threads,
                            int mod, float cap, const float *bias, int64_t heads, int64_t bias_cols, float *d_bias) {
    Job job = {q, k, v, NULL, (float *)out_lse, d_out, delta, d_q, d_k, d_v, bh, nq, nk, d, lo, hi, groups,
               0, 0, 0, scale, 1, 0, 0, mod, cap, bias, heads, bias_cols, d_bias};
    int status = check_and_plan(&job, threads);
    for (int parity = 0; parity < 2 && status == 0; parity++) {
        job.parity = parity;
        status = run_threads(&job, threads_for(&job, threads));
    }
    return status;
}

/* How many strips the backward pass cuts nq query rows into (the middle size of its d_bias). */
int64_t band_attention_backward_strips(int64_t nq, int64_t nk, int64_t lo, int64_t hi) {
    Job job = {0};
    job.bh = job.groups = job.heads = 1, job.d = 16, job.nq = nq, job.nk = nk, job.lo = lo, job.hi = hi, job.backward = 1;
    check_and_plan(&job, 1);
    return job.strips;
}
