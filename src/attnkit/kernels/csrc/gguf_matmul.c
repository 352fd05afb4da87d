/* Products with GGUF quantized weights kept in their blocks: out = x w^T, and dequantization.
 *
 * w holds n rows (output channels) of k weights each in one of the formats of gguf_formats.h (in
 * the layout described there); x is (m, k) float32 and out (m, n) float32. A group of weights is
 * w_i = s (q_i - z) + o, so its share of an output is
 *
 *     s (sum_i q_i x_i) + (o - z s) (sum_i x_i)
 *
 * The first term is accumulated in float32 from the integers q converted in registers; the group
 * sums of x are computed once per call, and the second term is one short dot product per row of
 * w over its groups (in vectors of groups). The result equals x @ dequantized(w)^T up to float32
 * rounding. Decoding (m = 1) reads each weight byte once per call and takes CHANNELS channels at a
 * time: each group of x is loaded once for all of them, their accumulators are independent
 * chains, and in the AVX-512 build the 4-bit formats look their s q up in a table (gguf_formats.h)
 * instead of masking and converting each nibble. For a few rows (ROW_BLOCK at a time) the
 * converted q of a group serve every row while in registers, and the weights of one channel come
 * from cache after the first row block.
 *
 * With int8_x, x is quantized to int8 per block of 32 first and each block of weights is one
 * integer dot product per row (gguf_int8.h; with AVX-512 VNNI two blocks per 512-bit vpdpbusd):
 * the exact product of the rounded x, an option.
 *
 * Work is split into chunks of whole channels (about CHUNK_BYTES of weights each, a multiple of
 * CHANNELS) that the threads of gguf_pool.h take one at a time; a chunk is one contiguous stretch
 * of w, read front to back with software prefetch PREFETCH bytes ahead, up to the end of w (one
 * thread's next chunk follows its last). The group sums of a decoding call's x live on the stack:
 * a decode step makes ~120 calls per token and allocates nothing in them.
 *
 * gguf_dequantize writes chosen rows (an embedding lookup) or all rows as float32, bit for bit the
 * values of the gguf package's numpy dequantization.
 */
#include <stdlib.h>

#include "gguf_formats.h"
#include "gguf_int8.h"
#include "gguf_pool.h"

#if LANES == 16
#define ISA_PATH "avx512 (16-lane float32, 4 channels per row, 4-bit q by table, 4-row blocks; int8 x: " DOT_PATH ")"
#elif LANES == 8
#define ISA_PATH "avx2 (8-lane float32, 4 channels per row, q converted in registers, 4-row blocks; int8 x: " DOT_PATH ")"
#else
#define ISA_PATH "generic (4-lane float32, 4 channels per row, q converted in registers, 4-row blocks; int8 x: " DOT_PATH ")"
#endif

enum {
    ROW_BLOCK = 4,              /* activation rows per register block */
    CHANNELS = 4,               /* channels per step for one activation row */
    SLICE = 256,                /* groups whose scales are converted at once (two stack arrays) */
    CHUNK_BYTES = 1 << 14,      /* weight bytes per chunk of work taken by a thread */
    SERIAL_BYTES = 1 << 15,     /* below this many weight bytes (times row blocks) a call runs on one thread */
    PREFETCH = 8192,            /* bytes ahead of the loads in the weight stream */
    STACK_FLOATS = 4096,        /* the group sums (and int8 x) of a call up to 16 KB live on the stack */
    STATUS_BAD_TYPE = 1,
    STATUS_BAD_SIZE = 2,
    STATUS_BAD_ROW = 3,
    STATUS_NO_MEMORY = 4,
};

const char *gguf_matmul_isa(void) { return ISA_PATH; }

/* task(args, i) for i in [0, chunks) on this library's pool (gguf_pool.h): other native code
 * (decode_step.c's attention) shares the kernels' threads instead of starting its own. */
void gguf_pool_run(pool_task task, const void *args, int64_t chunks, int threads) {
    pool_run(task, args, chunks, threads);
}
int gguf_block_weights(int type) { return block_weights(type); }
int gguf_block_bytes(int type) { return block_bytes(type); }
static int group_size(int type) { return type == Q6_K ? Q6_K_GROUP : GROUP; }

typedef struct {
    const float *x;     /* (m, k) */
    const float *xsum;  /* (m, k / group): sums of x over each group */
    const int8_t *xq;   /* (m, k): x quantized per XBLOCK (int8 activations only, else NULL) */
    const float *xd;    /* (m, k / XBLOCK): the scales of xq */
    const uint8_t *w;
    float *out;
    int64_t m, n, k, row_bytes, blocks, channels_per_chunk;
    int64_t xblock_bytes; /* bytes of a row per XBLOCK weights (rounded down): prefetch_ahead's stride */
} MatmulJob;

/* Group g0 + i of the slice into the accumulators acc[r][A] of each row (a statement). */
#define GROUP_STEP(FMT, G, ROWS, i, A) \
    do { \
        vf q[(G) / LANES]; \
        group_##FMT(row, job->blocks, g0 + (i), q); \
        const vf scale = splat(s[i]); \
        const int64_t at = (g0 + (i)) * (G); \
        for (int r = 0; r < ROWS; r++) { \
            vf t = q[0] * load_floats(xr[r] + at); \
            for (int v = 1; v < (G) / LANES; v++) t = fmadd(q[v], load_floats(xr[r] + at + v * LANES), t); \
            acc[r][A] = fmadd(t, scale, acc[r][A]); \
        } \
    } while (0)

/* Channel c for activation rows [row0, row0 + rows): ROWS is a constant (1 or ROW_BLOCK), so
 * every accumulator stays in a register; rows past `rows` repeat row0 and are not stored. Two
 * accumulators per row (even and odd groups) keep two FMA chains in flight. */
/* The start of a channel routine: prefetch ahead in the weight stream, and the pointers of rows
 * [row0, row0 + rows) of x (rows past `rows` repeat row0), of its group sums and, for int8
 * activations, of xq and its scales. */
#define CHANNEL_START(G, ROWS) \
        const int64_t groups = job->k / (G); \
        const uint8_t *row = job->w + c * job->row_bytes; \
        for (int64_t line = 0; line < job->row_bytes; line += 64) \
            if (row + PREFETCH + line < end) __builtin_prefetch(row + PREFETCH + line, 0, 2); \
        const float *xr[ROWS], *sums[ROWS], *xd[ROWS]; \
        const int8_t *xq[ROWS]; \
        for (int r = 0; r < ROWS; r++) { \
            const int64_t at = row0 + (r < rows ? r : 0); \
            xr[r] = job->x + at * job->k; \
            sums[r] = job->xsum + at * groups; \
            xq[r] = job->xq ? job->xq + at * job->k : NULL; \
            xd[r] = job->xd ? job->xd + at * (job->k / XBLOCK) : NULL; \
        } \
        float shift[ROWS]; \
        for (int r = 0; r < ROWS; r++) shift[r] = 0.0f; \
        float s[SLICE], o[SLICE];

/* shift[r] += sum over groups [g0, g0 + count) of (o - z s) times the group sum of x (row r). */
static inline void add_shift(const float *s, float *o, int64_t count, float zero, int offset, const float *const *sums,
                             int64_t g0, int rows, float *shift) {
    for (int64_t i = 0; i < count; i++) o[i] = (offset ? o[i] : 0.0f) - zero * s[i];
    for (int r = 0; r < rows; r++) {
        /* four partial sums: one chain of dependent adds would cost a channel of a short row more
         * than its products */
        float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int64_t i = 0;
        for (; i + 4 <= count; i += 4)
            for (int j = 0; j < 4; j++) total[j] += o[i + j] * sums[r][g0 + i + j];
        for (; i < count; i++) total[0] += o[i] * sums[r][g0 + i];
        shift[r] += (total[0] + total[1]) + (total[2] + total[3]);
    }
}

/* sum over i < count of (o_i - zero s_i) sums_i (o_i = 0 without offsets): a channel's shift, in
 * vectors (the scalar loop of add_shift costs a short row's channel as much as its products). */
static inline float offsets_times_sums(const float *s, const float *o, int64_t count, float zero, int offset,
                                       const float *sums) {
    vf total = {0};
    int64_t i = 0;
    for (; i + LANES <= count; i += LANES) {
        const vf shift = (offset ? load_floats(o + i) : (vf){0}) - splat(zero) * load_floats(s + i);
        total = fmadd(shift, load_floats(sums + i), total);
    }
    float rest = 0.0f;
    for (; i < count; i++) rest += ((offset ? o[i] : 0.0f) - zero * s[i]) * sums[i];
    return sum_lanes(total) + rest;
}

#define DEFINE_CHANNEL(NAME, FMT, G, ZERO, OFFSET, ROWS) \
    static void NAME(const MatmulJob *job, int64_t c, int64_t row0, int rows, const uint8_t *end) { \
        CHANNEL_START(G, ROWS) \
        (void)xq; \
        (void)xd; \
        vf acc[ROWS][2]; \
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = (vf){0}; \
        for (int64_t g0 = 0; g0 < groups; g0 += SLICE) { \
            const int64_t count = groups - g0 < SLICE ? groups - g0 : SLICE; \
            scales_##FMT(row, job->blocks, g0, count, s, o); \
            if ((OFFSET) || (ZERO)) add_shift(s, o, count, (float)(ZERO), OFFSET, sums, g0, ROWS, shift); \
            int64_t i = 0; \
            for (; i + 2 <= count; i += 2) { \
                GROUP_STEP(FMT, G, ROWS, i, 0); \
                GROUP_STEP(FMT, G, ROWS, i + 1, 1); \
            } \
            if (i < count) GROUP_STEP(FMT, G, ROWS, i, 0); \
        } \
        for (int r = 0; r < rows; r++) job->out[(row0 + r) * job->n + c] = sum_lanes(acc[r][0] + acc[r][1]) + shift[r]; \
    }

/* Block t0 + t of 32 weights into the accumulators acc[r][A] of each row (a statement). */
#define BLOCK_STEP(FMT, G, ROWS, t, A) \
    do { \
        for (int r = 0; r < ROWS; r++) { \
            vs32 x; \
            memcpy(&x, xq[r] + (t0 + (t)) * XBLOCK, XBLOCK); \
            const vi8 dot = dot8_##FMT(row, job->blocks, t0 + (t), x); \
            vf8 scale; \
            if ((int)(G) == (int)XBLOCK) { \
                scale = splat8(sd[r][t]); \
            } else { \
                const float lo = sd[r][2 * (t)], hi = sd[r][2 * (t) + 1]; \
                scale = (vf8){lo, lo, lo, lo, hi, hi, hi, hi}; \
            } \
            acc[r][A] += __builtin_convertvector(dot, vf8) * scale; \
        } \
    } while (0)

/* The same channel with int8 activations (gguf_int8.h): block t of 32 weights is one integer dot
 * product per row, scaled by s d in float32 (Q6_K: its two groups' scales in lanes 0..3, 4..7). */
#define DEFINE_CHANNEL8(NAME, FMT, G, ZERO, OFFSET, ROWS) \
    static void NAME(const MatmulJob *job, int64_t c, int64_t row0, int rows, const uint8_t *end) { \
        CHANNEL_START(G, ROWS) \
        (void)xr; \
        vf8 acc[ROWS][2]; \
        for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = (vf8){0}; \
        float sd[ROWS][SLICE]; \
        for (int64_t g0 = 0; g0 < groups; g0 += SLICE) { \
            const int64_t count = groups - g0 < SLICE ? groups - g0 : SLICE; \
            scales_##FMT(row, job->blocks, g0, count, s, o); \
            if ((OFFSET) || (ZERO)) add_shift(s, o, count, (float)(ZERO), OFFSET, sums, g0, ROWS, shift); \
            const int64_t t0 = g0 * (G) / XBLOCK, count8 = count * (G) / XBLOCK; \
            for (int r = 0; r < ROWS; r++) /* s d of every group of the slice, vectorized */ \
                for (int64_t i = 0; i < count; i++) sd[r][i] = s[i] * xd[r][t0 + i * (G) / XBLOCK]; \
            int64_t t = 0; \
            for (; t + 2 <= count8; t += 2) { \
                BLOCK_STEP(FMT, G, ROWS, t, 0); \
                BLOCK_STEP(FMT, G, ROWS, t + 1, 1); \
            } \
            if (t < count8) BLOCK_STEP(FMT, G, ROWS, t, 0); \
        } \
        for (int r = 0; r < rows; r++) job->out[(row0 + r) * job->n + c] = sum8(acc[r][0] + acc[r][1]) + shift[r]; \
    }

/* Prefetch the line PREFETCH bytes ahead of block t (of 32 weights) of a row of w, unless past
 * end. One prefetch per channel and block spreads them over the loop: a burst of a row's lines
 * at the start of each step of channels kept fewer misses in flight (measured 1.1-1.4x slower
 * with the weights out of cache). */
static inline void prefetch_ahead(const MatmulJob *job, const uint8_t *row, int64_t t, const uint8_t *end) {
    const uint8_t *ahead = row + PREFETCH + t * job->xblock_bytes;
    if (ahead < end) __builtin_prefetch(ahead, 0, 2);
}

/* One activation row (decoding) times CHANNELS consecutive channels [c, c + CHANNELS): each
 * group of x is loaded once and meets the converted q of every channel, whose accumulators are
 * independent chains; the scales of the channels' slices are converted together, and the whole
 * stretch of w (CHANNELS rows, contiguous) is prefetched as the loop goes (prefetch_ahead). */
#define DEFINE_CHANNELS(NAME, FMT, G, ZERO, OFFSET) \
    static void NAME(const MatmulJob *job, int64_t c, const uint8_t *end) { \
        const int64_t groups = job->k / (G); \
        const uint8_t *rows[CHANNELS]; \
        for (int h = 0; h < CHANNELS; h++) rows[h] = job->w + (c + h) * job->row_bytes; \
        float shift[CHANNELS] = {0}, s[CHANNELS][SLICE], o[CHANNELS][SLICE]; \
        vf acc[CHANNELS]; \
        for (int h = 0; h < CHANNELS; h++) acc[h] = (vf){0}; \
        for (int64_t g0 = 0; g0 < groups; g0 += SLICE) { \
            const int64_t count = groups - g0 < SLICE ? groups - g0 : SLICE; \
            for (int h = 0; h < CHANNELS; h++) { \
                scales_##FMT(rows[h], job->blocks, g0, count, s[h], o[h]); \
                if ((OFFSET) || (ZERO)) \
                    shift[h] += offsets_times_sums(s[h], o[h], count, (float)(ZERO), OFFSET, job->xsum + g0); \
            } \
            for (int64_t i = 0; i < count; i++) { \
                vf x[(G) / LANES]; \
                for (int v = 0; v < (G) / LANES; v++) x[v] = load_floats(job->x + (g0 + i) * (G) + v * LANES); \
                for (int h = 0; h < CHANNELS; h++) { \
                    prefetch_ahead(job, rows[h], (g0 + i) * (G) / XBLOCK, end); \
                    vf q[(G) / LANES]; \
                    if (SCALED_##FMT) { \
                        scaled_##FMT(rows[h], job->blocks, g0 + i, s[h][i], q); \
                        for (int v = 0; v < (G) / LANES; v++) acc[h] = fmadd(q[v], x[v], acc[h]); \
                        continue; \
                    } \
                    group_##FMT(rows[h], job->blocks, g0 + i, q); \
                    vf t = q[0] * x[0]; \
                    for (int v = 1; v < (G) / LANES; v++) t = fmadd(q[v], x[v], t); \
                    acc[h] = fmadd(t, splat(s[h][i]), acc[h]); \
                } \
            } \
        } \
        for (int h = 0; h < CHANNELS; h++) job->out[c + h] = sum_lanes(acc[h]) + shift[h]; \
    }

/* The same with int8 activations: block t of x is loaded once for every channel. */
#define DEFINE_CHANNELS8(NAME, FMT, G, ZERO, OFFSET) \
    static void NAME(const MatmulJob *job, int64_t c, const uint8_t *end) { \
        const int64_t groups = job->k / (G); \
        const uint8_t *rows[CHANNELS]; \
        for (int h = 0; h < CHANNELS; h++) rows[h] = job->w + (c + h) * job->row_bytes; \
        float shift[CHANNELS] = {0}, s[CHANNELS][SLICE], o[CHANNELS][SLICE]; \
        vf8 acc[CHANNELS]; \
        for (int h = 0; h < CHANNELS; h++) acc[h] = (vf8){0}; \
        for (int64_t g0 = 0; g0 < groups; g0 += SLICE) { \
            const int64_t count = groups - g0 < SLICE ? groups - g0 : SLICE; \
            const int64_t t0 = g0 * (G) / XBLOCK, count8 = count * (G) / XBLOCK; \
            const int64_t paired = PAIRS_##FMT ? count8 / 2 * 2 : 0; \
            for (int h = 0; h < CHANNELS; h++) { \
                scales_##FMT(rows[h], job->blocks, g0, count, s[h], o[h]); \
                if ((OFFSET) || (ZERO)) \
                    shift[h] += offsets_times_sums(s[h], o[h], count, (float)(ZERO), OFFSET, job->xsum + g0); \
                if (PAIR_ZERO_##FMT) \
                    shift[h] += offsets_times_sums(s[h], o[h], paired, (float)PAIR_ZERO_##FMT, 0, job->xsum + g0); \
                for (int64_t i = 0; i < count; i++) s[h][i] *= job->xd[t0 + i * (G) / XBLOCK]; \
            } \
            if (paired) FMT##_pairs(job, rows, t0, paired, s, shift, end); \
            for (int64_t t = paired; t < count8; t++) { \
                vs32 x; \
                memcpy(&x, job->xq + (t0 + t) * XBLOCK, XBLOCK); \
                for (int h = 0; h < CHANNELS; h++) { \
                    prefetch_ahead(job, rows[h], t0 + t, end); \
                    const vi8 dot = dot8_##FMT(rows[h], job->blocks, t0 + t, x); \
                    vf8 scale; \
                    if ((int)(G) == (int)XBLOCK) { \
                        scale = splat8(s[h][t]); \
                    } else { \
                        const float lo = s[h][2 * t], hi = s[h][2 * t + 1]; \
                        scale = (vf8){lo, lo, lo, lo, hi, hi, hi, hi}; \
                    } \
                    acc[h] += __builtin_convertvector(dot, vf8) * scale; \
                } \
            } \
        } \
        for (int h = 0; h < CHANNELS; h++) job->out[c + h] = sum8(acc[h]) + shift[h]; \
    }

/* total[h] += the products of blocks [t0, t0 + paired) of x (int8) with channel h, two blocks per
 * vpdpbusd (gguf_int8.h), scaled by s[h] (s d of each block); paired is even. */
#if PAIR_PATH
#define DEFINE_PAIRS(FMT) \
    static void FMT##_pairs(const MatmulJob *job, const uint8_t *const *rows, int64_t t0, int64_t paired, \
                            float (*s)[SLICE], float *total, const uint8_t *end) { \
        __m512 acc[CHANNELS]; \
        for (int h = 0; h < CHANNELS; h++) acc[h] = _mm512_setzero_ps(); \
        for (int64_t t = 0; t < paired; t += 2) { \
            const __m512i x = _mm512_loadu_si512(job->xq + (t0 + t) * XBLOCK); \
            for (int h = 0; h < CHANNELS; h++) { \
                prefetch_ahead(job, rows[h], t0 + t, end); \
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), pair_##FMT(rows[h], job->blocks, t0 + t), x); \
                const __m512 scale = _mm512_insertf32x8(_mm512_set1_ps(s[h][t]), _mm256_set1_ps(s[h][t + 1]), 1); \
                acc[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[h]); \
            } \
        } \
        for (int h = 0; h < CHANNELS; h++) total[h] += _mm512_reduce_add_ps(acc[h]); \
    }
DEFINE_PAIRS(q4_1)
DEFINE_PAIRS(q5_0)
DEFINE_PAIRS(q4_k)
DEFINE_PAIRS(q8_0)
#else
#define q4_1_pairs(job, rows, t0, paired, s, total, end) ((void)0)
#define q5_0_pairs(job, rows, t0, paired, s, total, end) ((void)0)
#define q4_k_pairs(job, rows, t0, paired, s, total, end) ((void)0)
#define q8_0_pairs(job, rows, t0, paired, s, total, end) ((void)0)
#endif
#define q6_k_pairs(job, rows, t0, paired, s, total, end) ((void)0)

typedef void (*channel_fn)(const MatmulJob *job, int64_t c, int64_t row0, int rows, const uint8_t *end);
typedef void (*channels_fn)(const MatmulJob *job, int64_t c, const uint8_t *end);

/* The channels of one chunk, channel by channel, all row blocks: the channel's weights come from
 * cache after the first. */
static inline void run_chunk(const MatmulJob *job, int64_t chunk, channel_fn one, channel_fn block, channels_fn many) {
    const int64_t first = chunk * job->channels_per_chunk;
    const int64_t last = first + job->channels_per_chunk < job->n ? first + job->channels_per_chunk : job->n;
    /* prefetch up to the end of w, not of the chunk: on one thread the next chunk follows, and
     * stopping short of it left its first PREFETCH bytes to demand misses */
    const uint8_t *end = job->w + job->n * job->row_bytes;
    int64_t c = first;
    if (job->m == 1)
        for (; c + CHANNELS <= last; c += CHANNELS) many(job, c, end);
    for (; c < last; c++)
        for (int64_t row0 = 0; row0 < job->m; row0 += ROW_BLOCK) {
            const int rows = job->m - row0 < ROW_BLOCK ? (int)(job->m - row0) : ROW_BLOCK;
            (rows == 1 ? one : block)(job, c, row0, rows, end);
        }
}

#define DEFINE_FORMAT(FMT, G, ZERO, OFFSET) \
    DEFINE_CHANNEL(FMT##_one, FMT, G, ZERO, OFFSET, 1) \
    DEFINE_CHANNEL(FMT##_block, FMT, G, ZERO, OFFSET, ROW_BLOCK) \
    DEFINE_CHANNEL8(FMT##_one8, FMT, G, ZERO, OFFSET, 1) \
    DEFINE_CHANNEL8(FMT##_block8, FMT, G, ZERO, OFFSET, ROW_BLOCK) \
    DEFINE_CHANNELS(FMT##_many, FMT, G, ZERO, OFFSET) \
    DEFINE_CHANNELS8(FMT##_many8, FMT, G, ZERO, OFFSET) \
    static void FMT##_chunk(const void *arg, int64_t chunk) { run_chunk(arg, chunk, FMT##_one, FMT##_block, FMT##_many); } \
    static void FMT##_chunk8(const void *arg, int64_t chunk) { \
        run_chunk(arg, chunk, FMT##_one8, FMT##_block8, FMT##_many8); \
    }

DEFINE_FORMAT(q8_0, GROUP, 0, 0)
DEFINE_FORMAT(q4_1, GROUP, 0, 1)
DEFINE_FORMAT(q5_0, GROUP, 16, 0)
DEFINE_FORMAT(q4_k, GROUP, 0, 1)
DEFINE_FORMAT(q6_k, Q6_K_GROUP, 32, 0)

static pool_task matmul_task(int type, int int8_x) {
    switch (type) {
    case Q8_0: return int8_x ? q8_0_chunk8 : q8_0_chunk;
    case Q4_1: return int8_x ? q4_1_chunk8 : q4_1_chunk;
    case Q5_0: return int8_x ? q5_0_chunk8 : q5_0_chunk;
    case Q4_K: return int8_x ? q4_k_chunk8 : q4_k_chunk;
    case Q6_K: return int8_x ? q6_k_chunk8 : q6_k_chunk;
    default: return NULL;
    }
}

/* out (m, n) = x (m, k) w^T for the n rows of w in format `type` (ggml's type number), in the
 * layout of gguf_formats.h; with int8_x, x is first quantized to int8 per block of 32
 * (gguf_int8.h). Returns 0, STATUS_BAD_TYPE for a format this file does not read,
 * STATUS_BAD_SIZE for negative sizes or a k that is not a whole number of blocks,
 * STATUS_NO_MEMORY when the group sums (or the quantized copy) of x cannot be allocated. */
int gguf_matmul(int type, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, float *out,
                int threads, int int8_x) {
    const pool_task task = matmul_task(type, int8_x);
    if (task == NULL) return STATUS_BAD_TYPE;
    if (m < 0 || n < 0 || k < 0 || k % block_weights(type)) return STATUS_BAD_SIZE;
    if (m == 0 || n == 0) return 0;
    if (k == 0) { /* an empty sum (and no row bytes to divide the work by) */
        memset(out, 0, (size_t)(m * n) * sizeof(float));
        return 0;
    }
    const int64_t group = group_size(type), groups = k / group;
    /* one allocation: the group sums, then (int8_x) the block scales and the int8 copy of x */
    const int64_t floats = m * groups + (int8_x ? m * k / XBLOCK : 0);
    const size_t bytes = (size_t)floats * sizeof(float) + (int8_x ? (size_t)(m * k) : 1);
    float on_stack[STACK_FLOATS]; /* a decoding call's sums (no allocation per call) */
    float *xsum = bytes <= sizeof on_stack ? on_stack : malloc(bytes);
    if (xsum == NULL) return STATUS_NO_MEMORY;
    float *xd = int8_x ? xsum + m * groups : NULL;
    int8_t *xq = int8_x ? (int8_t *)(xsum + floats) : NULL;
    if (int8_x) {
        /* The group sums of the quantized x: a weight's offset then meets the same x as its
         * integer part, and the error is that of x @ w^T with x rounded (sum |w| d / 2 per block),
         * not the larger one of its integer part alone. */
        quantize_activations(x, m, k, xq, xd);
        for (int64_t i = 0; i < m * groups; i++) {
            int32_t total = 0;
            for (int64_t j = 0; j < group; j++) total += xq[i * group + j];
            xsum[i] = (float)total * xd[i * group / XBLOCK];
        }
    } else {
        for (int64_t i = 0; i < m * groups; i++) {
            float total = 0.0f;
            for (int64_t j = 0; j < group; j++) total += x[i * group + j];
            xsum[i] = total;
        }
    }
    const int64_t blocks = k / block_weights(type), row_bytes = blocks * block_bytes(type);
    int64_t per_chunk = (CHUNK_BYTES / row_bytes + CHANNELS - 1) / CHANNELS * CHANNELS;
    MatmulJob job = {x, xsum, xq, xd, w, out, m, n, k, row_bytes, blocks, per_chunk, row_bytes / (k / XBLOCK)};
    if (n * row_bytes * ((m + ROW_BLOCK - 1) / ROW_BLOCK) < SERIAL_BYTES) threads = 1;
    pool_run(task, &job, (n + per_chunk - 1) / per_chunk, threads);
    if (xsum != on_stack) free(xsum);
    return 0;
}

/* Hides a value from the optimizer, so that a product and the sum that follows are not fused. */
#if defined(__x86_64__) || defined(__i386__)
#define UNFUSED(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__)
#define UNFUSED(v) __asm__("" : "+w"(v))
#else
#define UNFUSED(v) do { volatile vf kept_ = (v); (v) = kept_; } while (0)
#endif

/* One row of k weights as float32, rounded as the numpy code rounds: s (q - z), then + o. */
#define DEFINE_DEQUANTIZE(FMT, G, ZERO, OFFSET) \
    static void FMT##_dequantize_row(const uint8_t *row, int64_t blocks, int64_t k, float *out) { \
        float s[SLICE], o[SLICE]; \
        for (int64_t g0 = 0; g0 < k / (G); g0 += SLICE) { \
            const int64_t count = k / (G) - g0 < SLICE ? k / (G) - g0 : SLICE; \
            scales_##FMT(row, blocks, g0, count, s, o); \
            for (int64_t i = 0; i < count; i++) { \
                vf q[(G) / LANES]; \
                group_##FMT(row, blocks, g0 + i, q); \
                for (int v = 0; v < (G) / LANES; v++) { \
                    vf w = (q[v] - splat((float)(ZERO))) * splat(s[i]); \
                    if (OFFSET) { \
                        UNFUSED(w); \
                        w += splat(o[i]); \
                    } \
                    store_floats(out + (g0 + i) * (G) + v * LANES, w); \
                } \
            } \
        } \
    }

DEFINE_DEQUANTIZE(q8_0, GROUP, 0, 0)
DEFINE_DEQUANTIZE(q4_1, GROUP, 0, 1)
DEFINE_DEQUANTIZE(q5_0, GROUP, 16, 0)
DEFINE_DEQUANTIZE(q4_k, GROUP, 0, 1)
DEFINE_DEQUANTIZE(q6_k, Q6_K_GROUP, 32, 0)

typedef struct {
    int type;
    const uint8_t *w;
    const int64_t *rows; /* NULL: all rows in order */
    float *out;
    int64_t k, row_bytes, blocks, rows_per_chunk, count;
} DequantizeJob;

static void dequantize_chunk(const void *arg, int64_t chunk) {
    const DequantizeJob *job = arg;
    const int64_t first = chunk * job->rows_per_chunk;
    const int64_t last = first + job->rows_per_chunk < job->count ? first + job->rows_per_chunk : job->count;
    for (int64_t i = first; i < last; i++) {
        const uint8_t *row = job->w + (job->rows ? job->rows[i] : i) * job->row_bytes;
        float *out = job->out + i * job->k;
        switch (job->type) {
        case Q8_0: q8_0_dequantize_row(row, job->blocks, job->k, out); break;
        case Q4_1: q4_1_dequantize_row(row, job->blocks, job->k, out); break;
        case Q5_0: q5_0_dequantize_row(row, job->blocks, job->k, out); break;
        case Q4_K: q4_k_dequantize_row(row, job->blocks, job->k, out); break;
        case Q6_K: q6_k_dequantize_row(row, job->blocks, job->k, out); break;
        }
    }
}

/* out (count, k) = the float32 values of rows `rows` (count of them; NULL: rows 0 .. count - 1)
 * of the n-row weight w in format `type`. Returns 0, STATUS_BAD_TYPE, STATUS_BAD_SIZE, or
 * STATUS_BAD_ROW when a row index lies outside [0, n) (nothing is written then). */
int gguf_dequantize(int type, const uint8_t *w, int64_t n, int64_t k, const int64_t *rows, int64_t count, float *out,
                    int threads) {
    if (matmul_task(type, 0) == NULL) return STATUS_BAD_TYPE;
    if (n < 0 || k < 0 || count < 0 || k % block_weights(type) || (rows == NULL && count > n)) return STATUS_BAD_SIZE;
    if (rows != NULL)
        for (int64_t i = 0; i < count; i++)
            if (rows[i] < 0 || rows[i] >= n) return STATUS_BAD_ROW;
    if (count == 0 || k == 0) return 0;
    const int64_t blocks = k / block_weights(type), row_bytes = blocks * block_bytes(type);
    int64_t per_chunk = CHUNK_BYTES / row_bytes;
    if (per_chunk < 1) per_chunk = 1;
    DequantizeJob job = {type, w, rows, out, k, row_bytes, blocks, per_chunk, count};
    if (count * row_bytes < SERIAL_BYTES) threads = 1;
    pool_run(dequantize_chunk, &job, (count + per_chunk - 1) / per_chunk, threads);
    return 0;
}
