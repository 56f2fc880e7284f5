"""Pictures of a rewrite: ``report.html``, a summary table and a before/after drawing per kind of site.

    from graphpeft.cli.pictures import write_report_html
    write_report_html(peft_model, "out/report.html", title="lora on my model")

The page is self-contained (inline CSS and SVG, no scripts, nothing fetched) and deterministic: the
same rewrite gives a byte-identical file. It holds

1. a summary: sites per (adapter, rule, op kind) with the parameters they added, parameters added per
   method, and PEFT's ``trainable params || all params || trainable%`` line;
2. for each (rule, kind) of rewritten site, its first site drawn twice: the neighbourhood of the anchor
   in the base graph (``peft_model._base_graph``) and the same neighbourhood in the rewritten graph,
   where the inserted nodes (``rec.inserted``) are highlighted:

       before:  x ─ linear ─ view          after:  x ─ linear ───────────────┬─ add ─ view
                                                   └ linear(lora_A) ─ linear(lora_B) ─ mul ┘

The neighbourhood is every base node within ``hops`` edges of the anchor (either direction), nearest
first, plus the record's inserted nodes; at most ``max_nodes`` are drawn. Layers are the topological
generations of that subgraph (networkx), ordered by a few barycenter sweeps; the SVG is written here.
Where Graphviz's ``dot`` is on PATH it lays the drawings out instead (``layout="auto"``).
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import networkx as nx
import torch.fx as fx

from graphpeft.engine.errors import GraphPeftError
from graphpeft.engine.match import STAMP, module_stack_entry
from graphpeft.engine.rewriter import REWRITTEN

LAYOUTS = ("auto", "networkx", "graphviz")
_ALIASES = {"scaled_dot_product_attention": "sdpa", "_scaled_dot_product_flash_attention": "sdpa"}
_DATA_OPS = ("placeholder", "get_attr", "output")


# -- what one drawing holds ---------------------------------------------------------------------

@dataclass
class Drawing:
    """Nodes (fx name -> label lines, css classes) and edges of one picture, in graph order."""

    nodes: dict[str, tuple[list[str], list[str], str]] = field(default_factory=dict)   # name -> (lines, classes, op)
    edges: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""


def _short_path(target: str, adapters: Iterable[str]) -> str:
    parts = [p for p in str(target).split(".") if p not in set(adapters)]
    if len(parts) >= 2 and parts[-1] in ("weight", "bias"):
        return ".".join(parts[-2:])
    return parts[-1] if parts else str(target)


def node_label(node: fx.Node, adapters: Iterable[str] = ()) -> list[str]:
    """The op of ``node``, shortened (``linear``, ``add``, ``get_attr lora_A.weight``), and its module's leaf name."""
    if node.op == "placeholder":
        return [f"input {node.target}"]
    if node.op == "output":
        return ["output"]
    if node.op == "get_attr":
        return [f"get_attr {_short_path(node.target, adapters)}"]
    if node.op == "call_module":
        op = f"module {_short_path(node.target, adapters)}"
    elif node.op == "call_method":
        op = str(node.target)
    else:
        target = node.target
        op = getattr(target, "_opname", None) or getattr(target, "__name__", None) or str(target)
    op = _ALIASES.get(op, op)
    path = module_stack_entry(node)[0]
    leaf = _short_path(path, adapters) if path else ""
    return [op, leaf] if leaf and not leaf.startswith("_") else [op]     # "_empty_nn_module_stack..." is export's


def _neighbours(node: fx.Node) -> list[fx.Node]:
    return [*node.all_input_nodes, *node.users]


def _distances(start: fx.Node, hops: int, free: frozenset = frozenset()) -> dict[str, int]:
    """Edges between ``start`` and each node within ``hops`` (either direction); entering a ``free`` node costs 0."""
    dist = {start.name: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for other in _neighbours(node):
            d = dist[node.name] + (0 if other.name in free else 1)
            if d <= hops and d < dist.get(other.name, hops + 1):
                dist[other.name] = d
                if d == dist[node.name]:
                    queue.appendleft(other)          # 0-1 breadth-first search: free steps first
                else:
                    queue.append(other)
    return dist


def record_nodes(graph: fx.Graph, rec: Any) -> list[str]:
    """Names of the nodes of ``graph`` that ``rec``'s rule inserted at its anchor, in graph order.

    Read from the stamps rather than ``rec.inserted`` alone: graphpeft's graph optimisations replace
    inserted nodes by fused ones, stamped with the same rule, adapter and anchor.
    """
    listed = set(rec.inserted)
    out = []
    for node in graph.nodes:
        stamp = node.meta.get(STAMP)
        if (isinstance(stamp, dict) and stamp.get("rule") == rec.rule and stamp.get("adapter") == rec.adapter
                and (stamp.get("anchor") == rec.anchor or node.name in listed)):
            out.append(node.name)
    return out


def _drawing(graph: fx.Graph, names: list[str], classes: dict[str, list[str]], adapters: Iterable[str]) -> Drawing:
    keep = set(names)
    drawing = Drawing()
    for node in graph.nodes:
        if node.name in keep:
            drawing.nodes[node.name] = (node_label(node, adapters), classes.get(node.name, []), node.op)
            for src in node.all_input_nodes:
                if src.name in keep and (src.name, node.name) not in drawing.edges:
                    drawing.edges.append((src.name, node.name))
    return drawing


def site_drawings(base: fx.Graph, after: fx.Graph, rec: Any, adapters: Iterable[str] = (),
                  hops: int = 2, max_nodes: int = 25) -> tuple[Drawing, Drawing]:
    """The (before, after) drawings of the neighbourhood of ``rec.anchor``."""
    base_nodes = {n.name: n for n in base.nodes}
    after_nodes = {n.name: n for n in after.nodes}
    order = {n.name: i for i, n in enumerate(after.nodes)}
    inserted = frozenset(record_nodes(after, rec))
    anchor_after = after_nodes.get(rec.anchor)
    near = _distances(anchor_after, hops, inserted) if anchor_after is not None else {}
    drawn_inserted = sorted(inserted, key=lambda n: (near.get(n, hops + 1), order[n]))[:max(max_nodes - 8, 1)]

    anchor_base = base_nodes.get(rec.anchor)
    base_order = {n.name: i for i, n in enumerate(base.nodes)}
    context: list[str] = []
    if anchor_base is not None:
        dist = _distances(anchor_base, hops)
        context = sorted(dist, key=lambda n: (dist[n], base_order[n]))[:max(max_nodes - len(drawn_inserted), 8)]

    def classes(node: Optional[fx.Node], name: str) -> list[str]:
        out = ["anchor"] if name == rec.anchor else []
        if name in inserted:
            out.append("inserted")
        elif node is not None and node.meta.get(REWRITTEN):
            out.append("changed")
        return out

    before = _drawing(base, context, {n: classes(None, n) for n in context}, adapters)
    after_names = [n for n in context if n in after_nodes and n not in inserted] + drawn_inserted
    after_d = _drawing(after, after_names, {n: classes(after_nodes[n], n) for n in after_names}, adapters)
    if anchor_base is None:
        before.note = f"anchor {rec.anchor} is not in the base graph"
    if anchor_after is None:
        after_d.note = f"anchor {rec.anchor} is not in the rewritten graph"
    if len(drawn_inserted) < len(inserted):
        after_d.note = f"{len(drawn_inserted)} of {len(inserted)} inserted nodes drawn"
    return before, after_d


# -- layout and SVG ----------------------------------------------------------------------------

CHAR_W, LINE_H, ROW_GAP, COL_GAP, MARGIN = 6.6, 14, 34, 14, 12


def _size(lines: list[str]) -> tuple[float, float]:
    return max(56.0, max(len(s) for s in lines) * CHAR_W + 18), 10.0 + LINE_H * len(lines)


def layered_layout(drawing: Drawing) -> dict[str, tuple[float, float]]:
    """Centre (x, y) of every node: topological generations as rows, barycenter-ordered within a row."""
    g = nx.DiGraph()
    g.add_nodes_from(drawing.nodes)
    g.add_edges_from(drawing.edges)
    index = {n: i for i, n in enumerate(drawing.nodes)}
    layer = {n: i for i, gen in enumerate(nx.topological_generations(g)) for n in gen}
    for n in drawing.nodes:                          # a source sits just above its first reader
        succ = [layer[s] for s in g.successors(n)]
        if g.in_degree(n) == 0 and succ:
            layer[n] = min(succ) - 1
    rows: dict[int, list[str]] = {}
    for n in sorted(drawing.nodes, key=lambda n: (layer[n], index[n])):
        rows.setdefault(layer[n], []).append(n)
    levels = sorted(rows)

    def rel(n: str) -> float:
        row = rows[layer[n]]
        return (row.index(n) + 0.5) / len(row)

    for sweep in range(4):                           # barycenter: down, up, down, up
        for lv in (levels if sweep % 2 == 0 else reversed(levels)):
            nbrs = g.predecessors if sweep % 2 == 0 else g.successors
            key = {}
            for n in rows[lv]:
                centre = [rel(m) for m in nbrs(n)]
                key[n] = (sum(centre) / len(centre) if centre else rel(n), index[n])
            rows[lv].sort(key=key.__getitem__)
    sizes = {n: _size(drawing.nodes[n][0]) for n in drawing.nodes}
    row_w = {lv: sum(sizes[n][0] for n in rows[lv]) + COL_GAP * (len(rows[lv]) - 1) for lv in levels}
    row_h = {lv: max(sizes[n][1] for n in rows[lv]) for lv in levels}
    width = max(row_w.values(), default=0)
    pos, y = {}, MARGIN
    for lv in levels:
        x = MARGIN + (width - row_w[lv]) / 2
        for n in rows[lv]:
            pos[n] = (x + sizes[n][0] / 2, y + row_h[lv] / 2)
            x += sizes[n][0] + COL_GAP
        y += row_h[lv] + ROW_GAP
    return pos


def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def svg_networkx(drawing: Drawing, svg_id: str, aria: str) -> str:
    """The drawing as an inline <svg>, laid out by ``layered_layout``."""
    pos = layered_layout(drawing)
    sizes = {n: _size(drawing.nodes[n][0]) for n in drawing.nodes}
    width = max((pos[n][0] + sizes[n][0] / 2 for n in pos), default=200) + MARGIN
    height = max((pos[n][1] + sizes[n][1] / 2 for n in pos), default=0) + MARGIN + (LINE_H + 4 if drawing.note else 0)
    width = max(width, len(drawing.note) * CHAR_W + 2 * MARGIN)
    marker = f"arrow-{svg_id}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph nx" id="{svg_id}" viewBox="0 0 {_f(width)} {_f(height)}" '
           f'width="{_f(width)}" height="{_f(height)}" role="img" aria-label="{html.escape(aria)}">',
           f'<defs><marker id="{marker}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           f'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead"/></marker></defs>']
    for src, dst in drawing.edges:
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        y1, y2 = y1 + sizes[src][1] / 2, y2 - sizes[dst][1] / 2
        mid = (y1 + y2) / 2
        out.append(f'<path class="edge" d="M {_f(x1)} {_f(y1)} C {_f(x1)} {_f(mid)} {_f(x2)} {_f(mid)} {_f(x2)} {_f(y2)}" '
                   f'marker-end="url(#{marker})"/>')
    for name, (lines, classes, op) in drawing.nodes.items():
        (x, y), (w, h) = pos[name], sizes[name]
        out.append(f'<g class="{" ".join(["node", *classes])}"><title>{html.escape(name)}</title>')
        if op in _DATA_OPS:
            out.append(f'<ellipse cx="{_f(x)}" cy="{_f(y)}" rx="{_f(w / 2)}" ry="{_f(h / 2)}"/>')
        else:
            out.append(f'<rect x="{_f(x - w / 2)}" y="{_f(y - h / 2)}" width="{_f(w)}" height="{_f(h)}" rx="5"/>')
        top = y - LINE_H * (len(lines) - 1) / 2
        for i, line in enumerate(lines):
            cls = ' class="sub"' if i else ""
            out.append(f'<text x="{_f(x)}" y="{_f(top + i * LINE_H)}"{cls}>{html.escape(line)}</text>')
        out.append("</g>")
    if drawing.note:
        out.append(f'<text class="note" x="{MARGIN}" y="{_f(height - MARGIN)}">{html.escape(drawing.note)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def svg_graphviz(drawing: Drawing, svg_id: str, aria: str, dot: str) -> str:
    """The drawing laid out by Graphviz ``dot -Tsvg`` (classes and titles kept), XML prolog and comments removed."""
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"digraph {q(svg_id)} {{", 'node [shape=box style="rounded" fontname="monospace" fontsize=10];']
    for name, (label, classes, op) in drawing.nodes.items():
        shape = " shape=ellipse" if op in _DATA_OPS else ""
        lines.append(f'{q(name)} [label={q(chr(10).join(label))} class={q(" ".join(classes))}{shape}];')
    lines += [f"{q(a)} -> {q(b)};" for a, b in drawing.edges]
    if drawing.note:
        lines.append(f"label={q(drawing.note)};")
    lines.append("}")
    svg = subprocess.run([dot, "-Tsvg"], input="\n".join(lines), capture_output=True, text=True, check=True,
                         timeout=60).stdout
    svg = re.sub(r"<\?xml.*?\?>|<!DOCTYPE.*?>|<!--.*?-->", "", svg, flags=re.S).strip()
    return svg.replace("<svg ", f'<svg class="graph graphviz" id="{svg_id}" aria-label="{html.escape(aria)}" ', 1)


def render_svg(drawing: Drawing, svg_id: str, aria: str = "", layout: str = "auto") -> str:
    if layout not in LAYOUTS:
        raise GraphPeftError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    dot = shutil.which("dot") if layout in ("auto", "graphviz") else None
    if layout == "graphviz" and dot is None:
        raise GraphPeftError("layout 'graphviz' needs Graphviz's dot on PATH; install graphviz or use layout='networkx'")
    if dot is not None:
        try:
            return svg_graphviz(drawing, svg_id, aria, dot)
        except (OSError, subprocess.SubprocessError):
            if layout == "graphviz":
                raise
    return svg_networkx(drawing, svg_id, aria)


# -- the page ------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em;color:#1d2630;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}h3{font-size:1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #c8d0d8;padding:.25em .7em;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}tfoot td{font-weight:600}
code{font-size:.92em}.pair{display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap}
figure{margin:0;border:1px solid #dde3e8;border-radius:6px;padding:.5em;overflow-x:auto;max-width:100%}
figcaption{font-weight:600;margin-bottom:.3em}svg.graph{max-width:100%;height:auto}
svg.nx text{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px;text-anchor:middle;dominant-baseline:middle;fill:#1d2630}
svg.nx text.sub{fill:#66727e;font-size:10px}svg.nx text.note{text-anchor:start;fill:#8a5a00}
svg.graph .node :is(rect,ellipse,path,polygon){fill:#f3f5f7;stroke:#7a8794;stroke-width:1}
svg.graph .node.inserted :is(rect,ellipse,path,polygon){fill:#ffe2b8;stroke:#d9822b;stroke-width:1.5}
svg.graph .node.changed :is(rect,ellipse,path,polygon){stroke:#d9822b;stroke-dasharray:4 2;stroke-width:1.5}
svg.graph .node.anchor :is(rect,ellipse,path,polygon){stroke:#1f5fbf;stroke-width:2.5}
svg.graph .edge{fill:none;stroke:#8795a1;stroke-width:1.2}svg.graph .arrowhead{fill:#8795a1}
.legend span{display:inline-block;padding:0 .5em;margin-right:.6em;border-radius:4px;border:1px solid #7a8794;background:#f3f5f7}
.legend .inserted{background:#ffe2b8;border-color:#d9822b}.legend .anchor{border:2.5px solid #1f5fbf}
.legend .changed{border:1.5px dashed #d9822b}
"""


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _unique_params(records: Iterable[Any]) -> dict[str, tuple[int, ...]]:
    """Attribute -> shape over ``records``; a parameter shared by two sites counts once."""
    out: dict[str, tuple[int, ...]] = {}
    for rec in records:
        out.update(rec.params)
    return out


def _adapter_graph(peft_model: Any, adapter: str) -> Optional[fx.Graph]:
    """The rewritten graph that holds ``adapter``'s nodes: the active one, or the parked graph of another."""
    if adapter == getattr(peft_model, "active_adapter", adapter):
        return peft_model.graph_module.graph
    parked = getattr(peft_model, "_parked", {}).get(adapter)
    return parked[0] if parked else None


def _e(value: Any) -> str:
    return html.escape(str(value))


def _summary(peft_model: Any) -> list[str]:
    records = list(peft_model.records)
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for rec in records:
        groups.setdefault((rec.adapter, rec.rule, rec.kind), []).append(rec)
    out = ['<h2>Summary</h2>', '<table class="summary sites"><thead><tr><th>adapter</th><th>rule</th><th>op kind</th>'
           '<th class="num">sites</th><th class="num">parameters added</th></tr></thead><tbody>']
    for (adapter, rule, kind), recs in groups.items():
        n_params = sum(_numel(s) for s in _unique_params(recs).values())
        out.append(f'<tr data-adapter="{_e(adapter)}" data-rule="{_e(rule)}" data-kind="{_e(kind)}"><td>{_e(adapter)}</td>'
                   f'<td>{_e(rule)}</td><td>{_e(kind)}</td><td class="num sites">{len(recs)}</td>'
                   f'<td class="num params">{n_params:,d}</td></tr>')
    out.append(f'</tbody><tfoot><tr><td colspan="3">all</td><td class="num sites">{len(records)}</td>'
               f'<td class="num params">{sum(_numel(s) for s in _unique_params(records).values()):,d}</td></tr></tfoot></table>')

    methods: dict[tuple[str, str], list[Any]] = {}
    for rec in records:
        methods.setdefault((rec.adapter, rec.rule), []).append(rec)
    out.append('<table class="summary methods"><thead><tr><th>adapter</th><th>method (rule)</th>'
               '<th class="num">parameter tensors</th><th class="num">parameters added</th></tr></thead><tbody>')
    for (adapter, rule), recs in methods.items():
        params = _unique_params(recs)
        out.append(f'<tr data-adapter="{_e(adapter)}" data-rule="{_e(rule)}"><td>{_e(adapter)}</td><td>{_e(rule)}</td>'
                   f'<td class="num tensors">{len(params)}</td>'
                   f'<td class="num params">{sum(_numel(s) for s in params.values()):,d}</td></tr>')
    out.append("</tbody></table>")
    if hasattr(peft_model, "get_nb_trainable_parameters"):
        trainable, total = peft_model.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        out.append(f'<p class="trainable" data-trainable="{trainable}" data-all="{total}">trainable params: '
                   f'{trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}</p>')
    return out


def _sites_table(records: list[Any]) -> list[str]:
    out = [f'<details><summary>All {len(records)} rewritten sites</summary><table class="records"><thead><tr>'
           '<th>adapter</th><th>rule</th><th>op kind</th><th>module path</th><th>anchor</th>'
           '<th class="num">inserted nodes</th><th>parameters added</th></tr></thead><tbody>']
    for rec in records:
        params = ", ".join(f"{_e(a)} {list(s)}" for a, s in rec.params.items())
        out.append(f"<tr><td>{_e(rec.adapter)}</td><td>{_e(rec.rule)}</td><td>{_e(rec.kind)}</td>"
                   f"<td><code>{_e(rec.module_path)}</code></td><td><code>{_e(rec.anchor)}</code></td>"
                   f'<td class="num">{len(rec.inserted)}</td><td><code>{params}</code></td></tr>')
    out.append("</tbody></table></details>")
    return out


def report_html(peft_model: Any, title: str = "graphpeft rewrite report", hops: int = 2, max_nodes: int = 25,
                layout: str = "auto") -> str:
    """The report page as a string (see the module docstring)."""
    if not hasattr(peft_model, "records") or not isinstance(getattr(peft_model, "_base_graph", None), fx.Graph):
        raise GraphPeftError(f"cannot draw a {type(peft_model).__name__}: pass the model returned by graphpeft.rewrite")
    if layout not in LAYOUTS:
        raise GraphPeftError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if not (isinstance(hops, int) and hops >= 1 and isinstance(max_nodes, int) and max_nodes >= 10):
        raise GraphPeftError(f"hops={hops!r}, max_nodes={max_nodes!r} cannot be drawn; pass hops >= 1 and max_nodes >= 10")
    records = list(peft_model.records)
    adapters = sorted(getattr(peft_model, "peft_config", {}) or {"default"})
    configs = getattr(peft_model, "peft_config", {}) or {}
    out = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8"/>',
           '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
           f'<title>{_e(title)}</title><style>{CSS}</style></head><body>', f'<h1>{_e(title)}</h1>']
    model_cls = getattr(getattr(peft_model, "capture_info", None), "model_class", None)
    facts = [f"adapter <code>{_e(a)}</code>: {_e(type(configs[a]).__name__)}" for a in configs]
    if model_cls:
        facts.insert(0, f"model: <code>{_e(model_cls)}</code>")
    if getattr(peft_model, "active_adapter", None) is not None:
        facts.append(f"active adapter: <code>{_e(peft_model.active_adapter)}</code>")
    out.append(f'<p class="facts">{" · ".join(facts)}</p>')
    out += _summary(peft_model)
    out += ['<h2>Rewritten sites, by kind</h2>',
            '<p class="legend"><span class="anchor">anchor</span><span class="inserted">inserted node</span>'
            '<span class="changed">node the rewrite changed</span>ellipses: inputs, parameters, output; '
            f'neighbourhood: {hops} hops around the anchor, at most {max_nodes} nodes. Hover a node for its name.</p>']
    examples: dict[tuple[str, str], Any] = {}
    counts = Counter((rec.rule, rec.kind) for rec in records)
    for rec in records:
        examples.setdefault((rec.rule, rec.kind), rec)
    base = peft_model._base_graph
    for i, ((rule, kind), rec) in enumerate(examples.items()):
        after = _adapter_graph(peft_model, rec.adapter)
        before_d, after_d = site_drawings(base, after if after is not None else fx.Graph(), rec, adapters, hops, max_nodes)
        if after is None:
            after_d.note = f"adapter {rec.adapter}'s graph is not available"
        what = f"{rule} {kind} site {rec.module_path}"
        out.append(f'<section class="site" data-rule="{_e(rule)}" data-kind="{_e(kind)}" data-anchor="{_e(rec.anchor)}">'
                   f'<h3>{_e(rule)} · {_e(kind)} — <code>{_e(rec.module_path)}</code> '
                   f'(adapter <code>{_e(rec.adapter)}</code>; 1 of {counts[(rule, kind)]} such sites; '
                   f'{len(rec.inserted)} nodes inserted by the rule)</h3><div class="pair">')
        for side, drawing in (("before", before_d), ("after", after_d)):
            svg = render_svg(drawing, f"site{i}-{side}", f"{what}, {side}", layout)
            out.append(f'<figure class="{side}"><figcaption>{side}</figcaption>\n{svg}\n</figure>')
        out.append("</div></section>")
    if not records:
        out.append("<p>No site was rewritten.</p>")
    out += _sites_table(records)
    out.append("</body></html>\n")
    return "\n".join(out)


def write_report_html(peft_model: Any, path: Any, title: str = "graphpeft rewrite report", hops: int = 2,
                      max_nodes: int = 25, layout: str = "auto") -> Path:
    """Write ``report_html(peft_model, ...)`` to ``path`` (UTF-8); returns the path written."""
    text = report_html(peft_model, title=title, hops=hops, max_nodes=max_nodes, layout=layout)
    path = Path(path)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise GraphPeftError(f"cannot write the report to {path}: {exc.strerror or exc}; choose a writable path") from exc
    return path
