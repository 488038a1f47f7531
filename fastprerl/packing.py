"""One varlen token stream for both views of the rollouts a loss needs.

For sample i with prompt x_i and response y_i, the prompt-conditioned view packs [x_i; y_i] and the
prompt-free view packs [e; y_i] (e = the empty-context token). Positions restart at 0 for every packed
sequence. The hidden state at stream index j predicts the token at j + 1, so the response token y_i[k]
is scored at row  start + len(x_i) - 1 + k  (conditioned) or  start + k  (prompt-free).
Only the samples selected for a view are packed at all.

The stream is cut into bins of at most `max_tokens` tokens (a sequence never straddles two bins; one
longer than the budget gets a bin of its own). A bin is one micro-batch: one model forward with
causal attention inside each packed sequence. This module is index work only (the stream, its bins, which
rows each bin scores: `active_bins`, `PackedBatch.bin_row_index`); the forwards over the bins are in
passes.py (`bin_hidden`, `bins`).

Row selection (`select_rows`): which samples each view packs, from the step's loss terms.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

VIEWS = ("cond", "free")  # log P(y|x) and log P(y)


def select_rows(terms, num_samples: int, *, all_cond: bool = False, both_views: bool = False
                ) -> dict[str, torch.Tensor]:
    """view -> (B,) bool: the samples packed in that view. terms: objective name -> SampleTerms (objectives.py);
    a sample is packed in a term's view when the term uses it with a non-zero advantage (a zero-advantage
    sample adds nothing to the loss). all_cond: every sample's cond view (the KL term scores all of them);
    both_views: a sample packed in one view is packed in both (logging.view_gap)."""
    need = {v: torch.zeros(num_samples, dtype=torch.bool) for v in VIEWS}
    for t in terms.values():
        need[t.view] |= t.mask & (t.advantage != 0)
    if all_cond:
        need["cond"] |= True
    if both_views:
        both = need["cond"] | need["free"]
        need = {v: both.clone() for v in VIEWS}
    return need


@dataclass
class PackedBatch:
    input_ids: torch.Tensor      # (T,) int64 token stream
    position_ids: torch.Tensor   # (T,) int64, restarting at 0 per sequence
    seq_lens: list[int]          # length of every packed sequence, in stream order
    bins: list[tuple]            # [(start, end)] token ranges of the micro-batches
    rows: torch.Tensor           # (R,) stream index whose hidden state predicts a response token
    targets: torch.Tensor        # (R,) that response token
    row_sample: torch.Tensor     # (R,) sample index of the row
    row_view: torch.Tensor       # (R,) 0 = cond (log P(y|x)), 1 = free (log P(y))
    row_pos: torch.Tensor        # (R,) position of the token within its response
    num_samples: int
    view_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # view -> indices into R

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def view_mask(self, view: str) -> torch.Tensor:
        """(R,) bool: the rows of `view` ("cond" or "free")."""
        return self.row_view == VIEWS.index(view)

    def bin_row_index(self, b: int) -> torch.Tensor:
        """Indices into R of the rows whose stream index lies in bin b."""
        s, e = self.bins[b]
        return torch.nonzero((self.rows >= s) & (self.rows < e), as_tuple=False).view(-1)

    def bin_seq_lens(self, b: int) -> list[int]:
        """Lengths of the sequences packed in bin b, in stream order."""
        s, e = self.bins[b]
        out, pos = [], 0
        for n in self.seq_lens:
            if s <= pos < e:
                out.append(n)
            pos += n
        return out

    def unpack(self, values: torch.Tensor, view: str) -> list[torch.Tensor]:
        """Split per-row values (R,) of one view into a list of per-sample (len(y_i),) tensors;
        samples not packed for that view get an empty tensor."""
        idx = self.view_rows[view]
        samp = self.row_sample[idx]
        out = [values.new_zeros(0) for _ in range(self.num_samples)]
        if idx.numel():
            vals = values[idx]
            counts = torch.bincount(samp, minlength=self.num_samples).tolist()
            parts = torch.split(vals, counts)
            for i, part in enumerate(parts):
                if counts[i]:
                    out[i] = part
        return out


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
         cond: Sequence[bool] | None = None, free: Sequence[bool] | None = None,
         empty_token: int, max_tokens: int = 4096) -> PackedBatch:
    """Pack the selected samples' views. cond/free: per-sample booleans (None = none of that view)."""
    n = len(prompts)
    if len(responses) != n:
        raise ValueError(f"pack: {n} prompts but {len(responses)} responses")
    if max_tokens < 2:
        raise ValueError(f"pack: max_tokens must be >= 2, got {max_tokens}")
    sel = {"cond": list(cond) if cond is not None else [False] * n,
           "free": list(free) if free is not None else [False] * n}
    for v in VIEWS:
        if len(sel[v]) != n:
            raise ValueError(f"pack: mask for view {v!r} has {len(sel[v])} entries, expected {n}")

    seqs = []  # (tokens, view_id, sample, first_scored_offset, n_resp)
    for vid, view in enumerate(VIEWS):
        for i in range(n):
            if not sel[view][i] or len(responses[i]) == 0:
                continue
            y = list(responses[i])
            if view == "cond":
                x = list(prompts[i])
                if not x:
                    raise ValueError(f"pack: sample {i} has an empty prompt")
                seqs.append((x + y, vid, i, len(x) - 1, len(y)))
            else:
                seqs.append(([empty_token] + y, vid, i, 0, len(y)))

    ids, pos, lens, bins = [], [], [], []
    rows, targets, rsamp, rview, rpos = [], [], [], [], []
    bin_start = cur = 0
    for toks, vid, i, first, ny in seqs:
        L = len(toks)
        if cur > bin_start and cur + L - bin_start > max_tokens:
            bins.append((bin_start, cur))
            bin_start = cur
        ids.extend(toks)
        pos.extend(range(L))
        lens.append(L)
        rows.extend(range(cur + first, cur + first + ny))
        targets.extend(toks[first + 1:first + 1 + ny])
        rsamp.extend([i] * ny)
        rview.extend([vid] * ny)
        rpos.extend(range(ny))
        cur += L
    if cur > bin_start:
        bins.append((bin_start, cur))

    lt = lambda xs: torch.tensor(xs, dtype=torch.long)
    batch = PackedBatch(input_ids=lt(ids), position_ids=lt(pos), seq_lens=lens, bins=bins,
                        rows=lt(rows), targets=lt(targets), row_sample=lt(rsamp), row_view=lt(rview),
                        row_pos=lt(rpos), num_samples=n)
    for vid, view in enumerate(VIEWS):
        batch.view_rows[view] = torch.nonzero(batch.row_view == vid, as_tuple=False).view(-1)
    return batch


def active_bins(batch: PackedBatch) -> list[int]:
    """The bins that hold response rows, in stream order."""
    return [b for b in range(len(batch.bins)) if batch.bin_row_index(b).numel()]
