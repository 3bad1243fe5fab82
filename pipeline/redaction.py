"""Credential masking: what may be logged or stored about a job's arguments, URIs and storage options.

Moved out of ``pipeline/manifest.py`` (issue 9, item 7): the bookkeeping module writes files, this one decides what
a secret looks like, and every writer of logs, records, Parquet metadata and error messages calls it. Nothing here
does I/O.

What counts as a credential, and where it can hide:

* values under secret-looking names, in mappings, dataclasses, ``--flag value`` / ``--flag=value`` command lines and
  ``name=value`` pairs inside free text (:func:`is_secret_name`);
* the user-info of a URI (``s3://KEY:SECRET@bucket/...``). The password may hold any character: ``@`` and ``:``
  (the user-info ends at the last ``@`` of the authority, as URL parsers read it), and even an unencoded ``/``,
  ``?`` or ``#`` (an AWS secret key pasted as it is), which no parser would read as a password but a log would
  still show. Two spellings stay ambiguous and are read as URL parsers read them: ``K:12/x@b`` (host ``K``, port
  ``12``) and a password with an ``@`` followed later by an unencoded ``/`` (``K:a@b/c@bucket`` is host ``b``);
  percent-encode such passwords, as the URL syntax requires;
* query-string signatures of every object store fsspec reaches: S3 pre-signed URLs (``X-Amz-Signature``,
  ``X-Amz-Credential``, ``X-Amz-Security-Token``, and the older ``AWSAccessKeyId`` / ``Signature``), GCS signed
  URLs (``X-Goog-Signature``, ``X-Goog-Credential``, ``GoogleAccessId`` / ``Signature``), Azure SAS tokens
  (``sig`` is the secret; ``sv``, ``se``, ``sp`` ... only describe it and stay readable), CloudFront
  (``Signature``, ``Key-Pair-Id``) and generic ``token`` / ``access_token`` / ``api_key`` parameters.

A masked value becomes ``"***"`` so that a reader still sees that the option was set. Azure's
``abfs://container@account...`` names a container, not a user, and is kept: a resume must read it back.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import numpy as np

MASK = "***"

_SECRET_TOKENS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passwd",
        "pwd",
        "session",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "signature",
        "sig",  # Azure SAS
        "apikey",
        "private",
    }
)
_NAME_TOKENS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

# Schemes whose ``<name>@`` is a container or bucket, not a user (fsspec's adlfs: ``abfs://container@account``).
_CONTAINER_AT_SCHEMES = frozenset({"abfs", "abfss", "az", "adl", "wasb", "wasbs"})

# Standard user-info: everything up to the LAST ``@`` before the authority ends (``/``, ``?``, ``#``).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*@)")
# ``user:password@`` whose password holds an unencoded ``/``, ``?`` or ``#``: after ``user:`` (not a port) up to the
# first ``@``, then on through further ``@``s while no ``/`` intervenes (``s3://K:a/b@c@bucket/key@x.jpg`` keeps
# ``bucket/key@x.jpg``).
_LOOSE_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)"
    r"(?P<userinfo>[^/?#@\s:]*:(?!\d*(?:[/?#\s]|$))[^\s@]*@(?:[^\s/@]*@)*)"
)
# ``name=value`` inside a free-form string (a command line, a query string, a connection string). A quoted value runs
# to its closing quote, so ``password="a b&c"`` is masked whole.
_INLINE_ASSIGNMENT = re.compile(
    r"(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)"
    r"(?P<sep>\s*(?:=|:(?!//))\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s&;,'\"]+)"
)
# One command-line token ``--name=value`` (or ``-name=value``): the value is everything after the first ``=``.
_FLAG_ASSIGNMENT = re.compile(r"(?P<flag>--?[A-Za-z][A-Za-z0-9_.-]*)=(?P<value>.*)", re.DOTALL)
_EMBEDDED_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")
_QUERY_PAIR = re.compile(r"(?P<lead>^|[&;])(?P<name>[^&;=]*)=(?P<value>[^&;]*)")


def is_secret_name(name: str) -> bool:
    """True for names whose values are credentials: ``secret``, ``aws_session_token``, ``apiKey``, ``--password``.

    Names are split into words so that ``key`` matches ``aws_access_key_id`` and ``sse_customer_key`` but not
    ``top_k`` or ``keys_column``. Every ``aws_*`` name counts: that is where AWS credentials live, and masking a
    harmless one (a region) costs little.
    """
    lowered = name.lower().lstrip("-")
    if lowered.startswith("aws_") or lowered.startswith("aws-") or "access_key" in lowered:
        return True
    words = {word.lower() for word in _NAME_TOKENS.findall(name)}
    return bool(words & _SECRET_TOKENS)


def _strip_userinfo(text: str) -> str:
    """Remove every URI user-info in ``text`` that may hold a secret (see the module docstring)."""

    def drop(match: re.Match[str]) -> str:
        scheme = match["scheme"].split("://", 1)[0].lower()
        if scheme in _CONTAINER_AT_SCHEMES and ":" not in match["userinfo"]:
            return match[0]  # abfs://container@account: a container name, needed to read the data back
        return match["scheme"]

    return _USERINFO.sub(drop, _LOOSE_USERINFO.sub(drop, text))


def _mask_query(query: str) -> str:
    """Mask the values of secret-named parameters, leaving every other byte of the query as it was."""

    def mask(match: re.Match[str]) -> str:
        if not is_secret_name(unquote_plus(match["name"])) or match["value"] == MASK:
            return match[0]
        return f"{match['lead']}{match['name']}={MASK}"

    return _QUERY_PAIR.sub(mask, query)


def sanitize_uri(uri: str) -> str:
    """Drop ``user:password@`` from a URI and mask credential-like query parameters (pre-signed URLs, SAS tokens).

    A URI without credentials comes back byte for byte: object keys may hold ``?`` or ``#`` that a rebuild would
    normalise, and the shard plan must read them back.
    """
    if "://" not in uri:
        return uri
    stripped = _strip_userinfo(uri)
    try:
        parts = urlsplit(stripped)
    except ValueError:
        return stripped
    if "@" in parts.netloc and parts.scheme.lower() not in _CONTAINER_AT_SCHEMES:
        # user-info holding whitespace, which the patterns above do not cross
        parts = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])
        stripped = urlunsplit(parts)
    query = _mask_query(parts.query)
    if query == parts.query:
        return stripped
    return urlunsplit(parts._replace(query=query))


def _sanitize_string(text: str) -> str:
    stripped = text.strip()
    if stripped[:1] in "{[":
        # A JSON document passed as one argument (``--storage-options '{"secret": ...}'``).
        try:
            return json.dumps(sanitize_arguments(json.loads(stripped)))
        except json.JSONDecodeError:
            pass
    flag = _FLAG_ASSIGNMENT.fullmatch(text)
    if flag:
        if is_secret_name(flag["flag"]):
            return f"{flag['flag']}={MASK}"
        return f"{flag['flag']}={_sanitize_string(flag['value'])}"
    if not any(char.isspace() for char in stripped):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", stripped):
            return sanitize_uri(text)
        if stripped.startswith(("/", "./", "../", "~")):
            # A path: ``/data/session=3/`` is a Hive-style partition, not a credential.
            return text
    text = _EMBEDDED_URI.sub(lambda uri: sanitize_uri(uri[0]), _strip_userinfo(text))

    def mask(match: re.Match[str]) -> str:
        if not is_secret_name(match["name"]) or match["value"] == MASK:
            return match[0]
        return f"{match['name']}{match['sep']}{MASK}"

    return _INLINE_ASSIGNMENT.sub(mask, text)


def sanitize_arguments(obj: Any) -> Any:
    """Return a JSON-ready copy of job arguments with every credential masked; safe to store and to log.

    Handles nested mappings and lists (storage options inside a config), dataclasses, URIs with ``user:password@``
    or pre-signed query strings, JSON documents passed as strings, ``name=value`` pairs inside strings, and
    command lines (``["--secret", "abc"]`` and ``["--secret=abc"]`` mask ``abc``, whatever characters it holds).
    Values under secret-looking keys become ``"***"``, so a reader still sees that the option was set.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {
            str(name): MASK if is_secret_name(str(name)) and value is not None else sanitize_arguments(value)
            for name, value in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        cleaned: list[Any] = []
        mask_next = False
        for item in obj:
            if mask_next and isinstance(item, str):
                # The value of a secret flag, whatever it looks like (a password may start with "--").
                cleaned.append(MASK)
                mask_next = False
                continue
            mask_next = isinstance(item, str) and item.startswith("-") and "=" not in item and is_secret_name(item)
            cleaned.append(sanitize_arguments(item))
        return cleaned
    if isinstance(obj, str):
        return _sanitize_string(obj)
    if obj is None or isinstance(obj, (bool, int, float)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return _sanitize_string(str(obj))


def strip_uri_credentials(obj: Any) -> Any:
    """Copy of a JSON-like value with :func:`sanitize_uri` applied to every URI string, and nothing else changed.

    For the shard plan: its entries are produced by the source lister, not typed by a user, so the only place a
    credential can hide is a URI; masking by key names or ``name=value`` patterns there could corrupt an image path
    (``cats/session=3/x.jpg``) that a resume must read back.
    """
    if isinstance(obj, Mapping):
        return {str(name): strip_uri_credentials(value) for name, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strip_uri_credentials(item) for item in obj]
    if isinstance(obj, str) and "://" in obj:
        return sanitize_uri(obj)
    return obj
