/* memory [MIB] [PASSES]: fills MIB MiB with a pattern, then in every pass
 * verifies and rewrites it; prints the final checksum. */
#include "common.h"

static uint64_t pattern(uint64_t i, uint64_t pass)
{
	uint64_t x = i * 0x9e3779b97f4a7c15ULL + pass;
	x ^= x >> 29;
	x *= 0xbf58476d1ce4e5b9ULL;
	return x ^ (x >> 32);
}

int main(int argc, char **argv)
{
	size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 4;
	int passes = argc > 2 ? atoi(argv[2]) : 30;
	size_t n = mib * (1 << 20) / 8;
	uint64_t *buf = malloc(n * 8);
	if (!buf)
		fail("malloc");
	for (size_t i = 0; i < n; i++)
		buf[i] = pattern(i, 0);
	for (int pass = 1; pass <= passes; pass++) {
		for (size_t i = 0; i < n; i++) {
			if (buf[i] != pattern(i, pass - 1))
				fail("pattern");
			buf[i] = pattern(i, pass);
		}
		say("pass %d ok\n", pass);
		sleep_ms(20);
	}
	say("RESULT %016llx\n", (unsigned long long)fnv(FNV_INIT, buf, n * 8));
	return 0;
}
