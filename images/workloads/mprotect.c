/* mprotect [STEPS]: 32 pages filled with a pattern, then 8 read-only, 8 PROT_NONE,
 * 8 read-write, 8 read+exec. At the end the protections must still hold
 * (a write to a read-only page and a read of a PROT_NONE page fault) and
 * the contents must be intact. */
#include "common.h"
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>

#define PAGES 32
static sigjmp_buf env;
static void on_segv(int sig) { (void)sig; siglongjmp(env, 1); }

static int faults(volatile char *p, int write)
{
	if (sigsetjmp(env, 1))
		return 1;
	if (write)
		*p = 1;
	else
		(void)*p;
	return 0;
}

int main(int argc, char **argv)
{
	int steps = argc > 1 ? atoi(argv[1]) : 30;
	long pg = sysconf(_SC_PAGESIZE);
	char *m = mmap(0, PAGES * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		fail("mmap");
	for (long i = 0; i < PAGES * pg; i++)
		m[i] = (char)(i * 13 + i / pg);
	if (mprotect(m, 8 * pg, PROT_READ) || mprotect(m + 8 * pg, 8 * pg, PROT_NONE) ||
	    mprotect(m + 24 * pg, 8 * pg, PROT_READ | PROT_EXEC))
		fail("mprotect");
	for (int i = 0; i < steps; i++) {
		m[16 * pg + i] ^= 0x55; /* the read-write part keeps changing */
		m[16 * pg + i] ^= 0x55;
		say("step %d\n", i);
		sleep_ms(25);
	}
	signal(SIGSEGV, on_segv);
	int f = faults(m, 1) + faults(m + 8 * pg, 0) + faults(m + 24 * pg, 1);
	if (f != 3 || faults(m, 0) || faults(m + 16 * pg, 1) || faults(m + 24 * pg, 0))
		fail("protections");
	m[16 * pg] = (char)(16 * pg * 13 + 16); /* undo the probe write */
	if (mprotect(m, PAGES * pg, PROT_READ | PROT_WRITE))
		fail("mprotect back");
	for (long i = 0; i < PAGES * pg; i++)
		if (m[i] != (char)(i * 13 + i / pg))
			fail("contents");
	say("RESULT %016llx\n", (unsigned long long)fnv(FNV_INIT, m, PAGES * pg));
	return 0;
}
