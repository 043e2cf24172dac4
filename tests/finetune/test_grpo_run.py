"""`ds finetune run` with method: grpo: sampling through the continuous-batching engine, rewards, GRPO's loss,
logged figures, exact resume, config errors."""

import shutil

import pytest
import torch

from deepseek.config import ConfigError
from deepseek.finetune.config import GRPOConfig, load_finetune_config
from deepseek.finetune.grpo import GRPOLoss, PromptBatch, PromptLoader, read_prompts, right_padded, sample_groups
from deepseek.finetune.objectives import token_logprobs
from deepseek.finetune.run import finetune, prepare_model

from tests.finetune.tiny_base import common_overrides, make_base, read_records, write_jsonl

PROMPTS = [{"prompt": "def f(x):"}, {"prompt": "add 1 and 2"}, {"prompt": "You write"},
           {"prompt": "def double(x):\n    \"\"\"\n    >>> double(2)\n    4\n    \"\"\"\n",
            "doctests": ">>> double(2)\n4\n", "entry_point": "double", "module": "string"}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo")
    base, tokenizer = make_base(folder)
    prompts = write_jsonl(folder / "prompts.jsonl", PROMPTS)
    return base, tokenizer, prompts


def overrides(setup, run_dir, *extra):
    base, _, prompts = setup
    return common_overrides(base, run_dir, "method=grpo", f"data.train={prompts}", "lora={r: 4, dropout: 0.0}",
                            "max_steps=3", "batch_size=2", "optimizer.lr=1e-2", "grpo.group_size=4",
                            "grpo.max_new_tokens=6", "grpo.rewards={parses: 1.0, length: 0.5}", *extra)


def test_a_grpo_run_logs_each_reward_kl_and_clip_fraction_and_writes_an_adapter(setup, tmp_path):
    result = finetune(load_finetune_config(None, overrides(setup, tmp_path / "run", f"data.eval={setup[2]}")))
    assert result.step == 3 and torch.isfinite(torch.tensor(result.loss))
    assert set(result.final_eval) == {"val_rewards/parses", "val_rewards/length", "val_rewards/total",
                                      "val_completion_tokens"}  # greedy completions of the held-out prompts
    assert 0 <= result.final_eval["val_rewards/parses"] <= 1 and result.final_eval["val_completion_tokens"] <= 6
    steps = [r for r in read_records(tmp_path / "run") if "loss" in r]
    assert len(steps) == 3
    for record in steps:
        assert {"rewards/parses", "rewards/length", "rewards/total", "kl", "clip_fraction",
                "completion_tokens"} <= set(record)
        assert 0 <= record["rewards/parses"] <= 1 and record["kl"] >= 0 and record["clip_fraction"] == 0
    assert steps[0]["kl"] == 0  # the adapters start at zero: the policy is its reference
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_one_step_matches_a_hand_computation(setup):
    """Rewards, group-normalised advantages and the loss of one step, recomputed from the same samples by hand."""
    base, tokenizer, prompts_path = setup
    config = load_finetune_config(None, overrides(setup, "unused", "grpo.beta=0.1"))
    model, _ = prepare_model(config)
    with torch.no_grad():  # move the adapters off zero, so the policy differs from its reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    prompts = read_prompts(prompts_path, tokenizer, 64)
    preferred = 7

    def share_of_preferred(row, text, ids):
        return sum(i % preferred == 0 for i in ids) / max(1, len(ids))

    grpo = GRPOConfig(group_size=4, beta=0.1, max_new_tokens=6, rewards={"length": 0.5})
    loss_fn = GRPOLoss(grpo, prompts, tokenizer, reward_fns={"preferred": (2.0, share_of_preferred)})
    batch = PromptBatch(torch.tensor([0, 2]), torch.tensor([11, 12]))
    loss = loss_fn(model.train(), batch)

    samples = sample_groups(model, tokenizer, [prompts[0].ids, prompts[2].ids], [11, 12], 4, loss_fn.params)
    rewards = [0.5 * (1 - len(ids) / 6) + 2.0 * share_of_preferred(None, text, ids) for ids, text in samples]
    advantages = []
    for group in (rewards[:4], rewards[4:]):
        mean = sum(group) / 4
        std = (sum((r - mean) ** 2 for r in group) / 3) ** 0.5
        advantages += [(r - mean) / (std + 1e-4) for r in group]
    prompt_ids = [prompts[0].ids] * 4 + [prompts[2].ids] * 4
    ids, mask = right_padded(prompt_ids, [s[0] for s in samples])
    with torch.no_grad():
        policy = token_logprobs(model, ids)
        from deepseek.nn.lora import disable_adapters
        with disable_adapters(model):
            reference = token_logprobs(model.eval(), ids)
    model.train()
    want = 0.0
    for b in range(8):
        terms = []
        for t in range(ids.shape[1] - 1):
            if mask[b, t + 1]:
                delta = float(reference[b, t] - policy[b, t])
                terms.append(-advantages[b] + 0.1 * (torch.exp(torch.tensor(delta)).item() - delta - 1))
        want += sum(terms) / max(1, len(terms))
    assert float(loss.detach()) == pytest.approx(want / 8, abs=1e-5)
    assert loss_fn.last["rewards/preferred"] == pytest.approx(
        sum(share_of_preferred(None, t, i) for i, t in samples) / 8, abs=1e-6)
    assert loss_fn.last["kl"] > 0


def test_a_resumed_grpo_run_samples_and_trains_as_the_uninterrupted_one(setup, tmp_path):
    from safetensors.torch import load_file
    common = overrides(setup, "x", "max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=0")
    finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'a'}"]))
    finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'b'}"]))
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "b" / "adapter")
    result = finetune(load_finetune_config(None, [*common, f"run_dir={tmp_path / 'b'}", "checkpoint.resume=true"]))
    assert result.resumed_from == 2 and result.step == 4
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    figures = ("loss", "rewards/parses", "rewards/length", "kl")
    records_a = [{k: r[k] for k in figures} for r in read_records(tmp_path / "a") if "loss" in r]
    records_b = [{k: r[k] for k in figures} for r in read_records(tmp_path / "b") if "loss" in r]
    assert records_a == records_b


def test_the_prompt_loader_seeds_by_position_and_resumes():
    loader = PromptLoader(5, 2, seed=3)
    first = [next(loader) for _ in range(2)]
    state = loader.state_dict()
    later = [next(loader) for _ in range(3)]
    loader.load_state_dict(state)
    again = [next(loader) for _ in range(3)]
    assert [(b.index.tolist(), b.seed.tolist()) for b in later] == [(b.index.tolist(), b.seed.tolist()) for b in again]
    seeds = [s for b in first + later for s in b.seed.tolist()]
    assert len(set(seeds)) == len(seeds)  # every drawn prompt samples with its own seed


def test_prompt_rows_without_a_prompt_or_too_long_are_reported_by_line(setup, tmp_path):
    _, tokenizer, _ = setup
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "def f(x):"}, {"text": "x"}, {"prompt": "add 1 and 2 " * 20}])
    problems = []
    prompts = read_prompts(path, tokenizer, 16, problems=problems)
    assert len(prompts) == 1 and prompts[0].source == f"{path}:1"
    assert problems[0].startswith(f"{path}:2: ") and problems[1].startswith(f"{path}:3: ")
    with pytest.raises(ValueError, match=f"{path}:2"):
        read_prompts(path, tokenizer, 16, on_bad="error")


def test_code_stubs_are_encoded_without_trailing_whitespace_other_prompts_as_written(setup, tmp_path):
    _, tokenizer, _ = setup
    stub = 'def f(x):\n    """Double."""\n'
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": stub, "entry_point": "f"}, {"prompt": "say hi\n"}])
    code, plain = read_prompts(path, tokenizer, 64)
    assert code.ids == tokenizer.encode(stub.rstrip()).ids  # as `ds eval` encodes it (completion_prompt)
    assert plain.ids == tokenizer.encode("say hi\n").ids


@pytest.mark.parametrize("override, message", [
    ("grpo.group_size=1", "grpo.group_size must be an integer >= 2"),
    ("grpo.temperature=0", "grpo.temperature must be > 0"),
    ("grpo.rewards={parses: 1.0, style: 1.0}", "unknown reward.*style.*known: parses, doctests, length, model"),
    ("grpo.rewards={parses: 0.0}", "every weight is zero"),
    ("grpo.rewards={model: 1.0}", "grpo.reward_model names no reward model"),
    ("grpo.reward_model=somewhere", "grpo.rewards.model .* is missing or zero"),
    ("grpo.rewardz=1", "valid keys"),
    ("objective={sft: 1.0}", "objective is for method: mixed"),
])
def test_bad_grpo_configs_are_one_line_errors(setup, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_finetune_config(None, overrides(setup, tmp_path / "run", override))
    assert "\n" not in str(caught.value)


def test_a_missing_reward_model_directory_and_an_unusable_prompt_file_are_errors(setup, tmp_path):
    with pytest.raises(ConfigError, match="grpo.reward_model: .* is not a reward model directory"):
        finetune(load_finetune_config(None, overrides(setup, tmp_path / "run", "grpo.rewards={model: 1.0}",
                                                      f"grpo.reward_model={tmp_path / 'none'}")))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": "no prompt"}])
    with pytest.raises(ConfigError, match="data.train: .* has no usable prompt"):
        finetune(load_finetune_config(None, overrides(setup, tmp_path / "run", f"data.train={empty}")))


def test_a_full_grpo_run_scores_with_a_trained_reward_model_against_a_frozen_reference(setup, tmp_path):
    from tests.finetune.tiny_base import preference_pairs
    base, _, _ = setup
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_pairs(range(4)))
    finetune(load_finetune_config(None, common_overrides(base, tmp_path / "rm", "method=reward", f"data.train={pairs}",
                                                         "lora={r: 4}", "max_steps=1", "batch_size=2")))
    config = load_finetune_config(None, overrides(setup, tmp_path / "run", "lora=null", "max_steps=2",
                                                  "grpo.rewards={model: 1.0}",
                                                  f"grpo.reward_model={tmp_path / 'rm' / 'reward'}"))
    result = finetune(config)
    steps = [r for r in read_records(tmp_path / "run") if "loss" in r]
    assert result.step == 2 and all("rewards/model" in r for r in steps)
    assert steps[0]["kl"] == 0 and steps[1]["kl"] > 0  # the frozen copy stays where the policy started
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_a_reward_that_prefers_some_tokens_raises_their_probability(setup):
    """Four GRPO steps (plain SGD, one-token completions) with a reward of 1 for a token id below 150 move the
    policy's probability of such a first token from about one half to nearly all."""
    base, tokenizer, prompts_path = setup
    config = load_finetune_config(None, overrides(setup, "unused", "lora=null", "grpo.beta=0.0"))
    model, _ = prepare_model(config)
    prompts = read_prompts(prompts_path, tokenizer, 64)[:1]
    grpo = GRPOConfig(group_size=8, beta=0.0, max_new_tokens=1, rewards={"length": 1e-6})
    loss_fn = GRPOLoss(grpo, prompts, tokenizer, reward_fns={"low": (1.0, lambda row, text, ids: float(ids[0] < 150))})
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.tensor([prompts[0].ids])

    def preferred_mass():
        with torch.no_grad():
            return float(model.eval()(ids)[0, -1].softmax(-1)[:150].sum())

    before = preferred_mass()
    for step in range(4):
        model.train()
        loss_fn(model, PromptBatch(torch.tensor([0]), torch.tensor([step]))).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert 0.3 < before < 0.7 and preferred_mass() > 0.9


def test_chat_style_prompts_render_the_chat_template_and_score_the_replys_code(setup, tmp_path):
    from deepseek.data.chat import chat_template
    from deepseek.evaluation.codegen import chat_prompt
    from deepseek.finetune.grpo import answer_text

    base, tokenizer, prompts_path = setup
    template = chat_template(tokenizer)
    chat = read_prompts(prompts_path, tokenizer, 10_000, prompt_style="chat")
    assert chat[0].ids == tokenizer.encode(template.render([("user", "def f(x):")])).ids  # a plain prompt: one turn
    assert chat[3].ids == tokenizer.encode(template.render(chat_prompt(PROMPTS[3]))).ids  # a code prompt: as ds eval
    # a code reply is scored after the prompt's stub, whose definition it replaces; a plain one alone
    reply = "Here it is:\n```python\ndef double(x):\n    return 2 * x\n```\n"
    assert answer_text(PROMPTS[3], reply) == "\ndef double(x):\n    return 2 * x\n"
    assert answer_text(PROMPTS[0], "```\nx = 1\n```") == "x = 1\n"
    config = load_finetune_config(None, overrides(setup, tmp_path / "run", "grpo.prompt_style=chat",
                                                  "grpo.rewards={parses: 1.0, doctests: 1.0}"))
    loss = GRPOLoss(config.grpo, chat, tokenizer)
    assert loss.params.stop == list(template.stop_strings) and loss.params.stop_token_ids == list(
        template.stop_token_ids)  # a reply ends at the end of its turn, not at the code stop strings
    rewards = loss.rewards([PROMPTS[3], PROMPTS[3]], [chat[3].ids] * 2, [([1], reply), ([1], "no code at all")])
    assert rewards["parses"].tolist() == [1.0, 0.0] and rewards["doctests"].tolist() == [1.0, 0.0]
    result = finetune(load_finetune_config(None, overrides(setup, tmp_path / "run", "grpo.prompt_style=chat")))
    assert result.step == 3 and torch.isfinite(torch.tensor(result.loss))
