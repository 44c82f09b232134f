/* timers [TICKS]: interval timers, an alternate signal stack and a
 * personality flag. A periodic ITIMER_REAL drives TICKS "real tick N" lines
 * (SIGALRM handler on the alternate stack, SA_ONSTACK); half-way SIGALRM is
 * held blocked for 200 ms (the expired timer then waits for its signal to be
 * taken before it restarts); ITIMER_VIRTUAL and
 * ITIMER_PROF tick while it burns CPU for 10 "virtual tick N" lines; then a
 * one-shot alarm(1) must fire exactly once. Every handler checks that it
 * runs on the alternate stack; at the end the stack, the personality and the
 * disarmed timers are checked. */
#include "common.h"
#include <signal.h>
#include <sys/personality.h>
#include <sys/time.h>

static char altstack[64 * 1024];
static volatile sig_atomic_t real, virt, prof, off_stack;

static void on_timer(int sig)
{
	char here;
	uintptr_t at = (uintptr_t)&here, base = (uintptr_t)altstack;
	if (at < base || at >= base + sizeof altstack)
		off_stack++;
	if (sig == SIGALRM)
		real++;
	else if (sig == SIGVTALRM)
		virt++;
	else
		prof++;
}

static void arm(int which, long interval_us, long value_us)
{
	struct itimerval t = { { interval_us / 1000000, interval_us % 1000000 },
			       { value_us / 1000000, value_us % 1000000 } };
	if (setitimer(which, &t, 0))
		fail("setitimer");
}

int main(int argc, char **argv)
{
	int ticks = argc > 1 ? atoi(argv[1]) : 30;
	if (personality(PER_LINUX | ADDR_NO_RANDOMIZE) < 0)
		fail("personality");
	stack_t ss = { .ss_sp = altstack, .ss_size = sizeof altstack };
	if (sigaltstack(&ss, 0))
		fail("sigaltstack");
	struct sigaction sa = { 0 };
	sa.sa_handler = on_timer;
	sa.sa_flags = SA_ONSTACK | SA_RESTART;
	sigaction(SIGALRM, &sa, 0);
	sigaction(SIGVTALRM, &sa, 0);
	sigaction(SIGPROF, &sa, 0);
	sigset_t alrm;
	sigemptyset(&alrm);
	sigaddset(&alrm, SIGALRM);

	/* A tick may fall between the test and pause(): then it waits one
	 * more period, the output is the same. */
	arm(ITIMER_REAL, 20000, 20000);
	for (int i = 0; i < ticks; i++) {
		while (real <= i)
			pause();
		say("real tick %d\n", i);
		if (i == ticks / 2) {
			sigprocmask(SIG_BLOCK, &alrm, 0);
			say("holding SIGALRM\n");
			sleep_ms(200);
			sigprocmask(SIG_UNBLOCK, &alrm, 0);
		}
	}

	arm(ITIMER_VIRTUAL, 10000, 10000);
	arm(ITIMER_PROF, 10000, 10000);
	volatile uint64_t burn = 0;
	for (int i = 0; i < 10; i++) {
		while (virt <= i)
			burn = burn * 6364136223846793005ULL + 1;
		say("virtual tick %d\n", i);
	}
	arm(ITIMER_VIRTUAL, 0, 0);
	arm(ITIMER_PROF, 0, 0);

	/* The periodic timer stops (a SIGALRM already queued arrives at the
	 * unblock); then exactly one alarm. */
	sigprocmask(SIG_BLOCK, &alrm, 0);
	arm(ITIMER_REAL, 0, 0);
	sigprocmask(SIG_UNBLOCK, &alrm, 0);
	int before = real;
	alarm(1);
	while (real == before)
		pause();
	say("alarm\n");

	struct itimerval left;
	for (int which = ITIMER_REAL; which <= ITIMER_PROF; which++) {
		if (getitimer(which, &left))
			fail("getitimer");
		if (left.it_value.tv_sec || left.it_value.tv_usec || left.it_interval.tv_sec || left.it_interval.tv_usec)
			fail("a timer still armed");
	}
	if (real != before + 1)
		fail("more than one alarm");
	if (off_stack)
		fail("a handler ran off the alternate stack");
	if (prof == 0)
		fail("no SIGPROF");
	stack_t now;
	if (sigaltstack(0, &now) || now.ss_sp != altstack || now.ss_size != sizeof altstack || now.ss_flags)
		fail("alternate stack lost");
	if (personality(0xffffffff) != (PER_LINUX | ADDR_NO_RANDOMIZE))
		fail("personality lost");
	say("RESULT real=%d virtual=10 alarm=1\n", ticks);
	return 0;
}
