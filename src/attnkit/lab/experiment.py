"""Run a whole comparison: every task x variant x seed, then costs and decode speed per variant.

The result is plain data (JSON-ready), grouped ``tasks -> variants -> {config, cost, runs,
summary}``; :mod:`attnkit.lab.report` turns it into tables and plots.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .decode import decode_tokens_per_s
from .presets import Preset
from .train import build_model, train_run
from .variants import Variant, cost, standard_variants

RunHook = Callable[[str, int, int], Callable[[int, float], None]]
"""``hook(label, seed, steps) -> on_step``: called before each run (for a progress bar)."""


def slug(name: str) -> str:
    """A file-name-safe form of a variant name: ``Mix(W8x1+Full)`` -> ``mix-w8x1-full``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def preset_variants(preset: Preset) -> list[Variant]:
    s = preset.shape
    return standard_variants(s.n_layers, s.n_heads, window=preset.window, stride=preset.stride, summary=preset.summary)


def _summary(runs: list[dict], metric: str) -> dict:
    values = [r["final"][metric] for r in runs]
    return {
        "metric": metric,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "train_tokens_per_s": statistics.median(r["train_tokens_per_s"] for r in runs),
    }


def run_comparison(
    preset: Preset,
    *,
    seeds: Sequence[int],
    device: str = "cpu",
    checkpoints: Optional[Path] = None,
    variant_names: Optional[Sequence[str]] = None,
    task_names: Optional[Sequence[str]] = None,
    on_run: Optional[RunHook] = None,
) -> dict:
    """Train every selected variant on every selected task with every seed; measure its costs.

    ``variant_names`` / ``task_names`` pick a subset (names as in the report; None = all) and
    raise ValueError for unknown names. Checkpoints go under ``checkpoints/<task>/<variant>/seed<N>``.
    """
    variants = preset_variants(preset)
    known = {v.name for v in variants}
    if variant_names is not None:
        unknown = [n for n in variant_names if n not in known]
        if unknown:
            raise ValueError(f"lab: unknown variant {unknown[0]!r}; variants: {', '.join(sorted(known))}")
        variants = [v for v in variants if v.name in variant_names]
    tasks = list(preset.tasks)
    if task_names is not None:
        names = [t.name for t, _ in tasks]
        unknown = [n for n in task_names if n not in names]
        if unknown:
            raise ValueError(f"lab: unknown task {unknown[0]!r}; tasks: {', '.join(names)}")
        tasks = [(t, s) for t, s in tasks if t.name in task_names]
    result = {}
    for task, settings in tasks:
        base = preset.shape.base_config(task.vocab_size, max(task.seq_len, preset.decode_context + preset.decode_tokens))
        entry = {"task": task.describe(), "metric": task.metric, "settings": settings.__dict__, "variants": {}}
        for variant in variants:
            config = variant.config(base)
            runs = []
            for seed in seeds:
                directory = None if checkpoints is None else checkpoints / task.name / slug(variant.name) / f"seed{seed}"
                hook = on_run(f"{task.name} · {variant.name}", seed, settings.steps) if on_run else None
                runs.append(train_run(config, task, settings, seed, device=device, checkpoint_dir=directory, on_step=hook))
            model = build_model(config, seeds[0], device)
            entry["variants"][variant.name] = {
                "n_kv_heads": config.n_kv_heads,
                "layer_patterns": [repr(p) for p in (config.layer_patterns or (None,) * config.n_layers)],
                "cost": {**cost(config, preset.decode_context),
                         "decode_tokens_per_s": decode_tokens_per_s(model, preset.decode_context, preset.decode_tokens)},
                "runs": runs,
                "summary": _summary(runs, task.metric),
            }
            del model
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        result[task.name] = entry
    return result
