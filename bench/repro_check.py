"""Reproducibility check: prune the demo's model, score it and run one short trial, with a given
number of threads for the driver stages and for the trial; print a hash of the pruned weights, the
first layer scores and the trial's NLL. Runs with different thread counts print the same line on one
machine (measured: 1/1, 2/1 and 2/2 threads gave identical output).

    python bench/repro_check.py --driver-threads 1 --trial-threads 1
    python bench/repro_check.py --driver-threads 2 --trial-threads 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--driver-threads", type=int, default=2)
    parser.add_argument("--trial-threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    from qpruner import job as driver
    from qpruner.config import load_job
    from qpruner.plan import PrecisionPlan
    from qpruner.trial import run_trial
    torch.set_num_threads(args.driver_threads)
    with tempfile.TemporaryDirectory() as tmp:
        job = load_job(ROOT / "tune_jobs" / "smollm2_demo.yaml", [f"results_dir={tmp}", f"finetune.steps={args.steps}"])
        job.results_path.mkdir(parents=True)
        prep = driver.prepare(job, job.results_path)
        digest = hashlib.sha256()
        from qpruner.weights import open_weights
        weights = open_weights(prep.context.model_weights)
        for name in sorted(weights.keys()):
            digest.update(weights[name].detach().contiguous().float().numpy().tobytes())
        torch.set_num_threads(args.trial_threads)
        r = run_trial(prep.context, PrecisionPlan.uniform("int8", prep.context.n_layers))
    print(json.dumps({"driver_threads": args.driver_threads, "trial_threads": args.trial_threads,
                      "pruned_sha256": digest.hexdigest()[:16], "scores": [round(s, 6) for s in prep.scores.scores[:5]],
                      "nll": r.nll, "train_loss_final": r.train_loss_final}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
