#!/usr/bin/env python3
"""csvsum: print a per-column summary of a CSV file.

Numeric columns get count / min / max / mean; text columns get the number
of distinct values and the most common one.

Usage:
    csvsum data.csv
    csvsum --delimiter ';' --columns price,qty sales.csv
"""
import argparse
import csv
import statistics
import sys
from collections import Counter


def parse_number(text):
    """Return a float for numeric-looking text, or None."""
    text = text.strip().replace(",", "")
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def summarise_column(values):
    numbers = [parse_number(v) for v in values]
    present = [n for n in numbers if n is not None]
    blanks = sum(1 for v in values if not v.strip())
    # Treat a column as numeric if nearly every non-blank cell parses.
    if present and len(present) >= 0.9 * (len(values) - blanks):
        return {
            "kind": "number",
            "count": len(present),
            "min": min(present),
            "max": max(present),
            "mean": statistics.fmean(present),
        }
    counts = Counter(v for v in values if v.strip())
    top, top_n = counts.most_common(1)[0] if counts else ("", 0)
    return {"kind": "text", "distinct": len(counts), "top": top, "top_n": top_n}


def summarise(stream, delimiter=",", wanted=None):
    reader = csv.DictReader(stream, delimiter=delimiter)
    columns = {name: [] for name in reader.fieldnames or []}
    for row in reader:
        for name in columns:
            columns[name].append(row.get(name) or "")
    if wanted:
        missing = [w for w in wanted if w not in columns]
        if missing:
            raise SystemExit(f"unknown column(s): {', '.join(missing)}")
        columns = {w: columns[w] for w in wanted}
    return {name: summarise_column(vals) for name, vals in columns.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="csvsum", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="CSV file, or - for stdin")
    parser.add_argument("-d", "--delimiter", default=",")
    parser.add_argument("-c", "--columns", help="comma-separated subset of columns")
    args = parser.parse_args(argv)

    wanted = args.columns.split(",") if args.columns else None
    if args.path == "-":
        report = summarise(sys.stdin, args.delimiter, wanted)
    else:
        with open(args.path, newline="", encoding="utf-8") as fh:
            report = summarise(fh, args.delimiter, wanted)

    for name, info in report.items():
        if info["kind"] == "number":
            print(f"{name:<16} n={info['count']:<6} min={info['min']:<10g} "
                  f"max={info['max']:<10g} mean={info['mean']:.3f}")
        else:
            print(f"{name:<16} distinct={info['distinct']:<6} "
                  f"top={info['top']!r} ({info['top_n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
