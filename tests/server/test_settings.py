"""ServerSettings: the CLI flags of `yun serve` are generated from its fields."""

from __future__ import annotations

from dataclasses import fields

import pytest

from yun.server import ServerSettings


def test_every_field_has_help_and_a_default():
    for f in fields(ServerSettings):
        assert f.metadata.get("help"), f.name
    s = ServerSettings()
    assert (s.host, s.port, s.api_key, s.served_model_name) == ("127.0.0.1", 8000, None, None)


@pytest.mark.parametrize("bad", [dict(port=70000), dict(max_queue=-1), dict(max_body_bytes=0),
                                 dict(shutdown_timeout=-1), dict(log_level="loud"),
                                 dict(api_key="  ")])
def test_bad_settings_raise_naming_the_field(bad):
    (name,) = bad
    with pytest.raises(ValueError, match=name):
        ServerSettings(**bad)
