"""Build the embedded model's text corpus from Debian packages: four domains of real text.

Debian's archive (a registry this machine reaches) -> `apt-get download` of pinned packages ->
`dpkg-deb -x` -> one document per file -> split by document (held out by a hash of its name)
-> CORPUS/DOMAIN/{train,heldout}.jsonl + manifest.json (packages, versions, licences).

Domains:
    code         Python's standard library source (libpython3.11-stdlib; PSF-2.0)
    manual       Linux manual pages rendered to plain text with groff (manpages, manpages-dev)
    legal        licence texts (base-files' common-licenses) and packages' copyright files
    translation  gettext catalogues of GNU tools as English / French / German / Spanish pairs

    python training/build_corpus.py [--out ~/.cache/moe-runtime/corpus]

The corpus is not shipped; the held-out text the tests need is (moe_runtime/data/embedded/heldout/).
"""

from __future__ import annotations

import argparse
import gettext
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_runtime.atomic import staging_directory  # noqa: E402
from moe_runtime.embedded import cache_root  # noqa: E402

PACKAGES = {
    "code": ("libpython3.11-stdlib",),
    "manual": ("manpages", "manpages-dev"),
    "legal": (
        "base-files", "libc6", "libssl3", "perl-base", "python3.11-minimal", "gcc-12-base", "zlib1g", "curl", "git",
        "libsqlite3-0", "bzip2", "xz-utils", "libxml2", "tzdata", "ca-certificates", "openssh-client", "less",
        "vim-common", "nano", "rsync", "sudo", "util-linux", "procps", "libgnutls30", "libkrb5-3", "libpam0g",
        "libzstd1", "liblz4-1", "libncursesw6", "libreadline8", "libgmp10", "libmpfr6", "libexpat1", "libffi8",
        "libpcre2-8-0", "libidn2-0", "libcurl4", "openssl", "libjpeg62-turbo", "libpng16-16", "libfreetype6", "fontconfig",
    ),
    "translation": ("coreutils", "tar", "grep", "sed", "findutils", "diffutils", "bash", "wget", "gzip", "cpio", "gawk", "make"),
}
LICENCES = {
    "code": "PSF-2.0 (Python Software Foundation License)",
    "manual": "the man-pages project's licences (mostly 'verbatim' and GPL-2.0+; see each page's header)",
    "legal": "the licence texts themselves (each may be copied verbatim); Debian copyright files",
    "translation": "GPL-3.0+ (GNU packages and their translations)",
}
LANGUAGES = {"fr": "French", "de": "German", "es": "Spanish"}
HELDOUT_SHARE = 0.08
MIN_HELDOUT = 3
MAX_DOCUMENT_CHARS = 60_000


def heldout_groups(groups: list[str]) -> set[str]:
    """The groups held out: the HELDOUT_SHARE (at least MIN_HELDOUT) whose names hash lowest, so the split is stable."""
    ranked = sorted(set(groups), key=lambda group: hashlib.sha256(group.encode()).hexdigest())
    return set(ranked[: max(MIN_HELDOUT, round(HELDOUT_SHARE * len(ranked)))])


def group_of(name: str) -> str:
    """Documents held out together: a catalogue's languages (they share the English side), else each document alone."""
    return name.split("/")[0] if name.startswith("catalogue:") else name


def fetch(packages: tuple[str, ...], work: Path) -> tuple[Path, dict[str, str]]:
    """Download and unpack `packages` into work/root; their versions."""
    debs, root = work / "debs", work / "root"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(exist_ok=True)
    subprocess.run(["apt-get", "download", "-q", *packages], cwd=debs, check=True, capture_output=True)
    versions = {}
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        package, version = deb.name.split("_")[:2]
        versions[package] = version.replace("%3a", ":")
    return root, versions


def code_documents(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted((root / "usr/lib/python3.11").rglob("*.py")):
        relative = path.relative_to(root / "usr/lib/python3.11").as_posix()
        if path.is_file() and not relative.startswith(("test/", "idlelib/idle_test", "lib2to3/tests")):
            yield relative, path.read_text(errors="replace")


def manual_documents(root: Path) -> Iterator[tuple[str, str]]:
    pages = sorted(p for p in (root / "usr/share/man").glob("man*/*.gz") if not p.is_symlink())
    for path in tqdm(pages, desc="rendering manual pages", unit="page"):
        source = subprocess.run(["zcat", str(path)], capture_output=True, check=True).stdout
        if source.startswith(b".so "):
            continue
        rendered = subprocess.run(
            ["groff", "-t", "-mandoc", "-Tutf8", "-P-cbou", "-rLL=78n"], input=source, capture_output=True, env={**os.environ, "LANG": "C.UTF-8"}
        ).stdout.decode(errors="replace")
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in rendered.splitlines())).strip()
        if text:
            yield path.relative_to(root).as_posix(), text


def legal_documents(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted((root / "usr/share/common-licenses").iterdir()):
        if path.is_file() and not path.is_symlink():
            yield f"common-licenses/{path.name}", path.read_text(errors="replace")
    for path in sorted((root / "usr/share/doc").glob("*/copyright")):
        yield f"copyright/{path.parent.name}", path.read_text(errors="replace")


def translation_documents(root: Path) -> Iterator[tuple[str, str]]:
    for language, language_name in LANGUAGES.items():
        for path in sorted((root / "usr/share/locale" / language / "LC_MESSAGES").glob("*.mo")):
            with path.open("rb") as handle:
                catalogue = gettext.GNUTranslations(handle)._catalog
            pairs = [
                f"English: {source.strip()}\n{language_name}: {target.strip()}"
                for source, target in catalogue.items()
                if isinstance(source, str) and source and isinstance(target, str) and target and "\x00" not in source
            ]
            if pairs:
                yield f"catalogue:{path.stem}/{language}", "\n\n".join(pairs)


READERS = {"code": code_documents, "manual": manual_documents, "legal": legal_documents, "translation": translation_documents}


def chunks(name: str, text: str) -> Iterator[tuple[str, str]]:
    """Split a long document at blank lines into pieces just over MAX_DOCUMENT_CHARS (one line of JSONL each)."""
    if len(text) <= MAX_DOCUMENT_CHARS:
        yield name, text
        return
    piece, length, number = [], 0, 0
    for paragraph in text.split("\n\n"):
        piece.append(paragraph)
        length += len(paragraph)
        if length > MAX_DOCUMENT_CHARS:
            yield f"{name}#{number}", "\n\n".join(piece)
            piece, length, number = [], 0, number + 1
    if piece:
        yield f"{name}#{number}", "\n\n".join(piece)


def write_domain(domain: str, documents: Iterator[tuple[str, str]], folder: Path) -> dict:
    """Write DOMAIN/{train,heldout}.jsonl; the counts. A document and its pieces stay on one side."""
    (folder / domain).mkdir()
    documents = [(name, text) for name, text in documents if text.strip()]
    held_out = heldout_groups([group_of(name) for name, _ in documents])
    counts = {"train": [0, 0], "heldout": [0, 0]}
    with open(folder / domain / "train.jsonl", "w") as train, open(folder / domain / "heldout.jsonl", "w") as held:
        for name, text in documents:
            side = "heldout" if group_of(name) in held_out else "train"
            for piece_name, piece in chunks(name, text):
                (held if side == "heldout" else train).write(json.dumps({"name": piece_name, "text": piece}) + "\n")
                counts[side][0] += 1
                counts[side][1] += len(piece)
    return {side: {"documents": n, "characters": c} for side, (n, c) in counts.items()}


def build(out: Path) -> Path:
    manifest = {"heldout_share": HELDOUT_SHARE, "domains": {}}
    with staging_directory(out, "corpus folder") as staging, tempfile.TemporaryDirectory() as work:
        for domain, packages in PACKAGES.items():
            root, versions = fetch(packages, Path(work) / domain)
            counts = write_domain(domain, READERS[domain](root), staging)
            manifest["domains"][domain] = {"packages": versions, "licence": LICENCES[domain], **counts}
            print(f"{domain:12s} {counts}")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=cache_root() / "corpus", help="folder to (re)build (default: %(default)s)")
    print(build(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
