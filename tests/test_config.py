"""config.yaml: environment expansion, typed values, sizes, errors that name
the key and its line, and ``gateway check`` (README.md, "Configuration" and
"Command line").  The size limits' defaults come from
docs/pipelines-api.md, "Maximum request sizes" (64 KB a call,
1 MB a batch)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway import config as config_mod
from gateway.config import ConfigError, loads
from gateway.plugins import build

ROOT = Path(__file__).resolve().parent.parent


def cfg(text: str, **env: str) -> config_mod.Config:
    return loads(textwrap.dedent(text), env=env)


def error(text: str, **env: str) -> str:
    with pytest.raises(ConfigError) as e:
        built = cfg(text, **env)
        build(built)
    return str(e.value)


# -- ${VAR} and ${VAR:-default} --------------------------------------------------------

def test_env_references_and_defaults() -> None:
    """README.md: "${VAR} and ${VAR:-default} are read from the environment"."""
    text = """
        server:
          host: ${HOST}
          public_url: "https://${DOMAIN:-gw.example}/in"
        sources:
          - name: web
            write_keys: ["${KEY:-dev-write-key}", "static-${SUFFIX:-x}"]
        """
    c = cfg(text, HOST="0.0.0.0")
    assert c.server.host == "0.0.0.0"
    assert c.server.public_url == "https://gw.example/in"
    assert c.sources[0].write_keys == ["dev-write-key", "static-x"]
    c = cfg(text, HOST="::1", DOMAIN="events.example", KEY="k-live", SUFFIX="")
    assert c.server.public_url == "https://events.example/in"
    assert c.sources[0].write_keys == ["k-live", "static-x"], "an empty variable takes the default, as in sh"


def test_whole_references_are_typed() -> None:
    """A plain value that is one whole reference is read as YAML: ``port:
    ${P:-8080}`` is an int (config.yaml's own ``port: ${GATEWAY_PORT:-8080}``)."""
    text = """
        server:
          port: ${P:-8080}
          shutdown_timeout: ${T:-2.5}
          access_log: ${LOG:-false}
          max_event_bytes: ${EV:-64KiB}
        sources:
          - name: web
            write_keys: [k]
            strict: ${STRICT:-no}
        """
    c = cfg(text)
    assert c.server.port == 8080 and type(c.server.port) is int
    assert c.server.shutdown_timeout == 2.5
    assert c.server.access_log is False and c.sources[0].strict is False
    assert c.server.max_event_bytes == 65536
    c = cfg(text, P="9090", T="1", LOG="true", EV="1KiB", STRICT="true")
    assert (c.server.port, c.server.shutdown_timeout, c.server.access_log, c.server.max_event_bytes,
            c.sources[0].strict) == (9090, 1.0, True, 1024, True)
    msg = error(text, P="eighty")
    assert "server.port" in msg and "line 3" in msg


def test_quoted_references_stay_strings() -> None:
    """README.md writes ``write_keys: ["${WEBSITE_WRITE_KEY:-...}"]`` and
    ``site_id: "${CIO_SITE_ID}"`` quoted: a key or site id that happens to be
    all digits (or "true") must stay a string, not become an int and fail."""
    text = """
        sources:
          - name: web
            write_keys: ["${KEY}", '${KEY2}']
        destinations:
          - name: Customer.io
            type: customerio_track
            settings: {site_id: "${SITE}", api_key: "${API}"}
        """
    c = cfg(text, KEY="123456", KEY2="true", SITE="0012345", API="1e3")
    assert c.sources[0].write_keys == ["123456", "true"]
    assert c.destinations[0].settings == {"site_id": "0012345", "api_key": "1e3"}
    build(c)


def test_unset_variable_without_default_names_it_and_its_line() -> None:
    """README.md: an unset ${VAR} without a default is an error."""
    msg = error("""
        server:
          host: 127.0.0.1
        destinations:
          - name: Customer.io
            type: customerio_track
            settings: {site_id: "${CIO_SITE_ID}", api_key: x}
        """)
    assert "CIO_SITE_ID" in msg and "line 7" in msg


def test_load_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "gw.yaml"
    p.write_text("server:\n  port: ${NOPE_NOT_SET_1}\n")
    env = os.environ.pop("NOPE_NOT_SET_1", None)
    assert env is None
    with pytest.raises(ConfigError) as e:
        config_mod.load(p)
    assert str(p) in str(e.value) and "NOPE_NOT_SET_1" in str(e.value) and "line 2" in str(e.value)
    with pytest.raises(ConfigError) as e:
        config_mod.load(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(e.value)


# -- unknown keys, mistyped values ---------------------------------------------------------------

@pytest.mark.parametrize("text,key,line", [
    ("server: {}\nstorage: {}\nlogging: debug\n", "logging", 3),
    ("server:\n  host: 127.0.0.1\n  prot: 8080\n", "server.prot", 3),
    ("storage:\n  path: ./d\n  max_byte: 1GiB\n", "storage.max_byte", 3),
    ("sources:\n  - name: web\n    write_keys: [k]\n    stric: true\n", "sources[0].stric", 4),
    ("destinations:\n  - name: A\n    type: file\n    settings: {path: x}\n    retry:\n      max_tries: 3\n",
     "destinations[0].retry.max_tries", 6),
    ("destinations:\n  - name: A\n    type: file\n    settings: {path: x}\n    filter: {type: [track]}\n",
     "destinations[0].filter.type", 5),
], ids=["top", "server", "storage", "source", "destination-retry", "destination-filter"])
def test_unknown_keys_name_the_key_and_its_line(text: str, key: str, line: int) -> None:
    """README.md: "Unknown keys are errors that name the key and its line"."""
    msg = error(text)
    assert f"unknown key '{key}'" in msg
    assert f"line {line}:" in msg


def test_unknown_key_in_a_destinations_settings_names_the_field() -> None:
    """A plugin's settings are a Struct of its own (msgspec), so a
    misspelled ``settings`` key of the file destination is an error naming it."""
    msg = error("""
        destinations:
          - name: Archive
            type: file
            settings:
              path: ./events.jsonl
              fsynk: false
        """)
    assert "fsynk" in msg and "destinations[0]" in msg and "Archive" in msg
    msg = error("""
        transforms:
          - type: drop_fields
            settings: {pathz: [context.ip]}
        """)
    assert "pathz" in msg and "transforms[0]" in msg


def test_unknown_key_in_a_destinations_settings_names_its_line() -> None:
    msg = error("destinations:\n  - name: Archive\n    type: file\n    settings:\n      path: x\n      fsynk: 1\n")
    assert "line 6" in msg


@pytest.mark.parametrize("text,needle,line", [
    ("server:\n  port: eighty\n", "server.port", 2),
    ("server:\n  cors_origins: https://x.example\n", "server.cors_origins", 2),
    ("sources:\n  - name: web\n    write_keys: [k]\n    strict: maybe\n", "sources[0].strict", 4),
    ("sources:\n  - name: web\n    write_keys: k\n", "sources[0].write_keys", 3),
    ("sources:\n  - write_keys: [k]\n", "name", 2),
    ("storage:\n  max_bytes: lots\n", "storage.max_bytes", 2),
    ("storage:\n  max_bytes: true\n", "storage.max_bytes", 2),
    ("storage:\n  backend: postgres\n", "storage.backend", 2),
    ("destinations:\n  - name: A\n    type: file\n    settings: {path: x}\n    concurrency: 0\n",
     "concurrency", 5),
    ("server:\n  max_event_bytes: 2MiB\n  max_batch_bytes: 1MiB\n", "max_event_bytes", 2),
], ids=["int", "list", "bool", "list-of-str", "required", "size-word", "size-bool", "enum", "min",
        "event>batch"])
def test_mistyped_values_name_the_key_and_line(text: str, needle: str, line: int) -> None:
    msg = error(text)
    assert needle in msg and f"line {line}:" in msg, msg


def test_mistyped_plugin_setting_names_the_field() -> None:
    msg = error("destinations:\n  - name: Hook\n    type: webhook\n    settings: {url: 5}\n")
    assert "url" in msg and "Hook" in msg
    msg = error("destinations:\n  - name: Hook\n    type: webhoook\n    settings: {url: x}\n")
    assert "webhoook" in msg and "webhook" in msg, "names the unknown type and the known ones"


def test_not_a_mapping_and_bad_yaml() -> None:
    assert "mapping" in error("- a\n- b\n")
    assert "YAML" in error("server: [\n")
    assert "duplicate key 'server'" in error("server: {}\nserver: {}\n")


# -- sizes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("written,value", [
    ("65536", 65536), ("64KiB", 65536), ("64 KiB", 65536), ("64kib", 65536), ("500KB", 500_000),
    ("1MiB", 1 << 20), ("1MB", 1_000_000), ("10GiB", 10 * 1024**3), ("1.5KiB", 1536), ("2Ki", 2048),
    ("1TiB", 1024**4), ("100B", 100), ("0", 0),
])
def test_sizes(written: str, value: int) -> None:
    """README.md writes sizes as 65536, 1048576 and 10GiB."""
    c = cfg(f"storage:\n  max_bytes: {written}\n")
    assert c.storage.max_bytes == value


def test_size_defaults_follow_the_seed() -> None:
    """docs/pipelines-api.md: the Pipelines API has "a 64 KB limit
    for single requests and a 1 MB limit for batch requests"."""
    c = cfg("{}")
    assert (c.server.max_event_bytes, c.server.max_batch_bytes) == (65536, 1048576)


# -- duplicates -----------------------------------------------------------------------------------

def test_duplicate_source_and_destination_names() -> None:
    msg = error("sources:\n  - name: web\n    write_keys: [a]\n  - name: web\n    write_keys: [b]\n")
    assert "'web' is used twice" in msg and "line 4" in msg
    msg = error("destinations:\n  - name: A\n    type: file\n    settings: {path: x}\n"
                "  - name: A\n    type: file\n    settings: {path: y}\n")
    assert "'A' is used twice" in msg and "line 5" in msg
    msg = error("sources:\n  - name: web\n    write_keys: [a]\n  - name: app\n    write_keys: [a]\n")
    assert "one source only" in msg and "line 5" in msg
    msg = error("destinations:\n  - name: A\n    type: file\n    settings: {path: x}\n"
                "    filter: {sources: [nosuch]}\n")
    assert "nosuch" in msg


# -- gateway check ----------------------------------------------------------------------------

def run_gateway(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "CIO_"))}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**clean, "PYTHONPATH": str(ROOT), **(env or {})})


def test_gateway_check_on_the_repo_config() -> None:
    """README.md: ``gateway check`` validates the config and lists sources,
    destinations, transforms and the plugins that provide them."""
    r = run_gateway("check", "--config", "config.yaml")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "config config.yaml: OK" in out
    assert "sources:\n  default: 1 write key(s), lax" in out
    assert "destinations:\n  Archive: file  [plugin plugins.file]" in out
    assert "plugins:" in out
    for plugin in ("plugins.file", "plugins.webhook", "plugins.transforms", "plugins.customerio"):
        assert f"  {plugin}: " in out
    assert "server: http://127.0.0.1:8080" in out
    r = run_gateway("check", "--config", "config.yaml", env={"GATEWAY_PORT": "9191"})
    assert r.returncode == 0 and "server: http://127.0.0.1:9191" in r.stdout


def test_gateway_check_on_a_bad_config_exits_2(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("server:\n  host: 127.0.0.1\n  prot: 1\n")
    r = run_gateway("check", "--config", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert "unknown key 'server.prot'" in r.stderr and "line 3" in r.stderr and "bad.yaml" in r.stderr
    assert r.stdout == ""
    (tmp_path / "env.yaml").write_text("sources:\n  - name: web\n    write_keys: [\"${WEB_KEY_UNSET_X}\"]\n")
    r = run_gateway("check", "--config", "env.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "WEB_KEY_UNSET_X" in r.stderr and "line 3" in r.stderr
    (tmp_path / "plugin.yaml").write_text(
        "destinations:\n  - name: Archive\n    type: file\n    settings: {path: x, fsynk: 1}\n")
    r = run_gateway("check", "--config", "plugin.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "fsynk" in r.stderr
    r = run_gateway("check", "--config", "nowhere.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "nowhere.yaml" in r.stderr


def test_gateway_serve_refuses_a_bad_config_before_binding(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("server:\n  port: nope\n")
    r = run_gateway("serve", "--config", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "server.port" in r.stderr and "line 2" in r.stderr


@pytest.mark.parametrize("problem", ["spool", "port"])
def test_gateway_serve_that_cannot_start_says_why_in_one_line(tmp_path: Path, problem: str) -> None:
    """A spool path that is not a directory, or a port already taken: exit 1
    with the reason, not a traceback."""
    (tmp_path / "taken").write_text("a file")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1] if problem == "port" else 0
        spool = tmp_path / ("taken" if problem == "spool" else "spool") / "data"
        (tmp_path / "c.yaml").write_text(f"server: {{port: {port}}}\nstorage: {{path: {spool}}}\n")
        r = run_gateway("serve", "--config", "c.yaml", cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("gateway: cannot start:"), r.stderr
    assert ("taken" if problem == "spool" else "address already in use") in r.stderr.lower(), r.stderr
