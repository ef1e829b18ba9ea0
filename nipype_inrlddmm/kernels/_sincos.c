/* Sine and cosine of a float32 buffer in one vectorised pass, the sine in place.
 *
 * Why: layer by layer, the SIREN layers spent over a quarter of the velocity
 * network's CPU time in torch.sin forwards and torch.cos backwards, each a full
 * pass over the activations.  Both come out of one range reduction, so this
 * pass returns the two together, in about half the time of the two passes on
 * CPUs whose libm sine is slow: the cosine is kept for the backward pass and
 * never recomputed (figures in docs/decisions.md).
 *
 * Method: the polynomial sine and cosine of _sine_poly.h (those of the fused kernels, _siren.c),
 * absolute error under 1.3e-7 on |x| <= SINE_BIG (torch.sin's is about 4e-8).  Elements beyond
 * SINE_BIG, infinities and NaNs are recomputed with libm afterwards, so every input gets its
 * correctly signed sine and cosine, NaN included.
 *
 * Where PyTorch's own sine is fast (AVX-512 CPUs) the 8-lane AVX2 clone lost
 * to the two separate passes; the 16-lane AVX-512 clone is the one that wins
 * there.
 *
 * Compiled with -ffp-contract=off (and never -ffast-math, which would fold
 * SINE_ROUNDER away): the AVX-512, AVX2 and SSE2 clones, chosen at load time by
 * the CPU's features, then round identically (each checked bit for bit, with
 * a scalar -O0 build, on 2e7 inputs), so results do not depend on which one
 * a machine runs.  -fno-trapping-math lets the compiler turn the range test
 * into a vector select.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

#include "_sine_poly.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* Replaces each z by its sine and writes its cosine to c.  Returns nonzero when some element lies
 * outside |z| <= SINE_BIG (or is NaN); those are left for libm. */
CLONES static int
sincos_reduced(float *restrict z, float *restrict c, Py_ssize_t n)
{
    int outside = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const float x = z[i];
        const int inside = fabsf(x) <= SINE_BIG;
        outside |= !inside;
        float sine, cosine;
        sine_poly_sincos(inside ? x : 0.0f, &sine, &cosine); /* 0: keeps the float -> int conversion defined */
        c[i] = cosine;
        z[i] = inside ? sine : x;
    }
    return outside;
}

/* Blocks of 16384 elements (64 KiB a buffer) are shared out over the OpenMP threads.  The extension
 * links the same libgomp.so.1 as PyTorch, so it runs in PyTorch's thread pool, with the count that
 * torch.set_num_threads set; each element's result does not depend on the count. */
#define BLOCK 16384

static void
sincos_f32(float *z, float *c, Py_ssize_t n)
{
    const Py_ssize_t blocks = (n + BLOCK - 1) / BLOCK;
    int outside = 0;
#pragma omp parallel for schedule(static) reduction(| : outside) if (blocks > 1)
    for (Py_ssize_t b = 0; b < blocks; b++) {
        const Py_ssize_t start = b * BLOCK, stop = start + BLOCK < n ? start + BLOCK : n;
        outside |= sincos_reduced(z + start, c + start, stop - start);
    }
    if (!outside)
        return;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!(fabsf(z[i]) <= SINE_BIG)) {
            c[i] = cosf(z[i]);
            z[i] = sinf(z[i]);
        }
    }
}

static PyObject *
py_sincos(PyObject *self, PyObject *args)
{
    Py_buffer z, c;
    if (!PyArg_ParseTuple(args, "w*w*", &z, &c))
        return NULL;
    PyObject *result = NULL;
    if (z.len % sizeof(float) != 0 || c.len != z.len) {
        PyErr_SetString(PyExc_ValueError, "sincos needs two float32 buffers of one size");
    } else if (z.len && (char *)z.buf < (char *)c.buf + c.len && (char *)c.buf < (char *)z.buf + z.len) {
        PyErr_SetString(PyExc_ValueError, "sincos needs two buffers that do not overlap");
    } else {
        Py_BEGIN_ALLOW_THREADS
        sincos_f32((float *)z.buf, (float *)c.buf, z.len / (Py_ssize_t)sizeof(float));
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&z);
    PyBuffer_Release(&c);
    return result;
}

static PyMethodDef methods[] = {
    {"sincos", py_sincos, METH_VARARGS,
     "sincos(z, c): replace z by sin(z) and write cos(z) into c; two C-contiguous float32 buffers of one "
     "size that do not overlap."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sincos", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__sincos(void)
{
    return PyModule_Create(&module);
}
