/* fpu [ROUNDS]: long floating-point computations that keep their state in x87, SSE
 * and (when the CPU has it and NOAVX is unset) AVX registers across many
 * iterations, under a non-default MXCSR rounding mode and x87 precision. */
#include "common.h"
#include <immintrin.h>

#define ROUNDS 30
#define ITERS 3000000

static __m128d sse_round(__m128d a, __m128d b)
{
	for (int i = 0; i < ITERS; i++) {
		a = _mm_add_pd(_mm_mul_pd(a, _mm_set1_pd(0.9999999)), b);
		b = _mm_sub_pd(b, _mm_mul_pd(a, _mm_set1_pd(1e-9)));
	}
	return _mm_add_pd(a, b);
}

__attribute__((target("avx"))) static void avx_round(double out[4], double seed)
{
	__m256d a = _mm256_set_pd(seed, seed + 1, seed + 2, seed + 3), b = _mm256_set1_pd(0.5);
	for (int i = 0; i < ITERS; i++) {
		a = _mm256_add_pd(_mm256_mul_pd(a, _mm256_set1_pd(0.9999999)), b);
		b = _mm256_sub_pd(b, _mm256_mul_pd(a, _mm256_set1_pd(1e-9)));
	}
	_mm256_storeu_pd(out, _mm256_add_pd(a, b));
}

static long double x87_round(long double x)
{
	for (int i = 0; i < ITERS / 4; i++)
		x = x * 0.99999999L + 1.0L / (i + 3);
	return x;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : ROUNDS;
	int avx = __builtin_cpu_supports("avx") && !getenv("NOAVX");
	/* Round toward zero, and x87 at 53-bit precision: a restore that loses
	 * MXCSR or the x87 control word changes the results. */
	_mm_setcsr((_mm_getcsr() & ~0x6000) | 0x6000);
	unsigned short cw;
	__asm__ volatile("fnstcw %0" : "=m"(cw));
	cw = (cw & ~0x300) | 0x200;
	__asm__ volatile("fldcw %0" : : "m"(cw));

	uint64_t h = FNV_INIT;
	__m128d a = _mm_set_pd(1.0, 2.0), b = _mm_set_pd(0.25, 0.125);
	long double x = 1.0L;
	for (int r = 0; r < rounds; r++) {
		a = sse_round(a, b);
		x = x87_round(x);
		double v[2], w[4] = { 0 };
		_mm_storeu_pd(v, a);
		if (avx)
			avx_round(w, v[0]);
		double xd = (double)x;
		h = fnv(h, v, sizeof v);
		h = fnv(h, w, sizeof w);
		h = fnv(h, &xd, sizeof xd);
		say("round %d\n", r);
	}
	say("RESULT %s %016llx\n", avx ? "avx" : "sse", (unsigned long long)h);
	return 0;
}
