"""The prefetcher: every stream and event of the offload path lives here.

Model code calls ``issue(layer, copy_fn)`` to start bringing a layer's tokens to the device and
``wait(layer)`` right before that layer's attention; after the attention it calls
``release(layer)`` so a later copy into the same buffers waits for the readers to finish.

On CUDA the copies run on a dedicated copy stream with one event per layer, and the compute
stream waits on that layer's event only. On the CPU there is one memory and nothing to overlap:
copies run synchronously and ``wait``/``release`` do nothing. New tokens' K and V go to the host
store through ``write_back`` (a device-to-host copy on its own stream on CUDA).
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch


class Prefetcher:
    """Owns the copy and write-back streams and the per-layer events (CUDA only)."""

    def __init__(self, device: torch.device, num_layers: int):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.writeback_stream = torch.cuda.Stream(device)
            self.fetched = {layer: torch.cuda.Event() for layer in range(num_layers)}
            self.consumed: dict[Hashable, torch.cuda.Event] = {}

    def issue(self, layer: int, copy_fn: Callable[[], None], buffer: Hashable | None = None) -> None:
        """Run ``copy_fn`` (which enqueues copies for ``layer``) asynchronously.

        ``buffer`` names the device buffers the copies write (default: the layer's own); the
        copies wait until the last reader of that buffer, marked by ``release``, is done.
        """
        if not self.cuda:
            copy_fn()
            return
        compute = torch.cuda.current_stream(self.device)
        # The copy reads indices just computed on the compute stream, and host tokens that the
        # write-back stream may still be writing: order after both.
        self.copy_stream.wait_stream(compute)
        self.copy_stream.wait_stream(self.writeback_stream)
        previous_reader = self.consumed.get(layer if buffer is None else buffer)
        if previous_reader is not None:
            # The last reader of these buffers (an earlier attention) must be done first.
            self.copy_stream.wait_event(previous_reader)
        with torch.cuda.stream(self.copy_stream):
            copy_fn()
            self.fetched[layer].record(self.copy_stream)

    def wait(self, layer: int) -> None:
        """Make the compute stream wait for ``layer``'s copies (not for any other layer's)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.fetched[layer])

    def release(self, buffer: Hashable) -> None:
        """Mark ``buffer`` (a layer index by default) as read by the work enqueued so far."""
        if self.cuda:
            event = self.consumed.setdefault(buffer, torch.cuda.Event())
            event.record(torch.cuda.current_stream(self.device))

    def write_back(self, write_fn: Callable[[], None], *sources: torch.Tensor) -> None:
        """Run ``write_fn`` (device-to-host copies of ``sources``) off the critical path."""
        if not self.cuda:
            write_fn()
            return
        # The new token's K/V were produced on the compute stream.
        self.writeback_stream.wait_stream(torch.cuda.current_stream(self.device))
        for tensor in sources:  # keep the allocator from reusing them before the copy ran
            tensor.record_stream(self.writeback_stream)
        with torch.cuda.stream(self.writeback_stream):
            write_fn()

    def drain(self) -> None:
        """Wait for every outstanding copy (end of a sequence, before freeing host memory)."""
        if self.cuda:
            self.copy_stream.synchronize()
            self.writeback_stream.synchronize()
