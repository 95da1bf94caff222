/* Selective scan (Mamba-1) for CPUs: forward and recomputing backward, float32 and float64.
 *
 *   dt_t = softplus(delta_t + bias)   (or delta_t + bias)
 *   h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t        y_t = sum_n C_t,n h_t,n
 *
 * per channel with state size N. B and C are variable, (batch, G, N, L) contiguous. The skip D and the
 * gate are applied here too, out = (y + D u) silu(z), with their gradients (dD per batch row, summed by
 * the caller; dz). Work is cut into tiles of LANES consecutive channels of one batch row that share
 * their B and C groups; every arithmetic line works on a LANES-wide vector (GCC/Clang vector
 * extensions), one channel per lane. A call handles tiles [tile_begin, tile_end);
 * Python runs calls on disjoint ranges in threads (ctypes releases the GIL). The forward can keep the
 * state before every chunk of TBLK steps (checkpoints, (tiles, chunks, N, LANES)); the backward
 * recomputes each chunk's states from them, so no (batch, dim, L, N) tensor ever exists.
 *
 * scan_cpu_body.h holds the code; it is included once per floating type.
 */
#define _POSIX_C_SOURCE 200112L
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16 /* channels per tile: one AVX-512 / two AVX2 float32 vectors */
#define TBLK 64  /* time steps per chunk (checkpoint interval) */

typedef float vf32 __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vi32 __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef double vf64 __attribute__((vector_size(LANES * sizeof(double))));

/* Where mask (all ones / all zeros per lane) is set, a; elsewhere b. */
static inline vf32 select_f32(vi32 mask, vf32 a, vf32 b) { return (vf32)(((vi32)a & mask) | ((vi32)b & ~mask)); }

/* 2^y lane-wise: 2^i 2^f with i = round(y), |f| <= 1/2, 2^f by a degree-6 polynomial (relative error
 * 3e-9 before rounding). y is clamped to [-126, 127] first, so results below 2^-126 come out as 2^-126
 * (not 0: a decay that small leaves no trace in a float32 state either way) and there is no inf. */
static inline vf32 exp2_f32(vf32 y) {
    y = select_f32(y < -126.0f, (vf32){0} - 126.0f, y);
    y = select_f32(y > 127.0f, (vf32){0} + 127.0f, y);
    const vf32 shifted = y + 12582912.0f; /* 1.5 * 2^23: round(y) lands in the low mantissa bits */
    const vf32 f = y - (shifted - 12582912.0f);
    vf32 p = f * 1.5469731979086965e-4f + 1.3400432165445926e-3f;
    p = p * f + 9.618025602961128e-3f;
    p = p * f + 5.5503272142090276e-2f;
    p = p * f + 2.4022651213595037e-1f;
    p = p * f + 6.931472067106196e-1f;
    p = p * f + 0.9999999999595488f;
    return p * (vf32)(((vi32)shifted + 127) << 23); /* 2^i: the exponent field, built from those bits */
}

static inline vf32 exp_f32(vf32 x) { return exp2_f32(x * 1.4426950408889634f); }

/* log(1 + v) for v in [0, 1]: 2 atanh(s), s = v / (2 + v) <= 1/3, series to s^15 (rel. error 1.5e-9). */
static inline vf32 log1p_unit_f32(vf32 v) {
    vf32 s = v / (v + 2.0f), s2 = s * s;
    vf32 p = s2 * (1.0f / 15) + 1.0f / 13;
    p = p * s2 + 1.0f / 11;
    p = p * s2 + 1.0f / 9;
    p = p * s2 + 1.0f / 7;
    p = p * s2 + 1.0f / 5;
    p = p * s2 + 1.0f / 3;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

/* softplus(x) = max(x, 0) + log(1 + e^{-|x|}), and its derivative sigmoid(x), lane-wise. */
static inline vf32 softplus_f32(vf32 x) {
    vi32 pos = x > 0.0f;
    vf32 ax = select_f32(pos, x, -x);
    return select_f32(pos, x, (vf32){0}) + log1p_unit_f32(exp_f32(-ax));
}

static inline vf32 sigmoid_f32(vf32 x) {
    vi32 pos = x > 0.0f;
    vf32 e = exp_f32(select_f32(pos, -x, x)), r = 1.0f / (1.0f + e);
    return select_f32(pos, r, e * r);
}

static inline float hsum_f32(vf32 v) {
    float s = 0;
    for (int k = 0; k < LANES; ++k) s += v[k];
    return s;
}

/* float64: lane by lane with libm (the float64 build is for tests, not speed). */
static inline vf64 exp2_f64(vf64 x) {
    vf64 r;
    for (int k = 0; k < LANES; ++k) r[k] = exp2(x[k]);
    return r;
}

static inline vf64 softplus_f64(vf64 x) {
    vf64 r;
    for (int k = 0; k < LANES; ++k) r[k] = (x[k] > 0 ? x[k] : 0) + log1p(exp(-fabs(x[k])));
    return r;
}

static inline vf64 sigmoid_f64(vf64 x) {
    vf64 r;
    for (int k = 0; k < LANES; ++k) r[k] = x[k] > 0 ? 1 / (1 + exp(-x[k])) : exp(x[k]) / (1 + exp(x[k]));
    return r;
}

static inline double hsum_f64(vf64 v) {
    double s = 0;
    for (int k = 0; k < LANES; ++k) s += v[k];
    return s;
}

#define REAL float
#define VEC vf32
#define FN(name) name##_f32
#define EXP2(v) exp2_f32(v)
#define SOFTPLUS(v) softplus_f32(v)
#define SIGMOID(v) sigmoid_f32(v)
#define HSUM(v) hsum_f32(v)
#include "scan_cpu_body.h"
#undef REAL
#undef VEC
#undef FN
#undef EXP2
#undef SOFTPLUS
#undef SIGMOID
#undef HSUM

#define REAL double
#define VEC vf64
#define FN(name) name##_f64
#define EXP2(v) exp2_f64(v)
#define SOFTPLUS(v) softplus_f64(v)
#define SIGMOID(v) sigmoid_f64(v)
#define HSUM(v) hsum_f64(v)
#include "scan_cpu_body.h"
