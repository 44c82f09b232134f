/* signals [ITERS]: a SIGUSR1 handler (SA_RESTART, with a mask) that runs all the
 * time, SIGINT ignored, and signals that stay blocked and pending for the
 * whole run: SIGUSR2 and three queued SIGRTMIN+1 (process queue),
 * SIGRTMIN+2 (thread queue). At the end they are unblocked and must all
 * arrive, the real-time ones with their values in order. */
#include "common.h"
#include <signal.h>

static volatile sig_atomic_t usr1, usr2, rt2;
static volatile int rt1_values[8], rt1_count;

static void on_usr1(int sig) { (void)sig; usr1++; }
static void on_usr2(int sig) { (void)sig; usr2++; }
static void on_rt1(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)uc;
	if (rt1_count < 8)
		rt1_values[rt1_count++] = si->si_value.sival_int;
}
static void on_rt2(int sig) { (void)sig; rt2++; }

int main(int argc, char **argv)
{
	struct sigaction sa = { 0 };
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaddset(&sa.sa_mask, SIGTERM);
	sigaction(SIGUSR1, &sa, 0);
	signal(SIGINT, SIG_IGN);

	sigset_t block;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR2);
	sigaddset(&block, SIGRTMIN + 1);
	sigaddset(&block, SIGRTMIN + 2);
	sigprocmask(SIG_BLOCK, &block, 0);
	kill(getpid(), SIGUSR2);
	for (int v = 1; v <= 3; v++)
		sigqueue(getpid(), SIGRTMIN + 1, (union sigval){ .sival_int = v });
	raise(SIGRTMIN + 2);

	int iters = argc > 1 ? atoi(argv[1]) : 40;
	for (int i = 0; i < iters; i++) {
		kill(getpid(), SIGUSR1);
		say("iter %d handled %d\n", i, (int)usr1);
		sleep_ms(20);
	}
	struct sigaction old;
	sigaction(SIGUSR1, 0, &old);
	if (old.sa_handler != on_usr1 || !(old.sa_flags & SA_RESTART) || !sigismember(&old.sa_mask, SIGTERM))
		fail("SIGUSR1 action");
	sigaction(SIGINT, 0, &old);
	if (old.sa_handler != SIG_IGN)
		fail("SIGINT not ignored");
	sigset_t pending;
	sigpending(&pending);
	if (!sigismember(&pending, SIGUSR2) || !sigismember(&pending, SIGRTMIN + 1) || !sigismember(&pending, SIGRTMIN + 2))
		fail("pending set");

	signal(SIGUSR2, on_usr2);
	signal(SIGRTMIN + 2, on_rt2);
	struct sigaction rt = { 0 };
	rt.sa_sigaction = on_rt1;
	rt.sa_flags = SA_SIGINFO;
	sigaction(SIGRTMIN + 1, &rt, 0);
	sigprocmask(SIG_UNBLOCK, &block, 0);
	if (usr2 != 1 || rt2 != 1 || rt1_count != 3 || rt1_values[0] != 1 || rt1_values[1] != 2 || rt1_values[2] != 3)
		fail("pending signals lost");
	say("RESULT usr1=%d usr2=%d rt1=%d,%d,%d rt2=%d\n", (int)usr1, (int)usr2, rt1_values[0], rt1_values[1],
	    rt1_values[2], (int)rt2);
	return 0;
}
