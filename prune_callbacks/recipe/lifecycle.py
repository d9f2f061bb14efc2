"""The output directory's lifecycle: what a run leaves, how the next run treats it.

A ``finetune`` run into ``<out>``:

1. **Starts** by writing the marker ``<out>/.incomplete-run`` (JSON: pid, start time). While it
   exists the directory holds an unfinished run. Trainer checkpoints go to ``<out>/checkpoints/``.
2. **Writes its final artefacts** (model, tokenizer, ``sparse/``, recipe copy, report, plot) into
   the staging folder ``<out>/.staging/`` and then moves them into ``<out>`` with ``os.replace``
   (one rename per entry; ``sparse/`` moves as a whole folder): the weights first, ``config.json``
   after them, ``report.json`` last. A reader never sees a half-written file or model folder.
3. **Finishes** by writing ``<out>/.prune-callbacks-run.json`` (the names this run wrote) and
   removing the marker.

When a run fails (a recipe problem found after the model loaded, a torch error, Ctrl-C, SIGTERM) it
removes its staging folder and an empty ``checkpoints/``; with no checkpoint left, it removes the
marker too, so the directory is as the run found it; the message says which (`RunDirectory.what_is_left`).
When the final save fails (a full disk), the staging folder is kept with what was written, beside
the checkpoints and the marker (`RunDirectory.save_failed`). A killed run (SIGKILL, power loss) cannot
clean up: the next run recognises the marker and treats the directory as *an unfinished run's
leftovers*:

* ``output.resume: true`` (``--resume``) continues from the newest complete ``checkpoint-N``
  (one holding ``trainer_state.json`` and, for pruning runs, ``pruning_state.safetensors``;
  newer, half-written ones are removed);
* ``output.resume: auto`` does that when there is a complete checkpoint, else starts afresh;
* otherwise leftovers without a complete checkpoint are cleaned and the directory is reused (one
  log line says so); leftovers *with* checkpoints are refused (they would be lost) unless
  ``output.overwrite: true`` or ``--resume`` says what to do with them.

``output.overwrite: true`` discards the previous run's artefacts when the new run starts (the
names in its ``.prune-callbacks-run.json``, or the names ``finetune`` writes), so the directory
afterwards holds only this run's artefacts; files that no run wrote are left alone.

`plan_output` only inspects (``validate`` calls it too); `RunDirectory` makes the changes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from prune_callbacks.core.state_io import STATE_FILE  # noqa: F401 (the one name of the pruning state file; used here and re-exported)
from prune_callbacks.recipe.errors import FinalSaveError, RecipeError
from prune_callbacks.recipe.schema import Recipe

logger = logging.getLogger("prune_callbacks.recipe")

MARKER = ".incomplete-run"
MANIFEST = ".prune-callbacks-run.json"
STAGING = ".staging"
CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# what finetune (or save_pretrained / a tokenizer's save_pretrained) may write at the top of <out>,
# for directories written before the manifest existed
KNOWN_ARTEFACTS = (
    "recipe.resolved.yaml", "report.json", "REPORT.md", "sparsity.png", "sparse", CHECKPOINTS, STAGING,
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer*.json",
    "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json", MANIFEST, MARKER,
)
# move order when publishing: weights before the config that makes a folder look loadable; the report last
_PUBLISH_LAST = ("config.json", "recipe.resolved.yaml", "REPORT.md", "report.json")


def _problem(message: str) -> RecipeError:
    return RecipeError([("output.dir", message)], source="output")


def checkpoint_step(path: Path) -> Optional[int]:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def is_complete_checkpoint(path: Path, needs_pruning_state: bool = True) -> bool:
    """``trainer_state.json`` is the Trainer's last write; the pruning state is written after it (on_save)."""
    return (path / TRAINER_STATE).is_file() and (not needs_pruning_state or (path / STATE_FILE).is_file())


def list_checkpoints(out: Path) -> list[Path]:
    """``checkpoint-N`` folders under ``<out>/checkpoints``, oldest first."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in folder.iterdir()]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


@dataclass
class OutputPlan:
    """What the next run does with its output directory (nothing is changed until `RunDirectory.begin`)."""

    out: Path
    state: str  # new | empty | leftovers | finished
    resume_from: Optional[Path] = None
    discard: list[Path] = field(default_factory=list)  # removed at begin
    notes: list[str] = field(default_factory=list)  # log lines for begin


def _leftover_entries(out: Path) -> list[Path]:
    """Entries an unfinished run may leave (marker, staging, checkpoints); a finished run leaves more."""
    return [p for p in out.iterdir() if p.name in (MARKER, STAGING, CHECKPOINTS)]


def previous_artefacts(out: Path) -> list[Path]:
    """What an earlier run wrote into ``out``: its manifest's names, else the names finetune writes."""
    names: set[str] = set()
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            names.update(n for n in json.loads(manifest.read_text(encoding="utf-8")).get("artefacts", [])
                         if isinstance(n, str) and "/" not in n and n not in ("", ".", ".."))
        except (OSError, ValueError, AttributeError):
            pass
    entries = list(out.iterdir())
    return [p for p in entries if p.name in names or any(fnmatch.fnmatch(p.name, pat) for pat in KNOWN_ARTEFACTS)]


def plan_output(recipe: Recipe, needs_pruning_state: bool = True) -> OutputPlan:
    """Inspect ``recipe.output.dir`` and decide; raises RecipeError (field output.dir) when the run must not start."""
    out = Path(recipe.output.dir).expanduser()
    resume, overwrite = recipe.output.resume, recipe.output.overwrite
    if recipe.model.source == "local" and Path(recipe.model.name).expanduser().resolve() == out.resolve():
        raise _problem(f"{str(out)!r} is the model directory the run starts from (model.name); allowed: another "
                       "directory (the run's artefacts would replace the model it loads)")
    if out.exists() and not out.is_dir():
        raise _problem(f"{str(out)!r} exists and is a file; allowed: a new or empty directory "
                       "(or one holding an earlier run, with output.overwrite: true)")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise _problem(f"{str(out)!r} cannot be created: {str(parent)!r} is a file")
            if not os.access(parent, os.W_OK | os.X_OK) and not out.exists():
                raise _problem(f"{str(out)!r} cannot be created: {str(parent)!r} is not writable")
            break
    if not out.exists():
        state = "new"
    elif not any(out.iterdir()):
        state = "empty"
    elif (out / MARKER).exists() or (
            all(p.name in (STAGING, CHECKPOINTS) for p in out.iterdir()) and not list_checkpoints(out)):
        state = "leftovers"
    else:
        state = "finished"
    plan = OutputPlan(out, state)
    checkpoints = list_checkpoints(out) if out.is_dir() else []
    complete = [c for c in checkpoints if is_complete_checkpoint(c, needs_pruning_state)]

    if resume is True and state != "leftovers":
        what = {"new": "does not exist", "empty": "is empty",
                "finished": "holds a finished run (no .incomplete-run marker)"}[state]
        raise _problem(f"output.resume: true, but {str(out)!r} {what}: there is no unfinished run to resume; "
                       "allowed: resume an interrupted run's directory, or run without --resume")
    if resume is True and not complete:
        raise _problem(f"output.resume: true, but the unfinished run in {str(out)!r} left no complete checkpoint "
                       f"(a checkpoint-N/ with {TRAINER_STATE}{' and ' + STATE_FILE if needs_pruning_state else ''}); "
                       "allowed: run without --resume (the leftovers are cleaned and the run starts afresh)")
    if state == "leftovers" and resume in (True, "auto") and complete:
        plan.resume_from = complete[-1]
        plan.discard = [c for c in checkpoints if checkpoint_step(c) > checkpoint_step(complete[-1])]
        plan.discard += [p for p in (out / STAGING,) if p.exists()]
        plan.notes.append(f"resuming the unfinished run in {out} from {plan.resume_from.name}"
                          + (f" (removing half-written {', '.join(p.name for p in plan.discard if p.name != STAGING)})"
                             if any(p.name != STAGING for p in plan.discard) else ""))
        return plan
    if overwrite:
        plan.discard = previous_artefacts(out) if out.is_dir() else []
        if plan.discard:
            plan.notes.append(f"output.overwrite: removing the previous run's {', '.join(p.name for p in plan.discard)} "
                              f"from {out}")
        return plan
    if state == "finished":
        raise _problem(f"{str(out)!r} is not empty; allowed: a new or empty directory, or output.overwrite: true "
                       "(--set output.overwrite=true) to replace the run it holds")
    if state == "leftovers":
        foreign = [p.name for p in out.iterdir() if p not in _leftover_entries(out)]
        if foreign:
            raise _problem(f"{str(out)!r} holds an unfinished run's leftovers and other files ({', '.join(foreign)}); "
                           "allowed: output.overwrite: true, or a new directory")
        if complete:
            raise _problem(f"{str(out)!r} holds an unfinished (interrupted) run with checkpoints (newest "
                           f"{complete[-1].name}); "
                           "allowed: --resume (output.resume: true) to continue it, output.overwrite: true to start "
                           "over, or a new directory")
        plan.discard = _leftover_entries(out)
        plan.notes.append(f"{out} holds only an unfinished run's leftovers ({', '.join(p.name for p in plan.discard)}); "
                          "cleaning them and reusing the directory")
    return plan


def read_marker(out: Path) -> dict:
    """The marker's content (an empty dict when missing or unreadable: a marker only has to exist)."""
    try:
        data = json.loads((out / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# keys that may differ between an interrupted run and its resumption
_RESUME_FREE = ("output.resume", "output.overwrite", "output.dir")


def changed_keys(before: Optional[dict], after: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved recipes (``[]`` when ``before`` is unknown)."""
    if not isinstance(before, dict):
        return []
    out = []
    for key in sorted(set(before) | set(after), key=str):
        path = f"{prefix}{key}"
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, path + ".")
        elif a != b and path not in _RESUME_FREE:
            out.append(path)
    return out


def _save_errors() -> tuple[type, ...]:
    """What a failed write raises: ``OSError`` (ENOSPC, EROFS, ...) and safetensors' own error type."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors comes with transformers
        return (OSError,)
    return (OSError, SafetensorError)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class RunDirectory:
    """Carries out an `OutputPlan`: begin (clean, marker), stage, publish (atomic moves), abort."""

    def __init__(self, plan: OutputPlan):
        self.plan = plan
        self.out = plan.out
        self.published: list[str] = []

    @property
    def checkpoints(self) -> Path:
        return self.out / CHECKPOINTS

    @property
    def staging(self) -> Path:
        return self.out / STAGING

    def begin(self, recipe: Optional[dict] = None) -> "RunDirectory":
        """Clean what the plan discards, write the marker (holding ``recipe``, the run's resolved recipe)."""
        for note in self.plan.notes:
            logger.warning("prune-callbacks: %s", note)
        if self.plan.resume_from is not None and recipe is not None:
            changed = changed_keys(read_marker(self.out).get("recipe"), recipe)
            if changed:
                logger.warning("prune-callbacks: resuming with a recipe that differs from the interrupted run's in "
                               "%s; the checkpoint's state is kept where it exists", ", ".join(changed))
        self.out.mkdir(parents=True, exist_ok=True)
        for path in self.plan.discard:
            _remove(path)
        _remove(self.staging)  # a killed run's staging folder (with its large temporary files)
        self._clean_temporaries()
        marker = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "resumed_from": str(self.plan.resume_from) if self.plan.resume_from else None}
        previous = read_marker(self.out).get("recipe") if self.plan.resume_from is not None else None
        marker["recipe"] = previous or recipe  # a resumed run keeps the recipe it started with
        tmp = self.out / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker) + "\n", encoding="utf-8")
        os.replace(tmp, self.out / MARKER)
        return self

    def _clean_temporaries(self) -> None:
        """Temporary files a killed save leaves inside checkpoints (``*.tmp``, sparse staging folders)."""
        for folder in [self.out, *list_checkpoints(self.out)]:
            for path in folder.glob("*.tmp"):
                _remove(path)
        for path in self.out.glob("sparse/.sparse-tmp-*"):
            _remove(path)

    def stage(self) -> Path:
        """An empty folder to write the final artefacts into (published by `publish`)."""
        _remove(self.staging)
        self.staging.mkdir()
        return self.staging

    def publish(self) -> list[str]:
        """Move every staged entry into ``<out>`` (weights first, report last); mark the run finished."""
        entries = sorted(self.staging.iterdir(), key=lambda p: (p.name in _PUBLISH_LAST,
                                                                 _PUBLISH_LAST.index(p.name) if p.name in _PUBLISH_LAST else 0,
                                                                 p.name))
        for entry in entries:
            target = self.out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
            self.published.append(entry.name)
        self.staging.rmdir()
        if self.checkpoints.is_dir() and not any(self.checkpoints.iterdir()):
            self.checkpoints.rmdir()
        names = sorted(set(self.published) | ({CHECKPOINTS} if self.checkpoints.is_dir() else set()))
        tmp = self.out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"artefacts": names}, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, self.out / MANIFEST)
        (self.out / MARKER).unlink()
        return self.published

    def abort(self) -> str:
        """After a failure: remove what cannot be reused; keep checkpoints (and the marker) for --resume.
        Returns what is left, in words (`what_is_left`)."""
        _remove(self.staging)
        self._clean_temporaries()
        if self.checkpoints.is_dir() and not any(self.checkpoints.iterdir()):
            self.checkpoints.rmdir()
        if not list_checkpoints(self.out):
            _remove(self.out / MARKER)
            if self.out.is_dir() and not any(self.out.iterdir()) and self.plan.state == "new":
                self.out.rmdir()
        return self.what_is_left()

    def what_is_left(self) -> str:
        """What a stopped run leaves and what the next run can do with it (one sentence, true of the directory)."""
        complete = [c for c in list_checkpoints(self.out) if is_complete_checkpoint(c)]
        if complete:
            return (f"the checkpoints in {self.checkpoints} are kept (newest {complete[-1].name}): run the same command "
                    "with --resume to continue from it")
        where = (f"{self.out} was removed (the run had created it)" if not self.out.exists()
                 else f"{self.out} is left as the run found it")
        return f"no checkpoint had been written, so there is nothing to resume: {where}"

    @contextlib.contextmanager
    def final_save(self):
        """``with run_dir.final_save() as staging:`` write the final artefacts; an ``OSError`` or
        ``SafetensorError`` (a full disk) becomes a `FinalSaveError` saying what is kept (`save_failed`)."""
        staging = self.stage()
        try:
            yield staging
        except _save_errors() as exc:
            raise FinalSaveError(self.save_failed(exc)) from None

    def save_failed(self, exc: BaseException) -> str:
        """After the final save failed (a full disk): keep the staging folder and the checkpoints; say where."""
        written = sorted(p.name for p in self.staging.iterdir()) if self.staging.is_dir() else []
        kept = (f"; the files written before it are kept in {self.staging} ({', '.join(written)}; the next run "
                "removes them)" if written else "")
        self._clean_temporaries()
        return f"the final save into {self.staging} failed: {exc}{kept}; {self.what_is_left()}"
