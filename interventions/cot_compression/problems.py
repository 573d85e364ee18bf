"""Arithmetic word problems with paired verbose / concise solutions, generated here (no downloaded data).

ASC (docs/architecture.md §10) needs pairs of solutions to the same problem that differ in style only:
a VERBOSE one
(English-heavy step-by-step reasoning, as a chat assistant writes it) and a CONCISE one
(math-notation-heavy: "4×3=12; 12+5=17. Answer: 17"). Both are rendered from the same list of `Step`s,
so they always agree on the arithmetic. Each template draws its numbers from a seeded RNG; the training
and held-out sets use different seeds and the held-out set drops any (template, numbers) combination
that the training set has, so evaluation problems never were used to build the vector.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

TRAIN_SEED = 20240601
HELDOUT_SEED = 7771
DEV_SEED = 4049
DEV_EXCLUDE_HELDOUT = 1000  # the dev split avoids this many held-out problems (any --problems up to it)
OPS = {"+": "plus", "−": "minus", "×": "times", "÷": "divided by"}
NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Nora", "Ben", "Lily", "Omar", "Ruby", "Eli"]


@dataclass(frozen=True)
class Step:
    """One operation `a op b = result`, with the English the verbose solution wraps around it."""

    a: int
    op: str  # one of OPS
    b: int
    result: int
    goal: str  # what this step finds, e.g. "how much the apples cost"
    reason: str  # why this operation, in words


@dataclass(frozen=True)
class Problem:
    template: str
    values: tuple[int, ...]  # the drawn numbers: (template, values) identifies a problem
    question: str
    steps: tuple[Step, ...]
    answer: int
    unit: str  # "dollars", "km", ... ("" for none)

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.template, self.values

    def concise(self) -> str:
        eqs = "; ".join(f"{s.a}{s.op}{s.b}={s.result}" for s in self.steps)
        return f"{eqs}. Answer: {self.answer}"

    def verbose(self) -> str:
        firsts = ["First", "Next", "Then", "After that"]
        parts = ["Let's work through this problem step by step, one piece at a time."]
        for i, s in enumerate(self.steps):
            unit = f" {self.unit}" if self.unit else ""
            parts.append(
                f"{firsts[min(i, 3)]}, we need to find {s.goal}. {s.reason} "
                f"So {s.a} {OPS[s.op]} {s.b} gives us {s.result}{unit}."
            )
        unit = f" {self.unit}" if self.unit else ""
        parts.append(
            f"Putting it all together, the final result is {self.answer}{unit}. The answer is {self.answer}."
        )
        return "\n\n".join(parts)


def _apply(a: int, op: str, b: int) -> int:
    return {"+": a + b, "−": a - b, "×": a * b, "÷": a // b}[op]


def _problem(
    template: str,
    values: tuple[int, ...],
    question: str,
    unit: str,
    steps: list[tuple[int, str, int, str, str]],
) -> Problem:
    """Steps given as (a, op, b, goal, reason); each result is computed here, the answer is the last."""
    done = tuple(Step(a, op, b, _apply(a, op, b), goal, reason) for a, op, b, goal, reason in steps)
    return Problem(template, values, question, done, done[-1].result, unit)


def _shopping(r: random.Random, name: str) -> Problem:
    item = r.choice(["apples", "pencils", "notebooks", "oranges", "stickers", "candles"])
    extra = r.choice(["drink", "bag", "card", "snack"])
    n, price, cost = r.randint(2, 9), r.randint(2, 12), r.randint(2, 15)
    q = (
        f"{name} buys {n} {item} that cost {price} dollars each and a {extra} for {cost} dollars. "
        f"How much does {name} spend in total?"
    )
    return _problem("shopping", (n, price, cost), q, "dollars", [
        (n, "×", price, f"how much the {item} cost",
         f"There are {n} {item} and each one costs {price} dollars, so we multiply the number of {item} "
         "by the price of one."),
        (n * price, "+", cost, "the total amount spent",
         f"The {extra} costs {cost} dollars more, so we add it to the cost of the {item}."),
    ])  # fmt: skip


def _change(r: random.Random, name: str) -> Problem:
    item = r.choice(["books", "toy cars", "cupcakes", "comics", "plants"])
    n, price = r.randint(2, 8), r.randint(3, 11)
    money = n * price + r.randint(1, 30)
    q = (
        f"{name} has {money} dollars and buys {n} {item} that cost {price} dollars each. "
        f"How much money does {name} have left?"
    )
    return _problem("change", (money, n, price), q, "dollars", [
        (n, "×", price, f"how much the {item} cost together",
         f"Each of the {n} {item} costs {price} dollars, so we multiply to get the cost of all of them."),
        (money, "−", n * price, "how much money is left",
         f"{name} started with {money} dollars and spent {n * price} dollars, "
         "so we subtract what was spent."),
    ])  # fmt: skip


def _ages(r: random.Random, name: str) -> Problem:
    rel = r.choice(["aunt", "uncle", "mother", "father", "grandmother"])
    age, k, years = r.randint(3, 12), r.randint(2, 5), r.randint(2, 9)
    q = (
        f"{name} is {age} years old. {name}'s {rel} is {k} times as old as {name}. "
        f"How old will the {rel} be in {years} years?"
    )
    return _problem("ages", (age, k, years), q, "years", [
        (age, "×", k, f"how old the {rel} is now",
         f"The {rel} is {k} times as old as {name}, who is {age}, so we multiply {name}'s age by {k}."),
        (age * k, "+", years, f"the {rel}'s age in {years} years",
         f"Every year adds one year to the age, so in {years} years we add {years} to the current age."),
    ])  # fmt: skip


def _age_sum(r: random.Random, name: str) -> Problem:
    other = r.choice([n for n in NAMES if n != name])
    age, older = r.randint(4, 40), r.randint(2, 25)
    q = (
        f"{name} is {age} years old and {other} is {older} years older than {name}. "
        "What is the sum of their ages?"
    )
    return _problem("age_sum", (age, older), q, "years", [
        (age, "+", older, f"how old {other} is",
         f"{other} is {older} years older than {name}, so we add {older} to {name}'s age."),
        (age, "+", age + older, "the sum of their ages",
         f"Now we know both ages, so we add {name}'s age and {other}'s age together."),
    ])  # fmt: skip


def _travel(r: random.Random, name: str) -> Problem:
    vehicle = r.choice(["train", "bus", "car", "truck"])
    speed, hours, more = r.randint(3, 12) * 10, r.randint(2, 6), r.randint(5, 60)
    q = (
        f"A {vehicle} travels at {speed} km per hour for {hours} hours and then goes {more} km more. "
        f"How far does the {vehicle} travel in total?"
    )
    return _problem("travel", (speed, hours, more), q, "km", [
        (speed, "×", hours, f"how far the {vehicle} goes in {hours} hours",
         f"The {vehicle} covers {speed} km in each hour, so for {hours} hours we multiply the speed "
         "by the time."),
        (speed * hours, "+", more, "the total distance",
         f"After that it goes {more} km more, so we add that extra distance."),
    ])  # fmt: skip


def _sharing(r: random.Random, name: str) -> Problem:
    item = r.choice(["cookies", "marbles", "stickers", "grapes", "cards"])
    bags, per, friends = r.randint(2, 9), r.randint(2, 12), r.choice([2, 3, 4, 5, 6])
    while (bags * per) % friends:
        per += 1
    q = (
        f"{name} has {bags} bags with {per} {item} in each bag and shares all the {item} equally among "
        f"{friends} friends. How many {item} does each friend get?"
    )
    return _problem("sharing", (bags, per, friends), q, item, [
        (bags, "×", per, f"how many {item} there are in all",
         f"There are {bags} bags and each bag holds {per} {item}, so we multiply to count all of them."),
        (bags * per, "÷", friends, "how many each friend gets",
         f"The {item} are shared equally among {friends} friends, so we divide the total by {friends}."),
    ])  # fmt: skip


def _baking(r: random.Random, name: str) -> Problem:
    food = r.choice(["muffins", "cookies", "rolls", "cupcakes"])
    trays, per = r.randint(2, 8), r.randint(4, 12)
    sold = r.randint(1, trays * per - 1)
    q = (
        f"A baker makes {trays} trays of {food} with {per} {food} on each tray and sells {sold} of them. "
        f"How many {food} are left?"
    )
    return _problem("baking", (trays, per, sold), q, food, [
        (trays, "×", per, f"how many {food} the baker made",
         f"Each of the {trays} trays has {per} {food}, so we multiply the trays by the {food} on each."),
        (trays * per, "−", sold, f"how many {food} are left",
         f"The baker sold {sold} of them, so we take those away from the total."),
    ])  # fmt: skip


def _savings(r: random.Random, name: str) -> Problem:
    weekly, weeks = r.randint(3, 20), r.randint(3, 10)
    spent = r.randint(1, weekly * weeks - 1)
    q = (
        f"{name} saves {weekly} dollars every week for {weeks} weeks and then spends {spent} dollars on a "
        f"gift. How much money does {name} have now?"
    )
    return _problem("savings", (weekly, weeks, spent), q, "dollars", [
        (weekly, "×", weeks, "how much was saved",
         f"{name} puts away {weekly} dollars each week for {weeks} weeks, so we multiply the weekly amount "
         "by the weeks."),
        (weekly * weeks, "−", spent, "how much is left after the gift",
         f"The gift costs {spent} dollars, so we subtract it from the savings."),
    ])  # fmt: skip


def _garden(r: random.Random, name: str) -> Problem:
    plant = r.choice(["tulips", "carrots", "roses", "tomato plants"])
    rows, per, added = r.randint(2, 9), r.randint(3, 12), r.randint(1, 6)
    q = (
        f"{name}'s garden has {rows} rows of {plant} with {per} {plant} in each row. {name} plants {added} "
        f"more rows just like them. How many {plant} are in the garden now?"
    )
    return _problem("garden", (rows, per, added), q, plant, [
        (rows, "+", added, "how many rows there are now",
         f"There were {rows} rows and {name} adds {added} more, so we add the new rows to the old ones."),
        (rows + added, "×", per, f"how many {plant} there are",
         f"Every row has {per} {plant}, so we multiply the number of rows by {per}."),
    ])  # fmt: skip


def _reading(r: random.Random, name: str) -> Problem:
    per_day, days = r.randint(5, 30), r.randint(2, 9)
    pages = per_day * days + r.randint(5, 120)
    q = (
        f"A book has {pages} pages. {name} reads {per_day} pages every day for {days} days. "
        "How many pages are left to read?"
    )
    return _problem("reading", (pages, per_day, days), q, "pages", [
        (per_day, "×", days, "how many pages have been read",
         f"{name} reads {per_day} pages on each of the {days} days, so we multiply pages per day by days."),
        (pages, "−", per_day * days, "how many pages are left",
         f"The book has {pages} pages and {per_day * days} are already read, so we subtract the pages read."),
    ])  # fmt: skip


TEMPLATES: dict[str, Callable[[random.Random, str], Problem]] = {
    "shopping": _shopping, "change": _change, "ages": _ages, "age_sum": _age_sum, "travel": _travel,
    "sharing": _sharing, "baking": _baking, "savings": _savings, "garden": _garden, "reading": _reading,
}  # fmt: skip


def draw_problems(
    count: int, seed: int, exclude: set[tuple[str, tuple[int, ...]]] | None = None
) -> list[Problem]:
    """`count` distinct problems, templates in turn, numbers from `random.Random(seed)`; deterministic."""
    r, out, seen = random.Random(seed), [], set(exclude or ())
    names = list(TEMPLATES)
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 100 * count:
            raise RuntimeError("could not draw enough distinct problems")
        p = TEMPLATES[names[len(out) % len(names)]](r, r.choice(NAMES))
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
    return out


def train_problems(count: int = 120) -> list[Problem]:
    """Problems whose solution pairs build the direction (and whose questions calibrate the strength)."""
    return draw_problems(count, TRAIN_SEED)


def heldout_problems(count: int = 60, train_count: int = 120) -> list[Problem]:
    """Evaluation problems: another seed, and no (template, numbers) shared with `train_problems`."""
    return draw_problems(count, HELDOUT_SEED, exclude={p.key for p in train_problems(train_count)})


def dev_problems(count: int = 200, train_count: int = 120) -> list[Problem]:
    """Tuning problems: a third seed, sharing nothing with the training problems or the first
    `DEV_EXCLUDE_HELDOUT` held-out ones, so a configuration chosen on them is judged on unseen problems."""
    seen = {p.key for p in train_problems(train_count)}
    seen |= {p.key for p in heldout_problems(DEV_EXCLUDE_HELDOUT, train_count)}
    return draw_problems(count, DEV_SEED, exclude=seen)


_ANSWER = re.compile(r"(?:answer\s*(?:is\s*)?:?|####)\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_answer(text: str) -> float | None:
    """The final number of a model's answer: after the last "answer is"/"Answer:"/"####", else the last
    number in the text (None if there is none)."""
    candidates = _ANSWER.findall(text) or _NUMBER.findall(text)
    if not candidates:
        return None
    try:
        return float(candidates[-1].replace(",", ""))
    except ValueError:
        return None


def cut_after_answer(text: str) -> str:
    """`text` up to the end of the line holding its first final-answer marker ("####", "answer is",
    "Answer:" and a number); unchanged without one. The model's own answers often run on after it (a
    restated answer, or a loop to the token cap): the cut answer is its concise twin."""
    m = _ANSWER.search(text)
    if m is None:
        return text
    end = text.find("\n", m.end())
    return (text if end < 0 else text[:end]).rstrip()
