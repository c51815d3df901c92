/* fprr: request/response load for fastpath's ratio benchmarks.
 *
 * A small C tool instead of a Python client because per-transaction cost in
 * the client must be far below the path difference being measured.
 *
 *   fprr server -H ADDR -p PORT [-u] [-t MAXSEC]
 *       echo every byte (TCP, any number of connections) or datagram (-u)
 *       back to its sender; exits after MAXSEC (default 300, at most 3600).
 *   fprr rr  -H ADDR -p PORT [-s SIZE] [-d SEC] [-n COUNT] [-u] [-b LOCAL]
 *       one TCP connection (or a connected UDP socket with -u): send SIZE
 *       bytes, wait for SIZE bytes back, repeat; reports transactions/s.
 *   fprr crr -H ADDR -p PORT [-s SIZE] [-d SEC] [-n COUNT] [-b LOCAL]
 *       connect, one request, one response, close; repeat; reports
 *       connections/s.
 *
 * Clients stop after SEC seconds (default 3, at most 600) or COUNT
 * transactions, whichever comes first, and print one JSON line:
 *   {"mode":"rr","proto":"tcp","size":1,"transactions":N,"seconds":S,
 *    "rate":R,"errors":E}
 * The server binds only ADDR and clients connect only to ADDR (and bind only
 * LOCAL if given): nothing listens on or sends to any other address.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZE 65536
#define MAX_CONNS 256
#define MAX_CLIENT_SECONDS 600
#define MAX_SERVER_SECONDS 3600
/* A UDP request with no answer within this long counts as lost. */
#define UDP_TIMEOUT_MS 200
/* Give up when the path is plainly broken rather than spin for SEC seconds. */
#define MAX_ERRORS 1000

struct opts {
	const char *mode;
	const char *host;
	const char *local;
	int port;
	int udp;
	long size;
	double seconds;
	long count;
	long server_seconds;
};

static void usage(void)
{
	fprintf(stderr,
		"usage: fprr server -H ADDR -p PORT [-u] [-t MAXSEC]\n"
		"       fprr rr  -H ADDR -p PORT [-s SIZE] [-d SEC] [-n COUNT] [-u] [-b LOCAL]\n"
		"       fprr crr -H ADDR -p PORT [-s SIZE] [-d SEC] [-n COUNT] [-b LOCAL]\n");
	exit(2);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* An IPv4 or IPv6 socket address (the family follows the text). */
struct fpaddr {
	union {
		struct sockaddr sa;
		struct sockaddr_in v4;
		struct sockaddr_in6 v6;
	} u;
	socklen_t len;
	int family;
};

static struct fpaddr addr_of(const char *ip, int port)
{
	struct fpaddr a;
	memset(&a, 0, sizeof(a));
	if (inet_pton(AF_INET, ip, &a.u.v4.sin_addr) == 1) {
		a.family = a.u.v4.sin_family = AF_INET;
		a.u.v4.sin_port = htons((uint16_t)port);
		a.len = sizeof(a.u.v4);
	} else if (inet_pton(AF_INET6, ip, &a.u.v6.sin6_addr) == 1) {
		a.family = a.u.v6.sin6_family = AF_INET6;
		a.u.v6.sin6_port = htons((uint16_t)port);
		a.len = sizeof(a.u.v6);
	} else {
		fprintf(stderr, "fprr: not an IPv4 or IPv6 address: %s\n", ip);
		exit(2);
	}
	return a;
}

static int write_all(int fd, const char *buf, long n)
{
	long done = 0;
	while (done < n) {
		ssize_t w = write(fd, buf + done, n - done);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		done += w;
	}
	return 0;
}

static int read_all(int fd, char *buf, long n)
{
	long done = 0;
	while (done < n) {
		ssize_t r = read(fd, buf + done, n - done);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (r == 0)
			return -1;	/* peer closed mid-response */
		done += r;
	}
	return 0;
}

/* ---- server ------------------------------------------------------------ */

static __attribute__((noreturn)) void serve_udp(const struct opts *o)
{
	static char buf[MAX_SIZE];
	struct fpaddr sa = addr_of(o->host, o->port);
	struct sockaddr_storage peer;
	int one = 1, fd = socket(sa.family, SOCK_DGRAM, 0);
	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, &sa.u.sa, sa.len) < 0)
		die("bind");
	for (;;) {
		socklen_t plen = sizeof(peer);
		ssize_t r = recvfrom(fd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &plen);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			die("recvfrom");
		}
		sendto(fd, buf, r, 0, (struct sockaddr *)&peer, plen);
	}
}

static __attribute__((noreturn)) void serve_tcp(const struct opts *o)
{
	static char buf[MAX_SIZE];
	struct fpaddr sa = addr_of(o->host, o->port);
	struct pollfd pfd[MAX_CONNS + 1];
	int n = 1, one = 1, lfd = socket(sa.family, SOCK_STREAM, 0);
	if (lfd < 0)
		die("socket");
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, &sa.u.sa, sa.len) < 0)
		die("bind");
	if (listen(lfd, 1024) < 0)
		die("listen");
	pfd[0].fd = lfd;
	pfd[0].events = POLLIN;
	for (;;) {
		if (poll(pfd, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		for (int i = n - 1; i >= 1; i--) {
			if (!pfd[i].revents)
				continue;
			ssize_t r = read(pfd[i].fd, buf, sizeof(buf));
			if (r > 0 && write_all(pfd[i].fd, buf, r) == 0)
				continue;
			if (r < 0 && errno == EINTR)
				continue;
			/* EOF or error: the client is done with this connection. */
			close(pfd[i].fd);
			pfd[i] = pfd[--n];
		}
		if (pfd[0].revents & POLLIN) {
			int cfd = accept(lfd, NULL, NULL);
			if (cfd < 0)
				continue;
			if (n > MAX_CONNS) {
				close(cfd);
				continue;
			}
			setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			pfd[n].fd = cfd;
			pfd[n].events = POLLIN;
			pfd[n].revents = 0;
			n++;
		}
	}
}

/* ---- clients ------------------------------------------------------------ */

static int client_socket(const struct opts *o, int type)
{
	int one = 1, fd = socket(addr_of(o->host, 0).family, type, 0);
	if (fd < 0)
		die("socket");
	if (o->local) {
		struct fpaddr la = addr_of(o->local, 0);
		/* Leave the port to connect(): bind() would refuse every port still
		 * in TIME_WAIT, while connect() may reuse them (tcp_tw_reuse). */
		setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
		if (bind(fd, &la.u.sa, la.len) < 0)
			die("bind");
	}
	if (type == SOCK_STREAM)
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

static void report(const struct opts *o, long n, double secs, long errors)
{
	printf("{\"mode\":\"%s\",\"proto\":\"%s\",\"size\":%ld,\"transactions\":%ld,"
	       "\"seconds\":%.6f,\"rate\":%.1f,\"errors\":%ld}\n",
	       o->mode, o->udp ? "udp" : "tcp", o->size, n, secs, secs > 0 ? n / secs : 0.0, errors);
	fflush(stdout);
}

static int done(const struct opts *o, long n, double t0, double *t)
{
	*t = now();
	return (o->count && n >= o->count) || *t - t0 >= o->seconds;
}

static int client_rr(const struct opts *o)
{
	static char buf[MAX_SIZE];
	struct fpaddr sa = addr_of(o->host, o->port);
	int fd = client_socket(o, o->udp ? SOCK_DGRAM : SOCK_STREAM);
	long n = 0, errors = 0;
	double t0, t;
	memset(buf, 'r', o->size);
	if (o->udp) {
		struct timeval tv = {0, UDP_TIMEOUT_MS * 1000};
		setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	}
	if (connect(fd, &sa.u.sa, sa.len) < 0)
		die("connect");
	t0 = now();
	while (!done(o, n, t0, &t)) {
		if (o->udp) {
			if (send(fd, buf, o->size, 0) != o->size || recv(fd, buf, o->size, 0) != o->size) {
				if (++errors > MAX_ERRORS)
					break;
				continue;
			}
		} else if (write_all(fd, buf, o->size) || read_all(fd, buf, o->size)) {
			perror("rr");
			errors++;
			break;	/* a broken TCP connection does not heal */
		}
		n++;
	}
	close(fd);
	report(o, n, t - t0, errors);
	return errors > MAX_ERRORS || (!o->udp && errors) ? 1 : 0;
}

static int client_crr(const struct opts *o)
{
	static char buf[MAX_SIZE];
	struct fpaddr sa = addr_of(o->host, o->port);
	long n = 0, errors = 0;
	double t0, t;
	memset(buf, 'c', o->size);
	t0 = now();
	while (!done(o, n, t0, &t)) {
		int fd = client_socket(o, SOCK_STREAM);
		if (connect(fd, &sa.u.sa, sa.len) < 0 ||
		    write_all(fd, buf, o->size) || read_all(fd, buf, o->size)) {
			int err = errno;
			close(fd);
			/* Out of local ports (TIME_WAIT): brief pause, not a path fault. */
			if (err == EADDRNOTAVAIL)
				usleep(1000);
			if (++errors > MAX_ERRORS) {
				errno = err;
				perror("crr");
				break;
			}
			continue;
		}
		close(fd);
		n++;
	}
	report(o, n, t - t0, errors);
	return errors > MAX_ERRORS ? 1 : 0;
}

int main(int argc, char **argv)
{
	struct opts o = {.size = 1, .seconds = 3, .server_seconds = 300};
	int c;
	if (argc < 2)
		usage();
	o.mode = argv[1];
	optind = 2;
	while ((c = getopt(argc, argv, "H:p:b:s:d:n:t:u")) != -1) {
		switch (c) {
		case 'H': o.host = optarg; break;
		case 'p': o.port = atoi(optarg); break;
		case 'b': o.local = optarg; break;
		case 's': o.size = atol(optarg); break;
		case 'd': o.seconds = atof(optarg); break;
		case 'n': o.count = atol(optarg); break;
		case 't': o.server_seconds = atol(optarg); break;
		case 'u': o.udp = 1; break;
		default: usage();
		}
	}
	if (!o.host || o.port <= 0 || o.port > 65535 || o.size < 1 || o.size > MAX_SIZE ||
	    o.seconds <= 0 || o.seconds > MAX_CLIENT_SECONDS || o.count < 0 ||
	    o.server_seconds <= 0 || o.server_seconds > MAX_SERVER_SECONDS)
		usage();
	signal(SIGPIPE, SIG_IGN);
	if (!strcmp(o.mode, "server")) {
		/* Bounded even if nobody stops it: SIGALRM's default action ends it. */
		alarm((unsigned)o.server_seconds);
		if (o.udp)
			serve_udp(&o);
		serve_tcp(&o);
	}
	if (!strcmp(o.mode, "rr"))
		return client_rr(&o);
	if (!strcmp(o.mode, "crr") && !o.udp)
		return client_crr(&o);
	usage();
	return 2;
}
