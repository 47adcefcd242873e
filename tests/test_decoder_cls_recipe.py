"""README's plain-peft recipe for a decoder classifier's adapter scores as `eval` does where the base's
tokenizer has no pad token (training pads with eos and reads each text before a closing eos)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from scaletune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _eos_closing_base_without_pad(tiny_llama: Path, out: Path) -> Path:
    """tiny_llama whose tokenizer has no pad token and closes every text with eos (Llama's add_eos_token);
    its config.json keeps pad_token_id 2 (<pad>), as a base's config may name an id its tokenizer does not pad with."""
    shutil.copytree(tiny_llama, out)
    conf = json.loads((out / "tokenizer_config.json").read_text())
    conf.pop("pad_token")
    (out / "tokenizer_config.json").write_text(json.dumps(conf))
    tok = json.loads((out / "tokenizer.json").read_text())
    special = {name: {"id": name, "ids": [i], "tokens": [name]} for name, i in (("<s>", 0), ("</s>", 1))}
    seq = [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
           {"SpecialToken": {"id": "</s>", "type_id": 0}}]
    tok["post_processor"] = {"type": "TemplateProcessing", "single": seq, "pair": seq[:2] + [
        {"Sequence": {"id": "B", "type_id": 1}}, seq[2]], "special_tokens": special}
    (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


def test_readme_recipe_for_a_decoder_classifier_scores_as_eval(capsys, make_config, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base_dir = _eos_closing_base_without_pad(tiny_llama, tmp_path / "base")
    path = make_config("seq_cls", model={"name_or_path": str(base_dir), "dtype": "float32"})
    assert main(["train", str(path)]) == 0
    assert main(["eval", str(path), "--predictions", str(tmp_path / "pred.jsonl")]) == 0
    capsys.readouterr()
    lines = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    adapter = str(tmp_path / "run" / "adapter")
    # the recipe as README gives it (the adapter/ row of the output table)
    assert ("pad_token_id=AutoTokenizer.from_pretrained(path).pad_token_id)" in (ROOT / "README.md").read_text())
    labels = json.load(open(f"{adapter}/scaletune.json"))["labels"]
    tok = AutoTokenizer.from_pretrained(adapter)
    assert tok.pad_token == "</s>" and tok("x")["input_ids"][-1] == 1  # (the case: pad = eos, closing each text)
    base = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}, pad_token_id=tok.pad_token_id)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        for line in lines:
            probs = model(**tok(line["text"], return_tensors="pt")).logits[0].softmax(-1)
            assert abs(probs[labels.index(line["predicted"])].item() - line["score"]) < 1e-5, line


def test_texts_ending_in_a_pad_token_that_is_a_text_token_are_warned(caplog, make_config, tiny_llama, tmp_path):
    """A pad token that is a token of text ('.') makes every text ending in it scored one token earlier (the
    sequence head reads the last non-pad token): consistent everywhere, so nothing failed, but silently."""
    from stutil import cls_records, write_jsonl

    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    conf = json.loads((base / "tokenizer_config.json").read_text())
    conf["pad_token"] = "."
    (base / "tokenizer_config.json").write_text(json.dumps(conf))
    records = cls_records(16)
    for record in records[:5]:
        record["text"] += "."
    data = write_jsonl(tmp_path / "dotted.jsonl", records)
    evald = write_jsonl(tmp_path / "dotted_eval.jsonl", records[2:10])
    for name_or_path, warned in ((tiny_llama, False), (base, True)):
        path = make_config("seq_cls", model={"name_or_path": str(name_or_path)},
                           data={"train": str(data), "eval": str(evald)}, train={"max_steps": 1})
        caplog.clear()
        assert main(["train", str(path), f"output_dir={tmp_path / f'run_{warned}'}"]) == 0
        assert ("data.train: 5 tokenised text(s) end in the tokenizer's pad token '.'" in caplog.text) is warned
        assert ("data.eval: 3 tokenised text(s) end in the tokenizer's pad token '.'" in caplog.text) is warned
    # a held-out fraction: each side counts its own rows (both are index mappings over one table)
    every = write_jsonl(tmp_path / "all_dotted.jsonl", [{**r, "text": r["text"].rstrip(".") + "."} for r in records])
    path = make_config("seq_cls", model={"name_or_path": str(base)},
                       data={"train": str(every), "eval": None, "eval_fraction": 0.25}, train={"max_steps": 1})
    caplog.clear()
    assert main(["train", str(path), f"output_dir={tmp_path / 'run_split'}"]) == 0
    counts = [int(m) for m in re.findall(r"data\.(?:train|eval): (\d+) tokenised text\(s\) end in", caplog.text)]
    assert len(counts) == 2 and sum(counts) == 16 and counts[1] < counts[0], caplog.text
