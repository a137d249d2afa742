"""clients.report: the shared Jinja2 environment (autoescape, strict undefined) and its filters."""

from __future__ import annotations

import pytest
from jinja2 import UndefinedError

from clients.report import ENV, fmt, heat_color, num, pct, render


def test_filters():
    assert (num(None), num(0.123456), num(0.123456, 2), num(7), num(True)) == ("–", "0.123", "0.12", "7", "True")
    assert (fmt(None), fmt(1.25), fmt(1.5, "+.3g"), fmt(2.0, "g")) == ("–", "1.2", "+1.5", "2")
    assert (pct(None), pct(0.4), pct(1.0)) == ("–", "40%", "100%")
    assert heat_color(0.0, 10.0) == "rgba(230,85,13,0.00)"
    assert heat_color(20.0, 10.0) == heat_color(99.0, 10.0) == "rgba(230,85,13,0.85)"  # full at 2 × scale
    assert heat_color(-10.0, 10.0) == "rgba(49,130,189,0.45)"  # full blue at −scale
    assert heat_color(1.0, 0.0) == "rgba(230,85,13,0.42)"  # no scale: the raw value


def test_autoescape_and_strict_undefined():
    t = ENV.from_string('<p title="{{ x }}">{{ x }}</p>{{ y|json }}')
    out = t.render(x='<script>"</script>', y={"a": "<b>"})
    assert "<script>" not in out and "&lt;script&gt;&#34;&lt;/script&gt;" in out
    assert "{&#34;a&#34;: &#34;&lt;b&gt;&#34;}" in out
    with pytest.raises(UndefinedError):
        render("ab_report.html.j2")  # a missing context value fails loudly instead of rendering ""
