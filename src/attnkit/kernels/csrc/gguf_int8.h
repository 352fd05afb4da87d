/* Integer dot products of GGUF blocks with activations quantized to 8 bits (as llama.cpp does).
 *
 * Each row of x is cut into blocks of 32 values and quantized: d = max |x_i| / 127 and
 * xq_i = round(x_i / d), an int8 in [-127, 127] (quantize_activations). The share of a group of
 * weights w_i = s (q_i - z) + o in an output is then computed as
 *
 *     s d (sum_i q_i xq_i) + (o - z s) d (sum_i xq_i)
 *
 * with the integer sums exact (32 products of a byte by an int8, at most 32 * 255 * 127): the
 * product of the rounded activations d xq by the weights, so the only error against
 * x @ dequantized(w)^T besides float32 rounding is that of xq: |x_i - d xq_i| <= d / 2, at most
 * (d / 2) sum_i |w_i| per block of 32.
 *
 * The 32 weights of a block of x are 32 bytes of one 256-bit vector (their q, unsigned, except
 * Q8_0's signed q), multiplied with the block's 32 xq into 8 int32 sums of 4 neighbours:
 *   AVX-512 VNNI (with VL) or AVX-VNNI   one vpdpbusd (unsigned bytes times signed bytes); with
 *                                        AVX-512 VNNI and BW, one row's products take two blocks
 *                                        per 512-bit vpdpbusd (pair_FMT below, Q6_K excepted);
 *   AVX2                                 vpmaddubsw (pairs into int16, which cannot saturate here:
 *                                        q <= 63, or |q| <= 128 for Q8_0, so 2 * 128 * 127 < 2^15)
 *                                        then vpmaddwd with ones;
 *   otherwise                            plain C on GNU vectors.
 * Q8_0's signed q go through the unsigned instructions as |q| times xq with q's sign.
 * Sums 0..3 cover bytes 0..15 and sums 4..7 bytes 16..31: Q6_K's two groups of 16 per block get
 * their own scales in the same float vector.
 */
#ifndef ATTNKIT_GGUF_INT8_H
#define ATTNKIT_GGUF_INT8_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "gguf_formats.h"

enum { XBLOCK = 32 }; /* activations per int8 block (one scale d each) */

typedef uint8_t vb32 __attribute__((vector_size(32)));
typedef int8_t vs32 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float vf8 __attribute__((vector_size(32)));
typedef uint8_t vb16 __attribute__((vector_size(16)));

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOT_PATH "vpdpbusd (AVX-512 VNNI)"
#elif defined(__AVXVNNI__)
#define DOT_PATH "vpdpbusd (AVX-VNNI)"
#elif defined(__AVX2__)
#define DOT_PATH "vpmaddubsw (AVX2)"
#else
#define DOT_PATH "plain C"
#endif

static inline vb32 load32(const uint8_t *p) {
    vb32 v;
    memcpy(&v, p, 32);
    return v;
}

static inline vb16 load16(const uint8_t *p) {
    vb16 v;
    memcpy(&v, p, 16);
    return v;
}

/* 16 bytes lo then 16 bytes hi as one 32-byte vector. */
static inline vb32 join16(vb16 lo, vb16 hi) {
#if defined(__AVX2__)
    return (vb32)_mm256_set_m128i((__m128i)hi, (__m128i)lo);
#else
    vb32 v;
    memcpy(&v, &lo, 16);
    memcpy((uint8_t *)&v + 16, &hi, 16);
    return v;
#endif
}

/* Sums of 4 neighbouring products w_i xq_i (w unsigned bytes, xq signed) into 8 int32. */
static inline vi8 dot_u8_s8(vb32 w, vs32 x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return (vi8)_mm256_dpbusd_epi32(_mm256_setzero_si256(), (__m256i)w, (__m256i)x);
#elif defined(__AVXVNNI__)
    return (vi8)_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), (__m256i)w, (__m256i)x);
#elif defined(__AVX2__)
    return (vi8)_mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)w, (__m256i)x), _mm256_set1_epi16(1));
#else
    vi8 sums = {0};
    for (int i = 0; i < 32; i++) sums[i / 4] += (int32_t)w[i] * (int32_t)x[i];
    return sums;
#endif
}

/* The same for signed w (Q8_0): |w| times xq carrying w's sign (w = -128 gives |w| = 128 as a byte). */
static inline vi8 dot_s8_s8(vs32 w, vs32 x) {
#if defined(__AVX2__)
    return dot_u8_s8((vb32)_mm256_sign_epi8((__m256i)w, (__m256i)w), (vs32)_mm256_sign_epi8((__m256i)x, (__m256i)w));
#else
    vi8 sums = {0};
    for (int i = 0; i < 32; i++) sums[i / 4] += (int32_t)w[i] * (int32_t)x[i];
    return sums;
#endif
}

/* byte i = 16 where bit i of `bits` is set, else 0 (Q5_0's fifth bit). */
static inline vb32 bit4_bytes(uint32_t bits) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return (vb32)_mm256_maskz_mov_epi8((__mmask32)bits, _mm256_set1_epi8(16));
#elif defined(__AVX2__)
    /* byte i gets byte i / 8 of bits, then keeps bit i % 8 of it */
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
                                               _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL,
                                                                  0x0303030303030303LL));
    const __m256i select = _mm256_set1_epi64x(0x8040201008040201LL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
    return (vb32)_mm256_and_si256(set, _mm256_set1_epi8(16));
#else
    vb32 v;
    for (int i = 0; i < 32; i++) v[i] = (bits >> i & 1) ? 16 : 0;
    return v;
#endif
}

/* ---- per format: the 32 q of block t of a row (t counts blocks of 32 weights) ---- */

static inline vi8 dot8_q8_0(const uint8_t *row, int64_t blocks, int64_t t, vs32 x) {
    vs32 w;
    memcpy(&w, field(row, blocks, 2, 32, t), 32);
    return dot_s8_s8(w, x);
}
static inline vb32 bytes_q4_1(const uint8_t *row, int64_t blocks, int64_t t) {
    const vb16 b = load16(field(row, blocks, 4, 16, t));
    return join16(b & 15, b >> 4);
}
static inline vb32 bytes_q5_0(const uint8_t *row, int64_t blocks, int64_t t) {
    uint32_t high;
    memcpy(&high, field(row, blocks, 2, 4, t), 4);
    const vb16 b = load16(field(row, blocks, 6, 16, t));
    return join16(b & 15, b >> 4) | bit4_bytes(high);
}
static inline vb32 bytes_q4_k(const uint8_t *row, int64_t blocks, int64_t t) {
    (void)blocks;
    const int j = (int)(t % 8);
    const vb32 b = load32(row + 144 * (t / 8) + 16 + 32 * (j / 2));
    return j % 2 ? b >> 4 : b & 15;
}
/* Q6_K: block t is groups 2t and 2t + 1 (16 each), 32 contiguous bytes of ql and of qh. */
static inline vb32 bytes_q6_k(const uint8_t *row, int64_t blocks, int64_t t) {
    (void)blocks;
    const int half = (int)(t % 8) / 4, j = (int)(t % 4);
    const uint8_t *block = row + 210 * (t / 8);
    const vb32 low = load32(block + 64 * half + 32 * (j % 2)) >> (4 * (j / 2)) & 15;
    const vb32 high = load32(block + 128 + 32 * half) >> (2 * j) & 3;
    return low | high << 4;
}
#define DEFINE_DOT8(FMT) \
    static inline vi8 dot8_##FMT(const uint8_t *row, int64_t blocks, int64_t t, vs32 x) { \
        return dot_u8_s8(bytes_##FMT(row, blocks, t), x); \
    }
DEFINE_DOT8(q4_1)
DEFINE_DOT8(q5_0)
DEFINE_DOT8(q4_k)
DEFINE_DOT8(q6_k)

/* ---- AVX-512 VNNI: two blocks (t even, t + 1) per 512-bit dot product ----
 * pair_FMT returns the 64 unsigned bytes of blocks t and t + 1 in the order of their 64 xq (block
 * t's 32 weights, then block t + 1's): one vpdpbusd multiplies both, lanes 0..7 for block t and
 * 8..15 for t + 1, which a float vector of their two scales then weighs. Q8_0's signed q go in as
 * q + 128 (a flipped sign bit), and PAIR_ZERO_q8_0 = 128 is the zero point that takes the 128
 * sum(xq) back out through the group sums of x. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define PAIR_PATH 1
/* 128-bit lanes (b0, b0, b1, b1) of 32 bytes b: low nibbles in lanes 0 and 2, high in 1 and 3 */
static inline __m512i nibble_pairs(const uint8_t *p) {
    const __m512i b = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3),
                                               _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)));
    const __m512i shifts = _mm512_setr_epi64(0, 0, 0x0004000400040004LL, 0x0004000400040004LL, 0, 0,
                                             0x0004000400040004LL, 0x0004000400040004LL);
    return _mm512_and_si512(_mm512_srlv_epi16(b, shifts), _mm512_set1_epi8(15));
}
static inline __m512i pair_q4_1(const uint8_t *row, int64_t blocks, int64_t t) {
    return nibble_pairs(field(row, blocks, 4, 16, t));
}
static inline __m512i pair_q5_0(const uint8_t *row, int64_t blocks, int64_t t) {
    uint64_t high;
    memcpy(&high, field(row, blocks, 2, 4, t), 8);
    return _mm512_or_si512(nibble_pairs(field(row, blocks, 6, 16, t)), _mm512_maskz_mov_epi8(high, _mm512_set1_epi8(16)));
}
static inline __m512i pair_q4_k(const uint8_t *row, int64_t blocks, int64_t t) {
    (void)blocks; /* t even: groups t and t + 1 are the low and high nibbles of the same 32 bytes */
    const __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(row + 144 * (t / 8) + 16 + 32 * (t % 8 / 2))));
    return _mm512_and_si512(_mm512_srlv_epi16(b, _mm512_setr_epi64(0, 0, 0, 0, 0x0004000400040004LL, 0x0004000400040004LL,
                                                                    0x0004000400040004LL, 0x0004000400040004LL)),
                            _mm512_set1_epi8(15));
}
static inline __m512i pair_q8_0(const uint8_t *row, int64_t blocks, int64_t t) {
    return _mm512_xor_si512(_mm512_loadu_si512(field(row, blocks, 2, 32, t)), _mm512_set1_epi8((char)0x80));
}
#define PAIRS_q4_1 1
#define PAIRS_q5_0 1
#define PAIRS_q4_k 1
#define PAIRS_q8_0 1
#else
#define PAIR_PATH 0
#define PAIRS_q4_1 0
#define PAIRS_q5_0 0
#define PAIRS_q4_k 0
#define PAIRS_q8_0 0
#endif
#define PAIRS_q6_k 0
#define PAIR_ZERO_q4_1 0
#define PAIR_ZERO_q5_0 0
#define PAIR_ZERO_q4_k 0
#define PAIR_ZERO_q6_k 0
#define PAIR_ZERO_q8_0 128

/* xq (m, k) int8 and d (m, k / XBLOCK): the activations x (m, k) quantized per block of 32
 * (round to nearest, ties to even; an all-zero block gets d = 0 and xq = 0, a block with a NaN or
 * infinity d = NaN). */
static void quantize_activations(const float *x, int64_t m, int64_t k, int8_t *xq, float *d) {
    for (int64_t b = 0; b < m * k / XBLOCK; b++) {
        const float *v = x + b * XBLOCK;
        float largest = 0.0f, total = 0.0f;
        for (int i = 0; i < XBLOCK; i++) {
            largest = fmaxf(largest, fabsf(v[i]));
            total += v[i];
        }
        if (!isfinite(total)) { /* a NaN or infinity: the block's products become NaN, as in float32 */
            d[b] = total - total;
            memset(xq + b * XBLOCK, 0, XBLOCK);
            continue;
        }
        d[b] = largest / 127.0f;
        const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
        for (int i = 0; i < XBLOCK; i++) xq[b * XBLOCK + i] = (int8_t)rintf(v[i] * inverse); /* ties to even */
    }
}

static inline vf8 splat8(float s) { return (vf8){s, s, s, s, s, s, s, s}; }

static inline float sum8(vf8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

#endif
