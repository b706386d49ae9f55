"""ServeConfig is the one source of `saelora serve`'s options: the command line is generated from it with the
flag names it always had, and the engines' defaults are its defaults."""

import argparse
import dataclasses
import inspect

import pytest

from saelora.adapters.options import config_from_args
from saelora.serve import cli
from saelora.serve.config import ServeConfig


def _parse(argv: list[str]) -> ServeConfig:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return config_from_args(ServeConfig, parser.parse_args(["serve", *argv]))


def test_the_flags_keep_their_names_and_fill_the_config():
    cfg = _parse(["--sae", "a,b", "--sae", "c", "--adapter", "x=/p,q", "--no-pack-weights", "--no-prefix-caching",
                  "-tp", "2", "--engine", "vllm", "--max-model-len", "128", "--kv-cache-gb", "1.5", "--port", "9",
                  "--policy", "keep_first=0,keep_ids="])
    assert cfg.sae == ["a,b", "c"] and cfg.adapter == ["x=/p,q"]  # paths are never split at commas
    assert (cfg.pack_weights, cfg.prefix_caching, cfg.tensor_parallel_size, cfg.engine) == (False, False, 2, "vllm")
    assert (cfg.max_model_len, cfg.kv_cache_gb, cfg.port, cfg.policy) == (128, 1.5, 9, "keep_first=0,keep_ids=")
    assert _parse(["--no-sae"]).no_sae is True


def test_no_flag_gives_the_config_defaults():
    assert _parse([]) == ServeConfig()


def test_an_unknown_engine_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        _parse(["--engine", "tensorrt"])


def test_every_field_has_help():
    assert all(f.metadata.get("help") for f in dataclasses.fields(ServeConfig))


def test_the_torch_engine_defaults_are_the_configs():
    from saelora.serve.torch_engine import TorchEngine

    params = inspect.signature(TorchEngine.__init__).parameters
    shared = [n for n in params if n in {f.name for f in dataclasses.fields(ServeConfig)}]
    assert shared and all(params[n].default == getattr(ServeConfig(), n) for n in shared)


@pytest.mark.parametrize("field,value", [("request_timeout", 0.0), ("request_timeout", -1.0),
                                         ("max_num_batched_tokens", 0), ("max_adapters", -1)])
def test_work_bounds_out_of_range_are_a_clear_error(field, value):
    from saelora.adapters.errors import ConfigError
    from saelora.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        ServeConfig(**{field: value})
