"""The job command lines: every flag documented, flags land in JobConfig unchanged."""

from __future__ import annotations

import dataclasses

import pytest

from jobs.cli import build_parser, config_from_args
from pipeline.config import JobConfig

REQUIRED = ["--input", "s3://b/in", "--output", "s3://b/out", "--model", "s3://b/model"]


@pytest.mark.parametrize("task", ["classify", "embed"])
def test_every_job_setting_is_a_documented_flag(task: str) -> None:
    parser = build_parser(task)
    help_text = parser.format_help()
    flags = {option for action in parser._actions for option in action.option_strings}
    for setting in dataclasses.fields(JobConfig):
        if setting.name in ("task",) or (task == "embed" and setting.name == "top_k"):
            continue
        flag = "--exact-decode" if setting.name == "fast_decode" else "--" + setting.name.replace("_", "-")
        assert flag in flags, f"JobConfig.{setting.name} has no flag {flag}"
        assert flag in help_text
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"


def test_flags_build_the_job_config() -> None:
    args = build_parser("classify").parse_args(
        [*REQUIRED, "--top-k", "3", "--dtype", "bf16", "--embedding-dtype", "float16", "--normalize-embeddings",
         "--storage-options", '{"anon": true}', "--exact-decode", "--max-actors", "4", "--batch-size", "128"]
    )
    config = config_from_args("classify", args)
    assert config == JobConfig(
        task="classify", input="s3://b/in", output="s3://b/out", model="s3://b/model", top_k=3, dtype="bf16",
        embedding_dtype="float16", normalize_embeddings=True, storage_options={"anon": True}, fast_decode=False,
        max_actors=4, batch_size=128,
    )


def test_defaults_come_from_job_config() -> None:
    config = config_from_args("embed", build_parser("embed").parse_args(REQUIRED))
    defaults = JobConfig(task="embed", input="s3://b/in", output="s3://b/out", model="s3://b/model")
    assert config == defaults


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_error_fraction"):
        JobConfig(task="classify", input="a", output="b", model="c", max_error_fraction=1.5)
    with pytest.raises(SystemExit):
        build_parser("classify").parse_args([*REQUIRED, "--dtype", "int8"])


def test_a_command_that_succeeded_lets_go_of_ray_itself_and_one_that_failed_leaves_it_to_rays_exit_hook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a success the command disconnects from Ray itself (Ray's exit hook would first sleep 0.5 s); after a
    failure Ray's hook does it, with its wait for the workers' last log lines; without Ray, nothing is asked of it."""
    import sys
    import types

    from jobs.shutdown import exit_after

    calls: list[str] = []

    def fake_ray(connected: bool) -> types.SimpleNamespace:
        return types.SimpleNamespace(is_initialized=lambda: connected, shutdown=lambda: calls.append("shutdown"))

    monkeypatch.setitem(sys.modules, "ray", fake_ray(connected=True))
    for code, expected in ((2, []), (3, []), (0, ["shutdown"])):
        with pytest.raises(SystemExit) as ended:
            exit_after(code)
        assert ended.value.code == code and calls == expected

    calls.clear()
    monkeypatch.setitem(sys.modules, "ray", fake_ray(connected=False))
    with pytest.raises(SystemExit):
        exit_after(0)
    assert calls == []  # not connected: nothing to shut down
    monkeypatch.delitem(sys.modules, "ray")
    with pytest.raises(SystemExit) as ended:
        exit_after(0)
    assert ended.value.code == 0 and "ray" not in sys.modules  # a command that never used Ray does not import it
