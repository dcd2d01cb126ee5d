"""The prefetcher: every stream and event of the offload path lives here.

Model code calls ``issue(layer, copy_fn, keep_alive=...)`` to start bringing a layer's tokens to
the device and ``wait(layer)`` right before that layer's attention; after the attention it calls
``release(layer)`` so a later copy into the same buffers waits for the readers to finish.

On CUDA the copies run on a dedicated copy stream with one event per layer, and the compute
stream waits on that layer's event only. On the CPU there is one memory: copies run synchronously
and ``wait``/``release`` do nothing, unless the prefetcher has a copy thread (``copy_thread``, for a
machine with a core the model does not use): then each ``copy_fn`` runs on that one thread, in
the order issued, while the caller goes on with earlier layers, and ``wait(layer)`` blocks until
that layer's last copy is done (re-raising what it raised). The thread plays the copy engine's
part; the native kernels it calls release the GIL. New tokens' K and V go to the host store
through ``write_back`` (a device-to-host copy on its own stream on CUDA, synchronous on the CPU).

Lifetimes: a copy reads tensors made on the compute stream (a fetch plan's positions, slots and
counts). When Python drops them, the caching allocator may hand their memory to the next
compute-stream allocation while the copy stream still reads it. ``keep_alive`` tensors are
therefore marked with ``record_stream`` (the allocator waits for the copy stream's work queued
so far before reusing them) and also held here until their copy's event has completed.

All CUDA calls go through ``CudaStreams``; tests pass a stand-in to run this bookkeeping on CPU.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Callable, Hashable, Sequence

import torch


class CudaStreams:
    """The few CUDA stream and event operations the prefetcher uses (torch.cuda)."""

    def __init__(self, device: torch.device):
        self.device = device

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def new_event(self):
        return torch.cuda.Event()

    def current(self):
        return torch.cuda.current_stream(self.device)

    def use(self, stream) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    @staticmethod
    def keep_for(tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)


class Prefetcher:
    """Owns the copy and write-back streams and the per-layer events (CUDA), or the copy thread (CPU)."""

    def __init__(self, device: torch.device, num_layers: int, streams: CudaStreams | None = None,
                 copy_thread: bool = False):
        self.device = device
        self.cuda = device.type == "cuda" or streams is not None
        if copy_thread and self.cuda:
            raise ValueError("a copy thread is for copies on the CPU; on CUDA they run on a copy stream")
        # the CPU's copy engine: one thread, so copies run in the order issued
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tbrun-copy") if copy_thread else None
        self._pending: dict[int, list[Future]] = {}  # layer -> its copies issued to the thread, not waited for
        if self.cuda:
            self.streams = streams or CudaStreams(device)
            self.copy_stream = self.streams.new_stream()
            self.writeback_stream = self.streams.new_stream()
            self.fetched = {layer: self.streams.new_event() for layer in range(num_layers)}
            self.consumed: dict[Hashable, object] = {}
            self.in_flight: list[tuple[object, tuple[torch.Tensor, ...]]] = []  # (event, tensors kept)

    def issue(self, layer: int, copy_fn: Callable[[], None], buffer: Hashable | None = None,
              keep_alive: Sequence[torch.Tensor] = ()) -> None:
        """Run ``copy_fn`` (which enqueues copies for ``layer``) asynchronously.

        ``buffer`` names the device buffers the copies write (default: the layer's own); the
        copies wait until the last reader of that buffer, marked by ``release``, is done.
        ``keep_alive``: tensors the copies read (the plan) that must outlive them.
        """
        if not self.cuda:
            if self._thread is None:
                copy_fn()
            else:
                self._pending.setdefault(layer, []).append(
                    self._thread.submit(_in_mode, copy_fn, torch.is_inference_mode_enabled()))
            return
        self._forget_finished()
        compute = self.streams.current()
        # The copy reads indices just computed on the compute stream, and host tokens that the
        # write-back stream may still be writing: order after both.
        self.copy_stream.wait_stream(compute)
        self.copy_stream.wait_stream(self.writeback_stream)
        previous_reader = self.consumed.get(layer if buffer is None else buffer)
        if previous_reader is not None:
            # The last reader of these buffers (an earlier attention) must be done first.
            self.copy_stream.wait_event(previous_reader)
        with self.streams.use(self.copy_stream):
            copy_fn()
            done = self.fetched[layer]
            done.record(self.copy_stream)
        if keep_alive:
            for tensor in keep_alive:  # the allocator must not reuse them before the copy ran
                self.streams.keep_for(tensor, self.copy_stream)
            # Own event: ``fetched[layer]`` is re-recorded by the next issue of this layer.
            finished = self.streams.new_event()
            finished.record(self.copy_stream)
            self.in_flight.append((finished, tuple(keep_alive)))

    def _forget_finished(self) -> None:
        """Drop the references of copies known to be complete (``query`` never blocks)."""
        self.in_flight = [entry for entry in self.in_flight if not entry[0].query()]

    def wait(self, layer: int) -> None:
        """Make the compute stream wait for ``layer``'s copies (not for any other layer's); with a copy
        thread, block until they are done."""
        pending = self._pending.pop(layer, ())
        errors = [future.exception() for future in pending]  # every one done before anything is raised
        if any(errors):
            raise next(error for error in errors if error is not None)
        if self.cuda:
            self.streams.current().wait_event(self.fetched[layer])

    def release(self, buffer: Hashable) -> None:
        """Mark ``buffer`` (a layer index by default) as read by the work enqueued so far."""
        if self.cuda:
            event = self.consumed.setdefault(buffer, self.streams.new_event())
            event.record(self.streams.current())

    def write_back(self, write_fn: Callable[[], None], *sources: torch.Tensor) -> None:
        """Run ``write_fn`` (device-to-host copies of ``sources``) off the critical path."""
        if not self.cuda:
            write_fn()
            return
        # The new token's K/V were produced on the compute stream.
        self.writeback_stream.wait_stream(self.streams.current())
        for tensor in sources:  # keep the allocator from reusing them before the copy ran
            self.streams.keep_for(tensor, self.writeback_stream)
        with self.streams.use(self.writeback_stream):
            write_fn()

    def drain(self, raise_errors: bool = True) -> None:
        """Wait for every outstanding copy (end of a sequence, before freeing host memory). With a copy
        thread: everything issued so far has run when this returns, and the first error of a copy no
        one waited for is raised (unless ``raise_errors`` is False: on a path already failing)."""
        pending, self._pending = [future for futures in self._pending.values() for future in futures], {}
        if self._thread is not None:
            self._thread.submit(lambda: None).result()  # one thread, in order: every earlier copy is done
        errors = [error for error in (future.exception() for future in pending) if error is not None]
        if errors and raise_errors:
            raise errors[0]
        if self.cuda:
            self.copy_stream.synchronize()
            self.writeback_stream.synchronize()
            self.in_flight.clear()

    def close(self) -> None:
        """Drain, then stop the copy thread (if any). The prefetcher is not used afterwards. Every copy was
        waited for by its layer, so an error left here belongs to a sequence that already failed with its
        own: it is not raised again."""
        try:
            self.drain(raise_errors=False)
        finally:
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None


def _in_mode(copy_fn: Callable[[], None], inference: bool) -> None:
    """``copy_fn`` on the copy thread, in the caller's inference mode (thread-local in torch: an inference
    tensor cannot be written outside it) and without autograd (copies need none)."""
    with torch.inference_mode(inference), torch.no_grad():
        copy_fn()
