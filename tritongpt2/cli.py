"""The `tritongpt2` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _audit_compile(args: argparse.Namespace) -> int:
    from tritongpt2.bench.compile_audit import markdown_table, run_compile_audit
    from tritongpt2.bench.model_shapes import model_shape

    shapes = [model_shape(name) for name in args.models]
    results = run_compile_audit(shapes, archs=args.arch, dtypes=args.dtypes)
    table = markdown_table(results)
    print(table)
    if args.json:
        rows = [{k: v for k, v in vars(r).items() if k != "cubin"} for r in results]
        Path(args.json).write_text(json.dumps({"models": args.models, "results": rows}, indent=1))
    if args.dump:
        folder = Path(args.dump)
        folder.mkdir(parents=True, exist_ok=True)
        for r in results:
            if r.cubin is not None:
                name = f"{r.kernel}-{r.config}-{r.arch}-{r.dtype}".replace("=", "").replace(",", "-")
                (folder / f"{name}.cubin").write_bytes(r.cubin)
    problems = [problem for r in results for problem in r.problems()]
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    print(f"{len(results)} configurations compiled, {len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tritongpt2", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    audit = commands.add_parser("audit", help="check the kernels for real GPUs without one")
    audits = audit.add_subparsers(dest="audit", required=True)
    compile_ = audits.add_parser("compile", help="compile every kernel configuration for sm_90 and sm_80")
    compile_.add_argument("--arch", type=_csv, default=["sm_90", "sm_80"], help="comma-separated, e.g. sm_90,sm_80")
    compile_.add_argument("--models", type=_csv, default=["gpt2", "gpt2-xl"], help="comma-separated GPT-2 sizes")
    compile_.add_argument("--dtypes", type=_csv, default=["float16", "bfloat16"], help="comma-separated")
    compile_.add_argument("--json", help="write the results as JSON to this file")
    compile_.add_argument("--dump", help="write each cubin into this folder")
    compile_.set_defaults(run=_audit_compile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:
        print(f"tritongpt2: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
