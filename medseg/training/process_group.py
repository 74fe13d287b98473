"""A training process's place in a process group: its shard of the cases, its seed, its role.

The training loop (:mod:`medseg.training.loop`) takes a :class:`DistContext`; the launcher
(:mod:`medseg.training.distributed`) makes one per rank. Both import this module and neither imports
the other's internals.

Examples:
    >>> shard_cases(list("abcde"), rank=0, world_size=2, seed=0)
    ['c', 'a', 'd']
    >>> DistContext(rank=1, world_size=2).shard(list("abcde"), seed=0)
    (['b', 'e', 'c'], 7919)
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

_RANK_SEED_STRIDE = 7919  # patch-sampling seeds of different ranks must differ


def shard_cases(cases: Sequence[T], *, rank: int, world_size: int, seed: int) -> list[T]:
    """This rank's share of the cases: equal shares, together covering every case.

    Like :class:`torch.utils.data.DistributedSampler`: a permutation seeded by ``seed`` (the same on
    every rank), padded by repeating its start to a multiple of ``world_size``, then every
    ``world_size``-th case from ``rank`` on.

    Args:
        cases: The training cases.
        rank: This process's rank.
        world_size: The number of processes.
        seed: The permutation's seed.

    Returns:
        ``ceil(len(cases) / world_size)`` cases (none when there are no cases).

    Raises:
        ValueError: If ``rank`` is not in ``0..world_size - 1``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        msg = f"rank must be in 0..{world_size - 1}, got {rank}"
        raise ValueError(msg)
    if not cases:
        return []
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    total = math.ceil(len(order) / world_size) * world_size
    padded = [order[i % len(order)] for i in range(total)]
    return [cases[i] for i in padded[rank::world_size]]


class QuietRun:
    """Stands in for the MLflow run on ranks other than 0: every logging call does nothing."""

    run_id = ""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@dataclass(frozen=True)
class DistContext:
    """What the training loop needs to know about its place in a process group.

    Attributes:
        rank: This process's rank (0 logs and saves).
        world_size: The number of processes.
        device: This rank's device (``cpu`` or ``cuda:<rank>``).
    """

    rank: int
    world_size: int
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Whether this rank validates, saves and logs."""
        return self.rank == 0

    def shard(self, cases: Sequence[T], seed: int) -> tuple[list[T], int]:
        """This rank's training cases (see :func:`shard_cases`) and its patch-sampling seed."""
        return shard_cases(
            cases, rank=self.rank, world_size=self.world_size, seed=seed
        ), seed + _RANK_SEED_STRIDE * self.rank

    def wrap(self, network: torch.nn.Module) -> torch.nn.Module:
        """The network in DistributedDataParallel (gradients averaged over the ranks)."""
        import torch
        from torch.nn.parallel import DistributedDataParallel

        if self.device.startswith("cuda"):
            return DistributedDataParallel(network, device_ids=[torch.device(self.device)])
        return DistributedDataParallel(network)

    def _tensor(self, value: float) -> torch.Tensor:
        import torch

        where = self.device if self.device.startswith("cuda") else "cpu"
        return torch.tensor([value], dtype=torch.float64, device=where)

    def from_main(self, value: float) -> float:
        """Rank 0's ``value``, on every rank (e.g. the clock of the time budget)."""
        import torch.distributed as dist

        t = self._tensor(value)
        dist.broadcast(t, src=0)
        return float(t.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the ranks, on every rank."""
        import torch.distributed as dist

        t = self._tensor(value)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world_size

    def quiet_run(self) -> contextlib.AbstractContextManager[QuietRun]:
        """A context yielding a :class:`QuietRun` (for ranks other than 0)."""
        return contextlib.nullcontext(QuietRun())
