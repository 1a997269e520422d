"""Render the README's benchmark tables from benchmarks/results/*.json (no figure typed by hand).

    python -m benchmarks report            # print the tables
    python -m benchmarks report --write    # replace the block between the markers in README.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import REPO, RESULTS
from hiera_perception.atomic import atomic_write_text

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--write", action="store_true", help="update README.md in place")
    p.add_argument("--results", default=str(RESULTS))


def _machine(m: dict) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    return f"{m.get('cpu', '?')} ({m.get('cores')} cores, {m.get('torch_threads')} torch threads){gpu}, torch {m.get('torch')}, {m.get('date', '')[:10]}"


def _speed_table(res: dict, title: str) -> list[str]:
    lines = [f"**{title}** — {res['device']} {res['precision']}; {_machine(res['machine'])}", "",
             "| config | batch | ours ms (p10–p90) | official ms (p10–p90) | speed-up | ours clips/s |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        o, f = r["ours"], r["official"]
        rate = r["batch"] * 1e3 / o["median_ms"]
        lines.append(f"| {r['config']} | {r['batch']} | {o['median_ms']:.1f} ({o['p10_ms']:.1f}–{o['p90_ms']:.1f}) | "
                     f"{f['median_ms']:.1f} ({f['p10_ms']:.1f}–{f['p90_ms']:.1f}) | **{r['speedup_vs_official']:.2f}x** | "
                     f"{rate:.1f} |")
    return lines + [""]


def _generic_table(res: dict) -> list[str]:
    """Benchmarks other than ours-vs-official give `table`: {"columns": [...], "rows": [[...], ...]}."""
    t = res["table"]
    lines = [f"**{res.get('title', res['benchmark'])}** — {_machine(res['machine'])}", "",
             "| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in t["rows"]]
    return lines + [""]


def render(folder: Path) -> str:
    out = []
    for path in sorted(folder.glob("*.json")):
        res = json.loads(path.read_text())
        name = res.get("benchmark", path.stem)
        if name.startswith("encoder_"):
            out += _speed_table(res, "Encoder forward")
        elif name.startswith("mae_step_"):
            out += _speed_table(res, "MAE training step (forward + backward + AdamW, mask 0.9)")
        elif "table" in res:
            out += _generic_table(res)
        out.append(f"<sub>from `benchmarks/results/{path.name}`</sub>")
        out.append("")
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
