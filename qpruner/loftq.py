"""LoftQ initialisation for mixed-precision plans.

LoftQ (Li et al., "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models", ICLR 2024)
initialises the LoRA adapters so that quantized base + adapters start close to the original weight:
with LoRA scaling ``s = lora_alpha / r`` and ``W ~ Q + s * B @ A`` it alternates, for ``t = 1..T``,

    Q_t          = quantize(W - s * B_{t-1} @ A_{t-1})               (B_0 @ A_0 = 0)
    U, S, V^T    = rank-r SVD of (W - dequantize(Q_t))
    B_t = U sqrt(S) / sqrt(s),   A_t = sqrt(S) V^T / sqrt(s)          (so that s * B_t @ A_t = U S V^T)

and keeps ``Q_T`` as the frozen base and ``(A_T, B_T)`` as the adapters' starting point.

Where we differ from peft's implementation (``init_lora_weights="loftq"``), which is hard-coded to
CUDA and whose 8-bit path uses its own quantizer: ``quantize``/``dequantize`` here are the very
modules the trial will use — :func:`qpruner.quantize.convert_linear` for the unit's format (nf4 and fp4
through bitsandbytes ``Linear4bit`` with the job's block size and double quantization, int8 through
``Linear8bitLt``'s row-wise absmax, bf16 rounding) — so ``Q_T`` is bit-for-bit the base the model holds,
on CPU and CUDA alike, for any mix of formats. The rank-r SVD is randomised (``torch.svd_lowrank``,
four power iterations), which is exact enough for ``r`` much smaller than the layer's width and far
cheaper than a full SVD. The returned base weight is ``W - s * B_{T-1} @ A_{T-1}``, whose quantization
is ``Q_T``.

Balancing (``finetune.loftq_balance``, on by default): LoftQ's factors are ``sqrt(S)``-scaled, so where
the quantization residual is small (int8, bf16) both ``A`` and ``B`` start tiny, each one's gradient is
proportional to the other, and training barely moves (measured: ``results/bench/trial.md``). Since
``B @ A`` is unchanged by ``(A, B) -> (c A, B / c)``, we pick ``c`` so that ``A`` has the norm of
peft's default initialisation: the adapters start at LoftQ's correction and train like plain LoRA.

Which layers (``finetune.loftq_formats``, default 4-bit only): LoftQ is meant for large quantization
errors (4-bit); for int8 and bf16 layers the residual is small and noise-like, and starting from it
did not help in our measurements (``results/bench/trial.md``).

How many iterations (``finetune.loftq_iters``, default 4): on real nf4/int8 mixes of the pruned
SmolLM2 (``results/bench/loftq.md``) 4 iterations beat 1 after 10, 40 and 120 fine-tuning steps, and
beat plain initialisation after 10 steps (-0.04 NLL) and 40, while 1 iteration falls behind plain
from 40 steps on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import models
from .config import FinetuneConfig, QuantConfig
from .plan import PrecisionPlan

logger = logging.getLogger(__name__)


def _low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = min(rank + 8, *residual.shape)
    devices = [residual.device] if residual.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # randomised SVD, made deterministic (same plan, same result)
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(residual, q=q, niter=4)
    return u[:, :rank], s[:rank], v[:, :rank]


def balance(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale ``(A, B) -> (c A, B / c)`` (same product) so that ``A`` has the Frobenius norm of peft's
    default LoRA initialisation (Kaiming-uniform: ``sqrt(r / 3)``)."""
    norm = float(a.norm())
    if norm == 0.0:
        return a, b
    c = (a.shape[0] / 3.0) ** 0.5 / norm
    return a * c, b / c


def loftq_linear(lin: nn.Linear, fmt: str, quant: QuantConfig, rank: int, scaling: float, iters: int,
                 device, compute: torch.dtype, balanced: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base weight to quantize, lora_A [r, in], lora_B [out, r]) for one linear layer."""
    from .quantize import convert_linear, dequantized
    w = lin.weight.data.float().to(device)
    delta = torch.zeros_like(w)
    a = b = None
    base = w
    for _ in range(max(1, iters)):
        base = w - delta
        probe = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        probe.weight = nn.Parameter(base.to(lin.weight.dtype), requires_grad=False)
        q = dequantized(convert_linear(probe, fmt, quant, device, compute)).to(device)
        u, s, v = _low_rank(w - q, min(rank, *w.shape))
        root = (s / scaling).sqrt()
        b, a = u * root[None, :], root[:, None] * v.T
        delta = scaling * (b @ a)
    if balanced:
        a, b = balance(a, b)
    return base.to(lin.weight.dtype), a.float(), b.float()


def loftq_model_(model: nn.Module, plan: PrecisionPlan, quant: QuantConfig, ft: FinetuneConfig, device,
                 compute: torch.dtype) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Replace the weight of every linear in ``ft.target_modules`` stored in one of ``ft.loftq_formats`` by
    its LoftQ base weight (to be quantized by :func:`qpruner.quantize.quantize_` next); return the
    adapters' initial (A, B) per (layer, name). Linears in other formats keep their weight and get the
    plain initialisation. Rank, alpha, iterations and balancing come from ``ft`` (config.py's defaults)."""
    scaling = ft.lora_alpha / ft.lora_r
    init = {}
    with _one_thread(device):
        for i, (layer, formats_) in enumerate(zip(models.decoder_layers(model), plan.per_linear())):
            _loftq_layer_(i, layer, formats_, quant, ft, scaling, device, compute, init)
    return init


@contextlib.contextmanager
def _one_thread(device):
    """On CPU, LoftQ runs on one thread: multi-threaded BLAS rounds its products differently, which flips
    quantization bins, so a reloaded export on a machine with more threads than its trial had would get other
    base weights (measured: perplexity 77.86 vs the trial's 77.73 on SmolLM2 with 2 threads vs 1)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _loftq_layer_(i, layer, formats_, quant, ft, scaling, device, compute, init) -> None:
    """LoftQ of one decoder layer's target linears, in place; their adapters' (A, B) into ``init``."""
    for name, lin in models.layer_linears(layer).items():
        if name not in ft.target_modules or formats_[name] not in ft.loftq_formats:
            continue
        base, a, b = loftq_linear(lin, formats_[name], quant, ft.lora_r, scaling, ft.loftq_iters, device, compute,
                                  ft.loftq_balance)
        lin.weight.data = base.to(lin.weight.device)
        init[(i, name)] = (a, b)


def load_adapters_(model: nn.Module, init: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
                   adapter: str = "default") -> None:
    """Copy LoftQ's (A, B) into the LoRA modules of a peft-wrapped model."""
    layers = models.decoder_layers(model)
    for (i, name), (a, b) in init.items():
        module = models.layer_linears(layers[i])[name]
        module.lora_A[adapter].weight.data.copy_(a.to(module.lora_A[adapter].weight.device))
        module.lora_B[adapter].weight.data.copy_(b.to(module.lora_B[adapter].weight.device))


# ----------------------------------------------------------------------------------------------
# the cache: one LoftQ result per (layer, linear, format) of a pruned model


CACHE_VERSION = 1


class LoftQCache:
    """LoftQ's result for one linear in one format does not depend on the rest of the plan: computed once per
    pruned model, it is kept here and reused by every later trial (and export) of a plan that puts that linear
    in that format. An entry holds the quantized base module's tensors exactly as the trial built them
    (packed 4-bit data and quantization state, int8 data and row scales, or bf16 weights) and the adapter's
    initial (A, B), so a cached build is bit-identical to an uncached one and runs no SVD and no quantization.

    ``directory`` is one folder per pruned model and settings (:meth:`folder`): the pruned model's identity,
    the LoRA rank / alpha / iterations / balancing, the 4-bit block size and double quantization, the int8
    threshold, the compute dtype, the device type and the torch and bitsandbytes versions all name it, so a
    change to any of them never reads an entry made under others. Entries are written whole or not at all
    (temporary file, then rename): concurrent trials may compute the same entry; the last rename wins with
    identical content."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.hits = self.misses = 0
        self._unwritable = False

    @staticmethod
    def folder(root: str | os.PathLike, pruned_key: str, quant: QuantConfig, ft: FinetuneConfig, device,
               compute: torch.dtype) -> Path:
        """The cache folder for a pruned model and these settings, under ``root``."""
        import bitsandbytes
        settings = {"version": CACHE_VERSION, "pruned": pruned_key, "r": ft.lora_r, "alpha": ft.lora_alpha,
                    "iters": ft.loftq_iters, "balance": ft.loftq_balance, "blocksize": quant.blocksize,
                    "double_quant": quant.double_quant, "int8_threshold": quant.int8_threshold,
                    "compute": str(compute), "device": _hardware(device), "torch": torch.__version__,
                    "bitsandbytes": bitsandbytes.__version__}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return Path(root) / f"{pruned_key}-{digest}"

    def _path(self, layer: int, name: str, fmt: str) -> Path:
        return self.directory / f"L{layer:03d}.{name}.{fmt}.safetensors"

    def load(self, layer: int, name: str, fmt: str, lin: nn.Linear, quant: QuantConfig, device,
             compute: torch.dtype):
        """(quantized module, A, B) for ``lin`` in ``fmt`` from the cache, or None (a miss)."""
        from safetensors.torch import load_file
        path = self._path(layer, name, fmt)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors = load_file(str(path))
            a, b = tensors["lora_A"], tensors["lora_B"]
            if b.shape[0] != lin.out_features or a.shape[1] != lin.in_features:
                raise ValueError(f"entry for a {b.shape[0]} x {a.shape[1]} linear, this one is "
                                 f"{lin.out_features} x {lin.in_features}")
            module = _module_from(tensors, fmt, lin, quant, device, compute)
        except Exception as exc:  # noqa: BLE001 - a damaged entry is recomputed, never trusted
            logger.warning("LoftQ cache entry %s is unreadable (%s); computing it again", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return module, a, b

    def store(self, layer: int, name: str, fmt: str, module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
        """Keep one entry (best effort: a full or read-only disk costs the next trial the SVDs, nothing else)."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file
        if self._unwritable:
            return
        path = self._path(layer, name, fmt)
        tmp = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.directory)
            os.close(fd)
            save_file({**_module_tensors(module, fmt), "lora_A": a.contiguous(), "lora_B": b.contiguous()}, tmp)
            os.replace(tmp, path)
            tmp = None
        except (OSError, SafetensorError) as exc:   # a full disk reaches save_file as a SafetensorError
            self._unwritable = True
            logger.warning("cannot write the LoftQ cache in %s (%s); trials compute LoftQ without it",
                           self.directory, getattr(exc, "strerror", None) or exc)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)


def _hardware(device) -> str:
    """What LoftQ's rounding depends on besides the settings: the device type and its kind (GPU name and compute
    capability; the CPU's vector instruction set), so a cache shared across machines never mixes their results."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}"
    return f"{device.type}:{torch.backends.cpu.get_cpu_capability()}"


def _module_tensors(module: nn.Module, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors that make a quantized base module (not its bias: that comes from the pruned weights)."""
    w = module.weight
    if fmt in ("nf4", "fp4"):
        state = {f"qs.{k}": v.detach().cpu().contiguous() for k, v in w.quant_state.as_dict(packed=True).items()}
        return {"data": w.data.detach().cpu().contiguous(), **state}
    if fmt == "int8":
        return {"data": w.data.detach().cpu().contiguous(), "SCB": w.SCB.detach().cpu().contiguous()}
    return {"data": w.data.detach().cpu().contiguous()}


def _module_from(tensors: dict, fmt: str, lin: nn.Linear, quant: QuantConfig, device, compute: torch.dtype) -> nn.Module:
    """The quantized module an entry describes, on ``device``, with ``lin``'s bias (as convert_linear builds it)."""
    import bitsandbytes as bnb

    from .quantize import Linear16
    has_bias = lin.bias is not None
    if fmt in ("nf4", "fp4"):
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=compute,
                              compress_statistics=quant.double_quant, quant_type=fmt, device="meta")
        stats = {k[3:]: v for k, v in tensors.items() if k.startswith("qs.")}
        q.weight = bnb.nn.Params4bit.from_prequantized(tensors["data"], stats, requires_grad=False, device=device,
                                                       module=q)
        q.support_avx512bf16_for_cpu = False
        q.weight.support_avx512bf16_for_cpu = False
    elif fmt == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=quant.int8_threshold, device="meta")
        data = tensors["data"]
        q.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=tensors["SCB"])
    elif fmt == "bf16":
        q = Linear16(lin.in_features, lin.out_features, bias=has_bias, device="meta")
        q.weight = nn.Parameter(tensors["data"].to(device), requires_grad=False)
        if has_bias:
            q.bias = nn.Parameter(lin.bias.data.to(device=device, dtype=torch.bfloat16), requires_grad=False)
        return q
    else:
        raise ValueError(f"no LoftQ cache for format {fmt!r}")
    if has_bias:
        q.bias = nn.Parameter(lin.bias.data.to("cpu", compute), requires_grad=False)
    return q.to(device)
