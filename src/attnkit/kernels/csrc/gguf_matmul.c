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
 * w over its groups. The result equals x @ dequantized(w)^T up to float32 rounding. Decoding
 * (m = 1) reads each weight byte once per call, at the speed the machine streams memory; for a
 * few rows (ROW_BLOCK at a time) the converted q of a group serve every row while in registers,
 * and the weights of one channel come from cache after the first row block.
 *
 * Work is split into chunks of whole channels (about CHUNK_BYTES of weights each) that the
 * threads of gguf_pool.h take one at a time; a chunk is one contiguous stretch of w, read front to
 * back with software prefetch PREFETCH bytes ahead (as the int8 kernel: one sequential stream per
 * thread keeps enough misses in flight).
 *
 * gguf_dequantize writes chosen rows (an embedding lookup) or all rows as float32, bit for bit the
 * values of the gguf package's numpy dequantization.
 */
#include <stdlib.h>

#include "gguf_formats.h"
#include "gguf_pool.h"

#if LANES == 16
#define ISA_PATH "avx512 (16-lane float32, q converted in registers, 4-row blocks)"
#elif LANES == 8
#define ISA_PATH "avx2 (8-lane float32, q converted in registers, 4-row blocks)"
#else
#define ISA_PATH "generic (4-lane float32, q converted in registers, 4-row blocks)"
#endif

enum {
    ROW_BLOCK = 4,              /* activation rows per register block */
    SLICE = 256,                /* groups whose scales are converted at once (two stack arrays) */
    CHUNK_BYTES = 1 << 14,      /* weight bytes per chunk of work taken by a thread */
    SERIAL_BYTES = 1 << 15,     /* below this many weight bytes (times row blocks) a call runs on one thread */
    PREFETCH = 8192,            /* bytes ahead of the loads in the weight stream */
    STATUS_BAD_TYPE = 1,
    STATUS_BAD_SIZE = 2,
    STATUS_BAD_ROW = 3,
    STATUS_NO_MEMORY = 4,
};

const char *gguf_matmul_isa(void) { return ISA_PATH; }
int gguf_block_weights(int type) { return block_weights(type); }
int gguf_block_bytes(int type) { return block_bytes(type); }
static int group_size(int type) { return type == Q6_K ? Q6_K_GROUP : GROUP; }

typedef struct {
    const float *x;     /* (m, k) */
    const float *xsum;  /* (m, k / group): sums of x over each group */
    const uint8_t *w;
    float *out;
    int64_t m, n, k, row_bytes, blocks, channels_per_chunk;
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
#define DEFINE_CHANNEL(NAME, FMT, G, ZERO, OFFSET, ROWS) \
    static void NAME(const MatmulJob *job, int64_t c, int64_t row0, int rows, const uint8_t *end) { \
        const int64_t groups = job->k / (G); \
        const uint8_t *row = job->w + c * job->row_bytes; \
        for (int64_t line = 0; line < job->row_bytes; line += 64) \
            if (row + PREFETCH + line < end) __builtin_prefetch(row + PREFETCH + line, 0, 2); \
        const float *xr[ROWS], *sums[ROWS]; \
        for (int r = 0; r < ROWS; r++) { \
            const int64_t at = row0 + (r < rows ? r : 0); \
            xr[r] = job->x + at * job->k; \
            sums[r] = job->xsum + at * groups; \
        } \
        vf acc[ROWS][2]; \
        float shift[ROWS]; \
        for (int r = 0; r < ROWS; r++) { \
            acc[r][0] = acc[r][1] = (vf){0}; \
            shift[r] = 0.0f; \
        } \
        float s[SLICE], o[SLICE]; \
        for (int64_t g0 = 0; g0 < groups; g0 += SLICE) { \
            const int64_t count = groups - g0 < SLICE ? groups - g0 : SLICE; \
            scales_##FMT(row, job->blocks, g0, count, s, o); \
            if ((OFFSET) || (ZERO)) { \
                for (int64_t i = 0; i < count; i++) o[i] = ((OFFSET) ? o[i] : 0.0f) - (float)(ZERO) * s[i]; \
                for (int r = 0; r < ROWS; r++) { \
                    float total = 0.0f; \
                    for (int64_t i = 0; i < count; i++) total += o[i] * sums[r][g0 + i]; \
                    shift[r] += total; \
                } \
            } \
            int64_t i = 0; \
            for (; i + 2 <= count; i += 2) { \
                GROUP_STEP(FMT, G, ROWS, i, 0); \
                GROUP_STEP(FMT, G, ROWS, i + 1, 1); \
            } \
            if (i < count) GROUP_STEP(FMT, G, ROWS, i, 0); \
        } \
        for (int r = 0; r < rows; r++) job->out[(row0 + r) * job->n + c] = sum_lanes(acc[r][0] + acc[r][1]) + shift[r]; \
    }

#define DEFINE_FORMAT(FMT, G, ZERO, OFFSET) \
    DEFINE_CHANNEL(FMT##_one, FMT, G, ZERO, OFFSET, 1) \
    DEFINE_CHANNEL(FMT##_block, FMT, G, ZERO, OFFSET, ROW_BLOCK) \
    static void FMT##_chunk(const void *arg, int64_t chunk) { \
        const MatmulJob *job = arg; \
        const int64_t first = chunk * job->channels_per_chunk; \
        const int64_t last = first + job->channels_per_chunk < job->n ? first + job->channels_per_chunk : job->n; \
        const uint8_t *end = job->w + last * job->row_bytes; \
        /* Channel by channel, all row blocks: the channel's weights come from cache after the first. */ \
        for (int64_t c = first; c < last; c++) \
            for (int64_t row0 = 0; row0 < job->m; row0 += ROW_BLOCK) { \
                const int rows = job->m - row0 < ROW_BLOCK ? (int)(job->m - row0) : ROW_BLOCK; \
                if (rows == 1) \
                    FMT##_one(job, c, row0, 1, end); \
                else \
                    FMT##_block(job, c, row0, rows, end); \
            } \
    }

DEFINE_FORMAT(q8_0, GROUP, 0, 0)
DEFINE_FORMAT(q4_1, GROUP, 0, 1)
DEFINE_FORMAT(q5_0, GROUP, 16, 0)
DEFINE_FORMAT(q4_k, GROUP, 0, 1)
DEFINE_FORMAT(q6_k, Q6_K_GROUP, 32, 0)

static pool_task matmul_task(int type) {
    switch (type) {
    case Q8_0: return q8_0_chunk;
    case Q4_1: return q4_1_chunk;
    case Q5_0: return q5_0_chunk;
    case Q4_K: return q4_k_chunk;
    case Q6_K: return q6_k_chunk;
    default: return NULL;
    }
}

/* out (m, n) = x (m, k) w^T for the n rows of w in format `type` (ggml's type number), in the
 * layout of gguf_formats.h. Returns 0, STATUS_BAD_TYPE for a format this file does not read,
 * STATUS_BAD_SIZE for negative sizes or a k that is not a whole number of blocks,
 * STATUS_NO_MEMORY when the group sums of x cannot be allocated. */
int gguf_matmul(int type, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, float *out,
                int threads) {
    const pool_task task = matmul_task(type);
    if (task == NULL) return STATUS_BAD_TYPE;
    if (m < 0 || n < 0 || k < 0 || k % block_weights(type)) return STATUS_BAD_SIZE;
    if (m == 0 || n == 0) return 0;
    const int64_t group = group_size(type), groups = k / group;
    float *xsum = malloc((size_t)(m * groups + 1) * sizeof(float));
    if (xsum == NULL) return STATUS_NO_MEMORY;
    for (int64_t i = 0; i < m * groups; i++) {
        float total = 0.0f;
        for (int64_t j = 0; j < group; j++) total += x[i * group + j];
        xsum[i] = total;
    }
    const int64_t blocks = k / block_weights(type), row_bytes = blocks * block_bytes(type);
    int64_t per_chunk = CHUNK_BYTES / row_bytes;
    if (per_chunk < 1) per_chunk = 1;
    MatmulJob job = {x, xsum, w, out, m, n, k, row_bytes, blocks, per_chunk};
    if (n * row_bytes * ((m + ROW_BLOCK - 1) / ROW_BLOCK) < SERIAL_BYTES) threads = 1;
    pool_run(task, &job, (n + per_chunk - 1) / per_chunk, threads);
    free(xsum);
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
    if (matmul_task(type) == NULL) return STATUS_BAD_TYPE;
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
