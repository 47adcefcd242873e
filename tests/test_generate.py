"""`predict` on causal_lm completes a prompt the way the trained model would: for every kind of peft method
its greedy completion equals greedy decoding by full forward passes of the adapter loaded in plain peft
(the forward training uses), computed here without peft's or transformers' generation code.

peft 0.21's generation for prompt-learning methods breaks under transformers 5.24 (it looks for the KV
cache under its old name): prompt and p-tuning prepend the virtual tokens again at each step, prefix tuning
loses its prefix. These tests catch that class of bug whatever its cause."""

from __future__ import annotations

import io
import json

import pytest
import torch
import yaml

from scaletune.config import load_config
from scaletune.generation import generate, generate_batch, greedy_without_cache, prompt_segments
from scaletune.infer import load_trained, run_predict
from scaletune.saving import save_adapter
from scaletune.train import setup

from stutil import method_keys

METHODS = ["lora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning"]
# short prompts: the tiny model's attention to 4 virtual tokens fades behind a long one, and so would the bug
PROMPTS = ["alpha bravo", "kilo", "Reverse the order of these words.\nalpha bravo"]
NEW_TOKENS = 8


class _TokenIds:
    """The tokenizer, except that `decode` gives the token ids back: the tiny tokenizer's tokens for
    bytes above 127 decode alike (to U+FFFD), so a wrong token can hide in the decoded text."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tokenizer)

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> list[int] | str:
        # (a completion is decoded skipping special tokens; the template's turn end is probed without)
        return [int(i) for i in ids] if skip_special_tokens else self._tokenizer.decode(ids, **kwargs)


def _peft_keys(name: str) -> dict:
    if name == "p_tuning":  # not a matrix row (it passes through by name), so no shared settings
        return {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16}
    return method_keys(name, "causal_lm")


@torch.no_grad()
def _reference(model, ids: torch.Tensor, eos: int) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence per token, no cache, stop at eos."""
    seq = ids
    for _ in range(NEW_TOKENS):
        token = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1].argmax()
        seq = torch.cat([seq, token.view(1, 1)], dim=1)
        if int(token) == eos:
            break
    return seq[0, ids.shape[1]:].tolist()


def _adapter(make_config, tmp_path, name: str):
    """(run config, adapter dir) of a fresh adapter of method `name` whose trainables are moved well away
    from their initialisation (LoRA's zero B, IA3's ones), so it changes what the model generates."""
    path = make_config("causal_lm", n=8)
    raw = yaml.safe_load(path.read_text())
    raw["peft"] = _peft_keys(name)
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    run, _ = setup(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in run.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    save_adapter(run, tmp_path / "adapter")
    return load_config(path), tmp_path / "adapter"


@pytest.mark.parametrize("name", METHODS)
def test_predict_completion_is_greedy_decoding_of_the_trained_forward(make_config, tmp_path, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, adapter = _adapter(make_config, tmp_path, name)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    results = run_predict(cfg, str(adapter), str(inp), NEW_TOKENS, out=io.StringIO())
    # the same model and rendering, with the completion's token ids instead of its text
    model, tokenizer, *_ = load_trained(cfg, str(adapter))
    got = [generate(model, _TokenIds(tokenizer), prompt_segments({"prompt": p}, tokenizer)[1], NEW_TOKENS)
           for p in PROMPTS]

    tok = AutoTokenizer.from_pretrained(str(adapter))
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path).eval()
    loaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    for prompt, result, ids_got in zip(PROMPTS, results, got):
        ids = torch.tensor([[tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]])
        want = _reference(loaded, ids, tok.eos_token_id)
        with loaded.disable_adapter():
            assert want != _reference(loaded, ids, tok.eos_token_id)  # the adapter changes the completion
        assert ids_got == want, (name, prompt)
        assert result["completion"] == tok.decode(want, skip_special_tokens=True)


def test_greedy_without_cache_stops_after_eos_and_names_what_it_does_not_apply(make_config, tmp_path, caplog):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, adapter = _adapter(make_config, tmp_path, "prefix_tuning")
    base = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = torch.tensor([[0, 5, 9, 12, 40]])
    full = greedy_without_cache(model, ids, NEW_TOKENS).tolist()
    model.generation_config.eos_token_id = [full[2]]  # a list, as some models' generation_config has it
    model.generation_config.repetition_penalty = 1.3  # as Qwen's has: generate would apply it, the loop does not
    with caplog.at_level("WARNING", logger="scaletune"):
        assert greedy_without_cache(model, ids, NEW_TOKENS).tolist() == full[:full.index(full[2]) + 1]
    assert "does not apply the model's generation_config repetition_penalty=1.3" in caplog.text


def test_completions_stop_at_a_learned_position_table_and_run_on_with_rotary_ones(make_config, tmp_path, caplog,
                                                                                   monkeypatch):
    """--max-new-tokens far past the model's positions: a learned position table fails past its size, so each
    completion stops there (99999999999 ran for minutes); a rotary model (this Llama) runs on, with a warning
    (an adapter trained on 256-token examples of a 64-position base must complete a 65-token prompt)."""
    from scaletune import generation

    cfg, adapter = _adapter(make_config, tmp_path, "lora")
    model, tokenizer, *_ = load_trained(cfg, str(adapter))
    segments = prompt_segments({"prompt": PROMPTS[2]}, tokenizer)[1]
    with torch.no_grad():  # (eos suppressed: greedy decoding of a random adapter may stop on its own)
        model.generation_config.eos_token_id = None
        full = generate(model, _TokenIds(tokenizer), segments, 6)
        assert len(full) == 6
        prompt = len(tokenizer("".join(s for s, t in segments if not t), add_special_tokens=False)["input_ids"]) + 1
        model.config.max_position_embeddings = prompt + 3
        generation._CAPPED.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            assert generate(model, _TokenIds(tokenizer), segments, 6) == full  # rotary: not cut
        assert "completions may run past the" in caplog.text
        monkeypatch.setattr(generation, "position_limit", lambda config: (config.max_position_embeddings, True))
        generation._CAPPED.clear()
        caplog.clear()
        with caplog.at_level("WARNING", logger="scaletune"):
            assert generate(model, _TokenIds(tokenizer), segments, 50) == full[:3]
            model.config.max_position_embeddings = prompt
            assert generate(model, tokenizer, segments, 50) == ""
    assert caplog.text.count("each completion stops there") == 1
    assert f"a prompt of {prompt} tokens fills the model's context ({prompt}): no completion" in caplog.text


def test_virtual_tokens_count_against_the_context(make_config):
    from scaletune import generation
    from scaletune.train import setup

    path = make_config("causal_lm", n=8)
    raw = yaml.safe_load(path.read_text())
    raw["peft"] = {"method": "prompt_tuning", "num_virtual_tokens": 5}
    path.write_text(yaml.safe_dump(raw))
    run, _ = setup(load_config(path), overwrite=True)
    assert generation.is_prompt_learning(run.model) and generation._virtual_tokens(run.model) == 5


def test_batched_completions_are_each_prompts_own(make_config, tmp_path, monkeypatch):
    """`predict` completes GENERATE_BATCH prompts per left-padded `generate`: each row's completion equals
    the one its prompt gets alone, with prompts of different lengths, a row that stops early at
    end-of-sequence while the others go on, and rows whose learned position table cuts them shorter."""
    from scaletune import generation, infer

    cfg, adapter = _adapter(make_config, tmp_path, "lora")
    model, tokenizer, *_ = load_trained(cfg, str(adapter))
    prompts = ["kilo", "alpha bravo charlie delta echo foxtrot golf", "bravo", PROMPTS[2], "echo echo echo", "x"]
    segments = [prompt_segments({"prompt": p}, tokenizer)[1] for p in prompts]
    ids = _TokenIds(tokenizer)
    with torch.no_grad():
        model.generation_config.eos_token_id = None
        alone = [generate(model, ids, s, NEW_TOKENS) for s in segments]
        model.generation_config.eos_token_id = [alone[1][2]]  # row 1 ends at its third token
        alone = [generate(model, ids, s, NEW_TOKENS) for s in segments]
        assert len(alone[1]) == 3 and max(len(a) for a in alone) == NEW_TOKENS
        assert generate_batch(model, ids, segments, NEW_TOKENS) == alone

        inp = tmp_path / "in.jsonl"
        inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        monkeypatch.setattr(infer, "GENERATE_BATCH", 4)  # two batches: 4 and 2
        monkeypatch.setattr(infer, "load_trained", lambda *a: (model, tokenizer, None, None, adapter))
        results = run_predict(cfg, str(adapter), str(inp), NEW_TOKENS, out=io.StringIO())
        assert [r["completion"] for r in results] == [tokenizer.decode(a, skip_special_tokens=True) for a in alone]

        # a learned position table just past the longest prompt: its row gets fewer tokens than the rest
        longest = max(len(generation.prompt_ids(tokenizer, s)) for s in segments)
        monkeypatch.setattr(generation, "position_limit", lambda config: (longest + 4, True))
        alone = [generate(model, ids, s, NEW_TOKENS) for s in segments]
        assert len(alone[3]) <= 4 < max(len(a) for a in alone)
        assert generate_batch(model, ids, segments, NEW_TOKENS) == alone


@pytest.mark.parametrize("name", ["lora", "prompt_tuning"])  # (model.generate, and scaletune's own loop)
def test_predict_samples_with_a_temperature_reproducibly_and_nucleus_of_one_token_is_greedy(make_config, tmp_path,
                                                                                            name):
    """Completions were greedy only. --temperature samples, seeded (the same seed gives the same completions);
    a nucleus that holds the most probable token alone (--top-p near 0) is greedy decoding again."""
    cfg, adapter = _adapter(make_config, tmp_path, name)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))

    def completions(sampling):
        return [r["completion"] for r in run_predict(cfg, str(adapter), str(inp), NEW_TOKENS, out=io.StringIO(),
                                                     sampling=sampling)]

    greedy = completions(None)
    hot = {"temperature": 5.0, "top_p": 1.0, "seed": 1}
    first = completions(hot)
    assert completions(hot) == first and first != greedy
    assert completions({**hot, "seed": 2}) != first
    assert completions({"temperature": 1.0, "top_p": 1e-9, "seed": 3}) == greedy


def test_sampling_options_are_checked(capsys, make_config):
    from scaletune.cli import main

    path = make_config("causal_lm")
    for args, wanted in ((["--temperature", "-1"], "--temperature: must be a number >= 0"),
                         (["--temperature", "inf"], "--temperature: must be a number >= 0"),
                         (["--temperature", "1", "--seed", str(2**70)], "--seed: must be in [0, 2**63)"),
                         (["--seed", "3"], "--seed: sampling only"),
                         (["--temperature", "1", "--top-p", "0"], "--top-p: must be in (0, 1]"),
                         (["--top-p", "0.9"], "--top-p: sampling only; give a --temperature > 0 too")):
        assert main(["predict", str(path), *args]) == 2
        assert wanted in capsys.readouterr().err
    cls = make_config("seq_cls")
    assert main(["predict", str(cls), "--temperature", "1"]) == 2
    assert "only causal_lm samples completions" in capsys.readouterr().err


_QWEN_LIKE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _forced(model, tokens: list[int]):
    """`model` made to emit `tokens` one after the other (then the last one again), greedy, whatever the prompt:
    each forward adds a large logit to the next token of the script (one forward per new token, with or
    without a KV cache)."""
    calls = []

    def hook(_module, _inputs, logits):
        token = tokens[min(len(calls), len(tokens) - 1)]
        calls.append(token)
        bump = torch.zeros(logits.shape[-1])
        bump[token] = 1e4
        return logits + bump

    return model.get_output_embeddings().register_forward_hook(hook), calls


@pytest.mark.parametrize("cached", [True, False])
def test_a_completion_stops_at_the_templates_turn_end_token(tiny_llama, cached, monkeypatch):
    """A base model's generation_config names only its own EOS (Qwen2.5's <|endoftext|>), while its chat
    template ends each trained answer in <|im_end|>: the completion stops there. It went on to max_new_tokens,
    and what followed the skipped marker was the completion's tail."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import scaletune.generation as generation

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _QWEN_LIKE
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    model.resize_token_embeddings(len(tok))
    end, word = tok.convert_tokens_to_ids("<|im_end|>"), tok("kilo", add_special_tokens=False)["input_ids"]
    assert model.generation_config.eos_token_id != end
    if not cached:  # (prompt-learning adapters' loop)
        monkeypatch.setattr(generation, "is_prompt_learning", lambda _m: True)
    handle, calls = _forced(model, [*word, end, *word])
    try:
        segments = prompt_segments({"text": "alpha"}, tok)[1]
        assert generate_batch(model, tok, [segments], 12) == ["kilo"]
    finally:
        handle.remove()
    assert len(calls) == len(word) + 1  # (no forward after the marker)


def test_a_plain_text_turn_end_marker_is_not_in_the_completion(tiny_llama):
    """data.chat_template: chatml on a tokenizer without <|im_end|> as a token: the trained answer ends
    `<|im_end|></s>`, the marker as plain text; the completion is the answer without it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scaletune.data.templates import CHATML

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = CHATML
    assert "<|im_end|>" not in tok.all_special_tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    answer = tok("kilo<|im_end|>", add_special_tokens=False)["input_ids"]
    handle, _ = _forced(model, [*answer, tok.eos_token_id])
    try:
        segments = prompt_segments({"text": "alpha"}, tok)[1]
        assert generate_batch(model, tok, [segments], len(answer) + 4) == ["kilo"]
    finally:
        handle.remove()
