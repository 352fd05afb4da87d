/* One decoding step of a whole decoder in one call: the logits of one new token.
 *
 * The model is described by a ds_model (built once per generation by kernels/native_step.py from
 * the torch modules and their caches): the layers' weights (GGUF blocks, multiplied by the
 * gguf_matmul kernel whose address the caller hands over, or float32 rows), the norms' weights,
 * each layer's cache buffers (keys and values (Hkv, slots, D), the position held by each slot)
 * and its rotary inverse frequencies. ds_step runs, for one token at one position, everything the
 * torch step does, operation by operation in float32:
 *
 *   x = embed[token] (* embed_scale for Gemma 3)
 *   per layer:  h = norm(x);  q, k, v = h W_qkv^T;  q, k = qk_norm(q, k) (Gemma 3);  rotate q, k
 *               (half-split RoPE at the position);  write k, v in the cache slot of the position;
 *               a = softmax(q k^T scale) v over the slots the layer's band lets the query see
 *               (query head h reads key head h / (Hq / Hkv));  o = a W_o^T;
 *               Llama: x += o;  Gemma 3: x += post_attn_norm(o)
 *               h = norm(x);  g, u = h W_gate^T, h W_up^T;  m = (silu(g) or gelu_tanh(g)) * u;
 *               d = m W_down^T;  Llama: x += d;  Gemma 3: x += post_mlp_norm(d)
 *   logits = norm(x) W_head^T
 *
 * Norms are RMSNorm (x r w, Llama) or zero-centred RMSNorm (x r (1 + w), Gemma 3) with
 * r = 1 / sqrt(mean(x^2) + eps). The softmax subtracts the row's maximum. The quantized products
 * run on the kernel's threads, and so do attention, one query head per chunk of work, and the
 * MLP's gate, through the pool the caller hands over (gguf_pool_run of gguf_matmul.c: one pool
 * per process); each chunk is computed as on one thread, so the result does not depend on the
 * threads. Attention is about a tenth of a step at Gemma 3's head size on one thread, the gate's
 * tanh a few percent. The rest (norms, rotations) runs on the calling thread: a few thousand
 * floating-point operations per layer.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int (*matmul_fn)(int type, const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, float *out,
                         int threads, int int8_x);
typedef int (*dequantize_fn)(int type, const uint8_t *w, int64_t n, int64_t k, const int64_t *rows, int64_t count,
                             float *out, int threads);
typedef void (*pool_task)(const void *args, int64_t chunk);
typedef void (*pool_run_fn)(pool_task task, const void *args, int64_t chunks, int threads);

enum {
    FLOAT_WEIGHT = -1,          /* ds_linear.type of a float32 (out, in) weight */
    FAMILY_LLAMA = 0,
    FAMILY_GEMMA3 = 1,
    MAX_PARTS = 3,              /* linears of one group (q, k, v) written one after the other */
    STATUS_BAD_TOKEN = 101,
    STATUS_BAD_POSITION = 102,
    STATUS_NO_MEMORY = 103,
    LANES = 16,                 /* accumulators of the float dot product (vectorised by the compiler) */
    ATTEND_SERIAL = 1 << 16,    /* below this many query-key products per layer attention runs on one thread */
    GATE_CHUNK = 512,           /* activations per chunk of the MLP's gate */
};

typedef struct {
    int64_t type;               /* ggml type number, or FLOAT_WEIGHT */
    const void *weight;         /* blocks (out, row_bytes) in the kernel layout, or float32 (out, in) */
    int64_t out, in;
    int64_t int8_x;             /* the layer's activations mode: 1 = int8 */
} ds_linear;

typedef struct {
    ds_linear qkv[MAX_PARTS];   /* q, k, v rows, in that order (one part when fused) */
    int64_t n_qkv;
    ds_linear o;
    ds_linear gate_up[MAX_PARTS];   /* gate rows then up rows (one part when fused) */
    int64_t n_gate_up;
    ds_linear down;
    const float *attn_norm, *mlp_norm;
    const float *post_attn_norm, *post_mlp_norm, *q_norm, *k_norm;   /* Gemma 3; NULL for Llama */
    float *keys, *values;       /* (Hkv, slots, D): the cache buffers of batch row 0 */
    int64_t *positions;         /* (slots,): position held by each slot, -1 when none */
    int64_t slots;
    int64_t rolling;            /* 1: slot = position % slots; 0: slot = position (< slots) */
    double band_lo, band_hi;    /* the query at p sees keys at j with band_lo <= p - j <= band_hi */
    const float *inv_freq;      /* (D / 2,) float32 */
    float scale;                /* multiplier of q . k */
} ds_layer;

typedef struct {
    int64_t family;
    int64_t dim, n_heads, n_kv_heads, head_dim, ffn_dim, n_layers;
    float eps;                  /* of every norm */
    float embed_scale;          /* Gemma 3: float32(sqrt(dim)); 1 for Llama */
    ds_linear embed;            /* (vocab, dim) */
    ds_linear head;             /* (vocab, dim) */
    const float *final_norm;
    const ds_layer *layers;
    matmul_fn matmul;
    dequantize_fn dequantize;
    int64_t threads;
    pool_run_fn run_pool;       /* the kernels' pool (gguf_pool_run) for attention; NULL: one thread */
} ds_model;

const char *decode_step_isa(void) {
#if defined(__AVX512F__)
    return "avx512 (compiler-vectorised float32; quantized products by gguf_matmul)";
#elif defined(__AVX2__)
    return "avx2 (compiler-vectorised float32; quantized products by gguf_matmul)";
#else
    return "generic (compiler-vectorised float32; quantized products by gguf_matmul)";
#endif
}

/* sum_i a_i b_i in LANES partial sums (a fixed order the compiler vectorises). */
static float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    float total = 0.0f;
    for (; i < n; i++) total += a[i] * b[i];
    for (int l = 0; l < LANES; l++) total += acc[l];
    return total;
}

/* out (lin.out) = lin.weight x (lin.in). */
static int linear(const ds_model *m, const ds_linear *lin, const float *x, float *out) {
    if (lin->type == FLOAT_WEIGHT) {
        const float *w = lin->weight;
        for (int64_t o = 0; o < lin->out; o++) out[o] = dot(w + o * lin->in, x, lin->in);
        return 0;
    }
    return m->matmul((int)lin->type, x, 1, lin->in, lin->weight, lin->out, out, (int)m->threads, (int)lin->int8_x);
}

/* The parts of a group one after the other in out. */
static int linear_group(const ds_model *m, const ds_linear *parts, int64_t count, const float *x, float *out) {
    for (int64_t i = 0; i < count; i++) {
        int status = linear(m, &parts[i], x, out);
        if (status) return status;
        out += parts[i].out;
    }
    return 0;
}

/* out = x / sqrt(mean(x^2) + eps) * w (Llama) or * (1 + w) (Gemma 3); out may be x. */
static void norm(const ds_model *m, const float *x, const float *w, int64_t n, float *out) {
    double squares = 0.0;
    for (int64_t i = 0; i < n; i++) squares += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(squares / n) + m->eps);
    if (m->family == FAMILY_GEMMA3)
        for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * (1.0f + w[i]);
    else
        for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* Rotate each of `heads` heads of x (heads, D) by the angles position * inv_freq (half-split pairs). */
static void rope(float *x, int64_t heads, int64_t d, const float *cosines, const float *sines) {
    const int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *x1 = x + h * d, *x2 = x1 + half;
        for (int64_t f = 0; f < half; f++) {
            const float a = x1[f], b = x2[f];
            x1[f] = a * cosines[f] - b * sines[f];
            x2[f] = b * cosines[f] + a * sines[f];
        }
    }
}

/* Run `chunks` chunks of task on the kernels' pool, or on this thread when there is none or one thread. */
static void run(const ds_model *m, pool_task task, const void *args, int64_t chunks) {
    if (m->run_pool != NULL && m->threads > 1) {
        m->run_pool(task, args, chunks, (int)m->threads);
        return;
    }
    for (int64_t i = 0; i < chunks; i++) task(args, i);
}

/* What one chunk of attention (one query head) reads and writes. */
typedef struct {
    const ds_model *m;
    const ds_layer *layer;
    const float *q;             /* (Hq, D) */
    int64_t p;
    float *scores;              /* (Hq, slots) scratch */
    float *out;                 /* (Hq, D) */
} AttendJob;

/* out[h] (D,): query head h over the slots the band lets position p see. */
static void attend_head(const void *arg, int64_t h) {
    const AttendJob *job = arg;
    const ds_model *m = job->m;
    const ds_layer *layer = job->layer;
    const int64_t d = m->head_dim, kv = h / (m->n_heads / m->n_kv_heads), p = job->p;
    const float *keys = layer->keys + kv * layer->slots * d, *values = layer->values + kv * layer->slots * d;
    const float *q = job->q + h * d;
    float *scores = job->scores + h * layer->slots, *o = job->out + h * d;
    float top = -INFINITY;
    for (int64_t s = 0; s < layer->slots; s++) {
        const int64_t j = layer->positions[s];
        const double distance = (double)(p - j);
        if (j < 0 || distance < layer->band_lo || distance > layer->band_hi) {
            scores[s] = -INFINITY;
            continue;
        }
        scores[s] = dot(q, keys + s * d, d) * layer->scale;
        if (scores[s] > top) top = scores[s];
    }
    memset(o, 0, (size_t)d * sizeof(float));
    if (top == -INFINITY) return;   /* sees no key: zeros, as attention() gives */
    float total = 0.0f;
    for (int64_t s = 0; s < layer->slots; s++) {
        if (scores[s] == -INFINITY) continue;
        const float w = expf(scores[s] - top);
        total += w;
        const float *v = values + s * d;
        for (int64_t f = 0; f < d; f++) o[f] += w * v[f];
    }
    for (int64_t f = 0; f < d; f++) o[f] /= total;
}

/* out (Hq, D): every query head (query head h reads key head h / (Hq / Hkv)); scores (Hq, slots)
 * scratch. The heads run on the pool when there are enough products to share. */
static void attend(const ds_model *m, const ds_layer *layer, const float *q, int64_t p, float *scores, float *out) {
    const AttendJob job = {m, layer, q, p, scores, out};
    if (m->n_heads * layer->slots * m->head_dim >= ATTEND_SERIAL) {
        run(m, attend_head, &job, m->n_heads);
        return;
    }
    for (int64_t h = 0; h < m->n_heads; h++) attend_head(&job, h);
}

static float gelu_tanh(float g) {
    const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.0f + tanhf(inner));
}

static float silu(float g) { return g / (1.0f + expf(-g)); }

/* The gated activation m = act(g) * u of the MLP, in chunks of GATE_CHUNK: its tanh or exp per
 * element cost more than the rest of a layer's work outside the products, so it runs on the pool. */
typedef struct {
    float *gate;                /* (ffn,): g in, m out */
    const float *up;            /* (ffn,) */
    int64_t n;
    int64_t gemma;              /* gelu_tanh, else silu */
} GateJob;

static void gate_chunk(const void *arg, int64_t chunk) {
    const GateJob *job = arg;
    const int64_t first = chunk * GATE_CHUNK, last = first + GATE_CHUNK < job->n ? first + GATE_CHUNK : job->n;
    if (job->gemma)
        for (int64_t i = first; i < last; i++) job->gate[i] = gelu_tanh(job->gate[i]) * job->up[i];
    else
        for (int64_t i = first; i < last; i++) job->gate[i] = silu(job->gate[i]) * job->up[i];
}

static int layer_step(const ds_model *m, const ds_layer *layer, float *x, int64_t p, float *work) {
    const int64_t dim = m->dim, d = m->head_dim, hq = m->n_heads, hkv = m->n_kv_heads, ffn = m->ffn_dim;
    float *h = work, *qkv = h + dim, *att = qkv + (hq + 2 * hkv) * d, *o = att + hq * d;
    float *trig = o + dim, *gate_up = trig + d, *scores = gate_up + 2 * ffn;
    float *q = qkv, *k = q + hq * d, *v = k + hkv * d;
    int status;

    norm(m, x, layer->attn_norm, dim, h);
    if ((status = linear_group(m, layer->qkv, layer->n_qkv, h, qkv))) return status;
    if (layer->q_norm != NULL) {
        for (int64_t i = 0; i < hq; i++) norm(m, q + i * d, layer->q_norm, d, q + i * d);
        for (int64_t i = 0; i < hkv; i++) norm(m, k + i * d, layer->k_norm, d, k + i * d);
    }
    float *cosines = trig, *sines = trig + d / 2;
    for (int64_t f = 0; f < d / 2; f++) {
        const float angle = (float)p * layer->inv_freq[f];
        cosines[f] = cosf(angle);
        sines[f] = sinf(angle);
    }
    rope(q, hq, d, cosines, sines);
    rope(k, hkv, d, cosines, sines);

    const int64_t slot = layer->rolling ? p % layer->slots : p;
    for (int64_t i = 0; i < hkv; i++) {
        memcpy(layer->keys + (i * layer->slots + slot) * d, k + i * d, (size_t)d * sizeof(float));
        memcpy(layer->values + (i * layer->slots + slot) * d, v + i * d, (size_t)d * sizeof(float));
    }
    layer->positions[slot] = p;
    attend(m, layer, q, p, scores, att);
    if ((status = linear(m, &layer->o, att, o))) return status;
    if (layer->post_attn_norm != NULL) norm(m, o, layer->post_attn_norm, dim, o);
    for (int64_t i = 0; i < dim; i++) x[i] += o[i];

    norm(m, x, layer->mlp_norm, dim, h);
    if ((status = linear_group(m, layer->gate_up, layer->n_gate_up, h, gate_up))) return status;
    const GateJob gate = {gate_up, gate_up + ffn, ffn, m->family == FAMILY_GEMMA3};
    run(m, gate_chunk, &gate, (ffn + GATE_CHUNK - 1) / GATE_CHUNK);
    if ((status = linear(m, &layer->down, gate_up, o))) return status;
    if (layer->post_mlp_norm != NULL) norm(m, o, layer->post_mlp_norm, dim, o);
    for (int64_t i = 0; i < dim; i++) x[i] += o[i];
    return 0;
}

/* logits (vocab,) of `token` at `position`, writing its keys and values into every layer's cache.
 * Returns 0, STATUS_BAD_TOKEN, STATUS_BAD_POSITION (beyond a static cache), STATUS_NO_MEMORY, or
 * the status of a failing quantized kernel call. */
int ds_step(const ds_model *m, int64_t token, int64_t position, float *logits) {
    if (token < 0 || token >= m->embed.out) return STATUS_BAD_TOKEN;
    if (position < 0) return STATUS_BAD_POSITION;
    int64_t most_slots = 0;
    for (int64_t i = 0; i < m->n_layers; i++) {
        const ds_layer *layer = &m->layers[i];
        if (!layer->rolling && position >= layer->slots) return STATUS_BAD_POSITION;
        if (layer->slots > most_slots) most_slots = layer->slots;
    }
    const int64_t dim = m->dim, d = m->head_dim;
    const int64_t floats = 2 * dim + (m->n_heads * 2 + 2 * m->n_kv_heads) * d + dim + d + 2 * m->ffn_dim
        + m->n_heads * most_slots;
    float *x = malloc((size_t)floats * sizeof(float));
    if (x == NULL) return STATUS_NO_MEMORY;
    int status = 0;
    if (m->embed.type == FLOAT_WEIGHT)
        memcpy(x, (const float *)m->embed.weight + token * dim, (size_t)dim * sizeof(float));
    else
        status = m->dequantize((int)m->embed.type, m->embed.weight, m->embed.out, dim, &token, 1, x, 1);
    if (m->embed_scale != 1.0f)
        for (int64_t i = 0; i < dim; i++) x[i] *= m->embed_scale;
    for (int64_t i = 0; i < m->n_layers && !status; i++) status = layer_step(m, &m->layers[i], x, position, x + dim);
    if (!status) {
        norm(m, x, m->final_norm, dim, x);
        status = linear(m, &m->head, x, logits);
    }
    free(x);
    return status;
}
