/* TCP's side of vhost-user's one-call RX fill (virtio's vr_rx_fill(), cffi_build/virtio/
 * ring.c), used by vhostpasst/proto/tcp/out_vu.py: the ring library pops the guest's RX
 * buffers, lays the frames out over them and checks every buffer record against the guest's
 * memory regions (guest_mem.h), then calls the two functions here with pointers into those
 * checked buffers only:
 *
 * - vp_tcp_read(), the frame reader: one recvmsg() of the connection's socket (MSG_PEEK: the
 *   bytes stay queued until the guest acknowledges them) into the frames' payload iovecs;
 * - vp_tcp_fill_writer(), the frame writer: each frame's Ethernet, IP and TCP headers from the
 *   connection's template, in place before its payload (tcpsg.c, unsummed: GUEST_CSUM).
 *
 * Compiled into vhostpasst._tcpsg together with tcpsg.c (tcpsg_build.py). */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "tcp_frame.h"
#include "tcp_vu.h"


/* A vr_frame_reader: returns the bytes read (0: the end of the stream) or -errno. */
long vp_tcp_read(void *arg, const struct iovec *iov, unsigned int niov)
{
	const struct vp_tcp_read *r = arg;
	struct msghdr msg;
	ssize_t n;

	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = (struct iovec *)iov;
	msg.msg_iovlen = niov;
	do
		n = recvmsg(r->fd, &msg, r->flags);
	while (n < 0 && errno == EINTR);
	return n < 0 ? -errno : n;
}

/* vp_tcp_frames_sg_tso() as virtio's vr_rx_fill() calls a frame writer (cffi_build/virtio/ring.c):
 * frame i's headers at firsts[i] (first_lens[i] bytes there), sizes[i] payload bytes after
 * them in the guest's buffers, unsummed (GUEST_CSUM: DATA_VALID). The connection's fields
 * come in `arg`; its seq moves on past the frames. Returns 0, or -1 as that call. */
#define VP_FILL_MAX 256

int64_t vp_tcp_fill_writer(void *arg, uint8_t *const *firsts, const uint32_t *first_lens,
			   const uint32_t *sizes, unsigned int n, uint32_t *lens)
{
	struct vp_tcp_fill *f = arg;
	uint32_t first[VP_FILL_MAX + 1];
	unsigned int i;
	int64_t seq;

	if (n > VP_FILL_MAX)
		return -1;
	for (i = 0; i <= n; i++)
		first[i] = i;
	seq = vp_tcp_frames_sg_tso(firsts, first_lens, n, first, sizes, n, f->tmpl, f->six,
				   f->pseudo, f->seq, f->ack, f->wnd, f->flags, f->last_flags, 0,
				   f->tso_mss, lens);
	if (seq < 0)
		return -1;
	f->seq = (uint32_t)seq;
	return 0;
}
