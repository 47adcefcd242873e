"""causal_lm: supervised instruction tuning with prompt masking; eval = loss + perplexity."""

from __future__ import annotations

import bisect
import functools
import inspect
import itertools
import logging
import math
from typing import Any

import torch

from ..data.formats import detect, get_format, ignored_fields, refuse_preference_data
from ..data.readers import WHERE
from ..data.render import to_segments
from ..errors import ConfigError, DataError
from ..trainable_state import unwrap
from .base import IGNORE, TOO_LONG, TRUNCATED, UNSTOPPED, Task, ce_sum, pad_batch, register

log = logging.getLogger("scaletune")


@functools.lru_cache(maxsize=8)
def _accepts_by_class(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the underlying transformers model can slice hidden states before its LM head."""
    inner = unwrap(None, model)
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    return _accepts_by_class(type(inner))


def _virtual_tokens(model: Any) -> int:
    """How many positions a prompt-learning adapter prepends to the model's input (and so to its logits):
    prompt tuning and p-tuning add `num_virtual_tokens`; prefix tuning puts its prefix in the attention cache
    instead, and other methods add nothing."""
    inner = unwrap(None, model)
    configs = getattr(inner, "peft_config", None)
    if not isinstance(configs, dict):
        return 0
    pc = configs.get(getattr(inner, "active_adapter", "default"))
    if not getattr(pc, "is_prompt_learning", False) or str(getattr(pc, "peft_type", "")).endswith("PREFIX_TUNING"):
        return 0
    return int(pc.num_virtual_tokens) * int(getattr(pc, "num_transformer_submodules", None) or 1)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (row * width + t) of the positions t whose next token is a target: the rows of
    `hidden.reshape(-1, h)` the loss needs; their labels sit one index further."""
    has_target = torch.zeros_like(labels, dtype=torch.bool)
    has_target[:, :-1] = labels[:, 1:] != IGNORE
    return has_target.flatten().nonzero().squeeze(1)


def target_columns(labels: torch.Tensor) -> torch.Tensor:
    """The positions t (columns) at which some row's next token is a target: the logits the usual loss
    needs."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's special token ids: its named ones and every added token marked special (<|im_end|>, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return frozenset(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}


def closing_special(ids: list[int], tokenizer: Any, special: frozenset[int]) -> int | None:
    """The id in `special` that `ids` end with, before any whitespace tokens, or None."""
    for tid in reversed(ids):
        if tid in special:
            return tid
        if tokenizer.decode([tid]).strip():
            return None
    return None


@register("causal_lm")
class CausalLM(Task):
    peft_task_type = "CAUSAL_LM"
    # model.attn_implementation == "varlen": pass segment bounds to the model. Private, set by `configure`: a
    # public attribute is kept in the tokenised-data cache's meta, whose key holds no model.* setting (a run
    # with varlen that found the entry of a run without it silently attended through SDPA)
    _varlen = False
    mixed = False  # records in several conversation formats (auto-detected): each record's own is detected

    def auto_model_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def configure(self, cfg: Any) -> None:
        self._varlen = cfg.model.attn_implementation == "varlen"

    def setup(self, records: list[dict], cfg: Any, source: str, key: str = "data.train") -> list[str] | None:
        rename_columns(records, cfg.data.columns, key)
        self.format = get_format(cfg.data.format, records, source)
        if cfg.data.format == "auto":
            self._allow_mixing(records, key)
        # (an explicit data.format is checked with the config; auto's choice is known only here)
        if cfg.data.chat_template is not None and not self.format.chat:
            raise ConfigError(f"data.chat_template: {source} holds {self.format.name} records, which are not "
                              "conversations; no template renders them (drop data.chat_template)")
        if cfg.data.train_on_prompt and self.format.name == "text":
            raise ConfigError(f"data.train_on_prompt: {source} holds text records, which have no prompt (all of "
                              "each is trained already)")
        if cfg.data.train_on_last_turn and not self.format.chat:
            raise ConfigError(f"data.train_on_last_turn: {source} holds {self.format.name} records, which are not "
                              "conversations; they have no turns (drop data.train_on_last_turn)")
        if cfg.data.too_long == "split" and self.format.name != "text":
            raise ConfigError(f"data.too_long: split cuts plain text into pieces; {source} holds {self.format.name} "
                              "records, whose pieces would lose their prompt (use drop or truncate)")
        return None

    def check_eval(self, records: list[dict], cfg: Any, source: str) -> None:
        rename_columns(records, cfg.data.columns)
        refuse_preference_data(records, source)  # (KTO's undesirable answers would be scored as targets)
        if cfg.data.format != "auto":
            return
        try:
            detect(records, source)
        except DataError:
            return  # its own records' errors say more
        # (else: "field 'instruction' must be a string, got NoneType" on line 1)
        self._allow_mixing(records, "data.eval", against="data.train",
                           hint="convert one of them, or score the eval file alone: `scaletune eval --data FILE`")

    def _allow_mixing(self, records: list[dict], key: str, **refusal: str) -> None:
        """Conversation formats render alike (a chat): records in alpaca, sharegpt and messages may be mixed,
        each then read in its own (`mixed`). Plain text and prompt/completion are trained without a template:
        one of them is a run's only format, and a record beside another is refused (`_refuse_unmixable`)."""
        others = _other_formats(records, self.format)
        if others and not all(f.chat for f in (self.format, *others)):
            _refuse_unmixable(records, self.format, key, **refusal)
        self.mixed = self.mixed or bool(others)

    def _format_of(self, record: dict) -> Any:
        """The format `record` is read in: the run's, or in a mixed run the one its columns name (a record no
        format matches gets the run's, whose error names the field it lacks)."""
        if not self.mixed or self.format.holds(record):
            return self.format
        try:
            return detect([record], "?")
        except DataError:
            return self.format

    def ignored_fields(self, records: list[dict], key: str) -> str | None:
        by_format: dict[Any, list[dict]] = {}
        for rec in records:
            by_format.setdefault(self._format_of(rec), []).append(rec)
        notes = [ignored_fields(fmt, group, key) for fmt, group in by_format.items()]
        return "; ".join(note for note in notes if note) or None

    def encode(self, record: dict, tokenizer: Any, cfg: Any, label2id: dict | None) -> dict | None:
        try:
            converted = self._format_of(record).convert(record)
            if cfg.data.train_on_last_turn:
                converted = last_turn_only(converted)
            segments = to_segments(converted, tokenizer, record.get(WHERE, "?"))
        except DataError as exc:
            raise mapped_names(exc, cfg.data.columns) from None
        ids, labels, unstopped = self.tokens(segments, tokenizer, cfg.data.train_on_prompt)
        n = cfg.data.max_length
        if len(ids) > n and cfg.data.too_long == "drop":
            return {TOO_LONG: True}
        if len(ids) > n and cfg.data.too_long == "split":
            # Pieces overlap by one token: a piece's first token is never a target (nothing before it in the
            # row), so it is the previous piece's last, and each token after the text's first is a target once.
            pieces = [{"input_ids": ids[at:at + n], "labels": labels[at:at + n]} for at in range(0, len(ids) - 1, n - 1)]
            pieces = [p for p in pieces if any(lab != IGNORE for lab in p["labels"][1:])]
            return [{**pieces[0], TOO_LONG: True}, *pieces[1:]] if pieces else None
        truncated = len(ids) > n
        ids, labels = ids[:n], labels[:n]
        # After the shift, label[0] is never predicted; an example needs a target past position 0.
        if not any(lab != IGNORE for lab in labels[1:]):
            return None
        return {"input_ids": ids, "labels": labels, TRUNCATED: truncated, UNSTOPPED: unstopped and not truncated}

    def tokens(self, segments: list[tuple[str, Any]], tokenizer: Any,
               train_on_prompt: bool = False) -> tuple[list[int], list[int], bool]:
        """(token ids, labels, whether an answer ends in no special token) of rendered `segments`, uncut."""
        ids: list[int] = []
        labels: list[int] = []
        bos = leading_bos(tokenizer)
        if bos is not None and segments and not segments[0][0].startswith(tokenizer.bos_token):
            ids.append(bos)
            labels.append(IGNORE)
        unstopped = False
        for (_, trainable), piece in zip(segments, _tokenise_segments(tokenizer, segments)):
            ids += piece
            # train_on_prompt trains the context too, but never an answer the data marks as not to be learnt
            learn = trainable or (train_on_prompt and trainable is not None)
            labels += piece if learn else [IGNORE] * len(piece)
            unstopped = unstopped or (trainable is True and not self._ends_in_special(piece, tokenizer))
        return ids, labels, unstopped

    _special: tuple[Any, frozenset] | None = None  # (tokenizer, its special token ids) for _ends_in_special

    def _ends_in_special(self, piece: list[int], tokenizer: Any) -> bool:
        """Whether an answer's tokens end, before any whitespace, in a special token (EOS, <|im_end|>, ...):
        what teaches a model to stop."""
        if self._special is None or self._special[0] is not tokenizer:
            # (not UNK: a marker the vocabulary lacks, chatml's <|im_end|> under WordPiece, ends in [UNK] pieces)
            self._special = (tokenizer, special_ids(tokenizer) - {tokenizer.unk_token_id})
        return closing_special(piece, tokenizer, self._special[1]) is not None

    def collate(self, examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        if "position_ids" in examples[0]:
            from ..data.packing import collate_packed  # (data.packing imports tasks.base)

            batch = collate_packed(examples, pad_id)
        else:
            from ..attention import segment_bounds

            batch = pad_batch(examples, pad_id)
            # each row's tokens, then its padding, as segments for the varlen attention kernel
            batch["cu_seq_lens"] = segment_bounds([[len(e["input_ids"])] for e in examples],
                                                  batch["input_ids"].shape[1])
        # Found here, on the CPU: on the GPU, nonzero() makes the CPU wait for the GPU mid-step.
        batch["target_index"] = target_positions(batch["labels"])
        batch["target_columns"] = target_columns(batch["labels"])
        return batch

    _head: Any = None  # the frozen LM head when train.chunked_loss is in use (see enable_chunked_loss)
    _head_dtype: Any = None  # what it computes in: the autocast dtype under mixed precision
    _hidden: Any = None  # the decoder's last hidden state, caught by a forward hook for one loss_sum call
    _catch: bool = False
    _checked: bool = False

    def enable_chunked_loss(self, model: Any, autocast_dtype: torch.dtype | None = None) -> str | None:
        """Compute the loss a chunk of target tokens at a time through `model`'s head (tasks/chunked_ce.py).
        Returns why that cannot be done for this model (the usual path is kept), or None."""
        from .chunked_ce import chunkable_head, decoder_of

        head, why_not = chunkable_head(model)
        if head is None:
            return why_not
        # The decoder's own output is the head's input. Catching it with a forward hook (a public
        # torch API) instead of asking for output_hidden_states keeps every layer's hidden state from
        # being returned, and, under accelerate's autocast wrapper, converted to float32.
        decoder_of(model).register_forward_hook(self._catch_hidden)
        self._head, self._head_dtype = head, autocast_dtype or head.weight.dtype
        return None

    def _catch_hidden(self, module: Any, args: Any, output: Any) -> None:
        if self._catch:
            self._hidden = output[0]  # BaseModelOutputWithPast.last_hidden_state (or a tuple's first)

    def loss_sum(self, model: Any, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
        if self._varlen and "cu_seq_lens" in batch:  # transformers hands these to the attention function
            width = batch["input_ids"].shape[1]
            inputs.update(cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                          max_length_q=width, max_length_k=width)
        if self._head is not None and (total := self._chunked_loss_sum(model, inputs, batch)) is not None:
            return total, None
        # Position t predicts token t+1. Only positions that have a target need logits: with prompt
        # masking that skips the vocabulary projection (and its float32 loss) for every prompt token.
        labels = batch["labels"][:, 1:]
        keep = batch.get("target_columns")
        keep = target_columns(batch["labels"]) if keep is None else keep
        # Prompt and p-tuning put their virtual tokens in front of the sequence, logits included: token t's
        # logits sit at t + that many (not shifting trains each position to predict several tokens ahead).
        at = keep + _virtual_tokens(model)
        if _accepts_logits_to_keep(model):
            logits = model(**inputs, use_cache=False, logits_to_keep=at).logits
        else:
            logits = model(**inputs, use_cache=False).logits[:, at]
        return ce_sum(logits, labels[:, keep]), logits

    def _chunked_loss_sum(self, model: Any, inputs: dict, batch: dict) -> torch.Tensor | None:
        from .chunked_ce import head_cross_entropy

        # Through the model's own forward (DDP / DeepSpeed hooks stay in charge); logits only for the
        # last position, which also checks that head(last hidden state) is what the model computes.
        self._catch = True
        try:
            out = model(**inputs, use_cache=False, logits_to_keep=1)
            hidden = self._hidden
        finally:
            self._catch, self._hidden = False, None
        # The head in the dtype the model's own call used (autocast), cast once for the check and the loss.
        dtype = self._head_dtype
        w, b = self._head.weight.to(dtype), self._head.bias
        b = None if b is None else b.to(dtype)
        # logits == head(hidden) is a property of the model, not of the batch: checked on the first call
        # only (the comparison waits for the GPU, which would stall every micro-batch).
        if hidden is None or not (self._checked or _same_logits(
                torch.nn.functional.linear(hidden[:, -1:].to(dtype), w, b), out.logits[:, -1:])):
            log.warning(
                "train.chunked_loss: this model's logits are not head(last hidden state); using the usual loss")
            self._head = None
            return None  # (loss_sum goes on the usual way, its logits kept for eval's predictions)
        self._checked = True
        # The positions followed by a target, found by the collator on the CPU (see collate).
        index = batch.get("target_index")
        index = target_positions(batch["labels"]) if index is None else index
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index).to(dtype)
        targets = batch["labels"].reshape(-1).index_select(0, index + 1)
        if self.per_example:  # each row's own sum, for example_outputs (the total below is still the metric's)
            rows = torch.bincount(index // batch["labels"].shape[1], minlength=len(batch["labels"])).tolist()
            self._row_sums = [float(head_cross_entropy(h, w, b, t)) if len(t) else 0.0
                              for h, t in zip(hidden.split(rows), targets.split(rows))]
        return head_cross_entropy(hidden, w, b, targets)

    @staticmethod
    def count_targets(batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    _row_sums: list[float] | None = None  # each row's summed loss, from the chunked loss (per_example only)

    def example_outputs(self, logits: torch.Tensor | None, batch: dict) -> list:
        """Per example: (summed loss over its target tokens, how many there are)."""
        counts = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
        if logits is None:  # the chunked loss kept each row's sum
            sums, self._row_sums = self._row_sums, None
        else:  # the logits are those of the target columns (loss_sum)
            labels = batch["labels"][:, 1:][:, target_columns(batch["labels"])]
            sums = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE,
                                                     reduction="none").sum(1).tolist()
        return list(zip(sums, counts))

    def example_line(self, pred: Any, extra: Any, record: dict, labels: list[str] | None) -> dict:
        """The example's mean loss over its target tokens, and their count."""
        loss_sum, n = extra
        return {"loss": loss_sum / max(n, 1), "tokens": n}

    def metrics(self, preds: list, loss_sum: float, n_targets: int, labels: list[str] | None) -> dict:
        loss = loss_sum / max(n_targets, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "target_tokens": n_targets}


def rename_columns(records: list[dict], columns: dict | None, key: str | None = None) -> None:
    """data.columns ({field: column}): each record's `column` becomes `field`, in place, before the format
    is detected from the fields (all taken out first: a mapping may swap two names). `key` (data.train):
    warn about a mapped column that no record has (a misspelling would end in "cannot tell the format")."""
    if not columns:
        return
    found: set[str] = set()
    for rec in records:
        taken = {field: rec.pop(column) for field, column in columns.items() if column in rec}
        found.update(columns[field] for field in taken)
        rec.update(taken)
    if key is not None:
        # (by the column, not the field: with `instruction: questoin` in data that has an instruction column too,
        # the field was there, so nothing was said and the run trained on the column the mapping meant to replace)
        unseen = [f"{column!r} (for {field})" for field, column in columns.items() if column not in found]
        if unseen:
            log.warning("%s: no record has the column(s) %s that data.columns names", key, ", ".join(unseen))


def mapped_names(exc: DataError, columns: dict | None) -> DataError:
    """`exc` about a format's field, naming the data's own column for it where data.columns maps one: the
    field's name alone ("field 'output' is missing") is not what the user's file calls it."""
    if not columns:
        return exc
    problems = []
    for problem in exc.problems:
        for field, column in columns.items():
            problem = problem.replace(f"field {field!r}", f"field {field!r} (column {column!r}, data.columns)")
        problems.append(problem)
    return DataError(problems, title=exc.title, hint=exc.hint)


def _other_formats(records: list[dict], fmt: Any) -> set:
    """The formats of the records that lack `fmt`'s identifying columns (a record no format matches is left
    to `fmt`'s own error, which names the field it lacks)."""
    found = set()
    for rec in records:
        if not fmt.holds(rec):
            try:
                found.add(detect([rec], "?"))
            except DataError:
                pass
    return found - {fmt}


def _refuse_unmixable(records: list[dict], fmt: Any, key: str, against: str | None = None,
                      hint: str = "convert one of them (or train on them in separate runs)") -> None:
    """Raise naming the first record that cannot be trained beside `fmt`'s: a text or prompt_completion record
    beside a conversation format's, or any other format's beside those (trained without a template), and
    what it meets (`against`: the first record's place, else data.train's format). None: no such record."""
    plain = not fmt.chat
    for rec in records:
        if fmt.holds(rec):
            continue
        try:
            other = detect([rec], "?")
        except DataError:
            continue  # (its own error, under fmt, names the field it lacks)
        if other is not fmt and (plain or not other.chat):
            meets = f"{against} holds {fmt.name}" if against else f"{records[0].get(WHERE, '?')} is {fmt.name}"
            article = "an" if other.name[0] in "aeiou" else "a"
            raise DataError(f"{key}: {rec.get(WHERE, '?')} is {article} {other.name} record, {meets}; text and "
                            "prompt_completion records are not mixed with another format", hint=hint)


def _tokenise_segments(tokenizer: Any, segments: list[tuple[str, Any]]) -> list[list[int]]:
    """The token ids of each segment. Tokenised one by one, each as `predict` tokenises a prompt, unless the
    joined text tokenises otherwise and still gives, before every answer, the very ids of the text before
    it: a SentencePiece tokenizer (Llama 2, Mistral) starts every call with a word-boundary mark, so an
    answer tokenised alone began with a stray "▁" that the joined text does not have. Where the joined
    text merges across an answer's start (a prompt ending in a space: " Paris" is one token, while `predict`
    ends the prompt with the space), the segments stay apart, so the prompt is what `predict` gives. In the
    joined text a token belongs to the segment holding its last character."""
    texts = [text for text, _ in segments]
    # (verbose=False: a text longer than the tokenizer's model_max_length is cut, dropped or split at
    # data.max_length afterwards, which is never above it; transformers' "will result in indexing errors" is wrong)
    apart = [tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] for text in texts]
    # (only a tokenizer that marks the start of a call can tokenise the joined text otherwise, but for a
    # merge across a boundary: byte-level BPE goes on segment by segment, at the old cost; no offsets from a
    # Python tokenizer)
    if len(segments) < 2 or not _tokenizer_facts(tokenizer)[1] or not getattr(tokenizer, "is_fast", False):
        return apart
    joined = "".join(texts)
    enc = tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    whole, offsets = enc["input_ids"], enc["offset_mapping"]
    if whole == [tid for piece in apart for tid in piece]:
        return apart
    ends = list(itertools.accumulate(map(len, texts)))
    pieces: list[list[int]] = [[] for _ in segments]
    for tid, (start, end) in zip(whole, offsets):
        last = end - 1 if end > start else start - 1  # (a trimmed whitespace token: zero width, after its char)
        pieces[min(bisect.bisect_right(ends, max(last, 0)), len(segments) - 1)].append(tid)
    for i, (_, trainable) in enumerate(segments):
        if i and trainable is not False and segments[i - 1][1] is False:  # an answer's start: predict's prompt
            if tokenizer(joined[: ends[i - 1]], add_special_tokens=False)["input_ids"] != \
                    [tid for piece in pieces[:i] for tid in piece]:
                return apart
    return pieces


# id(tokenizer) -> (tokenizer, (its leading BOS or None, whether it marks the start of a call)); the tokenizer
# is held so that its id is not reused
_FACTS: dict[int, tuple[Any, tuple[int | None, bool]]] = {}


def _tokenizer_facts(tokenizer: Any) -> tuple[int | None, bool]:
    """(leading_bos, marks_start): whether "a" tokenised alone differs from "a" after a newline, as with a
    SentencePiece tokenizer's word mark ("▁a") or a byte-level one's add_prefix_space ("Ġa")."""
    known = _FACTS.get(id(tokenizer))
    if known is None or known[0] is not tokenizer:
        bos = tokenizer.bos_token_id
        adds = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
        alone = tokenizer("a", add_special_tokens=False)["input_ids"]
        after = tokenizer("\na", add_special_tokens=False)["input_ids"]
        known = _FACTS[id(tokenizer)] = (tokenizer, (bos if adds else None, after[-len(alone):] != alone))
    return known[1]


def last_turn_only(converted: dict) -> dict:
    """A converted conversation whose assistant turns before its last trained one are context (as weight 0)."""
    turns = converted["messages"]
    trained = [i for i, m in enumerate(turns) if m["role"] == "assistant" and m.get("train", True)]
    earlier = set(trained[:-1])
    return {**converted, "messages": [{**m, "train": None} if i in earlier else m for i, m in enumerate(turns)]}


def leading_bos(tokenizer: Any) -> int | None:
    """The BOS id to start a sequence with: the tokenizer's, where `tokenizer(text)` starts every text with it
    by itself (Llama, Mistral, Gemma), else None (GPT-NeoX and GPT-2 have a BOS they do not add; Qwen has
    none). Training and `predict` then lead with BOS exactly where a merged model's users, calling its
    tokenizer the usual way, will."""
    return _tokenizer_facts(tokenizer)[0]


def _same_logits(ours: torch.Tensor, model_logits: torch.Tensor) -> bool:
    """Whether the head applied to the caught hidden state gives the model's own logits. Both come from
    the same [batch, 1, hidden] product (a 2-D call can take another CPU bf16 kernel and round
    differently); 16-bit results may still differ by a rounding step at the largest logit's scale."""
    ours, theirs = ours.detach().float(), model_logits.detach().float()  # (a check, not part of the graph)
    if model_logits.dtype == torch.float32:
        return torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4)
    scale = float(theirs.abs().max()) if theirs.numel() else 0.0
    return torch.allclose(ours, theirs, rtol=1.6e-2, atol=1e-2 * max(scale, 1.0))
