"""python -m optimize.tune: hyper-parameter search with Ray Tune over `distributed.train`.

    python -m optimize.tune --data prepared/kermany --model cnn --search asha --trials 16 --max-epochs 10

Every trial is a real `python -m distributed.train` run (under `horovodrun -np W` when --workers-per-trial
W > 1) in its own run folder, `OUTPUT/trials/<trial id>/`: the same code, checkpoints and exported model as
any training run. The trial function follows the run's history.csv and reports each finished epoch to Tune
(val_auc, val_loss, ...) with a small Tune checkpoint that records the epoch; Tune's schedulers (ASHA) stop
weak trials on those reports. A re-run of the same command resumes an interrupted search with
`Tuner.restore`, and each unfinished trial continues from its own last training checkpoint.

Writes OUTPUT/results.csv and report.md (every trial, sorted by best validation AUC), best_config.json
(accepted by `distributed.train --config`), auc_vs_params.png, summary.json, and Tune's own state in
OUTPUT/tune/.
"""
from __future__ import annotations

from optimize.tune.space import Param, SEARCHES, check_space, load_space, param_space, parse_space
from optimize.tune.trial import run_trial

__all__ = ["SEARCHES", "Param", "check_space", "load_space", "param_space", "parse_space",
           "run_trial"]
