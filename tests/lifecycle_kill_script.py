"""Run ``prune-callbacks finetune RECIPE [args]`` and SIGKILL this process at a chosen moment (used by
test_lifecycle.py; nothing can clean up after SIGKILL, so what is left is what a real kill leaves).

    python lifecycle_kill_script.py MODE RECIPE [finetune args...]

MODE: ``train:K``       killed inside optimizer step K (after the checkpoints before it were saved);
      ``checkpoint:K``  killed while checkpoint-K is written (weights there, trainer_state.json not yet);
      ``final-save``    killed while the final sparse checkpoint is written (its large temporary file is
                        complete, not yet moved into place);
      ``sigterm:K``     sent SIGTERM inside optimizer step K, as a scheduler stops a job (the CLI cleans up
                        and exits 143).
"""

from __future__ import annotations

import os
import signal
import sys


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    mode, argv = sys.argv[1], sys.argv[2:]
    import transformers

    if mode.startswith("sigterm:"):
        step = int(mode.split(":")[1])
        original = transformers.Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step + 1 >= step:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(self, *args, **kwargs)

        transformers.Trainer.training_step = training_step
    elif mode.startswith("train:"):
        step = int(mode.split(":")[1])
        original = transformers.Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step + 1 >= step:
                _kill()
            return original(self, *args, **kwargs)

        transformers.Trainer.training_step = training_step
    elif mode.startswith("checkpoint:"):
        step = int(mode.split(":")[1])
        from transformers.trainer_callback import TrainerState

        original = TrainerState.save_to_json

        def save_to_json(self, path):
            if self.global_step >= step and os.path.basename(os.path.dirname(path)).startswith("checkpoint-"):
                _kill()
            return original(self, path)

        TrainerState.save_to_json = save_to_json
    elif mode == "final-save":
        import prune_callbacks.export.sparse_io.checkpoint as checkpoint

        real_replace = os.replace

        class _Os:  # the module's own view of os: kill on the move of the staged sparse weights
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                if ".sparse-tmp-" in str(src):
                    _kill()
                return real_replace(src, dst)

        checkpoint.os = _Os()
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    from prune_callbacks.cli import main as cli

    sys.exit(cli(["finetune", *argv]))


if __name__ == "__main__":
    main()
