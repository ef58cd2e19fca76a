"""The pipeline's loop over stages, without engines (the stages themselves are tested in their own
files and end to end in test_pipeline.py)."""

import pytest
from conftest import tiny_config

from proxykd import pipeline
from proxykd.config import parse_config


def test_every_stage_after_prompts_has_one_step_in_pipeline_order():
    assert tuple(pipeline.STAGE_STEPS) == pipeline.STAGES[1:]


def test_a_stage_left_out_must_be_done_or_the_error_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "init_ray", lambda cfg: None)  # the error comes before any Ray work
    cfg = parse_config(tiny_config(tmp_path / "run"))
    with pytest.raises(pipeline.StageNotRun, match=r"stage 'teacher' has not run .*`proxykd teacher CONFIG`"):
        pipeline.run(cfg, ("logits",))
    # the models were built and checked first: a bad proxy or student fails before anything is bought
    assert len(list((tmp_path / "run" / "models").iterdir())) == 2


def test_prompts_alone_starts_nothing(tmp_path, monkeypatch):
    def no_ray(cfg):
        raise AssertionError("the prompts stage needs no Ray")

    monkeypatch.setattr(pipeline, "init_ray", no_ray)
    cfg = parse_config(tiny_config(tmp_path / "run"))
    assert pipeline.run(cfg, ("prompts",)) == {}
    assert (tmp_path / "run" / "prompts" / "manifest.json").exists()
    with pytest.raises(ValueError, match="unknown stage"):
        pipeline.run(cfg, ("prompts", "distil"))
