"""A bulk TCP exchange checked end to end by sha256, for the splice tests (test_splice,
test_pasta_forward): SERVER and CLIENT are Python programs (`python -c PROGRAM ADDR PORT MIB`)
that send MIB MiB of seeded random data each way, and _expected() the digest of what the
client must receive."""

from __future__ import annotations

MIB = 1 << 20
SIZE_MIB = 200

STREAM = """
import hashlib, random
def stream(seed, mib):
    r = random.Random(seed)
    for _ in range(mib):
        yield r.randbytes(1 << 20)
"""

SERVER = STREAM + """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
h = hashlib.sha256()
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    h.update(d)
c.sendall(h.hexdigest().encode())
for block in stream(2, int(sys.argv[3])):
    c.sendall(block)
c.close()
"""

CLIENT = STREAM + """
import hashlib, socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
sent = hashlib.sha256()
for block in stream(1, int(sys.argv[3])):
    sent.update(block); c.sendall(block)
c.shutdown(socket.SHUT_WR)
data = b""
while len(data) < 64:
    d = c.recv(64 - len(data))
    if not d:
        break
    data += d
got = hashlib.sha256(); n = 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    got.update(d); n += len(d)
print(sent.hexdigest(), data.decode(), got.hexdigest(), n)
"""


def _expected(seed: int, mib: int) -> str:
    import hashlib
    import random

    r = random.Random(seed)
    h = hashlib.sha256()
    for _ in range(mib):
        h.update(r.randbytes(MIB))
    return h.hexdigest()
