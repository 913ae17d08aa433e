// Can this host run the userspace of a Linux 6.12 UML guest?
//
// UML moves its guests' FPU state with ptrace(PTRACE_{GET,SET}REGSET,
// NT_X86_XSTATE) through a fixed 2696-byte buffer (HOST_FP_SIZE in
// arch/x86/um/user-offsets.c). Newer host kernels refuse a SETREGSET
// shorter than the host's whole XSAVE area (11008 bytes where the CPU has
// AMX), so the guest's first process dies ("userspace - ptrace set fp regs
// failed, errno = 14") and the kernel panics before any test runs.
//
// Exit status: 0 the host takes UML's buffer; 3 it refuses it (the line
// printed says why); 1 the probe itself failed.
#include <elf.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define UML_FP_BYTES 2696

int main(void)
{
	static char buf[1 << 16];
	pid_t pid = fork();
	if (pid < 0)
		return perror("fork"), 1;
	if (pid == 0) {
		ptrace(PTRACE_TRACEME, 0, 0, 0);
		raise(SIGSTOP);
		_exit(0);
	}
	if (waitpid(pid, NULL, 0) != pid)
		return perror("waitpid"), 1;
	struct iovec full = { buf, sizeof(buf) };
	if (ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, &full) < 0) {
		// No XSTATE regset: UML falls back to PTRACE_GETFPREGS.
		printf("uml-host-probe: no NT_X86_XSTATE (%s): UML uses FPREGS\n", strerror(errno));
		kill(pid, SIGKILL);
		return 0;
	}
	struct iovec uml = { buf, UML_FP_BYTES };
	int rc = 0;
	if (ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, &uml) < 0 ||
	    ptrace(PTRACE_SETREGSET, pid, NT_X86_XSTATE, &uml) < 0) {
		printf("uml-host-probe: the host's XSAVE area is %zu bytes and it refuses "
		       "UML 6.12's %d-byte FPU state (%s)\n",
		       full.iov_len, UML_FP_BYTES, strerror(errno));
		rc = 3;
	} else {
		printf("uml-host-probe: ok (XSAVE area %zu bytes)\n", full.iov_len);
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return rc;
}
