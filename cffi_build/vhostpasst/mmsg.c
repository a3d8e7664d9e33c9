/* recvmmsg()/sendmmsg() for vhostpasst's UDP path: many datagrams per system call, each
 * straight into (or out of) a caller-owned buffer, one iovec per datagram.
 *
 * The caller passes arrays of `n` buffer pointers and lengths; n is capped at VP_MMSG_MAX
 * and every length is used as given (the kernel never writes past it). Source addresses
 * come back as a flat struct so Python needs no sockaddr parsing; so do destinations (the
 * IP_PKTINFO / IPV6_PKTINFO control message, when the socket asked for it: a listener bound to
 * a wildcard learns which local or multicast address a datagram was sent to). Errors are
 * returned as -errno; nothing here allocates. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/socket.h>

#define VP_MMSG_MAX 64
#define VP_CMSG_ROOM 64	/* one in6_pktinfo (or in_pktinfo) control message, with room */

struct vp_addr {
	uint16_t family;	/* AF_INET, AF_INET6, or 0 if none */
	uint16_t port;		/* host byte order */
	uint32_t scope_id;
	uint8_t addr[16];	/* IPv4: first 4 bytes */
};

static void to_vp_addr(const struct sockaddr_storage *ss, socklen_t len, struct vp_addr *out)
{
	memset(out, 0, sizeof(*out));
	if (ss->ss_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;

		out->family = AF_INET;
		out->port = ntohs(sin->sin_port);
		memcpy(out->addr, &sin->sin_addr, 4);
	} else if (ss->ss_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
		const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;

		out->family = AF_INET6;
		out->port = ntohs(sin6->sin6_port);
		out->scope_id = sin6->sin6_scope_id;
		memcpy(out->addr, &sin6->sin6_addr, 16);
	}
}

/* The destination of a received datagram from its packet-info control message (family 0
 * if there is none); the port is left 0: the socket's own. */
static void to_vp_dst(struct msghdr *mh, struct vp_addr *out)
{
	struct cmsghdr *c;

	memset(out, 0, sizeof(*out));
	for (c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c)) {
		if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO &&
		    c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo))) {
			struct in_pktinfo pi;

			memcpy(&pi, CMSG_DATA(c), sizeof(pi));
			out->family = AF_INET;
			memcpy(out->addr, &pi.ipi_addr, 4);
			out->scope_id = pi.ipi_ifindex;
			return;
		}
		if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO &&
		    c->cmsg_len >= CMSG_LEN(sizeof(struct in6_pktinfo))) {
			struct in6_pktinfo pi6;

			memcpy(&pi6, CMSG_DATA(c), sizeof(pi6));
			out->family = AF_INET6;
			memcpy(out->addr, &pi6.ipi6_addr, 16);
			out->scope_id = pi6.ipi6_ifindex;
			return;
		}
	}
}

/* Receive up to n datagrams: lengths in out_lens, msg_flags (MSG_TRUNC...) in out_flags,
 * sources in addrs and destinations in dsts (either may be NULL). Returns the count, or
 * -errno (-EAGAIN: nothing there). */
int vp_recvmmsg(int fd, uint8_t *const *bufs, const size_t *lens, unsigned int n,
		size_t *out_lens, int *out_flags, struct vp_addr *addrs, struct vp_addr *dsts)
{
	struct mmsghdr msgs[VP_MMSG_MAX];
	struct iovec iov[VP_MMSG_MAX];
	struct sockaddr_storage ss[VP_MMSG_MAX];
	union {
		char buf[VP_CMSG_ROOM];
		struct cmsghdr align;
	} cmsg[VP_MMSG_MAX];
	unsigned int i;
	int ret;

	if (n > VP_MMSG_MAX)
		n = VP_MMSG_MAX;
	if (!n)
		return 0;
	memset(msgs, 0, sizeof(msgs[0]) * n);
	for (i = 0; i < n; i++) {
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = lens[i];
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
		msgs[i].msg_hdr.msg_name = addrs ? &ss[i] : NULL;
		msgs[i].msg_hdr.msg_namelen = addrs ? sizeof(ss[i]) : 0;
		msgs[i].msg_hdr.msg_control = dsts ? cmsg[i].buf : NULL;
		msgs[i].msg_hdr.msg_controllen = dsts ? sizeof(cmsg[i].buf) : 0;
	}
	ret = recvmmsg(fd, msgs, n, MSG_DONTWAIT, NULL);
	if (ret < 0)
		return -errno;
	for (i = 0; i < (unsigned int)ret; i++) {
		out_lens[i] = msgs[i].msg_len;
		out_flags[i] = msgs[i].msg_hdr.msg_flags;
		if (addrs)
			to_vp_addr(&ss[i], msgs[i].msg_hdr.msg_namelen, &addrs[i]);
		if (dsts)
			to_vp_dst(&msgs[i].msg_hdr, &dsts[i]);
	}
	return ret;
}

/* Send n datagrams on a connected socket. Returns how many were sent, or -errno. */
int vp_sendmmsg(int fd, uint8_t *const *bufs, const size_t *lens, unsigned int n)
{
	struct mmsghdr msgs[VP_MMSG_MAX];
	struct iovec iov[VP_MMSG_MAX];
	unsigned int i;
	int ret;

	if (n > VP_MMSG_MAX)
		n = VP_MMSG_MAX;
	if (!n)
		return 0;
	memset(msgs, 0, sizeof(msgs[0]) * n);
	for (i = 0; i < n; i++) {
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = lens[i];
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	ret = sendmmsg(fd, msgs, n, MSG_DONTWAIT);
	return ret < 0 ? -errno : ret;
}
