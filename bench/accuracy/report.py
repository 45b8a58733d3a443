"""Summary of evaluate.py's rows: pooled accuracy per length and setting, the table, and the goal check
(kvd within 1 point of full attention while retrieving <= 2% of the offloaded keys, at every length where full
attention succeeds). The window-only control (top_k 0) says whether the tasks need retrieval at all: where it
is as accurate as full attention, matching full attention says nothing about kvd's retrieval. |dlogp| is the
mean absolute difference of the answer tokens' log-probabilities from full attention's."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

MAX_RETRIEVED = 0.02
MAX_DROP = 0.01


def _key(row: dict[str, Any]) -> tuple:
    if row["mode"] == "full":
        return (row["length"], "full", "", 0, 0, 0)
    return (row["length"], "kvd", row["kind"], row["sink"], row["window"], row["top_k"])


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (length, setting): accuracy pooled over the tasks' answers, and per task."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_key(row)].append(row)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1] != "full", k[2], k[3], k[4], k[5])):
        part = groups[key]
        answers = sum(r["answers"] for r in part)
        entry: dict[str, Any] = {"length": key[0], "mode": key[1], "kind": key[2], "sink": key[3],
                                 "window": key[4], "top_k": key[5], "answers": answers,
                                 "accuracy": round(sum(r["correct"] for r in part) / max(1, answers), 4),
                                 "per_task": {r["task"]: r["accuracy"] for r in part}}
        if key[1] == "kvd":  # full attention on the same items
            full_correct = sum(r.get("full_correct", round(r["full_accuracy"] * r["answers"])) for r in part)
            entry["full_accuracy"] = round(full_correct / max(1, answers), 4)
            entry["agreement"] = round(sum(r["agreement"] * r["answers"] for r in part) / max(1, answers), 4)
            entry["logp_err"] = round(sum(r.get("logp_err", 0.0) * r["answers"] for r in part) / max(1, answers), 4)
            entry["retrieved"] = round(max(r["retrieved"] for r in part), 5)
            entry["offloaded"] = round(sum(r["offloaded"] for r in part) / len(part), 1)
            entry["index_share"] = min(r["index_share"] for r in part)
        out.append(entry)
    return out


def table(summary: list[dict[str, Any]]) -> str:
    tasks = sorted({t for e in summary for t in e["per_task"]})
    head = ["length", "setting", *tasks, "all", "vs full", "agree", "|dlogp|", "retrieved %", "index"]
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for e in summary:
        setting = "full attention" if e["mode"] == "full" else \
            f"kvd {e['kind']} s{e['sink']} w{e['window']}" + (f" k{e['top_k']}" if e["top_k"] else "")
        cells = [str(e["length"]), setting]
        cells += [f"{100 * e['per_task'][t]:.1f}" if t in e["per_task"] else "" for t in tasks]
        cells.append(f"{100 * e['accuracy']:.1f}")
        if e["mode"] == "kvd":
            cells += [f"{100 * (e['accuracy'] - e.get('full_accuracy', 0)):+.1f}", f"{100 * e['agreement']:.1f}",
                      f"{e['logp_err']:.3f}", f"{100 * e['retrieved']:.2f}", f"{e['index_share']:.2f}"]
        else:
            cells += ["", "", "", "", ""]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def goal_lines(summary: list[dict[str, Any]], top_k: int, sink: int, window: int, success: float) -> list[str]:
    """Per length where full attention succeeds and the window-only control does not already match it: each
    kind at the main setting against the goal."""
    lines = []
    met_all = True
    checked = judged = 0
    for e_full in (e for e in summary if e["mode"] == "full"):
        length, full_acc = e_full["length"], e_full["accuracy"]
        if full_acc < success:
            lines.append(f"goal @ {length}: full attention {100 * full_acc:.1f}% < {100 * success:.0f}%: not judged")
            continue
        at = [e for e in summary if e["mode"] == "kvd" and e["length"] == length and e["sink"] == sink
              and e["window"] == window]
        control = [e for e in at if e["top_k"] == 0]
        if control and control[0]["accuracy"] >= control[0]["full_accuracy"] - MAX_DROP:
            lines.append(f"goal @ {length}: full {100 * full_acc:.1f}%, but the window-only control (no retrieval) "
                         f"already {100 * control[0]['accuracy']:.1f}%: the tasks do not test retrieval here, "
                         "not judged")
            continue
        parts = [f"window-only control {100 * e['accuracy']:.1f}%" for e in control]
        mains = [e for e in at if e["top_k"] == top_k]
        if not mains:
            lines.append(f"goal @ {length}: full {100 * full_acc:.1f}%; no kvd run at the main setting")
            continue
        for e in mains:
            ok = e["accuracy"] >= e["full_accuracy"] - MAX_DROP and e["retrieved"] <= MAX_RETRIEVED
            met_all &= ok
            checked += 1
            verdict = "met" if ok else "NOT met"
            parts.append(f"{e['kind']} {100 * e['accuracy']:.1f}% (full {100 * e['full_accuracy']:.1f}% on its "
                         f"{e['answers']} answers) at {100 * e['retrieved']:.2f}% retrieved ({verdict})")
        judged += 1
        lines.append(f"goal @ {length}: full {100 * full_acc:.1f}%; " + "; ".join(parts))
    tasks = sorted({t for e in summary for t in e["per_task"]})
    lines.append(f"goal (kvd within {100 * MAX_DROP:.0f} point of full attention at <= {100 * MAX_RETRIEVED:.0f}% "
                 f"retrieved, k={top_k} sink {sink} window {window}; tasks {', '.join(tasks)}): "
                 + (f"met at the {judged} length(s) judged" if met_all and checked
                    else "NOT MET" if checked else "nothing judged"))
    return lines
