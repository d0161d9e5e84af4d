"""Settings precedence and validation (defaults < mitm.toml < environment < --set)."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.core import config
from addon.core.config import ConfigError, build_settings, layered_defaults

ROOT = Path(__file__).resolve().parent.parent


def test_mitm_toml_lists_every_option_with_its_builtin_default():
    text = (ROOT / "mitm.toml").read_text()
    listed = tomllib.loads(text)
    for spec in config.OPTIONS:
        if spec.name == "openhands_config":
            continue
        if spec.default is None:
            assert f"# {spec.name} = " in text, spec.name
            continue
        assert spec.name in listed, f"{spec.name} missing from mitm.toml"
        assert listed[spec.name] == spec.default, spec.name
    assert set(listed) <= config.OPTION_NAMES


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mitm.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("file_text,env,expected", [
    ("", {}, 9.95),
    ("openhands_spend_threshold = 9.5\n", {}, 9.5),
    ("openhands_spend_threshold = 9.5\n", {"OPENHANDS_SPEND_THRESHOLD": "9.8"}, 9.8),
    ("[openhands]\nopenhands_spend_threshold = 9.7\n", {}, 9.7),
])
def test_precedence_defaults_file_environment(tmp_path, file_text, env, expected):
    write(tmp_path, file_text)
    values = layered_defaults(env, tmp_path)
    assert values["openhands_spend_threshold"] == expected


def test_set_on_command_line_beats_environment_and_file(tmp_path, monkeypatch):
    from addon.lifecycle import Lifecycle
    from addon.services import Services

    write(tmp_path, "openhands_spend_threshold = 9.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENHANDS_SPEND_THRESHOLD", "9.8")
    sc = Lifecycle(Services())
    with taddons.context(sc) as tctx:
        tctx.configure(sc)
        assert sc.services.settings.spend_threshold == 9.8
        tctx.configure(sc, openhands_spend_threshold=9.6)
        assert sc.services.settings.spend_threshold == 9.6


@pytest.mark.parametrize("file_text,env,mentions", [
    ("openhands_spend_threshold = 'lots'\n", {}, ["openhands_spend_threshold", "lots"]),
    ("openhands_spend_checker = 'maybe'\n", {}, ["openhands_spend_checker", "maybe"]),
    ("openhands_typo = 1\n", {}, ["openhands_typo"]),
    ("not toml at all [", {}, ["openhands_config"]),
    ("", {"OPENHANDS_MAX_RETRIES": "2.5"}, ["openhands_max_retries", "2.5"]),
])
def test_bad_values_fail_naming_option_and_value(tmp_path, file_text, env, mentions):
    write(tmp_path, file_text)
    with pytest.raises(ConfigError) as e:
        layered_defaults(env, tmp_path)
    for m in mentions:
        assert m in str(e.value)


def base_values(**over):
    values = {o.name: o.default for o in config.OPTIONS}
    values.update(over)
    return values


@pytest.mark.parametrize("over,mentions", [
    ({"openhands_spend_threshold": 0.0}, "openhands_spend_threshold"),
    ({"openhands_spend_threshold": 11.0}, "openhands_spend_threshold"),
    ({"openhands_upstream": "ftp://x"}, "openhands_upstream"),
    ({"openhands_mongodb_uri": "postgres://x"}, "openhands_mongodb_uri"),
    ({"openhands_mongodb_db": "a/b"}, "openhands_mongodb_db"),
    ({"openhands_spend_check_tiers": "5:10,0:300"}, "openhands_spend_check_tiers"),
    ({"openhands_spend_check_tiers": "0:-1"}, "openhands_spend_check_tiers"),
    ({"openhands_fallback_price": "cheap"}, "openhands_fallback_price"),
    ({"openhands_default_budget": -10.0}, "openhands_default_budget"),
    ({"openhands_max_retries": 99}, "openhands_max_retries"),
])
def test_build_settings_rejects_bad_values(over, mentions):
    with pytest.raises(ConfigError) as e:
        build_settings(base_values(**over), {})
    assert mentions in str(e.value)


def test_secrets_come_from_environment_or_files_never_option_values(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("file-token-123456\n")
    keys_file = tmp_path / "keys"
    keys_file.write_text("client-a\nclient-b\n")
    s = build_settings(base_values(openhands_admin_token_file=str(token_file),
                                   openhands_client_keys_file=str(keys_file)), {})
    assert s.admin_token == "file-token-123456" and s.client_keys == {"client-a", "client-b"}
    s = build_settings(base_values(), {"OPENHANDS_ADMIN_TOKEN": "env-token-123456", "OPENHANDS_CLIENT_KEYS": "x, y"})
    assert s.admin_token == "env-token-123456" and s.client_keys == {"x", "y"}
    assert "env-token" not in repr(s)
    with pytest.raises(ConfigError, match="openhands_admin_token_file"):
        build_settings(base_values(openhands_admin_token_file=str(tmp_path / "missing")), {})


def test_configure_raises_options_error_for_bad_set():
    from addon.lifecycle import Lifecycle
    from addon.services import Services

    sc = Lifecycle(Services())
    with taddons.context(sc) as tctx:
        tctx.configure(sc)
        with pytest.raises(exceptions.OptionsError, match="openhands_spend_threshold"):
            tctx.configure(sc, openhands_spend_threshold=-1.0)
        assert sc.services.settings.spend_threshold == 9.95  # unchanged


def test_mask_uri_hides_password():
    assert config.mask_uri("mongodb://user:pw@host:27017/db") == "mongodb://user:***@host:27017/db"
    assert config.mask_uri("embedded") == "embedded"
