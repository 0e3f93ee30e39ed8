"""Vendored calibration / evaluation text (see PROVENANCE.md for sources and licenses)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from finegrain.errors import InputError

_HERE = Path(__file__).parent
WIKITEXT2_TEST = _HERE / "wiki.test.raw"
BROWN_SLICE = _HERE / "brown_slice.txt"
_SHA256 = {
    WIKITEXT2_TEST.name: "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
    BROWN_SLICE.name: "32affa0944b323600cce0348372211f5261b7c57d9046f928d22d399a7736086",
}


def _read_checked(path: Path) -> str:
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _SHA256[path.name]:
        raise RuntimeError(f"vendored data file {path} is corrupted: sha256 {digest} != {_SHA256[path.name]}")
    return raw.decode("utf-8")


def wikitext2_test() -> str:
    """The WikiText-2 test stream: rows joined with blank lines, as `"\\n\\n".join(test["text"])`."""
    rows = _read_checked(WIKITEXT2_TEST).replace("\r", "").split("\n")
    return "\n\n".join(r for r in rows if r)


def brown_paragraphs() -> list[str]:
    """Calibration paragraphs from the Brown corpus slice (one per line)."""
    return [line for line in _read_checked(BROWN_SLICE).split("\n") if line.strip()]


# ---- a corpus: the vendored ones or the user's own text ------------------------------------------------------------

MAX_TEXT_BYTES = 1 << 30  # 1 GiB of text in all: far more than calibration or evaluation reads
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")


@dataclass(frozen=True)
class Text:
    """A corpus: its documents in order and where they came from (``describe()`` goes into manifests
    and result files, so a number can be traced to the text that produced it)."""

    name: str
    documents: tuple[str, ...]

    def joined(self) -> str:
        """The documents as one stream, separated by blank lines (how WikiText-2 is evaluated)."""
        return "\n\n".join(self.documents)

    def paragraphs(self) -> list[str]:
        """Non-empty paragraphs (blank-line separated; single lines when a document has no blank
        lines): sentence-level samples for encoder models."""
        out = []
        for doc in self.documents:
            parts = doc.split("\n\n") if "\n\n" in doc else doc.split("\n")
            out += [p.strip() for p in parts if p.strip()]
        return out

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for d in self.documents:
            h.update(d.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "documents": len(self.documents), "chars": sum(map(len, self.documents)),
                "sha256": self.sha256}


def wikitext2() -> Text:
    return Text("wikitext2-test", (wikitext2_test(),))


def brown() -> Text:
    return Text("brown", tuple(brown_paragraphs()))


CHAT_MIN_WORDS = 40  # a paragraph shorter than this makes a poor conversation (and most of Brown's are longer)


def chat_text(text: Text, tokenizer, *, min_words: int = CHAT_MIN_WORDS) -> Text:
    """``text`` as conversations in ``tokenizer``'s chat template, to calibrate an instruct model on
    the token pattern it chats in (its system prompt, role markers and turn ends), as llm-compressor's
    examples do with chat data. Each paragraph of ``min_words`` words or more becomes one document: its
    first third the user's turn, the rest the assistant's. The template is rendered as text (Jinja in
    the tokenizer, no code from the model). Errors: no chat template, a template that fails, or too
    few long paragraphs."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise InputError(f"chat calibration: the tokenizer {type(tokenizer).__name__} has no chat template (a base "
                         "model, not an instruct one); calibrate on the plain text instead")
    docs = []
    for p in text.paragraphs():
        words = p.split()
        if len(words) < min_words:
            continue
        cut = len(words) // 3
        turns = [{"role": "user", "content": " ".join(words[:cut])},
                 {"role": "assistant", "content": " ".join(words[cut:])}]
        try:
            docs.append(tokenizer.apply_chat_template(turns, tokenize=False))
        except Exception as e:  # a template's own checks (roles, alternation) raise whatever Jinja raises
            raise InputError(f"chat calibration: the tokenizer's chat template fails on a user / assistant pair "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
    if len(docs) < 8:
        raise InputError(f"chat calibration: {text.name} has {len(docs)} paragraphs of {min_words}+ words, at least 8 "
                         "are needed (paragraphs are separated by blank lines)")
    return Text(f"{text.name} in the chat template", tuple(docs))


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); convert it to "
                         "UTF-8 first") from None


def _text_files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise InputError(f"{root}: a directory with no text files ({', '.join(TEXT_SUFFIXES)}); point at a file "
                         "or a directory holding some")
    return files


def read_text(path: str | Path, *, jsonl_field: str | None = None) -> Text:
    """The user's own text: a UTF-8 file (one document), a directory (every ``.txt`` / ``.text`` /
    ``.md`` / ``.rst`` file under it, sorted by path, hidden ones skipped: one document each) or,
    with ``jsonl_field``, a JSON-lines file whose records each hold a string in that field (one
    document per record). Errors name the file and the line or byte; nothing is executed or
    unpickled, and at most ``MAX_TEXT_BYTES`` are read."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    files = _text_files(path) if path.is_dir() else [path]
    if jsonl_field is not None and path.is_dir():
        raise InputError(f"{path}: a JSON-lines corpus is one file, not a directory")
    total = sum(f.stat().st_size for f in files)
    if total > MAX_TEXT_BYTES:
        raise InputError(f"{path}: {total / 2**20:.0f} MiB of text; at most {MAX_TEXT_BYTES >> 20} MiB are read (take "
                         "a slice of it)")
    docs: list[str] = []
    if jsonl_field is None:
        for f in files:
            text = _decode(f.read_bytes(), str(f))
            if text.strip():
                docs.append(text.strip("\n"))
    else:
        docs = _jsonl_documents(path, jsonl_field)
    if not docs:
        raise InputError(f"{path}: no text in it")
    return Text(str(path), tuple(docs))


def _jsonl_documents(path: Path, field: str) -> list[str]:
    import json

    docs = []
    for i, line in enumerate(_decode(path.read_bytes(), str(path)).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}, line {i}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}, line {i}: a JSON {type(rec).__name__}, expected an object with a {field!r} field")
        if field not in rec:
            keys = ", ".join(map(repr, list(rec)[:8]))
            raise InputError(f"{path}, line {i}: no field {field!r} (it has {keys or 'no fields'}); choose the field "
                             "with --jsonl-field")
        value = rec[field]
        if not isinstance(value, str):
            raise InputError(f"{path}, line {i}: field {field!r} is a {type(value).__name__}, expected a string")
        if value.strip():
            docs.append(value)
    return docs


def read_tensor_batches(path: str | Path, names: list[str]) -> list[tuple]:
    """Calibration / evaluation batches for a model with tensor inputs ``names``, from a safetensors
    file (no pickle): either one tensor per input, ``<name>`` of shape ``[samples, ...]`` (each
    sample one batch of 1), or one tensor per input and batch, ``<name>.<i>`` (batches may differ in
    the dims the model lets vary). Errors name the file and the tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected a .safetensors file of input tensors)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"{path}: not a safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    if all(n in tensors for n in names):
        counts = {n: tensors[n].shape[0] if tensors[n].dim() else 0 for n in names}
        if len(set(counts.values())) != 1 or not min(counts.values()):
            raise InputError(f"{path}: tensors {', '.join(names)} must share a non-empty first (sample) dim, got {counts}")
        return [tuple(tensors[n][i:i + 1] for n in names) for i in range(counts[names[0]])]
    batches = []
    while all(f"{n}.{len(batches)}" in tensors for n in names):
        batches.append(tuple(tensors[f"{n}.{len(batches)}"] for n in names))
    if not batches:
        have = ", ".join(sorted(tensors)[:8])
        raise InputError(f"{path}: no tensors named after the model's inputs ({', '.join(names)}: either <name> with a "
                         f"sample dim or <name>.0, <name>.1, ...); the file has {have or 'none'}")
    return batches
