"""python -m optimize.tune: hyper-parameter search with Ray Tune over `distributed.train`."""
from cxrscale.cli import run_cli
from optimize.tune.cli import main

run_cli(main)
