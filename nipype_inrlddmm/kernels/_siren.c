/* The SIREN velocity network's forward and backward passes, fused over tiles of points (AVX-512).
 *
 * Why: run layer by layer, PyTorch makes a dozen passes over (N, width) tensors per layer and Euler
 * step (the product, the bias, the sine, the saved cosine, the gradient's multiplication by it, the
 * bias gradient's sums), each over a fresh (N, width) tensor in memory (6 MB at the fine stage's
 * points), and a dozen small autograd nodes around them.  Those passes, not the products, held the
 * network far below a large matmul's GFLOP/s (figures in docs/decisions.md).  Here a tile
 * of TILE points goes through every layer while it sits in the core's caches: each product is a
 * register-blocked kernel (NR rows x 16 NVMAX columns of accumulators), the bias and the sine are
 * applied to the accumulators before they are stored (forwards), the multiplication by the cosine
 * and the bias gradient's sums as they are stored (backwards).  Only the sine layers'
 * pre-activations are saved for the backward pass, streamed past the caches; it takes their sines
 * and cosines again tile by tile, which costs less than writing and reading both.  forward() and
 * backward() evaluate the network once; flow_forward() and flow_backward() take each tile through
 * every Euler step of flow.integrate (the positions, velocities and kinetic energy too), so a
 * training iteration makes one call each way.  A flow may be windowed (v = w f + (1 - w) c, w read
 * trilinearly from a volume, c the output layer's bias; engine/window.py says why): the window
 * costs a few dozen flops a point and step beside the network's tens of thousands.
 *
 * The network (velocity.py's VelocityField, SIREN encoding): with q = (p - center) / half_extent
 * and tau = 2 t - 1, h_0 = sin(omega0 (W_0 [q, tau] + b_0)), h_l = sin(omega0 (W_l h_{l-1} + b_l)),
 * v = scale (W_o h_{depth-1} + b_o).  Layout, all float32 and C-contiguous:
 *   points  (n, 3)
 *   params  the module's parameters in its order: W_0 (width, 4), b_0, then W_l (width, width), b_l
 *           for each further sine layer, then W_o (out, width), b_o (out); grad the same
 *   v       (n, out)
 *   z       (depth, n, width) the pre-activations saved for the backward pass, 64-byte aligned
 * Inside, omega0, tau and scale are folded into the weights (fold()), and layer 0 takes the 3
 * columns of q.
 *
 * Determinism: a point's forward result does not depend on the tile or thread that computes it.
 * The weight gradients are summed per partition of the points (PARTS fixed, contiguous ranges of
 * tiles, whatever the thread count) and the partitions' sums added in order, so the gradients do
 * not depend on the thread count either.
 *
 * The kernels need AVX-512F; available() says whether this CPU has it.  Elsewhere velocity.py runs
 * the layers through PyTorch.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_sine_poly.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define HAVE_KERNELS 1
#include <immintrin.h>
#else
#define HAVE_KERNELS 0
#endif

/* Points a tile: its (TILE, 96) activations take 24 KiB. */
#define TILE 64
/* A register block: NR rows by NVMAX vectors of 16 columns, 24 of the 32 zmm registers. */
#define NR 4
#define NVMAX 6
/* Partitions of the points for the weight gradients (see Determinism); 24 divides by 1, 2, 3, 4, 6
 * and 8 threads. */
#define PARTS 24
/* Outputs narrow() takes in one group of accumulators. */
#define NARROW 4

/* The kernels' network: layer 0 takes the IN = 3 columns of q; the time is in its bias. */
#define IN 3

typedef struct {
    Py_ssize_t n;
    int width, depth, out;
    float center[3], half_extent[3];
    float tau, omega0, scale;
} net_t;

/* A flow's window (siren.py): v(p, t) = w(p) f(p, t) + (1 - w(p)) c, c = scale b_o the output layer's bias
 * (window_drift()), so that the velocity is a translation where w = 0; w read trilinearly from a
 * volume of shape (X, Y, Z), C-contiguous, at least 2 voxels along each axis; to_voxel is the world ->
 * voxel map's 3 x 4 rows.  Points beyond the volume read its nearest edge (grid_sample's border
 * padding). */
typedef struct {
    const float *values;
    int shape[3];
    float to_voxel[12];
} window_t;

static Py_ssize_t
fan_in(const net_t *s, int l, int first)
{
    return l == 0 ? first : s->width;
}

/* Offset of sine layer l in the module's parameters (first = 4) or in the kernels' gradient
 * (first = IN): W_l then b_l. */
static Py_ssize_t
layer_offset(const net_t *s, int l, int first)
{
    Py_ssize_t offset = 0;
    for (int k = 0; k < l; k++)
        offset += s->width * fan_in(s, k, first) + s->width;
    return offset;
}

static Py_ssize_t
params_size(const net_t *s, int first)
{
    return layer_offset(s, s->depth, first) + (Py_ssize_t)s->out * s->width + s->out;
}

/* Offset of sine layer l in the kernels' weights: W_l (width, f), W_l transposed (f, width), b_l. */
static Py_ssize_t
packed_offset(const net_t *s, int l)
{
    Py_ssize_t offset = 0;
    for (int k = 0; k < l; k++)
        offset += 2 * s->width * fan_in(s, k, IN) + s->width;
    return offset;
}

static Py_ssize_t
packed_size(const net_t *s)
{
    return packed_offset(s, s->depth) + (Py_ssize_t)s->out * s->width + s->out;
}

/* Where a window leaves the network (w = 0), the velocity is its output layer's bias, scale b_o (mm):
 * the same in every step's kernel weights (fold()). */
static const float *
window_drift(const net_t *s, const float *packed)
{
    return packed + packed_offset(s, s->depth) + (Py_ssize_t)s->out * s->width;
}

/* The kernels' weights from the module's: z_0 = omega0 (W_0 [q, tau] + b_0) = (omega0 W_0[:, :3]) q
 * + omega0 (b_0 + tau W_0[:, 3]); omega0 into the other sine layers, scale into the output layer. */
static void
fold(const net_t *s, const float *params, float *packed)
{
    const int W = s->width;
    for (int l = 0; l < s->depth; l++) {
        const int f = fan_in(s, l, IN), f_raw = fan_in(s, l, 4);
        const float *weight = params + layer_offset(s, l, 4), *bias = weight + (Py_ssize_t)W * f_raw;
        float *w = packed + packed_offset(s, l), *w_t = w + (Py_ssize_t)W * f, *b = w_t + (Py_ssize_t)f * W;
        for (int o = 0; o < W; o++) {
            for (int k = 0; k < f; k++) {
                w[o * f + k] = s->omega0 * weight[o * f_raw + k];
                w_t[k * W + o] = w[o * f + k];
            }
            b[o] = s->omega0 * (l == 0 ? bias[o] + s->tau * weight[o * f_raw + IN] : bias[o]);
        }
    }
    const float *out_raw = params + layer_offset(s, s->depth, 4);
    float *out = packed + packed_offset(s, s->depth);
    for (Py_ssize_t j = 0; j < (Py_ssize_t)s->out * W + s->out; j++)
        out[j] = s->scale * out_raw[j];
}

/* The module's gradient from the kernels' (fold()'s chain rule); layer 0's weight arrives
 * transposed, (IN, width), as the tiles sum it, and the gradient of its time column is
 * omega0 time_grad, time_grad the sum over calls of tau times layer 0's bias gradient. */
static void
unfold(const net_t *s, const float *kernel_grad, const float *time_grad, float *grad)
{
    const int W = s->width;
    for (int l = 0; l < s->depth; l++) {
        const int f = fan_in(s, l, IN), f_raw = fan_in(s, l, 4);
        const float *gw = kernel_grad + layer_offset(s, l, IN), *gb = gw + (Py_ssize_t)W * f;
        float *weight = grad + layer_offset(s, l, 4), *bias = weight + (Py_ssize_t)W * f_raw;
        for (int o = 0; o < W; o++) {
            for (int k = 0; k < f; k++)
                weight[o * f_raw + k] = s->omega0 * (l == 0 ? gw[k * W + o] : gw[o * f + k]);
            if (l == 0)
                weight[o * f_raw + IN] = s->omega0 * time_grad[o];
            bias[o] = s->omega0 * gb[o];
        }
    }
    const float *gout = kernel_grad + layer_offset(s, s->depth, IN);
    float *out = grad + layer_offset(s, s->depth, 4);
    for (Py_ssize_t j = 0; j < (Py_ssize_t)s->out * W + s->out; j++)
        out[j] = s->scale * gout[j];
}

#if HAVE_KERNELS
#pragma GCC push_options
#pragma GCC target("avx512f")

enum epilogue {
    FORWARD,    /* C = sin(acc + bias), and Z = acc + bias where Z is not NULL */
    COSINE_MUL, /* C = acc C2, and S += the column sums of C */
    ACCUMULATE, /* C += acc */
};

/* Sine and cosine of 16 lanes: _sine_poly.h's reduction and polynomials, step by step as its
 * sine_poly_sincos() takes them, each product there and the sum that takes it one fused multiply-add
 * here.  The forward pass takes the sine alone.  Lanes outside |x| <= SINE_BIG (or NaN) are handed to libm. */
typedef struct {
    __m512 r, r2;
    __m512i sign;
    __mmask16 inside;
} reduced_t;

static inline __attribute__((always_inline)) reduced_t
reduce(__m512 x)
{
    reduced_t out;
    out.inside = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(SINE_BIG), _CMP_LE_OQ);
    const __m512 rounder = _mm512_set1_ps(SINE_ROUNDER);
    const __m512 k = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(SINE_INV_PI), rounder), rounder);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(SINE_PI_A), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(SINE_PI_B), r);
    out.r = _mm512_fnmadd_ps(k, _mm512_set1_ps(SINE_PI_C), r);
    out.r2 = _mm512_mul_ps(out.r, out.r);
    /* k is an integer below 2^22 inside; outside, the conversion's value is never used. */
    out.sign = _mm512_slli_epi32(_mm512_cvttps_epi32(k), 31);
    return out;
}

static inline __attribute__((always_inline)) __m512
sin_reduced(const reduced_t *x)
{
    const __m512 poly = _mm512_fmadd_ps(
        x->r2,
        _mm512_fmadd_ps(x->r2, _mm512_fmadd_ps(x->r2, _mm512_set1_ps(SINE_S9), _mm512_set1_ps(SINE_S7)),
                        _mm512_set1_ps(SINE_S5)),
        _mm512_set1_ps(SINE_S3));
    const __m512 sine = _mm512_fmadd_ps(_mm512_mul_ps(x->r, x->r2), poly, x->r);
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sine), x->sign));
}

static inline __attribute__((always_inline)) __m512
cos_reduced(const reduced_t *x)
{
    const __m512 poly = _mm512_fmadd_ps(
        x->r2,
        _mm512_fmadd_ps(x->r2, _mm512_fmadd_ps(x->r2, _mm512_set1_ps(SINE_C10), _mm512_set1_ps(SINE_C8)),
                        _mm512_set1_ps(SINE_C6)),
        _mm512_set1_ps(SINE_C4));
    const __m512 cosine = _mm512_fmadd_ps(_mm512_mul_ps(x->r2, x->r2), poly,
                                          _mm512_fnmadd_ps(_mm512_set1_ps(0.5f), x->r2, _mm512_set1_ps(1.0f)));
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(cosine), x->sign));
}

/* The lanes of v outside the reduction's range replaced by f of x's. */
static __m512
outside_by_libm(__m512 v, __m512 x, __mmask16 inside, float (*f)(float))
{
    float lanes[16], out[16];
    _mm512_storeu_ps(lanes, x);
    _mm512_storeu_ps(out, v);
    for (int i = 0; i < 16; i++)
        if (!(inside >> i & 1))
            out[i] = f(lanes[i]);
    return _mm512_loadu_ps(out);
}

static inline __attribute__((always_inline)) __m512
sin16(__m512 x)
{
    const reduced_t reduced = reduce(x);
    const __m512 sine = sin_reduced(&reduced);
    return __builtin_expect(reduced.inside != 0xFFFF, 0) ? outside_by_libm(sine, x, reduced.inside, sinf) : sine;
}

static inline __attribute__((always_inline)) void
sincos16(__m512 x, __m512 *sine, __m512 *cosine)
{
    const reduced_t reduced = reduce(x);
    *sine = sin_reduced(&reduced);
    *cosine = cos_reduced(&reduced);
    if (__builtin_expect(reduced.inside != 0xFFFF, 0)) {
        *sine = outside_by_libm(*sine, x, reduced.inside, sinf);
        *cosine = outside_by_libm(*cosine, x, reduced.inside, cosf);
    }
}

/* One register block: for rows r < nr and 16 nv columns,
 *   acc[r] = bias + sum_{k < K} A[r sar + k sak] B[k ldb + 0 .. 16 nv)
 * then the epilogue on C (and C2, Z) at rows of ldc.  Called with constant nr and nv, so that the
 * loops over them unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void
block(const int nr, const int nv, int K, const float *A, ptrdiff_t sar, ptrdiff_t sak, const float *B, ptrdiff_t ldb,
      const float *bias, float *C, const float *C2, float *Z, float *S, ptrdiff_t ldc, enum epilogue epilogue)
{
    __m512 acc[NR][NVMAX];
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < nv; v++)
            acc[r][v] = bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        __m512 b[NVMAX];
        for (int v = 0; v < nv; v++)
            b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
        for (int r = 0; r < nr; r++) {
            const __m512 a = _mm512_set1_ps(A[r * sar + k * sak]);
            for (int v = 0; v < nv; v++)
                acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
        }
    }
    if (epilogue == COSINE_MUL) {
        for (int v = 0; v < nv; v++) {
            __m512 sum = _mm512_loadu_ps(S + 16 * v);
            for (int r = 0; r < nr; r++) {
                const ptrdiff_t at = r * ldc + 16 * v;
                const __m512 out = _mm512_mul_ps(acc[r][v], _mm512_loadu_ps(C2 + at));
                _mm512_storeu_ps(C + at, out);
                sum = _mm512_add_ps(sum, out);
            }
            _mm512_storeu_ps(S + 16 * v, sum);
        }
        return;
    }
    for (int r = 0; r < nr; r++) {
        for (int v = 0; v < nv; v++) {
            const ptrdiff_t at = r * ldc + 16 * v;
            if (epilogue == FORWARD) {
                /* Read again only by the backward pass, after every Euler step's forward pass. */
                if (Z)
                    _mm512_stream_ps(Z + at, acc[r][v]);
                _mm512_storeu_ps(C + at, sin16(acc[r][v]));
            } else {
                _mm512_storeu_ps(C + at, _mm512_add_ps(_mm512_loadu_ps(C + at), acc[r][v]));
            }
        }
    }
}

#define BLOCK_CASE(R, V)                                                                                          \
    case (R) * 8 + (V):                                                                                           \
        block(R, V, K, Ai, sar, sak, Bj, ldb, bj, Ci, C2i, Zi, Sj, ldc, epilogue);                                  \
        break;
#define BLOCK_ROW(R) BLOCK_CASE(R, 1) BLOCK_CASE(R, 2) BLOCK_CASE(R, 3) BLOCK_CASE(R, 4) BLOCK_CASE(R, 5) BLOCK_CASE(R, 6)

/* C (M, ncol) [epilogue] A (M, K) B (K, ncol), A's element (i, k) at A[i sar + k sak], B's rows ldb
 * apart, C's (and C2's, Z's) ldc apart, S ncol long; ncol a multiple of 16. */
static void
gemm(int M, int ncol, int K, const float *A, ptrdiff_t sar, ptrdiff_t sak, const float *B, ptrdiff_t ldb,
     const float *bias, float *C, const float *C2, float *Z, float *S, ptrdiff_t ldc, enum epilogue epilogue)
{
    for (int j = 0; j < ncol; j += 16 * NVMAX) {
        const int nv = (ncol - j) / 16 < NVMAX ? (ncol - j) / 16 : NVMAX;
        for (int i = 0; i < M; i += NR) {
            const int nr = M - i < NR ? M - i : NR;
            const ptrdiff_t at = i * ldc + j;
            const float *Ai = A + i * sar, *Bj = B + j, *bj = bias ? bias + j : NULL, *C2i = C2 ? C2 + at : NULL;
            float *Ci = C + at, *Zi = Z ? Z + at : NULL, *Sj = S ? S + j : NULL;
            switch (nr * 8 + nv) {
                BLOCK_ROW(1)
                BLOCK_ROW(2)
                BLOCK_ROW(3)
                BLOCK_ROW(4)
            }
        }
    }
}

/* y[i ldy + o] = bias[o] + h[i] . w[o] for rows i < M and outputs o < n_out, h's and w's rows width
 * long: the layers too narrow for a register block (the output layer, the input gradient). */
static void
narrow(int M, int width, int n_out, const float *h, const float *w, const float *bias, float *y, ptrdiff_t ldy)
{
    for (int i = 0; i < M; i++) {
        for (int o0 = 0; o0 < n_out; o0 += NARROW) {
            const int m = n_out - o0 < NARROW ? n_out - o0 : NARROW;
            __m512 acc[NARROW];
            for (int o = 0; o < m; o++)
                acc[o] = _mm512_setzero_ps();
            for (int j = 0; j < width; j += 16) {
                const __m512 x = _mm512_loadu_ps(h + (ptrdiff_t)i * width + j);
                for (int o = 0; o < m; o++)
                    acc[o] = _mm512_fmadd_ps(x, _mm512_loadu_ps(w + (ptrdiff_t)(o0 + o) * width + j), acc[o]);
            }
            for (int o = 0; o < m; o++)
                y[i * ldy + o0 + o] = _mm512_reduce_add_ps(acc[o]) + (bias ? bias[o0 + o] : 0.0f);
        }
    }
}

/* q = (p - center) / half_extent for a tile's rows of points p, as VelocityField.encode computes it. */
static void
normalise(const net_t *s, const float *p, int rows, float *q)
{
    for (int i = 0; i < rows; i++)
        for (int k = 0; k < IN; k++)
            q[i * IN + k] = (p[i * IN + k] - s->center[k]) / s->half_extent[k];
}

/* Forward pass of a tile: rows points p (those from i0 on) to their velocities v, saving the
 * pre-activations into z's rows from i0 on (or not, where z is NULL).  scratch: 2 TILE width +
 * TILE IN floats. */
static void
forward_tile(const net_t *s, const float *p, const float *packed, float *v, float *z, Py_ssize_t i0, int rows,
             float *scratch)
{
    const int W = s->width;
    float *q = scratch + 2 * TILE * W;
    normalise(s, p, rows, q);
    const float *in = q;
    ptrdiff_t ld_in = IN;
    for (int l = 0; l < s->depth; l++) {
        const int f = fan_in(s, l, IN);
        const float *w_t = packed + packed_offset(s, l) + (Py_ssize_t)W * f, *bias = w_t + (Py_ssize_t)f * W;
        float *h = scratch + (l & 1) * TILE * W;
        gemm(rows, W, f, in, ld_in, 1, w_t, W, bias, h, NULL, z ? z + (l * s->n + i0) * W : NULL, NULL, W,
             FORWARD);
        in = h;
        ld_in = W;
    }
    const float *w_out = packed + packed_offset(s, s->depth);
    narrow(rows, W, s->out, in, w_out, w_out + (Py_ssize_t)s->out * W, v, s->out);
}

/* Sines into h and cosines into c of the count floats at z, asking for the as many at next (where
 * not NULL) to be brought into L2 meanwhile. */
static void
sincos_rows(const float *z, const float *next, float *h, float *c, Py_ssize_t count)
{
    for (Py_ssize_t j = 0; j < count; j += 16) {
        __m512 sine, cosine;
        if (next)
            _mm_prefetch((const char *)(next + j), _MM_HINT_T1);
        sincos16(_mm512_loadu_ps(z + j), &sine, &cosine);
        _mm512_storeu_ps(h + j, sine);
        _mm512_storeu_ps(c + j, cosine);
    }
}

/* Backward pass of a tile: from the gradient g of the velocities of its rows points p (those from
 * i0 on, whose pre-activations are z's rows from i0 on), adds their weight and bias gradients to
 * grad (a partition's sums in the kernels' layout, layer 0's weight transposed) and writes their
 * points' gradient to gp (or not, where NULL).  The pre-activations are in memory (streamed there),
 * and this tile's computation gives time to bring into L2 those of the next tile to come, next's
 * rows from next_i0 on (none where next is NULL).  Layer 0's bias gradient adds into bias0 instead,
 * where that is not NULL.  scratch: 4 TILE width + 2 TILE IN floats. */
static void
backward_tile(const net_t *s, const float *p, const float *packed, const float *z, Py_ssize_t i0, const float *next,
              Py_ssize_t next_i0, const float *g, float *grad, float *bias0, float *gp, int rows, float *scratch)
{
    const int W = s->width, L = s->depth, O = s->out;
    const Py_ssize_t cells = (Py_ssize_t)rows * W;
    float *gz = scratch, *gh = scratch + TILE * W, *h = scratch + 2 * TILE * W, *c = scratch + 3 * TILE * W;
    float *q = scratch + 4 * TILE * W, *gq = q + TILE * IN;
#define SAVED(l) (z + ((l) * s->n + i0) * W)
#define NEXT(l) (next ? next + ((l) * s->n + next_i0) * W : NULL)

    /* Output layer: its weight and bias gradients, then dL/dz of the last sine layer. */
    const float *w_out = packed + packed_offset(s, L);
    float *gw_out = grad + layer_offset(s, L, IN), *gb_out = gw_out + (Py_ssize_t)O * W;
    for (int i = 0; i < rows; i++)
        for (int o = 0; o < O; o++)
            gb_out[o] += g[i * O + o];
    sincos_rows(SAVED(L - 1), NEXT(L - 1), h, c, cells);
    gemm(O, W, rows, g, 1, O, h, W, NULL, gw_out, NULL, NULL, NULL, W, ACCUMULATE);
    /* dL/dz of a sine layer, and its sums over the tile's points into that layer's bias gradient. */
#define BIAS_GRAD(l) ((l) == 0 && bias0 ? bias0 : grad + layer_offset(s, l, IN) + (Py_ssize_t)W * fan_in(s, l, IN))
    gemm(rows, W, O, g, O, 1, w_out, W, NULL, gz, c, NULL, BIAS_GRAD(L - 1), W, COSINE_MUL);

    for (int l = L - 1; l >= 0; l--) {
        const float *weight = packed + packed_offset(s, l);
        float *gw = grad + layer_offset(s, l, IN);
        if (l > 0) {
            sincos_rows(SAVED(l - 1), NEXT(l - 1), h, c, cells);
            gemm(W, W, rows, gz, 1, W, h, W, NULL, gw, NULL, NULL, NULL, W, ACCUMULATE);
            gemm(rows, W, W, gz, W, 1, weight, W, NULL, gh, c, NULL, BIAS_GRAD(l - 1), W, COSINE_MUL);
            float *swap = gz;
            gz = gh;
            gh = swap;
        } else {
            normalise(s, p, rows, q);
            gemm(IN, W, rows, q, 1, IN, gz, W, NULL, gw, NULL, NULL, NULL, W, ACCUMULATE);
            if (gp) {
                narrow(rows, W, IN, gz, weight + (Py_ssize_t)W * IN, NULL, gq, IN);
                for (int i = 0; i < rows; i++)
                    for (int k = 0; k < IN; k++)
                        gp[i * IN + k] = gq[i * IN + k] / s->half_extent[k];
            }
        }
    }
#undef BIAS_GRAD
#undef NEXT
#undef SAVED
}

#pragma GCC pop_options
#endif /* HAVE_KERNELS */

static int
cpu_has_kernels(void)
{
#if HAVE_KERNELS
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

static float *
scratch_alloc(Py_ssize_t floats)
{
    return aligned_alloc(64, ((size_t)floats * sizeof(float) + 63) / 64 * 64);
}

/* Points of the tile that starts at point i0: TILE, or what is left of the n. */
static int
tile_rows(const net_t *s, Py_ssize_t i0)
{
    return (int)(s->n - i0 < TILE ? s->n - i0 : TILE);
}

/* tau = 2 t - 1 of Euler step `step`: fold_steps() puts it into the weights, run_flow_backward()
 * into the time column's gradient, and the two must agree. */
static float
step_tau(int step, int n_steps)
{
    return 2.0f * step / n_steps - 1.0f;
}

/* sums[j] += the partitions' partial[p size + j] in partition order, j < size: the same sums
 * whichever threads made the partials. */
static void
reduce_partitions(const float *partial, int parts, Py_ssize_t size, float *sums)
{
    for (int p = 0; p < parts; p++)
        for (Py_ssize_t j = 0; j < size; j++)
            sums[j] += partial[p * size + j];
}

/* Both passes share their points out by tiles; the OpenMP threads are PyTorch's (the extension links
 * the same libgomp), as many as torch.set_num_threads set. */
static int
run_forward(const net_t *s, const float *points, const float *params, float *v, float *z)
{
#if HAVE_KERNELS
    const Py_ssize_t tiles = (s->n + TILE - 1) / TILE;
    float *packed = malloc(packed_size(s) * sizeof(float));
    if (!packed)
        return -1;
    fold(s, params, packed);
    int failed = 0;
#pragma omp parallel reduction(| : failed) if (tiles > 1)
    {
        float *scratch = scratch_alloc((2 * (Py_ssize_t)s->width + IN) * TILE);
        if (!scratch)
            failed = 1;
#pragma omp for schedule(static)
        for (Py_ssize_t t = 0; t < tiles; t++) {
            if (scratch) {
                const Py_ssize_t i0 = t * TILE;
                forward_tile(s, points + i0 * IN, packed, v + i0 * s->out, z, i0, tile_rows(s, i0), scratch);
            }
        }
        /* The streamed stores are weakly ordered: make them visible before the backward pass reads. */
        _mm_sfence();
        free(scratch);
    }
    free(packed);
    return failed ? -1 : 0;
#else
    return -1;
#endif
}

/* partial: workspace_size() floats, of which the partitions' sums take PARTS times the kernels' gradient. */
static int
run_backward(const net_t *s, const float *points, const float *params, const float *z, const float *gv, float *grad,
             float *gp, float *partial)
{
#if HAVE_KERNELS
    const Py_ssize_t tiles = (s->n + TILE - 1) / TILE, size = params_size(s, IN);
    const int parts = tiles < PARTS ? (int)tiles : PARTS;
    float *packed = malloc(packed_size(s) * sizeof(float)), *kernel_grad = calloc(size + s->width, sizeof(float));
    int failed = !packed || !kernel_grad;
    if (!failed)
        fold(s, params, packed);
#pragma omp parallel reduction(| : failed) if (parts > 1 && !failed)
    {
        float *scratch = failed ? NULL : scratch_alloc((4 * (Py_ssize_t)s->width + 2 * IN) * TILE);
        if (!scratch)
            failed = 1;
#pragma omp for schedule(static)
        for (int p = 0; p < parts; p++) {
            memset(partial + p * size, 0, size * sizeof(float));
            for (Py_ssize_t t = p * tiles / parts; scratch && t < (p + 1) * tiles / parts; t++) {
                const Py_ssize_t i0 = t * TILE;
                backward_tile(s, points + i0 * IN, packed, z, i0, i0 + TILE < s->n ? z : NULL, i0 + TILE,
                              gv + i0 * s->out, partial + p * size, NULL, gp ? gp + i0 * IN : NULL, tile_rows(s, i0),
                              scratch);
            }
        }
        free(scratch);
    }
    if (!failed) {
        reduce_partitions(partial, parts, size, kernel_grad);
        float *time_grad = kernel_grad + size; /* calloc'd one width further */
        const float *bias0 = kernel_grad + (Py_ssize_t)s->width * IN;
        for (int o = 0; o < s->width; o++)
            time_grad[o] = s->tau * bias0[o];
        unfold(s, kernel_grad, time_grad, grad);
    }
    free(packed);
    free(kernel_grad);
    return failed ? -1 : 0;
#else
    return -1;
#endif
}

/* The window at a point p (world mm) into *value and, where gradient is not NULL, its gradient in
 * world mm (zero along a voxel axis on which p lies beyond the volume, as the border is constant). */
static void
window_at(const window_t *w, const float *p, float *value, float *gradient)
{
    int corner[3];
    float frac[3], inside[3];
    for (int a = 0; a < 3; a++) {
        const float *row = w->to_voxel + 4 * a;
        const int n = w->shape[a];
        float x = row[0] * p[0] + row[1] * p[1] + row[2] * p[2] + row[3];
        inside[a] = x > 0.0f && x < n - 1 ? 1.0f : 0.0f;
        x = x < 0.0f ? 0.0f : x > n - 1 ? (float)(n - 1) : x;
        int i = (int)x;
        i = i > n - 2 ? n - 2 : i;
        corner[a] = i;
        frac[a] = x - i;
    }
    const Py_ssize_t sy = w->shape[2], sx = (Py_ssize_t)w->shape[1] * sy;
    const float *c = w->values + corner[0] * sx + corner[1] * sy + corner[2];
    const float fx = frac[0], fy = frac[1], fz = frac[2];
#define LERP(a, b, f) ((a) + (f) * ((b) - (a)))
    /* Along z at the four (x, y) corners, then y, then x. */
    const float c00 = LERP(c[0], c[1], fz), c01 = LERP(c[sy], c[sy + 1], fz);
    const float c10 = LERP(c[sx], c[sx + 1], fz), c11 = LERP(c[sx + sy], c[sx + sy + 1], fz);
    const float c0 = LERP(c00, c01, fy), c1 = LERP(c10, c11, fy);
    *value = LERP(c0, c1, fx);
    if (gradient) {
        const float d0 = LERP(c[1] - c[0], c[sy + 1] - c[sy], fy);
        const float d1 = LERP(c[sx + 1] - c[sx], c[sx + sy + 1] - c[sx + sy], fy);
        const float voxel[3] = {(c1 - c0) * inside[0], LERP(c01 - c00, c11 - c10, fx) * inside[1],
                                LERP(d0, d1, fx) * inside[2]};
        for (int b = 0; b < 3; b++)
            gradient[b] = w->to_voxel[b] * voxel[0] + w->to_voxel[4 + b] * voxel[1] + w->to_voxel[8 + b] * voxel[2];
    }
#undef LERP
}

/* The kernels' weights of each Euler step: they differ in layer 0's bias, where the time is. */
static float *
fold_steps(const net_t *s, int n_steps, const float *params)
{
    float *packed = malloc((size_t)n_steps * packed_size(s) * sizeof(float));
    for (int step = 0; packed && step < n_steps; step++) {
        net_t at = *s;
        at.tau = step_tau(step, n_steps);
        fold(&at, params, packed + step * packed_size(s));
    }
    return packed;
}

/* The Euler flow p <- p + v(p, t_i) dt, i = 0 .. n_steps - 1, of every tile of points through all its
 * steps while it is in cache: the displacement, the sum over steps and points of |v|^2 into
 * kinetic, and where z is not NULL what the backward pass needs: each step's pre-activations
 * (n_steps, depth, n, width), positions and network outputs (n_steps, n, 3).  With a window (not
 * NULL) v = w f + (1 - w) c, f the network's output and c its bias. */
static int
run_flow_forward(const net_t *s, int n_steps, const float *points, const float *params, const window_t *window,
                 float *displacement, double *kinetic, float *z, float *positions, float *velocities)
{
#if HAVE_KERNELS
    const Py_ssize_t tiles = (s->n + TILE - 1) / TILE, step_z = (Py_ssize_t)s->depth * s->n * s->width;
    const float dt = 1.0f / n_steps;
    float *packed = fold_steps(s, n_steps, params);
    double *tile_kinetic = malloc((size_t)(tiles > 0 ? tiles : 1) * sizeof(double));
    int failed = !packed || !tile_kinetic;
    const float *drift = packed ? window_drift(s, packed) : NULL;
#pragma omp parallel reduction(| : failed) if (tiles > 1 && !failed)
    {
        float *scratch = failed ? NULL : scratch_alloc((2 * (Py_ssize_t)s->width + 3 * IN) * TILE);
        if (!scratch)
            failed = 1;
#pragma omp for schedule(static)
        for (Py_ssize_t t = 0; t < tiles; t++) {
            if (!scratch)
                continue;
            const Py_ssize_t i0 = t * TILE;
            const int rows = tile_rows(s, i0);
            float *p = scratch + (2 * (Py_ssize_t)s->width + IN) * TILE, *v = p + TILE * IN;
            memcpy(p, points + i0 * IN, rows * IN * sizeof(float));
            double sum = 0.0;
            for (int step = 0; step < n_steps; step++) {
                if (positions)
                    memcpy(positions + (step * s->n + i0) * IN, p, rows * IN * sizeof(float));
                forward_tile(s, p, packed + step * packed_size(s), v, z ? z + step * step_z : NULL, i0, rows, scratch);
                if (velocities)
                    memcpy(velocities + (step * s->n + i0) * IN, v, rows * IN * sizeof(float));
                if (window)
                    for (int r = 0; r < rows; r++) {
                        float w;
                        window_at(window, p + r * IN, &w, NULL);
                        for (int k = 0; k < IN; k++)
                            v[r * IN + k] = w * v[r * IN + k] + (1.0f - w) * drift[k];
                    }
                for (int j = 0; j < rows * IN; j++) {
                    sum += (double)v[j] * v[j];
                    p[j] = p[j] + v[j] * dt;
                }
            }
            for (int j = 0; j < rows * IN; j++)
                displacement[i0 * IN + j] = p[j] - points[i0 * IN + j];
            tile_kinetic[t] = sum;
        }
        /* The streamed stores are weakly ordered: make them visible before the backward pass reads. */
        _mm_sfence();
        free(scratch);
    }
    if (!failed) {
        *kinetic = 0.0;
        for (Py_ssize_t t = 0; t < tiles; t++)
            *kinetic += tile_kinetic[t];
    }
    free(packed);
    free(tile_kinetic);
    return failed ? -1 : 0;
#else
    return -1;
#endif
}

/* Back through run_flow_forward: from the gradients of the displacement (g_displacement) and of
 * kinetic, the mean over steps and points of |v|^2 (g_kinetic), each tile through all its steps in
 * reverse.  The weight gradients of every step add into its partition's sums (partial:
 * workspace_size() floats); the points' gradient into g_points (or not, where NULL).  With a window,
 * each step's v = w f + (1 - w) c passes w times its gradient to the network, the rest, (1 - w) dL/dv,
 * to the output bias c, and adds grad w ((f - c) . dL/dv) to the point's. */
static int
run_flow_backward(const net_t *s, int n_steps, const float *params, const window_t *window, const float *z,
                  const float *positions, const float *velocities, const float *g_displacement, float g_kinetic,
                  float *grad, float *g_points, float *partial)
{
#if HAVE_KERNELS
    const Py_ssize_t tiles = (s->n + TILE - 1) / TILE, size = params_size(s, IN);
    const Py_ssize_t step_z = (Py_ssize_t)s->depth * s->n * s->width;
    const int parts = tiles < PARTS ? (int)tiles : PARTS;
    const float dt = 1.0f / n_steps, kinetic_scale = 2.0f / (n_steps * (float)(s->n > 0 ? s->n : 1)) * g_kinetic;
    /* Each partition's sums: the kernels' gradient, then the time column's (unfold()). */
    const Py_ssize_t part_size = size + s->width;
    float *packed = fold_steps(s, n_steps, params), *kernel_grad = calloc(part_size, sizeof(float));
    int failed = !packed || !kernel_grad;
    const float *drift = packed ? window_drift(s, packed) : NULL;
#pragma omp parallel reduction(| : failed) if (parts > 1 && !failed)
    {
        float *scratch = failed ? NULL : scratch_alloc((4 * (Py_ssize_t)s->width + 6 * IN) * TILE + s->width);
        if (!scratch)
            failed = 1;
#pragma omp for schedule(static)
        for (int part = 0; part < parts; part++) {
            float *sums = partial + part * part_size, *bias0 = sums + (Py_ssize_t)s->width * IN,
                  *time_grad = sums + size,
                  *drift_grad = sums + layer_offset(s, s->depth, IN) + (Py_ssize_t)s->out * s->width;
            memset(sums, 0, part_size * sizeof(float));
            const Py_ssize_t last = (part + 1) * tiles / parts;
            for (Py_ssize_t t = part * tiles / parts; scratch && t < last; t++) {
                const Py_ssize_t i0 = t * TILE;
                const int rows = tile_rows(s, i0);
                float *gp = scratch + (4 * (Py_ssize_t)s->width + 2 * IN) * TILE, *gv = gp + TILE * IN,
                      *g_in = gv + TILE * IN, *g_window = g_in + TILE * IN, *step_bias0 = g_window + TILE * IN;
                memcpy(gp, g_displacement + i0 * IN, rows * IN * sizeof(float));
                for (int step = n_steps - 1; step >= 0; step--) {
                    const float *v = velocities + (step * s->n + i0) * IN;
                    if (window)
                        for (int r = 0; r < rows; r++) {
                            float w, gradient[IN], dot = 0.0f;
                            window_at(window, positions + (step * s->n + i0 + r) * IN, &w, gradient);
                            for (int k = 0; k < IN; k++) {
                                const int j = r * IN + k;
                                const float windowed = w * v[j] + (1.0f - w) * drift[k];
                                const float g_full = gp[j] * dt + windowed * kinetic_scale;
                                dot += (v[j] - drift[k]) * g_full;
                                gv[j] = w * g_full;
                                /* The bias reaches v whole: backward_tile adds the w g_full share. */
                                drift_grad[k] += (1.0f - w) * g_full;
                            }
                            for (int k = 0; k < IN; k++)
                                g_window[r * IN + k] = gradient[k] * dot;
                        }
                    else
                        for (int j = 0; j < rows * IN; j++)
                            gv[j] = gp[j] * dt + v[j] * kinetic_scale;
                    /* Next come this tile's earlier step, or the next tile's last one. */
                    const float *next = step > 0 ? z + (step - 1) * step_z : t + 1 < last ? z + (n_steps - 1) * step_z
                                                                                          : NULL;
                    const int input = step > 0 || g_points;
                    /* Layer 0's bias gradient of this step alone, for the time column's (tau differs). */
                    memset(step_bias0, 0, s->width * sizeof(float));
                    backward_tile(s, positions + (step * s->n + i0) * IN, packed + step * packed_size(s),
                                  z + step * step_z, i0, next, step > 0 ? i0 : i0 + TILE, gv, sums, step_bias0,
                                  input ? g_in : NULL, rows, scratch);
                    const float tau = step_tau(step, n_steps);
                    for (int o = 0; o < s->width; o++) {
                        bias0[o] += step_bias0[o];
                        time_grad[o] += tau * step_bias0[o];
                    }
                    if (input)
                        for (int j = 0; j < rows * IN; j++)
                            gp[j] += window ? g_in[j] + g_window[j] : g_in[j];
                }
                if (g_points)
                    for (int j = 0; j < rows * IN; j++)
                        g_points[i0 * IN + j] = gp[j] - g_displacement[i0 * IN + j];
            }
        }
        free(scratch);
    }
    if (!failed) {
        reduce_partitions(partial, parts, part_size, kernel_grad);
        unfold(s, kernel_grad, kernel_grad + size, grad);
    }
    free(packed);
    free(kernel_grad);
    return failed ? -1 : 0;
#else
    return -1;
#endif
}

/* Python: buffers by the buffer protocol, checked against the shape before any pointer is used. */

/* Floats of the backward passes' workspace: per partition the kernels' gradient and a time column. */
static Py_ssize_t
workspace_size(const net_t *s)
{
    return PARTS * (params_size(s, IN) + s->width);
}

/* What a buffer argument holds, which sets its size; steps is a flow's n_steps, 1 for a call that
 * evaluates the network once. */
enum holds {
    POINTS,         /* (n, 3): points, a displacement, their gradients */
    OUTPUTS,        /* (n, out): velocities, their gradient */
    PARAMS,         /* the module's parameters (params_size), their gradient */
    PREACTIVATIONS, /* (steps, depth, n, width), 64-byte aligned: the kernels stream whole cache lines */
    STEP_POINTS,    /* (steps, n, 3): a flow's positions and velocities */
    WORKSPACE,      /* workspace_size() */
};

enum access { READS, WRITES };
/* NONE_SKIPS: None may stand for the buffer, and the kernels then skip what it is for. */
enum presence { REQUIRED, NONE_SKIPS };

/* A buffer argument: its name for the messages, the object passed, what it holds, whether the kernels
 * write into it and whether it may be None; take_arguments() takes the view. */
typedef struct {
    const char *name;
    PyObject *object;
    enum holds holds;
    enum access access;
    enum presence presence;
    Py_buffer view;
} buffer_arg;

static void
release_arguments(buffer_arg *args, int count)
{
    for (int i = 0; i < count; i++)
        if (args[i].view.obj)
            PyBuffer_Release(&args[i].view);
}

/* The one check of every call's arguments, before the kernels trust them (a wrong size would be a
 * write out of bounds there): the network's shape; for a flow (n_steps not NULL) its steps and a
 * velocity of 3 components; the CPU; then each buffer's contiguity, writability, size and alignment,
 * taking a view of each.  Returns 1 with every view taken, or 0 with an exception set and none held. */
static int
take_arguments(const net_t *s, const int *n_steps, buffer_arg *args, int count)
{
    for (int i = 0; i < count; i++)
        args[i].view.obj = NULL;
    if (s->n < 0 || s->width < 16 || s->width % 16 || s->depth < 1 || s->out < 1) {
        PyErr_SetString(PyExc_ValueError, "need n >= 0, depth >= 1, out >= 1 and a width that is a positive "
                                          "multiple of 16");
        return 0;
    }
    if (n_steps && (*n_steps < 1 || s->out != IN)) {
        PyErr_SetString(PyExc_ValueError, "a flow needs n_steps >= 1 and a velocity of 3 components");
        return 0;
    }
    if (!cpu_has_kernels()) {
        PyErr_SetString(PyExc_RuntimeError, "the fused SIREN kernels need a CPU with AVX-512F");
        return 0;
    }
    const Py_ssize_t steps = n_steps ? *n_steps : 1;
    for (int i = 0; i < count; i++) {
        buffer_arg *arg = &args[i];
        if (arg->presence == NONE_SKIPS && arg->object == Py_None)
            continue;
        const Py_ssize_t floats = arg->holds == POINTS           ? s->n * IN
                                  : arg->holds == OUTPUTS        ? s->n * s->out
                                  : arg->holds == PARAMS         ? params_size(s, 4)
                                  : arg->holds == PREACTIVATIONS ? steps * s->depth * s->n * s->width
                                  : arg->holds == STEP_POINTS    ? steps * s->n * IN
                                                                 : workspace_size(s);
        const int flags = PyBUF_C_CONTIGUOUS | (arg->access == WRITES ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(arg->object, &arg->view, flags))
            goto refused;
        if (arg->view.len != floats * (Py_ssize_t)sizeof(float)) {
            PyErr_Format(PyExc_ValueError, "%s: expected %zd float32 values, got a buffer of %zd bytes", arg->name,
                         floats, arg->view.len);
            goto refused;
        }
        if (arg->holds == PREACTIVATIONS && (uintptr_t)arg->view.buf % 64) {
            PyErr_Format(PyExc_ValueError, "%s must be 64-byte aligned", arg->name);
            goto refused;
        }
    }
    return 1;
refused:
    release_arguments(args, count);
    return 0;
}

/* A buffer's data, or NULL where None stood for it. */
static void *
data(const buffer_arg *arg)
{
    return arg->view.obj ? arg->view.buf : NULL;
}

#define COUNT(args) ((int)(sizeof(args) / sizeof((args)[0])))

/* A flow's window argument: None (no window), or (values, (X, Y, Z), to_voxel) with values a
 * C-contiguous float32 buffer of X Y Z values, each at least 2, and to_voxel 12 floats.  Returns 1
 * with *window set (NULL for None; values viewed through view, to be released) or 0 with an
 * exception set and nothing held. */
static int
take_window(PyObject *object, window_t *storage, const window_t **window, Py_buffer *view)
{
    view->obj = NULL;
    *window = NULL;
    if (object == Py_None)
        return 1;
    PyObject *values;
    float *m = storage->to_voxel;
    if (!PyArg_ParseTuple(object, "O(iii)(ffffffffffff)", &values, &storage->shape[0], &storage->shape[1],
                          &storage->shape[2], &m[0], &m[1], &m[2], &m[3], &m[4], &m[5], &m[6], &m[7], &m[8], &m[9],
                          &m[10], &m[11]))
        return 0;
    if (storage->shape[0] < 2 || storage->shape[1] < 2 || storage->shape[2] < 2) {
        PyErr_SetString(PyExc_ValueError, "window: need at least 2 voxels along each axis");
        return 0;
    }
    if (PyObject_GetBuffer(values, view, PyBUF_C_CONTIGUOUS))
        return 0;
    const Py_ssize_t floats = (Py_ssize_t)storage->shape[0] * storage->shape[1] * storage->shape[2];
    if (view->len != floats * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError, "window: expected %zd float32 values, got a buffer of %zd bytes", floats,
                     view->len);
        PyBuffer_Release(view);
        view->obj = NULL;
        return 0;
    }
    storage->values = view->buf;
    *window = storage;
    return 1;
}

static void
release_window(Py_buffer *view)
{
    if (view->obj)
        PyBuffer_Release(view);
}

/* A flow's take_arguments() and its window's take_window(): 1 with both taken, or 0 with an exception
 * set and neither held. */
static int
take_flow_arguments(const net_t *s, const int *n_steps, PyObject *window_arg, window_t *storage,
                    const window_t **window, Py_buffer *window_view, buffer_arg *args, int count)
{
    if (!take_window(window_arg, storage, window, window_view))
        return 0;
    if (take_arguments(s, n_steps, args, count))
        return 1;
    release_window(window_view);
    return 0;
}

#define NET_FORMAT "(niii)(fff)(fff)fff"
#define NET_ARGS(s)                                                                                               \
    &(s).n, &(s).width, &(s).depth, &(s).out, &(s).center[0], &(s).center[1], &(s).center[2], &(s).half_extent[0],  \
        &(s).half_extent[1], &(s).half_extent[2], &(s).tau, &(s).omega0, &(s).scale

static PyObject *
py_forward(PyObject *Py_UNUSED(self), PyObject *args)
{
    net_t s;
    PyObject *points, *params, *v, *z;
    if (!PyArg_ParseTuple(args, NET_FORMAT "OOOO", NET_ARGS(s), &points, &params, &v, &z))
        return NULL;
    buffer_arg buffers[] = {
        {"points", points, POINTS, READS, REQUIRED},
        {"params", params, PARAMS, READS, REQUIRED},
        {"v", v, OUTPUTS, WRITES, REQUIRED},
        {"z", z, PREACTIVATIONS, WRITES, NONE_SKIPS},
    };
    if (!take_arguments(&s, NULL, buffers, COUNT(buffers)))
        return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_forward(&s, data(&buffers[0]), data(&buffers[1]), data(&buffers[2]), data(&buffers[3]));
    Py_END_ALLOW_THREADS
    release_arguments(buffers, COUNT(buffers));
    return status ? PyErr_NoMemory() : Py_NewRef(Py_None);
}

static PyObject *
py_backward(PyObject *Py_UNUSED(self), PyObject *args)
{
    net_t s;
    PyObject *points, *params, *z, *gv, *grad, *gp, *workspace;
    if (!PyArg_ParseTuple(args, NET_FORMAT "OOOOOOO", NET_ARGS(s), &points, &params, &z, &gv, &grad, &gp, &workspace))
        return NULL;
    buffer_arg buffers[] = {
        {"points", points, POINTS, READS, REQUIRED},
        {"params", params, PARAMS, READS, REQUIRED},
        {"z", z, PREACTIVATIONS, READS, REQUIRED},
        {"grad of v", gv, OUTPUTS, READS, REQUIRED},
        {"grad", grad, PARAMS, WRITES, REQUIRED},
        {"grad of points", gp, POINTS, WRITES, NONE_SKIPS},
        {"workspace", workspace, WORKSPACE, WRITES, REQUIRED},
    };
    if (!take_arguments(&s, NULL, buffers, COUNT(buffers)))
        return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_backward(&s, data(&buffers[0]), data(&buffers[1]), data(&buffers[2]), data(&buffers[3]),
                          data(&buffers[4]), data(&buffers[5]), data(&buffers[6]));
    Py_END_ALLOW_THREADS
    release_arguments(buffers, COUNT(buffers));
    return status ? PyErr_NoMemory() : Py_NewRef(Py_None);
}

#define FLOW_FORMAT "(niii)(fff)(fff)iff"
#define FLOW_ARGS(s, n_steps)                                                                                     \
    &(s).n, &(s).width, &(s).depth, &(s).out, &(s).center[0], &(s).center[1], &(s).center[2], &(s).half_extent[0],  \
        &(s).half_extent[1], &(s).half_extent[2], &(n_steps), &(s).omega0, &(s).scale

static PyObject *
py_flow_forward(PyObject *Py_UNUSED(self), PyObject *args)
{
    net_t s = {0};
    int n_steps;
    PyObject *points, *params, *window_arg, *displacement, *z, *positions, *velocities;
    if (!PyArg_ParseTuple(args, FLOW_FORMAT "OOOOOOO", FLOW_ARGS(s, n_steps), &points, &params, &window_arg,
                          &displacement, &z, &positions, &velocities))
        return NULL;
    buffer_arg buffers[] = {
        {"points", points, POINTS, READS, REQUIRED},
        {"params", params, PARAMS, READS, REQUIRED},
        {"displacement", displacement, POINTS, WRITES, REQUIRED},
        {"z", z, PREACTIVATIONS, WRITES, NONE_SKIPS},
        {"positions", positions, STEP_POINTS, WRITES, NONE_SKIPS},
        {"velocities", velocities, STEP_POINTS, WRITES, NONE_SKIPS},
    };
    window_t storage;
    const window_t *window;
    Py_buffer window_view;
    if (!take_flow_arguments(&s, &n_steps, window_arg, &storage, &window, &window_view, buffers, COUNT(buffers)))
        return NULL;
    int status;
    double kinetic = 0.0;
    Py_BEGIN_ALLOW_THREADS
    status = run_flow_forward(&s, n_steps, data(&buffers[0]), data(&buffers[1]), window, data(&buffers[2]), &kinetic,
                              data(&buffers[3]), data(&buffers[4]), data(&buffers[5]));
    Py_END_ALLOW_THREADS
    release_arguments(buffers, COUNT(buffers));
    release_window(&window_view);
    return status ? PyErr_NoMemory() : PyFloat_FromDouble(kinetic);
}

static PyObject *
py_flow_backward(PyObject *Py_UNUSED(self), PyObject *args)
{
    net_t s = {0};
    int n_steps;
    float g_kinetic;
    PyObject *params, *window_arg, *z, *positions, *velocities, *g_displacement, *grad, *g_points, *workspace;
    if (!PyArg_ParseTuple(args, FLOW_FORMAT "OOOOOOfOOO", FLOW_ARGS(s, n_steps), &params, &window_arg, &z,
                          &positions, &velocities, &g_displacement, &g_kinetic, &grad, &g_points, &workspace))
        return NULL;
    buffer_arg buffers[] = {
        {"params", params, PARAMS, READS, REQUIRED},
        {"z", z, PREACTIVATIONS, READS, REQUIRED},
        {"positions", positions, STEP_POINTS, READS, REQUIRED},
        {"velocities", velocities, STEP_POINTS, READS, REQUIRED},
        {"grad of displacement", g_displacement, POINTS, READS, REQUIRED},
        {"grad", grad, PARAMS, WRITES, REQUIRED},
        {"grad of points", g_points, POINTS, WRITES, NONE_SKIPS},
        {"workspace", workspace, WORKSPACE, WRITES, REQUIRED},
    };
    window_t storage;
    const window_t *window;
    Py_buffer window_view;
    if (!take_flow_arguments(&s, &n_steps, window_arg, &storage, &window, &window_view, buffers, COUNT(buffers)))
        return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run_flow_backward(&s, n_steps, data(&buffers[0]), window, data(&buffers[1]), data(&buffers[2]),
                               data(&buffers[3]), data(&buffers[4]), g_kinetic, data(&buffers[5]), data(&buffers[6]),
                               data(&buffers[7]));
    Py_END_ALLOW_THREADS
    release_arguments(buffers, COUNT(buffers));
    release_window(&window_view);
    return status ? PyErr_NoMemory() : Py_NewRef(Py_None);
}

static PyObject *
py_workspace_size(PyObject *Py_UNUSED(self), PyObject *args)
{
    net_t s = {0};
    if (!PyArg_ParseTuple(args, "(niii)", &s.n, &s.width, &s.depth, &s.out))
        return NULL;
    return PyLong_FromSsize_t(workspace_size(&s));
}

static PyObject *
py_available(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    return PyBool_FromLong(cpu_has_kernels());
}

static PyMethodDef methods[] = {
    {"available", py_available, METH_NOARGS, "available(): whether this CPU runs the kernels (AVX-512F)."},
    {"forward", py_forward, METH_VARARGS,
     "forward((n, width, depth, out), center, half_extent, tau, omega0, scale, points, params, v, z): v = the "
     "network at the points; the sine layers' pre-activations into z, (depth, n, width) and 64-byte aligned, or "
     "nowhere where z is None."},
    {"backward", py_backward, METH_VARARGS,
     "backward((n, width, depth, out), center, half_extent, tau, omega0, scale, points, params, z, grad_v, grad, "
     "grad_points, workspace): the gradient of params into grad and that of the points into grad_points (or not, "
     "where None), from forward's z; workspace of workspace_size((n, width, depth, out)) floats."},
    {"flow_forward", py_flow_forward, METH_VARARGS,
     "flow_forward((n, width, depth, out), center, half_extent, n_steps, omega0, scale, points, params, window, "
     "displacement, z, positions, velocities) -> sum over steps and points of |v|^2: the Euler flow's displacement; "
     "what its backward pass needs into z (n_steps, depth, n, width; 64-byte aligned), positions and the network's "
     "outputs (n_steps, n, 3), or nowhere where they are None.  window: None, or (values, (X, Y, Z), to_voxel) "
     "that v = w f + (1 - w) c is windowed by (c the output layer's bias), w read trilinearly from the "
     "(X, Y, Z) float32 values at the world -> voxel map's 12 floats (3 x 4 rows)."},
    {"flow_backward", py_flow_backward, METH_VARARGS,
     "flow_backward((n, width, depth, out), center, half_extent, n_steps, omega0, scale, params, window, z, "
     "positions, velocities, grad_displacement, grad_kinetic, grad, grad_points, workspace): back through "
     "flow_forward (the same window), whose kinetic output is the mean over steps and points of |v|^2."},
    {"workspace_size", py_workspace_size, METH_VARARGS,
     "workspace_size((n, width, depth, out)): the float32 values backward's workspace holds."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_siren", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__siren(void)
{
    return PyModule_Create(&module);
}
