/*
 * Trapped MMIO under the runner (tests/run/test_vfio_mmio.py): a program maps two pages of
 * a model file's BAR 0 (the test's register file) and reaches its registers with the
 * instruction forms a driver's readb..readq/writeb..writeq and iosubmit_cmds512 compile to,
 * written out in asm so that the encodings are the ones named. argv[1] picks the scenario.
 */
#include "prelude.h"
#include <sys/eventfd.h>

#define DOORBELL 0x100
#define COUNT 0x108
#define STATUS 0x110
#define PORTAL 0x200
#define UNBACKED 0x300

static volatile uint8_t *bar;

static uint64_t rdq(unsigned off)
{
	uint64_t v;

	asm volatile("movq %1, %0" : "=r"(v) : "m"(*(volatile uint64_t *)(bar + off)));
	return v;
}

static uint32_t rdl(unsigned off)
{
	uint32_t v;

	asm volatile("movl %1, %0" : "=r"(v) : "m"(*(volatile uint32_t *)(bar + off)));
	return v;
}

static void wrq(unsigned off, uint64_t v)
{
	asm volatile("movq %0, %1" : : "r"(v), "m"(*(volatile uint64_t *)(bar + off)));
}

static void wrl(unsigned off, uint32_t v)
{
	asm volatile("movl %0, %1" : : "r"(v), "m"(*(volatile uint32_t *)(bar + off)));
}

static void wrw(unsigned off, uint16_t v)
{
	asm volatile("movw %0, %1" : : "r"(v), "m"(*(volatile uint16_t *)(bar + off)));
}

static void wrb(unsigned off, uint8_t v)
{
	asm volatile("movb %0, %1" : : "q"(v), "m"(*(volatile uint8_t *)(bar + off)));
}

static void movdir64b(unsigned off, const void *src)
{
	asm volatile(".byte 0x66, 0x0f, 0x38, 0xf8, 0x02"
		     : "+m"(*(volatile char(*)[64])(bar + off))
		     : "m"(*(const char(*)[64])src), "a"(bar + off), "d"(src));
}

static void sizes(void)
{
	uint64_t v;
	uint16_t w;
	uint8_t b;

	wrq(0, 0x1122334455667788ULL);
	CHECK(rdq(0) == 0x1122334455667788ULL);
	CHECK(rdl(0) == 0x55667788);
	CHECK(rdl(4) == 0x11223344);
	asm volatile("movw %1, %0" : "=r"(w) : "m"(*(volatile uint16_t *)(bar + 2)));
	CHECK(w == 0x5566);
	asm volatile("movb %1, %0" : "=q"(b) : "m"(*(volatile uint8_t *)(bar + 7)));
	CHECK(b == 0x11);
	/* a 16-bit load keeps bits 16-63, a 32-bit one clears bits 32-63 */
	v = ~0ULL;
	asm volatile("movw %1, %w0" : "+r"(v) : "m"(*(volatile uint16_t *)(bar + 2)));
	CHECK(v == 0xffffffffffff5566ULL);
	v = ~0ULL;
	asm volatile("movl %1, %k0" : "+r"(v) : "m"(*(volatile uint32_t *)(bar + 0)));
	CHECK(v == 0x55667788);
	/* AH is bits 8-15 of RAX: a load keeps the rest, a store takes those bits */
	v = 0x0123456789abcdefULL;
	asm volatile("movb (%1), %%ah" : "+a"(v) : "D"(bar + 6) : "memory");
	CHECK(v == 0x0123456789ab22efULL);
	v = 0x7700;
	asm volatile("movb %%ah, (%1)" : : "a"(v), "D"(bar + 16) : "memory");
	/* SIL needs a REX prefix (40 88 /r) */
	asm volatile("movb %%sil, %1" : : "S"(0x1234ULL), "m"(*(volatile uint8_t *)(bar + 17)));
	wrw(18, 0xbeef);
	wrl(20, 0xcafef00d);
	CHECK(rdq(16) == 0xcafef00dbeef3477ULL);
}

static void extensions(void)
{
	uint64_t q;
	uint32_t l;

	wrb(8, 0x80);
	wrw(10, 0x8001);
	wrl(12, 0x80000001);
	asm volatile("movzbl %1, %0" : "=r"(l) : "m"(*(volatile uint8_t *)(bar + 8)));
	CHECK(l == 0x80);
	asm volatile("movsbl %1, %0" : "=r"(l) : "m"(*(volatile uint8_t *)(bar + 8)));
	CHECK(l == 0xffffff80);
	q = 0;
	asm volatile("movsbq %1, %0" : "=r"(q) : "m"(*(volatile uint8_t *)(bar + 8)));
	CHECK(q == 0xffffffffffffff80ULL);
	asm volatile("movzwl %1, %0" : "=r"(l) : "m"(*(volatile uint16_t *)(bar + 10)));
	CHECK(l == 0x8001);
	q = 0;
	asm volatile("movswq %1, %0" : "=r"(q) : "m"(*(volatile uint16_t *)(bar + 10)));
	CHECK(q == 0xffffffffffff8001ULL);
	q = ~0ULL;
	asm volatile("movsbw %1, %w0" : "+r"(q) : "m"(*(volatile uint8_t *)(bar + 8)));
	CHECK(q == 0xffffffffffffff80ULL);
	q = 0;
	asm volatile("movslq %1, %0" : "=r"(q) : "m"(*(volatile uint32_t *)(bar + 12)));
	CHECK(q == 0xffffffff80000001ULL);
}

static void immediates_and_addressing(void)
{
	uint64_t v;

	asm volatile("movb $0x5a, %0" : "=m"(*(volatile uint8_t *)(bar + 24)));
	asm volatile("movw $0x1234, %0" : "=m"(*(volatile uint16_t *)(bar + 26)));
	asm volatile("movl $0x9abcdef0, %0" : "=m"(*(volatile uint32_t *)(bar + 28)));
	CHECK(rdq(24) == 0x9abcdef01234ff5aULL); /* byte 25 has no register */
	asm volatile("movq $-2, %0" : "=m"(*(volatile uint64_t *)(bar + 32)));
	CHECK(rdq(32) == 0xfffffffffffffffeULL);
	/* r8-r15, SIB with a scaled index, disp8 and disp32 */
	{
		register uint64_t val asm("r13") = 0x0badc0dedeadbeefULL;
		register volatile uint8_t *base asm("r9") = bar;
		register uint64_t index asm("r12") = 5;
		register uint64_t out asm("r14");

		asm volatile("movq %0, (%1,%2,8)" : : "r"(val), "r"(base), "r"(index) : "memory");
		asm volatile("movq (%1,%2,8), %0" : "=r"(out) : "r"(base), "r"(index) : "memory");
		CHECK(out == 0x0badc0dedeadbeefULL);
		asm volatile("movl 0x28(%1), %k0" : "=r"(out) : "r"(base) : "memory");
		CHECK(out == 0xdeadbeef);
		asm volatile("movl 0x12c(%1), %k0" : "=r"(out) : "r"(base) : "memory");
		CHECK(out == 0xffffffff); /* no register there: all ones */
	}
	v = 0;
	asm volatile("movq %1, %0" : "=r"(v) : "m"(*(volatile uint64_t *)(bar + UNBACKED)));
	CHECK(v == ~0ULL);
}

static void ordering(void)
{
	uint64_t before = rdq(COUNT);
	char src[64] __attribute__((aligned(64)));
	int i;

	/* a doorbell is seen at once by the status read that follows it */
	wrl(DOORBELL, 41);
	CHECK(rdl(STATUS) == 42);
	/* identical back-to-back writes are two accesses */
	wrl(DOORBELL, 7);
	wrl(DOORBELL, 7);
	CHECK(rdq(COUNT) == before + 3);
	for (i = 0; i < 64; i++)
		src[i] = (char)i;
	movdir64b(PORTAL, src);
	movdir64b(PORTAL, src);
	CHECK(rdq(COUNT) == before + 5);
}

static void map(int fd, int prot)
{
	bar = mmap(NULL, 2 * 4096, prot, MAP_SHARED, fd, 0);
	CHECK(bar != MAP_FAILED);
}

static void own_handler(int sig)
{
	_exit(sig == SIGSEGV ? 42 : 43);
}

static void *hammer(void *arg)
{
	int i;

	for (i = 0; i < 100; i++)
		wrl(DOORBELL, (uint32_t)(uintptr_t)arg);
	return NULL;
}

int main(int argc, char **argv)
{
	const char *what = argc > 1 ? argv[1] : "access";
	int fd = open("/dev/model-regs", O_RDWR);
	volatile uint8_t *high;

	CHECK(fd >= 0);
	if (!strcmp(what, "own-handler"))
		signal(SIGSEGV, own_handler);
	map(fd, strcmp(what, "readonly") ? PROT_READ | PROT_WRITE : PROT_READ);
	if (!strcmp(what, "access")) {
		sizes();
		extensions();
		immediates_and_addressing();
		ordering();
		/* a mapping at page offset 1 reaches register 0x1000 on */
		high = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 4096);
		CHECK(high != MAP_FAILED);
		*(volatile uint32_t *)(high + 0x10) = 0x600d;
		CHECK(*(volatile uint32_t *)(bar + 0x1010) == 0x600d);
		CHECK(munmap((void *)high, 4096) == 0);
		/* the first page unmapped, the second still reaches the device */
		CHECK(munmap((void *)bar, 4096) == 0);
		CHECK(*(volatile uint32_t *)(bar + 0x1010) == 0x600d);
		return 0;
	}
	if (!strcmp(what, "fileops")) {
		int efd = eventfd(0, 0);
		uint64_t n = 0;
		uint8_t buf[4];
		uint16_t w = 0xbeef;

		CHECK(efd >= 0);
		CHECK(ioctl(fd, 0x3b42, &efd) == 0x42);
		CHECK(read(efd, &n, 8) == 8 && n == 1);
		CHECK(pread(fd, buf, 4, 0x40) == 4 && buf[0] == 0x40 && buf[3] == 0x43);
		CHECK(pwrite(fd, &w, 2, 0x44) == 2);
		CHECK(read(fd, buf, 3) == 3 && buf[2] == 2);
		CHECK(write(fd, "z", 1) == 1);
		return 0;
	}
	if (!strcmp(what, "readonly")) {
		CHECK(rdl(STATUS) != 0 || 1);
		wrl(DOORBELL, 1); /* no PROT_WRITE: SIGSEGV */
		return 0;
	}
	if (!strcmp(what, "undecodable")) {
		asm volatile("lock addl $1, %0" : "+m"(*(volatile uint32_t *)(bar + DOORBELL)));
		return 0;
	}
	if (!strcmp(what, "plain-segv") || !strcmp(what, "own-handler")) {
		wrl(DOORBELL, 1);
		*(volatile int *)(uintptr_t)8 = 1;
		return 0;
	}
	if (!strcmp(what, "fork")) {
		pid_t child = fork();
		int status;

		CHECK(child >= 0);
		if (!child) {
			wrl(DOORBELL, 5);
			_exit(rdl(STATUS) == 6 ? 0 : 1);
		}
		CHECK(waitpid(child, &status, 0) == child);
		CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
		wrl(DOORBELL, 9);
		CHECK(rdl(STATUS) == 10);
		return 0;
	}
	if (!strcmp(what, "remap")) {
		/* the trap table changes (a page of the BAR mapped again over itself, which
		 * splits its entry and adds one) while four threads write the doorbell through
		 * the first page: every write is trapped and reaches the device */
		pthread_t t[4];
		uint64_t before = rdq(COUNT);
		int i;

		for (i = 0; i < 4; i++)
			CHECK(pthread_create(&t[i], NULL, hammer, (void *)(uintptr_t)i) == 0);
		for (i = 0; i < 200; i++) {
			high = mmap((void *)(bar + 4096), 4096, PROT_READ | PROT_WRITE,
				    MAP_SHARED | MAP_FIXED, fd, 4096);
			CHECK(high == bar + 4096);
			*(volatile uint32_t *)(high + 0x10) = (uint32_t)i;
		}
		for (i = 0; i < 4; i++)
			pthread_join(t[i], NULL);
		CHECK(rdq(COUNT) == before + 400);
		CHECK(*(volatile uint32_t *)(bar + 0x1010) == 199);
		return 0;
	}
	if (!strcmp(what, "threads")) {
		pthread_t t[4];
		uint64_t before = rdq(COUNT);
		int i;

		for (i = 0; i < 4; i++)
			CHECK(pthread_create(&t[i], NULL, hammer, (void *)(uintptr_t)i) == 0);
		for (i = 0; i < 4; i++)
			pthread_join(t[i], NULL);
		CHECK(rdq(COUNT) == before + 400);
		return 0;
	}
	return 2;
}
