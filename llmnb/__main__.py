"""Command line: `python -m llmnb run|assets|info` (also installed as `llmnb`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmnb", description="Run the llmnb notebooks and prepare their offline assets.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="execute the numbered notebooks with papermill and write a report")
    run_p.add_argument("--preset", default="auto", help="smoke, cpu, gpu or auto (gpu when CUDA is present, else cpu)")
    run_p.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 01,03")
    run_p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"), help="papermill parameter (repeatable)")
    run_p.add_argument("--out", type=Path, default=None, help="folder for executed notebooks and the report (default outputs/runs/<preset>)")
    assets_p = sub.add_parser("assets", help="install and prepare the offline corpus, tokenizer files and model")
    assets_p.add_argument("--no-model", action="store_true", help="skip the SmolLM2 conversion (~20 s, 540 MB)")
    sub.add_parser("info", help="print this machine's CPU, RAM, GPU, disk and library versions")
    args = parser.parse_args(argv)

    if args.command == "run":
        from .runner import parse_parameter, run

        params = {name: parse_parameter(value) for name, value in args.parameter}
        try:
            results, report = run(args.preset, [n for n in args.only.split(",") if n] or None, params, args.out)
        except (ValueError, FileNotFoundError) as exc:
            print(f"llmnb run: {exc}", file=sys.stderr)
            return 2
        print(f"report: {report}")
        failed = [r for r in results if r.status == "failed"]
        for r in failed:
            print(f"llmnb run: {r.name} failed at {r.error}", file=sys.stderr)
        return 1 if failed else 0
    if args.command == "assets":
        from .assets import AssetError, prepare_all
        from .data import CorpusError

        try:
            done = prepare_all(with_model=not args.no_model)
        except (AssetError, CorpusError) as exc:
            print(f"llmnb assets: {exc}", file=sys.stderr)
            return 1
        for name, what in done.items():
            print(f"{name}: {what}")
        return 0
    from .hardware import machine_info

    print(json.dumps(machine_info().as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
