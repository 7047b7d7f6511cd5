"""The `idefix` flags, their one-line errors with the nearest valid choice, and the chat's line parser."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from idefix import __version__, cli
from idefix.chat_commands import Command, Message, parse_line, pick_up_images, split_image_args
from idefix.cli_parser import read_token
from idefix.errors import IdefixError, InvalidRequestError, ModelLoadError


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


def error_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run main(argv), expect exit code 2, return the single stderr line."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_mistralrs_syntax_and_aliases() -> None:
    args = parse("-i", "--max-seqs", "4", "--seed", "7", "--cpu", "vision-plain", "-m", "org/model", "-a", "idefics3")
    assert (args.interactive_mode, args.command, args.model_id) == (True, "vision-plain", "org/model")
    assert args.arch == "idefics3"
    assert (args.max_seqs, args.seed, args.cpu) == (4, 7, True)
    chat = parse("--token-source", "env:MY_TOKEN", "chat", "-m", "m", "--dtype", "bf16", "--max-seq-len", "512")
    assert (chat.command, chat.dtype, chat.max_seq_len, chat.max_tokens, chat.token_source) == (
        "chat",
        "bf16",
        512,
        None,
        "env:MY_TOKEN",
    )
    run = parse("run", "--image", "a.png", "--image", "b.png", "--json", "Which has more circles?")
    assert (run.image, run.json, run.max_tokens, run.model_id) == (["a.png", "b.png"], True, 256, None)


@pytest.mark.parametrize(
    ("argv", "expected_args"),
    [
        (["-i"], {"command": None, "model_id": None, "max_tokens": None, "max_seq_len": 4096}),
        (["-i", "vision-plain", "-m", "m"], {"command": "vision-plain", "model_id": "m"}),
        (["chat", "--max-tokens", "9"], {"command": "chat", "max_tokens": 9}),
    ],
)
def test_interactive_forms_start_the_chat(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], expected_args: dict[str, object]
) -> None:
    seen: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "_chat", lambda args: seen.append(args) or 0)
    assert cli.main(argv) == 0
    assert {key: getattr(seen[0], key) for key in expected_args} == expected_args


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["chat", "--dtype", "bf61"], "idefix chat: error: --dtype: unknown value 'bf61'; did you mean bf16?"),
        (["caht"], "idefix: error: unknown command 'caht'; did you mean chat?"),
        (["--max-seq", "3", "chat"], "idefix: error: unknown flag --max-seq; did you mean --max-seqs?"),
        (["chat", "--modle-id", "x"], "idefix: error: unknown flag --modle-id; did you mean --model-id?"),
        (["--max-seq-len", "3", "chat"], "idefix: error: --max-seq-len belongs after the command"),
        (["chat", "-a", "llava"], "idefix chat: error: --arch: unknown value 'llava' (choose from idefics3)"),
        (["run", "x", "--max-tokens", "0"], "idefix run: error: --max-tokens: must be at least 1, got 0"),
        (["--max-seqs", "many", "chat"], "idefix: error: --max-seqs: needs an integer, got 'many'"),
        (["--seed", "x", "chat"], "idefix: error: --seed: needs an integer, got 'x'"),
        (["--token-source", "evn:HF", "chat"], "idefix: error: --token-source: 'evn:HF' is not a token source (did"),
        (["run"], "idefix run: error: missing prompt"),
        (["run", "how", "many"], "idefix: error: unexpected argument 'many' (quote a question with spaces"),
        (["vision-plain"], "idefix: error: choose what to run"),
        (["-i", "--port", "8000", "chat"], "idefix: error: -i and --port exclude each other"),
        (["--max", "3", "chat"], "idefix: error: unknown flag --max"),  # no silent abbreviation of --max-seqs
    ],
)
def test_wrong_flag_or_value_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert error_of(capsys, *argv).startswith(message)


def test_no_suggestion_when_nothing_is_close(capsys: pytest.CaptureFixture[str]) -> None:
    assert error_of(capsys, "--bogus", "chat") == "idefix: error: unknown flag --bogus (see idefix --help)"


def test_version_and_grouped_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"idefix {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    headings = [text.index(h) for h in ("commands:", "mode:", "engine:", "examples:")]
    assert headings == sorted(headings)
    assert "idefix -i vision-plain -m" in text


def test_token_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IDEFIX_TEST_TOKEN", "hf_env")
    (tmp_path / "token").write_text("hf_file\n")
    assert read_token("env:IDEFIX_TEST_TOKEN") == "hf_env"
    assert read_token("literal:hf_lit") == "hf_lit"
    assert read_token(f"path:{tmp_path / 'token'}") == "hf_file"
    assert read_token("cache") is None and read_token(None) is None
    assert read_token("none") is False  # huggingface_hub: send no token at all
    monkeypatch.delenv("IDEFIX_TEST_TOKEN")
    with pytest.raises(ModelLoadError, match="IDEFIX_TEST_TOKEN is not set"):
        read_token("env:IDEFIX_TEST_TOKEN")
    with pytest.raises(ModelLoadError, match="cannot read the token file"):
        read_token(f"path:{tmp_path / 'missing'}")


def test_arch_must_match_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ModelLoadError, match="-a idefics3 does not match config.json's model_type 'llava'"):
        cli._check_arch("idefics3", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "smolvlm"}))
    cli._check_arch("idefics3", tmp_path)
    cli._check_arch(None, tmp_path)


def test_log_file(tmp_path: Path) -> None:
    logger = logging.getLogger("idefix")
    before = list(logger.handlers)
    try:
        cli._start_log(str(tmp_path / "idefix.log"))
        logging.getLogger("idefix.chat").info("hello log")
        assert "idefix.chat: hello log" in (tmp_path / "idefix.log").read_text()
        with pytest.raises(IdefixError, match="--log .*cannot open the log file"):
            cli._start_log(str(tmp_path / "no" / "such" / "dir.log"))
    finally:
        for handler in logger.handlers[len(before) :]:
            handler.close()
        logger.handlers[:] = before


# ------------------------------------------------------------------------------------------ chat lines


def test_chat_commands() -> None:
    assert parse_line("   ") is None
    assert parse_line("\\temperature 0.7") == Command("temperature", "0.7")
    assert parse_line("\\SYSTEM  Be brief. ") == Command("system", "Be brief.")
    assert parse_line("\\exit") == Command("exit", "")
    with pytest.raises(InvalidRequestError, match=r"unknown command \\tempreature \(did you mean \\temperature\?\)"):
        parse_line("\\tempreature 1")
    with pytest.raises(InvalidRequestError, match="needs at least one image"):
        parse_line("\\image what is this?")


def test_image_command_sources(tmp_path: Path) -> None:
    spaced = tmp_path / "my photo"
    spaced.write_bytes(b"x")  # an existing file without an image extension counts too
    line = f'\\image https://x.org/a.png data:image/png;base64,AAAA "{spaced}" shapes.png Which one is red?'
    assert parse_line(line) == Message(
        ("https://x.org/a.png", "data:image/png;base64,AAAA", str(spaced), "shapes.png"), "Which one is red?"
    )
    assert split_image_args("http://h/img?id=3 describe it") == (("http://h/img?id=3",), "describe it")


@pytest.mark.parametrize(
    ("text", "sources", "rest"),
    [
        ("What is in photo.jpg and https://x/y.PNG?", ("photo.jpg", "https://x/y.PNG"), "What is in and?"),
        ("Describe ~/pics/cat.webp.", ("~/pics/cat.webp",), "Describe."),
        ("data:image/png;base64,AAAA what is it", ("data:image/png;base64,AAAA",), "what is it"),
        ("Is `photo.jpg` a good name?", (), "Is `photo.jpg` a good name?"),
        ('Rename "a.png" please', (), 'Rename "a.png" please'),
        ("Is .png better than .jpg?", (), "Is .png better than .jpg?"),
        ("no images here", (), "no images here"),
    ],
)
def test_plain_messages_pick_up_images(text: str, sources: tuple[str, ...], rest: str) -> None:
    assert pick_up_images(text) == (sources, rest)


def test_double_backslash_sends_the_line_as_typed() -> None:
    assert parse_line("\\\\ \\image is a command, and a.png a file name") == Message(
        (), "\\image is a command, and a.png a file name"
    )
    assert parse_line("see a.png").picked_up is True  # type: ignore[union-attr]
