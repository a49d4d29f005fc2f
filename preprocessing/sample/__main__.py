"""python -m preprocessing.sample --output data/sample: write the built-in synthetic sample."""
from cxrscale.cli import run_cli
from preprocessing.sample.cli import main

run_cli(main)
