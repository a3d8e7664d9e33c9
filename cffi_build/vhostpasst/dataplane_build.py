"""cffi build script for the TCP data plane (`vhostpasst._dataplane`, see dataplane.c): the
shared connection records and their table, and the consumer of vhost-user TX frames. The
declarations are dataplane.h's own text (its include guard and #include lines dropped), so the
structs Python sees are the ones the C was compiled with."""

import re
from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).parent
_header = (_HERE / "dataplane.h").read_text()
_decls = "\n".join(line for line in _header.splitlines()
                   if not re.match(r"\s*#\s*(ifndef|endif|include|define VP_)", line))

ffibuilder = FFI()
ffibuilder.cdef(
    _decls
    + """
    int dp_insert(struct dp_table *t, struct dp_flow *f);
    void dp_remove(struct dp_table *t, struct dp_flow *f);
    void dp_pass_begin(struct dp_table *t);
    int dp_take_tx(void *arg, const uint8_t *frame, uint32_t len, const uint8_t *vnet_hdr,
                   uint64_t offloads);
    void dp_tx_end(void *arg);
    int dp_fill(struct dp_table *t, struct dp_rx *rx, struct dp_flow *f, uint64_t *res);
    """
)
ffibuilder.set_source(
    "vhostpasst._dataplane",
    '#include "dataplane.h"\n' + (_HERE / "dataplane.c").read_text(),
    include_dirs=[str(_HERE)],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
