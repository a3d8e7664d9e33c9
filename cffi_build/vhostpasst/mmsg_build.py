"""cffi build script for recvmmsg/sendmmsg (compiled at install time): `vhostpasst._mmsg`."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    #define VP_MMSG_MAX 64
    struct vp_addr {
        uint16_t family;
        uint16_t port;
        uint32_t scope_id;
        uint8_t addr[16];
    };
    int vp_recvmmsg(int fd, uint8_t *const *bufs, const size_t *lens, unsigned int n,
                    size_t *out_lens, int *out_flags, struct vp_addr *addrs,
                    struct vp_addr *dsts);
    int vp_sendmmsg(int fd, uint8_t *const *bufs, const size_t *lens, unsigned int n);
    """
)
ffibuilder.set_source(
    "vhostpasst._mmsg",
    (Path(__file__).parent / "mmsg.c").read_text(),
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
