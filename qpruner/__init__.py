"""QPruner: prune an LLM once, then search layer-wise mixed precision with Ray Tune.

Public entry points: :func:`qpruner.config.load_job`, :func:`qpruner.job.run_job` and the ``qpruner``
command line (:mod:`qpruner.cli`).
"""

__version__ = "0.2.0"  # 0.2: calibration split independent of eval_samples (runs of 0.1 are other runs)

import importlib.abc as _abc
import importlib.util as _util
import sys as _sys


def _register() -> None:
    from .pruned_model import register
    register()


class _RegisterWithTransformers(_abc.MetaPathFinder):
    """Register QPruner's pruned classes with transformers' Auto API the moment transformers is imported,
    so that ``import qpruner`` stays light (``qpruner validate`` / ``status`` load no torch) and
    ``AutoModelForCausalLM.from_pretrained(<saved pruned dir>)`` still works after ``import qpruner``."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        _sys.meta_path.remove(self)
        spec = _util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_then_register(module):
                run(module)
                _register()
            spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in _sys.modules:
    _register()
elif not any(isinstance(f, _RegisterWithTransformers) for f in _sys.meta_path):
    _sys.meta_path.insert(0, _RegisterWithTransformers())


def load(directory, device=None):
    """(quantized model with its trained LoRA adapter, tokenizer) from a ``qpruner export`` directory."""
    from .export import load as _load
    return _load(directory, device)
