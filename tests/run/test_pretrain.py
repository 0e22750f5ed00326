"""The cached trained base (lora3.run.pretrain): cache key, lock + atomic rename, and the real tiny build.

The real build runs once per test session (the smoke config's tiniest base, in the session's
`lora3_cache`), and the app tests that use `experiment=smoke` reuse it.
"""

import json
import os
import threading
import time

import pytest

from lora3.run import pretrain


@pytest.fixture
def smoke_model(compose):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(["experiment=smoke"]), resolve=True)["model"]


@pytest.mark.one_backend
def test_cache_key_follows_config_and_generator_version(smoke_model, monkeypatch, tmp_path):
    from lora3.run.data import synthetic

    k0 = pretrain.cache_key(pretrain.base_spec(smoke_model))
    assert k0 == pretrain.cache_key(pretrain.base_spec(json.loads(json.dumps(smoke_model))))  # stable
    for change in ({"base": {**smoke_model["base"], "steps": 7}},
                   {"config": {**smoke_model["config"], "hidden_dim": 48}},
                   {"embedding_init_stddev": 0.5}):
        assert pretrain.cache_key(pretrain.base_spec({**smoke_model, **change})) != k0, change
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    assert pretrain.cache_key(pretrain.base_spec(smoke_model)) != k0
    monkeypatch.undo()
    # the cache dir is configurable and the key is in the directory name
    d = pretrain.base_dir(smoke_model, tmp_path)
    assert d.parent == tmp_path / "bases" and d.name.endswith(k0)
    with pytest.raises(pretrain.PretrainError, match="model.base.stepz is not a key of the config.*did you mean model.base.steps"):
        pretrain.base_spec({**smoke_model, "base": {"stepz": 3}})
    with pytest.raises(pretrain.PretrainError, match="steps"):
        pretrain.base_spec({**smoke_model, "base": {"steps": 0}})


@pytest.mark.one_backend
def test_concurrent_jobs_build_once_and_half_written_entries_are_ignored(smoke_model, monkeypatch, tmp_path):
    """Two jobs of a sweep asking at once: one builds (under the lock), the other waits and reuses it."""
    calls = []

    def fake_build(spec, target, backend):
        calls.append(target)
        time.sleep(0.5)
        scratch = target.with_name(f".{target.name}.tmp-fake")
        scratch.mkdir(parents=True)
        (scratch / pretrain.INFO_FILE).write_text(json.dumps({"key": pretrain.cache_key(spec)}))
        os.replace(scratch, target)
        return 0

    monkeypatch.setattr(pretrain, "_run_build", fake_build)
    target = pretrain.base_dir(smoke_model, tmp_path)
    target.mkdir(parents=True)  # a leftover directory without base_info.json is not a base
    (target / "junk").write_text("half written")
    target.rename(target.with_name(".stale"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(pretrain.ensure_base(smoke_model, tmp_path,
                                                                                   backend="jax")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2
    assert results[0][0] == results[1][0] == target and results[0][1]["key"] == target.name.rsplit("-", 1)[1]
    assert pretrain.ensure_base(smoke_model, tmp_path)[0] == target and len(calls) == 1


def test_tiny_base_is_built_once_trained_and_loads(smoke_model, lora3_cache, backend_name):
    """The session's smoke base (shared with the app tests): a keras-hub preset + base_info.json."""
    from lora3.run import backend as lb

    lb.select(backend_name)
    from lora3.run import models

    path, info = pretrain.ensure_base(smoke_model, lora3_cache)
    assert (path / "config.json").is_file() and (path / pretrain.INFO_FILE).is_file()
    assert info["source_task"]["variant"] == "base" and info["spec"]["base"]["steps"] == smoke_model["base"]["steps"]
    curve = info["curve"]
    assert curve and curve[-1]["step"] == smoke_model["base"]["steps"]
    assert all(c["val/loss"] > 0 for c in curve) and "bleu" in info["source_val"]
    assert not list(path.parent.glob(f".{path.name}.tmp-*"))  # nothing half-written left behind
    from lora3.run import finetune

    # the app resolves the base to its cached preset, then builds from it: no tokenizer text needed
    model_cfg, origin = finetune.model_source({"model": smoke_model, "data": {"source": "synthetic"},
                                               "cache_dir": str(lora3_cache)})
    bundle = models.build(model_cfg, [], seed=0, cache_dir=lora3_cache, info=origin)
    assert bundle.info["base"]["path"] == str(path) and bundle.info["base"]["key"] == info["key"]
    assert bundle.info["params"] == info["params"]
