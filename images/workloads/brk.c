/* brk: grows (and sometimes shrinks) the heap with sbrk, filling every new
 * chunk; verifies all of it and the exact break at the end. */
#include "common.h"

#define CHUNK (48 * 1024 + 123)

int main(void)
{
	char *base = sbrk(0), *end = base;
	for (int i = 0; i < 40; i++) {
		char *p = sbrk(CHUNK);
		if (p != end)
			fail("sbrk grow");
		end = p + CHUNK;
		for (int j = 0; j < CHUNK; j++)
			p[j] = (char)(i * 7 + j);
		if (i % 5 == 4) {
			if (sbrk(-CHUNK / 2) != end)
				fail("sbrk shrink");
			end -= CHUNK / 2;
		}
		say("grown %d\n", i);
		sleep_ms(20);
	}
	if (sbrk(0) != end)
		fail("break moved");
	/* Replay the same arithmetic to check the contents. */
	char *q = base;
	for (int i = 0; i < 40; i++) {
		int len = (i % 5 == 4) ? CHUNK - CHUNK / 2 : CHUNK;
		for (int j = 0; j < len; j++)
			if (q[j] != (char)(i * 7 + j))
				fail("heap contents");
		q += len;
	}
	say("RESULT %ld %016llx\n", (long)(end - base), (unsigned long long)fnv(FNV_INIT, base, end - base));
	return 0;
}
