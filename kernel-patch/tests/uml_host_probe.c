// Can this host run the userspace of the UML test kernel?
//
// UML runs each guest process as a ptrace()d host process and moves its
// FPU state with ptrace(PTRACE_{GET,SET}REGSET, NT_X86_XSTATE).  The host
// only takes a SETREGSET of exactly its own XSAVE size (2696 bytes with
// AVX-512, 11008 with AMX, ...).  Stock 6.12 UML always passes 2696 bytes;
// with uml-host/0001-um-size-the-fp-state-from-the-host-xsave-area.patch
// it passes the length GETREGSET returned.  This probe does what the
// patched UML does at boot and on every switch to a guest process:
//
//   fork + PTRACE_TRACEME, GETREGSET(NT_X86_XSTATE) with a large buffer
//   (the returned length is the host's size), SETREGSET with that length
//   (PTRACE_GETFPREGS/SETFPREGS when the host has no NT_X86_XSTATE).
//
// It also reports whether stock 6.12 UML's 2696-byte state would have
// been refused (information only: the patch makes that irrelevant).
//
// Exit status: 0 the host can run the patched UML (the line printed says
// the XSAVE size); 3 it cannot (ptrace or the FPU state round trip fails;
// the line printed says which call and errno); 1 the probe itself failed.
#include <elf.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>

#define UML612_FP_BYTES 2696

static char buf[2 << 20];	// what the patched UML offers GETREGSET

int main(void)
{
	int rc = 0;
	pid_t pid = fork();
	if (pid < 0)
		return perror("uml-host-probe: fork"), 1;
	if (pid == 0) {
		if (ptrace(PTRACE_TRACEME, 0, 0, 0) < 0)
			_exit(42);
		raise(SIGSTOP);
		_exit(0);
	}
	int status;
	if (waitpid(pid, &status, 0) != pid)
		return perror("uml-host-probe: waitpid"), 1;
	if (!WIFSTOPPED(status)) {
		printf("uml-host-probe: FAIL: ptrace(PTRACE_TRACEME) is not permitted here "
		       "(child status %#x); UML cannot run without ptrace\n", status);
		return 3;
	}

	struct iovec full = { buf, sizeof(buf) };
	if (ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, &full) < 0) {
		int e = errno;
		// No XSTATE regset: UML falls back to PTRACE_GETFPREGS/SETFPREGS.
		struct user_fpregs_struct fp;
		if (ptrace(PTRACE_GETFPREGS, pid, 0, &fp) < 0 ||
		    ptrace(PTRACE_SETFPREGS, pid, 0, &fp) < 0) {
			printf("uml-host-probe: FAIL: no NT_X86_XSTATE (%s) and "
			       "PTRACE_GETFPREGS/SETFPREGS fail (%s)\n", strerror(e), strerror(errno));
			rc = 3;
		} else {
			printf("uml-host-probe: ok (no NT_X86_XSTATE: %s; UML uses FPREGS)\n", strerror(e));
		}
		goto out;
	}
	size_t host = full.iov_len;
	if (ptrace(PTRACE_SETREGSET, pid, NT_X86_XSTATE, &full) < 0) {
		printf("uml-host-probe: FAIL: the host refuses its own %zu-byte XSAVE state "
		       "back (PTRACE_SETREGSET: %s)\n", host, strerror(errno));
		rc = 3;
		goto out;
	}
	// Information only: would stock 6.12 UML's fixed buffer have worked?  (The
	// host clamps iov_len to its size, so hosts with <= 2696 bytes take it.)
	struct iovec old = { buf, UML612_FP_BYTES };
	const char *old_ok = "takes";
	if (ptrace(PTRACE_GETREGSET, pid, NT_X86_XSTATE, &old) < 0 ||
	    ptrace(PTRACE_SETREGSET, pid, NT_X86_XSTATE, &old) < 0)
		old_ok = "refuses";
	printf("uml-host-probe: ok (XSAVE area %zu bytes; the host %s stock 6.12 UML's "
	       "%d-byte state, the patched UML passes %zu)\n", host, old_ok, UML612_FP_BYTES, host);
out:
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
	return rc;
}
