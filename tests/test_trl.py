"""`make_callbacks` works unchanged with TRL's `SFTTrainer` (issue 16): the same log keys as with `Trainer`,
exact final sparsity, packing and gradient checkpointing, exact checkpoint resume, LoRA refused."""

import pytest
import torch

pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from helpers import needs_native_attention_kernels, tiny_llama_lm  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, TrainerCallback  # noqa: E402

from prune_callbacks import PruningConfig  # noqa: E402
from prune_callbacks.core.figures import GLOBAL, is_figure_key, sparsity_figures  # noqa: E402
from prune_callbacks.integrations.trainer import make_callbacks  # noqa: E402
from prune_callbacks.core.state_io import STATE_FILE, load_state_file  # noqa: E402

CONFIG = PruningConfig(final_sparsity=0.5, start_step=1, end_step=6, update_every=1)
WORDS = [f"w{i}" for i in range(90)]  # + 3 special tokens: 93 ids < the tiny Llama's 97


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_texts(n: int = 64, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 20, (n,), generator=g).tolist()
    texts = [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (k,), generator=g).tolist()) for k in lengths]
    return Dataset.from_dict({"text": texts})


def sft_trainer(out, callbacks, *, model=None, **overrides):
    kwargs = dict(output_dir=str(out), use_cpu=True, report_to=[], max_steps=8, per_device_train_batch_size=4,
                  logging_steps=2, save_strategy="no", disable_tqdm=True, seed=0, max_length=32, learning_rate=1e-3,
                  activation_checkpointing=False)  # `gradient_checkpointing` is deprecated (removed in v6)
    kwargs.update(overrides)
    return trl.SFTTrainer(model=model if model is not None else tiny_llama_lm(), args=trl.SFTConfig(**kwargs),
                          train_dataset=tiny_texts(), processing_class=tiny_tokenizer(), callbacks=callbacks)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.parametrize("packing,checkpointing", [
    (False, False), pytest.param(True, True, marks=needs_native_attention_kernels)], ids=["plain", "packing+grad-ckpt"])
def test_sft_trainer_logs_the_schema_and_finalizes_exactly(tmp_path, packing, checkpointing):
    cbs = make_callbacks(CONFIG)
    trainer = sft_trainer(tmp_path, cbs, packing=packing, activation_checkpointing=checkpointing)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]  # the step logs, not the final summary
    assert len(logged) == 4 and all(GLOBAL in h for h in logged)  # logging_steps=2 over 8 steps
    expected_keys = set(sparsity_figures(cbs.pruner.report()))  # the one schema, as Trainer logs it
    assert {k for k in logged[-1] if is_figure_key(k)} == expected_keys
    sparsities = [h[GLOBAL] for h in logged]
    assert sparsities == sorted(sparsities) and 0 < sparsities[0] < 0.5 and sparsities[-1] == pytest.approx(0.5)
    pruner = cbs.pruner
    zeros = sum(int((t.param == 0).sum()) for t in pruner.targets)
    total = sum(t.numel for t in pruner.targets)
    assert zeros == sum(int(m.sum()) for m in pruner.pruned) == round(0.5 * total)  # exact after finalize
    for t, m in zip(pruner.targets, pruner.pruned):
        assert torch.all(t.param[m] == 0)


def test_sft_trainer_resume_gives_the_masks_of_an_uninterrupted_run(tmp_path):
    ckpt_args = dict(save_strategy="steps", save_steps=4)
    full_cbs = make_callbacks(CONFIG)
    full = sft_trainer(tmp_path / "full", full_cbs, **ckpt_args)
    full.train()

    first = sft_trainer(tmp_path / "cut", [*make_callbacks(CONFIG), StopAt(4)], **ckpt_args)
    first.train()
    ckpt = tmp_path / "cut" / "checkpoint-4"
    saved = load_state_file(ckpt / STATE_FILE)
    assert saved["step"] == 4 and 0 < saved["mask_sparsity"] < 0.5

    resumed_cbs = make_callbacks(CONFIG)
    resumed = sft_trainer(tmp_path / "cut", resumed_cbs, **ckpt_args)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed_cbs.engine.resumed_from == str(ckpt / STATE_FILE)
    a, b = full_cbs.pruner, resumed_cbs.pruner
    assert (b.step, b.mask_updates, b.mask_sparsity) == (a.step, a.mask_updates, a.mask_sparsity) == (8, 6, 0.5)
    for ma, mb in zip(a.pruned, b.pruned):
        assert torch.equal(ma, mb)
    sa, sb = full.model.state_dict(), resumed.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_sft_trainer_with_a_lora_peft_config_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from prune_callbacks.core.config import PruningConfigError

    trainer = trl.SFTTrainer(model=tiny_llama_lm(), args=trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True,
                             report_to=[], max_steps=2, max_length=32, disable_tqdm=True),
                             train_dataset=tiny_texts(16), processing_class=tiny_tokenizer(),
                             peft_config=peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                             callbacks=make_callbacks(CONFIG))
    with pytest.raises(PruningConfigError, match=r"cannot prune a PeftModel.*merge_and_unload\(\)"):
        trainer.train()
