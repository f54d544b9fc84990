"""Make `import tritongpt2` work from a checkout with no install step: a folder to put on PYTHONPATH,
holding a `tritongpt2` package whose files and subpackages are symlinks into the checkout, laid out as
pyproject.toml's [tool.setuptools.package-dir] maps them (kernels/ as tritongpt2.kernels, ...).

For machines where pip cannot install the checkout (bench/gpu.sh on a lent GPU: no network, and a
setuptools too old to build an editable wheel without the `wheel` package). Run as a script, before
tritongpt2 is importable:  python bench/package_overlay.py DEST  (prints DEST for PYTHONPATH).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs(pyproject: str) -> dict[str, str]:
    """[tool.setuptools.package-dir] of a pyproject.toml, read without tomllib (Python 3.10 has none)."""
    table = re.search(r"^\[tool\.setuptools\.package-dir\]\s*$(.*?)(?=^\[|\Z)", pyproject, re.MULTILINE | re.DOTALL)
    if table is None:
        raise ValueError("pyproject.toml has no [tool.setuptools.package-dir] table")
    return dict(re.findall(r'^\s*"([\w.]+)"\s*=\s*"([^"]+)"\s*$', table.group(1), re.MULTILINE))


def build_overlay(dest: Path, root: Path = ROOT) -> Path:
    """Fill dest with the symlinked package; returns dest. Subpackages link to their folders; the top
    package is a real folder of links to its files, since its subpackages live elsewhere."""
    mapping = package_dirs((root / "pyproject.toml").read_text())
    top = {name for name in mapping if "." not in name}
    if len(top) != 1:
        raise ValueError(f"expected one top-level package in package-dir, got {sorted(top)}")
    [name] = top
    package = dest / name
    package.mkdir(parents=True, exist_ok=True)
    for source in sorted((root / mapping[name]).glob("*.py")):
        _link(package / source.name, source)
    for dotted, folder in mapping.items():
        if dotted != name:
            _link(dest / Path(*dotted.split(".")), root / folder)
    return dest


def _link(path: Path, target: Path) -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target.resolve(), target_is_directory=target.is_dir())


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/package_overlay.py DEST")
    print(build_overlay(Path(sys.argv[1]).resolve()))
