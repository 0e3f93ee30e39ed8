"""Strings read from files reach the terminal with control characters escaped and no rich markup."""
from finegrain.cli import main, safe_text


def test_safe_text():
    assert safe_text("plain text [bold]") == "plain text [bold]"
    assert safe_text("\x1b[31mred\x07") == "\\x1b[31mred\\x07"
    assert safe_text("a\u202eb") == "a\\u202eb"  # right-to-left override


def test_inspect_escapes_layer_names(tamper, capsys):
    def manifest(m):
        name = next(iter(m["layers"]))
        rec = m["layers"].pop(name)
        m["layers"]["\x1b]0;owned\x07\x1b[2J[link=file:///etc/passwd]click[/link][blink]x"] = rec
        m["recipe"]["name"] = "\x1b[31mred[/]"
    capsys.readouterr()
    assert main(["inspect", str(tamper(manifest=manifest))]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "\x07" not in text
    assert "[link=file:///etc/passwd]click[/link]" in text.replace("\n", "")  # shown literally, not as markup
    assert "\\x1b[31mred[/]" in text


def test_error_messages_escaped(tmp_path, capsys):
    bad = tmp_path / "evil\x1b[2Jdir"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2J" in err
