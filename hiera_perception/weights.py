"""Official Hiera video checkpoints, opt-in: download table, cache folder, sha256 records, K400 names.

The checkpoints are published by Meta AI with facebookresearch/hiera (Ryali et al., "Hiera: A
Hierarchical Vision Transformer without the Bells-and-Whistles", ICML 2023, arXiv:2306.00989)
under CC BY-NC 4.0, so they are never bundled: `hiera-perception fetch-weights NAME --accept-license`
downloads one into a cache folder after showing the licence. The table mirrors the
`@pretrained_model` tables of the official `hiera/hiera.py` (video models only: our encoder is the
3-D video Hiera); names follow timm's `arch.tag` convention.

Integrity is trust-on-first-use: the sha256 and size of each download go into `sha256.json` in the
cache folder, and `verify()` recomputes the hash before every later load of that file.

Kinetics-400 class names (`kinetics400_labels()`) ship in `data/kinetics400_classes.txt` in the
standard index order of the official K400 heads (the annotation files' alphabetical order, as in
mmaction2 `label_map_k400.txt` and torchvision's Kinetics-400 categories).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import http.client
import importlib.resources
import json
import logging
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hiera_perception.atomic import atomic_write, atomic_write_text, leftovers, locked_folder

__all__ = [
    "LICENSE",
    "LICENSE_URL",
    "WEIGHTS",
    "WeightsEntry",
    "WeightsError",
    "LicenseNotAccepted",
    "DownloadError",
    "ChecksumError",
    "get_entry",
    "find_entry",
    "entry_for_path",
    "default_cache_dir",
    "license_notice",
    "fetch",
    "verify",
    "resolve",
    "sha256_file",
    "read_record",
    "kinetics400_labels",
    "add_arguments",
    "main",
]

logger = logging.getLogger(__name__)

LICENSE = "CC BY-NC 4.0"
LICENSE_URL = "https://creativecommons.org/licenses/by-nc/4.0/"
RECORD_NAME = "sha256.json"
CACHE_ENV = "HIERA_PERCEPTION_CACHE"
DEFAULT_TAG = "mae_k400_ft_k400"
_BASE_URL = "https://dl.fbaipublicfiles.com/hiera/"
_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for a smooth progress bar
_URL_SCHEMES = ("http", "https", "file")  # file:// serves offline mirrors
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip format, and its legacy pickle format


class WeightsError(RuntimeError):
    """Base class of every error this module raises about official weights."""


class LicenseNotAccepted(WeightsError):
    """The user has not accepted the checkpoint licence (pass --accept-license / accept_license=True)."""


class DownloadError(WeightsError):
    """A download failed, was cut short or had the wrong size; nothing was kept under the final name."""


class ChecksumError(WeightsError):
    """A cached file no longer matches the sha256 (or size) recorded when it was downloaded."""


@dataclass(frozen=True)
class WeightsEntry:
    """One downloadable checkpoint: `arch.tag`, where it lives and what it contains."""

    arch: str  # also a key of hiera_perception.config.CONFIGS
    tag: str
    url: str
    kind: str  # "encoder": Hiera with its K400 head; "mae": MAE pre-training (encoder + decoder, no head)
    num_classes: int  # classes of the head, 0 without one
    license: str = LICENSE

    @property
    def name(self) -> str:
        return f"{self.arch}.{self.tag}"

    @property
    def config(self) -> str:
        """Name of the model config in hiera_perception.config.CONFIGS."""
        return self.arch

    @property
    def filename(self) -> str:
        """File name in the cache folder (the basename of the official URL)."""
        return self.url.rsplit("/", 1)[-1]


def _video_entries(arch: str) -> dict[str, WeightsEntry]:
    ft = WeightsEntry(arch, "mae_k400_ft_k400", f"{_BASE_URL}{arch}.pth", kind="encoder", num_classes=400)
    mae = WeightsEntry(arch, "mae_k400", f"{_BASE_URL}mae_{arch}.pth", kind="mae", num_classes=0)
    return {ft.name: ft, mae.name: mae}


# arch.tag -> entry; the first tag of each arch (mae_k400_ft_k400) is its default
WEIGHTS: dict[str, WeightsEntry] = {
    **_video_entries("hiera_base_16x224"),
    **_video_entries("hiera_base_plus_16x224"),
    **_video_entries("hiera_large_16x224"),
    **_video_entries("hiera_huge_16x224"),
}


def find_entry(name: str) -> WeightsEntry | None:
    """The table entry for `arch` (default tag) or `arch.tag`, or None when `name` is not in the table."""
    name = str(name)
    if name in WEIGHTS:
        return WEIGHTS[name]
    return WEIGHTS.get(f"{name}.{DEFAULT_TAG}")


def get_entry(name: str) -> WeightsEntry:
    """Like find_entry, but a name outside the table raises ValueError listing the valid names."""
    entry = find_entry(name)
    if entry is None:
        archs = sorted({e.arch for e in WEIGHTS.values()})
        raise ValueError(
            f"unknown official checkpoint {name!r}; valid: {', '.join(archs)} (tag {DEFAULT_TAG}) "
            f"or arch.tag, one of {', '.join(WEIGHTS)}"
        )
    return entry


def entry_for_path(path: str | os.PathLike) -> WeightsEntry | None:
    """The table entry whose official file name is `path`'s basename, or None."""
    basename = Path(path).name
    return next((e for e in WEIGHTS.values() if e.filename == basename), None)


def default_cache_dir() -> Path:
    """$HIERA_PERCEPTION_CACHE, else $XDG_CACHE_HOME/hiera_perception, else ~/.cache/hiera_perception."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "hiera_perception"
    return Path.home() / ".cache" / "hiera_perception"


def license_notice(entry: WeightsEntry) -> str:
    return (
        f"The official Hiera checkpoint {entry.name} ({entry.url}) by Meta AI is licensed under "
        f"{entry.license}: you may use and share it for NON-COMMERCIAL purposes only, with attribution "
        f"(Ryali et al., ICML 2023, facebookresearch/hiera). Terms: {LICENSE_URL}"
    )


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_record(folder: str | os.PathLike) -> dict[str, dict]:
    """The `sha256.json` record of a cache folder: {filename: {sha256, size, url, date}}; {} if none."""
    path = Path(folder) / RECORD_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        for name, info in record.items():
            if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and type(info.get("size")) is int):
                raise ValueError(f"entry {name!r} is not {{sha256: str, size: int, ...}}")
    except ValueError as e:
        raise ChecksumError(f"unreadable checksum record {path}: {e}; delete it and fetch again") from e
    return record


def _record_download(folder: Path, filename: str, sha256: str, size: int, url: str) -> None:
    """Add a file to the record; the caller holds the folder's lock."""
    record = read_record(folder)
    record[filename] = {
        "sha256": sha256,
        "size": size,
        "url": url,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(folder / RECORD_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")


def verify(path: str | os.PathLike) -> None:
    """Check a file against the sha256 recorded when it was downloaded into its cache folder.

    Files with no record beside them (the user's own files) pass. Raises ChecksumError naming the file,
    the expected and actual size or hash, and how to fix it.
    """
    path = Path(path)
    info = read_record(path.parent).get(path.name)
    if info is None:
        return
    fix = f"delete {path} and fetch it again (hiera-perception fetch-weights NAME --accept-license)"
    entry = entry_for_path(path)
    if entry is not None:
        fix = f"delete {path} and run: hiera-perception fetch-weights {entry.name} --accept-license"
    if not path.is_file():
        raise ChecksumError(f"{path} is recorded in {path.parent / RECORD_NAME} but missing; {fix}")
    size = path.stat().st_size
    if size != info.get("size", size):
        raise ChecksumError(f"{path} is corrupt: expected {info['size']} bytes, found {size}; {fix}")
    actual = sha256_file(path)
    if actual != info.get("sha256"):
        raise ChecksumError(
            f"{path} is corrupt: sha256 expected {info.get('sha256')}, got {actual}; {fix}"
        )
    logger.debug("verified %s (sha256 %s)", path, actual)


def resolve(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The cached file of an official checkpoint named `arch` or `arch.tag`, or None.

    None when the name is not in the table (a path or config name: the caller handles it) or when that
    checkpoint has not been fetched. The file is not verified here: call verify(path) before loading it.
    """
    entry = find_entry(str(name_or_path))
    if entry is None:
        return None
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / entry.filename
    return path if path.is_file() else None


def _download(url: str, dest: Path, timeout: float, progress: bool) -> tuple[str, int]:
    """Stream `url` into `dest` atomically; returns (sha256, size). On any failure nothing is left."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "hiera-perception"})
    received = 0
    expected: int | None = None
    head = b""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length is not None and length.strip().isdigit() else None
            if expected is None:
                logger.warning("%s sent no Content-Length: the size cannot be checked", url)
            digest = hashlib.sha256()
            bar = tqdm(
                total=expected, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=not progress
            )
            # atomic_write: temp file in the cache folder, fsync, rename, folder fsync; removed on error
            with bar, atomic_write(dest, "wb") as f:
                while chunk := response.read1(_CHUNK):  # read1: whatever has arrived, for a live progress bar
                    f.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    head = head if len(head) >= 4 else (head + chunk)[:4]
                    bar.update(len(chunk))
                if not head.startswith(_TORCH_MAGIC):  # an error or login page served with 200 OK, say
                    raise DownloadError(
                        f"{url} did not send a PyTorch checkpoint (its first bytes are {head!r}, not a zip or "
                        f"pickle); check the URL. Nothing was kept"
                    )
                if expected is not None and received != expected:
                    raise DownloadError(
                        f"download of {url} has the wrong size: expected {expected} bytes (Content-Length), "
                        f"got {received}; the connection was probably cut. Nothing was kept; try again"
                    )
    except urllib.error.HTTPError as e:
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        # OSError covers socket.timeout and ConnectionResetError mid-stream
        reason = getattr(e, "reason", e)
        kind = "timed out" if isinstance(reason, (socket.timeout, TimeoutError)) else "was interrupted"
        got = f" after {received} of {expected if expected is not None else '?'} bytes" if received else ""
        raise DownloadError(
            f"download of {url} {kind}{got} ({type(reason).__name__}: {reason}); "
            f"nothing was kept under {dest}; try again"
        ) from e
    return digest.hexdigest(), received


def fetch(
    name: str,
    accept_license: bool,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download the official checkpoint `name` (`arch` or `arch.tag`) into the cache; returns its path.

    Refuses (LicenseNotAccepted, nothing written) unless `accept_license`. A file already cached and
    matching its record is returned without downloading; one that no longer matches is downloaded
    again. `url` overrides the official address (a mirror); the cached file keeps the official name.
    """
    entry = get_entry(name)
    notice = license_notice(entry)
    if not accept_license:
        raise LicenseNotAccepted(
            f"{notice}\nThe checkpoint is not downloaded unless you accept these terms: pass --accept-license "
            f"(accept_license=True in Python)."
        )
    source = url or entry.url
    scheme = urllib.parse.urlsplit(source).scheme
    if scheme not in _URL_SCHEMES:
        raise ValueError(f"unsupported URL {source!r}: scheme {scheme!r}, valid: {', '.join(_URL_SCHEMES)}")
    logger.info("%s Licence accepted.", notice)

    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = folder / entry.filename
    if dest.is_file():
        if dest.name in read_record(folder):
            try:
                verify(dest)
                logger.info("%s already cached and verified", dest)
                return dest
            except ChecksumError as e:
                logger.warning("%s; downloading it again", e)
        else:
            logger.warning("%s has no checksum record in %s; downloading it again", dest, folder / RECORD_NAME)

    folder.mkdir(parents=True, exist_ok=True)
    # One fetch at a time per cache folder: what another fetch was writing is never taken for a leftover, and
    # two fetches of different files cannot lose each other's record entry.
    with locked_folder(folder):
        for stale in leftovers(dest):  # of a download killed outright
            logger.warning("removing %s, left by an interrupted download (%d bytes)", stale, stale.stat().st_size)
            stale.unlink(missing_ok=True)
        logger.info("downloading %s -> %s", source, dest)
        sha256, size = _download(source, dest, timeout=timeout, progress=progress)
        _record_download(folder, dest.name, sha256, size, source)
    logger.info("saved %s (%d bytes, sha256 %s)", dest, size, sha256)
    return dest


@functools.lru_cache(maxsize=1)
def _labels() -> tuple[str, ...]:
    resource = importlib.resources.files("hiera_perception").joinpath("data/kinetics400_classes.txt")
    names = tuple(line.strip() for line in resource.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(names) != 400 or len(set(names)) != 400:
        raise RuntimeError(
            f"{resource} must hold 400 unique class names, found {len(names)} ({len(set(names))} unique)"
        )
    return names


def kinetics400_labels() -> list[str]:
    """The 400 Kinetics-400 class names, index i = output i of the official K400 heads."""
    return list(_labels())


# ---- CLI: hiera-perception fetch-weights ----


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name",
        nargs="?",
        metavar="NAME",
        help=f"checkpoint: ARCH (tag {DEFAULT_TAG}, the K400 classifier) or ARCH.TAG, e.g. "
        "hiera_base_16x224.mae_k400 (MAE pre-trained); --list shows them all",
    )
    parser.add_argument(
        "--accept-license",
        action="store_true",
        help=f"accept the checkpoint licence ({LICENSE}, non-commercial use only: {LICENSE_URL})",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"download folder (default ${CACHE_ENV}, else $XDG_CACHE_HOME/hiera_perception, "
        "else ~/.cache/hiera_perception)",
    )
    parser.add_argument("--url", default=None, help="download from this address instead (a mirror)")
    parser.add_argument("--list", action="store_true", help="list the official checkpoints and exit")


def main(args: argparse.Namespace) -> int:
    if args.list:
        for entry in WEIGHTS.values():
            default = " (default)" if entry.tag == DEFAULT_TAG else ""
            head = f"{entry.num_classes} classes" if entry.num_classes else "no head"
            print(f"{entry.name:<40} {entry.kind:<8} {head:<12} {entry.license}  {entry.url}{default}")
        return 0
    if not args.name:
        logger.error("give a checkpoint NAME (see --list)")
        return 2
    try:
        path = fetch(args.name, accept_license=args.accept_license, cache_dir=args.cache_dir, url=args.url)
    except (WeightsError, ValueError) as e:
        logger.error("%s", e)
        return 1
    if path.parent.resolve() != default_cache_dir().resolve():  # names are looked up in the default cache only
        logger.warning("%s is outside the default cache %s: serve it by path (--model %s, model:=%s) or set "
                       "%s=%s so that the name %s finds it", path.name, default_cache_dir(), path, path, CACHE_ENV,
                       path.parent, args.name)
    print(path)
    return 0
