"""After training: `eval` and `predict` with a trained adapter (merge.py folds one into its base)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

import torch

from . import generation_metrics, predict_input
from .adapter_record import adapter_config, adapter_meta, check_held_out, check_rope_scaling
from .checkpoint import checkpoint_dirs
from .config import CAUSAL_TASKS, RunConfig
from .data import tokenised_differently
from .data.readers import WHERE
from .errors import ConfigError, UserError
from .fileutil import replaced_path
from .generation import generate_batch, prompt_segments
from .labelling import classify, is_multi_label, regress, tag
from .tasks.words import has_cjk

log = logging.getLogger("scaletune")
PREDICT_BATCH = 32  # lines labelled per forward (seq_cls, token_cls)
GENERATE_BATCH = 16  # prompts completed per `generate` (causal_lm): each row holds a KV cache
PREDICT_WINDOW = 8  # batches whose lines are grouped by length before they are written


def _adapter_dir(cfg: RunConfig, adapter: str | None) -> Path:
    """The adapter to load: `--adapter` (an adapter directory, or a checkpoint or run directory, whose
    adapter/ is used), else OUTPUT_DIR/adapter."""
    if not adapter:
        path = Path(cfg.output_dir) / "adapter"
        if not (path / "adapter_config.json").is_file():
            newest = checkpoint_dirs(Path(cfg.output_dir))
            also = f" (e.g. --adapter {newest[0]}, the newest checkpoint)" if newest else ""
            raise UserError(f"no trained adapter at {path} (adapter_config.json missing); train first or "
                            f"pass --adapter{also}{_replaced_note(path)}")
        _note_best_adapter(Path(cfg.output_dir))
        return path
    path = Path(adapter)
    if path.is_file() and path.name == "latest" and path.parent.name == "checkpoints":
        path = path.parent / path.read_text(encoding="utf-8").strip()  # the checkpoint it names
    if (path / "adapter_config.json").is_file():
        return path
    if (path / "adapter" / "adapter_config.json").is_file():
        # checkpoints/step-N/ (and a run's output_dir) hold the adapter in adapter/
        log.info("--adapter %s: using the adapter in its adapter/ subfolder", path)
        return path / "adapter"
    raise UserError(_not_an_adapter(path))


def _note_best_adapter(out: Path) -> None:
    """Say that the last step's adapter/ is used where train.best_metric also wrote best_adapter/: a user who
    asked for the best adapter would otherwise score the last one without a word."""
    from .best import BEST_DIR, best_record

    record = best_record(out / BEST_DIR)
    if record is not None:
        log.info("using %s, the last step's adapter; the best eval's (step %s, %s %.4g) is %s: --adapter %s",
                 out / "adapter", record["step"], record["metric"], float(record["value"]), out / BEST_DIR,
                 out / BEST_DIR)


def _replaced_note(path: Path) -> str:
    """Where a run stopped between the two renames that replace adapter/ or best_adapter/ (fileutil.replace_dir)
    left the previous one: otherwise the message says there is none, "train first", of a run that has it."""
    old = replaced_path(path)
    if not (old / "adapter_config.json").is_file():
        return ""
    return (f"; a run stopped while replacing it left the previous one in {old} (the run's next `train "
            f"--resume` restores or replaces it): --adapter {old}")


def _not_an_adapter(path: Path) -> str:
    """Why --adapter `path` cannot be loaded, naming what was looked for."""
    if not path.exists():
        return f"--adapter {path}: directory not found{_replaced_note(path)}"
    if not path.is_dir():
        return (f"--adapter {path}: is a file; pass the directory that holds adapter_config.json (an adapter "
                "directory) or adapter/adapter_config.json (a checkpoint directory)")
    # a run directory (before its adapter/ is written) or its checkpoints/: name a checkpoint to pass
    newest = checkpoint_dirs(path.parent if path.name == "checkpoints" else path)
    also = f"; it holds checkpoints, the newest is {newest[0]}" if newest else ""
    return (f"--adapter {path}: neither an adapter directory (no adapter_config.json) nor a checkpoint "
            f"directory (no adapter/adapter_config.json){also}")


def load_trained(cfg: RunConfig, adapter: str | None, tokenises: bool = True) -> tuple[Any, Any, Any, list[str] | None,
                                                                                      Path]:
    """(model in eval mode, tokenizer, task, labels, adapter dir) from a finished run. `tokenises`: the command
    tokenises inputs (eval, predict; not merge), which an adapter trained on other token ids should hear of."""
    from .hub import same_base
    from .model import load_model, load_tokenizer
    from .new_tokens import check_adapter_record
    from .new_tokens import restore as restore_new_tokens
    from .tasks import get_task

    path = _adapter_dir(cfg, adapter)
    meta = adapter_meta(path)
    if meta.get("task", cfg.task) != cfg.task:
        raise UserError(f"the adapter at {path} was trained for task {meta['task']}, the run config says "
                        f"task: {cfg.task}; use that run's config or another --adapter")
    # (a relative local path and the absolute one the adapter records name the same base: no warning)
    # (an adapter saved by plain peft or TRL has no scaletune.json: its adapter_config.json names the base)
    base = meta.get("base_model") if meta else adapter_config(path).get("base_model_name_or_path")
    if isinstance(base, str) and base and not same_base(base, cfg.model.name_or_path):
        # a moved or re-downloaded base is fine; a different one gives nonsense without an error
        log.warning("the adapter at %s was trained on %s; loading it onto %s", path, base, cfg.model.name_or_path)
    check_rope_scaling(cfg, path, meta)
    task = get_task(cfg.task)
    task.configure(cfg)
    task.setup_cached(meta)
    if not meta and cfg.task in CAUSAL_TASKS and cfg.data.format != "auto":
        from .data.formats import FORMATS

        # an adapter without scaletune.json (plain peft, TRL) does not say how it was trained: the config's
        # explicit data.format does (a plain predict line as it is for prompt_completion, not as a chat turn)
        task.format = FORMATS[cfg.data.format]
    labels = meta.get("labels") or _labels_of_foreign(cfg, task, path, meta)
    # an adapter from plain peft (save_pretrained) holds no tokenizer: the base's is the one it was trained with
    own = (path / "tokenizer_config.json").is_file()
    if not own:
        log.info("the adapter at %s has no tokenizer (tokenizer_config.json): using model.name_or_path's", path)
    tokenizer = load_tokenizer(cfg, str(path) if own else None)
    check_adapter_record(cfg, path, meta)  # (else peft indexes past the base's table: a bare IndexError)
    restore_new_tokens(tokenizer, meta)  # (the base is resized as training resized it: model.new_special_tokens)
    if tokenises and meta and (differs := tokenised_differently(meta.get("tokenisation"), cfg.task, tokenizer)):
        log.warning("the adapter at %s %s: its inputs here may be tokenised otherwise than the training data "
                    "was (a BOS token, the chat template's rendering)", path, differs)
    model = load_model(cfg, task, labels, tokenizer, adapter_path=str(path))
    model.eval()
    return model, tokenizer, task, labels, path


def _labels_of_foreign(cfg: RunConfig, task: Any, path: Path, meta: dict) -> list[str] | None:
    """The class names of a classifier adapter that has no scaletune.json (one saved by plain peft or TRL): its
    head's outputs are numbered, not named, so data.labels must name them, in order. Else every metric and
    predicted label failed with a TypeError traceback. Such an adapter's peft task_type must be the task's."""
    if meta:
        return None
    kind = adapter_config(path).get("task_type")
    if kind and task.peft_task_type and kind != task.peft_task_type:
        # (a SEQ_CLS head loads as a token tagger's, both are `classifier`: one label for every word, no error)
        raise UserError(f"the adapter at {path} is a peft {kind} adapter (adapter_config.json's task_type), "
                        f"task {cfg.task} needs {task.peft_task_type}; use a run config of its task or another "
                        "--adapter")
    if cfg.task not in ("seq_cls", "token_cls"):
        return None
    if cfg.data.labels:
        labels = [str(label) for label in cfg.data.labels]
        rows = _head_rows(path)
        if rows is not None and rows != len(labels):
            raise ConfigError(f"data.labels: {len(labels)} labels, but the classifier of the adapter at {path} "
                              f"has {rows} outputs", hint=f"name its {rows} labels, in the order of its outputs")
        return labels
    raise ConfigError(f"data.labels: the adapter at {path} has no scaletune.json (it was not saved by scaletune), "
                      "so the names of its classifier's outputs are unknown",
                      hint="set data.labels to its labels in the order of the head's outputs (the id2label of the "
                           "model it was trained with), e.g. data.labels='[neg, pos]'")


def _head_rows(path: Path) -> int | None:
    """The outputs of the classifier head an adapter saved (its modules_to_save copy), None where it saved none."""
    from peft.utils import load_peft_weights

    heads = [m.split(".")[-1] for m in adapter_config(path).get("modules_to_save") or []]
    for key, tensor in load_peft_weights(str(path), device="cpu").items():
        parts = key.split(".")
        if parts[-1] == "weight" and tensor.ndim == 2 and any(h in parts for h in heads):
            return int(tensor.shape[0])
    return None


def on_device(cfg: RunConfig, model: Any) -> tuple[Any, Any]:
    """(accelerator, model on its device) for eval and predict: the GPU where there is one, and the
    run's train.mixed_precision as its autocast, so labels, scores and losses are computed as training's
    evals computed them (fp16 needs a GPU: on a CPU, float32)."""
    from accelerate import Accelerator

    from .model import inference_precision

    acc = Accelerator(mixed_precision=inference_precision(cfg), cpu=not torch.cuda.is_available())
    if model.device.type != acc.device.type:  # (accelerate's "cuda" is the model's "cuda:0")
        model = model.to(acc.device)
    return acc, model


def run_eval(cfg: RunConfig, adapter: str | None, data: str | None, predictions: str | None = None,
             threshold: float | None = None, generate: bool = False, max_new_tokens: int | None = None) -> dict:
    """The adapter's metrics on the eval data; `predictions`: also write each example's line to that new file
    (the main process), in the data's order; `threshold` (multi-label seq_cls): the sigmoid a class must exceed
    to be predicted (None: 0.5); `generate` (causal_lm): also generate each answer with at most `max_new_tokens`
    new tokens (None: generation_metrics.DEFAULT_MAX_NEW_TOKENS), as predict does, and score it against the
    example's (generation_metrics)."""
    from .data import build_datasets, build_eval_only, build_held_out
    from .data.sources import describe
    from .evaluate import evaluate, evaluate_examples
    from .model import AUTOCAST_DTYPES, check_vocabulary

    path = _adapter_dir(cfg, adapter)  # (a missing adapter is the first thing to say)
    if data:
        cfg.data.eval, cfg.data.eval_fraction = data, None
    if not (cfg.data.eval or cfg.data.eval_fraction):
        raise ConfigError("nothing to evaluate: set data.eval (or data.eval_fraction) or pass --data FILE")
    if generate:
        generation_metrics.check_run(cfg)
    if not cfg.data.eval:
        check_held_out(cfg, path)
    if threshold is not None and cfg.task != "seq_cls":
        raise UserError(f"--threshold: {cfg.task} has no per-class decisions; only a multi-label seq_cls run has")
    model, tokenizer, task, labels, _ = load_trained(cfg, str(path))
    trained = getattr(getattr(task, "format", None), "name", None)  # (the eval file's replaces it below)
    if threshold is not None:
        if not is_multi_label(model):
            raise UserError(f"--threshold: the adapter at {path} is single-label (each example gets its most "
                            "probable class); a threshold applies to multi-label runs")
        task.set_threshold(threshold)
    acc, model = on_device(cfg, model)
    if cfg.train.chunked_loss and cfg.distributed.zero_stage != 3 and hasattr(task, "enable_chunked_loss"):
        # the loss as training's evals computed it (not under ZeRO-3, whose partitioned head it cannot use)
        task.enable_chunked_loss(model, AUTOCAST_DTYPES.get(acc.mixed_precision))
    cfg.data.labels = labels if labels else cfg.data.labels
    sources: list | None = [] if predictions or generate else None  # the record behind each eval example
    if cfg.data.eval:  # labels come from the adapter: the training file is not needed (or read)
        # problems are named by where the path came from: --data, or the config's data.eval
        evalset = build_eval_only(cfg, task, tokenizer, "--data" if data else "data.eval", sources)
    elif sources is not None:  # data.eval_fraction's held-out part, with the records its lines need
        evalset = build_held_out(cfg, task, tokenizer, sources)
    else:  # data.eval_fraction: the part of the training file that training held out
        evalset = build_datasets(cfg, task, tokenizer, None, for_eval=True)["eval"]
    check_vocabulary(model, tokenizer, {"eval": evalset}, "--data" if data else "data.eval")
    named = f"{'--data' if data else 'data.eval'} {cfg.data.eval}" if cfg.data.eval else "data.train"
    prepared = generation_metrics.prepare(task, tokenizer, trained, sources or [], named) if generate else []
    what = cfg.data.eval or f"the {cfg.data.eval_fraction:g} of {describe(cfg.data.train)} that training held out"
    log.info("eval: adapter %s on %d example(s) of %s%s", path, len(evalset), what,
             f" ({acc.num_processes} processes)" if acc.num_processes > 1 else "")
    budget = max_new_tokens or generation_metrics.DEFAULT_MAX_NEW_TOKENS
    micro = cfg.train.eval_batch_size or cfg.train.micro_batch_size
    try:
        added, generated = (generation_metrics.score(acc, model, tokenizer, prepared, budget,
                                                     batch_size=cfg.train.eval_batch_size)
                            if generate else ({}, None))
        if not predictions:
            return {**evaluate(acc, model, task, evalset, labels, micro, tokenizer.pad_token_id), **added}
        metrics, examples = evaluate_examples(acc, model, task, evalset, labels, micro, tokenizer.pad_token_id)
    except (torch.OutOfMemoryError, MemoryError) as exc:  # (a batch too large for this device: say which setting)
        raise _out_of_memory(cfg, "eval", micro, exc, generate) from None
    if acc.is_main_process:
        write_predictions(predictions, task, labels, *task.joined_examples(sources, examples), generated)
    return {**metrics, **added}


def _out_of_memory(cfg: RunConfig, command: str, micro: int, exc: BaseException, generate: bool) -> UserError:
    """The one-screen error of an eval or predict (`command`) that ran out of memory: its batch and what to lower."""
    from .metrics import peak_memory_mb

    where = f"GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "host RAM"
    half = max(2 if cfg.task == "kto" else 1, micro // 2)  # (kto's eval needs a batch's other examples)
    fixes = [f"train.eval_batch_size={half} (an override: `scaletune {command} RUN train.eval_batch_size={half}`)"
             ] if half < micro else []
    if generate:
        fixes.append("--max-new-tokens lower (each prompt of a batch keeps a cache of its tokens)")
    if cfg.data.max_length > 512:
        fixes.append(f"data.max_length={cfg.data.max_length // 2}")
    return UserError(f"out of memory in {command} (batch {micro}, max_length={cfg.data.max_length}, peak "
                     f"{peak_memory_mb():.0f} MiB of {where}): "
                     f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                     hint="cheapest first: " + "; ".join(fixes) if fixes else "a smaller model or a larger device")


def write_predictions(target: str, task: Any, labels: list[str] | None, records: list[dict],
                      examples: list[tuple], generated: list[dict] | None = None) -> None:
    """One JSON line per eval example (its record's file:line, the task's fields, then its `generated` scores)
    to the new file `target`; a file that appeared there since the arguments were checked is refused."""
    try:
        out = open(target, "x", encoding="utf-8")  # noqa: SIM115  (closed below; "x": never overwrite)
    except FileExistsError:
        raise UserError(f"--predictions {target}: exists; choose a new file (nothing is overwritten)") from None
    try:
        with out:
            for record, (pred, extra), more in zip(records, examples, generated or [{}] * len(examples), strict=True):
                line = {"line": record.get(WHERE), **task.example_line(pred, extra, record, labels), **more}
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
    except BaseException:  # (a full disk, Ctrl-C: the file is this call's, and cut short it refused the retry)
        Path(target).unlink(missing_ok=True)
        raise
    log.info("eval: %d example line(s) written to %s", len(examples), target)


@torch.no_grad()
def run_predict(cfg: RunConfig, adapter: str | None, source: str | None, max_new_tokens: int,
                out: TextIO | None = None, stdin: TextIO | None = None, sampling: dict | None = None,
                top_k: int | str | None = None, threshold: float | None = None,
                items: list[dict] | None = None) -> list[dict]:
    """Generate (causal_lm), label (seq_cls/token_cls) or score (seq_regression, reward); writes one JSON line per non-blank input line,
    whose "line" is that input's line number (blank lines are skipped). `sampling`: {temperature, top_p,
    seed} to sample completions (None: greedy). `top_k` (seq_cls): each line's "scores" lists that many
    classes ("all": every class), most probable first. `threshold` (multi-label seq_cls): the sigmoid a class
    must exceed to be in a line's "labels" (None: 0.5, as eval scores). `items`: the inputs already read
    (predict_input.given_inputs), instead of `source`."""
    out, stdin = out or sys.stdout, stdin or sys.stdin
    if sampling and cfg.task not in CAUSAL_TASKS:
        raise UserError(f"--temperature: {cfg.task} labels its inputs; only causal_lm samples completions")
    if cfg.task in ("seq_regression", "reward") and (top_k is not None or threshold is not None):
        raise UserError(f"{'--top-k' if top_k is not None else '--threshold'}: {cfg.task} has no classes; each "
                        f'line gets its predicted "{"reward" if cfg.task == "reward" else "score"}"')
    if top_k is not None and cfg.task != "seq_cls":
        raise UserError(f"--top-k: {cfg.task} has no class scores per input; only seq_cls lists its best classes")
    if threshold is not None and cfg.task != "seq_cls":
        raise UserError(f"--threshold: {cfg.task} has no per-class decisions; only a multi-label seq_cls run has")
    model, tokenizer, task, labels, path = load_trained(cfg, adapter)
    if threshold is not None and not is_multi_label(model):
        raise UserError(f"--threshold: the adapter at {path} is single-label (each line gets its most probable "
                        "class); a threshold applies to multi-label runs", hint="--top-k K lists the K most "
                        "probable classes with their scores")
    given = items is not None
    if items is None:
        items = predict_input.read_inputs(source, stdin, cfg.data.conll_columns,
                                          labels if cfg.task == "token_cls" else None)
    if not items:  # (a Python caller's empty list was named <stdin>, which it never read)
        log.warning("predict: %s", "no inputs were given" if given
                    else f"{predict_input.source_name(source)} holds no input lines")
    # every line is checked before the first prediction: a bad line 900 must not leave 899 lines written
    inputs = [_task_input(cfg, task, tokenizer, item) for item in items]
    _warn_unsegmented(task, inputs)
    _refuse_unembeddable(model, tokenizer, items, inputs)
    acc, model = on_device(cfg, model)
    results = []
    cut_lines = []  # where a token_cls input had words past max_length
    # Labelling goes PREDICT_BATCH lines per forward (4,360 SST-2 lines with MiniLM on 2 CPU cores: 43 s one
    # per forward, 30 s batched, both with ~7 s of loading), generation GENERATE_BATCH prompts per
    # `generate`. Each window of PREDICT_WINDOW batches is batched by length (in input order, half of what a
    # batch of real sentences computed was padding) and written in input order once it is done.
    step = cfg.train.eval_batch_size or (GENERATE_BATCH if cfg.task in CAUSAL_TASKS else PREDICT_BATCH)
    if sampling:
        torch.manual_seed(sampling["seed"])  # (the same input, seed and batch give the same completions)
        sampling = {"temperature": sampling["temperature"], "top_p": sampling["top_p"]}
    for start in range(0, len(items), step * PREDICT_WINDOW):
        window = range(start, min(start + step * PREDICT_WINDOW, len(items)))
        by_length = sorted(window, key=lambda i: (-_size(inputs[i]), i))
        answers: dict[int, dict] = {}
        for at in range(0, len(by_length), step):
            chunk = by_length[at:at + step]
            try:
                answers.update(zip(chunk, _answer(cfg, model, tokenizer, labels, [inputs[i] for i in chunk],
                                                  max_new_tokens, sampling, acc, top_k, threshold, task)))
            except (torch.OutOfMemoryError, MemoryError) as exc:  # (its lines so far are written)
                raise _out_of_memory(cfg, "predict", step, exc, cfg.task in CAUSAL_TASKS) from None
        for item, result in ((items[i], answers[i]) for i in window):
            if "truncated_words" in result or result.get("truncated"):
                cut_lines.append(item[WHERE])
            result = {"line": item[predict_input.LINE], **result}
            if cfg.task in CAUSAL_TASKS:
                result.update(_chat_with_answer(item, result["completion"]))
            out.write(json.dumps(result, ensure_ascii=False) + "\n")
            results.append(result)
    if cut_lines and cfg.task == "token_cls":
        log.warning('predict: %d of %d input(s) have words beyond data.max_length=%d sub-tokens (first: %s); the model '
                    'never saw those words, they are tagged "O", and each such line\'s "truncated_words" says how many',
                    len(cut_lines), len(results), cfg.data.max_length, cut_lines[0])
    elif cut_lines:
        log.warning('predict: %d of %d input(s) are longer than data.max_length=%d tokens (first: %s); each was '
                    'labelled by its first %d tokens, and its line says "truncated": true', len(cut_lines),
                    len(results), cfg.data.max_length, cut_lines[0], cfg.data.max_length)
    return results


def _size(given: Any) -> int:
    """Characters of one predict input (a prompt, a text pair, a word list): what its batch is grouped by."""
    if isinstance(given, list):  # token_cls' words
        return sum(len(word) + 1 for word in given)
    first, second = given  # (prompt, segments) or (text, pair)
    return len(first) + (len(second) if isinstance(second, str) else 0)


def _answer(cfg: RunConfig, model: Any, tokenizer: Any, labels: list[str] | None, batch: list, max_new_tokens: int,
            sampling: dict | None, acc: Any, top_k: int | str | None = None,
            threshold: float | None = None, task: Any = None) -> list[dict]:
    """One batch of predict inputs answered: completions, labels (with the `top_k` best classes), tags or
    rewards (`task`'s)."""
    with acc.autocast():
        if cfg.task in CAUSAL_TASKS:
            texts = generate_batch(model, tokenizer, [segments for _, segments in batch], max_new_tokens, sampling)
            return [{"prompt": prompt, "completion": text} for (prompt, _), text in zip(batch, texts)]
        if cfg.task == "seq_cls":
            return classify(model, tokenizer, labels, cfg.data.max_length, batch, top_k, threshold)
        if cfg.task == "seq_regression":
            return regress(model, tokenizer, cfg.data.max_length, batch)
        if cfg.task == "reward":
            return task.score_rows(model, tokenizer, cfg, batch)
        return tag(model, tokenizer, labels, cfg.data.max_length, batch, cfg.data.too_long == "split")


def _refuse_unembeddable(model: Any, tokenizer: Any, items: list[dict], inputs: list) -> None:
    """A line holding a token the model has no embedding row for (added to the tokenizer, the model not
    resized) is one error naming its file:line; torch's IndexError came from the embedding lookup."""
    from .model import beyond_embeddings, embedding_rows

    rows = embedding_rows(model, tokenizer)
    if rows is None:
        return
    for item, given in zip(items, inputs):
        if isinstance(given, tuple) and isinstance(given[1], list):  # causal_lm: (prompt, segments)
            texts = ["".join(text for text, _ in given[1])]
        else:  # seq_cls: (text, pair); token_cls: the words
            texts = [t for t in (given if isinstance(given, tuple) else [" ".join(given)]) if isinstance(t, str)]
        ids = {i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
        if max(ids, default=0) >= rows:
            raise UserError(f"{item[WHERE]}: holds {', '.join(beyond_embeddings(tokenizer, rows, ids))}, which the "
                            f"model has no embedding for (ids below {rows} only)",
                            hint="tokens added to the tokenizer need new embedding rows in the model (see train's "
                                 "message), or leave them out of the input")


def _chat_with_answer(item: dict, completion: str) -> dict:
    """A chat line's conversation (its reference answer, a closing assistant turn, left out) with the completion as
    its answer, in the line's own keys: {"messages": [...]} or {"conversations": [...]}; {} for a plain prompt.
    A reward model's `predict` reads such a line as it is: generated answers go on to be scored with their
    whole conversation (`prompt` keeps only the last user turn)."""
    for key in ("messages", "conversations", "prompt"):
        turns = item.get(key)
        if not (isinstance(turns, list) and turns and all(isinstance(t, dict) for t in turns)):
            continue
        sharegpt = "from" in turns[-1]
        if (turns[-1].get("from") if sharegpt else turns[-1].get("role")) in ("assistant", "gpt"):
            turns = turns[:-1]
        answer = {"from": "gpt", "value": completion} if sharegpt else {"role": "assistant", "content": completion}
        return {"messages" if key == "prompt" else key: [*turns, answer]}
    return {}


def _task_input(cfg: RunConfig, task: Any, tokenizer: Any, item: dict) -> Any:
    """What the model is given for one line, read by the columns the run was trained with: (prompt, segments),
    (text, pair) or words. A line without usable input is a DataError naming its file:line."""
    if cfg.task in CAUSAL_TASKS:
        from .tasks.causal_lm import rename_columns

        rename_columns([item], cfg.data.columns)
        predict_input.check_prompt_input(item)
        trained = getattr(getattr(task, "format", None), "name", None)
        prompt, segments = prompt_segments(item, tokenizer, trained)
        predict_input.check_prompt(prompt, item[WHERE])
        return prompt, segments
    if cfg.task == "reward":  # (answer, segments): a prompt and its answer, rendered as a pair's side
        return task.predict_input(item, tokenizer)
    if cfg.task in ("seq_cls", "seq_regression"):
        return predict_input.seq_cls_input(item, *predict_input.text_columns(task, cfg))
    return predict_input.token_cls_input(item, predict_input.tokens_column(task, cfg),
                                         getattr(task, "cjk_chars", None) is True)


def _warn_unsegmented(task: Any, inputs: list) -> None:
    """Warn where raw Chinese/Japanese text goes to a tagger trained on segmented words of those scripts: no
    rule splits such text into words (runs of characters are one word each); a word list is what it needs."""
    if getattr(task, "cjk_chars", None) is not False:
        return
    first = next((w for w in inputs if isinstance(w, predict_input.TextWords) and has_cjk(w.text)), None)
    if first is not None:
        log.warning("predict: the tagger was trained on Chinese/Japanese text split into words, and a raw 'text' "
                    "line in those scripts is split only at spaces and punctuation (each run of characters one "
                    "word); give such lines as word lists ({\"tokens\": [...]}) segmented as the training data was")
