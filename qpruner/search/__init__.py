"""The Ray Tune search (the only package that imports ray).

* :mod:`.run` — connects to Ray, builds the Tuner (trainable, searcher, scheduler, callbacks), resumes;
* :mod:`.searchers` — the budget/cache wrapper every searcher runs behind, the random baseline, and
  the searcher factory (HyperOpt TPE, Optuna multi-objective / GP, random);
* :mod:`.callbacks` — the driver-side callback that persists trials and publishes live metrics.
"""

from .run import init_ray, run_search

__all__ = ["init_ray", "run_search"]
