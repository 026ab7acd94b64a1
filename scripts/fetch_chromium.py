#!/usr/bin/env python3
"""Find or fetch a headless Chromium for the playground's browser test (stdlib only).

    python3 scripts/fetch_chromium.py      # prints the path of a Chromium to run

Order: $WORDLOOM_CHROMIUM, an installed Debian chromium / chromium-headless-shell, then the
git-ignored cache `.cache/tools/chromium`. When none is there, Debian's
`chromium-headless-shell` and the libraries of its dependency closure that this machine lacks
are fetched with `apt-get download` (apt checks them against its signed package lists) and
unpacked with `dpkg -x` into the cache, behind a launcher that sets LD_LIBRARY_PATH. No root
is needed and nothing is installed system-wide. Idempotent: a cached launcher is reused.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("WORDLOOM_CACHE", REPO / ".cache"))
TOOLS = CACHE / "tools" / "chromium"
LAUNCHER = TOOLS / "chromium"
PACKAGE = "chromium-headless-shell"
INSTALLED = ["/usr/bin/chromium", "/usr/bin/chromium-headless-shell"]


def installed(package: str) -> bool:
    status = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True, text=True,
    )
    return status.returncode == 0 and status.stdout.endswith(" installed")


def ensure_package_lists() -> None:
    """A fresh machine may have no package lists yet; root can fetch them."""
    known = subprocess.run(["apt-cache", "show", PACKAGE], capture_output=True)
    if known.returncode != 0 and os.geteuid() == 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)


def missing_packages() -> list[str]:
    """The package and the libraries of its dependency closure that are not installed here.

    Fonts, shells and installer helpers in the closure are left out: a headless page needs the
    shared libraries only."""
    closure = subprocess.run(
        ["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
         "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", PACKAGE],
        capture_output=True, text=True, check=True,
    ).stdout
    names = sorted({l for l in closure.splitlines() if l and not l.startswith((" ", "<"))})
    wanted = [n for n in names if n.startswith(("chromium", "lib"))]
    return [n for n in wanted if not installed(n)]


def fetch() -> Path:
    ensure_package_lists()
    packages = missing_packages()
    root = TOOLS / "root"
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # apt's unprivileged downloader writes into it when run as root
        subprocess.run(["apt-get", "-o", "APT::Sandbox::User=root", "download", *packages], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        staging = Path(tmp) / "root"
        for deb in sorted(Path(tmp).glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(staging)], check=True)
        binary = staging / "usr/lib/chromium" / PACKAGE
        if not binary.is_file():
            sys.exit(f"{PACKAGE}: no usr/lib/chromium/{PACKAGE} in the fetched packages")
        if root.exists():
            shutil.rmtree(root)
        TOOLS.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), root)
    library_dirs = sorted({str(p.parent) for p in root.rglob("*.so*")})
    script = (
        "#!/bin/sh\n"
        f'LD_LIBRARY_PATH="{":".join(library_dirs)}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}" \\\n'
        f'  exec "{root}/usr/lib/chromium/{PACKAGE}" "$@"\n'
    )
    tmp_launcher = LAUNCHER.with_suffix(".tmp")
    tmp_launcher.write_text(script)
    tmp_launcher.chmod(0o755)
    tmp_launcher.replace(LAUNCHER)  # written last: its presence means the fetch completed
    return LAUNCHER


def main() -> None:
    chosen = os.environ.get("WORDLOOM_CHROMIUM")
    if chosen:
        print(chosen)
        return
    for path in INSTALLED:
        if os.access(path, os.X_OK):
            print(path)
            return
    print(LAUNCHER if LAUNCHER.is_file() else fetch())


if __name__ == "__main__":
    main()
