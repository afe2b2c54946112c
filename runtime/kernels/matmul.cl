// Quantized matrix-vector (decode) and matrix-matrix (prefill) products that read GGUF blocks
// as they lie in the file, plus embedding-row lookup from the same blocks.
//
// Every format is read 32 weights ("a chunk") at a time: DQ_<type>(row, c, w) turns chunk c of
// a row into four float8 vectors of quants (weights 0-7, 8-15, 16-23, 24-31 of the chunk) and
// returns the chunk's scales and offset, so that a dot product scales a sum of quants once per
// half chunk instead of every weight. An embedding row applies them in runtime/quant.py's (and
// llama.cpp's) order and is bit-exact; a dot product differs from numpy by rounding order only.
// Products with F32/F16 weights multiply float activations; those with quantized weights take
// the activations rounded to Q8_0 blocks and multiply in integers (from "int8 activations" on).
//
// Compile-time knobs (tuned per device, see runtime/backends/opencl_tuning.py):
//   LWS  work-items that share one output row (power of two); partial sums meet in local memory
//   RPW  rows per work-group
//   TT   tokens per work-item in the prefill kernels (each dequantized chunk is reused TT times)
//   QU   loads a work-item issues before it multiplies, in decode over planes (GPUs)
//   DP4A, SHFL  NVIDIA only: inline PTX for 4-byte dot products and warp-shuffle reductions
// Work layout: global (LWS * rows rounded up to RPW, ceil(n_tok / NT)), local (LWS * RPW, 1).

#ifndef LWS
#define LWS 1
#endif
#ifndef RPW
#define RPW 16
#endif
#ifndef TT
#define TT 4
#endif

#ifndef UNALIGNED
#define UNALIGNED 0
#endif
#ifndef DP4A
#define DP4A 0
#endif
#ifndef SHFL
#define SHFL 0
#endif
#ifndef QU
#define QU 4
#endif

typedef const global uchar* blk_t;

// Bits 4k..4k+3 of h (a Q5_0/Q5_1 qh word) to bit 4 of the four bytes of a word: the 5th bits of
// weights 4k..4k+3, beside their nibbles. A multiply by 0x00204081 moves bit b of the nibble to
// bit 8b (its four terms do not overlap). For a uint, or an int vector with a row a lane.
#define BITS5(h, k) (((((h) >> (4 * (k))) & 15) * 0x00204081 & 0x01010101) << 4)

// 8 bytes of a block: a plain (unaligned) vector load where the device allows it (CPUs: PoCL's
// vload8 is element by element, 1.6x slower), vload8 elsewhere (blocks are only 2-byte aligned).
#if UNALIGNED
// Vector types that may lie at any address: a plain uchar8 pointer promises 8-byte alignment,
// which LLVM may turn into an aligned load that faults on a 34- or 18-byte block.
typedef uchar8 __attribute__((aligned(1))) uchar8_u;
typedef char8 __attribute__((aligned(1))) char8_u;
typedef uchar16 __attribute__((aligned(1))) uchar16_u;
typedef char16 __attribute__((aligned(1))) char16_u;
#define LOAD_U8(i, p) (((const global uchar8_u*)(p))[i])
#define LOAD_I8(i, p) (((const global char8_u*)(p))[i])
#define LOAD_U16(i, p) (((const global uchar16_u*)(p))[i])
#define LOAD_I16(i, p) (((const global char16_u*)(p))[i])
#else
#define LOAD_U16(i, p) vload16(i, (const global uchar*)(p))
#define LOAD_I16(i, p) vload16(i, (const global char*)(p))
#define LOAD_U8(i, p) vload8(i, (const global uchar*)(p))
#define LOAD_I8(i, p) vload8(i, (const global char*)(p))
#endif

// IEEE half -> float by bits, inlined: PoCL's vload_half is an out-of-line call that spills the
// accumulators around it once per block (it cost the Q8_0 GEMV ~30 %). Exact for every value:
// a subnormal half becomes a float subnormal that the 2^112 multiply scales exactly.
// Written out per width (no GNU statement expressions: not every driver's compiler has them).
inline float f16_bits(uint h) {
    const uint m = (h & 0x7fffu) << 13;
    const float f = (h & 0x7c00u) == 0x7c00u ? as_float(m | 0x7f800000u) : as_float(m) * 0x1p112f;
    return as_float(as_uint(f) | (h & 0x8000u) << 16);
}
inline float f16(blk_t p, int i) { return f16_bits(((const global ushort*)p)[i]); }
inline float8 f16x8(const global half* p, int i) {
    const uint8 h = convert_uint8(((const global ushort8*)p)[i]), m = (h & 0x7fffu) << 13;
    const float8 f = (h & 0x7c00u) == 0x7c00u ? as_float8(m | 0x7f800000u)
                                              : as_float8(m) * 0x1p112f;
    return as_float8(as_uint8(f) | (h & 0x8000u) << 16);
}

inline float8 nib_lo(uchar8 q) { return convert_float8(q & (uchar)15); }
inline float8 nib_hi(uchar8 q) { return convert_float8(q >> (uchar)4); }

// Each DQ_<type> writes the chunk's quants to w0..w3 and returns (scale of weights 0-15, scale
// of 16-31, offset): x = scale * w + offset. Four separate outputs rather than a float8[4]:
// PoCL keeps a private array in memory, one copy per work-item of the group (a 2 KiB stack
// frame that made every matmul load and store its quants), where scalars live in registers.
#define W4 float8 *w0, float8 *w1, float8 *w2, float8 *w3

// F32 / F16: plain arrays.
inline float4 DQ_f32(blk_t row, int c, W4) {
    const global float8* p = (const global float8*)row + 4 * c;
    *w0 = p[0]; *w1 = p[1]; *w2 = p[2]; *w3 = p[3];
    return (float4)(1.0f, 1.0f, 0.0f, 0.0f);
}
inline float4 DQ_f16(blk_t row, int c, W4) {
    const global half* p = (const global half*)row;
    *w0 = f16x8(p, 4 * c); *w1 = f16x8(p, 4 * c + 1);
    *w2 = f16x8(p, 4 * c + 2); *w3 = f16x8(p, 4 * c + 3);
    return (float4)(1.0f, 1.0f, 0.0f, 0.0f);
}

// Q8_0 (34 bytes): d f16 | qs[32] int8.  x = d * q
inline void floats_q8_0(blk_t qs, W4) {  // the 32 quants of a block
    const global char* q = (const global char*)qs;
    *w0 = convert_float8(LOAD_I8(0, q)); *w1 = convert_float8(LOAD_I8(1, q));
    *w2 = convert_float8(LOAD_I8(2, q)); *w3 = convert_float8(LOAD_I8(3, q));
}
inline float4 DQ_q8_0(blk_t row, int c, W4) {
    blk_t b = row + c * 34;
    floats_q8_0(b + 2, w0, w1, w2, w3);
    const float d = f16(b, 0);
    return (float4)(d, d, 0.0f, 0.0f);
}

// The 32 weights of a nibble block from qs[16]: low nibbles are weights 0-15, high 16-31.
inline void nibbles(blk_t qs, W4) {
    const uchar8 q0 = LOAD_U8(0, qs), q1 = LOAD_U8(1, qs);
    *w0 = nib_lo(q0); *w1 = nib_lo(q1); *w2 = nib_hi(q0); *w3 = nib_hi(q1);
}

// Q4_0 (18 bytes): d f16 | qs[16] nibbles.  x = d * (q - 8)
inline void floats_q4_0(blk_t qs, W4) {  // the 32 quants - 8 of a block
    const uchar8 q0 = LOAD_U8(0, qs), q1 = LOAD_U8(1, qs);  // q - 8 in int8: 2x faster
    *w0 = convert_float8(as_char8(q0 & (uchar)15) - (char)8);
    *w1 = convert_float8(as_char8(q1 & (uchar)15) - (char)8);
    *w2 = convert_float8(as_char8(q0 >> (uchar)4) - (char)8);
    *w3 = convert_float8(as_char8(q1 >> (uchar)4) - (char)8);
}
inline float4 DQ_q4_0(blk_t row, int c, W4) {
    blk_t b = row + c * 18;
    floats_q4_0(b + 2, w0, w1, w2, w3);
    const float d = f16(b, 0);
    return (float4)(d, d, 0.0f, 0.0f);
}

// Q4_1 (20 bytes): d f16 | m f16 | qs[16].  x = d * q + m
inline float4 DQ_q4_1(blk_t row, int c, W4) {
    blk_t b = row + c * 20;
    nibbles(b + 4, w0, w1, w2, w3);
    const float d = f16(b, 0);
    return (float4)(d, d, f16(b, 1), 0.0f);
}

// The 5th bits of Q5_0/Q5_1 for weights 8i..8i+7: bit j of a little-endian u32 is weight j.
inline float8 bit5(uint h, int i) {
    return convert_float8(((uint8)(h >> (8 * i)) >> (uint8)(0, 1, 2, 3, 4, 5, 6, 7) & 1u) << 4);
}
inline void add_bit5(blk_t qh, W4) {
    const uint h = (uint)qh[0] | (uint)qh[1] << 8 | (uint)qh[2] << 16 | (uint)qh[3] << 24;
    *w0 += bit5(h, 0); *w1 += bit5(h, 1); *w2 += bit5(h, 2); *w3 += bit5(h, 3);
}

// Q5_0 (22 bytes): d f16 | qh[4] | qs[16].  x = d * (q - 16)
inline float4 DQ_q5_0(blk_t row, int c, W4) {
    blk_t b = row + c * 22;
    nibbles(b + 6, w0, w1, w2, w3);
    add_bit5(b + 2, w0, w1, w2, w3);
    *w0 -= 16.0f; *w1 -= 16.0f; *w2 -= 16.0f; *w3 -= 16.0f;
    const float d = f16(b, 0);
    return (float4)(d, d, 0.0f, 0.0f);
}

// Q5_1 (24 bytes): d f16 | m f16 | qh[4] | qs[16].  x = d * q + m
inline float4 DQ_q5_1(blk_t row, int c, W4) {
    blk_t b = row + c * 24;
    nibbles(b + 8, w0, w1, w2, w3);
    add_bit5(b + 4, w0, w1, w2, w3);
    const float d = f16(b, 0);
    return (float4)(d, d, f16(b, 1), 0.0f);
}

// K formats: 256-weight super-blocks; chunk c is sub-block j = c % 8 of super-block c / 8.
// The 6-bit scale and min of sub-block j of Q4_K/Q5_K (llama.cpp's get_scale_min_k4).
// S(n) reads byte n of the 12 (interleaved rows read theirs from chunks: get_rows_<T>x8).
#define SCALE_MIN_K4(S, j, sc, m)                                                              \
    sc = (j) < 4 ? S(j) & 63 : (S((j) + 4) & 15) | ((S((j) - 4) >> 6) << 4);                   \
    m = (j) < 4 ? S((j) + 4) & 63 : (S((j) + 4) >> 4) | ((S(j) >> 6) << 4);
inline void scale_min_k4(blk_t s, int j, float* sc, float* m) {
#define BYTE(n) s[n]
    SCALE_MIN_K4(BYTE, j, *sc, *m)
#undef BYTE
}

// Q4_K (144 bytes): d | dmin | scales[12] | qs[128]; sub-block j is the low (j even) or high
// nibbles of qs[32 (j/2) ...].  x = (d sc) q - (dmin m)
inline float8 q4k_part(blk_t qs, int i, uchar sh) {
    return convert_float8(LOAD_U8(i, qs) >> sh & (uchar)15);
}
inline float4 DQ_q4_k(blk_t row, int c, W4) {
    blk_t b = row + (c >> 3) * 144;
    const int j = c & 7;
    blk_t qs = b + 16 + 32 * (j >> 1);
    const uchar sh = (j & 1) * 4;
    *w0 = q4k_part(qs, 0, sh); *w1 = q4k_part(qs, 1, sh);
    *w2 = q4k_part(qs, 2, sh); *w3 = q4k_part(qs, 3, sh);
    float sc, m;
    scale_min_k4(b + 4, j, &sc, &m);
    const float d = f16(b, 0) * sc;
    return (float4)(d, d, -(f16(b, 1) * m), 0.0f);
}

// Q5_K (176 bytes): d | dmin | scales[12] | qh[32] | qs[128]; the 5th bit of weight l of
// sub-block j is bit j of qh[l].
inline float8 q5k_part(blk_t b, blk_t qs, int i, int j, uchar sh) {
    const uchar8 h = LOAD_U8(i, b + 16) >> (uchar)j & (uchar)1;
    return convert_float8((LOAD_U8(i, qs) >> sh & (uchar)15) | h << (uchar)4);
}
inline float4 DQ_q5_k(blk_t row, int c, W4) {
    blk_t b = row + (c >> 3) * 176;
    const int j = c & 7;
    blk_t qs = b + 48 + 32 * (j >> 1);
    const uchar sh = (j & 1) * 4;
    *w0 = q5k_part(b, qs, 0, j, sh); *w1 = q5k_part(b, qs, 1, j, sh);
    *w2 = q5k_part(b, qs, 2, j, sh); *w3 = q5k_part(b, qs, 3, j, sh);
    float sc, m;
    scale_min_k4(b + 4, j, &sc, &m);
    const float d = f16(b, 0) * sc;
    return (float4)(d, d, -(f16(b, 1) * m), 0.0f);
}

// Q6_K (210 bytes): ql[128] | qh[64] | scales[16] int8 | d.  Chunk k of the super-block is
// quarter k % 4 of half k / 4: low bits from ql (low or high nibbles), 2 high bits from qh.
// x = (d scale[i / 16]) (q - 32)
inline float8 q6k_part(blk_t ql, blk_t qh, int i, uchar sl, uchar sh) {
    const uchar8 q = (LOAD_U8(i, ql) >> sl & (uchar)15) | (LOAD_U8(i, qh) >> sh & (uchar)3) << (uchar)4;
    return convert_float8(q) - 32.0f;
}
inline float4 DQ_q6_k(blk_t row, int c, W4) {
    blk_t b = row + (c >> 3) * 210;
    const int k = c & 7, h = k >> 2, qr = k & 3;
    blk_t ql = b + 64 * h + 32 * (qr & 1);
    blk_t qh = b + 128 + 32 * h;
    const uchar sl = (qr >> 1) * 4, sh = 2 * qr;
    *w0 = q6k_part(ql, qh, 0, sl, sh); *w1 = q6k_part(ql, qh, 1, sl, sh);
    *w2 = q6k_part(ql, qh, 2, sl, sh); *w3 = q6k_part(ql, qh, 3, sl, sh);
    const global char* scales = (const global char*)(b + 192);
    const float d = f16(b, 104);  // byte 208
    return (float4)(d * scales[8 * h + 2 * qr], d * scales[8 * h + 2 * qr + 1], 0.0f, 0.0f);
}

inline float hsum8(float8 v) {
    const float4 a = v.lo + v.hi;
    return a.x + a.y + a.z + a.w;
}

// Y[t, row0 + r] (+)= sum_k W[r, k] X[t, k] for NT tokens per work-item; `accumulate` adds
// into Y (the residual connection) instead of overwriting it. `y_stride` and `y_off` let the
// K and V projections write straight into the KV cache.
#define MATMUL_KERNEL(T, NT, SUFFIX)                                                            \
kernel void matmul_##T##SUFFIX(blk_t W, const global float* X, global float* Y,               \
                               int n_cols, int n_rows, int n_tok, int row_bytes,               \
                               int y_stride, int y_off, int accumulate) {                      \
    const int lane = get_local_id(0) % LWS, lrow = get_local_id(0) / LWS;                     \
    const int row = get_global_id(0) / LWS, t0 = get_global_id(1) * NT;                       \
    float8 acc8[NT];  /* lane-wise partial sums: one horizontal add per row, not per chunk */  \
    for (int t = 0; t < NT; t++) acc8[t] = 0.0f;                                               \
    if (row < n_rows) {                                                                        \
        blk_t wrow = W + (size_t)row * row_bytes;                                              \
        const int n_chunks = n_cols / 32, nt = NT == 1 ? 1 : min(NT, n_tok - t0);              \
        for (int c = lane; c < n_chunks; c += LWS) {                                           \
            float8 w[4];                                                                       \
            const float4 s = DQ_##T(wrow, c, w, w + 1, w + 2, w + 3);                          \
            for (int t = 0; t < nt; t++) {                                                     \
                const global float8* x = (const global float8*)(X + (size_t)(t0 + t) * n_cols + c * 32); \
                const float8 x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];                       \
                acc8[t] += s.x * (w[0] * x0 + w[1] * x1) + s.y * (w[2] * x2 + w[3] * x3);      \
                if (HAS_OFFSET_##T) acc8[t] += s.z * (x0 + x1 + x2 + x3);                      \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    float acc[NT];                                                                             \
    for (int t = 0; t < NT; t++) acc[t] = hsum8(acc8[t]);                                      \
    REDUCE_AND_STORE(NT)                                                                       \
}

#if LWS == 32 && SHFL && defined(cl_nv_pragma_unroll)
// NVIDIA: a row's 32 work-items are one warp, and its partial sums meet through register
// shuffles (inline PTX, as dot4's dp4a) instead of five rounds of local memory and barriers.
inline float warp_sum(float v) {
    for (int m = 16; m > 0; m >>= 1) {
        uint o;
        asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;"
                     : "=r"(o) : "r"(as_uint(v)), "r"(m));
        v += as_float(o);
    }
    return v;
}
#define REDUCE_AND_STORE(NT)                                                                   \
    (void)lrow;                                                                                \
    for (int t = 0; t < NT; t++) {                                                             \
        const float sum_ = warp_sum(acc[t]);                                                   \
        if (lane == 0 && row < n_rows && t0 + t < n_tok) {                                     \
            global float* y = Y + y_off + (size_t)(t0 + t) * y_stride + row;                   \
            *y = sum_ + (accumulate ? *y : 0.0f);                                              \
        }                                                                                      \
    }
#elif LWS > 1
#define REDUCE_AND_STORE(NT)                                                                   \
    local float red[RPW * LWS];                                                                \
    for (int t = 0; t < NT; t++) {                                                             \
        red[get_local_id(0)] = acc[t];                                                         \
        barrier(CLK_LOCAL_MEM_FENCE);                                                          \
        for (int s = LWS / 2; s > 0; s >>= 1) {                                                \
            if (lane < s) red[get_local_id(0)] += red[get_local_id(0) + s];                    \
            barrier(CLK_LOCAL_MEM_FENCE);                                                      \
        }                                                                                      \
        if (lane == 0 && row < n_rows && t0 + t < n_tok) {                                     \
            global float* y = Y + y_off + (size_t)(t0 + t) * y_stride + row;                   \
            *y = red[lrow * LWS] + (accumulate ? *y : 0.0f);                                   \
        }                                                                                      \
        barrier(CLK_LOCAL_MEM_FENCE);                                                          \
    }
#else
#define REDUCE_AND_STORE(NT)                                                                   \
    (void)lane; (void)lrow;                                                                    \
    if (row < n_rows)                                                                          \
        for (int t = 0; t < min(NT, n_tok - t0); t++) {                                        \
            global float* y = Y + y_off + (size_t)(t0 + t) * y_stride + row;                   \
            *y = acc[t] + (accumulate ? *y : 0.0f);                                            \
        }
#endif

// Decode (one token): y[row] (+)= W[row] . x with one work-item per row and no local memory,
// barrier or private array, so that PoCL runs a work-group as a plain loop over rows with the
// accumulator in a register (3x the matmul kernel's speed on a CPU). Devices tuned to LWS > 1
// (GPUs) keep matmul_<T>_vec. Global (rows rounded up to RPW), local (RPW).
#define GEMV_KERNEL(T)                                                                          \
kernel void gemv_##T(blk_t W, const global float* X, global float* Y, int n_cols, int n_rows, \
                     int row_bytes, int y_off, int accumulate) {                               \
    const int row = get_global_id(0);                                                          \
    if (row >= n_rows) return;                                                                 \
    GEMV_DOT(T, dot, W + (size_t)row * row_bytes, X, n_cols)                                   \
    global float* y = Y + y_off + row;                                                         \
    *y = dot + (accumulate ? *y : 0.0f);                                                       \
}

// The dot product of gemv_<T>: one row of W (its GGUF blocks) with a float32 vector.
#define GEMV_DOT(T, out, wrow, X, n_cols)                                                      \
    float out;                                                                                 \
    {                                                                                          \
        const global float8* x_ = (const global float8*)(X);                                   \
        float8 acc_ = 0.0f;                                                                    \
        for (int c = 0; c < (n_cols) / 32; c++, x_ += 4) {                                     \
            float8 w0, w1, w2, w3;                                                             \
            const float4 s = DQ_##T(wrow, c, &w0, &w1, &w2, &w3);                              \
            acc_ += s.x * (w0 * x_[0] + w1 * x_[1]) + s.y * (w2 * x_[2] + w3 * x_[3]);         \
            if (HAS_OFFSET_##T) acc_ += s.z * (x_[0] + x_[1] + x_[2] + x_[3]);                 \
        }                                                                                      \
        out = hsum8(acc_);                                                                     \
    }

// Decode's fused launches (one instead of three each, 4 fewer launches per layer):
// gemv_qkv_<T>: rows [0, nq) of the Q projection into q, the next nk rows of K and of V into the
// KV cache at kv_off (the three matrices share a type). Global (nq + 2 nk rounded up to RPW).
#define GEMV_QKV_KERNEL(T)                                                                     \
kernel void gemv_qkv_##T(blk_t Wq, blk_t Wk, blk_t Wv, const global float* X,                 \
                         global float* q, global float* kc, global float* vc, int n_cols,      \
                         int nq, int nk, int row_bytes, int kv_off) {                          \
    int row = get_global_id(0);                                                                \
    if (row >= nq + 2 * nk) return;                                                            \
    blk_t w = row < nq ? Wq : row < nq + nk ? Wk : Wv;                                         \
    global float* y = row < nq ? q : (row < nq + nk ? kc : vc) + kv_off;                       \
    row = row < nq ? row : row < nq + nk ? row - nq : row - nq - nk;                            \
    GEMV_DOT(T, dot, w + (size_t)row * row_bytes, X, n_cols)                                   \
    y[row] = dot;                                                                              \
}
// gemv_glu_<T>: out[row] = silu(gate[row] . x) * (up[row] . x), the SwiGLU of the two products
// (numpy's g / (1 + exp(-g)) * u). Global (rows rounded up to RPW).
#define GEMV_GLU_KERNEL(T)                                                                     \
kernel void gemv_glu_##T(blk_t Wg, blk_t Wu, const global float* X, global float* out,        \
                         int n_cols, int n_rows, int row_bytes) {                              \
    const int row = get_global_id(0);                                                          \
    if (row >= n_rows) return;                                                                 \
    GEMV_DOT(T, g, Wg + (size_t)row * row_bytes, X, n_cols)                                    \
    GEMV_DOT(T, u, Wu + (size_t)row * row_bytes, X, n_cols)                                    \
    out[row] = g / (1.0f + exp(-g)) * u;                                                       \
}

// Prefill: y[t, row] (+)= W[row] . x[t] for a tile of TT (4 or 8) tokens per work-item, one
// row each: a chunk is dequantized once (to the floats numpy's dequantize gives) and used TT
// times at 4 FMAs per token, the tile's x rows stay in L1 (the
// work-group's rows share them), and the TT accumulators are named registers, not an array
// (see DQ above). A tile past the last token reads the last token again and stores nothing.
// Global (rows rounded up to RPW, ceil(n_tok / TT)), local (RPW, 1).
#define GEMM_ACC(t)                                                                            \
    a##t += w0 * x##t[0] + w1 * x##t[1] + w2 * x##t[2] + w3 * x##t[3];                         \
    x##t += 4;
#define GEMM_X(t)                                                                              \
    const global float8* x##t = (const global float8*)(X + (size_t)(t0 + t < n_tok ? t0 + t : n_tok - 1) * n_cols);
#define GEMM_STORE(t)                                                                          \
    if (t0 + t < n_tok) {                                                                      \
        global float* y = Y + y_off + (size_t)(t0 + t) * y_stride + row;                       \
        *y = hsum8(a##t) + (accumulate ? *y : 0.0f);                                           \
    }
#if TT == 8
#define TILE_N 8
#define GEMM_TILE(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7)
#define GEMM_ZERO float8 a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, a4 = 0.0f, a5 = 0.0f, a6 = 0.0f, a7 = 0.0f
#else
#define TILE_N 4
#define GEMM_TILE(F) F(0) F(1) F(2) F(3)
#define GEMM_ZERO float8 a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f
#endif
#define GEMM_KERNEL(T)                                                                         \
kernel void gemm_##T(blk_t W, const global float* X, global float* Y, int n_cols, int n_rows, \
                     int n_tok, int row_bytes, int y_stride, int y_off, int accumulate) {      \
    const int row = get_global_id(0), t0 = get_global_id(1) * TT;                              \
    if (row >= n_rows) return;                                                                 \
    blk_t wrow = W + (size_t)row * row_bytes;                                                  \
    GEMM_TILE(GEMM_X)                                                                          \
    GEMM_ZERO;                                                                                 \
    for (int c = 0; c < n_cols / 32; c++) {                                                    \
        float8 w0, w1, w2, w3;                                                                 \
        const float4 s = DQ_##T(wrow, c, &w0, &w1, &w2, &w3);                                  \
        w0 = s.x * w0 + s.z; w1 = s.x * w1 + s.z; w2 = s.y * w2 + s.z; w3 = s.y * w3 + s.z;    \
        GEMM_TILE(GEMM_ACC)                                                                    \
    }                                                                                          \
    GEMM_TILE(GEMM_STORE)                                                                      \
}

// out[t, :] = W[tokens[t], :] as float32. Global (n_cols / 32, n_tok).
#define GET_ROWS_KERNEL(T)                                                                     \
kernel void get_rows_##T(blk_t W, const global int* tokens, global float* out,                \
                         int n_cols, int row_bytes) {                                          \
    const int c = get_global_id(0), t = get_global_id(1);                                     \
    float8 w0, w1, w2, w3;                                                                     \
    const float4 s = DQ_##T(W + (size_t)tokens[t] * row_bytes, c, &w0, &w1, &w2, &w3);         \
    global float8* o = (global float8*)(out + (size_t)t * n_cols) + 4 * c;                     \
    o[0] = s.x * w0 + s.z; o[1] = s.x * w1 + s.z; o[2] = s.y * w2 + s.z; o[3] = s.y * w3 + s.z; \
}

// Formats whose dequantization adds an offset (x = d q + m): their dot products add m sum(x).
#define HAS_OFFSET_f32 0
#define HAS_OFFSET_f16 0
#define HAS_OFFSET_q8_0 0
#define HAS_OFFSET_q4_0 0
#define HAS_OFFSET_q4_1 1
#define HAS_OFFSET_q5_0 0
#define HAS_OFFSET_q5_1 1
#define HAS_OFFSET_q4_k 1
#define HAS_OFFSET_q5_k 1
#define HAS_OFFSET_q6_k 0

// F32/F16 weights multiply float activations; the quantized formats' products take int8
// activations (below), and their float dequantization serves embedding rows.
#define FORMAT(T) \
    MATMUL_KERNEL(T, 1, _vec) MATMUL_KERNEL(T, TT, _mat) GEMV_KERNEL(T) GEMV_QKV_KERNEL(T) \
    GEMV_GLU_KERNEL(T) GEMM_KERNEL(T) GET_ROWS_KERNEL(T)

FORMAT(f32)
FORMAT(f16)
GET_ROWS_KERNEL(q8_0)
GET_ROWS_KERNEL(q4_0)
GET_ROWS_KERNEL(q4_1)
GET_ROWS_KERNEL(q5_0)
GET_ROWS_KERNEL(q5_1)
GET_ROWS_KERNEL(q4_k)
GET_ROWS_KERNEL(q5_k)
GET_ROWS_KERNEL(q6_k)


// ---- Q4_0 and Q8_0 weights with int8 activations (llama.cpp's vec_dot_q4_0_q8_0 and
// vec_dot_q8_0_q8_0) ----
// The activations are rounded once per matmul input to Q8_0 blocks (ops.cl's quantize_q8 or
// rms_norm_q8: int8 values XQ and a float32 scale XD per 32), then each block of a row is an integer dot product of 32
// int8 x int8 products (exact) scaled once by d_w * d_x. numpy's reference does the same
// rounding (runtime/backends/weight_stream.py, q8_activations) and multiplies in float32, so the
// two differ by float summation order only.
// Two ways to the same integers: on x86 CPUs (PoCL, where clang defines __AVX2__) the AVX2
// instructions llama.cpp uses, through clang's target builtins (PoCL's LLVM turns no portable
// OpenCL C into them: it emits 32-bit multiplies); everywhere else plain char/short arithmetic
// (OpenCL 1.2, no cl_khr_integer_dot_product needed).

#if defined(__AVX2__) && UNALIGNED
// A chunk's 32 int8 weights in one 256-bit register.
typedef char v32qi __attribute__((vector_size(32)));
typedef char v32qi_u __attribute__((vector_size(32), aligned(1)));
typedef char v16qi __attribute__((vector_size(16)));
typedef char v16qi_u __attribute__((vector_size(16), aligned(1)));
typedef short v16hi __attribute__((vector_size(32)));
typedef v32qi wq_t;
#ifdef __F16C__
typedef short v8hi __attribute__((vector_size(16)));
// A block's f16 scale in one vcvtph2ps (f16() above is ~12 scalar instructions and a branch).
inline float dq_scale(blk_t b) {
    const v8hi h = {*(const global short*)b, 0, 0, 0, 0, 0, 0, 0};
    return __builtin_ia32_vcvtph2ps(h)[0];
}
#else
inline float dq_scale(blk_t b) { return f16(b, 0); }
#endif
inline float dqi_q8_0(blk_t qs, blk_t d, wq_t* w) {
    *w = *(const global v32qi_u*)qs;
    return dq_scale(d);
}
inline float dqi_q4_0(blk_t qs, blk_t d, wq_t* w) {
    const v16qi_u q = *(const global v16qi_u*)qs;
    const v16qi lo = (q & (char)15) - (char)8, hi = ((q >> 4) & (char)15) - (char)8;
    *w = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
    return dq_scale(d);
}
typedef int v8si __attribute__((vector_size(32)));
typedef int v4si __attribute__((vector_size(16)));
#define ONES_16 ((v16hi){1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1})  // pmaddwd: pair sums
// 16 bytes of nibbles as 32 weights (0-15): low nibbles 0-15, high 16-31 (Q4_0's order).
inline v32qi nibbles32(blk_t qs) {
    const v16qi_u q = *(const global v16qi_u*)qs;
    const v32qi both = __builtin_shufflevector(q, q, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                               13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                               12, 13, 14, 15);
    const v8si nibble = {0, 0, 0, 0, 4, 4, 4, 4};  // low nibbles to 0-15, high to 16-31
    return (v32qi)__builtin_ia32_psrlv8si((v8si)both, nibble) & (char)15;
}
// A block's whole integer dot product in lane 0, the other lanes 0. On these CPUs resident
// Q4_0/Q8_0 matrices are interleaved (the *x8 kernels below), which add one float term per
// block and row, (d_w * d_x) * dot, in block order; streamed layers keep the file's layout and
// come here. Adding the same terms in the same order gives them the same floats, so that a
// run under a memory budget gives the unbudgeted run's logits exactly (the 7 zero lanes add
// nothing; the horizontal sum, 3 adds per block, is exact in integers).
inline int isum8(v8si s) {
    const v4si h = __builtin_shufflevector(s, s, 0, 1, 2, 3) +
                   __builtin_shufflevector(s, s, 4, 5, 6, 7);
    const v4si q = h + __builtin_shufflevector(h, h, 2, 3, 0, 1);
    return q[0] + q[1];
}
inline float8 lane0(v8si s) {
    return (float8)((float)isum8(s), 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f);
}
// llama.cpp's mul_sum_i8_pairs: |w| (unsigned) times x with w's sign (signed) in pmaddubsw (a
// pair sums to at most 2 * 128 * 127, no saturation: |x| <= 127), pairs of pairs in pmaddwd.
inline float8 idot32(wq_t w, const global char* x) {
    const v32qi xv = *(const global v32qi*)x;
    const v16hi p = __builtin_ia32_pmaddubsw256(__builtin_ia32_psignb256(w, w),
                                                __builtin_ia32_psignb256(xv, w));
    return lane0(__builtin_ia32_pmaddwd256(p, ONES_16));
}
// Decode's Q4_0 block: the nibbles enter pmaddubsw as they are (unsigned 0-15) and the -8
// offset comes off in 16 bits as pmaddubsw(8, x): the same integers as idot32 of (q - 8) in
// 7 instructions instead of 11 (no sign tricks; the two nibble halves in one shift).
inline float qblock_q4_0(blk_t row, int c, const global char* x, float8* p) {
    blk_t b = row + c * 18;
    const v32qi xv = *(const global v32qi*)x;
    const v16hi s = __builtin_ia32_pmaddubsw256(nibbles32(b + 2), xv) -
                    __builtin_ia32_pmaddubsw256(xv - xv + (char)8, xv);
    *p = lane0(__builtin_ia32_pmaddwd256(s, ONES_16));
    return dq_scale(b);
}
#define HAS_QBLOCK_q4_0
#else
typedef struct { short16 lo, hi; } wq_t;  // weights 0-15 and 16-31 of a chunk
inline float dqi_q8_0(blk_t qs, blk_t d, wq_t* w) {
    w->lo = convert_short16(LOAD_I16(0, qs)); w->hi = convert_short16(LOAD_I16(1, qs));
    return f16(d, 0);
}
inline float dqi_q4_0(blk_t qs, blk_t d, wq_t* w) {
    const uchar16 q = LOAD_U16(0, qs);
    w->lo = convert_short16(q & (uchar)15) - (short)8;
    w->hi = convert_short16(q >> (uchar)4) - (short)8;
    return f16(d, 0);
}
inline int8 madd16(short16 a, short16 b) {
    return convert_int8(a.even) * convert_int8(b.even) + convert_int8(a.odd) * convert_int8(b.odd);
}
inline float8 idot32(wq_t w, const global char* x) {
    const global char16* xv = (const global char16*)x;
    return convert_float8(madd16(w.lo, convert_short16(xv[0])) + madd16(w.hi, convert_short16(xv[1])));
}
#endif

// Block c of a row (of nb blocks) as int8 weights, and its scale: as the file lays it out (the
// f16 scale, then the quants: 34 or 18 bytes), or in planes (the *p kernels below: the row's
// quants, 32 or 16 bytes a block, then its nb scales).
inline float DQI_q8_0(blk_t row, int c, wq_t* w, int nb) {
    return dqi_q8_0(row + 34 * c + 2, row + 34 * c, w);
}
inline float DQI_q4_0(blk_t row, int c, wq_t* w, int nb) {
    return dqi_q4_0(row + 18 * c + 2, row + 18 * c, w);
}
inline float DQI_q8_0p(blk_t row, int c, wq_t* w, int nb) {
    return dqi_q8_0(row + 32 * c, row + 32 * nb + 2 * c, w);
}
inline float DQI_q4_0p(blk_t row, int c, wq_t* w, int nb) {
    return dqi_q4_0(row + 16 * c, row + 16 * nb + 2 * c, w);
}

// One block's integer products (*p, 8 partial sums) and its weight scale, for decode.
inline float qblock_q8_0(blk_t row, int c, const global char* x, float8* p) {
    wq_t w;
    const float d = DQI_q8_0(row, c, &w, 0);
    *p = idot32(w, x);
    return d;
}
#ifndef HAS_QBLOCK_q4_0
inline float qblock_q4_0(blk_t row, int c, const global char* x, float8* p) {
    wq_t w;
    const float d = DQI_q4_0(row, c, &w, 0);
    *p = idot32(w, x);
    return d;
}
#endif

// qacc_<T>(acc, row, c, x, dx, xs): *acc += 8 partial sums of QSTEP_<T> blocks of a row from
// block c on, times the activation blocks there (int8 values x, scales dx, integer sums xs).
// Q4_0 and Q8_0 keep the statement the interleaved kernels' floats are matched against (see
// lane0).
#define QSTEP_q8_0 1
#define QSTEP_q4_0 1
inline void qacc_q8_0(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    float8 p;
    const float d = qblock_q8_0(row, c, x, &p) * dx[0];
    *acc += d * p;
}
inline void qacc_q4_0(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    float8 p;
    const float d = qblock_q4_0(row, c, x, &p) * dx[0];
    *acc += d * p;
}

// The dot products of two rows of W (their GGUF blocks) with one quantized activation row:
// decode reads each activation block once for both (and what a block's terms take from x
// alone, such as Q4_0's pmaddubsw(8, x), the compiler computes once for both rows).
// XS, the blocks' integer sums, follows the nb scales of XD (ops.cl's quantize_q8).
#define QDOT2(T, out0, out1, wrow0, wrow1, XQ, XD, n_cols)                                     \
    float out0, out1;                                                                          \
    {                                                                                          \
        float8 acc0_ = 0.0f, acc1_ = 0.0f;                                                     \
        const global int* xs_ = (const global int*)((XD) + (n_cols) / 32);                     \
        for (int c = 0; c < (n_cols) / 32; c += QSTEP_##T) {                                   \
            const global char* x_ = (XQ) + 32 * c;                                             \
            qacc_##T(&acc0_, wrow0, c, x_, (XD) + c, xs_ + c);                                 \
            qacc_##T(&acc1_, wrow1, c, x_, (XD) + c, xs_ + c);                                 \
        }                                                                                      \
        out0 = hsum8(acc0_);                                                                   \
        out1 = hsum8(acc1_);                                                                   \
    }

// Decode: y[row], y[row + 1] (+)= W[row...] . x, two rows per work-item (an odd last row is
// computed twice and stored once). Global (ceil(rows / 2) rounded up to RPW).
#define QGEMV_KERNEL(T)                                                                        \
kernel void qgemv_##T(blk_t W, const global char* XQ, const global float* XD,                 \
                      global float* Y, int n_cols, int n_rows, int row_bytes, int y_off,       \
                      int accumulate) {                                                        \
    const int row = 2 * get_global_id(0);                                                      \
    if (row >= n_rows) return;                                                                 \
    const int row1 = row + 1 < n_rows ? row + 1 : row;                                         \
    QDOT2(T, d0, d1, W + (size_t)row * row_bytes, W + (size_t)row1 * row_bytes, XQ, XD,       \
          n_cols)                                                                              \
    global float* y = Y + y_off + row;                                                         \
    y[0] = d0 + (accumulate ? y[0] : 0.0f);                                                    \
    if (row1 != row) y[1] = d1 + (accumulate ? y[1] : 0.0f);                                   \
}
// Decode's fused Q/K/V and gate/up/SwiGLU launches, as gemv_qkv_<T> and gemv_glu_<T> above,
// two rows per work-item (Q/K/V: nq and nk even, so that a pair stays in one matrix).
#define QGEMV_QKV_KERNEL(T)                                                                    \
kernel void qgemv_qkv_##T(blk_t Wq, blk_t Wk, blk_t Wv, const global char* XQ,                \
                          const global float* XD, global float* q, global float* kc,           \
                          global float* vc, int n_cols, int nq, int nk, int row_bytes,         \
                          int kv_off) {                                                        \
    int row = 2 * get_global_id(0);                                                            \
    if (row >= nq + 2 * nk) return;                                                            \
    blk_t w = row < nq ? Wq : row < nq + nk ? Wk : Wv;                                         \
    global float* y = row < nq ? q : (row < nq + nk ? kc : vc) + kv_off;                       \
    row = row < nq ? row : row < nq + nk ? row - nq : row - nq - nk;                            \
    QDOT2(T, d0, d1, w + (size_t)row * row_bytes, w + (size_t)(row + 1) * row_bytes, XQ, XD,  \
          n_cols)                                                                              \
    y[row] = d0;                                                                               \
    y[row + 1] = d1;                                                                           \
}
#define QGEMV_GLU_KERNEL(T)                                                                    \
kernel void qgemv_glu_##T(blk_t Wg, blk_t Wu, const global char* XQ, const global float* XD, \
                          global float* out, int n_cols, int n_rows, int row_bytes) {          \
    const int row = 2 * get_global_id(0);                                                      \
    if (row >= n_rows) return;                                                                 \
    const int row1 = row + 1 < n_rows ? row + 1 : row;                                         \
    QDOT2(T, g0, g1, Wg + (size_t)row * row_bytes, Wg + (size_t)row1 * row_bytes, XQ, XD,     \
          n_cols)                                                                              \
    QDOT2(T, u0, u1, Wu + (size_t)row * row_bytes, Wu + (size_t)row1 * row_bytes, XQ, XD,     \
          n_cols)                                                                              \
    out[row] = g0 / (1.0f + exp(-g0)) * u0;                                                    \
    if (row1 != row) out[row1] = g1 / (1.0f + exp(-g1)) * u1;                                  \
}

// Prefill: a tile of TILE_N tokens (8 when TT is 8, else 4) per work-item, one row each; a
// chunk's weights are widened to int16 once and used TILE_N times. Global (rows rounded up to RPW, ceil(n_tok / TILE_N)).
#define QGEMM_X(t)                                                                             \
    const int r##t = t0 + t < n_tok ? t0 + t : n_tok - 1;                                      \
    const global char* x##t = XQ + (size_t)r##t * n_cols;                                      \
    const global float* d##t = XD + (size_t)r##t * (n_cols / 32);
#define QGEMM_ACC(t) a##t += (dw * d##t[c]) * idot32(w, x##t + 32 * c);
#define QGEMM_KERNEL(T)                                                                        \
kernel void qgemm_##T(blk_t W, const global char* XQ, const global float* XD,                 \
                      global float* Y, int n_cols, int n_rows, int n_tok, int row_bytes,       \
                      int y_stride, int y_off, int accumulate) {                               \
    const int row = get_global_id(0), t0 = get_global_id(1) * TILE_N;                          \
    if (row >= n_rows) return;                                                                 \
    blk_t wrow = W + (size_t)row * row_bytes;                                                  \
    GEMM_TILE(QGEMM_X)                                                                         \
    GEMM_ZERO;                                                                                 \
    for (int c = 0; c < n_cols / 32; c++) {                                                    \
        wq_t w;                                                                                \
        const float dw = DQI_##T(wrow, c, &w, n_cols / 32);                                    \
        GEMM_TILE(QGEMM_ACC)                                                                   \
    }                                                                                          \
    GEMM_TILE(GEMM_STORE)                                                                      \
}

// Decode on devices tuned to LWS > 1 (GPUs): LWS work-items share a row and each takes 16
// bytes of quants at a time (a unit, see UPB), so that a group of work-items reads one
// contiguous run of the row, and four bytes are multiplied at a time by dot4 (one dp4a
// instruction where the driver has it, see below). Resident matrices are in planes
// (qmatmul_<T>p_vec below); this kernel reads the file's layout (streamed layers), whose blocks
// (34 and 18 bytes) are only 2-byte aligned: 16-bit loads.
// (Measured on an H200, bench/RESULTS.md: 57-61 % of its copy bandwidth for Q8_0 at LWS 32-64,
// 43 % for Q4_0, on the file's layout with half a block a work-item. Slower, and dropped:
// staging each row segment in local memory with coalesced 32-bit loads first, 14-48 %, the
// barriers between stages left too few loads in flight.)
// Global (LWS * rows rounded up to RPW), local (LWS * RPW).
// dot4(a, b, acc): acc + the dot product of the four signed bytes of a and of b.
#if defined(cl_khr_integer_dot_product) && defined(__opencl_c_integer_dot_product_input_4x8bit_packed)
inline int dot4(uint a, uint b, int acc) { return dot_acc_sat_4x8packed_ss_int(a, b, acc); }
#elif DP4A && defined(cl_nv_pragma_unroll)  /* NVIDIA's compiler: inline PTX, sm_61 and later */
inline int dot4(uint a, uint b, int acc) {
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(acc));
    return r;
}
#else
inline int dot4(uint a, uint b, int acc) {
    const int4 x = convert_int4(as_char4(a)), y = convert_int4(as_char4(b));
    return acc + x.x * y.x + x.y * y.y + x.z * y.z + x.w * y.w;
}
#endif
// A work-item takes 16 bytes of quants at a time ("a unit"): half a Q8_0 block (16 weights),
// a whole Q4_0 block (32). UPB_<T>: units a block.
#define UPB_q8_0 2
#define UPB_q4_0 1
// Unit j of a row against the quantized activations XQ, w its quants. Q8_0: 16 int8 weights
// times x's same 16. Q4_0: qs[k] holds weights k (low nibble) and 16 + k (high); a nibble n
// becomes the signed byte n - 8 as (n + 120) ^ 128, four at a time (no carries between bytes).
inline int unit_dot_q8_0(uint4 w, int j, const global char* XQ) {
    const uint4 x = ((const global uint4*)XQ)[j];
    return dot4(w.w, x.w, dot4(w.z, x.z, dot4(w.y, x.y, dot4(w.x, x.x, 0))));
}
inline uint q4_bytes(uint n) { return (n + 0x78787878u) ^ 0x80808080u; }
inline int unit_dot_q4_0(uint4 w, int j, const global char* XQ) {
    const global uint4* x = (const global uint4*)(XQ + 32 * j);
    const uint4 lo = x[0], hi = x[1];
    const uint m = 0x0f0f0f0fu;
    int s = dot4(q4_bytes(w.x & m), lo.x, dot4(q4_bytes(w.y & m), lo.y, 0));
    s = dot4(q4_bytes(w.z & m), lo.z, dot4(q4_bytes(w.w & m), lo.w, s));
    s = dot4(q4_bytes(w.x >> 4 & m), hi.x, dot4(q4_bytes(w.y >> 4 & m), hi.y, s));
    return dot4(q4_bytes(w.z >> 4 & m), hi.z, dot4(q4_bytes(w.w >> 4 & m), hi.w, s));
}
// Unit j of a row in the file's layout (blocks of BS bytes, 2-byte aligned: 16-bit loads).
inline uint u32_at(const global ushort* p, int i) { return (uint)p[2 * i] | (uint)p[2 * i + 1] << 16; }
inline uint4 file_unit(blk_t b, int k) {  // the 16 bytes at qs + 16 k of block b
    const global ushort* q = (const global ushort*)(b + 2 + 16 * k);
    return (uint4)(u32_at(q, 0), u32_at(q, 1), u32_at(q, 2), u32_at(q, 3));
}
#define QMATMUL_VEC_KERNEL(T, BS)                                                              \
kernel void qmatmul_##T##_vec(blk_t W, const global char* XQ, const global float* XD,         \
                              global float* Y, int n_cols, int n_rows, int n_tok,              \
                              int row_bytes, int y_stride, int y_off, int accumulate) {        \
    const int lane = get_local_id(0) % LWS, lrow = get_local_id(0) / LWS;                     \
    const int row = get_global_id(0) / LWS, t0 = 0;                                            \
    float a = 0.0f;                                                                            \
    if (row < n_rows) {                                                                        \
        blk_t wrow = W + (size_t)row * row_bytes;                                              \
        for (int i = lane; i < n_cols / 32 * UPB_##T; i += LWS) {                              \
            const int c = i / UPB_##T;                                                         \
            blk_t b = wrow + c * BS;                                                           \
            a += (float)unit_dot_##T(file_unit(b, i % UPB_##T), i, XQ) * (f16(b, 0) * XD[c]);  \
        }                                                                                      \
    }                                                                                          \
    float acc[1];                                                                              \
    acc[0] = a;                                                                                \
    REDUCE_AND_STORE(1)                                                                        \
}

#define QFORMAT(T, BS) QGEMV_KERNEL(T) QGEMV_QKV_KERNEL(T) QGEMV_GLU_KERNEL(T) QGEMM_KERNEL(T) \
    QMATMUL_VEC_KERNEL(T, BS)
QFORMAT(q8_0, 34)
QFORMAT(q4_0, 18)

// ---- The other quantized formats with int8 activations (llama.cpp's vec_dot_<type>_q8_0,
// _q8_1, _q8_K) ----
// Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K weights meet the same Q8_0 activation blocks as Q4_0
// and Q8_0 (numpy: weight_stream.Q8_ACTIVATION_TYPES). A block of 32 weights (a K format's
// sub-block; two of Q6_K's sub-blocks of 16, each with its own scale) gives exact integer
// products with the block's 32 int8 values, scaled once; a format with an offset (x = d q + m)
// adds m * d_x * sum(x_q), from the block sums quantize_q8 writes after the scales. They read
// the file's layout, resident or streamed, except resident Q5_0, Q4_K and Q5_K on AVX2 CPUs
// (interleaved by 8 rows, see X8_FORMAT). On x86 CPUs (AVX2) the weights enter pmaddubsw as
// unsigned bytes (at most 63: a pair of products stays below 2^15); where dot4 is one
// instruction (GPUs) four bytes at a time; elsewhere a block is dequantized and multiplies x's
// int8 values as floats.
// Blocks per qacc_<T> call (see QSTEP_q8_0): the K formats take KSTEP, a super-block (8) where
// the path below unpacks one at a time, else 1.
#define QSTEP_q4_1 1
#define QSTEP_q5_0 1
#define QSTEP_q5_1 1
#define QSTEP_q4_k KSTEP
#define QSTEP_q5_k KSTEP
#define QSTEP_q6_k KSTEP
#if defined(__AVX2__) && UNALIGNED
typedef uint uint_u __attribute__((aligned(1)));
typedef short v16hi_u __attribute__((vector_size(32), aligned(1)));  // 32 bytes anywhere
// 32 unsigned weights (< 64) times x in 8 int32 lanes of paired products.
inline v8si umadd32(v32qi w, v32qi x) {
    return __builtin_ia32_pmaddwd256(__builtin_ia32_pmaddubsw256(w, x), ONES_16);
}
inline float8 to_f8(v8si v) { return __builtin_convertvector(v, float8); }
inline float8 first(float v) { return (float8)(v, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f); }
// Bit j of the little-endian word at qh as byte j: 16 where set (the 5th bits of Q5_0/Q5_1).
inline v32qi bit5_bytes(blk_t qh) {
    const uint h = *(const global uint_u*)qh;
    const v8si all = {h, h, h, h, h, h, h, h};
    const v32qi spread = __builtin_ia32_pshufb256(  /* byte j / 8 of h to byte j, per lane */
        (v32qi)all, (v32qi){0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3});
    const v32qi bit = {1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128,
                       1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128};
    return (v32qi)((spread & bit) == bit) & (char)16;
}
// The 32 weights of a K format's sub-block j from its 32 bytes of nibbles (qs + 32 (j / 2)).
inline v32qi k_nibbles(blk_t qs, int j) {
    return (v32qi)(*(const global v16hi_u*)(qs + 32 * (j >> 1)) >> (4 * (j & 1))) & (char)15;
}

// Q4_1 (20 bytes): d | m | qs[16].  x = d q + m
inline void qacc_q4_1(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    blk_t b = row + 20 * c;
    const v8si p = umadd32(nibbles32(b + 4), *(const global v32qi*)x);
    *acc += (dq_scale(b) * dx[0]) * to_f8(p) + first(dq_scale(b + 2) * dx[0] * (float)xs[0]);
}
// Q5_0 (22 bytes): d | qh[4] | qs[16].  x = d (q - 16): the -16 comes off the integer sum.
// Resident Q5_0 is interleaved as Q4_0 is (the *_q5_0x8 kernels), so the block's integer
// product goes to lane 0 and one float term a block is added, in their order (see lane0).
inline void qacc_q5_0(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    blk_t b = row + 22 * c;
    v8si p = umadd32(nibbles32(b + 6) | bit5_bytes(b + 2), *(const global v32qi*)x);
    p[0] -= 16 * xs[0];
    const float8 dot = lane0(p);
    const float d = dq_scale(b) * dx[0];
    *acc += d * dot;
}
// Q5_1 (24 bytes): d | m | qh[4] | qs[16].  x = d q + m
inline void qacc_q5_1(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    blk_t b = row + 24 * c;
    const v8si p = umadd32(nibbles32(b + 8) | bit5_bytes(b + 4), *(const global v32qi*)x);
    *acc += (dq_scale(b) * dx[0]) * to_f8(p) + first(dq_scale(b + 2) * dx[0] * (float)xs[0]);
}
// The K formats a super-block (8 blocks) at a time.
#define KSTEP 8  // Q6_K below too
// Q4_K (144 bytes a super-block): d | dmin | scales[12] | qs[128]; Q5_K (176 bytes): d | dmin
// | scales[12] | qh[32] | qs[128], the 5th bit of weight l of sub-block j bit j of qh[l].
// x = (d sc_j) q - dmin m_j. Resident Q4_K and Q5_K are interleaved by 8 rows (the *_q4_kx8
// and *_q5_kx8 kernels), which add a super-block's terms to a row in this order:
// -dmin * sum_j dx_j (m_j sum(x_j)), then d * sum_j dx_j (sc_j dot_j), the sums over the 8
// sub-blocks in turn; lane 0 adds the same (see lane0). The products in brackets are exact
// (integers below 2^24), so each term rounds where the interleaved kernels' does.
// Bit j of each byte of qh as bit 4 (Q5_K's 5th bit of sub-block j): one shift where j is
// known when compiling (an unrolled loop), as bit 4 is then four places from bit j at most.
#define BIT5_K(qh, j) ((v32qi)((j) < 4 ? (qh) << (4 - (j)) : (qh) >> ((j) - 4)) & (char)16)
// Sub-block j's 32 unsigned weights.
inline v32qi k_weights_q4_k(blk_t b, int j) { return k_nibbles(b + 16, j); }
inline v32qi k_weights_q5_k(blk_t b, int j) {
    const v16hi qh = *(const global v16hi_u*)(b + 16);
    return k_nibbles(b + 48, j) | BIT5_K(qh, j);
}
#define QACC_K45(T, BS)                                                                        \
inline void qacc_##T(float8* acc, blk_t row, int c, const global char* x,                     \
                     const global float* dx, const global int* xs) {                           \
    blk_t b = row + BS * (c >> 3);                                                             \
    float sa = 0.0f, sm = 0.0f;                                                                \
    _Pragma("unroll") for (int j = 0; j < 8; j++) {                                            \
        float sc, m;                                                                           \
        scale_min_k4(b + 4, j, &sc, &m);                                                       \
        const float dot = (float)isum8(umadd32(k_weights_##T(b, j),                            \
                                               *(const global v32qi*)(x + 32 * j)));           \
        sm += dx[j] * (m * (float)xs[j]);                                                      \
        sa += dx[j] * (sc * dot);                                                              \
    }                                                                                          \
    (*acc).s0 -= dq_scale(b + 2) * sm;                                                         \
    (*acc).s0 += dq_scale(b) * sa;                                                             \
}
QACC_K45(q4_k, 144)
QACC_K45(q5_k, 176)
// Q6_K (210 bytes): ql[128] | qh[64] | scales[16] int8 | d (see DQ_q6_k), a super-block (8
// blocks) at a time: d and the 16 scales are read once. A block's two halves of 16 weights
// have their own scales: pmaddwd multiplies the 16-bit pair sums by them. The -32 comes off in
// 16 bits as pmaddubsw(32, x) (|sum of a pair| <= 2 * 32 * 127 + 2 * 63 * 127).
// Block k's 32 weights (q + 32, 0-63) of the super-block at b.
inline v32qi q6k_weights(blk_t b, int k) {
    const int h = k >> 2, qr = k & 3;
    const v16hi lo = *(const global v16hi_u*)(b + 64 * h + 32 * (qr & 1)) >> (4 * (qr >> 1));
    const v16hi hi = (*(const global v16hi_u*)(b + 128 + 32 * h) >> (2 * qr)) << 4;
    return ((v32qi)lo & (char)15) | ((v32qi)hi & (char)48);
}
inline v8si q6k_dot(blk_t b, int k, const global char* x, v16hi scales) {
    const v32qi q = q6k_weights(b, k);
    const v32qi xv = *(const global v32qi*)x;
    const v16hi s = __builtin_ia32_pmaddubsw256(q, xv) -
                    __builtin_ia32_pmaddubsw256(xv - xv + (char)32, xv);
    return __builtin_ia32_pmaddwd256(s, scales);
}
#define Q6K_SUB(k)                                                                             \
    *acc += (d * dx[k]) * to_f8(q6k_dot(b, k, x + 32 * k, __builtin_shufflevector(sc, sc,      \
        2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k, 2 * k,                                \
        2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1)));
inline void qacc_q6_k(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    blk_t b = row + 210 * (c >> 3);
    const float d = dq_scale(b + 208);
    const v16hi sc = __builtin_convertvector(*(const global v16qi_u*)(b + 192), v16hi);
    Q6K_SUB(0) Q6K_SUB(1) Q6K_SUB(2) Q6K_SUB(3) Q6K_SUB(4) Q6K_SUB(5) Q6K_SUB(6) Q6K_SUB(7)
}
#elif DP4A || (defined(cl_khr_integer_dot_product) && \
               defined(__opencl_c_integer_dot_product_input_4x8bit_packed))
// Where 4-byte dot products are one instruction (NVIDIA's dp4a, the Khronos extension) the
// same integers 4 bytes at a time by dot4: the weights as signed bytes (nibbles and 5-bit
// values as they are, Q6_K's q - 32 as (q + 96) ^ 128 byte by byte), x's 32 int8 values as 8
// words. (Not yet timed on a GPU. Through dot4's portable fallback, PoCL's CPU device ran
// these 1.1-2x slower than the float products below.)
#define KSTEP 1
// Word i of the quants at p (blocks of 22 and 210 bytes leave them 2-byte aligned only).
inline uint nib_word(const global uchar* p, int i) { return u32_at((const global ushort*)p, i); }
// 16 bytes of nibbles against x: low nibbles meet x's words 0-3, high nibbles words 4-7; h's
// bits are their 5th bits (BITS5; 0 for Q4_1).
inline int nib_dot(const global uchar* qs, const global uint* x, uint h) {
    const uint m = 0x0f0f0f0fu;
    int s = 0;
    _Pragma("unroll") for (int i = 0; i < 4; i++) {
        const uint q = nib_word(qs, i);
        s = dot4((q & m) | BITS5(h, i), x[i], s);
        s = dot4((q >> 4 & m) | BITS5(h, 4 + i), x[4 + i], s);
    }
    return s;
}
// Q4_1: x = d q + m.  Q5_0: x = d (q - 16).  Q5_1: x = d q + m, q with its 5th bit from qh.
inline void qacc_q4_1(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    blk_t b = row + 20 * c;
    const int s = nib_dot(b + 4, (const global uint*)x, 0u);
    (*acc).s0 += f16(b, 0) * dx[0] * (float)s + f16(b, 1) * dx[0] * (float)xs[0];
}
inline void qacc_q5_0(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    blk_t b = row + 22 * c;
    const int s = nib_dot(b + 6, (const global uint*)x, nib_word(b + 2, 0)) - 16 * xs[0];
    (*acc).s0 += f16(b, 0) * dx[0] * (float)s;
}
inline void qacc_q5_1(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    blk_t b = row + 24 * c;
    const int s = nib_dot(b + 8, (const global uint*)x, nib_word(b + 4, 0));
    (*acc).s0 += f16(b, 0) * dx[0] * (float)s + f16(b, 1) * dx[0] * (float)xs[0];
}
// Q4_K/Q5_K sub-block j: 32 bytes of nibbles (low or high half), 5th bits from qh's bit j.
inline int k_dot(const global uchar* qs, int j, const global uchar* qh,
                 const global uint* x) {
    const uint m = 0x0f0f0f0fu;
    int s = 0;
    _Pragma("unroll") for (int i = 0; i < 8; i++) {
        uint q = (nib_word(qs, i) >> (4 * (j & 1))) & m;
        if (qh) q |= (nib_word(qh, i) >> j & 0x01010101u) << 4;
        s = dot4(q, x[i], s);
    }
    return s;
}
inline void qacc_q4_k(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    blk_t b = row + 144 * (c >> 3);
    const int j = c & 7;
    float sc, m;
    scale_min_k4(b + 4, j, &sc, &m);
    const int s = k_dot(b + 16 + 32 * (j >> 1), j, 0, (const global uint*)x);
    (*acc).s0 += dx[0] * (f16(b, 0) * sc * (float)s - f16(b, 1) * m * (float)xs[0]);
}
inline void qacc_q5_k(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    blk_t b = row + 176 * (c >> 3);
    const int j = c & 7;
    float sc, m;
    scale_min_k4(b + 4, j, &sc, &m);
    const int s = k_dot(b + 48 + 32 * (j >> 1), j, b + 16, (const global uint*)x);
    (*acc).s0 += dx[0] * (f16(b, 0) * sc * (float)s - f16(b, 1) * m * (float)xs[0]);
}
// Q6_K block k: two halves of 16 weights with their own int8 scales.
inline void qacc_q6_k(float8* acc, blk_t row, int c, const global char* x,
                      const global float* dx, const global int* xs) {
    blk_t b = row + 210 * (c >> 3);
    const int k = c & 7, h = k >> 2, qr = k & 3;
    const global uchar* ql = b + 64 * h + 32 * (qr & 1);
    const global uchar* qh = b + 128 + 32 * h;
    const global uint* xw = (const global uint*)x;
    int s[2] = {0, 0};
    _Pragma("unroll") for (int i = 0; i < 8; i++) {
        const uint q = (nib_word(ql, i) >> (4 * (qr >> 1)) & 0x0f0f0f0fu) |
                       (nib_word(qh, i) >> (2 * qr) & 0x03030303u) << 4;
        s[i / 4] = dot4((q + 0x60606060u) ^ 0x80808080u, xw[i], s[i / 4]);
    }
    const global char* scale = (const global char*)(b + 192 + 8 * h + 2 * qr);
    (*acc).s0 += f16(b, 104) * dx[0] * (float)(scale[0] * s[0] + scale[1] * s[1]);
}
#else
// Elsewhere (CPUs without AVX2) the block dequantized to floats (DQ_<T>: quants, each half's
// scale, offset) times x's int8 values as floats, which compilers vectorize 8 wide.
#define KSTEP 1
#define QACC_FLOAT(T)                                                                          \
inline void qacc_##T(float8* acc, blk_t row, int c, const global char* x,                   \
                     const global float* dx, const global int* xs) {                          \
    float8 w0, w1, w2, w3;                                                                     \
    const float4 s = DQ_##T(row, c, &w0, &w1, &w2, &w3);                                       \
    const float8 x0 = convert_float8(LOAD_I8(0, x)), x1 = convert_float8(LOAD_I8(1, x));       \
    const float8 x2 = convert_float8(LOAD_I8(2, x)), x3 = convert_float8(LOAD_I8(3, x));       \
    *acc += dx[0] * (s.x * (w0 * x0 + w1 * x1) + s.y * (w2 * x2 + w3 * x3));                   \
    if (HAS_OFFSET_##T) *acc += (float8)(s.z * dx[0] * (float)xs[0], 0.0f, 0.0f, 0.0f, 0.0f,   \
                                         0.0f, 0.0f, 0.0f);                                    \
}
QACC_FLOAT(q4_1)
QACC_FLOAT(q5_0)
QACC_FLOAT(q5_1)
QACC_FLOAT(q4_k)
QACC_FLOAT(q5_k)
QACC_FLOAT(q6_k)
#endif

// Prefill for these formats: TILE_N tokens a work-item, one row, each token's term by qacc_<T>
// (the unrolled tile reads the same weight bytes TILE_N times, which the compiler may share;
// not checked in its output). Global (rows rounded up to RPW, ceil(n_tok / TILE_N)), local
// (RPW, 1).
#define KGEMM_KERNEL(T)                                                                        \
kernel void qgemm_##T(blk_t W, const global char* XQ, const global float* XD,                 \
                      global float* Y, int n_cols, int n_rows, int n_tok, int row_bytes,       \
                      int y_stride, int y_off, int accumulate) {                               \
    const int row = get_global_id(0), t0 = get_global_id(1) * TILE_N, nb = n_cols / 32;        \
    if (row >= n_rows) return;                                                                 \
    blk_t wrow = W + (size_t)row * row_bytes;                                                  \
    const global char* x[TILE_N];                                                              \
    const global float* d[TILE_N];                                                             \
    const global int* xs[TILE_N];                                                              \
    float8 acc[TILE_N];                                                                        \
    _Pragma("unroll") for (int t = 0; t < TILE_N; t++) {                                       \
        const int r = min(t0 + t, n_tok - 1);                                                  \
        x[t] = XQ + (size_t)r * n_cols; d[t] = XD + (size_t)r * nb; acc[t] = 0.0f;             \
        xs[t] = (const global int*)(XD + (size_t)n_tok * nb) + (size_t)r * nb;                 \
    }                                                                                          \
    for (int c = 0; c < nb; c += QSTEP_##T)                                                    \
        _Pragma("unroll") for (int t = 0; t < TILE_N; t++)                                     \
            qacc_##T(&acc[t], wrow, c, x[t] + 32 * c, d[t] + c, xs[t] + c);                    \
    for (int t = 0; t < TILE_N && t0 + t < n_tok; t++) {                                       \
        global float* y = Y + y_off + (size_t)(t0 + t) * y_stride + row;                       \
        *y = hsum8(acc[t]) + (accumulate ? *y : 0.0f);                                         \
    }                                                                                          \
}
// Decode on the GPU shape (LWS > 1): the LWS work-items of a row take its blocks in turn.
#define KMATMUL_VEC_KERNEL(T)                                                                  \
kernel void qmatmul_##T##_vec(blk_t W, const global char* XQ, const global float* XD,         \
                              global float* Y, int n_cols, int n_rows, int n_tok,              \
                              int row_bytes, int y_stride, int y_off, int accumulate) {        \
    const int lane = get_local_id(0) % LWS, lrow = get_local_id(0) / LWS;                     \
    const int row = get_global_id(0) / LWS, t0 = 0;                                            \
    float8 a = 0.0f;                                                                           \
    if (row < n_rows) {                                                                        \
        blk_t wrow = W + (size_t)row * row_bytes;                                              \
        const global int* xs = (const global int*)(XD + n_cols / 32);                          \
        for (int c = QSTEP_##T * lane; c < n_cols / 32; c += QSTEP_##T * LWS)                  \
            qacc_##T(&a, wrow, c, XQ + 32 * c, XD + c, xs + c);                                \
    }                                                                                          \
    float acc[1];                                                                              \
    acc[0] = hsum8(a);                                                                         \
    REDUCE_AND_STORE(1)                                                                        \
}
#define KFORMAT(T) QGEMV_KERNEL(T) QGEMV_QKV_KERNEL(T) QGEMV_GLU_KERNEL(T) KGEMM_KERNEL(T)     \
    KMATMUL_VEC_KERNEL(T)
KFORMAT(q4_1)
KFORMAT(q5_0)
KFORMAT(q5_1)
KFORMAT(q4_k)
KFORMAT(q5_k)
KFORMAT(q6_k)

// ---- Q4_0 and Q8_0 in planes (GPUs) ----
// Where decode runs LWS work-items a row (GPUs), the backend repacks a resident Q4_0 or Q8_0
// matrix once at load (opencl_kernels.planar): each row is its quants, block after block (32 or
// 16 bytes each), then its f16 scales, padded to a multiple of 16 bytes. A unit's quants are
// then one aligned 128-bit load, and a warp's load instruction reads 512 contiguous bytes.
// Each work-item issues QU such loads (and their scales) before it multiplies, so that enough
// bytes are in flight. The units are taken, and their float terms added, in the file kernel's
// order: a streamed layer gives the same floats.
// (H200, 14336 x 4096, bench/RESULTS.md: Q8_0 63-69 % of copy bandwidth in one launch, 92 % at
// the margin; Q4_0 50 %, 80 % at the margin. A launch costs 3.6-5 us before it reads, and pure
// reads of the same 62 MB reach only 74-80 % of the copy figure.)
#define QB_q8_0 32
#define QB_q4_0 16
#define QMATMUL_PLANAR_KERNEL(T)                                                               \
kernel void qmatmul_##T##p_vec(blk_t W, const global char* XQ, const global float* XD,        \
                               global float* Y, int n_cols, int n_rows, int n_tok,             \
                               int row_bytes, int y_stride, int y_off, int accumulate) {       \
    const int lane = get_local_id(0) % LWS, lrow = get_local_id(0) / LWS;                     \
    const int row = get_global_id(0) / LWS, t0 = 0, n_units = n_cols / 32 * UPB_##T;         \
    float a = 0.0f;                                                                            \
    if (row < n_rows) {                                                                        \
        blk_t wrow = W + (size_t)row * row_bytes;                                              \
        const global uint4* q = (const global uint4*)wrow;                                     \
        const global ushort* d = (const global ushort*)(wrow + n_cols / 32 * QB_##T);          \
        int i = lane;                                                                          \
        for (; i + (QU - 1) * LWS < n_units; i += QU * LWS) {                                  \
            uint4 w[QU];                                                                       \
            uint s[QU];                                                                        \
            _Pragma("unroll") for (int u = 0; u < QU; u++) {                                   \
                w[u] = q[i + u * LWS];                                                         \
                s[u] = d[(i + u * LWS) / UPB_##T];                                             \
            }                                                                                  \
            _Pragma("unroll") for (int u = 0; u < QU; u++) {                                   \
                const int j = i + u * LWS;                                                     \
                a += (float)unit_dot_##T(w[u], j, XQ) * (f16_bits(s[u]) * XD[j / UPB_##T]);    \
            }                                                                                  \
        }                                                                                      \
        for (; i < n_units; i += LWS)                                                          \
            a += (float)unit_dot_##T(q[i], i, XQ) * (f16_bits(d[i / UPB_##T]) * XD[i / UPB_##T]); \
    }                                                                                          \
    float acc[1];                                                                              \
    acc[0] = a;                                                                                \
    REDUCE_AND_STORE(1)                                                                        \
}
// Embedding rows from planes, bit-exact as get_rows_<T>. Global (n_cols / 32, n_tok).
#define GET_ROWS_PLANAR_KERNEL(T)                                                              \
kernel void get_rows_##T##p(blk_t W, const global int* tokens, global float* out,             \
                            int n_cols, int row_bytes) {                                       \
    const int c = get_global_id(0), t = get_global_id(1);                                     \
    blk_t row = W + (size_t)tokens[t] * row_bytes;                                             \
    float8 w0, w1, w2, w3;                                                                     \
    floats_##T(row + QB_##T * c, &w0, &w1, &w2, &w3);                                          \
    const float d = f16(row + n_cols / 32 * QB_##T, c);                                        \
    global float8* o = (global float8*)(out + (size_t)t * n_cols) + 4 * c;                     \
    o[0] = d * w0; o[1] = d * w1; o[2] = d * w2; o[3] = d * w3;                                \
}
// Prefill reads the planes through DQI_<T>p (see QGEMM_KERNEL).
#define PLANAR_FORMAT(T) QMATMUL_PLANAR_KERNEL(T) GET_ROWS_PLANAR_KERNEL(T) QGEMM_KERNEL(T##p)
PLANAR_FORMAT(q8_0)
PLANAR_FORMAT(q4_0)

// ---- Q4_0 and Q8_0 interleaved by 8 rows (CPUs with AVX2 and F16C; llama.cpp repacks Q4_0
// so too) ----
// The backend repacks a resident Q4_0 or Q8_0 matrix once at load (opencl_kernels.interleave)
// into groups of 8 rows. Block c of a group is the 8 rows' f16 scales, then chunks of 32 bytes
// where dword j of chunk k is bytes 4k..4k+3 of row j's qs: 4 chunks for Q4_0 (144 bytes; low
// nibbles: weights 4k..4k+3, high nibbles: weights 16+4k..), 8 for Q8_0 (272 bytes). A
// register then holds 8 rows, a row a lane: the x dword that each weight dword meets is one
// broadcast, and a block's 8 dot products need no transpose and no horizontal sum.
// Q4_0: the nibbles go into pmaddubsw unsigned (0-15) and the -8 comes off as -8 * sum(x) for
// all 8 rows (the sums come with the scales, see ops.cl); 8 pmaddubsw results add in 16 bits
// (at most 8 * 2 * 15 * 127 = 30480) before one pmaddwd. Q8_0: signed by signed as idot32
// (|w| times x with w's sign); a pair of products reaches 2 * 128 * 127, so each chunk goes
// through pmaddwd before the sum. Same integers as qblock_q4_0 and qblock_q8_0.
#if defined(__AVX2__) && defined(__F16C__) && UNALIGNED
#define X8_BLOCK_q4_0 144
#define X8_BLOCK_q8_0 272
#define X8_BLOCK_q5_0 176
#define X8_BLOCK_q4_k 1152
#define X8_BLOCK_q5_k 1408
#define X8_COLS_q4_0 32  // weights a row of a block
#define X8_COLS_q8_0 32
#define X8_COLS_q5_0 32
#define X8_COLS_q4_k 256
#define X8_COLS_q5_k 256
typedef float v8sf_x8 __attribute__((vector_size(32)));
#define SPLAT8_X8(v) ((v8si){v, v, v, v, v, v, v, v})
#define SPLATF_X8(v) ((v8sf_x8){v, v, v, v, v, v, v, v})

// What a block's integer dot products add for its offset: -8 * the sum of an activation
// block's 32 int8 values (quantize_q8 wrote it) for Q4_0's unsigned nibbles, none for Q8_0.
#define X8_OFFSET_q4_0(sum) SPLAT8_X8(-8 * (sum))
#define X8_OFFSET_q8_0(sum) SPLAT8_X8(0)
#define X8_OFFSET_q5_0(sum) SPLAT8_X8(-16 * (sum))

// The 8 rows' scales of a block, as floats.
inline v8sf_x8 x8_scales(blk_t b) {
    return __builtin_ia32_vcvtph2ps256((v8hi)*(const global v16qi_u*)b);  // one 16-byte load
}

// A block's 8 weight registers: Q4_0's w[k] low nibbles of chunk k, w[4 + k] high (unsigned);
// Q8_0's chunks as they are (signed).
inline void x8_weights_q4_0(blk_t b, v32qi* w) {
    _Pragma("unroll") for (int k = 0; k < 4; k++) {
        const v32qi q = *(const global v32qi_u*)(b + 16 + 32 * k);
        w[k] = q & (char)15;
        w[4 + k] = (v32qi)((v16hi)q >> 4) & (char)15;
    }
}
// Q5_0 (176 bytes a block of 8 rows: the scales, a chunk of the rows' qh, Q4_0's 4 chunks of
// nibbles): Q4_0's weights plus each one's 5th bit, bit i of its row's qh for weight i. Byte
// 4j + i of w[k] (weight 4k + i, or 16 + 4k + i for w[4 + k], of row j) takes it from byte
// k / 2 (or 2 + k / 2) of dword j of the qh chunk: a byte shuffle, then a test of its bit.
// (BITS5's multiply, as the VNNI prefill tile uses, made decode's Q5_0 gate/up GEMV 4 % slower:
// 352 against 337 us, bench/profile_opencl.py on the Q4_K_M bench model.)
inline v32qi x8_bit5(v32qi qh, char byte, int odd) {
    const v32qi at = {0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                      0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12};
    const v32qi lo = {1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8,
                      1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8, 1, 2, 4, 8};
    const v32qi hi = {16, 32, 64, -128, 16, 32, 64, -128, 16, 32, 64, -128, 16, 32, 64, -128,
                      16, 32, 64, -128, 16, 32, 64, -128, 16, 32, 64, -128, 16, 32, 64, -128};
    const v32qi bit = odd ? hi : lo;
    const v32qi t = __builtin_ia32_pshufb256(qh, at + byte);
    return (v32qi)((t & bit) == bit) & (char)16;
}
inline void x8_weights_q5_0(blk_t b, v32qi* w) {
    const v32qi qh = *(const global v32qi_u*)(b + 16);
    _Pragma("unroll") for (int k = 0; k < 4; k++) {
        const v32qi q = *(const global v32qi_u*)(b + 48 + 32 * k);
        w[k] = (q & (char)15) | x8_bit5(qh, k >> 1, k & 1);
        w[4 + k] = ((v32qi)((v16hi)q >> 4) & (char)15) | x8_bit5(qh, 2 + (k >> 1), k & 1);
    }
}
inline void x8_weights_q8_0(blk_t b, v32qi* w) {
    _Pragma("unroll") for (int k = 0; k < 8; k++) w[k] = *(const global v32qi_u*)(b + 16 + 32 * k);
}

// The 8 rows' integer dot products of a block with an activation block (lane j: row j).
inline v8si x8_dot_q4_0(const v32qi* w, const global char* x, v8si offset) {
    const global int* xi = (const global int*)x;
    v16hi s = __builtin_ia32_pmaddubsw256(w[0], (v32qi)SPLAT8_X8(xi[0]));
    _Pragma("unroll") for (int k = 1; k < 8; k++)
        s += __builtin_ia32_pmaddubsw256(w[k], (v32qi)SPLAT8_X8(xi[k]));
    return __builtin_ia32_pmaddwd256(s, ONES_16) + offset;
}
// Q5_0: as Q4_0, but a pair of products reaches 2 * 31 * 127, so 4 add in 16 bits, not 8.
inline v8si x8_dot_q5_0(const v32qi* w, const global char* x, v8si offset) {
    const global int* xi = (const global int*)x;
    v16hi s[2];
    _Pragma("unroll") for (int h = 0; h < 2; h++) {
        s[h] = __builtin_ia32_pmaddubsw256(w[4 * h], (v32qi)SPLAT8_X8(xi[4 * h]));
        _Pragma("unroll") for (int k = 1; k < 4; k++)
            s[h] += __builtin_ia32_pmaddubsw256(w[4 * h + k], (v32qi)SPLAT8_X8(xi[4 * h + k]));
    }
    return __builtin_ia32_pmaddwd256(s[0], ONES_16) + __builtin_ia32_pmaddwd256(s[1], ONES_16) +
           offset;
}
inline v8si x8_dot_q8_0(const v32qi* w, const global char* x, v8si offset) {
    const global int* xi = (const global int*)x;
    v8si s = offset;
    _Pragma("unroll") for (int k = 0; k < 8; k++) {
        const v32qi xk = (v32qi)SPLAT8_X8(xi[k]);
        s += __builtin_ia32_pmaddwd256(
            __builtin_ia32_pmaddubsw256(__builtin_ia32_psignb256(w[k], w[k]),
                                        __builtin_ia32_psignb256(xk, w[k])), ONES_16);
    }
    return s;
}

// acc (lane j) += row j of the group at g . x, block by block.
#define X8_GEMV_ACC(T, acc, g, x, xd, offset)                                                  \
    {                                                                                          \
        v32qi w_[8];                                                                           \
        x8_weights_##T(g, w_);                                                                 \
        acc += (x8_scales(g) * SPLATF_X8(xd)) *                                                \
               __builtin_convertvector(x8_dot_##T(w_, x, offset), v8sf_x8);                    \
    }

// Q4_K (1152 bytes a super-block of 8 rows): the rows' d, their dmin, 3 chunks of their 12
// bytes of scales and mins, then 32 chunks of their 128 bytes of nibbles; chunks 8p..8p+7
// hold sub-block 2p in their low nibbles and 2p + 1 in their high ones (weights 4k..4k+3 in
// chunk 8p + k, as Q4_0's). Q5_K (1408 bytes): the same with 8 chunks of the rows' 32 bytes
// of qh between the scales and the nibbles.
// Sub-block j's 6-bit scales and mins, a row a lane (scale_min_k4 of each row).
inline void x8_scale_min_k4(blk_t b, int j, v8sf_x8* sc, v8sf_x8* m) {
    const v8si s0 = (v8si)*(const global v32qi_u*)(b + 32) >> 8 * (j & 3);
    const v8si s1 = (v8si)*(const global v32qi_u*)(b + 64) >> 8 * (j & 3);
    const v8si s2 = (v8si)*(const global v32qi_u*)(b + 96) >> 8 * (j & 3);
    const v8si vs = j < 4 ? s0 & 63 : (s2 & 15) | (s0 >> 6 & 3) << 4;
    const v8si vm = j < 4 ? s1 & 63 : (s2 >> 4 & 15) | (s1 >> 6 & 3) << 4;
    *sc = __builtin_convertvector(vs, v8sf_x8);
    *m = __builtin_convertvector(vm, v8sf_x8);
}
// Sub-block j's unsigned weights, chunk k (dword r: weights 4k..4k+3 of row r).
inline v32qi x8_nibbles_k(blk_t qs, int j, int k) {
    const v16hi q = (v16hi)*(const global v32qi_u*)(qs + 32 * (8 * (j >> 1) + k));
    return (v32qi)(q >> 4 * (j & 1)) & (char)15;
}
inline v32qi x8_weights_q4_k(blk_t b, int j, int k) { return x8_nibbles_k(b + 128, j, k); }
inline v32qi x8_weights_q5_k(blk_t b, int j, int k) {  // the 5th bit: bit j of the qh byte
    const v16hi qh = (v16hi)*(const global v32qi_u*)(b + 128 + 32 * k);
    return x8_nibbles_k(b + 384, j, k) | BIT5_K(qh, j);
}
// The 8 rows' integer dot products of sub-block j with its 32 int8 values, then acc += a
// super-block of the group . x (its 8 activation blocks: int8 values x, scales dx, sums xs),
// the terms in qacc_q4_k's order. A pair of products reaches 2 * 31 * 127 (Q5_K), so 4 add
// in 16 bits.
#define X8_K45(T)                                                                              \
inline v8si x8_dot_##T(blk_t b, int j, const global char* x) {                                \
    const global int* xi = (const global int*)x;                                               \
    v8si dot = SPLAT8_X8(0);                                                                   \
    _Pragma("unroll") for (int h = 0; h < 8; h += 4) {                                         \
        v16hi s = __builtin_ia32_pmaddubsw256(x8_weights_##T(b, j, h), (v32qi)SPLAT8_X8(xi[h])); \
        _Pragma("unroll") for (int k = h + 1; k < h + 4; k++)                                  \
            s += __builtin_ia32_pmaddubsw256(x8_weights_##T(b, j, k), (v32qi)SPLAT8_X8(xi[k])); \
        dot += __builtin_ia32_pmaddwd256(s, ONES_16);                                          \
    }                                                                                          \
    return dot;                                                                                \
}                                                                                              \
inline v8sf_x8 x8_acc_##T(v8sf_x8 acc, blk_t b, const global char* x,                         \
                          const global float* dx, const global int* xs) {                      \
    v8sf_x8 sa = SPLATF_X8(0.0f), sm = SPLATF_X8(0.0f);                                        \
    _Pragma("unroll") for (int j = 0; j < 8; j++) {                                            \
        v8sf_x8 sc, m;                                                                         \
        x8_scale_min_k4(b, j, &sc, &m);                                                        \
        const v8sf_x8 dot = __builtin_convertvector(x8_dot_##T(b, j, x + 32 * j), v8sf_x8);    \
        sm += SPLATF_X8(dx[j]) * (m * SPLATF_X8((float)xs[j]));                                \
        sa += SPLATF_X8(dx[j]) * (sc * dot);                                                   \
    }                                                                                          \
    acc -= x8_scales(b + 16) * sm;                                                             \
    acc += x8_scales(b) * sa;                                                                  \
    return acc;                                                                                \
}
X8_K45(q4_k)
X8_K45(q5_k)

// acc += block c of a group at b . x: X8_STEP_<T>(acc, b, c, XQ, XD, XS), for the decode kernels.
#define X8_STEP_32(T, acc, b, c, XQ, XD, XS)                                                   \
    X8_GEMV_ACC(T, acc, b, (XQ) + 32 * (c), (XD)[c], X8_OFFSET_##T((XS)[c]))
#define X8_STEP_q4_0(...) X8_STEP_32(q4_0, __VA_ARGS__)
#define X8_STEP_q8_0(...) X8_STEP_32(q8_0, __VA_ARGS__)
#define X8_STEP_q5_0(...) X8_STEP_32(q5_0, __VA_ARGS__)
#define X8_STEP_256(T, acc, b, c, XQ, XD, XS)                                                  \
    acc = x8_acc_##T(acc, b, (XQ) + 256 * (c), (XD) + 8 * (c), (XS) + 8 * (c));
#define X8_STEP_q4_k(...) X8_STEP_256(q4_k, __VA_ARGS__)
#define X8_STEP_q5_k(...) X8_STEP_256(q5_k, __VA_ARGS__)
// A group's bytes.
#define X8_GROUP_BYTES(T, n_cols) ((size_t)(n_cols) / X8_COLS_##T * X8_BLOCK_##T)

inline void x8_store(global float* y, v8sf_x8 v, int accumulate) {
    for (int j = 0; j < 8; j++) y[j] = v[j] + (accumulate ? y[j] : 0.0f);
}

// Decode: y[8g .. 8g + 7] (+)= the group's rows . x. Global (n_rows / 8 rounded up to the
// work-group), the rows a multiple of 8.
#define X8_GEMV_KERNEL(T)                                                                      \
kernel void qgemv_##T##x8(blk_t W, const global char* XQ, const global float* XD,             \
                          global float* Y, int n_cols, int n_rows, int y_off, int accumulate) { \
    const int g = get_global_id(0);                                                            \
    if (8 * g >= n_rows) return;                                                               \
    const global int* XS = (const global int*)(XD + n_cols / 32);                              \
    blk_t b = W + g * X8_GROUP_BYTES(T, n_cols);                                               \
    v8sf_x8 acc = SPLATF_X8(0.0f);                                                             \
    for (int c = 0; c < n_cols / X8_COLS_##T; c++, b += X8_BLOCK_##T)                          \
        X8_STEP_##T(acc, b, c, XQ, XD, XS)                                                     \
    x8_store(Y + y_off + 8 * g, acc, accumulate);                                              \
}

// Decode's fused gate/up/SwiGLU on two interleaved matrices: one offset per block for both.
#define X8_GLU_KERNEL(T)                                                                       \
kernel void qgemv_glu_##T##x8(blk_t Wg, blk_t Wu, const global char* XQ,                      \
                              const global float* XD, global float* out, int n_cols,           \
                              int n_rows) {                                                    \
    const int g = get_global_id(0);                                                            \
    if (8 * g >= n_rows) return;                                                               \
    const global int* XS = (const global int*)(XD + n_cols / 32);                              \
    blk_t bg = Wg + g * X8_GROUP_BYTES(T, n_cols), bu = Wu + g * X8_GROUP_BYTES(T, n_cols);    \
    v8sf_x8 gate = SPLATF_X8(0.0f), up = SPLATF_X8(0.0f);                                      \
    for (int c = 0; c < n_cols / X8_COLS_##T; c++, bg += X8_BLOCK_##T, bu += X8_BLOCK_##T) {   \
        X8_STEP_##T(gate, bg, c, XQ, XD, XS)                                                   \
        X8_STEP_##T(up, bu, c, XQ, XD, XS)                                                     \
    }                                                                                          \
    for (int j = 0; j < 8; j++) out[8 * g + j] = gate[j] / (1.0f + exp(-gate[j])) * up[j];     \
}

// Decode's fused Q/K/V: groups of Wq, then Wk, then Wv (nq and nk multiples of 8).
#define X8_QKV_KERNEL(T)                                                                       \
kernel void qgemv_qkv_##T##x8(blk_t Wq, blk_t Wk, blk_t Wv, const global char* XQ,            \
                              const global float* XD, global float* q, global float* kc,       \
                              global float* vc, int n_cols, int nq, int nk, int kv_off) {      \
    int row = 8 * get_global_id(0);                                                            \
    if (row >= nq + 2 * nk) return;                                                            \
    blk_t w = row < nq ? Wq : row < nq + nk ? Wk : Wv;                                         \
    global float* y = row < nq ? q : (row < nq + nk ? kc : vc) + kv_off;                       \
    row = row < nq ? row : row < nq + nk ? row - nq : row - nq - nk;                           \
    const global int* XS = (const global int*)(XD + n_cols / 32);                              \
    blk_t b = w + (row / 8) * X8_GROUP_BYTES(T, n_cols);                                       \
    v8sf_x8 acc = SPLATF_X8(0.0f);                                                             \
    for (int c = 0; c < n_cols / X8_COLS_##T; c++, b += X8_BLOCK_##T)                          \
        X8_STEP_##T(acc, b, c, XQ, XD, XS)                                                     \
    x8_store(y + row, acc, 0);                                                                 \
}

// out[t, :] = row tokens[t] of an interleaved matrix as float32, bit-exact as get_rows_<T>
// (an untied or tied head is also the embedding table). Global (n_cols / 32, n_tok).
inline float x8_weight_q4_0(blk_t b, int j, int i) {  // weight i (0-31) of row j
    const uchar q = b[16 + 32 * (i % 16 / 4) + 4 * j + i % 4];
    return (float)((i < 16 ? q & 15 : q >> 4) - 8);
}
inline float x8_weight_q5_0(blk_t b, int j, int i) {
    const uchar q = b[48 + 32 * (i % 16 / 4) + 4 * j + i % 4];
    const uint qh = *(const global uint*)(b + 16 + 4 * j);
    return (float)((int)((i < 16 ? q & 15 : q >> 4) | (qh >> i & 1) << 4) - 16);
}
inline float x8_weight_q8_0(blk_t b, int j, int i) {
    return (float)((const global char*)b)[16 + 32 * (i / 4) + 4 * j + i % 4];
}
#define X8_GET_ROWS_KERNEL(T)                                                                  \
kernel void get_rows_##T##x8(blk_t W, const global int* tokens, global float* out,            \
                             int n_cols) {                                                     \
    const int c = get_global_id(0), t = get_global_id(1), r = tokens[t], j = r % 8;            \
    blk_t b = W + ((size_t)(r / 8) * (n_cols / 32) + c) * X8_BLOCK_##T;                        \
    const float d = f16(b, j);                                                                 \
    global float* o = out + (size_t)t * n_cols + 32 * c;                                       \
    for (int i = 0; i < 32; i++) o[i] = d * x8_weight_##T(b, j, i);                            \
}

// Prefill: a group's 8 rows x TILE_N tokens a work-item; a block's weights are unpacked once
// and used for every token of the tile. Global (n_rows / 8 rounded up, ceil(n_tok / TILE_N)).
#define X8_GEMM_KERNEL(T)                                                                      \
kernel void qgemm_##T##x8(blk_t W, const global char* XQ, const global float* XD,             \
                          global float* Y, int n_cols, int n_rows, int n_tok, int y_stride,    \
                          int y_off, int accumulate) {                                         \
    const int g = get_global_id(0), t0 = get_global_id(1) * TILE_N, nb = n_cols / 32;          \
    if (8 * g >= n_rows) return;                                                               \
    const global char* x[TILE_N];                                                              \
    const global float* d[TILE_N];                                                             \
    const global int* xs[TILE_N];                                                              \
    v8sf_x8 acc[TILE_N];                                                                       \
    _Pragma("unroll") for (int t = 0; t < TILE_N; t++) {                                       \
        const int r = min(t0 + t, n_tok - 1);                                                  \
        x[t] = XQ + (size_t)r * n_cols; d[t] = XD + (size_t)r * nb; acc[t] = SPLATF_X8(0.0f);  \
        xs[t] = (const global int*)(XD + (size_t)n_tok * nb) + (size_t)r * nb;                 \
    }                                                                                          \
    blk_t b = W + (size_t)g * nb * X8_BLOCK_##T;                                               \
    for (int c = 0; c < nb; c++, b += X8_BLOCK_##T) {                                          \
        v32qi w[8];                                                                            \
        x8_weights_##T(b, w);                                                                  \
        const v8sf_x8 dw = x8_scales(b);                                                       \
        _Pragma("unroll") for (int t = 0; t < TILE_N; t++) {                                   \
            const global char* xc = x[t] + 32 * c;                                             \
            acc[t] += (dw * SPLATF_X8(d[t][c])) *                                              \
                __builtin_convertvector(x8_dot_##T(w, xc, X8_OFFSET_##T(xs[t][c])), v8sf_x8);  \
        }                                                                                      \
    }                                                                                          \
    for (int t = 0; t < TILE_N && t0 + t < n_tok; t++)                                         \
        x8_store(Y + y_off + (size_t)(t0 + t) * y_stride + 8 * g, acc[t], accumulate);         \
}

#define X8_FORMAT(T) X8_GEMV_KERNEL(T) X8_GLU_KERNEL(T) X8_QKV_KERNEL(T) X8_GET_ROWS_KERNEL(T) \
    X8_GEMM_KERNEL(T)
X8_FORMAT(q4_0)
X8_FORMAT(q8_0)
X8_FORMAT(q5_0)

// The K formats' embedding rows, bit-exact as get_rows_<T>: block c of row r is sub-block
// c % 8 of super-block c / 8; byte n of the row's scales (or of its qs, its qh) is byte n % 4
// of its dword in chunk n / 4. Weight i of sub-block j of row r (r % 8 of the group), unsigned.
inline uchar x8_byte(blk_t chunks, int r, int n) {
    return chunks[32 * (n >> 2) + 4 * (r % 8) + (n & 3)];
}
inline uchar x8_weight_q4_k(blk_t b, int r, int j, int i) {
    return x8_byte(b + 128, r, 32 * (j >> 1) + i) >> 4 * (j & 1) & 15;
}
inline uchar x8_weight_q5_k(blk_t b, int r, int j, int i) {
    return (x8_byte(b + 384, r, 32 * (j >> 1) + i) >> 4 * (j & 1) & 15) |
           (x8_byte(b + 128, r, i) >> j & 1) << 4;
}
#define X8_SCALE_BYTE(n) x8_byte(b + 32, r, n)  // of row r of the super-block at b
#define X8_K45_GET_ROWS_KERNEL(T)                                                              \
kernel void get_rows_##T##x8(blk_t W, const global int* tokens, global float* out,            \
                             int n_cols) {                                                     \
    const int c = get_global_id(0), t = get_global_id(1), r = tokens[t], j = c % 8;            \
    blk_t b = W + (r / 8) * X8_GROUP_BYTES(T, n_cols) + (size_t)(c / 8) * X8_BLOCK_##T;        \
    float sc, m;                                                                               \
    SCALE_MIN_K4(X8_SCALE_BYTE, j, sc, m)                                                      \
    const float d = f16(b, r % 8) * sc, mn = -(f16(b + 16, r % 8) * m);                        \
    global float* o = out + (size_t)t * n_cols + 32 * c;                                       \
    for (int i = 0; i < 32; i++) o[i] = d * (float)x8_weight_##T(b, r, j, i) + mn;             \
}
// Prefill without VNNI: a group's 8 rows x TILE_N tokens a work-item, a super-block at a time.
#define X8_KGEMM_KERNEL(T)                                                                     \
kernel void qgemm_##T##x8(blk_t W, const global char* XQ, const global float* XD,             \
                          global float* Y, int n_cols, int n_rows, int n_tok, int y_stride,    \
                          int y_off, int accumulate) {                                         \
    const int g = get_global_id(0), t0 = get_global_id(1) * TILE_N, nb = n_cols / 32;          \
    if (8 * g >= n_rows) return;                                                               \
    v8sf_x8 acc[TILE_N];                                                                       \
    _Pragma("unroll") for (int t = 0; t < TILE_N; t++) acc[t] = SPLATF_X8(0.0f);               \
    blk_t b = W + g * X8_GROUP_BYTES(T, n_cols);                                               \
    for (int c = 0; c < n_cols / 256; c++, b += X8_BLOCK_##T)                                  \
        _Pragma("unroll") for (int t = 0; t < TILE_N; t++) {                                   \
            const int r = min(t0 + t, n_tok - 1);                                              \
            const global int* xs = (const global int*)(XD + (size_t)n_tok * nb) + (size_t)r * nb; \
            acc[t] = x8_acc_##T(acc[t], b, XQ + (size_t)r * n_cols + 256 * c,                  \
                                XD + (size_t)r * nb + 8 * c, xs + 8 * c);                      \
        }                                                                                      \
    for (int t = 0; t < TILE_N && t0 + t < n_tok; t++)                                         \
        x8_store(Y + y_off + (size_t)(t0 + t) * y_stride + 8 * g, acc[t], accumulate);         \
}
#define X8_KFORMAT(T) X8_GEMV_KERNEL(T) X8_GLU_KERNEL(T) X8_QKV_KERNEL(T)                      \
    X8_K45_GET_ROWS_KERNEL(T) X8_KGEMM_KERNEL(T)
X8_KFORMAT(q4_k)
X8_KFORMAT(q5_k)
#endif

// ---- Prefill with AVX-512 VNNI (x86 CPUs that have it; the build defines VNNI 1 only there,
// see opencl_kernels.host_has_vnni) ----
// A work-item computes 8 rows x QT_TOK tokens with the rows in the 8 lanes of a register, as
// llama.cpp's repacked Q4_0 GEMM does, but without repacking the file: each block of the 8
// rows is transposed in registers once (lane j, register k = bytes 4k..4k+3 of row j) and then
// used for every token of the tile. One `vpdpbusd` (4 u8 x s8 products summed into each int32
// lane) per 4 bytes of x, broadcast from memory, gives a block's 8 row dot products after 8
// instructions (Q8_0) with no horizontal sums; one convert and one FMA scale them. vpdpbusd
// wants its register operand unsigned, so the weights go in offset: Q4_0 as its raw nibbles
// (q + 8), Q5_0 as its raw 5 bits (q + 16), Q8_0 as q + 128 (an xor of the sign bit), and the
// accumulator starts at -K * sum(x) of the token's block (K = 8, 16 or 128): the same integers
// as the signed product, exactly.
// Scale and sum order per (row, token) is numpy's blocks in turn, as qgemm's.
#if defined(__AVX2__) && UNALIGNED && defined(VNNI) && VNNI
#define QT_TOK 8
typedef int v8si_u __attribute__((vector_size(32), aligned(1)));
typedef int v4si_u __attribute__((vector_size(16), aligned(1)));
typedef float v8sf __attribute__((vector_size(32)));
typedef short v8hi_t __attribute__((vector_size(16)));
#define VNNI_FN __attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni,f16c")))
#define SPLAT8(v) ((v8si){v, v, v, v, v, v, v, v})
#define SPLATF(v) ((v8sf){v, v, v, v, v, v, v, v})

// 8 rows' f16 at byte `at` of each as float lanes: block c's scales are at c * its bytes.
VNNI_FN static v8sf row_scales(const blk_t* w, int at) {
#define H(j) *(const global short*)(w[j] + at)
    const v8hi_t h = {H(0), H(1), H(2), H(3), H(4), H(5), H(6), H(7)};
#undef H
    return __builtin_ia32_vcvtph2ps256(h);
}

// -K * the sums of the 8 tokens' 32 int8 values of a block, token t in lane t (one vpdpbusd
// per token for 4-byte partial sums, then a transposing reduction: 9 shuffles/adds for all 8).
VNNI_FN static v8si neg_ksums_of(const global char* const* x, int c, v8si k) {
    v8si s[8];
    _Pragma("unroll") for (int t = 0; t < 8; t++)
        s[t] = __builtin_ia32_vpdpbusd256(SPLAT8(0), k, *(const global v8si*)(x[t] + 32 * c));
    const v8si h01 = __builtin_ia32_phaddd256(s[0], s[1]), h23 = __builtin_ia32_phaddd256(s[2], s[3]);
    const v8si h45 = __builtin_ia32_phaddd256(s[4], s[5]), h67 = __builtin_ia32_phaddd256(s[6], s[7]);
    const v8si g0 = __builtin_ia32_phaddd256(h01, h23), g1 = __builtin_ia32_phaddd256(h45, h67);
    return -(__builtin_shufflevector(g0, g1, 0, 1, 2, 3, 8, 9, 10, 11) +
             __builtin_shufflevector(g0, g1, 4, 5, 6, 7, 12, 13, 14, 15));
}
VNNI_FN static v8si neg_ksums(const global char* const* x, int c, int k) {
    return neg_ksums_of(x, c, SPLAT8(k * 0x01010101));
}

// The 8 x 8 dword transpose of 8 rows' 32 bytes r[j]: wt[k] lane j = dword k of row j.
VNNI_FN static void transpose8(const v8si* r, v8si* wt) {
    v8si t[8], u[8];
    _Pragma("unroll") for (int j = 0; j < 8; j += 2) {
        t[j] = __builtin_shufflevector(r[j], r[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[j + 1] = __builtin_shufflevector(r[j], r[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    _Pragma("unroll") for (int j = 0; j < 8; j += 4) {
        u[j] = __builtin_shufflevector(t[j], t[j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[j + 1] = __builtin_shufflevector(t[j], t[j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[j + 2] = __builtin_shufflevector(t[j + 1], t[j + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[j + 3] = __builtin_shufflevector(t[j + 1], t[j + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    _Pragma("unroll") for (int k = 0; k < 4; k++) {
        wt[k] = __builtin_shufflevector(u[k], u[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        wt[k + 4] = __builtin_shufflevector(u[k], u[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}
// A Q8_0 block of 8 rows, offset to unsigned (see above).
VNNI_FN static void blocks_q8_0(const blk_t* w, int c, v8si* wt) {
    v8si r[8];
    _Pragma("unroll") for (int j = 0; j < 8; j++) r[j] = *(const global v8si_u*)(w[j] + c * 34 + 2);
    transpose8(r, wt);
    _Pragma("unroll") for (int k = 0; k < 8; k++) wt[k] ^= SPLAT8((int)0x80808080);
}

// A block of nibbles (16 bytes at `at` in each of 8 rows): wt[k] lane j = nibbles of weights
// 4k..4k+3 of row j (k < 4, low nibbles) and 4k-16.. (k >= 4, high nibbles), matching x's
// dword k.
VNNI_FN static void nibble_blocks(const blk_t* w, int at, v8si* wt) {
    v4si r[8];
    v8si p[4], t[4];
    _Pragma("unroll") for (int j = 0; j < 8; j++) r[j] = *(const global v4si_u*)(w[j] + at);
    _Pragma("unroll") for (int j = 0; j < 4; j++) p[j] = __builtin_shufflevector(r[j], r[j + 4], 0, 1, 2, 3, 4, 5, 6, 7);
    _Pragma("unroll") for (int j = 0; j < 4; j += 2) {
        t[j] = __builtin_shufflevector(p[j], p[j + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[j + 1] = __builtin_shufflevector(p[j], p[j + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    const v8si u[4] = {__builtin_shufflevector(t[0], t[2], 0, 1, 8, 9, 4, 5, 12, 13),
                       __builtin_shufflevector(t[0], t[2], 2, 3, 10, 11, 6, 7, 14, 15),
                       __builtin_shufflevector(t[1], t[3], 0, 1, 8, 9, 4, 5, 12, 13),
                       __builtin_shufflevector(t[1], t[3], 2, 3, 10, 11, 6, 7, 14, 15)};
    const v8si lo = SPLAT8(0x0f0f0f0f);
    _Pragma("unroll") for (int k = 0; k < 4; k++) { wt[k] = u[k] & lo; wt[k + 4] = (u[k] >> 4) & lo; }
}
VNNI_FN static void blocks_q4_0(const blk_t* w, int c, v8si* wt) { nibble_blocks(w, c * 18 + 2, wt); }
// Q5_0: Q4_0's nibbles plus each weight's 5th bit (bit i of the row's qh is weight i's), by
// BITS5 of the 8 rows' qh words, a row a lane.
VNNI_FN static void blocks_q5_0(const blk_t* w, int c, v8si* wt) {
    nibble_blocks(w, c * 22 + 6, wt);
#define QH(j) (int)*(const global uint_u*)(w[j] + c * 22 + 2)
    const v8si h = {QH(0), QH(1), QH(2), QH(3), QH(4), QH(5), QH(6), QH(7)};
#undef QH
    _Pragma("unroll") for (int k = 0; k < 8; k++)
        wt[k] |= BITS5(h, k);
}

// The tile's tokens: their activation rows and scales, accumulators at 0 (a tile past the last
// token reads the last token again; its sums are not stored).
VNNI_FN static void tile_tokens(const global char* XQ, const global float* XD, int n_cols,
                                int n_tok, int t0, const global char** x,
                                const global float** d, v8sf* acc) {
    _Pragma("unroll") for (int t = 0; t < QT_TOK; t++) {
        const int r = min(t0 + t, n_tok - 1);
        x[t] = XQ + (size_t)r * n_cols; d[t] = XD + (size_t)r * (n_cols / 32); acc[t] = SPLATF(0.0f);
    }
}
// acc[t] += block c's 8 row dot products with token t, for every token of the tile: wt the
// block's 8 registers (lane j: row j), dw the rows' scales, K the weights' offset (see above).
VNNI_FN static void tile_block(const v8si* wt, v8sf dw, const global char* const* x,
                               const global float* const* d, int c, int k, v8sf* acc) {
    const v8si nks = neg_ksums(x, c, k);
    _Pragma("unroll") for (int t = 0; t < QT_TOK; t++) {
        const global int* xi = (const global int*)(x[t] + 32 * c);
        v8si s = __builtin_ia32_permvarsi256(nks, SPLAT8(t));
        _Pragma("unroll") for (int j = 0; j < 8; j++)
            s = __builtin_ia32_vpdpbusd256(s, wt[j], SPLAT8(xi[j]));
        acc[t] += (dw * SPLATF(d[t][c])) * __builtin_convertvector(s, v8sf);
    }
}

// A block's step of the tile: the 8 rows' block c as registers, then every token's products.
#define QTILE_STEP(T, BS, K)                                                                   \
VNNI_FN static void qtile_step_##T(const blk_t* w, int c, const global char* const* x,        \
                                   const global float* const* d, v8sf* acc) {                  \
    v8si wt[8];                                                                                \
    blocks_##T(w, c, wt);                                                                      \
    tile_block(wt, row_scales(w, c * BS), x, d, c, K, acc);                                    \
}
#define QGEMM8_TILE(T)                                                                         \
VNNI_FN static void qtile_##T(blk_t W, const global char* XQ, const global float* XD,         \
                              global float* Y, int n_cols, int n_rows, int n_tok,              \
                              int row_bytes, int y_stride, int y_off, int accumulate,          \
                              int row0, int t0) {                                              \
    blk_t w[8]; /* rows past the last read the last row again; their lanes are not stored */  \
    const global char* x[QT_TOK];                                                              \
    const global float* d[QT_TOK];                                                             \
    v8sf acc[QT_TOK];                                                                          \
    _Pragma("unroll") for (int j = 0; j < 8; j++)                                              \
        w[j] = W + (size_t)min(row0 + j, n_rows - 1) * row_bytes;                              \
    tile_tokens(XQ, XD, n_cols, n_tok, t0, x, d, acc);                                         \
    for (int c = 0; c < n_cols / 32; c++) qtile_step_##T(w, c, x, d, acc);                     \
    for (int t = 0; t < QT_TOK && t0 + t < n_tok; t++)                                         \
        for (int j = 0; j < 8 && row0 + j < n_rows; j++) {                                     \
            global float* y = Y + y_off + (size_t)(t0 + t) * y_stride + row0 + j;              \
            *y = acc[t][j] + (accumulate ? *y : 0.0f);                                         \
        }                                                                                      \
}                                                                                              \
kernel void qgemm8_##T(blk_t W, const global char* XQ, const global float* XD,                \
                       global float* Y, int n_cols, int n_rows, int n_tok, int row_bytes,      \
                       int y_stride, int y_off, int accumulate) {                              \
    if (get_global_id(0) * 8 >= n_rows) return;                                                \
    qtile_##T(W, XQ, XD, Y, n_cols, n_rows, n_tok, row_bytes, y_stride, y_off, accumulate,    \
              get_global_id(0) * 8, get_global_id(1) * QT_TOK);                                \
}
QTILE_STEP(q8_0, 34, 128)
QTILE_STEP(q4_0, 18, 8)
QTILE_STEP(q5_0, 22, 16)
QGEMM8_TILE(q8_0)
QGEMM8_TILE(q4_0)
QGEMM8_TILE(q5_0)

// Q6_K (file layout): block c of 8 rows as their unsigned weights (q + 32, transposed as
// Q8_0's); a block's two halves of 16 weights have their own int8 scales, so each half's dot
// product starts at -32 * the sum of its 16 x (neg_ksums_of with 32 in each byte of the
// half's 4 dwords only) and the two are scaled in integers: the block's exact integer product,
// scaled once by (d_w * d_x) as qacc_q6_k's blocks are (which sum the same integers in
// another order).
VNNI_FN static void qtile_step_q6_k(const blk_t* w, int c, const global char* const* x,
                                    const global float* const* d, v8sf* acc) {
    const v8si k32_lo = {0x20202020, 0x20202020, 0x20202020, 0x20202020, 0, 0, 0, 0};
    const v8si k32_hi = {0, 0, 0, 0, 0x20202020, 0x20202020, 0x20202020, 0x20202020};
    const int sb = 210 * (c >> 3), k = c & 7;
    v8si r[8], wt[8];
    _Pragma("unroll") for (int j = 0; j < 8; j++) r[j] = (v8si)q6k_weights(w[j] + sb, k);
    transpose8(r, wt);
#define SC(j, h) (int)((const global char*)w[j])[sb + 192 + 2 * k + (h)]
#define SCALES(h) {SC(0, h), SC(1, h), SC(2, h), SC(3, h), SC(4, h), SC(5, h), SC(6, h), SC(7, h)}
    const v8si sc_lo = SCALES(0), sc_hi = SCALES(1);
#undef SCALES
#undef SC
    const v8sf dw = row_scales(w, sb + 208);
    const v8si nlo = neg_ksums_of(x, c, k32_lo), nhi = neg_ksums_of(x, c, k32_hi);
    _Pragma("unroll") for (int t = 0; t < QT_TOK; t++) {
        const global int* xi = (const global int*)(x[t] + 32 * c);
        v8si lo = __builtin_ia32_permvarsi256(nlo, SPLAT8(t));
        v8si hi = __builtin_ia32_permvarsi256(nhi, SPLAT8(t));
        _Pragma("unroll") for (int q = 0; q < 4; q++) {
            lo = __builtin_ia32_vpdpbusd256(lo, wt[q], SPLAT8(xi[q]));
            hi = __builtin_ia32_vpdpbusd256(hi, wt[4 + q], SPLAT8(xi[4 + q]));
        }
        const v8si dot = sc_lo * lo + sc_hi * hi;
        acc[t] += (dw * SPLATF(d[t][c])) * __builtin_convertvector(dot, v8sf);
    }
}
QGEMM8_TILE(q6_k)

// The same tile over interleaved matrices (resident Q4_0/Q5_0/Q8_0; Q4_K below): a block of
// the group is already lane j = row j, so its registers are x8_weights_<T>'s with no transpose
// (Q8_0's signed bytes offset by 128, as above). Global (n_rows / 8 rounded up to the
// work-group, ceil(n_tok / QT_TOK)).
#define X8_VNNI_q8_0(w) ((w) ^ (char)-128)
#define X8_VNNI_q4_0(w) (w)
#define X8_VNNI_q5_0(w) (w)
#define QGEMM8_X8_KERNEL(T, K)                                                                 \
VNNI_FN static void qtile_##T##x8(blk_t W, const global char* XQ, const global float* XD,     \
                                  global float* Y, int n_cols, int n_tok, int y_stride,        \
                                  int y_off, int accumulate, int g, int t0) {                  \
    const int nb = n_cols / 32;                                                                \
    const global char* x[QT_TOK];                                                              \
    const global float* d[QT_TOK];                                                             \
    v8sf acc[QT_TOK];                                                                          \
    tile_tokens(XQ, XD, n_cols, n_tok, t0, x, d, acc);                                         \
    blk_t b = W + (size_t)g * nb * X8_BLOCK_##T;                                               \
    for (int c = 0; c < nb; c++, b += X8_BLOCK_##T) {                                          \
        v32qi w[8];                                                                            \
        v8si wt[8];                                                                            \
        x8_weights_##T(b, w);                                                                  \
        _Pragma("unroll") for (int k = 0; k < 8; k++) wt[k] = (v8si)X8_VNNI_##T(w[k]);         \
        tile_block(wt, x8_scales(b), x, d, c, K, acc);                                         \
    }                                                                                          \
    for (int t = 0; t < QT_TOK && t0 + t < n_tok; t++)                                         \
        x8_store(Y + y_off + (size_t)(t0 + t) * y_stride + 8 * g, acc[t], accumulate);         \
}                                                                                              \
kernel void qgemm8_##T##x8(blk_t W, const global char* XQ, const global float* XD,            \
                           global float* Y, int n_cols, int n_rows, int n_tok, int y_stride,   \
                           int y_off, int accumulate) {                                        \
    if (get_global_id(0) * 8 >= n_rows) return;                                                \
    qtile_##T##x8(W, XQ, XD, Y, n_cols, n_tok, y_stride, y_off, accumulate, get_global_id(0),  \
                  get_global_id(1) * QT_TOK);                                                  \
}
QGEMM8_X8_KERNEL(q8_0, 128)
QGEMM8_X8_KERNEL(q4_0, 8)
QGEMM8_X8_KERNEL(q5_0, 16)

// Interleaved Q4_K and Q5_K (q5: which): per super-block, each token's mins term first (the 8
// sub-blocks' mins kept in registers for all tokens), then sub-block by sub-block its weights
// as registers for every token of the tile; the terms in qacc_q4_k's order.
VNNI_FN static inline __attribute__((always_inline)) void
qtile_k45x8(blk_t W, const global char* XQ, const global float* XD, global float* Y, int n_cols,
            int n_tok, int y_stride, int y_off, int accumulate, int g, int t0, const int q5) {
    const int block = q5 ? X8_BLOCK_q5_k : X8_BLOCK_q4_k;
    const int nb = n_cols / 32;
    const global char* x[QT_TOK];
    const global float* d[QT_TOK];
    const global int* xs[QT_TOK];
    v8sf acc[QT_TOK];
    tile_tokens(XQ, XD, n_cols, n_tok, t0, x, d, acc);
    _Pragma("unroll") for (int t = 0; t < QT_TOK; t++)
        xs[t] = (const global int*)(XD + (size_t)n_tok * nb) + (size_t)min(t0 + t, n_tok - 1) * nb;
    blk_t b = W + (size_t)g * (n_cols / 256) * block;
    for (int c = 0; c < nb; c += 8, b += block) {
        v8sf sa[QT_TOK];  // first the mins term, then the scaled dots: no scale held across
        _Pragma("unroll") for (int t = 0; t < QT_TOK; t++) sa[t] = SPLATF(0.0f);
        _Pragma("unroll") for (int j = 0; j < 8; j++) {
            v8sf_x8 sc, m;
            x8_scale_min_k4(b, j, &sc, &m);
            _Pragma("unroll") for (int t = 0; t < QT_TOK; t++)
                sa[t] += SPLATF(d[t][c + j]) * (m * SPLATF((float)xs[t][c + j]));
        }
        const v8sf dmin = x8_scales(b + 16), dw = x8_scales(b);
        _Pragma("unroll") for (int t = 0; t < QT_TOK; t++) {
            acc[t] -= dmin * sa[t];
            sa[t] = SPLATF(0.0f);
        }
        _Pragma("unroll") for (int j = 0; j < 8; j++) {
            v8sf_x8 sc, m;
            x8_scale_min_k4(b, j, &sc, &m);
            v8si wt[8];
            _Pragma("unroll") for (int k = 0; k < 8; k++)
                wt[k] = (v8si)(q5 ? x8_weights_q5_k(b, j, k) : x8_weights_q4_k(b, j, k));
            _Pragma("unroll") for (int t = 0; t < QT_TOK; t++) {
                const global int* xi = (const global int*)(x[t] + 32 * (c + j));
                v8si s = SPLAT8(0);
                _Pragma("unroll") for (int k = 0; k < 8; k++)
                    s = __builtin_ia32_vpdpbusd256(s, wt[k], SPLAT8(xi[k]));
                sa[t] += SPLATF(d[t][c + j]) * (sc * __builtin_convertvector(s, v8sf));
            }
        }
        _Pragma("unroll") for (int t = 0; t < QT_TOK; t++) acc[t] += dw * sa[t];
    }
    for (int t = 0; t < QT_TOK && t0 + t < n_tok; t++)
        x8_store(Y + y_off + (size_t)(t0 + t) * y_stride + 8 * g, acc[t], accumulate);
}
// The kernel calls a VNNI_FN function, never inlines one: where PoCL compiles kernels for a
// target without AVX-512 (its LLVM names Zen 4 znver3), an always_inline VNNI_FN body in the
// kernel itself fails to build.
#define QGEMM8_K45_KERNEL(T, Q5)                                                               \
VNNI_FN static void qtile_##T##x8(blk_t W, const global char* XQ, const global float* XD,     \
                                  global float* Y, int n_cols, int n_tok, int y_stride,        \
                                  int y_off, int accumulate, int g, int t0) {                  \
    qtile_k45x8(W, XQ, XD, Y, n_cols, n_tok, y_stride, y_off, accumulate, g, t0, Q5);         \
}                                                                                              \
kernel void qgemm8_##T##x8(blk_t W, const global char* XQ, const global float* XD,            \
                           global float* Y, int n_cols, int n_rows, int n_tok, int y_stride,   \
                           int y_off, int accumulate) {                                        \
    if (get_global_id(0) * 8 >= n_rows) return;                                                \
    qtile_##T##x8(W, XQ, XD, Y, n_cols, n_tok, y_stride, y_off, accumulate, get_global_id(0), \
                  get_global_id(1) * QT_TOK);                                                  \
}
QGEMM8_K45_KERNEL(q4_k, 0)
QGEMM8_K45_KERNEL(q5_k, 1)
#endif
