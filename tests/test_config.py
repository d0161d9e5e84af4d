"""Settings precedence and validation (defaults < mitm.toml < environment < --set)."""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Optional

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from addon.core import config
from addon.traffic.upstream_http import reverse_targets
from addon.core.config import DEFAULT_UPSTREAM, ConfigError, build_settings, layered_defaults, resolve_upstream
from addon.lifecycle import Lifecycle
from addon.services import Services

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
        assert config.coerce(spec, listed[spec.name], "mitm.toml") == spec.default, spec.name
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
    assert float(values["openhands_spend_threshold"]) == expected


def lifecycle() -> Lifecycle:
    return Lifecycle(Services())


def test_set_on_command_line_beats_environment_and_file(tmp_path, monkeypatch):
    write(tmp_path, "openhands_spend_threshold = 9.5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENHANDS_SPEND_THRESHOLD", "9.8")
    lc = lifecycle()
    with taddons.context(lc) as tctx:
        tctx.configure(lc)
        assert lc.services.current().spend_threshold == 9.8
        tctx.options.set("openhands_spend_threshold=9.6")  # exactly what `--set` does
        assert lc.services.current().spend_threshold == 9.6


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


def test_a_bad_change_while_running_is_rejected_and_changes_nothing(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    lc = lifecycle()
    with taddons.context(lc) as tctx:
        tctx.configure(lc)
        with pytest.raises(exceptions.OptionsError, match="openhands_spend_threshold.*'-1'"):
            tctx.options.set("openhands_spend_threshold=-1")
        assert lc.services.current().spend_threshold == 9.95  # unchanged


def test_mask_uri_hides_password():
    assert config.mask_uri("mongodb://user:pw@host:27017/db") == "mongodb://user:***@host:27017/db"
    assert config.mask_uri("embedded") == "embedded"


# -- every option through `--set`, the environment and mitm.toml (mitmproxy has no float option type) ------
# name, text as typed after `--set name=`, the Settings field it sets, the value expected there
EVERY_OPTION = [
    ("openhands_upstream", "http://127.0.0.1:4000", "upstream", "http://127.0.0.1:4000"),
    ("openhands_mongodb_uri", "mongodb://127.0.0.1:27017", "mongodb_uri", "mongodb://127.0.0.1:27017"),
    ("openhands_mongodb_db", "pool_b", "mongodb_db", "pool_b"),
    ("openhands_spend_threshold", "9.8", "spend_threshold", 9.8),
    ("openhands_spend_checker", "false", "spend_checker", False),
    ("openhands_drain_past_point", "false", "drain_past_point", False),
    ("openhands_spend_check_tiers", "0:60,8:5", "tiers", config.parse_tier_string("0:60,8:5")),
    ("openhands_default_budget", "25.5", "default_budget", 25.5),
    ("openhands_fallback_price", "1:2", "fallback_price", (1.0, 2.0)),
    ("openhands_max_retries", "2", "max_retries", 2),
    ("openhands_history_ttl_days", "9", "history_ttl_days", 9),
    ("openhands_data_dir", "/tmp/oh-data", "data_dir", Path("/tmp/oh-data")),
    ("openhands_spend_check_tick_seconds", "0.5", "spend_check_tick_s", 0.5),
    ("openhands_spend_check_lease_seconds", "12.5", "spend_check_lease_s", 12.5),
    ("openhands_spend_check_timeout_seconds", "2.5", "spend_check_timeout_s", 2.5),
]


@pytest.mark.parametrize("name,text,field,expected", EVERY_OPTION, ids=[r[0] for r in EVERY_OPTION])
@pytest.mark.parametrize("source", ["--set", "environment", "mitm.toml"])
def test_every_option_can_be_set_each_way(tmp_path, monkeypatch, source, name, text, field, expected):
    spec = next(o for o in config.OPTIONS if o.name == name)
    monkeypatch.chdir(tmp_path)
    for o in config.OPTIONS:
        if o.env:
            monkeypatch.delenv(o.env, raising=False)
    if source == "environment":
        monkeypatch.setenv(spec.env, text)
    elif source == "mitm.toml":
        literal = text if spec.typespec is int or spec.number else f'"{text}"'
        literal = {"false": "false"}.get(text, literal) if spec.typespec is bool else literal
        write(tmp_path, f"{name} = {literal}\n")
    lc = lifecycle()
    with taddons.context(lc) as tctx:
        if source == "--set":
            tctx.options.set(f"{name}={text}")  # mitmproxy's own parser, as for `--set` on the command line
        else:
            tctx.configure(lc)
        assert lc.services.failed is None
        assert getattr(lc.services.current(), field) == expected


def test_every_option_type_is_one_mitmproxy_parses_from_the_command_line_and_can_show():
    from mitmproxy.utils.typecheck import typespec_to_str

    for spec in config.OPTIONS:
        assert spec.typespec in (str, int, bool, Optional[str]), spec.name  # `--set` has no float parser
        typespec_to_str(spec.typespec)  # mitmweb's options page and `mitmdump --options` need this
    numbers = {o.name for o in config.OPTIONS if o.number}
    assert {"openhands_spend_threshold", "openhands_default_budget", "openhands_spend_check_tick_seconds",
            "openhands_spend_check_lease_seconds", "openhands_spend_check_timeout_seconds"} <= numbers


@pytest.mark.parametrize("text", ["lots", "", "9,8", "true"])
def test_a_number_option_that_is_not_a_number_names_option_and_value(text):
    with pytest.raises(ConfigError) as e:
        build_settings(base_values(openhands_spend_threshold=text), {})
    assert "openhands_spend_threshold" in str(e.value) and repr(text) in str(e.value)


def test_precedence_holds_for_numbers_with_a_fraction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "openhands_default_budget = 20.5\nopenhands_spend_threshold = 9.5\n")
    monkeypatch.setenv("OPENHANDS_SPEND_THRESHOLD", "9.7")
    lc = lifecycle()
    with taddons.context(lc) as tctx:
        tctx.configure(lc)
        s = lc.services.current()
        assert (s.default_budget, s.spend_threshold) == (20.5, 9.7)  # file, then environment over file
        tctx.options.set("openhands_default_budget=30.25")
        s = lc.services.current()
        assert (s.default_budget, s.spend_threshold) == (30.25, 9.7)


# -- the upstream follows the mode ---------------------------------------------------------------------
@pytest.mark.parametrize("modes,explicit,expected", [
    ([], None, DEFAULT_UPSTREAM),
    (["regular"], None, DEFAULT_UPSTREAM),
    (["regular"], "http://127.0.0.1:4000", "http://127.0.0.1:4000"),
    (["upstream:http://corp-proxy:3128"], "http://litellm:4000/", "http://litellm:4000"),
    (["reverse:http://my-litellm:4000"], None, "http://my-litellm:4000"),
    (["reverse:http://my-litellm:4000"], "", "http://my-litellm:4000"),
    (["reverse:https://llm-proxy.app.all-hands.dev"], None, DEFAULT_UPSTREAM),
    (["reverse:https://llm-proxy.app.all-hands.dev"], DEFAULT_UPSTREAM, DEFAULT_UPSTREAM),
    (["reverse:http://My-LiteLLM:4000"], "http://my-litellm:4000", "http://my-litellm:4000"),
    (["reverse:http://127.0.0.1:4000@8081"], None, "http://127.0.0.1:4000"),
    (["reverse:http://127.0.0.1:4000", "reverse:http://127.0.0.1:4000@8081"], None, "http://127.0.0.1:4000"),
    (["reverse:http://a:1", "reverse:http://b:2"], "http://b:2", "http://b:2"),
    (["reverse:my-litellm"], None, "https://my-litellm"),
    (["reverse:tcp://127.0.0.1:5432"], None, DEFAULT_UPSTREAM),
])
def test_upstream_follows_the_mode(modes, explicit, expected):
    assert resolve_upstream(reverse_targets(modes), explicit) == expected


@pytest.mark.parametrize("modes,explicit,mentions", [
    (["reverse:http://my-litellm:4000"], DEFAULT_UPSTREAM, [DEFAULT_UPSTREAM, "http://my-litellm:4000"]),
    (["reverse:http://my-litellm:4000"], "https://my-litellm:4000", ["https://my-litellm:4000", "http://my-litellm:4000"]),
    (["reverse:http://my-litellm:4000"], "http://my-litellm:4001", ["4001", "http://my-litellm:4000"]),
    (["reverse:http://a:1", "reverse:http://b:2"], None, ["http://a:1", "http://b:2"]),
    ([], "ftp://x", ["openhands_upstream", "ftp://x"]),
])
def test_an_upstream_the_mode_cannot_pool_is_refused_naming_both(modes, explicit, mentions):
    with pytest.raises(ConfigError) as e:
        resolve_upstream(reverse_targets(modes), explicit)
    for m in mentions:
        assert m in str(e.value)


def test_configure_follows_a_mode_change_and_refuses_a_mismatch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENHANDS_UPSTREAM", raising=False)
    lc = lifecycle()
    with taddons.context(lc) as tctx:
        tctx.configure(lc)
        assert lc.services.current().upstream == DEFAULT_UPSTREAM
        tctx.options.update(mode=["reverse:http://127.0.0.1:4000"])
        s = lc.services.current()
        assert (s.upstream, s.is_upstream("127.0.0.1", 4000)) == ("http://127.0.0.1:4000", True)
        with pytest.raises(exceptions.OptionsError, match="127.0.0.1:4000"):
            tctx.options.set(f"openhands_upstream={DEFAULT_UPSTREAM}")
        assert lc.services.current().upstream == "http://127.0.0.1:4000"


def test_a_bad_option_at_start_up_fails_start_up_with_one_message(tmp_path, monkeypatch, caplog):
    """No exception (mitmproxy would print a traceback): the failure is recorded and logged once; the process
    exit status is tested with a real mitmdump in test_startup.py."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENHANDS_SPEND_THRESHOLD", "lots")
    lc = lifecycle()
    with taddons.context(lc) as tctx:
        tctx.configure(lc)
        assert lc.services.failed is not None and "lots" in lc.services.failed
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "OPENHANDS_SPEND_THRESHOLD" in errors[0] and "Traceback" not in caplog.text
        lc.running()
        assert lc.threads == []  # nothing starts without settings
