/*
 * The run's spin page: shared by the model server (_uaccess.c, Waiter) and every process of
 * the program (preload.c, recv_reply), and read by the runner's tests (tests/run/c/spin.c).
 *
 * The model's own design. A request is a synchronous round trip; where the program and the
 * server run on different CPUs and the waiting side sleeps, its CPU goes idle, and waking an
 * idle CPU costs far more than the request (a halted virtual CPU: tens of microseconds). So
 * the waiting side first polls for a while, yielding its CPU at every turn. The page tells each
 * side on which CPU the other last was (spinning where the other shares the CPU would only take
 * the CPU it needs), and holds the one program thread allowed to spin at a time. It holds hints
 * only: no result depends on it.
 */
#ifndef IOMMUFD_MODEL_SPIN_PAGE_H
#define IOMMUFD_MODEL_SPIN_PAGE_H

#include <stdint.h>

/* server_cpu / client_cpu before either side has set it */
#define SPIN_CPU_UNKNOWN UINT32_MAX
/* the longest spin by default, microseconds (IOMMUFD_MODEL_SPIN_US; server.py SPIN_MAX_US) */
#define SPIN_MAX_US 100

struct spin_page {
	uint32_t server_cpu; /* the CPU the server last waited on */
	uint32_t pad0[15];
	uint32_t client_cpu; /* the CPU of the program's last request */
	uint32_t pad1[15];
	int64_t spin_until; /* CLOCK_MONOTONIC ns: the spinning thread's deadline, 0 when none */
};

/* The next budget (ns) of a side whose longest spin is max, after a wait of waited ns that a
 * spin of budget ns (0: none) did not end, as the kernel's cpuidle haltpoll governor adapts
 * its poll: a short wait would have been caught by a longer spin (double it, starting from an
 * eighth of max); a long one was worth sleeping through (halve it, down to none). */
static inline int64_t spin_adapt(int64_t budget, int64_t max, int64_t waited)
{
	if (waited <= max) {
		budget = budget ? budget * 2 : max / 8;
		return budget > max ? max : budget;
	}
	budget /= 2;
	return budget < max / 8 ? 0 : budget;
}

#endif
