"""Where aiohttp may be used, and the part of its API the gateway relies on.

The data plane (the public listener, the coordinator pool and relay, auth, the request
stages) is raw asyncio and httptools: an aiohttp release cannot change how a client request
becomes a coordinator request. aiohttp serves the control plane only, through its public
API; these tests fail loudly when a release changes that API, and pyproject.toml pins
aiohttp to the minor version they have run against.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aiohttp
from aiohttp import web

import proxy

PACKAGE = Path(proxy.__file__).resolve().parent
# The control plane: JWKS and discovery fetches, token exchange, the coordinator health probe, the
# ops listener, the wiring that opens their sessions, and the dev-only servers.
CONTROL_PLANE = {"gateway/pipeline.py", "runtime/health.py", "auth/exchange.py", "runtime/ops.py",
                 "runtime/server.py", "auth/jwks_fetch.py",
                 "auth/jwks_refresh.py",
                 "dev/coordinator.py", "dev/issuer.py"}


def imports_aiohttp(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "aiohttp" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                "aiohttp", "aiohttp_retry"):
            return True
    return False


def private_aiohttp_attributes(path: Path) -> list[str]:
    """`x._name` where x was bound from aiohttp (a module alias or a name imported from it)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names if a.name.startswith("aiohttp")}
    names |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
              and (n.module or "").startswith("aiohttp") for a in n.names}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in names:
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
    return found


def test_only_the_control_plane_imports_aiohttp() -> None:
    users = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if imports_aiohttp(p)}
    assert users <= CONTROL_PLANE, f"the data plane imports aiohttp: {sorted(users - CONTROL_PLANE)}"
    assert not any(p.startswith("upstream/") for p in users)
    assert "listener.py" not in users


def test_no_module_reaches_into_aiohttp_private_attributes() -> None:
    found = [hit for p in PACKAGE.rglob("*.py") for hit in private_aiohttp_attributes(p)]
    assert found == []


def test_the_aiohttp_minor_version_is_the_one_pinned() -> None:
    pinned = (PACKAGE.parent / "pyproject.toml").read_text(encoding="utf-8")
    major, minor = aiohttp.__version__.split(".")[:2]
    assert f'"aiohttp>={major}.{minor},<{major}.{int(minor) + 1}"' in pinned, (
        f"aiohttp {aiohttp.__version__} is installed: run this suite against it, then move the pin")


async def test_the_public_api_the_control_plane_uses() -> None:
    """What ops.py, server.py and the dev servers call: a runner on port 0 reports the address it
    bound, and a client session can keep bodies compressed and bound its total time."""
    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status": "ok"}', content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/health", ok)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        host, port = runner.addresses[0][:2]
        assert host == "127.0.0.1" and port > 0
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(auto_decompress=False, timeout=timeout) as session:
            async with session.get(f"http://{host}:{port}/v1/health") as resp:
                assert resp.status == 200 and await resp.json() == {"status": "ok"}
    finally:
        await runner.cleanup()
