"""cffi build script for the split-virtqueue index helpers (memory barriers; see ring.c)."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int vr_avail_idx(const uint8_t *avail, size_t len);
    int vr_avail_flags(const uint8_t *avail, size_t len);
    int vr_avail_head(const uint8_t *avail, size_t len, unsigned num, unsigned idx);
    int vr_used_event(const uint8_t *avail, size_t len, unsigned num);
    int vr_used_put(uint8_t *used, size_t len, unsigned num, unsigned idx, uint32_t id,
                    uint32_t elem_len);
    int vr_used_publish(uint8_t *used, size_t len, unsigned idx);
    int vr_used_idx(const uint8_t *used, size_t len);
    int vr_used_flags_set(uint8_t *used, size_t len, unsigned flags);
    int vr_avail_event_set(uint8_t *used, size_t len, unsigned num, unsigned value);
    """
)
ffibuilder.set_source(
    "virtio._ring",
    (Path(__file__).parent / "ring.c").read_text(),
    extra_compile_args=["-O2"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
