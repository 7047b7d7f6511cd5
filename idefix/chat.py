"""The interactive chat in the terminal (`idefix chat`, `idefix -i`): a prompt_toolkit REPL over AsyncEngine.

Each turn sends the whole conversation; the engine's prefix cache keeps the earlier turns' KV, so only
the new tokens are computed. Generation runs on the engine's loop thread, so Ctrl-C while an answer
streams only interrupts this thread's wait: the request is aborted and the prompt comes back.

Input history is kept in `$IDEFIX_HISTORY` if set, else `$XDG_STATE_HOME/idefix/history`
(`~/.local/state/idefix/history` when XDG_STATE_HOME is unset).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from idefix.chat_commands import COMMANDS, Command, Message, help_text, parse_line
from idefix.chat_session import Conversation, Settings
from idefix.engine.async_engine import AsyncEngine, EngineDeadError
from idefix.engine.engine import Engine
from idefix.errors import IdefixError, ImageError
from idefix.media import MediaPolicy

log = logging.getLogger("idefix.chat")
PROMPT = "> "


def history_path() -> Path:
    """Where the input history lives (see the module docstring)."""
    explicit = os.environ.get("IDEFIX_HISTORY")
    if explicit:
        return Path(explicit).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "idefix" / "history"


def make_reader(out: TextIO) -> Callable[[], str]:
    """A function returning the next input line: a prompt_toolkit prompt with history on a terminal, plain
    stdin otherwise (piped input). Raises EOFError at the end, KeyboardInterrupt for Ctrl-C on an empty line."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return _read_stdin
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, History, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    history: History
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        history = FileHistory(str(path))
    except OSError as exc:
        print(f"note: history not saved ({path}: {exc.strerror}); set IDEFIX_HISTORY to a writable file", file=out)
        history = InMemoryHistory()
    keys = KeyBindings()

    @keys.add("c-c")
    def _interrupt(event) -> None:  # type: ignore[no-untyped-def]
        buffer = event.app.current_buffer
        if buffer.text:
            buffer.reset()  # like a shell: Ctrl-C drops the line being typed
        else:
            event.app.exit(exception=KeyboardInterrupt())

    session: PromptSession[str] = PromptSession(history=history, key_bindings=keys)
    return lambda: session.prompt(PROMPT)


def _read_stdin() -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


class Chat:
    def __init__(self, engine: Engine, model_id: str, settings: Settings, out: TextIO = sys.stdout) -> None:
        self.engine = AsyncEngine(engine)
        self.conversation = Conversation(model_id, settings)
        self.policy = MediaPolicy.trusted()  # the user's own terminal: any path, any URL
        self.out = out
        self._ids = itertools.count()

    def say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    def run(self, read: Callable[[], str]) -> int:
        """The read-eval loop; returns the exit code."""
        try:
            while True:
                try:
                    line = read()
                except (EOFError, KeyboardInterrupt):
                    return 0
                try:
                    if not self.handle(line):
                        return 0
                except KeyboardInterrupt:  # landed outside the answer's own handler (loading an image, ...)
                    self.say("\n[stopped]")
        except EngineDeadError as exc:
            self.say(f"error: {exc}")
            return 1
        finally:
            self.engine.shutdown()

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the chat should end."""
        try:
            parsed = parse_line(line)
            if isinstance(parsed, Command):
                return self.command(parsed)
            if isinstance(parsed, Message):
                self.ask(parsed)
        except EngineDeadError:
            raise
        except IdefixError as exc:
            self.say(f"error: {exc}")
        return True

    def command(self, cmd: Command) -> bool:
        conv, settings = self.conversation, self.conversation.settings
        if cmd.name == "exit":
            return False
        if cmd.name == "help":
            self.say(help_text())
        elif cmd.name == "clear":
            conv.clear()
            self.say("conversation cleared")
        elif cmd.name == "system":
            conv.system = cmd.arg or None
            self.say(f"system prompt set: {cmd.arg}" if cmd.arg else "system prompt removed")
        elif cmd.name == "stats":
            self.say(conv.stats())
        elif cmd.name == "save":
            self.save(cmd.arg)
        else:
            self.set_sampling(cmd.name, cmd.arg)
            self.say(f"sampling: {settings.describe()}")
        return True

    def set_sampling(self, name: str, arg: str) -> None:
        settings = self.conversation.settings
        if name == "topk":
            new = replace(settings, top_k=_integer(name, arg))
        elif name == "topp":
            new = replace(settings, top_p=_float(name, arg))
        else:
            new = replace(settings, temperature=_float(name, arg))
        new.params()  # validates the ranges with the engine's own rules
        self.conversation.settings = new

    def save(self, file: str) -> None:
        if not file:
            self.say(f"error: {COMMANDS['save'].split('  ')[0].strip()} needs a file name")
            return
        try:
            path = self.conversation.save(file)
        except OSError as exc:
            self.say(f"error: cannot write {file}: {exc.strerror or exc}")
            return
        self.say(f"saved {len(self.conversation.turns)} messages to {path}")

    def ask(self, message: Message) -> None:
        """Send one user turn and stream the answer; Ctrl-C stops the answer and keeps what was shown."""
        conv = self.conversation
        rid = f"chat-{next(self._ids)}"
        answer, usage = "", None
        try:
            user = self._user_turn(message)
            prompt = self.engine.prepare(conv.engine_messages(user), self.policy)
            for out in self.engine.stream_sync(prompt, conv.settings.params(), request_id=rid):
                self.say(out.text, end="")
                answer, usage = answer + out.text, out.usage
                if out.finished and out.finish_reason == "length":
                    self.say(f"\n[answer cut at {usage.completion_tokens} tokens]", end="")
        except KeyboardInterrupt:
            self.engine.abort(rid)
            self.say("\n[stopped]", end="")
            if not answer:
                self.say()
                return
        self.say()
        conv.add_exchange(user, answer, usage)
        if usage is not None:
            log.info("answer %s: %s", rid, conv.stats())

    def _user_turn(self, message: Message) -> dict[str, Any]:
        try:
            return self.conversation.user_turn(message.images, message.text, self.policy)
        except ImageError as exc:
            if message.picked_up:
                raise ImageError(f"{exc} (to send a file name as text, quote it: `name.png`)") from None
            raise


def _integer(name: str, arg: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise IdefixError(f"\\{name} needs an integer, got {arg!r}") from None


def _float(name: str, arg: str) -> float:
    try:
        return float(arg)
    except ValueError:
        raise IdefixError(f"\\{name} needs a number, got {arg!r}") from None


def banner(engine: Engine, model_id: str, device: str, settings: Settings, load_seconds: float) -> str:
    dtype = str(next(engine.loaded.model.parameters()).dtype).removeprefix("torch.")
    from idefix import __version__

    where = (
        model_id
        if Path(model_id).expanduser().resolve() == engine.loaded.path
        else f"{model_id} ({engine.loaded.path})"
    )

    return "\n".join(
        [
            f"idefix {__version__} · model {where} · quantization {engine.loaded.quantization} · "
            f"device {device} ({dtype}) · context {engine.max_model_len} tokens · loaded in {load_seconds:.1f} s",
            f"Sampling: {settings.describe()}. Commands: "
            + " ".join(f"\\{name}" for name in COMMANDS)
            + " (\\help explains them).",
            "Ask about an image: \\image PATH_OR_URL your question. Ctrl-C stops an answer; Ctrl-D exits.",
        ]
    )


def run_chat(engine: Engine, model_id: str, device: str, settings: Settings, load_seconds: float = 0.0) -> int:
    """Run the chat on this terminal until the user leaves; returns the exit code."""
    chat = Chat(engine, model_id, settings)
    chat.say(banner(engine, model_id, device, settings, load_seconds))
    return chat.run(make_reader(sys.stdout))
