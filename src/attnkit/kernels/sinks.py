"""Attention sinks: a learnable logit per query head that joins every row's softmax denominator.

With scores ``s_j`` of the keys a row may see and the sink logit ``t`` of its head,
``out = sum_j exp(s_j) v_j / (exp(t) + sum_j exp(s_j))`` and ``lse = log(exp(t) + sum_j exp(s_j))``:
the sink takes a share of the weight and gives no value. Given any kernel's ``(out, lse)`` over
the keys, ``lse' = logaddexp(lse, t)`` and ``out' = out * exp(lse - lse')`` are exact, and since
every backend's autograd takes an LSE gradient, autograd through these two lines gives the
gradients of q, k, v and the sinks. It is applied once, to the result over the whole key set:
after every ``merge_lse`` (planner parts, ring steps), never to a part.
"""

from __future__ import annotations

import torch


def with_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The result with the sinks in each row's denominator.

    Args:
        out: ``(B, Hq, Nq, Dv)`` attention over the keys alone.
        lse: ``(B, Hq, Nq)`` its log-sum-exp; ``-inf`` for a row that sees no key.
        sinks: ``(Hq,)`` one logit per query head (``-inf`` = no sink for that head).
    Returns:
        ``(out', lse')`` of out's and lse's dtypes: a row that sees no key gives zeros and
        ``lse' = sinks[h]``. The weight ``exp(lse - lse')`` is formed in lse's dtype (float32
        statistics for half inputs). Differentiable in out, lse and sinks.
    """
    sink = sinks.to(lse.dtype)[:, None].expand_as(lse)
    # No key and no sink (-inf both): logaddexp's gradient there is NaN, so it sees a stand-in
    # and the row stays zero with LSE -inf.
    empty = (lse == float("-inf")) & (sink == float("-inf"))
    total = torch.logaddexp(torch.where(empty, 0.0, lse), sink)
    share = torch.exp(lse - torch.where(empty, 0.0, total))
    return (out * share.unsqueeze(-1)).to(out.dtype), torch.where(empty, float("-inf"), total)
