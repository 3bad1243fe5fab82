"""Credential masking (pipeline/redaction.py): URIs, query-string signatures, arguments, command lines."""

from __future__ import annotations

import dataclasses
import json
import random
import string
from pathlib import Path

import pytest

from pipeline.redaction import MASK, is_secret_name, sanitize_arguments, sanitize_uri, strip_uri_credentials

FAKE_SECRET = "FAKE-SECRET-7f3c9a1e-do-not-store"


def test_sanitize_arguments_masks_a_secret_everywhere() -> None:
    @dataclasses.dataclass
    class Config:
        output_uri: str
        api_key: str

    arguments = {
        "input_uri": f"s3://AKIAFAKE:{FAKE_SECRET}@bucket/in",
        "http_source": f"https://cdn.example.com/a.tar?X-Amz-Signature={FAKE_SECRET}&part=2",
        "storage_options": {
            "key": "AKIAFAKE",
            "secret": FAKE_SECRET,
            "token": FAKE_SECRET,
            "client_kwargs": {"aws_session_token": FAKE_SECRET, "region_name": "us-east-1"},
            "profile": "default",
        },
        "password": FAKE_SECRET,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "argv": ["--output", "s3://b/out", "--aws-secret-access-key", FAKE_SECRET, f"--token={FAKE_SECRET}"],
        "storage_options_json": json.dumps({"secret": FAKE_SECRET, "anon": False}),
        "connection": f"endpoint=http://x password={FAKE_SECRET}",
        "config": Config(output_uri="/out", api_key=FAKE_SECRET),
        "top_k": 5,
        "sources": ("a.tar", Path("/data/b.tar")),
    }
    cleaned = sanitize_arguments(arguments)
    assert FAKE_SECRET not in json.dumps(cleaned)
    assert cleaned["input_uri"] == "s3://bucket/in"
    assert cleaned["http_source"] == "https://cdn.example.com/a.tar?X-Amz-Signature=***&part=2"
    assert cleaned["storage_options"]["key"] == "***"
    assert cleaned["storage_options"]["client_kwargs"] == {"aws_session_token": "***", "region_name": "us-east-1"}
    assert cleaned["storage_options"]["profile"] == "default"
    assert cleaned["argv"] == ["--output", "s3://b/out", "--aws-secret-access-key", "***", "--token=***"]
    assert json.loads(cleaned["storage_options_json"]) == {"secret": "***", "anon": False}
    assert cleaned["config"] == {"output_uri": "/out", "api_key": "***"}
    assert cleaned["connection"] == "endpoint=http://x password=***"
    assert cleaned["top_k"] == 5 and cleaned["sources"] == ["a.tar", "/data/b.tar"]
    assert arguments["storage_options"]["secret"] == FAKE_SECRET  # the input is not modified


# --------------------------------------------------------------------------------------------------------------------
# Passwords in URIs
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://KEY:p@ss@bucket/in/a.tar", "s3://bucket/in/a.tar"),  # the audit's surviving mutation
        ("s3://KEY:p@ss@bucket", "s3://bucket"),
        ("s3://KEY:a:b@c@bucket/in", "s3://bucket/in"),
        ("s3://KEY:ab/cd+ef@bucket/in", "s3://bucket/in"),  # an AWS secret key pasted unencoded
        ("s3://KEY:a/b@c@bucket/key@x.jpg", "s3://bucket/key@x.jpg"),
        ("s3://KEY:a?b#c@bucket/in", "s3://bucket/in"),
        ("s3://KEY:a b@bucket/in", "s3://bucket/in"),
        ("https://TOKEN@github.example.com/x.tar", "https://github.example.com/x.tar"),
        ("s3://KEY:SECRET@bucket/photos/me@home.jpg", "s3://bucket/photos/me@home.jpg"),
    ],
)
def test_sanitize_uri_drops_any_password(uri: str, expected: str) -> None:
    assert sanitize_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/photos/me@home.jpg",
        "https://host:8443/a@b.jpg",
        "abfs://container@account.dfs.core.windows.net/shards/a.tar",  # a container, not a user: must survive
        "s3://bucket/odd?name#with=marks.jpg",
        "/local/session=3/key=value.jpg",
        "file:///tmp/a@b/c.jpg",
    ],
)
def test_uris_without_credentials_come_back_byte_for_byte(uri: str) -> None:
    assert sanitize_uri(uri) == uri
    assert strip_uri_credentials({"uri": uri, "members": [uri]}) == {"uri": uri, "members": [uri]}


def _random_passwords(count: int) -> list[str]:
    """Passwords of every printable character, ``@ : / ? # & ; = % +`` and quotes included.

    Not generated, because URL syntax makes them ambiguous (pipeline/redaction.py's docstring): a password starting
    with digits and then ``/``, ``?`` or ``#`` (``s3://K:12/x@b`` is host ``K`` port ``12``), and one with an ``@``
    followed later by an unencoded ``/`` (``K:a@b/c@bucket`` is host ``b``). Nor whitespace, which cannot sit inside
    a URI that is itself inside free text.
    """
    alphabet = "".join(char for char in string.printable if not char.isspace())
    rng = random.Random(13)
    passwords = ["@", "p@ss", "@@@", "a/b@c", "--x", "%40%2F", "'\"", "a&b;c=d", "sig=x&sv=y", "::"]
    while len(passwords) < count:
        candidate = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        at = candidate.find("@")
        if candidate.lstrip(string.digits)[:1] not in "/?#" and (at < 0 or "/" not in candidate[at:]):
            passwords.append(candidate)
    return passwords


@pytest.mark.parametrize("password", _random_passwords(200))
def test_a_password_of_any_characters_never_survives(password: str) -> None:
    secret = f"Zq{password}Zq"  # markers so that a partial leak is found too
    uri = f"s3://AKIAFAKE:{secret}@bucket/in/a.tar"
    shown = [
        sanitize_uri(uri),
        json.dumps(strip_uri_credentials([{"uri": uri}])),
        json.dumps(
            sanitize_arguments(
                {
                    "input": uri,
                    "argv": ["--input", uri, f"--input={uri}", "--password", secret, f"--password={secret}"],
                    "message": f"cannot read {uri}: access denied",
                    "password": secret,
                    "storage_options": json.dumps({"secret": secret}),
                }
            )
        ),
    ]
    for text in shown:
        assert "Zq" not in text, text
    assert sanitize_uri(uri) == "s3://bucket/in/a.tar"


# --------------------------------------------------------------------------------------------------------------------
# Query-string secrets of every store fsspec reaches
# --------------------------------------------------------------------------------------------------------------------

SIGNED_URLS = {
    "s3 presigned (SigV4)": (
        "https://bucket.s3.amazonaws.com/shards/a.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAFAKE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
        "&X-Amz-Expires=3600&X-Amz-Security-Token=SESSIONTOKEN&X-Amz-SignedHeaders=host&X-Amz-Signature=abcdef0123",
        ["AKIAFAKE", "SESSIONTOKEN", "abcdef0123"],
        ["X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Date=20260101T000000Z", "X-Amz-Expires=3600"],
    ),
    "s3 presigned (SigV2)": (
        "https://bucket.s3.amazonaws.com/a.tar?AWSAccessKeyId=AKIAFAKE&Expires=1767225600&Signature=c2lnbmF0dXJl",
        ["AKIAFAKE", "c2lnbmF0dXJl"],
        ["Expires=1767225600"],
    ),
    "gcs signed (V4)": (
        "https://storage.googleapis.com/bucket/a.tar?X-Goog-Algorithm=GOOG4-RSA-SHA256"
        "&X-Goog-Credential=svc%40proj.iam.gserviceaccount.com%2F20260101%2Fauto%2Fstorage%2Fgoog4_request"
        "&X-Goog-Date=20260101T000000Z&X-Goog-Expires=900&X-Goog-SignedHeaders=host&X-Goog-Signature=0a1b2c3d4e",
        ["svc%40proj", "0a1b2c3d4e"],
        ["X-Goog-Expires=900", "X-Goog-SignedHeaders=host"],
    ),
    "gcs signed (V2)": (
        "https://storage.googleapis.com/bucket/a.tar?GoogleAccessId=svc@proj.iam&Expires=1767225600"
        "&Signature=R29vZ2xlU2ln%2B%3D",
        ["R29vZ2xlU2ln"],
        ["GoogleAccessId=svc@proj.iam", "Expires=1767225600"],
    ),
    "azure sas": (
        "https://account.blob.core.windows.net/container/a.tar?sv=2022-11-02&ss=b&srt=o&sp=r"
        "&se=2026-01-01T00:00:00Z&st=2025-12-01T00:00:00Z&spr=https&sig=QXp1cmVTaWc%3D",
        ["QXp1cmVTaWc"],
        ["sv=2022-11-02", "sp=r", "se=2026-01-01T00:00:00Z"],
    ),
    "azure sas on abfs": (
        "abfs://container@account.dfs.core.windows.net/a.tar?sv=2022-11-02&sr=c&sig=QWJmc1NpZw%3D%3D",
        ["QWJmc1NpZw"],
        ["abfs://container@account.dfs.core.windows.net/a.tar?", "sv=2022-11-02"],
    ),
    "cloudfront signed": (
        "https://d111.cloudfront.net/a.tar?Expires=1767225600&Signature=Q2xvdWRGcm9udA__&Key-Pair-Id=K2JCJMDEHXQW5F",
        ["Q2xvdWRGcm9udA__", "K2JCJMDEHXQW5F"],
        ["Expires=1767225600"],
    ),
    "generic token": (
        "https://data.example.com/a.tar?access_token=T0KEN&api_key=AP1KEY&page=2",
        ["T0KEN", "AP1KEY"],
        ["page=2"],
    ),
}


@pytest.mark.parametrize("case", sorted(SIGNED_URLS))
def test_query_string_secrets_are_masked_and_the_rest_kept(case: str) -> None:
    uri, secrets, kept = SIGNED_URLS[case]
    for shown in (sanitize_uri(uri), sanitize_arguments({"input": uri})["input"], sanitize_arguments(f"GET {uri}")):
        for secret in secrets:
            assert secret not in shown, (case, shown)
        for fragment in kept:
            assert fragment in shown, (case, shown)
        assert MASK in shown


def test_azure_connection_string_and_sas_in_free_text_are_masked() -> None:
    text = (
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=QUNDT1VOVEtFWQ==;"
        "SharedAccessSignature=sv=2022-11-02&sig=U0FTU0lH;EndpointSuffix=core.windows.net"
    )
    shown = sanitize_arguments(text)
    assert "QUNDT1VOVEtFWQ" not in shown and "U0FTU0lH" not in shown
    assert "AccountName=acct" in shown and "EndpointSuffix=core.windows.net" in shown


def test_quoted_secret_in_free_text_is_masked_whole() -> None:
    shown = sanitize_arguments('connect with password="a b&c;d" to host')
    assert shown == f'connect with password={MASK} to host'


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("X-Amz-Signature", True),
        ("X-Amz-Credential", True),
        ("X-Amz-Security-Token", True),
        ("X-Goog-Signature", True),
        ("X-Goog-Credential", True),
        ("sig", True),
        ("AWSAccessKeyId", True),
        ("Key-Pair-Id", True),
        ("aws_region", True),
        ("sv", False),
        ("se", False),
        ("X-Amz-Expires", False),
        ("top_k", False),
        ("keys_column", False),
        ("signal", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret
