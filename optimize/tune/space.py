"""The search space: per-model defaults, the declared-space format (a JSON/YAML file of
parameter -> distribution and grid values), its checks against `distributed.train`'s options, and Tune's
form of it."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from distributed.training.config import TrainConfig
from cxrscale.errors import CxrError
from cxrscale.files import read_options_file
from distributed.model.zoo import model_spec

log = logging.getLogger("cxrscale.tune")

SEARCHES = ("grid", "random", "asha")
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
METRIC = "val_auc"
# Set by the search itself, not searchable: the data, the model and the epoch budget are flags, the
# folder and resumption belong to the trial.
NOT_TUNABLE = ("data", "output", "model", "epochs", "resume")

# ---------------------------------------------------------------------------------------------------------
# The search space: declared as plain data, turned into Tune domains
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One searchable option. kind is a distribution name or 'constant'; args its bounds, its choices, or
    (value,) for a constant; grid the values grid search tries (None: it has none)."""

    name: str
    kind: str
    args: tuple
    grid: tuple | None = None

    def candidates(self) -> list[Any]:
        """Values worth validating before any trial starts: bounds, choices, grid points."""
        return list(self.args) + list(self.grid or ())

    def domain(self, search: str):
        """The Tune value for `search`: a grid_search, a sampling domain, or the constant itself."""
        from ray import tune

        if self.kind == "constant":
            return self.args[0]
        if search == "grid":
            return tune.grid_search(list(self.grid))
        if self.kind == "loguniform":
            return tune.loguniform(*self.args)
        if self.kind == "uniform":
            return tune.uniform(*self.args)
        if self.kind == "randint":
            return tune.randint(*self.args)
        return tune.choice(list(self.args))

    @property
    def searched(self) -> bool:
        return self.kind != "constant"


_FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def _check_type(name: str, value: Any, where: str) -> None:
    """Values must have the type the TrainConfig field has (e.g. batch_size an integer)."""
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
    allowed: tuple = ()
    for part in str(field.type).split("|"):
        part = part.strip()
        allowed += (type(None),) if part == "None" else _FIELD_TYPES.get(part, (object,))
    if isinstance(value, bool) and bool not in allowed:
        allowed = ()
    if not isinstance(value, allowed):
        raise CxrError(f"{where}: {name} = {value!r} must be {field.type}")


def parse_space(data: dict[str, Any], where: str) -> dict[str, Param]:
    """Validate a declared space: {name: {"loguniform": [lo, hi], "grid": [...]}} or {name: value}.

    Names are TrainConfig fields (the options of distributed.train, with underscores). Distributions:
    loguniform [lo, hi] (0 < lo < hi), uniform [lo, hi], randint [lo, hi) (integers), choice [values].
    `grid` alone is allowed (random search then picks among its values). Anything else is a constant.
    """
    if not isinstance(data, dict) or not data:
        raise CxrError(f"{where} must be a non-empty mapping of option names to distributions or values")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    params: dict[str, Param] = {}
    for name, spec in data.items():
        here = f"{where}: {name}"
        if name in NOT_TUNABLE:
            raise CxrError(f"{here} cannot be searched: data, model and epochs are flags of optimize.tune "
                           "(--data, --model, --max-epochs), output and resume belong to each trial")
        if name not in known:
            raise CxrError(f"{here} is not an option of distributed.train (use field names such as lr, "
                           "batch_size, dropout, l2, augment, fine_tune_from)")
        if not isinstance(spec, dict):
            params[name] = Param(name, "constant", (spec,))
            _check_type(name, spec, where)
            continue
        unknown = sorted(set(spec) - set(DISTRIBUTIONS) - {"grid"})
        kinds = [k for k in DISTRIBUTIONS if k in spec]
        if unknown or len(kinds) > 1 or not (kinds or "grid" in spec):
            raise CxrError(f"{here} must have one of {', '.join(DISTRIBUTIONS)} and/or grid, got "
                           f"{', '.join(sorted(spec)) or 'nothing'}")
        grid = spec.get("grid")
        if grid is not None and (not isinstance(grid, list) or not grid):
            raise CxrError(f"{here}: grid must be a non-empty list of values")
        kind = kinds[0] if kinds else "choice"
        args = spec[kind] if kinds else grid
        if not isinstance(args, list) or not args:
            raise CxrError(f"{here}: {kind} needs a non-empty list, got {args!r}")
        if kind in ("loguniform", "uniform", "randint"):
            numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
            if len(args) != 2 or not numeric or not args[0] < args[1]:
                raise CxrError(f"{here}: {kind} needs [low, high] with low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise CxrError(f"{here}: loguniform bounds must be positive, got {args!r}")
            if kind == "randint" and not all(isinstance(a, int) for a in args):
                raise CxrError(f"{here}: randint bounds must be integers, got {args!r}")
        param = Param(name, kind, tuple(args), tuple(grid) if grid is not None else None)
        for value in param.candidates():
            _check_type(name, value, where)
        params[name] = param
    return params


def load_space(path: str | None, model: str) -> tuple[dict[str, Param], str]:
    """The declared space from --space FILE (JSON or YAML), else the model's default."""
    if not path:
        # each model's default space is in its zoo module (distributed.model.zoo)
        return parse_space(model_spec(model).tune_space, f"the default {model} space"), f"default ({model})"
    data = read_options_file(path, "--space")
    return parse_space(data, f"--space {path}"), str(path)


def check_space(space: dict[str, Param], search: str, base: dict[str, Any]) -> None:
    """Refuse, before Ray starts, a space no trial could train with: grid search over a parameter that has
    no grid values, or a value distributed.train's own checks reject."""
    if search == "grid":
        missing = [p.name for p in space.values() if p.searched and p.grid is None]
        if missing:
            raise CxrError(f"--search grid: {', '.join(missing)} declare(s) a distribution but no grid values; "
                           "add \"grid\": [...] to the space, or use --search random or asha")
    for param in space.values():
        for value in param.candidates():
            values = {**base, **{p.name: p.candidates()[0] for p in space.values()}, param.name: value}
            try:
                TrainConfig(**values).validate()
            except CxrError as err:
                raise CxrError(f"search space: {param.name} = {value!r} is not a valid training option "
                               f"({err})") from None


def load_points(path: str | None, space: dict[str, Param], search: str) -> list[dict[str, Any]]:
    """--points-to-evaluate: configurations Tune tries before drawing (keys among the searched options)."""
    if not path:
        return []
    if search == "grid":
        raise CxrError("--points-to-evaluate is for --search random or asha; grid search tries the grid")
    points = read_options_file(path, "--points-to-evaluate")
    if not isinstance(points, list) or not all(isinstance(p, dict) and p for p in points):
        raise CxrError(f"--points-to-evaluate {path} must be a list of non-empty mappings")
    for point in points:
        for name, value in point.items():
            if name not in space:
                raise CxrError(f"--points-to-evaluate {path}: {name} is not a searched option "
                               f"(searched: {', '.join(space)})")
            _check_type(name, value, f"--points-to-evaluate {path}")
    return points


def param_space(space: dict[str, Param], search: str) -> dict[str, Any]:
    return {name: param.domain(search) for name, param in space.items()}
