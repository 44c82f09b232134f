/* hold MODE: sets up something that cannot migrate, prints "ready", then
 * prints "alive N" every 20 ms for about 4 s. MODE: thread, socket, shm,
 * sysv, pipe, device, timer (a POSIX timer), deleted (a file it has open is
 * removed). */
#include "common.h"
#include <fcntl.h>
#include <pthread.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <time.h>

static void *idle(void *arg)
{
	(void)arg;
	for (;;)
		pause();
	return 0;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	if (!strcmp(mode, "thread")) {
		pthread_t t;
		if (pthread_create(&t, 0, idle, 0))
			fail("pthread_create");
	} else if (!strcmp(mode, "socket")) {
		if (socket(AF_UNIX, SOCK_STREAM, 0) < 0)
			fail("socket");
	} else if (!strcmp(mode, "shm")) {
		if (mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0) == MAP_FAILED)
			fail("mmap");
	} else if (!strcmp(mode, "sysv")) {
		int id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
		if (id < 0 || shmat(id, 0, 0) == (void *)-1)
			fail("shm");
		shmctl(id, IPC_RMID, 0);
	} else if (!strcmp(mode, "pipe")) {
		int p[2];
		if (pipe(p))
			fail("pipe");
	} else if (!strcmp(mode, "device")) {
		if (open("/dev/urandom", O_RDONLY) < 0)
			fail("open");
	} else if (!strcmp(mode, "timer")) {
		timer_t t;
		if (timer_create(CLOCK_MONOTONIC, 0, &t))
			fail("timer_create");
	} else if (!strcmp(mode, "deleted")) {
		char path[64];
		snprintf(path, sizeof path, "/tmp/pmivmm-hold-%d", (int)getpid());
		if (open(path, O_RDWR | O_CREAT | O_TRUNC, 0600) < 0 || unlink(path))
			fail("deleted");
	} else {
		fail("unknown mode");
	}
	say("ready\n");
	for (int i = 0; i < 200; i++) {
		say("alive %d\n", i);
		sleep_ms(20);
	}
	say("RESULT 200\n");
	return 0;
}
