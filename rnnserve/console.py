"""What every ``rnnserve`` command shares on the terminal: one error style and help texts.

A user mistake (a bad flag, a missing optional package, a server that cannot be reached) ends the
command with one line, ``rnnserve: error: ...``, and exit status 2 for usage errors or 1 for the
rest; no traceback. Imports nothing heavy: ``rnnserve chat`` and ``complete`` start fast.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
from typing import NoReturn

# Optional packages, and the extra of rnnserve that installs each.
OPTIONAL_PACKAGES = {
    "httpx": "clients",
    "openai": "clients",
    "matplotlib": "loadtest",
    "locust": "loadtest",
    "ray": "ray",
}


class CLIError(Exception):
    """A user mistake: main() prints it as one line, no traceback."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def print_error(message: str) -> None:
    print(f"rnnserve: error: {message}", file=sys.stderr)


def missing_package_message(package: str, command: str) -> str:
    extra = OPTIONAL_PACKAGES.get(package)
    how = f"pip install '.[{extra}]' in the clone, or pip install {package}" if extra else f"pip install {package}"
    return f"{command} needs the {package} package, which is not installed ({how})"


def require(package: str, command: str) -> None:
    """Raise CLIError naming the extra to install when ``package`` is not importable."""
    if importlib.util.find_spec(package) is None:
        raise CLIError(missing_package_message(package, command))


def api_key_from_env(server: bool = False) -> str | None:
    """The API key a command uses when given no ``--api-key``: ``RNNSERVE_API_KEY``; clients also
    take ``OPENAI_API_KEY`` (what the openai package reads)."""
    names = ("RNNSERVE_API_KEY",) if server else ("RNNSERVE_API_KEY", "OPENAI_API_KEY")
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def error_message(text: str) -> str:
    """The message of an OpenAI-shaped error body (``{"error": {"message": ...}}``), else the body
    itself, cut to one line of at most 300 characters."""
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return " ".join(text.split())[:300]


def v1_url(base_url: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/v1`` -> ``http://h:p/v1``."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def plain(text: str) -> str:
    """Docstring text for the terminal: ``code`` marks dropped."""
    return text.replace("``", "")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default after its help, unless there is none to show (None, False) or the
    help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if not _shows_default(action) or "default" in help_text:
            return help_text
        return f"{help_text} (default: %(default)s)"

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and _shows_default(action):
            # argparse prints no help line (so no default) for a flag without help.
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    # A flag that takes no value (store_true / store_false) has as default only "not given":
    # "--no-ignore-eos ... (default: True)" read as if it were on.
    return bool(action.option_strings) and action.nargs != 0 and action.default not in (None, False, argparse.SUPPRESS)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one-line error style and defaults in the help."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        if isinstance(kwargs.get("description"), str):
            kwargs["description"] = plain(str(kwargs["description"]))
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} (see {self.prog} --help)")
        sys.exit(2)
