"""`scaletune eval --generate` (causal_lm): each eval example's answer generated from its prompt as `predict`
generates it, compared with the example's reference answer by SQuAD-style exact match and token F1."""

from __future__ import annotations

import argparse
import logging
import math
import re
import string
import unicodedata
from collections import Counter
from typing import Any

from .errors import ConfigError, DataError, UserError

log = logging.getLogger("scaletune")

DEFAULT_MAX_NEW_TOKENS = 128  # longer than predict's 64: a reference cut short can never match exactly
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, punctuation removed (SQuAD's, `string.punctuation`, and any other Unicode
    punctuation), the articles a/an/the removed, whitespace collapsed to single spaces. (string.punctuation holds
    ASCII symbols that Unicode files as symbols, not punctuation, `$+<=>^`|~`: SQuAD scores "$5" as "5".)"""
    text = "".join(ch for ch in text.lower()
                   if ch not in _ASCII_PUNCTUATION and not unicodedata.category(ch).startswith("P"))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(generated: str, reference: str) -> float:
    """1.0 where the two answers are equal once normalised, else 0.0."""
    return float(normalize_answer(generated) == normalize_answer(reference))


def token_f1(generated: str, reference: str) -> float:
    """F1 of the normalised answers' whitespace tokens (counted with multiplicity). Two empty answers agree
    (1.0), as SQuAD 2.0 scores them; one empty answer scores 0.0."""
    ours, theirs = normalize_answer(generated).split(), normalize_answer(reference).split()
    if not ours or not theirs:
        return float(ours == theirs)
    same = sum((Counter(ours) & Counter(theirs)).values())
    if not same:
        return 0.0
    precision, recall = same / len(ours), same / len(theirs)
    return 2 * precision * recall / (precision + recall)


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of the normalised answers' whitespace tokens (the same tokens as
    token_f1, so in order where token_f1 ignores it) over their lengths. Empty answers score as in token_f1."""
    ours, theirs = normalize_answer(generated).split(), normalize_answer(reference).split()
    if not ours or not theirs:
        return float(ours == theirs)
    row = [0] * (len(theirs) + 1)  # LCS lengths of ours[:i] against each prefix of theirs, one row at a time
    for word in ours:
        diagonal = 0
        for j, other in enumerate(theirs, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if word == other else max(row[j], row[j - 1])
    if not row[-1]:
        return 0.0
    precision, recall = row[-1] / len(ours), row[-1] / len(theirs)
    return 2 * precision * recall / (precision + recall)


# an answer's scores against its reference, in eval's metrics (their means) and each --predictions line
GENERATED_SCORES = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}


def arg_problems(args: argparse.Namespace) -> list[str]:
    """eval's --generate/--max-new-tokens problems (cli.check_args): --max-new-tokens needs --generate, and
    must be >= 1 as predict's."""
    max_new, generating = getattr(args, "max_new_tokens", None), getattr(args, "generate", False)
    if max_new is None:
        return []
    if not generating:
        return ["--max-new-tokens: generation only; give --generate too"]
    return [] if max_new >= 1 else [f"--max-new-tokens: must be >= 1, got {max_new}"]


def check_run(cfg: Any) -> None:
    """Refuse --generate before the model is loaded where it cannot work: another task, plain-text data. (Launched
    over several processes, each holds the whole model and generates a share of the answers: `score`.)"""
    if cfg.task in ("dpo", "kto", "reward"):  # (dpo, kto generate in `predict`, but eval scores the data's answers)
        raise UserError(f"--generate: {cfg.task}'s eval scores the data's own answers (their rewards); generating "
                        "answers to score is causal_lm's" + (" (`predict` generates with this adapter)"
                                                            if cfg.task != "reward" else ""))
    if cfg.task != "causal_lm":
        raise UserError(f"--generate: {cfg.task} labels its inputs; only causal_lm generates answers (its metrics "
                        "are the eval's own)")
    if cfg.data.format == "text":
        raise ConfigError(_TEXT_REFUSAL.format(what="data.format: text"))


_TEXT_REFUSAL = ("--generate: {what} is plain text (pretraining data): it has no prompt and reference answer to "
                 "compare a generated answer with; use instruction data (alpaca, sharegpt, messages, "
                 "prompt_completion) or drop --generate")


def prepare(task: Any, tokenizer: Any, trained_format: str | None, records: list[dict], source: str,
            key: str = "--generate") -> list[tuple]:
    """(prompt segments, reference answer, the record's file:line) of each eval record, in order: the prompt as
    `predict` renders the same line for an adapter trained on `trained_format`, the reference the final
    assistant turn; `source` names the eval file (e.g. "--data FILE") in a refusal of plain text, `key` what
    asked for the answers (--generate, train.eval_generate). Every record is checked here, before any generation
    (a bad record 900 must not cost 899 completions)."""
    from .data.readers import WHERE
    from .generation import prompt_segments
    from .predict_input import check_prompt, check_prompt_input

    name = getattr(getattr(task, "format", None), "name", None)
    if name == "text":
        raise DataError(_TEXT_REFUSAL.format(what=source).replace("--generate", key))
    prepared = []
    for record in records:  # (data.columns was applied to these records when they were read: not again)
        check_prompt_input(record)
        prompt, segments = prompt_segments(record, tokenizer, trained_format)
        check_prompt(prompt, record[WHERE])
        prepared.append((segments, reference_answer(record, key), record[WHERE]))
    return prepared


def prepare_for_training(cfg: Any, task: Any, tokenizer: Any) -> list[tuple]:
    """`prepare`'s list for train.eval_generate: the first N eval examples (true: all) of data.eval, or of the part
    of data.train that data.eval_fraction holds out, split as training splits it. Read again here: the tokenised
    eval set keeps neither prompts nor answers as text."""
    from .data import split_eval
    from .data.sources import describe, read_capped, read_train_records
    from .tasks.base import TOO_LONG
    from .tasks.causal_lm import rename_columns

    d, wanted = cfg.data, cfg.train.eval_generate
    if d.eval:
        # (the examples training read and scores: data.max_samples' cut, said when they were read)
        records = read_capped(d.eval, key="data.eval", conll=False, max_samples=d.max_samples, quiet=True)
        key, source = "data.eval", f"data.eval {d.eval}"
    else:
        records, _ = read_train_records(d.train, conll=False, max_samples=d.max_samples, quiet=True)
        records, key = split_eval(records, d.eval_fraction, cfg.train.seed)[1], "data.train"
        source = f"the held-out part of {describe(d.train)}"
    rename_columns(records, d.columns, key)
    scored = []  # the examples the eval's loss is scored on, as `eval --generate` takes them: those with a target
    for record in records:  # token within data.max_length
        if len(scored) == (len(records) if wanted is True else wanted):
            break
        encoded = task.encode(record, tokenizer, cfg, None)
        if encoded is not None and encoded != {TOO_LONG: True}:  # (data.too_long: drop left it out of the eval set)
            scored.append(record)
    return prepare(task, tokenizer, task.format.name, scored, source, key="train.eval_generate")


def reference_answer(record: dict, key: str = "--generate") -> str:
    """The record's answer to compare with, the one its prompt leaves out: the `answer` of the format that prompts
    a line of its shape (data/formats.py, as `prompt_segments` picks it): alpaca's `output`, prompt_completion's
    `completion`, a conversation's final turn where that is the assistant's (sharegpt's gpt, messages' assistant)."""
    from .data.formats import prompting
    from .data.readers import WHERE

    taken = prompting(record, False)  # (which format takes a line does not depend on the trained one)
    if taken is None:
        raise DataError(f"{record.get(WHERE, '?')}: {key}: no data format reads this record")
    return taken[0].answer(record, key)


def as_decoded(tokenizer: Any, reference: str) -> str:
    """`reference` as a generated answer of the same tokens reads: decoding skips special tokens, so a reference
    holding one (a model.new_special_tokens marker in the data, <think> say) could never be matched; others as
    they are (a round trip may respace them)."""
    if not any(tok in reference for tok in tokenizer.all_special_tokens):
        return reference
    return tokenizer.decode(tokenizer(reference, add_special_tokens=False)["input_ids"], skip_special_tokens=True)


def score(acc: Any, model: Any, tokenizer: Any, prepared: list[tuple], max_new_tokens: int,
          stop_check: Any = None, batch_size: int | None = None) -> tuple[dict, list]:
    """(eval's added metrics: the means of GENERATED_SCORES and generated_examples, one dict per example
    {generated, reference, and its GENERATED_SCORES}): greedy completions, `batch_size` (default GENERATE_BATCH) prompts a
    `generate` grouped by length, as predict batches them (a row's completion does not depend on its batch).
    Several processes each generate a share of the prompts (each holds the whole model) and all get every
    answer. `stop_check` (evaluate.StopCheck, during training): EvalStopped when it names a signal."""
    import torch

    from .evaluate import EvalStopped
    from .generation import generate_batch
    from .infer import GENERATE_BATCH
    from .progress import Progress

    order = sorted(range(len(prepared)), key=lambda i: (-sum(len(s) for s, _ in prepared[i][0]), i))
    mine = order[acc.process_index::acc.num_processes]  # (dealt longest first: the shares' work evens out)
    size = batch_size or GENERATE_BATCH
    batches = [mine[at:at + size] for at in range(0, len(mine), size)]
    progress = Progress(len(batches), "generate", "batches", shown=acc.is_main_process)
    generated: dict[int, str] = {}
    # (as many rounds on every rank, a share one batch short sitting its last out: stop_check is a collective)
    rounds = math.ceil(math.ceil(len(order) / acc.num_processes) / size)
    for batch in batches + [[]] * (rounds - len(batches)):
        if stop_check is not None and (signum := stop_check()) is not None:
            progress.close()
            raise EvalStopped(signum)
        if not batch:
            continue
        progress.update()
        with torch.no_grad(), acc.autocast():
            texts = generate_batch(model, tokenizer, [prepared[i][0] for i in batch], max_new_tokens)
        generated.update(zip(batch, texts))
    progress.close()
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        generated = dict(gather_object(list(generated.items())))
    shown = {ref: as_decoded(tokenizer, ref) for _, ref, _ in prepared}
    lines = [{"generated": generated[i], "reference": reference,
              **{name: fn(generated[i], shown[reference]) for name, fn in GENERATED_SCORES.items()}}
             for i, (_, reference, _) in enumerate(prepared)]
    n = max(len(lines), 1)
    metrics = {**{name: sum(ln[name] for ln in lines) / n for name in GENERATED_SCORES},
               "generated_examples": len(lines)}
    return metrics, lines


def score_during_training(run: Any, stop_check: Any = None) -> dict:
    """train.eval_generate at `run.step`: the answers to the prepared eval examples, generated by the model as it
    is now (in eval mode: no dropout, no NEFTune noise), their metrics returned and each answer written by the
    main process to OUTPUT_DIR/generations/step-S.jsonl, one line per example in the eval data's order."""
    import json

    from .trainable_state import unwrap

    model = unwrap(run.accelerator, run.model)  # (generate is the peft model's, not DDP's or DeepSpeed's)
    was_training = model.training
    model.eval()
    try:
        metrics, lines = score(run.accelerator, model, run.tokenizer, run.generation, run.cfg.train.eval_max_new_tokens,
                               stop_check, run.cfg.train.eval_batch_size)
    finally:
        model.train(was_training)
    if run.accelerator.is_main_process:
        folder = run.output_dir / "generations"
        try:
            folder.mkdir(exist_ok=True)
            with open(folder / f"step-{run.step}.jsonl", "w", encoding="utf-8") as out:
                for (_, _, where), line in zip(run.generation, lines, strict=True):
                    out.write(json.dumps({"line": where, **line}, ensure_ascii=False) + "\n")
        except OSError as exc:  # (the metrics still count: a full disk costs the file, not the run)
            log.warning("could not write %s: %s", folder / f"step-{run.step}.jsonl", exc.strerror or exc)
    return metrics
