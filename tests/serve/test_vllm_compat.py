"""The vLLM contract (serve/vllm_engine/compat.py): every vLLM internal saelora relies on is listed and checked
before anything is installed; a missing one stops the engine with a message that names it; nothing reaches
other vLLM users through a plugin entry point."""

from importlib.metadata import entry_points

import pytest

from saelora.adapters.errors import ConfigError
from saelora.serve.vllm_engine import ARCHITECTURES, compat, spliced_architecture


def test_the_installed_vllm_meets_the_contract():
    assert compat.problems(on_cpu=True) == []


def test_a_missing_internal_refuses_the_start_and_names_it(monkeypatch):
    from vllm.lora.punica_wrapper import punica_cpu

    monkeypatch.delattr(punica_cpu, "bgmv_shrink")
    monkeypatch.setattr(compat, "_on_cpu", lambda: True)
    compat.install.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"punica_cpu\.bgmv_shrink") as e:
            compat.install()
        assert "written against" in str(e.value)
    finally:
        compat.install.cache_clear()


def test_no_vllm_plugin_entry_point_reaches_other_vllm_users():
    assert not [ep for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("saelora")]


def test_a_spliced_class_is_generated_for_every_architecture():
    from saelora.serve.vllm_engine import model

    for arch in ARCHITECTURES:
        cls = getattr(model, spliced_architecture(arch))
        assert cls.__mro__[1] is model._SpliceMixin and cls.__mro__[2].__name__ == arch
