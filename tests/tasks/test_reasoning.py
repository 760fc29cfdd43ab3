"""The `chain` task: generator, splits, styles and the final-answer verifier."""

import re

import pytest

from tropd.tasks import get_task
from tropd.tasks.reasoning import STYLES, ChainTask, parse_steps, write_chain
from tropd.tasks.tokenizer import build_char_tokenizer


def _evaluate_left_to_right(prompt: str) -> int:
    """Recompute the answer from the prompt text, independently of the task code."""
    tokens = re.findall(r"\d+|[+\-*]", prompt.removesuffix("="))
    value = int(tokens[0])
    for op, operand in zip(tokens[1::2], tokens[2::2], strict=True):
        value = {"+": value + int(operand), "-": value - int(operand)}.get(op, value * int(operand))
    return value


def test_get_task_builds_chain_and_rejects_unknown_options():
    task = get_task("chain", max_steps=3, style="backward")
    assert isinstance(task, ChainTask) and task.max_steps == 3 and task.style == "backward"
    with pytest.raises(ValueError, match="valid options"):
        get_task("chain", stepz=3)
    for bad in ({"min_steps": 0}, {"min_steps": 4, "max_steps": 2}, {"ops": "+/"}, {"style": "x"}):
        with pytest.raises(ValueError, match="chain"):
            get_task("chain", **bad)


@pytest.mark.parametrize("options", [{}, {"ops": "+-*", "max_steps": 6}, {"max_value": 20}])
def test_answers_follow_the_prompt_and_values_stay_in_range(options):
    task = ChainTask(**options)
    for item in task.items("train", 300, 0) + task.items("eval", 50, 0):
        steps = parse_steps(item.prompt)
        assert task.min_steps <= len(steps) <= task.max_steps
        assert item.answer == str(_evaluate_left_to_right(item.prompt))
        assert all(0 <= value <= task.max_value for step in steps for value in (step[0], step[3]))
        assert all(1 <= b <= task.max_operand for _, _, b, _ in steps)


def test_splits_are_disjoint_and_seeded():
    task = ChainTask()
    train = {item.prompt for item in task.items("train", 2000, 0)}
    held_out = {item.prompt for item in task.items("eval", 200, 0)}
    assert not train & held_out
    assert task.items("eval", 20, 3) == ChainTask().items("eval", 20, 3)
    assert task.items("eval", 20, 3) != task.items("eval", 20, 4)


def test_styles_write_the_same_steps_differently():
    steps = parse_steps("7+5-3=")
    assert write_chain(steps, "forward") == "7+5=12;12-3=9\nanswer: 9"
    assert write_chain(steps, "backward") == "12=7+5;9=12-3\nanswer: 9"
    assert write_chain(steps, "spaced") == "7 + 5 = 12, 12 - 3 = 9\nanswer: 9"
    item = ChainTask().items("eval", 1, 0)[0]
    responses = {ChainTask(style=style).gold_response(item) for style in STYLES}
    assert len(responses) == len(STYLES)  # every style differs from the others


def test_verifier_checks_only_the_final_answer_line():
    task = ChainTask()
    for item in task.items("eval", 30, 0):
        for style in STYLES:
            assert task.score(task.with_style(style).gold_response(item), item) == 1.0
        wrong = str(int(item.answer) + 1)
        assert task.score(f"nonsense\nanswer: {item.answer}\n", item) == 1.0
        assert task.score(f"1+1=2\nanswer: {wrong}", item) == 0.0
        assert task.score(f"answer: {item.answer}0", item) == 0.0
        assert task.score(f"answer: {item.answer}\nmore", item) == 0.0
        assert task.score(item.answer, item) == 0.0


def test_one_tokenizer_covers_every_style():
    task = ChainTask(ops="+-*")
    tokenizer = build_char_tokenizer(task.alphabet)
    for item in task.items("train", 100, 0):
        for style in STYLES:
            text = item.prompt + task.with_style(style).gold_response(item)
            assert tokenizer.unk_token_id not in tokenizer.encode(text, add_special_tokens=False)
            assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_domains_give_one_operator_per_problem_and_record_it():
    items = ChainTask(domains="+-").items("eval", 200, 0)
    op_of = {"add": "+", "sub": "-"}
    pure = 0
    for item in items:
        ops = [op for _, op, _, _ in parse_steps(item.prompt)]
        # only at the edge of 0..max_value may a step fall back to the other operator
        pure += set(ops) == {op_of[item.meta["domain"]]}
    assert pure >= 0.9 * len(items)
    counts = [sum(i.meta["domain"] == d for i in items) for d in op_of]
    assert min(counts) > 60  # about half each (binomial std 7)
    assert ChainTask().items("eval", 5, 0)[0].meta == {}
    with pytest.raises(ValueError, match="domains"):
        ChainTask(domains="+/")
