"""Hydra's and OmegaConf's composition errors, retold as one line: the key, the bad value, the choices.

Hydra reports a wrong group option or a badly typed override as several lines of its own text and
exit status 1; otr reports every mistake a user can fix as one line and exit status 2
(docs/configuration.md, "Errors at start-up"). ``describe`` builds that line; the callers
(otr_cli/app.py, otr_cli/config.py) raise it as a ConfigError.
"""

from __future__ import annotations

import difflib
import re
from typing import Mapping, Optional

# Hydra's words for a missing option: "In 'train': Could not find 'loss/nope'".
_MISSING_OPTION = re.compile(r"(?:In '(?P<parent>[^']+)': )?Could not find '(?P<group>[^']+)/(?P<name>[^'/]+)'")
# Hydra's words for a failed override: "Error merging override trainer.max_steps=abc".
_MERGING_OVERRIDE = re.compile(r"(?:Error merging override|Could not override '[^']*'\.?.*?use \+?)\s*(?P<override>\S+=\S*)")
# OmegaConf's detail lines after the first ("    full_key: ...", "    object_type=...").
_DETAIL_LINE = re.compile(r"^\s*(full_key|reference_type|object_type)\b")


def one_line(text: str) -> str:
    """`text` without OmegaConf's detail lines, its lines joined with '; '."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip() and not _DETAIL_LINE.match(line)]
    return "; ".join(lines)


def did_you_mean(word: str, choices) -> str:
    """' Did you mean: a, b?' for the choices close to `word`, else ''."""
    close = difflib.get_close_matches(word, list(dict.fromkeys(choices)), n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def describe(err: BaseException, key_types: Mapping[str, object], primary: str) -> str:
    """One line for a composition error of Hydra or OmegaConf.

    key_types: every dotted key of the command's schema -> its field type (config.schema_keys).
    primary: the primary config's name (train, eval_main), left out of the message's "where".
    """
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(err, MissingConfigException):
        return _missing_option(err, primary)
    if isinstance(err, OverrideParseException):
        return (f"cannot read the override '{err.override}': {one_line(err.message).split('; See https')[0]}. "
                f"Write key=value, e.g. optim.lr=1e-5, and quote lists and brackets: 'eval.benchmarks=[gsm8k,svamp]'")
    cause: Optional[BaseException] = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return _bad_value(err, cause, key_types)
    return one_line(str(err))


def _missing_option(err, primary: str) -> str:
    found = _MISSING_OPTION.search(str(err))
    if not found:
        return one_line(str(err).split("Config search path:")[0])
    group, name, parent = found["group"], found["name"], found["parent"]
    options = [option for option in (err.options or []) if not option.startswith("file:")]
    where = f" (in the defaults of {parent})" if parent and parent != primary else ""
    file_hint = ", or a recipe file of your own: `otr train path/to/my_recipe.yaml`" if group == "recipe" else ""
    return (f"{group}={name}{where}: there is no {group} option '{name}'; available: "
            f"{', '.join(options) or 'none'}{file_hint}.{did_you_mean(name, options)}")


def _bad_value(err: BaseException, cause, key_types: Mapping[str, object]) -> str:
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    key = cause.full_key or (str(cause.key) if cause.key is not None else "")
    override = _MERGING_OVERRIDE.search(str(err)) if err is not cause else None
    reason = one_line(cause.msg or str(cause))
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        # "Key 'lrr' not in 'OptimConfig'": name the key by its full path and the closest real ones.
        return (f"unknown config key '{key}'{_in_override(override)}: {reason}.{did_you_mean(key, key_types)} "
                f"`otr train --cfg job` prints every key.")
    expected = key_types.get(key)
    takes = f"; {key} takes {expected}" if expected is not None else ""
    subject = override["override"] if override else (f"{key}={cause.value!r}" if key else "the config")
    return f"{subject}: {reason}{takes}"


def _in_override(override) -> str:
    return f" in override '{override['override']}'" if override else ""
