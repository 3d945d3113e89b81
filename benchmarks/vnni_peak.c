/* u8 x s8 -> s32 dot-product throughput of one core: a loop of independent vpdpbusd zmm instructions.
 * Each vpdpbusd zmm does 16 lanes x 4 = 64 multiply-accumulates. 16 accumulators hide the instruction's
 * latency (4-5 cycles) so only its throughput limits the loop. Built by benchmarks/vnni_peak.py with
 * gcc -O2 -mavx512f -mavx512vnni and called through ctypes. `add_chain` measures the clock: 8 dependent
 * 1-cycle register adds per iteration (x += x: an add of an immediate can be folded at rename on some
 * cores and runs faster than one per cycle), so cycles = 8 x iterations. */
#include <immintrin.h>
#include <stdint.h>

#define MACS_PER_ITER (16 * 64)

int64_t vnni_loop(int64_t iters, int32_t *sink) {
    __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    /* distinct start values: identical accumulators would be merged into one by the compiler */
#define ACC(k) __m512i c##k = _mm512_set1_epi32(k)
    ACC(0); ACC(1); ACC(2); ACC(3); ACC(4); ACC(5); ACC(6); ACC(7);
    ACC(8); ACC(9); ACC(10); ACC(11); ACC(12); ACC(13); ACC(14); ACC(15);
    for (int64_t i = 0; i < iters; i++) {
        c0 = _mm512_dpbusd_epi32(c0, a, b);   c1 = _mm512_dpbusd_epi32(c1, a, b);
        c2 = _mm512_dpbusd_epi32(c2, a, b);   c3 = _mm512_dpbusd_epi32(c3, a, b);
        c4 = _mm512_dpbusd_epi32(c4, a, b);   c5 = _mm512_dpbusd_epi32(c5, a, b);
        c6 = _mm512_dpbusd_epi32(c6, a, b);   c7 = _mm512_dpbusd_epi32(c7, a, b);
        c8 = _mm512_dpbusd_epi32(c8, a, b);   c9 = _mm512_dpbusd_epi32(c9, a, b);
        c10 = _mm512_dpbusd_epi32(c10, a, b); c11 = _mm512_dpbusd_epi32(c11, a, b);
        c12 = _mm512_dpbusd_epi32(c12, a, b); c13 = _mm512_dpbusd_epi32(c13, a, b);
        c14 = _mm512_dpbusd_epi32(c14, a, b); c15 = _mm512_dpbusd_epi32(c15, a, b);
        /* keep a and b in registers but opaque to the compiler, so nothing is hoisted or folded */
        __asm__ volatile("" : "+v"(a), "+v"(b));
    }
    __m512i s = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                                 _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
    s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c8, c9), _mm512_add_epi32(c10, c11)),
                                             _mm512_add_epi32(_mm512_add_epi32(c12, c13), _mm512_add_epi32(c14, c15))));
    *sink = _mm512_reduce_add_epi32(s);
    return iters * MACS_PER_ITER;
}

int64_t add_chain(int64_t iters) {
    int64_t x = 1;
    for (int64_t i = 0; i < iters; i++)
        __asm__ volatile("add %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\t"
                         "add %0, %0\n\tadd %0, %0\n\tadd %0, %0\n\tadd %0, %0" : "+r"(x));
    return 8 * iters + (x & 0);  /* cycles */
}
