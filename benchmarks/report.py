"""Render the README's benchmark tables from benchmarks/results/*.json and */*.json (no figure typed by hand).

    python -m benchmarks report            # print the tables
    python -m benchmarks report --write    # replace the block between the markers in README.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import REPO, RESULTS, summary
from hiera_perception.atomic import atomic_write_text

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--write", action="store_true", help="update README.md in place")
    p.add_argument("--results", default=str(RESULTS))


def _machine(m: dict) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return f"{m.get('cpu', '?')} ({m.get('cores')} cores, {m.get('torch_threads')} torch threads){gpu}, torch {m.get('torch')}, {m.get('date', '')[:10]}"


VARIANTS = {"ours_graph": "ours, CUDA graph", "ours_compiled": "ours, torch.compile"}


def _spread(s: dict) -> str:
    """median (p10–p90), recomputed from the raw samples where the file has them: files written before
    summary() took the inclusive quantiles stored ranges that reached past their samples."""
    if s.get("samples_ms"):
        s = summary(s["samples_ms"])
    return f"{s['median_ms']:.1f} ({s['p10_ms']:.1f}–{s['p90_ms']:.1f})"


def _speed_table(res: dict, title: str) -> list[str]:
    extra = [k for k in VARIANTS if any(k in r for r in res["rows"])]
    cols = ["config", "batch", "ours ms (p10–p90)", "official ms (p10–p90)", "speed-up", "ours clips/s"]
    cols += [f"{VARIANTS[k]} ms (speed-up)" for k in extra]
    lines = [f"**{title}** — {res['device']} {res['precision']}; {_machine(res['machine'])}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        o, f = r["ours"], r["official"]
        rate = r["batch"] * 1e3 / o["median_ms"]
        cells = [r["config"], r["batch"], _spread(o), _spread(f), f"**{r['speedup_vs_official']:.2f}x**", f"{rate:.1f}"]
        cells += [f"{r[k]['median_ms']:.1f} ({r[f'speedup_{k}_vs_official']:.2f}x)" if k in r else "–"
                  for k in extra]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines + [""]


def _generic_table(results: list[tuple[str, dict]]) -> list[str]:
    """Benchmarks other than ours-vs-official give `table`: {"columns": [...], "rows": [[...], ...]}. Files of one
    kind on one machine share a table, a row per file."""
    res = results[0][1]
    t = res["table"]
    lines = [f"**{res.get('title', res['benchmark'])}** — {_machine(res['machine'])}", "",
             "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for _, r in results for row in r["table"]["rows"]]
    return lines + [""]


SPEED_TITLES = {"encoder_": "Encoder forward", "mae_step_": "MAE training step (forward + backward + AdamW, mask 0.9)"}


def render(folder: Path) -> str:
    # Blocks in file order: a speed table per file; table files of one kind on one machine share a block.
    # A subfolder holds another machine's set (benchmarks/results/h200/): its blocks follow the top level's.
    blocks: dict[tuple, list[tuple[str, dict]]] = {}
    folder = folder.resolve()
    shown = folder.relative_to(REPO).as_posix() if folder.is_relative_to(REPO) else str(folder)  # in the captions
    for path in sorted(folder.glob("*.json")) + sorted(folder.glob("*/*.json")):
        rel = path.relative_to(folder).as_posix()
        try:
            res = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: not a results file: {e}") from None
        name = res.get("benchmark", path.stem)
        if name.startswith(tuple(SPEED_TITLES)) or "table" in res:
            m = res["machine"]
            key = ((rel,) if name.startswith(tuple(SPEED_TITLES)) else
                   (res.get("title", name), tuple(res["table"]["columns"]), m.get("cpu"), m.get("gpu"), m.get("torch")))
            blocks.setdefault(key, []).append((rel, res))
    out = []
    for items in blocks.values():
        name, res = items[0][1].get("benchmark", items[0][0]), items[0][1]
        title = next((t for prefix, t in SPEED_TITLES.items() if name.startswith(prefix)), None)
        out += _speed_table(res, title) if title else _generic_table(items)
        out += ["<sub>from " + ", ".join(f"`{shown}/{n}`" for n, _ in items) + "</sub>", ""]
    return "\n".join(out).rstrip() + "\n"


def main(args) -> None:
    text = render(Path(args.results))
    if not args.write:
        print(text)
        return
    readme = REPO / "README.md"
    body = readme.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{readme} has no {START} ... {END} block")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(readme, f"{head}{START}\n{text}{END}{tail}")
    print(f"updated {readme}")
