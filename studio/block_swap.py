"""Block swap (kohya's `blocks_to_swap`): the denoiser's last `count` blocks live in CPU memory (pinned, on CUDA) and
each is streamed onto the device just before it runs — its forward, and its backward (with gradient checkpointing
that includes the recompute) — while the next one is copied on a side CUDA stream; after use it leaves again. At
most two swapped blocks (`IN_FLIGHT`) are on the card at once. The first blocks are placed by studio.residency.

Why not diffusers' group offloading (`enable_group_offload(offload_type="block_level", use_stream=True)`, read in
diffusers 0.42.1 hooks/group_offloading.py): it is an inference tool and wrong for LoRA training.
- It onloads a group in its forward pre-hook and offloads it in its post-forward hook; nothing brings the weights
  back for the backward, so the LoRA backward meets CPU weights ("mat2 is on cpu": bghira/SimpleTuner#1975).
- Its prefetch chain follows the forward order; the backward and the checkpoint recompute run in reverse, and
  SimpleTuner turns streams off under gradient checkpointing for that reason (bghira/SimpleTuner#1984: "Diffusers
  does not support safe reverse-order replay").
- With streams, offloading sets every parameter's `.data` back to the pinned copy taken when the hook was applied:
  a LoRA weight inside the group would be reset to its initial value (the optimizer's updates lost) and leave the
  device; without streams `module.to(cpu)` moves it away from its optimizer state.
So this is a small swap of our own, like kohya sd-scripts' library/custom_offloading_utils.py: only frozen tensors
move, trainable (LoRA) parameters stay on the device as the same objects the optimizer holds, and since frozen
weights never change, "moving back" just drops the device copy (no copy back over PCIe).

On the CPU every move is a real copy through the same code (no stream), so the tests exercise the hooks.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch

from studio.errors import StudioError
from studio.plan.speed import PCIE_GBPS, swap_seconds

IN_FLIGHT = 2  # swapped blocks on the device at once: the one computing and the next one being copied
HOST = torch.device("cpu")
OFF, FORWARD, BACKWARD = "off", "forward", "backward"  # where a swapped block is: home, or loaded for that pass
OnMove = Callable[[str, int, int], None]  # (FORWARD or BACKWARD, block index in `blocks`, bytes copied in)


def frozen_tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    """What a swapped block keeps off the device: its frozen parameters, its buffers and, for bitsandbytes NF4
    weights, their per-layer quantization data (LoRA weights stay)."""
    frozen = [p for p in block.parameters() if not p.requires_grad]
    return frozen + list(block.buffers()) + [t for p in frozen for t in _quant_state(p)[0]]


def _quant_state(param: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """An NF4 weight's (absmax and offsets: per layer, they move with it; code tables: 256 values each, they stay
    on the device), or nothing for other weights."""
    state = getattr(param, "quant_state", None)
    if state is None:
        return [], []
    nested = state.state2 if state.nested else None
    data = [state.absmax, *([state.offset, nested.absmax] if nested else [])]
    return data, [state.code, *([nested.code] if nested else [])]


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def check_count(count: int, total: int) -> None:
    """blocks_to_swap must be 0..the denoiser's swappable blocks (its recipe's `swap_blocks`): checked at load."""
    if not 0 <= count <= total:
        raise StudioError(f"blocks_to_swap is {count}, but this denoiser has {total} blocks that can be swapped. "
                          f"Set blocks_to_swap between 0 and {total} (0 = off).")


def swapped_bytes(blocks: list[torch.nn.Module], count: int) -> int:
    """Bytes of the last `count` blocks' frozen weights at their storage dtype: what lives in CPU memory (at most
    `IN_FLIGHT` of these blocks are on the card at a time; see `in_flight_bytes`)."""
    return sum(_nbytes(frozen_tensors(b)) for b in blocks[len(blocks) - count:]) if count else 0


def in_flight_bytes(blocks: list[torch.nn.Module], count: int) -> int:
    """The most device memory the swapped blocks take at once: the `IN_FLIGHT` largest of them."""
    sizes = sorted((_nbytes(frozen_tensors(b)) for b in blocks[len(blocks) - count:]), reverse=True) if count else []
    return sum(sizes[:IN_FLIGHT])


def transfer_seconds(blocks: list[torch.nn.Module], count: int, bandwidth_gbps: float = PCIE_GBPS) -> float:
    """Seconds of host-to-device copying per training step (one forward and backward) at `bandwidth_gbps` GB/s."""
    return swap_seconds(swapped_bytes(blocks, count), bandwidth_gbps)


class BlockSwap:
    """Streams the last `count` of `blocks` (in execution order) onto `device` around each use, once attached."""

    def __init__(self, blocks: list[torch.nn.Module], count: int, device: torch.device,
                 on_move: OnMove | None = None):
        check_count(count, len(blocks))
        self.blocks, self.count, self.device = list(blocks), count, torch.device(device)
        self.on_move = on_move
        self.bytes_moved = 0  # copied onto the device since attach
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._tensors: dict[int, list[torch.Tensor]] = {}  # block index → its frozen tensors (the live objects)
        self._host: dict[int, list[torch.Tensor]] = {}  # … and their CPU copies, in the same order
        self._state: dict[int, str] = {}
        self._pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}  # prefetched copies
        self._wanted: int | None = None  # the block to prefetch when there is room
        self._handles: list = []
        self._end_queued = False

    @property
    def swapped(self) -> range:
        return range(len(self.blocks) - self.count, len(self.blocks))

    def attach(self) -> BlockSwap:
        """Move the swapped blocks' frozen tensors to CPU memory and hook their forward (after LoRA is attached:
        its weights are moved to the device and stay there)."""
        for index in self.swapped:
            block = self.blocks[index]
            tensors = frozen_tensors(block)
            self._host[index] = [self._to_host(t) for t in tensors]
            for tensor, host in zip(tensors, self._host[index]):
                tensor.data = host
            for param in block.parameters():
                kept = [param] if param.requires_grad else _quant_state(param)[1]
                for tensor in kept:
                    if tensor.device != self.device:
                        tensor.data = tensor.data.to(self.device)
            self._tensors[index], self._state[index] = tensors, OFF
            self._handles += [block.register_forward_pre_hook(partial(self._pre_forward, index), with_kwargs=True),
                              block.register_forward_hook(partial(self._post_forward, index), with_kwargs=True)]
        return self

    def detach(self) -> None:
        """Remove the hooks; the swapped blocks' frozen weights stay in CPU memory (their LoRA on the device)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._release_all()

    def is_loaded(self, index: int) -> bool:
        """Whether block `index`'s frozen tensors are device copies (not its CPU copies)."""
        return all(t.device == self.device and t.data_ptr() != h.data_ptr()
                   for t, h in zip(self._tensors[index], self._host[index]))

    # --- hooks -------------------------------------------------------------------------------------------------------
    @torch.compiler.disable
    def _pre_forward(self, index: int, block, args, kwargs) -> None:
        if _in_backward():  # the checkpoint recompute, inside this block's backward: keep it loaded
            self._enter_backward(index)
            return
        if BACKWARD in self._state.values():  # a backward that did not finish (out of memory): start clean
            self._release_all()
        self._load(index, FORWARD)
        self._want(index + 1)

    @torch.compiler.disable
    def _post_forward(self, index: int, block, args, kwargs, output) -> None:
        if _in_backward():
            return
        outputs = [t for t in _tensors(output) if t.requires_grad]
        if outputs and torch.is_grad_enabled():
            # Grad of any output ready: this block's backward starts. Grads of all inputs ready: it is over.
            torch.autograd.graph.register_multi_grad_hook(outputs, lambda _: self._enter_backward(index), mode="any")
            inputs = [t for t in _tensors((args, kwargs)) if t.requires_grad]
            if inputs:
                torch.autograd.graph.register_multi_grad_hook(inputs, lambda _: self._leave_backward(index))
        self._release(index)

    def _enter_backward(self, index: int) -> None:
        if not self._end_queued:  # blocks whose inputs need no grad leave when the whole backward is over
            torch.autograd.Variable._execution_engine.queue_callback(self._release_all)
            self._end_queued = True
        if self._state[index] != BACKWARD:
            self._load(index, BACKWARD)
            self._want(index - 1)

    def _leave_backward(self, index: int) -> None:
        self._release(index)
        self._prefetch_wanted()

    # --- moves -------------------------------------------------------------------------------------------------------
    def _want(self, index: int) -> None:
        """Prefetch block `index` next (if it is swapped), as soon as fewer than IN_FLIGHT blocks are loaded."""
        self._wanted = index if index in self._state and self._state[index] == OFF else None
        self._prefetch_wanted()

    def _prefetch_wanted(self) -> None:
        index = self._wanted
        busy = sum(state != OFF for state in self._state.values()) + len(self._pending)
        if index is None or busy >= IN_FLIGHT or index in self._pending or self._state[index] != OFF:
            return
        self._pending[index] = self._copy_in(index)
        self._wanted = None

    def _copy_in(self, index: int) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        host = self._host[index]
        if not self._cuda:
            return [h.to(self.device, copy=True) for h in host], None
        with torch.cuda.stream(self._stream):
            copies = [h.to(self.device, non_blocking=True) for h in host]
            done = torch.cuda.Event()
            done.record(self._stream)
        return copies, done

    def _load(self, index: int, why: str) -> None:
        if self._state[index] == OFF:
            copies, done = self._pending.pop(index, None) or self._copy_in(index)
            if done is not None:  # the compute stream waits for the copy, and the allocator for the compute
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(done)
                for copy in copies:
                    copy.record_stream(compute)
            for tensor, copy in zip(self._tensors[index], copies):
                tensor.data = copy
            size = _nbytes(copies)
            self.bytes_moved += size
            if self.on_move:
                self.on_move(why, index, size)
        self._state[index] = why

    def _release(self, index: int) -> None:
        for tensor, host in zip(self._tensors[index], self._host[index]):
            tensor.data = host  # the device copy is dropped: frozen weights need no copy back
        self._state[index] = OFF

    def _release_all(self) -> None:
        for index, state in self._state.items():
            if state != OFF:
                self._release(index)
        self._pending.clear()
        self._wanted, self._end_queued = None, False

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.data.to(HOST)
        return host.pin_memory() if self._cuda else host  # pinned: copies run asynchronously, at full PCIe speed


def _in_backward() -> bool:
    """Whether autograd is running a backward on this thread (torch.utils.checkpoint asks the same way)."""
    return torch._C._current_graph_task_id() != -1


def _tensors(value) -> Iterator[torch.Tensor]:
    """The tensors in a module's arguments or output (nested tuples, lists, dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
