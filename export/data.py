"""Task data: JSONL folders in the format of ``../shared/data/README.md``.

One folder a task under ``--data DIR``, each with ``train.jsonl`` and ``val.jsonl``; one JSON object a
line with ``task``, ``prompt`` (the user turn), ``completion`` (the training target), ``references``
(every acceptable answer) and ``metric`` (``f1``, ``exact``, ``rougeL``, ``chrf`` or ``bleu``: the names
of ``export.metrics.METRICS``). A malformed record stops with its file and line number.

Encoding: the prompt is wrapped in the model's chat template (``export.chat``); a prompt longer than
``max_prompt_tokens`` keeps the head and the tail of the user message (the instruction and the
question usually sit at the ends); the completion is cut to ``max_completion_tokens`` and, when not
cut, ends with the end-of-turn token the generator stops on.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from runtime.errors import FirstEdgeError

from . import metrics as _metrics

METRICS = tuple(_metrics.METRICS)  # the names export.metrics.score computes
SPLITS = ("train", "val")


@dataclass
class Record:
    task: str
    prompt: str
    completion: str
    references: List[str]
    metric: str
    source: str = ""  # "file:line", for messages


def parse_record(line: str, where: str) -> Record:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise FirstEdgeError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise FirstEdgeError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "completion", "metric"):
        if key not in obj:
            raise FirstEdgeError(f"{where}: missing field '{key}'")
        if not isinstance(obj[key], str):
            raise FirstEdgeError(f"{where}: field '{key}' must be a string")
    if not obj["prompt"].strip():
        raise FirstEdgeError(f"{where}: empty 'prompt'")
    if obj["metric"] not in METRICS:
        raise FirstEdgeError(f"{where}: unknown metric '{obj['metric']}' (known: {', '.join(METRICS)})")
    refs = obj.get("references")
    if refs is None:
        refs = [obj["completion"]]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise FirstEdgeError(f"{where}: 'references' must be a non-empty list of strings")
    task = obj.get("task", "")
    if not isinstance(task, str):
        raise FirstEdgeError(f"{where}: field 'task' must be a string")
    return Record(task=task, prompt=obj["prompt"], completion=obj["completion"], references=list(refs),
                  metric=obj["metric"], source=where)


def read_jsonl(path: Path, task: Optional[str] = None, limit: Optional[int] = None) -> List[Record]:
    path = Path(path)
    if not path.is_file():
        raise FirstEdgeError(f"data file not found: {path}")
    out: List[Record] = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = parse_record(line, f"{path}:{i}")
            if not rec.task:
                rec.task = task or path.parent.name
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise FirstEdgeError(f"no records in {path}")
    return out


def list_tasks(data_dir) -> List[str]:
    d = Path(data_dir)
    if not d.is_dir():
        raise FirstEdgeError(f"data folder not found: {d}")
    tasks = sorted(p.name for p in d.iterdir() if p.is_dir() and any((p / f"{s}.jsonl").exists() for s in SPLITS))
    if not tasks:
        raise FirstEdgeError(f"no task folders (with train.jsonl / val.jsonl) in {d}")
    return tasks


def resolve_tasks(data_dir, tasks: Optional[Sequence[str] | str] = None) -> List[str]:
    avail = list_tasks(data_dir)
    if tasks is None or tasks == "" or tasks == "all" or tasks == ["all"]:
        return avail
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in avail:
            raise FirstEdgeError(f"task '{t}' not found in {data_dir} (available: {', '.join(avail)})")
    return list(tasks)


def load_split(data_dir, split: str, tasks=None, limit: Optional[int] = None) -> Dict[str, List[Record]]:
    """Records per task (in file order); ``limit`` caps the records read per task."""
    if split not in SPLITS:
        raise FirstEdgeError(f"unknown split '{split}' (use one of {', '.join(SPLITS)})")
    out = {}
    for t in resolve_tasks(data_dir, tasks):
        out[t] = read_jsonl(Path(data_dir) / t / f"{split}.jsonl", task=t, limit=limit)
    return out


def mix_tasks(per_task: Dict[str, List[Record]], per_task_n: Optional[int], seed: int = 0) -> List[Record]:
    """Up to ``per_task_n`` records from every task, shuffled together."""
    rng = random.Random(seed)
    out = []
    for t in sorted(per_task):
        recs = list(per_task[t])
        rng.shuffle(recs)
        out.extend(recs[:per_task_n] if per_task_n else recs)
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------- encoding
@dataclass
class Encoded:
    prompt_ids: List[int]
    completion_ids: List[int]  # the target tokens, ending with the end-of-turn id unless truncated
    record: Record = field(repr=False, default=None)


class Encoder:
    """Chat-template encoding with head+tail truncation of long user messages."""

    def __init__(self, tokenizer, end_id: int, max_prompt_tokens: int = 384, max_completion_tokens: int = 48,
                 head_tokens: int = 48):
        from .chat import chat_parts

        self.tok = tokenizer
        self.end_id = int(end_id)
        self.max_prompt = int(max_prompt_tokens)
        self.max_completion = int(max_completion_tokens)
        self.head = int(head_tokens)
        pre, post = chat_parts(tokenizer)
        self.pre_ids = tokenizer(pre, add_special_tokens=False)["input_ids"] if pre else []
        self.post_ids = tokenizer(post, add_special_tokens=False)["input_ids"] if post else []
        self.chat = bool(pre or post)
        if self.max_prompt < len(self.pre_ids) + len(self.post_ids) + 8:
            raise FirstEdgeError(f"max prompt tokens {self.max_prompt} is too small for the chat template "
                                 f"({len(self.pre_ids) + len(self.post_ids)} tokens) and a message")

    def prompt(self, text: str) -> List[int]:
        from .chat import encode_prompt

        ids = encode_prompt(self.tok, text, chat=True)
        if len(ids) <= self.max_prompt:
            return ids
        npre, npost = len(self.pre_ids), len(self.post_ids)
        if ids[:npre] == self.pre_ids and (npost == 0 or ids[-npost:] == self.post_ids):
            msg = ids[npre:len(ids) - npost]
        else:  # tokenisation across the boundaries differs: encode the message alone
            msg = self.tok(text, add_special_tokens=False)["input_ids"]
        room = self.max_prompt - npre - npost
        head = min(self.head, room // 2)
        msg = msg[:head] + msg[len(msg) - (room - head):]
        return self.pre_ids + msg + self.post_ids

    def completion(self, text: str) -> List[int]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.max_completion:
            return ids[:self.max_completion]
        return ids + [self.end_id]

    def __call__(self, rec: Record) -> Encoded:
        return Encoded(self.prompt(rec.prompt), self.completion(rec.completion), rec)


def end_of_turn_id(tokenizer, hf_config) -> int:
    """The id the generator stops on that the chat template ends a turn with (e.g. <|im_end|>)."""
    from .chat import chat_parts
    from .reference import eos_ids

    ids = eos_ids(tokenizer, hf_config)
    if not ids:
        raise FirstEdgeError("the model defines no end-of-sequence token")
    _, post = chat_parts(tokenizer)
    post_ids = set(tokenizer(post, add_special_tokens=False)["input_ids"]) if post else set()
    for i in ids:
        if i in post_ids:
            return i
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in ids:
        return int(tokenizer.eos_token_id)
    return ids[0]
