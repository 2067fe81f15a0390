"""The built wheel in a fresh virtual environment (not editable), run the way the image runs it.

One session fixture builds the wheel from exactly what the Containerfile copies and installs it with
the pinned constraints; the tests then run the installed `arp-gateway` as a non-root user from a
read-only working directory (no container engine runs here, so this is the image's run, minus the image).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.gateway import RUN_START
from tests.support.deploy import DEPLOY, ROOT, local_healthcheck_argv
from tests.support.process import free_ports, read_until

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
NOBODY = 65534


def _world_usable(path: Path) -> bool:
    """Whether another user can run this interpreter (every parent directory traversable)."""
    path = path.resolve()
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents) and bool(path.stat().st_mode & stat.S_IXOTH)


def _base_python() -> tuple[str, bool]:
    """An interpreter for the fresh venv, and whether a non-root user can run it. The running one may
    live under /root (pyenv); Debian's python3 (3.11 here, as in the image) is usable by anyone."""
    current = Path(getattr(sys, "_base_executable", sys.executable))
    if os.geteuid() != 0 or _world_usable(current):
        return str(current), True
    for candidate in ("/usr/bin/python3.11", "/usr/bin/python3.12", "/usr/bin/python3"):
        path = Path(candidate)
        if path.exists() and _world_usable(path) and subprocess.run(
                [candidate, "-c", "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"],
                capture_output=True).returncode == 0:
            return candidate, True
    return str(current), False


@dataclass
class Installed:
    wheel: Path
    venv: Path
    readonly: Path  # a working directory nobody can write to
    non_root: bool  # whether the tests can switch to a non-root user

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.readonly), "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1", **extra}

    def run_as(self) -> dict[str, int]:
        """As the image runs it: a non-root user (here `nobody` when the tests run as root)."""
        return {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 and self.non_root else {}


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{argv}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="session")
def installed() -> Iterator[Installed]:
    base = Path(tempfile.mkdtemp(prefix="arp-wheel-"))
    try:
        base.chmod(0o755)  # readable by the non-root user the gateway runs as
        src = base / "src"
        src.mkdir()
        # Exactly what the Containerfile's build stage copies.
        for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"):
            shutil.copy2(ROOT / name, src / name)
        for tree in ("proxy", "config"):  # links kept as links, as the Containerfile's COPY keeps them
            shutil.copytree(ROOT / tree, src / tree, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        constraints = str(DEPLOY / "constraints.txt")
        env = {**os.environ, "PIP_CONSTRAINT": constraints, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(base / "dist"), str(src)], env=env,
             timeout=600)
        wheel = next((base / "dist").glob("*.whl"))
        venv = base / "venv"
        python, non_root = _base_python()
        _run([python, "-m", "venv", str(venv)], timeout=120)
        _run([str(venv / "bin" / "pip"), "install", "--constraint", constraints, str(wheel)], env=env, timeout=600)
        readonly = base / "readonly"
        readonly.mkdir()
        readonly.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        yield Installed(wheel, venv, readonly, non_root)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_wheel_ships_every_file_the_program_reads(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert "proxy/data/dev.yaml" in names and "proxy/py.typed" in names
    assert "proxy/arp/schemas/run_gateway/runs/run_start_request.schema.json" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(installed.wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert f"Version: {VERSION}" in metadata and "License-Expression: MIT" in metadata
    assert "Classifier: Typing :: Typed" in metadata and "Project-URL: Source," in metadata
    assert "MIT License" in (ROOT / "LICENSE").read_text() and PYPROJECT["project"]["license"] == "MIT"
    # Not editable: the package is imported from the venv, not from this checkout.
    where = _run([str(installed.bin / "python"), "-c", "import proxy; print(proxy.__file__, proxy.__version__)"],
                 cwd=installed.readonly, env=installed.env()).stdout.split()
    assert where[0].startswith(str(installed.venv)) and where[1] == VERSION
    out = _run([str(installed.bin / "arp-gateway"), "--version"], cwd=installed.readonly, env=installed.env())
    assert out.stdout.strip() == f"arp-gateway {VERSION}"


def test_installed_check_config_prints_the_shipped_examples_and_they_validate(installed, tmp_path):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    assert {"proxy/data/gateway.example.yaml", "proxy/data/local-port-forward.yaml"} <= names
    assert "proxy/data/audit-record.schema.json" in names   # the audit trail reads it at start
    gateway = installed.bin / "arp-gateway"
    for flags, source in ((["--example"], "gateway.example.yaml"),
                          (["--example", "local-port-forward"], "local-port-forward.yaml")):
        printed = _run([str(gateway), "check-config", *flags], cwd=installed.readonly, env=installed.env()).stdout
        assert printed == (ROOT / "config" / source).read_text()  # the documented file, whole
        saved = tmp_path / source
        saved.write_text(printed)
        secret = tmp_path / "client-secret"
        secret.write_text("s\n")
        # The port-forward recipe names the developer's own client in the environment.
        env = installed.env(ARP_AUTH_CLIENT_ID="my-cli", ARP_AUTH_CLIENT_SECRET_FILE=str(secret))
        checked = _run([str(gateway), "check-config", str(saved)], cwd=installed.readonly, env=env)
        assert "auth:" in checked.stdout


def test_installed_check_config_accepts_the_image_configuration(installed):
    done = _run([str(installed.bin / "arp-gateway"), "check-config", "--config",
                 str(DEPLOY / "container" / "gateway.yaml")], cwd=installed.readonly, env=installed.env())
    assert "host: 0.0.0.0" in done.stdout


async def _get(url: str) -> tuple[int, dict]:
    import aiohttp
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def _until(predicate, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                if await predicate():
                    return
            except OSError:
                pass
            except Exception as exc:  # aiohttp.ClientError: not listening yet
                if "Cannot connect" not in str(exc) and "Connect call failed" not in str(exc):
                    raise
            await asyncio.sleep(0.1)  # a child process starting


async def test_installed_serve_runs_the_image_configuration_as_non_root_read_only(installed, tmp_path, idp):
    """The image's configuration, ports moved to free ones; the issuer comes from the environment as
    a platform team would set it. No coordinator runs: the gateway still starts and answers."""
    port, metrics, no_coordinator = free_ports(3)
    config_dir = Path(tempfile.mkdtemp(prefix="arp-image-config-"))
    try:
        text = (DEPLOY / "container" / "gateway.yaml").read_text()
        (config_dir / "gateway.yaml").write_text(text.replace("port: 8080", f"port: {port}")
                                                 .replace("port: 9464", f"port: {metrics}"))
        (config_dir / "gateway.yaml").chmod(0o444)
        config_dir.chmod(0o555)
        proc = await asyncio.create_subprocess_exec(
            str(installed.bin / "arp-gateway"), "serve", "--config", str(config_dir / "gateway.yaml"),
            cwd=installed.readonly, env=installed.env(ARP_AUTH_ISSUER=idp.issuer, ARP_AUTH_AUDIENCE="arp-gw",
                              JARVIS_RUN_COORDINATOR_URL=f"http://127.0.0.1:{no_coordinator}"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
            **installed.run_as())
        try:
            base, ops = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics}"

            async def ready() -> bool:
                return (await _get(ops + "/readyz"))[0] == 200
            await _until(ready)
            status, health = await _get(base + "/v1/health")
            assert status == 200 and health["checks"][0]["name"] == "run_coordinator"
            assert health["status"] == "down"  # honest: nothing behind it
            status, version = await _get(base + "/v1/version")
            assert status == 200 and version["service_version"] == VERSION
            status, body = await _get(ops + "/readyz")
            assert body == {"status": "ready", "reasons": []}
            # The image's HEALTHCHECK, with the venv's python as the image's `python`, checking
            # this gateway process as it would check the container's PID 1.
            check = local_healthcheck_argv(str(installed.bin / "python"), proc.pid)
            assert subprocess.run(check, cwd=installed.readonly, env=installed.env(), timeout=30).returncode == 0
            # Auth is required by the image's configuration: a run start without a token is refused.
            import aiohttp
            async with aiohttp.ClientSession() as http, http.post(base + "/v1/runs", json=RUN_START) as resp:
                assert resp.status == 401
            token = await idp.token({"sub": "ci", "aud": "arp-gw"})
            async with aiohttp.ClientSession() as http, http.post(
                    base + "/v1/runs", json=RUN_START, headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 502  # authenticated, then: nothing listens behind it
                assert (await resp.json())["error"]["code"] == "run_coordinator_unavailable"
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)  # the child handles the first signal
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)  # a second signal skips the drain delay
            _, err = await asyncio.wait_for(proc.communicate(), 40)
        assert proc.returncode == 0, err.decode()[-3000:]
        assert b"Traceback" not in err
    finally:
        config_dir.chmod(0o755)
        shutil.rmtree(config_dir, ignore_errors=True)


async def test_installed_dev_walks_the_seed_flow(installed):
    import aiohttp
    proc = await asyncio.create_subprocess_exec(
        str(installed.bin / "arp-gateway"), "dev", "--port", "0", "--metrics-port", "0", "--issuer-port", "0",
        "--step-delay", "0.05", cwd=installed.readonly, env=installed.env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True, **installed.run_as())
    try:
        _, banner = await read_until(proc.stderr, "Ctrl-C to stop", timeout=30)
        gateway = re.search(r"ARP Run Gateway \(dev\)\s+(http://127\.0\.0\.1:\d+)", banner).group(1)
        issuer = re.search(r"Dev token issuer\s+(http://127\.0\.0\.1:\d+)", banner).group(1)
        async with aiohttp.ClientSession() as http:
            async with http.post(gateway + "/v1/runs", json=RUN_START) as resp:
                assert resp.status == 200
                run = await resp.json()
            minted = await asyncio.create_subprocess_exec(
                str(installed.bin / "arp-gateway"), "token", "--issuer", issuer, cwd=installed.readonly,
                env=installed.env(), stdout=asyncio.subprocess.PIPE, **installed.run_as())
            token = (await minted.communicate())[0].decode().strip()
            assert minted.returncode == 0 and token.count(".") == 2
            headers = {"Authorization": f"Bearer {token}"}
            async with http.post(gateway + "/v1/runs", json=RUN_START, headers=headers) as resp:
                assert resp.status == 200
                run = await resp.json()
            async with http.get(f"{gateway}/v1/runs/{run['run_id']}/events", headers=headers) as resp:
                assert resp.headers["Content-Type"].startswith("application/x-ndjson")
                lines = [line async for line in resp.content]
            assert b"run_completed" in lines[-1]
            async with http.get(f"{gateway}/v1/runs/{run['run_id']}", headers=headers) as resp:
                assert resp.status == 200 and (await resp.json())["run_id"] == run["run_id"]
            async with http.post(f"{gateway}/v1/runs/{run['run_id']}:cancel", headers=headers) as resp:
                assert resp.status in (200, 409)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-3000:]


async def test_dev_names_the_flag_of_a_taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flag in ("--metrics-port", "--port"):
            args = ["--port", "0", "--metrics-port", "0", "--issuer-port", "0", flag, str(port)]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "dev", *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 1
            message = err.decode()
            assert f"127.0.0.1:{port}" in message and f"pass another {flag}" in message, message
            assert "Traceback" not in message and message.count("\n") == 1
