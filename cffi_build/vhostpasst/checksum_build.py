"""cffi build script for the checksum fast path (compiled at install time)."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    uint32_t vp_csum_partial(const uint8_t *buf, size_t len, uint32_t init);
    uint16_t vp_csum_fold(uint32_t sum);
    """
)
ffibuilder.set_source(
    "vhostpasst._csum",
    (Path(__file__).parent / "checksum.c").read_text(),
    include_dirs=[str(Path(__file__).parent)],  # csum.h
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
