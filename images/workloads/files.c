/* files OUT [RECORDS]: writes numbered records to OUT through fd 10 (its position
 * must survive a migration), while reading its own executable in chunks
 * (a read position that must survive too); then checks OUT. */
#include "common.h"
#include <fcntl.h>

#define RECORDS 40

int main(int argc, char **argv)
{
	if (argc < 2)
		fail("usage: files OUT [RECORDS]");
	int records = argc > 2 ? atoi(argv[2]) : RECORDS;
	int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || dup2(fd, 10) != 10 || close(fd))
		fail("open OUT");
	int in = open("/proc/self/exe", O_RDONLY);
	if (in < 0)
		fail("open exe");
	uint64_t h = FNV_INIT;
	char rec[64], chunk[4096];
	for (int i = 0; i < records; i++) {
		int n = snprintf(rec, sizeof rec, "record %d\n", i);
		if (write(10, rec, n) != n)
			fail("write");
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
	FILE *f = fopen(argv[1], "r");
	if (!f)
		fail("reopen OUT");
	for (int i = 0; i < records; i++) {
		int k;
		if (fscanf(f, "record %d\n", &k) != 1 || k != i)
			fail("OUT contents");
	}
	if (fgetc(f) != EOF)
		fail("OUT too long");
	say("RESULT %016llx\n", (unsigned long long)h);
	return 0;
}
