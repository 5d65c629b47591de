"""Named contexts, like kubeconfig: which server, TLS folder and keys folder the CLI uses, from any folder.

The file is `$XDG_CONFIG_HOME/edgefleet/config.toml` (default `~/.config/edgefleet/config.toml`):

    current_context = "lab"
    [contexts.lab]
    server = "fleet.example:7443"
    tls_dir = "lab/operator"        # relative paths are relative to this file's folder
    keys_dir = "/secure/edgefleet-keys"

Precedence for each setting: flag > environment (`EDGEFLEET_SERVER`, `EDGEFLEET_TLS_DIR`,
`EDGEFLEET_KEYS_DIR`; `EDGEFLEET_CONTEXT` picks the context) > the context > the built-in default. The file
is parsed only here, at the edge, into frozen values; `edgefleet config ...` writes it durably.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgefleet.cli.exits import CliError, UsageError
from edgefleet.durable import write_atomic
from edgefleet.errors import InvalidRequestError
from edgefleet.names import check_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 takes the backport (the `cli` extra installs it)
    import tomli as tomllib

SETTINGS = ("server", "tls_dir", "keys_dir")
DEFAULTS = {"server": "127.0.0.1:7443", "tls_dir": "edgefleet-data/operator", "keys_dir": "edgefleet-keys"}
ENVIRONMENT = {"server": "EDGEFLEET_SERVER", "tls_dir": "EDGEFLEET_TLS_DIR", "keys_dir": "EDGEFLEET_KEYS_DIR"}
CONTEXT_ENV = "EDGEFLEET_CONTEXT"


@dataclass(frozen=True)
class Context:
    """One named context; an empty setting falls through to the default."""

    server: str = ""
    tls_dir: str = ""
    keys_dir: str = ""


@dataclass(frozen=True)
class CliConfig:
    path: Path
    current_context: str = ""
    contexts: dict[str, Context] = field(default_factory=dict)


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgefleet" / "config.toml"


def load(path: Path | None = None) -> CliConfig:
    """The config file (an empty config when there is none). Raises CliError when it cannot be read or
    parsed, naming the file."""
    path = path or config_path()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return CliConfig(path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise CliError(f"cannot read the CLI config {path}: {e}") from None
    contexts: dict[str, Context] = {}
    table = raw.get("contexts", {})
    if not isinstance(table, dict):
        raise CliError(f"{path}: `contexts` must be a table of [contexts.NAME]")
    for name, values in table.items():
        if not isinstance(values, dict) or not all(isinstance(values.get(k, ""), str) for k in SETTINGS):
            raise CliError(f"{path}: [contexts.{name}] must hold strings {', '.join(SETTINGS)}")
        unknown = set(values) - set(SETTINGS)
        if unknown:
            raise CliError(f"{path}: [contexts.{name}] has unknown settings {', '.join(sorted(unknown))}")
        contexts[name] = Context(**{k: values.get(k, "") for k in SETTINGS})
    current = raw.get("current_context", "")
    if not isinstance(current, str):
        raise CliError(f"{path}: current_context must be a string")
    return CliConfig(path, current, contexts)


def render(config: CliConfig) -> str:
    """The config as TOML (JSON strings are valid TOML basic strings)."""
    lines = ["# edgefleet CLI contexts: see `edgefleet config --help`"]
    if config.current_context:
        lines.append(f"current_context = {json.dumps(config.current_context)}")
    for name, context in sorted(config.contexts.items()):
        lines += ["", f"[contexts.{json.dumps(name)}]"]
        lines += [f"{k} = {json.dumps(getattr(context, k))}" for k in SETTINGS if getattr(context, k)]
    return "\n".join(lines) + "\n"


def save(config: CliConfig) -> None:
    config.path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(config.path, render(config).encode("utf-8"), mode=0o600)


def check_context_name(name: str) -> str:
    try:
        return check_name("context name", name)
    except InvalidRequestError as e:
        raise UsageError(str(e)) from None


def set_context(config: CliConfig, name: str, **settings: str | None) -> CliConfig:
    """`name` with the given settings changed (paths made absolute, so they mean the same from any folder)."""
    check_context_name(name)
    changes = {}
    for key, value in settings.items():
        if value is None:
            continue
        changes[key] = str(Path(value).expanduser().resolve()) if key != "server" and value else value
    context = replace(config.contexts.get(name, Context()), **changes)
    current = config.current_context or name
    return replace(config, contexts={**config.contexts, name: context}, current_context=current)


def use_context(config: CliConfig, name: str) -> CliConfig:
    if name not in config.contexts:
        raise UsageError(f"no context {name!r} in {config.path}; see `edgefleet config get-contexts`")
    return replace(config, current_context=name)


@dataclass(frozen=True)
class Resolved:
    """The settings a command runs with, and where each came from (shown by `edgefleet config view`)."""

    context: str
    server: str
    tls_dir: str
    keys_dir: str
    sources: dict[str, str]


def resolve(
    config: CliConfig, flags: dict[str, str | None], context_flag: str | None, env: dict[str, str]
) -> Resolved:
    """Each setting by flag > environment > context > default. Raises UsageError for an unknown context
    named by --context or EDGEFLEET_CONTEXT."""
    name = context_flag or env.get(CONTEXT_ENV) or config.current_context
    if name and name not in config.contexts:
        if context_flag or env.get(CONTEXT_ENV) or config.contexts:
            raise UsageError(f"no context {name!r} in {config.path}; see `edgefleet config get-contexts`")
        name = ""
    context = config.contexts.get(name, Context())
    values, sources = {}, {}
    for key in SETTINGS:
        flag, from_env, from_context = flags.get(key), env.get(ENVIRONMENT[key]), getattr(context, key)
        if flag:
            values[key], sources[key] = flag, "flag"
        elif from_env:
            values[key], sources[key] = from_env, f"${ENVIRONMENT[key]}"
        elif from_context:
            if key != "server":  # relative to the file, so the context works from any folder
                from_context = str(config.path.parent / Path(from_context).expanduser())
            values[key], sources[key] = from_context, f"context {name}"
        else:
            values[key], sources[key] = DEFAULTS[key], "default"
    return Resolved(name, values["server"], values["tls_dir"], values["keys_dir"], sources)
