"""Recipes: stages run in order on one model, from a YAML file or a dict (`onnxprune run`,
`onnxprune.run_recipe`). Like llm-compressor's recipes (stages of modifiers) and Olive's pass
configs (typed, validated before anything runs)::

    calibration:            # shared by every stage that needs data (CLI --calib / calib= override source)
      source: calib.txt     # wikitext2 | c4 | ptb | .txt | .jsonl | .npz
      nsamples: 32
      seqlen: 128
    stages:
      - name: ffn-neurons   # optional; default "<index>-<kind>"
        prune: {method: l1, pattern: structured, sparsity: 0.25, kinds: [ffn]}
      - prune: {method: sparsegpt, pattern: "2:4"}
      - quantize: {mode: int8-static}

Each stage is `prune` (the keys of `onnxprune apply`) or `quantize` (those of `onnxprune
quantize`). Unknown keys and bad values are refused up front, naming the stage and the key. The
calibration samples are drawn once and reused by every stage; each prune stage calibrates on the
model the stages before it left. The report records the recipe, its sha256, the calibration
source and its sha256, and every stage's report; the output's metadata_props carry
`onnxprune.recipe` and `onnxprune.calibration`, so the report alone reproduces the run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from onnxprune.errors import UserError

STAGE_KINDS = ("prune", "quantize")


@dataclass
class PruneStage:
    method: str
    sparsity: float | None = None
    pattern: str | None = None
    include: str | None = None
    exclude: str | None = None
    target: str = "dense"
    allocation: str = "uniform"
    kinds: list[str] | None = None  # structured: ffn, heads, conv (default: all)
    strict: bool = False
    data_free: bool = False
    add_bias: bool = False
    one_shot: bool = False
    seed: int = 0


@dataclass
class QuantizeStage:
    mode: str = "int8-static"
    per_channel: bool = True
    block_size: int = 128
    compressed: bool = False


@dataclass
class CalibrationConfig:
    source: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    tokenizer: str | None = None


@dataclass
class Stage:
    name: str
    kind: str
    config: PruneStage | QuantizeStage


@dataclass
class Recipe:
    stages: list[Stage]
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    origin: str = "<dict>"  # the file it was read from

    def to_dict(self) -> dict:
        return {"calibration": asdict(self.calibration),
                "stages": [{"name": s.name, s.kind: asdict(s.config)} for s in self.stages]}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass
class RecipeReport:
    onnxprune_version: str
    input: str
    output: str
    recipe: dict
    recipe_sha256: str
    calibration: dict = field(default_factory=dict)
    stages: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return "; ".join(f"{s['name']}: {s['summary']}" for s in self.stages)

    def markdown(self) -> str:
        lines = [f"# onnxprune recipe run ({len(self.stages)} stages)", "", f"- input: `{self.input}`",
                 f"- output: `{self.output}`", f"- recipe sha256: `{self.recipe_sha256}`",
                 f"- calibration: `{json.dumps(self.calibration, sort_keys=True)}`",
                 "- wall time (s): " + ", ".join(f"{k} {v:.3f}" for k, v in self.timings_s.items()), ""]
        lines += [f"{i}. **{s['name']}**: {s['summary']}" for i, s in enumerate(self.stages, start=1)]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ parsing


def load_recipe(recipe) -> Recipe:
    """A `Recipe` from a YAML / JSON file path, a dict, or a `Recipe` (returned as is), validated."""
    if isinstance(recipe, Recipe):
        return recipe
    origin = "<dict>"
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe)
        if not path.is_file():
            raise UserError(f"recipe file not found: {path}")
        origin = str(path)
        import yaml

        try:
            recipe = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is not a YAML recipe ({str(exc).splitlines()[0]})") from None
    if not isinstance(recipe, dict):
        raise UserError(f"{origin}: a recipe is a mapping with `stages:` (a list), got {type(recipe).__name__}")
    _check_keys(recipe, {"stages", "calibration"}, origin)
    stages = recipe.get("stages")
    if not isinstance(stages, list) or not stages:
        raise UserError(f"{origin}: `stages:` must be a non-empty list of stages (prune: or quantize:)")
    calibration = _typed(CalibrationConfig, recipe.get("calibration") or {}, f"{origin}: calibration")
    parsed = [_stage(entry, index, origin) for index, entry in enumerate(stages, start=1)]
    names = [s.name for s in parsed]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f"{origin}: two stages are named {duplicate!r}")
    return Recipe(parsed, calibration, origin)


def _stage(entry, index: int, origin: str) -> Stage:
    where = f"{origin}: stage {index}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: a stage is a mapping such as {{prune: {{method: ...}}}}, got {entry!r}")
    kinds = [k for k in entry if k in STAGE_KINDS]
    _check_keys(entry, {"name", *STAGE_KINDS}, where)
    if len(kinds) != 1:
        raise UserError(f"{where}: give exactly one of {', '.join(STAGE_KINDS)}, got {', '.join(kinds) or 'none'}")
    kind = kinds[0]
    name = str(entry.get("name") or f"{index}-{kind}")
    where = f"{origin}: stage {index} ({name}, {kind})"
    config = _typed(PruneStage if kind == "prune" else QuantizeStage, entry[kind] or {}, where)
    _validate(config, where)
    return Stage(name, kind, config)


def _check_keys(mapping: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; expected one of {', '.join(sorted(allowed))}")


_TYPES = {"str": (str,), "float": (int, float), "int": (int,), "bool": (bool,), "list[str]": (list,)}


def _typed(cls, values, where: str):
    """`cls(**values)` with every key known and every value of its field's type."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of options, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    _check_keys(values, set(known), where)
    required = [f.name for f in fields(cls)
                if f.default is MISSING and f.default_factory is MISSING and f.name not in values]
    if required:
        raise UserError(f"{where}: missing key {required[0]!r}")
    for key, value in values.items():
        kind = known[key].type.replace(" | None", "")
        if value is None and "None" in known[key].type:
            continue
        ok = isinstance(value, _TYPES[kind]) and not (kind in ("int", "float") and isinstance(value, bool))
        if ok and kind == "list[str]":
            ok = all(isinstance(item, str) for item in value)
        if not ok:
            raise UserError(f"{where}: {key} must be {kind.replace('list[str]', 'a list of strings')}, got {value!r}")
    return cls(**values)


def _validate(config, where: str) -> None:
    """The checks `apply` / `quantize` make, before any stage runs."""
    try:
        if isinstance(config, PruneStage):
            prune_options(config, None)
        else:
            from onnxprune.quantization import QuantizeOptions, check_options

            check_options(QuantizeOptions(**asdict(config)))
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def prune_options(config: PruneStage, calibration):
    from onnxprune.emit import check_target, default_pattern
    from onnxprune.passes import get_pass
    from onnxprune.patterns import parse_pattern
    from onnxprune.pipeline import PruneOptions
    from onnxprune.samples import CalibrationOptions
    from onnxprune.structured import KINDS, structured_method

    pattern = default_pattern(config.target, config.pattern, config.sparsity)
    spec = parse_pattern(pattern, config.sparsity)
    if spec.structured:
        structured_method(config.method)
    else:
        get_pass(config.method)
    if config.kinds is not None and (not spec.structured or set(config.kinds) - set(KINDS)):
        raise UserError(f"kinds ({', '.join(KINDS)}) choose what structured pruning removes; got {config.kinds} "
                        f"with pattern {spec.label}")
    if config.allocation not in ("uniform", "owl"):
        raise UserError(f"allocation must be uniform or owl, got {config.allocation!r}")
    check_target(config.target, spec, spec.structured)
    calibration = calibration or CalibrationOptions()
    calibration = CalibrationOptions(calibration.source, calibration.nsamples, calibration.seqlen,
                                     calibration.tokenizer, config.seed, not config.one_shot)
    return PruneOptions(config.method, spec, include=config.include, exclude=config.exclude, strict=config.strict,
                        seed=config.seed, calibration=calibration, allocation=config.allocation,
                        data_free=config.data_free, add_bias=config.add_bias, target=config.target,
                        kinds=tuple(config.kinds) if config.kinds else None)


def needs_data(stage: Stage) -> bool:
    if stage.kind == "quantize":
        return stage.config.mode == "int8-static"
    from onnxprune.passes import get_pass
    from onnxprune.structured import METHOD_NEEDS, structured_method

    options = prune_options(stage.config, None)
    if options.pattern.structured:
        return bool(METHOD_NEEDS[structured_method(options.method)])
    return bool(get_pass(options.method).needs) or options.allocation == "owl"
