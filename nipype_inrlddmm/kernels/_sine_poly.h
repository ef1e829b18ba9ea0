/* The one sine and cosine of the compiled backend: _sincos.c (the layer-by-layer path, any CPU)
 * and _siren.c (the fused network, AVX-512F) both take theirs from here, so the two compute the same
 * function and differ only in rounding: _sincos.c evaluates the steps below one rounding at a time,
 * _siren.c the same steps with fused multiply-adds.
 *
 * Method: x = k pi + r with |r| <= pi/2.  k is x / pi rounded to the nearest integer (ties to even) by
 * adding and subtracting SINE_ROUNDER; r = x - k pi by a three-part Cody-Waite reduction, pi split
 * into SINE_PI_A + SINE_PI_B + SINE_PI_C.  SINE_PI_A has 8 significant bits and SINE_PI_B 11, so
 * while |k| < 2^12 their products with k are exact and only the last step rounds.  Then
 * sin x = (-1)^k sin r and cos x = (-1)^k cos r, by minimax polynomials of degree 9 and 10 on
 * [-pi/2, pi/2] (float32 coefficients; absolute error under 5e-9 before rounding).  Reducing by pi
 * rather than pi/2 gives the sine and the cosine one sign and no choice between them, so a pass that
 * wants the sine alone (the fused forward pass) pays for nothing else.
 *
 * The reduction holds for |x| <= SINE_BIG, where |k| < 2^12; beyond it, and for infinities and NaN,
 * the callers take libm's sinf and cosf.
 */
#ifndef SINE_POLY_H
#define SINE_POLY_H

#define SINE_BIG 8192.0f
/* Adding and subtracting 1.5 * 2^23 rounds a float below 2^22 to the nearest integer, as rintf
 * does, in two additions that vectorise on any SIMD set (never compile with -ffast-math, which
 * would fold them away). */
#define SINE_ROUNDER 12582912.0f
#define SINE_INV_PI 0.318309886183790672f
#define SINE_PI_A 3.140625f
#define SINE_PI_B 9.67502593994140625e-4f
#define SINE_PI_C 1.509957990978376432e-7f

/* sin r = r + r^3 (S3 + r^2 (S5 + r^2 (S7 + r^2 S9))) */
#define SINE_S3 -0.16666656732559204f
#define SINE_S5 0.008333008736371994f
#define SINE_S7 -0.00019806032651104033f
#define SINE_S9 2.598861328806379e-06f

/* cos r = (1 - r^2 / 2) + r^4 (C4 + r^2 (C6 + r^2 (C8 + r^2 C10))) */
#define SINE_C4 0.041666656732559204f
#define SINE_C6 -0.001388858538120985f
#define SINE_C8 2.4770179152255878e-05f
#define SINE_C10 -2.620901682348631e-07f

/* sin x and cos x for |x| <= SINE_BIG, one element at a time: plain arithmetic, which the compiler
 * vectorises in the caller's loop. */
static inline void
sine_poly_sincos(float x, float *sine, float *cosine)
{
    const float k = (x * SINE_INV_PI + SINE_ROUNDER) - SINE_ROUNDER;
    const float r = ((x - k * SINE_PI_A) - k * SINE_PI_B) - k * SINE_PI_C;
    const float r2 = r * r;
    const float s = r + r * r2 * (SINE_S3 + r2 * (SINE_S5 + r2 * (SINE_S7 + r2 * SINE_S9)));
    const float c = (1.0f - 0.5f * r2) + r2 * r2 * (SINE_C4 + r2 * (SINE_C6 + r2 * (SINE_C8 + r2 * SINE_C10)));
    const int odd = (int)k & 1;
    *sine = odd ? -s : s;
    *cosine = odd ? -c : c;
}

#endif /* SINE_POLY_H */
