"""Fine-tuning memory: an estimate before building anything, and the measured peak.

Estimate for LoRA fine-tuning of a quantized model, micro-batch ``B`` (``finetune.micro_batch_size``, else
``batch_size``: gradient accumulation keeps one micro-batch's activations) x sequence ``L`` (tokens ``T = B*L``),
compute dtype of ``c`` bytes, LoRA rank ``r`` on the targeted projections:

* weights: :func:`qpruner.memory.plan_bytes` (exact);
* adapters: ``r * (in + out)`` fp32 parameters per targeted projection; their gradients the same;
  AdamW keeps two fp32 moments per adapter parameter;
* activations kept for the backward pass, per decoder layer and token (``c`` = compute-dtype bytes):
  two RMSNorms ``2 * (4 + c) * H`` (each keeps its fp32 input and its normalised output);
  attention ``c * (7*Q + 2*KV)`` (queries, keys and values before and after ``repeat_kv``'s GQA
  expansion, attention output, o_proj input); MLP ``c * 4*I`` (gate, up, SiLU output, down_proj
  input); LoRA ``c * 3*r*t`` (A outputs and dropout masks of the ``t`` targeted projections); and for
  an int8 layer ``c * sum(in_features)`` more (bitsandbytes' int8 matmul keeps its own copy of each
  input) — ``H`` the hidden size, ``Q``/``KV`` the query/key widths, ``I`` the MLP width of the layer;
* the output head: fp32 logits, their log-softmax and its gradient, plus the compute-dtype logits and
  their gradient, ``(12 + 2c) * V`` bytes per token;
* with ``finetune.gradient_checkpointing``, each layer keeps only its input (``c * H`` per token) and one
  layer's activations above are alive at a time, during its recomputation (a model, not yet measured).

Measured on an H200 (``bench/finetune_memory_bench.py``, results/bench/finetune_memory_cuda_*.md), the
first version of this model (12V head, 4H norms, no int8 term) gave 0.69-0.81 of the allocator's
peak; the terms above, fitted on the SmolLM2 shape, give 0.90-0.98 there and 0.87-0.95 on four layers
of LLaMA-7B's shape, which was not used to fit them — an underestimate by 2-13%, mostly allocator
caching and kernel workspaces. It ignores allocator fragmentation and temporaries inside kernels; ``bench/importance_bench.py``
compares it with measurements. Measured peak: on CUDA ``torch.cuda.max_memory_allocated`` during
fine-tuning (``cuda_allocated``); on Linux CPUs the growth of the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``) during fine-tuning plus the model's tensor bytes
(``cpu_rss``; includes allocator slack); elsewhere none (``none``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import LINEAR_NAMES, FinetuneConfig, QuantConfig
from .memory import DTYPE_BYTES, ModelLayout, plan_bytes
from .plan import PrecisionPlan


@dataclass(frozen=True)
class FinetuneMemory:
    """Estimated peak memory of a fine-tune, split into its parts (bytes)."""
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.gradients + self.optimizer + self.activations


def lora_numel(layout: ModelLayout, rank: int, targets=LINEAR_NAMES) -> int:
    """Number of LoRA parameters of rank ``rank`` on the targeted linears of ``layout``."""
    return sum(rank * (s.in_features + s.out_features)
               for layer in layout.layers for name, s in zip(LINEAR_NAMES, layer) if name in targets)


def estimate(layout: ModelLayout, plan: PrecisionPlan, quant: QuantConfig, ft: FinetuneConfig, seq_len: int,
             compute_dtype: str = "float32") -> FinetuneMemory:
    """Predicted peak memory of fine-tuning ``plan`` (see the module docstring for the model)."""
    weights = plan_bytes(layout, plan, quant, compute_dtype).total_bytes
    n_lora = lora_numel(layout, ft.lora_r, ft.target_modules)
    tokens = (ft.micro_batch_size or ft.batch_size) * seq_len   # gradient accumulation: one micro-batch at a time
    c = DTYPE_BYTES[compute_dtype]
    per_layer = []
    for layer, formats in zip(layout.layers, plan.per_linear()):
        shape = dict(zip(LINEAR_NAMES, layer))
        q, kv, inter = shape["q_proj"].out_features, shape["k_proj"].out_features, shape["gate_proj"].out_features
        kept = 2 * (4 + c) * layout.hidden
        kept += c * (7 * q + 2 * kv + 4 * inter + 3 * ft.lora_r * len(ft.target_modules))
        kept += c * sum(shape[name].in_features for name in LINEAR_NAMES if formats[name] == "int8")
        per_layer.append(kept)
    if ft.gradient_checkpointing and per_layer:
        # each layer keeps only its input; one layer's activations are recomputed at a time (a model: not measured)
        per_token = c * layout.hidden * len(per_layer) + max(per_layer)
    else:
        per_token = sum(per_layer)
    per_token += (12 + 2 * c) * layout.vocab
    return FinetuneMemory(weights=weights, adapters=4 * n_lora, gradients=4 * n_lora, optimizer=8 * n_lora,
                          activations=tokens * per_token)


# ----------------------------------------------------------------------------------------------
# measured peak


def _proc_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class PeakReading:
    """A measured peak memory and how it was measured (CUDA allocator or process RSS)."""
    kind: str = "none"     # cuda_allocated | cpu_rss | none
    peak_bytes: int | None = None


@contextmanager
def measure_peak(device: torch.device, resident_bytes: int = 0):
    """Measure the peak memory of the enclosed block (see the module docstring for what is measured).
    ``resident_bytes``: tensor bytes already resident before the block (CPU reading only)."""
    reading = PeakReading()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield reading
        torch.cuda.synchronize(device)
        reading.kind, reading.peak_bytes = "cuda_allocated", int(torch.cuda.max_memory_allocated(device))
        return
    rss_before = _proc_status("VmRSS")
    _note_peak()   # the reset below forgets the peak so far: keep it for process_peak()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        can_reset = True
    except OSError:
        can_reset = False
    yield reading
    hwm = _proc_status("VmHWM")
    if can_reset and rss_before is not None and hwm is not None:
        reading.kind, reading.peak_bytes = "cpu_rss", resident_bytes + max(0, hwm - rss_before)


# ----------------------------------------------------------------------------------------------
# the process's peak resident memory over a span that contains measure_peak's resets


_PEAK_SEEN = [0]


def trim_heap() -> None:
    """Hand the heap's free memory back to the operating system (glibc ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed allocations below its (self-raising) mmap threshold in the heap, so a process that builds and
    frees large tensors keeps their pages resident: measured on a 1.1B model, a trial's build left 1.9 GB resident
    for 0.63 GB of quantized weights, and its peak rose to 3.1 GB; trimming after each decoder layer and stage kept
    it at about 2.6 GB. (A fixed mmap threshold would do it too, but cost 20% of a CPU fine-tune's time.)"""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _libc():
    import ctypes
    import ctypes.util
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return _LIBC


_LIBC = None


def _note_peak() -> None:
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        _PEAK_SEEN[0] = max(_PEAK_SEEN[0], hwm)


def reset_process_peak() -> bool:
    """Start measuring this process's peak resident memory afresh (Linux: ``VmHWM`` reset through
    ``/proc/self/clear_refs``); False where it cannot be reset."""
    _PEAK_SEEN[0] = 0
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def process_peak() -> int | None:
    """This process's peak resident memory (bytes) since :func:`reset_process_peak` (or its start), including
    the peaks that :func:`measure_peak`'s own resets would otherwise forget; None where it cannot be read."""
    _note_peak()
    return _PEAK_SEEN[0] or None


# ----------------------------------------------------------------------------------------------
# admission: the memory a trial has


# the estimate gave 0.87-0.98 of the measured CUDA peak (module docstring): admission asks for this much more
ADMISSION_MARGIN = 1.15
HOST_SHARE = 0.7   # on CPU, trials together may use this share of the host's RAM (the rest: Ray, the OS, the driver)


def trial_memory_limit(explicit_gb: float | None, device_type: str, gpus_per_trial: float, cpus_per_trial: float,
                       gpu_total: int | None = None, host_total: int | None = None,
                       host_cpus: int | None = None) -> int | None:
    """The memory one trial may use (bytes), which a plan's predicted fine-tuning peak must not exceed.

    ``search.memory_per_trial_gb`` when set; else on CUDA the GPU's memory x ``gpus_per_trial`` (a fraction of one
    GPU); else on CPU :data:`HOST_SHARE` x the host's RAM x this trial's share of the host's CPUs (at least one
    CPU's share). None when the needed figure is unknown (no admission)."""
    if explicit_gb is not None:
        return int(explicit_gb * 1e9)
    if device_type == "cuda":
        return int(gpu_total * min(1.0, gpus_per_trial)) if gpu_total else None
    if not host_total or not host_cpus:
        return None
    share = min(1.0, max(1.0, cpus_per_trial) / host_cpus)
    return int(HOST_SHARE * host_total * share)


def host_memory() -> int | None:
    """This machine's RAM (bytes), or its container's memory limit where lower (cgroup v2 or v1: a KubeRay pod)."""
    import os
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value.isdigit() and 0 < int(value) < total:
            total = int(value)
    return total


def host_cpus() -> int | None:
    """CPUs this process may use: its affinity, or its container's CPU quota where lower (cgroup v2 ``cpu.max`` or
    v1 ``cpu.cfs_quota_us``: a KubeRay pod with ``cpu: "4"`` on a 64-core node has 4)."""
    import math
    import os
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 0
    quota = None
    try:
        parts = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if len(parts) == 2 and parts[0] != "max":
            quota = int(parts[0]) / int(parts[1])
    except (OSError, ValueError):
        try:
            q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            quota = q / p if q > 0 and p > 0 else None
        except (OSError, ValueError):
            quota = None
    if quota:
        cpus = min(cpus, max(1, math.ceil(quota))) if cpus else max(1, math.ceil(quota))
    return cpus or None


def local_memory_limit(explicit_gb: float | None, device_type: str, gpus_per_trial: float,
                       cpus_per_trial: float, node_cpus: float | None = None) -> int | None:
    """:func:`trial_memory_limit` on this machine (the trial's own node: its GPU, RAM and CPUs; ``node_cpus``: the
    CPUs Ray gives the node, when known, else what the process may use)."""
    gpu_total = None
    if device_type == "cuda" and explicit_gb is None and torch.cuda.is_available():
        gpu_total = int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    cpus = node_cpus if node_cpus else host_cpus()
    return trial_memory_limit(explicit_gb, device_type, gpus_per_trial, cpus_per_trial, gpu_total,
                              host_memory(), int(cpus) if cpus else None)


def cap_gpu_memory(limit: int | None, device: torch.device) -> float | None:
    """Hold this process to ``limit`` bytes of its GPU when that is less than the GPU (fractional-GPU trials share
    one: Ray's fractions are logical only, this makes them real); returns the fraction set, or None."""
    if limit is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if limit >= total:
        return None
    fraction = limit / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction
