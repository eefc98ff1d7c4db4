"""The fast execution of a training step is the recipe's math (pipeline/machine/step_plan.py), on real
guanaco rows (varied lengths, where padding and the loss normalisation matter most), the real
Llama-2 tokenizer and the stage's own trainer (`pipeline.stages.train.build_trainer`):

- a padding-free batch (flattened, position ids, no attention mask) gives the padded batch's loss on
  every token and its LoRA gradients, with PyTorch SDPA and eager attention: transformers builds the
  block-diagonal mask from the position ids; trl's chunked LM-head loss (the GPU path) and the model's
  own (the CPU path, `train.fused_lm_head`) agree. Control: the same flattened batch with one run of
  position ids (the mechanism removed) lets sequences see each other, and the losses move far past
  the tolerance;
- 16 x 1, 4 x 4 and 1 x 16 (micro-batch x accumulation) give the same adapter after 3 optimizer
  steps, through either loss: each sums over the accumulation window's answer tokens and divides by
  transformers' `num_items_in_batch`. Control: 1 x 16 with that normalisation removed (the Trainer's
  per-micro-batch mean, `model_accepts_loss_kwargs=False`) lands far from 16 x 1.

Tolerances are float32 on a CPU, where the only difference is summation order. Measured (AMD EPYC,
2 cores): per-token losses 1.9e-6 nats apart, gradients 3.4e-7 relative, adapters 2.2e-5 (4 x 4) and
4.2e-5 (1 x 16) of the update's norm; the controls: 0.80 nats, and 0.25 of the update's norm."""

from __future__ import annotations

import pytest
from conftest import GUANACO_QUESTIONS, LLAMA2_TOKENIZER, ROOT, need, run_pipeline

torch = pytest.importorskip("torch")

LOSS_TOLERANCE = 1e-4  # max |per-token loss difference|, nats
RELATIVE_TOLERANCE = 1e-3  # ||a - b|| / ||b|| (gradients), ||a - b|| / ||b - init|| (adapters)
STEPS = 2  # optimizer steps: the second starts from the state the first window left


def compose(run_dir, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(
            "config",
            overrides=[
                "experiment=guanaco_tiny",
                f"run_dir={run_dir}",
                "train.batch_size=16",
                f"train.sft.max_steps={STEPS}",
                "train.sft.save_strategy=no",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def guanaco(tmp_path_factory):
    """The guanaco_tiny data stage's rows, its base (real Llama-2 vocabulary), the encoded examples."""
    from pipeline.chat.examples import encode_rows
    from pipeline.chat.rows import read_jsonl
    from pipeline.chat.tokenizer import build_tokenizer
    from pipeline.stages.train import prepare_base

    need(GUANACO_QUESTIONS), need(LLAMA2_TOKENIZER)
    run_dir = tmp_path_factory.mktemp("step-math")
    run_pipeline("stage=data", "experiment=guanaco_tiny", f"run_dir={run_dir}")
    cfg = compose(run_dir)
    rows = read_jsonl(run_dir / "data" / "train.jsonl")
    base, sp_model = prepare_base(cfg, run_dir / "base", rows)
    tokenizer = build_tokenizer(sp_model)
    examples, _ = encode_rows(rows, tokenizer, cfg.train.max_length)
    return run_dir, base, tokenizer, examples


def trainer_for(guanaco, *overrides: str):
    from transformers import set_seed

    from pipeline.stages.train import build_trainer, execution_plan

    run_dir, base, tokenizer, examples = guanaco
    cfg = compose(run_dir, *overrides)
    plan = execution_plan(cfg, base, ranks=1)
    set_seed(0)  # the LoRA init, as in a fresh process
    trainer = build_trainer(cfg, plan, base, tokenizer, examples, run_dir / "checkpoints", callbacks=[])
    return trainer, plan


def lora_weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def relative(a: dict, b: dict, reference: dict) -> float:
    num = sum(float((a[n] - b[n]).double().norm() ** 2) for n in a) ** 0.5
    den = sum(float(reference[n].double().norm() ** 2) for n in a) ** 0.5
    return num / den


# ---------------------------------------------------------------- padding-free == padded


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_padding_free_batch_has_the_padded_loss_and_gradients(guanaco, attention):
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from pipeline.chat.examples import IGNORE_INDEX

    _, _, tokenizer, examples = guanaco
    trainer, plan = trainer_for(guanaco, "train.micro_batch_size=4", f"train.attn_implementation={attention}")
    assert plan["padding_free"] and plan["attn_implementation"] == attention
    assert not plan["fused_lm_head"]  # on a CPU the stage's loss is the model's own
    model = trainer.model
    model.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 at init would leave lora_A without gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    # Four rows of very different lengths: the padded batch is mostly padding.
    by_length = sorted(examples, key=lambda e: len(e["input_ids"]))
    picked = [by_length[i] for i in (0, len(by_length) // 3, 2 * len(by_length) // 3, -1)]
    lengths = [len(e["input_ids"]) for e in picked]
    assert max(lengths) > 3 * min(lengths), lengths

    free = trainer.data_collator(picked)  # the stage's collator: trl's padding-free one
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(picked)
    assert "attention_mask" not in free and free["input_ids"].shape == (1, sum(lengths))
    assert int(padded["attention_mask"].sum()) == sum(lengths) < padded["input_ids"].numel()

    def loss_and_grads(batch, compute_loss=trainer.compute_loss):
        model.zero_grad(set_to_none=True)
        items = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())  # as the Trainer counts them
        loss = compute_loss(model, dict(batch), num_items_in_batch=items)  # what training runs
        loss.backward()
        # The per-token losses of the fused LM head trl's loss sums (with grad: bitsandbytes' CPU
        # inference kernel, taken on a no-grad forward, has no backward).
        out = model(**batch, use_cache=False, fused_lm_head=True)
        per_token = -out.log_probs[out.label_mask.bool()].detach()  # row by row, in token order
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return float(loss), per_token, grads

    loss_free, tokens_free, grads_free = loss_and_grads(free)
    loss_padded, tokens_padded, grads_padded = loss_and_grads(padded)
    assert tokens_free.shape == tokens_padded.shape and tokens_free.numel() > 100
    assert float((tokens_free - tokens_padded).abs().max()) < LOSS_TOLERANCE
    assert abs(loss_free - loss_padded) < LOSS_TOLERANCE
    assert all(g.abs().sum() > 0 for g in grads_padded.values())
    assert relative(grads_free, grads_padded, grads_padded) < RELATIVE_TOLERANCE
    # trl's chunked LM-head loss (the GPU path) on the same batches: the same loss and gradients.
    for batch, loss, grads in ((free, loss_free, grads_free), (padded, loss_padded, grads_padded)):
        trl_loss, _, trl_grads = loss_and_grads(
            batch, lambda *a, **k: SFTTrainer.compute_loss(trainer, *a, **k)
        )
        assert abs(trl_loss - loss) < LOSS_TOLERANCE
        assert relative(trl_grads, grads, grads) < RELATIVE_TOLERANCE

    # Control: one run of position ids over the flattened rows: no boundaries to build the mask from.
    broken = {**free, "position_ids": torch.arange(free["input_ids"].shape[1])[None]}
    _, tokens_broken, _ = loss_and_grads(broken)
    assert float((tokens_broken - tokens_padded).abs().max()) > 100 * LOSS_TOLERANCE


# ---------------------------------------------------------------- 16 x 1 == 4 x 4 == 1 x 16


@pytest.mark.slow
@pytest.mark.parametrize("fused_lm_head", ["false", "true"])
def test_the_split_of_a_step_does_not_change_the_adapter(guanaco, fused_lm_head):
    loss = f"train.fused_lm_head={fused_lm_head}"
    adapters, inits = {}, {}
    for micro in (16, 4, 1):
        trainer, plan = trainer_for(guanaco, f"train.micro_batch_size={micro}", loss)
        assert plan["fused_lm_head"] is (fused_lm_head == "true")
        assert (plan["micro_batch_size"], plan["gradient_accumulation_steps"]) == (micro, 16 // micro)
        inits[micro] = lora_weights(trainer.model)
        trainer.train()
        assert trainer.state.global_step == STEPS
        adapters[micro] = lora_weights(trainer.model)
    update = {n: adapters[16][n] - inits[16][n] for n in inits[16]}
    for micro in (4, 1):
        assert relative(inits[micro], inits[16], inits[16]) == 0  # the same start
        assert relative(adapters[micro], adapters[16], update) < RELATIVE_TOLERANCE, micro

    # Control: 1 x 16 with each micro-batch's mean loss averaged over the window (the normalisation
    # over the window's tokens removed) trains another adapter.
    trainer, _ = trainer_for(guanaco, "train.micro_batch_size=1", loss)
    trainer.model_accepts_loss_kwargs = False  # the Trainer then passes no num_items_in_batch
    trainer.train()
    assert relative(lora_weights(trainer.model), adapters[16], update) > 10 * RELATIVE_TOLERANCE
