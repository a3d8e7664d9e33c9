/* The arguments of tcp_vu.c's reader and writer: filled by out_vu.py through cffi, and by the
 * data plane's C (dataplane.c) for the fills it makes itself. */
#ifndef VP_TCP_VU_H
#define VP_TCP_VU_H

#include <stdint.h>

#define VP_TMPL_LEN 74	/* Ethernet + IPv6 + TCP headers: the longest template */

/* The reader's argument: the socket and the recvmsg() flags. */
struct vp_tcp_read {
	int32_t fd;
	int32_t flags;
};

/* The writer's: the connection's template and the per-call fields; seq moves on. */
struct vp_tcp_fill {
	uint8_t tmpl[VP_TMPL_LEN];
	int32_t six;
	uint32_t pseudo, seq, ack, tso_mss;
	uint16_t wnd;
	uint8_t flags, last_flags;
};

#endif
