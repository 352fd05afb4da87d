"""What loading and running a model keeps resident (issue 19's peak-memory item), without timing.

Measured numbers are in ``benchmarks/results/2026-12-07-memory.md``; these tests guard the causes
found there: ``torch._dynamo`` imported by an uncompiled model (about 140 MiB resident), a parsed
GGUF file kept as numpy views of a memory map (75 MiB for SmolLM2, 315 for Gemma 3 270M), and
loaders' temporaries left in the C heap.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from real_models import SMOLLM2, needs_smollm2
from attnkit.nn.kv_cache import KVCache, mark_static_address

MIB = 1 << 20


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


@pytest.mark.smollm2
@needs_smollm2
def test_loading_smollm2_keeps_its_blocks_and_little_else_resident():
    """Loading SmolLM2 as ``generate`` does (tokenizer, quantized model) leaves no map of the file
    and no ``torch._dynamo``; its peak resident memory above the process's after importing attnkit
    stays under the file's tensor bytes + 128 MiB, and what stays resident under the tensor bytes
    + 64 MiB (measured: 92 + 80 and 92 + 36 MiB; 92 + 290 for both before this guard)."""
    out = _run(f"""
        import sys
        from pathlib import Path

        def status(field):
            line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
            return int(line.split()[1]) * 1024

        from attnkit.models.registry import identify_causal
        base = status("VmRSS")
        checkpoint = identify_causal({str(SMOLLM2)!r})
        tensor_bytes = sum(t.n_bytes for t in checkpoint.source.gguf.tensors)
        tokenizer = checkpoint.text_tokenizer()
        model = checkpoint.load()
        print(tensor_bytes, status("VmHWM") - base, status("VmRSS") - base,
              ".gguf" in Path("/proc/self/maps").read_text(), "torch._dynamo" in sys.modules)
    """)
    tensor_bytes, peak, resident, mapped, dynamo = out.split()
    assert (mapped, dynamo) == ("False", "False")
    assert int(peak) < int(tensor_bytes) + 128 * MIB, (int(peak) / MIB, int(tensor_bytes) / MIB)
    assert int(resident) < int(tensor_bytes) + 64 * MIB, (int(resident) / MIB, int(tensor_bytes) / MIB)
