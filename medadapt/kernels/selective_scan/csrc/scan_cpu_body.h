/* Body of scan_cpu.c for one floating type: REAL, its LANES-wide vector VEC, FN(name) names the
 * functions; EXP2 (2^v), SOFTPLUS, SIGMOID work lane-wise, HSUM(v) sums the lanes. Blocks are [step] VECs. */

/* Which channels a tile covers: batch row b, first channel d0, w <= LANES channels. */
static void FN(tile_of)(int64_t tile, int64_t dim, int64_t seg, int64_t *b, int64_t *d0, int64_t *w) {
    int64_t per_seg = (seg + LANES - 1) / LANES, per_row = (dim / seg) * per_seg;
    int64_t rem = tile % per_row, j = rem % per_seg;
    *b = tile / per_row;
    *d0 = (rem / per_seg) * seg + j * LANES;
    *w = seg - j * LANES < LANES ? seg - j * LANES : LANES;
}

/* Steps [t0, t0 + tb) of w rows (stride len) as tb vectors; lanes >= w are zero. */
static void FN(load_block)(const REAL *src, int64_t len, int64_t t0, int64_t tb, int64_t w, VEC *dst) {
    memset(dst, 0, sizeof(VEC) * TBLK);
    for (int64_t k = 0; k < w; ++k)
        for (int64_t t = 0; t < tb; ++t) dst[t][k] = src[k * len + t0 + t];
}

/* Step sizes of a block: raw delta plus the channel bias, through softplus when asked; with pre != NULL
 * also the factor d dt / d delta (sigmoid of the pre-activation, or 1). */
static void FN(load_steps)(const REAL *delta, const VEC *bias, int softplus, int64_t len, int64_t t0, int64_t tb,
                           int64_t w, VEC *dt, VEC *slope) {
    FN(load_block)(delta, len, t0, tb, w, dt);
    for (int64_t t = 0; t < tb; ++t) {
        const VEC x = dt[t] + *bias;
        dt[t] = softplus ? SOFTPLUS(x) : x;
        if (slope != NULL) slope[t] = softplus ? SIGMOID(x) : (VEC){0} + 1;
    }
}

static void FN(store_block)(const VEC *src, int64_t len, int64_t t0, int64_t tb, int64_t w, REAL *dst) {
    for (int64_t k = 0; k < w; ++k)
        for (int64_t t = 0; t < tb; ++t) dst[k * len + t0 + t] = src[t][k];
}

/* w rows of (.., N) (A, or a state) as N vectors; zeros where src is NULL or lanes >= w. */
static void FN(load_lanes)(const REAL *src, int64_t nst, int64_t w, VEC *dst) {
    memset(dst, 0, sizeof(VEC) * nst);
    if (src == NULL) return;
    for (int64_t k = 0; k < w; ++k)
        for (int64_t n = 0; n < nst; ++n) dst[n][k] = src[k * nst + n];
}

static void FN(store_lanes)(const VEC *src, int64_t nst, int64_t w, REAL *dst) {
    for (int64_t k = 0; k < w; ++k)
        for (int64_t n = 0; n < nst; ++n) dst[k * nst + n] = src[n][k];
}

/* One chunk of the recurrence on h (N vectors): y[t] = sum_n C h (y may be NULL). Al2 is A log2(e), so
 * e^{dt A} = 2^{dt Al2}. With hs, as != NULL the states and decays of every step are kept ([tb][N]
 * vectors) for the backward. */
static void FN(chunk_forward)(VEC *restrict h, const VEC *restrict Al2, const VEC *restrict dl,
                              const VEC *restrict uu, const REAL *restrict pB, const REAL *restrict pC,
                              int64_t len, int64_t nst, int64_t t0, int64_t tb, VEC *restrict y,
                              VEC *restrict hs, VEC *restrict as) {
    for (int64_t t = 0; t < tb; ++t) {
        const VEC d = dl[t], du = dl[t] * uu[t];
        VEC acc = {0};
        if (hs == NULL) {
            for (int64_t n = 0; n < nst; ++n) {
                const VEC a = EXP2(d * Al2[n]);
                h[n] = a * h[n] + du * pB[n * len + t0 + t];
                acc += pC[n * len + t0 + t] * h[n];
            }
        } else {
            for (int64_t n = 0; n < nst; ++n) {
                const VEC a = EXP2(d * Al2[n]);
                h[n] = a * h[n] + du * pB[n * len + t0 + t];
                acc += pC[n * len + t0 + t] * h[n];
                as[t * nst + n] = a;
                hs[t * nst + n] = h[n];
            }
        }
        if (y != NULL) y[t] = acc;
    }
}

/* Reverse steps of one chunk. dh holds e^{dt_{t+1} A} dh_{t+1} on entry to step t (the last state's
 * gradient at the end of the sequence) and e^{dt_0 A} dh_0 of the chunk on return. gy: gradient of
 * y = sum_n C h; writes gu = dt sum_n dh B and gd = u sum_n dh B + sum_n dh A e^{dt A} h_{t-1}. */
static void FN(chunk_backward)(VEC *restrict dh, VEC *restrict dAl, const VEC *restrict Al,
                               const VEC *restrict dl, const VEC *restrict uu, const VEC *restrict gy,
                               const VEC *restrict hs, const VEC *restrict as, const VEC *restrict h_before,
                               const REAL *restrict pB, const REAL *restrict pC, REAL *restrict pdB,
                               REAL *restrict pdC, int64_t len, int64_t nst, int64_t t0, int64_t tb,
                               VEC *restrict gu, VEC *restrict gd) {
    for (int64_t t = tb - 1; t >= 0; --t) {
        const VEC d = dl[t], dut = dl[t] * uu[t], dyt = gy[t];
        const VEC *hprev = t > 0 ? hs + (t - 1) * nst : h_before;
        VEC s1 = {0}, sdel = {0};
        for (int64_t n = 0; n < nst; ++n) {
            const REAL bt = pB[n * len + t0 + t], ct = pC[n * len + t0 + t];
            const VEC a = as[t * nst + n];
            const VEC g = dh[n] + ct * dyt; /* dh_t */
            const VEC q = g * a * hprev[n]; /* dh_t e^{dt A} h_{t-1} */
            pdC[n * len + t0 + t] += HSUM(dyt * hs[t * nst + n]);
            pdB[n * len + t0 + t] += HSUM(g * dut);
            s1 += g * bt;
            sdel += q * Al[n];
            dAl[n] += q * d;
            dh[n] = a * g;
        }
        gu[t] = d * s1;
        gd[t] = uu[t] * s1 + sdel;
    }
}

static void *FN(alloc_vecs)(int64_t count) {
    void *p = NULL;
    return posix_memalign(&p, 64, sizeof(VEC) * (size_t)count) == 0 ? p : NULL;
}

/* Per-tile setup shared by forward and backward: channels, B/C offsets; A, A log2(e), bias and D as
 * vectors. */
struct FN(tile) { int64_t row, w, offB, offC; };

static struct FN(tile) FN(tile_setup)(int64_t tile, const REAL *A, const REAL *bias, const REAL *Dskip,
                                      int64_t dim, int64_t len, int64_t nst, int64_t gb, int64_t gc, int64_t seg,
                                      VEC *Al, VEC *Al2, VEC *bl, VEC *Dl) {
    int64_t b, d0, w;
    FN(tile_of)(tile, dim, seg, &b, &d0, &w);
    struct FN(tile) tl = {b * dim + d0, w, (b * gb + d0 / (dim / gb)) * nst * len, (b * gc + d0 / (dim / gc)) * nst * len};
    FN(load_lanes)(A + d0 * nst, nst, w, Al);
    for (int64_t n = 0; n < nst; ++n) Al2[n] = Al[n] * (REAL)1.4426950408889634;
    FN(load_lanes)(bias == NULL ? NULL : bias + d0, 1, w, bl);
    FN(load_lanes)(Dskip == NULL ? NULL : Dskip + d0, 1, w, Dl);
    return tl;
}

/* The inputs of one chunk as [step] vectors: dt (and d dt / d delta when slope != NULL), u, z. */
struct FN(chunk_io) { const REAL *u, *delta, *z; int64_t softplus; };

static void FN(load_chunk)(struct FN(chunk_io) io, const VEC *bl, int64_t row, int64_t len, int64_t t0, int64_t tb,
                           int64_t w, VEC *dl, VEC *slope, VEC *uu, VEC *zz) {
    FN(load_steps)(io.delta + row * len, bl, (int)io.softplus, len, t0, tb, w, dl, slope);
    FN(load_block)(io.u + row * len, len, t0, tb, w, uu);
    if (io.z != NULL) FN(load_block)(io.z + row * len, len, t0, tb, w, zz);
}

/* Forward. u, delta, z (or NULL), out: (batch, dim, len); bias, Dskip (or NULL): (dim,); A: (dim, N);
 * Bm: (batch, gb, N, len); Cm: (batch, gc, N, len); h0 (or NULL), hlast: (batch, dim, N); ckpt (or
 * NULL): (tiles, chunks, N, LANES), the state before every chunk. out = (y + D u) silu(z). seg: channels
 * between B/C group boundaries (gcd of dim/gb, dim/gc). Returns 0, or 1 when out of memory. */
int FN(scan_fwd)(const REAL *u, const REAL *delta, const REAL *bias, int64_t softplus, const REAL *A,
                 const REAL *Bm, const REAL *Cm, const REAL *Dskip, const REAL *z, const REAL *h0, REAL *out,
                 REAL *hlast, REAL *ckpt, int64_t dim, int64_t len, int64_t nst, int64_t gb, int64_t gc, int64_t seg,
                 int64_t tile_begin, int64_t tile_end) {
    const int64_t chunks = (len + TBLK - 1) / TBLK;
    const struct FN(chunk_io) io = {u, delta, z, softplus};
    VEC *buf = FN(alloc_vecs)(3 * nst + 2 + 4 * TBLK);
    if (buf == NULL) return 1;
    VEC *h = buf, *Al = h + nst, *Al2 = Al + nst, *bl = Al2 + nst, *Dl = bl + 1, *dl = Dl + 1, *uu = dl + TBLK, *zz = uu + TBLK;
    VEC *yy = zz + TBLK;
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        struct FN(tile) tl = FN(tile_setup)(tile, A, bias, Dskip, dim, len, nst, gb, gc, seg, Al, Al2, bl, Dl);
        FN(load_lanes)(h0 == NULL ? NULL : h0 + tl.row * nst, nst, tl.w, h);
        for (int64_t c = 0; c < chunks; ++c) {
            const int64_t t0 = c * TBLK, tb = len - t0 < TBLK ? len - t0 : TBLK;
            if (ckpt != NULL) memcpy((VEC *)ckpt + (tile * chunks + c) * nst, h, sizeof(VEC) * nst);
            FN(load_chunk)(io, bl, tl.row, len, t0, tb, tl.w, dl, NULL, uu, zz);
            FN(chunk_forward)(h, Al2, dl, uu, Bm + tl.offB, Cm + tl.offC, len, nst, t0, tb, yy, NULL, NULL);
            for (int64_t t = 0; t < tb; ++t) {
                yy[t] += *Dl * uu[t];
                if (z != NULL) yy[t] *= zz[t] * SIGMOID(zz[t]);
            }
            FN(store_block)(yy, len, t0, tb, tl.w, out + tl.row * len);
        }
        FN(store_lanes)(h, nst, tl.w, hlast + tl.row * nst);
    }
    free(buf);
    return 0;
}

/* Backward of scan_fwd, from its checkpoints. dout: (batch, dim, len) gradient of out; dlast (or NULL):
 * gradient of hlast. Writes du, ddelta (w.r.t. the raw delta: softplus' applied), dz (if z != NULL):
 * (batch, dim, len); dA_rows (batch, dim, N), dD_rows (batch, dim) (summed over batch by the caller)
 * and dh0 (batch, dim, N); ADDS into dB (batch, gb, N, len) and dC (batch, gc, N, len), which must not
 * be shared with a concurrent call. Returns 0, or 1 when out of memory. */
int FN(scan_bwd)(const REAL *u, const REAL *delta, const REAL *bias, int64_t softplus, const REAL *A,
                 const REAL *Bm, const REAL *Cm, const REAL *Dskip, const REAL *z, const REAL *ckpt, const REAL *dout,
                 const REAL *dlast, REAL *du, REAL *ddelta, REAL *dz, REAL *dA_rows, REAL *dD_rows, REAL *dB,
                 REAL *dC, REAL *dh0, int64_t dim, int64_t len, int64_t nst, int64_t gb, int64_t gc, int64_t seg,
                 int64_t tile_begin, int64_t tile_end) {
    const int64_t chunks = (len + TBLK - 1) / TBLK;
    const struct FN(chunk_io) io = {u, delta, z, softplus};
    VEC *buf = FN(alloc_vecs)(nst * (5 + 2 * TBLK) + 3 + 9 * TBLK);
    if (buf == NULL) return 1;
    VEC *h = buf, *Al = h + nst, *Al2 = Al + nst, *dh = Al2 + nst, *dAl = dh + nst, *bl = dAl + nst, *Dl = bl + 1, *dDl = Dl + 1;
    VEC *hs = dDl + 1, *as = hs + TBLK * nst, *dl = as + TBLK * nst, *slope = dl + TBLK, *uu = slope + TBLK;
    VEC *zz = uu + TBLK, *yy = zz + TBLK, *gy = yy + TBLK, *gu = gy + TBLK, *gd = gu + TBLK, *gz = gd + TBLK;
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        struct FN(tile) tl = FN(tile_setup)(tile, A, bias, Dskip, dim, len, nst, gb, gc, seg, Al, Al2, bl, Dl);
        const VEC *tile_ckpt = (const VEC *)ckpt + tile * chunks * nst;
        FN(load_lanes)(dlast == NULL ? NULL : dlast + tl.row * nst, nst, tl.w, dh);
        memset(dAl, 0, sizeof(VEC) * nst);
        memset(dDl, 0, sizeof(VEC));
        for (int64_t c = chunks - 1; c >= 0; --c) {
            const int64_t t0 = c * TBLK, tb = len - t0 < TBLK ? len - t0 : TBLK;
            FN(load_chunk)(io, bl, tl.row, len, t0, tb, tl.w, dl, slope, uu, zz);
            FN(load_block)(dout + tl.row * len, len, t0, tb, tl.w, gy);
            memcpy(h, tile_ckpt + c * nst, sizeof(VEC) * nst);
            FN(chunk_forward)(h, Al2, dl, uu, Bm + tl.offB, Cm + tl.offC, len, nst, t0, tb, yy, hs, as);
            if (z != NULL) /* out = y' silu(z), y' = y + D u: dy' = dout silu(z), dz = dout y' silu'(z) */
                for (int64_t t = 0; t < tb; ++t) {
                    const VEC sig = SIGMOID(zz[t]);
                    gz[t] = gy[t] * (yy[t] + *Dl * uu[t]) * sig * (1 + zz[t] * (1 - sig));
                    gy[t] *= zz[t] * sig;
                }
            FN(chunk_backward)(dh, dAl, Al, dl, uu, gy, hs, as, tile_ckpt + c * nst, Bm + tl.offB, Cm + tl.offC,
                               dB + tl.offB, dC + tl.offC, len, nst, t0, tb, gu, gd);
            for (int64_t t = 0; t < tb; ++t) {
                gu[t] += *Dl * gy[t];
                *dDl += gy[t] * uu[t];
                gd[t] *= slope[t];
            }
            FN(store_block)(gu, len, t0, tb, tl.w, du + tl.row * len);
            FN(store_block)(gd, len, t0, tb, tl.w, ddelta + tl.row * len);
            if (z != NULL) FN(store_block)(gz, len, t0, tb, tl.w, dz + tl.row * len);
        }
        FN(store_lanes)(dh, nst, tl.w, dh0 + tl.row * nst);
        FN(store_lanes)(dAl, nst, tl.w, dA_rows + tl.row * nst);
        FN(store_lanes)(dDl, 1, tl.w, dD_rows + tl.row);
    }
    free(buf);
    return 0;
}
