"""cffi build script for TCP frame headers in batches (compiled at install time):
`vhostpasst._tcpseg`, used by vhostpasst/proto/tcp/ on the host -> guest path."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    uint32_t vp_tcp_frames(uint8_t *const *bufs, const uint32_t *sizes, unsigned int n,
                           const uint8_t *tmpl, int six, uint32_t pseudo, uint32_t seq,
                           uint32_t ack, uint16_t wnd, uint8_t flags, uint8_t last_flags,
                           uint32_t *out_lens);
    """
)
ffibuilder.set_source(
    "vhostpasst._tcpseg",
    (Path(__file__).parent / "tcpseg.c").read_text(),
    include_dirs=[str(Path(__file__).parent)],  # tcp_frame.h
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
