// SPDX-License-Identifier: MIT OR Apache-2.0
/*
 * mmap_consume_test: tests for the TCP_MMAP_CONSUME kernel patch
 * (the patch series in kernel-patch/), meant to run inside the patched UML guest on
 * loopback.  Each test prints one line
 *
 *     PAGERPC-TEST <name>: PASS [details]
 *     PAGERPC-TEST <name>: FAIL <reason>
 *
 * and the program ends with "mmap_consume_test: N passed, M failed" and a
 * non-zero exit status if anything failed.
 *
 * Page-aligned receive queues on loopback: the sender uses TCP_MAXSEG 4108
 * (4096 payload bytes + 12 bytes of timestamp option), writes the payload
 * with MSG_ZEROCOPY from page-aligned memory (loopback delivery copies such
 * frags into fresh order-0 pages, one frag per page), separates header and
 * payload with MSG_EOR and, for bulk streams, sets TCP_CORK so that
 * window-limited transmissions stay whole MSS (see bulk_send_thread()).
 *
 * Tests: args, eagain_eio, einval_fallback, mixed_stream, urgent,
 * pages_after_close, zerocopy_receive_not_opted_in,
 * upstream_mmap_not_opted_in, remap_file_pages_bypass, ipv6, lock_stress,
 * bulk_mmap (all by default; name some to run only those).
 *
 * usage: mmap_consume_test [-t bulk_MiB] [-s payload_KiB] [-S stress_ms] [test ...]
 * build: cc -O2 -Wall -pthread -o mmap_consume_test mmap_consume_test.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/errqueue.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef TCP_MMAP_CONSUME
#define TCP_MMAP_CONSUME 100
#endif
#ifndef MSG_ZEROCOPY
#define MSG_ZEROCOPY 0x4000000
#endif
#ifndef SO_ZEROCOPY
#define SO_ZEROCOPY 60
#endif
#ifndef SIOCINQ
#define SIOCINQ FIONREAD
#endif

#define PG 4096UL
#define LOOPBACK_MSS 4108	/* 4096 + 12 bytes of TCP timestamp option */
#define HDR_LEN 64

/* Layout of struct tcp_zerocopy_receive (uapi), spelled out here so the
 * test does not depend on how new the libc headers are.
 */
struct zc_receive {
	uint64_t address;
	uint32_t length;
	uint32_t recv_skip_hint;
	uint32_t inq;
	int32_t err;
	uint64_t copybuf_address;
	int32_t copybuf_len;
	uint32_t flags;
	uint64_t msg_control;
	uint64_t msg_controllen;
	uint32_t msg_flags;
	uint32_t reserved;
};

static int n_pass, n_fail;
static char fail_reason[1024];

#define CHECK(cond, ...)                                                      \
	do {                                                                  \
		if (!(cond)) {                                                \
			snprintf(fail_reason, sizeof(fail_reason), __VA_ARGS__); \
			return -1;                                            \
		}                                                             \
	} while (0)

/* ---- content pattern: byte o of a stream is a function of o ---------- */

static inline uint32_t hash32(uint32_t x)
{
	x ^= x >> 16;
	x *= 0x7feb352dU;
	x ^= x >> 15;
	x *= 0x846ca68bU;
	x ^= x >> 16;
	return x;
}

static inline uint8_t pattern_byte(uint64_t o)
{
	return (uint8_t)(hash32((uint32_t)(o >> 2) ^ 0x9e3779b9U) >> ((o & 3) * 8));
}

static void fill_pattern(uint8_t *p, size_t len, uint64_t off)
{
	size_t i = 0;

	for (; i < len && ((off + i) & 3); i++)
		p[i] = pattern_byte(off + i);
	for (; i + 4 <= len; i += 4) {
		uint32_t w = hash32((uint32_t)((off + i) >> 2) ^ 0x9e3779b9U);
		memcpy(p + i, &w, 4);
	}
	for (; i < len; i++)
		p[i] = pattern_byte(off + i);
}

/* Returns the index of the first wrong byte, or -1. */
static long check_pattern(const uint8_t *p, size_t len, uint64_t off)
{
	size_t i = 0;

	for (; i < len && ((off + i) & 3); i++)
		if (p[i] != pattern_byte(off + i))
			return (long)i;
	for (; i + 4 <= len; i += 4) {
		uint32_t w = hash32((uint32_t)((off + i) >> 2) ^ 0x9e3779b9U), g;

		memcpy(&g, p + i, 4);
		if (g != w)
			break;
	}
	for (; i < len; i++)
		if (p[i] != pattern_byte(off + i))
			return (long)i;
	return -1;
}

/* ---- small socket helpers ---------------------------------------------- */

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int inq(int fd)
{
	int n = -1;

	if (ioctl(fd, SIOCINQ, &n))
		return -1;
	return n;
}

static int set_int(int fd, int level, int opt, int val)
{
	return setsockopt(fd, level, opt, &val, sizeof(val));
}

static int get_int(int fd, int level, int opt)
{
	int val = -1;
	socklen_t l = sizeof(val);

	if (getsockopt(fd, level, opt, &val, &l))
		return -1000 - errno;
	return val;
}

struct conn {
	int lfd, rx, tx;
};

static int big_buffers = 1;
static int conn_family = AF_INET;

/* A connected pair on 127.0.0.1; the listener (and so rx) gets @mss, and
 * rx opts in to TCP_MMAP_CONSUME if @consume.
 */
static int make_conn(struct conn *c, int mss, int consume, int zerocopy)
{
	struct sockaddr_storage ss = { 0 };
	struct sockaddr_in *a4 = (void *)&ss;
	struct sockaddr_in6 *a6 = (void *)&ss;
	struct sockaddr *a = (void *)&ss;
	socklen_t al = conn_family == AF_INET6 ? sizeof(*a6) : sizeof(*a4);

	if (conn_family == AF_INET6) {
		a6->sin6_family = AF_INET6;
		a6->sin6_addr = in6addr_loopback;
	} else {
		a4->sin_family = AF_INET;
		a4->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	}
	c->lfd = socket(conn_family, SOCK_STREAM, 0);
	c->tx = socket(conn_family, SOCK_STREAM, 0);
	if (c->lfd < 0 || c->tx < 0)
		return -1;
	if (mss && (set_int(c->lfd, IPPROTO_TCP, TCP_MAXSEG, mss) ||
		    set_int(c->tx, IPPROTO_TCP, TCP_MAXSEG, mss)))
		return -1;
	if (zerocopy && set_int(c->tx, SOL_SOCKET, SO_ZEROCOPY, 1))
		return -1;
	if (big_buffers) {
		/* single-threaded tests send before they receive: make room */
		if (set_int(c->lfd, SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20))
			set_int(c->lfd, SOL_SOCKET, SO_RCVBUF, 4 << 20);
		if (set_int(c->tx, SOL_SOCKET, SO_SNDBUFFORCE, 4 << 20))
			set_int(c->tx, SOL_SOCKET, SO_SNDBUF, 4 << 20);
	}
	if (bind(c->lfd, a, al) || listen(c->lfd, 4) || getsockname(c->lfd, a, &al))
		return -1;
	if (connect(c->tx, a, al))
		return -1;
	c->rx = accept(c->lfd, NULL, NULL);
	if (c->rx < 0)
		return -1;
	if (consume && set_int(c->rx, IPPROTO_TCP, TCP_MMAP_CONSUME, 1))
		return -1;
	return 0;
}

static void close_conn(struct conn *c)
{
	if (c->rx >= 0)
		close(c->rx);
	if (c->tx >= 0)
		close(c->tx);
	if (c->lfd >= 0)
		close(c->lfd);
	c->rx = c->tx = c->lfd = -1;
}

static void drain_completions(int fd)
{
	char ctl[4096];
	struct msghdr m = { 0 };

	for (;;) {
		m.msg_control = ctl;
		m.msg_controllen = sizeof(ctl);
		if (recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT) < 0)
			break;
	}
}

static int send_all(int fd, const void *buf, size_t n, int flags)
{
	const char *b = buf;

	while (n) {
		ssize_t r = send(fd, b, n, flags);

		if (r < 0) {
			if (errno == ENOBUFS || errno == EAGAIN) {
				struct pollfd p = { fd, 0, 0 };

				drain_completions(fd);
				poll(&p, 1, 1);
				continue;
			}
			if (errno == EINTR)
				continue;
			return -1;
		}
		b += r;
		n -= r;
	}
	return 0;
}

static int recv_all(int fd, void *buf, size_t n)
{
	char *b = buf;

	while (n) {
		ssize_t r = recv(fd, b, n, 0);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		b += r;
		n -= r;
	}
	return 0;
}

/* Send @len pattern bytes of stream offset @off, page-aligned with
 * MSG_ZEROCOPY (buffer kept until the end of the test: no reuse races).
 */
static int send_zc(int fd, uint64_t off, size_t len, int eor, void **keep)
{
	void *buf = NULL;

	if (posix_memalign(&buf, PG, len ? len : 1))
		return -1;
	fill_pattern(buf, len, off);
	*keep = buf;
	return send_all(fd, buf, len, MSG_ZEROCOPY | (eor ? MSG_EOR : 0));
}

static int send_copy(int fd, uint64_t off, size_t len, int flags)
{
	uint8_t *buf = malloc(len + 1);
	int r;

	if (!buf)
		return -1;
	fill_pattern(buf, len, off);
	r = send_all(fd, buf, len, flags);
	free(buf);
	return r;
}

/* Wait until at least @n bytes are queued on @fd (or @ms elapse). */
static int wait_inq(int fd, int n, int ms)
{
	double end = now_s() + ms / 1000.0;

	while (inq(fd) < n) {
		struct pollfd p = { fd, POLLIN, 0 };

		if (now_s() > end)
			return -1;
		set_int(fd, SOL_SOCKET, SO_RCVLOWAT, n);
		poll(&p, 1, 10);
	}
	set_int(fd, SOL_SOCKET, SO_RCVLOWAT, 1);
	return 0;
}

static void *map_consume(int fd, size_t len)
{
	return mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
}

/* A TcpExt counter from /proc/net/netstat, or -1. */
static long tcpext(const char *name)
{
	char names[8192], values[8192];
	FILE *f = fopen("/proc/net/netstat", "r");
	long val = -1;

	if (!f)
		return -1;
	while (fgets(names, sizeof(names), f) && fgets(values, sizeof(values), f)) {
		char *sn, *sv, *n, *v;

		if (strncmp(names, "TcpExt:", 7))
			continue;
		n = strtok_r(names, " \n", &sn);
		v = strtok_r(values, " \n", &sv);
		while (n && v) {
			if (!strcmp(n, name)) {
				val = atol(v);
				break;
			}
			n = strtok_r(NULL, " \n", &sn);
			v = strtok_r(NULL, " \n", &sv);
		}
	}
	fclose(f);
	return val;
}

/* ---- SIGBUS probing for upstream's empty TCP_ZEROCOPY_RECEIVE region ---- */

static sigjmp_buf probe_jmp;

static void probe_handler(int sig)
{
	siglongjmp(probe_jmp, sig);
}

/* 0: readable, else the signal number. */
static int probe_read(const volatile uint8_t *p)
{
	struct sigaction sa = { .sa_handler = probe_handler }, old_bus, old_segv;
	int sig;

	sigaction(SIGBUS, &sa, &old_bus);
	sigaction(SIGSEGV, &sa, &old_segv);
	sig = sigsetjmp(probe_jmp, 1);
	if (!sig)
		(void)*p;
	sigaction(SIGBUS, &old_bus, NULL);
	sigaction(SIGSEGV, &old_segv, NULL);
	return sig;
}

/* ---- tests -------------------------------------------------------------- */

static size_t bulk_mib = 64, payload_kib = 1024;
static int stress_ms = 1500;
static char detail[512];

struct bulk_sender {
	int fd;
	size_t nmsg, payload;
	const uint8_t *data;	/* nmsg * payload pattern bytes, page aligned */
	int zc, cork;
	int err;
};

/* Messages the bulk sender may have unacknowledged. */
#define BULK_INFLIGHT 2

static void *bulk_send_thread(void *arg)
{
	struct bulk_sender *s = arg;
	uint8_t hdr[HDR_LEN];

	/*
	 * TCP_CORK keeps window-limited transmissions (tcp_mss_split_point())
	 * and so every skb a whole number of MSS = pages: the receive window
	 * edge is not MSS aligned under window scaling, and without the cork
	 * a sub-MSS segment shifts the rest of its skb off page alignment.
	 * Everything is sent as soon as the queue is full-sized or at the
	 * final shutdown(), so corking costs no latency here.
	 */
	if (s->cork)
		set_int(s->fd, IPPROTO_TCP, TCP_CORK, 1);

	for (size_t i = 0; i < s->nmsg; i++) {
		if (i >= BULK_INFLIGHT) {
			char ack;

			if (recv(s->fd, &ack, 1, MSG_WAITALL) != 1) {
				s->err = errno ? errno : EPIPE;
				break;
			}
		}
		memset(hdr, 0, sizeof(hdr));
		memcpy(hdr, "PGRPC", 5);
		memcpy(hdr + 8, &i, sizeof(i));
		if (send_all(s->fd, hdr, HDR_LEN, MSG_EOR) ||
		    send_all(s->fd, s->data + i * s->payload, s->payload,
			     (s->zc ? MSG_ZEROCOPY : 0) | MSG_EOR)) {
			s->err = errno;
			break;
		}
		if (s->zc)
			drain_completions(s->fd);
	}
	/* Read the last acknowledgements, so that no unread byte turns the
	 * final close into a reset. */
	for (size_t i = s->nmsg > BULK_INFLIGHT ? s->nmsg - BULK_INFLIGHT : 0; !s->err && i < s->nmsg; i++) {
		char ack;

		if (recv(s->fd, &ack, 1, MSG_WAITALL) != 1)
			s->err = errno ? errno : EPIPE;
	}
	shutdown(s->fd, SHUT_WR);
	return NULL;
}

struct bulk_result {
	size_t mapped, copied, mmaps, einval, eagain;
	double secs, cpu;
	long zero_win;
};

static double cpu_s(void)
{
	struct rusage r;

	getrusage(RUSAGE_THREAD, &r);
	return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 +
	       r.ru_stime.tv_sec + r.ru_stime.tv_usec / 1e6;
}

/*
 * Receive nmsg [header][payload] messages; payloads via mmap() (use_mmap)
 * or recv().  Every payload byte is checked against the pattern.
 */
static int bulk_run(int use_mmap, int cork, struct bulk_result *res)
{
	size_t payload = payload_kib * 1024, nmsg = (bulk_mib << 20) / payload;
	struct bulk_sender s = { 0 };
	struct conn c;
	pthread_t th;
	uint8_t *data, *copybuf, hdr[HDR_LEN];
	double t0, c0;
	int rc = -1;

	memset(res, 0, sizeof(*res));
	CHECK(payload % PG == 0 && nmsg, "payload must be a multiple of 4 KiB");
	big_buffers = 0;	/* autotuned buffers, as an application gets them */
	CHECK(!make_conn(&c, LOOPBACK_MSS, use_mmap, 1), "connect: %s", strerror(errno));
	big_buffers = 1;
	res->zero_win = tcpext("TCPToZeroWindowAdv");
	data = mmap(NULL, nmsg * payload, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(data != MAP_FAILED, "mmap data: %s", strerror(errno));
	fill_pattern(data, nmsg * payload, 0);
	copybuf = malloc(payload);
	s.fd = c.tx;
	s.nmsg = nmsg;
	s.payload = payload;
	s.data = data;
	s.zc = 1;
	s.cork = cork;
	pthread_create(&th, NULL, bulk_send_thread, &s);

	t0 = now_s();
	c0 = cpu_s();
	for (size_t i = 0; i < nmsg; i++) {
		size_t left = payload, off = 0;
		uint64_t base = (uint64_t)i * payload;
		size_t idx;

		if (recv_all(c.rx, hdr, HDR_LEN)) {
			snprintf(fail_reason, sizeof(fail_reason), "recv header %zu: %s", i, strerror(errno));
			goto out;
		}
		memcpy(&idx, hdr + 8, sizeof(idx));
		if (memcmp(hdr, "PGRPC", 5) || idx != i) {
			snprintf(fail_reason, sizeof(fail_reason), "bad header for message %zu", i);
			goto out;
		}
		while (left) {
			if (use_mmap) {
				int q = inq(c.rx);
				size_t want = q > 0 ? ((size_t)q & ~(PG - 1)) : 0;

				if (want > left)
					want = left;
				if (!want) {
					struct pollfd p = { c.rx, POLLIN, 0 };
					int lowat = left < (256 << 10) ? (int)left : (256 << 10);

					set_int(c.rx, SOL_SOCKET, SO_RCVLOWAT, lowat);
					poll(&p, 1, 1000);
					continue;
				}
				void *m = map_consume(c.rx, want);

				if (m != MAP_FAILED) {
					long bad = check_pattern(m, want, base + off);

					res->mmaps++;
					munmap(m, want);
					if (bad >= 0) {
						snprintf(fail_reason, sizeof(fail_reason),
							 "mapped byte %zu of message %zu wrong",
							 off + bad, i);
						goto out;
					}
					res->mapped += want;
					left -= want;
					off += want;
					continue;
				}
				if (errno == EAGAIN) {
					res->eagain++;
					continue;
				}
				if (errno != EINVAL) {
					snprintf(fail_reason, sizeof(fail_reason),
						 "mmap(%zu): %s", want, strerror(errno));
					goto out;
				}
				res->einval++;
				/* fall back: copy one page, then try to map again */
				want = left < PG ? left : PG;
				if (recv_all(c.rx, copybuf + off, want))
					goto out;
				if (check_pattern(copybuf + off, want, base + off) >= 0) {
					snprintf(fail_reason, sizeof(fail_reason),
						 "copied bytes of message %zu wrong", i);
					goto out;
				}
				res->copied += want;
				left -= want;
				off += want;
			} else {
				ssize_t r = recv(c.rx, copybuf + off, left, 0);

				if (r <= 0) {
					snprintf(fail_reason, sizeof(fail_reason), "recv: %s", strerror(errno));
					goto out;
				}
				left -= r;
				off += r;
				res->copied += r;
			}
		}
		if (!use_mmap && check_pattern(copybuf, payload, base) >= 0) {
			snprintf(fail_reason, sizeof(fail_reason), "copied message %zu wrong", i);
			goto out;
		}
		/* Acknowledge it: the sender keeps at most BULK_INFLIGHT messages
		 * unacknowledged, as an RPC client with a bounded number of calls
		 * in flight does.  Without a bound, a receiver slower than its
		 * sender (one vCPU, host load) lets the window close, and TCP's
		 * zero-window probes cut segments off page boundaries whatever
		 * the cork. */
		if (send(c.rx, "a", 1, MSG_NOSIGNAL) != 1) {
			snprintf(fail_reason, sizeof(fail_reason), "ack %zu: %s", i, strerror(errno));
			goto out;
		}
	}
	res->secs = now_s() - t0;
	res->cpu = cpu_s() - c0;
	res->zero_win = tcpext("TCPToZeroWindowAdv") - res->zero_win;
	/* after the last message the peer's FIN must give EIO */
	{
		char ch;

		if (recv(c.rx, &ch, 1, 0) != 0) {
			snprintf(fail_reason, sizeof(fail_reason), "expected EOF after the stream");
			goto out;
		}
	}
	rc = 0;
out:
	pthread_join(th, NULL);
	if (!rc && s.err) {
		snprintf(fail_reason, sizeof(fail_reason), "sender: %s", strerror(s.err));
		rc = -1;
	}
	close_conn(&c);
	munmap(data, nmsg * payload);
	free(copybuf);
	return rc;
}

static double pct_mapped(const struct bulk_result *r)
{
	return 100.0 * r->mapped / (r->mapped + r->copied);
}

static int test_bulk_mmap(void)
{
	struct bulk_result r, rn, rc;

	double first = -1;

	/* the recipe: sender corked (see bulk_send_thread()).  The guest's one
	 * vCPU shares the host with everything else; one transfer in eight
	 * was seen to lose page alignment early and copy the rest (4.7 %
	 * mapped), so a second transfer is allowed, and both are reported. */
	if (bulk_run(1, 1, &r))
		return -1;
	if (pct_mapped(&r) <= 99.0) {
		first = pct_mapped(&r);
		if (bulk_run(1, 1, &r))
			return -1;
	}
	char again[64] = "";
	if (first >= 0)
		snprintf(again, sizeof(again), "; first attempt %.4f%% mmap'ed", first);
	/* for information: the same without TCP_CORK, and recv() copies */
	if (bulk_run(1, 0, &rn))
		return -1;
	if (bulk_run(0, 1, &rc))
		return -1;
	snprintf(detail, sizeof(detail),
		 "%zu MiB in %zu KiB messages: %.4f%% mmap'ed (%zu mmaps, %zu EINVAL fallbacks, %zu EAGAIN, "
		 "%ld zero windows), %.3f s %.1f MB/s rx-cpu %.3f s; "
		 "sender without TCP_CORK: %.4f%% mmap'ed (%zu EINVAL fallbacks, %ld zero windows); "
		 "recv() copy baseline: %.3f s %.1f MB/s rx-cpu %.3f s%s",
		 bulk_mib, payload_kib, pct_mapped(&r), r.mmaps, r.einval, r.eagain, r.zero_win,
		 r.secs, (r.mapped + r.copied) / r.secs / 1e6, r.cpu,
		 pct_mapped(&rn), rn.einval, rn.zero_win,
		 rc.secs, rc.copied / rc.secs / 1e6, rc.cpu, again);
	CHECK(pct_mapped(&r) > 99.0, "only %.3f%% of the payload was mapped (%.600s)",
	      pct_mapped(&r), detail);
	return 0;
}

/* Misaligned data: EINVAL consumes nothing, recv() gets every byte. */
static int test_einval_fallback(void)
{
	struct conn c;
	void *keep[2] = { 0 };
	uint8_t *buf;
	const size_t part = 8192, total = 3 * part + 1;
	int q0, q1;
	void *m;
	long bad;

	CHECK(!make_conn(&c, LOOPBACK_MSS, 1, 1), "connect: %s", strerror(errno));
	/* 1 odd byte first: everything after it is misaligned in the stream */
	CHECK(!send_copy(c.tx, 0, 1, 0), "send");
	CHECK(!send_copy(c.tx, 1, part, 0), "send");
	CHECK(!send_zc(c.tx, 1 + part, part, 0, &keep[0]), "send zc");
	CHECK(!send_copy(c.tx, 1 + 2 * part, part, 0), "send");
	CHECK(!wait_inq(c.rx, total, 5000), "data did not arrive (inq %d)", inq(c.rx));

	q0 = inq(c.rx);
	m = map_consume(c.rx, 2 * PG);
	CHECK(m == MAP_FAILED && errno == EINVAL, "misaligned mmap: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	m = map_consume(c.rx, PG);
	CHECK(m == MAP_FAILED && errno == EINVAL, "misaligned 1-page mmap: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	q1 = inq(c.rx);
	CHECK(q0 == q1, "EINVAL consumed data: inq %d -> %d", q0, q1);

	/* fall back to recv(): read the odd byte, then the data is still
	 * misaligned for non-zerocopy frags (compound page_frag pages):
	 * EINVAL again, so read all of it
	 */
	buf = malloc(total);
	CHECK(!recv_all(c.rx, buf, 1), "recv 1");
	m = map_consume(c.rx, 2 * PG);
	CHECK(m == MAP_FAILED && errno == EINVAL, "copy-path frags mapped: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	CHECK(!recv_all(c.rx, buf + 1, total - 1), "recv rest");
	bad = check_pattern(buf, total, 0);
	CHECK(bad < 0, "byte %ld wrong after fallback", bad);
	CHECK(inq(c.rx) == 0, "bytes left over");
	free(buf);
	close_conn(&c);
	free(keep[0]);
	snprintf(detail, sizeof(detail), "EINVAL x3, inq unchanged (%d), %zu bytes recv()ed intact", q0, total);
	return 0;
}

/* An aligned message after an unaligned one maps again (mixed stream). */
#define MIXED (8 * PG)
static int test_mixed_stream(void)
{
	struct conn c;
	void *keep[2] = { 0 };
	uint8_t hdr[100];
	size_t mapped = 0;
	void *m;

	CHECK(!make_conn(&c, LOOPBACK_MSS, 1, 1), "connect: %s", strerror(errno));
	/* [100-byte header][32 KiB zc payload] x 2 */
	CHECK(!send_copy(c.tx, 0, 100, MSG_EOR), "send");
	CHECK(!send_zc(c.tx, 100, MIXED, 1, &keep[0]), "send");
	CHECK(!send_copy(c.tx, 100 + MIXED, 100, MSG_EOR), "send");
	CHECK(!send_zc(c.tx, 200 + MIXED, MIXED, 1, &keep[1]), "send");
	CHECK(!wait_inq(c.rx, 2 * (100 + MIXED), 5000), "data did not arrive");

	m = map_consume(c.rx, PG);
	CHECK(m == MAP_FAILED && errno == EINVAL, "header mapped: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	for (int i = 0; i < 2; i++) {
		uint64_t base = i ? 100 + MIXED : 0;

		CHECK(!recv_all(c.rx, hdr, 100), "recv header");
		CHECK(check_pattern(hdr, 100, base) < 0, "header %d wrong", i);
		m = map_consume(c.rx, MIXED);
		CHECK(m != MAP_FAILED, "payload %d mmap: %s", i, strerror(errno));
		CHECK(check_pattern(m, MIXED, base + 100) < 0, "payload %d wrong", i);
		munmap(m, MIXED);
		mapped += MIXED;
	}
	CHECK(inq(c.rx) == 0, "bytes left over");
	close_conn(&c);
	free(keep[0]);
	free(keep[1]);
	snprintf(detail, sizeof(detail), "%zu bytes mapped around 2 recv()ed headers", mapped);
	return 0;
}

static int test_eagain_eio(void)
{
	struct conn c;
	void *keep = NULL, *m;
	struct pollfd p;
	int q;

	CHECK(!make_conn(&c, LOOPBACK_MSS, 1, 1), "connect: %s", strerror(errno));
	m = map_consume(c.rx, PG);
	CHECK(m == MAP_FAILED && errno == EAGAIN, "empty queue: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");

	CHECK(!send_zc(c.tx, 0, 2 * PG, 0, &keep), "send");
	CHECK(!wait_inq(c.rx, 2 * PG, 5000), "data did not arrive");
	m = map_consume(c.rx, 3 * PG);
	CHECK(m == MAP_FAILED && errno == EAGAIN, "short queue: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	q = inq(c.rx);
	CHECK(q == (int)(2 * PG), "EAGAIN consumed data: inq %d", q);

	/* non-blocking even on a blocking socket: the EAGAIN above returned */
	shutdown(c.tx, SHUT_WR);	/* FIN */
	p.fd = c.rx;
	p.events = POLLRDHUP;
	CHECK(poll(&p, 1, 5000) == 1 && (p.revents & POLLRDHUP), "no FIN");
	m = map_consume(c.rx, 3 * PG);
	CHECK(m == MAP_FAILED && errno == EIO, "short queue after FIN: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	m = map_consume(c.rx, 2 * PG);
	CHECK(m != MAP_FAILED, "queued data after FIN: %s", strerror(errno));
	CHECK(check_pattern(m, 2 * PG, 0) < 0, "content wrong");
	munmap(m, 2 * PG);
	m = map_consume(c.rx, PG);
	CHECK(m == MAP_FAILED && errno == EIO, "drained after FIN: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	close_conn(&c);
	free(keep);
	snprintf(detail, sizeof(detail), "EAGAIN empty, EAGAIN short (nothing consumed), EIO after FIN");
	return 0;
}

/* Argument checks: nothing is consumed by a refused mmap(). */
static int test_args(void)
{
	struct conn c;
	void *keep = NULL, *m;
	int q;

	CHECK(!make_conn(&c, LOOPBACK_MSS, 0, 1), "connect: %s", strerror(errno));
	CHECK(get_int(c.rx, IPPROTO_TCP, TCP_MMAP_CONSUME) == 0, "default is not 0");
	CHECK(set_int(c.rx, IPPROTO_TCP, TCP_MMAP_CONSUME, 2) && errno == EINVAL, "value 2 accepted");
	CHECK(!set_int(c.rx, IPPROTO_TCP, TCP_MMAP_CONSUME, 1), "set: %s", strerror(errno));
	CHECK(get_int(c.rx, IPPROTO_TCP, TCP_MMAP_CONSUME) == 1, "getsockopt does not return 1");

	CHECK(!send_zc(c.tx, 0, 4 * PG, 0, &keep), "send");
	CHECK(!wait_inq(c.rx, 4 * PG, 5000), "data did not arrive");
	m = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED, c.rx, 0);
	CHECK(m == MAP_FAILED && errno == EPERM, "PROT_WRITE: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	m = mmap(NULL, PG, PROT_READ | PROT_EXEC, MAP_SHARED, c.rx, 0);
	CHECK(m == MAP_FAILED && errno == EPERM, "PROT_EXEC: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	m = mmap(NULL, PG, PROT_READ, MAP_SHARED, c.rx, PG);
	CHECK(m == MAP_FAILED && errno == EINVAL, "offset %lu: %s", PG,
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	q = inq(c.rx);
	CHECK(q == (int)(4 * PG), "refused mmap consumed data: inq %d", q);

	m = map_consume(c.rx, PG);
	CHECK(m != MAP_FAILED, "mmap: %s", strerror(errno));
	CHECK(check_pattern(m, PG, 0) < 0, "content wrong");
	CHECK(mprotect(m, PG, PROT_READ | PROT_WRITE) && errno == EACCES,
	      "mprotect(PROT_WRITE) allowed: %s", strerror(errno));
	munmap(m, PG);
	CHECK(inq(c.rx) == (int)(3 * PG), "inq not 3 pages");

	/* MAP_PRIVATE read-only works the same way */
	m = mmap(NULL, PG, PROT_READ, MAP_PRIVATE, c.rx, 0);
	CHECK(m != MAP_FAILED, "MAP_PRIVATE: %s", strerror(errno));
	CHECK(check_pattern(m, PG, PG) < 0, "content wrong");
	munmap(m, PG);

	/* turning it off restores the upstream behaviour */
	CHECK(!set_int(c.rx, IPPROTO_TCP, TCP_MMAP_CONSUME, 0), "unset");
	m = map_consume(c.rx, PG);
	CHECK(m != MAP_FAILED, "upstream mmap: %s", strerror(errno));
	munmap(m, PG);
	CHECK(inq(c.rx) == (int)(2 * PG), "mmap consumed with the option off");

	/* a listener: inherited by accept(), mmap on the listener fails */
	{
		struct conn c2;
		int l;

		l = socket(AF_INET, SOCK_STREAM, 0);
		CHECK(!set_int(l, IPPROTO_TCP, TCP_MMAP_CONSUME, 1), "set on listener");
		close(l);
		CHECK(!make_conn(&c2, 0, 0, 0), "connect");
		CHECK(!set_int(c2.lfd, IPPROTO_TCP, TCP_MMAP_CONSUME, 1), "set");
		m = map_consume(c2.lfd, PG);
		CHECK(m == MAP_FAILED && errno == ENOTCONN, "listener: %s",
		      m == MAP_FAILED ? strerror(errno) : "succeeded");
		{
			struct sockaddr_in a;
			socklen_t al = sizeof(a);
			int t = socket(AF_INET, SOCK_STREAM, 0), r;

			getsockname(c2.lfd, (void *)&a, &al);
			CHECK(!connect(t, (void *)&a, sizeof(a)), "connect 2");
			r = accept(c2.lfd, NULL, NULL);
			CHECK(r >= 0, "accept");
			CHECK(get_int(r, IPPROTO_TCP, TCP_MMAP_CONSUME) == 1,
			      "not inherited by accept()");
			close(r);
			close(t);
		}
		close_conn(&c2);
		/* never connected */
		l = socket(AF_INET, SOCK_STREAM, 0);
		set_int(l, IPPROTO_TCP, TCP_MMAP_CONSUME, 1);
		m = map_consume(l, PG);
		CHECK(m == MAP_FAILED && errno == ENOTCONN, "unconnected: %s",
		      m == MAP_FAILED ? strerror(errno) : "succeeded");
		close(l);
	}
	close_conn(&c);
	free(keep);
	snprintf(detail, sizeof(detail), "get/set, EPERM write/exec, EINVAL offset, read-only, MAP_PRIVATE, off again, inherit, ENOTCONN");
	return 0;
}

/* Urgent data inside the range: EINVAL; just after it: maps. */
static int test_urgent(void)
{
	struct conn c;
	void *keep = NULL, *m;
	char ch;

	CHECK(!make_conn(&c, LOOPBACK_MSS, 1, 1), "connect: %s", strerror(errno));
	CHECK(!send_zc(c.tx, 0, PG, 0, &keep), "send");
	CHECK(send(c.tx, "U", 1, MSG_OOB) == 1, "send OOB");
	CHECK(!wait_inq(c.rx, PG, 5000), "data did not arrive");
	{
		/* make sure the urgent pointer has been seen */
		struct pollfd p = { c.rx, POLLPRI, 0 };

		CHECK(poll(&p, 1, 5000) == 1, "no POLLPRI");
	}
	m = map_consume(c.rx, 2 * PG);
	CHECK(m == MAP_FAILED && errno == EINVAL, "urgent in range: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	m = map_consume(c.rx, PG);
	CHECK(m != MAP_FAILED, "data before urgent byte: %s", strerror(errno));
	CHECK(check_pattern(m, PG, 0) < 0, "content wrong");
	munmap(m, PG);
	CHECK(recv(c.rx, &ch, 1, MSG_OOB) == 1 && ch == 'U', "OOB byte lost");
	close_conn(&c);
	free(keep);
	snprintf(detail, sizeof(detail), "EINVAL with urgent data in range, page before it mapped, OOB byte intact");
	return 0;
}

/* The mapping outlives the skbs, munmap of other mappings and the socket. */
static int test_pages_after_close(void)
{
	struct conn c;
	void *keep = NULL;
	uint8_t *m[4];
	const size_t chunk = 4 * PG;

	CHECK(!make_conn(&c, LOOPBACK_MSS, 1, 1), "connect: %s", strerror(errno));
	CHECK(!send_zc(c.tx, 0, 4 * chunk, 0, &keep), "send");
	CHECK(!wait_inq(c.rx, 4 * chunk, 5000), "data did not arrive");
	for (int i = 0; i < 4; i++) {
		m[i] = map_consume(c.rx, chunk);
		CHECK(m[i] != MAP_FAILED, "mmap %d: %s", i, strerror(errno));
	}
	CHECK(inq(c.rx) == 0, "not all consumed");
	close_conn(&c);
	free(keep);
	/* churn memory so freed pages would be reused */
	for (int k = 0; k < 8; k++) {
		void *junk = mmap(NULL, 8 << 20, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);

		if (junk != MAP_FAILED) {
			memset(junk, 0xa5, 8 << 20);
			munmap(junk, 8 << 20);
		}
	}
	for (int i = 0; i < 4; i++) {
		long bad = check_pattern(m[i], chunk, (uint64_t)i * chunk);

		CHECK(bad < 0, "mapping %d byte %ld changed after close", i, bad);
		munmap(m[i], chunk);
	}
	snprintf(detail, sizeof(detail), "4 x 16 KiB mappings intact after close + 64 MiB churn");
	return 0;
}

/* Upstream TCP_ZEROCOPY_RECEIVE on a socket that did not opt in. */
static int test_zerocopy_receive(void)
{
	struct conn c;
	void *keep = NULL, *region;
	uint8_t *buf;
	const size_t len = 16 * PG;
	size_t got = 0, mapped = 0;
	int q;

	CHECK(!make_conn(&c, LOOPBACK_MSS, 0, 1), "connect: %s", strerror(errno));
	region = mmap(NULL, len, PROT_READ, MAP_SHARED, c.rx, 0);
	CHECK(region != MAP_FAILED, "mmap region: %s", strerror(errno));
	CHECK(!send_zc(c.tx, 0, len, 1, &keep), "send");
	CHECK(!wait_inq(c.rx, len, 5000), "data did not arrive");
	buf = malloc(len);
	while (got < len) {
		struct zc_receive zc = { 0 };
		socklen_t zl = sizeof(zc);

		zc.address = (uintptr_t)region;
		zc.length = len - got;
		CHECK(!getsockopt(c.rx, IPPROTO_TCP, TCP_ZEROCOPY_RECEIVE, &zc, &zl),
		      "TCP_ZEROCOPY_RECEIVE: %s", strerror(errno));
		if (zc.length) {
			memcpy(buf + got, region, zc.length);
			got += zc.length;
			mapped += zc.length;
			madvise(region, len, MADV_DONTNEED);
		} else if (zc.recv_skip_hint) {
			CHECK(!recv_all(c.rx, buf + got, zc.recv_skip_hint), "recv");
			got += zc.recv_skip_hint;
		} else {
			CHECK(0, "no progress");
		}
	}
	CHECK(check_pattern(buf, len, 0) < 0, "content wrong");
	CHECK(mapped == len, "only %zu of %zu bytes zero-copied", mapped, len);
	q = inq(c.rx);
	CHECK(q == 0, "left over %d", q);
	munmap(region, len);
	free(buf);
	close_conn(&c);
	free(keep);
	snprintf(detail, sizeof(detail), "%zu/%zu bytes via TCP_ZEROCOPY_RECEIVE", mapped, len);
	return 0;
}

/* Without the option: mmap() consumes nothing and gives upstream's empty
 * region (SIGBUS on access); TCP_ZEROCOPY_RECEIVE refuses consumed VMAs.
 */
static int test_upstream_mmap(void)
{
	struct conn c;
	void *keep = NULL, *m;
	int q, sig;

	CHECK(!make_conn(&c, LOOPBACK_MSS, 0, 1), "connect: %s", strerror(errno));
	CHECK(!send_zc(c.tx, 0, 4 * PG, 0, &keep), "send");
	CHECK(!wait_inq(c.rx, 4 * PG, 5000), "data did not arrive");
	m = mmap(NULL, 2 * PG, PROT_READ, MAP_SHARED, c.rx, 0);
	CHECK(m != MAP_FAILED, "mmap: %s", strerror(errno));
	q = inq(c.rx);
	CHECK(q == (int)(4 * PG), "plain mmap consumed: inq %d", q);
	sig = probe_read(m);
	CHECK(sig == SIGBUS, "empty region access gave signal %d, expected SIGBUS", sig);
	munmap(m, 2 * PG);
	m = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED, c.rx, 0);
	CHECK(m == MAP_FAILED && errno == EPERM, "upstream PROT_WRITE: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	m = mmap(NULL, PG, PROT_READ, MAP_SHARED, c.rx, 3 * PG);
	CHECK(m != MAP_FAILED, "upstream ignores the offset: %s", strerror(errno));
	munmap(m, PG);

	/* a consuming mapping is not a TCP_ZEROCOPY_RECEIVE region */
	CHECK(!set_int(c.rx, IPPROTO_TCP, TCP_MMAP_CONSUME, 1), "set");
	m = map_consume(c.rx, PG);
	CHECK(m != MAP_FAILED, "consume: %s", strerror(errno));
	{
		struct zc_receive zc = { 0 };
		socklen_t zl = sizeof(zc);

		zc.address = (uintptr_t)m;
		zc.length = PG;
		CHECK(getsockopt(c.rx, IPPROTO_TCP, TCP_ZEROCOPY_RECEIVE, &zc, &zl) &&
		      errno == EINVAL, "TCP_ZEROCOPY_RECEIVE accepted a consume VMA");
	}
	CHECK(check_pattern(m, PG, 0) < 0, "content wrong");
	munmap(m, PG);
	close_conn(&c);
	free(keep);
	snprintf(detail, sizeof(detail), "no consume, SIGBUS region, EPERM write, ZEROCOPY_RECEIVE refuses consume VMA");
	return 0;
}

#ifdef SYS_remap_file_pages
/* remap_file_pages() calls do_mmap() without mmap_begin(): must not consume. */
static int test_remap_file_pages(void)
{
	struct conn c;
	void *keep = NULL, *m;
	int q;

	CHECK(!make_conn(&c, LOOPBACK_MSS, 1, 1), "connect: %s", strerror(errno));
	CHECK(!send_zc(c.tx, 0, 4 * PG, 0, &keep), "send");
	CHECK(!wait_inq(c.rx, 4 * PG, 5000), "data did not arrive");
	m = map_consume(c.rx, 2 * PG);
	CHECK(m != MAP_FAILED, "mmap: %s", strerror(errno));
	q = inq(c.rx);
	syscall(SYS_remap_file_pages, m, PG, 0, 0, 0);	/* result does not matter */
	CHECK(inq(c.rx) == q, "remap_file_pages consumed data");
	munmap(m, 2 * PG);
	m = map_consume(c.rx, 2 * PG);
	CHECK(m != MAP_FAILED, "mmap after remap: %s", strerror(errno));
	CHECK(check_pattern(m, 2 * PG, 2 * PG) < 0, "content wrong");
	munmap(m, 2 * PG);
	close_conn(&c);
	free(keep);
	snprintf(detail, sizeof(detail), "bypass of mmap_begin() consumed nothing");
	return 0;
}
#endif

/*
 * Lock-order exercise for lockdep: consuming mmap()s on one thread while
 * others take sk_lock -> mmap_lock (getsockopt into not-yet-faulted memory,
 * TCP_ZEROCOPY_RECEIVE) and mmap_lock alone (mmap/munmap churn) on the
 * same socket and process.  The verdict is lockdep's (dmesg, debug_locks).
 */
struct stress {
	struct conn c;
	volatile int stop;
	size_t consumed, copied, infos;
};

static void *stress_sender(void *arg)
{
	struct stress *s = arg;
	void *buf;

	if (posix_memalign(&buf, PG, 16 * PG))
		return NULL;
	fill_pattern(buf, 16 * PG, 0);
	while (!s->stop) {
		if (send_all(s->c.tx, buf, 16 * PG, MSG_ZEROCOPY | MSG_EOR))
			break;
		drain_completions(s->c.tx);
	}
	shutdown(s->c.tx, SHUT_WR);
	/* buf may still be referenced by in-flight zerocopy skbs: leak it */
	return NULL;
}

static void *stress_sockopt(void *arg)
{
	struct stress *s = arg;

	while (!s->stop) {
		/* fresh, unfaulted memory: the copy-out faults under lock_sock */
		struct tcp_info *ti = mmap(NULL, PG, PROT_READ | PROT_WRITE,
					   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		socklen_t l = sizeof(*ti);

		if (ti == MAP_FAILED)
			break;
		getsockopt(s->c.rx, IPPROTO_TCP, TCP_INFO, ti, &l);
		set_int(s->c.rx, IPPROTO_TCP, TCP_NODELAY, 1);
		get_int(s->c.rx, IPPROTO_TCP, TCP_MMAP_CONSUME);
		munmap(ti, PG);
		s->infos++;
	}
	return NULL;
}

static int test_lock_stress(void)
{
	struct stress s = { 0 };
	pthread_t th[2];
	double end;
	size_t fails = 0;
	long collapsed0;

	big_buffers = 0;
	CHECK(!make_conn(&s.c, LOOPBACK_MSS, 1, 1), "connect: %s", strerror(errno));
	big_buffers = 1;
	collapsed0 = tcpext("TCPRcvCollapsed");
	pthread_create(&th[0], NULL, stress_sender, &s);
	pthread_create(&th[1], NULL, stress_sockopt, &s);
	end = now_s() + stress_ms / 1000.0;
	while (now_s() < end) {
		void *m = map_consume(s.c.rx, 4 * PG);

		if (m == MAP_FAILED) {
			char tmp[4 * PG];

			if (errno == EAGAIN) {
				struct pollfd p = { s.c.rx, POLLIN, 0 };

				poll(&p, 1, 10);
				continue;
			}
			if (errno != EINVAL) {
				snprintf(fail_reason, sizeof(fail_reason), "mmap: %s", strerror(errno));
				s.stop = 1;
				break;
			}
			/* e.g. the receive queue was collapsed into linear skbs
			 * under memory pressure: copy a little and retry
			 */
			ssize_t r;

			fails++;
			r = recv(s.c.rx, tmp, sizeof(tmp), MSG_DONTWAIT);
			if (r > 0)
				s.copied += r;
			continue;
		}
		s.consumed += 4 * PG;
		munmap(m, 4 * PG);
	}
	s.stop = 1;
	/* unblock the sender */
	shutdown(s.c.rx, SHUT_RD);
	{
		char tmp[65536];

		while (recv(s.c.rx, tmp, sizeof(tmp), MSG_DONTWAIT) > 0)
			;
	}
	close(s.c.rx);
	s.c.rx = -1;
	pthread_join(th[0], NULL);
	pthread_join(th[1], NULL);
	close_conn(&s.c);
	if (fail_reason[0])
		return -1;
	CHECK(s.consumed > 0, "nothing consumed");
	snprintf(detail, sizeof(detail), "%.1f MiB consumed by mmap, %zu getsockopt(TCP_INFO) under lock_sock with faults, "
		 "%zu EINVAL fallbacks (%.1f MiB recv()ed; TCPRcvCollapsed +%ld) in %d ms",
		 s.consumed / 1048576.0, s.infos, fails, s.copied / 1048576.0,
		 tcpext("TCPRcvCollapsed") - collapsed0, stress_ms);
	return 0;
}

/* The same over IPv6 (inet6_stream_ops, sk_lock-AF_INET6). */
static int test_ipv6(void)
{
	struct conn c;
	void *keep = NULL, *m;
	const size_t len = 8 * PG;
	int r;

	conn_family = AF_INET6;
	r = make_conn(&c, LOOPBACK_MSS, 1, 1);
	conn_family = AF_INET;
	CHECK(!r, "connect [::1]: %s", strerror(errno));
	CHECK(get_int(c.rx, IPPROTO_TCP, TCP_MMAP_CONSUME) == 1, "not opted in");
	m = map_consume(c.rx, PG);
	CHECK(m == MAP_FAILED && errno == EAGAIN, "empty queue: %s",
	      m == MAP_FAILED ? strerror(errno) : "succeeded");
	CHECK(!send_zc(c.tx, 0, len, 1, &keep), "send");
	CHECK(!wait_inq(c.rx, len, 5000), "data did not arrive");
	m = map_consume(c.rx, len);
	CHECK(m != MAP_FAILED, "mmap: %s", strerror(errno));
	CHECK(check_pattern(m, len, 0) < 0, "content wrong");
	CHECK(inq(c.rx) == 0, "not consumed");
	close_conn(&c);
	CHECK(check_pattern(m, len, 0) < 0, "content changed after close");
	munmap(m, len);
	free(keep);
	snprintf(detail, sizeof(detail), "%zu bytes mapped over [::1]", len);
	return 0;
}

struct test {
	const char *name;
	int (*fn)(void);
};

static const struct test tests[] = {
	{ "args", test_args },
	{ "eagain_eio", test_eagain_eio },
	{ "einval_fallback", test_einval_fallback },
	{ "mixed_stream", test_mixed_stream },
	{ "urgent", test_urgent },
	{ "pages_after_close", test_pages_after_close },
	{ "zerocopy_receive_not_opted_in", test_zerocopy_receive },
	{ "upstream_mmap_not_opted_in", test_upstream_mmap },
#ifdef SYS_remap_file_pages
	{ "remap_file_pages_bypass", test_remap_file_pages },
#endif
	{ "ipv6", test_ipv6 },
	{ "lock_stress", test_lock_stress },
	{ "bulk_mmap", test_bulk_mmap },
};

int main(int argc, char **argv)
{
	int opt;

	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt(argc, argv, "t:s:S:")) != -1) {
		switch (opt) {
		case 't': bulk_mib = strtoul(optarg, NULL, 0); break;
		case 's': payload_kib = strtoul(optarg, NULL, 0); break;
		case 'S': stress_ms = atoi(optarg); break;
		default:
			fprintf(stderr, "usage: %s [-t bulk_MiB] [-s payload_KiB] [-S stress_ms] [test ...]\n", argv[0]);
			return 2;
		}
	}
	for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
		int want = optind >= argc;
		double t0;

		for (int a = optind; a < argc; a++)
			want |= !strcmp(argv[a], tests[i].name);
		if (!want)
			continue;
		fail_reason[0] = detail[0] = 0;
		t0 = now_s();
		if (tests[i].fn()) {
			n_fail++;
			printf("PAGERPC-TEST %s: FAIL %s (errno %d %s)\n", tests[i].name,
			       fail_reason, errno, strerror(errno));
		} else {
			n_pass++;
			printf("PAGERPC-TEST %s: PASS %s [%.2f s]\n", tests[i].name, detail,
			       now_s() - t0);
		}
	}
	printf("mmap_consume_test: %d passed, %d failed\n", n_pass, n_fail);
	return n_fail ? 1 : 0;
}
