"""What ``rkv-flex check`` costs on the bundled SmolLM2: wall time of the command in a fresh process with an empty
inductor cache, then again with that cache warm, and the report each run printed.

    python bench/check_cost.py            # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_check(cache_dir: str, out: Path, options: list[str]) -> dict:
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache_dir}
    start = time.perf_counter()
    command = [sys.executable, "-m", "rkv_flex.cli", "check", "--json", str(out), *options]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise RuntimeError(done.stderr[-3000:])
    report = json.loads(out.read_text())
    printed = [line for line in done.stdout.splitlines() if line.startswith(("rkv_flex check", "  "))]
    return {
        "wall_s": wall,
        "check_s": report["seconds"],
        "exit_code": done.returncode,
        "report": report,
        "printed": printed,
    }


def markdown(result: dict) -> str:
    lines = [
        f"`rkv-flex check {' '.join(result['options'])}` on the bundled SmolLM2-135M (fp32, 2 CPU cores):",
        "",
        "| inductor cache | whole command (s) | the check itself (s) | compression running | compiled = eager |",
        "|---|---|---|---|---|",
    ]
    for name in ("cold", "warm"):
        run = result[name]
        report = run["report"]
        lines.append(
            f"| {name} | {run['wall_s']:.1f} | {run['check_s']:.1f} | {report['compressing']} | "
            f"{report['compiled_equals_eager']} |"
        )
    lines += ["", "What the cold run printed:", "", "```text", *result["cold"]["printed"], "```"]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2))
    names = ["cold", "warm"]
    axis.bar(names, [result[n]["wall_s"] for n in names], label="whole command")
    axis.bar(names, [result[n]["check_s"] for n in names], label="the check itself")
    axis.set_ylabel("seconds")
    axis.set_title("rkv-flex check on SmolLM2-135M")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="check-smollm2")
    parser.add_argument("options", nargs="*", default=[], help="options passed to rkv-flex check")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from common import environment, publish

    result = {"environment": environment(), "options": args.options}
    with tempfile.TemporaryDirectory() as cache:
        for name in ("cold", "warm"):
            result[name] = run_check(cache, Path(cache) / f"{name}.json", args.options)
            print(name, f"{result[name]['wall_s']:.1f} s", flush=True)
    result["command"] = "python bench/check_cost.py"
    publish(args.out, result, markdown, plot)


if __name__ == "__main__":
    main()
