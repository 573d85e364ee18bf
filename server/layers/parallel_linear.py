"""The tensor-parallel layers (docs/architecture.md §12): each owns its rank's shard of a weight and loads
it from the full checkpoint tensor itself (`load_tensor`), as the layers of linear.py do.

- `MergedColumnParallelLinear`: q/k/v or gate/up, each segment split along its output rows (a rank holds
  its heads of q, k and v; its channels of gate and up), so the rank's product is its own heads / channels
  and no collective follows.
- `RowParallelLinear`: o_proj / down_proj, split along the input columns (the heads / channels the
  column-parallel layer before it produced); the partial products are summed by the caller's all-reduce
  (`Communicator.all_reduce`). Only rank 0 keeps the bias, so the sum adds it once.
- `VocabParallelEmbedding`: rows of the vocabulary; a token outside the rank's rows looks up zeros, and
  the all-reduce gives every rank the embedding.
- `ParallelLMHead`: the same rows of the vocabulary as output rows; its logits are gathered on rank 0.

The vocabulary is padded to a multiple of the rank count (zero rows at the end of the last rank); the
gathered logits are cut back to its real size. Used only when the world has more than one rank: a
single-rank model keeps the plain layers.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from actserve.server.contract.weights import WeightFormat
from actserve.server.layers.linear import Linear, MergedColumnLinear
from actserve.server.layers.parallel import Communicator, current


def _rows(loaded: torch.Tensor, comm: Communicator, size: int) -> torch.Tensor:
    """Rank `comm.rank`'s block of `size` rows of `loaded` (dim 0)."""
    return loaded.narrow(0, comm.rank * size, size)


class MergedColumnParallelLinear(MergedColumnLinear):
    """Several checkpoint matrices stacked along the output rows, each split along its rows over ranks."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        shard_ids: Sequence[Hashable] | None = None,
        bias: bool = False,
        weight_format: WeightFormat | None = None,
        params_dtype: torch.dtype | None = None,
        what: str = "output rows",
    ) -> None:
        self.comm = current()
        local = [self.comm.split(n, what) for n in output_sizes]
        self.full_sizes = list(output_sizes)
        super().__init__(input_size, local, shard_ids, bias, weight_format, params_dtype)

    def load_tensor(self, name: str, loaded: torch.Tensor, shard_id: Hashable | None = None) -> None:
        """A checkpoint matrix (or its bias) of one segment: this rank's rows of it; the whole stacked
        tensor (shard None): this rank's rows of every segment, restacked."""
        if shard_id is not None:
            size = self.shards[shard_id].size
            if loaded.shape[0] != size * self.comm.world:
                raise ValueError(
                    f"checkpoint shape {tuple(loaded.shape)}: {size * self.comm.world} rows expected"
                )
            return super().load_tensor(name, _rows(loaded, self.comm, size), shard_id)
        if loaded.shape[0] != sum(self.full_sizes):
            raise ValueError(f"checkpoint shape {tuple(loaded.shape)}: {sum(self.full_sizes)} rows expected")
        parts = loaded.split(self.full_sizes)
        mine = [
            _rows(p, self.comm, n // self.comm.world) for p, n in zip(parts, self.full_sizes, strict=True)
        ]
        return super().load_tensor(name, torch.cat(mine), None)


class RowParallelLinear(Linear):
    """x [rows, in / ranks] @ W[:, this rank's columns].T: a partial product; the caller all-reduces it."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        weight_format: WeightFormat | None = None,
        params_dtype: torch.dtype | None = None,
        what: str = "input columns",
    ) -> None:
        self.comm = current()
        self.full_input = input_size
        super().__init__(self.comm.split(input_size, what), output_size, bias, weight_format, params_dtype)

    def load_tensor(self, name: str, loaded: torch.Tensor, shard_id: Hashable | None = None) -> None:
        if loaded.dim() == 2:
            if loaded.shape[1] != self.full_input:
                raise ValueError(
                    f"checkpoint shape {tuple(loaded.shape)}: {self.full_input} columns expected"
                )
            loaded = loaded.narrow(1, self.comm.rank * self.input_size, self.input_size)
        elif self.comm.rank != 0:  # the bias: added once, by rank 0's partial product
            loaded = torch.zeros_like(loaded)
        return super().load_tensor(name, loaded, shard_id)


def vocab_rows(vocab: int, comm: Communicator) -> int:
    """Rows of the vocabulary each rank holds (the vocabulary padded to a multiple of the rank count)."""
    return -(-vocab // comm.world)


def _vocab_shard(loaded: torch.Tensor, vocab: int, comm: Communicator) -> torch.Tensor:
    """This rank's rows of a [vocab, hidden] checkpoint tensor, zero-padded to `vocab_rows`."""
    if loaded.shape[0] != vocab:
        raise ValueError(f"checkpoint shape {tuple(loaded.shape)}: {vocab} rows expected")
    per = vocab_rows(vocab, comm)
    start = comm.rank * per
    part = loaded[start : start + per]
    if part.shape[0] < per:
        part = torch.cat([part, part.new_zeros(per - part.shape[0], *part.shape[1:])])
    return part


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the embedding; lookups outside them give zeros, the all-reduce the rest."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.comm = current()
        self.vocab = vocab
        self.per_rank = vocab_rows(vocab, self.comm)
        self.start = self.comm.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden))

    def load_tensor(self, name: str, loaded: torch.Tensor, shard_id: Hashable | None = None) -> None:
        if name != "weight":
            raise ValueError(f"VocabParallelEmbedding reads no checkpoint tensor {name!r}")
        with torch.no_grad():
            self.weight.copy_(_vocab_shard(loaded, self.vocab, self.comm))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight)
        return self.comm.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(Linear):
    """The LM head over this rank's rows of the (padded) vocabulary; `logits` gathers them on rank 0."""

    def __init__(self, hidden: int, vocab: int) -> None:
        self.comm = current()
        self.vocab = vocab
        super().__init__(hidden, vocab_rows(vocab, self.comm))

    def load_tensor(self, name: str, loaded: torch.Tensor, shard_id: Hashable | None = None) -> None:
        return super().load_tensor(name, _vocab_shard(loaded, self.vocab, self.comm), shard_id)

    def logits(self, local: torch.Tensor) -> torch.Tensor | None:
        """The full logits [rows, vocab] on rank 0 from every rank's [rows, vocab / ranks]; None elsewhere."""
        return self.comm.gather_columns(local, self.vocab)
