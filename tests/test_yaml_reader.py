"""yaml_reader: reads what PyYAML reads for the YAML the spec is written in, and refuses the rest."""

from __future__ import annotations

import pytest
import yaml

from conftest import HERE
from yaml_reader import read_yaml

READ_LIKE_PYYAML = {
    "scalars": "a: 1\nb: -2\nc: 0.5\nd: 3.1.0\ne: true\nf: null\ng: ~\nh:\ni: plain text, here\nj: x#y\n",
    "quoted": "a: 'it''s'\nb: \"tab\\tand \\u00e9\"\nc: \"#/components\"\n'300': x\n\"200\": y\n",
    "comments": "# top\na: b # after\nc: \"# not a comment\"\nd: it's # a comment after an apostrophe\n",
    "nesting": "a:\n  b:\n    c: d\n  e: f\ng: h\n",
    "sequences": "l:\n  - a\n  - b: 1\n    c: 2\n  -\n    d: 3\n  - [x, y]\nm:\n- at the key's indentation\nn: 1\n",
    "flow": "r: [a, b,\n    c, d]\nf: {a: {b: [1, 2.5, {}]}, c: , d: \"q: r\", e: http://x.y/z}\n"
            "s: [{bearer: []}, {}]\n",
    "literals": "clip: |\n  one\n    two\n\n  three\n\nstrip: |-\n  a\n\nkeep: |+\n  a\n\n\nempty: |\nlast: x\n",
    "sequence document": "- a\n- b\n",
}


@pytest.mark.parametrize("text", READ_LIKE_PYYAML.values(), ids=READ_LIKE_PYYAML.keys())
def test_reads_what_pyyaml_reads(text: str) -> None:
    assert read_yaml(text) == yaml.safe_load(text)


def test_reads_openapi_yaml_exactly_as_pyyaml_does() -> None:
    text = (HERE / "openapi.yaml").read_text()
    assert read_yaml(text) == yaml.safe_load(text)


REFUSED = {
    "a: yes\n": "'yes' is: quote it",
    "a: 012\n": "'012' is: quote it",
    "a: 1e3\n": "'1e3' is: quote it",
    "a: 2026-11-24\n": "'2026-11-24' is: quote it",
    "200: x\n": "key '200' is not a string",
    "a: &anchor 1\n": "'&' is beyond",
    "a: >\n  folded\n": "'>' is beyond",
    "a: b\na: c\n": "line 2: duplicate key 'a'",
    "a: b\n  continued\n": "line 2: unexpected indentation",
    "a: b: c\n": "may not contain ': '",
    "a: [1, 2\n": "unclosed flow collection",
    "a: \"open\n": "unclosed or multi-line quoted scalar",
    "a: {b}\n": "expected ':' after 'b'",
    "a: [b: c]\n": "a `key: value` pair directly in a flow sequence",
    "a:\n\t- b\n": "line 2: tabs are not indentation",
    "a: \"\\x41\"\n": "an escape in",
}


@pytest.mark.parametrize(("text", "message"), REFUSED.items(), ids=REFUSED.keys())
def test_refuses_what_it_does_not_read_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="openapi.yaml line") as refused:
        read_yaml(text)
    assert message in str(refused.value)
