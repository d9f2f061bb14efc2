"""``prune-callbacks``: run, check and inspect pruning recipes.

    prune-callbacks finetune RECIPE.yaml [--output-dir DIR] [--max-steps N] [--resume] [--set dotted.key=value ...]
    prune-callbacks validate RECIPE.yaml [--load] [--output-dir DIR] [--max-steps N] [--resume] [--set ...]
    prune-callbacks report PATH [--json]

Exit status: 0 on success, 2 for an invalid recipe or command line, 1 for
other problems the user can fix (missing asset package, unreadable weights,
missing files, a full disk at the final save), 130 when interrupted (Ctrl-C), 143 when stopped by
SIGTERM (handled as Ctrl-C: cleaned up, the message says what is kept and whether --resume can
continue). Those print one message to stderr, without a
traceback; anything else is a bug and keeps its traceback. What a failed or interrupted
``finetune`` leaves in its output directory, and how the next run treats it, is described in
:mod:`prune_callbacks.recipe.lifecycle`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from typing import Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM, as a shell reports them


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prune-callbacks", description="Prune transformer models while fine-tuning them, from one YAML recipe.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sets = argparse.ArgumentParser(add_help=False)
    sets.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="override one recipe key, e.g. --set pruning.final_sparsity=0.8 "
                           "(the value is read as YAML; repeatable)")

    run = sub.add_parser("finetune", parents=[sets], help="run a recipe: dense eval, prune while fine-tuning, eval, save",
                         description="Evaluate the dense model, fine-tune while pruning, evaluate the pruned model, "
                                     "make the masks permanent and save model, recipe copy, report and plot.")
    run.add_argument("recipe", help="recipe YAML file (see recipes/template.yaml)")
    run.add_argument("--output-dir", help="output directory (same as --set output.dir=DIR)")
    run.add_argument("--max-steps", type=_positive_int, help="optimizer steps (same as --set training.max_steps=N)")
    run.add_argument("--resume", action="store_true",
                     help="continue the interrupted run in the output directory from its newest complete checkpoint "
                          "(same as --set output.resume=true)")

    check = sub.add_parser("validate", parents=[sets], help="check a recipe without running it",
                           description="Check the recipe, the output directory and local / built-in data; with --load "
                                       "also load the model and build the Pruner (no training). finetune runs the "
                                       "same checks first.")
    check.add_argument("recipe", help="recipe YAML file")
    check.add_argument("--load", action="store_true",
                       help="also open hub data, load the model and build the Pruner (checks include/exclude)")
    check.add_argument("--output-dir", help="check this output directory (same as --set output.dir=DIR)")
    check.add_argument("--max-steps", type=_positive_int, help="as for finetune (same as --set training.max_steps=N)")
    check.add_argument("--resume", action="store_true", help="check that the run can resume (as finetune --resume)")

    analyze = sub.add_parser("analyze", parents=[sets], help="measure where the model is redundant and suggest a recipe")
    analyze.add_argument("recipe", help="recipe YAML file (model and data)")
    analyze.add_argument("--output-dir", required=True, help="where analysis.json, ANALYSIS.md, plots, suggested.yaml go")
    analyze.add_argument("--calibration-rows", type=_positive_int, default=256, help="training rows for saliency etc.")
    analyze.add_argument("--eval-rows", type=_positive_int, default=200, help="held-out rows for the metrics")
    analyze.add_argument("--batch-size", type=_positive_int, default=32, help="rows per forward/backward pass")
    analyze.add_argument("--no-fit-head", action="store_true", help="do not fit a classification head first")
    analyze.add_argument("--goal", choices=("auto", "size", "speed"), default="auto",
                         help="what suggested.yaml optimises: auto (structured when it costs nothing measurable), "
                              "size (least one-shot damage), speed (the best structured strategy; runs the latency "
                              "probe)")
    analyze.add_argument("--target-speedup", type=_number, metavar="X",
                         help="goal speed: suggest the slimmed depth + width plan measured at least X times as fast "
                              "as the dense model with the least predicted quality loss (X > 1)")
    analyze.add_argument("--latency-batch", type=_positive_int, metavar="N",
                         help="latency probe batch size (default 32; goal speed only)")
    analyze.add_argument("--latency-seq", type=_positive_int, metavar="N",
                         help="latency probe sequence length (default 128)")
    analyze.add_argument("--latency-threads", type=_positive_int, metavar="N",
                         help="torch threads while timing (default 1)")
    analyze.add_argument("--latency-repeats", type=_positive_int, metavar="N",
                         help="interleaved timing rounds, the median is kept (default 3)")
    analyze.add_argument("--no-latency-probe", action="store_true",
                         help="goal speed without timing slimmed models (the probe takes about 1-2 minutes on "
                              "MiniLM at the defaults)")

    report = sub.add_parser("report", help="print the sparsity of a saved model, weights file or checkpoint")
    report.add_argument("path", help="model directory, weights file, sparse checkpoint or Trainer checkpoint-N/")
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (how schedulers stop a job), raised where the program is, so it is cleaned up as Ctrl-C is."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a run trains, SIGTERM raises `Terminated` (the previous handler is restored afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _finetune(args) -> int:
    from prune_callbacks.recipe.loading import load_recipe
    from prune_callbacks.recipe.workflow import run_recipe

    recipe = load_recipe(args.recipe, _resume_sets(args), output_dir=args.output_dir, max_steps=args.max_steps)
    with _sigterm_as_interrupt():
        result = run_recipe(recipe, recipe_path=args.recipe)
    if result.summary:  # empty on the other ranks of a multi-process launch
        print(result.summary)
    return EXIT_OK


def _resume_sets(args) -> list[str]:
    return [*args.sets, "output.resume=true"] if getattr(args, "resume", False) else list(args.sets)


def _validate(args) -> int:
    from prune_callbacks.recipe.loading import load_recipe
    from prune_callbacks.recipe.preflight import check_recipe
    from prune_callbacks.recipe.summary import describe

    recipe = load_recipe(args.recipe, _resume_sets(args), output_dir=args.output_dir, max_steps=args.max_steps)
    pre = check_recipe(recipe, load_model=args.load)
    plan = pre.plan
    output = {"new": "new directory", "empty": "empty directory", "finished": "replaces the run it holds",
              "leftovers": "reuses an unfinished run's directory"}[plan.state]
    if plan.resume_from is not None:
        output = f"resumes from {plan.resume_from.name}"
    checked = ["recipe", f"output ({output})"]
    if pre.data_checked:
        checked.append(f"data ({len(pre.train_raw)} train / {len(pre.eval_raw)} eval rows)")
    if pre.model is not None:
        checked.append("model and pruning targets")
    print(f"OK {args.recipe}: {describe(recipe)}\nchecked: {', '.join(checked)}"
          + (f"; not checked: {'; '.join(pre.notes)}" if pre.notes else "")
          + "".join(f"\nwarning: {line}" for line in pre.advice))
    return EXIT_OK


def _analyze(args) -> int:
    from prune_callbacks.analysis.latency import latency_options
    from prune_callbacks.analysis.recipe_run import run_analysis

    latency = latency_options(args.goal, probe=not args.no_latency_probe, target_speedup=args.target_speedup,
                              batch=args.latency_batch, seq=args.latency_seq, threads=args.latency_threads,
                              repeats=args.latency_repeats)  # checked before anything is loaded
    out = run_analysis(args.recipe, args.output_dir, args.sets, calibration_rows=args.calibration_rows,
                       eval_rows=args.eval_rows, batch_size=args.batch_size, do_fit_head=not args.no_fit_head,
                       goal=args.goal, latency=latency)
    print(f"wrote {out}/analysis.json, ANALYSIS.md, suggested.yaml and plots")
    return EXIT_OK


def _report(args) -> int:
    from prune_callbacks.recipe.tables import format_table, group_rows, human_bytes
    from prune_callbacks.recipe.weights import load_weights, pruning_state_summary
    from prune_callbacks.core.report import sparsity_of_tensors

    loaded = load_weights(args.path)
    table = sparsity_of_tensors(loaded.tensors)
    state = pruning_state_summary(loaded.pruning_state)
    if args.json:
        out = {"path": str(args.path), "kind": loaded.kind, "files": [str(f) for f in loaded.files],
               "bytes_on_disk": loaded.bytes_on_disk, **table, "groups": group_rows(table["per_tensor"]),
               "pruning_state": state, **loaded.extra}
        print(json.dumps(out, indent=2))
        return EXIT_OK
    files = f"{len(loaded.files)} file{'s' if len(loaded.files) != 1 else ''}"
    print(format_table(table, header=f"{args.path}: {loaded.kind}, {files}, {human_bytes(loaded.bytes_on_disk)}\n"))
    if "global_step" in loaded.extra:
        print(f"trainer checkpoint:  global step {loaded.extra['global_step']}")
    if state:
        print(f"pruning state:      step {state['step']}, masks at {state['mask_sparsity']:.1%} sparsity "
              f"(target {state['final_sparsity']:.1%}), {state['mask_updates']} mask updates, "
              f"{state['targets']} targets{', finalized' if state['finalized'] else ''}")
    return EXIT_OK


def _user_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(errors meaning 'fix the recipe / command line', errors meaning 'fix the environment or files')."""
    from prune_callbacks.assets import AssetNotInstalledError
    from prune_callbacks.core.config import PruningConfigError
    from prune_callbacks.recipe.errors import FinalSaveError, RecipeError
    from prune_callbacks.recipe.weights import WeightsError
    from prune_callbacks.engine.state import PruningStateError

    # OSError: missing / unreadable files, a full disk, a read-only output directory
    environment: tuple[type, ...] = (AssetNotInstalledError, WeightsError, PruningStateError, FinalSaveError, OSError)
    try:
        from prune_callbacks.export.sparse_io import SparseCheckpointError

        environment += (SparseCheckpointError,)
    except ImportError:
        pass
    from prune_callbacks.analysis.errors import AnalysisError

    return (RecipeError, PruningConfigError, AnalysisError), environment


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"finetune": _finetune, "validate": _validate, "report": _report,
               "analyze": _analyze}[args.command]
    recipe_errors, environment_errors = _user_errors()
    try:
        return handler(args)
    except recipe_errors as exc:
        what = "invalid recipe" if args.command != "report" else "error"
        print(f"prune-callbacks {args.command}: {what}:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    except environment_errors as exc:
        print(f"prune-callbacks {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM during finetune
        terminated = isinstance(exc, Terminated)
        left = getattr(exc, "left", None)  # what the run directory holds now (finetune, once it started writing)
        if left is None and args.command == "finetune":
            left = "nothing was written"
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"prune-callbacks {args.command}: {what}" + (f": {left}" if left else ""), file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
