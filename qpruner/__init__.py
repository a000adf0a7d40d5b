"""QPruner: prune an LLM once, then search layer-wise mixed precision with Ray Tune.

Public entry points: :func:`qpruner.config.load_job`, :func:`qpruner.job.run_job` and the ``qpruner``
command line (:mod:`qpruner.cli`).
"""

__version__ = "0.2.0"  # 0.2: calibration split independent of eval_samples (runs of 0.1 are other runs)

from .pruned_model import register as _register

_register()  # AutoModelForCausalLM.from_pretrained(<saved pruned dir>) works after `import qpruner`


def load(directory, device=None):
    """(quantized model with its trained LoRA adapter, tokenizer) from a ``qpruner export`` directory."""
    from .export import load as _load
    return _load(directory, device)
