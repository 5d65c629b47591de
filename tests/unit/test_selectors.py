"""Label rules and the selector parser: every valid form, canonical text that parses back to itself, and
hostile input (control characters, huge or nested text, unicode look-alikes) refused with the valid forms."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet import labels
from edgefleet.errors import ConflictError, InvalidRequestError
from edgefleet.selectors import FORMS, Requirement, Selector, parse_selector

BERLIN_V2 = {"site": "berlin", "camera": "v2"}
PARIS = {"site": "paris"}
BARE: dict[str, str] = {}


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("all", "all"),
        ("group:lab", "group:lab"),
        ("device:dev-12ab", "device:dev-12ab"),
        ("site=berlin", "site=berlin"),
        ("site==berlin", "site=berlin"),
        (" site = berlin , camera != v1 ", "site=berlin,camera!=v1"),
        ("site in (berlin, paris)", "site in (berlin,paris)"),
        ("site notin (x)", "site notin (x)"),
        ("site", "site"),
        ("! site", "!site"),
        ("site=berlin,group:lab", "group:lab,site=berlin"),
        ("tier=", "tier="),
    ],
)
def test_every_form_parses_to_its_canonical_text(text: str, canonical: str) -> None:
    parsed = parse_selector(text)
    assert str(parsed) == canonical
    assert parse_selector(canonical) == parsed


@pytest.mark.parametrize(
    ("text", "berlin_v2", "paris", "bare"),
    [
        ("site=berlin", True, False, False),
        ("site!=berlin", False, True, True),  # kubectl: a device without the key matches !=
        ("site in (berlin,paris)", True, True, False),
        ("site notin (berlin)", False, True, True),
        ("site", True, True, False),
        ("!site", False, False, True),
        ("site=berlin,camera!=v1", True, False, False),
        ("site=berlin,camera=v1", False, False, False),
        ("all", True, True, True),
    ],
)
def test_label_requirements_match_as_kubectl_does(
    text: str, berlin_v2: bool, paris: bool, bare: bool
) -> None:
    selector = parse_selector(text)
    assert [selector.matches("d", "g", x) for x in (BERLIN_V2, PARIS, BARE)] == [berlin_v2, paris, bare]


def test_group_and_labels_must_both_match() -> None:
    selector = parse_selector("group:lab,site=berlin")
    assert selector.matches("d", "lab", BERLIN_V2)
    assert not selector.matches("d", "field", BERLIN_V2)
    assert not selector.matches("d", "lab", PARIS)
    assert Selector("device", "d").matches("d", "any", BARE) and not Selector("device", "d").matches(
        "e", "any"
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "it is empty"),
        ("every thing", "not a label requirement"),
        ("group:", "not a group name"),
        ("group:../x", "not a group name"),
        ("group:a,group:b", "more than one group"),
        ("all,group:lab", "'all' stands alone"),
        ("device:a b", "device:ID takes"),
        ("device:x,site=a", "device:ID takes"),
        ("host:x", "only group: and device:"),
        ("site in ()", "at least one value"),
        ("site in (a,)", "empty value"),
        ("site in (a", "not closed"),
        ("site)", "has no '('"),
        ("site in ((a))", "do not nest"),
        ("site,,camera", "empty part"),
        ("site=", None),  # valid: an empty value
        ("-site", "not a label requirement"),
        ("site-=x", "not a label requirement"),
        ("k" * 64, "not a label requirement"),
        ("site=" + "v" * 64, "is not a value"),
        ("site=a\x1b[2J", "is not a value"),
        ("site=a\nb", "not a label requirement"),
        ("sitе=berlin", "not a label requirement"),  # a Cyrillic 'е'
        ("site=berlin\u202e", "is not a value"),
        ("a=b," * 300, "longer than 1024"),
        (",".join(f"k{i}" for i in range(40)), "more than 32"),
        ("site in (" + ",".join(f"v{i}" for i in range(40)) + ")", "at most 32 values"),
        (",".join(f"key{i}=value{i}" for i in range(20)), "longer than 256"),
    ],
)
def test_bad_selectors_are_refused_showing_the_valid_forms(text: str, why: str | None) -> None:
    if why is None:
        parse_selector(text)
        return
    with pytest.raises(InvalidRequestError, match=re.escape(why)) as refused:
        parse_selector(text)
    assert FORMS in str(refused.value)
    assert "\x1b" not in str(refused.value) and "\n" not in str(refused.value)


def test_undecodable_text_is_refused_as_utf8() -> None:
    with pytest.raises(InvalidRequestError, match="not valid UTF-8"):
        parse_selector("site=" + b"\xff".decode("utf-8", "surrogateescape"))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab=!,() :in.-_\x00é"), max_size=40))
def test_any_text_either_parses_to_text_that_parses_back_or_is_refused_cleanly(text: str) -> None:
    try:
        parsed = parse_selector(text)
    except InvalidRequestError:
        return
    assert parse_selector(str(parsed)) == parsed


_KEYS = st.from_regex(labels.KEY, fullmatch=True).filter(lambda k: len(k) <= 20)
_VALUES = st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.builds(
            Requirement,
            _KEYS,
            st.sampled_from(["=", "!=", "in", "notin", "exists", "!"]),
            st.lists(_VALUES, min_size=1, max_size=3, unique=True).map(tuple),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_built_selectors_print_as_text_that_parses_back(requirements: list[Requirement]) -> None:
    fixed = tuple(
        Requirement(r.key, r.operator, r.values[:1] if r.operator in ("=", "!=") else r.values)
        if r.operator not in ("exists", "!")
        else Requirement(r.key, r.operator)
        for r in requirements
    )
    selector = Selector("all", "", fixed)
    assert parse_selector(str(selector)) == selector


# ---- labels ------------------------------------------------------------------------------------------------


def test_label_edits_read_kubectl_forms() -> None:
    change = labels.edits(["site=berlin", "camera-", "tier="])
    assert change.set == {"site": "berlin", "tier": ""} and change.remove == ("camera",)


@pytest.mark.parametrize(
    ("words", "why"),
    [
        ([], "give labels"),
        (["site"], "key=value to set"),
        (["site=a", "site=b"], "given twice"),
        (["site=a", "site-"], "both set and removed"),
        (["-=x"], "bad label key"),
        (["a" * 64 + "=x"], "bad label key"),
        (["site=a b"], "bad value"),
        (["site=\x1b"], "bad value"),
        (["sitе=x"], "bad label key"),
    ],
)
def test_bad_label_edits_are_refused_with_the_rule(words: list[str], why: str) -> None:
    with pytest.raises(InvalidRequestError, match=why):
        labels.edits(words)


def test_changing_a_value_needs_overwrite_and_nothing_else_does() -> None:
    current = {"site": "berlin"}
    with pytest.raises(ConflictError, match="--overwrite"):
        labels.apply_edits(current, labels.edits(["site=paris"]), overwrite=False)
    assert labels.apply_edits(current, labels.edits(["site=paris"]), overwrite=True) == {"site": "paris"}
    assert labels.apply_edits(current, labels.edits(["site=berlin", "cam=v2"]), False) == {
        "site": "berlin",
        "cam": "v2",
    }
    assert labels.apply_edits(current, labels.edits(["site-", "gone-"]), False) == {}


def test_a_device_carries_at_most_64_labels() -> None:
    full = {f"k{i}": "v" for i in range(64)}
    assert labels.check_labels(full) == full
    with pytest.raises(InvalidRequestError, match="at most 64"):
        labels.apply_edits(full, labels.edits(["one-more=x"]), overwrite=False)
    with pytest.raises(InvalidRequestError, match="at most 64"):
        labels.check_labels({**full, "k64": "v"})
