"""The command line as a newcomer meets it (README "Command line"): --version,
what ``gateway serve`` says it serves (and --quiet), human sizes, explain
taking what a user has at hand, progress of long commands, exit codes."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.testing import (
    WRITE_KEY, child_env, free_port, gateway_cli, gateway_config, send_batch, spool_calls, track, wait_until,
    webhook,
)

ROOT = Path(__file__).resolve().parent.parent


async def test_version() -> None:
    r = await gateway_cli("--version")
    assert r.returncode == 0 and re.fullmatch(r"gateway \d+\.\d+\.\d+\S*\n", r.stdout), r


async def test_serve_says_what_it_serves_and_its_curl_line_works(gateway_process: Any, tmp_path: Path) -> None:
    gw = await gateway_process(
        storage={"retention": 3600, "max_bytes": "10GiB"},
        server={"admin": {"user": "ops", "password": "s3cret-pass"}},
        sources=[{"name": "web", "write_keys": [WRITE_KEY]}, {"name": "backend", "write_keys": ["sk-backend-0042"],
                                                              "strict": True}],
        destinations=[{"name": "Archive", "type": "file", "settings": {"path": str(tmp_path / "out.jsonl")}}])
    text = await wait_until(lambda: "try:" in gw.log_tail() and gw.log_tail(), what="the banner")
    banner = text[:text.index("try:") + 400]
    assert f"listening on http://127.0.0.1:{gw.port}" in banner
    assert re.search(r"web\s+key test-…-key\s+lax", banner) and re.search(r"backend\s+key sk-ba…0042\s+strict", banner)
    assert re.search(r"Archive\s+file", banner)
    assert "max 10 GiB" in banner and "retention 1h" in banner and "dedup window 1d" in banner
    assert f"debugger: http://127.0.0.1:{gw.port}/debugger (user ops)" in banner
    assert "s3cret-pass" not in banner and "sk-backend-0042" not in banner, "secrets stay out of the banner"
    assert len(banner.splitlines()) <= 15, "one screen"
    curl = next(line.strip() for line in banner.splitlines() if line.strip().startswith("curl "))
    r = await asyncio.get_running_loop().run_in_executor(
        None, lambda: subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=10))
    assert r.returncode == 0 and r.stdout == "{}", (curl, r)
    assert [c["event"] for c in spool_calls(tmp_path)] == ["Signed Up"]


async def test_serve_quiet_prints_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_config(tmp_path))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--port", str(port), "--quiet",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=child_env())

    async def listening() -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        w.close()
        return True
    try:
        await wait_until(listening, what="gateway serve --quiet to listen", timeout=20)
    finally:
        proc.terminate()
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    assert out == b"", out


async def test_check_prints_human_sizes(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_config(tmp_path, storage={"max_bytes": "10GiB", "dedup_window": "90m"},
                                  server={"max_event_bytes": "64KiB"}))
    r = await gateway_cli("check", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "(max 10 GiB, retention none (purged once delivered), dedup window 1h30m)" in r.stdout
    assert "limits: 64 KiB a call, 1 MiB a batch request" in r.stdout
    assert "10737418240" not in r.stdout


@pytest.mark.parametrize("how, read_as", [(["--type", "track"], "--type track"),
                                          (["--path", "/v1/track"], "--path /v1/track"),
                                          (["--path", "/v1/t"], "--path /v1/t")])
async def test_explain_takes_a_body_without_a_type(tmp_path: Path, how: list[str], read_as: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_config(tmp_path, sources=[{"name": "backend", "write_keys": ["k"], "strict": True}]))
    body = b'{"userId": "u-1", "event": "Signed Up", "properties": {"plan": "pro"}}'
    r = await gateway_cli("explain", "--config", str(cfg), *how, stdin=body)
    assert r.returncode == 0, r.stderr
    assert f"read as track ({read_as}), with the rules of source 'backend' (strict)" in r.stderr
    assert '"type": "track"' in r.stdout and '"mode": "strict"' in r.stdout


async def test_explain_without_a_type_says_what_to_add(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_config(tmp_path))
    r = await gateway_cli("explain", "--config", str(cfg), stdin=b'{"userId": "u-1", "event": "E"}')
    assert r.returncode == 2 and "--type track" in r.stderr and "--path /v1/track" in r.stderr
    r = await gateway_cli("explain", "--config", str(cfg), "--path", "/v2/nothing", stdin=b"{}")
    assert r.returncode == 2 and "no ingest endpoint" in r.stderr


async def test_long_commands_show_progress_on_a_terminal_and_lines_elsewhere(gateway_client: Any,
                                                                             fake_destination: Any,
                                                                             tmp_path: Path) -> None:
    blocks = dict(storage={"retention": 3600}, destinations=[webhook("Hook", fake_destination.url)])
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_config(tmp_path, **blocks))
    client = await gateway_client(**blocks)
    for k in range(0, 12000, 1000):
        await send_batch(client, [track(f"p-{i}") for i in range(k, k + 1000)])
    await fake_destination.wait_delivered(12000, timeout=30)
    args = [sys.executable, "-m", "gateway", "replay", "--config", str(cfg), "--destination", "Hook", "--dry-run"]

    def on_a_terminal() -> str:
        pid, fd = pty.fork()
        if pid == 0:  # the child: its stdout and stderr are the terminal
            os.execvpe(args[0], args, child_env())
        out = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.waitpid(pid, 0)
        return out.decode(errors="replace")

    tty = await asyncio.get_running_loop().run_in_executor(None, on_a_terminal)
    assert "\r\x1b[K" in tty and "of 12,000" in tty and "/s" in tty, tty
    assert "would queue 12,000 call(s)" in tty
    r = await gateway_cli("replay", "--config", str(cfg), "--destination", "Hook", "--dry-run")
    assert "\r" not in r.stderr and "\x1b" not in r.stderr
    assert re.search(r"^looked at: [\d,]+ of 12,000 \([\d,]+/s", r.stderr, re.M), r.stderr


README_EXIT_CODES = re.compile(r"^\| `gateway (\w+)(?:[^|]|\\\|)*\| ([^|]+) \|$", re.M)


def test_the_readme_gives_the_exit_codes_of_every_command() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Exit codes"):]
    section = section[:section.index("\n## ")]
    rows = dict(README_EXIT_CODES.findall(section))
    assert set(rows) == {"serve", "check", "explain", "dlq", "replay"}, rows
    for command, codes in rows.items():
        assert "0" in codes and "2" in codes, (command, codes)


@pytest.mark.parametrize("args, code", [
    (["check"], 0), (["check", "--config", "missing.yaml"], 2),
    (["replay", "--destination", "Nope"], 2), (["dlq", "list", "--config", "missing.yaml"], 2),
])
async def test_exit_codes_are_what_the_readme_says(tmp_path: Path, args: list[str], code: int) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(gateway_config(tmp_path))
    full = args if "--config" in args else [*args, "--config", str(cfg)]
    r = await gateway_cli(*full, cwd=tmp_path)
    assert r.returncode == code, r
