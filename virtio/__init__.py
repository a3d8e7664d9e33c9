"""vhost-user device back-end library (virtqueues, guest memory); knows nothing about IP.

- `message`: the wire codec (header, per-request size/fd rules, `MessageReader`, replies).
- `memory.GuestMemory`: regions mmap'd from the front end's fds; `gpa()` / `uva()` views.
- `virtqueue.VirtQueue`: split ring: `pop() -> Chain | None`, `push(head, len)`, `flush()`,
  `rewind(n)`, notification control; ordered index accesses in C (`ring`, `_ring`).
- `backend.VhostUserBackend(sock, loop, device)`: the protocol state machine; a `Device`
  subclass supplies features/queues and gets started/stopped/enabled/kicked callbacks.
- `devstate.StateTransfer`: a device's opaque migration state over SET_DEVICE_STATE_FD's
  pipe, in the loop (a device with `max_state_size` supplies `save_state`/`load_state`).
- `net`: virtio-net header, `tx_frame()` (one Chain) and `TxGather` (a batch popped and
  its frames found in one C call, `_net`), mergeable `rx_put()` and `rx_frames()`,
  `NetDevice`.
"""
