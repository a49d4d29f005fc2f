"""cxrscale launchers: starting the stages on this machine (horovodrun), Slurm and Kubernetes, and in order
from a recipe (`launch.pipeline`). The version and the shared runtime are in `cxrscale`."""
