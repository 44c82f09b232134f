/* sleeper: relative nanosleep loops and absolute clock_nanosleep loops,
 * both robust to EINTR. */
#include "common.h"

int main(void)
{
	for (int i = 0; i < 6; i++) {
		sleep_ms(100);
		say("slept %d\n", i);
	}
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	for (int i = 0; i < 6; i++) {
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
	say("RESULT 12\n");
	return 0;
}
