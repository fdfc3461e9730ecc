"""Replaying a fixed-shape piece of GPU work as a CUDA graph.

A MACE iteration on a GPU is a few hundred small kernels; launched one by one from Python their
dispatch costs more than their work (issue 9: ~5 ms per shape iteration on an H200, most of it
launch). Captured once as a CUDA graph, an iteration is one launch. Only work whose shapes and
control flow do not depend on data can be captured, and its inputs must stay at the same addresses
(parameters updated in place, e.g. with `copy_`).
"""
from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

import torch

Outputs = TypeVar("Outputs")
# One capture at a time in the process: torch.cuda.graph captures on one side stream shared by all
# captures, and the node's requests (IK and shape) run in threads of their own.
_CAPTURE_LOCK = threading.Lock()


def padded_size(count: int, minimum: int) -> int:
    """The power of two (at least `minimum`) that a batch of `count` rows is padded to: one graph per power
    of two serves every batch size, at most twice the work."""
    return max(minimum, 1 << (count - 1).bit_length())


def write_padded(buffer: torch.Tensor, values: torch.Tensor) -> None:
    """values [n, ...] into the first n rows of a padded buffer, row 0 repeated after them (finite, never read back)."""
    count = values.shape[0]
    buffer[count:].copy_(values[:1].expand_as(buffer[count:]))
    buffer[:count].copy_(values)


class GraphedCall(Generic[Outputs]):
    """`call()` run eagerly the first time (the warm-up: cuBLAS handles, cached solves, allocations),
    captured as a CUDA graph the second time, then replayed.

    `call` takes no arguments: its inputs are tensors it closes over, read at their addresses on every
    replay. Its outputs (tensors, or a tuple of them) are the graph's own buffers, overwritten by the
    next call: copy what must outlive it. Random draws from `generator` (a CUDA generator) advance it on
    every replay as they would eagerly. If the capture fails (an operation that synchronises with the
    host, say), every later call runs eagerly and `failure` says why. Off CUDA, or with `capture` False,
    every call is eager. Graphs that share a memory `pool` (`torch.cuda.graph_pool_handle()`) must not run
    at the same time, and their outputs are only valid until any of them replays.
    """

    def __init__(self, call: Callable[[], Outputs], device: torch.device, generator: torch.Generator | None = None, capture: bool = True,
                 pool: tuple[int, int] | None = None):
        self.call = call
        self.generator = generator
        self.pool = pool
        self.enabled = capture and device.type == "cuda"
        self.calls = 0
        self.replays = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Outputs | None = None
        self.failure: str | None = None

    def __call__(self) -> Outputs:
        self.calls += 1
        if self.graph is None and self.enabled and self.failure is None and self.calls >= 2:
            self._capture()
        if self.graph is None:
            return self.call()
        self.graph.replay()
        self.replays += 1
        return self.outputs

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            if self.generator is not None:
                graph.register_generator_state(self.generator)
            # thread_local: another thread's CUDA work (a node serving two services) does not break the capture.
            with _CAPTURE_LOCK, torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = self.call()
        except Exception as error:  # noqa: BLE001 - any capture failure means eager from here on
            self.failure = f"{type(error).__name__}: {error}"
            return
        self.graph, self.outputs = graph, outputs
