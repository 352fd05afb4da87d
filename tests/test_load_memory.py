"""What loading and running a model keeps resident (issue 19's peak-memory item), without timing.

Measured numbers are in ``benchmarks/results/2026-12-07-memory.md``; these tests guard the causes
found there: ``torch._dynamo`` imported by an uncompiled model (about 140 MiB resident).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from attnkit.nn.kv_cache import KVCache, mark_static_address


def _run(code: str) -> str:
    """stdout of ``code`` in a fresh interpreter (what a module imports shows only there)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_static_address_mark_is_dynamos_own():
    """The caches set the attribute ``torch._dynamo.mark_static_address`` sets, not importing it."""
    import torch._dynamo

    theirs, ours = torch.zeros(2), torch.zeros(2)
    torch._dynamo.mark_static_address(theirs)
    mark_static_address(ours)
    assert ours._dynamo_static_input_type == theirs._dynamo_static_input_type
    cache = KVCache(1, 2, 4, 8)
    assert all(b._dynamo_static_input_type == theirs._dynamo_static_input_type
               for b in (cache.keys, cache.values, cache.positions))


def test_building_and_decoding_a_model_leaves_dynamo_unimported():
    """A model built on the meta device (as every loader does) and decoded without compiling does
    not import ``torch._dynamo``: ``normal_`` on a meta tensor would, and so would marking the
    caches' buffers through dynamo."""
    out = _run("""
        import sys
        import torch
        from attnkit.models.llama import Llama, LlamaConfig
        from attnkit.models.gemma3 import Gemma3, Gemma3Config
        from attnkit.models.generate import generate
        llama = LlamaConfig.preset("tiny")
        gemma = Gemma3Config(dim=48, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, ffn_dim=80, vocab_size=64,
                             sliding_window=4, query_pre_attn_scalar=24, bos_token_id=1, eos_token_ids=(2,),
                             layer_types=("sliding_attention", "full_attention"))
        for model in (Llama.from_state(llama, Llama(llama).state_dict()),
                      Gemma3.from_state(gemma, Gemma3(gemma).state_dict())):
            generate(model, [[1, 2, 3]], 2, stop_tokens=())
        print("torch._dynamo" in sys.modules)
    """)
    assert out.split() == ["False"]
