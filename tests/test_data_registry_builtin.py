import subprocess
import sys

import pytest

from adamerge.data.registry import UnknownTaskError, check_tasks, get_task, list_tasks


def test_standard_tasks_resolve_and_the_registry_loads_no_benchmark():
    code = (
        "import sys\n"
        "from adamerge.data.registry import get_task, list_tasks\n"
        "assert {'mnist', 'sun397', 'dtd'} <= set(list_tasks()), list_tasks()\n"
        "assert not any(t.startswith('mini_') for t in list_tasks())\n"
        "assert not [m for m in sys.modules if m.startswith(('adamerge.data.mini', 'adamerge.models'))]\n"
        "import adamerge.data.mini\n"
        "assert get_task('mini_digits').num_classes == 10\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_mini_benchmark_registers_its_tasks_on_import():
    import adamerge.data.mini  # noqa: F401

    assert {"mnist", "sun397", "mini_mnist", "mini_fashion_coarse"} <= set(list_tasks())
    assert get_task("mini_digits").num_classes == 10


def test_unknown_empty_and_duplicate_task_lists_are_named():
    import adamerge.data.mini  # noqa: F401  (its tasks are among the known ones named)

    with pytest.raises(UnknownTaskError, match="unknown task 'nope'.*mini_digits"):
        check_tasks(["mnist", "nope"])
    with pytest.raises(ValueError, match="empty task list"):
        check_tasks([])
    with pytest.raises(ValueError, match="'mnist' more than once"):
        check_tasks(["mnist", "mnist"])
