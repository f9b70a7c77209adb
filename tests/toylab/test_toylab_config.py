"""ToyLabConfig validation, recipe registry and the table format."""
import pytest

from megadistill.toylab.config import LoopConfig, ToyDataConfig, ToyLabConfig
from megadistill.toylab.lab import format_table, student_step_list
from megadistill.toylab.recipes import get_recipe, known_recipes


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="known") as err:
        ToyLabConfig(methods=["dmd", "nope"])
    assert "nope" in str(err.value) and "sid" in str(err.value)
    assert set(ToyLabConfig().method_names()) >= {"dmd", "sid", "ode_regression", "progressive"}
    with pytest.raises(ValueError, match="known"):
        get_recipe("nope")


def test_field_validation_names_the_field():
    with pytest.raises(ValueError, match="student_steps"):
        ToyLabConfig(student_steps=[])
    with pytest.raises(ValueError, match="loop.betas"):
        LoopConfig(betas=[0.9])
    with pytest.raises(ValueError, match="data.radius"):
        ToyDataConfig(radius=0.0)
    with pytest.raises(ValueError, match="ema_decay"):
        LoopConfig(ema_decay=1.0)


def test_loop_for_uses_method_section_and_scales():
    cfg = ToyLabConfig(budget_scale=0.5)
    assert cfg.loop_for("dmd").iterations == cfg.dmd.iterations // 2
    assert cfg.loop_for("not_a_section").iterations == cfg.loop.iterations // 2
    assert cfg.dmd.iterations == ToyLabConfig().dmd.iterations  # not mutated


def test_recipes_registered_and_step_lists():
    assert {"dmd", "sid", "ode_regression", "progressive"} <= set(known_recipes())
    assert student_step_list(4, 1.0) == [1000.0, 750.0, 500.0, 250.0]
    assert student_step_list(1, 3.0) == [1000.0]


def test_format_table_columns():
    rows = [{"method": "dmd", "steps": 1, "distance": 0.1, "teacher_distance": 0.9, "ratio": 0.1 / 0.9, "wall_s": 3.0}]
    text = format_table(rows, noise_floor=0.02)
    header = text.splitlines()[0]
    for col in ("method", "student steps", "teacher-50", "teacher same steps", "ratio", "wall s"):
        assert col in header
    assert "| dmd | 1 | 0.1000 | 0.9000 | 0.111 | 3.0 |" in text and "0.0200" in text
