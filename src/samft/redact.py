"""Keep credentials out of every file and tracker: URL passwords become `***` before a config is written.

`hparams_search.storage='${oc.env:SAMFT_OPTUNA_STORAGE}'` resolves to `postgresql://user:secret@host/db` in
memory, where the sweeper and the jobs need it to reach the database; everything written to disk (config.json,
checkpoints, summary.json, the trial table, a tracker's config) goes through `redact` first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

MASK = "***"

# scheme://user:password@host: the password runs to the last '@' of the token (a raw '/', ':' or '@' inside
# it is still hidden, as SQLAlchemy accepts such passwords), never across whitespace or quotes. Hydra writes
# override values with ':' escaped (`postgresql\://u\:pw@h`), hence the optional backslashes.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*\\?://[^:/@\s'\"\\]*\\?:)(?P<password>[^\s'\"]*)@")
# ...?password=secret&... (libpq and SQLAlchemy also take the password as a query parameter)
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd)=)(?P<password>[^&\s'\"#]*)", re.IGNORECASE)


def redact(value: Any) -> Any:
    """A copy of `value` with every URL password replaced by `***`.

    Strings are redacted (`postgresql://u:pw@h/db` -> `postgresql://u:***@h/db`); mappings (including an
    OmegaConf DictConfig) become dicts and sequences (lists, tuples, ListConfig) become lists, redacted
    recursively; anything else is returned unchanged.
    """
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, Mapping):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [redact(item) for item in value]
    return value


def _redact_text(text: str) -> str:
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@" if m["password"] else m[0], text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}" if m["password"] else m[0], text)

