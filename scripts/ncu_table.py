#!/usr/bin/env python3
"""scripts/ncu_table.py: one table per Nsight Compute CSV (ncu --csv --metrics ..., the long format: one row per
kernel launch and metric), for bench/NOTES.md.

    python3 scripts/ncu_table.py ncu_prefill_qwen3.csv [more.csv ...]

Per launch: kernel (shortened), time (us), DRAM read and written (MB), achieved DRAM bandwidth (TB/s, bytes read +
written over the kernel's time), DRAM and SM throughput (% of peak, as ncu reports them) and, when the CSV has the
counter sm__ops_path_tensor_src_bf16_dst_fp32.sum (tensor-core math ops of bf16 inputs, fp32 accumulation), the
achieved matrix rate (TFLOP/s, those ops over the kernel's time; "-" for kernels without tensor work); when the CSV
has them, the L2 throughput (lts__throughput, % of peak: whether the L2 feeds the tensor cores fast enough) and the
L2 read bandwidth to the SMs (TB/s, lts__t_sectors_srcunit_tex_op_read sectors x 32 bytes over the time). A last
line sums the launches. Lines of the CSV that are not metric rows (the program's own output, ncu's messages) are
skipped."""
import csv
import re
import sys

# Values are converted to bytes and microseconds; ncu writes either the short or the long unit names.
UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
         "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
         "nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6,
         "ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6, "%": 1.0}


def short(name):
    name = name.replace("<unnamed>", "anon").replace("void ", "", 1)
    depth, out = 0, []
    for ch in name:  # drop template arguments (nested) and stop at the argument list
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            break
        elif depth == 0:
            out.append(ch)
    base = "".join(out).split("::")[-1]
    if base == "device_kernel":  # CUTLASS's kernel wrapper: name the schedule, tile, cluster and stages it runs
        m = re.search(r"WarpSpecialized\w*<(\d+), cute::tuple<cute::C<(\d+)>, cute::C<(\d+)>, cute::C<1>>, "
                      r"(?:cutlass::)?(?:gemm::)?Kernel\w*?(Cooperative|Pingpong)\w*>, "
                      r"cute::tuple<cute::C<(\d+)>, cute::C<(\d+)>, cute::C<(\d+)>>", name)
        if m:
            stages, cm, cn, sched, tm, tn, tk = m.groups()
            base = f"cutlass {sched.lower()} {tm}x{tn}x{tk} c{cm}x{cn} s{stages}"
            if "GatedEpilogueArray" in name:
                base += " gated"
        else:
            base = "cutlass gemm"
    return base[:44]


TENSOR_OPS = "sm__ops_path_tensor_src_bf16_dst_fp32.sum"
L2_PCT = "lts__throughput.avg.pct_of_peak_sustained_elapsed"
L2_READ = "lts__t_sectors_srcunit_tex_op_read.sum"


def rows_of(path):
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    if not lines:
        return []
    launches = {}
    for r in csv.DictReader(lines):
        if "Metric Name" not in r or r.get("ID") in (None, "ID"):
            continue
        d = launches.setdefault(int(r["ID"]), {"kernel": r["Kernel Name"]})
        try:
            v = float(r["Metric Value"].replace(",", ""))
        except ValueError:
            continue
        d[r["Metric Name"]] = v * UNITS.get(r.get("Metric Unit", ""), 1.0)
    return [launches[i] for i in sorted(launches)]


def main(paths):
    for path in paths:
        rows = rows_of(path)
        print(f"== {path}: {len(rows)} launches")
        tensor = any(TENSOR_OPS in d for d in rows)
        l2 = any(L2_PCT in d for d in rows)
        print(f"{'kernel':<45}{'us':>9}{'read MB':>10}{'write MB':>10}{'TB/s':>7}{'dram%':>7}{'sm%':>7}"
              + (f"{'TFLOP/s':>9}" if tensor else "") + (f"{'l2%':>7}{'L2 TB/s':>9}" if l2 else ""))
        tot_us = tot_r = tot_w = 0.0
        for d in rows:
            us = d.get("gpu__time_duration.sum", float("nan"))
            rd = d.get("dram__bytes_read.sum", 0.0) / 1e6
            wr = d.get("dram__bytes_write.sum", 0.0) / 1e6
            tbps = (rd + wr) * 1e6 / (us * 1e-6) / 1e12 if us and us == us else float("nan")
            rate = ""
            if tensor:
                ops = d.get(TENSOR_OPS, 0.0)
                rate = f"{ops / (us * 1e-6) / 1e12:>9.1f}" if ops > 0 and us == us and us > 0 else f"{'-':>9}"
            if l2:
                ok = us == us and us > 0
                l2_tbps = d.get(L2_READ, float("nan")) * 32 / (us * 1e-6) / 1e12 if ok else float("nan")
                rate += f"{d.get(L2_PCT, float('nan')):>7.1f}{l2_tbps:>9.2f}"
            print(f"{short(d['kernel']):<45}{us:>9.1f}{rd:>10.1f}{wr:>10.1f}{tbps:>7.2f}"
                  f"{d.get('dram__throughput.avg.pct_of_peak_sustained_elapsed', float('nan')):>7.1f}"
                  f"{d.get('sm__throughput.avg.pct_of_peak_sustained_elapsed', float('nan')):>7.1f}" + rate)
            if us == us:
                tot_us += us
            tot_r += rd
            tot_w += wr
        print(f"{'sum':<45}{tot_us:>9.1f}{tot_r:>10.1f}{tot_w:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
