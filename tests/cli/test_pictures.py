"""report.html: the summary table, one before/after drawing per (rule, kind), valid SVG, deterministic bytes,
and (where a Chromium is installed) the drawings laid out by a real browser."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter

import pytest

import graphpeft
from graphpeft.cli.pictures import write_report_html
from graphpeft.engine.errors import GraphPeftError
from tests.models import tiny_bert_cls, tiny_llama

SVG = "{http://www.w3.org/2000/svg}"
V = 3   # virtual tokens

# method -> (config, {(rule, kind): (sites, parameters added)}), worked out from the tiny llama
# (hidden 32, 2 layers, 4 heads of 8, 4 key/value heads, intermediate 64):
CASES = {
    # q_proj, v_proj in 2 layers, each A [4, 32] + B [32, 4]
    "lora": (lambda: graphpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
             {("lora", "linear"): (4, 4 * (4 * 32 + 32 * 4))}),
    # k_proj, v_proj (output scaled: 32 each) and down_proj (input scaled: 64) in 2 layers
    "ia3": (lambda: graphpeft.IA3Config(), {("ia3", "linear"): (6, 2 * (32 + 32 + 64))}),
    # one prompt encoder [V, 2 * layers * hidden] and 2 attention sites that read it
    "prefix": (lambda: graphpeft.PrefixTuningConfig(num_virtual_tokens=V, task_type="CAUSAL_LM"),
               {("prefix_tuning", "prefix"): (1, V * 2 * 2 * 32), ("prefix_tuning", "sdpa"): (2, 0)}),
}


def _page(text: str) -> ET.Element:
    """The page parses as XML (it is written XHTML-compatible), DOCTYPE aside."""
    return ET.fromstring(text.replace("<!DOCTYPE html>", "", 1))


def _svgs(text: str) -> list[ET.Element]:
    return [ET.fromstring(s) for s in re.findall(r"<svg\b.*?</svg>", text, re.S)]


def _nodes(svg: ET.Element) -> list[tuple[str, set[str], str]]:
    """(fx node name, css classes, label text) of every drawn node."""
    out = []
    for g in svg.iter(f"{SVG}g"):
        classes = set(g.get("class", "").split())
        if "node" in classes:
            title = g.find(f"{SVG}title").text
            out.append((title, classes, " ".join(t.text or "" for t in g.iter(f"{SVG}text"))))
    return out


def _stamped(graph, rec) -> set[str]:
    """Nodes of ``graph`` stamped as inserted by ``rec``'s rule at its anchor (graph optimisations keep the stamp)."""
    return {n.name for n in graph.nodes if isinstance(n.meta.get("graphpeft"), dict)
            and n.meta["graphpeft"].get("anchor") == rec.anchor and n.meta["graphpeft"].get("rule") == rec.rule}


@pytest.fixture(scope="module", params=sorted(CASES))
def report(request, tmp_path_factory):
    config, expected = CASES[request.param]
    model = graphpeft.rewrite(tiny_llama(), config())
    path = write_report_html(model, tmp_path_factory.mktemp("report") / "report.html", title=f"{request.param} report",
                             layout="networkx")
    return request.param, model, expected, path.read_text(encoding="utf-8")


def test_summary_table_counts_sites_and_parameters(report):
    name, model, expected, text = report
    page = _page(text)
    rows = {(tr.get("data-rule"), tr.get("data-kind")): tr for tr in page.iter("tr")
            if tr.get("data-kind") is not None and tr.get("data-adapter") == "default"}
    assert set(rows) == set(expected)
    for key, (sites, params) in expected.items():
        cells = {td.get("class"): td.text for td in rows[key].iter("td")}
        assert int(cells["num sites"]) == sites, key
        assert int(cells["num params"].replace(",", "")) == params, key
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p for _, p in expected.values())          # every added parameter trains
    line = next(p for p in page.iter("p") if p.get("class") == "trainable")
    assert (int(line.get("data-trainable")), int(line.get("data-all"))) == (trainable, total)
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in line.text


def test_one_before_after_pair_per_rule_and_kind(report):
    name, model, expected, text = report
    page = _page(text)
    sections = [s for s in page.iter("section") if s.get("class") == "site"]
    assert Counter((s.get("data-rule"), s.get("data-kind")) for s in sections) == Counter(set(expected))
    for section in sections:
        figures = {f.get("class"): f.findall(f"{SVG}svg") for f in section.iter("figure")}
        assert sorted(figures) == ["after", "before"] and all(len(v) == 1 for v in figures.values())
    assert len(_svgs(text)) == 2 * len(expected)       # every drawing parses as XML on its own too


def test_after_drawing_shows_inserted_nodes_and_before_does_not(report):
    name, model, expected, text = report
    page = _page(text)
    first = {}
    for rec in model.records:
        first.setdefault((rec.rule, rec.kind), rec)
    base_names = {n.name for n in model._base_graph.nodes}
    for section in (s for s in page.iter("section") if s.get("class") == "site"):
        rec = first[(section.get("data-rule"), section.get("data-kind"))]
        stamped = _stamped(model.graph_module.graph, rec)
        drawn = {f.get("class"): _nodes(f.find(f"{SVG}svg")) for f in section.iter("figure")}
        before, after = drawn["before"], drawn["after"]
        inserted_after = {title for title, classes, _ in after if "inserted" in classes}
        assert inserted_after and inserted_after <= stamped, rec
        assert not any("inserted" in classes or title in stamped for title, classes, _ in before)
        assert {title for title, _, _ in before} <= base_names
        assert rec.anchor in {t for t, c, _ in before if "anchor" in c} & {t for t, c, _ in after if "anchor" in c}
        # the added parameters appear by name (lora_A, ia3_l, embedding ...) after, never before
        parts = [[p for p in attr.split(".") if p != rec.adapter] for attr in rec.params]
        leaves = {p[-2] if p[-1] in ("weight", "bias") else p[-1] for p in parts}
        after_labels = " | ".join(label for _, _, label in after)
        before_labels = " | ".join(label for _, _, label in before)
        for leaf in leaves:
            assert f"get_attr {leaf}" in after_labels and f"get_attr {leaf}" not in before_labels, (leaf, rec)


def test_same_inputs_give_byte_identical_html(tmp_path):
    paths = []
    for i in range(2):
        model = graphpeft.rewrite(tiny_llama(), CASES["lora"][0]())
        paths.append(write_report_html(model, tmp_path / f"report{i}.html", title="same", layout="networkx"))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    # self-contained: no script, stylesheet link, import or external reference (the svg namespace is only a name)
    assert re.search(rb'<script|<link|<img|@import|(?:src|href)="(?!#)|url\((?!#)', paths[0].read_bytes()) is None


@pytest.mark.parametrize("method", ["adalora", "prompt_tuning", "p_tuning", "multitask_prompt_tuning"])
def test_every_other_method_draws_its_sites(method, tmp_path):
    config = {
        "adalora": lambda: graphpeft.AdaLoraConfig(init_r=4, target_r=2, total_step=10),
        "prompt_tuning": lambda: graphpeft.PromptTuningConfig(num_virtual_tokens=V, task_type="CAUSAL_LM"),
        "p_tuning": lambda: graphpeft.PromptEncoderConfig(num_virtual_tokens=V, encoder_hidden_size=8,
                                                          task_type="CAUSAL_LM"),
        "multitask_prompt_tuning": lambda: graphpeft.MultitaskPromptTuningConfig(num_virtual_tokens=V, num_tasks=2,
                                                                                 task_type="CAUSAL_LM"),
    }[method]()
    model = graphpeft.rewrite(tiny_llama(), config)
    text = write_report_html(model, tmp_path / "report.html", layout="networkx").read_text()
    kinds = {(r.rule, r.kind) for r in model.records}
    svgs = _svgs(text)
    assert len(svgs) == 2 * len(kinds) and {r for r, _ in kinds} == {method}
    for before, after in zip(svgs[::2], svgs[1::2]):
        assert any("inserted" in c for _, c, _ in _nodes(after))
        assert not any("inserted" in c for _, c, _ in _nodes(before))


def test_modules_to_save_and_a_second_adapter_are_drawn(tmp_path):
    """A whole-module record (kind "module", no inserted node: its weights are retargeted) and an inactive
    adapter, whose nodes live in its parked graph, each get their pair of drawings."""
    model = graphpeft.rewrite(tiny_bert_cls(), graphpeft.LoraConfig(r=4, task_type="SEQ_CLS"))
    model.add_adapter("other", graphpeft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                   feedforward_modules=["output.dense"]))
    text = write_report_html(model, tmp_path / "report.html", layout="networkx").read_text()
    page = _page(text)
    sections = {(s.get("data-rule"), s.get("data-kind")): s for s in page.iter("section") if s.get("class") == "site"}
    assert set(sections) == {(r.rule, r.kind) for r in model.records}
    assert ("modules_to_save", "module") in sections and ("ia3", "linear") in sections
    module_after = _nodes(sections[("modules_to_save", "module")].find(f".//figure[@class='after']/{SVG}svg"))
    assert any("changed" in c and "modules_to_save" in label for _, c, label in module_after)
    ia3_after = _nodes(sections[("ia3", "linear")].find(f".//figure[@class='after']/{SVG}svg"))
    assert any("inserted" in c and "get_attr ia3_l" in label for _, c, label in ia3_after)
    adapters = {tr.get("data-adapter") for tr in page.iter("tr") if tr.get("data-kind")}
    assert adapters == {"default", "other"}


def test_bad_input_is_a_one_line_error(tmp_path):
    model = graphpeft.rewrite(tiny_llama(), CASES["ia3"][0]())
    with pytest.raises(GraphPeftError, match="pass the model returned by graphpeft.rewrite"):
        write_report_html(tiny_llama(), tmp_path / "r.html")
    with pytest.raises(GraphPeftError, match="cannot write the report"):
        write_report_html(model, tmp_path / "missing" / "r.html")
    with pytest.raises(GraphPeftError, match="unknown layout"):
        write_report_html(model, tmp_path / "r.html", layout="circo")
    with pytest.raises(GraphPeftError, match="pass hops >= 1"):
        write_report_html(model, tmp_path / "r.html", hops=0)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed (apt-get install graphviz)")
def test_graphviz_layout_keeps_classes_and_titles(report, tmp_path):
    name, model, expected, _ = report
    text = write_report_html(model, tmp_path / "report.html", layout="graphviz").read_text()
    svgs = _svgs(text)
    assert len(svgs) == 2 * len(expected) and all("graphviz" in s.get("class") for s in svgs)
    assert write_report_html(model, tmp_path / "again.html", layout="graphviz").read_text() == text   # deterministic
    for before, after in zip(svgs[::2], svgs[1::2]):
        assert any("inserted" in c for _, c, _ in _nodes(after)) and not any("inserted" in c for _, c, _ in _nodes(before))


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chromium-headless-shell",
                 "headless_shell"):
        if shutil.which(name):
            return shutil.which(name)
    try:
        from playwright.sync_api import sync_playwright
        with sync_playwright() as p:
            path = p.chromium.executable_path
        return path if path and os.path.exists(path) else None
    except Exception:       # playwright missing, or installed without a browser
        return None


# Injected into a copy of the page (the report itself has no script): each drawing's laid-out size and nodes.
_PROBE = """<script>
document.body.setAttribute('data-probe', JSON.stringify([...document.querySelectorAll('figure svg')].map(s => {
  const b = s.getBoundingClientRect();
  return [s.closest('figure').className, b.width, b.height, s.querySelectorAll('g.node').length,
          s.querySelectorAll('g.node.inserted').length,
          [...s.querySelectorAll('g.node')].filter(g => g.getBoundingClientRect().width > 0).length];
})));
</script></body>"""


@pytest.mark.skipif(_chromium() is None, reason="no Chromium found (chromium, chromium-headless-shell, google-chrome "
                    "or a playwright browser); apt-get install chromium-headless-shell")
def test_headless_chromium_lays_out_the_drawings(report, tmp_path):
    name, model, expected, text = report
    page = tmp_path / "probe.html"
    page.write_text(text.replace("</body>", _PROBE, 1), encoding="utf-8")
    run = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'data-probe="([^"]*)"', run.stdout)
    assert found, run.stderr[-2000:]
    probe = json.loads(html.unescape(found.group(1)))
    assert [p[0] for p in probe] == ["before", "after"] * len(expected)
    for side, width, height, nodes, inserted, visible in probe:
        assert width > 100 and height > 40 and nodes > 0 and visible == nodes, (side, width, height, nodes, visible)
        assert (inserted > 0) == (side == "after")
