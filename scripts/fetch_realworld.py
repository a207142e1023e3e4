#!/usr/bin/env python
"""Fetch the colin27 scan and the AAL atlas of the ``realworld`` development data set.

One command, run from the repository root::

    python scripts/fetch_realworld.py [--dest DIR] [--deb FILE] [--force]

``DIR`` defaults to ``$HYBRIDREG_DATA/realworld`` when ``HYBRIDREG_DATA`` is set, else
``~/.cache/hybridreg/realworld`` (:func:`benchmarks.realworld.default_root`, the folder the
loader :func:`benchmarks.realworld.realworld_pairs` reads).  These files are never committed.

What it does
------------
1. ``apt-get download mricron-data`` in a temporary folder (Debian's package of the MRIcron
   templates; if the download fails because the package lists are missing or stale it runs
   ``apt-get update`` once and retries).  ``--deb FILE`` uses a ``.deb`` you downloaded
   yourself instead (e.g. from https://packages.debian.org/bookworm/all/mricron-data/download
   on a machine without apt).
2. ``dpkg -x`` (or, without dpkg, a pure-Python ``ar`` + ``tar`` extraction of the same
   ``data.tar.*`` member).
3. Checks the files (grid 181x217x181 at 1 mm, RAS, the same affine for the T1 and the atlas,
   AAL values 0..116, the package's own label list ``aal.nii.txt`` giving the standard AAL
   numbering for the 12 structures used, left structures at x < 0 mm) and copies into DEST:

   * ``ch2bet.nii.gz``  -- colin27 (Holmes et al. 1998), skull-stripped T1, MNI space;
   * ``aal.nii.gz``     -- the AAL atlas (Tzourio-Mazoyer et al. 2002) drawn on colin27;
   * ``aal.nii.txt``    -- the package's AAL label list (index, name, AAL code);
   * ``copyright``      -- the package's Debian copyright file (BSD-3-clause);
   * ``PROVENANCE.md`` and ``provenance.json`` -- package version, sha256 of every file,
     the licence notes (including AAL's citation requirement).

Idempotent: if DEST already holds every file with the sha256 recorded in its
``provenance.json``, nothing is downloaded (``--force`` fetches again).  Files are staged in
a temporary folder inside DEST and moved into place only after every check passed, so an
interrupted or failed run never leaves a half-written data set.

Exit status: 0 on success (or nothing to do), 1 on any failure (one line on stderr).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from hybridreg.io import file_sha256  # noqa: E402
from benchmarks.realworld import (  # noqa: E402
    COLIN27_FILES,
    FETCH_COMMAND,
    check_colin27,
    default_root,
)

PACKAGE = "mricron-data"
#: files taken from the package: path inside the package -> name in DEST
MEMBERS = {
    "usr/share/mricron/templates/ch2bet.nii.gz": "ch2bet.nii.gz",
    "usr/share/mricron/templates/aal.nii.gz": "aal.nii.gz",
    "usr/share/mricron/templates/aal.nii.txt": "aal.nii.txt",
    f"usr/share/doc/{PACKAGE}/copyright": "copyright",
}
assert set(MEMBERS.values()) == set(COLIN27_FILES)

LICENCE_NOTES = """\
* **Package licence.** Debian's `mricron-data` package is distributed under the terms of its
  `copyright` file (copied here). The templates fall under its `Files: *` stanza (no other
  stanza names them): "Copyright 2006-2010, Chris Rorden", **BSD-3-clause**. The images were
  made by others (colin27: Holmes et al., MNI; AAL: Tzourio-Mazoyer et al., GIN Caen), whom
  that file does not name separately; cite them as below.
* **colin27** (`ch2bet.nii.gz`): the "colin27" average of 27 T1 scans of one subject
  (Holmes CJ, Hoge R, Collins L, Woods R, Toga AW, Evans AC. Enhancement of MR images using
  registration for signal averaging. J Comput Assist Tomogr 1998;22(2):324-333), skull-stripped,
  in MNI space, as shipped with MRIcron.
* **AAL** (`aal.nii.gz`, `aal.nii.txt`): the Automated Anatomical Labeling atlas drawn on
  colin27. Its authors ask that any use cite: Tzourio-Mazoyer N, Landeau B, Papathanassiou D,
  Crivello F, Etard O, Delcroix N, Mazoyer B, Joliot M. *Automated anatomical labeling of
  activations in SPM using a macroscopic anatomical parcellation of the MNI MRI single-subject
  brain.* NeuroImage 2002;15(1):273-289. Report it in any result computed with these labels.
* These files are fetched on demand and are **not** redistributed by hybridreg.
"""


def fail(msg: str) -> NoReturn:
    print(f"fetch_realworld: error: {msg}", file=sys.stderr)
    raise SystemExit(1)


# ----------------------------------------------------------------------------- download

def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def apt_download(workdir: Path) -> Path:
    """``apt-get download mricron-data`` into ``workdir`` (``apt-get update`` and one retry
    if the package is unknown or its file is gone); returns the ``.deb``."""
    if shutil.which("apt-get") is None:
        fail(f"apt-get not found: download {PACKAGE}_*.deb yourself (e.g. from "
             f"https://packages.debian.org/bookworm/all/{PACKAGE}/download) and pass --deb FILE")
    r = _run(["apt-get", "download", PACKAGE], workdir)
    if r.returncode != 0:
        print(f"apt-get download failed ({r.stderr.strip().splitlines()[-1:] or r.returncode}); "
              f"running apt-get update and retrying", file=sys.stderr)
        u = _run(["apt-get", "update"], workdir)
        if u.returncode != 0:
            fail("apt-get update failed (it needs root: run `sudo apt-get update`, then this "
                 f"command again): {u.stderr.strip()[-300:]}")
        r = _run(["apt-get", "download", PACKAGE], workdir)
        if r.returncode != 0:
            fail(f"apt-get download {PACKAGE} failed: {r.stderr.strip()[-300:]}")
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if len(debs) != 1:
        fail(f"apt-get download {PACKAGE} left {len(debs)} .deb files in {workdir}")
    return debs[0]


# ----------------------------------------------------------------------------- extraction

def _ar_members(deb: Path) -> dict[str, bytes]:
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        fail(f"{deb} is not a Debian package (no ar header)")
    pos, out = 8, {}
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    return out


def _control_field(deb: Path, field: str) -> str:
    if shutil.which("dpkg-deb"):
        r = subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip()
    for name, blob in _ar_members(deb).items():
        if name.startswith("control.tar"):
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / name
                p.write_bytes(blob)
                with tarfile.open(p) as tf:
                    for m in tf.getmembers():
                        if m.name.lstrip("./") == "control":
                            for line in tf.extractfile(m).read().decode().splitlines():
                                if line.startswith(f"{field}:"):
                                    return line.split(":", 1)[1].strip()
    fail(f"no {field} field in {deb}")


def extract(deb: Path, into: Path) -> None:
    """``dpkg -x deb into``; without dpkg, extract the package's ``data.tar.*`` in Python."""
    if shutil.which("dpkg"):
        r = subprocess.run(["dpkg", "-x", str(deb), str(into)], capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"dpkg -x {deb} failed: {r.stderr.strip()[-300:]}")
        return
    members = _ar_members(deb)
    name = next((n for n in members if n.startswith("data.tar")), None)
    if name is None:
        fail(f"{deb} has no data.tar member")
    if name.endswith(".zst"):
        fail(f"{deb} uses zstd compression, which needs dpkg to extract")
    p = into / name
    p.write_bytes(members[name])
    wanted = set(MEMBERS)
    with tarfile.open(p) as tf:
        for m in tf.getmembers():
            rel = m.name.lstrip("./")
            if rel in wanted and m.isfile():
                dst = into / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(tf.extractfile(m).read())
    p.unlink()


# ----------------------------------------------------------------------------- provenance

def up_to_date(dest: Path) -> bool:
    """DEST holds every file with the sha256 its ``provenance.json`` records."""
    prov = dest / "provenance.json"
    if not prov.is_file() or not (dest / "PROVENANCE.md").is_file():
        return False
    try:
        rec = json.loads(prov.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError):
        return False
    return all((dest / n).is_file() and rec.get(n, {}).get("sha256") == file_sha256(dest / n)
               for n in COLIN27_FILES)


def provenance(deb: Path, version: str, staged: Path, checks: dict) -> tuple[dict, str]:
    files = {n: {"sha256": file_sha256(staged / n), "bytes": (staged / n).stat().st_size,
                 "package_path": "/" + p} for p, n in MEMBERS.items()}
    rec = {"package": PACKAGE, "version": version, "deb": deb.name, "deb_sha256": file_sha256(deb),
           "fetched_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "command": FETCH_COMMAND, "files": files, "checks": checks}
    rows = "\n".join(f"| `{n}` | `{f['package_path']}` | {f['bytes']} | `{f['sha256']}` |"
                     for n, f in files.items())
    g = checks
    md = f"""# realworld: colin27 + AAL (fetched, not redistributed)

Fetched by `{FETCH_COMMAND}` (hybridreg) from Debian's package **`{PACKAGE}` {version}**
(`{deb.name}`, sha256 `{rec['deb_sha256']}`) on {rec['fetched_utc']}.

| file | path in the package | bytes | sha256 |
|---|---|---|---|
{rows}

## Checked on fetch

* grid {g['size']} voxels (x, y, z), spacing {g['spacing']} mm, orientation {g['orientation']}
  (nibabel axis codes), the T1 and the atlas share one affine;
* T1 `ch2bet.nii.gz`: {g['t1_dtype']}, intensities {g['t1_min']}..{g['t1_max']};
* AAL `aal.nii.gz`: {g['aal_dtype']}, {g['aal_n_labels']} labels with values
  {g['aal_min_label']}..{g['aal_max_label']} (standard 116-region numbering, read from
  `aal.nii.txt`); every `_L` structure used lies at x < 0 mm (left in RAS), every `_R` at x > 0.

## Licences

{LICENCE_NOTES}"""
    return rec, md


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=None,
                    help="target folder (default: $HYBRIDREG_DATA/realworld or ~/.cache/hybridreg/realworld)")
    ap.add_argument("--deb", type=Path, default=None, help=f"use this {PACKAGE}_*.deb instead of apt-get download")
    ap.add_argument("--force", action="store_true", help="fetch again even if DEST is up to date")
    a = ap.parse_args(argv)
    dest = (a.dest or default_root()).expanduser().resolve()
    if dest.exists() and not dest.is_dir():
        fail(f"--dest {dest} exists and is not a folder")
    if not a.force and up_to_date(dest):
        print(f"{dest}: colin27 + AAL already fetched (sha256 match provenance.json); nothing to do")
        return 0
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-realworld-") as tmp:
        tmp = Path(tmp)
        if a.deb is not None:
            if not a.deb.is_file():
                fail(f"--deb {a.deb} is not a file")
            deb = a.deb.resolve()
        else:
            print(f"apt-get download {PACKAGE} ...")
            deb = apt_download(tmp)
        if _control_field(deb, "Package") != PACKAGE:
            fail(f"{deb} is not the {PACKAGE} package")
        version = _control_field(deb, "Version")
        root = tmp / "root"
        root.mkdir()
        extract(deb, root)
        missing = [p for p in MEMBERS if not (root / p).is_file()]
        if missing:
            fail(f"{PACKAGE} {version} lacks {missing}")
        staged = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest))
        try:
            for p, n in MEMBERS.items():
                shutil.copyfile(root / p, staged / n)
            try:
                checks = check_colin27(staged)
            except ValueError as e:
                fail(f"{PACKAGE} {version}: unexpected content: {e}")
            rec, md = provenance(deb, version, staged, checks)
            (staged / "provenance.json").write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
            (staged / "PROVENANCE.md").write_text(md, encoding="utf-8")
            for n in [*COLIN27_FILES, "provenance.json", "PROVENANCE.md"]:  # provenance last
                os.replace(staged / n, dest / n)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    print(f"wrote {dest}: {', '.join(COLIN27_FILES)}, PROVENANCE.md ({PACKAGE} {version})")
    print("AAL: cite Tzourio-Mazoyer et al., NeuroImage 15:273-289 (2002) in results that use its labels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
