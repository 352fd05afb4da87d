"""Generation speed of attnkit against llama.cpp (the ``xllamacpp`` package) on the same GGUF file.

The benchmark itself is ``attnkit bench --case decode`` (:mod:`attnkit.bench.decode_peers`): each
contender in its own process, runs interleaved, prefill and decode tokens/s and peak memory.
This script runs it with the same arguments, e.g.
``python benchmarks/llama_cpp_peer.py --model smollm2 --threads 2 --variant bf16 --json out.json``.
"""

from __future__ import annotations

import sys

from attnkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--case", "decode", *sys.argv[1:]]))
