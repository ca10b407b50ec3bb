"""A1111 (webui 1.10) prompt syntax: expected values are A1111's own doctests and outputs of its lark-based
``prompt_parser`` (recorded from the webui code; lark itself is not a dependency).

For prompts with a stray bracket right next to a valid ``[...]`` construct at the top level, A1111's lark
(Earley) parse is ambiguous and its choice follows Python's per-process string hashing (it differs between
launches): Sumie always reads the valid construct, one of the outcomes A1111 produces. The cases below
are all ones where A1111 is deterministic.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sumie.prompts.parser import (
    ExtraNetwork,
    cond_index_at_step,
    extract_extra_networks,
    multicond_prompt_list,
    parse_prompt_attention,
    prompt_schedule,
    prompt_schedules,
    split_and,
    strip_comments,
)


def _alternating(a: str, b: str, steps: int) -> list[tuple[int, str]]:
    return [(s, a if s % 2 else b) for s in range(1, steps + 1)]


# ------------------------------------------------------------------------------------- A1111 doctests

DOCTEST_SCHEDULES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    # the doctest says [[5, 'a  c'], [10, 'a {b|d{ c']] ("not handling this right now"), but A1111's own grammar
    # gives no parse for it (a "|" outside an alternation), so the prompt stays as written
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", _alternating("a", "(b:1.1)", 10)),
    ("[fe|]male", _alternating("female", "male", 10)),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
]


@pytest.mark.parametrize(("prompt", "expected"), DOCTEST_SCHEDULES)
def test_a1111_schedule_doctests(prompt: str, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, 10) == expected


def test_a1111_hires_schedule_doctests() -> None:
    assert prompt_schedule("a [b:.5] c", 10, hires_steps=10) == [(10, "a b c")]
    assert prompt_schedule("a [b:1.5] c", 10, hires_steps=10) == [(5, "a  c"), (10, "a b c")]


def test_a1111_schedule_comment_example() -> None:
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]"
        "[ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


DOCTEST_ATTENTION = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
         (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
    ),
]


@pytest.mark.parametrize(("text", "expected"), DOCTEST_ATTENTION)
def test_a1111_attention_doctests(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected  # exact floats: same multiplication order as A1111


# ------------------------------------------------------------------- more A1111 outputs (recorded)

INV = 0.9090909090909091  # 1 / 1.1
# (prompt, schedule for 10 steps, schedule for the hires pass: 6 base steps then 9 hires steps)
SCHEDULES = [
    ("a [b:c:5] d", [(5, "a b d"), (10, "a c d")], [(9, "a c d")]),
    ("a [b:c:0.5] d", [(5, "a b d"), (10, "a c d")], [(9, "a c d")]),
    ("[a:b:1.5]", [(10, "a")], [(4, "a"), (9, "b")]),
    ("[a:b:15]", [(10, "a")], [(9, "a")]),
    ("[a:b:0]", [(10, "b")], [(9, "b")]),
    ("[a:b:-3]", [(10, "b")], [(9, "b")]),
    ("[a:b:1e1]", [(10, "a")], [(4, "a"), (9, "b")]),
    ("[a:b:+2]", [(2, "a"), (10, "b")], [(9, "b")]),
    ("[a:b: 3 ]", [(3, "a"), (10, "b")], [(9, "b")]),
    ("[a:b:\t3\n]", [(3, "a"), (10, "b")], [(9, "b")]),
    ("[a::4]", [(4, "a"), (10, "")], [(9, "")]),
    ("[:b:4]", [(4, ""), (10, "b")], [(9, "b")]),
    ("[::4]", [(4, ""), (10, "")], [(9, "")]),
    ("[a:b:1.]", [(10, "a")], [(9, "b")]),
    ("[a:b:.5e1]", [(10, "a")], [(9, "a")]),
    ("[a:b:00.5]", [(5, "a"), (10, "b")], [(9, "b")]),
    ("[a:b:99999999999999999999]", [(10, "a")], [(9, "a")]),
    ("[a:b:1e-400]", [(10, "b")], [(9, "b")]),
    ("[a:b:\u0663]", [(10, "[a:b:\u0663]")], [(9, "[a:b:\u0663]")]),  # NUMBER is ASCII digits only
    ("[(a:1.2):b:4]", [(4, "(a:1.2)"), (10, "b")], [(9, "b")]),
    ("[a (b) c:d [e] f:6]", [(6, "a (b) c"), (10, "d [e] f")], [(9, "d [e] f")]),
    ("[a:b:c:3]", [(10, "[a:b:c:3]")], [(9, "[a:b:c:3]")]),
    ("[a:b|c:3]", [(10, "[a:b|c:3]")], [(9, "[a:b|c:3]")]),
    ("a | b", [(10, "a | b")], [(9, "a | b")]),
    ("a [b|c", [(10, "a [b|c")], [(9, "a [b|c")]),
    ("(a|b)", [(10, "(a|b)")], [(9, "(a|b)")]),
    ("[a:b:3x]", [(10, "[a:b:3x]")], [(9, "[a:b:3x]")]),
    ("[[a:b:3]", [(3, "[a"), (10, "[b")], [(9, "[b")]),
    ("a\\[b:c:3\\]", [(10, "a\\[b:c:3\\]")], [(9, "a\\[b:c:3\\]")]),
    ("a \\", [(10, "a \\")], [(9, "a \\")]),
    ("a\\\nb [c:2]", [(10, "a\\\nb [c:2]")], [(9, "a\\\nb [c:2]")]),
    ("[a\\:b:c:2]", [(2, "a\\:b"), (10, "c")], [(9, "c")]),
    ("[a:b\\|c:2]", [(2, "a"), (10, "b\\|c")], [(9, "b\\|c")]),
    ("\\([a:b:2]\\)", [(2, "\\(a\\)"), (10, "\\(b\\)")], [(9, "\\(b\\)")]),
    ("([a:b:2])", [(2, "(a)"), (10, "(b)")], [(9, "(b)")]),
    ("([a:b:2]:1.3)", [(2, "(a:1.3)"), (10, "(b:1.3)")], [(9, "(b:1.3)")]),
    ("[[a:b:2]]", [(2, "[a]"), (10, "[b]")], [(9, "[b]")]),
    ("[ :2]", [(2, ""), (10, " ")], [(9, " ")]),
    ("", [(10, "")], [(9, "")]),
    ("[]", [(10, "[]")], [(9, "[]")]),
    ("()", [(10, "()")], [(9, "()")]),
    ("(a:b)", [(10, "(a:b)")], [(9, "(a:b)")]),
    ("[a:b:2][c:d:4][e:f:6]", [(2, "ace"), (4, "bce"), (6, "bde"), (10, "bdf")], [(9, "bdf")]),
    ("[a:[b:[c:d:6]:4]:2]", [(2, "a"), (4, "b"), (6, "c"), (10, "d")], [(9, "d")]),
    ("[a [b:2]:3]", [(2, ""), (3, ""), (10, "a b")], [(9, "a b")]),
    ("[[a|b]:c:3]", [(1, "a"), (2, "b"), (3, "a")] + [(s, "c") for s in range(4, 11)],
     [(s, "c") for s in range(1, 10)]),
    ("[a:[b|c]:2]", [(1, "a"), (2, "a")] + _alternating("b", "c", 10)[2:], _alternating("b", "c", 9)),
    ("[|a]", _alternating("", "a", 10), _alternating("", "a", 9)),
    ("[a||b]", [(s, ["a", "", "b"][(s - 1) % 3]) for s in range(1, 11)],
     [(s, ["a", "", "b"][(s - 1) % 3]) for s in range(1, 10)]),
    ("masterpiece, [cat:dog:0.5], (unclosed", [(5, "masterpiece, cat, (unclosed"), (10, "masterpiece, dog, (unclosed")],
     [(9, "masterpiece, dog, (unclosed")]),
    ("a (b:1.2)) [c:d:3]", [(3, "a (b:1.2)) c"), (10, "a (b:1.2)) d")], [(9, "a (b:1.2)) d")]),
    ("a [c:d:3] b ) c", [(3, "a c b ) c"), (10, "a d b ) c")], [(9, "a d b ) c")]),
    ("a [c|d] b ( c", _alternating("a c b ( c", "a d b ( c", 10), _alternating("a c b ( c", "a d b ( c", 9)),
]


@pytest.mark.parametrize(("prompt", "at10", "hires"), SCHEDULES)
def test_schedules_match_a1111(prompt: str, at10: list[tuple[int, str]], hires: list[tuple[int, str]]) -> None:
    assert prompt_schedule(prompt, 10) == at10
    assert prompt_schedule(prompt, 6, hires_steps=9) == hires


def test_mixed_schedule_and_alternation() -> None:
    got = prompt_schedule("a [b:2] c [d:e:0.7] (f:1.2) [g|h|i]", 10)
    want = [
        (1, "a  c d (f:1.2) g"), (2, "a  c d (f:1.2) h"), (3, "a b c d (f:1.2) i"), (4, "a b c d (f:1.2) g"),
        (5, "a b c d (f:1.2) h"), (6, "a b c d (f:1.2) i"), (7, "a b c d (f:1.2) g"), (8, "a b c e (f:1.2) h"),
        (9, "a b c e (f:1.2) i"), (10, "a b c e (f:1.2) g"),
    ]
    assert got == want


def test_old_scheduling() -> None:
    # use_old_scheduling: < 1 is a fraction, >= 1 a step, whether or not the number has a dot; hires ignored
    assert prompt_schedule("[a:b:1.5]", 10, hires_steps=20, use_old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:0.5]", 10, hires_steps=20, use_old_scheduling=True) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:3]", 10, use_old_scheduling=True) == [(3, "a"), (10, "b")]


def test_infinite_step_numbers_are_clamped() -> None:
    # A1111 raises OverflowError here (int(inf)); Sumie clamps instead
    assert prompt_schedule("[a:b:1e400]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:-1e400]", 10) == [(10, "b")]


def test_prompt_schedules_batch_and_step_lookup() -> None:
    s = prompt_schedules(["x", "[a:b:2]", "x"], 4)
    assert s == [[(4, "x")], [(2, "a"), (4, "b")], [(4, "x")]]
    # A1111 (reconstruct_cond_batch): sampler step k (0-based) uses the first entry with k <= end_step
    assert [cond_index_at_step(s[1], k) for k in range(5)] == [0, 0, 0, 1, 1]
    assert cond_index_at_step(s[1], 99) == 0


ATTENTION = [
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("aBREAK b", [("aBREAK b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
    ("[BREAK]", [("", INV), ("BREAK", -INV), ("", INV)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK_x", [("BREAK_x", 1.0)]),
    ("x.BREAK.y", [("x.", 1.0), ("BREAK", -1.0), (".y", 1.0)]),
    ("(a: 1.5 )", [("a", 1.5)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:+.5)", [("a", 0.5)]),
    ("(a:0)", [("a", 0.0)]),
    ("a:1.5)", [("a:1.5)", 1.0)]),
    ("(a:1e2)", [("a:1e2", 1.1)]),
    ("(a::1.2)", [("a:", 1.2)]),
    ("[a:1.2]", [("a:1.2", INV)]),
    ("((a)", [("a", 1.2100000000000002)]),
    ("(a))", [("a", 1.1), (")", 1.0)]),
    ("[[a]", [("a", 0.8264462809917354)]),
    ("[a]]", [("a", INV), ("]", 1.0)]),
    ("[a(b]c)", [("a", INV), ("b", 1.0), ("c", 1.1)]),
    ("(a[b)c]", [("a", 1.1), ("b", 1.0), ("c", INV)]),
    ("\\\\(a)", [("\\", 1.0), ("a", 1.1)]),
    ("a\\b", [("ab", 1.0)]),
    ("a\\", [("a", 1.0)]),
    ("\\", [("", 1.0)]),
    ("(a\\)b)", [("a)b", 1.1)]),
    ("\\[(x)\\]", [("[", 1.0), ("x", 1.1), ("]", 1.0)]),
    ("(a:1.2)(b:1.2)", [("ab", 1.2)]),
    ("((a:2):3)", [("a", 6.0)]),
    ("(:1.2)", [("", 1.0)]),
    ("(a:1.2:3)", [("a:1.2", 3.0)]),
    ("(a:1.2 3)", [("a:1.2 3", 1.1)]),
    ("(\u0663:2)", [("\u0663", 2.0)]),
    ("(a:\u0663)", [("a", 3.0)]),  # Python's \d and float() take any decimal digit
    ("(a, b:1.4), c, [d:e:5]", [("a, b", 1.4), (", c, ", 1.0), ("d:e:5", INV)]),
    ("", [("", 1.0)]),
    ("(", [("", 1.0)]),
    (")", [(")", 1.0)]),
    ("[[[a", [("a", 0.7513148009015777)]),
]


@pytest.mark.parametrize(("text", "expected"), ATTENTION)
def test_attention_matches_a1111(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


def test_attention_bad_weight_does_not_raise() -> None:
    # A1111 raises ValueError on float(".."); Sumie reads the colon as text and the ")" as a plain close
    assert parse_prompt_attention("(a:..)") == [("a:..", 1.1)]
    assert parse_prompt_attention("(a:1.2.3)") == [("a:1.2.3", 1.1)]


# ------------------------------------------------------------------------------------- AND, tags

def test_split_and() -> None:
    assert split_and("a cat AND a dog :0.5") == [("a cat", 1.0), (" a dog", 0.5)]
    assert split_and("a AND b:-1 AND c: 2.") == [("a", 1.0), (" b", -1.0), (" c", 2.0)]
    assert split_and("ANDROID AND x") == [("ANDROID", 1.0), (" x", 1.0)]  # \bAND\b: whole word only
    assert split_and("no and here") == [("no and here", 1.0)]
    assert split_and("a:1.5\n") == [("a", 1.5)]
    assert split_and("(x:1.2) AND y :.25") == [("(x:1.2)", 1.0), (" y", 0.25)]
    assert split_and("") == [("", 1.0)]


def test_multicond_prompt_list() -> None:
    idx, flat = multicond_prompt_list(["a AND b:2", "b:3 AND c"])
    assert flat == ["a", " b", "b", " c"]
    assert idx == [[(0, 1.0), (1, 2.0)], [(2, 3.0), (3, 1.0)]]


def test_extract_extra_networks() -> None:
    clean, nets = extract_extra_networks("a <lora:detail:0.8>, b <hypernet:x> <lyco:y:1:unet=0.5:dyn=8>")
    assert clean == "a , b  "
    assert nets == [
        ExtraNetwork("lora", "detail", ("0.8",)),
        ExtraNetwork("hypernet", "x", ()),
        ExtraNetwork("lyco", "y", ("1", "unet=0.5", "dyn=8")),
    ]
    assert nets[0].multiplier() == 0.8 and nets[1].multiplier() == 1.0
    assert nets[2].positional == ("1",) and nets[2].named == {"unet": "0.5", "dyn": "8"}
    # not tags: no word kind, empty args, spaces in the kind
    assert extract_extra_networks("<:x> <lora:> <my lora:x> a<b>c") == ("<:x> <lora:> <my lora:x> a<b>c", [])
    # key=value first: the name is the first positional item; "a=b=c" counts as positional
    _, (n,) = extract_extra_networks("<lora:te=0.5:name:0.7>")
    assert (n.name, n.args, n.positional, n.named) == ("name", ("te=0.5", "0.7"), ("0.7",), {"te": "0.5"})
    _, (m,) = extract_extra_networks("<lora:x:bad>")
    assert m.multiplier(default=0.3) == 0.3


def test_strip_comments() -> None:
    assert strip_comments("a\n# whole line\nb") == "a\nb"
    assert strip_comments("# first\nb") == "\nb"
    assert strip_comments("a # tail\nb") == "a \nb"
    assert strip_comments("a #tail") == "a \n"
    assert strip_comments("no comment") == "no comment"


# -------------------------------------------------------------------------------------- totality

SPECIAL = st.lists(
    st.sampled_from(list("ab \t\n[]()|:\\.-+e019<>#") + ["BREAK", "AND", "<lora:x:1>"]), max_size=40
).map("".join)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), SPECIAL))
def test_no_string_crashes_the_parser(text: str) -> None:
    att = parse_prompt_attention(text)
    assert att and all(isinstance(t, str) and isinstance(w, float) for t, w in att)
    sched = prompt_schedule(text, 7)
    assert sched[-1][0] == 7 and [e for e, _ in sched] == sorted({e for e, _ in sched})
    assert prompt_schedule(text, 5, hires_steps=8)[-1][0] == 8
    assert split_and(text)
    clean, _ = extract_extra_networks(text)
    assert "<lora:x:1>" not in clean
    strip_comments(text)


@settings(max_examples=200, deadline=None)
@given(SPECIAL)
def test_schedule_texts_only_drop_syntax(text: str) -> None:
    # every scheduled text is made of the prompt's characters, and a prompt without [ or | is never scheduled
    for _, t in prompt_schedule(text, 4):
        assert set(t) <= set(text)
    if "[" not in text:
        assert prompt_schedule(text, 4) == [(4, text)]
