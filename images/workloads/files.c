/* files OUT [RECORDS]: writes numbered records to OUT through fds 10 and 11
 * in turn, duplicates of one open file (their one position must survive a
 * migration as one), appends each to OUT.log through an O_APPEND fd after
 * seeking to its start (appending must survive), writes each to OUT.rw
 * through an O_RDWR fd and reads it back, while reading its own executable
 * in chunks (a read position that must survive too); then checks the files. */
#include "common.h"
#include <fcntl.h>

#define RECORDS 40

/* Fails unless `path` holds exactly records 0..records-1. */
static void check(const char *path, int records)
{
	FILE *f = fopen(path, "r");
	if (!f)
		fail("reopen");
	for (int i = 0; i < records; i++) {
		int k;
		if (fscanf(f, "record %d\n", &k) != 1 || k != i)
			fail(path);
	}
	if (fgetc(f) != EOF)
		fail("too long");
	fclose(f);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		fail("usage: files OUT [RECORDS]");
	int records = argc > 2 ? atoi(argv[2]) : RECORDS;
	char log[4096], rw[4096];
	snprintf(log, sizeof log, "%s.log", argv[1]);
	snprintf(rw, sizeof rw, "%s.rw", argv[1]);
	int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || dup2(fd, 10) != 10 || dup2(fd, 11) != 11 || close(fd))
		fail("open OUT");
	int app = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
	int both = open(rw, O_RDWR | O_CREAT | O_TRUNC, 0644);
	int in = open("/proc/self/exe", O_RDONLY);
	if (app < 0 || both < 0 || in < 0)
		fail("open");
	uint64_t h = FNV_INIT;
	char rec[64], back[64], chunk[4096];
	for (int i = 0; i < records; i++) {
		int n = snprintf(rec, sizeof rec, "record %d\n", i);
		if (write(10 + i % 2, rec, n) != n)
			fail("write");
		if (lseek(app, 0, SEEK_SET) != 0 || write(app, rec, n) != n)
			fail("append");
		if (write(both, rec, n) != n || lseek(both, -n, SEEK_CUR) < 0 || read(both, back, n) != n
		    || memcmp(rec, back, n))
			fail("read back");
		ssize_t got = read(in, chunk, sizeof chunk);
		if (got < 0)
			fail("read");
		h = fnv(h, chunk, got);
		say("wrote %d\n", i);
		sleep_ms(20);
	}
	if (lseek(in, 0, SEEK_CUR) != (off_t)records * 4096)
		fail("read position");
	close(10);
	close(11);
	close(app);
	close(both);
	check(argv[1], records);
	check(log, records);
	check(rw, records);
	say("RESULT %016llx\n", (unsigned long long)h);
	return 0;
}
