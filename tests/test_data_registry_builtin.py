import pytest

from adamerge.data.registry import UnknownTaskError, check_tasks, get_task, list_tasks


def test_builtin_tasks_resolve_without_importing_their_modules():
    names = list_tasks()
    assert {"mnist", "sun397", "mini_mnist", "mini_fashion_coarse"} <= set(names)
    assert get_task("mini_digits").num_classes == 10


def test_unknown_empty_and_duplicate_task_lists_are_named():
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'.*mini_digits"):
        check_tasks(["mnist", "nope"])
    with pytest.raises(ValueError, match="empty task list"):
        check_tasks([])
    with pytest.raises(ValueError, match="'mnist' more than once"):
        check_tasks(["mnist", "mnist"])
