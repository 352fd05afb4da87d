/* Weight-only int8 products for a few rows of activations (decoding): out = (x q^T) * scales.
 *
 * x is (m, k) float32 or bfloat16, q holds (n, k) int8 weights (one row per output channel) in the
 * packed layout below, scales is (n,) float32, out is (m, n) float32 or bfloat16. Each output is
 * sum_i x[r, i] * q[c, i] accumulated in float32, then multiplied by scales[c] in float32 and
 * rounded once to out's dtype (round to nearest even for bfloat16). Decoding one token multiplies
 * one row by every weight of the model, so the product is bound by the speed at which q streams
 * from memory: the kernel reads each weight byte once per call (for up to ROW_BLOCK rows; more rows
 * re-read a block of weights while it is still in cache), widens LANES int8 values to float32 in
 * registers and adds them into CHANNELS x rows accumulator vectors. x is copied once per call into
 * a float32 buffer padded with zeros to whole chunks. Channel blocks are split into contiguous
 * ranges, one per thread (pthreads), so every thread streams its own part of q.
 *
 * Packed layout: channels in blocks of CHANNELS, inputs in chunks of CHUNK; block b, chunk j holds
 * the CHUNK values of channel b*CHANNELS, then of the next channel, and so on, so q is
 * (ceil(n / CHANNELS), ceil(k / CHUNK), CHANNELS, CHUNK) with zeros past n and k. The kernel reads
 * it front to back: one sequential stream per thread instead of one per channel of the register
 * block (four interleaved row streams measured about 4.8 GB/s per core against 7.5 for bf16).
 * The layout is the same for every build; attnkit.kernels.int8_native packs and unpacks it.
 *
 * Vectors are GNU C vector extensions as wide as the instruction set the file is compiled for:
 *   AVX-512: 16 lanes; AVX2 + FMA: 8 lanes; anything else (SSE2, NEON, scalar): 4 lanes.
 */
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#define LANES 16
#define ISA_PATH "avx512 (16-lane float32 accumulators, 4 channels x 4 rows)"
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
#define ISA_PATH "avx2 (8-lane float32 accumulators, 4 channels x 4 rows)"
#else
#define LANES 4
#define ISA_PATH "generic (4-lane float32 accumulators, 4 channels x 4 rows)"
#endif

enum {
    CHANNELS = 4,           /* output channels per register block and per block of the packed layout */
    CHUNK = 64,             /* int8 values of one channel stored together in the packed layout */
    ROW_BLOCK = 4,          /* activation rows per register block: CHANNELS x ROW_BLOCK accumulators */
    MAX_THREADS = 256,
    BYTES_PER_THREAD = 1 << 18, /* weight bytes below which an extra thread costs more than it saves */
    PREFETCH = 8192             /* bytes ahead of the loads in the weight stream (decoding) */
};

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef float vf_unaligned __attribute__((vector_size(LANES * 4), aligned(4)));
typedef int8_t vb __attribute__((vector_size(LANES)));
typedef int8_t vb_unaligned __attribute__((vector_size(LANES), aligned(1)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

const char *int8_matvec_isa(void) { return ISA_PATH; }

static inline vf load_x(const float *p) { return *(const vf_unaligned *)p; }
/* LANES int8 weights widened to float32. GCC 12 turns __builtin_convertvector from int8 into one
 * scalar load per lane, so the x86 paths name the sign-extending loads themselves. */
static inline vf load_q(const int8_t *p) {
#if LANES == 16
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif LANES == 8
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#else
    return __builtin_convertvector(__builtin_convertvector(*(const vb_unaligned *)p, vi), vf);
#endif
}
static inline float sum_lanes(vf v) {
#if LANES == 16
    return _mm512_reduce_add_ps((__m512)v); /* a shuffle tree: 10% faster at 576 inputs than the loop */
#else
    float total = 0.0f;
    for (int i = 0; i < LANES; i++) total += v[i];
    return total;
#endif
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest, ties to even */
    return (uint16_t)(bits >> 16);
}

typedef struct {
    const float *x;       /* (m, kp) float32, zero past k */
    const int8_t *q;      /* packed: (ceil(n / CHANNELS), kp / CHUNK, CHANNELS, CHUNK) */
    const float *scales;  /* (n,) */
    void *out;            /* (m, n) */
    int out_bf16;
    int64_t m, n, kp;
    int64_t first, last;  /* this thread's channel blocks [first, last) */
} Job;

static inline void put(const Job *job, int64_t row, int64_t channel, float value) {
    if (job->out_bf16)
        ((uint16_t *)job->out)[row * job->n + channel] = float_to_bf16(value);
    else
        ((float *)job->out)[row * job->n + channel] = value;
}

/* Outputs of `rows` (<= ROW_BLOCK) activation rows from `row0` for the channel block `b`. The loops
 * over rows and channels have constant bounds, so the compiler keeps all accumulators in registers;
 * absent rows repeat the first one and are not stored, the zero channels that pad the last block
 * are computed and not stored. */
static void block(const Job *job, int64_t row0, int rows, int64_t b) {
    const int64_t kp = job->kp, chunks = kp / CHUNK;
    const int8_t *qb = job->q + b * CHANNELS * kp; /* the block's weights: one contiguous stream */
    const float *xr[ROW_BLOCK];
    for (int r = 0; r < ROW_BLOCK; r++) xr[r] = job->x + (row0 + (r < rows ? r : 0)) * kp;
    vf acc[ROW_BLOCK][CHANNELS];
    for (int r = 0; r < ROW_BLOCK; r++)
        for (int c = 0; c < CHANNELS; c++) acc[r][c] = (vf){0};
    if (rows == 1) { /* decoding: the only row, so the other accumulators are not computed at all */
        for (int64_t j = 0; j < chunks; j++) {
            const int8_t *p = qb + j * CHANNELS * CHUNK;
            /* Fetching the one stream 8 KiB ahead into L2 (locality 2: prefetcht1) keeps enough
             * misses in flight: 10 GB/s per core here against 4.9 for the four row streams with
             * non-temporal fetches 1 KiB ahead, and 5.1 without software prefetch; 4 KiB ahead
             * was 5% slower, 16-32 KiB the same, fetches into L1 (prefetcht0) 2 KiB ahead 6.3. */
            for (int line = 0; line < CHANNELS * CHUNK; line += 64) __builtin_prefetch(p + PREFETCH + line, 0, 2);
            for (int v = 0; v < CHUNK; v += LANES) {
                vf xv = load_x(xr[0] + j * CHUNK + v);
                for (int c = 0; c < CHANNELS; c++) acc[0][c] += xv * load_q(p + c * CHUNK + v);
            }
        }
    } else {
        for (int64_t j = 0; j < chunks; j++) {
            const int8_t *p = qb + j * CHANNELS * CHUNK;
            for (int line = 0; line < CHANNELS * CHUNK; line += 64) __builtin_prefetch(p + PREFETCH + line, 0, 2);
            for (int v = 0; v < CHUNK; v += LANES) {
                vf w[CHANNELS];
                for (int c = 0; c < CHANNELS; c++) w[c] = load_q(p + c * CHUNK + v);
                for (int r = 0; r < ROW_BLOCK; r++) {
                    vf xv = load_x(xr[r] + j * CHUNK + v);
                    for (int c = 0; c < CHANNELS; c++) acc[r][c] += xv * w[c];
                }
            }
        }
    }
    const int64_t c0 = b * CHANNELS;
    const int channels = job->n - c0 < CHANNELS ? (int)(job->n - c0) : CHANNELS;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < channels; c++) put(job, row0 + r, c0 + c, sum_lanes(acc[r][c]) * job->scales[c0 + c]);
}

static void *run(void *arg) {
    const Job *job = arg;
    for (int64_t b = job->first; b < job->last; b++) {
        /* Row blocks innermost: the block's weights are read from memory once and from cache for
         * the next row blocks. */
        for (int64_t row0 = 0; row0 < job->m; row0 += ROW_BLOCK)
            block(job, row0, job->m - row0 < ROW_BLOCK ? (int)(job->m - row0) : ROW_BLOCK, b);
    }
    return NULL;
}

int int8_matvec_channels(void) { return CHANNELS; }
int int8_matvec_chunk(void) { return CHUNK; }

/* out = (x q^T) * scales as described at the top, q in the packed layout. x_bf16 / out_bf16 say
 * whether x / out hold bfloat16 (else float32). Returns 0, 1 for bad sizes, 2 when memory for the
 * float32 copy of x cannot be allocated. */
int int8_matvec(const void *x, int x_bf16, const int8_t *q, const float *scales, void *out, int out_bf16,
                int64_t m, int64_t n, int64_t k, int threads) {
    if (m < 0 || n < 0 || k < 0) return 1;
    if (m == 0 || n == 0) return 0;
    const int64_t kp = (k + CHUNK - 1) / CHUNK * CHUNK;
    /* x widened to float32 and padded with zeros to whole chunks, which meet the zero weights that
     * pad q: the last chunk needs no scalar tail. */
    float *padded = calloc((size_t)(m * kp) + 1, sizeof(float));
    if (!padded) return 2;
    for (int64_t r = 0; r < m; r++) {
        if (x_bf16) {
            const uint16_t *h = (const uint16_t *)x + r * k;
            for (int64_t i = 0; i < k; i++) padded[r * kp + i] = bf16_to_float(h[i]);
        } else {
            memcpy(padded + r * kp, (const float *)x + r * k, (size_t)k * sizeof(float));
        }
    }
    Job base = {padded, q, scales, out, out_bf16, m, n, kp, 0, 0};
    int64_t useful = n * kp / BYTES_PER_THREAD;
    if (threads > useful) threads = useful > 0 ? (int)useful : 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads < 1) threads = 1;
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    const int64_t blocks = (n + CHANNELS - 1) / CHANNELS; /* split as evenly as they go */
    for (int t = 0; t < threads; t++) {
        jobs[t] = base;
        jobs[t].first = blocks * t / threads;
        jobs[t].last = blocks * (t + 1) / threads;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, run, &jobs[t]) == 0;
    run(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(ids[t], NULL);
        else
            run(&jobs[t]); /* no thread could be started: this one does that range too */
    }
    free(padded);
    return 0;
}

/* out[i] = q[i] as float32 (out_bf16 = 0) or bfloat16 (else; exact, |q| <= 128 needs 8 bits), for
 * the conversion of weight blocks that a many-row product (a prefill) then multiplies by. */
void int8_widen(const int8_t *q, void *out, int out_bf16, int64_t count) {
    if (out_bf16) {
        uint16_t *o = out;
        for (int64_t i = 0; i < count; i++) {
            float f = (float)q[i];
            uint32_t bits;
            memcpy(&bits, &f, 4);
            o[i] = (uint16_t)(bits >> 16);
        }
    } else {
        float *o = out;
        for (int64_t i = 0; i < count; i++) o[i] = (float)q[i];
    }
}
