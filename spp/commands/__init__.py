"""The commands of the ``spp`` command line, one module each, every one driven by a :class:`spp.config.Config`:

* ``search``: the LBI search over the masks of a frozen model, written as a solution path;
* ``family``: the members at ``family.targets`` evaluated without retraining;
* ``export``: one member compressed and saved;
* ``retrain``: a member (or a dense model) finetuned;
* ``eval``: a model's quality, size and speed.
"""
from .eval import run_eval
from .export import run_export
from .family import run_family
from .retrain import run_retrain
from .search import run_search

__all__ = ["run_search", "run_family", "run_export", "run_retrain", "run_eval"]
