"""`python -m report DIR... [--out DIR]`: the seed's plotData notebook as a command.

For any folder of runs (one run folder included): summary.csv, summary.md and the PNG plots: where each
epoch goes, the data wait over an epoch, throughput, accuracy, and -- when there is something to draw --
AU against an emulated accelerator's rate (au_vs_rate.png) and the data path's time per stage
(stage_times.png, from the loaders' stage times in run.json).
"""

from __future__ import annotations

from pathlib import Path

from feedrate.errors import CliParser, run_cli
from report import plots, summary
from report.runs import find_runs


def build_report(inputs: list[Path], out: Path) -> list[Path]:
    """Write the summary and plots for every run under `inputs` into `out`; return the files."""
    runs = find_runs(inputs)
    table = summary.rows(runs)
    sweep = summary.emulation_pass_line(runs)
    out.mkdir(parents=True, exist_ok=True)
    summary.write_csv(table, out / "summary.csv")
    summary.write_markdown(table, sweep, out / "summary.md")
    optional = [
        plots.au_vs_rate(runs, out / "au_vs_rate.png"),
        plots.stage_times(runs, out / "stage_times.png"),
    ]
    for name in ("au_vs_rate.png", "stage_times.png"):  # one not drawn this time must not linger
        if out / name not in optional:
            (out / name).unlink(missing_ok=True)
    return [
        out / "summary.csv",
        out / "summary.md",
        plots.loading_vs_compute(table, out / "loading_vs_compute.png"),
        plots.cumulative_loading(runs, out / "cumulative_loading.png"),
        plots.throughput(table, out / "throughput.png"),
        plots.accuracy(runs, out / "accuracy.png"),
        *(f for f in optional if f is not None),
    ]


def main(argv: list[str] | None = None) -> None:
    p = CliParser(prog="report", description=__doc__)
    p.add_argument("inputs", nargs="+", type=Path, help="run folders or folders of runs")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the first input)")

    def body() -> None:
        args = p.parse_args(argv)
        out = args.out or (args.inputs[0] if args.inputs[0].is_dir() else args.inputs[0].parent)
        files = build_report(args.inputs, out)
        print((out / "summary.md").read_text())
        print("wrote " + ", ".join(str(f) for f in files))

    run_cli("report", body)


if __name__ == "__main__":
    main()
