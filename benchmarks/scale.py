"""minikd on Dask: soft-target stores of 45,000 and 900,000 rows (peak memory of every process,
throughput with one and two local workers) and one small sweep serially, on a LocalCluster and on
a `dask scheduler` + two `dask worker` processes started here (same report? wall time of each).

Each store is written by a fresh Python process (the client, with its LocalCluster's scheduler)
and fresh worker processes, so each peak resident set (ru_maxrss, read in every process at the
end) belongs to that run alone. Needs minikd[scale] and psutil (installed with distributed).

    python benchmarks/scale.py [--out DIR] [--big-rows 900000] [--throughput-rows 180000]
"""
import argparse
import json
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import add_out_argument, cpu_machine


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def store_child(teacher_dir, out, rows, workers):
    """One store write in this (fresh) process on a fresh LocalCluster: prints a JSON line."""
    import distributed

    from minikd import experiments, scale
    teacher, data = experiments._exported_teacher(teacher_dir, 0)
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as cluster, distributed.Client(cluster) as client:
        t0 = time.perf_counter()
        scale.write_store(teacher, data, out, rows=rows, client=client, progress=False)
        seconds = time.perf_counter() - t0
        workers_peak = client.run(_peak_mib)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    print(json.dumps({"rows": rows, "workers": workers, "seconds": seconds, "rows_per_second": rows / seconds,
                      "client_and_scheduler_peak_rss_MiB": _peak_mib(),
                      "worker_peak_rss_MiB": sorted(workers_peak.values()), "store_MiB": size / 2**20,
                      "chunk_rows": scale.CHUNK_ROWS}))


def run_store(teacher_dir, work, rows, workers):
    out = Path(work) / f"st-{rows}-{workers}.zarr"
    proc = subprocess.run([sys.executable, __file__, "--store-child", str(teacher_dir), str(out), str(rows),
                           str(workers)], capture_output=True, text=True, check=True)
    shutil.rmtree(out)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result))
    return result


def minikd(*args, **kw):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "minikd.cli", *args], check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t0


def comparable(out):
    """What must be equal between two sweeps: report.json without timings and options, sweep.png."""
    report = json.loads((Path(out) / "report.json").read_text())
    for k in ("seconds", "options"):
        report.pop(k)
    report["student_kd"].pop("inference_us_per_sample")
    return report, (Path(out) / "sweep.png").read_bytes()


def sweeps(work):
    options = ["--samples", "5000", "--transfer-samples", "10000", "--T", "1", "2", "4", "8", "--alpha", "0.5",
               "0.9", "--transfer-epochs", "5", "--cache-dir", str(Path(work) / "cache"), "--quiet"]
    minikd("teacher", "--samples", "5000", "--cache-dir", str(Path(work) / "cache"), "--out",
           str(Path(work) / "teacher-cache-warmup"), "--quiet")
    results = {}
    results["serial"] = {"seconds": minikd("sweep", *options, "--out", str(Path(work) / "serial"))}
    results["local_cluster_2_workers"] = {"seconds": minikd("sweep", *options, "--workers", "2", "--out",
                                                            str(Path(work) / "local"))}
    bin_dir = Path(sys.executable).parent
    sched_file = Path(work) / "scheduler.json"
    scheduler = subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(sched_file)], stderr=subprocess.DEVNULL)
    started = []
    try:
        while not sched_file.exists():
            time.sleep(0.2)
        time.sleep(0.5)
        address = json.loads(sched_file.read_text())["address"]
        started = [subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1",
                                     "--no-dashboard"], stderr=subprocess.DEVNULL) for _ in range(2)]
        import distributed
        with distributed.Client(address) as client:
            client.wait_for_workers(2, timeout=60)
        results["scheduler_and_2_workers_by_hand"] = {
            "seconds": minikd("sweep", *options, "--scheduler", address, "--out", str(Path(work) / "by-hand")),
            "commands": ["dask scheduler --port 0 --scheduler-file scheduler.json",
                         f"dask worker {address} --nworkers 1 --nthreads 1  (twice)",
                         f"minikd sweep ... --scheduler {address}"]}
    finally:
        for p in started + [scheduler]:   # only the processes this script started, by their id
            p.send_signal(signal.SIGTERM)
        for p in started + [scheduler]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    reference = comparable(Path(work) / "serial")
    for name, folder in (("local_cluster_2_workers", "local"), ("scheduler_and_2_workers_by_hand", "by-hand")):
        results[name]["same_report_and_heatmap_as_serial"] = comparable(Path(work) / folder) == reference
    results["best"] = {k: reference[0]["student_kd"][k] for k in ("T", "alpha", "val_accuracy", "test_accuracy")}
    results["grid"] = reference[0]["grid"]
    results["students"] = 8
    results["options"] = " ".join(options[:-3])
    print(json.dumps(results, indent=1))
    return results


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--store-child":
        store_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out_argument(ap)
    ap.add_argument("--small-rows", type=int, default=45_000)
    ap.add_argument("--big-rows", type=int, default=900_000)
    ap.add_argument("--throughput-rows", type=int, default=180_000, help="rows of the one- vs two-worker run")
    ap.add_argument("--skip-sweeps", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="minikd-scale-bench-"))
    try:
        teacher = work / "teacher"
        minikd("teacher", "--samples", "5000", "--out", str(teacher), "--cache-dir", str(work / "cache"), "--quiet")
        small = run_store(teacher, work, args.small_rows, 2)
        big = run_store(teacher, work, args.big_rows, 2)
        one = run_store(teacher, work, args.throughput_rows, 1)
        two = run_store(teacher, work, args.throughput_rows, 2)

        def worst(r):
            return max([r["client_and_scheduler_peak_rss_MiB"], *r["worker_peak_rss_MiB"]])
        res = {"machine": cpu_machine(), "date": time.strftime("%Y-%m-%d"),
               "soft_targets": {"small": small, "big": big,
                                "peak_rss_ratio_big_over_small_per_process": {
                                    "client_and_scheduler": big["client_and_scheduler_peak_rss_MiB"]
                                    / small["client_and_scheduler_peak_rss_MiB"],
                                    "workers": [b / s for b, s in zip(big["worker_peak_rss_MiB"],
                                                                      small["worker_peak_rss_MiB"])],
                                    "largest_process": worst(big) / worst(small)},
                                "below_2x": worst(big) < 2 * worst(small) and all(
                                    b < 2 * s for b, s in zip(big["worker_peak_rss_MiB"], small["worker_peak_rss_MiB"])),
                                "throughput": {"one_worker": one, "two_workers": two,
                                               "speedup": two["rows_per_second"] / one["rows_per_second"]}}}
        if not args.skip_sweeps:
            res["sweep"] = sweeps(work)
        print(json.dumps(res, indent=1))
        out = Path(args.out) / f"scale-{res['machine']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
