"""The UFF pretraining loss (docs/original.md: UFF): patch-wise contrastive cross-entropy over the global batch of every
torch.distributed process, with the xyz keys gathered across processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# One process of the reference's configuration (batch 64, ~1,000 kept patches per sample) makes 64k x 64k logits;
# under 8 processes 64k x 512k (over 100 GB). Up to this size the logits are made at once, as the reference does
# (a single GPU's run keeps its numbers); beyond it they are made in blocks of about LOGIT_BLOCK_ELEMENTS.
MAX_LOGIT_ELEMENTS = 2**32
LOGIT_BLOCK_ELEMENTS = 2**28


def distributed_world_size() -> int:
    """Processes in the default group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllGatherWithGradient(torch.autograd.Function):
    """All processes' equally shaped tensors stacked in rank order; the gradient of a process's input is the sum
    over processes of the gradients of its slot (an all-reduce, then this process's slice)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def gather_rows(rows: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Every process's ``rows`` concatenated in rank order, this process's offset into them and the total.

    Processes may hold different numbers of rows (empty patches are dropped per sample). The gather is
    autograd-aware: the gradient with respect to a process's rows sums the contributions of every process's
    loss and flows back to the process that owns them.
    """
    world = distributed_world_size()
    if world == 1:
        return rows, 0, len(rows)
    gathered_counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world)]
    dist.all_gather(gathered_counts, torch.tensor([len(rows)], dtype=torch.long, device=rows.device))
    counts = [int(c) for c in gathered_counts]
    padded = F.pad(rows, (0, 0, 0, max(counts) - len(rows)))  # all_gather needs equal shapes
    gathered = _AllGatherWithGradient.apply(padded)
    rank = dist.get_rank()
    return torch.cat([part[:n] for part, n in zip(gathered, counts)]), sum(counts[:rank]), sum(counts)


def contrastive_loss(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of each RGB query against the xyz keys of the whole global batch (its own key is the
    target), times ``2T`` as the reference (quirk 21: the reference offsets the targets by rank without
    gathering the keys, which only works with one process).

    Each process returns ``world · (its queries' summed cross-entropy) / (queries of all processes)``: the mean
    over processes, which DDP's gradient averaging and the logged loss take, is then the global-batch mean,
    whatever the number of processes and however the kept patches are spread over them.
    """
    all_keys, offset, total = gather_rows(keys)
    targets = torch.arange(len(queries), device=queries.device) + offset
    rows = max(1, LOGIT_BLOCK_ELEMENTS // max(len(all_keys), 1))
    if len(queries) * len(all_keys) <= MAX_LOGIT_ELEMENTS or rows >= len(queries):
        summed = _summed_cross_entropy(queries, all_keys, targets, temperature)
    else:
        # the logits grow with the world size (queries x the keys of every process): past MAX_LOGIT_ELEMENTS they
        # are made one block of query rows at a time and made again in the backward pass, so only one block is
        # ever held; the per-row cross-entropies are the same, their sum is taken in another order
        # ignore: sum() of tensors is typed int | Tensor (it starts from 0)
        summed = sum(checkpoint(_summed_cross_entropy, queries[start:start + rows], all_keys,  # type: ignore[assignment]
                                targets[start:start + rows], temperature, use_reentrant=False)
                     for start in range(0, len(queries), rows))
    return summed * (distributed_world_size() / max(total, 1) * 2 * temperature)


def _summed_cross_entropy(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    logits = queries @ keys.T / temperature
    return F.cross_entropy(logits.float(), targets, reduction="sum")
