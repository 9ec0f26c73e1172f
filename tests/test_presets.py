"""Every job's presets build, validate and survive a YAML round trip (what `--preset NAME` loads)."""

import dataclasses

import pytest
import yaml

from raypref import director_config, evolve_config, ospo_config, pretrain_config, synpic_config, train_config
from raypref.config import load_config, to_dict

JOBS = {
    "evolve": (evolve_config, evolve_config.EvolveConfig),
    "ospo": (ospo_config, ospo_config.OSPOConfig),
    "pretrain": (pretrain_config, pretrain_config.PretrainConfig),
    "synpic": (synpic_config, synpic_config.SynPicConfig),
    "train": (train_config, train_config.TrainConfig),
}
CASES = [(job, name) for job, (module, _) in JOBS.items() for name in module.PRESETS]


@pytest.mark.parametrize("job,name", CASES)
def test_each_preset_builds_and_round_trips_through_yaml(job, name, tmp_path):
    module, cls = JOBS[job]
    cfg = module.PRESETS[name]()
    assert isinstance(cfg, cls) and dataclasses.is_dataclass(cfg)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(cls(), path) == cfg  # the YAML of a preset is that preset, from the bare defaults


def test_library_presets_are_real_recipes_not_test_fixtures():
    # test presets (seconds-long runs, /tmp paths) live in tests/presets.py, not the library
    names = {name for module, _ in JOBS.values() for name in module.PRESETS}
    assert not any("test" in n or "tiny" in n for n in names), names
    assert isinstance(director_config.shapes_cpu(), director_config.DirectorConfig)
