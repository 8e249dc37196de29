"""The tiny model's corpus and tokenizer: the running interpreter's standard-library sources.

Every machine has them offline, and a given Python minor version ships the same files. The rule:

- every `*.py` file under `sysconfig.get_paths()["stdlib"]`, sorted by its relative POSIX path;
- skipped: any file with a path component in EXCLUDED_DIRS (test suites, third-party packages,
  codec tables, pydoc's help-text dump) and files that are not UTF-8;
- line endings normalized to "\\n"; each file is one document, documents are joined by
  <|endoftext|>;
- the file at sorted index i is held out for validation when i % VAL_EVERY == VAL_EVERY - 1.

Chat examples (so `--chat` answers in kind): for every top-level function or method of a training
file with a docstring and a source of at most CHAT_MAX_CHARS characters, every CHAT_EVERY-th one
in file order becomes "<|im_start|>user\\nWrite a Python function `name`: <first docstring
line><|im_end|>\\n<|im_start|>assistant\\n<source><|im_end|>\\n", rendered with the shipped chat
template.

The byte-level BPE tokenizer (the `tokenizers` library, GPT-2 style pre-tokenizer, no prefix
space) is trained on the training documents only; ids 0, 1, 2 are the special tokens.
"""

from __future__ import annotations

import ast
import hashlib
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from common import textgen
from common.checkpoint import CHAT_TEMPLATE, SPECIAL_TOKENS

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages",
                           "encodings", "pydoc_data"})
VAL_EVERY = 50
CHAT_EVERY = 4
CHAT_MAX_CHARS = 1500
ENDOFTEXT, IM_START, IM_END = SPECIAL_TOKENS  # ids 0, 1, 2


@dataclass
class Corpus:
    root: Path
    train: list[str] = field(default_factory=list)  # file texts
    val: list[str] = field(default_factory=list)
    chat: list[str] = field(default_factory=list)  # rendered chat examples (from training files only)
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        h = hashlib.sha256()
        for text in self.train + self.val + self.chat:
            h.update(text.encode("utf-8"))
            h.update(b"\0")
        return {
            "python": platform.python_version(), "stdlib": str(self.root),
            "train_files": len(self.train), "val_files": len(self.val), "chat_examples": len(self.chat),
            "train_bytes": sum(len(t.encode()) for t in self.train),
            "val_bytes": sum(len(t.encode()) for t in self.val),
            "chat_bytes": sum(len(t.encode()) for t in self.chat),
            "sha256": h.hexdigest(),
        }


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[Path]:
    """The selected files, sorted by relative POSIX path."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: standard-library directory does not exist")
    files = [p for p in root.rglob("*.py")
             if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _chat_examples(text: str) -> list[str]:
    """(user, assistant) chat texts for the documented functions of one source file."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.split("\n")
    out = []
    nodes = [n for n in tree.body] + [m for n in tree.body if isinstance(n, ast.ClassDef) for m in n.body]
    for node in nodes:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("__"):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.end_lineno - node.lineno > CHAT_MAX_CHARS // 20:
            continue
        src = _source(lines, node)
        if len(src) > CHAT_MAX_CHARS:
            continue
        first = doc.strip().splitlines()[0].strip()
        if not first:
            continue
        out.append((f"Write a Python function `{node.name}`: {first}", src))
    return [render_chat(u, a) for u, a in out]


def _source(lines: list[str], node) -> str:
    """The def's source (decorators excluded) with its class indentation removed."""
    col = node.col_offset
    body = lines[node.lineno - 1:node.end_lineno]
    body[-1] = body[-1][:node.end_col_offset]
    return "\n".join(ln[col:] if ln[:col].strip() == "" else ln for ln in body)


def render_chat(user: str, assistant: str) -> str:
    """One exchange through the shipped chat template, as the generate CLI's --chat renders it."""
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return textgen.render_chat(CHAT_TEMPLATE, msgs, add_generation_prompt=False)


def load_corpus(root: Path | None = None, *, chat: bool = True) -> Corpus:
    root = root or stdlib_root()
    corpus = Corpus(root)
    documented = []
    for i, path in enumerate(source_files(root)):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        text = text.replace("\r\n", "\n")
        if not text.strip():
            continue
        rel = path.relative_to(root).as_posix()
        if i % VAL_EVERY == VAL_EVERY - 1:
            corpus.val.append(text)
            corpus.val_files.append(rel)
        else:
            corpus.train.append(text)
            corpus.train_files.append(rel)
            if chat:
                documented += _chat_examples(text)
    corpus.chat = documented[CHAT_EVERY - 1::CHAT_EVERY]
    if not corpus.train or not corpus.val:
        raise ValueError(f"{root}: too few Python sources for a corpus "
                         f"({len(corpus.train)} training, {len(corpus.val)} validation files)")
    return corpus


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (ids < vocab_size) trained on `texts`, special tokens at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"tokenizer: special token {s} got id {tok.token_to_id(s)}, expected {i}")
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tokenizer: vocabulary of {tok.get_vocab_size()} exceeds vocab_size={vocab_size}")
    return tok


def token_stream(tok, docs: list[str]):
    """All documents encoded and joined by <|endoftext|> (uint16 numpy array)."""
    import numpy as np

    eot = tok.token_to_id(ENDOFTEXT)
    parts = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.uint16))
        parts.append(np.asarray([eot], dtype=np.uint16))
    return np.concatenate(parts)
