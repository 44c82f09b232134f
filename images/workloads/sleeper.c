/* sleeper [N]: N (default 6) relative nanosleeps of 100 ms, then N absolute
 * clock_nanosleep loops, both robust to EINTR. */
#include "common.h"

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 6;
	for (int i = 0; i < n; i++) {
		sleep_ms(100);
		say("slept %d\n", i);
	}
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	for (int i = 0; i < n; i++) {
		t.tv_nsec += 100000000L;
		if (t.tv_nsec >= 1000000000L) {
			t.tv_nsec -= 1000000000L;
			t.tv_sec++;
		}
		int r;
		while ((r = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, 0)) == EINTR)
			;
		if (r)
			fail("clock_nanosleep");
		say("woke %d\n", i);
	}
	say("RESULT %d\n", 2 * n);
	return 0;
}
