/* guestbench: micro-benchmark of the operations whose cost differs most
 * between a guest whose kernel is emulated (the development hosts' kvm_pvm)
 * and the host. `pmivmm bench guest` runs it in a node and on the host and
 * prints both side by side.
 *
 * Usage: guestbench [OP...]   (default: every op)
 * Output, one line per op:  OP COUNT CYCLES [note]
 * CYCLES are TSC cycles for COUNT repetitions (user-mode RDTSC, which runs
 * natively in the guest: the host converts with its own TSC rate), or
 * "-" when the op is not supported here (the note says why). */
#include "common.h"

#include <spawn.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <x86intrin.h>

extern char **environ;

#define PAGE 4096UL
#define MIB (1024UL * 1024UL)

static uint64_t op_syscall(void)
{
	for (int i = 0; i < 200; i++)
		syscall(SYS_getppid);
	return 200;
}

static uint64_t op_fork_wait(void)
{
	for (int i = 0; i < 3; i++) {
		pid_t p = fork();
		if (p < 0)
			fail("fork");
		if (p == 0)
			_exit(0);
		if (waitpid(p, 0, 0) != p)
			fail("waitpid");
	}
	return 3;
}

static uint64_t op_exec(void)
{
	char *argv[] = { "true", 0 };
	for (int i = 0; i < 3; i++) {
		pid_t p;
		if (posix_spawn(&p, "/bin/true", 0, 0, argv, environ))
			fail("posix_spawn /bin/true");
		if (waitpid(p, 0, 0) != p)
			fail("waitpid");
	}
	return 3;
}

static uint64_t op_touch_4k(void)
{
	const size_t n = 128;
	volatile char *m = mmap(0, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		fail("mmap");
	for (size_t i = 0; i < n; i++)
		m[i * PAGE] = 1;
	munmap((void *)m, n * PAGE);
	return n;
}

static uint64_t op_populate_64m(void)
{
	void *m = mmap(0, 64 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (m == MAP_FAILED)
		fail("mmap 64 MiB");
	munmap(m, 64 * MIB);
	return 1;
}

/* One 2 MiB-aligned anonymous range with MADV_HUGEPAGE, first touch. 0 if
 * the kernel has no transparent huge pages. */
static uint64_t op_huge_2m(void)
{
	char *m = mmap(0, 4 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		fail("mmap 4 MiB");
	char *aligned = (char *)(((uintptr_t)m + 2 * MIB - 1) & ~(2 * MIB - 1));
	if (madvise(aligned, 2 * MIB, MADV_HUGEPAGE)) {
		munmap(m, 4 * MIB);
		return 0;
	}
	*(volatile char *)aligned = 1;
	munmap(m, 4 * MIB);
	return 1;
}

static uint64_t op_pipe_16m(void)
{
	static char buf[64 * 1024];
	int fds[2];
	if (pipe(fds))
		fail("pipe");
	pid_t p = fork();
	if (p < 0)
		fail("fork");
	if (p == 0) {
		close(fds[0]);
		for (size_t done = 0; done < 16 * MIB; done += sizeof buf)
			if (write(fds[1], buf, sizeof buf) != sizeof buf)
				_exit(1);
		_exit(0);
	}
	close(fds[1]);
	size_t got = 0;
	for (ssize_t r; (r = read(fds[0], buf, sizeof buf)) != 0;) {
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			fail("read");
		got += r;
	}
	close(fds[0]);
	waitpid(p, 0, 0);
	if (got != 16 * MIB)
		fail("pipe: short");
	return 1;
}

static const struct {
	const char *name;
	uint64_t (*run)(void);
	const char *unsupported;
} ops[] = {
	{ "syscall", op_syscall, 0 },
	{ "fork_wait", op_fork_wait, 0 },
	{ "exec", op_exec, 0 },
	{ "touch_4k", op_touch_4k, 0 },
	{ "populate_64m", op_populate_64m, 0 },
	{ "huge_2m", op_huge_2m, "no transparent huge pages in this kernel" },
	{ "pipe_16m", op_pipe_16m, 0 },
};

int main(int argc, char **argv)
{
	for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
		int wanted = argc < 2;
		for (int a = 1; a < argc; a++)
			wanted |= !strcmp(argv[a], ops[i].name);
		if (!wanted)
			continue;
		uint64_t t0 = __rdtsc();
		uint64_t count = ops[i].run();
		uint64_t cycles = __rdtsc() - t0;
		if (count)
			say("%s %llu %llu\n", ops[i].name, (unsigned long long)count, (unsigned long long)cycles);
		else
			say("%s 0 - %s\n", ops[i].name, ops[i].unsupported);
	}
	return 0;
}
