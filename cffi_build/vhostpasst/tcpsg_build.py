"""cffi build script for TCP frame headers over scattered buffers (compiled at install time):
`vhostpasst._tcpsg`, used by vhostpasst/proto/tcp/ when a link hands out frames that span
several buffers (vhost-user mergeable RX, Link.rx_scatter), and for the reader and writer of
vhost-user's one-call fill (tcp_vu.c)."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int64_t vp_tcp_frames_sg(uint8_t *const *bufs, const uint32_t *lens, unsigned int npieces,
                             const uint32_t *first, const uint32_t *sizes, unsigned int n,
                             const uint8_t *tmpl, int six, uint32_t pseudo, uint32_t seq,
                             uint32_t ack, uint16_t wnd, uint8_t flags, uint8_t last_flags,
                             int csum, uint32_t *out_lens);
    int64_t vp_tcp_frames_sg_tso(uint8_t *const *bufs, const uint32_t *lens,
                                 unsigned int npieces, const uint32_t *first,
                                 const uint32_t *sizes, unsigned int n, const uint8_t *tmpl,
                                 int six, uint32_t pseudo, uint32_t seq, uint32_t ack,
                                 uint16_t wnd, uint8_t flags, uint8_t last_flags, int csum,
                                 uint32_t tso_mss, uint32_t *out_lens);
    struct vp_tcp_fill {
        uint8_t tmpl[74];
        int32_t six;
        uint32_t pseudo, seq, ack, tso_mss;
        uint16_t wnd;
        uint8_t flags, last_flags;
    };
    int64_t vp_tcp_fill_writer(void *arg, uint8_t *const *firsts, const uint32_t *first_lens,
                               const uint32_t *sizes, unsigned int n, uint32_t *lens);
    struct vp_tcp_read {
        int32_t fd;
        int32_t flags;
    };
    struct iovec;
    long vp_tcp_read(void *arg, const struct iovec *iov, unsigned int niov);
    """
)
ffibuilder.set_source(
    "vhostpasst._tcpsg",
    # tcp_vu.c: vhost-user's frame reader and writer (see there)
    "".join((Path(__file__).parent / name).read_text() for name in ("tcpsg.c", "tcp_vu.c")),
    include_dirs=[str(Path(__file__).parent)],  # tcp_frame.h
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
