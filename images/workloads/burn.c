/* burn [UNITS]: CPU-bound work for the cluster tests and benchmark: UNITS
 * units of integer arithmetic (~0.1 s each natively), printing "unit N" after
 * each, then a checksum that does not depend on where it ran. */
#include "common.h"

#define UNIT_ITERS 60000000ULL

int main(int argc, char **argv)
{
	int units = argc > 1 ? atoi(argv[1]) : 50;
	uint64_t x = 0x9e3779b97f4a7c15ULL;
	for (int u = 0; u < units; u++) {
		for (uint64_t i = 0; i < UNIT_ITERS; i++)
			x = x * 6364136223846793005ULL + (i ^ (x >> 29));
		say("unit %d\n", u);
	}
	say("RESULT %016llx\n", (unsigned long long)x);
	return 0;
}
