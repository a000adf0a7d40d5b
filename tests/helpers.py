"""Test helpers shared by the pruning tests (tiny and real models)."""

import copy
import os
import signal
import subprocess

import torch

from qpruner import models, prune


def masked_reference(model, sel: prune.Selection):
    """The original model with everything ``sel`` removes zeroed where it writes to the residual stream."""
    ref = copy.deepcopy(model)
    hd = models.head_dim(ref.config)
    layers = models.decoder_layers(ref)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            lin = models.layer_linears(layer)
            group = ref.config.num_attention_heads // ref.config.num_key_value_heads
            if i in sel.keep_kv:
                for kv in range(ref.config.num_key_value_heads):
                    if kv not in sel.keep_kv[i]:
                        lin["o_proj"].weight[:, kv * group * hd:(kv + 1) * group * hd] = 0
            if i in sel.keep_channels:
                drop = [c for c in range(lin["gate_proj"].out_features) if c not in sel.keep_channels[i]]
                lin["down_proj"].weight[:, drop] = 0
            if sel.keep_layers is not None and i not in sel.keep_layers:
                lin["o_proj"].weight.zero_()
                lin["down_proj"].weight.zero_()
        if sel.keep_hidden is not None:
            drop = [c for c in range(ref.config.hidden_size) if c not in sel.keep_hidden]
            ref.get_input_embeddings().weight[:, drop] = 0
            for layer in layers:
                lin = models.layer_linears(layer)
                lin["o_proj"].weight[drop] = 0
                lin["down_proj"].weight[drop] = 0
    return ref


def prune_and_reference(model, calib, cfg):
    scores = prune.score_groups(model, calib, cfg, seed=1)
    sel = prune.select(scores, model, cfg, cfg.ratio)
    ref = masked_reference(model, sel)
    predicted = prune.params_after(model, sel)
    prune.apply_(model, sel)
    return ref, predicted, sel


def kill_session(sid: int) -> None:
    """SIGKILL every process left in the session a test started (by its pid): all of them are the test's."""
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, session = (int(x) for x in line.split())
        if session == sid and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def evaluate_export(directory, device: str = "cpu"):
    """(model, EvalMetrics): an export loaded with qpruner.load and evaluated as its trial was."""
    import qpruner
    from qpruner import data
    from qpruner.evaluate import evaluate
    from qpruner.export import evaluation_config
    model, tokenizer = qpruner.load(directory, device)
    data_cfg, eval_cfg = evaluation_config(directory)
    splits = data.load_splits(data_cfg, tokenizer)
    return model, evaluate(model, splits.eval, eval_cfg.batch_size, device, eval_cfg.context, eval_cfg.stride)
