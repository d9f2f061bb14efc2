"""The recipe schema: one pydantic model per YAML section, unknown keys rejected.

Sections: ``task``, ``model``, ``data``, ``training`` (free-form, checked against
``transformers.TrainingArguments`` by :mod:`.training_args`), ``pruning`` (the
core `PruningConfig`), ``evaluation`` and ``output``. Checks that need more than
one section (task vs. built-in model, metric vs. task) live in
:func:`cross_check`. Nothing here imports torch or transformers.

Relative paths (local model directory, data files, output directory) are
relative to the current working directory, as for any command-line tool.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PositiveInt, PrivateAttr, Tag, field_validator,
                      model_validator)
from typing_extensions import Annotated

from prune_callbacks.core.config import PruningConfig
from prune_callbacks.core.config_errors import FiniteFloat
from prune_callbacks.controllers.distillation.config import DistillationConfig
from prune_callbacks.integrations.trainer.dense import DENSE_TIMINGS
from prune_callbacks.recipe.slimming import slim_problems

TASKS = ("sequence-classification", "causal-lm")
BUILTIN_MODELS = {"minilm": "sequence-classification", "smollm2": "causal-lm"}
BUILTIN_DATA = {"rotten_tomatoes": "sequence-classification", "kjv": "causal-lm"}
METRICS = {"sequence-classification": ("accuracy", "f1"), "causal-lm": ("perplexity",)}
LOCAL_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _source(info) -> Optional[str]:
    return info.data.get("source")


def _allowed(options) -> str:
    return ", ".join(options)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    """Which weights to start from."""

    source: Literal["builtin", "local", "hub"] = Field(
        "builtin", description="builtin (offline asset package), local (a save_pretrained directory) or hub (a repo id).")
    name: str = Field(..., description="builtin: minilm | smollm2; local: a directory; hub: a repo id such as 'bert-base-uncased'.")
    revision: Optional[str] = Field(None, description="hub only: branch, tag or commit.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the weights are loaded in (float32 trains on any CPU).")

    @field_validator("name")
    @classmethod
    def _name_fits_source(cls, v: str, info) -> str:
        source = _source(info)
        if source == "builtin" and v not in BUILTIN_MODELS:
            raise ValueError(f"{v!r} is not a built-in model; allowed: {_allowed(BUILTIN_MODELS)} "
                             "(or set model.source to local or hub)")
        if source == "local":
            path = Path(v).expanduser()
            if not (path / "config.json").is_file():
                raise ValueError(f"{v!r} is not a model directory (no config.json in {path}); "
                                 "allowed: a folder written by save_pretrained")
        if source == "hub" and not _HUB_ID.match(v):
            raise ValueError(f"{v!r} is not a hub repo id; allowed: 'name' or 'owner/name'")
        return v

    @field_validator("revision")
    @classmethod
    def _hub_only(cls, v, info):
        if v is not None and _source(info) != "hub":
            raise ValueError(f"revision={v!r} applies to model.source: hub only (source is {_source(info)!r})")
        return v


class DataSection(Section):
    """Where the examples come from and how they are cut."""

    source: Literal["builtin", "local", "hub"] = Field(
        "builtin", description="builtin (offline asset), local (csv/json/parquet files) or hub (datasets.load_dataset).")
    name: Optional[str] = Field(None, description="builtin: rotten_tomatoes | kjv; hub: a dataset id; local: unused.")
    config_name: Optional[str] = Field(None, description="hub only: the dataset configuration (e.g. 'sst2' of 'glue').")
    revision: Optional[str] = Field(None, description="hub only: branch, tag or commit.")
    files: Optional[dict[str, str]] = Field(
        None, description="local only: split name -> file (.csv, .json, .jsonl or .parquet; one format for all).")
    text_column: str = Field("text", description="Column holding the text.")
    label_column: str = Field("label", description="sequence-classification: column holding the label (ints or strings).")
    train_split: str = Field("train", description="Split used for training.")
    eval_split: str = Field("validation", description="Split used for evaluation.")
    eval_fraction: Optional[FiniteFloat] = Field(
        None, description="If eval_split does not exist, hold out this fraction of train_split instead (0 < f < 1).")
    max_train_samples: Optional[PositiveInt] = Field(None, description="Use at most this many training rows (seeded shuffle).")
    max_eval_samples: Optional[PositiveInt] = Field(None, description="Use at most this many evaluation rows.")
    max_length: PositiveInt = Field(
        128, description="sequence-classification: tokens per example (truncation); causal-lm: tokens per block.")

    @field_validator("name")
    @classmethod
    def _name_fits_source(cls, v, info):
        source = _source(info)
        if source == "builtin" and v not in BUILTIN_DATA:
            raise ValueError(f"{v!r} is not a built-in dataset; allowed: {_allowed(BUILTIN_DATA)} "
                             "(or set data.source to local or hub)")
        if source == "hub" and (v is None or not _HUB_ID.match(v)):
            raise ValueError(f"{v!r} is not a hub dataset id; allowed: 'name' or 'owner/name'")
        if source == "local" and v is not None:
            raise ValueError(f"name={v!r} is unused with data.source: local; list the files under data.files")
        return v

    @field_validator("config_name", "revision")
    @classmethod
    def _hub_only(cls, v, info):
        if v is not None and _source(info) != "hub":
            raise ValueError(f"{info.field_name}={v!r} applies to data.source: hub only (source is {_source(info)!r})")
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v, info):
        source = _source(info)
        if v is not None and source != "local":
            raise ValueError(f"files apply to data.source: local only (source is {source!r})")
        if v is None:
            return v
        if not v:
            raise ValueError("files={} lists no file; allowed: a mapping split -> path, e.g. {train: train.csv}")
        formats = set()
        for split, path in v.items():
            suffix = Path(path).suffix.lower()
            if suffix not in LOCAL_FORMATS:
                raise ValueError(f"files.{split}={path!r} has an unsupported extension; allowed: {_allowed(LOCAL_FORMATS)}")
            if not Path(path).expanduser().is_file():
                raise ValueError(f"files.{split}={path!r} does not exist (relative paths start at the working directory)")
            formats.add(LOCAL_FORMATS[suffix])
        if len(formats) > 1:
            raise ValueError(f"files mix formats {sorted(formats)}; allowed: one format for every split")
        return v

    @field_validator("eval_fraction")
    @classmethod
    def _fraction(cls, v):
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError(f"eval_fraction={v!r} is invalid: must be in (0, 1)")
        return v

    @model_validator(mode="after")
    def _required_for_source(self) -> "DataSection":
        if self.source == "local" and self.files is None:
            raise ValueError("files is required with source: local; allowed: a mapping split -> path")
        if self.source in ("builtin", "hub") and self.name is None:
            allowed = _allowed(BUILTIN_DATA) if self.source == "builtin" else "a dataset id"
            raise ValueError(f"name is required with source: {self.source}; allowed: {allowed}")
        return self

    @property
    def file_format(self) -> Optional[str]:
        if not self.files:
            return None
        return LOCAL_FORMATS[Path(next(iter(self.files.values()))).suffix.lower()]


class EvaluationSection(Section):
    """What is measured before and after pruning."""

    metrics: Optional[list[str]] = Field(
        None, description="sequence-classification: accuracy, f1; causal-lm: perplexity. The first is the headline metric. "
                          "Default: accuracy / perplexity.")
    dense: Union[bool, Literal["train_begin", "before_pruning"]] = Field(
        "before_pruning", description="When the dense baseline is measured: before_pruning (after the last optimizer "
                                      "step before the first mask update: fine-tuned, still dense), train_begin or true "
                                      "(the model as loaded, before any step), false (not measured).")
    during_training: int = Field(
        4, ge=0, description="Evaluations spread over training, for the plot (0 = none). Ignored when training sets eval_strategy.")

    @field_validator("dense", mode="before")
    @classmethod
    def _dense(cls, v):
        if isinstance(v, bool) or v in DENSE_TIMINGS:
            return v
        raise ValueError(f"dense={v!r} is invalid; allowed: before_pruning, train_begin, true (= train_begin), false")

    @field_validator("metrics")
    @classmethod
    def _non_empty(cls, v):
        if v is not None and not v:
            raise ValueError("metrics=[] names no metric; omit it for the task's default")
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"metrics={v!r} repeats a metric")
        return v


class OutputSection(Section):
    """Where and what is written."""

    dir: Optional[str] = Field(None, description="Output directory; default runs/<recipe file name>. --output-dir overrides it.")
    overwrite: bool = Field(False, description="Allow a directory holding an earlier run: that run's artefacts are removed "
                                               "when this run starts (other files are kept).")
    resume: Union[bool, Literal["auto"]] = Field(
        False, description="Continue an interrupted run in output.dir from its newest complete checkpoint: true (--resume; "
                           "an error when there is none), auto (resume if possible, else start afresh) or false.")
    save_sparse: bool = Field(True, description="Also write the compressed sparse checkpoint to <dir>/sparse/ "
                                                "(skipped with slim: the exported model is not a masked dense one).")
    slim: bool = Field(False, description="Save the compact form the pruning granularities name: removed structured "
                                          "units (ffn_neurons / attention_heads / blocks) are cut out and the config "
                                          "rewritten (a smaller ordinary model that plain from_pretrained loads); "
                                          "low_rank Linears are factorised into two thin Linears, saved with "
                                          "prune_callbacks.export.low_rank.save_low_rank (load_low_rank reads it; densify "
                                          "writes an ordinary checkpoint). report.json gives parameters (and bytes) "
                                          "before and after. Needs a structured or low_rank granularity in pruning.")
    save_tokenizer: bool = Field(True, description="Save the tokenizer beside the model.")
    plot: bool = Field(True, description="Write sparsity.png (sparsity over steps with the metric; per-layer sparsity).")


def _pruning_kind(value) -> str:
    return "many" if isinstance(value, list) else "one"


# tags that pydantic puts into error locations; loading.pydantic_problems drops them
PRUNING_TAGS = ("one", "many")
PruningSection = Annotated[
    Union[Annotated[PruningConfig, Tag("one")], Annotated[list[PruningConfig], Tag("many")]],
    Discriminator(_pruning_kind),
]


class Recipe(Section):
    """A whole fine-tune-while-pruning run."""

    description: Optional[str] = Field(None, description="Free text shown at the top of REPORT.md.")
    task: Literal["sequence-classification", "causal-lm"] = Field(..., description="What the model is trained to do.")
    model: ModelSection
    data: DataSection
    training: dict[str, Any] = Field(
        default_factory=dict, description="transformers.TrainingArguments keywords, passed through (output_dir is output.dir).")
    pruning: PruningSection = Field(
        default_factory=PruningConfig, description="The PruningConfig of the Python API, or a list of them (several "
                                                   "configs in one run, each pruning its own targets).")
    distillation: Optional[DistillationConfig] = Field(
        None, description="Knowledge distillation from a dense teacher (the DistillationConfig of the Python API); null = off.")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    output: OutputSection = Field(default_factory=OutputSection)
    # (recipe file, yaml path -> line) when read by load_recipe: later problems point into the file
    _origin: Optional[tuple] = PrivateAttr(default=None)

    def __eq__(self, other) -> bool:  # the same recipe, wherever it was read from
        return type(other) is type(self) and self.__dict__ == other.__dict__

    __hash__ = None

    @field_validator("pruning")
    @classmethod
    def _some_config(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("pruning=[] lists no config; allowed: a mapping (one PruningConfig) or a non-empty list of them")
        return v

    @property
    def metrics(self) -> list[str]:
        return list(self.evaluation.metrics or METRICS[self.task][:1])

    @property
    def pruning_configs(self) -> list[PruningConfig]:
        """``pruning`` as a list (one entry for the mapping form)."""
        return list(self.pruning) if isinstance(self.pruning, list) else [self.pruning]


SECTIONS: dict[str, type[BaseModel]] = {
    "": Recipe, "model": ModelSection, "data": DataSection, "evaluation": EvaluationSection,
    "output": OutputSection, "pruning": PruningConfig,
    "distillation": DistillationConfig,
}


def cross_check(recipe: Recipe) -> list[tuple[str, str]]:
    """Problems spanning sections, as ``(yaml path, message)`` pairs."""
    problems = []
    task = recipe.task
    if recipe.model.source == "builtin" and BUILTIN_MODELS[recipe.model.name] != task:
        problems.append(("model.name", f"built-in model {recipe.model.name!r} is for task {BUILTIN_MODELS[recipe.model.name]!r}, "
                                       f"not {task!r}; allowed for {task}: "
                                       f"{_allowed(m for m, t in BUILTIN_MODELS.items() if t == task)}"))
    if recipe.data.source == "builtin" and BUILTIN_DATA[recipe.data.name] != task:
        problems.append(("data.name", f"built-in dataset {recipe.data.name!r} is for task {BUILTIN_DATA[recipe.data.name]!r}, "
                                      f"not {task!r}; allowed for {task}: "
                                      f"{_allowed(d for d, t in BUILTIN_DATA.items() if t == task)}"))
    problems += slim_problems(recipe)
    for i, metric in enumerate(recipe.evaluation.metrics or []):
        if metric not in METRICS[task]:
            problems.append((f"evaluation.metrics.{i}", f"unknown metric {metric!r} for task {task}; "
                                                        f"allowed: {_allowed(METRICS[task])}"))
    return problems
