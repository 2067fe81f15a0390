"""The audit section: a file sink needs a path in a directory that exists, told at start-up as one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.settings.config import ConfigError, build_config
from proxy.settings.models import AuditOnFull, AuditSink
from tests.unit.settings.test_config_models import check_config


def problems(audit: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build_config({"auth": {"mode": "disabled"}, "audit": audit})
    return info.value.problems


def test_the_default_is_off_with_drop_and_a_bounded_queue() -> None:
    audit = build_config({"auth": {"mode": "disabled"}}).audit
    assert (audit.sink, audit.path, audit.on_full, audit.queue_size) == (AuditSink.OFF, None, AuditOnFull.DROP, 10000)


def test_a_file_sink_needs_a_path() -> None:
    assert problems({"sink": "file"}) == ["audit.path: required when audit.sink is 'file'"]


def test_the_paths_directory_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "audit.log"
    assert problems({"sink": "file", "path": str(missing)}) == [
        f"audit.path: its directory '{missing.parent}' does not exist"]
    assert problems({"sink": "file", "path": str(tmp_path)}) == [
        f"audit.path: '{tmp_path}' is a directory; name a file in it"]


@pytest.mark.parametrize(("audit", "line"), [
    ({"sink": "syslog"}, "audit.sink: must be one of off, stdout, file; got 'syslog'"),
    ({"on_full": "block"}, "audit.on_full: must be one of drop, refuse; got 'block'"),
    ({"queue_size": 0}, "audit.queue_size: must be >= 1, got 0"),
])
def test_bad_values_name_their_key(audit: dict, line: str) -> None:
    assert problems(audit) == [line]


def test_yaml_off_unquoted_is_the_off_sink_and_a_missing_directory_fails_check_config(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("auth: {mode: disabled}\naudit: {sink: off}\n")
    assert check_config(path).returncode == 0
    path.write_text(f"auth: {{mode: disabled}}\naudit: {{sink: file, path: {tmp_path}/gone/audit.log}}\n")
    done = check_config(path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"config error: audit.path: its directory '{tmp_path}/gone' does not exist"]
