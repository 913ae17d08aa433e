// Does the UML guest keep its processes' vector registers?  A check of the
// harness fix uml-host/0001-um-size-the-fp-state-from-the-host-xsave-area.patch,
// which moves the host's whole XSAVE area (not a fixed 2696 bytes) between
// the host and each guest task, and into and out of signal frames.
//
//   context_switch  two processes hold different values in the widest
//                   vector registers the compiler never touches (zmm16-31
//                   with AVX-512, else ymm8-15 or xmm8-15) across thousands
//                   of sched_yield() calls, all inside one asm block; every
//                   syscall is a ptrace stop in UML (GETREGSET, SETREGSET).
//   signal          the same registers across kill(getpid(), SIGUSR1) whose
//                   handler overwrites them: rt_sigreturn must restore them
//                   from the frame.  The handler also checks the frame: the
//                   registers are in it at the offset CPUID leaf 0xD gives
//                   and, for an XSAVE frame, sw_reserved says its size and
//                   FP_XSTATE_MAGIC2 follows it.  (Stock 6.12 saved only
//                   832 bytes, so zmm16-31 came back as the handler left them.)
//
// Runs on any x86-64 Linux (the host too).  Prints PAGERPC-TEST lines like
// mmap_consume_test; exit status 0 if all passed.
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <ucontext.h>
#include <unistd.h>

#define NREGS 16
#define FP_XSTATE_MAGIC1 0x46505853U
#define FP_XSTATE_MAGIC2 0x46505845U

enum mode { XMM = 1, YMM = 2, ZMM = 3 };
static enum mode mode;
static const char *mode_name;
static unsigned width;		// bytes per register
static unsigned frame_off;	// standard-format XSAVE offset of the tested bytes
static unsigned frame_len;	// bytes of each register found there
static unsigned frame_stride;

static unsigned char pat[NREGS][64] __attribute__((aligned(64)));
static unsigned char clobber[NREGS][64] __attribute__((aligned(64)));
static unsigned char out[NREGS][64] __attribute__((aligned(64)));

// Load in[] into the registers, make the syscall `loops` times, store the
// registers to o[].  The compiler never allocates zmm16-31 (this file is not
// built with -mavx512f) and is told that xmm8-15 are clobbered.
#define LOOP                                                                   \
	"1:\n\t"                                                               \
	"mov %[nr], %%rax\n\t"                                                 \
	"mov %[a1], %%rdi\n\t"                                                 \
	"mov %[a2], %%rsi\n\t"                                                 \
	"syscall\n\t"                                                          \
	"dec %[n]\n\t"                                                         \
	"jnz 1b\n\t"
#define GPR_CLOBBERS "rax", "rcx", "rdi", "rsi", "r11", "memory", "cc"

static void run_regs(long nr, long a1, long a2, long loops, const void *in, void *o)
{
	switch (mode) {
	case ZMM:
		__asm__ volatile(
			"vmovdqu64 0*64(%[in]), %%zmm16\n\t" "vmovdqu64 1*64(%[in]), %%zmm17\n\t"
			"vmovdqu64 2*64(%[in]), %%zmm18\n\t" "vmovdqu64 3*64(%[in]), %%zmm19\n\t"
			"vmovdqu64 4*64(%[in]), %%zmm20\n\t" "vmovdqu64 5*64(%[in]), %%zmm21\n\t"
			"vmovdqu64 6*64(%[in]), %%zmm22\n\t" "vmovdqu64 7*64(%[in]), %%zmm23\n\t"
			"vmovdqu64 8*64(%[in]), %%zmm24\n\t" "vmovdqu64 9*64(%[in]), %%zmm25\n\t"
			"vmovdqu64 10*64(%[in]), %%zmm26\n\t" "vmovdqu64 11*64(%[in]), %%zmm27\n\t"
			"vmovdqu64 12*64(%[in]), %%zmm28\n\t" "vmovdqu64 13*64(%[in]), %%zmm29\n\t"
			"vmovdqu64 14*64(%[in]), %%zmm30\n\t" "vmovdqu64 15*64(%[in]), %%zmm31\n\t"
			LOOP
			"vmovdqu64 %%zmm16, 0*64(%[o])\n\t" "vmovdqu64 %%zmm17, 1*64(%[o])\n\t"
			"vmovdqu64 %%zmm18, 2*64(%[o])\n\t" "vmovdqu64 %%zmm19, 3*64(%[o])\n\t"
			"vmovdqu64 %%zmm20, 4*64(%[o])\n\t" "vmovdqu64 %%zmm21, 5*64(%[o])\n\t"
			"vmovdqu64 %%zmm22, 6*64(%[o])\n\t" "vmovdqu64 %%zmm23, 7*64(%[o])\n\t"
			"vmovdqu64 %%zmm24, 8*64(%[o])\n\t" "vmovdqu64 %%zmm25, 9*64(%[o])\n\t"
			"vmovdqu64 %%zmm26, 10*64(%[o])\n\t" "vmovdqu64 %%zmm27, 11*64(%[o])\n\t"
			"vmovdqu64 %%zmm28, 12*64(%[o])\n\t" "vmovdqu64 %%zmm29, 13*64(%[o])\n\t"
			"vmovdqu64 %%zmm30, 14*64(%[o])\n\t" "vmovdqu64 %%zmm31, 15*64(%[o])\n\t"
			"vzeroupper\n\t"
			: [n] "+r"(loops)
			: [in] "r"(in), [o] "r"(o), [nr] "r"(nr), [a1] "r"(a1), [a2] "r"(a2)
			: GPR_CLOBBERS);
		break;
	case YMM:
		__asm__ volatile(
			"vmovdqu 0*64(%[in]), %%ymm8\n\t" "vmovdqu 1*64(%[in]), %%ymm9\n\t"
			"vmovdqu 2*64(%[in]), %%ymm10\n\t" "vmovdqu 3*64(%[in]), %%ymm11\n\t"
			"vmovdqu 4*64(%[in]), %%ymm12\n\t" "vmovdqu 5*64(%[in]), %%ymm13\n\t"
			"vmovdqu 6*64(%[in]), %%ymm14\n\t" "vmovdqu 7*64(%[in]), %%ymm15\n\t"
			LOOP
			"vmovdqu %%ymm8, 0*64(%[o])\n\t" "vmovdqu %%ymm9, 1*64(%[o])\n\t"
			"vmovdqu %%ymm10, 2*64(%[o])\n\t" "vmovdqu %%ymm11, 3*64(%[o])\n\t"
			"vmovdqu %%ymm12, 4*64(%[o])\n\t" "vmovdqu %%ymm13, 5*64(%[o])\n\t"
			"vmovdqu %%ymm14, 6*64(%[o])\n\t" "vmovdqu %%ymm15, 7*64(%[o])\n\t"
			"vzeroupper\n\t"
			: [n] "+r"(loops)
			: [in] "r"(in), [o] "r"(o), [nr] "r"(nr), [a1] "r"(a1), [a2] "r"(a2)
			: GPR_CLOBBERS, "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
			  "xmm14", "xmm15");
		break;
	case XMM:
		__asm__ volatile(
			"movdqu 0*64(%[in]), %%xmm8\n\t" "movdqu 1*64(%[in]), %%xmm9\n\t"
			"movdqu 2*64(%[in]), %%xmm10\n\t" "movdqu 3*64(%[in]), %%xmm11\n\t"
			"movdqu 4*64(%[in]), %%xmm12\n\t" "movdqu 5*64(%[in]), %%xmm13\n\t"
			"movdqu 6*64(%[in]), %%xmm14\n\t" "movdqu 7*64(%[in]), %%xmm15\n\t"
			LOOP
			"movdqu %%xmm8, 0*64(%[o])\n\t" "movdqu %%xmm9, 1*64(%[o])\n\t"
			"movdqu %%xmm10, 2*64(%[o])\n\t" "movdqu %%xmm11, 3*64(%[o])\n\t"
			"movdqu %%xmm12, 4*64(%[o])\n\t" "movdqu %%xmm13, 5*64(%[o])\n\t"
			"movdqu %%xmm14, 6*64(%[o])\n\t" "movdqu %%xmm15, 7*64(%[o])\n\t"
			: [n] "+r"(loops)
			: [in] "r"(in), [o] "r"(o), [nr] "r"(nr), [a1] "r"(a1), [a2] "r"(a2)
			: GPR_CLOBBERS, "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13",
			  "xmm14", "xmm15");
		break;
	}
}

static unsigned nregs(void) { return mode == ZMM ? 16 : 8; }

static void fill(unsigned char (*p)[64], unsigned seed)
{
	for (unsigned r = 0; r < NREGS; r++)
		for (unsigned b = 0; b < 64; b++)
			p[r][b] = (unsigned char)(seed * 131 + r * 17 + b * 7 + 1);
}

static int same(unsigned char (*a)[64], unsigned char (*b)[64], unsigned *bad_reg)
{
	for (unsigned r = 0; r < nregs(); r++)
		if (memcmp(a[r], b[r], width)) {
			*bad_reg = r;
			return 0;
		}
	return 1;
}

static void pick_mode(void)
{
	unsigned a, b, c, d;
	int osxsave = 0;
	uint64_t xcr0 = 0;

	__cpuid(1, a, b, c, d);
	if (c & (1u << 27)) {	// OSXSAVE
		unsigned lo, hi;
		__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
		xcr0 = ((uint64_t)hi << 32) | lo;
		osxsave = 1;
	}
	int avx = osxsave && (c & (1u << 28)) && (xcr0 & 6) == 6;
	__cpuid_count(7, 0, a, b, c, d);
	int avx512 = avx && (b & (1u << 16)) && (xcr0 & 0xe0) == 0xe0;

	if (avx512) {
		mode = ZMM, mode_name = "zmm16-31", width = 64;
		__cpuid_count(0xd, 7, a, b, c, d);	// Hi16_ZMM: zmm16-31, whole
		frame_off = b, frame_len = 64, frame_stride = 64;
	} else if (avx) {
		mode = YMM, mode_name = "ymm8-15", width = 32;
		__cpuid_count(0xd, 2, a, b, c, d);	// YMM_Hi128: upper halves
		frame_off = b + 8 * 16, frame_len = 16, frame_stride = 16;
	} else {
		mode = XMM, mode_name = "xmm8-15", width = 16;
		frame_off = 160 + 8 * 16, frame_len = 16, frame_stride = 16;	// FXSAVE
	}
}

// ---- context_switch ------------------------------------------------------------

static int test_context_switch(void)
{
	const long loops = 3000;
	pid_t child = fork();
	if (child < 0)
		return perror("fork"), 0;
	fill(pat, child == 0 ? 2 : 1);	// different values in each process
	memset(out, 0, sizeof(out));
	run_regs(SYS_sched_yield, 0, 0, loops, pat, out);
	unsigned bad = 0;
	int ok = same(pat, out, &bad);
	if (child == 0) {
		if (!ok)
			fprintf(stderr, "uml_fpu_test: child: register %u changed\n", bad);
		_exit(ok ? 0 : 1);
	}
	int st = 0;
	waitpid(child, &st, 0);
	int child_ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
	if (ok && child_ok) {
		printf("PAGERPC-TEST uml_fpu_context_switch: PASS %s intact in 2 processes "
		       "over %ld sched_yield() each\n", mode_name, loops);
		return 1;
	}
	printf("PAGERPC-TEST uml_fpu_context_switch: FAIL %s: parent %s (register %u), child %s\n",
	       mode_name, ok ? "ok" : "changed", bad, child_ok ? "ok" : "changed/died");
	return 0;
}

// ---- signal ----------------------------------------------------------------------

static volatile int handled, frame_bad;
static char frame_why[200];
static unsigned frame_xstate_size;

static void on_usr1(int sig, siginfo_t *si, void *ctx)
{
	(void)sig, (void)si;
	ucontext_t *uc = ctx;
	unsigned char *fp = (unsigned char *)uc->uc_mcontext.fpregs;
	handled++;
	if (!fp) {
		frame_bad = 1, snprintf(frame_why, sizeof(frame_why), "no fpstate");
	} else {
		uint32_t magic1, ext, xsize;
		memcpy(&magic1, fp + 464, 4);
		memcpy(&ext, fp + 468, 4);
		memcpy(&xsize, fp + 480, 4);
		if (mode != XMM || magic1 == FP_XSTATE_MAGIC1) {
			uint32_t magic2 = 0;
			if (magic1 == FP_XSTATE_MAGIC1 && xsize >= 576 && xsize <= (1u << 20))
				memcpy(&magic2, fp + xsize, 4);
			frame_xstate_size = xsize;
			if (magic1 != FP_XSTATE_MAGIC1 || ext != xsize + 4 || magic2 != FP_XSTATE_MAGIC2 ||
			    frame_off + nregs() * frame_stride > xsize) {
				frame_bad = 1;
				snprintf(frame_why, sizeof(frame_why),
					 "sw_reserved magic1 %#x extended_size %u xstate_size %u, magic2 %#x",
					 magic1, ext, xsize, magic2);
			}
		}
		for (unsigned r = 0; !frame_bad && r < nregs(); r++) {
			// the frame holds the pattern (for ymm: its upper half)
			const unsigned char *want = pat[r] + (mode == YMM ? 16 : 0);
			if (memcmp(fp + frame_off + r * frame_stride, want, frame_len)) {
				frame_bad = 1;
				snprintf(frame_why, sizeof(frame_why),
					 "register %u is not at XSAVE offset %u in the frame", r,
					 frame_off + r * frame_stride);
			}
		}
	}
	// Overwrite the registers: rt_sigreturn has to bring the pattern back.
	unsigned char scratch[NREGS][64] __attribute__((aligned(64)));
	run_regs(SYS_getpid, 0, 0, 1, clobber, scratch);
}

static int test_signal(void)
{
	const long loops = 200;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_usr1;
	sa.sa_flags = SA_SIGINFO;
	sigaction(SIGUSR1, &sa, NULL);
	fill(pat, 3);
	fill(clobber, 4);
	memset(out, 0, sizeof(out));
	run_regs(SYS_kill, getpid(), SIGUSR1, loops, pat, out);
	unsigned bad = 0;
	int ok = same(pat, out, &bad);
	if (ok && !frame_bad && handled == loops) {
		printf("PAGERPC-TEST uml_fpu_signal: PASS %s restored after %d handlers that "
		       "overwrote them; frame: %s\n", mode_name, handled,
		       frame_xstate_size ? "XSAVE layout, sw_reserved and FP_XSTATE_MAGIC2 right"
					 : "FXSAVE layout");
		if (frame_xstate_size)
			printf("uml_fpu_test: signal frame xstate_size %u bytes\n", frame_xstate_size);
		return 1;
	}
	printf("PAGERPC-TEST uml_fpu_signal: FAIL %s: %d/%ld handlers ran; registers %s (register %u); "
	       "frame %s\n", mode_name, handled, loops, ok ? "restored" : "NOT restored", bad,
	       frame_bad ? frame_why : "ok");
	return 0;
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	pick_mode();
	int passed = 0, failed = 0;
	if (test_context_switch())
		passed++;
	else
		failed++;
	if (test_signal())
		passed++;
	else
		failed++;
	printf("uml_fpu_test: %d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
