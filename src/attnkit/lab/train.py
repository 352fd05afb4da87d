"""One training run of one variant on one task and seed, checkpointed so it can be resumed.

A run is a pure function of (config, task, settings, seed): the weights come from
``torch.manual_seed(seed)`` (in a forked RNG), batch ``k`` from the task's ``(seed, k)`` generator,
the learning rate from the step. So two runs with the same seed give the same numbers, and a run
resumed from a checkpoint continues exactly as if it had never stopped. Checkpoints are a
directory of ``model.safetensors``, ``optimizer.safetensors`` and ``state.json`` (step, history,
seconds spent), written through a temporary file and renamed, so an interruption never leaves a
half-written one.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..checks import positive_int
from ..models.llama import Llama
from ..models.llama import LlamaConfig
from .tasks import IGNORE


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation and measurement settings shared by every run of a comparison.

    AdamW (betas 0.9 / 0.95, weight decay on matrices only), gradient norm clipped to 1, linear
    warm-up for ``warmup`` steps then cosine decay to 10% of ``lr``. Validation every
    ``eval_every`` steps (and at the end) on ``eval_sequences`` fixed sequences; a checkpoint every
    ``checkpoint_every`` steps.
    """

    steps: int
    batch_size: int
    lr: float
    warmup: int
    eval_every: int
    eval_sequences: int
    checkpoint_every: int
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_sequences", "checkpoint_every"):
            positive_int("TrainSettings", name, getattr(self, name))
        if not self.lr > 0:
            raise ValueError(f"TrainSettings: lr must be positive, got {self.lr!r}")
        if self.warmup < 0:
            raise ValueError(f"TrainSettings: warmup must be >= 0, got {self.warmup!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(config: LlamaConfig, seed: int, device: str | torch.device = "cpu") -> Llama:
    """``Llama(config)`` initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Llama(config)
    return model.to(device)


def _optimizer(model: Llama, settings: TrainSettings) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model: Llama, tokens: torch.Tensor, targets: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean cross-entropy (nats) and accuracy over the scored positions of ``tokens``/``targets``
    ``(S, N)``, in chunks of ``batch_size`` sequences."""
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, tokens.shape[0], batch_size):
        x = tokens[start : start + batch_size].to(device)
        y = targets[start : start + batch_size].to(device)
        logits = model(x).float()
        scored = y != IGNORE
        loss_sum += float(F.cross_entropy(logits[scored], y[scored], reduction="sum"))
        correct += int((logits[scored].argmax(-1) == y[scored]).sum())
        count += int(scored.sum())
    model.train(was_training)
    return {"loss": loss_sum / count, "accuracy": correct / count}


def _save_checkpoint(directory: Path, model: Llama, optimizer: torch.optim.AdamW, state: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    optim = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, entry in optim["state"].items() for name, value in entry.items()}
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, payload in (("model.safetensors", weights), ("optimizer.safetensors", tensors)):
        save_file(payload, str(directory / f"{name}.tmp"))
        os.replace(directory / f"{name}.tmp", directory / name)
    # state.json last: it names the step the two tensor files belong to.
    (directory / "state.json.tmp").write_text(json.dumps(state, indent=1))
    os.replace(directory / "state.json.tmp", directory / "state.json")


def _load_checkpoint(directory: Path, model: Llama, optimizer: torch.optim.AdamW) -> None:
    from safetensors.torch import load_file

    device = model.embed_tokens.weight.device
    model.load_state_dict(load_file(str(directory / "model.safetensors"), device=str(device)))
    tensors = load_file(str(directory / "optimizer.safetensors"), device=str(device))
    optim = optimizer.state_dict()
    optim["state"] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        # AdamW keeps its step count on the CPU unless it runs capturable/fused.
        optim["state"].setdefault(int(index), {})[name] = value.cpu() if name == "step" else value
    optimizer.load_state_dict(optim)


def train_run(
    config: LlamaConfig,
    task,
    settings: TrainSettings,
    seed: int,
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: Optional[Path] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> dict:
    """Train ``Llama(config)`` on ``task`` for ``settings.steps`` steps; return the run's record.

    The record holds ``seed``, ``history`` (a list of ``{step, tokens, loss, accuracy}`` validation
    points, step 0 included), ``final`` (the last point), ``train_seconds`` and
    ``train_tokens_per_s`` (time in forward/backward/optimizer steps only). With ``checkpoint_dir``
    the run resumes from the checkpoint there (a finished run is returned without training) and
    checkpoints every ``settings.checkpoint_every`` steps. ``on_step(step, loss)`` is called after
    each step. Raises ValueError when the checkpoint belongs to a different run.
    """
    key = {"config": repr(config), "task": task.describe(), "settings": asdict(settings), "seed": seed}
    model = build_model(config, seed, device)
    optimizer = _optimizer(model, settings)
    val_tokens, val_targets = task.validation(settings.eval_sequences)
    state = {"key": key, "step": 0, "train_seconds": 0.0, "history": [], "done": False}
    if checkpoint_dir is not None and (checkpoint_dir / "state.json").exists():
        saved = json.loads((checkpoint_dir / "state.json").read_text())
        if saved["key"] != json.loads(json.dumps(key)):
            raise ValueError(f"lab: checkpoint {checkpoint_dir} belongs to a different run; use another --out or --restart")
        state = saved
        if state["done"]:
            return state["record"]
        _load_checkpoint(checkpoint_dir, model, optimizer)
    tokens_per_step = settings.batch_size * task.seq_len

    def record_point(step: int) -> None:
        point = evaluate(model, val_tokens, val_targets, settings.batch_size)
        state["history"].append({"step": step, "tokens": step * tokens_per_step, **point})

    if not state["history"]:
        record_point(0)
    model.train()
    is_cuda = torch.device(device).type == "cuda"
    for step in range(state["step"], settings.steps):
        x, y = task.batch(seed, step, settings.batch_size)
        x, y = x.to(device), y.to(device)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        started = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if is_cuda:
            torch.cuda.synchronize()
        state["train_seconds"] += time.perf_counter() - started
        state["step"] = step + 1
        if on_step is not None:
            on_step(step + 1, loss.item())
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            record_point(step + 1)
        if checkpoint_dir is not None and (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.steps:
            _save_checkpoint(checkpoint_dir, model, optimizer, state)
    seconds = state["train_seconds"]
    record = {
        "seed": seed,
        "history": state["history"],
        "final": state["history"][-1],
        "train_seconds": seconds,
        "train_tokens_per_s": settings.steps * tokens_per_step / seconds if seconds else float("nan"),
    }
    if checkpoint_dir is not None:
        state.update(done=True, record=record)
        _save_checkpoint(checkpoint_dir, model, optimizer, state)
    return record
