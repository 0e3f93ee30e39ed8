"""Calibration and evaluation on the user's own text: files, directories, JSON lines, their errors,
and the CLI flags that take them (issue #22 item 4)."""
import json

import pytest
import torch

from finegrain.data import Text, brown, read_text, wikitext2
from finegrain.errors import InputError
from finegrain.eval.perplexity import calibration_batches, perplexity

PLAY = ("ACT I. SCENE I. Elsinore. A platform before the castle.\n\nFRANCISCO at his post. Enter to him BERNARDO.\n\n"
        "BERNARDO. Who's there?\n\nFRANCISCO. Nay, answer me: stand, and unfold yourself.\n\n") * 40


class _Bytes:
    def __call__(self, text):
        class R:
            input_ids = list(text.encode("utf-8"))

        return R()


def test_file_directory_and_jsonl(tmp_path):
    (tmp_path / "play.txt").write_text(PLAY)
    assert read_text(tmp_path / "play.txt").documents == (PLAY.strip("\n"),)
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "b.md").write_text("second\r\nline")
    (d / "sub" / "a.txt").write_text("third")
    (d / "a.txt").write_text("first")
    (d / "skip.bin").write_bytes(b"\xff\xfe")  # not a text suffix
    (d / ".hidden.txt").write_text("hidden")
    t = read_text(d)
    assert t.documents == ("first", "second\nline", "third") and t.name == str(d)
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n{"text": ""}\n')
    assert read_text(j, jsonl_field="text").documents == ("one", "two")
    j2 = tmp_path / "c2.jsonl"
    j2.write_text('{"body": "x y"}\n')
    assert read_text(j2, jsonl_field="body").documents == ("x y",)
    # the description changes with the content, so a manifest names exactly the text used
    assert read_text(j, jsonl_field="text").describe()["sha256"] != read_text(j2, jsonl_field="body").describe()["sha256"]


@pytest.mark.parametrize("content, field, message", [
    (b"ok\n\xc3\x28 bad", None, "not UTF-8 text (byte 3"),
    (b'{"text": "a"}\n{"text": ', "text", "line 2: not JSON"),
    (b'{"text": "a"}\n{"body": "b"}\n', "text", "line 2: no field 'text' (it has 'body')"),
    (b'{"text": 3}\n', "text", "line 1: field 'text' is a int, expected a string"),
    (b'["text"]\n', "text", "line 1: a JSON list"),
    (b"\n\n  \n", None, "no text in it"),
])
def test_bad_text_is_a_clear_error(tmp_path, content, field, message):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(InputError, match=r".*".join(map(__import__("re").escape, [str(f), message]))):
        read_text(f, jsonl_field=field)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_text(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="no text files"):
        read_text(tmp_path)
    with pytest.raises(InputError, match="one file, not a directory"):
        (tmp_path / "a.txt").write_text("x")
        read_text(tmp_path, jsonl_field="text")


def test_perplexity_and_calibration_read_the_given_text(tmp_path):
    text = Text("play", (PLAY,))
    seen = []

    def record(ids):
        seen.append(ids[0].clone())
        return torch.zeros(1, ids.shape[1], 256)

    res = perplexity(record, _Bytes(), seq_len=64, max_windows=3, progress=False, text=text)
    stream = torch.tensor(list(PLAY.encode()))
    assert res.text == "play" and res.windows_available == stream.numel() // 64
    assert all(torch.equal(w, stream[i * 64:(i + 1) * 64]) for i, w in enumerate(seen))
    # calibration windows are slices of the user's text, not of the bundled corpus
    batches = calibration_batches(_Bytes(), samples=6, seq_len=32, seed=0, text=text)
    raw = PLAY.encode()
    assert all(bytes(b[0][0].tolist()) in raw for b in batches)
    default = calibration_batches(_Bytes(), samples=6, seq_len=32, seed=0)
    assert not any(bytes(b[0][0].tolist()) in raw for b in default)
    with pytest.raises(InputError, match="calibration text play .* use a shorter --calibration-seq-len"):
        calibration_batches(_Bytes(), samples=1, seq_len=len(raw), text=text)
    with pytest.raises(InputError, match="tokenized text play"):
        perplexity(record, _Bytes(), seq_len=len(raw) + 1, progress=False, text=text)


def test_defaults_are_the_bundled_corpora():
    assert wikitext2().joined().startswith(" = Robert Boulter = ")
    assert brown().joined() == "\n\n".join(brown().documents) and len(brown().paragraphs()) == 9557


def test_cli_calibrates_and_evaluates_on_own_text(hf_dir, tmp_path, capsys):
    from finegrain.cli import main

    play = tmp_path / "play.txt"
    play.write_text(PLAY)
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"body": p}) + "\n" for p in PLAY.split("\n\n") if p))
    art = tmp_path / "art"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w8a8-static", "--out", str(art),
                 "--calibration-samples", "2", "--calibration-seq-len", "32", "--calib-jsonl", str(jl),
                 "--jsonl-field", "body"]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    rec = manifest["source"]["calibration_text"]
    assert rec["name"] == str(jl) and rec["documents"] == 160 and rec["sha256"] == read_text(jl, jsonl_field="body").sha256
    res = tmp_path / "r.json"
    assert main(["eval", "--model", str(art), "--seq-len", "32", "--max-windows", "2", "--eval-text", str(play),
                 "--json", str(res)]) == 0
    out = capsys.readouterr().out
    assert f"{play} perplexity" in out
    own = json.loads(res.read_text())["results"][0]
    assert own["text"] == str(play) and own["windows"] == 2
    assert main(["eval", "--model", str(art), "--seq-len", "32", "--max-windows", "2", "--json", str(res)]) == 0
    wiki = json.loads(res.read_text())["results"][0]
    assert wiki["text"] == "wikitext2-test" and wiki["ppl"] != own["ppl"]
    # a bad corpus fails before the model is loaded or anything is written
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w8a8-static", "--out", str(tmp_path / "o2"),
                 "--calib-jsonl", str(jl)]) == 2
    assert "line 1: no field 'text' (it has 'body'); choose the field with --jsonl-field" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    with pytest.raises(SystemExit) as e:  # argparse: one text source at a time
        main(["eval", "--model", str(art), "--eval-text", str(play), "--eval-jsonl", str(jl)])
    assert e.value.code == 2 and "not allowed with argument --eval-text" in capsys.readouterr().err


def test_chat_text_renders_paragraphs_as_conversations():
    """``--calib-chat``: each paragraph of 40+ words becomes one conversation in the model's chat template
    (first third the user's turn, the rest the assistant's), and calibration windows hold its tokens."""
    from finegrain.data import chat_text
    from finegrain.models.bundled import _smollm2_tokenizer

    tok = _smollm2_tokenizer()
    chat = chat_text(brown(), tok)
    long = [p for p in brown().paragraphs() if len(p.split()) >= 40]
    assert chat.name == "brown in the chat template" and len(chat.documents) == len(long) == 478
    words = long[0].split()
    user, assistant = " ".join(words[:len(words) // 3]), " ".join(words[len(words) // 3:])
    doc = chat.documents[0]
    assert doc.startswith("<|im_start|>system\n") and doc.endswith("<|im_end|>\n")
    assert f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>" in doc
    (ids,) = calibration_batches(tok, samples=1, seq_len=512, text=chat)[0]
    marks = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert all((ids == m).sum() >= 2 for m in marks)  # 512 tokens span several conversations


def test_chat_text_errors():
    from finegrain.data import chat_text
    from finegrain.models.bundled import _smollm2_tokenizer

    tok = _smollm2_tokenizer()
    with pytest.raises(InputError, match="play has 0 paragraphs of 40\\+ words, at least 8 are needed"):
        chat_text(Text("play", (PLAY,)), tok)

    class Base:
        chat_template = None

    with pytest.raises(InputError, match="tokenizer Base has no chat template"):
        chat_text(brown(), Base())

    class Strict:
        chat_template = "{{ raise_exception('roles must alternate') }}"

        def apply_chat_template(self, turns, tokenize):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")

    with pytest.raises(InputError, match="chat template fails on a user / assistant pair \\(ValueError: Conversation"):
        chat_text(brown(), Strict())


def test_cli_calib_chat(hf_dir, tmp_path, capsys):
    from finegrain.cli import main
    from finegrain.data import chat_text
    from finegrain.models.bundled import _smollm2_tokenizer

    art = tmp_path / "art"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w8a8-static", "--out", str(art),
                 "--calibration-samples", "2", "--calibration-seq-len", "32", "--calib-chat"]) == 0
    rec = json.loads((art / "manifest.json").read_text())["source"]["calibration_text"]
    assert rec["name"] == "brown in the chat template"
    assert rec["sha256"] == chat_text(brown(), _smollm2_tokenizer()).sha256
    art2 = tmp_path / "art2"
    assert main(["quantize", "--model", str(hf_dir), "--recipe", "w8a8-static", "--out", str(art2),
                 "--calibration-samples", "2", "--calibration-seq-len", "32", "--no-calib-chat"]) == 0
    assert json.loads((art2 / "manifest.json").read_text())["source"]["calibration_text"]["name"] == "brown"
