"""Config of the Track API coming in (docs/track-api-coming-in.md,
"Configuration"): ``kind: track_api`` sources with ``track_api: {site_id,
api_key}`` and no write keys, ``server.tls``; mistakes name the key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import cli
from gateway import config as config_mod
from gateway.config import ConfigError

TRACK = "sources:\n  - name: classic\n    kind: track_api\n    track_api: {site_id: s, api_key: k}\n"


def error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        config_mod.loads(text, env={})
    return str(e.value)


def test_a_track_api_source_and_a_pipelines_source() -> None:
    cfg = config_mod.loads(TRACK + "  - name: web\n    write_keys: [w]\n", env={})
    classic, web = cfg.sources
    assert (classic.kind, classic.track_api and classic.track_api.site_id, classic.write_keys) == \
        ("track_api", "s", [])
    assert (web.kind, web.track_api, web.write_keys) == ("pipelines", None, ["w"])


def test_credentials_come_from_the_environment() -> None:
    cfg = config_mod.loads("sources:\n  - name: classic\n    kind: track_api\n"
                           "    track_api: {site_id: \"${SITE}\", api_key: \"${KEY:-dev}\"}\n", env={"SITE": "123"})
    assert cfg.sources[0].track_api is not None
    assert (cfg.sources[0].track_api.site_id, cfg.sources[0].track_api.api_key) == ("123", "dev")


@pytest.mark.parametrize("text,needles,line", [
    ("sources:\n  - name: classic\n    kind: track_api\n", ["track_api", "sources[0].kind"], 3),
    (TRACK + "    write_keys: [w]\n", ["sources[0].write_keys", "no write keys"], 5),
    ("sources:\n  - name: web\n", ["sources[0].write_keys", "at least one write key"], 2),
    ("sources:\n  - name: web\n    write_keys: [w]\n    track_api: {site_id: s, api_key: k}\n",
     ["sources[0].track_api", "kind: track_api"], 4),
    ("sources:\n  - name: classic\n    kind: track_api\n    track_api: {site_id: '', api_key: k}\n",
     ["sources[0].track_api.site_id", "empty"], 4),
    ("sources:\n  - name: classic\n    kind: track_api\n    track_api: {site_id: 'a:b', api_key: k}\n",
     ["sources[0].track_api.site_id", "':'"], 4),
    ("sources:\n  - name: classic\n    kind: track_api\n    track_api:\n      site_id: s\n      apikey: k\n",
     ["unknown key 'sources[0].track_api.apikey'"], 6),
    ("sources:\n  - name: classic\n    kind: track_api\n    track_api: {site_id: s}\n",
     ["sources[0].track_api", "api_key"], 4),
    ("sources:\n  - name: classic\n    kind: segment\n", ["sources[0].kind"], 3),
    (TRACK + "  - name: again\n    kind: track_api\n    track_api: {site_id: s, api_key: k}\n",
     ["sources[1].track_api", "one source only"], 7),
    ("server:\n  tls: {cert: server.pem}\n", ["server.tls", "key"], 2),
    ("server:\n  tls: {cert: '', key: k.pem}\n", ["server.tls.cert", "PEM"], 2),
], ids=["no-track-api", "write-keys", "pipelines-without-keys", "track-api-on-pipelines", "empty-site",
        "colon-in-site", "unknown-key", "missing-api-key", "bad-kind", "same-pair-twice", "tls-without-key",
        "tls-empty-cert"])
def test_mistakes_name_the_key_and_its_line(text: str, needles: list[str], line: int) -> None:
    msg = error(text)
    for needle in needles:
        assert needle in msg, msg
    assert f"line {line}:" in msg, msg


def test_gateway_check_lists_a_track_api_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"storage: {{path: {tmp_path / 'spool'}}}\n" + TRACK)
    assert cli.main(["check", "--config", str(cfg)]) == 0
    assert "  classic: Track API, site id s\n" in capsys.readouterr().out


def test_serve_with_unusable_tls_files_stops_naming_server_tls(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "not-a-cert.pem").write_text("hello\n")
    for cert, key in (("missing.pem", "missing.key"), ("not-a-cert.pem", "not-a-cert.pem")):
        cfg = tmp_path / "config.yaml"
        cfg.write_text(f"server:\n  tls: {{cert: {tmp_path / cert}, key: {tmp_path / key}}}\n"
                       f"storage: {{path: {tmp_path / 'spool'}}}\n" + TRACK)
        assert cli.main(["serve", "--config", str(cfg), "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert "server.tls" in err and cert in err and "line 2" in err, err
