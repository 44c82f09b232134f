/* counter [TICKS]: prints "tick N" every 25 ms. */
#include "common.h"

int main(int argc, char **argv)
{
	int ticks = argc > 1 ? atoi(argv[1]) : 40;
	uint64_t sum = 0;
	for (int i = 0; i < ticks; i++) {
		sum += (uint64_t)i * i;
		say("tick %d\n", i);
		sleep_ms(25);
	}
	say("RESULT %llu\n", (unsigned long long)sum);
	return 0;
}
