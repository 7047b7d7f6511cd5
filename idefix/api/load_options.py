"""What `Runner` passes to `idefix.loading.load` besides the model id: the hub token named by a mistralrs-style
token source, and the options of features that live in other parts of idefix (quantization, UQFF, device maps).

`NOT_YET` is the one place where an option whose feature is not available yet is refused: switching one on is
deleting its entry (its value then goes to `load` under the name `LOAD_ARGUMENT` gives).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from idefix import __version__
from idefix.api.options import IsqType, VisionPlain
from idefix.errors import InvalidRequestError

NOT_YET = {  # argument -> the feature it needs; delete an entry once `idefix.loading.load` takes it
    "tokenizer_json": "a tokenizer.json other than the checkpoint's",
}
LOAD_ARGUMENT = {  # argument -> its name in `idefix.loading.load`
    "in_situ_quant": "isq",
    "from_uqff": "from_uqff",
    "write_uqff": "write_uqff",
    "num_device_layers": "num_device_layers",
    "topology": "topology",
    "tokenizer_json": "tokenizer_json",
}


def load_options(
    which: VisionPlain, isq: IsqType | str | None, from_uqff: str | list[str] | None, device_layers: list[str] | None
) -> dict[str, Any]:
    """Keyword arguments for `load` beyond the basics. The one place where features not available yet
    (`NOT_YET`) are refused: switching one on = deleting its `NOT_YET` entry."""
    wanted = {
        "in_situ_quant": None if isq is None else isq.value if isinstance(isq, IsqType) else isq,
        "from_uqff": from_uqff if from_uqff is not None else which.from_uqff,
        "write_uqff": which.write_uqff,
        "num_device_layers": None if device_layers is None else ";".join(device_layers),
        "topology": which.topology,
        "tokenizer_json": which.tokenizer_json,
    }
    given = {name: value for name, value in wanted.items() if value is not None}
    for name, value in given.items():
        if name in NOT_YET:
            raise InvalidRequestError(
                f"{name}={value!r}: {NOT_YET[name]} is not available in idefix {__version__} yet; leave {name} unset"
            )
    return {LOAD_ARGUMENT[name]: value for name, value in given.items()}


def hub_token(source: str) -> str | None:
    """The hub token named by a mistralrs-style token source."""
    kind, _, value = source.partition(":")
    if source in ("cache", "none"):
        return None
    if kind == "literal" and value:
        return value
    if kind == "env" and value:
        token = os.environ.get(value)
        if not token:
            raise InvalidRequestError(f"token_source {source!r}: the environment variable {value} is not set")
        return token
    if kind == "path" and value:
        try:
            return Path(value).expanduser().read_text().strip()
        except OSError as exc:
            raise InvalidRequestError(f"token_source {source!r}: cannot read {value}: {exc.strerror}") from None
    raise InvalidRequestError(
        f"token_source {source!r} is not known; use cache, none, env:VAR, literal:TOKEN or path:FILE"
    )
