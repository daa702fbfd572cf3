"""``torch.distributed`` helpers of the training loop; each is a no-op in a single process."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ``torch.distributed`` group (no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def finish_together() -> None:
    """Wait for every process of the ``torch.distributed`` group (no-op in a single process).

    Called where training ends, before any process may tear the group down: a process that leaves the last
    collective first and destroys its gloo connections while a peer still flushes messages to it aborts the peer.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_parameters(model: torch.nn.Module, src: int = 0) -> None:
    """Give every process the parameters of ``src`` (no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src)
