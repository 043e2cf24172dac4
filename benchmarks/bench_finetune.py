"""Post-training throughput (issue 18): our fine-tuning step vs PEFT, Hugging Face and TRL on the same weights.

Both sides start from the same model: a Mixtral-shaped preset saved with ``ds.save`` and exported with
``ds convert --to-hf`` (:func:`deepseek.models.hf.convert_to_hf`); the anchors load that folder with
``transformers.MixtralForCausalLM.from_pretrained``. Data: SFT chats and preference pairs that
``ds finetune prepare-examples`` builds from a few standard-library modules (``--module``), tokenized by a BPE
trained here on those chats (role tokens, the serving chat template); the same token ids go to both sides.
Precision (``--precision``): fp32 on every side by default, or bf16 autocast on every side (ours
``precision=bf16``, HF ``torch.autocast``, TRL ``bf16=True``); the hardware profile's ``auto`` choice for this CPU
is printed, not applied, so that the anchors, which do not read it, run the same arithmetic.

Parts (``--part``), each timed interleaved in one process (every case once per round, rotating order, ``--steps``
optimizer steps per measurement, ``--warmup`` steps per case excluded):

  lora  ours   ``ds finetune run``'s step: ``prepare_model`` (``ds.load`` + ``apply_lora``) and the real
               :class:`~deepseek.train.trainer.Trainer`'s ``train_step`` (ForwardBackward: packed rows ->
               ``sft_loss``, the fused head + loss; backward; gradient clipping; foreach AdamW on the adapters)
        peft   ``peft.get_peft_model`` on the HF export + a plain loop: ``model(input_ids, labels,
               position_ids).loss`` (transformers masks the packed documents from ``position_ids``), backward,
               ``torch.optim.AdamW`` on the trainable parameters, zero_grad
        same r / alpha / targets (attention q, k, v, o; ``--experts`` adds the routed experts: ours ``ffn.experts``,
        PEFT ``target_parameters`` ``mlp.experts.gate_up_proj`` / ``down_proj``), same B x T packed batch
  full  ours   the same Trainer step with every parameter trainable (``lora: null``)
        hf     ``MixtralForCausalLM`` + the same plain loop, every parameter, AdamW
  dpo   ours   ``method: dpo``: the Trainer step with :class:`~deepseek.finetune.run.DPOLoss` (LoRA; the reference is
               the base with the adapters disabled), chosen and rejected in one policy forward
        trl    ``trl.DPOTrainer`` on the same pairs (rendered as the same text; token ids checked equal): LoRA via
               ``peft_config``, same beta, ``precompute_ref_log_probs=False``, same batch, no eval / logging /
               saving, fp32, no gradient checkpointing; ``train()`` runs in a worker thread whose TrainerCallback
               times ``on_step_begin`` -> ``on_step_end`` and parks the loop between measurements
               (the batch is already collated then: data loading is not charged to TRL)

Targets (issue 18): LoRA tokens/s >= 1.5x PEFT; full SFT tokens/s >= 1.2x HF; DPO step time <= 0.67x TRL.
``--profile`` prints torch.profiler's top operators of one step of each case (after the timing).

    python benchmarks/bench_finetune.py [--part lora|full|dpo|all] [--size small|tiny] [--rounds 8] [--steps 2]
                                        [--precision fp32|bf16] [--experts] [--threads N] [--json PATH] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (interleaved, machine_info, median, paired_ratio, print_machine, print_table,  # noqa: E402
                    setup_path, spread, write_results)

setup_path()
import torch  # noqa: E402

import deepseek as ds  # noqa: E402
from deepseek.config import from_dict  # noqa: E402
from deepseek.data import train_tokenizer  # noqa: E402
from deepseek.data.chat import chat_template  # noqa: E402
from deepseek.data.instructions import write_examples  # noqa: E402
from deepseek.finetune.config import FinetuneConfig  # noqa: E402
from deepseek.finetune.objectives import sequence_logprobs  # noqa: E402
from deepseek.finetune.preference import collate_pairs, preference_turns, read_preference_jsonl  # noqa: E402
from deepseek.finetune.run import DPOLoss, SFTBatch, prepare_model, sft_loss, sft_rows  # noqa: E402
from deepseek.finetune.sft import IGNORE_INDEX  # noqa: E402
from deepseek.hardware import bf16_products_fast, hardware_profile  # noqa: E402
from deepseek.models.hf import convert_to_hf  # noqa: E402
from deepseek.train.trainer import Trainer  # noqa: E402

TARGETS = {"lora": ("ours", "peft", 1.5, "tokens/s"), "full": ("ours", "hf", 1.2, "tokens/s"),
           "dpo": ("ours", "trl", 0.67, "step time")}
SIZES = {  # model preset overrides, SFT batch (rows x tokens), DPO pairs per step, LoRA rank
    "small": dict(model={}, batch=8, seq=256, pairs=4, pair_len=256, r=16),
    "tiny": dict(model=dict(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, moe_ffn_dim=128,
                            n_routed_experts=4), batch=2, seq=128, pairs=2, pair_len=256, r=8),
}
MODULES = ["json", "textwrap", "shlex", "difflib", "string", "fractions", "statistics", "heapq", "bisect", "calendar"]
ATTENTION = (["attn.q", "attn.k", "attn.v", "attn.o"], ["q_proj", "k_proj", "v_proj", "o_proj"])
LR, BETA = 1e-4, 0.1


# -- model and data: one export, one tokenizer, the same ids on both sides ----------------------------------

@dataclass
class Setup:
    model_dir: Path
    hf_dir: Path
    data_dir: Path
    tokenizer: object
    seq: int


def build_setup(size: dict, modules: list[str], scratch: Path) -> Setup:
    """prepare-examples -> BPE on its chats -> ds.save of the preset -> ds convert --to-hf."""
    data_dir = scratch / "data"
    manifest = write_examples(data_dir, modules=modules)
    texts = [m["content"] for line in (data_dir / "sft_train.jsonl").read_text().splitlines()
             for m in json.loads(line)["messages"]]
    cfg = ds.preset("mixtral-tiny", **size["model"])
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    torch.manual_seed(0)
    model = ds.MoETransformer(cfg)
    ds.save(model, tokenizer, scratch / "model")
    convert_to_hf(scratch / "model", scratch / "hf")
    print(f"data: {manifest['counts']['sft_train.jsonl']} SFT chats, {manifest['counts']['preference_train.jsonl']} "
          f"preference pairs from {len(modules)} stdlib modules; BPE {tokenizer.get_vocab_size()} tokens; model "
          f"mixtral-tiny{'' if not size['model'] else ' ' + str(size['model'])}: "
          f"{model.num_parameters() / 1e6:.2f}M parameters")
    return Setup(scratch / "model", scratch / "hf", data_dir, tokenizer, size["seq"])


@contextlib.contextmanager
def quiet_skips():
    """The readers log every row longer than the limit; here that is expected (the batch is a fixed sample)."""
    logger = logging.getLogger("deepseek.finetune.sft")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def finetune_config(setup: Setup, scratch: Path, *, lora: dict | None, method: str, batch: int,
                    precision: str) -> FinetuneConfig:
    return from_dict(FinetuneConfig, dict(
        init=str(setup.model_dir), method=method, lora=lora, seq_len=setup.seq, batch_size=batch, precision=precision,
        device="cpu", run_dir=str(scratch / f"run-{method}"), max_steps=100_000, progress=False, tensorboard=False,
        optimizer={"lr": LR}, dpo={"beta": BETA}))


def our_step(config: FinetuneConfig, loss_fn, batch) -> tuple[Callable[[], object], torch.nn.Module]:
    """The step ``ds finetune run`` takes: prepare_model + Trainer.train_step on an in-memory batch."""
    model, _ = prepare_model(config)
    trainer = Trainer(model, config.train_config(), batches=iter(()), loss_fn=loss_fn)
    return functools.partial(trainer.train_step, batch), model


def hf_model(setup: Setup):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(setup.hf_dir, dtype=torch.float32).train()


def hf_labels(targets_BT: torch.Tensor) -> torch.Tensor:
    """HF shifts ``labels`` itself: label t+1 = our target t."""
    return torch.cat([torch.full_like(targets_BT[:, :1], IGNORE_INDEX), targets_BT[:, :-1]], dim=1)


ANCHOR_ADAMW = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {}}


def hf_loss(model, batch: SFTBatch, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        return model(input_ids=batch.inputs, labels=hf_labels(batch.targets), position_ids=batch.positions,
                     use_cache=False).loss


def plain_loop_step(model, batch: SFTBatch, adamw: str, bf16: bool) -> Callable[[], object]:
    """The loop a user writes around a HF (or PEFT) model: loss from labels, backward, AdamW, zero_grad."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, **ANCHOR_ADAMW[adamw])

    def step():
        loss = hf_loss(model, batch, bf16)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


# -- SFT: LoRA and full ------------------------------------------------------------------------------------

def sft_cases(part: str, setup: Setup, size: dict, scratch: Path, experts: bool, adamw: str = "fused",
              precision: str = "fp32") -> tuple[dict, dict]:
    with quiet_skips():
        rows = sft_rows(str(setup.data_dir / "sft_train.jsonl"), setup.tokenizer, setup.seq, pack_rows=True,
                        on_bad="skip")
    if rows is None or rows.inputs.shape[0] < size["batch"]:
        raise SystemExit(f"too few packed SFT rows for batch {size['batch']}; add --module")
    batch = SFTBatch(*(t[:size["batch"]] for t in (rows.inputs, rows.targets, rows.positions, rows.document_ids)))
    lora = None
    hf = hf_model(setup)
    if part == "lora":
        ours_targets, hf_targets = list(ATTENTION[0]), list(ATTENTION[1])
        lora = {"r": size["r"], "alpha": 2 * size["r"], "target_modules": ours_targets + (["ffn.experts"] if experts
                                                                                           else [])}
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(r=size["r"], lora_alpha=2 * size["r"], lora_dropout=0.0, target_modules=hf_targets,
                                 target_parameters=(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts
                                                    else None), task_type="CAUSAL_LM")
        hf = get_peft_model(hf, peft_config)
    config = finetune_config(setup, scratch, lora=lora, method="sft", batch=size["batch"], precision=precision)
    ours, model = our_step(config, sft_loss, batch)
    bf16 = precision == "bf16"
    with torch.no_grad():  # same weights, same batch => same loss (checked, not assumed)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss_ours = float(sft_loss(model, batch))
        loss_hf = float(hf_loss(hf, batch, bf16))
    trainable = {"ours": sum(p.numel() for p in model.parameters() if p.requires_grad),
                 "anchor": sum(p.numel() for p in hf.parameters() if p.requires_grad)}
    check = {"loss_ours": loss_ours, "loss_anchor": loss_hf, "trainable_ours": trainable["ours"],
             "trainable_anchor": trainable["anchor"], "tokens_per_step": batch.inputs.numel(),
             "batch": list(batch.inputs.shape), "lora": lora}
    base = hf.get_base_model() if part == "lora" else hf
    check["hf_implementations"] = {"experts": getattr(base.config, "_experts_implementation", None),
                                   "attention": getattr(base.config, "_attn_implementation", None)}
    ours_adamw = "fused" if ours.func.__self__.optimizer.defaults.get("fused") else "foreach"
    check["adamw"] = {"ours": ours_adamw, "anchor": adamw}
    print(f"[{part}] batch {tuple(batch.inputs.shape)}; first loss ours {loss_ours:.6f} vs anchor {loss_hf:.6f} "
          f"(|diff| {abs(loss_ours - loss_hf):.1e}); trainable ours {trainable['ours']:,} vs anchor "
          f"{trainable['anchor']:,}; HF {check['hf_implementations']}; AdamW ours {ours_adamw}, anchor {adamw}")
    anchor = "peft" if part == "lora" else "hf"
    return {"ours": ours, anchor: plain_loop_step(hf, batch, adamw, bf16)}, check


# -- DPO: ours vs TRL's DPOTrainer in a parked worker thread -----------------------------------------------

class _Stop(Exception):
    pass


class SteppedTRL:
    """``trl.DPOTrainer.train()`` in a worker thread; ``advance(k)`` runs k steps and returns their mean seconds
    (``on_step_begin`` -> ``on_step_end``), the loop parked in ``on_step_end`` between calls."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        outer = self
        self.go, self.parked = threading.Semaphore(0), threading.Semaphore(0)
        self.quota, self.elapsed, self.stop, self.error, self.t0 = 0, 0.0, False, None, 0.0
        self.profile, self.profiled = None, None  # a torch.profiler.profile for the next step, and the last one

        class Timer(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if outer.profile is not None:  # the profiler records the thread that starts it: this one
                    outer.profile.__enter__()
                outer.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                outer.elapsed += time.perf_counter() - outer.t0
                if outer.profile is not None:
                    outer.profile.__exit__(None, None, None)
                    outer.profiled, outer.profile = outer.profile, None
                outer.quota -= 1
                if outer.quota <= 0:
                    outer.parked.release()
                    outer.go.acquire()
                    if outer.stop:
                        control.should_training_stop = True
                        raise _Stop

        trainer.add_callback(Timer())
        self.trainer = trainer
        self.thread = threading.Thread(target=self._train, daemon=True)

    def _train(self):
        try:
            self.trainer.train()
        except _Stop:
            pass
        except BaseException as exc:  # surfaced in the main thread
            self.error = exc
            self.parked.release()

    def advance(self, k: int) -> float:
        self.quota, self.elapsed = k, 0.0
        if not self.thread.is_alive() and self.error is None:
            self.thread.start()
        else:
            self.go.release()
        self.parked.acquire()
        if self.error is not None:
            raise self.error
        return self.elapsed / k

    def close(self):
        if self.thread.is_alive():
            self.stop = True
            self.go.release()
            self.thread.join()


def dpo_cases(setup: Setup, size: dict, scratch: Path, experts: bool, total_steps: int, precision: str = "fp32"):
    import datasets
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    path = setup.data_dir / "preference_train.jsonl"
    with quiet_skips():
        pairs = read_preference_jsonl(path, setup.tokenizer, max_len=size["pair_len"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_source = {f"{path}:{i + 1}": row for i, row in enumerate(rows)}
    pairs = pairs[:size["pairs"]]
    if len(pairs) < size["pairs"]:
        raise SystemExit(f"too few preference pairs within {size['pair_len']} tokens; add --module")
    batch = collate_pairs(pairs)
    template = chat_template(setup.tokenizer)
    records = []
    for pair in pairs:  # the same chats as text: prompt turns + generation prompt, then the reply + end marker
        chosen, rejected = preference_turns(by_source[pair.source])
        records.append({"prompt": template.render(chosen[:-1], add_generation_prompt=True),
                        "chosen": chosen[-1][1] + template.suffix, "rejected": rejected[-1][1] + template.suffix})

    r = size["r"]
    ours_targets = ATTENTION[0] + (["ffn.experts"] if experts else [])
    lora = {"r": r, "alpha": 2 * r, "target_modules": ours_targets}
    config = finetune_config(setup, scratch, lora=lora, method="dpo", batch=size["pairs"], precision=precision)
    dpo = DPOLoss(BETA)
    ours, model = our_step(config, dpo, batch)

    tok = AutoTokenizer.from_pretrained(setup.hf_dir)
    tok.eos_token = template.suffix  # the reply already ends with it: TRL appends no extra token
    args = DPOConfig(output_dir=str(scratch / "trl"), per_device_train_batch_size=size["pairs"],
                     gradient_accumulation_steps=1, max_steps=total_steps, learning_rate=LR, beta=BETA,
                     loss_type=["sigmoid"], precompute_ref_log_probs=False, bf16=precision == "bf16", fp16=False,
                     gradient_checkpointing=False, logging_strategy="no", save_strategy="no", eval_strategy="no",
                     report_to="none", use_cpu=True, max_length=None, disable_tqdm=True, seed=0,
                     router_aux_loss_coef=0.0, dataloader_num_workers=0)
    peft_config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(ATTENTION[1]),
                             target_parameters=(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if experts
                                                else None), task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=hf_model(setup), args=args, train_dataset=datasets.Dataset.from_list(records),
                         processing_class=tok, peft_config=peft_config)
    # Same pairs => same ids: TRL's tokenization of the text must equal ours, token for token.
    same_ids = all(ex["prompt_ids"] + ex["chosen_ids"] == p.chosen_ids and
                   ex["prompt_ids"] + ex["rejected_ids"] == p.rejected_ids
                   for ex, p in zip(trainer.train_dataset, pairs))
    if not same_ids:
        raise SystemExit("TRL tokenized the pairs differently from ours: the comparison would not be fair")
    with torch.no_grad():  # the policies start equal: sequence log-probs of ours vs the PEFT model's base
        ids_BT = torch.cat([batch.chosen_ids, batch.rejected_ids])
        mask_BT = torch.cat([batch.chosen_mask, batch.rejected_mask])
        ours_B = sequence_logprobs(model, ids_BT, mask_BT)
        logits = trainer.model(input_ids=ids_BT, use_cache=False).logits[:, :-1].float()
        logp = logits.log_softmax(-1).gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
        theirs_B = (logp * mask_BT[:, 1:]).sum(-1)
    diff = float((ours_B - theirs_B).abs().max())
    trainable = {"ours": sum(p.numel() for p in model.parameters() if p.requires_grad),
                 "anchor": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}
    print(f"[dpo] {size['pairs']} pairs x {batch.chosen_ids.shape[1]} tokens (2 x {size['pairs']} rows per "
          f"forward); token ids equal to TRL's: {same_ids}; max |sequence log-prob ours - HF| {diff:.1e}; trainable "
          f"ours {trainable['ours']:,} vs TRL {trainable['anchor']:,}; TRL optimizer "
          f"{trainer.args.optim}")
    stepped = SteppedTRL(trainer)
    check = {"same_ids": same_ids, "max_logprob_diff": diff, "trainable_ours": trainable["ours"],
             "trainable_anchor": trainable["anchor"], "pairs": size["pairs"], "length": batch.chosen_ids.shape[1],
             "trl_optim": str(trainer.args.optim), "lora": lora}
    return {"ours": ours, "trl": stepped}, check


# -- timing and report -------------------------------------------------------------------------------------

def time_part(part: str, cases: dict, args) -> dict[str, list[float]]:
    """Seconds per step of each case, interleaved; the TRL case times its own steps (its callback)."""
    trl = cases.get("trl")
    if trl is None:
        return interleaved(cases, rounds=args.rounds, warmup=args.warmup, inner=args.steps, budget_s=args.budget)
    callables = {"ours": cases["ours"], "trl": lambda: trl.advance(args.steps)}
    for _ in range(args.warmup):
        callables["ours"]()
    trl.advance(args.warmup)
    times: dict[str, list[float]] = {"ours": [], "trl": []}
    start = time.perf_counter()
    for r in range(args.rounds):
        order = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
        for name in order:
            if name == "trl":
                times[name].append(callables[name]())
            else:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    callables[name]()
                times[name].append((time.perf_counter() - t0) / args.steps)
        if r >= 2 and time.perf_counter() - start > args.budget:
            break
    return times


def profile_cases(part: str, cases: dict, top: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    for name, case in cases.items():
        if isinstance(case, SteppedTRL):  # TRL steps in its worker thread: profile there
            case.profile = profile(activities=[ProfilerActivity.CPU])
            case.advance(1)
            prof = case.profiled
        else:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                case()
        print(f"\n[{part}/{name}] torch.profiler, one step, top {top} by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


def report(part: str, times: dict, tokens: int) -> dict:
    ours_name, anchor_name, want, kind = TARGETS[part]
    rows, out = [], {}
    for name, ts in times.items():
        tps = [tokens / t for t in ts]
        out[name] = {"seconds_per_step": ts, "tokens_per_s": tps}
        rows.append([f"{part}/{name}", spread([1000 * t for t in ts]), spread(tps)])
    if kind == "tokens/s":  # ours / anchor tokens/s = anchor time / ours time, per round
        ratio = paired_ratio(times[anchor_name], times[ours_name])
        met = median(ratio) >= want
        goal = f">= {want}x"
    else:  # step time ours / anchor
        ratio = paired_ratio(times[ours_name], times[anchor_name])
        met = median(ratio) <= want
        goal = f"<= {want}x"
    print_table(["case", "ms/step median (min-max)", "tokens/s median (min-max)"], rows)
    print(f"{part}: ours vs {anchor_name} ({kind}) {median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) over "
          f"{len(ratio)} rounds; target {goal}: {'met' if met else 'MISSED'}")
    out["ratio"] = {"kind": kind, "per_round": ratio, "median": median(ratio), "target": goal, "met": met}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["lora", "full", "dpo", "all"], default="all")
    ap.add_argument("--size", choices=list(SIZES), default="small")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="steps per case before timing (excluded)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--module", action="append", default=None, help="stdlib module for the data (repeatable)")
    ap.add_argument("--experts", action="store_true", help="LoRA on the routed experts too (PEFT target_parameters)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="both sides: fp32, or bf16 autocast (ours precision=bf16, HF torch.autocast, TRL bf16=True)")
    ap.add_argument("--anchor-adamw", choices=list(ANCHOR_ADAMW), default="fused",
                    help="the plain loops' AdamW kernel: fused (what HF Trainer and TRL pick, and ours on CPU), "
                         "foreach, or torch's default (a per-parameter loop on CPU)")
    ap.add_argument("--budget", type=float, default=600.0, help="stop a part after this many seconds (>= 3 rounds)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of each case")
    ap.add_argument("--json", default=None, help="write the results here (default benchmarks/results/...)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)
    auto = "bf16" if bf16_products_fast(hardware_profile()) else "fp32"
    how = "bf16 autocast" if args.precision == "bf16" else "no autocast"
    print(f"precision: {args.precision} on every side ({how}); the hardware profile's `auto` picks {auto} on this CPU")
    results_precision = {"precision": args.precision, "hardware_auto": auto}
    size = SIZES[args.size]
    parts = ["lora", "full", "dpo"] if args.part == "all" else [args.part]
    results = {"machine": info, **results_precision, "size": args.size, "size_settings": size, "rounds": args.rounds,
               "steps": args.steps, "warmup": args.warmup, "experts": args.experts, "anchor_adamw": args.anchor_adamw,
               "parts": {}}
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        scratch = Path(tmp)
        setup = build_setup(size, args.module or MODULES, scratch)
        for part in parts:
            if part == "dpo":
                total = args.warmup + args.steps * args.rounds + 2 + (1 if args.profile else 0)
                cases, check = dpo_cases(setup, size, scratch, args.experts, total, args.precision)
                tokens = 2 * check["pairs"] * check["length"]
            else:
                cases, check = sft_cases(part, setup, size, scratch, args.experts, args.anchor_adamw,
                                         args.precision)
                tokens = check["tokens_per_step"]
            try:
                times = time_part(part, cases, args)
                results["parts"][part] = {"check": check, **report(part, times, tokens)}
                if args.profile:
                    profile_cases(part, cases)
            finally:
                if "trl" in cases:
                    cases["trl"].close()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.json}")
    else:
        write_results("bench_finetune", results)


if __name__ == "__main__":
    main()
