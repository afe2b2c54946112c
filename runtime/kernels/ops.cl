// The rest of a llama-family forward pass: RMSNorm, RoPE, attention over the KV cache, SwiGLU,
// softmax and the sampling reductions (argmax, top-k). Each mirrors a function of
// runtime/backends/numpy_backend.py; the tests compare them one by one.
//
// Compile-time knobs: WG (work-group size of the row reductions and attention, a power of two),
// SPLIT (KV positions per decode-attention work-group), PK (KV positions staged per step of
// prefill attention), HEAD_DIM_MAX, TOPK_MAX.

#ifndef WG
#define WG 64
#endif
#ifndef SPLIT
#define SPLIT 128
#endif
#ifndef HEAD_DIM_MAX
#define HEAD_DIM_MAX 256
#endif
#ifndef PK
#define PK 16
#endif
#ifndef TOPK_MAX
#define TOPK_MAX 64
#endif
#define TOPK_WG 16

// Tree reduction of red[WG] into red[0]; every work-item of the group must call it.
inline void reduce_sum(local float* red) {
    for (int s = WG / 2; s > 0; s >>= 1) {
        barrier(CLK_LOCAL_MEM_FENCE);
        if (get_local_id(0) < s) red[get_local_id(0)] += red[get_local_id(0) + s];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
}

inline void reduce_max(local float* red) {
    for (int s = WG / 2; s > 0; s >>= 1) {
        barrier(CLK_LOCAL_MEM_FENCE);
        if (get_local_id(0) < s)
            red[get_local_id(0)] = fmax(red[get_local_id(0)], red[get_local_id(0) + s]);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
}

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w. One work-group per row; global (WG, n_rows).
kernel void rms_norm(const global float* x, const global float* w, global float* out, int n,
                     float eps) {
    local float red[WG];
    const int lid = get_local_id(0);
    const global float* xr = x + (size_t)get_group_id(1) * n;
    global float* o = out + (size_t)get_group_id(1) * n;
    float s = 0.0f;
    for (int i = lid; i < n; i += WG) s += xr[i] * xr[i];
    red[lid] = s;
    reduce_sum(red);
    const float norm = sqrt(red[0] / n + eps);
    for (int i = lid; i < n; i += WG) o[i] = xr[i] / norm * w[i];
}

// The int8 activations of matmul.cl's Q4_0/Q8_0 kernels: 32 values rounded to a Q8_0 block,
// q = rint(x * (1 / d)) with d = max |x| / 127, each step one IEEE float32 operation as in
// numpy's reference (weight_stream.q8_activations), so both give the same q and d.
// The block's integer sum goes to *sum: matmul.cl's interleaved Q4_0 kernels take the -8 of
// every weight off as -8 * sum(q) (XS, after the scales in the same buffer: the blocks' sums
// follow their n_tok * n_cols / 32 scales).
inline void store_q8(float8 x0, float8 x1, float8 x2, float8 x3, global char* q, global float* d,
                     global int* sum) {
    const float8 m8 = fmax(fmax(fabs(x0), fabs(x1)), fmax(fabs(x2), fabs(x3)));
    const float4 m4 = fmax(m8.lo, m8.hi);
    const float2 m2 = fmax(m4.lo, m4.hi);
    const float s = fmax(m2.x, m2.y) / 127.0f, id = s != 0.0f ? 1.0f / s : 0.0f;
    global char8* q8 = (global char8*)q;
    const char8 q0 = convert_char8(rint(x0 * id)), q1 = convert_char8(rint(x1 * id));
    const char8 q2 = convert_char8(rint(x2 * id)), q3 = convert_char8(rint(x3 * id));
    q8[0] = q0; q8[1] = q1; q8[2] = q2; q8[3] = q3;
    *d = s;
    const int8 s8 = convert_int8(q0) + convert_int8(q1) + convert_int8(q2) + convert_int8(q3);
    const int4 s4 = s8.lo + s8.hi;
    *sum = s4.x + s4.y + s4.z + s4.w;
}

// XQ[t, 32 c ...], XD[t, c] and XS[t, c]: row t of X (n_cols a multiple of 32) in Q8_0
// blocks, and each block's sum. Global (n_cols / 32, n_tok).
kernel void quantize_q8(const global float* X, global char* XQ, global float* XD, int n_cols) {
    const int c = get_global_id(0), t = get_global_id(1), at = t * (n_cols / 32) + c;
    const global float8* x = (const global float8*)(X + (size_t)t * n_cols) + 4 * c;
    global int* XS = (global int*)(XD + get_global_size(0) * get_global_size(1));
    store_q8(x[0], x[1], x[2], x[3], XQ + (size_t)t * n_cols + 32 * c, XD + at, XS + at);
}

// rms_norm, whose output also goes to XQ/XD as quantize_q8 would write it (decode's next
// matmuls take int8 activations: one launch instead of two). n a multiple of 32.
kernel void rms_norm_q8(const global float* x, const global float* w, global float* out,
                        global char* XQ, global float* XD, int n, float eps) {
    local float red[WG];
    const int lid = get_local_id(0), t = get_group_id(1);
    const global float* xr = x + (size_t)t * n;
    float s = 0.0f;
    for (int i = lid; i < n; i += WG) s += xr[i] * xr[i];
    red[lid] = s;
    reduce_sum(red);
    const float norm = sqrt(red[0] / n + eps);
    global int* XS = (global int*)(XD + (n / 32) * get_global_size(1));
    for (int c = lid; c < n / 32; c += WG) {
        const global float8* x8 = (const global float8*)xr + 4 * c;
        const global float8* w8 = (const global float8*)w + 4 * c;
        global float8* o8 = (global float8*)(out + (size_t)t * n) + 4 * c;
        const float8 o0 = x8[0] / norm * w8[0], o1 = x8[1] / norm * w8[1];
        const float8 o2 = x8[2] / norm * w8[2], o3 = x8[3] / norm * w8[3];
        o8[0] = o0; o8[1] = o1; o8[2] = o2; o8[3] = o3;
        const int at = t * (n / 32) + c;
        store_q8(o0, o1, o2, o3, XQ + (size_t)t * n + 32 * c, XD + at, XS + at);
    }
}

// Rotate rows of x in place: (n_tok, n_heads, head_dim) at x + off, position pos0 + t, by the
// host-made cos/sin tables (n_ctx, rope_dim / 2). `neox` pairs (i, i + d/2), else (2i, 2i + 1).
// Global (rope_dim / 2, n_heads, n_tok).
kernel void rope(global float* x, int off, const global float* cos_t, const global float* sin_t,
                 int pos0, int head_dim, int rope_dim, int neox) {
    const int i = get_global_id(0), h = get_global_id(1), t = get_global_id(2);
    const int half_d = rope_dim / 2, pos = pos0 + t;
    global float* v = x + off + ((size_t)t * get_global_size(1) + h) * head_dim;
    const float c = cos_t[pos * half_d + i], s = sin_t[pos * half_d + i];
    const int a = neox ? i : 2 * i, b = neox ? i + half_d : 2 * i + 1;
    const float x0 = v[a], x1 = v[b];
    v[a] = x0 * c - x1 * s;
    v[b] = x1 * c + x0 * s;
}

// x[t, i] += bias[i] for rows of n at x + off. Global (n, n_tok).
kernel void add_bias(global float* x, int off, const global float* bias, int n) {
    x[off + (size_t)get_global_id(1) * n + get_global_id(0)] += bias[get_global_id(0)];
}

// gate = silu(gate) * up, in place (numpy: g / (1 + exp(-g)) * u). Global (n).
kernel void swiglu(global float* gate, const global float* up) {
    const size_t i = get_global_id(0);
    const float g = gate[i];
    gate[i] = g / (1.0f + exp(-g)) * up[i];
}
// The same, 8 a work-item (n a multiple of 8): the vector exp is the CPU's SIMD one (PoCL's
// work-item loops do not vectorize the scalar kernel's exp call).
kernel void swiglu8(global float* gate, const global float* up) {
    const size_t i = get_global_id(0);
    const float8 g = vload8(i, gate);
    vstore8(g / (1.0f + exp(-g)) * vload8(i, up), i, gate);
}

// Attention, split over the KV sequence (flash-decoding): work-group (q, s) scores query row q
// (token t = q / n_heads, head h = q % n_heads) against KV positions [s SPLIT, (s+1) SPLIT) up
// to its causal limit pos0 + t, and writes (max, sum of exp, exp-weighted sum of V[0:D]) to
// part[q, s]; attn_combine merges the splits. Decode (one token) spreads a long context over
// many work-groups; prefill runs every (token, head, split) at once. Keys and values live in
// the cache as (n_ctx, n_kv_heads, head_dim); query head h reads KV head h / (n_heads / n_kv).
// Global (WG * n_tok * n_heads, n_split), local (WG, 1).
kernel void attn_partial(const global float* q, const global float* kc, const global float* vc,
                         global float* part, int n_heads, int n_kv, int head_dim, int pos0,
                         float scale) {
    local float sc[SPLIT];
    local float qv[HEAD_DIM_MAX];
    local float red[WG];
    const int lid = get_local_id(0), qi = get_group_id(0), s = get_group_id(1);
    const int t = qi / n_heads, h = qi % n_heads, kvh = h / (n_heads / n_kv);
    const int lo = s * SPLIT, hi = min(lo + SPLIT, pos0 + t + 1);
    const int kv_stride = n_kv * head_dim;
    global float* out = part + ((size_t)qi * get_num_groups(1) + s) * (head_dim + 2);
    for (int d = lid; d < head_dim; d += WG) qv[d] = q[(size_t)qi * head_dim + d];
    barrier(CLK_LOCAL_MEM_FENCE);

    float m = -INFINITY;
    for (int p = lo + lid; p < hi; p += WG) {
        const global float* k = kc + (size_t)p * kv_stride + kvh * head_dim;
        float4 acc = 0.0f;
        for (int d = 0; d < head_dim; d += 4) acc += vload4(0, qv + d) * vload4(0, k + d);
        const float score = (acc.x + acc.y + acc.z + acc.w) * scale;
        sc[p - lo] = score;
        m = fmax(m, score);
    }
    red[lid] = m;
    reduce_max(red);
    m = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    float l = 0.0f;
    for (int p = lo + lid; p < hi; p += WG) {
        const float e = hi > lo ? exp(sc[p - lo] - m) : 0.0f;
        sc[p - lo] = e;
        l += e;
    }
    red[lid] = l;
    reduce_sum(red);
    for (int d = lid; d < head_dim; d += WG) {
        const global float* v = vc + kvh * head_dim + d;
        float o = 0.0f;
        for (int p = lo; p < hi; p++) o += sc[p - lo] * v[(size_t)p * kv_stride];
        out[2 + d] = o;
    }
    if (lid == 0) {
        out[0] = m;
        out[1] = red[0];
    }
}

// attn_partial for CPU devices: one work-item per (query row, split), head_dim in its own
// vector registers (16 floats at a time), keys in turn. PoCL vectorizes a work-group across its
// work-items, so attn_partial's key-per-item dot products became gathers (1.2 us a key for 14
// heads on a Zen 3 core pair). With a single split (get_global_size(1) == 1) it writes the
// normalized output to `out` itself and attn_combine is not launched; with to_q8 too, also
// rounded to Q8_0 as quantize_q8 would (head_dim a multiple of 32), for the output projection.
// head_dim a multiple of 16. Global (n_tok * n_heads, n_split), local (1, 1).
kernel void attn_partial_row(const global float* q, const global float* kc,
                             const global float* vc, global float* part, global float* out,
                             global char* XQ, global float* XD, int n_heads, int n_kv,
                             int head_dim, int pos0, float scale, int to_q8) {
    const int qi = get_global_id(0), s = get_global_id(1), n16 = head_dim / 16;
    const int t = qi / n_heads, h = qi % n_heads, kvh = h / (n_heads / n_kv);
    const int lo = s * SPLIT, hi = min(lo + SPLIT, pos0 + t + 1);
    const int row = n_kv * n16;  // a cache row's float16s
    const global float16* qv = (const global float16*)q + (size_t)qi * n16;
    const global float16* k = (const global float16*)kc + kvh * n16;
    const global float16* v = (const global float16*)vc + kvh * n16;
    float sc[SPLIT];
    float m = -INFINITY, l = 0.0f;
    for (int p = lo; p < hi; p++) {
        float16 acc = 0.0f;
        for (int d = 0; d < n16; d++) acc += qv[d] * k[(size_t)p * row + d];
        const float8 a8 = acc.lo + acc.hi;
        const float4 a4 = a8.lo + a8.hi;
        sc[p - lo] = (a4.x + a4.y + a4.z + a4.w) * scale;
        m = fmax(m, sc[p - lo]);
    }
    for (int p = lo; p < hi; p++) {
        sc[p - lo] = exp(sc[p - lo] - m);
        l += sc[p - lo];
    }
    const int whole = get_global_size(1) == 1;
    global float* o = whole ? out + (size_t)qi * head_dim
                            : part + ((size_t)qi * get_global_size(1) + s) * (head_dim + 2) + 2;
    float16 prev = 0.0f;
    for (int d = 0; d < n16; d++) {
        float16 a0 = 0.0f, a1 = 0.0f;  // two chains of adds: keys alternate between them
        int p = lo;
        for (; p + 1 < hi; p += 2) {
            a0 += sc[p - lo] * v[(size_t)p * row + d];
            a1 += sc[p + 1 - lo] * v[(size_t)(p + 1) * row + d];
        }
        if (p < hi) a0 += sc[p - lo] * v[(size_t)p * row + d];
        const float16 r = whole ? (a0 + a1) / l : a0 + a1;
        vstore8(r.lo, 2 * d, o);  // not vstore16: a float16 argument is not AVX2's ABI
        vstore8(r.hi, 2 * d + 1, o);
        if (to_q8 && d % 2) {  // whole, head_dim a multiple of 32: as quantize_q8 of `out`
            const int at = (qi * head_dim + 32 * (d / 2)) / 32;
            global int* XS = (global int*)(XD + get_global_size(0) * (head_dim / 32));
            store_q8(prev.lo, prev.hi, r.lo, r.hi, XQ + 32 * at, XD + at, XS + at);
        }
        prev = r;
    }
    if (!whole) {
        o[-2] = m;
        o[-1] = l;
    }
}

// out[q, d] = sum_s e^(m_s - M) o_s[d] / sum_s e^(m_s - M) l_s. Global (head_dim, n_queries).
kernel void attn_combine(const global float* part, global float* out, int head_dim, int n_split) {
    const int d = get_global_id(0), qi = get_global_id(1);
    const global float* p = part + (size_t)qi * n_split * (head_dim + 2);
    float big = -INFINITY;
    for (int s = 0; s < n_split; s++) big = fmax(big, p[s * (head_dim + 2)]);
    float l = 0.0f, o = 0.0f;
    for (int s = 0; s < n_split; s++) {
        const global float* ps = p + s * (head_dim + 2);
        const float w = ps[1] > 0.0f ? exp(ps[0] - big) : 0.0f;
        l += w * ps[1];
        o += w * ps[2 + d];
    }
    out[(size_t)qi * head_dim + d] = o / l;
}

// Prefill attention: a work-group takes WG consecutive query tokens of one head, so that the
// keys and values they share are staged once into local memory, PK positions at a time; each
// work-item runs an online softmax over its own causal range and keeps its output row in
// registers. Rows are vectors of N floats (head_dim % N == 0; PoCL runs a scalar loop over d
// as scalar FMAs): float4 (attn_prefill, GPUs), float16 on CPUs (attn_prefill16: AVX-512's
// width, a quarter of float4's instructions). Global (WG * ceil(n_tok / WG), n_heads), local
// (WG, 1).
#define ATTN_PREFILL_KERNEL(NAME, VT, N, HSUM)                                                   \
kernel void NAME(const global float* q, const global float* kc, const global float* vc,          \
                         global float* out, int n_tok, int n_heads, int n_kv, int head_dim,      \
                         int pos0, float scale) {                                                \
    local VT kt[PK * HEAD_DIM_MAX / N];                                                          \
    local VT vt[PK * HEAD_DIM_MAX / N];                                                          \
    const int t = get_global_id(0), h = get_group_id(1), kvh = h / (n_heads / n_kv);             \
    const int lid = get_local_id(0), kv_stride = n_kv * head_dim, dn = head_dim / N;             \
    const int limit = t < n_tok ? pos0 + t + 1 : 0;  /* keys this query may see */               \
    const int tile_limit = pos0 + min(n_tok, (int)(get_group_id(0) + 1) * WG);                   \
    VT qv[HEAD_DIM_MAX / N], o[HEAD_DIM_MAX / N];                                                \
    const global VT* qrow =                                                                      \
        (const global VT*)(q + ((size_t)(t < n_tok ? t : n_tok - 1) * n_heads + h) * head_dim);  \
    for (int d = 0; d < dn; d++) { qv[d] = qrow[d] * scale; o[d] = 0.0f; }                       \
    float m = -INFINITY, l = 0.0f;                                                               \
    for (int p0 = 0; p0 < tile_limit; p0 += PK) {                                                \
        const int n = tile_limit - p0 < PK ? tile_limit - p0 : PK;                               \
        for (int i = lid; i < n * dn; i += WG) {                                                 \
            const size_t at = (size_t)(p0 + i / dn) * kv_stride + kvh * head_dim;                \
            kt[i] = ((const global VT*)(kc + at))[i % dn];                                       \
            vt[i] = ((const global VT*)(vc + at))[i % dn];                                       \
        }                                                                                        \
        barrier(CLK_LOCAL_MEM_FENCE);                                                            \
        const int seen = limit - p0 < n ? limit - p0 : n;                                        \
        /* Eight keys a step: one vector exp (PoCL's exp is an out-of-line call), the running */ \
        /* sums rescaled only when the max grows (a few times a row). Keys past `seen` score */  \
        /* -inf (weight 0); a step's first key is always seen, so m is finite after it. */       \
        for (int j = 0; j < seen; j += 8) {                                                      \
            float8 sc;                                                                           \
            for (int i = 0; i < 8; i++) {                                                        \
                VT acc = 0.0f;                                                                   \
                const int jj = j + i < seen ? j + i : j;                                         \
                for (int d = 0; d < dn; d++) acc += qv[d] * kt[jj * dn + d];                     \
                sc[i] = j + i < seen ? HSUM(acc) : -INFINITY;                                    \
            }                                                                                    \
            const float4 mh = fmax(sc.lo, sc.hi);                                                \
            const float m4 = fmax(fmax(mh.x, mh.y), fmax(mh.z, mh.w));                           \
            if (m4 > m) {                                                                        \
                const float corr = exp(m - m4);                                                  \
                l *= corr;                                                                       \
                for (int d = 0; d < dn; d++) o[d] *= corr;                                       \
                m = m4;                                                                          \
            }                                                                                    \
            const float8 e = exp(sc - m);                                                        \
            const float4 eh = e.lo + e.hi;                                                       \
            l += (eh.x + eh.y) + (eh.z + eh.w);                                                  \
            for (int i = 0; i < 8 && j + i < seen; i++)                                          \
                for (int d = 0; d < dn; d++) o[d] += e[i] * vt[(j + i) * dn + d];                \
        }                                                                                        \
        barrier(CLK_LOCAL_MEM_FENCE);                                                            \
    }                                                                                            \
    if (t < n_tok) {                                                                             \
        global VT* orow = (global VT*)(out + ((size_t)t * n_heads + h) * head_dim);              \
        for (int d = 0; d < dn; d++) orow[d] = o[d] / l;                                         \
    }                                                                                            \
}
#define HSUM4(v) (((v).x + (v).y) + ((v).z + (v).w))
#define HSUM16(v) HSUM4((v.lo.lo + v.lo.hi) + (v.hi.lo + v.hi.hi))
ATTN_PREFILL_KERNEL(attn_prefill, float4, 4, HSUM4)
ATTN_PREFILL_KERNEL(attn_prefill16, float16, 16, HSUM16)

// Softmax of each row of n, in place. Global (WG, n_rows).
kernel void softmax_rows(global float* x, int n) {
    local float red[WG];
    const int lid = get_local_id(0);
    global float* r = x + (size_t)get_group_id(1) * n;
    float m = -INFINITY;
    for (int i = lid; i < n; i += WG) m = fmax(m, r[i]);
    red[lid] = m;
    reduce_max(red);
    m = red[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    float s = 0.0f;
    for (int i = lid; i < n; i += WG) {
        const float e = exp(r[i] - m);
        r[i] = e;
        s += e;
    }
    red[lid] = s;
    reduce_sum(red);
    for (int i = lid; i < n; i += WG) r[i] /= red[0];
}

// Index of the largest value of each row (the first one on ties, as numpy). Global (WG, n_rows).
kernel void argmax_rows(const global float* x, global int* out, int n) {
    local float val[WG];
    local int idx[WG];
    const int lid = get_local_id(0);
    const global float* r = x + (size_t)get_group_id(1) * n;
    float best = -INFINITY;
    int at = n;
    for (int i = lid; i < n; i += WG)
        if (r[i] > best) { best = r[i]; at = i; }
    val[lid] = best;
    idx[lid] = at;
    for (int s = WG / 2; s > 0; s >>= 1) {
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid < s && (val[lid + s] > val[lid] ||
                        (val[lid + s] == val[lid] && idx[lid + s] < idx[lid]))) {
            val[lid] = val[lid + s];
            idx[lid] = idx[lid + s];
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid == 0) out[get_group_id(1)] = idx[0] < n ? idx[0] : 0;
}

// Insert (v, i) into a list sorted by value, descending, ties by lower index, keeping k.
inline void topk_insert(float* vals, int* ids, int k, float v, int i) {
    if (!(v > vals[k - 1] || (v == vals[k - 1] && i < ids[k - 1]))) return;
    int j = k - 1;
    while (j > 0 && (v > vals[j - 1] || (v == vals[j - 1] && i < ids[j - 1]))) {
        vals[j] = vals[j - 1];
        ids[j] = ids[j - 1];
        j--;
    }
    vals[j] = v;
    ids[j] = i;
}

// The k (<= TOPK_MAX) largest values of one row and their indices, largest first: each
// work-item keeps its own k best of a strided slice, then work-item 0 merges the TOPK_WG lists.
// Global (TOPK_WG), local (TOPK_WG).
kernel void topk(const global float* x, int n, int k, global float* out_vals,
                 global int* out_ids) {
    local float lv[TOPK_WG * TOPK_MAX];
    local int li[TOPK_WG * TOPK_MAX];
    float vals[TOPK_MAX];
    int ids[TOPK_MAX];
    const int lid = get_local_id(0);
    for (int j = 0; j < k; j++) { vals[j] = -INFINITY; ids[j] = n; }
    for (int i = lid; i < n; i += TOPK_WG) topk_insert(vals, ids, k, x[i], i);
    for (int j = 0; j < k; j++) { lv[lid * k + j] = vals[j]; li[lid * k + j] = ids[j]; }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid == 0) {
        for (int c = k; c < TOPK_WG * k; c++) topk_insert(vals, ids, k, lv[c], li[c]);
        for (int j = 0; j < k; j++) { out_vals[j] = vals[j]; out_ids[j] = ids[j]; }
    }
}

// Device memory bandwidth probe: dst = src, float4 at a time.
kernel void copy_probe(const global float4* src, global float4* dst) {
    dst[get_global_id(0)] = src[get_global_id(0)];
}
