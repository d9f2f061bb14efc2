"""The documentation cannot drift from the code.

* every ```python block of README.md and docs/ runs (on tiny models, in a temporary directory); a block is set up by
  the comment ``<!-- docs-test: setup=NAME -->`` on the line before it (the preludes below define ``model``,
  ``optimizer``, ``loader``, ``trainer`` inputs, ... where the text uses a real model; ``fsdp2_one_process`` runs a
  torchrun script as a world of one gloo process) or skipped by
  ``<!-- docs-test: skip -->``; the blocks of one page share one namespace, in order;
* every command of a ```bash block that names ``prune-callbacks`` is parsed by the real command line (options and
  subcommands exist), recipes and scripts it names exist, and the ``--options`` given to a repository script
  appear in that script;
* the generated pages (``scripts/gen_docs.py``) equal a fresh generation;
* every exception class of the package is explained in docs/troubleshooting.md;
* ``mkdocs build --strict`` passes (skipped when the ``docs`` extra is not installed).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _pages() -> list[Path]:
    """README.md and every page under docs/ (a symlinked page counts once, by its real file)."""
    seen, pages = set(), []
    for path in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        real = path.resolve()
        if "results" in path.relative_to(ROOT).parts or real in seen or not real.is_file():
            continue
        seen.add(real)
        pages.append(path)
    return pages


_FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)
_DIRECTIVE = re.compile(r"<!--\s*docs-test:\s*(?P<what>[^>]*?)\s*-->\s*$")


def code_blocks(text: str, lang: str) -> list[tuple[int, str, str]]:
    """(line number, directive, code) of every fenced block in ``lang``; the directive is the comment on the line
    before the fence ('' if none)."""
    out = []
    for match in _FENCE.finditer(text):
        if match.group("lang") != lang:
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        directive = _DIRECTIVE.search(before)
        body = "\n".join(l[len(match.group("indent")):] for l in match.group("body").splitlines())
        out.append((line, directive.group("what") if directive else "", body))
    return out


# ------------------------------------------------------------------ preludes: what the text assumes exists


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(30)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def _lm_rows(n: int, seq: int = 8, vocab: int = 97) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def prelude_torch_loop(ns: dict) -> None:
    from helpers import tiny_llama_lm

    model = tiny_llama_lm()
    rows = _lm_rows(16)
    loader = [{k: torch.stack([r[k] for r in rows[i:i + 2]]) for k in rows[0]} for i in range(0, 16, 2)]
    ns.update(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), loader=loader,
              tokenizer=_tokenizer())


def prelude_fsdp2_one_process(ns: dict):
    """What ``torchrun`` would set, for a world of one process (gloo on CPU): the page's FSDP2 script runs as written,
    every collective with one rank. ``name`` is a saved tiny Llama. Returns the cleanup (environment, process group)."""
    import socket

    import torch.distributed as dist
    from helpers import tiny_llama_lm

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    tiny_llama_lm().save_pretrained("tiny-llama")
    rows = _lm_rows(8)
    loader = [{k: torch.stack([r[k] for r in rows[i:i + 2]]) for k in rows[0]} for i in range(0, 8, 2)]
    ns.update(name="tiny-llama", loader=loader)

    def cleanup():
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    return cleanup


def prelude_trainer(ns: dict) -> None:
    from helpers import tiny_bert_classifier, toy_classification_rows
    from transformers import Trainer, TrainingArguments

    from prune_callbacks import PruningConfig, make_callbacks

    model = tiny_bert_classifier()
    tiny_bert_classifier(seed=1).save_pretrained("out-dense")   # a "fine-tuned dense teacher" for distillation
    rows = toy_classification_rows(32)
    args = TrainingArguments(output_dir="trainer-out", max_steps=8, per_device_train_batch_size=8,
                             per_device_eval_batch_size=16, learning_rate=1e-3, report_to=[], save_strategy="no",
                             logging_steps=4, use_cpu=True, disable_tqdm=True)

    def compute_metrics(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    ns.update(model=model, args=args, ds=rows, train=rows, eval_ds=rows[:16], val=rows[:16], Trainer=Trainer,
              TrainingArguments=TrainingArguments, compute_metrics=compute_metrics, PruningConfig=PruningConfig,
              make_callbacks=make_callbacks)


def prelude_accelerate(ns: dict) -> None:
    from accelerate import Accelerator
    from helpers import reset_accelerate_state, tiny_llama_lm

    reset_accelerate_state()
    model = tiny_llama_lm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ns.update(accelerator=Accelerator(cpu=True), model=model, optimizer=optimizer,
              loader=torch.utils.data.DataLoader(_lm_rows(16), batch_size=4),
              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), num_epochs=2)


def prelude_structured(ns: dict) -> None:
    from helpers import tiny_llama_lm

    model = tiny_llama_lm(num_hidden_layers=6)
    rows = _lm_rows(8)

    def train(model, optimizer, n_steps):
        for step in range(n_steps):
            batch = rows[step % len(rows)]
            model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    ns.update(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), n_steps=10, steps=10,
              train=train, out="slim-out", tokenizer=_tokenizer())


def prelude_sparse(ns: dict) -> None:
    from helpers import tiny_bert_classifier

    model = tiny_bert_classifier()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "encoder" in name and name.endswith("weight") and param.dim() == 2:
                param.mul_(torch.rand_like(param) > 0.9)
    ns.update(model=model, tok=_tokenizer())


def prelude_analysis(ns: dict) -> None:
    from helpers import tiny_bert_classifier, toy_classification_rows

    rows = toy_classification_rows(32)

    def batches(part):
        return [{k: torch.tensor([r[k] for r in part[i:i + 8]]) for k in part[0]} for i in range(0, len(part), 8)]

    ns.update(model=tiny_bert_classifier(), calib_batches=batches(rows[:16]), eval_batches=batches(rows[16:]))


PRELUDES = {name[len("prelude_"):]: fn for name, fn in globals().items() if name.startswith("prelude_")}


# ------------------------------------------------------------------ python blocks


def _registries():
    from prune_callbacks.core.registry import GRANULARITIES, SALIENCIES, SCHEDULES

    return (SALIENCIES, SCHEDULES, GRANULARITIES)


@pytest.fixture
def restore_registries():
    """A page may register its own parts: forget them afterwards (they would leak into other tests)."""
    saved = [(r, dict(r._items), list(r._patterns)) for r in _registries()]
    yield
    for registry, items, patterns in saved:
        registry._items, registry._patterns = items, patterns


PY_PAGES = [p for p in _pages() if code_blocks(p.read_text(encoding="utf-8"), "python")]


@pytest.mark.parametrize("page", PY_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, tmp_path, monkeypatch, restore_registries, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_DISABLED", "true")
    torch.manual_seed(0)
    ns: dict = {"__name__": "__docs__"}
    cleanups = []  # a prelude may return a callable that undoes what it set up (environment, process group)
    try:
        for line, directive, code in code_blocks(page.read_text(encoding="utf-8"), "python"):
            if directive == "skip":
                continue
            if directive.startswith("setup="):
                name = directive.split("=", 1)[1]
                assert name in PRELUDES, f"{page.name}:{line}: unknown setup {name!r}; known: {sorted(PRELUDES)}"
                cleanup = PRELUDES[name](ns)
                if callable(cleanup):
                    cleanups.append(cleanup)
            else:
                assert not directive, f"{page.name}:{line}: unknown docs-test directive {directive!r}"
            try:
                exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), ns)
            except Exception as exc:
                pytest.fail(f"{page.relative_to(ROOT)}, the block at line {line} fails: {type(exc).__name__}: {exc}")
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
        if "accelerator" in ns:
            from helpers import reset_accelerate_state

            reset_accelerate_state()


# ------------------------------------------------------------------ bash blocks

def _commands(code: str) -> list[str]:
    """Logical command lines of a bash block: continuations joined, comments dropped, ``$VAR`` expanded."""
    variables: dict[str, str] = {}
    lines, current = [], ""
    for raw in code.splitlines():
        current += raw.rstrip("\\").rstrip() + " " if raw.rstrip().endswith("\\") else raw
        if raw.rstrip().endswith("\\"):
            continue
        lines.append(current)
        current = ""
    out = []
    for line in lines:
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        if len(tokens) == 1 and re.match(r"^\w+=", tokens[0]):
            name, value = tokens[0].split("=", 1)
            variables[name] = value
            continue
        text = " ".join(shlex.quote(t) if not t.startswith("$") else t for t in tokens)
        for name, value in variables.items():
            text = text.replace(f"${name}", value)
        out.append(text)
    return out


def _strip_prefixes(tokens: list[str]) -> list[str]:
    while tokens:
        head = tokens[0]
        if re.match(r"^\w+=", head):
            tokens = tokens[1:]
        elif head in ("nice",):
            tokens = tokens[3:] if len(tokens) > 2 and tokens[1] == "-n" else tokens[1:]
        elif head in ("/usr/bin/time",):
            tokens = tokens[2:] if len(tokens) > 1 and tokens[1] == "-v" else tokens[1:]
        elif head in ("time", "exec"):
            tokens = tokens[1:]
        else:
            return tokens
    return tokens


def _check_cli(args: list[str], where: str) -> None:
    """The command parses; a shipped recipe it names exists and, with the command's ``--set`` / ``--output-dir`` /
    ``--max-steps`` / ``--resume``, passes the recipe schema (what ``validate`` checks before touching data)."""
    from prune_callbacks.cli import _parser
    from prune_callbacks.recipe import RecipeError, load_recipe

    try:
        parsed = _parser().parse_args(args)
    except SystemExit as exc:
        if exc.code != 0:  # --help exits 0
            pytest.fail(f"{where}: `prune-callbacks {' '.join(args)}` does not parse")
        return
    recipe = getattr(parsed, "recipe", None)
    if recipe is None or not recipe.startswith("recipes/"):
        return
    assert (ROOT / recipe).is_file(), f"{where}: {recipe} does not exist"
    sets = [*parsed.sets, *(["output.resume=true"] if getattr(parsed, "resume", False) else [])]
    try:
        load_recipe(ROOT / recipe, sets, output_dir=parsed.output_dir, max_steps=getattr(parsed, "max_steps", None))
    except RecipeError as exc:
        pytest.fail(f"{where}: `prune-callbacks {' '.join(args)}` is refused:\n{exc}")


def _check_script(script: str, args: list[str], where: str) -> None:
    path = ROOT / script
    assert path.is_file(), f"{where}: {script} does not exist"
    texts = path.read_text(encoding="utf-8")
    common = path.parent / "common.py"
    if common.is_file():
        texts += common.read_text(encoding="utf-8")
    for arg in args:
        if arg.startswith("--"):
            option = arg.split("=", 1)[0]
            assert f'"{option}"' in texts or f"'{option}'" in texts, \
                f"{where}: {script} has no option {option}"


_SEPARATORS = {"&&", "||", ";", "|", "&"}


def check_command(command: str, where: str) -> None:
    segments: list[list[str]] = [[]]
    for token in shlex.split(command):
        if token in _SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    for segment in segments:
        _check_segment(segment, where)


def _check_segment(tokens: list[str], where: str) -> None:
    tokens = _strip_prefixes(tokens)
    if not tokens:
        return
    head, rest = tokens[0], tokens[1:]
    if head.endswith("prune-callbacks"):
        _check_cli(rest, where)
    elif head in ("python", "python3") or head.endswith("/python"):
        if rest and rest[0].endswith(".py") and not rest[0].startswith("/"):
            if not rest[0].startswith(("outputs/", "/tmp")):
                _check_script(rest[0], rest[1:], where)
    elif head in ("bash", "sh") and rest and rest[0].endswith(".sh"):
        _check_segment(rest, where)
    elif head.endswith(".sh"):
        script = head[2:] if head.startswith("./") else head
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
        if script == "scripts/quickstart.sh":  # extra arguments go to `prune-callbacks finetune`
            _check_cli(["finetune", "recipes/quickstart.yaml", "--output-dir", "outputs/quickstart",
                        "--set", "output.overwrite=true", *rest], where)


BASH_PAGES = [p for p in _pages() if code_blocks(p.read_text(encoding="utf-8"), "bash")]


@pytest.mark.parametrize("page", BASH_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_commands_exist(page):
    checked = 0
    for line, directive, code in code_blocks(page.read_text(encoding="utf-8"), "bash"):
        if directive == "skip":
            continue
        for command in _commands(code):
            check_command(command, f"{page.relative_to(ROOT)}:{line}")
            checked += 1
    assert checked


def test_the_checker_catches_a_wrong_command():
    with pytest.raises(pytest.fail.Exception):
        check_command("prune-callbacks finetune recipes/quickstart.yaml --no-such-option", "here")
    with pytest.raises(AssertionError):
        check_command("prune-callbacks validate recipes/no-such-recipe.yaml", "here")
    with pytest.raises(pytest.fail.Exception):
        check_command("prune-callbacks finetune recipes/quickstart.yaml --set pruning.no_such_field=1", "here")
    with pytest.raises(AssertionError):
        check_command("python benchmarks/quality.py --no-such-option 1", "here")
    with pytest.raises(pytest.fail.Exception):
        check_command("true && prune-callbacks report out --no-such-option", "here")
    check_command("./scripts/quickstart.sh --max-steps 20", "here")


def test_the_runner_finds_directives():
    text = "<!-- docs-test: setup=trainer -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert [(d, c) for _, d, c in code_blocks(text, "python")] == [("setup=trainer", "x = 1"), ("", "y = 2")]


# ------------------------------------------------------------------ generated pages, errors, site


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_fresh(restore_registries):
    gen = _gen_docs()
    for path, build in gen.PAGES.items():
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing: run python scripts/gen_docs.py"
        assert path.read_text(encoding="utf-8") == build(), \
            f"{path.relative_to(ROOT)} is stale: run python scripts/gen_docs.py and commit the result"


def test_configuration_reference_lists_every_field():
    gen = _gen_docs()
    text = (DOCS / "reference" / "configuration.md").read_text(encoding="utf-8")
    from prune_callbacks import PruningConfig

    models = gen._config_models()
    assert PruningConfig in models
    for model in models:
        assert f"## {model.__name__}" in text
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{model.__name__}.{name} is not in the configuration reference"


def _package_errors() -> list[type]:
    import prune_callbacks

    found = {}
    for info in pkgutil.walk_packages(prune_callbacks.__path__, "prune_callbacks."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == module.__name__
                    and not name.startswith("_")):
                found[name] = obj
    return list(found.values())


def test_troubleshooting_explains_every_error_class():
    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    errors = _package_errors()
    assert len(errors) >= 10
    missing = [e.__name__ for e in errors if f"`{e.__name__}`" not in text]
    assert not missing, f"docs/troubleshooting.md does not explain {missing}"


def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: install the docs extra (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()
