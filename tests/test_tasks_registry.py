import pytest

from sortedrl.errors import ConfigError
from sortedrl.tasks import TASK_NAMES, get_task
from sortedrl.tasks.countdown import SyntheticTask
from sortedrl.tasks.dataset import DatasetTask
from sortedrl.tasks.knights_knaves import KnightsKnavesTask
from sortedrl.tasks.math import MathTask


def test_get_task(tmp_path):
    assert isinstance(get_task("countdown"), SyntheticTask)
    assert get_task("countdown", max_steps=5).max_steps == 5
    assert isinstance(get_task("knights_knaves", max_people=3), KnightsKnavesTask)
    f = tmp_path / "m.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n')
    assert isinstance(get_task("math", path=str(f)), MathTask)
    assert set(TASK_NAMES) == {"reverse", "countdown", "knights_knaves", "math", "dataset"}
    assert isinstance(get_task("dataset", path=str(f)), DatasetTask)


def test_get_task_errors():
    with pytest.raises(ConfigError, match="reverse, countdown, knights_knaves, math, dataset"):
        get_task("gsm8k")
    with pytest.raises(ConfigError, match="needs a path"):
        get_task("math")
    with pytest.raises(ConfigError, match="unknown option.*colour"):
        get_task("countdown", colour="red")
