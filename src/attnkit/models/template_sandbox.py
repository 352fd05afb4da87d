"""Rendering a model's Jinja chat template, which comes from the checkpoint (untrusted), with limits.

Jinja's immutable sandbox stops a template from reaching Python internals or changing its inputs;
it does not stop one from exhausting the machine. So this module adds limits on what a template can
build, each far beyond what a chat prompt needs:

- a string, list or integer built by ``*``, ``**`` or ``+`` holds at most :data:`MAX_ITEMS`
  characters or items (an integer: as many decimal digits), checked before it is built
  (``'a' * 10**10`` would take 10 GB, ``10 ** 10 ** 10`` would compute for hours);
- all ``range(...)`` calls of one rendering together count at most :data:`MAX_RANGE_ITEMS` items
  (nested loops multiply);
- the rendered prompt holds at most :data:`MAX_ITEMS` characters, and rendering stops after
  :data:`MAX_SECONDS`, checked as output is produced;
- ``center`` and ``indent`` take a width of at most :data:`MAX_ITEMS`.

Every failure, the template's own ``raise_exception`` included, is a ValueError naming the
template's origin; a template that loops without writing anything is not cut off by the clock.
The settings are transformers' (``trim_blocks``, ``lstrip_blocks``, loop controls, ``tojson``).
"""

from __future__ import annotations

import json
import math
import operator
import time
from typing import Optional

MAX_ITEMS = 1 << 22
"""The most characters (items, decimal digits) a template may build or render: 4,194,304."""

MAX_RANGE_ITEMS = 1 << 20
"""The most items all ``range`` calls of one rendering may produce together."""

MAX_SECONDS = 10.0
"""How long a rendering may take, checked each time it produces output."""


class TemplateLimitError(Exception):
    """A template went past one of this module's limits."""


def _size(value) -> int:
    """Characters, items or decimal digits of ``value`` (0 for anything else)."""
    if isinstance(value, (str, list, tuple)):
        return len(value)
    if isinstance(value, int):
        return math.ceil(abs(value).bit_length() * math.log10(2))
    return 0


def _checked_binop(op: str, left, right):
    """``left op right`` when its result stays within :data:`MAX_ITEMS`."""
    if op == "*" and isinstance(left, int) and not isinstance(right, int):
        left, right = right, left
    if op == "*" and isinstance(right, int) and not isinstance(left, bool):
        estimate = _size(left) * right if not isinstance(left, int) else _size(left) + _size(right)
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        estimate = _size(left) * right
    elif op == "+":
        estimate = _size(left) + _size(right)
    else:
        estimate = 0
    if estimate > MAX_ITEMS:
        raise TemplateLimitError(f"'{op}' would build a value of about {estimate:,} items, more than {MAX_ITEMS:,}")
    return {"*": operator.mul, "**": operator.pow, "+": operator.add}[op](left, right)


def _bounded_width(name: str, filter_fn):
    def bounded(value, width=80, *args, **kwargs):
        if isinstance(width, int) and width > MAX_ITEMS:
            raise TemplateLimitError(f"{name} width {width:,} is more than {MAX_ITEMS:,}")
        return filter_fn(value, width, *args, **kwargs)

    return bounded


def _environment():
    # optional package (the llama extra), imported only when a template is rendered
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context, operator_name, left, right):
            return _checked_binop(operator_name, left, right)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    for name in ("center", "indent"):
        env.filters[name] = _bounded_width(name, env.filters[name])
    env.globals["raise_exception"] = raise_exception
    return env


def render_template(source: str, origin: Optional[str], **context) -> str:
    """``source`` rendered with ``context`` under this module's limits. Raises ValueError naming
    ``origin`` (the file that holds the template), when known, for a syntax error, the template's own
    ``raise_exception``, any error the template causes, or a limit it passes."""
    from jinja2.exceptions import TemplateError  # optional package (the llama extra)

    env = _environment()
    budget = [MAX_RANGE_ITEMS]

    def budgeted_range(*args):
        items = range(*args)
        budget[0] -= len(items)
        if budget[0] < 0:
            raise TemplateLimitError(f"its range() calls produce more than {MAX_RANGE_ITEMS:,} items")
        return items

    env.globals["range"] = budgeted_range
    deadline = time.monotonic() + MAX_SECONDS
    pieces, length = [], 0
    where = f"{origin}: chat template" if origin else "chat template"
    try:
        for piece in env.from_string(source).generate(**context):
            pieces.append(piece)
            length += len(piece)
            if length > MAX_ITEMS:
                raise TemplateLimitError(f"the prompt it renders is longer than {MAX_ITEMS:,} characters")
            if time.monotonic() > deadline:
                raise TemplateLimitError(f"rendering took longer than {MAX_SECONDS:g} s")
    except RecursionError:
        raise ValueError(f"{where}: it recurses too deeply") from None
    except MemoryError:
        raise ValueError(f"{where}: it needs more memory than there is") from None
    except Exception as exc:  # a template may raise anything: TemplateError, ZeroDivisionError, ...
        kind = "" if isinstance(exc, (TemplateLimitError, TemplateError)) else f"{type(exc).__name__}: "
        raise ValueError(f"{where}: {kind}{exc}") from None
    return "".join(pieces)

