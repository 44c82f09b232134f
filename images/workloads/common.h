/* Shared helpers of the checkpoint/restore test workloads: unbuffered
 * output (a restored process continues the same file) and a checksum. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static inline void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf, fmt, ap);
	va_end(ap);
	for (int off = 0; off < n;) {
		ssize_t w = write(1, buf + off, n - off);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			_exit(3);
		off += w;
	}
}

static inline void fail(const char *what)
{
	say("FAIL %s\n", what);
	exit(1);
}

/* Sleeps `ms` milliseconds, resuming after EINTR with the remaining time
 * (a restored process sees EINTR from an interrupted sleep). */
static inline void sleep_ms(long ms)
{
	struct timespec req = { ms / 1000, (ms % 1000) * 1000000L }, rem;
	while (nanosleep(&req, &rem) < 0) {
		if (errno != EINTR)
			fail("nanosleep");
		req = rem;
	}
}

/* FNV-1a, 64 bit. */
static inline uint64_t fnv(uint64_t h, const void *data, size_t len)
{
	const unsigned char *p = data;
	for (size_t i = 0; i < len; i++) {
		h ^= p[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

#define FNV_INIT 0xcbf29ce484222325ULL
