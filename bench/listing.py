"""Peak memory of listing a corpus: does it grow with the corpus? Prints JSON (not a test).

segment-corpus lists ``--images`` as a stream of chunks (``segment/inputs.py:iter_chunks``): an
S3 prefix a ``ListObjectsV2`` page at a time, a local folder a directory at a time (a huge
directory sorted in spilled runs), no per-input dedup set where the listing cannot repeat an
input. This lists the same kinds of corpus at two sizes (20,000 and 200,000 objects by
default), each in a child process that does nothing but consume ``iter_chunks(url, 512)``, and
reports the child's peak RSS (``VmHWM``) and what it was once the modules were imported:

- ``local-tree``: a folder of small files in sub-folders of 1,000;
- ``local-flat``: every file in one folder (the spilled sort);
- ``s3``: every key under one prefix on moto's S3 server (filled through moto's backend,
  listed through the real S3 API by s3fs).

Target (issue 36): for each kind, peak RSS at the larger size within 1.2x that at the smaller
(``ratio``). ``--code DIR`` lists with the weakseg found in DIR (e.g. an older checkout), for a
before/after comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("local-tree", "local-flat", "s3")
BUCKET = "weakseg-bench-listing"


def _rss_mib() -> float:
    """This process's peak RSS: ``VmHWM``, which starts afresh at ``exec`` (``ru_maxrss`` would carry
    the RSS of the parent it was forked from, here moto's server with every key)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(images: str, chunk_size: int) -> None:
    """List ``images`` in chunks, keeping nothing; print what it took."""
    from weakseg.tasks.segment.inputs import iter_chunks

    if images.startswith("s3://"):
        import s3fs  # noqa: F401  (imported before the baseline, as the flow's process has it)
    imported = _rss_mib()
    t0 = time.perf_counter()
    listed = chunks = 0
    for spec in iter_chunks(images, chunk_size):
        listed += len(spec.uris) or 1
        chunks += 1
    print(json.dumps({"listed": listed, "chunks": chunks, "seconds": round(time.perf_counter() - t0, 2),
                      "imported_rss_mib": round(imported, 1), "peak_rss_mib": round(_rss_mib(), 1)}))


def make_tree(folder: Path, n: int, flat: bool) -> None:
    """``n`` small files (a few bytes: listing never reads them), flat or 1,000 a sub-folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = folder if flat else folder / f"d{i // 1000:05d}"
        if not flat and i % 1000 == 0:
            sub.mkdir(exist_ok=True)
        (sub / f"img{i:07d}.jpg").write_bytes(b"x")


class Moto:
    """moto's S3 server on 127.0.0.1, keys put straight into its backend (an HTTP PUT each would
    take minutes for 200,000), listed by the children through the real S3 API."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        self._memoise_listing()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "bench",
                    "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
        import boto3

        boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="bench",
                     aws_secret_access_key="bench", region_name="us-east-1").create_bucket(Bucket=BUCKET)

    @staticmethod
    def _memoise_listing() -> None:
        """moto answers each ``ListObjectsV2`` page by filtering and sorting every key of the bucket
        again (a 200,000-key prefix: minutes a page on this machine). Its full listing is kept
        here until a key is added, so a page costs a slice; the answers are moto's own, unchanged."""
        from moto.s3.models import S3Backend

        original, memo = S3Backend.list_objects, {}

        def list_objects(self, bucket, prefix, delimiter, marker, max_keys):
            if marker is not None or max_keys is not None:
                return original(self, bucket, prefix, delimiter, marker, max_keys)
            key = (bucket.name, prefix, delimiter, len(bucket.keys))
            if key not in memo:
                memo.clear()
                memo[key] = original(self, bucket, prefix, delimiter, marker, max_keys)
            keys, folders, truncated, next_marker = memo[key]
            return list(keys), list(folders), truncated, next_marker

        S3Backend.list_objects = list_objects

    def fill(self, prefix: str, n: int) -> str:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
        for i in range(n):
            backend.put_object(BUCKET, f"{prefix}/img{i:07d}.jpg", b"x")
        return f"s3://{BUCKET}/{prefix}"

    def stop(self) -> None:
        self.server.stop()


def measure(images: str, chunk_size: int, code: Path, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", images, "--chunk-size", str(chunk_size)],
                         env={**os.environ, **env, "PYTHONPATH": str(code)}, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"listing {images} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20000,200000", help="small,large object counts")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--code", type=Path, default=ROOT, help="the checkout whose weakseg lists (default: this one)")
    p.add_argument("--child", metavar="IMAGES", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.chunk_size)
        return
    small, large = (int(s) for s in args.sizes.split(","))
    kinds = [k for k in args.kinds.split(",") if k]
    report: dict = {"sizes": [small, large], "chunk_size": args.chunk_size, "code": str(args.code.resolve()),
                    "target": "peak_rss(large) <= 1.2 x peak_rss(small) for each kind", "kinds": {}}
    moto = Moto() if "s3" in kinds else None
    try:
        with tempfile.TemporaryDirectory(prefix="weakseg-bench-listing-") as tmp:
            for kind in kinds:
                runs = {}
                for n in (small, large):
                    if kind == "s3":
                        images, env = moto.fill(f"n{n}", n), moto.env
                    else:
                        folder = Path(tmp) / f"{kind}-{n}"
                        make_tree(folder, n, flat=kind == "local-flat")
                        images, env = str(folder), {}
                    r = measure(images, args.chunk_size, args.code, env)
                    if r["listed"] != n:
                        raise RuntimeError(f"{kind}: listed {r['listed']} of {n}")
                    runs[str(n)] = r
                a, b = runs[str(small)], runs[str(large)]
                runs["ratio"] = round(b["peak_rss_mib"] / a["peak_rss_mib"], 3)
                runs["growth_mib"] = round((b["peak_rss_mib"] - b["imported_rss_mib"])
                                           - (a["peak_rss_mib"] - a["imported_rss_mib"]), 1)
                report["kinds"][kind] = runs
    finally:
        if moto is not None:
            moto.stop()
    report["met"] = all(r["ratio"] <= 1.2 for r in report["kinds"].values())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
