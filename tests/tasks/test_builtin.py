import pytest

from tropd.tasks import Item
from tropd.tasks.builtin import get_task, list_tasks

TASKS = ["add", "copy", "reverse"]


def _expected_answer(name: str, prompt: str) -> str:
    """Recompute the answer from the prompt text, independently of the task code."""
    assert prompt.endswith("=")
    body = prompt[:-1]
    if name == "add":
        left, right = body.split("+")
        return str(int(left) + int(right))
    op, text = body.split(":")
    assert op == name
    return text if name == "copy" else text[::-1]


def test_list_tasks():
    assert list_tasks() == sorted(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_train_and_eval_are_disjoint(name):
    task = get_task(name)
    for seed in (0, 1):
        train = {item.prompt for item in task.items("train", 3000, seed)}
        evaluation = {item.prompt for item in task.items("eval", 300, seed)}
        assert train and evaluation
        assert not train & evaluation


def test_add_puts_both_operand_orders_in_the_same_split():
    task = get_task("add", digits=2)
    train = {item.prompt for item in task.items("train", 5000, 0)}
    evaluation = {item.prompt for item in task.items("eval", 500, 0)}
    swapped = {"+".join(reversed(prompt[:-1].split("+"))) + "=" for prompt in evaluation}
    assert not swapped & train


@pytest.mark.parametrize("name", TASKS)
def test_items_are_deterministic_given_seed(name):
    task = get_task(name)
    assert task.items("train", 50, 7) == get_task(name).items("train", 50, 7)
    assert task.items("train", 50, 7) != task.items("train", 50, 8)
    assert len(task.items("eval", 13, 0)) == 13
    assert task.items("eval", 0, 0) == []


@pytest.mark.parametrize("name", TASKS)
def test_answers_are_correct_and_inside_the_alphabet(name):
    task = get_task(name)
    for item in task.items("train", 200, 0) + task.items("eval", 50, 0):
        assert item.answer == _expected_answer(name, item.prompt)
        assert task.gold_response(item) == item.answer
        assert set(item.prompt + task.gold_response(item)) <= set(task.alphabet)


@pytest.mark.parametrize("name", TASKS)
def test_verifier_accepts_gold_and_rejects_wrong(name):
    task = get_task(name)
    for item in task.items("eval", 30, 0):
        gold = task.gold_response(item)
        assert task.score(gold, item) == 1.0
        assert task.score(f" {gold}\n", item) == 1.0
        assert task.score(gold + gold[-1], item) == 0.0
        assert task.score(gold[:-1], item) == 0.0
        assert task.score("", item) == 0.0
        assert task.score(f"{gold[0]} {gold[1:]}", item) == (0.0 if len(gold) > 1 else 1.0)


def test_verifier_is_exact_not_numeric():
    item = Item(prompt="1+1=", answer="2")
    task = get_task("add")
    assert task.score("02", item) == 0.0
    assert task.score("2.0", item) == 0.0


def test_add_digits_option_bounds_operands():
    task = get_task("add", digits=1)
    for item in task.items("train", 200, 0):
        left, right = item.prompt[:-1].split("+")
        assert 0 <= int(left) <= 9 and 0 <= int(right) <= 9
    long_operands = {
        len(part)
        for item in get_task("add", digits=5).items("train", 500, 0)
        for part in item.prompt[:-1].split("+")
    }
    assert long_operands == {1, 2, 3, 4, 5}


def test_string_length_options():
    task = get_task("reverse", min_length=3, max_length=4, letters=3)
    texts = [item.answer for item in task.items("train", 300, 0)]
    assert {len(t) for t in texts} == {3, 4}
    assert set("".join(texts)) <= set("abc")


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="add, copy, reverse"):
        get_task("multiply")


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match="valid options: digits"):
        get_task("add", digit=3)
    with pytest.raises(ValueError, match="min_length, max_length, letters"):
        get_task("copy", length=3)


def test_bad_option_values_and_split():
    with pytest.raises(ValueError, match="digits"):
        get_task("add", digits=0)
    with pytest.raises(ValueError, match="min_length"):
        get_task("reverse", min_length=5, max_length=2)
    with pytest.raises(ValueError, match="unknown split"):
        get_task("add").items("test", 3, 0)


def test_empty_split_is_an_error_not_a_hang():
    task = get_task("copy", min_length=1, max_length=1, letters=2)  # only 2 problems
    splits = {item.prompt for item in task.items("train", 10, 0)}
    empty = "eval" if len(splits) == 2 else "train"
    with pytest.raises(ValueError, match=f"no {empty} problems"):
        task.items(empty, 1, 0)
