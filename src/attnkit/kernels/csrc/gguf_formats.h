/* GGUF block formats as the kernels read them: groups of weights w = s (q - z) + o.
 *
 * A weight row of k inputs is k / BLOCK blocks of BYTES bytes. Every format describes a group of
 * G consecutive weights (G = 32, or 16 for Q6_K) by small integers q (exact in float32), an integer
 * zero point z of the format, and one float scale s and float offset o per group:
 *
 *   Q8_0  BLOCK 32, 34 bytes: d (fp16), 32 int8 q.                    s = d, z = 0, o = 0
 *   Q4_1  BLOCK 32, 20 bytes: d, m (fp16), 16 bytes of nibbles, weight i < 16 in the low nibble
 *         of byte i, weight i + 16 in its high nibble.                s = d, z = 0, o = m
 *   Q5_0  BLOCK 32, 22 bytes: d (fp16), 32 high bits (uint32, bit i for weight i), 16 bytes of
 *         low nibbles as Q4_1.                                        s = d, z = 16, o = 0
 *   Q4_K  BLOCK 256, 144 bytes: d, dmin (fp16), 12 bytes packing eight 6-bit scales sc and mins
 *         mn, 128 bytes of nibbles; group j (of 8) takes bytes 32 (j / 2) ... + 31, low nibbles
 *         for even j, high for odd.                     s = d sc_j, z = 0, o = -(dmin mn_j)
 *   Q6_K  BLOCK 256, 210 bytes: 128 bytes of low nibbles ql, 64 bytes of 2-bit high parts qh, 16
 *         int8 scales sc (one per group of 16), d (fp16) last. Group g (of 16) lies in piece
 *         j = (g % 8) / 2 of half h = g / 8, part p = g % 2: ql[64 h + 32 (j % 2) + 16 p ...],
 *         low nibbles for j < 2, high for j >= 2, and bits 2 j, 2 j + 1 of qh[32 h + 16 p ...].
 *                                                                     s = d sc_g, z = 32, o = 0
 *
 * The dequantized weight is rounded as the gguf package's numpy code rounds it (the product, then
 * the sum, each to float32), so gguf_dequantize gives its values bit for bit.
 *
 * Layout. Q4_K and Q6_K rows are the file's bytes. The rows of the 32-weight formats are the
 * file's blocks with their fields regrouped (attnkit.kernels.quant_native.to_kernel_layout): a
 * row of nb blocks holds the nb values of each field one after the other, in the order listed
 * (Q4_1: nb fp16 d, nb fp16 m, nb times 16 bytes of nibbles), the same bytes as the file's row.
 * A row's scales are then contiguous, and 16 of them convert to float32 in one instruction; read
 * from the file's interleaved blocks, converting each scale on its own cost a third of the
 * kernel's instructions.
 *
 * Vectors are GNU C vector extensions as wide as the instruction set the including file is
 * compiled for: AVX-512: 16 floats; AVX2 + FMA: 8; anything else (SSE2, NEON, scalar): 4.
 */
#ifndef ATTNKIT_GGUF_FORMATS_H
#define ATTNKIT_GGUF_FORMATS_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
#else
#define LANES 4
#endif

typedef float vf __attribute__((vector_size(LANES * 4)));
typedef float vf_unaligned __attribute__((vector_size(LANES * 4), aligned(4)));
typedef uint8_t v16u8 __attribute__((vector_size(16)));
typedef uint8_t v16u8_unaligned __attribute__((vector_size(16), aligned(1)));

enum { Q8_0 = 8, Q4_1 = 3, Q5_0 = 6, Q4_K = 12, Q6_K = 14 }; /* ggml's type numbers */

static inline vf splat(float s) {
#if LANES == 16
    return (vf)_mm512_set1_ps(s);
#elif LANES == 8
    return (vf)_mm256_set1_ps(s);
#else
    return (vf){s, s, s, s};
#endif
}
static inline vf load_floats(const float *p) { return *(const vf_unaligned *)p; }
static inline void store_floats(float *p, vf v) { *(vf_unaligned *)p = v; }

/* a * b + c rounded once where the vector unit fuses it. */
static inline vf fmadd(vf a, vf b, vf c) {
#if LANES == 16
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif LANES == 8
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

static inline float sum_lanes(vf v) {
#if LANES == 16
    return _mm512_reduce_add_ps((__m512)v);
#else
    float total = 0.0f;
    for (int i = 0; i < LANES; i++) total += v[i];
    return total;
#endif
}

static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else { /* zero or subnormal: mantissa * 2^-24 is exact in float32 */
        float value = (float)mantissa * 0x1p-24f;
        memcpy(&bits, &value, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* out[i] = float(half[i]) for i < count. */
static inline void halves_to_floats(const uint8_t *half, int64_t count, float *out) {
    int64_t i = 0;
#if LANES == 16
    for (; i + 16 <= count; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(half + 2 * i))));
#elif defined(__F16C__)
    for (; i + 8 <= count; i += 8)
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(half + 2 * i))));
#endif
    for (; i < count; i++) out[i] = half_to_float(half + 2 * i);
}

/* 16 bytes at p as floats into out[0 .. 16 / LANES): unsigned, or signed when is_signed. */
static inline void bytes16(const uint8_t *p, int is_signed, vf *out) {
#if LANES == 16
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    out[0] = (vf)_mm512_cvtepi32_ps(is_signed ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif LANES == 8
    const __m128i b0 = _mm_loadl_epi64((const __m128i *)p), b1 = _mm_loadl_epi64((const __m128i *)(p + 8));
    out[0] = (vf)_mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(b0) : _mm256_cvtepu8_epi32(b0));
    out[1] = (vf)_mm256_cvtepi32_ps(is_signed ? _mm256_cvtepi8_epi32(b1) : _mm256_cvtepu8_epi32(b1));
#else
    for (int i = 0; i < 16; i++) out[i / LANES][i % LANES] = is_signed ? (float)(int8_t)p[i] : (float)p[i];
#endif
}

/* Vectors of LANES int32 (vi): widen_u8 loads LANES bytes zero-extended, the bit field
 * operations of the formats act on them, to_float converts exactly. HALF_VECS vectors hold 16
 * weights. */
#if LANES == 16
typedef __m512i vi;
static inline vi widen_u8(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline vi srl(vi v, int shift) { return _mm512_srli_epi32(v, (unsigned)shift); }
static inline vi and_const(vi v, int mask) { return _mm512_and_si512(v, _mm512_set1_epi32(mask)); }
static inline vi sll(vi v, int shift) { return _mm512_slli_epi32(v, (unsigned)shift); }
static inline vi or_(vi a, vi b) { return _mm512_or_si512(a, b); }
static inline vf to_float(vi v) { return (vf)_mm512_cvtepi32_ps(v); }
#define HALF_VECS 1 /* vectors per 16 weights */
#elif LANES == 8
typedef __m256i vi;
static inline vi widen_u8(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vi srl(vi v, int shift) { return _mm256_srli_epi32(v, shift); }
static inline vi and_const(vi v, int mask) { return _mm256_and_si256(v, _mm256_set1_epi32(mask)); }
static inline vi sll(vi v, int shift) { return _mm256_slli_epi32(v, shift); }
static inline vi or_(vi a, vi b) { return _mm256_or_si256(a, b); }
static inline vf to_float(vi v) { return (vf)_mm256_cvtepi32_ps(v); }
#define HALF_VECS 2
#else
typedef int32_t vi __attribute__((vector_size(16)));
static inline vi widen_u8(const uint8_t *p) { return (vi){p[0], p[1], p[2], p[3]}; }
static inline vi srl(vi v, int shift) { return v >> shift; }
static inline vi and_const(vi v, int mask) { return v & mask; }
static inline vi sll(vi v, int shift) { return v << shift; }
static inline vi or_(vi a, vi b) { return a | b; }
static inline vf to_float(vi v) { return __builtin_convertvector(v, vf); }
#define HALF_VECS 4
#endif

/* 16 low and 16 high nibbles of the 16 bytes at p: lo[0 .. HALF_VECS), hi[0 .. HALF_VECS). */
static inline void nibbles16(const uint8_t *p, vf *lo, vf *hi) {
    for (int v = 0; v < HALF_VECS; v++) {
        const vi bytes = widen_u8(p + v * LANES);
        lo[v] = to_float(and_const(bytes, 0x0f));
        hi[v] = to_float(srl(bytes, 4));
    }
}

/* v | 16 in lane i where bit i of `bits` is set (Q5_0's fifth bit). */
static inline vi or_bit4(vi v, uint32_t bits) {
#if LANES == 16
    return _mm512_mask_or_epi32(v, (__mmask16)bits, v, _mm512_set1_epi32(16));
#elif LANES == 8
    const __m256i lanes = _mm256_srlv_epi32(_mm256_set1_epi32((int)bits), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_or_si256(v, _mm256_slli_epi32(_mm256_and_si256(lanes, _mm256_set1_epi32(1)), 4));
#else
    const int32_t b = (int32_t)bits;
    return v | ((((vi){b, b, b, b} >> (vi){0, 1, 2, 3}) & 1) << 4);
#endif
}

/* ---- per format: the group size, the row's scales and offsets, and one group's q ---- */

enum { Q6_K_GROUP = 16, GROUP = 32 };

/* Row of the 32-weight formats: the field of block b in the kernel layout. */
static inline const uint8_t *field(const uint8_t *row, int64_t blocks, int64_t field_start, int64_t size, int64_t b) {
    return row + blocks * field_start + size * b;
}

/* Scales s and offsets o of groups [g0, g0 + count) of a row of `blocks` blocks. */
static inline void scales_q8_0(const uint8_t *row, int64_t blocks, int64_t g0, int64_t count, float *s, float *o) {
    (void)o;
    halves_to_floats(field(row, blocks, 0, 2, g0), count, s);
}
static inline void scales_q4_1(const uint8_t *row, int64_t blocks, int64_t g0, int64_t count, float *s, float *o) {
    halves_to_floats(field(row, blocks, 0, 2, g0), count, s);
    halves_to_floats(field(row, blocks, 2, 2, g0), count, o);
}
static inline void scales_q5_0(const uint8_t *row, int64_t blocks, int64_t g0, int64_t count, float *s, float *o) {
    (void)o;
    halves_to_floats(field(row, blocks, 0, 2, g0), count, s);
}

/* Q4_K's 6-bit scale and min of group j (ggml's get_scale_min_k4). */
static inline void q4_k_scale_min(const uint8_t *scales, int j, int *scale, int *min) {
    if (j < 4) {
        *scale = scales[j] & 63;
        *min = scales[j + 4] & 63;
    } else {
        *scale = (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4);
        *min = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
    }
}

/* Q4_K and Q6_K: the slices of the kernels start and end on super-block boundaries. */
static inline void scales_q4_k(const uint8_t *row, int64_t blocks, int64_t g0, int64_t count, float *s, float *o) {
    (void)blocks;
    for (int64_t b = 0; b < count / 8; b++) {
        const uint8_t *block = row + 144 * (g0 / 8 + b);
        const float d = half_to_float(block), dmin = half_to_float(block + 2);
        int scale[8], min[8];
        for (int j = 0; j < 8; j++) q4_k_scale_min(block + 4, j, scale + j, min + j);
        for (int j = 0; j < 8; j++) {
            s[8 * b + j] = d * (float)scale[j];
            o[8 * b + j] = -(dmin * (float)min[j]);
        }
    }
}

static inline void scales_q6_k(const uint8_t *row, int64_t blocks, int64_t g0, int64_t count, float *s, float *o) {
    (void)blocks;
    (void)o;
    for (int64_t b = 0; b < count / 16; b++) {
        const uint8_t *block = row + 210 * (g0 / 16 + b);
        const float d = half_to_float(block + 208);
        const int8_t *scales = (const int8_t *)(block + 192);
        for (int j = 0; j < 16; j++) s[16 * b + j] = d * (float)scales[j];
    }
}

/* q of group g (before the zero point) as floats into q[0 .. GROUP_SIZE / LANES). */
static inline void group_q8_0(const uint8_t *row, int64_t blocks, int64_t g, vf *q) {
    const uint8_t *p = field(row, blocks, 2, 32, g);
    bytes16(p, 1, q);
    bytes16(p + 16, 1, q + HALF_VECS);
}
static inline void group_q4_1(const uint8_t *row, int64_t blocks, int64_t g, vf *q) {
    nibbles16(field(row, blocks, 4, 16, g), q, q + HALF_VECS);
}
static inline void group_q5_0(const uint8_t *row, int64_t blocks, int64_t g, vf *q) {
    uint32_t high;
    memcpy(&high, field(row, blocks, 2, 4, g), 4);
    const uint8_t *p = field(row, blocks, 6, 16, g);
    for (int v = 0; v < HALF_VECS; v++) {
        const vi bytes = widen_u8(p + v * LANES);
        q[v] = to_float(or_bit4(and_const(bytes, 0x0f), high >> (v * LANES)));
        q[HALF_VECS + v] = to_float(or_bit4(srl(bytes, 4), high >> (16 + v * LANES)));
    }
}
static inline void group_q4_k(const uint8_t *row, int64_t blocks, int64_t g, vf *q) {
    (void)blocks;
    const int j = (int)(g % 8), shift = 4 * (j % 2);
    const uint8_t *p = row + 144 * (g / 8) + 16 + 32 * (j / 2);
    for (int v = 0; v < 2 * HALF_VECS; v++) q[v] = to_float(and_const(srl(widen_u8(p + v * LANES), shift), 0x0f));
}
static inline void group_q6_k(const uint8_t *row, int64_t blocks, int64_t g, vf *q) {
    (void)blocks;
    const int half = (int)(g % 16) / 8, j = (int)(g % 8) / 2, part = (int)(g % 2);
    const uint8_t *block = row + 210 * (g / 16);
    const uint8_t *ql = block + 64 * half + 32 * (j % 2) + 16 * part, *qh = block + 128 + 32 * half + 16 * part;
    const int low_shift = 4 * (j / 2), high_shift = 2 * j;
    for (int v = 0; v < HALF_VECS; v++) {
        const vi low = and_const(srl(widen_u8(ql + v * LANES), low_shift), 0x0f);
        const vi high = sll(and_const(srl(widen_u8(qh + v * LANES), high_shift), 3), 4);
        q[v] = to_float(or_(low, high));
    }
}

/* s q of group g, for the 4-bit formats in the AVX-512 build: vpermps reads the low 4 bits of each
 * lane as an index into the table s (0, 1, ..., 15), one product per group, and replaces the mask
 * and the integer conversions (measured 1.15-1.25x on one row). SCALED_FMT says whether a format has
 * it in this build (else its q are converted and scaled by the caller). */
#if LANES == 16
#define SCALED_q4_1 1
#define SCALED_q4_k 1
static inline vf iota16(void) { return (vf)_mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
static inline vf lookup16(vi index, vf table) { return (vf)_mm512_permutexvar_ps(index, (__m512)table); }
static inline void scaled_q4_1(const uint8_t *row, int64_t blocks, int64_t g, float s, vf *q) {
    const vf table = iota16() * splat(s);
    const vi bytes = widen_u8(field(row, blocks, 4, 16, g));
    q[0] = lookup16(bytes, table);
    q[1] = lookup16(srl(bytes, 4), table);
}
static inline void scaled_q4_k(const uint8_t *row, int64_t blocks, int64_t g, float s, vf *q) {
    (void)blocks;
    const int j = (int)(g % 8);
    const vf table = iota16() * splat(s);
    const uint8_t *p = row + 144 * (g / 8) + 16 + 32 * (j / 2);
    for (int v = 0; v < 2; v++) q[v] = lookup16(j % 2 ? srl(widen_u8(p + 16 * v), 4) : widen_u8(p + 16 * v), table);
}
#else
#define SCALED_q4_1 0
#define SCALED_q4_k 0
#define scaled_q4_1(row, blocks, g, s, q) ((void)0)
#define scaled_q4_k(row, blocks, g, s, q) ((void)0)
#endif
#define SCALED_q5_0 0
#define SCALED_q8_0 0
#define SCALED_q6_k 0
#define scaled_q5_0(row, blocks, g, s, q) ((void)0)
#define scaled_q8_0(row, blocks, g, s, q) ((void)0)
#define scaled_q6_k(row, blocks, g, s, q) ((void)0)

/* The format's block (weights and bytes) and group size; 0 for a type this file does not read. */
static inline int block_weights(int type) {
    return type == Q4_K || type == Q6_K ? 256 : type == Q8_0 || type == Q4_1 || type == Q5_0 ? 32 : 0;
}

static inline int block_bytes(int type) {
    switch (type) {
    case Q8_0: return 34;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q4_K: return 144;
    case Q6_K: return 210;
    default: return 0;
    }
}

#endif
