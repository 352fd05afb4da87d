"""``attnkit lab``: train small decoders that differ only in attention and compare quality with cost.

Modules: :mod:`.tasks` (MQAR, byte-level standard-library text), :mod:`.variants` (the attention
variants as Llama configs, and their costs), :mod:`.train` (one resumable run), :mod:`.decode`
(decode speed at a long context), :mod:`.experiment` (the whole comparison), :mod:`.report`
(tables, plots) and :mod:`.presets`; the command is :mod:`attnkit.cli.lab`.
"""

from .tasks import MQAR, StdlibText
from .train import TrainSettings, train_run
from .variants import Variant, cost, standard_variants

__all__ = ["MQAR", "StdlibText", "TrainSettings", "Variant", "cost", "standard_variants", "train_run"]
